"""speculate: greedy output equals full depth, sampling keeps the full model's distribution, the
state after every cycle is the full model's, and scoring prices it as generation spends it."""

import pytest
import torch

from conftest import median_softmax
from meestral.decoding.config import ExitConfig
from meestral.decoding.decoder import EarlyExitDecoder, SamplingOptions
from meestral.decoding.heads import ExitHeads
from meestral.decoding.speculation_control import Choice, SpeculationController, expected_tokens
from meestral.errors import MeestralError

ARCHS = ["mistral", "llama", "mamba2", "mamba", "mistral-sw"]
PROMPTS = [[1, 20, 30, 40], [1, 50, 60, 70, 80, 90, 100], [1, 7, 8]]


def spec_config(bb, exit_layer, k, threshold=0.0, adaptive=False, kind="softmax", draft_vocab=0):
    return ExitConfig(heads=ExitHeads(kind, [exit_layer], bb), thresholds=threshold, policy="speculate",
                      draft_tokens=k, adaptive=adaptive, draft_vocab=draft_vocab)


def acceptance(dec, gens):
    accepted = sum(not s.deep for g in gens for s in g.stats[1:])
    rejected = sum(not s.deep for g in gens for s in g.discarded)
    return accepted, rejected


@pytest.mark.parametrize("shape", ARCHS)
def test_greedy_equals_full_depth(tiny, shape):
    bb = tiny(shape)
    L = bb.num_layers
    opts = SamplingOptions(max_new_tokens=24)
    ref = EarlyExitDecoder(bb).generate(PROMPTS, opts)
    ref1 = [EarlyExitDecoder(bb).generate([p], opts)[0] for p in PROMPTS]
    seen = [0, 0]
    # A shallow and a deep draft layer (low and high acceptance), a threshold that stops some
    # cycles' drafting, one and several drafts a cycle.
    for exit_layer, k, th in ((1, 1, 0.0), (1, 3, 0.0), (L - 2, 3, 0.0), (L - 2, 4, None)):
        if th is None:
            th = median_softmax(bb, L - 2)
        dec = EarlyExitDecoder(bb, spec_config(bb, exit_layer, k, th))
        batched = dec.generate(PROMPTS, opts)
        single = [dec.generate([p], opts)[0] for p in PROMPTS]
        for r, r1, g, g1 in zip(ref, ref1, batched, single):
            assert g.token_ids == r.token_ids, (exit_layer, k, th)
            assert g1.token_ids == r1.token_ids, (exit_layer, k, th)
        a, rj = acceptance(dec, single)
        seen[0] += a
        seen[1] += rj
    # The comparison means something only if drafts were both accepted and rejected.
    assert seen[0] > 0 and seen[1] > 0, seen


@pytest.mark.parametrize("shape", ARCHS)
def test_state_after_cycles_is_the_full_models(tiny, shape):
    """With acceptance injected at random (state handling unchanged, tokens not checked), every
    layer's state after the generation equals the full model's on the tokens it emitted: rejected
    drafts leave no trace (Transformer: their slots are never seen; Mamba: the history restore)."""
    from test_catchup import assert_state_is_full_models

    bb = tiny(shape)
    dec = EarlyExitDecoder(bb, spec_config(bb, 2, 3))
    dec.policy.inject = 0.5
    views = []
    gen = dec.generate([PROMPTS[1]], SamplingOptions(max_new_tokens=17, seed=3), inspect=views.append)[0]
    a, rj = acceptance(dec, [gen])
    assert a > 0 and rj > 0
    # the newest token is fed by the next step, not yet run
    assert_state_is_full_models(bb, views[-1].state, PROMPTS[1] + gen.token_ids[:-1])


