"""Training runs under faults (issue 21: train, adapt train, distill train/sample/export).

- One run per output folder: an exclusive lock (files.FolderLock), a folder that is not a run of the
  same kind refused, a checkpoint of another kind refused by every command that reads one.
- Ctrl-C always stops, between two steps, with exit 130: also when it lands inside a finaliser
  run while a checkpoint is written or a validation is drawn (where Python swallows a
  KeyboardInterrupt).
- One resume rule for every log: records after the checkpoint are dropped; a log with no
  checkpoint is of a run that never finished its first one, and starts over empty (after a kill -9
  or a full disk alike).
- Strict JSON logs; refusals of options that would train nothing or something else, before anything
  is written (no empty folder left behind either).

Subprocess cases (two runs at once, an external Ctrl-C, kill -9) are in the slow tier."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from meestral.cli.main import main
from meestral.errors import MeestralError
from meestral.files import LOCK, FolderLock
from test_cli import assert_one_line_error
from test_distill import TINY_STUDENT, _run as distill_cfg, distill_killed_at, tiny_teacher  # noqa: F401  (the fixture)
from test_distill import llama, tiny_sampler  # noqa: F401  (the fixture)

WORDS = ("river stone light open table winter paper green sound market quiet number garden yellow school "
         "morning window travel simple letter").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Seeded word-salad documents (a .jsonl): enough text for tiny random backbones, with held-out
    documents for head training's validation and adaptation's measurements."""
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 120))) for _ in range(120)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


def train_argv(corpus, out, *extra, steps=8):
    return ["train", "--backbone", "random:mistral", "--data", corpus, "--exits", "1,3", "--seq-len", "16",
            "--batch", "4", "--val-rows", "4", "--val-fraction", "0.1", "--shuffle-buffer", "4", "--no-progress",
            "--steps", str(steps), "--ckpt-every", "4", "--val-every", "4", "--log-every", "2", "--optimizer", "adamw",
            "--out", str(out), *map(str, extra)]


def adapt_argv(corpus, out, *extra, steps=6):
    return ["adapt", "train", "--backbone", "random:mistral", "--corpus", corpus, "--exits", "1,3", "--seq-len", "16",
            "--batch", "2", "--steps", str(steps), "--val-every", "3", "--val-tokens", "64", "--ckpt-every", "3",
            "--log-every", "1", "--no-progress", "--out", str(out), *map(str, extra)]


