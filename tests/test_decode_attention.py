"""backbones/decode_attention.py: one token's grouped attention (rotary, K/V write, masked softmax,
PV) as two Triton kernels (parts over chunks of keys, then their combination), run on the CPU by Triton's interpreter (skipped where Triton is not
installed). Through the Transformer's fixed path, batch 2 with one row not written, a cache with
holes in its validity, slots in the first block and past several blocks, a sliding window that
bites: every layer's output and K/V buffers and validity equal the torch code (`_attend`) within the
dtype's rounding, in bfloat16 and float16, on Mistral (grouped K/V), Mistral with a sliding window
and Llama. A kernel that ignores the mask fails the same check."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from meestral.backbones import decode_attention

# What both interpreter scripts share: the imports, a cache with holes and the comparison
# (attention_checks.py, which the cuda tests use too), the interpreter's tolerance.
PRELUDE = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
""" + r"""
import pytest
import torch
from attention_checks import assert_same, random_cache
from meestral.backbones import decode_attention
from meestral.backbones.base import Step
from meestral.backbones.loading import random_backbone

TOL = 3e-2
"""

CHECK = PRELUDE + r"""
launch = decode_attention.kernels()
calls = []
def op(*a, **k):
    calls.append(1)
    return launch(*a, **k)
mp = pytest.MonkeyPatch()
mp.setattr(decode_attention, "_OP", op)
for dtype in (torch.bfloat16, torch.float16):
    for shape in ("mistral", "mistral-sw", "llama"):
        bb = random_backbone(shape, dtype=dtype)
        for slot in (5, 100):
            outs = {}
            for on in (True, False):
                mp.setattr(decode_attention, "applies", lambda qkv, kb, on=on: on)
                state = bb.new_state(2, 128)
                g = torch.Generator().manual_seed(slot)
                random_cache(state, slot, g)
                step = Step(slot, torch.full((2, 1), slot), torch.tensor([[True], [False]]))
                h = torch.randn(2, 1, bb.hidden_size, generator=g).to(dtype)
                keys = bb.state_keys(state)
                n = len(calls)
                res = []
                for i in range(bb.num_layers):
                    h, _ = bb.forward_layer_fixed(i, h, state, step, keys)
                    res.append(h.float())
                assert (len(calls) - n == bb.num_layers) == on
                outs[on] = res + [state.k_all.float(), state.v_all.float(), state.valid]
            assert_same(outs[True], outs[False], TOL)
print("ok")
"""


# Windows of several positions: the window kernel (products and softmax; rotary, write and mask in
# torch) against the torch attention. Batch 2, positions some rows do not write in some layers
# (catch-up's `written`) while still visible, a cache with holes, windows in the first block and
# past several, a sliding window that bites. Float16 only: Triton 3.6's interpreter gets tl.dot of
# bfloat16 operands wrong on the CPU (the cuda test checks bf16).
WINDOW_CHECK = PRELUDE + r"""
launch = decode_attention.kernels()
calls = []
def op(*a, **k):
    calls.append(1)
    return launch.rows(*a, **k)
mp = pytest.MonkeyPatch()
mp.setattr(decode_attention, "_WINDOW_OP", op)
mp.setattr(decode_attention, "applies", lambda *a: False)
dtype = torch.float16
for shape in ("mistral", "mistral-sw", "llama"):
    bb = random_backbone(shape, dtype=dtype)
    for start, T in ((3, 5), (97, 3), (40, 16)):
        outs = {}
        for on in (True, False):
            mp.setattr(decode_attention, "applies_window", lambda q, kb, on=on: on and q.shape[2] > 1)
            state = bb.new_state(2, 128)
            g = torch.Generator().manual_seed(start)
            random_cache(state, start, g)
            visible = torch.ones(2, T, dtype=torch.bool)
            visible[1, T - 1] = False  # row 1's last position is not part of the call
            step = Step(start, (torch.arange(T) + start).repeat(2, 1), visible)
            h = torch.randn(2, T, bb.hidden_size, generator=g).to(dtype)
            keys = bb.state_keys(state)
            n = len(calls)
            res = []
            for i in range(bb.num_layers):
                need = visible.clone()
                need[0, : i % 3] = False  # row 0's first positions already hold layer i (catch-up)
                h, _ = bb.forward_layer_fixed(i, h, state, step.written(need), keys)
                res.append(h.float())
            assert (len(calls) - n == bb.num_layers) == on
            outs[on] = res + [state.k_all.float(), state.v_all.float(), state.valid]
        assert_same(outs[True], outs[False], TOL)
print("ok")
"""


