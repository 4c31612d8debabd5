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

Per slot the device keeps the token, its `depth` (deepest block it has been through, -1: none)
and its hidden state at that depth. The host keeps, per row, the slot of its newest token and a
`BacklogSchedule` (the depths of the tokens waiting): enough to place the step's window, to
force deep passes and to price every step without reading the device. The same schedule prices
teacher-forced scoring (evaluation/scoring.py), so both charge the same work.

Verify
------
A deep pass also yields the full model's distribution at every backlog slot. Each token emitted
from an exit is a *draft*; after a deep pass the drafts are checked in order against the full
model with speculative-sampling acceptance (greedy: equality of the argmax), all at once on the
device. At the first rejection the output is cut back to that slot, the full model's token (or a
draw from the residual distribution) is emitted instead, and the states forget every slot from
there on:
- Transformer K/V slots are truncated exactly (`Backbone.truncate`).
- A recurrent (Mamba) state cannot be cut, so each row keeps ONE snapshot of all layers, taken
  after its last fully-verified deep pass; on rejection the row is restored from it and the
  accepted tokens since are replayed by the next steps' catch-up. Memory is bounded: one
  snapshot per row (its size is `Backbone.snapshot_nbytes`) plus `max_backlog` hidden states
  (and, when sampling, `max_backlog + 1` draft distributions).
