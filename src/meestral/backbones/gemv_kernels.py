"""The Triton source of the batch-1 GEMV (gemv.py says what it computes and why). Apart from the op
so that Triton is imported only where the GEMV runs on a GPU or under Triton's CPU interpreter
(tests), and so that Triton's jit, which compiles each kernel from this file's source and resolves
the helpers it calls in this module's globals, finds them.

Both kernels read their first run of weights before waiting for the previous kernel (PDL,
pdl.py): weights never change during a decode, so that read overlaps the previous kernel's drain;
x, the residual and y are touched only after the wait."""

from __future__ import annotations

import triton
import triton.language as tl

configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "RUNS": 1}, num_warps=w, num_stages=3)
           for n, k, w in ((4, 1024, 8), (8, 1024, 8), (16, 1024, 8), (4, 512, 4), (8, 512, 4), (16, 512, 8))]
# The same tilings reading two runs of weights before multiplying either (twice the bytes in flight
# per program, the same sums in the same order): for a card whose bandwidth needs more bytes in
# flight than one run per program gives (gemv.RUNS).
deep_configs = configs + [triton.Config({**c.kwargs, "RUNS": 2}, num_warps=c.num_warps, num_stages=c.num_stages)
                          for c in configs]


@triton.jit
def _x_run(x_ptr, nw_ptr, cols, K, rstd, dt, NORM: tl.constexpr, ACT: tl.constexpr):
    """x's run `cols` as the one-row kernel multiplies it (float32): normed, or gated."""
    if ACT:
        g = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + K + cols, mask=cols < K, other=0.0).to(tl.float32)
        s = (g * tl.sigmoid(g)).to(dt).to(tl.float32)
        xv = (s * u).to(dt).to(tl.float32)
    else:
        xv = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
        if NORM:
            # x may be a float32 residual stream (a Mamba block's): rounded to the matmul's dtype
            # first, as the torch code's cast before the norm (a no-op for x in that dtype)
            xv = xv.to(dt).to(tl.float32)
            nw = tl.load(nw_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            xv = (nw * (xv * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        else:
            xv = xv.to(tl.float32)
    return xv


@triton.jit
def _gemv(x_ptr, w_ptr, y_ptr, nw_ptr, r_ptr, m_ptr, N, K, eps, NORM: tl.constexpr, ACT: tl.constexpr,
          RES: tl.constexpr, KEEP: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          RUNS: tl.constexpr = 1):
    # Each program owns BLOCK_N rows of w and walks K in runs of BLOCK_K contiguous elements:
    # every weight byte is read once, streamed past the cache (evict-first). RUNS=2 loads two runs
    # before multiplying the first: twice the bytes in flight, each element of acc still summed
    # over the runs in order (the result is RUNS=1's bit for bit).
    dt = w_ptr.dtype.element_ty  # the matmul's dtype (x's); y's may be the float32 of a residual stream
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    # The first run of weights before anything else: they never change, so under PDL (pdl.py)
    # they are read while the previous kernel drains.
    w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=(rows[:, None] < N) & (cols[None, :] < K),
                other=0.0, eviction_policy="evict_first")
    if RUNS == 2:
        c2 = BLOCK_K + cols
        w2 = tl.load(w_ptr + rows[:, None] * K + c2[None, :], mask=(rows[:, None] < N) & (c2[None, :] < K),
                     other=0.0, eviction_policy="evict_first")
    if PDL:  # x, res and y only once the previous kernel is done with them
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    rstd = 1.0
    if NORM:  # the RMS statistic of x first: every program reads x (a few KB, from L2)
        ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            c = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + c, mask=c < K, other=0.0).to(dt).to(tl.float32)
            ss += xv * xv
        rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
    acc = w.to(tl.float32) * _x_run(x_ptr, nw_ptr, cols, K, rstd, dt, NORM, ACT)[None, :]
    if RUNS == 2:
        acc += w2.to(tl.float32) * _x_run(x_ptr, nw_ptr, c2, K, rstd, dt, NORM, ACT)[None, :]
    for k0 in range(RUNS * BLOCK_K, K, RUNS * BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=(rows[:, None] < N) & (cols[None, :] < K),
                    other=0.0, eviction_policy="evict_first")
        if RUNS == 2:
            c2 = k0 + BLOCK_K + tl.arange(0, BLOCK_K)
            w2 = tl.load(w_ptr + rows[:, None] * K + c2[None, :], mask=(rows[:, None] < N) & (c2[None, :] < K),
                         other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * _x_run(x_ptr, nw_ptr, cols, K, rstd, dt, NORM, ACT)[None, :]
        if RUNS == 2:
            acc += w2.to(tl.float32) * _x_run(x_ptr, nw_ptr, c2, K, rstd, dt, NORM, ACT)[None, :]
    y = tl.sum(acc, axis=1).to(dt)
    if KEEP:  # the product itself too, before the residual add (a Mamba block returns both)
        tl.store(m_ptr + rows, y, mask=rows < N)
    if RES:
        y = tl.load(r_ptr + rows, mask=rows < N, other=0.0).to(tl.float32) + y.to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)


# Not keyed on PDL: one tiling for either launch, so both sum in the same order (the cuda tests
# compare them bit for bit).
tuned = triton.autotune(configs=configs, key=["N", "K", "NORM", "ACT", "RES", "KEEP"])(_gemv)
tuned_deep = triton.autotune(configs=deep_configs, key=["N", "K", "NORM", "ACT", "RES", "KEEP"])(_gemv)


@triton.jit
def _x_rows(x_ptr, nw_ptr, m, cols, M, K, XK, rstd, dt, NORM: tl.constexpr, ACT: tl.constexpr):
    """x's rows m, run `cols`, as the several-row kernel multiplies them (in x's dtype)."""
    xm = (m[:, None] < M) & (cols[None, :] < K)
    if ACT:
        g = tl.load(x_ptr + m[:, None] * XK + cols[None, :], mask=xm, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + m[:, None] * XK + K + cols[None, :], mask=xm, other=0.0).to(tl.float32)
        s = (g * tl.sigmoid(g)).to(dt).to(tl.float32)
        xv = (s * u).to(dt)
    else:
        xv = tl.load(x_ptr + m[:, None] * XK + cols[None, :], mask=xm, other=0.0)
        if NORM:
            nw = tl.load(nw_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            xv = (nw[None, :] * (xv.to(tl.float32) * rstd[:, None]).to(dt).to(tl.float32)).to(dt)
    return xv


@triton.jit
def _gemv_rows(x_ptr, w_ptr, y_ptr, nw_ptr, r_ptr, m_ptr, M, N, K, eps, NORM: tl.constexpr, ACT: tl.constexpr,
               RES: tl.constexpr, KEEP: tl.constexpr, PDL: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # A few rows (M <= BLOCK_M): each program owns BLOCK_N rows of w, reads each weight byte once
    # (streamed) and multiplies it into every row of x on the tensor cores; x's padding rows are
    # zeros and never stored. The same fusions as the one-row kernel, row by row, each rounding
    # where the torch code rounds (so the operands of the dot are what F.linear would be given).
    # ("gemv" in the name: the kernel profile classes it as a matmul.)
    dt = w_ptr.dtype.element_ty
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    XK = 2 * K if ACT else K  # x's row stride: gate then up for ACT
    cols = tl.arange(0, BLOCK_K)
    # the first run of weights while the previous kernel drains (PDL), as in the one-row kernel
    w = tl.load(w_ptr + n[:, None] * K + cols[None, :], mask=(n[:, None] < N) & (cols[None, :] < K),
                other=0.0, eviction_policy="evict_first")
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    rstd = tl.full((BLOCK_M,), 1.0, tl.float32)
    if NORM:  # each row's RMS statistic first (the rows are a few KB each, from L2)
        ss = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            c = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + m[:, None] * XK + c[None, :], mask=(m[:, None] < M) & (c[None, :] < K),
                         other=0.0).to(tl.float32)
            ss += xv * xv
        rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=1) / K + eps)
    acc = tl.dot(_x_rows(x_ptr, nw_ptr, m, cols, M, K, XK, rstd, dt, NORM, ACT), tl.trans(w))
    for k0 in range(BLOCK_K, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        xv = _x_rows(x_ptr, nw_ptr, m, cols, M, K, XK, rstd, dt, NORM, ACT)
        w = tl.load(w_ptr + n[:, None] * K + cols[None, :], mask=(n[:, None] < N) & (cols[None, :] < K),
                    other=0.0, eviction_policy="evict_first")
        acc += tl.dot(xv, tl.trans(w))
    y = acc.to(dt)
    ym = (m[:, None] < M) & (n[None, :] < N)
    if KEEP:
        tl.store(m_ptr + m[:, None] * N + n[None, :], y, mask=ym)
    if RES:
        r = tl.load(r_ptr + m[:, None] * N + n[None, :], mask=ym, other=0.0).to(tl.float32)
        y = r + y.to(tl.float32)
    tl.store(y_ptr + m[:, None] * N + n[None, :], y.to(y_ptr.dtype.element_ty), mask=ym)


# The one-row kernel's best tilings walk K in runs of 1024 (benchmarks/NOTES.md): longer runs
# here too, where the several-row kernel read 4-10% slower than the one-row one on an H100.
row_configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
               for n, k, w, st in ((16, 256, 4, 4), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 3),
                                   (16, 512, 4, 3), (64, 256, 8, 3), (16, 1024, 8, 3), (32, 512, 8, 3),
                                   (16, 1024, 4, 2), (32, 512, 4, 4))]
tuned_rows = triton.autotune(configs=row_configs, key=["N", "K", "NORM", "ACT", "RES", "KEEP"])(_gemv_rows)
