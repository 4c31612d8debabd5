"""Lossless early exit that pays: the `speculate` policy (self-speculative decoding).

A *cycle* drafts up to k tokens from exit point E and checks them all in one deep pass:

1. draft steps t = 0..k-1: feed the newest token at slot s+t through blocks 0..E, read the draft
   distribution there (the shared final norm + LM head on E's hidden state: the logit lens) and
   take its token (greedy: the argmax; sampling: a draw) as the next input; the exit head's
   confidence at E is asked too, and a draft whose confidence is not above its threshold ends the
   cycle's proposals (on the device: it and the later drafts are masked, nothing is read back);
2. one more shallow step puts the last draft through blocks 0..E (slot s+k);
3. the deep pass: blocks E+1..L-1 over the k+1 slots s..s+k in one multi-token call, continuing
   from the drafts' own hidden states at E (blocks 0..E are never run twice), and the LM head at
   every slot: the full model's distribution after each prefix;
4. acceptance on the device (greedy: a draft is kept iff it equals the deep pass's argmax at its
   position; sampling: speculative-sampling acceptance, min(1, p/q), the rejected position drawn
   from the normalised residual max(0, p - q)), then one host read per cycle: the drafts, how many
   each row accepted, and the token that follows them (the correction, or the deep pass's own next
   token when every draft was accepted).

Greedy output equals full-depth greedy output token for token (in float32; in bf16 it is the deep
pass's own choice, which can round differently from a one-token step); under sampling the output
distribution is the full model's.

State. Transformer: the drafts' K/V in blocks 0..E and the deep pass's in E+1..L-1 sit in their
slots; a rejected slot is simply written again by the next cycle before any query can see it
(attention is causal over slots), so a rejection is bookkeeping only. Mamba-2 / Mamba-1: a recurrent
state cannot be cut back, so every step of a cycle also keeps each layer's state after each slot
(`Backbone.new_history`, k+1 positions: one full state per position, written as the step runs);
after the read the state is set to the one after the last accepted slot (`restore_history`).
Per-position history was chosen over replaying the accepted tokens from a snapshot: a replay reads
every block's weights again, which is the whole cost being saved; the history costs writing k+1
states (Codestral-Mamba-7B: ~4 MB of float32 state per layer and position) and no weight read.

Batches. All rows advance together: a cycle keeps, for every row, the shortest accepted prefix of
the batch (the token after it is the row's correction where the row rejected there, its accepted
draft otherwise). Any prefix of a speculative-sampling output is itself a correct sample, so this
is exact; it costs the rows that accepted more their extra drafts, and keeps one slot per step
for every row, which is what a fixed-shape (CUDA-graph) engine needs.

The controller (speculation_control.py) picks k and the exit point per cycle from measured
acceptance and step times, and falls back to plain full-depth steps where speculation would not
pay. Accounting: each emitted token carries the log of the step that made it (a draft step for an
accepted draft, the deep pass for the token after them); rejected drafts' steps are charged as
discarded work, so per-token costs include them.
"""

from __future__ import annotations

import time
import weakref

import torch

from meestral.decoding.accounting import StepLog
from meestral.decoding.full_chunk import CHUNK, chunk_length, chunk_outcomes, chunkable, tokens_wanted
from meestral.decoding.policy import Outcome, Policy
from meestral.decoding.sampling import draw, probabilities
from meestral.decoding.speculation_control import Choice, SpeculationController


COUNTS = ("cycles", "drafts", "checked", "accepted", "full_steps")


_SIZES = weakref.WeakKeyDictionary()  # backbone -> (parameters per block, LM head parameters)


def draft_head_share(draft_vocab: int, vocab_size: int) -> float:
    """The part of the LM head a draft reads: its first `draft_vocab` rows (0: all of it)."""
    return draft_vocab / vocab_size if draft_vocab else 1.0


