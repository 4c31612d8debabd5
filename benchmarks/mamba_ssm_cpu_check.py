"""mamba-ssm's own Triton code against our torch path, on a machine without a GPU: the Mamba-2
kernels `backbones/ssd.py` calls (`mamba_chunk_scan_combined` for FUSED_SCAN,
`mamba_split_conv1d_scan_combined` for FUSED_MIXER) run under Triton's CPU interpreter, so their
argument conventions (layouts, dt's bias and softplus, D, the norm's groups and gate order,
initial and final states) are checked before a GPU session spends time on them. causal-conv1d's
conv is CUDA code: a torch reference of its documented arithmetic stands in for it (its own
convention is tests/test_ssd.py's stand-in test). float32, so agreement is to rounding.

    mkdir -p /tmp/mssrc && for w in .wm/*.whl; do unzip -oq "$w" -d /tmp/mssrc; done
    .venv/bin/python -m pip install --target /tmp/extra einops
    PYTHONPATH=/tmp/mssrc:/tmp/extra:src .venv/bin/python benchmarks/mamba_ssm_cpu_check.py

(the wheels of benchmarks/build_mamba_ssm.sh; their compiled extensions are for the GPU box's
Python and are never loaded: stub modules take their names). About a minute a case.
"""

import contextlib
import os
import sys
import types

os.environ["TRITON_INTERPRET"] = "1"
for ext in ("selective_scan_cuda", "causal_conv1d_cuda"):  # CUDA extensions: not loadable here
    sys.modules[ext] = types.ModuleType(ext)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# CPU tensors have no device to switch to or count multiprocessors of; Triton's interpreter has no
# driver to time autotuning with, so each autotuned kernel takes its first configuration.
torch.cuda.device = lambda idx: contextlib.nullcontext()
torch.cuda.get_device_properties = lambda d: types.SimpleNamespace(multi_processor_count=4)
import triton.runtime.autotuner as autotuner  # noqa: E402

autotuner.Autotuner._bench = lambda self, *a, config, **k: [0.0, 0.0, 0.0]
import mamba_ssm.ops.triton.ssd_combined as sc  # noqa: E402

from transformers import Mamba2Config, Mamba2ForCausalLM  # noqa: E402

from meestral.backbones import ssd  # noqa: E402
from meestral.backbones.ssm import use_grouped_gated_norm  # noqa: E402


def conv_ref(x, weight, bias, silu):
    """causal-conv1d's conv as documented: x [b, d, l], weight [d, K], zeros before t = 0."""
    K = weight.shape[1]
    out = F.conv1d(F.pad(x.float(), (K - 1, 0)), weight.float()[:, None], None if bias is None else bias.float(),
                   groups=x.shape[1])
    return (F.silu(out) if silu else out).to(x.dtype)


def conv_fwd(x, weight, bias, seq_idx, initial_states, final_states_out, silu):
    assert seq_idx is None and initial_states is None and final_states_out is None
    return conv_ref(x, weight, bias, silu)


def conv_bwd(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx, return_dinitial, silu):
    leaves = [t.detach().float().requires_grad_() for t in (x, weight) + (() if bias is None else (bias,))]
    with torch.enable_grad():  # backward runs with grad mode off
        g = torch.autograd.grad(conv_ref(*leaves[:2], leaves[2] if bias is not None else None, silu), leaves, dout.float())
    dx = torch.empty_like(x) if dx is None else dx
    dx.copy_(g[0])  # the caller hands a view of its own gradient buffer
    return dx, g[1], g[2] if bias is not None else None, None


sc.causal_conv1d_fwd_function, sc.causal_conv1d_bwd_function = conv_fwd, conv_bwd


def model(groups):
    cfg = Mamba2Config(hidden_size=64, num_hidden_layers=2, vocab_size=300, state_size=16, expand=2, head_dim=16,
                       num_heads=8, n_groups=groups, conv_kernel=4, chunk_size=16, tie_word_embeddings=True)
    torch.manual_seed(groups)
    m = Mamba2ForCausalLM(cfg)
    use_grouped_gated_norm(m)
    block = m.backbone.layers[1].mixer
    block.A_log.data.uniform_(-1.0, 2.0)  # strong, varied decays: chunk boundaries matter
    for t in (block.conv1d.bias, block.norm.weight, block.dt_bias):  # HF's zeros / ones hide faults
        torch.nn.init.normal_(t)
    return block


def compare(name, block, run):
    """run(fused) -> tensors; gradients of every parameter after backward of their squares."""
    res = {}
    for fused in (False, True):
        block.zero_grad()
        outs = run(fused)
        sum(o.float().pow(2).mean() for o in outs if o.requires_grad).backward()
        res[fused] = [o.detach() for o in outs] + [p.grad.clone() for p in block.parameters()]
    names = [f"output {i}" for i in range(len(outs))] + [n for n, _ in block.named_parameters()]
    worst = max((float((a - b).norm() / b.norm().clamp(min=1e-12)), n) for n, a, b in zip(names, res[True], res[False]))
    print(f"{name}: worst relative error {worst[0]:.2e} ({worst[1]})", flush=True)
    assert worst[0] < 1e-4, worst


def main():
    for groups, length in ((1, 40), (2, 37)):
        block = model(groups)
        u = torch.randn(2, length, 64)
        s0 = torch.randn(2, 8, 16, 16)

        def scan(fused):  # a prompt pass from an initial state, keeping the states (FUSED_SCAN)
            ssd._fused_scan_for = (lambda x, p: sc.mamba_chunk_scan_combined) if fused else (lambda x, p: None)
            return ssd.mixer_forward(block, u, initial_state=s0, states=True)

        def mixer(fused):  # a training pass (FUSED_MIXER)
            ssd._fused_mixer_for = (lambda m, x, p: sc.mamba_split_conv1d_scan_combined) if fused else (lambda m, x, p: None)
            return (ssd.mixer_forward(block, u),)

        compare(f"mamba_chunk_scan_combined, {groups} group(s), length {length}", block, scan)
        compare(f"mamba_split_conv1d_scan_combined, {groups} group(s), length {length}", block, mixer)
    print("mamba-ssm's kernels equal the torch path")


if __name__ == "__main__":
    main()
