"""What the attention kernels' tests share, on the CPU under Triton's interpreter
(test_decode_attention.py, in a subprocess) and on CUDA (test_graph_engine.py): a K/V cache with
holes in its validity, and the comparison of two runs' layer outputs and buffers."""

import torch


def random_cache(state, upto, g):
    """Random K/V everywhere, validity with holes (80% valid) below slot `upto` (on the state's
    device, drawn from `g`, a generator of that device)."""
    dev = state.k_all.device
    state.k_all.copy_(torch.randn(state.k_all.shape, device=dev, generator=g))
    state.v_all.copy_(torch.randn(state.v_all.shape, device=dev, generator=g))
    state.valid[:, :, :upto] = torch.rand(state.valid[:, :, :upto].shape, device=dev, generator=g) < 0.8


def assert_same(a_run, b_run, tol):
    """Every layer's output and the K/V buffers within `tol` (the dtype's rounding); validity exactly."""
    for a, b in zip(a_run, b_run):
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)
