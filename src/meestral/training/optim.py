"""Optimisers and learning-rate schedules of the trainers.

Head training and adaptation choose between schedule-free AdamW and AdamW with linear warm-up +
cosine decay (`make_optimizer`); distillation uses warm-up, a constant peak and a linear decay
(`warmup_stable_decay`), whose length its deadline may still change while it runs.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from meestral.errors import MeestralError

OPTIMIZERS = ("schedulefree", "adamw")


def check_optimizer(name: str):
    if name not in OPTIMIZERS:
        raise MeestralError(f"unknown optimizer {name!r}: use {' or '.join(OPTIMIZERS)}")


def make_optimizer(params, cfg, total: int):
    """(optimizer, scheduler or None) for `total` steps, from `cfg`'s optimizer, lr, warmup (None:
    5% of the run) and weight_decay. Schedule-free needs no schedule: it warms up itself."""
    warmup = cfg.warmup if cfg.warmup is not None else max(1, total // 20)
    if cfg.optimizer == "schedulefree":
        try:
            import schedulefree
        except ImportError:
            raise MeestralError("--optimizer schedulefree needs the schedulefree package: pip install schedulefree "
                                "(or use --optimizer adamw)") from None
        return schedulefree.AdamWScheduleFree(params, lr=cfg.lr, warmup_steps=warmup,
                                              weight_decay=cfg.weight_decay), None
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def factor(step):  # linear warm-up, then cosine to zero at the last step
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def current_lr(opt) -> float:
    """The learning rate of the step just taken (schedule-free's warmed-up rate where it has one)."""
    group = opt.param_groups[0]
    return group.get("scheduled_lr", group["lr"])


def use_averaged(opt, on: bool):
    """Schedule-free keeps two weight sequences: eval() swaps in the averaged one (the one to
    validate and save), train() swaps back. Plain AdamW has one: nothing to do."""
    if hasattr(opt, "eval"):
        opt.eval() if on else opt.train()


@contextmanager
def averaged(opt):
    """The averaged weights inside the block, the training ones after it."""
    use_averaged(opt, True)
    try:
        yield
    finally:
        use_averaged(opt, False)


def warmup_stable_decay(step: int, total: int, lr: float, min_lr: float, warmup: int, decay_share: float) -> float:
    """Linear warm-up to `lr`, constant, then linear decay to `min_lr` over the last `decay_share`
    of `total` steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    decay_from = int(total * (1 - decay_share))
    if step < decay_from:
        return lr
    frac = (step - decay_from) / max(1, total - decay_from)
    return lr + (min_lr - lr) * min(1.0, frac)
