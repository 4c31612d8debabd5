"""backbones/gemv.py: the Triton GEMV of one-row matmuls, run on the CPU by Triton's interpreter
(skipped where Triton is not installed): plain, with the RMS norm before it, with the SwiGLU gate
before it and the residual add after it (into a float32 residual stream too, the product kept),
a float32 row cast and normed inside, two runs of weights in flight (bit for bit as one), and the
kernel for windows of up to gemv.ROWS rows with the same fusions row by row, each equal to the torch
code it replaces within the dtype's rounding; where it does not apply (the CPU, more
rows, float32, gradients) everything stays F.linear. On CUDA the cuda-marked tests in
test_graph_engine.py run it for real; test_pdl.py compiles it for Hopper."""

import pytest
import torch
import torch.nn.functional as F

from meestral.backbones import gemv
from meestral.backbones.base import rms_norm


# Run in a fresh process: the interpreter must be on before Triton is imported (its library
# functions are made then), and must stay off in this one (on a GPU machine torch.compile uses Triton).
CHECK = r"""
import sys
import torch
import torch.nn.functional as F
from meestral.backbones import gemv
from meestral.backbones.base import rms_norm

launch = gemv.kernels(tune=False)
launch2 = gemv.kernels(tune=False, runs=2)
for dtype in (torch.bfloat16, torch.float16):
    for N, K in ((37, 200), (8, 64), (130, 96)):
        g = torch.Generator().manual_seed(N * K)
        w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
        x = torch.randn(K, generator=g).to(dtype) * 3
        nw = (1 + 0.1 * torch.randn(K, generator=g)).to(dtype)
        res = torch.randn(N, generator=g).to(dtype)
        gu = torch.randn(2 * K, generator=g).to(dtype)
        gate, up = gu.chunk(2)
        cases = {
            "plain": (launch(x, w), F.linear(x, w)),
            "norm": (launch(x, w, norm_w=nw, eps=1e-5), F.linear(rms_norm(x, nw, 1e-5), w)),
            "residual": (launch(x, w, res=res), res + F.linear(x, w)),
            "gate+residual": (launch(gu, w, act=True, res=res), res + F.linear(F.silu(gate) * up, w)),
            "gate": (launch(gu, w, act=True), F.linear(F.silu(gate) * up, w)),
        }
        # a float32 residual stream cast and normed inside (a Mamba block's in_proj): the kernel
        # rounds x to the weights' dtype first, so it gives exactly what it gives the cast x. The
        # float32 values sit a random fraction of an ulp above the dtype's (below half of one: any
        # rounding mode lands on them, the interpreter's casts not being torch's), enough to move
        # the norm's rounded products where the cast is missing (not a common factor: the norm
        # would cancel it).
        ulp = 2.0 ** (-10 if dtype == torch.bfloat16 else -13)
        x32 = x.float() * (1 + ulp * torch.rand(K, generator=g))
        y32 = launch(x32, w, norm_w=nw, eps=1e-5)
        assert y32.dtype == dtype and torch.equal(y32, launch(x, w, norm_w=nw, eps=1e-5)), f"{dtype} {N}x{K}"
        cases["cast+norm"] = (y32, F.linear(rms_norm(x32.to(dtype), nw, 1e-5), w))
        # a float32 residual stream (a Mamba block's, residual_in_fp32), the product kept too
        res32 = torch.randn(N, generator=g) * 4
        out, mixed = launch(x, w, res=res32, keep=True)
        assert out.dtype == torch.float32 and mixed.dtype == dtype
        cases["kept"] = (mixed, F.linear(x, w))
        # the sum is the float32 add of the rounded product: exactly torch's, given the same product
        # (the product itself may differ from F.linear's by its rounding: compared above)
        assert torch.equal(out, res32 + mixed), f"{dtype} {N}x{K}"
        for name, (a, b) in cases.items():
            torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2, msg=lambda m: f"{name} {dtype} {N}x{K}: {m}")
        # two runs of weights in flight (gemv.RUNS): the same sums in the same order, bit for bit
        # (K 200: two pairs of runs, the last run partial; 64: the second run wholly masked; 96: one pair)
        two = {"plain": launch2(x, w), "norm": launch2(x, w, norm_w=nw, eps=1e-5), "residual": launch2(x, w, res=res),
               "gate+residual": launch2(gu, w, act=True, res=res), "gate": launch2(gu, w, act=True),
               "cast+norm": launch2(x32, w, norm_w=nw, eps=1e-5)}
        for name, y in two.items():
            assert torch.equal(y, cases[name][0]), f"two runs: {name} {dtype} {N}x{K}"
        # A window of rows: the several-row kernel. In float16 only: Triton 3.6's interpreter gets
        # tl.dot of bfloat16 operands wrong (garbage on the CPU); the cuda tests check bf16 on a GPU.
        # Each fusion row by row, as the torch code computes it for the whole window.
        for M in (2, 5, gemv.ROWS) if dtype == torch.float16 else ():
            xm = torch.randn(M, K, generator=g).to(dtype) * 3
            rm = torch.randn(M, N, generator=g).to(dtype)
            gum = torch.randn(M, 2 * K, generator=g).to(dtype)
            gm, um = gum.chunk(2, dim=-1)
            rows = {
                "plain": (launch(xm, w), F.linear(xm, w)),
                "norm": (launch(xm, w, norm_w=nw, eps=1e-5), F.linear(rms_norm(xm, nw, 1e-5), w)),
                "residual": (launch(xm, w, res=rm), rm + F.linear(xm, w)),
                "gate+residual": (launch(gum, w, act=True, res=rm), rm + F.linear(F.silu(gm) * um, w)),
            }
            rm32 = torch.randn(M, N, generator=g) * 4
            out, mixed = launch(xm, w, res=rm32, keep=True)
            assert out.dtype == torch.float32 and mixed.dtype == dtype and torch.equal(out, rm32 + mixed)
            rows["kept"] = (mixed, F.linear(xm, w))
            for name, (a, b) in rows.items():
                torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2,
                                           msg=lambda m: f"{M} rows {name} {dtype} {N}x{K}: {m}")
            xm2 = xm.clone()  # each row's statistic is its own: a far element moves its row only
            xm2[1, -1] += 40
            moved = (launch(xm2, w, norm_w=nw, eps=1e-5) != rows["norm"][0]).any(-1).tolist()
            assert moved[1] and not any(moved[:1] + moved[2:]), moved
        x2 = x.clone()  # the norm's statistic spans all of x: one far element moves every output
        x2[-1] += 40
        assert not torch.allclose(launch(x2, w, norm_w=nw, eps=1e-5).float(), cases["norm"][0].float())
# two runs at a time over many pairs of runs (K 1000: 16 runs, the last partial): each run counted
# once, in its place (the float32 sums round away below the output dtype's ulp: not their order)
g = torch.Generator().manual_seed(5)
for dtype in (torch.bfloat16, torch.float16):
    w, x = torch.randn(24, 1000, generator=g).to(dtype), torch.randn(1000, generator=g).to(dtype)
    assert torch.equal(launch2(x, w), launch(x, w)), dtype
    assert torch.equal(launch2(x, w, norm_w=x, eps=1e-5), launch(x, w, norm_w=x, eps=1e-5)), dtype
print("ok")
"""


