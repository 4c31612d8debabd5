"""`copy` and `propagate`: every step feeds one slot, and all active rows take the same slot.

`SlotPolicy.forward` is the whole step on the device, top to bottom: embed the fed tokens, run
segment after segment, ask each exit point's head about the rows still running, and give the
layers an exited row skips what the policy says: `copy` (Transformer: the previous slot's K/V;
Mamba: the state untouched) or `propagate` (the exit hidden state fed to each skipped layer, only
to make its state). `step` adds the sampling and the step's one read of the emitted tokens.

Where every exit decision is known before the step runs (no exit point: plain full depth; static
heads: confidence 1 everywhere, so every token leaves at the first exit point whose threshold is
below 1, the static exit-at-layer baseline), no step needs the host between two others: greedy, on
a capturing engine, `step` runs several steps as one device run instead (full_chunk.py), each the
same `forward` with the decision taken on the host in advance instead of read back. Where the
decision depends on the data (softmax, learned heads), an engine that can branch inside its graphs
(`decides_on_device`) runs `copy`'s steps in chunks as well: `forward_device` takes every decision
on the device and the exit points come back with the tokens.
"""

from __future__ import annotations

import torch

from meestral.decoding.accounting import StepLog
from meestral.decoding.exit_rule import exits_here
from meestral.decoding.full_chunk import chunk_length, chunk_outcomes, chunkable, tokens_wanted
from meestral.decoding.policy import Outcome, Policy
from meestral.decoding.sampling import sample


