"""Writing files so that a reader never sees half of one: every output goes through here."""

from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write(path, write) -> Path:
    """`write(tmp)` into a temporary file in `path`'s folder, flushed to disk, then renamed over
    `path`: a kill or a failure leaves the previous file (or none), never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path, obj, **dumps) -> Path:
    return atomic_write(path, lambda t: t.write_text(json.dumps(obj, **dumps)))
