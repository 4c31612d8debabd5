"""Exact state handling for early exit: the `catchup` policy and lossless `verify` decoding.

Catch-up
--------
An exited token leaves the layers after its exit point without its state. Instead of faking that
state (copy, propagate), the token waits in a per-row *backlog* with its hidden state at the
depth it reached. Whenever a later token runs layer l, every backlog token that is still missing
from layer l is run through it *in the same call* (one batched multi-token pass, causal), so the
weights of layer l are read once for all of them. Invariant: for every row and layer, the slots
the layer holds form a prefix of the sequence, and each is exactly what the full model would hold
for the same tokens. A token that goes deep empties the backlog. A full backlog (`max_backlog`)
forces the next token deep. FLOPs are not saved by catch-up; weight reads are.

Per slot we keep: the token, its `depth` (deepest block it has been through, -1: none) and its
hidden state at that depth (`hidden`). At layer l the call writes exactly the slots with
depth == l-1 of rows whose current token is still running.

Verify
------
A deep pass also yields the full model's distribution at every backlog slot. Each token emitted
from an exit is a *draft*; after a deep pass the drafts are checked in order against the full
model with speculative-sampling acceptance (greedy: equality of the argmax). At the first
rejection the output is cut back to that slot, the full model's token (or a draw from the residual
distribution) is emitted instead, and the states forget every slot from there on:
- Transformer K/V slots are truncated exactly (`Backbone.truncate`).
- A recurrent (Mamba) state cannot be cut, so each row keeps ONE snapshot of all layers, taken
  after its last fully-verified deep pass; on rejection the row is restored from it and the
  accepted tokens since are replayed lazily by the next steps' catch-up. Memory is bounded: one
  snapshot per row (its size is `Backbone.snapshot_nbytes`) plus `max_backlog` hidden states.
Greedy output then equals the full model's token for token; with sampling, its distribution.
"""

from __future__ import annotations

import torch

from meestral.accounting import TokenStats
from meestral.backbones.base import Step


class Backlog:
    """Per-row, per-slot bookkeeping of a catch-up generation."""

    def __init__(self, batch: int, capacity: int, num_layers: int, device):
        self.tokens = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.depth = torch.full((batch, capacity), num_layers - 1, dtype=torch.long, device=device)
        self.draft = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.hidden = None  # [B, capacity, d], allocated at the prefill's output dtype
        self.q = {}  # (row, slot) -> draft distribution, for sampling acceptance
        self.snapshot = None  # SSM only: states after each row's last verified deep pass
        self.snap_upto = None  # [B]: first slot the snapshot does not hold


def pending(bl: Backlog, cur: torch.Tensor, L: int) -> torch.Tensor:
    """[B] backlog size: slots before the current one that some layer still lacks."""
    slots = torch.arange(bl.depth.shape[1], device=cur.device)
    return ((bl.depth < L - 1) & (slots[None, :] < cur[:, None])).sum(1)