class SlotPolicy(Policy):
    """`copy` and `propagate`: every step feeds one slot; all active rows take the same slot.

    While some row still runs a segment it runs for the batch: exited rows are masked out of its
    state writes and get the copy fill (copy), or are fed their exit state (propagate: exactly
    what propagate means). Once every row has exited, the remaining blocks only get the fills.
    """

    propagate = False

    def __init__(self, config, engine):
        super().__init__(config, engine)
        self.through = config.exit_output == "through_last_layer"
        self.known = self._known_exit()

    def _known_exit(self):
        """The exit point (index) every token leaves at when that is known before any step runs,
        len(points) when no token ever leaves; None when the decision depends on the data. Known:
        no exit point, or static heads (`static_exit`)."""
        return 0 if not self.points else self.static_exit()

    def step(self, batch, opts, gen):
        if self.known is not None and chunkable(self.engine, opts):  # no host decision: steps in chunks
            n = chunk_length(tokens_wanted(batch, opts))
            if n > 1:
                rows = [b for b in range(batch.B) if batch.active[b]]
                exit_layer, probes = self._known_logs(rows)
                return chunk_outcomes(
                    self.engine, batch, n, lambda slot: self._logs(batch, rows, exit_layer, probes, slot),
                    forward=None if not self.points else
                    (lambda view, fed, slot, at: self.forward(view, fed, slot, at=at)[0]),
                    key=(self.name, tuple(self.points), self.known, self.through))
        if (self.known is None and self.points and not self.propagate and self.engine.decides_on_device
                and chunkable(self.engine, opts)):
            n = chunk_length(tokens_wanted(batch, opts))
            if n > 1:
                return self._device_chunk(batch, n)
        logits, logs = self.forward(batch, batch.fed, batch.slot)
        tok = sample(logits, opts, gen)
        toks = tok.tolist()  # the step's one read of what it emits
        batch.fed, batch.slot = tok, batch.slot + 1
        return [Outcome("emit", logs[b], token=toks[b]) if logs[b] is not None else None for b in range(batch.B)], logits

    def _known_logs(self, rows):
        """(exit_layer, probes) per row as `forward` finds them when the decision is `known`."""
        if not self.points:
            return {}, {}
        j = self.known
        probes = {b: min(j + 1, len(self.points)) for b in rows}
        return ({b: self.points[j] for b in rows} if j < len(self.points) else {}), probes

    @torch.no_grad()
    def forward(self, batch, fed, slot, observe=None, emit=True, at=None):
        """Feed fed [B] at `slot` for every active row: (next-token logits [B, V], per-row StepLog or
        None). `observe(j, h, conf, logits)`, if given, sees every exit point's hidden states [B, d],
        confidences and probe logits (or None) as they are computed; with `emit` False the final
        LM head is not run and the logits are None (evaluation reads only what it observed).
        Where the decision is `known`, nothing is read back: the step can be captured with
        others, its slot then given on the device as `at` [1] (full_chunk.run_chunk)."""
        eng, L = self.engine, self.L
        state, active = batch.state, batch.active_dev
        step = eng.make_step(slot, 1, batch.pad, write=active[:, None], at=at)
        h = eng.embed(fed[:, None])
        running, running_rows = active, [b for b in range(batch.B) if batch.active[b]]
        served = list(running_rows)
        exit_layer, probes = {}, {}
        exit_h = exited = probe_logits = None
        last = len(self.segments) - 1
        for j, layers in enumerate(self.segments):
            if self.through and j == last:
                layers = [i for i in layers if i != L - 1]  # the last block runs below, for everyone
            if running_rows:
                if exited is None:
                    h, aux, prev = eng.run(layers, h, state, step)
                elif self.propagate:
                    h, aux, prev = eng.run(layers, h, state, step, exit_h=exit_h, skipped=exited)
                else:
                    h, aux, prev = eng.run(layers, h, state, step.rows(running))
                    eng.fill_copy(layers, state, step.rows(exited))
            elif self.propagate:
                eng.fill_propagate(layers, exit_h, state, step)
            else:
                eng.fill_copy(layers, state, step)
            if j == last or not running_rows:
                continue
            conf, lg = self.confidence(j, h[:, -1], None if aux is None else aux[:, -1], prev[:, -1])
            if observe is not None:
                observe(j, h[:, -1], conf, lg)
            newly = exits_here(conf, self.thresholds[j], running)
            if self.known is None:
                leaves = newly.tolist()  # the exit decision: this exit point's one host read
            else:  # decided before the step: every running row leaves here, or none does
                leaves = [j == self.known] * batch.B
            for b in running_rows:
                probes[b] = j + 1
                if leaves[b]:
                    exit_layer[b] = self.points[j]
            if any(leaves[b] for b in running_rows):
                exit_h = h if exit_h is None else torch.where(newly[:, None, None], h, exit_h.to(h.dtype))
                exited = newly if exited is None else exited | newly
                running = running & ~newly
                running_rows = [b for b in running_rows if not leaves[b]]
                if lg is not None:
                    probe_logits = lg if probe_logits is None else torch.where(newly[:, None], lg, probe_logits)
        if self.through:  # the last block, for every row (its state too)
            skipped = exited if exited is not None else torch.zeros_like(active)
            h, _, _ = eng.run([L - 1], h, state, step, exit_h=exit_h if exited is not None else None,
                              skipped=skipped)
        if not emit:
            logits = None
        elif self.through or exited is None:
            logits = eng.logits(h[:, -1])
        elif not running_rows and probe_logits is not None:
            logits = probe_logits  # every row left through a probe that already read the LM head
        else:
            logits = eng.logits(torch.where(exited[:, None, None], exit_h.to(h.dtype), h)[:, -1])
            if probe_logits is not None:
                logits = torch.where(exited[:, None], probe_logits, logits)
        return logits, self._logs(batch, served, exit_layer, probes, slot)

    def _device_chunk(self, batch, n):
        """n greedy steps whose exit decisions stay on the device (`forward_device`): one device run
        and one read for the chunk, the exit points read with the tokens. Outcomes as `step`'s."""
        rows, last = [b for b in range(batch.B) if batch.active[b]], len(self.segments) - 1

        def logs_at(slot, exits):  # exits[b]: row b's exit point index; `last`: full depth
            exit_layer = {b: self.points[exits[b]] for b in rows if exits[b] < last}
            return self._logs(batch, rows, exit_layer, {b: min(exits[b] + 1, last) for b in rows}, slot)

        failed = self.engine.failed_captures
        out = chunk_outcomes(self.engine, batch, n, logs_at, forward=self.forward_device, with_notes=True,
                             key=("device-exits", self.name, tuple(self.points), tuple(self.thresholds), self.through))
        if self.engine.failed_captures > failed:
            # Its graph could not branch here (the chunk ran eagerly, every segment masked: right,
            # but with nothing skipped): later steps take host decisions, which do skip.
            self.engine.decides_on_device = False
            self.engine.note("exit decisions on the device: the chunk's capture failed; exits are decided on "
                             "the host from here on")
        return out

    @torch.no_grad()
    def forward_device(self, batch, fed, slot, at):
        """`forward`'s step under `copy` with no host read: (logits [B, V], each row's exit point
        index [B], len(points) for full depth). Each segment after an exit point runs inside a
        branch taken only while some row still runs (`engine.when`: on a capturing engine a CUDA
        graph branch, so a chunk of such steps is one device run), masked to the rows still
        running, as in `forward`. What the branches leave behind is written in place into buffers
        made before them (a branch that does not run leaves them as they were): the running /
        exited masks, the exit hidden state and exit point of every row, the probe logits. A
        branch not taken thus changes nothing (the graph engine runs it anyway before capturing,
        to compile it). The copy fills of the rows that left come after the branches, masked by
        where each row left. (`propagate` keeps its host decisions: its skipped layers advance
        recurrent states, which a branch run for nothing would advance twice.)"""
        eng, L = self.engine, self.L
        state, active = batch.state, batch.active_dev
        step = eng.make_step(slot, 1, batch.pad, write=active[:, None], at=at)
        last = len(self.segments) - 1
        running, exited = active.clone(), torch.zeros_like(active)
        exit_idx = torch.full(active.shape, last, dtype=torch.long, device=active.device)
        keep = {}  # buffers made by the first segment, which always runs: exit_h, h_last, probe, final

        def segment_layers(j):
            layers = self.segments[j]
            return [i for i in layers if i != L - 1] if self.through and j == last else layers

        def level(j, h):
            h, aux, prev = eng.run(segment_layers(j), h, state, step.rows(running))
            if j == 0:
                keep["exit_h"], keep["h_last"] = torch.zeros_like(h), torch.zeros_like(h)
            if j == last:
                keep["h_last"].copy_(h)
                if "probe" in keep and not self.through:
                    keep["final"].copy_(eng.logits(h[:, -1]))
                return
            conf, lg = self.confidence(j, h[:, -1], None if aux is None else aux[:, -1], prev[:, -1])
            if lg is not None and j == 0:
                keep["probe"], keep["final"] = torch.zeros_like(lg), torch.zeros_like(lg)
            newly = exits_here(conf, self.thresholds[j], running)
            keep["exit_h"].copy_(torch.where(newly[:, None, None], h, keep["exit_h"]))
            exit_idx.copy_(torch.where(newly, j, exit_idx))
            if lg is not None:
                keep["probe"].copy_(torch.where(newly[:, None], lg, keep["probe"]))
            exited.logical_or_(newly)
            running.logical_and_(~newly)
            eng.when(running.any(), lambda: level(j + 1, h))

        level(0, eng.embed(fed[:, None]))
        for k in range(1, last + 1):  # each skipped segment: the rows that left before it
            eng.fill_copy(segment_layers(k), state, step.rows(exit_idx < k))
        exit_h, h = keep["exit_h"], keep["h_last"]
        if self.through:  # the last block, for every row (its state too)
            h, _, _ = eng.run([L - 1], h, state, step, exit_h=exit_h, skipped=exited)
            return eng.logits(h[:, -1]), exit_idx
        if "probe" in keep:
            return torch.where(exited[:, None], keep["probe"], keep["final"]), exit_idx
        return eng.logits(torch.where(exited[:, None, None], exit_h.to(h.dtype), h)[:, -1]), exit_idx

    def _logs(self, batch, served, exit_layer, probes, slot):
        L, kept = self.L, self.engine.kept
        logs = [None] * batch.B
        for b in served:
            e = exit_layer.get(b, L - 1)
            left = e < L - 1
            ran = [i for i in kept if i <= e] + ([L - 1] if self.through and left else [])
            prop = [i for i in kept if i > e and not (self.through and i == L - 1)] if self.propagate else []
            logs[b] = StepLog(e, tuple(ran), slot + 1 - batch.pad_host[b], propagated=tuple(prop),
                              probes=probes.get(b, 0), head_read=self.through or not (left and self.needs_logits),
                              deep=not left)
        return logs


class CopyPolicy(SlotPolicy):
    name = "copy"


class PropagatePolicy(SlotPolicy):
    name = "propagate"
    propagate = True
