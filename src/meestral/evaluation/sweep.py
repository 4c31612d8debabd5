"""Threshold sweeps: thresholds x state policies x tasks, with baselines, in one resumable table.

Points
- `full`: the full model (no exit heads), once per task: the reference every point is set against.
- early exit: every (policy, threshold) pair; `verify` is catch-up that checks its drafts;
  `speculate` drafts from the first exit point and is priced as generation runs it at its default
  k (scoring.decide; its answers are the full model's, its cost is what varies with the threshold).
- `static`: always exit at one layer (a head of kind `static`), under the `copy` policy.
- `layer_drop`: DYNAMAX's baseline: the N blocks before the last are removed (a pruned model).

Storage: one append-only JSONL file. Its first line is a header naming what makes rows comparable
(backbone fingerprint, heads, example limit); every other line is one finished point, keyed by the
hash of its configuration. A restarted sweep reads the keys present and runs only the missing
points; a line cut short by a kill (the last line, no newline, not a row) is dropped on restart;
any other line that is not a row refuses the file, naming the line (a stored row is never dropped).
A file written for another configuration is refused, not mixed in. A sweep holds a lock on its file (flock(2),
released when the process ends, even by SIGKILL): a second sweep on the same file while the
first runs is refused, so no point is run or stored twice.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from meestral.errors import MeestralError
from meestral.files import append_line, create_new

FORMAT = 1


@dataclass
class SweepSpec:
    tasks: list[str]
    thresholds: list[float]
    policies: list[str] = field(default_factory=lambda: ["copy", "catchup", "verify"])
    static_layers: list[int] = field(default_factory=list)
    layer_drops: list[int] = field(default_factory=list)
    limit: int | None = None
    max_backlog: int = 8
    exit_output: str = "hidden"

    def check(self, num_layers: int):
        from meestral.decoding.heads import check_thresholds

        if not self.tasks:
            raise MeestralError("no tasks given: pass e.g. --tasks arc_easy,piqa")
        if not self.thresholds:
            raise MeestralError("the thresholds list is empty: pass e.g. --thresholds 0.5,0.7,0.9")
        check_thresholds(self.thresholds, len(self.thresholds))
        from meestral.decoding.config import POLICIES

        for p in self.policies:
            if p not in POLICIES:
                raise MeestralError(f"unknown policy {p!r} in --policies: use {', '.join(POLICIES)}")
        for l in self.static_layers:
            if not 0 <= l <= num_layers - 2:
                raise MeestralError(f"static exit layer {l} out of range: use a layer in [0, {num_layers - 2}]")
        for n in self.layer_drops:
            if not 1 <= n <= num_layers - 2:
                raise MeestralError(f"layer drop {n} out of range: drop between 1 and {num_layers - 2} blocks")
        if self.limit is not None and self.limit < 1:
            raise MeestralError(f"--limit {self.limit} must be at least 1")


def points(spec: SweepSpec) -> list[dict]:
    """Every point of the sweep, in the order they run (cheap exact-path ones first per task)."""
    out = []
    for task in spec.tasks:
        out.append(dict(task=task, baseline="full", policy="full", threshold=None, layer=None))
        for policy in sorted(spec.policies, key=lambda p: p not in ("catchup", "verify", "speculate")):
            for th in sorted(spec.thresholds, reverse=True):
                out.append(dict(task=task, baseline=None, policy=policy, threshold=float(th), layer=None))
        for l in spec.static_layers:
            out.append(dict(task=task, baseline="static", policy="copy", threshold=0.0, layer=int(l)))
        for n in spec.layer_drops:
            out.append(dict(task=task, baseline="layer_drop", policy="full", threshold=None, layer=int(n)))
    return out


def point_key(header: dict, point: dict, spec: SweepSpec) -> str:
    body = json.dumps({"h": header, "p": point, "backlog": spec.max_backlog, "out": spec.exit_output},
                      sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:20]


def _row(line: bytes) -> tuple[dict | None, str]:
    """The row stored on one line, or None and why it is not one."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8: byte 0x{line[e.start]:02x} at offset {e.start} of the line"
    try:
        row = json.loads(text)
    except ValueError as e:
        return None, f"invalid JSON: {e.msg}"
    if not isinstance(row, dict) or not isinstance(row.get("key"), str):
        return None, 'JSON without a "key"'
    return row, ""


