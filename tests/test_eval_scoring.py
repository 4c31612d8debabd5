"""Teacher-forced scoring equals what the decoder does, token for token and byte for byte.

The exact path scores from one parallel pass; these tests check it against the catch-up decoder
actually generating the same tokens (exit layers, emitted tokens, weight bytes per token), and the
sequential path against the copy / propagate decoder. Never-exit scores equal the HF full model.
"""

import pytest
import torch
from conftest import median_softmax

from meestral.decoding.accounting import summarize
from meestral.decoding.decoder import EarlyExitDecoder, SamplingOptions
from meestral.evaluation.scoring import build_tables, decide, score_sequential
from meestral.decoding.config import ExitConfig
from meestral.decoding.heads import ExitHeads

PROMPTS = [[5, 17, 33, 90, 4, 61], [7, 8, 9]]


def _heads(bb):
    pts = [0, 2] if bb.num_layers == 4 else [1, 3]
    return ExitHeads("softmax", pts, bb), [median_softmax(bb, p) for p in pts]


def _exact_scores(bb, heads, th, dec, prompt, gen_ids, verify=False, table=None):
    tab = table or build_tables(bb, heads, [(prompt + gen_ids[:-1], gen_ids)])[0]
    tab.start = len(prompt) - 1
    cfg = ExitConfig(heads=heads, thresholds=th, policy="verify" if verify else "catchup",
                     max_backlog=dec.config.max_backlog).checked(bb)
    return decide(tab, cfg, dec.cost, bb.num_layers, bb)


def _cost(stats):
    """Per token what the bar compares: exit layer, layers, deep pass, weight bytes, FLOPs, catch-up."""
    return [(s.exit_layer, s.layers_run, s.deep, s.probes, s.caught_up, round(s.weight_bytes), round(s.flops))
            for s in stats]


@pytest.mark.parametrize("shape", ["mistral", "llama", "mamba2", "mamba"])
def test_verify_scoring_charges_what_verify_generation_spends(tiny, shape):
    """On the sequence greedy `verify` generation produced, the replayed cost equals the decoder's,
    token for token: kept tokens (a corrected token carries the deep pass that rejected the draft)
    and discarded work (rejected drafts, the drafts made after them, the final flush), at several
    thresholds, with the drafts after a rejected one priced through the backbone."""
    bb = tiny(shape)
    pts = [0, 2] if bb.num_layers == 4 else [1, 3]
    heads = ExitHeads("softmax", pts, bb)
    mid = [median_softmax(bb, p) for p in pts]
    rejected = accepted = 0
    for scale, backlog in ((0.8, 3), (1.0, 3), (1.25, 8), (0.0, 4)):  # 0.0: every step may exit
        th = [scale * t for t in mid]
        dec = EarlyExitDecoder(bb, ExitConfig(heads=heads, thresholds=th, policy="verify", max_backlog=backlog))
        for p, g in zip(PROMPTS, dec.generate(PROMPTS, SamplingOptions(max_new_tokens=14))):
            sc = _exact_scores(bb, heads, dec.config.thresholds, dec, p, g.token_ids, verify=True)
            assert _cost(sc.stats) == _cost(g.stats)
            assert _cost(sc.discarded) == _cost(g.discarded)
            want, got = dec.summary(g), summarize(sc.stats, dec.cost, bb.num_layers, sc.discarded)
            for k in ("weight_bytes_per_token", "deep_passes_per_token", "rolled_back", "draft_acceptance"):
                assert got[k] == pytest.approx(want[k]), k
            assert sc.greedy  # lossless: the sequence is the full model's greedy one
            rejected += want["rolled_back"]
            accepted += sum(not s.deep for s in g.stats)
    assert rejected >= 3 and accepted >= 3  # both kinds of draft were priced, on every shape


