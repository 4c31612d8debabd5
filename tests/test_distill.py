"""Distillation pieces: the KD loss, row packing, the cached sampler (= HF greedy at ~0 temperature)
and, on the real teacher, a short run that checkpoints, resumes and exports."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from meestral.training.kd import kd_loss
from meestral.training.row_pool import RowPool
from meestral.training.teacher_text import sample_batch


def test_kd_loss_is_kl_plus_weighted_ce():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    loss, kl, ce = kd_loss(s, t, y, 0.3)
    ref_kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1).mean()
    torch.testing.assert_close(kl, ref_kl)
    torch.testing.assert_close(ce, F.cross_entropy(s.reshape(-1, 11), y.reshape(-1)))
    torch.testing.assert_close(loss, kl + 0.3 * ce)
    assert float(kd_loss(t, t, y, 0.0)[1]) < 1e-6  # no divergence from itself


def test_row_pool_packs_shards_with_separators(tmp_path):
    torch.save({"docs": [torch.tensor([5, 6, 7], dtype=torch.int32), torch.tensor([8, 9, 2], dtype=torch.int32)]},
               tmp_path / "shard-000-00000.pt")
    pool = RowPool(str(tmp_path), None, seq_len=3, eos=2, corpus_share=0.0, seed=0)
    assert pool.refresh() == 2 and pool.refresh() == 0  # a shard is read once
    assert pool.rows.tolist() == [[5, 6, 7], [2, 8, 9]]  # EOS added after a doc lacking it, not doubled
    torch.save({"docs": [torch.tensor([3, 3, 3, 3], dtype=torch.int32)]}, tmp_path / "shard-000-00001.pt")
    assert pool.refresh() == 2 and pool.rows.tolist()[2:] == [[2, 3, 3], [3, 3, 2]]  # the leftover carries over
    corpus = torch.full((4, 3), 1, dtype=torch.int32)
    mixed = RowPool(str(tmp_path), corpus, seq_len=3, eos=2, corpus_share=0.5, seed=0)
    mixed.refresh()
    b = mixed.batch(8)
    assert int((b == 1).all(-1).sum()) == 4  # half the rows from the corpus


@pytest.fixture(scope="module")
def llama():
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=256)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    m.config._attn_implementation = "sdpa"
    return m


def test_sampler_at_low_temperature_is_hf_greedy_on_left_padded_prompts(llama):
    inp = torch.tensor([[0, 0, 5, 6, 7], [9, 8, 7, 6, 5]])
    att = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    got = sample_batch(llama, inp, att, 12, 1e-6, 97, [-1], 0)
    for r in range(2):
        ids = inp[r, att[r].bool()][None]
        ref = llama.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
                             eos_token_id=None)[0, ids.shape[1]:]
        # Compare up to the first near-tie of the reference's top two logits: padding changes the
        # arithmetic by ~1e-7, which may flip a tie, and everything after a flip differs.
        lg = llama(torch.cat([ids[0], ref])[None]).logits[0, ids.shape[1] - 1:-1]
        top2 = lg.topk(2).values
        n = next((i for i, gap in enumerate((top2[:, 0] - top2[:, 1]).tolist()) if gap < 1e-4), 12)
        assert n >= 6 and got[r, :n].tolist() == ref[:n].tolist()


def test_sampler_with_a_static_cache_draws_what_the_dynamic_cache_draws(llama):
    """The fixed-size K/V cache (the default for an attention teacher) against HF's DynamicCache:
    the same samples from the same seed on left-padded prompts of different lengths, rows ending
    at an EOS on the way; a cache that dropped or misplaced a step's K/V would change them."""
    from meestral.training.teacher_text import _static_cache_fits

    assert _static_cache_fits(llama)
    inp = torch.tensor([[0, 0, 5, 6, 7], [9, 8, 7, 6, 5], [0, 0, 0, 0, 4]])
    att = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    outs = {}
    for static in (True, False):
        torch.manual_seed(3)
        outs[static] = sample_batch(llama, inp, att, 24, 1.0, 20, [11, 12], 0, static_cache=static)
    assert torch.equal(outs[True], outs[False])
    assert len(set(map(tuple, outs[True].tolist()))) == 3  # sampled, not one row copied
    torch.manual_seed(3)
    other = sample_batch(llama, inp, att, 24, 1.0, 20, [11, 12], 0, static_cache=True)
    assert torch.equal(other, outs[True])


