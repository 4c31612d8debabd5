"""Distillation against a teacher, as adaptation (the original model teaching its own exits) and
distillation (a Transformer teaching a Mamba-2) both do it: the loss, whole or a few rows at a
time, and held-out perplexity, the measure both report beside it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kd_loss(student_logits, teacher_logits, targets, ce_weight: float):
    """(loss, kl, ce): mean over tokens of KL(teacher || student) on the full vocabulary, plus
    `ce_weight` x cross-entropy of the student on the actual next tokens. Computed in float32."""
    s = F.log_softmax(student_logits.float(), -1)
    t = F.log_softmax(teacher_logits.float(), -1)
    kl = (t.exp() * (t - s)).sum(-1).mean()
    ce = F.nll_loss(s.reshape(-1, s.shape[-1]), targets.reshape(-1))
    return kl + ce_weight * ce, kl, ce


def chunked_kd_loss(lm_head, hidden, teacher_logits, targets, ce_weight: float, rows: int = 8):
    """`kd_loss(lm_head(hidden), ...)` with the same value and gradients, a few rows at a time.

    Full-vocabulary float32 log-softmaxes of a 64 x 512 batch are ~6 GB each and the loss keeps
    several for backward: at batch 64 they were 85 GiB of peak memory on an H200, and the trainer
    ran out of memory beside the sampler (2026-12-01). Each chunk's loss is recomputed in backward
    (activation checkpointing), so only one chunk's logits are alive at a time."""
    from torch.utils.checkpoint import checkpoint

    def part(h, t, y):
        return torch.stack(kd_loss(lm_head(h), t, y, ce_weight))

    n = hidden.shape[0]
    total = hidden.new_zeros(3, dtype=torch.float32)
    for i in range(0, n, rows):
        sl = slice(i, min(n, i + rows))
        w = (sl.stop - sl.start) / n  # kd_loss averages over tokens: weigh chunks by their size
        total = total + w * checkpoint(part, hidden[sl], teacher_logits[sl], targets[sl], use_reentrant=False)
    return total[0], total[1], total[2]


def heldout_ppl(model, rows: torch.Tensor, batch: int = 8) -> float:
    """Perplexity of `model` on packed held-out rows (every next-token prediction counted); a
    Mamba-2 goes through the chunked scan (`ssd.forward_logits`, equal to HF's forward)."""
    from meestral.backbones.ssd import forward_logits

    run = (lambda x: forward_logits(model, x)) if model.config.model_type == "mamba2" else (lambda x: model(x).logits)
    nll, n = 0.0, 0
    dev = next(model.parameters()).device
    with torch.inference_mode():
        for i in range(0, len(rows), batch):
            x = rows[i:i + batch].long().to(dev)
            logits = run(x)[:, :-1].float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
            n += x[:, 1:].numel()
    return math.exp(nll / n)
