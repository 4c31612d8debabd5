"""Teacher-forced scoring equals what the decoder does, token for token and byte for byte.

The exact path scores from one parallel pass; these tests check it against the catch-up decoder
actually generating the same tokens (exit layers, emitted tokens, weight bytes per token), and the
sequential path against the copy / propagate decoder. Never-exit scores equal the HF full model.
"""

import pytest
import torch
from conftest import median_softmax

from meestral.decoding import EarlyExitDecoder, SamplingOptions
from meestral.evaluation.scoring import build_tables, decide, score_sequential
from meestral.exit_config import ExitConfig
from meestral.heads import ExitHeads

PROMPTS = [[5, 17, 33, 90, 4, 61], [7, 8, 9]]


def _heads(bb):
    pts = [0, 2] if bb.num_layers == 4 else [1, 3]
    return ExitHeads("softmax", pts, bb), [median_softmax(bb, p) for p in pts]


def _exact_scores(bb, heads, th, dec, prompt, gen_ids, verify=False):
    tab = build_tables(bb, heads, [(prompt + gen_ids[:-1], gen_ids)])[0]
    tab.start = len(prompt) - 1
    cfg = ExitConfig(heads, th, "verify" if verify else "catchup", dec.max_backlog).checked(bb)
    return decide(tab, cfg, dec.cost, bb.num_layers)


@pytest.mark.parametrize("shape", ["mistral", "mistral-sw", "llama", "mamba2", "mamba"])
def test_parallel_scoring_replays_the_catchup_decoder(tiny, shape):
    bb = tiny(shape)
    heads, th = _heads(bb)
    dec = EarlyExitDecoder(bb, heads, th, "catchup", max_backlog=3)
    for p, g in zip(PROMPTS, dec.generate(PROMPTS, SamplingOptions(max_new_tokens=14))):
        sc = _exact_scores(bb, heads, dec.thresholds, dec, p, g.token_ids)
        assert [s.exit_layer for s in sc.stats] == g.exit_layers
        assert [s.weight_bytes for s in sc.stats] == pytest.approx([s.weight_bytes for s in g.stats])
        assert [s.caught_up for s in sc.stats] == [s.caught_up for s in g.stats]
        assert sc.greedy  # greedy generation: every token is the emitted distribution's argmax
        assert any(s.exit_layer < bb.num_layers - 1 for s in sc.stats)


@pytest.mark.parametrize("shape", ["mistral", "mamba2", "mamba"])
@pytest.mark.parametrize("policy", ["copy", "propagate"])
def test_sequential_scoring_replays_the_decoder(tiny, shape, policy):
    bb = tiny(shape)
    heads, th = _heads(bb)
    dec = EarlyExitDecoder(bb, heads, th, policy)
    gens = dec.generate(PROMPTS, SamplingOptions(max_new_tokens=10))
    scored = score_sequential(dec, [(p, g.token_ids) for p, g in zip(PROMPTS, gens)])
    for sc, g in zip(scored, gens):
        assert [s.exit_layer for s in sc.stats] == g.exit_layers
        assert [s.weight_bytes for s in sc.stats[1:]] == pytest.approx([s.weight_bytes for s in g.stats[1:]])
        assert sc.greedy


@pytest.mark.parametrize("shape", ["mistral", "mamba2"])
def test_never_exit_scores_are_the_full_models(tiny, shape):
    bb = tiny(shape)
    ids = [3, 44, 12, 90, 7, 23, 5, 81]
    ctx, cont = ids[:3], ids[3:]
    ref = bb.full_logits(torch.tensor([ids])).float().log_softmax(-1)[0]
    want = sum(float(ref[len(ctx) - 1 + t, tok]) for t, tok in enumerate(cont))
    heads, _ = _heads(bb)
    dec = EarlyExitDecoder(bb, heads, 1.0, "catchup")
    exact = _exact_scores(bb, heads, dec.thresholds, dec, ctx, cont)
    seq = score_sequential(EarlyExitDecoder(bb, heads, 1.0, "copy"), [(ctx, cont)])[0]
    assert exact.logprob == pytest.approx(want, abs=1e-4)
    assert seq.logprob == pytest.approx(want, abs=1e-4)
    assert all(exact.agree) and all(seq.agree)
    assert all(s.exit_layer == bb.num_layers - 1 for s in exact.stats + seq.stats)


def test_verify_scores_the_full_model_at_catchup_cost(tiny):
    bb = tiny("mistral")
    heads, th = _heads(bb)
    dec = EarlyExitDecoder(bb, heads, th, "catchup", max_backlog=3)
    ctx, cont = PROMPTS[0], [9, 40, 41, 7, 100, 3, 3, 52]
    ref = bb.full_logits(torch.tensor([ctx + cont])).float().log_softmax(-1)[0]
    want = sum(float(ref[len(ctx) - 1 + t, tok]) for t, tok in enumerate(cont))
    v = _exact_scores(bb, heads, dec.thresholds, dec, ctx, cont, verify=True)
    c = _exact_scores(bb, heads, dec.thresholds, dec, ctx, cont, verify=False)
    assert v.logprob == pytest.approx(want, abs=1e-4)
    assert c.logprob != pytest.approx(want, abs=1e-4)  # these thresholds exit, so catch-up differs
    assert [s.weight_bytes for s in v.stats[:-1]] == [s.weight_bytes for s in c.stats[:-1]]
    # Drafts still waiting after the last token are verified by one more deep pass, charged to it.
    assert (v.stats[-1].weight_bytes > c.stats[-1].weight_bytes) == (not c.stats[-1].deep)
    cont2 = cont + [11]  # make the last scored token exit, so the flush must be charged
    roomy = EarlyExitDecoder(bb, heads, 0.0, "catchup", max_backlog=64)  # no forced deep pass
    v2 = _exact_scores(bb, heads, [0.0, 0.0], roomy, ctx, cont2, verify=True)
    c2 = _exact_scores(bb, heads, [0.0, 0.0], roomy, ctx, cont2, verify=False)
    assert not c2.stats[-1].deep and v2.stats[-1].weight_bytes > c2.stats[-1].weight_bytes


def test_pruned_model_skips_its_blocks_everywhere(tiny):
    bb = tiny("mistral")
    L = bb.num_layers
    dec = EarlyExitDecoder(bb, None, 1.0, "copy", skip_layers=[L - 3, L - 2])
    g = dec.generate([PROMPTS[0]], SamplingOptions(max_new_tokens=6))[0]
    assert all(s.layers_run == L - 2 for s in g.stats)
    # The pruned model by hand: blocks 0..L-4 and the last, over the whole sequence.
    ids = torch.tensor([PROMPTS[0] + g.token_ids[:-1]])
    hs = bb.model(ids, output_hidden_states=True).hidden_states
    h = hs[L - 3]  # HF's hidden_states[k] is block k-1's output: here blocks 0..L-4 have run
    state = bb.new_state(1, ids.shape[1])
    step = bb.make_step(0, ids.shape[1], torch.zeros(1, dtype=torch.long))
    out, _ = bb.forward_layer(L - 1, h, state, step)
    want = bb.logits(out)[0, len(PROMPTS[0]) - 1:].argmax(-1).tolist()
    assert g.token_ids == want
    sc = score_sequential(dec, [(PROMPTS[0], g.token_ids)])[0]
    assert sc.greedy and all(s.layers_run == L - 2 for s in sc.stats)
