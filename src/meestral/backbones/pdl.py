"""Programmatic dependent launch (PDL) for our Triton kernels: each one launched while its
predecessor still runs.

At batch 1 a 7B decode step is ~200 kernels, and inside a CUDA graph each one still starts only
when its predecessor has ended: its programs are scheduled and ramp up to full bandwidth, and at
the end its last wave drains while other SMs idle. On an H200 that fixed cost (~0.7 ms a token on
the Mistral-7B shape, benchmarks/NOTES.md 2026-12-06) is about the same absolute time as on an
H100, so the faster memory reads 81% of its copy bandwidth where the H100 reads 88%.

With PDL (Hopper and later: the launch attribute "programmatic stream serialization", PTX
`griddepcontrol`) a kernel is launched as soon as every program of its predecessor has started
(`gdc_launch_dependents`); its programs then wait (`gdc_wait`, which returns once the predecessor
has completed and its writes are visible) before they touch anything a predecessor writes or
reads. Before the wait a kernel may read only what never changes during a decode: weights (the
GEMV reads its first run of them there, overlapping the previous kernel's drain), or what only
kernels before its predecessor write, where that predecessor is always one of ours (each launches
its dependents after its own wait, so all kernels before it have completed): the Mamba-2 step
reads its recurrent state there, after in_proj's GEMV (mamba2_kernels._scan).

Every kernel of ours that launches this way waits before reading an activation or writing
anything, so each completes only after its predecessor has: the stream's order holds for the
kernels around them too (inductor's, cuBLAS's, copies, which launch as usual). Inductor's own PDL
option is not used: its kernels wait only where inductor's previous node wrote what they read,
which says nothing of the kernel before them in our graphs.
"""

from __future__ import annotations

import os

import torch

# On since the H100 run of 2026-12-07 (benchmarks/NOTES.md, sixth session): full depth +1.8% on the
# Codestral-Mamba-7B shape, +0.6% on Mistral-7B's, catch-up +2.0% / +0.3%; the cuda tests equal
# serial launches. The bench times the other setting in the same run (`full_serial_launches`).
ENABLED = True

_CAPABLE: dict = {}  # device index -> whether PDL can run there


def _capable(device: torch.device) -> bool:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABLE:
        try:
            import triton.language as tl
            have = hasattr(tl.extra.cuda, "gdc_wait") and hasattr(tl.extra.cuda, "gdc_launch_dependents")
        except (ImportError, AttributeError):
            have = False
        _CAPABLE[idx] = have and torch.cuda.get_device_capability(idx)[0] >= 9
    return _CAPABLE[idx]


def capable(t: torch.Tensor) -> bool:
    """Whether kernels working on t can launch dependent: a CUDA tensor on a Hopper or later GPU, a
    Triton that has the griddepcontrol calls, not Triton's CPU interpreter."""
    return t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1" and _capable(t.device)


def on(t: torch.Tensor) -> bool:
    """Whether kernels working on t launch dependent: the switch, and `capable`."""
    return ENABLED and capable(t)


def launch_kw(t: torch.Tensor) -> dict:
    """The keywords a launch of one of our kernels takes: `PDL` (the kernel's constexpr: wait before
    touching activations) and Triton's `launch_pdl` (the launch attribute) where `on(t)`."""
    return {"PDL": True, "launch_pdl": True} if on(t) else {"PDL": False}