def cycle_cost(bb, e: int, k: int, kept=None, draft_vocab: int = 0) -> float:
    """A cycle of k drafts from exit point `e`, in full-depth steps by weight bytes (what bounds
    batch-1 decoding on a GPU): k+1 shallow steps through blocks 0..e, k draft-head reads (of the
    first `draft_vocab` rows of the LM head where it is trimmed), one deep pass through the rest and
    one LM-head read. `kept`: the blocks that run (default all)."""
    if bb not in _SIZES:  # scoring prices every request with it: count the parameters once
        _SIZES[bb] = ([sum(p.numel() for p in bb.blocks[i].parameters()) for i in range(bb.num_layers)],
                      bb.lm_head_module.weight.numel())
    layer, head = _SIZES[bb]
    kept = range(bb.num_layers) if kept is None else kept
    full = sum(layer[i] for i in kept) + head
    draft = sum(layer[i] for i in kept if i <= e)
    deep = sum(layer[i] for i in kept if i > e)
    return ((k + 1) * draft + k * head * draft_head_share(draft_vocab, bb.vocab_size) + deep + head) / full


def draft_step_log(e: int, shallow, context: int, needs_logits: bool, head_share: float = 1.0) -> StepLog:
    """The log of one draft step from exit point e: blocks `shallow`, the exit head's probe, and
    the LM head the draft reads (the probe's own logits where the head reads them). With a trimmed
    draft head (head_share < 1) the draft reads its rows, and a logit-reading head is not asked."""
    if head_share < 1:
        return StepLog(e, tuple(shallow), context, probes=0 if needs_logits else 1, head_read=True,
                       head_share=head_share, deep=False, verified=True)
    return StepLog(e, tuple(shallow), context, probes=1, head_read=not needs_logits, deep=False, verified=True)


