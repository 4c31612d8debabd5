"""catchup: every layer's state equals the full model's; verify: output equals the full model's."""

import pytest
import torch

from conftest import median_softmax
from meestral.decoding.decoder import EarlyExitDecoder, SamplingOptions
from meestral.decoding.config import ExitConfig
from meestral.errors import MeestralError
from meestral.decoding.heads import ExitHeads

ARCHS = ["mistral", "llama", "mamba2", "mamba", "mistral-sw"]
PROMPTS = [[1, 20, 30, 40], [1, 50, 60, 70, 80, 90, 100], [1, 7, 8]]


def exit_threshold(bb, shape):
    # Mamba-1's random logit lens is much peakier than the others'; median thresholds keep about
    # half the tokens exiting at the first exit point whatever the scale.
    return median_softmax(bb, 1)


def reference_states(bb, tokens, lengths):
    """{n: layer tensors after the full model has run tokens[:n]} for each n in `lengths`
    (batch 1, no padding), from one pass split at those lengths (continuation is exact)."""
    state = bb.new_state(1, max(len(tokens), 1))
    pad = torch.zeros(1, dtype=torch.long)
    out, start = {}, 0
    for n in sorted(set(lengths)):
        if n > start:
            h = bb.embed(torch.tensor([tokens[start:n]]))
            step = bb.make_step(start, n - start, pad)
            for i in range(bb.num_layers):
                h, _ = bb.forward_layer(i, h, state, step)
            start = n
        out[n] = [[t.clone() for t in bb.layer_tensors(state, i)] for i in range(bb.num_layers)]
    return out


def assert_state_close(got, want):
    """Equal to float32 rounding on the tensor's own scale: the decoder's fused q/k/v (and
    Mamba-2's fused step) round differently from the reference's separate modules, and the error
    grows with the values (deep SmolLM2 layers hold V up to ~12, where 1e-5 absolute is 1 ulp)."""
    scale = float(want.abs().max().clamp_min(1.0))
    torch.testing.assert_close(got, want, atol=1e-5 * scale, rtol=1e-4)


def assert_state_is_full_models(bb, state, tokens):
    """Every layer of a batch-1 `state` equals the full model's after `tokens` (Transformer: the
    kept slots of its K/V and valid mask; Mamba: the whole conv window and SSM state)."""
    n = len(tokens)
    want = reference_states(bb, tokens, [n])[n]
    for i in range(bb.num_layers):
        for got, ref in zip(bb.layer_tensors(state, i), want[i]):
            if bb.can_truncate:  # K/V [1, H, cap, D] and valid [1, cap]: the kept slots
                got, ref = (got[:, :, :n], ref[:, :, :n]) if got.dim() == 4 else (got[:, :n], ref[:, :n])
            if got.dtype == torch.bool:
                assert torch.equal(got, ref)
            else:
                assert_state_close(got, ref)


def generate_seen(dec, prompts, opts):
    """Generations and the decoder's last StepView (its public inspection hook)."""
    views = []
    gens = dec.generate(prompts, opts, inspect=views.append)
    return gens, views[-1]


def check_states_exact(bb, view, prompts):
    """Every layer holds a prefix of slots per row, and what it holds equals the full model's."""
    state, bl = view.state, view.backlog
    cur = bl.cur
    B, P = len(prompts), max(len(p) for p in prompts)
    L = bb.num_layers
    lacking_somewhere = 0
    for b in range(B):
        pad = P - len(prompts[b])
        c = int(cur[b])
        # The newest token (slot cur) is usually not fed yet (depth -1); a final verification
        # pass feeds it.
        toks = bl.tokens[b, pad:c + 1].tolist()
        fed = c + 1 if int(bl.depth[b, c]) >= 0 else c
        held = {}
        for layer in range(L):
            slots = [s for s in range(pad, c + 1) if int(bl.depth[b, s]) >= layer]
            assert slots == list(range(pad, pad + len(slots))), "a layer must hold a prefix of slots"
            lacking_somewhere += (fed - pad) - len(slots)
            held[layer] = len(slots)
        # Transformers: one full pass gives every layer's K/V at every position.
        lengths = [fed - pad] if bb.family == "transformer" else [n for n in held.values() if n]
        refs = reference_states(bb, toks, lengths)
        for layer, n in held.items():
            if n == 0:
                continue
            if bb.family == "transformer":
                k, v, _ = refs[fed - pad][layer]
                assert state.valid[layer, b, pad:pad + n].all()
                assert not state.valid[layer, b, pad + n:].any()
                assert_state_close(state.k[layer][b, :, pad:pad + n], k[0, :, :n])
                assert_state_close(state.v[layer][b, :, pad:pad + n], v[0, :, :n])
            else:
                conv, ssm = refs[n][layer]
                assert_state_close(state.conv[layer][b], conv[0])
                assert_state_close(state.ssm[layer][b], ssm[0])
    return lacking_somewhere


