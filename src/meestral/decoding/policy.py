"""State policies behind one step interface: what the layers an exited token skips receive.

A policy object holds an exit configuration and an engine; its `step(batch, opts, gen)` feeds
each active row's newest token, decides per row where it leaves (the exit rule, exit_rule.py,
asked once per exit point), runs the engine segment by segment and returns, per row, an
`Outcome`: the token to emit (or the rollback to make) and the `StepLog` of what ran.

- `copy` / `propagate` (this module): one slot per step, rows advance together.
- `catchup` / `verify` (catchup.py): exited tokens wait in a backlog that the next deep token
  carries through the skipped layers; verify also checks the drafts against the full model.

Host reads. The exit decision at an exit point is one small tensor read back (which rows leave:
the host must know, to stop running them), and each step reads its emitted tokens once; every
other piece of bookkeeping (layers run, probes, the step log) follows on the host from those two.
At batch 1 a full-depth token costs one read, and each exit point asked adds one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meestral.decoding.accounting import StepLog
from meestral.decoding.exit_rule import exits_here
from meestral.decoding.sampling import sample


def to_device(values, device, dtype=None) -> torch.Tensor:
    """Host values (a list, or a CPU tensor) on `device` without stopping it. A plain
    `torch.tensor(..., device="cuda")` copies from pageable memory, which first waits for every
    kernel queued before it: in the middle of a step the GPU then idles while the host catches up.
    From pinned memory the copy is queued like a kernel (stream order keeps it correct, and
    PyTorch's pinned allocator keeps the buffer until the copy has run)."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class Batch:
    """One generation's rows in flight: prompts left-padded into slots, the per-layer state, and
    which rows are still active (on the host, and as a device mask for the kernels)."""

    def __init__(self, bb, rows: list[list[int]], extra: int, new_state=None):
        dev = bb.device
        self.bb = bb
        self.rows = rows
        self.B, self.P = len(rows), max(len(r) for r in rows)
        self.pad_host = [self.P - len(r) for r in rows]
        self.pad = torch.tensor(self.pad_host, device=dev)
        ids = torch.zeros(self.B, self.P, dtype=torch.long, device=dev)
        for b, r in enumerate(rows):
            ids[b, self.P - len(r):] = torch.tensor(r, device=dev)
        self.ids = ids
        self.capacity = self.P + extra
        self.state = (new_state or bb.new_state)(self.B, self.capacity)
        self.active = [True] * self.B
        self.active_dev = torch.ones(self.B, dtype=torch.bool, device=dev)
        self.fed = None  # [B] the newest token of every row: what the next step feeds
        self.slot = self.P  # the slot the next step fills (copy/propagate: the same for all rows)
        self.hidden_dtype = bb.dtype  # of the hidden states the prefill produced
        self.backlog = None  # catchup/verify: see catchup.Backlog

    def retire(self, b: int) -> None:
        self.active[b] = False
        self.active_dev = self.tensor(self.active, torch.bool)

    def tensor(self, values, dtype=None) -> torch.Tensor:
        """Host values as a device tensor, queued without a device sync (`to_device`)."""
        return to_device(values, self.pad.device, dtype)

    def index(self, rows) -> torch.Tensor:
        """Row indices as a device tensor (for row copies by index)."""
        return self.tensor(list(rows), torch.long)


@dataclass
class Outcome:
    """What one step means for one row.

    kind "emit": append `token`; "rollback": verification rejected the token at index `keep` of
    the row's output: cut the output there and append `token` instead; "done": the step only
    verified the row's last drafts (all accepted), its work is charged and the row ends."""

    kind: str
    log: StepLog
    token: int | None = None
    keep: int | None = None


class Policy:
    """A state policy under one exit configuration, driving one engine."""

    name = ""

    def __init__(self, config, engine):
        self.cfg = config
        self.engine = engine
        self.bb = engine.bb
        self.L = self.bb.num_layers
        self.heads = config.heads
        self.points = config.exit_points
        self.thresholds = list(config.thresholds)
        self.segments = engine.segments(self.points)

    def start(self, batch: Batch, first: torch.Tensor, opts) -> None:
        """After the prefill: `first` [B] are the tokens it emitted."""
        batch.fed = first

    def step(self, batch: Batch, opts, gen):
        """One decode step: (per row an Outcome, or None for rows not in it; logits [B, V])."""
        raise NotImplementedError

    def finish(self, batch: Batch, b: int) -> bool:
        """Row b's newest token ends its output; True when the row may stop now."""
        return True

    def confidence(self, j, h, aux, prev):
        """Exit point j's confidence for hidden states h [B, d] (and the probe's logits, or None)."""
        heads = self.heads
        lg = self.engine.logits(h) if heads.needs_logits else None
        return heads.confidence(j, h, aux, prev, lg), lg


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

    def step(self, batch, opts, gen):
        logits, logs = self.forward(batch, batch.fed, batch.slot)
        tok = sample(logits, opts, gen)
        toks = tok.tolist()  # the step's one read of what it emits
        batch.fed, batch.slot = tok, batch.slot + 1
        return [Outcome("emit", logs[b], token=toks[b]) if logs[b] is not None else None for b in range(batch.B)], logits

    @torch.no_grad()
    def forward(self, batch, fed, slot):
        """Feed fed [B] at `slot` for every active row: (next-token logits [B, V], per-row StepLog or None)."""
        bb, eng, L = self.bb, self.engine, self.L
        state, active = batch.state, batch.active_dev
        step = bb.make_step(slot, 1, batch.pad, write=active[:, None])
        h = bb.embed(fed[:, None])
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
            newly = exits_here(conf, self.thresholds[j], running)
            leaves = newly.tolist()  # the exit decision: this exit point's one host read
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
        if self.through:
            skipped = exited if exited is not None else torch.zeros_like(active)
            h, _, _ = eng.run([L - 1], h, state, step, exit_h=exit_h if exited is not None else None,
                              skipped=skipped)
            logits = eng.logits(h[:, -1])
        elif exited is None:
            logits = eng.logits(h[:, -1])
        elif not running_rows and probe_logits is not None:
            logits = probe_logits  # every row left through a probe that already read the LM head
        else:
            logits = eng.logits(torch.where(exited[:, None, None], exit_h.to(h.dtype), h)[:, -1])
            if probe_logits is not None:
                logits = torch.where(exited[:, None], probe_logits, logits)
        return logits, self._logs(batch, served, exit_layer, probes, slot)

    def _logs(self, batch, served, exit_layer, probes, slot):
        L, kept = self.L, self.engine.kept
        needs_logits = self.heads is not None and self.heads.needs_logits
        logs = [None] * batch.B
        for b in served:
            e = exit_layer.get(b, L - 1)
            left = e < L - 1
            ran = [i for i in kept if i <= e] + ([L - 1] if self.through and left else [])
            prop = [i for i in kept if i > e and not (self.through and i == L - 1)] if self.propagate else []
            logs[b] = StepLog(e, tuple(ran), slot + 1 - batch.pad_host[b], propagated=tuple(prop),
                              probes=probes.get(b, 0), head_read=self.through or not (left and needs_logits),
                              deep=not left)
        return logs


class CopyPolicy(SlotPolicy):
    name = "copy"


class PropagatePolicy(SlotPolicy):
    name = "propagate"
    propagate = True