def run_main(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def records(out):
    """(split or 'step', step) of every record of `out`/log.jsonl, read as strict JSON."""
    rows = [json.loads(line, parse_constant=_not_json) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return [(r.get("split", "step"), r["step"]) for r in rows if "step" in r]


def _not_json(word):
    raise ValueError(f"{word} is not JSON")


def visible(folder):
    """What a user sees in `folder` (hidden temp and lock files aside)."""
    return sorted(p.name for p in Path(folder).iterdir() if not p.name.startswith("."))


# ---- one run per folder --------------------------------------------------------------------------
OUT_USERS = {  # command -> argv writing into `out` (the lock is met before any model is loaded)
    "train": lambda c, out: train_argv(c, out),
    "adapt": lambda c, out: adapt_argv(c, out),
    "distill": lambda c, out: ["distill", "train", "--out", out, "--steps", "2"],
    "sample": lambda c, out: ["distill", "sample", "--out", out, "--shards", "1"],
}


@pytest.mark.parametrize("command", list(OUT_USERS))
def test_a_folder_held_by_another_run_is_refused_in_one_line(command, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    lock = FolderLock(out, "meestral train")  # flock(2): a second open of the file conflicts, in this process too
    try:
        rc, stdout, err = run_main(OUT_USERS[command](corpus, out), capsys)
        assert_one_line_error(rc, stdout, err, [str(out), "in use by another run", f"pid {os.getpid()}, meestral train",
                                                "choose another"])
        assert visible(out) == []
    finally:
        lock.release()


# A folder of each kind, as its run leaves it (the names are what check_out reads; contents do not matter).
RUN_FILES = {"train": ["heads", "log.jsonl"], "adapt": ["adapter.safetensors", "log.jsonl"],
             "distill": ["config.json", "log.jsonl"], "sample": ["shard-000-00000.pt"]}
COMMAND = {"train": "meestral train", "adapt": "meestral adapt train", "distill": "meestral distill train",
           "sample": "meestral distill sample"}


def _fill(folder, names):
    folder.mkdir()
    for name in names:
        (folder / name).write_text("x")


@pytest.mark.parametrize("command, other", [("train", "adapt"), ("adapt", "train"), ("adapt", "distill"),
                                            ("distill", "train"), ("sample", "distill"), ("train", "sample")])
def test_a_run_of_another_kind_in_out_is_refused_and_kept(command, other, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    _fill(out, RUN_FILES[other])
    rc, stdout, err = run_main(OUT_USERS[command](corpus, out), capsys)
    assert_one_line_error(rc, stdout, err, [f"--out {out} holds a `{COMMAND[other]}` run, not a `{COMMAND[command]}` run",
                                            "choose another --out"])
    assert visible(out) == sorted(RUN_FILES[other]) and all((out / n).read_text() == "x" for n in RUN_FILES[other])


@pytest.mark.parametrize("command", list(OUT_USERS))
def test_an_unrelated_folder_in_out_is_refused_and_kept(command, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    _fill(out, ["notes.txt", "photo.png"])
    rc, stdout, err = run_main(OUT_USERS[command](corpus, out), capsys)
    assert_one_line_error(rc, stdout, err, [f"--out {out} is not empty and is not a `{COMMAND[command]}` run",
                                            "notes.txt, photo.png", "choose a new or empty folder"])
    assert visible(out) == ["notes.txt", "photo.png"]


# ---- a checkpoint of another kind ----------------------------------------------------------------
CHECKPOINT_OF = {"train": {"heads": {}, "step": 4}, "adapt": {"lora": {}, "step": 4}, "distill": {"student": {}, "step": 4}}
READERS = {  # command -> argv reading `out`/checkpoint.pt
    "train --resume": lambda c, out: train_argv(c, out, "--resume"),
    "adapt train --resume": lambda c, out: adapt_argv(c, out, "--resume"),
    "adapt export": lambda c, out: ["adapt", "export", "--out", out],
    "distill export": lambda c, out: ["distill", "export", "--out", out],
}
READER_KIND = {"train --resume": "train", "adapt train --resume": "adapt", "adapt export": "adapt",
               "distill export": "distill"}


@pytest.mark.parametrize("reader, kind", [(r, k) for r in READERS for k in CHECKPOINT_OF if READER_KIND[r] != k])
def test_a_checkpoint_of_another_kind_is_named_not_called_corrupted(reader, kind, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    torch.save(CHECKPOINT_OF[kind], out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    rc, stdout, err = run_main(READERS[reader](corpus, out), capsys)
    want = COMMAND[READER_KIND[reader]]
    assert_one_line_error(rc, stdout, err, [f"{out / 'checkpoint.pt'} is a `{COMMAND[kind]}` run's checkpoint, "
                                            f"not a `{want}` run's", f"give the --out folder of a `{want}` run"])
    assert "corrupted" not in err
    assert visible(out) == ["checkpoint.pt"] and (out / "checkpoint.pt").read_bytes() == before


# ---- refused before anything is written ----------------------------------------------------------
def _refusals(corpus, tmp):
    empty = tmp / "no-shards"  # made by the test
    out = tmp / "out"
    T, A = train_argv(corpus, out), adapt_argv(corpus, out)
    D = ["distill", "train", "--out", out, "--steps", "4"]
    return {
        "train_warmup_longer_than_run": (T + ["--warmup", "1000", "--steps", "2"],
                                         ["--warmup 1000 is longer than the run (2 steps)", "lower --warmup"]),
        "train_val_rows_without_val_fraction": (T + ["--val-fraction", "0", "--val-rows", "16"],
                                                ["--val-fraction 0", "--val-rows 16", "--val-rows 0"]),
        "train_lr_1e308": (T + ["--lr", "1e308"], ["--lr is 1e+308", "(0, 1]"]),
        "adapt_warmup_longer_than_run": (A + ["--warmup", "50"], ["--warmup 50 is longer than the run (6 steps)"]),
        "adapt_every_weight_zero": (A + ["--final-weight", "0", "--exit-weights", "0,0"],
                                    ["every loss weight is 0", "at least one weight > 0"]),
        "adapt_exits_twice": (A[:A.index("--exits")] + A[A.index("--exits") + 2:] + ["--exits", "2,2"],
                              ["--exits lists 2 twice", "give each exit point once"]),
        "adapt_samples_without_shards": (A + ["--samples", empty], [f"--samples {empty} holds no shard-*.pt"]),
        "adapt_corpus_share_without_samples": (A + ["--corpus-share", "0.3"],
                                               ["--corpus-share", "--samples, which is not given", "drop --corpus-share"]),
        "distill_shape_unknown_key": (D + ["--shape", "bogus_key=3"], ["--shape bogus_key=3", "not a shape key",
                                                                       "hidden_size"]),
        "distill_shape_negative": (D + ["--shape", "hidden_size=-32"], ["--shape hidden_size=-32", ">= 1"]),
        "distill_shape_not_a_number": (D + ["--shape", "hidden_size=abc"], ["--shape", "key=integer", "hidden_size=abc"]),
        "distill_shape_heads_do_not_split": (D + ["--shape", "hidden_size=100"], ["head_dim", "is not a multiple"]),
        "distill_corpus_share_without_data": (D + ["--corpus-share", "0.1"], ["--corpus-share", "--data is not given"]),
        "distill_corpus_share_without_corpus": (D + ["--data", empty, "--corpus", "none", "--corpus-share", "0.1"],
                                                ["--corpus-share", "--corpus is none"]),
        "distill_warmup_longer_than_run": (D + ["--warmup", "10"], ["--warmup 10 is longer than the run (4 steps)"]),
        "distill_init_missing": (D + ["--init", tmp / "nothing-here.gguf"],
                                 ["--init", "nothing-here.gguf", "not 'mamba2-smol', a GGUF file or an HF folder"]),
        "sample_teacher_random": (["distill", "sample", "--out", out, "--teacher", "random:mistral"],
                                  ["teacher 'random:mistral' is not a folder", "'smollm2' or an HF model folder"]),
    }


REFUSALS = list(_refusals("c", Path("t")))


@pytest.mark.parametrize("name", REFUSALS)
def test_refused_in_one_line_before_anything_is_written(name, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "no-shards").mkdir()
    argv, words = _refusals(corpus, tmp_path)[name]
    rc, stdout, err = run_main(argv, capsys)
    assert_one_line_error(rc, stdout, err, words)
    assert visible(tmp_path) == ["no-shards"] and visible(tmp_path / "no-shards") == []  # no --out folder, empty or not


def test_distill_waits_for_missing_data_saying_so_then_refuses(tmp_path, capsys):
    from meestral.training.distill import DistillConfig, distill

    missing = tmp_path / "shards"
    cfg = DistillConfig(data=str(missing), out=str(tmp_path / "out"), steps=2, wait_seconds=0.3, device="cpu")
    with pytest.raises(MeestralError, match=f"--data {missing} does not exist: give the --out folder of "
                                            "`meestral distill sample`"):
        distill(cfg, log=lambda *_: None)
    err = capsys.readouterr().err
    assert f"--data {missing} does not exist yet: waiting up to 0.3 s" in err
    assert os.listdir(tmp_path) == []


def test_distill_device_defaults_as_every_command():
    from meestral.cli.main import make_parser
    from meestral.training.distill import DistillConfig, resolved

    parser = make_parser()
    for argv in (["distill", "train"], ["distill", "sample", "--out", "x"], ["distill", "export", "--out", "x"]):
        assert parser.parse_args(argv).device is None, argv
    assert resolved(DistillConfig()).device == ("cuda" if torch.cuda.is_available() else "cpu")


# ---- strict JSON, file modes, no empty log -------------------------------------------------------
def test_logs_are_strict_json_with_null_for_undefined_values(tmp_path):
    from meestral.training.run_log import RunLog, dumps

    rec = {"split": "val", "step": 3, "loss": float("nan"), "heads": {"1": {"auroc": float("inf"), "f1": 0.5}},
           "kl": [1.0, float("-inf")]}
    assert dumps(rec) == ('{"split": "val", "step": 3, "loss": null, "heads": {"1": {"auroc": null, "f1": 0.5}}, '
                          '"kl": [1.0, null]}')
    log = RunLog(tmp_path, None)
    log.write(rec)
    assert records(tmp_path) == [("val", 3)]  # parsed with NaN/Infinity refused
    assert json.loads((tmp_path / "log.jsonl").read_text())["loss"] is None


def test_heads_safetensors_is_written_like_every_other_file(tmp_path):
    from meestral.backbones.loading import load_backbone
    from meestral.decoding.heads import ExitHeads

    old = os.umask(0o022)
    try:
        ExitHeads("classifier", [1, 3], load_backbone("random:mistral")).save(tmp_path / "heads")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "heads").iterdir()}
    assert modes == {"heads.json": 0o644, "heads.safetensors": 0o644}


def _failing(call, match, nth=1, err=errno.ENOSPC):
    """meestral.files' `os` with `call` (write or fsync) failing with `err` on its `nth` call on a
    file whose name contains `match` (a full disk, met at that moment)."""
    seen = [0]
    real = getattr(os, call)

    def wrapped(fd, *a):
        if match in os.path.basename(os.readlink(f"/proc/self/fd/{fd}")):
            seen[0] += 1
            if seen[0] == nth:
                raise OSError(err, os.strerror(err))
        return real(fd, *a)

    return types.SimpleNamespace(**{**vars(os), call: wrapped})


def test_a_failed_first_append_leaves_no_empty_log(tmp_path, monkeypatch):
    import meestral.files
    from meestral.files import append_line

    log = tmp_path / "log.jsonl"
    monkeypatch.setattr(meestral.files, "os", _failing("write", "log.jsonl"))
    with pytest.raises(OSError, match="No space left on device") as e:
        append_line(log, '{"step": 1}')
    assert e.value.filename == str(log) and not log.exists()
    monkeypatch.setattr(meestral.files, "os", _failing("write", "log.jsonl", nth=2))
    append_line(log, '{"step": 1}')
    with pytest.raises(OSError):
        append_line(log, '{"step": 2}')
    assert log.read_text() == '{"step": 1}\n'  # cut back to the last whole line


# ---- Ctrl-C: always a stop, between two steps ----------------------------------------------------
class SigintInFinaliser:
    """Sends SIGINT to this process from its own `__del__`, so that the handler runs inside a
    finaliser: where the garbage collector runs finalisers while a checkpoint is written or a
    figure drawn, Python only prints a KeyboardInterrupt raised there ("Exception ignored in") and
    the run went on to its end (issue 21, fault 5)."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):  # the handler runs between these bytecodes, inside the finaliser
            pass


def ctrl_c_inside(module, name, monkeypatch, nth=1):
    """`module.name` pressing Ctrl-C (inside a finaliser) on its `nth` call, then doing its work."""
    real, calls = getattr(module, name), [0]

    def wrapped(*a, **kw):
        calls[0] += 1
        if calls[0] == nth:
            SigintInFinaliser()  # dropped at once: its __del__ runs here
        return real(*a, **kw)

    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.slow  # a few seconds of training each
@pytest.mark.parametrize("nth", [1, 2])  # at step 4 or at the last step, 8
@pytest.mark.parametrize("moment", ["save_checkpoint", "plot_curves"])
def test_ctrl_c_at_a_checkpoint_or_validation_step_stops_train(moment, nth, corpus, references, tmp_path, capsys,
                                                               monkeypatch):
    from meestral.training import head_training

    out, step = tmp_path / "run", 4 * nth
    ctrl_c_inside(head_training, moment, monkeypatch, nth)
    rc, stdout, err = run_main(train_argv(corpus, out), capsys)
    assert (rc, stdout) == (130, ""), err
    assert err == (f"meestral: training interrupted at step {step} of 8: rerun with --resume to continue from its "
                   f"checkpoint of step {step}\n")
    assert max(s for _, s in records(out)) == step  # not one step more
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == step and not (out / "heads").exists()
    assert not (out / LOCK).exists()
    monkeypatch.undo()
    assert run_main(train_argv(corpus, out, "--resume"), capsys)[0] == 0
    assert records(out) == references["train"] and (out / "heads" / "heads.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("nth", [1, 2])  # at step 3 or at the last step, 6
def test_ctrl_c_at_a_checkpoint_stops_adapt(nth, corpus, references, tmp_path, capsys, monkeypatch):
    from meestral.training import adapt

    out, step = tmp_path / "run", 3 * nth
    ctrl_c_inside(adapt, "save_checkpoint", monkeypatch, nth)
    rc, stdout, err = run_main(adapt_argv(corpus, out), capsys)
    assert (rc, stdout) == (130, ""), err
    assert err == (f"meestral: adaptation interrupted at step {step} of 6: rerun with --resume to continue from its "
                   "last checkpoint\n")
    assert max(s for _, s in records(out)) == step
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == step
    assert not (out / "adapter.safetensors").exists() and not (out / LOCK).exists()
    monkeypatch.undo()
    assert run_main(adapt_argv(corpus, out, "--resume"), capsys)[0] == 0
    assert records(out) == references["adapt"] and (out / "adapter.safetensors").is_file()


@pytest.mark.slow  # SmolLM2's tokenizer
@pytest.mark.parametrize("nth", [1, 2])  # at step 2 or at the last step, 4
def test_ctrl_c_at_a_checkpoint_stops_distill(nth, tiny_teacher, tmp_path, monkeypatch):
    from meestral.training import distill

    out, step = tmp_path / "run", 2 * nth
    ctrl_c_inside(distill, "save_checkpoint", monkeypatch, nth)
    cfg = distill_cfg(tiny_teacher, out, shape=TINY_STUDENT, steps=4, warmup=2, ckpt_every=2)
    with pytest.raises(KeyboardInterrupt, match="distillation interrupted: rerun the same command to continue"):
        distill.distill(cfg, log=lambda *_: None)
    assert max(s for _, s in records(out)) == step
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == step
    assert not (out / "mamba2-smol.gguf").exists() and not (out / LOCK).exists()
    monkeypatch.undo()
    distill.distill(cfg, log=lambda *_: None)
    assert [s for k, s in records(out) if k == "step"][-5:] == [1, 2, 3, 4, 4] and (out / "mamba2-smol.gguf").is_file()


def test_ctrl_c_stops_distill_sample_within_a_token_step_and_the_same_command_continues(llama, tmp_path,
                                                                                      monkeypatch):
    """Ctrl-C (inside a finaliser) at the third forward pass of the second shard: no forward pass
    after it, the first shard kept whole and nothing else left in the folder; the rerun's shard is
    the one an uninterrupted run wrote."""
    teacher_text = tiny_sampler(llama, monkeypatch)
    kw = dict(batch=2, max_new_tokens=8, top_k=20, device="cpu", log=lambda *_: None)
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert teacher_text.sample_teacher("tiny", str(ref), shards=2, **kw) == 2
    after = []  # forward passes of the second shard (9 make one)

    def press_ctrl_c(module, args):
        if (out / "shard-000-00000.pt").exists():
            after.append(1)
            if len(after) == 3:
                SigintInFinaliser()

    handler = signal.getsignal(signal.SIGINT)
    hook = llama.register_forward_pre_hook(press_ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt) as e:
            teacher_text.sample_teacher("tiny", str(out), shards=3, **kw)
    finally:
        hook.remove()
    assert str(e.value) == (f"sampling interrupted: 1 shard written by this run (1 of seed 0 in {out}; a shard not "
                            "finished is not kept): rerun the same command to add more, from shard-000-00001.pt on")
    assert len(after) == 3  # the forward pass it came in finished, no other
    assert sorted(p.name for p in out.iterdir()) == ["shard-000-00000.pt"]  # no temp file, no lock
    assert signal.getsignal(signal.SIGINT) is handler
    assert teacher_text.sample_teacher("tiny", str(out), shards=1, **kw) == 1
    for name in ("shard-000-00000.pt", "shard-000-00001.pt"):
        a, b = (torch.load(d / name, weights_only=True) for d in (ref, out))
        assert [x.tolist() for x in a["docs"]] == [x.tolist() for x in b["docs"]] and a["prompts"] == b["prompts"]


def test_ctrl_c_while_a_shard_is_written_stops_distill_sample_after_it(llama, tmp_path, capsys, monkeypatch):
    teacher_text = tiny_sampler(llama, monkeypatch)
    out = tmp_path / "shards"
    argv = ["distill", "sample", "--teacher", "tiny", "--out", out, "--batch", "2", "--max-new-tokens", "8",
            "--top-k", "20", "--shards", "3", "--device", "cpu"]
    real = teacher_text.atomic_write
    ctrl_c_inside(teacher_text, "atomic_write", monkeypatch)
    rc, stdout, err = run_main(argv, capsys)
    assert rc == 130 and err == (f"meestral: sampling interrupted: 1 shard written by this run (1 of seed 0 in {out}; "
                                 "a shard not finished is not kept): rerun the same command to add more, from "
                                 "shard-000-00001.pt on\n")
    assert [json.loads(line)["shard"] for line in stdout.splitlines()] == ["shard-000-00000.pt"]  # no {"shards": ...}
    assert sorted(p.name for p in out.iterdir()) == ["shard-000-00000.pt"]
    monkeypatch.setattr(teacher_text, "atomic_write", real)
    assert run_main(argv, capsys)[0] == 0
    assert visible(out) == [f"shard-000-{k:05d}.pt" for k in range(4)]


# ---- one resume rule for every log ---------------------------------------------------------------
@pytest.fixture(scope="module")
def references(corpus, tmp_path_factory):
    """Uninterrupted train and adapt runs: their logs' (split, step) records."""
    root = tmp_path_factory.mktemp("ref")
    got = {}
    for command, argv in (("train", train_argv), ("adapt", adapt_argv)):
        assert main(argv(corpus, root / command)) == 0
        got[command] = records(root / command)
    return got


ARGV = {"train": train_argv, "adapt": adapt_argv}
# Where the disk fills: (the call of meestral.files' os that fails, on which file, at which call)
DISK_FULL = {
    "first_log_line": ("write", "log.jsonl", 1),  # nothing written yet
    "first_checkpoint": ("fsync", "checkpoint.pt", 1),  # a log, no checkpoint
    "log_after_a_checkpoint": ("write", "log.jsonl", 6),  # a log running past its checkpoint
}


@pytest.mark.slow  # three short runs each
@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize("moment", list(DISK_FULL))
@pytest.mark.parametrize("command", list(ARGV))
def test_a_full_disk_then_a_rerun_gives_the_uninterrupted_log(command, moment, resume, corpus, references, tmp_path,
                                                              capsys, monkeypatch):
    import meestral.files

    call, match, nth = DISK_FULL[moment]
    out = tmp_path / "run"
    argv = ARGV[command](corpus, out)
    monkeypatch.setattr(meestral.files, "os", _failing(call, match, nth))
    rc, stdout, err = run_main(argv, capsys)
    assert_one_line_error(rc, stdout, err, ["No space left on device", str(out / match), "the disk is full"])
    monkeypatch.setattr(meestral.files, "os", os)
    if moment == "first_log_line":
        assert not out.exists()  # no empty log, no empty folder
    else:
        assert (out / "log.jsonl").stat().st_size > 0
        assert (out / "checkpoint.pt").exists() == (moment == "log_after_a_checkpoint")
    if moment == "log_after_a_checkpoint" and not resume:
        rc, _, err = run_main(argv, capsys)
        assert_one_line_error(rc, "", err, ["holds a previous run: pass --resume"])
        return
    assert run_main(argv + (["--resume"] if resume else []), capsys)[0] == 0
    assert records(out) == references[command]  # no stale row of the failed run, none lost


@pytest.mark.slow  # SmolLM2's tokenizer
def test_a_distill_log_without_a_checkpoint_starts_over_empty(tiny_teacher, tmp_path, monkeypatch):
    """Stopped at its third step, before its first checkpoint: the rerun's log is the whole run's
    records once (the first run's two are of steps the rerun does again)."""
    from meestral.training.distill import distill

    out = tmp_path / "run"
    cfg = distill_cfg(tiny_teacher, out, shape=TINY_STUDENT, steps=4, warmup=2)
    distill_killed_at(cfg, 3, monkeypatch)
    assert not (out / "checkpoint.pt").exists() and [s for _, s in records(out)] == [1, 2]
    distill(cfg, log=lambda *_: None)
    assert [s for k, s in records(out) if k == "step"] == [1, 2, 3, 4, 4]  # train records 1-4, the final eval at 4


def sample_argv(teacher, out, *extra):
    return ["distill", "sample", "--teacher", teacher, "--out", out, "--batch", "2", "--max-new-tokens", "8",
            "--shards", "1", "--device", "cpu", *map(str, extra)]


@pytest.mark.slow  # SmolLM2's tokenizer
def test_distill_sample_beyond_the_teachers_context_is_refused(tiny_teacher, tmp_path, capsys):
    out = tmp_path / "shards"
    argv = sample_argv(tiny_teacher, out)
    argv[argv.index("--max-new-tokens") + 1] = "100000"
    rc, stdout, err = run_main(argv, capsys)
    assert_one_line_error(rc, stdout, err, ["--max-new-tokens 100,000", "teacher has a context of 256",
                                            "lower --max-new-tokens to 128 or less"])
    assert not out.exists()


@pytest.mark.slow  # SmolLM2's tokenizer
def test_distill_sample_on_a_full_disk_is_one_line_and_leaves_nothing(tiny_teacher, tmp_path, capsys, monkeypatch):
    import meestral.files

    out = tmp_path / "shards"
    monkeypatch.setattr(meestral.files, "os", _failing("fsync", "shard-"))
    rc, stdout, err = run_main(sample_argv(tiny_teacher, out), capsys)
    assert_one_line_error(rc, stdout, err, ["No space left on device", str(out / "shard-000-00000.pt"),
                                            "the disk is full"])
    assert not out.exists()  # no half shard, no temp file, no empty folder
    monkeypatch.setattr(meestral.files, "os", os)
    assert run_main(sample_argv(tiny_teacher, out), capsys)[0] == 0  # the same command, once there is room
    assert visible(out) == ["shard-000-00000.pt"]


# ---- in child processes: two runs at once, an external Ctrl-C, kill -9 ---------------------------
# The child: `python -c CHILD SPEC_JSON ARGV...`. SPEC is {} (no fault) or {"module", "name", "nth",
# "action", "marker"}: on its `nth` call, `module.name` is entered by a SIGKILL ("kill"), or by a
# pause inside a finaliser ("pause": MARKER is created, then the child waits for MARKER.go), where a
# Ctrl-C sent meanwhile lands as it did in issue 21's fault 5; then the call does its work.
CHILD = r"""
import importlib, json, os, signal, sys, time
spec, argv = json.loads(sys.argv[1]), sys.argv[2:]
from meestral.cli.main import main
if spec:
    module = importlib.import_module(spec["module"])
    real, calls = getattr(module, spec["name"]), [0]
    class Pause:
        def __del__(self):
            open(spec["marker"], "w").close()
            end = time.time() + 120
            while not os.path.exists(spec["marker"] + ".go") and time.time() < end:
                time.sleep(0.01)
    def wrapped(*a, **kw):
        calls[0] += 1
        if calls[0] == spec["nth"]:
            if spec["action"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            Pause()
        return real(*a, **kw)
    setattr(module, spec["name"], wrapped)
sys.exit(main(argv))
"""


def child(argv, spec=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec or {}), *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_for(path, proc, timeout=180):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def stale(folder):
    return sorted(p.name for p in Path(folder).rglob(".*") if ".tmp" in p.name)


MODULE = {"train": "meestral.training.head_training", "adapt": "meestral.training.adapt"}
STOPPED = {  # (command, paused in) -> the one line Ctrl-C there ends with
    ("train", "save_checkpoint"): "meestral: training interrupted at step 4 of 8: rerun with --resume to continue "
                                  "from its checkpoint of step 4\n",
    ("train", "plot_curves"): "meestral: training interrupted at step 4 of 8: rerun with --resume to continue "
                              "from its checkpoint of step 4\n",
    ("adapt", "save_checkpoint"): "meestral: adaptation interrupted at step 3 of 6: rerun with --resume to continue "
                                  "from its last checkpoint\n",
}


@pytest.mark.slow  # child processes
@pytest.mark.parametrize("command, moment", list(STOPPED))
def test_a_second_run_is_refused_and_ctrl_c_stops_the_first_at_its_step(command, moment, corpus, references,
                                                                        tmp_path):
    """The first run is paused inside a finaliser at its first checkpoint or validation. A second
    run on the same --out is refused in one line naming the first; Ctrl-C then stops the first
    with exit 130 at that step (it used to be swallowed there, and the run went on to its end);
    the resumed run's log is the uninterrupted run's."""
    out, marker = tmp_path / "run", tmp_path / "paused"
    argv = ARGV[command](corpus, out)
    first = child(argv, {"module": MODULE[command], "name": moment, "nth": 1, "action": "pause",
                         "marker": str(marker)})
    try:
        wait_for(marker, first)
        rc, stdout, err = finish(child(argv))
        assert_one_line_error(rc, stdout, err, [f"--out {out} is in use by another run (pid {first.pid}, "
                                                f"{COMMAND[command]})", "let it finish, or choose another --out"])
        first.send_signal(signal.SIGINT)
        Path(str(marker) + ".go").touch()
        rc, stdout, err = finish(first)
    finally:
        first.kill()
    assert (rc, stdout, err) == (130, "", STOPPED[command, moment])
    stopped_at = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert max(step for _, step in records(out)) == stopped_at  # nothing after the Ctrl-C
    assert not (out / LOCK).exists() and stale(out) == []
    rc, _, err = finish(child(argv + ["--resume"]))
    assert rc == 0, err
    assert records(out) == references[command]


@pytest.mark.slow  # child processes
@pytest.mark.parametrize("command, resume", [("train", False), ("adapt", False), ("adapt", True)])
def test_kill_9_before_the_first_checkpoint_then_a_rerun_gives_the_uninterrupted_log(command, resume, corpus,
                                                                                     references, tmp_path):
    """Issue 21, fault 4: the killed run's log has records and no checkpoint; the rerun (with or
    without --resume) takes the dead run's lock over and its log starts over."""
    out = tmp_path / "run"
    argv = ARGV[command](corpus, out)
    rc, _, err = finish(child(argv, {"module": MODULE[command], "name": "save_checkpoint", "nth": 1, "action": "kill"}))
    assert rc == -signal.SIGKILL, err
    assert records(out) and not (out / "checkpoint.pt").exists() and (out / LOCK).exists()
    rc, _, err = finish(child(argv + (["--resume"] if resume else [])))
    assert rc == 0, err
    assert records(out) == references[command]
    assert not (out / LOCK).exists() and stale(out) == []


@pytest.mark.parametrize("argv", [["adapt", "export"], ["distill", "export"]])
def test_an_export_into_a_folder_a_run_holds_is_refused(argv, tmp_path, capsys):
    """An export writes into the run's folder (adapter.safetensors; student/, the GGUF, the log):
    not while a run writes there."""
    out = tmp_path / "run"
    out.mkdir()
    kind = {"adapt": "adapt", "distill": "distill"}[argv[0]]
    torch.save(CHECKPOINT_OF[kind], out / "checkpoint.pt")
    lock = FolderLock(out, COMMAND[kind])
    try:
        rc, stdout, err = run_main(argv + ["--out", out], capsys)
        assert_one_line_error(rc, stdout, err, [f"{out} is in use by another run (pid {os.getpid()}, {COMMAND[kind]})"])
        assert visible(out) == ["checkpoint.pt"]
    finally:
        lock.release()


def test_stop_requests_keep_an_ignored_sigint_ignored():
    """A run started where SIGINT is ignored (nohup, a background job) keeps ignoring it while a
    StopRequests block runs; elsewhere the block installs its handler and restores the old one."""
    import signal

    from meestral.training.interrupt import StopRequests

    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopRequests() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert not stop.requested
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with StopRequests() as stop:
            assert signal.getsignal(signal.SIGINT) == stop._handler
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, old)
