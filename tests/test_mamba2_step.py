"""backbones/mamba2_step.py: the Mamba-2 decode step's two Triton kernels, run on the CPU by Triton's
interpreter (skipped where Triton is not installed). Through ssm.py's fixed path, block by block,
batch 2 with one row masked, outputs and every state element equal the per-module path
(forward_layer / fill_propagate, itself checked against HF) within the dtype's rounding: on the tiny
shape (two groups) and on a variant with one group, biases and a time-step clamp that bites, in
bfloat16 and float16. On CUDA the cuda tests in test_graph_engine.py run them for real."""

import os
import subprocess
import sys

import pytest
import torch

from meestral.backbones import mamba2_step

# A fresh process: the interpreter must be on before Triton is imported, and off in this one.
CHECK = r"""
import sys
import pytest
import torch
sys.path.insert(0, TESTS)
from meestral.backbones import mamba2_step
from meestral.backbones.base import Step
from meestral.backbones.loading import random_backbone
from test_graph_engine import _check_fixed_equals_layer, _mamba2_variant

launch = mamba2_step.kernels()
calls = []
def op(*a, **k):
    calls.append(a[9] is not None)
    return launch(*a, **k)
mp = pytest.MonkeyPatch()
# the op stands for the kernels on CUDA; here they run on CPU tensors under the interpreter
mp.setattr(mamba2_step, "_OP", op)
mp.setattr(mamba2_step, "applies", lambda proj, cs, ss: proj.dtype != torch.float32 and ss.dtype == torch.float32)
for dtype in (torch.bfloat16, torch.float16):
    for make in (lambda: random_backbone("mamba2", seed=4), _mamba2_variant):
        bb = make()
        bb.model.to(dtype)
        for i in range(bb.num_layers):  # the recurrent state stays float32, as new_state makes it
            assert bb.new_state(1).ssm[i].dtype == torch.float32
        n = len(calls)
        _check_fixed_equals_layer(bb, mp, tol=3e-2)
        # every block's steps (one token, then a 3-token window in one call), output and
        # state-only, went through the kernels
        assert calls[n:].count(True) == 2 * bb.num_layers and calls[n:].count(False) == 2 * bb.num_layers
# a window that keeps the state after each token (self-speculation's history): the same history
bb = random_backbone("mamba2", seed=4)
bb.model.to(torch.bfloat16)
hists = {}
for on in (True, False):
    mp.setattr(mamba2_step, "ENABLED", on)
    mp.setattr(mamba2_step, "applies", lambda proj, cs, ss: mamba2_step.ENABLED)
    state, hist = bb.new_state(2), bb.new_history(2, 4)
    step = Step(5, torch.arange(5, 8).expand(2, 3), torch.tensor([[True, False, True], [True, True, True]]))
    step.shared.history = hist
    h = torch.randn(2, 3, bb.hidden_size, generator=torch.Generator().manual_seed(2)).to(bb.dtype)
    n = len(calls)
    for i in range(bb.num_layers):
        h, _ = bb.forward_layer_fixed(i, h, state, step, None)
    assert (len(calls) > n) == on
    hists[on] = hist.conv + hist.ssm
for a, b in zip(hists[True], hists[False]):
    torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)
assert any(t.abs().sum() > 0 for t in hists[True])
print("ok")
"""


def _run(script):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    # the tests folder by absolute path: the check must not depend on the directory pytest runs from
    script = f"TESTS = {os.path.dirname(os.path.abspath(__file__))!r}\n" + script
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)


def test_kernels_equal_the_torch_step_outputs_and_states():
    out = _run(CHECK)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_a_wrong_group_is_caught():
    """The check above fails when the kernel reads another group's B and C (a kernel that mixed up
    groups would otherwise pass on one-group shapes): the comparison has teeth."""
    src = mamba2_step.__file__.replace("mamba2_step.py", "mamba2_kernels.py")
    with open(src) as f:
        code = f.read()
    assert "g = h // (H // G)" in code
    # Triton's jit compiles each kernel from its source file: the broken copy gets a file of its own
    broken = CHECK.replace("from meestral.backbones import mamba2_step\n", f"""
import importlib.util, tempfile
path = tempfile.mktemp(suffix="_mamba2_kernels.py")
open(path, "w").write(open({src!r}).read().replace("g = h // (H // G)", "g = (H // G - 1 - h // (H // G)) % G"))
spec = importlib.util.spec_from_file_location("meestral.backbones.mamba2_kernels", path)
sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sys.modules[spec.name])
from meestral.backbones import mamba2_step
""", 1)
    out = _run(broken)
    assert out.returncode != 0 and "Mismatched elements" in out.stderr, out.stdout + out.stderr[-2000:]


def test_off_cuda_the_step_takes_the_torch_code():
    proj, cs, ss = torch.zeros(1, 40, dtype=torch.bfloat16), torch.zeros(1, 8, 4), torch.zeros(1, 2, 2, 2)
    assert not mamba2_step.applies(proj, cs, ss)