@pytest.mark.parametrize("shape", ARCHS)
@pytest.mark.parametrize("batch", [1, 3])
def test_catchup_states_equal_full_model(tiny, shape, batch):
    bb = tiny(shape)
    heads = ExitHeads("softmax", [1, 2], bb)
    prompts = PROMPTS[:batch]
    dec = EarlyExitDecoder(bb, ExitConfig(heads=heads, thresholds=exit_threshold(bb, shape), policy="catchup", max_backlog=4))
    gens, view = generate_seen(dec, prompts, SamplingOptions(max_new_tokens=14))
    exits = [e for g in gens for e in g.exit_layers[1:]]
    if shape != "mamba":  # make sure the test exercises backlogs, not only deep tokens
        assert any(e < bb.num_layers - 1 for e in exits)
    check_states_exact(bb, view, prompts)


@pytest.mark.parametrize("shape", ["mistral", "mamba2"])
def test_backlog_bounded_by_max_backlog(tiny, shape):
    """With a threshold of 0 every token wants to exit; a full backlog forces a deep pass."""
    bb = tiny(shape)
    heads = ExitHeads("static", [1], bb)
    for m in (1, 3):
        dec = EarlyExitDecoder(bb, ExitConfig(heads=heads, thresholds=0.0, policy="catchup", max_backlog=m))
        (g,), view = generate_seen(dec, [PROMPTS[0]], SamplingOptions(max_new_tokens=16))
        run = 0
        for s in g.stats[1:]:
            run = 0 if s.deep else run + 1
            assert run <= m
        assert any(s.deep for s in g.stats[1:]) and any(not s.deep for s in g.stats[1:])
        assert check_states_exact(bb, view, [PROMPTS[0]]) > 0  # a backlog really was pending


def full_greedy(bb, prompts, n):
    return [g.token_ids for g in EarlyExitDecoder(bb).generate(prompts, SamplingOptions(max_new_tokens=n))]


@pytest.mark.parametrize("shape", ARCHS)
@pytest.mark.parametrize("batch", [1, 3])
def test_verify_equals_full_greedy(tiny, shape, batch):
    bb = tiny(shape)
    prompts = PROMPTS[:batch]
    ref = full_greedy(bb, prompts, 14)
    th = exit_threshold(bb, shape)
    for kind, thresholds in (("softmax", [th, 0.0]), ("static", [0.0])):
        heads = ExitHeads(kind, [1, 2], bb)
        for t in thresholds:  # 0.0: exits (almost) always
            dec = EarlyExitDecoder(bb, ExitConfig(heads=heads, thresholds=t, policy="verify", max_backlog=3))
            gens, view = generate_seen(dec, prompts, SamplingOptions(max_new_tokens=14))
            assert [g.token_ids for g in gens] == ref
            assert all(len(g.token_ids) == 14 for g in gens)
            check_states_exact(bb, view, prompts)


