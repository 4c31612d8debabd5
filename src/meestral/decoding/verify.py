"""Lossless early exit: the `verify` policy, catch-up that checks every early token.

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

from meestral.decoding.catchup import CatchupPolicy
from meestral.decoding.policy import Outcome
from meestral.decoding.sampling import draw, probabilities


class VerifyPolicy(CatchupPolicy):
    name = "verify"

    def start(self, batch, first, hidden_dtype):
        super().start(batch, first, hidden_dtype)
        if not self.engine.can_truncate:
            batch.backlog.snapshot = self.engine.snapshot(batch.state)

    def finish(self, batch, b):
        bl = batch.backlog
        if bl.drafts[b]:
            bl.flush[b] = True  # verify them first: the row ends only if they all survive
            return False
        return True

    @torch.no_grad()
    def step(self, batch, opts, gen):
        bl = batch.backlog
        rows = [b for b in range(batch.B) if batch.active[b]]
        forced = {b for b in rows if bl.flush[b] or bl.schedule[b].full}
        win = self.window_pass(batch, rows, forced)
        # The full model's distribution at every window slot, where some row went deep.
        full = self.engine.logits(win.x) if win.deep else None
        picks = self.check(batch, rows, win.exit_layer, win.logits, full, win.lo, opts, gen)
        vals = picks.tolist()  # the step's one read: per row [token, first rejected slot, its correction]
        out, emitted = [None] * batch.B, {}
        for b in rows:
            c = bl.cur[b]
            log = self.row_log(batch, b, win, forced)
            token, reject, fix = vals[b]
            if b in win.exit_layer:  # left early: the token is a draft, checked by a later deep pass
                bl.drafts[b].append(c + 1)
            else:  # deep: its drafts were checked; the token is the full model's
                bl.drafts[b] = []
                if reject >= 0:
                    self.rollback(batch, b, reject, fix)
                    out[b] = Outcome("rollback", log, token=fix, keep=reject - batch.P)
                    continue
                if bl.snapshot is not None:  # every token so far is verified: move the snapshot up
                    self.engine.update_snapshot(bl.snapshot, batch.state, batch.index([b]))
                    bl.snap_upto[b] = c + 1
                if bl.flush[b]:  # the drafts that were holding this row open are all accepted
                    bl.flush[b] = False
                    out[b] = Outcome("done", log)
                    continue
            out[b] = Outcome("emit", log, token=token)
            emitted[b] = token
        self.push(batch, emitted)
        return out, win.logits

    def check(self, batch, rows, exit_layer, logits, full, lo, opts, gen):
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

    def rollback(self, batch, b, t, token):
        """Row b keeps slots < t; slot t now holds `token`, not yet processed by any layer."""
        eng, bl, L = self.engine, batch.backlog, self.L
        if eng.can_truncate:
            rows = torch.zeros(batch.B, dtype=torch.bool, device=bl.depth.device)
            rows[b] = True
            eng.truncate(batch.state, torch.full_like(bl.depth[:, 0], t), rows)
        else:
            eng.restore(batch.state, bl.snapshot, batch.index([b]))
            start = bl.snap_upto[b]
            bl.depth[b, start:t] = -1  # accepted tokens since the snapshot: replayed by catch-up
            bl.schedule[b].replay(t - start)
        bl.depth[b, t:] = L - 1
        bl.tokens[b, t] = token
        bl.depth[b, t] = -1
        bl.cur[b] = t
        bl.flush[b] = False
