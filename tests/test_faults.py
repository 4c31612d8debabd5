"""Faults survived: SIGKILL at random and at chosen moments of head training (a checkpoint write,
the heads save, a log append) and of a sweep (half a row written), two sweeps on one file, SIGINT
during generate and train, a full disk during train, sweep and report.

Chosen moments are reached without touching the package: the child process wraps one OS call
(`fsync`, `write`, `replace`, `Path.write_bytes`) so that its N-th call on a matching path kills
the process, before the call or after writing half of the data."""

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from meestral.cli.main import main
from test_training import corpus  # noqa: F401  (the fixture: seeded word-salad documents)

pytestmark = pytest.mark.slow  # each test runs the real entry point in child processes

STALE = re.compile(r"^\..+\.tmp\d+")

# The child: `python -c CHILD FAULT_JSON ARGV...`; FAULT_JSON is {} (no fault) or
# {"target": "files.fsync" | "files.write" | "decoding.heads.replace" | "write_bytes", "match": str, "nth": int}:
# the module under meestral whose `os` gets the fault, then the os function.
CHILD = r"""
import json, os, signal, sys, types, pathlib
fault, argv = json.loads(sys.argv[1]), sys.argv[2:]
import meestral.files, meestral.decoding.heads
from meestral.cli.main import main
seen = [0]
def where(x):
    return os.readlink(f"/proc/self/fd/{x}") if isinstance(x, int) else str(x)
def hit(x):
    if fault["match"] in os.path.basename(where(x)):
        seen[0] += 1
        return seen[0] == fault["nth"]
    return False
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if fault:
    module, _, name = fault["target"].rpartition(".")
    if name == "write_bytes":
        real_wb = pathlib.Path.write_bytes
        def write_bytes(self, data):
            if hit(self):
                real_wb(self, bytes(data)[: len(data) // 2]); die()
            return real_wb(self, data)
        pathlib.Path.write_bytes = write_bytes
    else:
        mod = sys.modules["meestral." + module]
        real = getattr(os, name)
        def wrapped(*a):
            if hit(a[1] if name == "replace" else a[0]):
                if name == "write":
                    real(a[0], bytes(a[1])[: len(a[1]) // 2])
                die()
            return real(*a)
        mod.os = types.SimpleNamespace(**{**vars(os), name: wrapped})
sys.exit(main(argv))
"""