def test_packed_attention_gives_sdpa_s_decode_logits_and_samples(llama, monkeypatch):
    """The teacher's packed attention (training/teacher_attention.py: the query heads sharing a K/V
    head as query positions of it, no repeated K/V) against HF's sdpa on left-padded prompts: the
    same logits at every decode step, static and dynamic caches, and the same samples; its
    one-token branch runs (the spy sees queries of H / Hkv positions per K/V head), and a variant
    pairing query heads with the wrong K/V heads is caught."""
    from meestral.training import teacher_attention as ta

    inp = torch.tensor([[0, 0, 5, 6, 7], [9, 8, 7, 6, 5], [0, 0, 0, 0, 4]])
    att = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    packed = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, *a, **kw):
        packed.append(q.shape[1:3] == (2, 2) and k.shape[1] == 2)
        return real(q, k, *a, **kw)

    monkeypatch.setattr(ta.F, "scaled_dot_product_attention", spy)

    def decode_logits():
        """The logits of 6 greedy decode steps after the prompts, with a static cache."""
        import inspect

        from transformers import StaticCache

        cache = StaticCache(config=llama.config, max_cache_len=12)
        kw = "cache" if "cache" in inspect.signature(type(llama).forward).parameters else "past_key_values"
        full = torch.cat([att, att.new_ones(3, 6)], 1)
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        out = [llama(input_ids=inp, attention_mask=att, position_ids=pos, **{kw: cache},
                     cache_position=torch.arange(5), use_cache=True).logits[:, -1]]
        pos = pos[:, -1:]
        for t in range(5):
            pos = pos + 1
            out.append(llama(input_ids=out[-1].argmax(-1, keepdim=True), attention_mask=full[:, :6 + t],
                             position_ids=pos, **{kw: cache}, cache_position=torch.tensor([5 + t]),
                             use_cache=True).logits[:, -1])
        return torch.stack(out, 1)

    results = {}
    try:
        for on in (False, True):
            assert ta.use(llama, on) == on
            with torch.no_grad():
                results[on] = decode_logits()
            for static in (True, False):
                torch.manual_seed(3)
                results[on, static] = sample_batch(llama, inp, att, 24, 1.0, 20, [11, 12], 0, static_cache=static)
        assert any(packed) and llama.config._attn_implementation == ta.NAME
        torch.testing.assert_close(results[True], results[False], atol=1e-5, rtol=1e-5)
        for static in (True, False):
            assert torch.equal(results[True, static], results[False, static])

        def crossed(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
            """query head h on K/V head h % Hkv instead of h // r"""
            B, H, q, d = query.shape
            if q != 1:
                return ta.sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                                 scaling=scaling, **kw)
            qx = query.reshape(B, H // 2, 2, d).transpose(1, 2)
            out = real(qx, key, value, attn_mask=attention_mask, scale=scaling).transpose(1, 2)
            return out.reshape(B, 1, H, d), None

        monkeypatch.setattr(ta, "packed_gqa_attention", crossed)
        ta.register()
        with torch.no_grad():
            assert not torch.allclose(decode_logits(), results[False], atol=1e-3)
    finally:
        monkeypatch.undo()
        ta.register()
        ta.use(llama, False)
    assert llama.config._attn_implementation == "sdpa"


def test_sampler_pads_after_eos(llama):
    inp = torch.tensor([[5, 6, 7], [9, 8, 7]])
    out = sample_batch(llama, inp, torch.ones_like(inp), 40, 1.0, 20, list(range(97)), pad=3)
    assert (out[:, 1:] == 3).all()  # every token is an EOS: one token a row, then padding
    assert out.shape[1] == 40  # the finished check stops sampling, the width stays


def test_sampler_runs_one_forward_per_token(llama):
    """The prompt pass gives the first token and each later token one step: n tokens, n forwards
    (not one more after the last token)."""
    calls = []
    hook = llama.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        out = sample_batch(llama, torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long), 9, 1.0, 20, [-1], 0)
    finally:
        hook.remove()
    assert out.shape == (1, 9) and len(calls) == 9


@pytest.mark.slow
def test_short_run_checkpoints_resumes_and_exports(tmp_path):
    from meestral.training.distill import DistillConfig, distill, export
    from meestral.training.teacher_text import sample_teacher
    from meestral.backbones.quantized import model_from_gguf

    data = tmp_path / "data"
    assert sample_teacher("smollm2", str(data), batch=2, max_new_tokens=8, shards=1, device="cpu", log=lambda *_: None) == 1
    shape = dict(hidden_size=64, num_hidden_layers=2, state_size=16, chunk_size=16)
    cfg = DistillConfig(data=str(data), out=str(tmp_path / "run"), shape=shape, steps=3, batch=2, seq_len=32,
                        eval_every=100, ckpt_every=2, heldout_tokens=256, device="cpu", min_rows=1, warmup=2)
    distill(cfg, log=lambda *_: None)
    cfg.steps = 5
    last = distill(cfg, log=lambda *_: None)
    log = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == [3, 5]  # the second run continued at step 3, not from zero
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 5
    q = model_from_gguf(tmp_path / "run" / "mamba2-smol.gguf")
    assert q.config.num_hidden_layers == 2 and q.config.vocab_size == 49152
    assert abs(last["heldout_ppl_q8_0"] - last["heldout_ppl_float"]) < 0.05 * last["heldout_ppl_float"]
    again = export(cfg, log=lambda *_: None)
    assert again["heldout_ppl_float"] == pytest.approx(last["heldout_ppl_float"], rel=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_chunked_loss_equals_the_whole_batch_loss(fused, monkeypatch):
    """A few rows at a time, through checkpointed autograd or with the gradient taken in the
    forward pass (kd.FUSED_GRAD), the loss and its gradients equal the whole batch's."""
    from meestral.training import kd
    from meestral.training.kd import chunked_kd_loss

    monkeypatch.setattr(kd, "FUSED_GRAD", fused)
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 13, bias=False)
    h = torch.randn(5, 4, 8, requires_grad=True)
    t = torch.randn(5, 4, 13)
    y = torch.randint(0, 13, (5, 4))
    whole = kd_loss(head(h), t, y, 0.2)
    whole[0].backward()
    gh, gw = h.grad.clone(), head.weight.grad.clone()
    h.grad, head.weight.grad = None, None
    parts = chunked_kd_loss(head, h, t, y, 0.2, rows=2)  # chunks of 2, 2 and 1 rows
    assert parts[1].requires_grad is not fused  # the fused path ran: it reports kl without a gradient
    for a, b in zip(parts, whole):
        torch.testing.assert_close(a, b)
    parts[0].backward()
    torch.testing.assert_close(h.grad, gh)
    torch.testing.assert_close(head.weight.grad, gw)


