"""The `speculate` policy's controller: how many drafts a cycle makes, from which exit point, or
none at all (a plain full-depth step), from what it has measured so far.

Self-speculation pays only when drafts are accepted often enough for their cost. With α the chance
that a draft is accepted (each independently), a cycle of k drafts emits on average
1 + α + ... + α^k tokens (the accepted drafts, then the deep pass's own token) and costs k draft
steps plus one deep pass over k+1 positions. A full-depth step emits one token for its own cost.
The controller keeps, per exit point, the acceptance it has seen (accepted drafts over drafts
checked until the first rejection: the geometric model's estimate) and the measured wall-clock of
every kind of step (the median of its last few timings per (exit point, k), and of the full-depth
step), and
each step picks whatever has the highest expected tokens per millisecond. Before a kind of step has
been timed its cost is the weight-byte prior (`prior`, in units of a full-depth step) scaled by
what the steps timed so far measured against their own priors.

Never slower than full depth: when no cycle is expected to beat a full-depth step, full-depth
steps run, and speculation is probed again after a pause that doubles after each probe that does
not pay (up to `max_pause` steps) and resets when one does: a probe is one short cycle, so on a
backbone whose drafts are never accepted the controller costs a cycle every `max_pause` tokens.

Timings it must not believe. A step that ran a shape for the first time (on the graph engine: an
eager run, a compile and a CUDA-graph capture, hundreds of times a replay) is not timed at all
(`observe(..., ms=None)`: its acceptance still counts). Any other one-off stall (a collection, the
host busy elsewhere) is outvoted: a cost is the median of the last `window` timings, not an
average a single stall can inflate. And an estimate is only as fresh as its last measurements: a
full-depth cost measured high would otherwise make every cycle look cheap for the rest of the
generation (full-depth steps would never run again to correct it), so while cycles run a
full-depth step is re-timed every `refresh` steps (it emits its token like any other).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one cycle of k drafts emits on average when each draft is accepted with chance α
    (independently, until the first rejection): 1 + α + ... + α^k."""
    return float(sum(alpha ** i for i in range(k + 1)))


@dataclass
class Choice:
    """What the next step runs: `k` drafts from exit point index `j` (k = 0: a full-depth step)."""

    j: int
    k: int
    probe: bool = False  # a cycle run to measure, not because it was expected to pay