def catchup_step(dec, bl: Backlog, state, cur, pad, active, force_deep):
    """One step for every active row: run its current token (slot cur[b]) and, along with it,
    every backlog slot missing from each layer the token runs. Returns (logits for the current
    token [B, V], full-model logits at every window slot for rows that went deep [B, W, V] or
    None, window start, per-row info for accounting)."""
    bb, heads, L = dec.bb, dec.heads, dec.bb.num_layers
    B, dev = cur.shape[0], cur.device
    slots_all = torch.arange(bl.depth.shape[1], device=dev)
    in_row = (slots_all[None, :] <= cur[:, None]) & active[:, None]
    lacking = in_row & (bl.depth < L - 1)
    lo = int(torch.where(lacking, slots_all[None, :], bl.depth.shape[1]).min())
    hi = int(cur[active].max())
    win = slice(lo, hi + 1)
    slots = slots_all[win]
    # Unprocessed slots (the new token; replayed ones after an SSM rollback) start from embeddings.
    fresh = in_row[:, win] & (bl.depth[:, win] == -1)
    emb = bb.embed(bl.tokens[:, win]).to(bl.hidden.dtype)
    bl.hidden[:, win] = torch.where(fresh[..., None], emb, bl.hidden[:, win])
    positions = (slots[None, :] - pad[:, None]).clamp(min=0)
    memo = {}  # shared by the step's layers (rotary tables)
    running = active.clone()
    rows = torch.arange(B, device=dev)
    exit_at = torch.full((B,), L - 1, device=dev)
    ran = torch.zeros(B, L, dtype=torch.bool, device=dev)
    written = torch.zeros(B, L, dtype=torch.long, device=dev)
    probes = torch.zeros(B, dtype=torch.long, device=dev)
    probe_logits = None
    points = {l: j for j, l in enumerate(heads.exit_points)} if heads is not None else {}
    at = (cur - lo).clamp(0, hi - lo)  # each row's current slot inside the window (finished rows: any)
    prev = bl.hidden[rows, cur].clone()
    # A running row always needs the layer for its current slot, so "some slot needs layer i" is
    # "some row still runs": a host flag refreshed at exit decisions, not a GPU sync per layer.
    any_running = True
    for i in range(L):
        if not any_running:
            break  # every row's current token has left: the backlog waits for a deeper token
        need = in_row[:, win] & (bl.depth[:, win] == i - 1) & running[:, None]
        x = bl.hidden[:, win]
        out, aux = bb.forward_layer(i, x, state, Step(lo, positions, need, memo))
        bl.hidden[:, win] = torch.where(need[..., None], out.to(x.dtype), x)
        bl.depth[:, win] = torch.where(need, i, bl.depth[:, win])
        ran[:, i] = running
        written[:, i] = need.sum(1)
        may_exit = running & ~force_deep
        if i in points and may_exit.any():
            j = points[i]
            h = out[rows, at]
            a = None if aux is None else aux[rows, at]
            lg = bb.logits(h) if heads.needs_logits else None
            conf = heads.confidence(j, h, a, prev, lg)
            probes += may_exit.long()
            newly = may_exit & (conf > dec.thresholds[j])
            if newly.any():
                exit_at = torch.where(newly, torch.full_like(exit_at, i), exit_at)
                running = running & ~newly
                any_running = bool(running.any())
                if lg is not None:
                    probe_logits = lg if probe_logits is None else torch.where(newly[:, None], lg, probe_logits)
        prev = out[rows, at]
    h_cur = bl.hidden[rows, cur]
    logits = bb.logits(h_cur)
    left = active & (exit_at < L - 1)
    head_read = torch.ones_like(active)
    if probe_logits is not None:
        logits = torch.where(left[:, None], probe_logits, logits)
        head_read = ~left
    deep = active & ~left
    full = bb.logits(bl.hidden[:, win]) if dec.verify and deep.any() else None
    info = dict(exit_at=exit_at, ran=ran, written=written, probes=probes, head_read=head_read, deep=deep)
    return logits, full, lo, info


def accept_drafts(dec, bl: Backlog, b: int, cur_b: int, lo: int, full, opts, gen):
    """Check row b's drafts (slots <= cur_b) against the full model, in order. Returns None when
    all are accepted, else (slot t, corrected token) of the first rejection."""
    from meestral.decoding import probabilities

    for t in torch.nonzero(bl.draft[b, : cur_b + 1]).flatten().tolist():
        p = probabilities(full[b, t - 1 - lo], opts)  # the full model's distribution for slot t
        x = int(bl.tokens[b, t])
        q = bl.q.pop((b, t))
        # Speculative sampling: keep x with probability min(1, p(x)/q(x)); otherwise draw from
        # the normalised residual max(0, p - q). Greedy: p and q are one-hot, so x is kept iff
        # it is the full model's argmax, and the residual is that argmax.
        u = torch.rand((), generator=gen, device=p.device) if opts.temperature > 0 else 0.0
        if q[x] > 0 and u < p[x] / q[x]:
            bl.draft[b, t] = False
            continue
        residual = (p - q).clamp(min=0)
        if opts.temperature == 0 or residual.sum() <= 0:
            token = int(p.argmax())
        else:
            token = int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
        return t, token
    return None


def rollback(dec, bl: Backlog, state, b: int, t: int, token: int, L: int):
    """Row b keeps slots < t; slot t now holds `token`, not yet processed by any layer."""
    bb = dec.bb
    rows = torch.zeros(bl.depth.shape[0], dtype=torch.bool, device=bl.depth.device)
    rows[b] = True
    if bb.can_truncate:
        bb.truncate(state, torch.full_like(bl.depth[:, 0], t), rows)
    else:
        bb.restore(state, bl.snapshot, rows)
        start = int(bl.snap_upto[b])
        bl.depth[b, start:t] = -1  # accepted tokens since the snapshot: replayed by catch-up
    bl.depth[b, t:] = L - 1
    bl.draft[b, t:] = False
    for key in [k for k in bl.q if k[0] == b and k[1] >= t]:
        del bl.q[key]
    bl.tokens[b, t] = token
    bl.depth[b, t] = -1