@pytest.mark.parametrize("k", [0, 5, 13])
@pytest.mark.parametrize("bias", [False, True])
def test_the_gradient_taken_in_the_forward_pass_equals_autograds(k, bias, monkeypatch):
    """kd.FUSED_GRAD writes the loss's gradient out (`kd_loss_grad`, `topk_kd_loss_grad`) instead
    of recomputing the chunk in backward: with the full teacher, its top-5 and tail, and its top-k
    over the whole vocabulary (no tail), on a head with and without a bias, the loss, kl, ce and
    every gradient (scaled by the loss's own incoming gradient) equal the checkpointed autograd
    path's; a peaked teacher makes the tail small and the top-k weights uneven."""
    from meestral.training import kd

    torch.manual_seed(1)
    head = torch.nn.Linear(8, 13, bias=bias)
    h = torch.randn(5, 4, 8, requires_grad=True)
    t = torch.randn(5, 4, 13) * 3
    y = torch.randint(0, 13, (5, 4))
    teacher = kd.teacher_topk(t, k) if k else t
    got = {}
    for fused in (False, True):
        monkeypatch.setattr(kd, "FUSED_GRAD", fused)
        h.grad = None
        head.zero_grad()
        out = kd.chunked_kd_loss(head, h, teacher, y, 0.3, rows=2)
        (3 * out[0]).backward()
        got[fused] = [o.detach() for o in out] + [h.grad] + [p.grad for p in head.parameters()]
    for a, b in zip(got[True], got[False]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


_CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", _CUDA])
def test_the_fused_gradient_under_bf16_autocast_matches_autograds(device, monkeypatch):
    """Under bf16 autocast (the trainer's GPU setting) the head's products run in bf16 on both
    paths; the fused one's gradients are as close to autograd's as bf16 rounding allows, and the
    weight's gradient comes back in the weight's float32."""
    from meestral.training import kd

    torch.manual_seed(2)
    head = torch.nn.Linear(16, 50, bias=False).to(device)
    h = torch.randn(6, 7, 16, device=device, requires_grad=True)
    t = torch.randn(6, 7, 50, device=device) * 2
    y = torch.randint(0, 50, (6, 7), device=device)
    got = {}
    for fused in (False, True):
        monkeypatch.setattr(kd, "FUSED_GRAD", fused)
        h.grad = None
        head.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16):
            out = kd.chunked_kd_loss(head, h, t, y, 0.2, rows=4)
        out[0].backward()
        got[fused] = (out[0].detach(), h.grad, head.weight.grad)
    assert got[True][2].dtype == torch.float32
    for a, b in zip(got[True], got[False]):
        assert float((a.float() - b.float()).norm() / b.float().norm()) < 1e-2



# ---- KD over the teacher's top-k and the rest (--kd-topk) ----------------------------------------
def _coarse_kl(s, t, idx):
    """KL(teacher || student) of the two distributions coarsened to the k tokens `idx` and "any
    other token", written out naively from full probability vectors."""
    p, q = F.softmax(t.double(), -1), F.softmax(s.double(), -1)
    pk, qk = p.gather(-1, idx), q.gather(-1, idx)
    P = torch.cat([pk, (1 - pk.sum(-1, keepdim=True)).clamp(min=0)], -1)
    Q = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    return torch.where(P > 0, P * (P.log() - Q.log()), torch.zeros_like(P)).sum(-1).mean()