@dataclass
class SpeculationController:
    """Picks each step's (exit point, k) from measured acceptance and costs (module docstring).

    `prior(j, k)`: the cost of a cycle in full-depth steps before it is measured (weight bytes);
    `candidates`: the exit-point indices it may draft from; `max_k`: the most drafts a cycle makes.
    """

    candidates: list
    max_k: int
    prior: object  # (j, k) -> cost in full-depth steps
    window: int = 5  # a step's cost: the median of its last `window` timings
    margin: float = 1.02  # a cycle must beat full depth by this factor to be chosen
    # A probe costs a cycle (SmolLM2 at E 7: ~1.4 full-depth steps for ~1 token): every 256 tokens
    # where drafts are not accepted is ~0.2% of the time; every 64 was ~1% (H100, 2026-12-06).
    max_pause: int = 256
    refresh: int = 32  # cycles in a row before a full-depth step is re-timed
    alpha0: float = 0.5  # acceptance assumed before any draft of an exit point is checked
    accepted: dict = field(default_factory=dict)  # j -> drafts accepted
    checked: dict = field(default_factory=dict)  # j -> drafts checked (accepted + first rejections)
    times: dict = field(default_factory=dict)  # (j, k) -> its last timings (ms); (None, 0): the full-depth step
    ratios: list = field(default_factory=list)  # the last cycles' measured / predicted (prior x full depth)
    medians: dict = field(default_factory=dict)  # key -> median of times[key]; "ratio" -> of ratios
    pause: int = 0  # full-depth steps left before the next probe
    next_pause: int = 4
    since_full: int = 0  # cycles chosen since the last full-depth step

    def alpha(self, j) -> float:
        n = self.checked.get(j, 0)
        # A weak prior (two pseudo-drafts at alpha0) keeps one early rejection from ruling a layer out.
        return (self.accepted.get(j, 0) + 2 * self.alpha0) / (n + 2)

    def cost(self, key) -> float | None:
        """The median of a kind of step's last timings (ms), None before it was timed."""
        return self.medians.get(key)  # kept by `observe`: `choose` asks for every (j, k) each step

    def _ms(self, j, k) -> float | None:
        """Measured (or prior-predicted) ms of a step; None before anything has been timed."""
        key = (None, 0) if k == 0 else (j, k)
        if key in self.times:
            return self.cost(key)
        full = self.cost((None, 0))
        if full is None:
            return None
        ratio = self.medians.get("ratio", 1.0)
        return full * (1.0 if k == 0 else self.prior(j, k) * ratio)

    def rate(self, j, k) -> float | None:
        """Expected tokens per ms of a step (k = 0: full depth)."""
        ms = self._ms(j, k)
        if ms is None or ms <= 0:
            return None
        return (1.0 if k == 0 else expected_tokens(self.alpha(j), k)) / ms

    def best_cycle(self):
        """(rate, j, k) of the best cycle by the current estimates."""
        best = None
        for j in self.candidates:
            for k in range(1, self.max_k + 1):
                r = self.rate(j, k)
                if r is not None and (best is None or r > best[0]):
                    best = (r, j, k)
        return best

    def choose(self) -> Choice:
        if self.pause > 0:
            # Fallen back: full-depth steps until the next probe, decided before any estimate is
            # computed, because this runs on the host between device steps (on SmolLM2 a full-depth
            # step is ~1.5 ms; ranking every (exit point, k) each step cost ~2% of it).
            self.pause -= 1
            return Choice(self.candidates[0], 0)
        full = self.rate(None, 0)
        if full is None:  # nothing timed yet: one full-depth step is the yardstick
            return Choice(self.candidates[0], 0)
        best = self.best_cycle()
        if best is not None and best[0] > self.margin * full:
            if self.since_full >= self.refresh:  # re-time full depth (module docstring)
                self.since_full = 0
                return Choice(self.candidates[0], 0)
            self.since_full += 1
            return Choice(best[1], best[2])
        # Probe: the cycle the estimates rank first, to measure it (its acceptance, its cost).
        _, j, k = best if best is not None else (None, self.candidates[0], 1)
        self.pause = self.next_pause
        self.next_pause = min(2 * self.next_pause, self.max_pause)
        return Choice(j, k, probe=True)

    def observe(self, choice: Choice, ms: float | None, drafts_accepted: int = 0, rejected: bool = False) -> None:
        """A step ran: its wall-clock (None: not to be believed, e.g. it captured a graph), and for
        a cycle how many drafts were accepted and whether one was rejected (a cycle whose drafts
        were all accepted rejected none)."""
        if choice.k:
            self.accepted[choice.j] = self.accepted.get(choice.j, 0) + drafts_accepted
            self.checked[choice.j] = self.checked.get(choice.j, 0) + drafts_accepted + int(rejected)
        else:
            self.since_full = 0
        if ms is None:
            return
        key = (None, 0) if choice.k == 0 else (choice.j, choice.k)
        self.times[key] = (self.times.get(key, []) + [ms])[-self.window:]
        self.medians[key] = statistics.median(self.times[key])
        full = self.cost((None, 0))
        if choice.k and full:
            self.ratios = (self.ratios + [ms / (full * self.prior(choice.j, choice.k))])[-2 * self.window:]
            self.medians["ratio"] = statistics.median(self.ratios)
            if choice.probe:
                rate = self.rate(choice.j, choice.k)
                if rate is not None and rate > self.margin * self.rate(None, 0):
                    # Speculation pays again: cycles from the next step, and probe soon after any later pause.
                    self.pause, self.next_pause = 0, 4
