"""Full-depth steps in chunks (decoding/full_chunk.py): the same tokens, accounting and state as
one step at a time, on every architecture, batch 1 and 3, eager and fixed-shape engines (chunking
turned on where a CUDA engine would have it), rows that end inside a chunk, and speculate's
fallback."""

import dataclasses

import pytest

from meestral.decoding.config import ExitConfig
from meestral.decoding.decoder import EarlyExitDecoder
from meestral.decoding.full_chunk import chunk_length
from meestral.decoding.heads import ExitHeads
from meestral.decoding.sampling import SamplingOptions

ARCHS = ["mistral", "llama", "mamba2", "mamba", "mistral-sw"]
PROMPTS = [[1, 20, 30, 40], [1, 50, 60, 70, 80, 90, 100], [1, 7, 8]]


def chunked(bb, engine, config=None, device_exits=False):
    dec = EarlyExitDecoder(bb, config, engine=engine)
    dec.engine.chunk_steps = True
    dec.engine.decides_on_device = device_exits  # as a capturing engine that can branch in its graphs
    sizes = []
    step = dec.policy.step

    def recording(batch, opts, gen):  # tokens per row each step emitted
        out, logits = step(batch, opts, gen)
        first = next(o for o in out if o is not None)
        sizes.append(len(first) if isinstance(first, list) else 1)
        return out, logits

    dec.policy.step = recording
    return dec, sizes


def test_chunk_lengths_are_powers_of_two_within_the_limit():
    assert [chunk_length(n) for n in (0, 1, 2, 3, 5, 7, 8, 9, 100)] == [1, 1, 2, 2, 4, 4, 8, 8, 8]
    assert chunk_length(100, most=4) == 4


@pytest.mark.parametrize("engine", ["eager", "graph"])
@pytest.mark.parametrize("shape", ARCHS)
def test_chunked_full_depth_equals_one_step_at_a_time(tiny, shape, engine):
    bb = tiny(shape)
    opts = SamplingOptions(max_new_tokens=14)  # 13 after the prefill's: chunks of 8, 4, 1
    ref_dec = EarlyExitDecoder(bb, engine="eager")
    dec, sizes = chunked(bb, engine)
    for prompts in (PROMPTS[:1], PROMPTS):
        ref = ref_dec.generate(prompts, opts)
        sizes.clear()
        got = dec.generate(prompts, opts)
        assert sizes == [8, 4, 1]
        assert [g.token_ids for g in got] == [r.token_ids for r in ref]
        for g, r in zip(got, ref):
            a, b = dec.summary(g), ref_dec.summary(r)
            for k in ("tokens", "mean_layers_run", "weight_bytes_per_token", "flops_per_token", "deep_passes_per_token"):
                assert a[k] == pytest.approx(b[k]), k
            assert g.discarded == [] and g.finish_reason == r.finish_reason == "length"


@pytest.mark.parametrize("shape", ["mistral", "mamba2"])
def test_a_row_that_ends_inside_a_chunk_stops_there_and_the_rest_is_spent(tiny, shape, monkeypatch):
    bb = tiny(shape)
    opts = SamplingOptions(max_new_tokens=14)
    ref = EarlyExitDecoder(bb, engine="eager").generate(PROMPTS[1:2], opts)[0].token_ids
    eos = ref[4]  # emitted by the first chunk's 4th step (the prefill made ref[0])
    assert eos not in ref[:4]
    monkeypatch.setattr(bb.tokenizer, "eos_ids", {eos})
    want = EarlyExitDecoder(bb, engine="eager").generate(PROMPTS[1:2], opts)[0]
    dec, sizes = chunked(bb, "graph")
    got = dec.generate(PROMPTS[1:2], opts)[0]
    assert got.token_ids == want.token_ids == ref[:5] and got.finish_reason == "eos"
    assert sizes == [8] and len(got.discarded) == 4  # the chunk's steps after the end: spent
    assert want.discarded == []


@pytest.mark.parametrize("shape", ["mistral", "mamba2", "mamba"])
def test_state_after_chunks_is_the_full_models(tiny, shape):
    from test_catchup import assert_state_is_full_models

    bb = tiny(shape)
    dec, sizes = chunked(bb, "graph")
    views = []
    gen = dec.generate([PROMPTS[1]], SamplingOptions(max_new_tokens=13), inspect=views.append)[0]
    assert sizes == [8, 4]
    # the newest token is fed by the next step, not yet run
    assert_state_is_full_models(bb, views[-1].state, PROMPTS[1] + gen.token_ids[:-1])


