"""Exact state handling for early exit: the `catchup` policy.

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
force deep passes and to price every step without reading the device. The schedule and the step
logs it writes live in schedule.py, where teacher-forced scoring (evaluation/scoring.py) prices
its steps too: both charge the same work. verify.py builds lossless decoding on this policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meestral.decoding.exit_rule import exits_here
from meestral.decoding.full_chunk import chunkable
from meestral.decoding.policy import Outcome, Policy
from meestral.decoding.sampling import sample
from meestral.decoding.schedule import BacklogSchedule


class Backlog:
    """The device side of a catch-up generation: per row and slot, token, depth, hidden state;
    and on the host, per row, its newest slot and its schedule. The device buffers come from the
    engine (`scratch`): a fixed-shape engine keeps them with the generation's state, so a captured
    catch-up cycle (`CatchupPolicy.cycle`) finds them at the same addresses in every generation."""

    def __init__(self, engine, batch, first: torch.Tensor, num_layers: int, max_backlog: int, hidden_size: int,
                 hidden_dtype: torch.dtype):
        # As many slots as the state: a captured cycle closes over these buffers, and a later
        # generation on the same state (another length, same rounded capacity) must find the same ones.
        B, P, cap = batch.B, batch.P, engine.state_capacity(batch.capacity)
        st = batch.state
        self.tokens = engine.scratch(st, "backlog-tokens", (B, cap), torch.long, 0)
        self.tokens[:, :P] = batch.ids
        self.tokens[:, P] = first
        self.depth = engine.scratch(st, "backlog-depth", (B, cap), torch.long, num_layers - 1)
        self.depth[:, P] = -1
        self.hidden = engine.scratch(st, "backlog-hidden", (B, cap, hidden_size), hidden_dtype, 0)
        self.cur = [P] * B  # host: each row's newest slot (what the next step feeds)
        self.schedule = [BacklogSchedule(max_backlog, num_layers) for _ in range(B)]
        # verify (verify.py)
        self.drafts: list[list[int]] = [[] for _ in range(B)]  # host: unverified slots per row
        self.flush = [False] * B  # the row has ended but its drafts still wait for a deep pass
        self.q = None  # sampling: draft distributions [B, max_backlog + 1, V], by slot modulo
        self.snapshot = None  # recurrent states: each row's state after its last verified deep pass
        self.snap_upto = [P] * B  # host: first slot the snapshot does not hold


@dataclass
class Window:
    """What one catch-up step's device pass leaves: who left where, and the logits."""

    exit_layer: dict  # row -> exit layer, for rows whose newest token left early
    probes: dict  # row -> exit heads asked
    logits: torch.Tensor  # [B, V] next-token logits at each row's newest slot
    x: torch.Tensor  # [B, W, d] the window's hidden states after the pass
    lo: int  # the window's first slot
    deep: bool  # some row's newest token went deep