Greedy output then equals the full model's token for token; with sampling, its distribution.
"""

from __future__ import annotations

import torch

from meestral.decoding.accounting import StepLog
from meestral.backbones.base import Step
from meestral.decoding.exit_rule import exits_here
from meestral.decoding.policy import Outcome, Policy
from meestral.decoding.sampling import draw, probabilities, sample


class BacklogSchedule:
    """One row's backlog as the host sees it: the depth (deepest block run, -1: none) of each
    token that still lacks some block, in slot order. They always sit right before the row's
    newest slot. It says when a step must go deep and how many positions each block runs."""

    def __init__(self, max_backlog: int):
        self.max_backlog = max_backlog
        self.depths: list[int] = []

    def __len__(self) -> int:
        return len(self.depths)

    @property
    def full(self) -> bool:
        return len(self.depths) >= self.max_backlog

    def slots(self, exit_layer: int, num_layers: int) -> tuple:
        """Positions block i runs in a step whose token leaves after block `exit_layer`: the
        token itself and every backlog token lacking block i; none after the exit."""
        return tuple(1 + sum(d < i for d in self.depths) if i <= exit_layer else 0 for i in range(num_layers))

    def advance(self, exit_layer: int, num_layers: int) -> None:
        """After that step: a deep token empties the backlog; an exited one joins it, and the
        tokens it carried are now as deep as it went."""
        if exit_layer >= num_layers - 1:
            self.depths = []
        else:
            self.depths = [max(d, exit_layer) for d in self.depths] + [exit_layer]

    def replay(self, n: int) -> None:
        """After a snapshot restore: the last n tokens are back to no block at all."""
        self.depths = [-1] * n


class Backlog:
    """The device side of a catch-up generation: per row and slot, token, depth, hidden state."""

    def __init__(self, batch, first: torch.Tensor, num_layers: int, max_backlog: int):
        B, P, cap, dev = batch.B, batch.P, batch.capacity, batch.pad.device
        self.tokens = torch.zeros(B, cap, dtype=torch.long, device=dev)
        self.tokens[:, :P] = batch.ids
        self.tokens[:, P] = first
        self.depth = torch.full((B, cap), num_layers - 1, dtype=torch.long, device=dev)
        self.depth[:, P] = -1
        self.hidden = torch.zeros(B, cap, batch.bb.hidden_size, dtype=batch.hidden_dtype, device=dev)
        self.cur = [P] * B  # host: each row's newest slot (what the next step feeds)
        self.schedule = [BacklogSchedule(max_backlog) for _ in range(B)]
        # verify
        self.drafts: list[list[int]] = [[] for _ in range(B)]  # host: unverified slots per row
        self.flush = [False] * B  # the row has ended but its drafts still wait for a deep pass
        self.q = None  # sampling: draft distributions [B, max_backlog + 1, V], by slot modulo
        self.snapshot = None  # SSM: states after each row's last verified deep pass
        self.snap_upto = [P] * B  # host: first slot the snapshot does not hold


class CatchupPolicy(Policy):
    name = "catchup"
    verify = False

    def start(self, batch, first, opts):
        super().start(batch, first, opts)
        bl = Backlog(batch, first, self.L, self.cfg.max_backlog)
        if self.verify and not self.bb.can_truncate:
            bl.snapshot = self.bb.snapshot(batch.state)
        batch.backlog = bl

    def finish(self, batch, b):
        bl = batch.backlog
        if self.verify and bl.drafts[b]:
            bl.flush[b] = True  # verify them first: the row ends only if they all survive
            return False
        return True

    @torch.no_grad()
    def step(self, batch, opts, gen):
        bl, L = batch.backlog, self.L
        rows = [b for b in range(batch.B) if batch.active[b]]
        forced = {b for b in rows if bl.flush[b] or bl.schedule[b].full}
        exit_layer, probes, logits, full, lo = self._run(batch, rows, forced)
        picks = self._choose(batch, rows, exit_layer, logits, full, lo, opts, gen)
        vals = picks.tolist()  # the step's one read: tokens to emit (verify: and the first rejection)
        return self._apply(batch, rows, exit_layer, probes, vals, lo), logits

    def _run(self, batch, rows, forced):
        """The window step on the device: every active row's newest token, with the backlog
        slots each block lacks. Returns ({row: exit layer} for rows that left, {row: probes},
        next-token logits [B, V], full-model logits over the window (verify, when some row went
        deep) or None, window start)."""
        bb, eng, bl, L = self.bb, self.engine, batch.backlog, self.L
        dev = batch.pad.device
        lo = min(bl.cur[b] - len(bl.schedule[b]) for b in rows)
        hi = max(bl.cur[b] for b in rows)
        win = slice(lo, hi + 1)
        cur = batch.tensor(bl.cur, torch.long)
        slots = torch.arange(lo, hi + 1, device=dev)
        in_row = (slots[None, :] <= cur[:, None]) & batch.active_dev[:, None]
        depth = bl.depth[:, win]
        # Unprocessed slots (the new token; replayed ones after an SSM rollback) start from embeddings.
        x = torch.where((in_row & (depth == -1))[..., None], bb.embed(bl.tokens[:, win]).to(bl.hidden.dtype),
                        bl.hidden[:, win])
        step = Step(lo, (slots[None, :] - batch.pad[:, None]).clamp(min=0), in_row)
        at = (cur - lo).clamp(0, hi - lo)  # each row's newest slot inside the window
        every = torch.arange(batch.B, device=dev)
        running = batch.active_dev.clone()
        running_rows = list(rows)
        may_exit = batch.tensor([b in rows and b not in forced for b in range(batch.B)], torch.bool)
        exit_layer, probes = {}, {}
        probe_logits = None
        last = len(self.segments) - 1
        for j, layers in enumerate(self.segments):
            if not running_rows:
                break  # every row's newest token has left: the backlog waits for a deeper token
            x, aux, prev = eng.window(layers, x, batch.state, step, depth, in_row & running[:, None])
            if j == last or not any(b not in forced for b in running_rows):
                continue
            h = x[every, at]
            conf, lg = self.confidence(j, h, None if aux is None else aux[every, at], prev[every, at])
            newly = exits_here(conf, self.thresholds[j], running & may_exit)
            leaves = newly.tolist()  # the exit decision: this exit point's one host read
            for b in running_rows:
                if b not in forced:
                    probes[b] = j + 1
                if leaves[b]:
                    exit_layer[b] = self.points[j]
            if any(leaves[b] for b in running_rows):
                running = running & ~newly
                running_rows = [b for b in running_rows if not leaves[b]]
                if lg is not None:
                    probe_logits = lg if probe_logits is None else torch.where(newly[:, None], lg, probe_logits)
        bl.hidden[:, win] = x
        e = batch.tensor([exit_layer.get(b, L - 1) for b in range(batch.B)], torch.long)
        bl.depth[:, win] = torch.where(in_row, torch.maximum(depth, e[:, None]), depth)
        h_cur = x[every, at]
        if probe_logits is not None and not running_rows:
            logits = probe_logits  # every row left through a probe that already read the LM head
        else:
            logits = eng.logits(h_cur)
            if probe_logits is not None:
                left = batch.tensor([b in exit_layer for b in range(batch.B)], torch.bool)
                logits = torch.where(left[:, None], probe_logits, logits)
        full = eng.logits(x) if self.verify and running_rows else None
        return exit_layer, probes, logits, full, lo

    def _choose(self, batch, rows, exit_layer, logits, full, lo, opts, gen):
        """[B, k] on the device: per row the token to emit (and under verify, the rejection)."""
        return sample(logits, opts, gen)[:, None]

    def _apply(self, batch, rows, exit_layer, probes, vals, lo):
        """Host side of the step: per row the outcome, its log, and the backlog's new shape."""
        bl, L = batch.backlog, self.L
        needs_logits = self.heads is not None and self.heads.needs_logits
        out = [None] * batch.B
        adv_rows, adv_slots, adv_tokens = [], [], []
        for b in rows:
            c, sched = bl.cur[b], bl.schedule[b]
            e = exit_layer.get(b, L - 1)
            deep = e == L - 1
            log = StepLog(e, tuple(range(e + 1)), c + 1 - batch.pad_host[b], slots=sched.slots(e, L),
                          probes=probes.get(b, 0), head_read=not (not deep and needs_logits), deep=deep,
                          verified=self.verify)
            sched.advance(e, L)
            o = self._verdict(batch, b, c, deep, vals[b], lo, log)
            if o is not None:
                out[b] = o
                continue
            token = vals[b][0]
            out[b] = Outcome("emit", log, token=token)
            bl.cur[b] = c + 1
            adv_rows.append(b)
            adv_slots.append(c + 1)
            adv_tokens.append(token)
        if adv_rows:
            r, s = batch.index(adv_rows), batch.index(adv_slots)
            bl.tokens[r, s] = batch.tensor(adv_tokens, torch.long)
            bl.depth[r, s] = -1
        batch.fed = bl.tokens[torch.arange(batch.B, device=bl.tokens.device), batch.index(bl.cur)]
        return out

    def _verdict(self, batch, b, c, deep, vals, lo, log):
        """Verify's say on row b (None: emit as usual)."""
        return None