def test_sampling_and_exits_are_not_chunked(tiny):
    bb = tiny("mistral")
    dec, sizes = chunked(bb, "eager")
    dec.generate(PROMPTS[:1], SamplingOptions(max_new_tokens=6, temperature=0.8, seed=1))
    assert set(sizes) == {1}
    heads = ExitHeads("softmax", [1], bb)
    dec, sizes = chunked(bb, "eager", ExitConfig(heads=heads, thresholds=0.5))
    dec.generate(PROMPTS[:1], SamplingOptions(max_new_tokens=6))
    assert set(sizes) == {1}


@pytest.mark.parametrize("shape", ["mistral", "mamba2"])
def test_speculate_falls_back_in_chunks_and_equals_full_depth(tiny, shape):
    """The controller on drafts that are never accepted (injected 0): its full-depth fallback runs
    its pauses in chunks, the output is full depth's, batch 1 and 3, and every full-depth token is
    counted."""
    bb = tiny(shape)
    cfg = ExitConfig(heads=ExitHeads("softmax", [1], bb), thresholds=0.0, policy="speculate", draft_tokens=4,
                     adaptive=True)
    opts = SamplingOptions(max_new_tokens=60)
    for prompts in (PROMPTS[:1], PROMPTS):
        ref = EarlyExitDecoder(bb).generate(prompts, opts)
        dec = EarlyExitDecoder(bb, cfg, engine="graph")
        dec.engine.chunk_steps = True
        dec.policy.clock = "bytes"  # deterministic costs: at acceptance 0 no cycle pays
        dec.policy.inject = 0.0
        rec, step = [], dec.policy.step

        def recording(batch, o, gen):
            out, logits = step(batch, o, gen)
            first = next(x for x in out if x is not None)
            rec.append((dec.policy.last_choice.k, len(first) if isinstance(first, list) else 1))
            return out, logits

        dec.policy.step = recording
        got = dec.generate(prompts, opts)
        assert [g.token_ids for g in got] == [r.token_ids for r in ref]
        full = [n for k, n in rec if k == 0]
        assert max(full) == 8 and sum(full) == dec.policy.counts["full_steps"] > len(full)
        assert dec.policy.counts["cycles"] == sum(1 for k, _ in rec if k)


SUMMARY_KEYS = ("tokens", "mean_layers_run", "weight_bytes_per_token", "flops_per_token", "exit_rate",
                "mean_exit_layer", "mean_probes", "deep_passes_per_token", "caught_up_per_token")


def assert_chunks_equal_one_step(bb, cfg, opts, want_sizes, label, device_exits=False):
    """cfg's decoder with chunking on (graph engine) against the same configuration one step at a
    time (eager), batch 1 and 3: chunk sizes, tokens, accounting and every layer's state.
    Returns the two decoders."""
    from test_graph_engine import assert_states_equal, layer_states

    ref_dec = EarlyExitDecoder(bb, cfg, engine="eager")
    dec, sizes = chunked(bb, "graph", cfg, device_exits)
    for prompts in (PROMPTS[:1], PROMPTS):
        states = {}
        ref = ref_dec.generate(prompts, opts, inspect=lambda v: states.__setitem__("ref", layer_states(bb, v.state)))
        sizes.clear()
        got = dec.generate(prompts, opts, inspect=lambda v: states.__setitem__("got", layer_states(bb, v.state)))
        assert sizes == want_sizes, label
        assert [g.token_ids for g in got] == [r.token_ids for r in ref], label
        for g, r in zip(got, ref):
            a, b = dec.summary(g), ref_dec.summary(r)
            for k in SUMMARY_KEYS:
                assert a[k] == pytest.approx(b[k]), (k, label)
        assert_states_equal(bb, states["ref"], states["got"], 1e-5)
    return dec, ref_dec


STATIC_CASES = [  # (exit points as fractions of depth, thresholds, exit output, steps per chunk)
    ((1 / 3,), 0.5, "hidden", [8, 4, 1]),  # every token leaves at the one exit point
    ((1 / 4, 1 / 2), [1.0, 0.3], "hidden", [8, 4, 1]),  # the first threshold cannot be passed: the second point
    ((1 / 4, 1 / 2), 0.3, "hidden", [8, 4, 1]),  # the first of two: the second head is never asked
    ((1 / 3,), 0.5, "through_last_layer", [8, 4, 1]),
    ((1 / 4, 1 / 2), 1.0, "hidden", [8, 4, 1]),  # no token ever leaves, every head is still asked
]