def test_topk_loss_over_the_whole_vocabulary_is_the_full_loss():
    from meestral.training.kd import teacher_topk, topk_kd_loss

    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True), torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    full = kd_loss(s, t, y, 0.3)
    g_full, = torch.autograd.grad(full[0], s)
    top = topk_kd_loss(s, teacher_topk(t, 11), y, 0.3)
    g_top, = torch.autograd.grad(top[0], s)
    for a, b in zip(top, full):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_top, g_full.to(g_top.dtype), rtol=1e-5, atol=1e-7)


def test_topk_loss_is_the_kl_of_the_coarsened_distributions():
    """Value and gradient against the naive k + 1 outcome KL, a lower bound of the full KL; with a
    teacher so sure that its tail underflows to 0 (0 log 0) the gradient stays finite."""
    from meestral.training.kd import teacher_topk, topk_kd_loss

    torch.manual_seed(1)
    s = torch.randn(3, 4, 50, requires_grad=True)
    t = torch.randn(3, 4, 50) * 3
    t[0, 0, 7] = 200.0  # every other token's probability underflows in float32
    y = torch.randint(0, 50, (3, 4))
    top = teacher_topk(t, 5)
    assert top.tail[0, 0] == 0 and bool((top.tail[1:] > 0).all())
    torch.testing.assert_close(top.logp.exp().sum(-1) + top.tail, torch.ones(3, 4))
    loss, kl, ce = topk_kd_loss(s, top, y, 0.2)
    ref = _coarse_kl(s, t, top.idx)
    torch.testing.assert_close(kl.double(), ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ce, F.cross_entropy(s.reshape(-1, 50), y.reshape(-1)))
    assert float(kl) < float(kd_loss(s, t, y, 0.2)[1])  # coarsening loses information: a lower bound
    g, = torch.autograd.grad(loss, s)
    g_ref, = torch.autograd.grad(ref + 0.2 * F.cross_entropy(s.double().reshape(-1, 50), y.reshape(-1)), s)
    assert bool(torch.isfinite(g).all())
    torch.testing.assert_close(g, g_ref.float(), rtol=1e-4, atol=1e-6)
    # a student equal to the teacher has nothing left to learn from it
    assert float(topk_kd_loss(t, top, y, 0.0)[1]) < 1e-5


def test_chunked_topk_loss_equals_the_whole_batch_loss():
    from meestral.training.kd import chunked_kd_loss, teacher_topk, teacher_topk_chunks, topk_kd_loss

    torch.manual_seed(0)
    head, t_head = torch.nn.Linear(8, 13, bias=False), torch.nn.Linear(6, 13, bias=False)
    h, th = torch.randn(5, 4, 8, requires_grad=True), torch.randn(5, 4, 6)
    y = torch.randint(0, 13, (5, 4))
    top = teacher_topk(t_head(th), 3)
    chunks = teacher_topk_chunks(t_head, th, 3, rows=2)  # the teacher's side a few rows at a time
    for a, b in zip(chunks, top):
        torch.testing.assert_close(a, b)
    whole = topk_kd_loss(head(h), top, y, 0.2)
    whole[0].backward()
    gh, gw = h.grad.clone(), head.weight.grad.clone()
    h.grad, head.weight.grad = None, None
    parts = chunked_kd_loss(head, h, chunks, y, 0.2, rows=2)
    for a, b in zip(parts, whole):
        torch.testing.assert_close(a, b)
    parts[0].backward()
    torch.testing.assert_close(h.grad, gh)
    torch.testing.assert_close(head.weight.grad, gw)


@pytest.mark.slow  # inductor compiles two losses, forward and backward, on the CPU
@pytest.mark.parametrize("k,fused", [(0, False), (0, True), (4, True)])
def test_compiled_loss_equals_the_eager_loss(k, fused, monkeypatch):
    """--compile puts the loss after the LM head through torch.compile: same values and gradients
    as the eager loss, full-vocabulary (k = 0) and top-k, inside the chunks' checkpointing or as
    the gradient written out in the forward pass (kd.FUSED_GRAD, the default)."""
    from meestral.training import kd
    from meestral.training.kd import chunked_kd_loss, teacher_topk

    monkeypatch.setattr(kd, "FUSED_GRAD", fused)
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 13, bias=False)
    h = torch.randn(4, 4, 8, requires_grad=True)
    t = torch.randn(4, 4, 13) * 2
    y = torch.randint(0, 13, (4, 4))
    teacher = teacher_topk(t, k) if k else t
    out = {}
    for compiled in (False, True):
        h.grad, head.weight.grad = None, None
        parts = chunked_kd_loss(head, h, teacher, y, 0.2, rows=2, compiled=compiled)
        parts[0].backward()
        out[compiled] = (*parts, h.grad.clone(), head.weight.grad.clone())
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # inductor compiles the summary on the CPU
def test_compiled_teacher_summary_equals_the_eager_one():
    """--compile also puts the teacher's top-k summary (log-softmax, top-k, tail) through
    torch.compile: the same log-probabilities, token ids and tail mass, a chunk at a time."""
    from meestral.training.kd import teacher_topk_chunks

    torch.manual_seed(0)
    t_head = torch.nn.Linear(6, 50, bias=False)
    th = torch.randn(5, 4, 6) * 3
    eager = teacher_topk_chunks(t_head, th, 7, rows=2)
    compiled = teacher_topk_chunks(t_head, th, 7, rows=2, compiled=True)
    assert torch.equal(compiled.idx, eager.idx)
    torch.testing.assert_close(compiled.logp, eager.logp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.tail, eager.tail, rtol=1e-5, atol=1e-7)
    assert float(eager.tail.min()) > 1e-4  # a tail to get wrong


