"""The exit rule, once: a token leaves at the first exit point whose confidence is strictly above
that exit point's threshold; when none is, it runs to full depth.

`exits_here` is the rule at one exit point (what the decoder asks while a token is on its way
down); `first_exit` folds it over every exit point of a table of confidences (what teacher-forced
scoring and calibration ask). Both return tensors, so the decision can stay on the device.
"""

from __future__ import annotations

import torch


def exits_here(conf: torch.Tensor, threshold, undecided: torch.Tensor) -> torch.Tensor:
    """Rows that leave at this exit point: not yet decided, confidence > threshold."""
    return undecided & (conf > threshold)


def first_exit(conf, thresholds) -> torch.Tensor:
    """Per row of conf [N, J], the index of the first exit point the rule leaves at; J (full
    depth) when none. `thresholds`: one per exit point. numpy input gives numpy output."""
    as_numpy = not isinstance(conf, torch.Tensor)
    c = torch.as_tensor(conf)
    n, J = c.shape
    out = torch.full((n,), J, dtype=torch.long, device=c.device)
    undecided = torch.ones(n, dtype=torch.bool, device=c.device)
    for j in range(J):
        here = exits_here(c[:, j], float(thresholds[j]), undecided)
        out = torch.where(here, j, out)
        undecided = undecided & ~here
    return out.numpy() if as_numpy else out
