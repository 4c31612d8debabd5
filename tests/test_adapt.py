"""Early-exit adaptation (meestral.backbones.lora, meestral.training.adapt) on tiny random backbones, both families."""

import json

import pytest
import torch

from meestral.training.adapt import AdaptConfig, Adapter, active_exits, adapt_loss, dropout_mask
from meestral.backbones.loading import random_backbone
from meestral.cli.main import main
from meestral.errors import MeestralError
from meestral.backbones.lora import LoRA, apply_adapter, load_adapter

FAMILIES = ["mistral", "mamba2"]


def ids_for(bb, rows=2, length=40, seed=0):
    return torch.randint(3, bb.vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed))


def randomise(lora, std=0.05, seed=1):
    """Non-zero B matrices: an adapter that changes the model (a trained one, as far as tests care)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in lora.B:
            b.copy_(torch.randn(b.shape, generator=gen) * std)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """60 documents of Shakespeare (4,000 characters each): 2 land in the held-out split."""
    from meestral.data import embedded_files, is_validation

    folder = tmp_path_factory.mktemp("corpus")
    text = sorted(embedded_files())[5].read_text()
    docs = [text[i * 4000:(i + 1) * 4000] for i in range(60)]
    assert sum(is_validation(d, 0.05) for d in docs) >= 1
    for i, d in enumerate(docs):
        (folder / f"{i:02d}.txt").write_text(d)
    return str(folder)


def small(corpus, out, **kw):
    base = dict(backbone="random:mistral", out=str(out), corpus=corpus, seq_len=32, batch=4, steps=4, val_every=100,
                val_tokens=256, ckpt_every=100, log_every=1, progress=False)
    return AdaptConfig(**{**base, **kw})


# ---- the adapters --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", FAMILIES)
def test_zero_initialised_adapters_change_nothing(shape):
    bb = random_backbone(shape)
    ids = ids_for(bb)
    ref = bb.model(ids).logits
    hidden_ref = bb.collect(ids, [1, 3])[0]
    LoRA(bb, rank=4)
    assert torch.equal(bb.model(ids).logits, ref)
    hidden = bb.collect(ids, [1, 3])[0]
    assert all(torch.equal(hidden[l], hidden_ref[l]) for l in (1, 3))


@pytest.mark.parametrize("shape", FAMILIES)
def test_adapters_sit_on_the_targets_the_adapter_file_names(shape):
    bb = random_backbone(shape)
    lora = LoRA(bb, rank=2)
    assert {t for _, t in lora.sites} == set(bb.lora_targets)
    assert len(lora.sites) == bb.num_layers * len(bb.lora_targets)


@pytest.mark.parametrize("shape", FAMILIES)
def test_merged_weights_equal_the_unmerged_adapter(shape):
    bb = random_backbone(shape)
    ids = ids_for(bb)
    base = bb.model(ids).logits
    before = bb.fingerprint()
    lora = LoRA(bb, rank=4)
    randomise(lora)
    unmerged = bb.model(ids).logits
    assert (unmerged - base).abs().max() > 1e-2  # the adapter really changes the model
    with lora.disabled():
        assert torch.equal(bb.model(ids).logits, base)  # the distillation teacher is the original
    lora.merge()
    torch.testing.assert_close(bb.model(ids).logits, unmerged, atol=2e-5, rtol=1e-5)
    assert bb.fingerprint() != before  # heads made for the base must not load on the adapted model


@pytest.mark.parametrize("shape", FAMILIES)
def test_export_then_load_gives_identical_logits(shape, tmp_path):
    bb = random_backbone(shape)
    ids = ids_for(bb)
    lora = LoRA(bb, rank=4)
    randomise(lora)
    want = bb.model(ids).logits
    info = lora.save(tmp_path / "a.safetensors", step=7)
    assert info["bytes"] == (tmp_path / "a.safetensors").stat().st_size <= 16 * 2**20

    fresh = random_backbone(shape)
    loaded = load_adapter(fresh, tmp_path / "a.safetensors")
    assert torch.equal(fresh.model(ids).logits, want)
    loaded.merge()
    torch.testing.assert_close(fresh.model(ids).logits, want, atol=2e-5, rtol=1e-5)

    from safetensors import safe_open

    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["meestral_lora"])
    assert meta["backbone"]["fingerprint"] == random_backbone(shape).fingerprint() and meta["step"] == 7


@pytest.mark.parametrize("other", ["random:mistral:seed1", "random:mamba2", "random:llama"])
def test_an_adapter_refuses_another_backbone_in_one_line(other, tmp_path, capsys):
    from meestral.backbones.loading import load_backbone

    lora = LoRA(random_backbone("mistral"), rank=2)
    lora.save(tmp_path / "a.safetensors")
    with pytest.raises(MeestralError, match="was trained on backbone 'random:mistral:seed0'") as e:
        apply_adapter(load_backbone(other), tmp_path / "a.safetensors")
    assert "\n" not in str(e.value)
    rc = main(["adapt", "compare", "--backbone", other, "--adapter", str(tmp_path / "a.safetensors"),
               "--out", str(tmp_path / "cmp")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("meestral: error: adapter")


def test_a_file_that_is_not_an_adapter_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(MeestralError, match="not a MEEstral adapter"):
        load_adapter(random_backbone("mistral"), tmp_path / "x.safetensors")
    (tmp_path / "y.safetensors").write_bytes(b"garbage")
    with pytest.raises(MeestralError, match="not a readable adapter"):
        load_adapter(random_backbone("mistral"), tmp_path / "y.safetensors")


# ---- the adapted embedded names ---------------------------------------------------------------------
def test_an_adapted_name_without_its_adapter_fails_in_one_line(monkeypatch, tmp_path, capsys):
    from meestral.backbones import loading

    monkeypatch.setattr(loading, "adapter_path", lambda name: tmp_path / f"{name}.lora.safetensors")
    rc = main(["info", "--backbone", "mamba2-smol-ee"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "mamba2-smol-ee is not in this install" in err[0] and "--backbone mamba2-smol" in err[0]


def test_an_adapted_name_loads_its_base_with_the_adapter_merged(monkeypatch, tmp_path):
    from meestral.backbones import loading

    bb = random_backbone("mamba2")
    ids = ids_for(bb)
    lora = LoRA(bb, rank=4)
    randomise(lora)
    want = bb.model(ids).logits
    lora.save(tmp_path / "tiny-ee.lora.safetensors")
    monkeypatch.setitem(loading.EE_ADAPTED, "tiny-ee", "random:mamba2")
    monkeypatch.setattr(loading, "adapter_path", lambda name: tmp_path / f"{name}.lora.safetensors")
    got = loading.load_backbone("tiny-ee")
    assert got.name == "tiny-ee"
    torch.testing.assert_close(got.model(ids).logits, want, atol=2e-5, rtol=1e-5)


# ---- the training pass --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", FAMILIES)
def test_train_forward_equals_collect_and_skips_blocks(shape):
    bb = random_backbone(shape)
    ids = ids_for(bb)
    hidden, final = bb.train_forward(ids, [1, 2, 3])
    ref, _, logits = bb.collect(ids, [1, 2, 3])
    assert all(torch.equal(hidden[l], ref[l]) for l in (1, 2, 3))
    torch.testing.assert_close(bb.lm_head(final), logits)
    skip = torch.zeros(bb.num_layers, 2, dtype=torch.bool)
    skip[2, 0] = True  # block 2 dropped for row 0 only
    dropped, _ = bb.train_forward(ids, [1, 2], skip)
    assert torch.equal(dropped[2][0], dropped[1][0])  # a dropped block passes its input on
    assert torch.equal(dropped[2][1], ref[2][1])  # the other row ran it


@pytest.mark.parametrize("shape", FAMILIES)
def test_the_exit_loss_reaches_the_blocks_up_to_its_exit_and_no_further(shape):
    """With only an exit term (final weight 0) at layer 2, blocks 0-2 get gradients and the
    blocks after it none: the early-exit loss is connected, through the shared norm + LM head."""
    bb = random_backbone(shape)
    lora = LoRA(bb, rank=4)
    randomise(lora, std=0.01)  # B = 0 would give A no gradient
    loss, parts = adapt_loss(bb, lora, ids_for(bb, rows=2, length=24), [2], [True], [1.0], final_weight=0.0)
    loss.backward()
    per_block = {}
    for k, (i, _) in enumerate(lora.sites):
        per_block[i] = per_block.get(i, 0.0) + float(lora.B[k].grad.abs().sum())
    assert all(per_block[i] > 0 for i in range(3)) and all(per_block[i] == 0 for i in range(3, bb.num_layers))
    assert set(parts) == {"final", 2}


@pytest.mark.parametrize("shape", FAMILIES)
def test_the_loss_with_its_gradient_written_out_equals_autograds(shape, monkeypatch):
    """adapt_loss hands the LM head module to the KD loss, so a plain linear head takes the
    gradient written out in the forward pass (kd.FUSED_GRAD): the total, the per-exit KLs and every
    adapter's gradient equal the checkpointed autograd path's, and the frozen head gets none."""
    from meestral.training import kd

    bb = random_backbone(shape)
    lora = LoRA(bb, rank=4)
    randomise(lora, std=0.02)
    ids = ids_for(bb, rows=3, length=24)
    calls, apply = [], kd._FusedKD.apply
    monkeypatch.setattr(kd._FusedKD, "apply", lambda *a: calls.append(1) or apply(*a))
    got = {}
    for fused in (False, True):
        monkeypatch.setattr(kd, "FUSED_GRAD", fused)
        for b in lora.B:
            b.grad = None
        loss, parts = adapt_loss(bb, lora, ids, [1, 2], [True, True], [0.5, 1.5], final_weight=2.0, ce_weight=0.1)
        loss.backward()
        got[fused] = (loss.detach(), parts, [b.grad.clone() for b in lora.B])
    assert len(calls) == 3  # the final layer and both exits took it
    assert bb.lm_head_module.weight.grad is None
    torch.testing.assert_close(got[True][0], got[False][0], atol=1e-6, rtol=1e-5)
    assert got[True][1] == pytest.approx(got[False][1], rel=1e-5, abs=1e-6)
    for a, b in zip(got[True][2], got[False][2]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("shape", FAMILIES)
def test_the_cross_entropy_on_the_teachers_top1(shape):
    """--ce-target teacher: the cross-entropy's labels are the original model's top-1 at each
    position, at full depth and at every active exit, weighted as the KL terms are."""
    import torch.nn.functional as F

    bb = random_backbone(shape)
    lora = LoRA(bb, rank=4)
    randomise(lora, std=0.05)
    ids = ids_for(bb, rows=2, length=20)
    kw = dict(exits=[1, 2], active=[True, True], weights=[0.5, 1.5], final_weight=2.0)
    with torch.no_grad():
        kl_only, _ = adapt_loss(bb, lora, ids, **kw)
        with_ce, _ = adapt_loss(bb, lora, ids, ce_weight=0.3, ce_target="teacher", **kw)
        with_data, _ = adapt_loss(bb, lora, ids, ce_weight=0.3, **kw)
        with lora.disabled():
            top1 = bb.lm_head(bb.train_forward(ids)[1][:, :-1]).argmax(-1)
        hidden, final = bb.train_forward(ids, [1, 2])

        def ce(h, labels):
            return F.cross_entropy(bb.lm_head_module(h).float().flatten(0, 1), labels.flatten())

        want = 2.0 * ce(final[:, :-1], top1) + (0.5 * ce(bb.final_norm(hidden[1][:, :-1]), top1)
                                               + 1.5 * ce(bb.final_norm(hidden[2][:, :-1]), top1)) / 2
        torch.testing.assert_close(with_ce - kl_only, 0.3 * want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(with_ce, with_data)  # other labels than the next tokens


def test_curricula_and_dropout_are_functions_of_the_step():
    assert [active_exits("rotate", 5, s, 100, rotation=2) for s in (0, 1)] == \
        [[True, False, True, False, True], [False, True, False, True, False]]
    assert all(any(active_exits("rotate", 5, s, 100, rotation=3)[j] for s in range(3)) for j in range(5))
    assert active_exits("gradual", 3, 0, 100, share=0.5) == [False, False, True]  # deepest first
    assert active_exits("gradual", 3, 25, 100, share=0.5) == [False, True, True]
    assert active_exits("gradual", 3, 50, 100, share=0.5) == [True, True, True]
    assert active_exits("all", 3, 7, 10) == [True] * 3
    m = dropout_mask(8, 4000, 0.4, seed=0, step=3)
    assert torch.equal(m, dropout_mask(8, 4000, 0.4, seed=0, step=3))
    assert not torch.equal(m, dropout_mask(8, 4000, 0.4, seed=0, step=4))
    rate = m.float().mean(1)
    assert rate[0] == 0 and abs(rate[-1] - 0.4) < 0.03 and bool((rate[1:] > rate[:-1] - 0.03).all())
    assert dropout_mask(8, 4, 0.0, 0, 0) is None


# ---- runs ---------------------------------------------------------------------------------------------
@pytest.mark.slow  # tens of seconds of training: the full tier
def test_resume_equals_an_uninterrupted_run(corpus, tmp_path):
    kw = dict(steps=6, layer_dropout=0.3, curriculum="rotate", rotation=2, lr=3e-3)
    whole = Adapter(small(corpus, tmp_path / "a", **kw))
    whole.run()
    calls = 0
    while not (tmp_path / "b" / "adapter.safetensors").exists():
        # seconds ~0: every call stops after one step, with a checkpoint; the next resumes it
        Adapter(small(corpus, tmp_path / "b", seconds=1e-9, resume=calls > 0, **kw)).run()
        calls += 1
    assert calls == 6
    a = load_adapter(random_backbone("mistral"), tmp_path / "a" / "adapter.safetensors").tensors()
    b = load_adapter(random_backbone("mistral"), tmp_path / "b" / "adapter.safetensors").tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(bool(v.abs().sum() > 0) for k, v in a.items() if k.endswith("lora_B"))  # it did train
    steps = [r["step"] for r in map(json.loads, (tmp_path / "b" / "log.jsonl").read_text().splitlines())
             if r["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # the log has each step once, across the calls


def test_a_killed_schedulefree_run_resumes_from_its_averaged_weights(corpus, tmp_path):
    """Schedule-free checkpoints hold the averaged weights (as the optimiser's state says they
    are): a run killed after its step-4 checkpoint and resumed ends on the uninterrupted weights.
    Both runs switch weights at the same steps, so they agree to the bit."""
    kw = dict(steps=8, ckpt_every=4, log_every=2, optimizer="schedulefree", lr=3e-3)
    Adapter(small(corpus, tmp_path / "a", **kw)).run()
    killed = Adapter(small(corpus, tmp_path / "b", **kw))
    step = killed._train_step

    def until_step_5():
        if killed.step == 5:
            raise KeyboardInterrupt  # as a kill: nothing more is written
        return step()

    killed._train_step = until_step_5
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    Adapter(small(corpus, tmp_path / "b", resume=True, **kw)).run()
    a = load_adapter(random_backbone("mistral"), tmp_path / "a" / "adapter.safetensors").tensors()
    b = load_adapter(random_backbone("mistral"), tmp_path / "b" / "adapter.safetensors").tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_changed_run_refuses_to_resume(corpus, tmp_path):
    Adapter(small(corpus, tmp_path, seconds=1e-9)).run()
    with pytest.raises(MeestralError, match=r"different run \(lr differ\)"):
        Adapter(small(corpus, tmp_path, resume=True, lr=5e-3))
    with pytest.raises(MeestralError, match="pass --resume"):
        Adapter(small(corpus, tmp_path))


def _agreement(run_dir, layers):
    vals = [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["split"] == "val"]
    return [sum(v["agreement"][str(l)] for l in layers) / len(layers) for v in (vals[0], vals[-1])]


@pytest.mark.slow  # tens of seconds of training: the full tier
def test_a_short_adaptation_raises_early_layer_agreement(corpus, tmp_path):
    """The real thing on a tiny Transformer: 40 steps move the shallow exits' top-1 toward the
    final layer's on held-out text; the same run with the exit terms weighted 0 (only the
    full-depth distillation) does not, so the rise is the early-exit loss's doing."""
    kw = dict(steps=40, seq_len=64, batch=8, val_every=40, val_tokens=1024, lr=3e-3, curriculum="all", exits=[0, 1, 2])
    Adapter(small(corpus, tmp_path / "ee", **kw)).run()
    Adapter(small(corpus, tmp_path / "ctl", exit_weights=[0.0] * 3, **kw)).run()
    before, after = _agreement(tmp_path / "ee", [0, 1, 2])
    c_before, c_after = _agreement(tmp_path / "ctl", [0, 1, 2])
    assert before == c_before
    assert after > before + 0.08, (before, after)
    assert c_after < c_before + 0.03, (c_before, c_after)
    vals = [r for r in map(json.loads, (tmp_path / "ee" / "log.jsonl").read_text().splitlines()) if r["split"] == "val"]
    assert vals[-1]["bound_speedup_layers"] > vals[0]["bound_speedup_layers"]
    assert vals[-1]["heldout_ppl"] < vals[0]["heldout_ppl"] * 1.05  # the full depth stays as good


