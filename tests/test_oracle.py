"""Oracle analysis: pure functions on hand-made arrays, and the logit-lens gatherer against a plain
HF forward on tiny random backbones."""

import json

import numpy as np
import pytest
import torch

from meestral.errors import MeestralError
from meestral.evaluation import calibration
from meestral.evaluation.oracle import (
    agreement_by_layer,
    by_confidence,
    exit_agreement,
    layer_predictions,
    oracle_exits,
    oracle_gather,
    oracle_from_match,
    oracle_report,
    oracle_summary,
)

LAYERS = [1, 3, 5, 7]
L = 10
FINAL = np.array([5, 6, 7, 8, 9])
#                 layer 1  3  5  7
PRED = np.array([[5, 5, 5, 5],   # matches everywhere             -> exits at 1
                 [0, 6, 0, 6],   # matches at 3, not 5, again at 7 -> 7 (must stay equal)
                 [7, 0, 0, 0],   # matches only at 1, then never   -> full depth 9
                 [0, 0, 8, 8],   # from 5 on                       -> 5
                 [0, 0, 0, 0]])  # never                           -> 9


# ---- pure functions ---------------------------------------------------------------------------------
def test_oracle_exit_must_stay_equal():
    assert oracle_exits(PRED, FINAL, LAYERS, L).tolist() == [1, 7, 9, 5, 9]


def test_oracle_exit_single_token_case_from_the_brief():
    # layer 3 matches, layer 5 differs, layer 7 matches: oracle exit 7, not 3
    pred = np.array([[0, 42, 1, 42]])
    assert oracle_exits(pred, np.array([42]), LAYERS, L).tolist() == [7]


def test_oracle_from_match_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    match = rng.random((500, 4)) < 0.6
    want = []
    for row in match:
        want.append(next((LAYERS[j] for j in range(4) if row[j:].all()), L - 1))
    assert oracle_from_match(match, LAYERS, L).tolist() == want


def test_the_oracle_by_the_final_layers_confidence():
    # PRED's oracle exits are 1, 7, 9, 5, 9; confidences put tokens 0 and 3 in the top bin (1.0
    # belongs to it), 2 in the lowest, 1 and 4 in 0.4-0.6
    prob = np.array([1.0, 0.5, 0.1, 0.85, 0.4])
    s = oracle_summary(PRED, FINAL, LAYERS, L, final_prob=prob)
    bins = {tuple(b["final_prob"]): b for b in s["by_confidence"]}
    assert [b["tokens"] for b in s["by_confidence"]] == [1, 0, 2, 0, 2]
    assert bins[(0.8, 1.0)]["mean_layers_run"] == pytest.approx((2 + 6) / 2)
    assert bins[(0.4, 0.6)]["mean_layers_run"] == pytest.approx((8 + 10) / 2)
    assert bins[(0.4, 0.6)]["full_depth_share"] == 0.5 and bins[(0.0, 0.2)]["full_depth_share"] == 1.0
    assert bins[(0.2, 0.4)]["mean_layers_run"] is None and bins[(0.2, 0.4)]["share"] == 0.0
    # the bins add up to the whole: shares to 1, their weighted mean to the overall mean
    full = [b for b in s["by_confidence"] if b["tokens"]]
    assert sum(b["share"] for b in s["by_confidence"]) == pytest.approx(1.0)
    assert sum(b["share"] * b["mean_layers_run"] for b in full) == pytest.approx(s["mean_layers_run"])
    assert "by_confidence" not in oracle_summary(PRED, FINAL, LAYERS, L)
    with pytest.raises(MeestralError, match="one probability per token"):
        by_confidence(np.array([1, 2]), np.array([0.5]), L)


def test_agreement_by_layer_and_exit_agreement():
    assert agreement_by_layer(PRED, FINAL).tolist() == pytest.approx([0.4, 0.4, 0.4, 0.6])
    agree = exit_agreement(PRED, FINAL)
    assert agree.shape == (5, 5) and agree[:, -1].all()
    assert agree[1].tolist() == [False, True, False, True, True]


