"""The batch-1 matmul of the fixed path: a Triton GEMV where it reads the weights faster than cuBLAS.

At batch 1 every linear layer is y = W x with W [N, K] read once: the step is bound by how fast
those bytes come in. On an H100 (benchmarks/gemv_roofline.py, benchmarks/NOTES.md 2026-12-06)
cuBLAS reads the 7B shapes' weights at 2.0-2.7 TB/s, a plain Triton kernel at 2.5-3.0 TB/s, 9-28%
faster per shape: each program owns a few rows of W and walks K in long contiguous runs, so every
weight byte is read once, streamed (evict-first), with enough loads in flight to cover the latency.

`linear(x, w, b)` takes that kernel where it applies (a CUDA tensor of one row, bf16 or fp16), a
second one for up to ROWS rows (catch-up and verify windows, speculate cycles: each weight byte read
once and multiplied into every row on the tensor cores, where cuBLAS's small-M kernels read them
slower; it can take the same norm / gate / residual fusions as the one-row kernel, off by default:
`FUSED_ROWS`) and F.linear everywhere else: more rows (cuBLAS's tiles then share each weight
read well), float32 (the exactness tests compare against HF in float32, and the kernel's summation
order differs from cuBLAS's), gradients (training: the op has no backward), the CPU, or no Triton. The
kernel is a custom op (`meestral::gemv`), so torch.compile keeps it whole inside the compiled
per-layer functions and CUDA graphs capture it like any kernel; its tiling is autotuned per (N, K)
on the first call, which the graph engine makes eagerly before capturing.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from meestral.backbones import pdl

ENABLED = True  # benchmarks switch it off to time cuBLAS in the same run
# The norm before a matmul, and the SiLU gate before and the residual add after one, computed inside
# the GEMV (each one kernel fewer per use, four a Transformer layer). On: full depth on the
# Mistral-7B shape 2.0% faster on an H100 (benchmarks/NOTES.md 2026-12-06; the bench's
# `full_unfused_gemv` row times it off in the same run). The Mamba-2 block takes the residual add
# after out_proj (into its float32 residual stream: `linear_residual_keep`) and, with
# FUSED_MAMBA_NORM, its norm before in_proj.
FUSED = True
# A Mamba-2 block's cast of its (float32) residual stream and its norm inside in_proj's one-row GEMV
# (`cast_norm_linear`), with FUSED. On since the H100 runs of 2026-12-07 (benchmarks/NOTES.md,
# eighth session): full depth on the Codestral-Mamba-7B shape +2.6% / +2.8% in two runs. It was
# 0.8% slower before dependent launches (2026-12-06: every program recomputes the statistic); with
# them the norm was the one kernel of the block that inductor makes, launched serially between two
# dependent launches, and in_proj could not read its first weights while it ran. The bench's
# `full_norm_outside_gemv` row (switch `fusion`) times it off in the same run.
FUSED_MAMBA_NORM = True
# The residual add after a Mamba block's out_proj inside the GEMV (`linear_residual_keep`), with
# FUSED. On since the H100 run of 2026-12-07 (benchmarks/NOTES.md, sixth session: full depth +1.6%
# on the Codestral-Mamba-7B shape); the bench's `full_unfused_gemv` row times it off.
FUSED_KEEP = True
# The same fusions in the several-row kernel (catch-up's deep passes, verify windows, speculate
# cycles). Off: on an H100 (benchmarks/NOTES.md 2026-12-06, third session) catch-up at 1/3 depth
# ran 2.90 ms a token without them and 3.58 ms with them: every program of the several-row kernel
# re-reads all the window's rows of x for the norm's statistic and the gate (tens of MB of L2
# traffic a matmul), where the kernels they save cost a few microseconds. The bench's
# `..._fused_window_gemv` row times them on in the same run.
FUSED_ROWS = False
# The one-row kernel's autotuner also tries each tiling reading two runs of weights before it
# multiplies the first (gemv_kernels.deep_configs: twice the bytes in flight per program, the same
# sums bit for bit): at 4.2 TB/s an H200 needs ~1.4x the bytes in flight an H100 does to cover the
# same latency, and reached 81% of its copy bandwidth at full depth where an H100 reached 88%
# (benchmarks/NOTES.md 2026-12-06). A superset of the one-run tilings, so the tuned choice is never
# slower alone; the bench's `full_one_run_gemv` row (switch `gemv-runs`) times RUNS=1 in the same run.
RUNS = 2
# Up to this many rows (catch-up and verify windows, speculate cycles, small batches) take the
# several-row kernel; more rows are cuBLAS's (its tiles then share each weight read between rows).
ROWS = 16


def kernels(tune: bool = True, runs: int = 1):
    """The Triton GEMV and its launcher, or None without Triton. Apart from the custom op so that
    tests can run it under Triton's CPU interpreter (TRITON_INTERPRET=1, `tune` False: one tiling
    of small blocks instead of the autotuner's timed choice, reading `runs` runs of weights at a time).

    launch(x, w, norm_w=None, eps=0.0, act=False, res=None) -> y [N] computes, with each rounding
    where the unfused torch code rounds (in w's dtype, x's): y = W @ x, where x is first
    `rms_norm(x, norm_w, eps)` (norm_w given; one row of x may then be float32, rounded to w's dtype
    first: `rms_norm(x.to(w.dtype), ...)`) or `silu(x[:K]) * x[K:]` (act: x holds gate then up),
    and y becomes `res + y` (res given; a float32 res gives a float32 y, the product rounded to x's
    dtype first, as torch adds them); keep=True returns (y, the product before the residual add).
    x [M, K] (act: [M, 2K]) of up to ROWS rows gives y [M, N] = x W^T with the same fusions row by
    row (a separate kernel, on the tensor cores). Kernels launch dependent where pdl.py says so."""
    try:
        import triton

        from meestral.backbones import gemv_kernels as gk
    except ImportError:
        return None

    def launch(x, w, norm_w=None, eps=0.0, act=False, res=None, keep=False):
        N, K = w.shape
        flags = dict(NORM=norm_w is not None, ACT=bool(act), RES=res is not None, KEEP=bool(keep), **pdl.launch_kw(x))
        nw, r = x if norm_w is None else norm_w, x if res is None else res  # unused pointers: any tensor
        # y in the dtype `res + product` has in torch (a float32 residual stream stays float32); the
        # product in the weights' dtype (x's but for a float32 x cast before the norm)
        out_dt = _out_dtype(w, res)
        y = torch.empty(*x.shape[:-1], N, dtype=out_dt, device=x.device)
        m = torch.empty(*x.shape[:-1], N, dtype=w.dtype, device=x.device) if keep else y
        if x.dim() == 2:  # several rows: the tensor-core kernel
            args = (x, w, y, nw, r, m, x.shape[0], N, K, float(eps))
            if tune:
                gk.tuned_rows[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, **flags, BLOCK_M=ROWS)
            else:
                gk._gemv_rows[(triton.cdiv(N, 16),)](*args, **flags, BLOCK_M=ROWS, BLOCK_N=16, BLOCK_K=32)
        else:
            args = (x, w, y, nw, r, m, N, K, float(eps))
            if tune:
                kernel = gk.tuned_deep if RUNS > 1 else gk.tuned
                kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, **flags)
            else:
                gk._gemv[(triton.cdiv(N, 4),)](*args, **flags, BLOCK_N=4, BLOCK_K=64, RUNS=runs)
        return (y, m) if keep else y

    return launch


def _out_dtype(w, res):
    return w.dtype if res is None else torch.promote_types(w.dtype, res.dtype)


def _make_op():
    launch = kernels()
    if launch is None:
        return False, False

    @torch.library.custom_op("meestral::gemv", mutates_args=())
    def gemv(x: torch.Tensor, w: torch.Tensor, norm_w: Optional[torch.Tensor], eps: float, act: bool,
             res: Optional[torch.Tensor]) -> torch.Tensor:
        return launch(x, w, norm_w, eps, act, res)

    @gemv.register_fake
    def _(x, w, norm_w, eps, act, res):
        return x.new_empty(*x.shape[:-1], w.shape[0], dtype=_out_dtype(w, res))

    @torch.library.custom_op("meestral::gemv_residual_keep", mutates_args=())
    def gemv_residual_keep(x: torch.Tensor, w: torch.Tensor, res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return launch(x, w, res=res, keep=True)

    @gemv_residual_keep.register_fake
    def _(x, w, res):
        shape = (*x.shape[:-1], w.shape[0])
        return x.new_empty(shape, dtype=torch.promote_types(x.dtype, res.dtype)), x.new_empty(shape)

    return gemv, gemv_residual_keep


# Made at import, not at the first call: the first call is usually inside a function torch.compile
# traces, where registering an op would break the graph. Off CUDA there is nothing to make.
_OP, _KEEP_OP = _make_op() if torch.cuda.is_available() else (False, False)
_HAVE_OP = _OP is not False  # a plain bool: torch.compile cannot take the truth of an op object


def applies(x: torch.Tensor, w: torch.Tensor, rows: int = 1) -> bool:
    """Whether the Triton kernels take x @ w.T: up to `rows` rows of x (1: the one-row GEMV, whose
    fusions need one row), CUDA, bf16 / fp16, no gradients."""
    return (_HAVE_OP and ENABLED and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype
            and x.numel() <= rows * x.shape[-1] and w.is_contiguous() and not (x.requires_grad or w.requires_grad))


def _rows(t):
    """t as the kernels take it: one row flat [K], several [M, K], contiguous."""
    return t.reshape(-1).contiguous() if t.numel() == t.shape[-1] else t.reshape(-1, t.shape[-1]).contiguous()


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, b), through the Triton GEMV where it applies (see the module docstring)."""
    if applies(x, w, ROWS):
        y = _OP(_rows(x), w, None, 0.0, False, None).view(*x.shape[:-1], w.shape[0])
        return y if b is None else y + b
    return F.linear(x, w, b)