@pytest.mark.slow  # tens of seconds of training: the full tier
def test_cli_train_export_compare(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["adapt", "train", "--backbone", "random:mamba2", "--out", str(out), "--corpus", corpus, "--seq-len", "32",
            "--batch", "2", "--steps", "3", "--val-tokens", "128", "--no-progress", "--layer-dropout", "0.2"]
    assert main(args) == 0
    assert (out / "adapter.safetensors").is_file() and (out / "curves.png").is_file()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --resume" in err[0]
    assert main(["adapt", "export", "--out", str(out), "--file", str(tmp_path / "b.safetensors"),
                 "--export-dtype", "bfloat16"]) == 0
    assert (tmp_path / "b.safetensors").stat().st_size < (out / "adapter.safetensors").stat().st_size
    assert main(["adapt", "compare", "--backbone", "random:mamba2", "--adapter", str(out / "adapter.safetensors"),
                 "--corpus", corpus, "--tokens", "128", "--seq-len", "32", "--out", str(tmp_path / "cmp")]) == 0
    res = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert set(res["original"]["agreement"]) == {str(l) for l in range(5)}
    assert res["original"] != res["adapted"] and (tmp_path / "cmp" / "agreement.png").stat().st_size > 1000
    assert res["drift"]["tokens"] == res["original"]["tokens"] and res["drift"]["kl_per_token"] > 0
    for k in ("original", "adapted"):  # the confidence bins cover every measured token
        assert sum(b["tokens"] for b in res[k]["by_confidence"]) == res[k]["tokens"]
    printed = capsys.readouterr().out
    assert "final top-1 probability" in printed and "->" in printed


@pytest.mark.parametrize("shape", FAMILIES)
@pytest.mark.parametrize("rank", [4, 7])
def test_a_run_from_an_adapter_starts_at_that_adapted_model(shape, rank, tmp_path):
    """--init-adapter at the file's rank and at a higher one (the extra rank, other alpha): the
    continued run's model at step 0 is the file's adapted model, its teacher still the base."""
    bb = random_backbone(shape)
    ids = ids_for(bb)
    base = bb.model(ids).logits
    first = LoRA(bb, rank=4, alpha=6.0)
    randomise(first)
    first.save(tmp_path / "a.safetensors", dtype=torch.bfloat16)

    from meestral.backbones.lora import read_adapter

    fresh = random_backbone(shape)
    meta, tensors = read_adapter(tmp_path / "a.safetensors")
    shipped = random_backbone(shape)
    load_adapter(shipped, tmp_path / "a.safetensors")
    want = shipped.model(ids).logits  # the file (bf16) as `--backbone NAME-ee` would load it
    lora = LoRA(fresh, rank=rank, seed=3)
    lora.start_from(meta, tensors)
    torch.testing.assert_close(fresh.model(ids).logits, want, atol=2e-5, rtol=1e-5)
    assert (want - base).abs().max() > 1e-2
    with lora.disabled():
        assert torch.equal(fresh.model(ids).logits, base)
    if rank > 4:  # the extra rank can learn: fresh A rows, B columns zero
        assert all(bool(a[4:].abs().sum() > 0) for a in lora.A) and all(bool(b[:, 4:].abs().sum() == 0) for b in lora.B)
    with pytest.raises(MeestralError, match="rank 4, over this run's --rank 2: give --rank 4 or more"):
        LoRA(random_backbone(shape), rank=2).start_from(meta, tensors, "a.safetensors")


def test_a_run_from_an_adapter_resumes_and_refuses_another_start(corpus, tmp_path):
    """The run's first validation is the starting adapter's model (not the base); a resume with
    another starting file, or without one, is refused; an adapter of another base is refused
    before anything is written."""
    bb = random_backbone("mistral")
    lora = LoRA(bb, rank=2)
    randomise(lora, std=0.2)
    lora.save(tmp_path / "a.safetensors")
    randomise(lora, std=0.2, seed=2)
    lora.save(tmp_path / "b.safetensors")

    Adapter(small(corpus, tmp_path / "plain", steps=1, val_every=1)).run()
    Adapter(small(corpus, tmp_path / "run", seconds=1e-9, rank=4, init_adapter=str(tmp_path / "a.safetensors"))).run()
    vals = [r for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()) if r["split"] == "val"]
    plain = [r for r in map(json.loads, (tmp_path / "plain" / "log.jsonl").read_text().splitlines()) if r["split"] == "val"]
    assert vals[0]["step"] == plain[0]["step"] == 0 and vals[0]["heldout_ppl"] != plain[0]["heldout_ppl"]
    with pytest.raises(MeestralError, match=r"different run \(init_adapter differ\)"):
        Adapter(small(corpus, tmp_path / "run", resume=True, rank=4, init_adapter=str(tmp_path / "b.safetensors")))
    with pytest.raises(MeestralError, match=r"different run \(init_adapter differ\)"):  # named though absent now
        Adapter(small(corpus, tmp_path / "run", resume=True, rank=4))
    Adapter(small(corpus, tmp_path / "run", resume=True, rank=4, init_adapter=str(tmp_path / "a.safetensors"))).run()
    assert (tmp_path / "run" / "adapter.safetensors").is_file()

    other = LoRA(random_backbone("mistral", seed=1), rank=2)
    other.save(tmp_path / "other.safetensors")
    with pytest.raises(MeestralError, match="was trained on backbone"):
        Adapter(small(corpus, tmp_path / "x", init_adapter=str(tmp_path / "other.safetensors")))
    assert not (tmp_path / "x").exists()