def test_row_ids_name_rows_and_leave_the_draws_unchanged(tmp_path):
    torch.save({"docs": [torch.arange(3, 30, dtype=torch.int32)]}, tmp_path / "shard-000-00000.pt")
    corpus = torch.arange(100, 124, dtype=torch.int32).view(6, 4)
    a = RowPool(str(tmp_path), corpus, seq_len=4, eos=2, corpus_share=0.5, seed=3)
    b = RowPool(str(tmp_path), corpus, seq_len=4, eos=2, corpus_share=0.5, seed=3)
    a.refresh(), b.refresh()
    for _ in range(3):
        rows, ids = a.batch_with_ids(6)
        assert torch.equal(rows, b.batch(6))  # the same draws with or without ids
        for r, i in zip(rows, ids.tolist()):
            assert torch.equal(r, (a.rows[i] if i >= 0 else corpus[-1 - i]).long())
        assert bool((ids < 0).any()) and bool((ids >= 0).any())


def _fake_teacher(calls):
    """A deterministic 'teacher' summary of rows, recording which rows it was asked for."""
    from meestral.training.kd import teacher_topk

    def compute(rows):
        calls.append(rows[:, 0].tolist())
        g = torch.Generator().manual_seed(0)
        table = torch.randn(50, 11, generator=g)
        return teacher_topk(table[rows[:, :-1] % 50], 3)
    return compute


def test_teacher_cache_computes_each_row_once_and_returns_what_the_teacher_gave():
    from meestral.training.teacher_cache import TeacherCache

    calls = []
    compute = _fake_teacher(calls)
    cache = TeacherCache(3, positions=4, max_bytes=1e6, device="cpu")
    data = {i: torch.arange(5) * 7 + i for i in range(-2, 6)}  # row id -> row (first token = id)
    for ids in ([0, 1, 1, -2], [1, 2, -2, 0], [3, 3, 2, -1]):
        rows = torch.stack([data[i] for i in ids])
        got = cache.get(rows, torch.tensor(ids), compute)
        for a, b in zip(got, compute(rows)):
            assert torch.equal(a, b) and a.dtype == b.dtype
        calls.pop()  # the reference call above
    # each row computed once, a row drawn twice in a batch once
    assert calls == [[0, 1, -2], [2], [3, -1]]
    assert cache.hits == 4 and cache.misses == 8  # read back / computed (a repeat within a batch: computed)


def test_a_full_teacher_cache_keeps_what_fits_and_computes_the_rest_every_time():
    from meestral.training.teacher_cache import TeacherCache

    calls = []
    compute = _fake_teacher(calls)
    cache = TeacherCache(3, positions=4, max_bytes=2.5 * 4 * (8 * 3 + 4), device="cpu")  # two rows
    assert cache.capacity == 2
    rows = torch.stack([torch.arange(5) + i for i in range(3)])
    for _ in range(2):
        got = cache.get(rows, torch.arange(3), compute)
        for a, b in zip(got, compute(rows)):
            assert torch.equal(a, b)
        calls.pop()
    assert calls == [[0, 1, 2], [2]] and len(cache.slot) == 2

