"""Head training: labels, metrics, saved heads, SIGKILL + resume, torchrun, bad inputs."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from meestral.errors import MeestralError
from meestral.decoding.heads import ExitHeads
from meestral.training.head_training import TrainConfig, Trainer, auroc, binary_metrics, consistency_labels
from meestral.training.ranks import load_device
from meestral.cli.main import main

WORDS = "the of and to in is was that for on with as by at from his her they which be this".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """80 seeded word-salad documents in a .jsonl: real enough for tiny random backbones."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(80)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def args(corpus, out, *extra):
    base = ["train", "--backbone", "random:mistral", "--data", str(corpus), "--exits", "1,3", "--seq-len", "16",
            "--batch", "4", "--val-rows", "4", "--val-fraction", "0.1", "--shuffle-buffer", "4", "--no-progress",
            "--out", str(out)]
    return base + [str(x) for x in extra]


def run_cli(argv, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "meestral.cli.train", *argv], env=env, capture_output=True,
                          text=True, timeout=120, **kw)


def heads_tensors(out):
    return load_file(str(out / "heads" / "heads.safetensors"))


# ---- labels ------------------------------------------------------------------------------------
class LensIsIdentity:
    """A stand-in backbone whose logit lens returns the hidden state: labels can be read off by eye."""

    def logits(self, h):
        return h


def test_labels_top1_and_topk_by_hand():
    # Three positions over a 4-token vocabulary; the final layer chose tokens 2, 0 and 3.
    h = torch.tensor([[[0.1, 0.3, 0.9, 0.2],    # token 2 is the exit's argmax
                       [0.5, 0.9, 0.1, 0.2],    # token 0 is the exit's second best
                       [0.8, 0.8, 0.1, 0.8]]])  # token 3 ties for first with 0 and 1
    final = torch.tensor([[2, 0, 3]])
    bb = LensIsIdentity()
    assert consistency_labels(bb, h, final, k=1).tolist() == [[True, False, True]]  # a tie counts as agreement
    assert consistency_labels(bb, h, final, k=2).tolist() == [[True, True, True]]
    final = torch.tensor([[3, 2, 2]])  # two, three and three exit tokens score higher
    assert consistency_labels(bb, h, final, k=2).tolist() == [[False, False, False]]
    assert consistency_labels(bb, h, final, k=3).tolist() == [[True, False, False]]
    assert consistency_labels(bb, h, final, k=4).tolist() == [[True, True, True]]


# ---- metrics -----------------------------------------------------------------------------------
def test_metrics_match_hand_computation():
    logits = torch.tensor([2.0, 1.0, -1.0, 3.0, -2.0, 0.5, -0.5, -3.0])
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1])
    m = binary_metrics(logits, labels)
    # predicted positive: 2.0, 1.0, 3.0, 0.5 -> tp 2, fp 2; fn 2 (-1.0, -3.0); tn 2
    assert m["accuracy"] == 4 / 8 and m["precision"] == 2 / 4 and m["recall"] == 2 / 4
    assert m["f1"] == pytest.approx(0.5) and m["label_rate"] == 0.5 and m["pred_rate"] == 0.5
    assert m["f1_always_exit"] == pytest.approx(2 * 0.5 / 1.5)
    # positive scores 2, 1, -1, -3 vs negatives 3, -2, 0.5, -0.5: pairs won 2+2+1+0 = 7 of 16... by hand:
    # 2 beats -2, 0.5, -0.5 (3); 1 beats -2, 0.5, -0.5 (3); -1 beats -2 (1); -3 beats none -> 7/16
    assert m["auroc"] == pytest.approx(7 / 16)


def test_auroc_counts_ties_as_half():
    scores = torch.tensor([0.1, 0.4, 0.4, 0.8])
    labels = torch.tensor([0, 0, 1, 1])
    # pairs (pos, neg): (0.4, 0.1) 1, (0.4, 0.4) 0.5, (0.8, 0.1) 1, (0.8, 0.4) 1 -> 3.5 / 4
    assert auroc(scores, labels) == pytest.approx(0.875)
    assert auroc(torch.ones(6), torch.tensor([0, 1, 0, 1, 1, 0])) == pytest.approx(0.5)
    assert auroc(torch.rand(5), torch.ones(5)) != auroc(torch.rand(5), torch.ones(5))  # NaN: one class only


