"""The log every training run keeps in its folder (`log.jsonl`, one JSON record a line), and the
figure of its curves.

A run continued from its checkpoint first cuts the log back to the checkpoint's step: records
written after the checkpoint describe steps the run now does again, and would stand twice. A run
from the start begins an empty log (a log without a checkpoint is of a run that is being redone).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

from meestral.files import append_line, atomic_write

LOG = "log.jsonl"


def finite(obj):
    """`obj` with every non-finite float (NaN, inf) replaced by None, through dicts and lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(record) -> str:
    """One record as strict JSON (module docstring)."""
    return json.dumps(finite(record), allow_nan=False)


def num(v) -> float:
    """A logged number for plotting: null (an undefined value) as NaN, which leaves a gap."""
    return math.nan if v is None else v


def kept_records(path: Path, resume_step: int) -> list[dict]:
    """The records of `path` a run resumed at `resume_step` keeps: every one up to that step
    (records without a step, such as distillation's export summaries, stay where they are). A line
    cut short by a kill ends the readable part."""
    kept = []
    for line in path.read_text(errors="replace").splitlines(keepends=True):
        try:
            r = json.loads(line) if line.endswith("\n") else None
        except ValueError:
            r = None
        if not isinstance(r, dict):
            break
        if not isinstance(r.get("step"), int) or r["step"] <= resume_step:
            kept.append(r)
    return kept


class RunLog:
    """JSONL records of one run (+ TensorBoard scalars when a trainer names them and TensorBoard is
    importable). `resume_step`: the checkpoint's step the run continues from, or None for a run
    from its start. `scalars(record)` gives a record's (tag, value) pairs for TensorBoard."""

    def __init__(self, out: Path, resume_step: int | None, scalars=None):
        self.path = out / LOG
        self.records: list[dict] = []
        if self.path.exists():
            if resume_step is not None:
                self.records = kept_records(self.path, resume_step)
            atomic_write(self.path, lambda t: t.write_text("".join(dumps(r) + "\n" for r in self.records)))
        self.scalars, self.tb = scalars, None
        if scalars is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # Events after the checkpoint's step are redone, as in the JSONL log.
                self.tb = SummaryWriter(str(out / "tb"), purge_step=0 if resume_step is None else resume_step + 1)
            except ImportError:  # TensorBoard is optional
                pass

    def write(self, record: dict):
        append_line(self.path, dumps(record))
        self.records.append(record)
        if self.tb:
            for tag, value in self.scalars(record):
                self.tb.add_scalar(tag, value, record["step"])

    @contextmanager
    def curves(self, png: Path, loss_title: str):
        """The run's figure, written to `png` as the block ends: the train loss against the step,
        then the validation records and the two axes beside it for the trainer to draw them on."""
        train = [r for r in self.records if r["split"] == "train"]
        with figure(png, ncols=3) as axes:
            axes[0].plot([r["step"] for r in train], [num(r["loss"]) for r in train])
            axes[0].set(title=loss_title, xlabel="step")
            yield [r for r in self.records if r["split"] == "val"], axes[1:]

    def close(self):
        if self.tb:
            self.tb.close()


@contextmanager
def figure(png: Path, ncols: int = 1, size: tuple[float, float] | None = None, dpi: int | None = None):
    """A row of `ncols` axes to draw on; the figure is written atomically to `png` when the block
    ends without an error."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=size or (5 * ncols, 4), squeeze=False)
    try:
        yield list(axes[0])
        fig.tight_layout()
        atomic_write(Path(png), lambda t: fig.savefig(t, format="png", dpi=dpi))
    finally:
        plt.close(fig)
