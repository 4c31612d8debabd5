"""The catch-up schedule of one row, as the host keeps it, and the step logs it writes.

Under `catchup` / `verify` an exited token waits in its row's backlog until a deeper token carries
it through the blocks it skipped (catchup.py). What each step runs follows from the depths of the
waiting tokens alone, so the host can place the window, force a deep pass when the backlog is
full, and price every step without reading the device. The decoder (catchup.py, verify.py) and
teacher-forced scoring (evaluation/scoring.py) both price their steps here: `BacklogSchedule.step`
is the one place a catch-up step's `StepLog` is made.
"""

from __future__ import annotations

from meestral.decoding.accounting import StepLog


class BacklogSchedule:
    """One row's backlog: the depth (deepest block run, -1: none) of each token that still lacks
    some block, in slot order. They always sit right before the row's newest slot."""

    def __init__(self, max_backlog: int, num_layers: int):
        self.max_backlog = max_backlog
        self.L = num_layers
        self.depths: list[int] = []

    def __len__(self) -> int:
        return len(self.depths)

    @property
    def full(self) -> bool:
        """The next step must go deep."""
        return len(self.depths) >= self.max_backlog

    def slots(self, exit_layer: int) -> tuple:
        """Positions block i runs in a step whose token leaves after block `exit_layer`: the
        token itself and every backlog token lacking block i; none after the exit."""
        return tuple(1 + sum(d < i for d in self.depths) if i <= exit_layer else 0 for i in range(self.L))

    def step(self, exit_layer: int, context: int, *, probes: int, probe_logits: bool, verified: bool) -> StepLog:
        """The log of a step whose token leaves after block `exit_layer` (L-1: deep) and sees
        `context` positions, having asked `probes` exit heads (`probe_logits`: they read the LM head,
        so an exited token's logits are its probe's and the head is not read again); then the
        backlog as that step leaves it: a deep token empties it, an exited one joins it, and the
        tokens it carried are now as deep as it went."""
        deep = exit_layer == self.L - 1
        log = StepLog(exit_layer, tuple(range(exit_layer + 1)), context, slots=self.slots(exit_layer), probes=probes,
                      head_read=deep or not probe_logits, deep=deep, verified=verified)
        if exit_layer >= self.L - 1:
            self.depths = []
        else:
            self.depths = [max(d, exit_layer) for d in self.depths] + [exit_layer]
        return log

    def replay(self, n: int) -> None:
        """After a snapshot restore: the last n tokens are back to no block at all."""
        self.depths = [-1] * n


def probes_asked(j: int, J: int, forced: bool) -> int:
    """Exit heads a step asks when it leaves at exit point j (J: deep), or none when the backlog
    forced it deep (every exit point is skipped unasked)."""
    return 0 if forced else (J if j == J else j + 1)
