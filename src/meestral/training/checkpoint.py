"""A training run's folder and checkpoint (`checkpoint.pt` in it): the folder checked to be new,
empty or a run of the same kind (`check_out`) and held by one process at a time (`prepare_out`:
files.FolderLock); the checkpoint written atomically, read back to resume, and checked to belong
to the run that resumes it."""

from __future__ import annotations

import fnmatch
import io
import sys
from pathlib import Path

import torch

from meestral.errors import MeestralError
from meestral.files import FolderLock, atomic_write, remove_stale_temps

CHECKPOINT = "checkpoint.pt"

# kind -> (its command, what it writes into its folder, the key only its checkpoint has). A folder
# holding anything else (hidden files aside: temp files, the lock) is not a run of that kind.
RUNS = {
    "train": ("meestral train", ("heads", CHECKPOINT, "log.jsonl", "curves.png", "tb"), "heads"),
    "adapt": ("meestral adapt train", (CHECKPOINT, "log.jsonl", "curves.png", "tb", "adapter.safetensors"), "lora"),
    "distill": ("meestral distill train", (CHECKPOINT, "log.jsonl", "config.json", "student", "mamba2-smol.gguf"),
                "student"),
    "sample": ("meestral distill sample", ("shard-*.pt", "STOP"), None),
}


def _of(name: str, kind: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in RUNS[kind][1])


def run_kind(folder: Path) -> str | None:
    """The kind of run whose files alone `folder` holds, when one of them is its own (not shared
    with another kind: a checkpoint and a log alone could be any)."""
    names = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
    for kind in RUNS:
        own = [n for n in names if not any(_of(n, k) for k in RUNS if k != kind)]
        if names and all(_of(n, kind) for n in names) and own:
            return kind
    return None


def check_out(out: Path, kind: str, option: str = "--out") -> None:
    """Before any work: `out` is new, empty, or a run of `kind` that no live process is writing
    (two runs in one folder would interleave their logs and overwrite each other's checkpoints)."""
    holder = FolderLock.holder(out)
    if holder:
        raise MeestralError(f"{option} {out} is in use by another run ({holder}): let it finish, or choose another {option}")
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and not _of(p.name, kind))
    if foreign:
        other = run_kind(out)
        if other:
            raise MeestralError(f"{option} {out} holds a `{RUNS[other][0]}` run, not a `{RUNS[kind][0]}` run: "
                                f"choose another {option}")
        raise MeestralError(f"{option} {out} is not empty and is not a `{RUNS[kind][0]}` run (it holds "
                            f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}): choose a new or empty folder")


def check_kind(state: dict, kind: str, path: Path) -> None:
    """A checkpoint read back is of a run of `kind` (by the key only that kind's checkpoint has)."""
    if kind in RUNS and RUNS[kind][2] not in state:
        other = next((k for k, (_, _, key) in RUNS.items() if key and key in state), None)
        what = f"a `{RUNS[other][0]}` run's checkpoint" if other else "not a MEEstral run's checkpoint"
        raise MeestralError(f"{path} is {what}, not a `{RUNS[kind][0]}` run's: give the --out folder of a "
                            f"`{RUNS[kind][0]}` run")


def read_checkpoint(path: Path) -> dict:
    """The state saved at `path`, on the CPU (tensors and plain values only: loading runs no code);
    a corrupt file says so in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MeestralError(f"{path} is corrupted ({type(e).__name__}): delete it to start over") from None


def previous_checkpoint(out: Path, resume: bool, *also: Path, announce: bool = True, kind: str | None = None) -> dict | None:
    """The checkpoint a run in `out` resumes from, or None to start afresh. An earlier run (its
    checkpoint, or any of `also`) is never overwritten unless resumed; with `kind`, `out` is first
    checked to be free for a run of that kind (`check_out`) and the checkpoint to be one of its."""
    if kind is not None:
        check_out(out, kind)
    ckpt = out / CHECKPOINT
    if not resume:
        if ckpt.exists() or any(p.exists() for p in also):
            raise MeestralError(f"{out} holds a previous run: pass --resume to continue it or choose another --out")
        return None
    if not ckpt.exists():
        if announce:
            print(f"meestral: no checkpoint in {out}: starting from the beginning", file=sys.stderr)
        return None
    state = read_checkpoint(ckpt)
    if kind is not None:
        check_kind(state, kind, ckpt)
    return state


def check_same_run(state: dict | None, identity: dict, out: Path):
    """Refuse to resume a checkpoint whose run-defining fields differ from this run's `identity`:
    it would continue another run."""
    if state is not None and state["config"] != identity:
        diff = sorted(k for k in {*identity, *state["config"]} if state["config"].get(k) != identity.get(k))
        raise MeestralError(f"{out / CHECKPOINT} belongs to a different run ({', '.join(diff)} differ): "
                            "repeat the original arguments or choose another --out")


def prepare_out(out: Path, kind: str) -> FolderLock:
    """Create the run's folder and lock it for this process (the caller releases the lock when the
    run ends; the process ending does too); drop the temp files of a run killed while writing one.
    The folders created here are removed again on release if the run wrote nothing into them."""
    created = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out, RUNS[kind][0], created=created)
    remove_stale_temps(out)
    return lock


def save_checkpoint(out: Path, state: dict):
    """Replace `out`'s checkpoint atomically: a kill leaves the previous one whole."""
    buf = io.BytesIO()  # serialised first: a full disk then fails as an OSError of a plain write
    torch.save(state, buf)
    atomic_write(out / CHECKPOINT, lambda t: t.write_bytes(buf.getbuffer()))
