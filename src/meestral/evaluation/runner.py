"""Run lm-eval tasks on a `MeestralLM` and read back the numbers a sweep or a report needs."""

from __future__ import annotations

import math

from meestral.errors import MeestralError

# The metric each task is read by (lm-eval reports several; these are the usual headline ones).
PRIMARY = {
    "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "hellaswag": "acc_norm", "piqa": "acc_norm",
    "openbookqa": "acc_norm", "boolq": "acc", "winogrande": "acc", "sciq": "acc_norm", "mmlu": "acc",
    "lambada": "acc", "triviaqa": "exact_match", "coqa": "f1",
}
FALLBACK = ("acc_norm", "acc", "exact_match", "f1", "em", "word_perplexity")


def load_tasks(names):
    """(resolved names, lm-eval's loaded tasks {'tasks', 'groups', 'group_map'}) for the offline
    suite (names with or without `meestral_`)."""
    from meestral.evaluation.tasks import resolve_tasks, task_manager

    resolved = resolve_tasks(list(names))
    return resolved, task_manager(resolved).load(resolved)


def subset(loaded: dict, name: str) -> dict:
    """The part of `load_tasks`' result that evaluates task or group `name` alone."""
    if name in loaded["tasks"]:
        return {"tasks": {name: loaded["tasks"][name]}, "groups": {}, "group_map": {}}
    members, stack = set(), [name]
    while stack:
        for child in loaded["group_map"].get(stack.pop(), []):
            members.add(child)
            stack.append(child)
    return {"tasks": {k: v for k, v in loaded["tasks"].items() if k in members},
            "groups": {k: v for k, v in loaded["groups"].items() if k == name or k in members},
            "group_map": {k: v for k, v in loaded["group_map"].items() if k == name or k in members}}


def run_tasks(lm, task_dict, limit=None, bootstrap_iters: int = 1000, log_samples: bool = False) -> dict:
    """lm-eval's own `evaluate` on prebuilt tasks (no reloading between sweep points)."""
    from lm_eval.evaluator import evaluate

    out = evaluate(lm, task_dict, limit=limit, bootstrap_iters=bootstrap_iters, log_samples=log_samples,
                   verbosity="WARNING")
    if out is None:
        raise MeestralError("lm-eval returned no results (non-zero rank?): run on one process")
    return out


def _short(task: str) -> str:
    return task[len("meestral_"):] if task.startswith("meestral_") else task


def task_metrics(results: dict, task: str) -> dict:
    """{metric: value} and {metric_stderr: value} of one task, filters folded ('acc,none' -> 'acc')."""
    raw = results["results"].get(task)
    if raw is None:
        raise MeestralError(f"lm-eval gave no results for task {task!r}")
    out = {}
    for k, v in raw.items():
        if "," not in k or not isinstance(v, (int, float)):
            continue
        name, filt = k.split(",", 1)
        key = name if filt in ("none", "remove_whitespace", "strict-match") or name not in out else f"{name},{filt}"
        if isinstance(v, float) and math.isnan(v):
            continue
        out.setdefault(key, v)
    return out


def primary(task: str, metrics: dict) -> tuple[str, float, float | None]:
    """(metric name, value, stderr) the sweep and report lead with."""
    want = PRIMARY.get(_short(task).split("_")[0] if _short(task) not in PRIMARY else _short(task))
    for name in ([want] if want else []) + list(FALLBACK):
        if name in metrics:
            return name, float(metrics[name]), metrics.get(f"{name}_stderr")
    name = sorted(k for k in metrics if not k.endswith("_stderr"))[0]
    return name, float(metrics[name]), metrics.get(f"{name}_stderr")


def task_token_sequences(bb, tasks, limit=None) -> list[list[int]]:
    """Token ids of the first `limit` documents' prompts, each with its first answer option (what
    lm-eval scores), once per distinct prompt: the oracle's "task prompts" source."""
    _, loaded = load_tasks(tasks)
    seqs = []
    for task in loaded["tasks"].values():
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        seen = set()
        for inst in task.instances:
            ctx = inst.args[0]
            if ctx in seen:
                continue
            seen.add(ctx)
            cont = inst.args[1] if len(inst.args) > 1 and isinstance(inst.args[1], str) else ""
            seqs.append(bb.tokenizer.encode(ctx + cont))
    return seqs