# kernel 2's work in kernel 1 (mamba2_step.ONE_KERNEL): the same outputs and states bit for bit as
# the two-kernel launch, on a batch of two rows with one (row, token) not written, for a one-token
# step and a three-token window, with the norm and state-only, on two shapes (G groups of several
# heads each, several blocks of channels per head); BROKEN, if set, edits the kernel's source first.
ONE = r"""
import importlib.util, sys, tempfile
import torch
if BROKEN:
    import meestral.backbones.mamba2_kernels as mk
    src = open(mk.__file__).read()
    assert BROKEN[0] in src
    path = tempfile.mktemp(suffix="_mamba2_kernels.py")
    open(path, "w").write(src.replace(*BROKEN))
    spec = importlib.util.spec_from_file_location("meestral.backbones.mamba2_kernels", path)
    sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[spec.name])
    mk = sys.modules[spec.name]
else:
    from meestral.backbones import mamba2_kernels as mk
gen = torch.Generator().manual_seed(0)
def r(*s, dt=torch.bfloat16):
    return torch.randn(*s, generator=gen).to(dt)
for H, P, N, G in ((8, 32, 16, 2), (4, 16, 8, 1)):
    I = H * P
    conv_dim = I + 2 * G * N
    w = dict(conv_w=r(conv_dim, 4) * 0.5, conv_b=r(conv_dim), dt_bias=r(H), A_log=r(H, dt=torch.float32),
             D=r(H), gnorm_w=1 + 0.1 * r(I))
    dims = dict(n_heads=H, head_dim=P, n_groups=G, state_size=N, intermediate=I, group_size=I // G,
                gnorm_eps=1e-6, dt_min=0.0, dt_max=float("inf"))
    for T in (1, 3):
        for output in (True, False):
            proj = r(2, T, (I if output else 0) + conv_dim + H)
            write = torch.ones(2, T, dtype=torch.bool)
            write[1, T - 1] = False
            cs0, ss0 = r(2, conv_dim, 4), r(2, H, P, N, dt=torch.float32)
            got = []
            for one in (False, True):
                cs, ss = cs0.clone(), ss0.clone()
                kw = dict(w, gnorm_w=w["gnorm_w"] if output else None)
                out = mk.launch(proj, cs, ss, write, **kw, **dims, one_kernel=one)
                got.append([cs, ss] + ([out] if output else []))
            for a, b in zip(*got):
                assert torch.equal(a, b), (H, T, output, (a.float() - b.float()).abs().max().item())
            assert not torch.equal(got[1][0], cs0) and not torch.equal(got[1][1], ss0)
            # the one-kernel launch ran, and left its counts at zero for the next launch
            assert int(mk._counts[torch.device("cpu")].abs().sum()) == 0
print("ok")
"""


def _run_one(broken=None):
    return _run(f"BROKEN = {broken!r}\n" + ONE)


def test_one_kernel_launch_equals_two_kernels_bit_for_bit():
    out = _run_one()
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_one_kernel_launch_needs_the_groups_last_program():
    """The comparison has teeth: a tail run by the group's first program to count itself in (before
    the other heads have written y or read the old B / C windows) gives other results."""
    out = _run_one(("if done == (H // G) * tl.num_programs(2) - 1:", "if done == 0:"))
    assert out.returncode != 0 and "AssertionError" in out.stderr, out.stdout + out.stderr[-2000:]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_one_kernel_launch_equals_two_kernels_bit_for_bit():
    """On the GPU, where the group's last program is found by an atomic count across SMs: Codestral
    Mamba's per-block shape (128 heads of 64 channels, state 128, 8 groups), batch 2 with one (row,
    token) not written, 30 steps in a row carrying the state (a race shows as a mismatch somewhere),
    one token and a five-token window, with the norm and state-only, launched and replayed from a
    CUDA graph: the same outputs and states as the two-kernel launch, bit for bit."""
    from meestral.backbones import mamba2_kernels as mk

    gen = torch.Generator(device="cuda").manual_seed(0)

    def r(*s, dt=torch.bfloat16):
        return torch.randn(*s, generator=gen, device="cuda").to(dt)

    H, P, N, G = 128, 64, 128, 8
    I = H * P
    conv_dim = I + 2 * G * N
    w = dict(conv_w=r(conv_dim, 4) * 0.5, conv_b=None, dt_bias=r(H), A_log=r(H, dt=torch.float32) - 2, D=r(H))
    dims = dict(n_heads=H, head_dim=P, n_groups=G, state_size=N, intermediate=I, group_size=I // G,
                gnorm_eps=1e-5, dt_min=0.0, dt_max=float("inf"))
    for T in (1, 5):
        for output in (True, False):
            projs = [r(2, T, (I if output else 0) + conv_dim + H) for _ in range(30)]
            write = torch.ones(2, T, dtype=torch.bool, device="cuda")
            write[1, T - 1] = False
            cs0, ss0 = r(2, conv_dim, 4), r(2, H, P, N, dt=torch.float32)
            gw = 1 + 0.1 * r(I) if output else None
            got = {}
            for one in (False, True):
                cs, ss, outs = cs0.clone(), ss0.clone(), []
                for proj in projs:
                    outs.append(mk.launch(proj, cs, ss, write, **w, gnorm_w=gw, **dims, one_kernel=one))
                got[one] = outs + [cs, ss] if output else [cs, ss]
                # the same steps captured once and replayed on each step's input
                cs2, ss2, proj = cs0.clone(), ss0.clone(), projs[0].clone()
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    mk.launch(proj, cs0.clone(), ss0.clone(), write, **w, gnorm_w=gw, **dims, one_kernel=one)
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    out = mk.launch(proj, cs2, ss2, write, **w, gnorm_w=gw, **dims, one_kernel=one)
                cs2.copy_(cs0), ss2.copy_(ss0)
                for k, p in enumerate(projs):
                    proj.copy_(p)
                    g.replay()
                    if output:
                        assert torch.equal(out, outs[k]), (one, T, k)
                assert torch.equal(cs2, cs) and torch.equal(ss2, ss), (one, T, output)
            for a, b in zip(got[True], got[False]):
                assert torch.equal(a, b), (T, output, (a.float() - b.float()).abs().max().item())
            assert int(mk._counts[torch.device("cuda", torch.cuda.current_device())].abs().sum()) == 0