def scan_table(path, raw: bytes | None = None) -> tuple[dict, dict[str, dict], int | None]:
    """(header, rows by key, where to cut) of the sweep table at `path`, read without changing it.

    A last line without its newline that is not a row is half an append cut short by a kill: the
    cut offset drops it. Any other line that is not a row refuses the table, naming the line: it
    may hold a finished point, and dropping it (or everything after it, as a cut would) loses it.
    Blank lines are skipped."""
    path = Path(path)
    if raw is None:
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise MeestralError(f"cannot read results file {path}: {e.strerror}") from None
    lines = raw.split(b"\n")
    try:
        head = json.loads(lines[0])
    except (ValueError, UnicodeDecodeError):
        head = None
    if not isinstance(head, dict) or head.get("meestral_sweep") != FORMAT:
        raise MeestralError(f"{path} is not a MEEstral sweep table: choose another --out")
    rows, bad, cut, start = {}, [], None, len(lines[0]) + 1
    for n, line in enumerate(lines[1:], 2):
        here, start = start, start + len(line) + 1
        if not line.strip():
            continue
        row, why = _row(line)
        if row is not None:
            rows[row["key"]] = row
        elif n == len(lines):  # the unfinished last line (no newline after it)
            cut = here
        else:
            bad.append((n, why))
    if bad:
        where = ", ".join(str(n) for n, _ in bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        if len(bad) == 1:
            what, why, them = f"line {where} is not a sweep row", bad[0][1], "that line"
        else:
            what, why, them = f"lines {where} are not sweep rows", f"line {bad[0][0]}: {bad[0][1]}", "those lines"
        raise MeestralError(f"{path} {what} ({why}): delete {them} (a rerun runs its point again) or choose another "
                            "--out; the file was not changed")
    return head, rows, cut


class ResultsTable:
    """The append-only JSONL table of one sweep configuration."""

    def __init__(self, path, header: dict):
        self.path = Path(path)
        self.header = header
        self.rows: dict[str, dict] = {}
        if not self.path.exists():  # (an OSError, e.g. a full disk, names the file)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            create_new(self.path, lambda t: t.write_text(json.dumps({"meestral_sweep": FORMAT, **header}) + "\n"))
        self._lock = self._take_lock()
        self._read()

    def _take_lock(self):
        import fcntl

        try:
            f = open(self.path, "rb")
        except OSError as e:
            raise MeestralError(f"cannot read results file {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise MeestralError(f"another sweep is writing {self.path} right now: let it finish (a rerun then runs only "
                                "the points still missing) or choose another --out") from None
        return f

    def close(self):
        """Release the file for the next sweep (closing the file, or the process ending, does)."""
        self._lock.close()

    def _read(self):
        try:
            raw = self.path.read_bytes()
        except OSError as e:
            raise MeestralError(f"cannot read results file {self.path}: {e.strerror}") from None
        head, self.rows, cut = scan_table(self.path, raw)
        theirs = {k: v for k, v in head.items() if k != "meestral_sweep"}
        if theirs != self.header:
            diff = sorted(k for k in set(theirs) | set(self.header) if theirs.get(k) != self.header.get(k))
            raise MeestralError(f"{self.path} holds a sweep of another configuration (differs in {', '.join(diff)}): "
                                "choose another --out, or rerun with that configuration")
        if cut is not None:  # half a row from a kill: drop it, so the next row starts on its own line
            with open(self.path, "r+b") as f:
                f.truncate(cut)
        elif not raw.endswith(b"\n"):  # a whole last row without its newline: end it before appending
            append_line(self.path, "")

    def append(self, row: dict):
        # One write of one whole line, flushed to disk: a kill leaves at most a partial last line.
        append_line(self.path, json.dumps(row))
        self.rows[row["key"]] = row


def run_sweep(lm, spec: SweepSpec, out, heads_spec: str, log=None) -> ResultsTable:
    """Run the missing points of `spec` with the loaded `MeestralLM` into the table at `out`."""
    from meestral.evaluation.runner import load_tasks, primary, run_tasks, subset, task_metrics

    log = log or sys.stderr
    bb = lm.bb
    L = bb.num_layers
    spec.check(L)
    base_config, base_heads = lm.dec.config, lm.heads
    if base_heads is None:
        raise MeestralError("a sweep needs exit heads: pass --heads DIR or --head softmax|margin|saturation")
    if Path(out).exists():  # a damaged table is refused before the tasks load (the locked read checks again)
        scan_table(out)
    resolved, task_dict = load_tasks(spec.tasks)
    spec.tasks = resolved
    header = {"backbone": lm.spec, "fingerprint": bb.fingerprint(), "heads": heads_spec,
              "exits": list(base_heads.exit_points), "limit": spec.limit}
    table = ResultsTable(out, header)  # locked until closed (or collected, after a failure)
    todo = list({k: (p, k) for p in points(spec) for k in [point_key(header, p, spec)]}.values())  # each once
    missing = [(p, k) for p, k in todo if k not in table.rows]
    print(f"sweep: {len(todo)} points, {len(todo) - len(missing)} already in {out}, running {len(missing)}",
          file=log, flush=True)
    by_task = {}
    for p, k in missing:
        by_task.setdefault(p["task"], []).append((p, k))
    bar = tqdm(total=len(missing), desc="sweep points", file=log)
    lm.progress = False
    for task, pts in by_task.items():
        one = subset(task_dict, task)
        for p, key in pts:
            lm.configure(point_config(p, base_heads, spec, bb))
            lm.records = []
            t0 = time.perf_counter()
            res = run_tasks(lm, one, limit=spec.limit)
            wall = time.perf_counter() - t0
            metrics = task_metrics(res, task)
            name, value, stderr = primary(task, metrics)
            # Teacher-forced scoring carries no decode time (its time says how fast we *score*),
            # so ms/token is None unless the task decodes; under verify the decision depth is
            # every layer and the drafts' depth is kept apart: both come from `summarize`.
            acc = lm.accounting(reset=True)
            row = {
                "key": key,
                "config": {**header, "task": task, "policy": p["policy"], "baseline": p["baseline"],
                           "threshold": p["threshold"], "layer": p["layer"], "max_backlog": spec.max_backlog,
                           "exit_output": spec.exit_output},
                "task": task, "metric": name, "value": value, "stderr": stderr, "metrics": metrics,
                "agreement": acc.get("agreement"), "num_layers": L,
                **{k: acc.get(k) for k in ("mean_exit_layer", "mean_layers_run", "layer_fraction", "exit_rate",
                                           "flops_per_token", "flops_ratio", "weight_bytes_per_token",
                                           "weight_bytes_ratio", "ms_per_token", "deep_passes_per_token",
                                           "caught_up_per_token", "rolled_back", "exit_histogram",
                                           "draft_mean_layers_run", "draft_layer_fraction", "drafts_per_token",
                                           "draft_acceptance") if k in acc},
                "tokens": acc.get("tokens", 0), "scoring_wall_s": acc.get("wall_s"), "wall_s": wall,
                "requests": acc.get("requests"),
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            table.append(row)
            bar.update(1)
            bar.set_postfix_str(f"{task} {p['baseline'] or p['policy']} {p['threshold'] or p['layer'] or ''}: "
                                f"{name} {value:.3f}")
    bar.close()
    table.close()
    lm.configure(base_config)
    return table


def point_config(p: dict, heads, spec: SweepSpec, bb):
    """The `ExitConfig` of one sweep point."""
    from meestral.decoding.config import EXACT_POLICIES, ExitConfig, layer_drop_skip
    from meestral.decoding.heads import ExitHeads

    if p["baseline"] == "full":
        return ExitConfig()
    if p["baseline"] == "layer_drop":
        return ExitConfig(skip_layers=layer_drop_skip(bb.num_layers, p["layer"]))
    if p["baseline"] == "static":
        return ExitConfig(heads=ExitHeads("static", [p["layer"]], bb), thresholds=0.0, policy="copy",
                          exit_output=spec.exit_output)
    policy = p["policy"]
    return ExitConfig(heads=heads, thresholds=p["threshold"], policy=policy, max_backlog=spec.max_backlog,
                      exit_output="hidden" if policy in EXACT_POLICIES else spec.exit_output)

