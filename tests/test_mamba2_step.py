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


# A Mamba-2 block's end inside out_proj's GEMV (gemv.FUSED_MAMBA_GATE): the scan alone, then the
# gated group norm and the B / C windows' shift in the one-row GEMV. Batch 1, one token a step from
# random states, a step whose write mask is off among them, bf16 and fp16: outputs and every state
# element equal the per-module path step after step (a missing or wrong shift shows in the conv
# windows, and in the next step's output), and no step took the two-kernel tail.
END = r"""
import sys
import torch
from meestral.backbones import gemv, gemv_kernels, mamba2_step
from meestral.backbones.base import Step
from meestral.backbones.loading import random_backbone

assert gemv.END_MIN_GROUP == min(c.kwargs["BLOCK_K"] for c in gemv_kernels.end_configs)
# bf16 through the one-run kernel, fp16 through the two-run one (gemv.RUNS): runs of half a group
step_launch = mamba2_step.kernels()
gemv_launch = {torch.bfloat16: gemv.kernels(tune=False), torch.float16: gemv.kernels(tune=False, runs=2)}
calls = []
def step_op(*a, tail=True, **k):
    calls.append(("tail" if tail else "scan", a[9] is not None))
    return step_launch(*a, tail=tail, **k)
def end_op(y, w, res, z, nw, eps, group, cs, wr, n_bc):
    calls.append(("end", group))
    return gemv_launch[y.dtype](y, w, nw, eps, res=res, keep=True, end=(z, group, cs, wr, n_bc))
# the ops stand for the kernels on CPU tensors under the interpreter: each condition without its
# CUDA test (gemv._HAVE_OP stays False off CUDA: every other matmul is torch's)
mamba2_step._OP, gemv._END_OP = step_op, end_op
mamba2_step.applies = lambda proj, cs, ss: proj.dtype != torch.float32 and ss.dtype == torch.float32
gemv.ends_mamba_block = lambda proj, w, nw, gs, res: gemv.FUSED_MAMBA_GATE and proj.numel() == proj.shape[-1] and gs & (gs - 1) == 0
gen = torch.Generator().manual_seed(7)
for dtype in (torch.bfloat16, torch.float16):
    bb = random_backbone("mamba2", seed=4)
    bb.model.to(dtype)
    m = bb.model.backbone.layers[0].mixer
    assert m.n_groups > 1 and m.norm.group_size < m.intermediate_size  # several groups, several norms
    ref, got = bb.new_state(1), bb.new_state(1)
    for i in range(bb.num_layers):  # the same random state in both
        for a, b in zip(bb.layer_tensors(ref, i), bb.layer_tensors(got, i)):
            a.copy_(torch.randn(a.shape, generator=gen).to(a.dtype))
            b.copy_(a)
    for t, w in enumerate((True, True, False, True)):
        step = Step(t, torch.full((1, 1), t), torch.tensor([[w]]))
        h = torch.randn(1, 1, bb.hidden_size, generator=gen)
        for i in range(bb.num_layers):
            n = len(calls)
            want, want_mixed = bb.forward_layer(i, h, ref, step)
            out, mixed = bb.forward_layer_fixed(i, h, got, step, None)
            assert calls[n:] == [("scan", True), ("end", m.norm.group_size)], calls[n:]
            torch.testing.assert_close(out.float(), want.float(), atol=3e-2, rtol=3e-2)
            torch.testing.assert_close(mixed.float(), want_mixed.float(), atol=3e-2, rtol=3e-2)
            for x, y in zip(bb.layer_tensors(got, i), bb.layer_tensors(ref, i)):
                torch.testing.assert_close(x.float(), y.float(), atol=3e-2, rtol=3e-2)
            h = want
# switched off, the same step takes the two kernels
gemv.FUSED_MAMBA_GATE = False
n = len(calls)
bb.forward_layer_fixed(0, h, got, step, None)
assert calls[n:] == [("tail", True)], calls[n:]
print("ok")
"""


def test_block_end_inside_out_proj_equals_the_module_path():
    out = _run(END)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


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
