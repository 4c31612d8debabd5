"""A training run's checkpoint (`checkpoint.pt` in its folder): written atomically, read back to
resume, and checked to belong to the run that resumes it."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import torch

from meestral.errors import MeestralError
from meestral.files import atomic_write, remove_stale_temps

CHECKPOINT = "checkpoint.pt"


def read_checkpoint(path: Path) -> dict:
    """The state saved at `path`, on the CPU (tensors and plain values only: loading runs no code);
    a corrupt file says so in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MeestralError(f"{path} is corrupted ({type(e).__name__}): delete it to start over") from None


def previous_checkpoint(out: Path, resume: bool, *also: Path, announce: bool = True) -> dict | None:
    """The checkpoint a run in `out` resumes from, or None to start afresh. An earlier run (its
    checkpoint, or any of `also`) is never overwritten unless resumed."""
    ckpt = out / CHECKPOINT
    if not resume:
        if ckpt.exists() or any(p.exists() for p in also):
            raise MeestralError(f"{out} holds a previous run: pass --resume to continue it or choose another --out")
        return None
    if not ckpt.exists():
        if announce:
            print(f"meestral: no checkpoint in {out}: starting from the beginning", file=sys.stderr)
        return None
    return read_checkpoint(ckpt)


def check_same_run(state: dict | None, identity: dict, out: Path):
    """Refuse to resume a checkpoint whose run-defining fields differ from this run's `identity`:
    it would continue another run."""
    if state is not None and state["config"] != identity:
        diff = sorted(k for k in identity if state["config"].get(k) != identity[k])
        raise MeestralError(f"{out / CHECKPOINT} belongs to a different run ({', '.join(diff)} differ): "
                            "repeat the original arguments or choose another --out")


def prepare_out(out: Path):
    """Create the run's folder; drop the temp files of a run killed while writing one."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)


def save_checkpoint(out: Path, state: dict):
    """Replace `out`'s checkpoint atomically: a kill leaves the previous one whole."""
    buf = io.BytesIO()  # serialised first: a full disk then fails as an OSError of a plain write
    torch.save(state, buf)
    atomic_write(out / CHECKPOINT, lambda t: t.write_bytes(buf.getbuffer()))