@pytest.mark.parametrize("shape", ["mamba2", "mamba"])
def test_a_cycle_that_keeps_every_draft_restores_nothing(tiny, shape, monkeypatch):
    """Every draft accepted (injected): the state after the deep pass is already the one after the
    last kept slot, so no restore runs, and the state still equals the full model's."""
    from test_catchup import assert_state_is_full_models

    bb = tiny(shape)
    dec = EarlyExitDecoder(bb, spec_config(bb, 2, 3))
    dec.policy.inject = 1.0
    restores = []
    real = dec.engine.restore_history
    monkeypatch.setattr(dec.engine, "restore_history", lambda *a: restores.append(1) or real(*a))
    views = []
    gen = dec.generate([PROMPTS[1]], SamplingOptions(max_new_tokens=13), inspect=views.append)[0]
    assert dec.policy.counts["cycles"] >= 3 and restores == []
    assert_state_is_full_models(bb, views[-1].state, PROMPTS[1] + gen.token_ids[:-1])


@pytest.mark.parametrize("shape", ["mamba2", "mamba"])
def test_history_of_an_unwritten_pair_restores_the_row_s_unchanged_state(tiny, shape):
    """A (row, token) pair the write mask leaves out does not change its row's state; restoring the
    history at that token's position gives that row exactly the state it has."""
    bb = tiny(shape)
    state = bb.new_state(2, 16)
    hist = bb.new_history(2, 4)
    gen = torch.Generator().manual_seed(0)
    for i in range(bb.num_layers):
        for t in bb.layer_tensors(state, i):
            t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
    write = torch.tensor([[True, True], [True, False]])  # row 1 skips the second token
    step = bb.make_step(5, 2, torch.zeros(2, dtype=torch.long), write=write)
    step.shared.history = hist
    h = torch.randn(2, 2, bb.hidden_size, generator=gen)
    with torch.no_grad():
        for i in range(bb.num_layers):
            bb.forward_layer_fixed(i, h, state, step, None)
    after = [[t.clone() for t in bb.layer_tensors(state, i)] for i in range(bb.num_layers)]
    bb.restore_history(state, hist, torch.tensor([6 % 4]))  # the position of the second token
    for i in range(bb.num_layers):
        for got, want in zip(bb.layer_tensors(state, i), after[i]):
            assert torch.equal(got[1], want[1])  # row 1: unchanged by the token it skipped
            assert torch.equal(got[0], want[0])  # row 0: its state after that token


def exact_pair_distribution(bb, prompt, opts):
    """P(first two generated tokens) of the full model under `opts` (top-k sampling)."""
    from meestral.decoding.sampling import probabilities

    with torch.no_grad():
        p1 = probabilities(bb.full_logits(torch.tensor([prompt]))[:, -1], opts)[0]
        out = {}
        for t1 in torch.nonzero(p1).flatten().tolist():
            p2 = probabilities(bb.full_logits(torch.tensor([prompt + [t1]]))[:, -1], opts)[0]
            for t2 in torch.nonzero(p2).flatten().tolist():
                out[(t1, t2)] = float(p1[t1] * p2[t2])
    return out


@pytest.mark.parametrize("shape,draft_vocab", [("mistral", 0), ("mamba2", 0), ("mistral", 130)])
def test_sampling_keeps_the_full_models_distribution(tiny, shape, draft_vocab):
    """Speculative-sampling acceptance: the pairs (token 1, token 2) speculate draws are distributed
    as the full model's (the second comes from a cycle), while the drafts' own distribution is not;
    also with a trimmed draft head (drafts never propose a token beyond its rows)."""
    bb = tiny(shape)
    prompt = [1, 20, 30, 40]
    opts = SamplingOptions(max_new_tokens=3, temperature=1.0, top_k=3, seed=0)
    exact = exact_pair_distribution(bb, prompt, opts)
    dec = EarlyExitDecoder(bb, spec_config(bb, 0, 2, draft_vocab=draft_vocab))

    def tv_to_exact(n=3000):  # total variation between n sampled (token 1, token 2) pairs and `exact`
        counts = {}
        for g in dec.generate([prompt] * n, opts):
            key = tuple(g.token_ids[:2])
            counts[key] = counts.get(key, 0) + 1
        return 0.5 * sum(abs(counts.get(key, 0) / n - exact.get(key, 0.0)) for key in set(counts) | set(exact))

    tv = tv_to_exact()
    assert tv < 0.05, tv
    # The test can tell: accepting every draft gives the drafts' distribution, measurably off.
    dec.policy.inject = 1.0
    tv_wrong = tv_to_exact()
    assert tv_wrong > 0.1, tv_wrong