def test_verify_rolls_back_and_accounts_for_it(tiny):
    bb = tiny("mistral")
    heads = ExitHeads("static", [1], bb)
    dec = EarlyExitDecoder(bb, ExitConfig(heads=heads, thresholds=0.0, policy="verify", max_backlog=2))
    g = dec.generate([PROMPTS[1]], SamplingOptions(max_new_tokens=12))[0]
    s = dec.summary(g)
    # random exits are wrong: drafts get rejected (a deep pass that only verifies the end is no draft)
    assert s["rolled_back"] == sum(not x.deep for x in g.discarded) > 0
    assert len(g.stats) == len(g.token_ids)
    kept = sum(x.weight_bytes for x in g.stats[1:])
    assert s["weight_bytes_per_token"] * s["tokens"] == pytest.approx(kept + sum(x.weight_bytes for x in g.discarded))


@pytest.mark.parametrize("shape", ["mistral", "mamba2"])
def test_verify_with_eos_and_stop(tiny, shape):
    """Rows that end (EOS / length) with drafts pending are flushed and verified first."""
    bb = tiny(shape)
    ref = EarlyExitDecoder(bb).generate(PROMPTS, SamplingOptions(max_new_tokens=10))
    eos = ref[0].token_ids[4]  # pretend a token of the full output is EOS: row 0 must stop there
    bb.tokenizer.eos_ids.add(eos)
    try:
        ref = EarlyExitDecoder(bb).generate(PROMPTS, SamplingOptions(max_new_tokens=10))
        heads = ExitHeads("static", [1], bb)
        dec = EarlyExitDecoder(bb, ExitConfig(heads=heads, thresholds=0.0, policy="verify", max_backlog=4))
        got = dec.generate(PROMPTS, SamplingOptions(max_new_tokens=10))
        assert [g.token_ids for g in got] == [r.token_ids for r in ref]
        assert [g.finish_reason for g in got] == [r.finish_reason for r in ref]
    finally:
        bb.tokenizer.eos_ids.discard(eos)


def test_snapshot_memory_is_one_state_per_row(tiny):
    bb = tiny("mamba2")
    heads = ExitHeads("static", [1], bb)
    dec = EarlyExitDecoder(bb, ExitConfig(heads=heads, thresholds=0.0, policy="verify", max_backlog=3))
    _, view = generate_seen(dec, PROMPTS, SamplingOptions(max_new_tokens=20))
    bl, state = view.backlog, view.state
    assert bb.snapshot_nbytes(bl.snapshot) == state.nbytes()  # one copy of the states, whatever the length
    assert not any(bl.drafts)  # every draft was verified (or rolled back)


@pytest.mark.parametrize("shape", ["mistral", "mamba2"])
def test_snapshot_restore_round_trip(tiny, shape):
    bb = tiny(shape)
    state = bb.new_state(2, 8)
    step = bb.make_step(0, 5, torch.zeros(2, dtype=torch.long))
    h = bb.embed(torch.randint(3, 200, (2, 5)))
    for i in range(bb.num_layers):
        h, _ = bb.forward_layer(i, h, state, step)
    snap = bb.snapshot(state)
    before = [t.clone() for i in range(bb.num_layers) for t in bb.layer_tensors(state, i)]
    h2 = bb.embed(torch.randint(3, 200, (2, 2)))
    step2 = bb.make_step(5, 2, torch.zeros(2, dtype=torch.long))
    for i in range(bb.num_layers):
        h2, _ = bb.forward_layer(i, h2, state, step2)
    rows = torch.tensor([0])  # row indices
    after_row1 = [t[1].clone() for i in range(bb.num_layers) for t in bb.layer_tensors(state, i)]
    bb.restore(state, snap, rows)
    now = [t for i in range(bb.num_layers) for t in bb.layer_tensors(state, i)]
    for a, b0, r1 in zip(now, before, after_row1):
        assert torch.equal(a[0], b0[0]) and torch.equal(a[1], r1)
    bb.restore(state, snap)
    for a, b0 in zip([t for i in range(bb.num_layers) for t in bb.layer_tensors(state, i)], before):
        assert torch.equal(a, b0)


def chi2_pvalue(counts, probs):
    n = counts.sum()
    keep = probs > 0
    exp = probs[keep] * n
    stat = ((counts[keep] - exp) ** 2 / exp).sum()
    df = torch.tensor(float(keep.sum() - 1))
    return float(1 - torch.special.gammainc(df / 2, stat / 2))