def test_verify_scoring_charges_rejected_drafts_beyond_catchup(tiny):
    """A sequence whose drafts are all wrong: verify pays catch-up's steps and then the rollbacks;
    its off-sequence rows are kept, so a second threshold pass re-runs no branch it has seen."""
    bb = tiny("mistral")
    heads = ExitHeads("static", [1], bb)
    dec = EarlyExitDecoder(bb, ExitConfig(heads=heads, thresholds=0.0, policy="catchup", max_backlog=4))
    ctx, cont = PROMPTS[0], [9, 40, 41, 7, 100, 3, 3, 52]
    tab = build_tables(bb, heads, [(ctx + cont[:-1], cont)])[0]
    v = _exact_scores(bb, heads, [0.0], dec, ctx, cont, verify=True, table=tab)
    c = _exact_scores(bb, heads, [0.0], dec, ctx, cont, verify=False, table=tab)
    L = bb.num_layers
    wrong = [t for t in range(1, len(cont)) if tab.top[t, 0] != tab.top[t, 1]]
    assert wrong  # a random layer-1 lens disagrees with the final layer
    sv = summarize(v.stats, dec.cost, L, v.discarded)
    sc = summarize(c.stats, dec.cost, L, c.discarded)
    assert sv["rolled_back"] >= len(wrong) and sc["rolled_back"] == 0
    assert sv["weight_bytes_per_token"] > sc["weight_bytes_per_token"]
    assert sv["draft_acceptance"] == pytest.approx(1 - sv["rolled_back"] / (sv["rolled_back"] + sum(
        not s.deep for s in v.stats)))
    off = tab.extra["off"]
    fed = off.model_tokens
    assert fed > 0
    again = _exact_scores(bb, heads, [0.0], dec, ctx, cont, verify=True, table=tab)
    assert off.model_tokens == fed and _cost(again.discarded) == _cost(v.discarded)


@pytest.mark.parametrize("shape", ["mistral", "mistral-sw", "llama", "mamba2", "mamba"])
def test_parallel_scoring_replays_the_catchup_decoder(tiny, shape):
    bb = tiny(shape)
    heads, th = _heads(bb)
    dec = EarlyExitDecoder(bb, ExitConfig(heads=heads, thresholds=th, policy="catchup", max_backlog=3))
    for p, g in zip(PROMPTS, dec.generate(PROMPTS, SamplingOptions(max_new_tokens=14))):
        sc = _exact_scores(bb, heads, dec.config.thresholds, dec, p, g.token_ids)
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
    dec = EarlyExitDecoder(bb, ExitConfig(heads=heads, thresholds=th, policy=policy))
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
    dec = EarlyExitDecoder(bb, ExitConfig(heads=heads, thresholds=1.0, policy="catchup"))
    exact = _exact_scores(bb, heads, dec.config.thresholds, dec, ctx, cont)
    seq = score_sequential(EarlyExitDecoder(bb, ExitConfig(heads=heads, thresholds=1.0, policy="copy")), [(ctx, cont)])[0]
    assert exact.logprob == pytest.approx(want, abs=1e-4)
    assert seq.logprob == pytest.approx(want, abs=1e-4)
    assert all(exact.agree) and all(seq.agree)
    assert all(s.exit_layer == bb.num_layers - 1 for s in exact.stats + seq.stats)


def test_verify_scores_the_full_model(tiny):
    bb = tiny("mistral")
    heads, th = _heads(bb)
    dec = EarlyExitDecoder(bb, ExitConfig(heads=heads, thresholds=th, policy="catchup", max_backlog=3))
    ctx, cont = PROMPTS[0], [9, 40, 41, 7, 100, 3, 3, 52]
    ref = bb.full_logits(torch.tensor([ctx + cont])).float().log_softmax(-1)[0]
    want = sum(float(ref[len(ctx) - 1 + t, tok]) for t, tok in enumerate(cont))
    v = _exact_scores(bb, heads, dec.config.thresholds, dec, ctx, cont, verify=True)
    c = _exact_scores(bb, heads, dec.config.thresholds, dec, ctx, cont, verify=False)
    assert v.logprob == pytest.approx(want, abs=1e-4)
    assert c.logprob != pytest.approx(want, abs=1e-4)  # these thresholds exit, so catch-up differs
    assert all(v.agree) and len(v.stats) == len(cont)