def test_every_variant_equals_the_torch_code_it_replaces():
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


# A Mamba-2 block's start through the kernel (gemv.FUSED_MAMBA_NORM): its float32 residual stream
# cast and normed inside in_proj's GEMV, token by token (output and state-only steps), against the
# per-module path; the kernel stands in for the op on CPU tensors under the interpreter.
MAMBA = r"""
import torch
from meestral.backbones import gemv
from meestral.backbones.base import Step
from meestral.backbones.loading import random_backbone

launch = gemv.kernels(tune=False)
calls = []
def op(x, w, nw, eps, act, res):
    calls.append((x.dtype, nw is not None, w.shape[0]))
    return launch(x, w, nw, eps, act, res)
# the op stands for the kernel on CPU tensors: the condition without its CUDA test, every other
# matmul left to torch (gemv._HAVE_OP stays False off CUDA)
gemv._OP, gemv.FUSED, gemv.FUSED_MAMBA_NORM = op, True, True
gemv._casts_and_norms = lambda h, nw, w: h.numel() == h.shape[-1] and h.dtype in (w.dtype, torch.float32)
bb = random_backbone("mamba2", seed=4)
bb.model.to(torch.bfloat16)
assert bb.model.config.residual_in_fp32
ref, got = bb.new_state(1), bb.new_state(1)
gen = torch.Generator().manual_seed(3)
for t in range(3):
    step = Step(t, torch.full((1, 1), t), torch.ones(1, 1, dtype=torch.bool))
    h = torch.randn(1, 1, bb.hidden_size, generator=gen)  # a float32 residual stream
    for i in range(bb.num_layers):
        want, want_mixed = bb.forward_layer(i, h, ref, step)
        bb.fill_propagate(i, h * 0.5, ref, step)
        n = len(calls)
        out, mixed = bb.forward_layer_fixed(i, h, got, step, None)
        bb.fill_propagate_fixed(i, h * 0.5, got, step, None)
        # in_proj whole (output) and without its gate rows (state only), each from float32
        m = bb.model.backbone.layers[i].mixer
        N = m.in_proj.out_features
        assert calls[n:] == [(torch.float32, True, N), (torch.float32, True, N - m.intermediate_size)], calls[n:]
        torch.testing.assert_close(out.float(), want.float(), atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(mixed.float(), want_mixed.float(), atol=3e-2, rtol=3e-2)
        for x, y in zip(bb.layer_tensors(got, i), bb.layer_tensors(ref, i)):
            torch.testing.assert_close(x.float(), y.float(), atol=3e-2, rtol=3e-2)
        h = want
print("ok")
"""