def child(argv, fault=None, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(fault or {}), *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def stale(folder):
    return sorted(p.name for p in Path(folder).rglob("*") if STALE.match(p.name))


# ---- head training ---------------------------------------------------------------------------------
def train_args(corpus, out, steps=24):
    return ["train", "--backbone", "random:mistral", "--data", corpus, "--exits", "1,3", "--seq-len", "16",
            "--batch", "4", "--val-rows", "4", "--val-fraction", "0.1", "--shuffle-buffer", "4", "--no-progress",
            "--steps", steps, "--ckpt-every", 4, "--val-every", 4, "--log-every", 2, "--optimizer", "adamw",
            "--out", out]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted run: its heads and its log's (split, step) records."""
    out = tmp_path_factory.mktemp("ref") / "run"
    rc, _, err = finish(child(train_args(corpus, out)))
    assert rc == 0, err
    return out


def log_records(out):
    return [(r["split"], r["step"]) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]


def assert_same_run(out, reference):
    ref, got = load_file(str(reference / "heads" / "heads.safetensors")), load_file(str(out / "heads" / "heads.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)  # bitwise
    assert log_records(out) == log_records(reference)  # every record once, none lost
    assert stale(out) == [] and stale(out.parent) == []


def checkpoint_step(out):
    """The step of the checkpoint on disk (it must always be readable), or None."""
    ckpt = out / "checkpoint.pt"
    return torch.load(ckpt, weights_only=True)["step"] if ckpt.exists() else None


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_run(corpus, tmp_path, reference):
    out, rng = tmp_path / "run", random.Random(12)
    argv = train_args(corpus, out)
    kills = 0
    for round in range(3):
        proc = child(argv + (["--resume"] if round else []))
        seen = len(log_records(out)) if (out / "log.jsonl").exists() else 0
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:  # wait for this run's first record...
            if (out / "log.jsonl").exists() and len((out / "log.jsonl").read_bytes().splitlines()) > seen:
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.4))  # ...then kill it at a random moment
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        if proc.returncode != -signal.SIGKILL:
            break  # it finished first: nothing left to interrupt
        kills += 1
        step = checkpoint_step(out)  # never unreadable
        assert step is None or 0 < step < 24
    assert kills >= 1
    rc, _, err = finish(child(argv + ["--resume"]))
    assert rc == 0, err
    assert_same_run(out, reference)


# (what the child's wrapped call is, the file it matches, which call) -> what the kill leaves behind
FAULTS = {
    "checkpoint_written_not_renamed": ({"target": "files.fsync", "match": "checkpoint.pt", "nth": 3},
                                       lambda out: stale(out) != []),
    "checkpoint_half_written": ({"target": "write_bytes", "match": "checkpoint.pt", "nth": 3},
                                lambda out: True),  # half of its bytes are somewhere: the checkpoint must still load
    "heads_saved_not_renamed": ({"target": "decoding.heads.replace", "match": "heads", "nth": 1},
                                lambda out: not (out / "heads").exists() and stale(out) != []),
    "log_half_a_line": ({"target": "files.write", "match": "log.jsonl", "nth": 4},
                        lambda out: not (out / "log.jsonl").read_text().endswith("\n")),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_sigkill_at_a_chosen_moment_then_resume_gives_the_uninterrupted_run(name, corpus, tmp_path, reference):
    fault, left = FAULTS[name]
    out = tmp_path / "run"
    argv = train_args(corpus, out)
    rc, _, err = finish(child(argv, fault))
    assert rc == -signal.SIGKILL, err
    assert left(out)  # the kill happened where it was meant to
    step = checkpoint_step(out)  # the previous checkpoint, intact
    assert step is not None and step % 4 == 0
    rc, _, err = finish(child(argv + ["--resume"]))
    assert rc == 0, err
    assert_same_run(out, reference)


def test_sigint_during_training_is_one_line_and_resumable(corpus, tmp_path):
    out = tmp_path / "run"
    proc = child(train_args(corpus, out, steps=100_000))
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    rc, stdout, err = finish(proc)
    assert rc == 130 and stdout == "", err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.fullmatch(r"meestral: training interrupted at step \d+ of 100000: rerun with --resume to continue "
                        r"from its checkpoint of step \d+\n", err), err
    assert checkpoint_step(out) > 0 and stale(out) == []


def test_sigint_during_generation_is_one_line(tmp_path):
    fifo, work = tmp_path / "prompt", tmp_path / "work"
    os.mkfifo(fifo)
    work.mkdir()
    proc = child(["generate", "--file", fifo, "--backbone", "random:mistral", "--max-new-tokens", "2000", "--json"],
                 cwd=work)
    deadline = time.time() + 120
    while True:  # the FIFO opens once the child reads its prompt: it is inside `main` by then
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as e:
            assert e.errno == errno.ENXIO and time.time() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.01)
    os.write(fd, b"Once upon a time")
    os.close(fd)
    time.sleep(0.5)  # loading or decoding 2,000 tokens (minutes): interrupt it
    proc.send_signal(signal.SIGINT)
    rc, stdout, err = finish(proc)
    assert (rc, stdout, err) == (130, "", "meestral: interrupted\n")
    assert os.listdir(work) == []


# ---- sweeps ----------------------------------------------------------------------------------------
SWEEP = ["sweep", "--backbone", "random:mistral", "--exits", "1,3", "--head", "softmax", "--tasks", "arc_easy",
         "--limit", "6", "--policies", "copy,catchup"]


def sweep_lines(out):
    lines = out.read_text().split("\n")
    assert lines[-1] == "", "the file must end with a whole line"
    rows = [json.loads(line) for line in lines[1:-1]]  # every line whole
    return [r["key"] for r in rows]


def test_sigkill_mid_row_then_rerun_stores_every_point_once(tmp_path):
    out = tmp_path / "sweep.jsonl"
    argv = SWEEP + ["--thresholds", "0.3,0.6", "--out", out]  # 1 + 2 x 2 = 5 points
    rc, _, err = finish(child(argv, {"target": "files.write", "match": "sweep.jsonl", "nth": 3}))
    assert rc == -signal.SIGKILL, err
    assert not out.read_text().endswith("\n")  # half of the third row
    rc, _, err = finish(child(argv))
    assert rc == 0, err
    assert "2 already in" in err
    keys = sweep_lines(out)
    assert len(keys) == len(set(keys)) == 5


def test_two_sweeps_on_one_file_lose_and_duplicate_nothing(tmp_path, capsys):
    out = tmp_path / "sweep.jsonl"
    argv = SWEEP + ["--thresholds", "0.2,0.4,0.6,0.8", "--out", out]  # 1 + 2 x 4 = 9 points
    first = child(argv)
    deadline = time.time() + 300
    while first.poll() is None and time.time() < deadline:
        if out.exists() and out.read_text().count("\n") >= 2:  # the header and a finished point
            break
        time.sleep(0.02)
    assert main([str(a) for a in argv]) == 2  # the second one, while the first runs
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another sweep is writing" in err and str(out) in err, err
    rc, _, err = finish(first)
    assert rc == 0, err
    keys = sweep_lines(out)
    assert len(keys) == len(set(keys)) == 9
    assert main([str(a) for a in argv]) == 0  # afterwards: nothing left to run, nothing added
    assert "running 0" in capsys.readouterr().err and sweep_lines(out) == keys


# ---- a full disk -----------------------------------------------------------------------------------
def whole(folder):
    """No temp file, and every JSON / JSONL / checkpoint file in `folder` parses to its end."""
    assert stale(folder) == []
    for p in Path(folder).rglob("*"):
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".jsonl":
            text = p.read_text()
            assert text == "" or text.endswith("\n"), p
            [json.loads(line) for line in text.splitlines()]
        elif p.suffix == ".pt":
            torch.load(p, weights_only=True)
        elif p.suffix == ".png":
            assert p.read_bytes().endswith(b"IEND\xaeB`\x82"), p  # a PNG's last chunk


def disk_full_line(rc, out, err, folder):
    """Exit 2, no traceback, and the last line of stderr (after any progress of the work done
    before the disk filled) names the full disk and a file in `folder`."""
    assert rc == 2 and out == "", err
    assert "Traceback" not in err and err.count("meestral: error:") == 1, err
    last = err.splitlines()[-1]
    assert last.startswith(f"meestral: error: No space left on device: {folder}") and "the disk is full" in last, err


def no_space(monkeypatch, folder):
    """Writes of files under `folder` through meestral.files (atomic writes, appends) fail as on a
    full disk: an append at its write, a whole file at its flush to disk (after its data went out)."""
    import types

    import meestral.files

    def failing(real):
        def call(fd, *a):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder)):
                if a:  # a write: half of the data goes out first, as when the disk fills mid-write
                    real(fd, bytes(a[0])[: len(a[0]) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, *a)
        return call

    fake = types.SimpleNamespace(**{**vars(os), "fsync": failing(os.fsync), "write": failing(os.write)})
    monkeypatch.setattr(meestral.files, "os", fake)


@pytest.mark.parametrize("command", ["train", "sweep", "report"])
def test_full_disk_is_one_line_and_leaves_no_partial_file(command, monkeypatch, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    no_space(monkeypatch, out)
    if command == "train":
        argv = train_args(corpus, out / "run", steps=6)
    elif command == "sweep":  # a table with one point, then more points to append to it
        argv = SWEEP + ["--thresholds", "0.5", "--policies", "copy", "--out", out / "sweep.jsonl"]
        monkeypatch.undo()
        assert main([str(a) for a in argv]) == 0
        capsys.readouterr()
        no_space(monkeypatch, out)
        argv = SWEEP + ["--thresholds", "0.3,0.5", "--out", out / "sweep.jsonl"]
    else:
        from test_report import write_results

        write_results(out, optional=False)
        argv = ["report", "--results", out]
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    rc = main([str(a) for a in argv])
    disk_full_line(rc, *capsys.readouterr(), out)
    whole(out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing new, nothing cut


@pytest.fixture
def tiny_disk(tmp_path):
    """A 96 KiB tmpfs (needs root and mount(8)); skipped where it cannot be mounted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(disk, leave):
    """Fill the disk but for about `leave` bytes."""
    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(b"\0" * max(0, free - leave))


@pytest.mark.parametrize("command", ["train", "sweep", "report"])
def test_full_tmpfs_is_one_line_and_leaves_no_partial_file(command, tiny_disk, corpus, tmp_path):
    if command == "train":  # the first checkpoint (step 2) is what fills the disk
        fill(tiny_disk, 8 << 10)
        argv = train_args(corpus, tiny_disk / "run", steps=6) + ["--ckpt-every", 2, "--log-every", 100, "--val-every", 100]
    elif command == "sweep":
        fill(tiny_disk, 4 << 10)  # the header and a few rows
        argv = SWEEP + ["--thresholds", "0.2,0.4,0.6,0.8", "--out", tiny_disk / "sweep.jsonl"]
    else:
        from test_report import write_results

        write_results(tiny_disk / "res", optional=False)
        fill(tiny_disk, 16 << 10)  # less than the first figure
        argv = ["report", "--results", tiny_disk / "res"]
    rc, out, err = finish(child(argv))
    disk_full_line(rc, out, err, tiny_disk)
    (tiny_disk / "filler").unlink()
    whole(tiny_disk)
    if command == "report":  # figures copied before the disk filled are whole; the report is not written
        assert not (tiny_disk / "res" / "report.html").exists() and not (tiny_disk / "res" / "report.md").exists()
