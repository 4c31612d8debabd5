"""Device kernels one decode step of one block launches on the fixed-shape path (CPU count).

On a GPU a captured graph removes the launch cost but not the kernels: at batch 1 each small
kernel still takes a few microseconds of device time beside the weight-bound matmuls. This counts
them on the CPU with the profiler (leaf aten ops that compute: views, reshapes without a copy and
other metadata ops are left out), per block and for the step's shared context (rotary, masks).
Then the same block with its kernels compiled (`kernel=compiled`, what the graph engine does on CUDA): the launches in
inductor's generated code, fused kernels and library matmuls. That count is the CPU backend's;
Triton on a GPU fuses along similar lines, but the exact number can differ.

    python benchmarks/count_layer_ops.py
"""

import re

import torch
from torch.profiler import ProfilerActivity, profile

from meestral.backbones.base import compiled
from meestral.backbones.loading import random_backbone

META = {"aten::view", "aten::transpose", "aten::slice", "aten::select", "aten::unsqueeze", "aten::expand",
        "aten::as_strided", "aten::t", "aten::detach", "aten::alias", "aten::_unsafe_view", "aten::reshape",
        "aten::permute", "aten::split", "aten::split_with_sizes", "aten::chunk", "aten::squeeze", "aten::lift_fresh",
        "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resize_", "aten::result_type",
        "aten::contiguous", "aten::unbind", "aten::broadcast_tensors", "aten::narrow", "aten::_reshape_alias",
        "aten::expand_as", "aten::flatten", "aten::unflatten", "aten::dropout", "aten::_to_copy", "aten::to",
        "aten::resolve_conj", "aten::resolve_neg"}


def leaf_ops(fn):
    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    names = []
    for e in p.events():
        if not e.name.startswith("aten::") or e.name in META:
            continue
        if any(c.name.startswith("aten::") and c.name not in META for c in e.cpu_children):
            continue  # counted through its children
        names.append(e.name)
    return names


# One launch per line of an inductor `call`: a fused kernel (C++ on the CPU, Triton on a GPU), a
# library kernel (extern_kernels.mm) or an op inductor left to ATen.
LAUNCH = re.compile(r"^\s+(cpp_fused_\w+\(|triton_\w+\.run\(|extern_kernels\.\w+\(|(?:torch\.ops\.)?aten\.\w+)", re.M)


def compiled_launches(fn):
    """Launches of fn() (a fixed-path call given `kernel=compiled`): {"fused": n, "library": n,
    "aten": n}, or None when fn compiled nothing (a fixed path that runs no kernel function)."""
    from torch._inductor.utils import run_and_get_code

    _, codes = run_and_get_code(fn)
    found = [m for code in codes if "def call(" in code for m in LAUNCH.findall(code[code.index("def call("):])]
    if not found:
        return None
    return {"fused": sum(not x.startswith(("extern", "aten", "torch")) for x in found),
            "library": sum(x.startswith("extern") for x in found),
            "aten": sum(x.startswith(("aten", "torch")) for x in found)}


@torch.no_grad()
def main():
    for shape in ("mistral", "mamba2"):
        bb = random_backbone(shape)
        state = bb.new_state(1, 64)
        pad = torch.zeros(1, dtype=torch.long)
        step = bb.make_step(10, 1, pad)
        h = bb.embed(torch.tensor([[5]]))
        keys = bb.state_keys(state) and 64
        ctx_ops = leaf_ops(lambda: bb.fixed_context([0], h, state, step, keys))
        ctx = bb.fixed_context([0], h, state, step, keys)
        layer_ops = leaf_ops(lambda: bb.forward_layer_fixed(0, h, state, step, keys, ctx))
        mm = sum(n in ("aten::mm", "aten::bmm", "aten::addmm") for n in layer_ops)
        print(f"{shape}: {len(layer_ops)} kernels per block per decode step ({mm} matmuls), + {len(ctx_ops)} per "
              f"call for what its blocks share (rotary, masks); per block: "
              + ", ".join(f"{n.removeprefix('aten::')} x{layer_ops.count(n)}" for n in sorted(set(layer_ops))))
        for what, fn in (("block", lambda: bb.forward_layer_fixed(0, h, state, step, keys, ctx, compiled)),
                         ("propagate", lambda: bb.fill_propagate_fixed(0, h, state, step, keys, ctx, compiled))):
            n = compiled_launches(fn)
            print(f"{shape} compiled, {what}: " + ("nothing compiled (the fixed path runs no kernel function)" if n is None
                  else f"{sum(n.values())} launches ({n['fused']} fused, {n['library']} library matmuls, {n['aten']} ATen)"))


if __name__ == "__main__":
    main()
