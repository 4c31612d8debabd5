"""The embedded Mamba-2 (`mamba2-smol`): loads offline by name and passes the core exactness
checks — blocks = HF full forward, never-exit = HF greedy, catch-up states = the full model's,
verify = full greedy — as SmolLM2 does."""

import pytest
import torch

from meestral.decoding import EarlyExitDecoder, SamplingOptions
from meestral.heads import ExitHeads
from test_decoding import hf_greedy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mamba():
    from meestral.backbones.loading import load_backbone

    return load_backbone("mamba2-smol")


def test_identity(mamba):
    ident = mamba.identity()
    assert (ident["name"], ident["arch"], ident["num_layers"], ident["vocab_size"]) == ("mamba2-smol", "mamba2", 24, 49152)


def test_blocks_equal_hf_prefill_and_decode(mamba):
    bb = mamba
    ids = torch.tensor([bb.tokenizer.encode("The quick brown fox jumps over the lazy dog because")])
    ref = bb.full_logits(ids)
    T = ids.shape[1]
    state = bb.new_state(1, T)
    pad = torch.zeros(1, dtype=torch.long)
    outs = []
    for start, n in ((0, T - 3), (T - 3, 1), (T - 2, 1), (T - 1, 1)):  # prefill, then stepped decode
        h = bb.embed(ids[:, start:start + n])
        step = bb.make_step(start, n, pad)
        for i in range(bb.num_layers):
            h, _ = bb.forward_layer(i, h, state, step)
        outs.append(bb.logits(h))
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=1e-4, rtol=1e-4)


def test_never_exit_equals_hf_greedy(mamba):
    bb = mamba
    prompt = bb.tokenizer.encode("Once upon a time")
    heads = ExitHeads("softmax", [6, 12, 18], bb)
    for policy in ("copy", "propagate"):
        got = EarlyExitDecoder(bb, heads, 1.0, policy).generate([prompt], SamplingOptions(max_new_tokens=10))[0]
        assert got.token_ids == hf_greedy(bb, prompt, 10)


def test_catchup_exact_and_verify_lossless(mamba):
    """Batch 3: catch-up leaves every layer's conv/SSM state exact; verify = full greedy."""
    from test_catchup import check_states_exact

    bb = mamba
    prompts = [bb.tokenizer.encode(p) for p in ("The water cycle is", "Once upon a time, in a", "Plants need")]
    heads = ExitHeads("softmax", [12, 18], bb)
    full = EarlyExitDecoder(bb).generate(prompts, SamplingOptions(max_new_tokens=8))
    for verify in (False, True):
        dec = EarlyExitDecoder(bb, heads, 0.2, policy="catchup", verify=verify, max_backlog=3)
        gens = dec.generate(prompts, SamplingOptions(max_new_tokens=8))
        assert any(e < bb.num_layers - 1 for g in gens for e in g.exit_layers[1:])  # exits happened
        check_states_exact(bb, dec, prompts)
        if verify:
            assert [g.token_ids for g in gens] == [f.token_ids for f in full]