@pytest.mark.parametrize("shape", ["mistral", "mamba2"])
def test_verify_sampling_matches_full_distribution(tiny, shape):
    """Speculative acceptance: with drafts from early exits, the joint law of the first two
    decoded tokens is the full model's (chi-square goodness of fit against the exact law)."""
    bb = tiny(shape)
    prompt = PROMPTS[1]
    opts = dict(temperature=1.0, top_k=3)
    from meestral.decoding.sampling import probabilities

    o = SamplingOptions(max_new_tokens=3, **opts)
    # Exact joint law of (token 2, token 3) given the prompt: the prefill token is exact, then
    # P(t2 | t1) P(t3 | t1, t2) with the same top-k/temperature transform.
    with torch.no_grad():
        p1 = probabilities(bb.full_logits(torch.tensor([prompt]))[0, -1], o)
        law = {}
        for t1 in torch.nonzero(p1).flatten().tolist():
            p2 = probabilities(bb.full_logits(torch.tensor([prompt + [t1]]))[0, -1], o)
            for t2 in torch.nonzero(p2).flatten().tolist():
                p3 = probabilities(bb.full_logits(torch.tensor([prompt + [t1, t2]]))[0, -1], o)
                for t3 in torch.nonzero(p3).flatten().tolist():
                    law[(t2, t3)] = law.get((t2, t3), 0.0) + float(p1[t1] * p2[t2] * p3[t3])
    cells = sorted(law)
    heads = ExitHeads("static", [1], bb)
    dec = EarlyExitDecoder(bb, ExitConfig(heads=heads, thresholds=0.0, policy="verify", max_backlog=4))
    n = 600
    gens = dec.generate([prompt] * n, SamplingOptions(max_new_tokens=3, seed=0, **opts))
    counts = torch.zeros(len(cells))
    for g in gens:
        counts[cells.index(tuple(g.token_ids[1:3]))] += 1
    probs = torch.tensor([law[c] for c in cells])
    assert chi2_pvalue(counts, probs) > 1e-3
    # The drafts alone (no verification) follow another law: the test can tell them apart.
    raw = EarlyExitDecoder(bb, ExitConfig(heads=heads, thresholds=0.0, policy="catchup")).generate(
        [prompt] * n, SamplingOptions(max_new_tokens=3, seed=0, **opts))
    raw_counts = torch.zeros(len(cells))
    outside = 0
    for g in raw:
        key = tuple(g.token_ids[1:3])
        if key in law:
            raw_counts[cells.index(key)] += 1
        else:
            outside += 1
    assert outside > 0 or chi2_pvalue(raw_counts, probs) < 1e-3


def test_bad_combinations(tiny):
    bb = tiny("mistral")
    with pytest.raises(MeestralError, match="catchup"):  # the --verify alias needs an exact policy
        ExitConfig.from_options(bb, head="full", policy="copy", verify=True)
    with pytest.raises(MeestralError, match="exit-output"):
        EarlyExitDecoder(bb, ExitConfig(heads=None, thresholds=1.0, policy="catchup", exit_output="through_last_layer"))
    with pytest.raises(MeestralError, match="max_backlog"):
        EarlyExitDecoder(bb, ExitConfig(heads=None, thresholds=1.0, policy="catchup", max_backlog=0))


@pytest.mark.parametrize("shape", ["mistral", "mamba2", "mamba"])
def test_states_exact_after_many_rollbacks(tiny, shape):
    """Sampled drafts are often rejected: after rollbacks (K/V truncation; Mamba snapshot restore
    and replay) every layer still holds exactly the full model's states for the kept tokens."""
    bb = tiny(shape)
    heads = ExitHeads("static", [1], bb)
    dec = EarlyExitDecoder(bb, ExitConfig(heads=heads, thresholds=0.0, policy="verify", max_backlog=3))
    gens, view = generate_seen(dec, PROMPTS, SamplingOptions(max_new_tokens=16, temperature=1.0, top_k=20, seed=3))
    assert sum(len(g.discarded) for g in gens) >= 6  # rollbacks happened mid-stream, not only at the end
    check_states_exact(bb, view, PROMPTS)