def test_summary():
    s = oracle_summary(PRED, FINAL, LAYERS, L)
    assert s["layers"] == LAYERS and s["tokens"] == 5 and s["num_layers"] == L
    assert s["agreement"] == pytest.approx({1: 0.4, 3: 0.4, 5: 0.4, 7: 0.6})
    assert s["exit_histogram"] == {1: 1, 3: 0, 5: 1, 7: 1, 9: 2}
    run = (2 + 8 + 10 + 6 + 10) / 5  # exit layer + 1
    assert s["mean_layers_run"] == pytest.approx(run)
    assert s["mean_exit_layer"] == pytest.approx(run - 1)
    assert s["layer_fraction"] == pytest.approx(run / L)
    assert s["bound_speedup_layers"] == pytest.approx(L / run)
    json.dumps(s)


def test_summary_topk():
    in_topk = PRED == FINAL[:, None]
    in_topk[2] = True  # the third token's final top-1 is in every layer's top-k
    s = oracle_summary(PRED, FINAL, LAYERS, L, in_topk=in_topk, topk=5)
    assert s["topk"]["k"] == 5
    assert s["topk"]["exit_histogram"] == {1: 2, 3: 0, 5: 1, 7: 1, 9: 1}
    assert s["topk"]["agreement"] == pytest.approx({1: 0.4, 3: 0.6, 5: 0.6, 7: 0.8})


@pytest.mark.parametrize("args", [
    (PRED, FINAL, [1, 3, 5], L),        # columns vs layers
    (PRED, FINAL[:4], LAYERS, L),       # rows
    (PRED, FINAL, [3, 1, 5, 7], L),     # not sorted
    (PRED, FINAL, [1, 3, 5, 9], L),     # last layer is the reference
    (PRED, FINAL, [-1, 3, 5, 7], L),
    (PRED[:0], FINAL[:0], LAYERS, L),   # no tokens
])
def test_bad_arrays_raise(args):
    with pytest.raises(MeestralError):
        oracle_summary(*args)


# ---- the gatherer on tiny random backbones ------------------------------------------------------------
def _reference(bb, ids, lengths, layers):
    """Logit lens from HF's own output_hidden_states, one unpadded row at a time."""
    per_layer, final = [], []
    for b, n in enumerate(lengths):
        x = ids[b : b + 1, :n]
        hs = bb.block_outputs(bb.model(x, output_hidden_states=True).hidden_states, layers)
        per_layer.append(torch.stack([bb.logits(hs[l][0]).argmax(-1) for l in layers], 1))
        final.append(bb.full_logits(x)[0].argmax(-1))
    return torch.cat(per_layer).numpy(), torch.cat(final).numpy()


@pytest.mark.parametrize("shape", ["mistral", "mamba2"])
def test_layer_predictions_match_hf_forward(tiny, shape):
    bb = tiny(shape)
    layers = [0, 2, 4]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, bb.vocab_size, (3, 12), generator=g)
    lengths = [12, 7, 1]
    p = layer_predictions(bb, ids, layers, lengths=lengths, chunk=5, topk=3)
    ref_layers, ref_final = _reference(bb, ids, lengths, layers)
    assert p.layer_argmax.shape == (20, 3) and p.final_argmax.shape == (20,)
    assert np.array_equal(p.layer_argmax, ref_layers)
    assert np.array_equal(p.final_argmax, ref_final)
    # and against the whole padded batch's own full forward, valid positions only
    full = bb.full_logits(ids).argmax(-1)
    valid = torch.arange(12)[None] < torch.tensor(lengths)[:, None]
    assert np.array_equal(p.final_argmax, full[valid].numpy())
    assert p.row.tolist() == [0] * 12 + [1] * 7 + [2] and p.position.tolist() == list(range(12)) + list(range(7)) + [0]

    # padded positions are excluded: junk there changes nothing
    junk = ids.clone()
    junk[~valid] = torch.randint(3, bb.vocab_size, (int((~valid).sum()),), generator=g)
    q = layer_predictions(bb, junk, layers, lengths=lengths, chunk=1000, topk=3)
    assert np.array_equal(q.layer_argmax, p.layer_argmax) and np.array_equal(q.final_argmax, p.final_argmax)

    # softmax confidence and top-k membership
    hs = bb.collect(ids, layers)[0]
    probs = torch.stack([bb.logits(hs[l][valid]).softmax(-1).max(-1).values for l in layers], 1)
    assert np.allclose(p.max_prob, probs.numpy(), atol=1e-5)
    assert (p.in_topk >= (p.layer_argmax == p.final_argmax[:, None])).all()  # top-1 match implies top-3
    top1 = layer_predictions(bb, ids, layers, lengths=lengths, topk=1)
    assert np.array_equal(top1.in_topk, top1.layer_argmax == top1.final_argmax[:, None])