def _fuses(x, w) -> bool:
    return FUSED and (applies(x, w) or (FUSED_ROWS and applies(x, w, ROWS)))


def norm_linear(h: torch.Tensor, norm_w: torch.Tensor, eps: float, w: torch.Tensor, rms_norm) -> torch.Tensor:
    """linear(rms_norm(h, norm_w, eps), w): the norm inside the GEMV where it fuses (`rms_norm` is
    the backbone's, base.rms_norm, whose roundings the kernel repeats)."""
    if _fuses(h, w) and norm_w.dtype == h.dtype:
        return _OP(_rows(h), w, norm_w, float(eps), False, None).view(*h.shape[:-1], w.shape[0])
    return linear(rms_norm(h, norm_w, eps), w)


def _casts_and_norms(h, norm_w, w) -> bool:
    """Whether the one-row GEMV takes `cast_norm_linear`: h one row (float32 or w's dtype) on CUDA,
    bf16 / fp16 weights and norm weight, no gradients."""
    return (_HAVE_OP and ENABLED and FUSED and FUSED_MAMBA_NORM and h.is_cuda and h.numel() == h.shape[-1]
            and w.dtype in (torch.bfloat16, torch.float16) and norm_w.dtype == w.dtype
            and h.dtype in (w.dtype, torch.float32) and w.is_contiguous()
            and not (h.requires_grad or w.requires_grad or norm_w.requires_grad))


