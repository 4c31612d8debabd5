"""Head-training throughput: tokens/s and MFU of the real training step on random token ids.

    python benchmarks/bench_train.py                                   # random:mistral-7b, bf16, cuda
    python benchmarks/bench_train.py --backbone random:mistral --device cpu --dtype float32 --batch 2 --seq-len 64

One step is what `meestral train` does per batch (training.features_and_labels, heads_loss,
clip_per_head, an AdamW step): the frozen backbone's forward with every exit point's hidden state,
the top-k consistency labels (final norm + LM head once per exit point), the heads' forward and
backward. Token ids are random (the GPU box has no `datasets`): throughput does not depend on the text.

Model FLOPs per token (printed with the numbers):
  2 * N                      frozen forward; N = parameters without the input embedding (a lookup)
+ E * 2 * d * V              the labels: final norm + LM head on each of the E exit states
+ E * 6 * F                  each linear head's forward + backward (F features); MLP heads: 6 * params
Attention's score/value FLOPs (~4 * T/2 * d per layer and token) are left out, as usual: MFU
is understated by a few percent at T = 2048.
MFU = model FLOPs per second / peak; the peak defaults to the H200's dense bf16 989e12 FLOP/s.

GPU settings: bf16 weights, PyTorch SDPA attention (loading.py asks HF for it), TF32 matmuls
allowed for the fp32 heads (torch.backends.cuda.matmul.allow_tf32), CUDA synchronised around the
timed steps. One JSON line per run on stdout.
"""

import argparse
import json
import time

import torch

from meestral.backbones.loading import load_backbone
from meestral.decoding.heads import ExitHeads
from meestral.training.head_training import clip_per_head, features_and_labels, heads_loss

H200_BF16_DENSE = 989e12


def model_flops_per_token(bb, heads) -> tuple[float, str]:
    e = len(heads.exit_points)
    return flops_per_token(bb, e, sum(p.numel() for p in heads.parameters()) / e)


def flops_per_token(bb, e: int, head_params: float) -> tuple[float, str]:
    """The formula above for E = `e` exit points with `head_params` parameters each; needs only the
    backbone's shapes (a backbone built on the meta device will do)."""
    n = sum(p.numel() for p in bb.model.parameters()) - bb.embedding.weight.numel()
    if bb.lm_head_module.weight is bb.embedding.weight:  # tied: the LM head matmul still runs
        n += bb.embedding.weight.numel()
    d, v = bb.hidden_size, bb.vocab_size
    flops = 2 * n + e * 2 * d * v + e * 6 * head_params
    formula = f"2*N + E*2*d*V + E*6*P_head = 2*{n} + {e}*2*{d}*{v} + {e}*6*{head_params:.0f}"
    return flops, formula


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="random:mistral-7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--exits", type=lambda s: [int(x) for x in s.split(",")], help="default: every quarter")
    p.add_argument("--topk", type=int, default=15)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernels)")
    p.add_argument("--peak-flops", type=float, default=H200_BF16_DENSE)
    a = p.parse_args()

    if a.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bb = load_backbone(a.backbone, dtype=a.dtype, device=a.device)
    L = bb.num_layers
    exits = a.exits or sorted({L // 4, L // 2, 3 * L // 4} - {L - 1})
    torch.manual_seed(0)
    heads = ExitHeads("classifier", exits, bb)
    opt = torch.optim.AdamW(heads.parameters(), lr=1e-3)
    weights = [1.0] * len(exits)
    gen = torch.Generator().manual_seed(0)

    def step():
        ids = torch.randint(0, bb.vocab_size, (a.batch, a.seq_len), generator=gen)
        hs, auxes, labels = features_and_labels(bb, ids, heads.exit_points, a.topk)
        logits = [heads.classifier_logit(j, h, x) for j, (h, x) in enumerate(zip(hs, auxes))]
        loss = heads_loss(logits, labels, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_per_head(heads, 1.0)
        opt.step()

    for _ in range(a.warmup):
        step()
    sync(bb.device)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync(bb.device)
    elapsed = time.perf_counter() - t0

    tokens = a.steps * a.batch * a.seq_len
    flops_per_token, formula = model_flops_per_token(bb, heads)
    tok_s = tokens / elapsed
    row = {
        "bench": "train_heads", "backbone": a.backbone, "device": torch.cuda.get_device_name() if
        str(bb.device).startswith("cuda") else "cpu", "dtype": str(bb.dtype).removeprefix("torch."),
        "batch": a.batch, "seq_len": a.seq_len, "exits": exits, "topk": a.topk, "steps": a.steps,
        "tokens_per_s": tok_s, "ms_per_step": 1000 * elapsed / a.steps,
        "model_flops_per_token": flops_per_token, "flops_formula": formula,
        "achieved_flops": tok_s * flops_per_token, "peak_flops": a.peak_flops,
        "mfu": tok_s * flops_per_token / a.peak_flops,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if str(bb.device).startswith("cuda") else None,
        "torch": torch.__version__,
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