def test_mamba_block_norm_inside_in_proj_equals_the_module_path():
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", MAMBA], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_where_it_does_not_apply_the_helpers_are_the_torch_code(monkeypatch):
    """Off CUDA (and with FUSED on) each helper is exactly the composition it stands for."""
    monkeypatch.setattr(gemv, "FUSED", True)
    monkeypatch.setattr(gemv, "FUSED_KEEP", True)
    monkeypatch.setattr(gemv, "FUSED_MAMBA_NORM", True)
    g = torch.Generator().manual_seed(0)
    h, w, nw = torch.randn(1, 1, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(16, generator=g)
    gu, wd = torch.randn(1, 1, 32, generator=g), torch.randn(16, 16, generator=g)
    assert not gemv.applies(h, w)
    assert torch.equal(gemv.linear(h, w), F.linear(h, w))
    assert torch.equal(gemv.norm_linear(h, nw, 1e-6, w, rms_norm), F.linear(rms_norm(h, nw, 1e-6), w))
    assert torch.equal(gemv.linear_residual(h, wd, h), h + F.linear(h, wd))
    out, mixed = gemv.linear_residual_keep(h, wd, h.double())
    assert torch.equal(mixed, F.linear(h, wd)) and torch.equal(out, h.double() + F.linear(h, wd))
    gate, up = gu.chunk(2, dim=-1)
    assert torch.equal(gemv.gated_linear_residual(gu, wd, h), h + F.linear(F.silu(gate) * up, wd))
    nb, b = nw.bfloat16(), torch.randn(8, generator=g).bfloat16()
    assert torch.equal(gemv.cast_norm_linear(h, nb, 1e-6, w.bfloat16(), b, rms_norm),
                       F.linear(rms_norm(h.bfloat16(), nb, 1e-6), w.bfloat16(), b))