# ---- a run in this process ---------------------------------------------------------------------
@pytest.mark.parametrize("shape, features, mlp", [("mistral", "hidden", 0), ("mamba2", "hidden+aux", 8)])
def test_each_saved_head_round_trips_its_own_weights(corpus, tmp_path, shape, features, mlp):
    cfg = TrainConfig(backbone=f"random:{shape}", exits=[1, 2, 4], features=features, mlp_hidden=mlp,
                      data=str(corpus), seq_len=16, batch=2, steps=6, val_every=3, ckpt_every=3, val_rows=2,
                      val_fraction=0.1, shuffle_buffer=2, out=str(tmp_path / "run"), progress=False)
    trainer = Trainer(cfg)
    trainer.run()
    loaded = ExitHeads.load(tmp_path / "run" / "heads", trainer.bb)
    trained = trainer.heads.classifiers
    for j in range(3):
        for a, b in zip(trained[j].parameters(), loaded.classifiers[j].parameters()):
            assert torch.equal(a.cpu(), b.cpu())
    firsts = [next(iter(c.parameters())) for c in trained]
    assert not torch.equal(firsts[0], firsts[1]) and not torch.equal(firsts[1], firsts[2])

    records = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in records] == [("train", 3), ("val", 3), ("train", 6), ("val", 6)]
    keys = {"accuracy", "precision", "recall", "f1", "label_rate", "pred_rate", "auroc"}
    assert all(keys <= set(m) for r in records for m in r["heads"].values())
    train = [r for r in records if r["split"] == "train"]
    assert all(len(r["peak_memory_gib"]) == 1 and r["peak_memory_gib"][0] > 0 for r in train)
    assert {r["peak_memory_kind"] for r in train} == {"host_max_rss"}
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0