@pytest.mark.parametrize("shape,draft_vocab", [("mistral", 0), ("mamba2", 0), ("mamba", 0), ("mistral", 130),
                                               ("mamba2", 130)])
def test_scoring_prices_speculate_as_generation_spends_it(tiny, shape, draft_vocab):
    """Teacher-forced scoring of the model's own greedy continuation charges every token (and every
    spent draft) exactly what the decoder's cycles charged (also with a trimmed draft head, whose
    drafts the table decides from `beat`)."""
    bb = tiny(shape)
    L = bb.num_layers
    # Random Mamba-1's drafts are all accepted: a threshold makes some cycles stop drafting.
    th = median_softmax(bb, L - 2) if shape == "mamba" else 0.0
    cfg = spec_config(bb, L - 2, 3, th, draft_vocab=draft_vocab).checked(bb)
    dec = EarlyExitDecoder(bb, cfg)
    prompt = PROMPTS[1]
    gen = dec.generate([prompt], SamplingOptions(max_new_tokens=20))[0]
    assert len(gen.discarded) > 0 and any(not s.deep for s in gen.stats[1:])
    assert_scoring_prices_as_generated(bb, cfg, dec, prompt, gen)


def assert_scoring_prices_as_generated(bb, cfg, dec, prompt, gen):
    """Teacher-forced scoring of `gen` (the decoder's own greedy continuation of `prompt`) charges
    every emitted token and every spent draft what the decoder charged."""
    from meestral.evaluation.scoring import build_tables, decide

    cont = gen.token_ids
    tab = build_tables(bb, cfg.heads, [((prompt + cont)[:-1], cont)])[0]
    tab.start = len(prompt) - 1
    scored = decide(tab, cfg, dec.cost, bb.num_layers, bb)

    def key(s):
        return (s.exit_layer, s.layers_run, s.probes, s.deep, round(s.flops), round(s.weight_bytes))

    assert [key(s) for s in scored.stats] == [key(s) for s in gen.stats]
    assert sorted(key(s) for s in scored.discarded) == sorted(key(s) for s in gen.discarded)


def test_adaptive_output_equals_full_depth(tiny):
    bb = tiny("mamba2")
    L = bb.num_layers
    opts = SamplingOptions(max_new_tokens=30)
    ref = EarlyExitDecoder(bb).generate(PROMPTS, opts)
    cfg = ExitConfig(heads=ExitHeads("softmax", [1, L - 2], bb), thresholds=0.0, policy="speculate",
                     draft_tokens=4, adaptive=True)
    dec = EarlyExitDecoder(bb, cfg)
    out = [dec.generate([p], opts)[0] for p in PROMPTS]
    assert [g.token_ids for g in out] == [r.token_ids for r in ref]


def test_controller_falls_back_when_drafts_are_never_accepted():
    """Synthetic costs (no timing): a cycle costs 1 + 0.3 k full steps (its deep pass and k drafts).
    Drafts always rejected: after its probes the controller runs full-depth steps, probing ever
    more rarely."""
    c = SpeculationController([0], 4, prior=lambda j, k: 1.0 + 0.3 * k)
    choices = []
    for _ in range(200):
        ch = c.choose()
        choices.append(ch)
        if ch.k == 0:
            c.observe(ch, 10.0)
        else:
            c.observe(ch, 10.0 * (1.0 + 0.3 * ch.k), drafts_accepted=0, rejected=True)
    cycles = [i for i, ch in enumerate(choices) if ch.k]
    assert len(cycles) < 12, cycles
    assert all(ch.k == 0 for ch in choices[150:]) or len([i for i in cycles if i >= 150]) <= 1
    gaps = [b - a for a, b in zip(cycles, cycles[1:])]
    assert gaps[-1] > gaps[0]


