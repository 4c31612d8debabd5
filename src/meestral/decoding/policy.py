"""What every state policy shares: the batch in flight, a step's outcome per row, the policy base.

A policy object holds an exit configuration and an engine; its `step(batch, opts, gen)` feeds
each active row's newest token, decides per row where it leaves (the exit rule, exit_rule.py,
asked once per exit point), runs the engine segment by segment and returns, per row, an
`Outcome`: the token to emit (or the rollback to make) and the `StepLog` of what ran. The
policies, one file each: `copy` / `propagate` (slot_policies.py: one slot per step, rows advance
together), `catchup` (catchup.py: exited tokens wait in a backlog that the next deep token carries
through the skipped layers), `verify` (verify.py: catch-up that also checks the drafts against the
full model).

Host reads. The exit decision at an exit point is one small tensor read back (which rows leave:
the host must know, to stop running them), and each step reads its emitted tokens once; every
other piece of bookkeeping (layers run, probes, the step log) follows on the host from those two.
At batch 1 a full-depth token costs one read, and each exit point asked adds one (unless the
engine decides on the device: slot_policies.forward_device).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meestral.decoding.accounting import StepLog


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
    """One generation's rows in flight: prompts left-padded into slots, the per-layer state (the
    engine's), and which rows are still active (on the host, and as a device mask for kernels)."""

    def __init__(self, engine, rows: list[list[int]], extra: int):
        dev = engine.device
        self.rows = rows
        self.B, self.P = len(rows), max(len(r) for r in rows)
        self.pad_host = [self.P - len(r) for r in rows]
        self.pad = torch.tensor(self.pad_host, device=dev)
        ids = torch.zeros(self.B, self.P, dtype=torch.long, device=dev)
        for b, r in enumerate(rows):
            ids[b, self.P - len(r):] = torch.tensor(r, device=dev)
        self.ids = ids
        self.capacity = self.P + extra
        self.state = engine.new_state(self.B, self.capacity)
        self.active = [True] * self.B
        self.active_dev = torch.ones(self.B, dtype=torch.bool, device=dev)
        self.fed = None  # [B] the newest token of every row: what the next step feeds
        self.slot = self.P  # the slot the next step fills (copy/propagate: the same for all rows)
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
    verified the row's last drafts (all accepted), its work is charged and the row ends; "spent":
    work charged to the row's output that emits nothing (speculate's rejected drafts). A policy
    may give a row a list of outcomes for one step (speculate emits several tokens a cycle)."""

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
        self.L = engine.num_layers
        self.heads = config.heads
        self.points = config.exit_points
        self.thresholds = list(config.thresholds)
        self.segments = engine.segments(self.points)
        self.needs_logits = config.probe_logits

    def start(self, batch: Batch, first: torch.Tensor, hidden_dtype: torch.dtype) -> None:
        """After the prefill: `first` [B] are the tokens it emitted; `hidden_dtype` that of its
        hidden states (what a backlog keeps them in)."""
        batch.fed = first

    def step(self, batch: Batch, opts, gen):
        """One decode step: (per row an Outcome, or None for rows not in it; logits [B, V])."""
        raise NotImplementedError

    def finish(self, batch: Batch, b: int) -> bool:
        """Row b's newest token ends its output; True when the row may stop now."""
        return True

    def static_exit(self):
        """Where every token leaves when static heads decide it (confidence 1 everywhere, so the
        exit rule's strict `>` leaves at the first exit point whose threshold is below 1): that
        exit point's index, len(points) when no threshold is below 1; None for heads whose
        decision depends on the data (or no heads)."""
        if self.heads is None or self.heads.kind != "static":
            return None
        return next((j for j, thr in enumerate(self.thresholds) if 1.0 > thr), len(self.points))

    def confidence(self, j, h, aux, prev):
        """Exit point j's confidence for hidden states h [B, d] (and the probe's logits, or None)."""
        lg = self.engine.logits(h) if self.needs_logits else None
        return self.heads.confidence(j, h, aux, prev, lg), lg
