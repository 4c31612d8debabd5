"""The distillation loss alone: `kd.chunked_kd_loss` forward + backward on the student's real LM
head shape (d 384, SmolLM2's 49,152-token vocabulary), with its gradient written out in the
forward pass (`kd.FUSED_GRAD`, the default) and through checkpointed autograd, full-vocabulary and
top-k teachers. Ratios come from one run; one JSON line per case.

    PYTHONPATH=src python benchmarks/bench_kd_loss.py --device cpu --batch 2 --seq-len 128
    PYTHONPATH=src python benchmarks/bench_kd_loss.py --device cuda --batch 64 --seq-len 512 --compile

On CUDA under bf16 autocast, as the trainer runs it.
"""

import argparse
import json
import statistics
import time

import torch

from meestral.training import kd


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--topk", type=lambda s: [int(x) for x in s.split(",")], default=[0, 32])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="the loss through torch.compile (--compile)")
    a = p.parse_args()

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    head = torch.nn.Linear(a.hidden, a.vocab, bias=False).to(dev)
    h = torch.randn(a.batch, a.seq_len, a.hidden, device=dev, requires_grad=True)
    y = torch.randint(0, a.vocab, (a.batch, a.seq_len), device=dev)
    t_logits = (torch.randn(a.batch, a.seq_len, a.vocab, device=dev) * 3).to(torch.bfloat16 if cuda else torch.float32)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for k in a.topk:
        teacher = kd.teacher_topk(t_logits, k) if k else t_logits
        row = {"bench": "kd_loss", "device": torch.cuda.get_device_name() if cuda else "cpu", "batch": a.batch,
               "seq_len": a.seq_len, "vocab": a.vocab, "kd_topk": k, "compile": a.compile}
        for fused in (False, True):
            kd.FUSED_GRAD = fused
            times = []
            for i in range(a.repeats + 1):  # the first: allocation, compilation
                sync()
                t0 = time.perf_counter()
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                    loss = kd.chunked_kd_loss(head, h, teacher, y, 0.2, compiled=a.compile)[0]
                loss.backward()
                sync()
                if i:
                    times.append(time.perf_counter() - t0)
                h.grad, head.weight.grad = None, None
            row["fused_ms" if fused else "autograd_ms"] = round(1e3 * statistics.median(times), 2)
        row["speedup"] = round(row["autograd_ms"] / row["fused_ms"], 3)
        print(json.dumps(row), flush=True)
    kd.FUSED_GRAD = True


if __name__ == "__main__":
    main()
