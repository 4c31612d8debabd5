"""The early-exit decoder: never-exit equals HF greedy; copy and propagate fill skipped layers as specified."""

import copy

import pytest
import torch

from conftest import TINY, median_softmax
from meestral.decoding.decoder import EarlyExitDecoder, SamplingOptions
from meestral.decoding.config import ExitConfig
from meestral.decoding.heads import ExitHeads

ARCHS = ["mistral", "llama", "mamba2", "mamba"]


def hf_greedy(bb, ids, n):
    out = bb.model.generate(torch.tensor([ids], device=bb.device), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                            pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("shape", TINY)
@pytest.mark.parametrize("kind", ["softmax", "classifier"])
def test_never_exit_equals_hf_greedy(tiny, shape, kind):
    bb = tiny(shape)
    heads = ExitHeads(kind, [0, 2], bb)
    prompt = [1, 40, 50, 60, 70, 80]
    for policy in ("copy", "propagate"):
        dec = EarlyExitDecoder(bb, ExitConfig(heads=heads, thresholds=1.0, policy=policy))
        got = dec.generate([prompt], SamplingOptions(max_new_tokens=12))[0]
        assert got.token_ids == hf_greedy(bb, prompt, 12)
        assert all(layer == bb.num_layers - 1 for layer in got.exit_layers)


def forced_exit_step(bb, policy, exit_at, through=False):
    """One decoder step where every token exits at `exit_at`, seen through the decoder's
    inspection hook: states before/after, the exit hidden state computed independently."""
    prompt = [1, 33, 44, 55, 66, 77, 88]
    heads = ExitHeads("softmax", [exit_at], bb)
    dec = EarlyExitDecoder(bb, ExitConfig(heads=heads, thresholds=0.0, policy=policy, exit_output="through_last_layer" if through else "hidden"))
    seen = {}

    def inspect(view):
        if view.step <= 1:
            seen[view.step] = (copy.deepcopy(view.state), view.logits.clone(), view.logs)

    g = dec.generate([prompt], SamplingOptions(max_new_tokens=2), inspect=inspect)[0]
    (before, _, _), (after, logits, logs) = seen[0], seen[1]
    assert logs[0].exit_layer == exit_at == g.exit_layers[1]
    # Independent reference: run layers 0..exit_at on a copy of the state after the prompt.
    tok = torch.tensor([g.token_ids[0]])  # the token the step fed
    ref = copy.deepcopy(before)
    step = bb.make_step(len(prompt), 1, torch.zeros(1, dtype=torch.long))
    h = bb.embed(tok[:, None])
    for i in range(exit_at + 1):
        h, _ = bb.forward_layer(i, h, ref, step)
    return before, after, ref, h, step, logits


def layer_state(bb, state, i):
    if bb.family == "transformer":
        return [state.k[i], state.v[i], state.valid[i]]
    return [state.conv[i], state.ssm[i]]


@pytest.mark.parametrize("shape", ARCHS)
def test_copy_policy_fills_skipped_layers(tiny, shape):
    bb = tiny(shape)
    e = 1
    before, after, ref, h_exit, step, logits = forced_exit_step(bb, "copy", e)
    s = step.start
    for i in range(bb.num_layers):
        if i <= e:  # layers that ran hold the real states
            for a, r in zip(layer_state(bb, after, i), layer_state(bb, ref, i)):
                torch.testing.assert_close(a, r)
        elif bb.family == "transformer":  # skipped: previous slot's K/V copied into this slot
            torch.testing.assert_close(after.k[i][:, :, s], before.k[i][:, :, s - 1])
            torch.testing.assert_close(after.v[i][:, :, s], before.v[i][:, :, s - 1])
            assert after.valid[i, 0, s]
            torch.testing.assert_close(after.k[i][:, :, :s], before.k[i][:, :, :s])
        else:  # skipped: Mamba state untouched
            for a, b in zip(layer_state(bb, after, i), layer_state(bb, before, i)):
                assert torch.equal(a, b)
    # The emitted logits come from the exit hidden state through the final norm + LM head.
    torch.testing.assert_close(logits, bb.logits(h_exit[:, -1]))


@pytest.mark.parametrize("shape", ARCHS)
def test_propagate_policy_fills_skipped_layers(tiny, shape):
    bb = tiny(shape)
    e = 1
    before, after, ref, h_exit, step, _ = forced_exit_step(bb, "propagate", e)
    for i in range(e + 1, bb.num_layers):
        # Reference: the skipped layer run in full on the exit hidden state, on the old state.
        r = copy.deepcopy(before)
        bb.forward_layer(i, h_exit, r, step)
        for a, b in zip(layer_state(bb, after, i), layer_state(bb, r, i)):
            torch.testing.assert_close(a, b)
        if bb.family == "ssm":
            assert not torch.equal(after.ssm[i], before.ssm[i])


@pytest.mark.parametrize("shape", ["mistral", "mamba2"])
def test_through_last_layer_runs_last_block_on_exit_state(tiny, shape):
    bb = tiny(shape)
    e = 1
    before, after, ref, h_exit, step, logits = forced_exit_step(bb, "copy", e, through=True)
    r = copy.deepcopy(before)
    h_last, _ = bb.forward_layer(bb.num_layers - 1, h_exit, r, step)
    torch.testing.assert_close(logits, bb.logits(h_last[:, -1]))
    for a, b in zip(layer_state(bb, after, bb.num_layers - 1), layer_state(bb, r, bb.num_layers - 1)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shape", ["mistral", "mamba2"])
def test_batch_rows_match_single_rows(tiny, shape):
    """Rows of a batch (different lengths, some exiting) decode as they do alone."""
    bb = tiny(shape)
    heads = ExitHeads("softmax", [1, 3], bb)
    prompts = [[1, 20, 30, 40], [1, 50, 60, 70, 80, 90, 100]]
    for policy in ("copy", "propagate"):
        dec = EarlyExitDecoder(bb, ExitConfig(heads=heads, thresholds=median_softmax(bb, 1), policy=policy))
        batch = dec.generate(prompts, SamplingOptions(max_new_tokens=8))
        layers = [x for g in batch for x in g.exit_layers[1:]]
        assert min(layers) < bb.num_layers - 1 < max(layers) + 1  # some tokens exit
        for p, g in zip(prompts, batch):
            alone = dec.generate([p], SamplingOptions(max_new_tokens=8))[0]
            assert g.token_ids == alone.token_ids
            assert g.exit_layers == alone.exit_layers


def test_sampling_is_seeded(tiny):
    bb = tiny("mistral")
    dec = EarlyExitDecoder(bb)
    o = SamplingOptions(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    a = dec.generate(["hello"], o)[0].token_ids
    b = dec.generate(["hello"], o)[0].token_ids
    c = dec.generate(["hello"], SamplingOptions(max_new_tokens=10, temperature=1.0, seed=8))[0].token_ids
    assert a == b and a != c
