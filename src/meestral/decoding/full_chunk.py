"""Full-depth steps in chunks: n greedy steps as one device run, one host read per chunk.

At batch 1 a step's device work is short (SmolLM2 on an H100: ~1.5 ms a token; a 7B model: a few
ms), and between two steps the device waits for the host: the read of the emitted token, then the
Python that prepares and launches the next step (on the Mistral-7B shape ~0.8 ms a token of device
idle time, kernel profile of 2026-12-02 in benchmarks/NOTES.md). Where nothing between two steps
needs the host, n steps can run back to back on the device, each step's argmax written straight
into the next step's input: on a capturing engine the n steps are one CUDA graph (`sequence`), and
the host reads the n tokens once.

Where it applies: steps whose exit decisions are known before they run (full depth: no exit
point; the static exit-at-layer baseline under copy/propagate: every token leaves at the same exit
point, slot_policies.py), greedy (a draw would need the host-side generator), and a capturing
engine (eager steps gain nothing from it and keep their per-step views). Chunk lengths are powers of two up to `CHUNK`, never more than the tokens
still wanted: each length is captured once per key range, and no token is computed past the end.
A row that ends inside a chunk (EOS, a stop string) has the rest of the chunk charged as spent work
(the decoder's rule for tokens after a row's end), at most CHUNK - 1 steps.

Used by `copy`/`propagate` (plain full depth, and their static exits: `run_chunk` takes the
policy's own step as `forward`) and by `speculate`'s controller when it falls back to full depth.
"""

from __future__ import annotations

import copy

import torch

from meestral.decoding.policy import Outcome

CHUNK = 8


def chunk_length(limit: int, most: int = CHUNK) -> int:
    """The largest power of two that is at most min(limit, most), and at least 1."""
    n = max(1, min(int(limit), most))
    return 1 << (n.bit_length() - 1)


def tokens_wanted(batch, opts) -> int:
    """Tokens each row may still emit (the prefill emitted the first at slot P-1)."""
    return opts.max_new_tokens - (batch.slot - batch.P + 1)


def chunkable(engine, opts) -> bool:
    """Whether full-depth steps run in chunks: greedy, on an engine that chunks (`chunk_steps`: the
    graph engine where it captures; tests turn it on elsewhere to check the same data flow)."""
    return bool(engine.chunk_steps) and opts.greedy


@torch.no_grad()
def run_chunk(engine, batch, n: int, forward=None, key=("full",), with_notes=False):
    """n greedy steps from batch.slot: (tokens [B][n] on the host, the last step's logits [B, V]:
    an output buffer, valid until the same chunk runs again). Advances batch.fed and batch.slot by
    n; inactive rows write nothing.

    Each step is full depth, or `forward(view, fed, slot, at)` -> logits [B, V]: a policy's step
    with no host read in it, where `view` is the batch whose `pad` and `active_dev` are the chunk's
    inputs (a graph must read them from its own buffers) and `at` [1] the step's slot on the
    device. `key` names the step for the chunk's captured graph. With `with_notes`, forward
    returns (logits, note [B] long): what the step decided on the device (slot_policies: each
    row's exit point), returned per row and step as a third value [B][n], read with the tokens."""
    eng, state, s = engine, batch.state, batch.slot
    inputs = {"fed": batch.fed, "at": batch.tensor([s], torch.long), "pad": batch.pad, "active": batch.active_dev}

    def full_depth(view, fed, slot, at):
        step = eng.make_step(slot, 1, view.pad, write=view.active_dev[:, None], at=at)
        h, _, _ = eng.run(eng.kept, eng.embed(fed[:, None]), state, step)
        return eng.logits(h[:, -1])

    one = forward or full_depth

    def device_part(x):
        view = copy.copy(batch)
        view.pad, view.active_dev = x["pad"], x["active"]
        fed, toks, notes, logits = x["fed"], [], [], None
        for t in range(n):
            out = one(view, fed, s + t, x["at"] + t)
            logits, note = out if with_notes else (out, None)
            fed = logits.argmax(-1)
            toks.append(fed)
            notes.append(note)
        return torch.stack(toks, 1), logits, (torch.stack(notes, 1) if with_notes else None)

    toks_t, logits, notes_t = eng.sequence(("chunk", n, batch.B, id(state)) + tuple(key), device_part, inputs,
                                           start=s, length=n)
    toks = toks_t.tolist()  # the chunk's one read
    batch.fed = toks_t[:, -1].clone()  # the graph's output buffer is rewritten by the next replay
    batch.slot = s + n
    if with_notes:  # read after the tokens: the device has already finished, no second wait
        return toks, logits, notes_t.tolist()
    return toks, logits


def chunk_outcomes(engine, batch, n: int, logs_at, forward=None, key=("full",), with_notes=False):
    """`run_chunk`, then per active row n emit outcomes, each with the log of its own step:
    `logs_at(slot)` gives every row's StepLog of the step that fed `slot` (the policy's own log of
    that step); with `with_notes`, `logs_at(slot, notes)` with that step's note of every row
    (`run_chunk`). Returns (per row a list of outcomes or None, the last step's logits)."""
    s, rows = batch.slot, [b for b in range(batch.B) if batch.active[b]]
    if with_notes:
        toks, logits, notes = run_chunk(engine, batch, n, forward, key, with_notes=True)
        logs = [logs_at(s + t, [row[t] for row in notes]) for t in range(n)]
    else:
        toks, logits = run_chunk(engine, batch, n, forward, key)
        logs = [logs_at(s + t) for t in range(n)]
    out = [None] * batch.B
    for b in rows:
        out[b] = [Outcome("emit", logs[t][b], token=toks[b][t]) for t in range(n)]
    return out, logits