class CatchupPolicy(Policy):
    name = "catchup"

    def start(self, batch, first, hidden_dtype):
        super().start(batch, first, hidden_dtype)
        batch.backlog = Backlog(self.engine, batch, first, self.L, self.cfg.max_backlog, self.engine.hidden_size,
                                hidden_dtype)

    def __init__(self, config, engine):
        super().__init__(config, engine)
        self.known = self._known_exit()

    def _known_exit(self):
        """The exit point (index) every token that may leave does leave at, when that is known before
        any step runs: static heads (confidence 1, so the first threshold below 1); None otherwise
        (the decision depends on the data, no token ever leaves, or verify, which reads its checks)."""
        j = None if self.cfg.verify else self.static_exit()
        return None if j == len(self.points) else j

    @torch.no_grad()
    def step(self, batch, opts, gen):
        bl = batch.backlog
        rows = [b for b in range(batch.B) if batch.active[b]]
        if self.known is not None and chunkable(self.engine, opts):
            n = self.cfg.max_backlog + 1
            c = {bl.cur[b] for b in rows}
            # rows in step (they started together and every decision is known), at a cycle's start
            if len(c) == 1 and all(not bl.schedule[b].depths for b in rows) \
                    and opts.max_new_tokens - (c.pop() - batch.P + 1) >= n:
                return self.cycle(batch, rows, n)
        forced = {b for b in rows if bl.schedule[b].full}
        win = self.window_pass(batch, rows, forced)
        toks = sample(win.logits, opts, gen).tolist()  # the step's one read: the tokens to emit
        out = [None] * batch.B
        for b in rows:
            out[b] = Outcome("emit", self.row_log(batch, b, win, forced), token=toks[b])
        self.push(batch, {b: toks[b] for b in rows})
        return out, win.logits

    @torch.no_grad()
    def cycle(self, batch, rows, n: int):
        """One catch-up cycle as ONE device run, where every decision is known (`known`): n - 1
        tokens leave at the known exit point, each joining the backlog, then the backlog is full
        and the n-th token goes deep, carrying them (n = max_backlog + 1). The same state writes
        and logits as n `step`s, with each argmax written on the device as the next step's token;
        one host read for the n tokens. Where `step`'s window spans the backlog in every block and
        masks the positions a block does not need, here each step runs exactly the positions its
        log charges: the newest token alone through the shallow blocks, all n through the deep
        ones (a Mamba block's masked positions still cost their state's traffic). Rows must be in
        step, with empty backlogs."""
        eng, bl, L, j = self.engine, batch.backlog, self.L, self.known
        c0 = bl.cur[rows[0]]
        inputs = {"at": batch.tensor([c0], torch.long), "pad": batch.pad, "active": batch.active_dev}
        state = batch.state

        def device_part(x):
            at, active = x["at"], x["active"]
            B, dev = active.shape[0], at.device
            one = active[:, None]
            tok = bl.tokens.index_select(1, at)[:, 0]  # the token the cycle starts from (fed)
            toks, waiting, logits = [], [], None
            for t in range(n):
                # The newest token through the shallow segments, alone: every backlog token already
                # holds them (its depth is the exit layer), which is also what the accounting charges.
                # Each step's token comes from the previous step's argmax, on the device.
                xw = eng.embed(tok[:, None]).to(bl.hidden.dtype)
                step = eng.make_step(c0 + t, 1, x["pad"], write=one, at=at + t)
                # depth None: the newest token has been through no block, so it needs every one
                for layers in self.segments[: j + 1]:
                    xw, _, _ = eng.window(layers, xw, state, step, None, one)
                if t < n - 1:  # it leaves: it waits at the exit layer
                    waiting.append(xw)
                    logits = eng.logits(xw[:, 0])
                else:  # the backlog is full: this token goes deep and carries the n - 1 waiting ones
                    live = one.expand(B, n)
                    xw = torch.cat(waiting + [xw], 1)
                    step = eng.make_step(c0, n, x["pad"], write=live, at=at)
                    # depth None: all n stand at the exit layer, so each needs every deeper block
                    for layers in self.segments[j + 1:]:
                        xw, _, _ = eng.window(layers, xw, state, step, None, live)
                    logits = eng.logits(xw[:, n - 1])
                tok = logits.argmax(-1)
                toks.append(tok)
            # The backlog as n `step`s leave it, written once for the cycle (rows not active keep
            # theirs): the n slots have been through every block, each emitted token fills the slot
            # after its own (`push`), and the newest slot (the last emitted token) has run no block.
            slots = at + torch.arange(n + 1, device=dev)  # the cycle's n slots, then the newest
            emitted = torch.stack(toks, 1)
            bl.hidden.index_copy_(1, slots[:n], torch.where(one[..., None], xw, bl.hidden.index_select(1, slots[:n])))
            bl.tokens.index_copy_(1, slots[1:], torch.where(one, emitted, bl.tokens.index_select(1, slots[1:])))
            depth = torch.full((1, n + 1), L - 1, dtype=torch.long, device=dev)
            depth[:, n] = -1
            bl.depth.index_copy_(1, slots, torch.where(one, depth, bl.depth.index_select(1, slots)))
            return emitted, logits

        key = ("catchup-cycle", n, batch.B, id(state), tuple(self.points), j)
        toks_t, logits = eng.sequence(key, device_part, inputs, start=c0, length=n)
        toks = toks_t.tolist()  # the cycle's one read
        out = [None] * batch.B
        for b in rows:
            out[b] = []
            for t in range(n):
                deep = t == n - 1
                win = Window({} if deep else {b: self.points[j]}, {} if deep else {b: j + 1}, None, None, c0, deep)
                out[b].append(Outcome("emit", self.row_log(batch, b, win, {b} if deep else set()), token=toks[b][t]))
                bl.cur[b] += 1
        batch.fed = bl.tokens[torch.arange(batch.B, device=bl.tokens.device), batch.index(bl.cur)]
        return out, logits.clone()

    def window_pass(self, batch, rows, forced) -> Window:
        """The window step on the device: every active row's newest token, with the backlog
        slots each block lacks; rows in `forced` go deep without asking any exit head."""
        eng, bl, L = self.engine, batch.backlog, self.L
        dev = batch.pad.device
        lo = min(bl.cur[b] - len(bl.schedule[b]) for b in rows)
        hi = max(bl.cur[b] for b in rows)
        win = slice(lo, hi + 1)
        cur = batch.tensor(bl.cur, torch.long)
        slots = torch.arange(lo, hi + 1, device=dev)
        in_row = (slots[None, :] <= cur[:, None]) & batch.active_dev[:, None]
        depth = bl.depth[:, win]
        # Unprocessed slots (the new token; replayed ones after a recurrent rollback) start from embeddings.
        x = torch.where((in_row & (depth == -1))[..., None], eng.embed(bl.tokens[:, win]).to(bl.hidden.dtype),
                        bl.hidden[:, win])
        step = eng.make_step(lo, hi + 1 - lo, batch.pad, write=in_row)
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
        if probe_logits is not None and not running_rows:
            logits = probe_logits  # every row left through a probe that already read the LM head
        else:
            logits = eng.logits(x[every, at])
            if probe_logits is not None:
                left = batch.tensor([b in exit_layer for b in range(batch.B)], torch.bool)
                logits = torch.where(left[:, None], probe_logits, logits)
        return Window(exit_layer, probes, logits, x, lo, bool(running_rows))

    def row_log(self, batch, b, win: Window, forced):
        """Row b's StepLog for this step (its schedule advances with it)."""
        return batch.backlog.schedule[b].step(win.exit_layer.get(b, self.L - 1),
                                              batch.backlog.cur[b] + 1 - batch.pad_host[b],
                                              probes=win.probes.get(b, 0), probe_logits=self.needs_logits,
                                              verified=self.cfg.verify)

    def push(self, batch, emitted: dict) -> None:
        """Rows' emitted tokens {row: token} become their newest slots; every row's newest token
        is what the next step feeds."""
        bl = batch.backlog
        if emitted:
            rows = list(emitted)
            for b in rows:
                bl.cur[b] += 1
            r, s = batch.index(rows), batch.index([bl.cur[b] for b in rows])
            bl.tokens[r, s] = batch.tensor([emitted[b] for b in rows], torch.long)
            bl.depth[r, s] = -1
        batch.fed = bl.tokens[torch.arange(batch.B, device=bl.tokens.device), batch.index(bl.cur)]
