"""The batch-1 matmul of the fixed path: a Triton GEMV where it reads the weights faster than cuBLAS.

At batch 1 every linear layer is y = W x with W [N, K] read once: the step is bound by how fast
those bytes come in. On an H100 (benchmarks/gemv_roofline.py, benchmarks/NOTES.md 2026-12-06)
cuBLAS reads the 7B shapes' weights at 2.0-2.7 TB/s, a plain Triton kernel at 2.5-3.0 TB/s, 9-28%
faster per shape: each program owns a few rows of W and walks K in long contiguous runs, so every
weight byte is read once, streamed (evict-first), with enough loads in flight to cover the latency.

`linear(x, w, b)` takes that kernel where it applies (a CUDA tensor of one row, bf16 or fp16) and
F.linear everywhere else: more than one row (catch-up windows, verify, batches: cuBLAS's tiles
then share each weight read between rows), float32 (the exactness tests compare against HF in
float32, and the kernel's summation order differs from cuBLAS's), gradients (training: the op has
no backward), the CPU, or no Triton. The
kernel is a custom op (`meestral::gemv`), so torch.compile keeps it whole inside the compiled
per-layer functions and CUDA graphs capture it like any kernel; its tiling is autotuned per (N, K)
on the first call, which the graph engine makes eagerly before capturing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ENABLED = True  # benchmarks switch it off to time cuBLAS in the same run


def _make_op():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return False

    configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=3)
               for n, k, w in ((4, 1024, 8), (8, 1024, 8), (16, 1024, 8), (4, 512, 4), (8, 512, 4), (16, 512, 8))]

    @triton.autotune(configs=configs, key=["N", "K"])
    @triton.jit
    def _gemv(x_ptr, w_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=(rows[:, None] < N) & (cols[None, :] < K),
                        other=0.0, eviction_policy="evict_first")
            xv = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
            acc += w.to(tl.float32) * xv.to(tl.float32)[None, :]
        tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=rows < N)

    @torch.library.custom_op("meestral::gemv", mutates_args=())
    def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        N, K = w.shape
        y = torch.empty(N, dtype=x.dtype, device=x.device)
        _gemv[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](x, w, y, N, K)
        return y

    @gemv.register_fake
    def _(x, w):
        return x.new_empty(w.shape[0])

    return gemv


# Made at import, not at the first call: the first call is usually inside a function torch.compile
# traces, where registering an op would break the graph. Off CUDA there is nothing to make.
_OP = _make_op() if torch.cuda.is_available() else False
_HAVE_OP = _OP is not False  # a plain bool: torch.compile cannot take the truth of an op object


def applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (_HAVE_OP and ENABLED and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype
            and x.numel() == x.shape[-1] and w.is_contiguous() and not (x.requires_grad or w.requires_grad))


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, b), through the Triton GEMV where it applies (see the module docstring)."""
    if applies(x, w):
        y = _OP(x.reshape(-1).contiguous(), w).view(*x.shape[:-1], w.shape[0])
        return y if b is None else y + b
    return F.linear(x, w, b)


def module_linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) for a plain nn.Linear without hooks, through `linear`; any other module (quantized,
    adapted through a hook) is called as is."""
    if type(module) is torch.nn.Linear and not (module._forward_hooks or module._forward_pre_hooks):
        return linear(x, module.weight, module.bias)
    return module(x)
