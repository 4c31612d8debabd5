"""How close batch-1 matmuls (GEMV) come to the weight-read roofline, per weight shape of the 7B
backbones: cuBLAS (F.linear, what the graph engine uses) against a plain Triton GEMV over a small
grid of tilings, each as % of the device-to-device copy bandwidth measured in the same run.

Full depth on the Mistral-7B shape spends 3.94 of its 4.54 busy ms a token in cuBLAS matmuls at
86% of the copy bandwidth (kernel profile, benchmarks/NOTES.md 2026-12-02): at 250 tok/s (the
issue's bar) the whole step has 4.0 ms. Whether a GEMV can read faster decides what is left to
win in the matmuls. Each timing replays a CUDA graph of calls that cycle through enough copies of
the weight to leave the L2 cache cold (a 4096 x 4096 bf16 weight fits in an H200's L2).

It also times the package's own one-row kernel (backbones/gemv.py, autotuned), with the tilings
that read one run of weights at a time and with those that read two (gemv.RUNS).

With --rows M,... it also times windows of M rows (catch-up and verify windows, speculate cycles):
cuBLAS against the package's own kernel for them (backbones/gemv.py, `linear`, autotuned).

    python benchmarks/gemv_roofline.py [--shapes mistral-7b,codestral-mamba-7b] [--rows 5,8] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F

SHAPES = {  # (name, N = out features, K = in features) of one block, then the LM head
    "mistral-7b": [("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
                   ("lm_head", 32768, 4096)],
    "codestral-mamba-7b": [("in_proj", 18560, 4096), ("out_proj", 4096, 8192), ("lm_head", 32768, 4096)],
}


def triton_gemv():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, w_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # y[n] = sum_k w[n, k] x[k]: each program owns BLOCK_N rows of w and walks K, so every
        # weight byte is read once, in rows of BLOCK_K contiguous elements.
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=(rows[:, None] < N) & (cols[None, :] < K),
                        other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=rows < N)

    def gemv(x, w, y, block_n, block_k, warps, stages):
        N, K = w.shape
        kernel[(triton.cdiv(N, block_n),)](x, w, y, N, K, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                                           num_stages=stages)

    return gemv


def graph_time_ms(fn, calls: int, repeats: int = 5) -> float:
    """ms per call of fn(i) for i in range(calls), captured as one CUDA graph, median of repeats."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return sorted(times)[len(times) // 2]


def copy_gbps(nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = graph_time_ms(lambda i: dst.copy_(src), 10)
    return 2 * nbytes / ms / 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="mistral-7b,codestral-mamba-7b")
    ap.add_argument("--json", help="write one JSON row per (shape, kernel) here")
    ap.add_argument("--rows", default="", help="also time windows of these many rows, e.g. 2,5,8")
    ap.add_argument("--cold-bytes", type=float, default=1.0, help="GB of weight copies cycled through (default 1)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    copy = copy_gbps()
    print(f"{torch.cuda.get_device_name()}: copy {copy:,.0f} GB/s (read + write)", file=sys.stderr)
    gemv = triton_gemv()
    from meestral.backbones import gemv as package  # the kernels the decoder uses
    grid = list(itertools.product((4, 8, 16, 32), (512, 1024), (4, 8), (3,)))
    rows = []
    for model in args.shapes.split(","):
        for name, N, K in SHAPES[model]:
            nbytes = N * K * 2
            copies = max(2, int(args.cold_bytes * 1e9 // nbytes))
            ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5 for _ in range(copies)]
            x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(N, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, ws[0])[0].float()
            results = {"cublas": graph_time_ms(lambda i: F.linear(x, ws[i % copies]), copies)}
            for bn, bk, warps, stages in grid:
                if bk > K:
                    continue
                try:
                    gemv(x, ws[0], y, bn, bk, warps, stages)
                    torch.cuda.synchronize()
                    if not torch.allclose(y.float(), ref, atol=2e-2, rtol=2e-2):
                        print(f"  {name} triton {bn}x{bk} w{warps} s{stages}: wrong result", file=sys.stderr)
                        continue
                    results[f"triton n{bn} k{bk} w{warps} s{stages}"] = graph_time_ms(
                        lambda i: gemv(x, ws[i % copies], y, bn, bk, warps, stages), copies)
                except Exception as e:  # a tiling that does not compile is skipped
                    print(f"  {name} triton {bn}x{bk}: {type(e).__name__}", file=sys.stderr)
            best = min((k for k in results if k != "cublas"), key=results.get, default=None)
            timed = [(1, k, results[k]) for k in ("cublas", best) if k is not None]
            # the package's one-row kernel as the decoder runs it (autotuned), with and without the
            # tilings that read two runs of weights at a time (gemv.RUNS)
            default_runs = package.RUNS
            for runs in (1, 2):
                package.RUNS = runs
                got = package.linear(x[0], ws[0]).float()
                if not torch.allclose(got, ref, atol=2e-2, rtol=2e-2):
                    print(f"  {name}: the package's kernel (runs {runs}) is wrong", file=sys.stderr)
                    continue
                timed.append((1, f"meestral {runs} run{'s' if runs > 1 else ''}",
                              graph_time_ms(lambda i: package.linear(x[0], ws[i % copies]), copies)))
            package.RUNS = default_runs
            for M in (int(m) for m in args.rows.split(",") if m):
                xm = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                got, want = package.linear(xm, ws[0]).float(), F.linear(xm, ws[0]).float()
                if not torch.allclose(got, want, atol=2e-2, rtol=2e-2):
                    print(f"  {name} {M} rows: the package's kernel is wrong", file=sys.stderr)
                    continue
                timed.append((M, "cublas", graph_time_ms(lambda i: F.linear(xm, ws[i % copies]), copies)))
                timed.append((M, "meestral rows", graph_time_ms(lambda i: package.linear(xm, ws[i % copies]), copies)))
            for M, kname, ms in timed:
                gbps = nbytes / ms / 1e6
                row = {"model": model, "weight": name, "N": N, "K": K, "M": M, "MB": nbytes / 1e6, "kernel": kname,
                       "us": ms * 1000, "GB/s": gbps, "of_copy": gbps / copy, "device": torch.cuda.get_device_name()}
                rows.append(row)
                print(f"{model:>20} {name:>8} {M:>2}x{N:>6}x{K:<6} {kname:<28} {ms * 1000:8.1f} us {gbps:8.0f} GB/s "
                      f"{gbps / copy:6.1%} of copy", file=sys.stderr)
            del ws
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