def test_layer_predictions_bad_inputs(tiny):
    bb = tiny("mistral")
    ids = torch.randint(3, bb.vocab_size, (2, 5))
    for kw in [dict(layers=[5]), dict(layers=[2, 1]), dict(layers=[]), dict(layers=[1], lengths=[5]),
               dict(layers=[1], lengths=[5, 6]), dict(layers=[1], topk=0), dict(layers=[1], chunk=0)]:
        with pytest.raises(MeestralError):
            layer_predictions(bb, ids, **kw)
    with pytest.raises(MeestralError):
        layer_predictions(bb, ids[0], [1])


@pytest.mark.parametrize("shape", ["mistral", "mamba2"])
def test_report_over_texts(tiny, shape):
    bb = tiny(shape)
    texts = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
             "The slings and arrows of outrageous fortune,"]
    layers = [0, 1, 2, 3, 4]
    p = oracle_gather(bb, texts, layers, seq_len=16, batch=2, topk=5, progress=False)
    lens = [len(bb.tokenizer.encode(t)) for t in texts]
    windows = [min(16, n - s) for n in lens for s in range(0, n, 16)]
    assert p.tokens == sum(windows)
    assert np.bincount(p.row).tolist() == windows  # rows number the windows across batches
    # the same as running layer_predictions window by window
    first = torch.tensor(bb.tokenizer.encode(texts[0])[:16])[None]
    one = layer_predictions(bb, first, layers)
    assert np.array_equal(p.layer_argmax[:16], one.layer_argmax)

    rep = oracle_report(bb, texts, layers, seq_len=16, batch=2, topk=5, progress=False)
    want = oracle_summary(p.layer_argmax, p.final_argmax, layers, bb.num_layers, in_topk=p.in_topk, topk=5,
                          final_prob=p.final_prob)
    assert rep == {"backbone": bb.name, **want}
    # the confidence is the full model's own top-1 probability, padding left out
    probs = torch.softmax(bb.model(first).logits.float(), -1).amax(-1)[0].numpy()
    np.testing.assert_allclose(p.final_prob[:16], probs, rtol=1e-5)
    assert rep["tokens"] == p.tokens and rep["topk"]["k"] == 5
    assert sum(rep["exit_histogram"].values()) == p.tokens
    assert 1 <= rep["bound_speedup_layers"] <= bb.num_layers
    json.dumps(rep)

    # gathered predictions feed calibration directly, with rows as sequence groups
    cal = calibration.calibrate(p.max_prob, exit_agreement(p.layer_argmax, p.final_argmax), epsilon=0.5,
                                delta=0.2, unit="sequence", groups=p.row)
    assert cal.n == len(windows)

    # token ids work the same as text; empty input is an error the user can fix
    ids = torch.tensor([bb.tokenizer.encode(texts[0])[:16]])
    assert np.array_equal(oracle_gather(bb, ids, layers, seq_len=16, progress=False).layer_argmax, one.layer_argmax)
    with pytest.raises(MeestralError):
        oracle_gather(bb, [], layers, progress=False)