def cast_norm_linear(h: torch.Tensor, norm_w: torch.Tensor, eps: float, w: torch.Tensor, b: torch.Tensor | None,
                     rms_norm) -> torch.Tensor:
    """linear(rms_norm(h.to(norm_w.dtype), norm_w, eps), w, b): a Mamba block's start, whose residual
    stream h may be float32 (residual_in_fp32). With FUSED_MAMBA_NORM the cast and the norm run
    inside the one-row GEMV (one kernel a block fewer); otherwise, and for windows, the torch code."""
    if _casts_and_norms(h, norm_w, w):
        y = _OP(h.reshape(-1).contiguous(), w, norm_w, float(eps), False, None).view(*h.shape[:-1], w.shape[0])
        return y if b is None else y + b
    return linear(rms_norm(h.to(norm_w.dtype), norm_w, eps), w, b)


def linear_residual(x: torch.Tensor, w: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """res + linear(x, w): the residual add in the GEMV where it fuses."""
    if _fuses(x, w) and res.dtype == x.dtype and res.shape[:-1] == x.shape[:-1]:
        return _OP(_rows(x), w, None, 0.0, False, _rows(res)).view(res.shape)
    return res + linear(x, w)


def linear_residual_keep(x: torch.Tensor, w: torch.Tensor, res: torch.Tensor):
    """(res + linear(x, w), linear(x, w)) as torch computes them (res may be float32: a residual
    stream kept in float32 gives a float32 sum of the product rounded to x's dtype): the add in the
    GEMV where it fuses, one kernel fewer a block. For a Mamba block's out_proj, whose product (the
    mixer's output) the block returns beside the new residual stream."""
    if (FUSED_KEEP and _fuses(x, w) and res.shape[:-1] == x.shape[:-1] and res.dtype in (x.dtype, torch.float32)
            and res.shape[-1] == w.shape[0]):
        out, mixed = _KEEP_OP(_rows(x), w, _rows(res))
        return out.view(res.shape), mixed.view(*x.shape[:-1], w.shape[0])
    mixed = linear(x, w)
    return res + mixed, mixed


def gated_linear_residual(gu: torch.Tensor, w: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """res + linear(silu(gate) * up, w) for gu = [gate, up] (the SwiGLU MLP's down projection):
    the gate and the residual add in the GEMV where it fuses."""
    gate, up = gu.chunk(2, dim=-1)
    if _fuses(gate, w) and res.dtype == gu.dtype and res.shape[:-1] == gu.shape[:-1]:
        return _OP(_rows(gu), w, None, 0.0, True, _rows(res)).view(res.shape)
    return res + linear(F.silu(gate) * up, w)


def module_linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) for a plain nn.Linear without hooks, through `linear`; any other module (quantized,
    adapted through a hook) is called as is."""
    if type(module) is torch.nn.Linear and not (module._forward_hooks or module._forward_pre_hooks):
        return linear(x, module.weight, module.bias)
    return module(x)