def step_stats(dec, info, b, context, wall) -> TokenStats:
    """Accounting of one catch-up step for row b: weights of each layer it ran are read once;
    FLOPs count every slot written (catch-up moves FLOPs, it does not remove them)."""
    ran = [i for i, x in enumerate(info["ran"][b].tolist()) if x]
    counts = info["written"][b].tolist()
    probes = int(info["probes"][b])
    flops, nbytes = dec.cost.token(ran, [], probes, context, bool(info["head_read"][b]), slots=counts)
    return TokenStats(int(info["exit_at"][b]), len(ran), probes, flops, nbytes, wall,
                      caught_up=sum(counts) - len(ran), deep=bool(info["deep"][b]))


def generate_catchup(dec, results, state, ids, pad, hidden_dtype, tok, active, opts, gen, progress=None):
    """The decoding loop of the `catchup` policy (with or without `verify`), after the prefill.

    Rows advance independently: after a rollback a row goes back to an earlier slot while the
    others go on, so each row has its own current slot `cur[b]` (the slot of its newest token,
    which the next step feeds).
    """
    from meestral.decoding import probabilities, sample

    bb, L = dec.bb, dec.bb.num_layers
    B, P = ids.shape
    dev = ids.device
    bl = Backlog(B, P + opts.max_new_tokens, L, dev)
    bl.tokens[:, :P] = ids
    bl.hidden = torch.zeros(B, P + opts.max_new_tokens, bb.hidden_size, dtype=hidden_dtype, device=dev)
    cur = torch.full((B,), P, dtype=torch.long, device=dev)
    bl.tokens[:, P] = tok
    bl.depth[:, P] = -1
    if dec.verify and not bb.can_truncate:
        bl.snapshot = bb.snapshot(state)
        bl.snap_upto = cur.clone()
    flush = torch.zeros(B, dtype=torch.bool, device=dev)
    dec.last_backlog, dec.last_cur = bl, cur  # kept for inspection (tests check the final states)
    while active.any():
        force = active & (flush | (pending(bl, cur, L) >= dec.max_backlog))
        t0 = dec._clock()
        logits, full, lo, info = catchup_step(dec, bl, state, cur, pad, active, force)
        wall = (dec._clock() - t0) * 1000
        for b in torch.nonzero(active).flatten().tolist():
            r, c = results[b], int(cur[b])
            st = step_stats(dec, info, b, c + 1 - int(pad[b]), wall)
            if dec.verify and st.deep:
                rejected = accept_drafts(dec, bl, b, c, lo, full, opts, gen)
                if rejected is not None:
                    t, token = rejected
                    keep = t - P  # tokens before slot t stay; index k of token_ids is slot P + k
                    r.discarded.extend(r.stats[keep:])  # stats[k] belongs to token_ids[k]
                    r.stats[keep:] = [st]
                    r.token_ids[keep:] = [token]
                    rollback(dec, bl, state, b, t, token, L)
                    cur[b] = t
                    flush[b] = False
                    r.finish_reason = "length"  # provisional: the ending the drafts reached is gone
                    _maybe_finish(dec, r, b, bl, cur, active, flush, opts)
                    continue
                if bl.snapshot is not None:  # every token so far is verified: move the snapshot up
                    rows = torch.zeros(B, dtype=torch.bool, device=dev)
                    rows[b] = True
                    bb.update_snapshot(bl.snapshot, state, rows)
                    bl.snap_upto[b] = c + 1
                if flush[b]:  # the drafts that were holding this row open are all accepted
                    r.discarded.append(st)
                    active[b] = False
                    continue
            if dec.verify and not st.deep:
                q = probabilities(logits[b], opts)
                token = int(torch.multinomial(q, 1, generator=gen)) if opts.temperature > 0 else int(q.argmax())
                bl.draft[b, c + 1] = True
                bl.q[(b, c + 1)] = q
            else:
                token = int(sample(logits[b:b + 1], opts, gen))
            cur[b] = c + 1
            bl.tokens[b, c + 1] = token
            bl.depth[b, c + 1] = -1
            r.token_ids.append(token)
            r.stats.append(st)
            _maybe_finish(dec, r, b, bl, cur, active, flush, opts)
        if progress is not None:
            progress.update(1)


def _maybe_finish(dec, r, b, bl, cur, active, flush, opts):
    """End row b if its newest token ends it; under verify, first flush unverified drafts with a
    forced deep pass (the row then ends only if they all survive)."""
    reason = dec.finish_reason(r, opts)
    if reason is None:
        return
    r.finish_reason = reason
    if dec.verify and bl.draft[b, : int(cur[b]) + 1].any():
        flush[b] = True
    else:
        active[b] = False