# ---- continuing from existing weights (--init) ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A one-block Llama with SmolLM2's tokenizer and vocabulary (an HF folder, the teacher's
    interface) and a folder holding one shard of token rows: distillation runs in seconds."""
    from transformers import AutoTokenizer

    from meestral.backbones.assets import smollm2_dir

    d = tmp_path_factory.mktemp("teacher")
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir()))
    tok.save_pretrained(str(d))
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(d))
    data = d / "data"
    data.mkdir()
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 49152, (40,), generator=gen, dtype=torch.int32) for _ in range(40)]
    torch.save({"docs": docs, "prompts": []}, data / "shard-000-00000.pt")
    return d


TINY_STUDENT = dict(hidden_size=64, num_hidden_layers=2, state_size=16, chunk_size=16)


def _run(teacher, out, **kw):
    from meestral.training.distill import DistillConfig

    base = dict(teacher=str(teacher), data=str(teacher / "data"), corpus=None, out=str(out), batch=2, seq_len=32,
                eval_every=100, ckpt_every=100, heldout_tokens=256, device="cpu", min_rows=1, log_every=1)
    return DistillConfig(**{**base, **kw})


def _log(out):
    return [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow  # SmolLM2's tokenizer: the embedded backbone's cache
def test_init_continues_from_the_given_weights_and_resume_takes_precedence(tiny_teacher, tmp_path):
    from meestral.training.distill import distill, export

    first = distill(_run(tiny_teacher, tmp_path / "a", shape=TINY_STUDENT, steps=3, warmup=2), log=lambda *_: None)
    gguf = tmp_path / "a" / "mamba2-smol.gguf"
    out = tmp_path / "b"
    distill(_run(tiny_teacher, out, init=str(gguf), steps=2), log=lambda *_: None)
    log = _log(out)
    # Step 0 is the given weights exactly: the Q8_0 file the first run wrote, measured the same way.
    assert log[0]["step"] == 0 and log[0]["init"] == str(gguf)
    assert log[0]["heldout_ppl"] == pytest.approx(first["heldout_ppl_q8_0"], rel=1e-3)
    saved = json.loads((out / "config.json").read_text())
    assert saved["student"]["hidden_size"] == 64 and saved["student"]["num_hidden_layers"] == 2  # the weights' shape
    assert (saved["distill"]["lr"], saved["distill"]["min_lr"], saved["distill"]["warmup"]) == pytest.approx((1.5e-3, 1.5e-4, 50))
    first_lr = next(r["lr"] for r in log if "loss" in r)
    assert first_lr == pytest.approx(1.5e-3 / 50)  # a fresh optimiser warming up: the continued run's defaults
    # A checkpoint in --out wins over --init: the run continues at step 2, not from the file again.
    last = distill(_run(tiny_teacher, out, init=str(gguf), steps=4), log=lambda *_: None)
    log = _log(out)
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert sum(1 for r in log if r.get("init")) == 1
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 4
    # export reads the run's shape, teacher and held-out rows from its config.json: no flags needed
    from meestral.training.distill import DistillConfig

    again = export(DistillConfig(out=str(out), device="cpu"), log=lambda *_: None)
    assert again["heldout_ppl_float"] == pytest.approx(last["heldout_ppl_float"], rel=1e-5)


@pytest.mark.slow  # SmolLM2's tokenizer: the embedded backbone's cache
def test_topk_run_at_the_whole_vocabulary_trains_as_the_full_kl_run(tiny_teacher, tmp_path):
    """--kd-topk takes the teacher's side through its hidden states and head a chunk at a time:
    at k = the vocabulary the run's losses are the full-vocabulary run's, step by step."""
    from meestral.training.distill import distill

    runs = {}
    for k in (0, 49152, 64):
        distill(_run(tiny_teacher, tmp_path / str(k), shape=TINY_STUDENT, steps=3, warmup=2, kd_topk=k),
                log=lambda *_: None)
        runs[k] = [r for r in _log(tmp_path / str(k)) if "loss" in r]
    for a, b in zip(runs[49152], runs[0]):
        assert (a["loss"], a["kl"], a["ce"]) == pytest.approx((b["loss"], b["kl"], b["ce"]), rel=2e-3, abs=2e-3)
    # 64 of 49,152 tokens: a smaller KL (a lower bound), the same cross-entropy at the first step
    assert runs[64][0]["kl"] < runs[0][0]["kl"] and runs[64][0]["ce"] == pytest.approx(runs[0][0]["ce"], rel=1e-3)


@pytest.mark.slow  # SmolLM2's tokenizer: the embedded backbone's cache
def test_a_run_with_the_teacher_cache_trains_as_one_without(tiny_teacher, tmp_path):
    """Rows drawn again take the teacher's top-k from the cache: the losses are the uncached run's,
    step by step, and the log says how often the cache answered."""
    from meestral.errors import MeestralError
    from meestral.training.distill import distill

    runs = {}
    for gb in (0.0, 1.0):
        distill(_run(tiny_teacher, tmp_path / str(gb), shape=TINY_STUDENT, steps=6, warmup=2, batch=8, kd_topk=16,
                     teacher_cache_gb=gb), log=lambda *_: None)
        runs[gb] = [r for r in _log(tmp_path / str(gb)) if "loss" in r]
    for a, b in zip(runs[1.0], runs[0.0]):
        assert (a["loss"], a["kl"], a["ce"]) == pytest.approx((b["loss"], b["kl"], b["ce"]), rel=2e-3, abs=2e-3)
    assert "teacher_hit_rate" not in runs[0.0][-1]
    assert 0 < runs[1.0][-1]["teacher_hit_rate"] < 1 and runs[1.0][-1]["teacher_cached_rows"] > 0
    with pytest.raises(MeestralError, match="give --kd-topk"):
        distill(_run(tiny_teacher, tmp_path / "bad", teacher_cache_gb=1.0), log=lambda *_: None)
    assert not (tmp_path / "bad").exists()


def distill_killed_at(cfg, step: int, monkeypatch):
    """Run `distill(cfg)` until its `step`-th batch is asked for, then stop it as a kill would
    (nothing more is written)."""
    from meestral.training.distill import distill

    batch, calls = RowPool.batch_with_ids, []  # the trainer's one call for a step's rows

    def killed(pool, n):
        calls.append(n)
        if len(calls) == step:
            raise KeyboardInterrupt
        return batch(pool, n)

    monkeypatch.setattr(RowPool, "batch_with_ids", killed)
    with pytest.raises(KeyboardInterrupt):
        distill(cfg, log=lambda *_: None)
    monkeypatch.setattr(RowPool, "batch_with_ids", batch)


@pytest.mark.slow  # SmolLM2's tokenizer: the embedded backbone's cache
def test_a_run_killed_between_checkpoints_logs_each_step_once(tiny_teacher, tmp_path, monkeypatch):
    """Killed after logging step 3, its checkpoint at step 2: the resumed run does step 3 again,
    and its log, cut back to the checkpoint's step, holds the step once."""
    from meestral.training.distill import distill

    cfg = _run(tiny_teacher, tmp_path / "r", shape=TINY_STUDENT, steps=4, warmup=2, ckpt_every=2)
    distill_killed_at(cfg, 4, monkeypatch)
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert [r["step"] for r in _log(tmp_path / "r") if "loss" in r] == [1, 2, 3]
    distill(cfg, log=lambda *_: None)
    assert [r["step"] for r in _log(tmp_path / "r") if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.slow  # SmolLM2's tokenizer: the embedded backbone's cache
def test_init_spec_forms_and_shape_conflicts(tiny_teacher, tmp_path):
    from transformers import AutoConfig

    from meestral.training.distill import distill, init_student
    from meestral.errors import MeestralError

    distill(_run(tiny_teacher, tmp_path / "a", shape=TINY_STUDENT, steps=1, warmup=1), log=lambda *_: None)
    tcfg = AutoConfig.from_pretrained(str(tiny_teacher))
    from_gguf = init_student(str(tmp_path / "a" / "mamba2-smol.gguf"), tcfg, {"hidden_size": 64})  # agreeing: fine
    from_hf = init_student(str(tmp_path / "a" / "student"), tcfg)  # the float32 HF folder finish() writes
    assert from_gguf.config.num_hidden_layers == from_hf.config.num_hidden_layers == 2
    with pytest.raises(MeestralError, match=r"--shape hidden_size=128 contradicts --init .*\(hidden_size=64\)"):
        init_student(str(tmp_path / "a" / "student"), tcfg, {"hidden_size": 128})
    with pytest.raises(MeestralError, match="not 'mamba2-smol', a GGUF file or an HF folder"):
        init_student(str(tmp_path / "nothing-here"), tcfg)
    tcfg.vocab_size = 1000
    with pytest.raises(MeestralError, match="vocabulary of 49152"):
        init_student(str(tmp_path / "a" / "student"), tcfg)


def test_refixed_total_ends_at_the_deadline_without_a_jump_in_the_schedule():
    from meestral.training.distill import DistillConfig, refixed_total, resolved
    from meestral.training.optim import warmup_stable_decay

    assert refixed_total(100, 0.5, 100.0, 50, 0.25) == 300  # 200 more steps fit in 100 s
    assert refixed_total(100, 0.5, -5.0, 50, 0.25) == 134  # late: the decay starts now, not in the past
    cfg = resolved(DistillConfig(init="x"))
    for step, s_left in [(300, 10.0), (120, 0.0), (400, 1e4)]:
        total = refixed_total(step, 0.5, s_left, cfg.warmup, cfg.decay_share)
        assert int(total * (1 - cfg.decay_share)) >= step  # still at the peak: no jump
        assert warmup_stable_decay(step, total, cfg.lr, cfg.min_lr, cfg.warmup, cfg.decay_share) == cfg.lr
    scratch = resolved(DistillConfig())
    assert (scratch.lr, scratch.warmup) == (3e-3, 200) and scratch.min_lr == pytest.approx(3e-4)
    assert resolved(DistillConfig(lr=1e-3)).min_lr == pytest.approx(1e-4)


@pytest.mark.slow  # SmolLM2's tokenizer: the embedded backbone's cache
def test_a_seconds_run_refixes_its_step_count_and_ends_on_it(tiny_teacher, tmp_path, monkeypatch):
    """The deadline's clock advances with the steps, not with the machine's load: 1/8 s a step for
    the first 20 (a 10 s run: 80 steps), then 3/16 s (binary fractions: exact arithmetic). The
    count is refixed at steps 30 and 40 to the 60 that end at the deadline, never once the decay
    has begun (step 45 of 60), and the run ends on it."""
    import meestral.training.distill as d

    monkeypatch.setattr(d, "RETIME", 10)
    clock, batch = [1000.0], RowPool.batch_with_ids

    def step(pool, n):  # one batch a step: the step's time passes
        clock[0] += 0.125 if len(steps) < 20 else 0.1875
        steps.append(n)
        return batch(pool, n)

    steps = []
    monkeypatch.setattr(RowPool, "batch_with_ids", step)
    monkeypatch.setattr(d._Deadline, "clock", staticmethod(lambda: clock[0]))
    d.distill(_run(tiny_teacher, tmp_path / "s", shape=TINY_STUDENT, seconds=10.0, warmup=2, log_every=5),
              log=lambda *_: None)
    log = _log(tmp_path / "s")
    fixed = [r for r in log if "fixed_total_steps" in r]
    refixed = [r for r in log if "refixed_total_steps" in r]
    assert len(fixed) == 1 and fixed[0]["step"] == 20
    assert (fixed[0]["fixed_total_steps"], fixed[0]["s_per_step"]) == (80, 0.125)
    assert refixed and all(r["step"] % 10 == 0 for r in refixed)  # every RETIME steps until the decay
    assert [(r["step"], r["refixed_total_steps"], r["s_per_step"], r["s_left"]) for r in refixed] == [
        (30, 60, 0.1875, 6), (40, 60, 0.1875, 4)]  # 5.625 s and 3.75 s left, logged rounded
    total = refixed[-1]["refixed_total_steps"]
    assert refixed[-1]["step"] < int(total * 0.75)  # none once the decay began
    assert max(r["step"] for r in log if "loss" in r) == total == len(steps)  # the run ends on the last count fixed


# ---- a teacher of milliseconds for `distill sample` (its Ctrl-C: test_faults_training) -----------
class CharTok:
    """Just enough of a tokenizer for the sampler and the export: an id per character (3..92), EOS
    2 (the `llama` fixture's), pad 0; `save_pretrained` writes one file."""
    eos_token_id, pad_token_id = 2, 0

    def get_vocab(self):
        return {}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 90 for c in text[:12]]}

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return self(messages[0]["content"])["input_ids"]

    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer.json").write_text('{"chars": true}')