class SpeculatePolicy(Policy):
    name = "speculate"

    def __init__(self, config, engine):
        super().__init__(config, engine)
        self.max_k = config.draft_tokens
        kept = engine.kept
        # Per exit point: the blocks a draft runs (up to and including it) and those the deep pass runs.
        self.split = [([i for i in kept if i <= e], [i for i in kept if i > e]) for e in self.points]
        self.control, self._prior = None, {}
        if config.adaptive:
            self.control = SpeculationController(list(range(len(self.points))), self.max_k, self.prior_cost)
        # A trimmed draft head (config.draft_vocab = N): drafts read the LM head's first N rows. BPE
        # tokenizers number tokens in merge order, most frequent first, so the first rows cover most
        # of what a model writes (SmolLM2, first 8,192 of 49,152: ~92% of its own chat output);
        # a token outside them is never drafted, so its position is a rejection (the deep pass
        # checks with the full head: the output is unchanged). A logit-reading confidence would
        # read the whole head again: `checked` allows it only at threshold 0, where it is skipped.
        self.draft_vocab = config.draft_vocab
        self.head_share = draft_head_share(config.draft_vocab, engine.bb.vocab_size)
        # What the controller's step costs are: "wall" (measured ms: what it is for) or "bytes" (each
        # step's weight-byte cost, deterministic: what teacher-forced scoring replays, and tests).
        self.clock = "wall"
        self.inject = None  # benchmark only: each draft is accepted with this chance, whatever its token
        self.last_choice = None  # what the last step ran (tests and the benchmark read it)
        self.timer = time.perf_counter  # the controller's wall clock (tests drive their own)
        self.reset_counts()

    @property
    def extra_slots(self) -> int:
        """Slots a cycle may write past the last token it keeps (its rejected drafts)."""
        return self.max_k + 1

    def prior_cost(self, j: int, k: int) -> float:
        """A cycle's cost in full-depth steps by weight bytes (`cycle_cost`; the controller asks
        every step, so each (j, k) is computed once)."""
        if (j, k) not in self._prior:
            self._prior[j, k] = cycle_cost(self.engine.bb, self.points[j], k, self.engine.kept, self.draft_vocab)
        return self._prior[j, k]

    def start(self, batch, first, hidden_dtype):
        super().start(batch, first, hidden_dtype)
        batch.history = self.engine.new_history(batch.state, batch.B, self.max_k + 1)

    def choose(self, batch, opts) -> Choice:
        c = self.control.choose() if self.control is not None else Choice(0, self.max_k)
        if self.engine.capture:
            # A CUDA-graph engine replays shapes it has captured: fewer drafts near the end would be
            # new shapes (a capture each, far dearer than the few drafts it saves); the tokens
            # drafted past the end are charged as spent work.
            return c
        # A cycle emits at most k+1 tokens: near the end, fewer drafts waste less.
        return Choice(c.j, max(0, min(c.k, tokens_wanted(batch, opts) - 1)), c.probe)

    @torch.no_grad()
    def step(self, batch, opts, gen):
        t0, firsts = self.timer(), self.engine.first_calls
        choice = self.choose(batch, opts)
        self.last_choice = choice
        n = 1  # tokens the step emits per row when it is full depth
        if choice.k == 0:
            n = self.full_chunk(batch, opts)
            out, logits, accepted, rejected = self.full_step(batch, opts, gen, n)
        else:
            out, logits, accepted, rejected = self.cycle(batch, opts, gen, choice.j, choice.k)
        if self.control is not None:  # the step ended with a read: its device work is done
            if self.clock == "bytes":  # deterministic: the step's weight-byte cost in full-depth steps
                cost = 1.0 if choice.k == 0 else self.prior_cost(choice.j, choice.k)
            elif self.engine.first_calls != firsts:  # it ran a shape for the first time (compile, capture)
                cost = None
            else:  # a full-depth chunk is timed per token: what falling back yields per step
                cost = (self.timer() - t0) * 1000 / n
            self.control.observe(choice, cost, accepted, rejected)
        c = self.counts
        if choice.k == 0:
            c["full_steps"] += n
        else:  # drafts checked until the first rejection (the geometric model's acceptance)
            c["cycles"] += 1
            c["accepted"] += accepted
            c["checked"] += accepted + (1 if rejected else 0)
            c["drafts"] += choice.k
        return out, logits

    def reset_counts(self) -> dict:
        """The counts since the last reset (cycles, drafts made, drafts checked and accepted,
        full-depth steps), then zero: the benchmark's acceptance per run."""
        old, self.counts = getattr(self, "counts", None), dict.fromkeys(COUNTS, 0)
        return old

    # ---- plain full-depth steps (the controller's fallback) -----------------------------------
    def full_chunk(self, batch, opts) -> int:
        """How many full-depth steps to run now as one device run (full_chunk.py): on a capturing
        engine, greedy, the rest of the controller's pause (this step included) or, when it
        re-times full depth or starts, up to CHUNK; never past the tokens still wanted. The pause
        is consumed by as many steps. Otherwise 1."""
        if not chunkable(self.engine, opts):
            return 1
        want = CHUNK
        if self.control is not None and self.control.pause > 0:
            want = self.control.pause + 1
        n = chunk_length(min(want, tokens_wanted(batch, opts)))
        if self.control is not None:
            self.control.pause = max(0, self.control.pause - (n - 1))
        return n

    def _full_logs(self, batch, slot):
        """Every row's log of a full-depth step that fed `slot`."""
        kept = tuple(self.engine.kept)
        return [StepLog(self.L - 1, kept, slot + 1 - pad, verified=True) for pad in batch.pad_host]

    def full_step(self, batch, opts, gen, n: int = 1):
        if n > 1:
            out, logits = chunk_outcomes(self.engine, batch, n, lambda slot: self._full_logs(batch, slot))
            return out, logits, 0, False
        eng, s = self.engine, batch.slot
        step = eng.make_step(s, 1, batch.pad, write=batch.active_dev[:, None])
        h, _, _ = eng.run(eng.kept, eng.embed(batch.fed[:, None]), batch.state, step)
        logits = eng.logits(h[:, -1])
        tok = draw(probabilities(logits, opts), opts, gen) if not opts.greedy else logits.argmax(-1)
        toks = tok.tolist()  # the step's one read
        batch.fed, batch.slot = tok, s + 1
        logs = self._full_logs(batch, s)
        out = [[Outcome("emit", logs[b], token=toks[b])] if batch.active[b] else None for b in range(batch.B)]
        return out, logits, 0, False

    # ---- a speculation cycle ------------------------------------------------------------------
    def cycle(self, batch, opts, gen, j: int, k: int):
        eng, state, hist = self.engine, batch.state, batch.history
        s, B = batch.slot, batch.B
        inputs = {"fed": batch.fed, "at": batch.tensor([s], torch.long), "pad": batch.pad, "active": batch.active_dev}

        def device_part(x):
            return self.draft_and_check(x, state, hist, s, j, k, opts, gen)

        if opts.greedy and (self.inject is None or gen is None):
            # Everything up to the read is device work at fixed shapes: a graph engine captures
            # the whole cycle once per (exit point, k, batch, key range) and replays it.
            key = ("speculate", j, k, B, id(state), self.inject)  # (α is baked into a captured graph)
            vals_t, full_m = eng.sequence(key, device_part, inputs, start=s, length=k + 1)
        else:  # sampling draws from a generator the host hands in: the engine's calls one by one
            vals_t, full_m = device_part(inputs)
        vals = vals_t.tolist()  # the cycle's one read: per row the drafts, accepted count, next token
        rows = [b for b in range(B) if batch.active[b]]
        m = min(vals[b][k] for b in rows)  # every row keeps the batch's shortest accepted prefix
        tokens = {}
        for b in rows:
            d, nb, fix = vals[b][:k], vals[b][k], vals[b][k + 1]
            tokens[b] = d[:m] + [fix if nb == m else d[m]]
        if hist is not None and m < k:  # a recurrent state: back to the state after the last kept slot
            # (with every draft kept the state is already the one after slot s+k: restoring it would
            # move every layer's state through memory twice for nothing, ~0.5 GB on Codestral-7B)
            eng.restore_history(state, hist, batch.tensor([(s + m) % hist.positions], torch.long))
        batch.fed = batch.tensor([tokens[b][-1] if b in tokens else 0 for b in range(B)], torch.long)
        batch.slot = s + m + 1
        return self._outcomes(batch, rows, tokens, s, j, k, m), full_m, m, m < k

    def draft_and_check(self, x, state, hist, s: int, j: int, k: int, opts, gen):
        """The cycle's device work on inputs x (fed [B], at [1] = slot s on the device, pad [B],
        active [B]): k drafts, the last one's shallow step, the deep pass, acceptance. No host
        read and no host decision on device values, so it can be captured as one graph; `s`
        (host) only sizes the attention key range. Returns ([B, k+2] drafts + accepted count +
        next token, the deep pass's logits at slot s [B, V])."""
        eng = self.engine
        shallow, deep = self.split[j]
        pad, at = x["pad"], x["at"]
        write = x["active"][:, None]
        B = pad.shape[0]
        fed, hs, drafts, qs, props = x["fed"], None, [], [], []
        for t in range(k + 1):
            step = eng.make_step(s + t, 1, pad, write=write, at=at + t)
            step.shared.history = hist
            h, aux, prev = eng.run(shallow, eng.embed(fed[:, None]), state, step)
            if hs is None:  # every slot's hidden state after block E (a call's output buffer is reused)
                hs = h.new_empty(B, k + 1, h.shape[-1])
            hs[:, t] = h[:, 0]
            if t == k:
                break
            if self.draft_vocab:  # the trimmed head: the first N rows (token ids 0..N-1)
                lg = eng.draft_logits(h[:, -1], self.draft_vocab)
                ok = torch.ones(B, dtype=torch.bool, device=lg.device)  # threshold 0 (checked)
                if not self.needs_logits:
                    conf, _ = self.confidence(j, h[:, -1], None if aux is None else aux[:, -1], prev[:, -1])
                    ok = conf > self.thresholds[j]
            else:
                conf, lg = self.confidence(j, h[:, -1], None if aux is None else aux[:, -1], prev[:, -1])
                if lg is None:  # a head that does not read the LM head: the draft still needs it
                    lg = eng.logits(h[:, -1])
                ok = conf > self.thresholds[j]  # the exit rule (exit_rule.py): a draft is proposed only above it
            if opts.greedy:
                fed = lg.argmax(-1)
            else:
                q = probabilities(lg, opts)
                if self.draft_vocab:  # as a distribution over the whole vocabulary (0 beyond row N)
                    q = torch.nn.functional.pad(q, (0, self.engine.bb.vocab_size - q.shape[-1]))
                qs.append(q)
                fed = draw(q, opts, gen)
            drafts.append(fed)
            props.append(ok if not props else props[-1] & ok)
        step = eng.make_step(s, k + 1, pad, write=write.expand(B, k + 1), at=at)
        step.shared.history = hist
        h, _, _ = eng.run(deep, hs, state, step)
        full = eng.logits(h)  # [B, k+1, V]: the full model's next-token logits after each prefix
        D = torch.stack(drafts, 1)  # [B, k]
        n, nxt = self.accept(D, full, qs, torch.stack(props, 1), opts, gen)
        return torch.cat([D, n[:, None], nxt[:, None]], 1), full[:, 0]

    def _outcomes(self, batch, rows, tokens, s, j, k, m):
        """Per row the cycle's outcomes: its m accepted drafts (each with its draft step's log),
        the deep pass's token, then the spent drafts (rejected, or not proposed)."""
        eng = self.engine
        shallow, deep = self.split[j]
        out = [None] * batch.B
        deep_slots = tuple((k + 1 if i in deep else 1) if i in eng.kept else 0 for i in range(self.L))
        for b in rows:
            pad = batch.pad_host[b]

            def draft_log(t):  # draft step t fed slot s+t
                return draft_step_log(self.points[j], shallow, s + t + 1 - pad, self.needs_logits, self.head_share)

            deep_log = StepLog(self.L - 1, tuple(eng.kept), s + k + 1 - pad, slots=deep_slots, verified=True)
            outs = [Outcome("emit", draft_log(t), token=tokens[b][t]) for t in range(m)]
            outs.append(Outcome("emit", deep_log, token=tokens[b][m]))
            outs += [Outcome("spent", draft_log(t)) for t in range(m, k)]
            out[b] = outs
        return out

    def accept(self, D, full, qs, proposed, opts, gen):
        """Per row, how many leading drafts are accepted (n [B]) and the token that follows them
        (nxt [B]: the correction at the first rejected position, or the deep pass's next token when
        all k were accepted). D [B, k] drafts, full [B, k+1, V] the deep pass's logits, qs the draft
        distributions (sampling), proposed [B, k] which drafts passed the exit rule (a prefix)."""
        B, k = D.shape
        dev = D.device
        ar = torch.arange(B, device=dev)
        if self.inject is not None:  # benchmark only: acceptance at a chosen rate, tokens irrelevant
            ok = proposed & (torch.rand(B, k, generator=gen, device=dev) < self.inject)
        elif opts.greedy:
            ok = proposed & (D == full[:, :k].argmax(-1))
        else:
            p = probabilities(full[:, :k], opts)  # [B, k, V]
            q = torch.stack(qs, 1)
            px, qx = p.gather(-1, D[..., None])[..., 0], q.gather(-1, D[..., None])[..., 0]
            u = torch.rand(B, k, generator=gen, device=dev)
            ok = proposed & (qx > 0) & (u * qx < px)
        n = ok.long().cumprod(1).sum(1)  # leading accepted drafts
        if opts.greedy:
            return n, full[ar, n].argmax(-1)
        # Sampling: after all k accepted, a draw from the deep pass's last distribution; at a
        # rejected proposed draft, from the residual max(0, p - q) normalised; at a draft that was
        # never proposed (the exit rule stopped the cycle), from p itself.
        p_n = probabilities(full[ar, n], opts)
        was_proposed = proposed[ar, n.clamp(max=k - 1)] & (n < k)
        q_n = torch.stack(qs, 1)[ar, n.clamp(max=k - 1)]
        residual = torch.where(was_proposed[:, None], (p_n - q_n).clamp(min=0), p_n)
        mass = residual.sum(-1, keepdim=True)
        dist = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_n)
        return n, torch.multinomial(dist, 1, generator=gen)[:, 0]