def test_controller_speculates_when_drafts_are_accepted():
    c = SpeculationController([0, 1], 6, prior=lambda j, k: (0.2 if j == 0 else 0.4) * k + 0.7)
    for _ in range(100):
        ch = c.choose()
        if ch.k == 0:
            c.observe(ch, 10.0)
        else:  # exit point 1 is accepted 90% of the time, exit point 0 never
            a = ch.k if ch.j == 1 else 0
            c.observe(ch, 10.0 * ((0.2 if ch.j == 0 else 0.4) * ch.k + 0.7), drafts_accepted=a, rejected=a < ch.k)
    ch = c.choose()
    assert ch.j == 1 and ch.k >= 2
    assert c.rate(1, ch.k) > c.rate(None, 0)
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert isinstance(ch, Choice)


def test_controller_does_not_rank_cycles_while_it_has_fallen_back(monkeypatch):
    """During a pause full-depth steps are chosen without any estimate (the ranking runs on the
    host between device steps); a probe that pays resumes cycles at the very next step."""
    c = SpeculationController([0], 4, prior=lambda j, k: 1.0 + 0.3 * k)
    for _ in range(40):  # drafts never accepted: the controller falls back
        ch = c.choose()
        c.observe(ch, 10.0 if ch.k == 0 else 10.0 * (1.0 + 0.3 * ch.k), drafts_accepted=0, rejected=ch.k > 0)
    while c.pause == 0:  # up to the next pause
        ch = c.choose()
        c.observe(ch, 10.0 if ch.k == 0 else 13.0, drafts_accepted=0, rejected=ch.k > 0)
    ranked = []
    monkeypatch.setattr(c, "best_cycle", lambda: ranked.append(1) or SpeculationController.best_cycle(c))
    n = c.pause
    for _ in range(n):
        ch = c.choose()
        assert ch.k == 0
        c.observe(ch, 10.0)
    assert ranked == []
    probe = c.choose()
    assert probe.probe and probe.k > 0 and c.pause > 0
    c.accepted[0] = c.checked[0] = 1000  # the text changed: drafts are now accepted
    c.observe(probe, 10.0 * (1.0 + 0.3 * probe.k), drafts_accepted=probe.k, rejected=False)
    assert c.pause == 0
    nxt = c.choose()
    assert nxt.k > 0 and not nxt.probe


def _low_acceptance_run(c, steps, stall_at=(), stall_ms=1000.0):
    """Drive a controller with synthetic costs (no timing): a full-depth step takes 10 ms, a cycle
    of k drafts 10 (0.8 + 0.5 k) ms, and a cycle's first draft is accepted one time in five (a
    cycle then emits fewer tokens per ms than full depth). Steps listed in `stall_at` take
    `stall_ms` instead."""
    choices, cycles = [], 0
    for i in range(steps):
        ch = c.choose()
        choices.append(ch)
        ms = 10.0 if ch.k == 0 else 10.0 * (0.8 + 0.5 * ch.k)
        a = 0
        if ch.k:
            a, cycles = int(cycles % 5 == 4), cycles + 1
        c.observe(ch, stall_ms if i in stall_at else ms, drafts_accepted=min(a, ch.k), rejected=bool(ch.k) and a < ch.k)
    return choices


def test_controller_is_not_fooled_by_one_stalled_full_depth_step():
    """One full-depth step that stalls (a collection, a capture timed by mistake) must not make
    cycles look cheap for the rest of the generation: the controller keeps falling back. (An
    average that one stall inflates, never re-timed while cycles run, locked it into cycles.)"""
    c = SpeculationController([0], 4, prior=lambda j, k: 0.8 + 0.5 * k)
    choices = _low_acceptance_run(c, 300, stall_at=(3, 4))
    assert sum(ch.k == 0 for ch in choices[100:]) >= 190
    assert c.cost((None, 0)) == pytest.approx(10.0)


def test_controller_re_times_full_depth_while_cycles_run():
    """A full-depth cost that is wrong (here: set far too high) is measured again within
    `refresh` cycles, and the controller returns to full depth once it is."""
    c = SpeculationController([0], 4, prior=lambda j, k: 0.8 + 0.5 * k, refresh=8)
    c.observe(Choice(0, 0), 10.0)
    c.times[(None, 0)] = [500.0] * 5
    c.medians[(None, 0)] = 500.0
    choices = _low_acceptance_run(c, 200)
    assert choices[0].k > 0  # cycles look cheap against the wrong full-depth cost
    assert any(ch.k == 0 for ch in choices[:9])  # re-timed within `refresh` cycles
    assert sum(ch.k == 0 for ch in choices[100:]) >= 90
    assert c.cost((None, 0)) == pytest.approx(10.0)


