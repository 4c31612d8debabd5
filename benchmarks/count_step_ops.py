"""Host-side work of one decode step around the captured calls (CPU count, per policy).

On the H200 a batch-1 step is the captured segments (CUDA graphs) plus what the host launches
between them: building the step's tensors, copying them into the graphs' input buffers, the
embedding, sampling, the backlog's bookkeeping. While the host does that after a read, the GPU
idles: the 2026-12-02 profile put it at ~0.8 ms a token under copy and ~1.5 ms under catchup
(benchmarks/NOTES.md). This counts, on the CPU and with the same code, the ATen ops a step runs
outside the graph engine's captured calls (each a kernel launch or a small copy on a GPU; views
and metadata ops left out) and how many of them bring host values to the device (`torch.tensor`),
and times the step's host work outside the calls. Both are proxies, not GPU time.

    python benchmarks/count_step_ops.py [--shape mistral] [--tokens 100]
"""

import argparse
import collections
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import count_layer_ops  # noqa: E402  (beside this file)
from meestral.decoding import graph_engine
from meestral.decoding.config import ExitConfig
from meestral.backbones.loading import random_backbone
from meestral.decoding.decoder import EarlyExitDecoder, SamplingOptions
from meestral.decoding.heads import ExitHeads


# Ops that only make views or metadata: no kernel on a GPU (the list count_layer_ops.py uses).
META = {m.removeprefix("aten::") for m in count_layer_ops.META}


class Outside(TorchDispatchMode):
    """Counts ATen ops run while no captured call (first run or replay) is in progress, and the
    time spent inside them."""

    def __init__(self):
        super().__init__()
        self.depth, self.ops, self.inside_s, self.counting = 0, collections.Counter(), 0.0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting and self.depth == 0:
            name = str(func.overloadpacket).removeprefix("aten.")
            if name not in META or name == "lift_fresh":
                self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    def wrap(self, name):
        orig = getattr(graph_engine.CapturedCall, name)

        def timed(call, *a):
            self.depth += 1
            t = time.perf_counter()
            try:
                return orig(call, *a)
            finally:
                self.inside_s += time.perf_counter() - t
                self.depth -= 1

        setattr(graph_engine.CapturedCall, name, timed)
        return orig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="mistral")
    ap.add_argument("--tokens", type=int, default=100)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    bb = random_backbone(args.shape)
    L = bb.num_layers
    prompt = list(range(1, 40))
    cases = [("full", None, "copy"), *((f"exit@{L // 3}", ExitHeads("static", [L // 3], bb), p)
                                        for p in ("copy", "catchup", "verify"))]
    print(f"{'case':<10} {'policy':<8} {'kernels':>8} {'H2D':>5} {'host us/step':>13}   top ops (per step)")
    for name, heads, policy in cases:
        dec = EarlyExitDecoder(bb, ExitConfig(heads=heads, thresholds=0.0 if heads else 1.0, policy=policy, max_backlog=4), engine="graph")
        opts = SamplingOptions(max_new_tokens=args.tokens)
        dec.generate([prompt], opts)  # every shape captured once: what follows is the steady state
        mode = Outside()
        origs = {n: mode.wrap(n) for n in ("first", "replay")}
        marks = {}

        def seen(view):  # decode steps only: from the prefill's view (step 0) to the last step's
            marks.setdefault("t0", time.perf_counter())
            marks["inside0"] = marks.get("inside0", mode.inside_s)
            marks["t1"], marks["n"] = time.perf_counter(), view.step
            mode.counting = True

        try:
            dec.generate([prompt], opts, inspect=seen)  # timed without the counting mode
            host_us = ((marks["t1"] - marks["t0"]) - (mode.inside_s - marks["inside0"])) / marks["n"] * 1e6
            mode.counting = False
            with mode:
                dec.generate([prompt], opts, inspect=seen)
        finally:
            for n, f in origs.items():
                setattr(graph_engine.CapturedCall, n, f)
        n = marks["n"]
        top = ", ".join(f"{op} {c / n:.1f}" for op, c in mode.ops.most_common(6))
        h2d = mode.ops["lift_fresh"] / n  # torch.tensor(host values): a host-to-device copy on a GPU
        kernels = sum(c for op, c in mode.ops.items() if op != "lift_fresh") / n
        print(f"{name:<10} {policy:<8} {kernels:>8.1f} {h2d:>5.1f} {host_us:>13.0f}   {top}")


if __name__ == "__main__":
    main()