# ---- resume after SIGKILL ----------------------------------------------------------------------
@pytest.mark.slow  # spawns training processes
@pytest.mark.parametrize("optimizer", ["schedulefree", "adamw"])  # adamw: the scheduler's state too
def test_sigkill_then_resume_gives_the_uninterrupted_weights(corpus, tmp_path, optimizer):
    common = ["--steps", 30, "--ckpt-every", 5, "--val-every", 10, "--optimizer", optimizer]
    assert run_cli(args(corpus, tmp_path / "ref", *common)).returncode == 0

    out = tmp_path / "killed"
    argv = args(corpus, out, *common)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "meestral.cli.train", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # it was still running: the kill really interrupted it
    assert not (out / "heads").exists()
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 5 <= step < 30

    assert run_cli(argv + ["--resume"]).returncode == 0
    ref, got = heads_tensors(tmp_path / "ref"), heads_tensors(out)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    steps = [json.loads(l)["step"] for l in (out / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 30  # redone steps are logged once


# ---- torchrun ----------------------------------------------------------------------------------
TORCHRUN_COMMON = ["--steps", 8, "--val-every", 4, "--ckpt-every", 4, "--optimizer", "adamw"]


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    assert run_cli(args(corpus, out, *TORCHRUN_COMMON)).returncode == 0
    return out


@pytest.mark.slow  # spawns torchrun
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])  # fsdp: the frozen backbone sharded over the two ranks
def test_two_processes_give_the_one_process_heads(corpus, tmp_path, one_process, mode):
    extra = ["--fsdp"] if mode == "fsdp" else []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "meestral.cli.train", *args(corpus, tmp_path / "two", *TORCHRUN_COMMON, *extra)],
                         env=env, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-2000:]
    one, both = heads_tensors(one_process), heads_tensors(tmp_path / "two")
    assert all(torch.allclose(one[k], both[k], atol=1e-6, rtol=1e-5) for k in one)
    assert not torch.equal(one["classifiers.0.weight"], torch.zeros_like(one["classifiers.0.weight"]))
    last = [json.loads((p / "log.jsonl").read_text().splitlines()[-1]) for p in (one_process, tmp_path / "two")]
    train = [json.loads(l) for l in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert all(len(r["peak_memory_gib"]) == 2 for r in train if r["split"] == "train")  # one per rank
    for layer in ("1", "3"):  # validation covers both ranks' rows
        assert last[0]["heads"][layer]["n"] == last[1]["heads"][layer]["n"]
        assert last[0]["heads"][layer]["auroc"] == pytest.approx(last[1]["heads"][layer]["auroc"], abs=1e-6)


def test_sharded_runs_build_random_backbones_where_one_process_would():
    # A checkpoint gives the same weights anywhere, so sharded runs stage it in host memory; a
    # random backbone's weights follow the generator of the device it is built on, so a sharded
    # run that built it on the CPU would train heads for another backbone than a GPU run's.
    assert load_device("/models/mistral", shard=True, device="cuda:1") == "cpu"
    assert load_device("random:mistral-7b", shard=True, device="cuda:1") == "cuda:1"
    assert load_device("/models/mistral", shard=False, device="cuda:1") == "cuda:1"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: CPU and CUDA generators differ only there")
def test_a_random_backbone_differs_between_cpu_and_gpu():
    # Why load_device exists; if the generators ever agree, load_device's exception can go.
    from meestral.backbones.loading import load_backbone

    assert load_backbone("random:mistral", device="cpu").fingerprint() != load_backbone(
        "random:mistral", device="cuda").fingerprint()


# ---- bad inputs --------------------------------------------------------------------------------
def _empty(d):
    (d / "empty").mkdir()
    (d / "empty" / "a.txt").write_text("\n")
    return d / "empty"


def _broken(d):
    (d / "x.parquet").write_bytes(b"PAR1 garbage")
    return d / "x.parquet"


@pytest.mark.parametrize("change, needle", [
    (lambda d, c: ["--data", _empty(d)], "holds no text"),
    (lambda d, c: ["--data", _broken(d)], "not a readable parquet"),
    (lambda d, c: ["--exits", "1,6"], "out of range"),
    (lambda d, c: ["--batch", "64", "--seq-len", "512"], "larger than the training data"),
    (lambda d, c: ["--out", c / "sub"], "not writable"),  # a folder inside a file: even root cannot write it
    (lambda d, c: ["--batch", "0"], "--batch is 0"),
    (lambda d, c: ["--topk", "1000"], "exceeds the vocabulary"),
])
def test_bad_inputs_say_one_line_and_write_nothing(corpus, tmp_path, capsys, change, needle):
    out = tmp_path / "out"
    argv = args(corpus, out, "--steps", 2) + [str(x) for x in change(tmp_path, corpus)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and err.startswith("meestral: error:") and "\n" not in err
    assert not out.exists()


def test_an_earlier_run_is_neither_overwritten_nor_mixed(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(corpus, out, "--steps", 2, "--val-rows", 0)) == 0
    before = heads_tensors(out)
    assert main(args(corpus, out, "--steps", 2, "--val-rows", 0)) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(args(corpus, out, "--steps", 3, "--val-rows", 0, "--resume")) == 2
    assert "steps differ" in capsys.readouterr().err
    after = heads_tensors(out)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_used_up_data_stops_early_and_still_saves(tmp_path, capsys):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": " ".join(WORDS[i:] + WORDS[:i])}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    assert main(args(small, out, "--steps", 10_000, "--val-rows", 0, "--ckpt-every", 10_000)) == 0
    assert "used up" in capsys.readouterr().err
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < step < 10_000 and (out / "heads" / "heads.safetensors").exists()


def test_config_needs_a_length():
    with pytest.raises(MeestralError, match="--steps or --tokens"):
        TrainConfig().total_steps()
    assert TrainConfig(tokens=1000, batch=2, seq_len=100).total_steps() == 5


# ---- training learns ---------------------------------------------------------------------------
def test_trained_heads_beat_always_exit_on_held_out_text(tmp_path):
    """Strict (top-1) labels on the embedded corpus: after a short run every head separates the
    tokens it may leave on from the rest on held-out documents better than the always-exit
    baseline (F1 of predicting "exit" everywhere) and well above chance (AUROC)."""
    cfg = TrainConfig(backbone="random:mistral", exits=[1, 3], data="embedded", seq_len=128, batch=8, steps=30,
                      lr=1e-2, topk=1, balance=True, val_every=30, val_rows=32, log_every=30, ckpt_every=1000,
                      out=str(tmp_path / "run"), progress=False, seed=0)
    last = Trainer(cfg).run()
    assert last["split"] == "val" and set(last["heads"]) == {"1", "3"}
    for layer, m in last["heads"].items():
        assert m["n"] >= 32 * 127  # every held-out position was scored
        assert m["f1"] > m["f1_always_exit"] + 0.03, (layer, m)
        assert m["auroc"] > 0.6, (layer, m)