def test_pruned_model_skips_its_blocks_everywhere(tiny):
    bb = tiny("mistral")
    L = bb.num_layers
    dec = EarlyExitDecoder(bb, ExitConfig(heads=None, thresholds=1.0, policy="copy", skip_layers=[L - 3, L - 2]))
    g = dec.generate([PROMPTS[0]], SamplingOptions(max_new_tokens=6))[0]
    assert all(s.layers_run == L - 2 for s in g.stats)
    # The pruned model by hand: blocks 0..L-4 and the last, over the whole sequence.
    ids = torch.tensor([PROMPTS[0] + g.token_ids[:-1]])
    hs = bb.model(ids, output_hidden_states=True).hidden_states
    h = bb.block_outputs(hs, [L - 4])[L - 4]  # blocks 0..L-4 have run
    state = bb.new_state(1, ids.shape[1])
    step = bb.make_step(0, ids.shape[1], torch.zeros(1, dtype=torch.long))
    out, _ = bb.forward_layer(L - 1, h, state, step)
    want = bb.logits(out)[0, len(PROMPTS[0]) - 1:].argmax(-1).tolist()
    assert g.token_ids == want
    sc = score_sequential(dec, [(PROMPTS[0], g.token_ids)])[0]
    assert sc.greedy and all(s.layers_run == L - 2 for s in sc.stats)


def test_tables_of_trainable_heads_are_plain_numbers(tiny):
    """Classifier heads hold parameters that require grad: the tables (and the calibration data
    read from them as NumPy arrays) must carry no autograd graph."""
    from meestral.evaluation.scoring import calibration_data

    bb = tiny("llama")
    heads = ExitHeads("classifier", [1, 3], bb)
    assert any(p.requires_grad for p in heads.parameters())
    tab = build_tables(bb, heads, [([5, 17, 33, 90, 4, 61], [17, 33, 90])])[0]
    assert not tab.conf.requires_grad
    conf, agree, groups = calibration_data(bb, heads, torch.randint(0, 100, (2, 9)), progress=False)
    assert conf.shape == (16, 2) and agree.shape == (16, 3) and groups.tolist() == [0] * 8 + [1] * 8


@pytest.mark.parametrize("shape", ["mistral", "mamba2"])
def test_sequential_scoring_reuses_the_full_models_top1(tiny, shape, monkeypatch):
    """The full model's top-1 (what agreement is measured against) is computed once per request
    and reused by later configurations; the exact path's tables supply it too. Agreement is the
    same whichever way it came."""
    from meestral.evaluation.lm_model import MeestralLM

    bb = tiny(shape)
    heads, th = _heads(bb)
    rows = [(PROMPTS[0], [9, 4, 77, 12]), (PROMPTS[1], [3, 3, 50])]
    reqs = [(None, c, x) for c, x in rows]
    dec = EarlyExitDecoder(bb, ExitConfig(heads=heads, thresholds=th, policy="copy"))
    known = {}
    first = score_sequential(dec, rows, known)
    assert set(known) == {(tuple(c), tuple(x)) for c, x in rows} and [len(v) for v in known.values()] == [4, 3]

    def no_pass(*a, **k):
        raise AssertionError("a second full-depth pass for a known top-1")

    with monkeypatch.context() as m:
        m.setattr(bb, "collect", no_pass)
        again = score_sequential(dec, rows, known)
    assert [r.agree for r in again] == [r.agree for r in first]
    assert [r.logprob for r in again] == [r.logprob for r in first]

    lm = MeestralLM(backbone=bb, head="full", batch_size=2)  # the full model first: exact tables
    lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert lm._full_top == known
    lm.configure(ExitConfig(heads=heads, thresholds=th, policy="copy"))
    lm.records = []
    with monkeypatch.context() as m:
        m.setattr(bb, "collect", no_pass)
        lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert [r["agree"] for r in lm.records] == [r.agree for r in first]