class VerifyPolicy(CatchupPolicy):
    name = "verify"
    verify = True

    def _choose(self, batch, rows, exit_layer, logits, full, lo, opts, gen):
        """Per row [next token, first rejected slot (-1: none), corrected token]. The next token
        is a draft for rows that exited, the full model's for rows that went deep; deep rows' drafts
        are checked against the full model's distributions over the window."""
        bl, B = batch.backlog, batch.B
        dev = logits.device
        greedy = opts.greedy
        R = self.cfg.max_backlog + 1  # sampling: draft distributions kept by slot modulo R
        if greedy:  # the one-hot distributions below reduce to argmaxes: skip the [B, V] tensors
            nxt = logits.argmax(-1)
        else:
            q_next = probabilities(logits, opts)
            nxt = draw(q_next, opts, gen)
            if bl.q is None:
                bl.q = torch.zeros(B, R, q_next.shape[-1], device=dev)
            drafting = [b for b in rows if b in exit_layer]
            if drafting:
                r = batch.index(drafting)
                bl.q[r, batch.index([(bl.cur[b] + 1) % R for b in drafting])] = q_next[r]
        reject = torch.full((B,), -1, dtype=torch.long, device=dev)
        fix = torch.zeros(B, dtype=torch.long, device=dev)
        checking = [b for b in rows if b not in exit_layer and bl.drafts[b]]
        if checking:
            W = full.shape[1]
            x = bl.tokens[:, lo + 1: lo + W]  # [B, W-1] the drafted tokens
            mask = torch.zeros(B, W - 1, dtype=torch.bool)
            for b in checking:
                for t in bl.drafts[b]:
                    mask[b, t - lo - 1] = True
            mask = batch.tensor(mask)
            # Slot t's distribution is the full model's at t-1: window positions 0..W-2 give t = lo+1..lo+W-1.
            if greedy:  # keep a draft iff it is the full model's argmax; the fix is that argmax
                best = full[:, : W - 1].argmax(-1)  # [B, W-1]
                bad = mask & (x != best)
                first = bad.float().argmax(1)  # first rejected position (where any)
                fix = best.gather(1, first[:, None])[:, 0]
            else:
                # Speculative sampling: keep x with probability min(1, p(x)/q(x)); otherwise draw
                # from the normalised residual max(0, p - q). (Greedy, above, is its one-hot case.)
                p = probabilities(full[:, : W - 1], opts)  # [B, W-1, V]
                q = bl.q[:, torch.arange(lo + 1, lo + W, device=dev) % R]
                u = torch.rand(B, W - 1, generator=gen, device=dev)
                px, qx = p.gather(-1, x[..., None])[..., 0], q.gather(-1, x[..., None])[..., 0]
                bad = mask & ~((qx > 0) & (u < px / qx.clamp(min=1e-30)))
                first = bad.float().argmax(1)
                rows_ = torch.arange(B, device=dev)
                pf, qf = p[rows_, first], q[rows_, first]
                residual = (pf - qf).clamp(min=0)
                mass = residual.sum(-1, keepdim=True)
                safe = torch.where(mass > 0, residual / mass.clamp(min=1e-30), pf)
                fix = torch.where(mass[:, 0] > 0, torch.multinomial(safe, 1, generator=gen)[:, 0], pf.argmax(-1))
            reject = torch.where(bad.any(1), first + lo + 1, reject)
        return torch.stack([nxt, reject, fix], 1)

    def _verdict(self, batch, b, c, deep, vals, lo, log):
        bb, bl = self.bb, batch.backlog
        if not deep:
            bl.drafts[b].append(c + 1)
            return None
        t = vals[1]
        bl.drafts[b] = []
        if t >= 0:
            self._rollback(batch, b, t, vals[2])
            return Outcome("rollback", log, token=vals[2], keep=t - batch.P)
        if bl.snapshot is not None:  # every token so far is verified: move the snapshot up
            bb.update_snapshot(bl.snapshot, batch.state, batch.index([b]))
            bl.snap_upto[b] = c + 1
        if bl.flush[b]:  # the drafts that were holding this row open are all accepted
            bl.flush[b] = False
            return Outcome("done", log)
        return None

    def _rollback(self, batch, b, t, token):
        """Row b keeps slots < t; slot t now holds `token`, not yet processed by any layer."""
        bb, bl, L = self.bb, batch.backlog, self.L
        if bb.can_truncate:
            rows = torch.zeros(batch.B, dtype=torch.bool, device=bl.depth.device)
            rows[b] = True
            bb.truncate(batch.state, torch.full_like(bl.depth[:, 0], t), rows)
        else:
            bb.restore(batch.state, bl.snapshot, batch.index([b]))
            start = bl.snap_upto[b]
            bl.depth[b, start:t] = -1  # accepted tokens since the snapshot: replayed by catch-up
            bl.schedule[b].replay(t - start)
        bl.depth[b, t:] = L - 1
        bl.tokens[b, t] = token
        bl.depth[b, t] = -1
        bl.cur[b] = t
        bl.flush[b] = False