def test_controller_does_not_time_a_step_that_ran_a_shape_first(tiny):
    """On the graph engine a step that meets a shape first (an eager run, a compile, a capture)
    is not taken as that step's cost: with a clock that jumps by a second in every first call,
    no timing the controller keeps includes a jump (and acceptance is still counted)."""
    from meestral.decoding import graph_engine

    bb = tiny("mistral")
    cfg = spec_config(bb, 1, 3, adaptive=True)
    dec = EarlyExitDecoder(bb, cfg, engine="graph")
    now = [0.0]

    def clock():
        now[0] += 0.001  # each reading: 1 ms later
        return now[0]

    first = graph_engine.CapturedCall.first

    def slow_first(self, *a, **kw):
        now[0] += 1.0
        return first(self, *a, **kw)

    dec.policy.timer = clock
    graph_engine.CapturedCall.first = slow_first
    try:
        ref = EarlyExitDecoder(bb).generate(PROMPTS, SamplingOptions(max_new_tokens=24))
        got = [dec.generate([p], SamplingOptions(max_new_tokens=24))[0] for p in PROMPTS]
    finally:
        graph_engine.CapturedCall.first = first
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]
    assert dec.engine.first_calls > 0
    c = dec.policy.control
    kept = [ms for t in c.times.values() for ms in t]
    assert kept and max(kept) < 100.0
    assert sum(c.checked.values()) > 0


def test_config_errors(tiny):
    bb = tiny("mistral")
    with pytest.raises(MeestralError, match="exit point"):
        ExitConfig(policy="speculate").checked(bb)
    with pytest.raises(MeestralError, match="draft_tokens"):
        spec_config(bb, 2, 99).checked(bb)
    with pytest.raises(MeestralError, match="one exit point"):
        ExitConfig(heads=ExitHeads("softmax", [1, 3], bb), policy="speculate", adaptive=False).checked(bb)
    cfg = ExitConfig.from_options(bb, exits=[2], policy="speculate")
    assert cfg.thresholds == (0.0,) and cfg.adaptive
    cfg = ExitConfig.from_options(bb, exits=[2], policy="speculate", draft_tokens="3")
    assert cfg.draft_tokens == 3 and not cfg.adaptive
    with pytest.raises(MeestralError, match="draft_tokens"):
        ExitConfig.from_options(bb, exits=[2], policy="speculate", draft_tokens="many")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "mamba2-smol"])
