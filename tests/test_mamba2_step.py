"""backbones/mamba2_step.py: the Mamba-2 decode step's two Triton kernels, run on the CPU by Triton's
interpreter (skipped where Triton is not installed). Through ssm.py's fixed path, block by block,
batch 2 with one row masked, outputs and every state element equal the per-module path
(forward_layer / fill_propagate, itself checked against HF) within the dtype's rounding: on the tiny
shape (two groups) and on a variant with one group, biases and a time-step clamp that bites, in
bfloat16 and float16, with a float32 state and one in the model's dtype; a window of tokens in one
launch equals its tokens one launch at a time, bit for bit. On CUDA the cuda tests in test_graph_engine.py run them for real."""

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
# a float32 state first (`--ssm-state float32`; the default keeps it in the model's dtype, below)
from meestral.backbones import ssm
mp.setattr(ssm, "STATE_IN_MODEL_DTYPE", False)
for dtype in (torch.bfloat16, torch.float16):
    for make in (lambda: random_backbone("mamba2", seed=4), _mamba2_variant):
        bb = make()
        bb.model.to(dtype)
        for i in range(bb.num_layers):  # the recurrent state stays float32, as new_state then makes it
            assert bb.new_state(1).ssm[i].dtype == torch.float32
        n = len(calls)
        _check_fixed_equals_layer(bb, mp, tol=3e-2)
        # every block's steps (one token, then a 3-token window in one call), output and
        # state-only, went through the kernels
        assert calls[n:].count(True) == 2 * bb.num_layers and calls[n:].count(False) == 2 * bb.num_layers
# the state in the model's dtype (ssm.STATE_IN_MODEL_DTYPE, the default): the kernels take it, and agree too
mp.setattr(ssm, "STATE_IN_MODEL_DTYPE", True)
mp.setattr(mamba2_step, "applies", lambda proj, cs, ss: proj.dtype != torch.float32 and ss.dtype == proj.dtype)
bb = random_backbone("mamba2", seed=4)
bb.model.to(torch.bfloat16)
n = len(calls)
_check_fixed_equals_layer(bb, mp, tol=3e-2)
assert calls[n:].count(True) == 2 * bb.num_layers and calls[n:].count(False) == 2 * bb.num_layers
mp.setattr(ssm, "STATE_IN_MODEL_DTYPE", False)
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

# A window of tokens in one launch equals the same tokens one launch at a time, bit for bit, with
# the state in float32 and in the model's dtype (ssm.STATE_IN_MODEL_DTYPE: rounded after every token
# inside the window as a one-token launch stores it): catch-up's and verify's windows then leave the
# state full depth leaves.
WINDOW = r"""
import sys
import pytest
import torch
sys.path.insert(0, TESTS)
from meestral.backbones import mamba2_step, ssm
from meestral.backbones.base import Step
from meestral.backbones.loading import random_backbone
from test_graph_engine import _filled_states

launch = mamba2_step.kernels()
calls = []
def op(*a, **k):
    calls.append(a[3].shape[1])
    return launch(*a, **k)
mp = pytest.MonkeyPatch()
mp.setattr(mamba2_step, "_OP", op)
mp.setattr(mamba2_step, "applies", lambda proj, cs, ss: proj.dtype != torch.float32)
bb = random_backbone("mamba2", seed=4)
bb.model.to(torch.bfloat16)
write = torch.tensor([[True, False, True], [True, True, True]])
h = torch.randn(2, 3, bb.hidden_size, generator=torch.Generator().manual_seed(2)).to(bb.dtype)
for in_model_dtype in (False, True):
    mp.setattr(ssm, "STATE_IN_MODEL_DTYPE", in_model_dtype)
    window, steps = _filled_states(bb, 2)
    assert window.ssm[0].dtype == (torch.bfloat16 if in_model_dtype else torch.float32)
    n = len(calls)
    for i in range(bb.num_layers):
        step = Step(5, torch.arange(5, 8).expand(2, 3), write)
        hw, _ = bb.forward_layer_fixed(i, h, window, step, None)
        hs = []
        for t in range(3):
            one = Step(5 + t, torch.full((2, 1), 5 + t), write[:, t:t + 1])
            hs.append(bb.forward_layer_fixed(i, h[:, t:t + 1], steps, one, None)[0])
        assert torch.equal(hw, torch.cat(hs, 1)), (in_model_dtype, i)
        for a, b in zip(bb.layer_tensors(window, i), bb.layer_tensors(steps, i)):
            assert torch.equal(a, b), (in_model_dtype, i, (a.float() - b.float()).abs().max().item())
    assert calls[n:] == [3, 1, 1, 1] * bb.num_layers
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


def test_a_window_equals_its_tokens_one_at_a_time():
    out = _run(WINDOW)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def _with_broken_kernels(script, import_line, good, bad):
    """script, its `import_line` preceded by the load of a copy of mamba2_kernels.py whose `good`
    code reads `bad` (Triton's jit compiles each kernel from its source file: the broken copy gets a
    file of its own)."""
    src = mamba2_step.__file__.replace("mamba2_step.py", "mamba2_kernels.py")
    with open(src) as f:
        assert good in f.read()
    assert import_line in script
    return script.replace(import_line, f"""
import importlib.util, tempfile
path = tempfile.mktemp(suffix="_mamba2_kernels.py")
open(path, "w").write(open({src!r}).read().replace({good!r}, {bad!r}))
spec = importlib.util.spec_from_file_location("meestral.backbones.mamba2_kernels", path)
sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sys.modules[spec.name])
{import_line}""", 1)


def test_a_window_that_keeps_the_unrounded_state_is_caught():
    """WINDOW fails when the kernel carries the float32 state from token to token inside a window
    where the stored state is bf16 (it rounds only once, at the window's end): its check has teeth."""
    broken = _with_broken_kernels(WINDOW, "from meestral.backbones import mamba2_step, ssm\n",
                                  "new.to(sdt).to(tl.float32)", "new")
    out = _run(broken)
    assert out.returncode != 0 and "(True, 0" in out.stderr, out.stdout + out.stderr[-2000:]


def test_a_wrong_group_is_caught():
    """The check above fails when the kernel reads another group's B and C (a kernel that mixed up
    groups would otherwise pass on one-group shapes): the comparison has teeth."""
    broken = _with_broken_kernels(CHECK, "from meestral.backbones import mamba2_step\n", "g = h // (H // G)",
                                  "g = (H // G - 1 - h // (H // G)) % G")
    out = _run(broken)
    assert out.returncode != 0 and "Mismatched elements" in out.stderr, out.stdout + out.stderr[-2000:]


def test_off_cuda_the_step_takes_the_torch_code():
    proj, cs, ss = torch.zeros(1, 40, dtype=torch.bfloat16), torch.zeros(1, 8, 4), torch.zeros(1, 2, 2, 2)
    assert not mamba2_step.applies(proj, cs, ss)