def tiny_sampler(llama, monkeypatch):
    """`sample_teacher`'s teacher is the `llama` fixture (any --teacher): sampling takes milliseconds."""
    from meestral.training import teacher_text

    monkeypatch.setattr(teacher_text, "load_teacher", lambda spec, device: (llama, CharTok()))
    return teacher_text


# ---- the export's student/ ---------------------------------------------------------------------
def _tiny_mamba2(seed):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(seed)
    return Mamba2ForCausalLM(Mamba2Config(vocab_size=97, hidden_size=64, num_hidden_layers=2, state_size=16, expand=2,
                                          head_dim=64, num_heads=2, n_groups=1, chunk_size=16,
                                          tie_word_embeddings=True))


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class KilledTok(CharTok):
    """Killed while the tokenizer is written: the model's files are in the folder already."""

    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer.json").write_text('{"cha')
        raise KeyboardInterrupt


@pytest.mark.parametrize("exchange", [True, False])  # renameat2's swap, or the two renames where it is missing
def test_an_export_killed_part_way_keeps_the_previous_student(exchange, tmp_path, monkeypatch):
    import meestral.files
    from meestral.training.distill import finish

    if not exchange:
        monkeypatch.setattr(meestral.files, "_exchange", lambda a, b: False)
    out = tmp_path / "run"
    out.mkdir()
    held = torch.randint(3, 97, (2, 32), generator=torch.Generator().manual_seed(0))
    finish(_tiny_mamba2(0), CharTok(), out, held, 10.0, lambda r: None)
    old = _files(out / "student")
    assert "config.json" in old and "tokenizer.json" in old
    (out / ".student.tmp999999999").mkdir()  # a temp folder a SIGKILLed export left (no such pid)
    with pytest.raises(KeyboardInterrupt):
        finish(_tiny_mamba2(1), KilledTok(), out, held, 10.0, lambda r: None)
    assert _files(out / "student") == old  # the previous student, whole
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]  # its temp folder and the dead one's: gone
    finish(_tiny_mamba2(1), CharTok(), out, held, 10.0, lambda r: None)
    new = _files(out / "student")
    assert new.keys() == old.keys() and new["model.safetensors"] != old["model.safetensors"]  # replaced, whole
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


def test_sample_top_k_past_the_vocabulary_samples_among_every_token(llama, tmp_path, monkeypatch):
    """--top-k larger than the teacher's vocabulary means every token (as generate's --top-k), not
    torch.topk's "selected index k out of range" traceback."""
    teacher_text = tiny_sampler(llama, monkeypatch)
    vocab = llama.config.vocab_size
    assert teacher_text.sample_teacher("tiny", str(tmp_path), batch=2, max_new_tokens=8, top_k=vocab + 1000,
                                       shards=1, device="cpu", log=lambda *_: None) == 1
    docs = torch.load(next(tmp_path.glob("shard-*.pt")))["docs"]
    assert docs and all(0 <= int(t) < vocab for d in docs for t in d)