# The combination folded into the first kernel (decode_attention.FOLD: each head's last program to
# finish combines the parts) gives the two-kernel launch's output bit for bit, launch after launch
# (the counters go back to zero), on a batch of 2 whose rows hold different keys; counters left
# non-zero fail it. (The interpreter runs programs one after another, so it cannot show a race
# between them: the cuda test in test_graph_engine.py runs the fold on a GPU.)
FOLD_CHECK = PRELUDE + r"""
launch = decode_attention.kernels()
# every buffer the launcher makes starts as NaN: a combination that read a part no program wrote
# shows (the memory of an earlier launch would hold the same values)
_empty = torch.empty
torch.empty = lambda *a, **k: _empty(*a, **k).fill_(float("nan"))
g = torch.Generator().manual_seed(0)
B, H, HKV, cap, D = 2, 8, 2, 256, 64
for slot in (0, 70, 200):
    qkv = torch.randn(B, (H + 2 * HKV) * D, generator=g).to(torch.bfloat16)
    cos, sin = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    kbuf = torch.randn(B, HKV, cap, D, generator=g).to(torch.bfloat16)
    vbuf = torch.randn(B, HKV, cap, D, generator=g).to(torch.bfloat16)
    valid = torch.rand(B, cap, generator=g) < 0.8
    args = (cos, sin)
    outs = {}
    for fold in (False, True, True):
        decode_attention.FOLD = fold
        kb, vb, va = kbuf.clone(), vbuf.clone(), valid.clone()
        o = launch(qkv, cos, sin, kb, vb, va, torch.tensor([slot]), torch.tensor([True, False]), 0.125, H, 0)
        outs.setdefault(fold, []).append((o, kb, vb, va))
    assert decode_attention._COUNTERS and all(int(c.abs().sum()) == 0 for c in decode_attention._COUNTERS.values())
    for o, kb, vb, va in outs[True]:
        ref = outs[False][0]
        assert torch.equal(o, ref[0]) and torch.equal(kb, ref[1]) and torch.equal(vb, ref[2]) and torch.equal(va, ref[3])
    assert outs[False][0][0].abs().sum() > 0
print("ok")
"""


def _run(script):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)


def test_kernel_equals_the_torch_attention():
    out = _run(CHECK)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_folded_combination_equals_the_second_kernel():
    out = _run(FOLD_CHECK)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_window_kernel_equals_the_torch_attention():
    out = _run(WINDOW_CHECK)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def _fails_without(check, line):
    """`check` run against a copy of decode_attention.py whose kernel line `line` (its masking)
    is replaced by a no-op: it must fail on a mismatch. Triton's jit compiles a kernel from its
    source file, so the broken copy gets a file of its own."""
    src = decode_attention.__file__
    with open(src) as f:
        assert line in f.read()
    broken = check.replace("from meestral.backbones import decode_attention\n", f"""
import importlib.util, tempfile
path = tempfile.mktemp(suffix="_decode_attention.py")
open(path, "w").write(open({src!r}).read().replace({line!r}, 'sc = sc + 0.0'))
spec = importlib.util.spec_from_file_location("meestral.backbones.decode_attention", path)
decode_attention = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = decode_attention
spec.loader.exec_module(decode_attention)
import meestral.backbones.transformer as tr
tr.decode_attention = decode_attention
""", 1)
    out = _run(broken)
    assert out.returncode != 0 and "Mismatched elements" in out.stderr, out.stdout + out.stderr[-2000:]


def test_a_window_kernel_that_ignores_the_mask_is_caught():
    _fails_without(WINDOW_CHECK, 'sc = tl.where(al != 0, sc, -float("inf"))')


def test_a_kernel_that_ignores_the_mask_is_caught():
    _fails_without(CHECK, 'sc = tl.where((seen & inside) | own, sc, -float("inf"))')


def test_off_cuda_the_attention_is_the_torch_code():
    assert not decode_attention.applies(torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(1, 2, 8, 16))
