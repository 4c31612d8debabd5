"""Where a decode step's device time goes: one run under torch.profiler, summed per kernel.

A batch-1 decode that reads every weight once is bound by memory bandwidth; when it runs slower,
the question is which kernels take the time (matmuls below bandwidth, many small elementwise
kernels, the device idle while the host works). `kernel_table` answers it from the profiler's
device-side events: time per kernel name, per kernel class, the device's busy time (the union of
kernel intervals) against the wall-clock, and kernels per decoded token. Off CUDA it reports the
CPU operators instead (there is no separate device timeline).
"""

from __future__ import annotations

import re
import time

import torch

# Kernel classes by name: cuBLAS / CUTLASS / nvjet matrix kernels, inductor's Triton kernels,
# copies and fills; everything else (PyTorch's own elementwise / reduction kernels) is "aten".
_CLASSES = (
    ("matmul", re.compile(r"gemm|gemv|cutlass|nvjet|cublas|sm90_xmma|splitK|matmul", re.I)),
    ("triton", re.compile(r"^triton_|triton", re.I)),
    ("copy/fill", re.compile(r"memcpy|memset|copy|fill", re.I)),
)


def kernel_class(name: str) -> str:
    for cls, pat in _CLASSES:
        if pat.search(name):
            return cls
    return "aten"


def _union_us(intervals) -> float:
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def _profile(fn, dev) -> tuple[dict, list, float]:
    """fn() run once under the profiler: its kernels (or, off CUDA, top-level CPU operators) summed
    per name {name: {"name", "calls", "us"}}, their intervals (us), and the wall-clock (ms)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"

    def run(acts):
        if cuda:
            torch.cuda.synchronize(dev)
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(dev)
            wall = (time.perf_counter() - t0) * 1000
        return prof.events(), wall

    # On CUDA the device's events alone: the host's operators are not read, and a 64-block model
    # stepped without graphs makes hundreds of thousands of them, whose event list took minutes to
    # build (a Codestral-shaped profile ran out of its time, benchmarks/NOTES.md 2026-12-07). Where
    # a profiler records no kernel without its CPU activity, it runs again with both.
    events, wall_ms = run([ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU])
    if cuda and not any(e.device_type == torch.autograd.DeviceType.CUDA for e in events):
        events, wall_ms = run([ProfilerActivity.CPU, ProfilerActivity.CUDA])
    rows, intervals = {}, []
    for e in events:
        on_device = e.device_type == torch.autograd.DeviceType.CUDA
        if cuda != on_device:
            continue
        if not cuda and e.cpu_parent is not None:  # CPU: top-level operators only (no double count)
            continue
        a, b = e.time_range.start, e.time_range.end
        r = rows.setdefault(e.name, {"name": e.name, "calls": 0, "us": 0.0})
        r["calls"] += 1
        r["us"] += b - a
        intervals.append((a, b))
    return rows, intervals, wall_ms


def kernel_table(fn, device, per: int = 1, top: int = 15, minus=None) -> dict:
    """Run fn() once under the profiler. Figures are per unit of `per` (e.g. decoded tokens):
    wall_ms, device_busy_ms (union of kernel intervals), kernels, and the `top` kernels by time
    with their calls, ms and share of kernel time; `classes` sums time per kernel class.

    minus: a second function whose run is subtracted, name by name (calls, time), busy time and
    wall-clock: e.g. the prompt and first token alone, so that a generation's table is its decode
    steps only (a Mamba-2 prompt through the chunked scan costs as much device time as a hundred
    decode steps, benchmarks/NOTES.md 2026-12-07, eighth session)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    rows, intervals, wall_ms = _profile(fn, dev)
    busy_us = _union_us(intervals)
    if minus is not None:
        base, base_intervals, base_wall = _profile(minus, dev)
        for name, r0 in base.items():
            r = rows.setdefault(name, {"name": name, "calls": 0, "us": 0.0})
            r["calls"] -= r0["calls"]
            r["us"] -= r0["us"]
        # a name the subtracted run called less often stays, whatever its time: on a busy machine
        # its calls there may have taken longer than the extra ones here (dropping such rows
        # undercounted a CI run's kernels by 13%); its time is then counted as none
        rows = {n: {**r, "us": max(r["us"], 0.0)} for n, r in rows.items() if r["calls"] > 0}
        busy_us = max(busy_us - _union_us(base_intervals), 0.0)
        wall_ms = max(wall_ms - base_wall, 0.0)
    total_us = sum(r["us"] for r in rows.values()) or 1.0
    classes: dict = {}
    for r in rows.values():
        c = kernel_class(r["name"]) if cuda else "cpu-op"
        classes[c] = classes.get(c, 0.0) + r["us"] / 1000 / per
    ranked = sorted(rows.values(), key=lambda r: -r["us"])[:top]
    return {
        "unit": "per token" if per > 1 else "per run",
        "timeline": "device kernels" if cuda else "CPU operators",
        "wall_ms": wall_ms / per,
        "device_busy_ms": busy_us / 1000 / per,
        "kernels": sum(r["calls"] for r in rows.values()) / per,
        "classes_ms": classes,
        "top": [{"name": r["name"][:120], "class": kernel_class(r["name"]) if cuda else "cpu-op",
                 "calls": r["calls"] / per, "ms": r["us"] / 1000 / per, "share": r["us"] / total_us}
                for r in ranked],
    }


def format_table(case: str, t: dict) -> str:
    lines = [f"{case}: wall {t['wall_ms']:.3f} ms, device busy {t['device_busy_ms']:.3f} ms, "
             f"{t['kernels']:.0f} kernels ({t['unit']}; {t['timeline']})",
             "  by class: " + ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(t["classes_ms"].items(), key=lambda kv: -kv[1]))]
    for r in t["top"]:
        lines.append(f"  {r['ms']:8.3f} ms {r['share']:6.1%} {r['calls']:7.1f}x  {r['class']:<9} {r['name'][:90]}")
    return "\n".join(lines)