def test_init_adapter_names_the_shipped_adapter_of_an_adapted_backbone():
    from meestral.backbones.loading import adapter_path
    from meestral.cli.adapt import init_adapter_file

    assert init_adapter_file("smollm2-ee") == str(adapter_path("smollm2-ee"))
    assert init_adapter_file("runs/x/adapter.safetensors") == "runs/x/adapter.safetensors"
    assert init_adapter_file(None) is None


@pytest.mark.parametrize("shape", FAMILIES)
def test_drift_is_the_kl_between_the_original_and_the_adapted_model(shape):
    """adapt_compare.drift on sequences of several lengths (padded in a batch) equals the KL
    computed from two separate models one sequence at a time; a zero adapter drifts by nothing."""
    import torch.nn.functional as F

    from meestral.training.adapt_compare import drift

    bb = random_backbone(shape)
    lora = LoRA(bb, rank=4)
    seqs = [ids_for(bb, rows=1, length=n, seed=n)[0].tolist() for n in (9, 17, 13)]
    zero = drift(bb, lora, seqs, batch=2)
    assert zero["tokens"] == 39 and zero["kl_per_token"] == pytest.approx(0, abs=1e-7) and zero["top1_agreement"] == 1
    randomise(lora, std=0.1)
    got = drift(bb, lora, seqs, batch=2)
    adapted = random_backbone(shape)
    for k, (i, t) in enumerate(lora.sites):  # the same delta, merged into a second copy
        w = adapted.blocks[i].get_submodule(t).weight
        w.data += lora.scale * lora.B[k].detach() @ lora.A[k].detach()
    original = random_backbone(shape)
    kl = agree = 0.0
    for q in seqs:
        ids = torch.tensor(q)[None]
        lp = F.log_softmax(original.model(ids).logits.float(), -1)[0]
        lq = F.log_softmax(adapted.model(ids).logits.float(), -1)[0]
        kl += (lp.exp() * (lp - lq)).sum().item()
        agree += (lp.argmax(-1) == lq.argmax(-1)).sum().item()
    assert got["kl_per_token"] == pytest.approx(kl / 39, rel=1e-4) and got["kl_per_token"] > 1e-4
    assert got["top1_agreement"] == pytest.approx(agree / 39)


@pytest.mark.parametrize("argv, needle", [
    (["--rank", "0"], "--rank is 0"),
    (["--layer-dropout", "1"], "--layer-dropout is 1.0"),
    (["--exit-weights", "1,-1"], "--exit-weights holds -1.0"),
    (["--curriculum", "zigzag"], "invalid choice"),
    (["--exits", "9"], "--exits must lie in [0, 4]"),
    (["--exits", "1,2", "--exit-weights", "1"], "1 exit weights for 2 exit points"),
    (["--samples", "/nonexistent"], "--samples /nonexistent is not a folder"),
    (["--init-adapter", "/nonexistent.safetensors"], "adapter file /nonexistent.safetensors does not exist"),
    (["--ce-target", "teacher"], "give --ce-weight > 0 too"),
])
def test_bad_adapt_options_fail_in_one_line(argv, needle, tmp_path, capsys):
    rc = main(["adapt", "train", "--backbone", "random:mistral", "--out", str(tmp_path / "r"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "r").exists()