@pytest.mark.parametrize("policy", ["copy", "propagate"])
@pytest.mark.parametrize("shape", ARCHS)
def test_static_exits_run_in_chunks_equal_to_one_step_at_a_time(tiny, shape, policy):
    """The static exit-at-layer baseline under copy/propagate: its exit decision is known before
    a step runs, so its steps run in chunks; tokens, accounting (layers, probes, bytes) and every
    layer's state equal the same configuration one step at a time, batch 1 and 3."""
    bb = tiny(shape)
    L = bb.num_layers
    opts = SamplingOptions(max_new_tokens=14)
    for fractions, thr, output, want_sizes in STATIC_CASES:
        points = sorted({max(0, min(L - 2, int(f * L))) for f in fractions})
        if len(points) < len(fractions):
            continue
        cfg = ExitConfig(heads=ExitHeads("static", points, bb), thresholds=thr, policy=policy, exit_output=output)
        assert_chunks_equal_one_step(bb, cfg, opts, want_sizes, (points, thr, output))


def test_static_exits_leave_at_the_first_threshold_below_one(tiny):
    bb = tiny("mistral")
    L = bb.num_layers
    for thr, known in ((0.0, 0), ([1.0, 0.2], 1), (1.0, 2)):
        cfg = ExitConfig(heads=ExitHeads("static", [0, L // 2], bb), thresholds=thr, policy="copy")
        assert EarlyExitDecoder(bb, cfg).policy.known == known
    soft = ExitConfig(heads=ExitHeads("softmax", [0], bb), thresholds=0.0, policy="copy")
    assert EarlyExitDecoder(bb, soft).policy.known is None  # depends on the data: read back per step


@pytest.mark.parametrize("shape", ARCHS)
def test_static_catchup_runs_whole_cycles_equal_to_one_step_at_a_time(tiny, shape):
    """Catch-up under static exits: every token leaves at the known exit point until the backlog
    is full, then one goes deep, so a whole cycle (max_backlog exits and the deep pass) runs as one
    device run. Tokens, accounting (layers, positions run, deep passes) and every layer's state
    equal one step at a time, batch 1 and 3; the steps after the last whole cycle run one by one."""
    bb = tiny(shape)
    L = bb.num_layers
    opts = SamplingOptions(max_new_tokens=14)  # 13 steps: two cycles of 5, then 3 single steps
    for points, thr in (([L // 3], 0.5), ([0, L // 2], [1.0, 0.2])):
        cfg = ExitConfig(heads=ExitHeads("static", points, bb), thresholds=thr, policy="catchup", max_backlog=4)
        dec, ref_dec = assert_chunks_equal_one_step(bb, cfg, opts, [5, 5, 1, 1, 1], points)
        # a second generation on the same engine reuses the captured cycle and the backlog's buffers
        again = dec.generate(PROMPTS, opts)
        assert [g.token_ids for g in again] == [r.token_ids for r in ref_dec.generate(PROMPTS, opts)]


def test_catchup_cycles_only_where_decisions_are_known(tiny):
    bb = tiny("mistral")
    for heads, thr in ((ExitHeads("softmax", [1], bb), 0.0), (ExitHeads("static", [1], bb), 1.0)):
        dec, sizes = chunked(bb, "eager", ExitConfig(heads=heads, thresholds=thr, policy="catchup"))
        dec.generate(PROMPTS[:1], SamplingOptions(max_new_tokens=12))
        assert set(sizes) == {1}
    dec, sizes = chunked(bb, "eager", ExitConfig(heads=ExitHeads("static", [1], bb), thresholds=0.5, policy="verify"))
    dec.generate(PROMPTS[:1], SamplingOptions(max_new_tokens=12))
    assert all(s == 1 for s in sizes)


@pytest.mark.parametrize("shape", ["mistral", "mamba2"])
def test_catchup_cycles_of_a_later_generation_on_the_same_state_use_its_backlog(tiny, shape):
    """Catch-up's cycles, captured once per state, close over the backlog's buffers: a second
    generation of another length that shares the (rounded) state must find the same buffers, so
    its tokens equal a fresh decoder's. (Buffers sized by the first generation's length made the
    second read its predecessor's backlog and index past it: seen in the kernel profile of
    2026-12-06, a warm-up of 8 tokens then 128.)"""
    bb = tiny(shape)
    cfg = ExitConfig(heads=ExitHeads("static", [1], bb), thresholds=0.0, policy="catchup", max_backlog=2)
    dec, sizes = chunked(bb, "graph", cfg)
    short, long = SamplingOptions(max_new_tokens=5), SamplingOptions(max_new_tokens=14)
    assert dec.engine.state_capacity(len(PROMPTS[1]) + 5) == dec.engine.state_capacity(len(PROMPTS[1]) + 14)
    dec.generate([PROMPTS[1]], short)
    got = dec.generate([PROMPTS[1]], long)[0]
    fresh, _ = chunked(bb, "graph", cfg)
    want = fresh.generate([PROMPTS[1]], long)[0]
    assert 3 in sizes  # the second generation ran in cycles
    assert got.token_ids == want.token_ids and got.exit_layers == want.exit_layers


def _mixed_threshold(bb, heads, policy, output):
    """A threshold at which some tokens of the prompts leave early and some do not (one step at
    a time, host decisions; found by bisection: the exit rate falls as the threshold rises), so
    that the exit decisions differ from step to step inside a chunk."""
    opts = SamplingOptions(max_new_tokens=14)
    lo, hi = 0.0, 1.0
    for _ in range(16):
        thr = (lo + hi) / 2
        cfg = ExitConfig(heads=heads, thresholds=thr, policy=policy, exit_output=output)
        dec = EarlyExitDecoder(bb, cfg, engine="eager")
        rates = [dec.summary(g)["exit_rate"] for g in dec.generate(PROMPTS, opts)]
        rate = sum(rates) / len(rates)
        if 0.15 < rate < 0.85:
            return cfg
        lo, hi = (thr, hi) if rate >= 0.85 else (lo, thr)
    return None


DEVICE_CASES = [  # (head kind, exit points as fractions of depth, exit output)
    ("softmax", (1 / 3,), "hidden"),  # probe logits: rows that leave take them
    ("saturation", (1 / 4, 1 / 2), "hidden"),  # no probe: the LM head reads the exit state
    ("softmax", (1 / 4, 1 / 2), "through_last_layer"),
]


@pytest.mark.parametrize("shape", ["mistral", "mamba2", "mamba", "llama"])
def test_data_dependent_exits_decided_on_the_device_equal_one_step_at_a_time(tiny, shape):
    """Softmax / saturation heads under copy, their exit decisions taken on the device
    (`engine.when`, slot_policies.forward_device; on a capturing CUDA engine graph branches):
    steps run in chunks, and tokens, accounting (exit layers, probes, layers run, bytes) and every
    layer's state equal host decisions one step at a time, batch 1 and 3, at a threshold where
    some tokens leave and some do not. The uncaptured graph engine runs every branch whatever the
    decision (as before a capture), so a branch not taken that changed anything fails this too.
    Without device decisions, and under propagate, the same configuration runs one step at a
    time."""
    bb = tiny(shape)
    L = bb.num_layers
    opts = SamplingOptions(max_new_tokens=14)
    tried = 0
    for kind, fractions, output in DEVICE_CASES:
        points = sorted({max(0, min(L - 2, int(f * L))) for f in fractions})
        cfg = _mixed_threshold(bb, ExitHeads(kind, points, bb), "copy", output)
        if cfg is None:
            continue
        tried += 1
        dec, ref_dec = assert_chunks_equal_one_step(bb, cfg, opts, [8, 4, 1], (kind, points, output), True)
        got = dec.generate(PROMPTS, opts)  # again: the captured chunks replayed
        ref = ref_dec.generate(PROMPTS, opts)
        assert [g.exit_layers for g in got] == [r.exit_layers for r in ref]
        assert len({e for g in got for e in g.exit_layers}) > 1  # the decisions differ within the chunks
        for host in (chunked(bb, "graph", cfg), chunked(bb, "graph", dataclasses.replace(cfg, policy="propagate"), True)):
            host[0].generate(PROMPTS[:1], opts)
            assert set(host[1]) == {1}
    assert tried >= 2


def test_a_failed_branch_capture_hands_the_decisions_back_to_the_host(tiny, capsys):
    """Where a chunk with device decisions could not be captured (it then ran eagerly, every
    segment masked: right, but skipping nothing), later steps take host decisions, one step at a
    time, with one line saying so; the tokens stay those of host decisions throughout."""
    bb = tiny("mistral")
    L = bb.num_layers
    cfg = _mixed_threshold(bb, ExitHeads("softmax", [L // 3], bb), "copy", "hidden")
    opts = SamplingOptions(max_new_tokens=14)
    ref = EarlyExitDecoder(bb, cfg, engine="eager").generate(PROMPTS, opts)
    dec, sizes = chunked(bb, "graph", cfg, device_exits=True)
    eng, sequence = dec.engine, dec.engine.sequence

    def failing(key, *args, **kwargs):  # as GraphEngine._call counts a capture that failed
        out = sequence(key, *args, **kwargs)
        if "device-exits" in key:
            eng.failed_captures += 1
        return out

    eng.sequence = failing
    got = dec.generate(PROMPTS, opts)
    assert sizes == [8] + [1] * 5 and not eng.decides_on_device
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]
    assert [g.exit_layers for g in got] == [r.exit_layers for r in ref]
    assert "decided on the host from here on" in capsys.readouterr().err
