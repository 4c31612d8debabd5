"""Host reads per decode step, counted (never timed): the eager decoder asks the device only what
its policy needs. At batch 1 (and, as it happens, at any batch size) a step reads its emitted
tokens once and the exit decision once per exit point asked: a full-depth token costs at most 2
reads, and each exit point adds at most one (decoding/policy.py, "Host reads": between segments
the host reads one small tensor)."""

import pytest

from conftest import median_softmax
from host_reads import HostReads
from meestral.decoding.decoder import EarlyExitDecoder, SamplingOptions
from meestral.decoding.config import ExitConfig
from meestral.decoding.heads import ExitHeads

FULL_DEPTH_BUDGET = 2  # reads per token at full depth
PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10], [1, 11, 12, 13, 14, 15, 16]]


def reads_per_step(dec, prompts, opts):
    """(reads of the prefill and of each later step, the generations)."""
    per_step, last = [], [0]
    with HostReads() as reads:
        def inspect(view):
            per_step.append(reads.count - last[0])
            last[0] = reads.count

        gens = dec.generate(prompts, opts, inspect=inspect)
        assert reads.count == last[0], "reads after the last step"
    return per_step, gens


def configs(bb):
    th = median_softmax(bb, 1)  # about half the tokens leave at the first exit point
    two = ExitHeads("softmax", [1, 3], bb)
    one = ExitHeads("static", [1], bb)
    return {
        "full": (None, 1.0, "copy"),
        "copy": (two, th, "copy"),
        "copy-never-exits": (two, 1.0, "copy"),  # every exit point is asked, every step
        "propagate": (two, th, "propagate"),
        "through_last_layer": (two, th, "copy"),
        "catchup": (two, th, "catchup"),
        "catchup-static": (one, 0.0, "catchup"),
        "verify": (two, th, "verify"),
        "verify-static": (one, 0.0, "verify"),  # random drafts: rejections and rollbacks
    }


@pytest.mark.parametrize("shape", ["mistral", "mamba2"])
@pytest.mark.parametrize("name", ["full", "copy", "copy-never-exits", "propagate", "through_last_layer", "catchup",
                                  "catchup-static", "verify", "verify-static"])
@pytest.mark.parametrize("batch", [1, 3])
def test_host_reads_per_step_within_budget(tiny, shape, name, batch):
    bb = tiny(shape)
    heads, th, policy = configs(bb)[name]
    J = 0 if heads is None else len(heads.exit_points)
    out = "through_last_layer" if name == "through_last_layer" else "hidden"
    dec = EarlyExitDecoder(bb, ExitConfig(heads=heads, thresholds=th, policy=policy, exit_output=out, max_backlog=3))
    for temperature in (0.0, 1.0):
        per_step, gens = reads_per_step(dec, PROMPTS[:batch], SamplingOptions(max_new_tokens=12, temperature=temperature,
                                                                              seed=0))
        assert per_step[0] <= FULL_DEPTH_BUDGET  # the prompt pass: full depth
        assert max(per_step[1:]) <= FULL_DEPTH_BUDGET + J, per_step
        if name in ("full", "copy-never-exits"):  # every token at full depth: the budget is tight
            assert per_step[1:] == [1 + J] * len(per_step[1:])
        if batch == 1 and policy != "verify":  # one step per token
            tokens = len(gens[0].token_ids)
            assert sum(per_step) <= tokens * (FULL_DEPTH_BUDGET + J)


def test_host_read_counter_counts_what_stalls(tiny):
    """The counter sees every kind of read it claims to (so a budget test cannot pass blind)."""
    import torch

    x = torch.arange(6.0)
    with HostReads() as reads:
        x.sum().item()
        x.tolist()
        bool(x.any())
        int(x[0])
        float(x[1])
        x[x > 2]
        x.nonzero()
        torch.nonzero(x)
        x.cpu()
        y = x.clone()
        y[y > 3] = 0
        list(range(x.long()[2]))
    assert reads.count == 11, reads.where
    with HostReads() as reads:
        torch.where(x > 2, x, -x)[torch.tensor([1, 2])]  # masks in where() and index gathers stay on the device
    assert reads.count == 0
