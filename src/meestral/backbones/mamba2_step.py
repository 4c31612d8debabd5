"""One decode step of a Mamba-2 mixer in two Triton kernels: what lies between its two projections.

At batch 1 a Mamba-2 block reads ~220 MB of weights (Codestral Mamba's shape) through in_proj and
out_proj, ~75 us at the H100's copy bandwidth; everything between them (the causal conv's window
shift, SiLU, softplus of dt, the SSM state update and read-out, the gated group RMS norm) moves only
the 4 MB float32 state twice, yet compiled by inductor it ran as several small kernels, ~25 us a
block by the morning's estimate; with these two kernels instead full depth is 6% faster on an H100
(benchmarks/NOTES.md, 2026-12-06, row full_compiled_ssm_step). The two kernels:

1. `_scan`, one program per (row, head, block of head channels): the conv of its own x channels and
   of its group's B and C channels, dt's softplus, the state update `s = s * exp(dt A) + dt x B` and
   the read-out `y = s C + D x`; writes y and its own x channels' conv window.
2. `_gate_norm`, one program per (row, group): y * silu(gate), the RMS norm over the group, the norm
   weight; and the B / C channels' conv windows of the group, shifted here because every head of the
   group reads their old window in kernel 1 (no program may overwrite it before all have read it).

Kernel 2's work inside out_proj's GEMV instead (its input gated and normed per group as the GEMV
reads it, the B / C windows shifted after its wait) was built and measured 0.5-1.7% slower at full
depth on an H100 (benchmarks/NOTES.md, 2026-12-07 ninth session; commits 06c1203 and f9123b0 hold it).

Both take a window of tokens at once (catch-up's deep pass, verify windows, speculate cycles): the
conv taps and the state stay in registers between tokens, so the 4 MB state is read and written
once per window instead of once per token.

Rows whose `write` is False keep their conv window and state (padding, rows that already left), as
the torch code does. Each rounding sits where the torch code (ssm.py's `_mamba2_fixed`) rounds, so
the two agree to the dtype's rounding (tests, under Triton's CPU interpreter; on CUDA against the
torch code in the cuda tests). A step that keeps every token's state (self-speculation's history)
runs them once per token; float32, a conv of other than four taps and the CPU take the torch code.
"""

from __future__ import annotations

from typing import Optional

import torch

ENABLED = True  # the bench switches it off to time inductor's kernels for the same step in one run


def kernels():
    """The launcher of the two kernels (mamba2_kernels.py), or None without Triton.

    launch(proj, conv_state, ssm_state, write, conv_w, conv_b, dt_bias, A_log, D, gnorm_w, *, dims...)
    -> y [B, T, I] in proj's dtype, or None when gnorm_w is None (a state-only step: `propagate`).
    proj [B, T, Dp] is in_proj's output for a window of T tokens: [gate I | x B C (conv_dim) | dt H],
    or without the gate when gnorm_w is None; write [B, T] says which (row, token) pairs change the
    state. conv_state [B, conv_dim, 4] and ssm_state [B, H, P, N] (float32, or proj's dtype: rounded
    to it after every token) change in place."""
    try:
        from meestral.backbones import mamba2_kernels
    except ImportError:
        return None
    return mamba2_kernels.launch


def _make_op():
    launch = kernels()
    if launch is None:
        return False

    @torch.library.custom_op("meestral::mamba2_step", mutates_args=("conv_state", "ssm_state"))
    def mamba2_step(proj: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, write: torch.Tensor,
                    conv_w: torch.Tensor, conv_b: Optional[torch.Tensor], dt_bias: torch.Tensor,
                    A_log: torch.Tensor, D: torch.Tensor, gnorm_w: Optional[torch.Tensor], n_heads: int,
                    head_dim: int, n_groups: int, state_size: int, intermediate: int, group_size: int,
                    gnorm_eps: float, dt_min: float, dt_max: float) -> torch.Tensor:
        out = launch(proj, conv_state, ssm_state, write, conv_w, conv_b, dt_bias, A_log, D, gnorm_w,
                     n_heads=n_heads, head_dim=head_dim, n_groups=n_groups, state_size=state_size,
                     intermediate=intermediate, group_size=group_size, gnorm_eps=gnorm_eps, dt_min=dt_min,
                     dt_max=dt_max)
        return proj.new_empty(0) if out is None else out  # an op returns a tensor: an empty one for propagate

    @mamba2_step.register_fake
    def _(proj, conv_state, ssm_state, write, conv_w, conv_b, dt_bias, A_log, D, gnorm_w, n_heads, head_dim,
          n_groups, state_size, intermediate, group_size, gnorm_eps, dt_min, dt_max):
        return proj.new_empty(*proj.shape[:2], intermediate) if gnorm_w is not None else proj.new_empty(0)

    return mamba2_step


# Made at import, as backbones/gemv.py's op (a registration inside a traced function breaks its graph).
_OP = _make_op() if torch.cuda.is_available() else False
_HAVE_OP = _OP is not False


def applies(proj: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> bool:
    """Whether the kernels take this step: CUDA, bf16 / fp16 activations, a float32 state or one in
    the activations' dtype (ssm.STATE_IN_MODEL_DTYPE), a conv of four taps (the kernels hold them in
    registers), contiguous buffers, no gradients (training steps the torch code)."""
    return (_HAVE_OP and ENABLED and proj.is_cuda and proj.dtype in (torch.bfloat16, torch.float16)
            and ssm_state.dtype in (torch.float32, proj.dtype) and conv_state.shape[-1] == 4
            and conv_state.is_contiguous()
            and ssm_state.is_contiguous() and not proj.requires_grad)


def step(proj, conv_state, ssm_state, write, conv_w, conv_b, dt_bias, A_log, D, gnorm_w, **dims):
    """The kernels over a window of tokens (see `kernels`); only where `applies` says so."""
    proj = proj if proj.stride(-1) == 1 else proj.contiguous()
    out = _OP(proj, conv_state, ssm_state, write.contiguous(), conv_w.contiguous(), conv_b, dt_bias, A_log, D,
              gnorm_w, **dims)
    return out if gnorm_w is not None else None