def test_embedded_greedy_equals_full_depth(name):
    from meestral.backbones.loading import load_backbone

    bb = load_backbone(name)
    L = bb.num_layers
    prompts = ["The capital of France is", "Once upon a time", "def add(a, b):"]
    opts = SamplingOptions(max_new_tokens=16)
    ref = EarlyExitDecoder(bb).generate(prompts, opts)
    dec = EarlyExitDecoder(bb, spec_config(bb, L // 2, 3))
    batched = dec.generate(prompts, opts)
    single = [dec.generate([p], opts)[0] for p in prompts]
    ref1 = [EarlyExitDecoder(bb).generate([p], opts)[0] for p in prompts]
    assert [g.token_ids for g in batched] == [r.token_ids for r in ref]
    assert [g.token_ids for g in single] == [r.token_ids for r in ref1]


@pytest.mark.parametrize("shape", ["mistral", "mamba2"])
def test_fixed_shape_engine_equals_eager(tiny, shape):
    """The graph engine's fixed-shape path (replayed without capture on a CPU: the same buffers and
    bodies a CUDA graph records), with the fused Mamba-2 step keeping the history, gives the
    eager engine's tokens and accounting."""
    bb = tiny(shape)
    cfg = spec_config(bb, 2, 3)
    opts = SamplingOptions(max_new_tokens=20)
    want = EarlyExitDecoder(bb, cfg, engine="eager").generate(PROMPTS, opts)
    dec = EarlyExitDecoder(bb, cfg, engine="graph")
    for _ in range(2):  # the second generation replays the calls the first one made
        got = dec.generate(PROMPTS, opts)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert [len(g.discarded) for g in got] == [len(w.discarded) for w in want]


@pytest.mark.parametrize("shape", ["mistral", "mamba2"])
def test_cycles_that_keep_k_to_the_end_equal_full_depth(tiny, shape):
    """On a capturing engine a cycle keeps its k near the end (fewer drafts would be a new shape to
    capture): the output still equals full depth, and what was drafted past the last token is
    charged as discarded work. (Run here on the eager engine told it captures.)"""
    bb = tiny(shape)
    opts = SamplingOptions(max_new_tokens=11)
    ref = EarlyExitDecoder(bb).generate(PROMPTS, opts)
    shortened = EarlyExitDecoder(bb, spec_config(bb, 2, 4), engine="eager")
    kept = EarlyExitDecoder(bb, spec_config(bb, 2, 4), engine="eager")
    kept.engine.capture = True
    ks = []
    step = kept.policy.step

    def recording(batch, o, gen):
        out = step(batch, o, gen)
        ks.append(kept.policy.last_choice.k)
        return out

    kept.policy.step = recording
    a, b = shortened.generate(PROMPTS, opts), kept.generate(PROMPTS, opts)
    assert [g.token_ids for g in a] == [g.token_ids for g in b] == [r.token_ids for r in ref]
    assert set(ks) == {4}
    assert sum(len(g.discarded) for g in b) >= sum(len(g.discarded) for g in a)


# ---- --exits auto: the calibrated draft exit point ---------------------------------------------------
def test_run_lengths_count_consecutive_matches_within_a_row():
    import numpy as np

    from meestral.evaluation.draft_exit import expected_cycle_tokens, run_lengths

    match = np.array([1, 1, 0, 1, 1, 1, 1, 0], dtype=bool)
    row = np.array([0, 0, 0, 0, 0, 1, 1, 1])  # a run never crosses into the next row
    assert run_lengths(match, row).tolist() == [2, 1, 0, 2, 1, 2, 1, 0]
    # k=1: a start with a match emits 2 tokens, one without emits 1
    assert expected_cycle_tokens(run_lengths(match, row), 1) == pytest.approx(1 + 6 / 8)
    assert expected_cycle_tokens(run_lengths(match, row), 2) == pytest.approx(1 + 9 / 8)


def test_draft_exit_prefers_the_layer_that_agrees(tiny, monkeypatch):
    """With one candidate layer agreeing with the last on every token and the others never, the
    calibration picks it and prices it by the weight-byte cycle cost."""
    import numpy as np

    from meestral.decoding.speculate import cycle_cost
    from meestral.evaluation import draft_exit, oracle

    bb = tiny("mistral")
    n = 64
    final = np.arange(n) % 7

    def fake(bb_, rows, layers, draft_vocab=None):
        argmax = np.stack([final if e == 3 else final + 1 for e in layers], 1)
        return oracle.LayerPredictions(layers=list(layers), layer_argmax=argmax, final_argmax=final,
                                       max_prob=np.ones_like(argmax, dtype=np.float32), row=np.zeros(n, dtype=int),
                                       position=np.arange(n), topk=None, in_topk=None)

    monkeypatch.setattr(oracle, "layer_predictions", fake)
    out = draft_exit.choose_draft_exit(bb, torch.zeros(1, n, dtype=torch.long), layers=[1, 2, 3, 4], max_k=4)
    assert out["exit"] == 3 and out["agreement"] == 1.0
    # every draft accepted: k=4 emits min(run, 4) + 1 tokens (the last 4 starts have shorter runs)
    assert out["speedup"] == pytest.approx(out["tokens"] / cycle_cost(bb, 3, out["k"]))
    never = [r for r in out["table"] if r["exit"] != 3]
    assert all(r["agreement"] == 0 and r["tokens"] == 1 and r["k"] == 1 for r in never)


def test_draft_exit_with_a_trimmed_head_counts_its_argmax(tiny):
    """With draft_vocab, the calibration's draft is the argmax over the LM head's first N rows."""
    from meestral.evaluation.oracle import layer_predictions

    bb = tiny("mistral")
    ids = torch.randint(1, bb.vocab_size, (2, 24))
    full = layer_predictions(bb, ids, [2, 3])
    trimmed = layer_predictions(bb, ids, [2, 3], draft_vocab=100)
    assert (trimmed.layer_argmax < 100).all() and (full.layer_argmax >= 100).any()
    inside = full.layer_argmax < 100  # where the full argmax lies in the rows, the trimmed one is it
    assert (trimmed.layer_argmax[inside] == full.layer_argmax[inside]).all()


def test_exits_auto_calibrates_for_speculate_only(tiny):
    from meestral.evaluation.draft_exit import candidate_layers

    bb = tiny("llama")
    cfg = ExitConfig.from_options(bb, exits="auto", policy="speculate")
    assert cfg.exit_points[0] in candidate_layers(bb.num_layers)
    with pytest.raises(MeestralError, match="exits=auto picks the draft exit point of --policy speculate"):
        ExitConfig.from_options(bb, exits="auto", policy="copy")


# ---- a trimmed draft head (draft_vocab) -----------------------------------------------------------
@pytest.mark.parametrize("shape", ["mistral", "mamba2", "mamba"])
def test_trimmed_draft_head_keeps_full_depth_output(tiny, shape):
    """Drafts from the LM head's first N rows: greedy output is still full depth's, batch 1 and 3;
    drafts are accepted where the full model's token lies in those rows, and every draft step is
    charged N/V of the head (no confidence probe at threshold 0)."""
    bb = tiny(shape)
    L, V = bb.num_layers, bb.vocab_size
    N = V // 2
    opts = SamplingOptions(max_new_tokens=24)
    ref = EarlyExitDecoder(bb).generate(PROMPTS, opts)
    dec = EarlyExitDecoder(bb, spec_config(bb, L - 2, 3, draft_vocab=N))
    assert [g.token_ids for g in dec.generate(PROMPTS, opts)] == [r.token_ids for r in ref]
    single = [dec.generate([p], opts)[0] for p in PROMPTS]
    assert [g.token_ids for g in single] == [r.token_ids for r in ref]
    drafts = [s for g in single for s in g.stats[1:] if not s.deep]
    assert drafts and all(t < N for g, r in zip(single, ref) for t, s in zip(g.token_ids, g.stats) if not s.deep)
    full_head = EarlyExitDecoder(bb, spec_config(bb, L - 2, 3))
    one = full_head.generate([PROMPTS[0]], opts)[0]
    untrimmed = [s for s in one.stats[1:] if not s.deep]
    trimmed = [s for s in single[0].stats[1:] if not s.deep]
    if untrimmed and trimmed:  # a draft step reads N/V of the head instead of all of it (softmax probe)
        head = dec.cost.head_params * dec.cost.bytes_per_param
        assert untrimmed[0].weight_bytes - trimmed[0].weight_bytes == pytest.approx(head * (1 - N / V))
        assert trimmed[0].probes == 0


def test_draft_logits_are_the_first_rows_of_the_logit_lens(tiny):
    from meestral.evaluation.scoring import first_winner

    bb = tiny("llama")
    h = torch.randn(5, bb.hidden_size)
    assert torch.allclose(bb.draft_logits(h, 100), bb.logits(h)[:, :100], atol=1e-5)
    lg = torch.tensor([[1.0, 3.0, 2.0, 3.0], [5.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 2.0]])
    # row 0: f=3 is beaten by id 1 (equal logit, smaller id); row 1: f=0 beaten by none; row 2: f=2
    # beaten by id 1 (equal, smaller) and id 3 (higher): the smallest is 1
    assert first_winner(lg, torch.tensor([3, 0, 2])).tolist() == [1, 4, 1]


def test_draft_vocab_errors(tiny):
    bb = tiny("mistral")
    with pytest.raises(MeestralError, match="draft_vocab trims speculate"):
        ExitConfig.from_options(bb, exits=[2], policy="copy", draft_vocab=10)
    with pytest.raises(MeestralError, match="draft_vocab 999 out of range"):
        ExitConfig.from_options(bb, exits=[2], policy="speculate", draft_vocab=999)
    with pytest.raises(MeestralError, match="reads the whole LM head"):
        ExitConfig.from_options(bb, exits=[2], policy="speculate", threshold=0.5, draft_vocab=10)
    cfg = ExitConfig.from_options(bb, exits=[2], policy="speculate", head="saturation", threshold=0.5, draft_vocab=10)
    assert cfg.draft_vocab == 10
    assert ExitConfig.from_options(bb, exits=[2], policy="speculate", draft_vocab=bb.vocab_size).draft_vocab == 0


def test_report_states_speculates_draft_acceptance():
    """A sweep row of `speculate` shows its draft acceptance in the report's table (as verify's)."""
    from meestral.report.render import _acceptance

    row = {"config": {"policy": "speculate"}, "draft_acceptance": 0.625, "rolled_back": 3}
    assert _acceptance(row) == "0.625 (3 rolled back)"
    assert _acceptance({"config": {"policy": "copy"}, "draft_acceptance": 0.5}) == "—"


@pytest.mark.parametrize("shape,exits", [("mistral", "mid"), ("mamba2", "two")])
def test_scoring_prices_the_controller_as_it_runs_on_a_byte_clock(tiny, shape, exits):
    """Adaptive speculate: teacher-forced scoring replays the controller fed each step's weight-byte
    cost; a decoder whose controller is fed the same clock charges exactly the same per token, and
    both fall back to full-depth steps where drafts are rarely accepted."""
    bb = tiny(shape)
    L = bb.num_layers
    points = [L // 2] if exits == "mid" else [1, L - 2]
    cfg = ExitConfig(heads=ExitHeads("softmax", points, bb), thresholds=0.0, policy="speculate", draft_tokens=4,
                     adaptive=True).checked(bb)
    dec = EarlyExitDecoder(bb, cfg)
    dec.policy.clock = "bytes"
    prompt = PROMPTS[1]
    gen = dec.generate([prompt], SamplingOptions(max_new_tokens=40))[0]
    assert_scoring_prices_as_generated(bb, cfg, dec, prompt, gen)
    c = dec.policy.counts
    assert c["full_steps"] > 0 and c["cycles"] > 0  # it measured both, and chose between them


SPECULATE_BAD = {
    "k_out_of_range": (["--exits", "2", "--draft-tokens", "99"], ["draft_tokens 99 out of range", "1 to 16"]),
    "k_not_a_number": (["--exits", "2", "--draft-tokens", "many"], ["draft_tokens='many'", "'auto'"]),
    "fixed_k_two_exits": (["--exits", "1,3", "--draft-tokens", "3"], ["one exit point", "--draft-tokens auto"]),
    "vocab_out_of_range": (["--exits", "2", "--draft-vocab", "999"], ["draft_vocab 999 out of range", "1 to 259"]),
    "vocab_with_softmax_threshold": (["--exits", "2", "--threshold", "0.5", "--draft-vocab", "10"],
                                     ["reads the whole LM head", "threshold 0"]),
}


@pytest.mark.parametrize("case", sorted(SPECULATE_BAD))
def test_speculate_bad_input_is_one_line(case, capsys):
    from meestral.cli.main import main
    from test_cli import assert_one_line_error

    argv, words = SPECULATE_BAD[case]
    rc = main(["generate", "hello", "--backbone", "random:mistral", "--policy", "speculate", *argv])
    out, err = capsys.readouterr()
    assert_one_line_error(rc, out, err, words)


def test_exits_auto_and_inject_bad_input_is_one_line(capsys):
    from meestral.cli.main import main
    from test_cli import assert_one_line_error

    rc = main(["generate", "hello", "--backbone", "random:mistral", "--exits", "auto"])
    assert_one_line_error(rc, *capsys.readouterr(), ["exits=auto", "--policy speculate"])
    rc = main(["bench", "--backbone", "random:mistral", "--policies", "speculate", "--inject", "1.5"])
    assert_one_line_error(rc, *capsys.readouterr(), ["--inject", "1.5", "[0, 1]"])
