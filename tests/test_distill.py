"""Distillation pieces: the KD loss, row packing, the cached sampler (= HF greedy at ~0 temperature)
and, on the real teacher, a short run that checkpoints, resumes and exports."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from meestral.distill import RowPool, kd_loss, sample_batch


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


def test_sampler_pads_after_eos(llama):
    inp = torch.tensor([[5, 6, 7], [9, 8, 7]])
    out = sample_batch(llama, inp, torch.ones_like(inp), 40, 1.0, 20, list(range(97)), pad=3)
    assert (out[:, 1:] == 3).all()  # every token is an EOS: one token a row, then padding
    assert out.shape[1] == 40  # the finished check stops sampling, the width stays


@pytest.mark.slow
def test_short_run_checkpoints_resumes_and_exports(tmp_path):
    from meestral.distill import DistillConfig, distill, export, sample_teacher
    from meestral.quantized import model_from_gguf

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


def test_chunked_loss_equals_the_whole_batch_loss():
    from meestral.distill import chunked_kd_loss

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
    for a, b in zip(parts, whole):
        torch.testing.assert_close(a, b)
    parts[0].backward()
    torch.testing.assert_close(h.grad, gh)
    torch.testing.assert_close(head.weight.grad, gw)
