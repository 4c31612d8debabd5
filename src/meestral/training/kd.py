"""Distillation against a teacher, as adaptation (the original model teaching its own exits) and
distillation (a Transformer teaching a Mamba-2) both do it: the loss, whole or a few rows at a
time, and held-out perplexity, the measure both report beside it."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from meestral import switches

# `chunked_kd_loss` through `_FusedKD` (each chunk's loss and its gradient in one pass, nothing
# recomputed in backward) wherever the head is a plain linear layer and a gradient is wanted;
# False (or MEESTRAL_FUSED_GRAD=0 in the environment: meestral.switches) keeps the
# activation-checkpointed autograd path.
FUSED_GRAD = switches.on("FUSED_GRAD")


def kd_loss(student_logits, teacher_logits, targets, ce_weight: float):
    """(loss, kl, ce): mean over tokens of KL(teacher || student) on the full vocabulary, plus
    `ce_weight` x cross-entropy of the student on the actual next tokens. Computed in float32."""
    s = F.log_softmax(student_logits.float(), -1)
    t = F.log_softmax(teacher_logits.float(), -1)
    kl = (t.exp() * (t - s)).sum(-1).mean()
    ce = F.nll_loss(s.reshape(-1, s.shape[-1]), targets.reshape(-1))
    return kl + ce_weight * ce, kl, ce


class TeacherTopK(NamedTuple):
    """The teacher's distribution kept as its k most likely tokens and the mass left over: what
    `topk_kd_loss` needs, 12k + 4 bytes a position instead of the whole vocabulary's logits."""

    logp: torch.Tensor  # [..., k] float32 log-probabilities of the k most likely tokens
    idx: torch.Tensor  # [..., k] int64 their token ids
    tail: torch.Tensor  # [...] float32 probability of every other token together (>= 0)


def teacher_topk(teacher_logits, k: int) -> TeacherTopK:
    """The top-k summary of a teacher's logits (a full float32 log-softmax of this chunk only)."""
    lp = F.log_softmax(teacher_logits.float(), -1)
    logp, idx = lp.topk(min(k, lp.shape[-1]), -1)
    # 1 - sum(p_top) cancels when the top-k hold nearly all the mass: sum the rest directly instead
    tail = lp.exp().scatter(-1, idx, 0.0).sum(-1)
    return TeacherTopK(logp, idx, tail)


@torch.no_grad()
def teacher_topk_chunks(lm_head, hidden, k: int, rows: int = 8, compiled: bool = False) -> TeacherTopK:
    """`teacher_topk(lm_head(hidden), k)` a few rows at a time: the teacher's full logits exist for
    one chunk only (a 64 x 512 batch's are 3.2 GB in bf16, 6.4 GB again as a float32 softmax).
    `compiled`: the summary through torch.compile (`_compiled`). Eager, its log-softmax, top-k and
    tail sum cost the teacher more than its full logits (103 against 59 ms a 64 x 512 step on an
    H100, benchmarks/NOTES.md 2026-12-08)."""
    summary = _compiled(teacher_topk) if compiled else teacher_topk
    parts = [summary(lm_head(hidden[i:i + rows]), k) for i in range(0, hidden.shape[0], rows)]
    return TeacherTopK(*(torch.cat(f) for f in zip(*parts)))


@torch.no_grad()
def teacher_targets(teacher, ids, k: int, compiled: bool = False):
    """What the KD loss compares the student with on rows `ids`: an HF causal LM teacher's logits
    at every position but the last, or with k > 0 their top-k summary (`teacher_topk_chunks` on
    its final hidden states: the full logits never exist beyond one chunk; `compiled` as there)."""
    if not k:
        return teacher(ids).logits[:, :-1]
    hidden = teacher.base_model(ids).last_hidden_state[:, :-1]
    return teacher_topk_chunks(teacher.get_output_embeddings(), hidden, k, compiled=compiled)


def topk_kd_loss(student_logits, top: TeacherTopK, targets, ce_weight: float):
    """(loss, kl, ce) as `kd_loss`, with the KL taken between the two distributions coarsened to
    k + 1 outcomes: the teacher's k most likely tokens and "any other token". Both sides are exact
    probabilities of those outcomes (the student's over its whole vocabulary), so this is a true KL;
    it is at most the full-vocabulary one and equals it when k is the vocabulary. What it saves is
    the teacher's side: no full-vocabulary teacher tensor is kept, exponentiated or multiplied.

    The "other token" bucket matters: top-k KD without it (the teacher's top-k renormalised, the rest
    ignored) says nothing about where the student's remaining mass goes, and lets it pile
    probability on tokens the teacher rules out."""
    s = student_logits.float()
    lse = s.logsumexp(-1)
    s_top = s.gather(-1, top.idx) - lse[..., None]
    kl = (top.logp.exp() * (top.logp - s_top)).sum(-1)
    if top.idx.shape[-1] < s.shape[-1]:  # k = vocabulary: no other token, and no empty logsumexp
        # the student's own mass outside the teacher's top-k, from its logits (stable near 0 and 1)
        s_tail = s.scatter(-1, top.idx, float("-inf")).logsumexp(-1) - lse
        # 0 log 0 = 0 where the teacher's tail underflows
        t_log = torch.where(top.tail > 0, top.tail, torch.ones_like(top.tail)).log()
        kl = kl + top.tail * (t_log - s_tail)
    ce = (lse - s.gather(-1, targets[..., None]).squeeze(-1)).mean()
    kl = kl.mean()
    return kl + ce_weight * ce, kl, ce


@functools.cache
def _compiled(fn):
    """A loss through torch.compile: the casts, softmaxes, gathers and products over the vocabulary
    (each a full pass over a chunk's logits in eager mode, forward, recomputation and backward)
    fuse into a few kernels. One compiled function per loss for the whole process (a chunk of
    another size compiles once more)."""
    return torch.compile(fn, dynamic=False)


def kd_loss_grad(z, teacher_logits, targets, ce_weight: float, scale: float):
    """`kd_loss` over one chunk's logits z [..., V] as sums over its tokens, and the gradient of
    `scale` x (kl + ce_weight x ce) summed that way with respect to z, written out instead of
    left to autograd: (kl_sum, ce_sum, dz in z's dtype). With q the student's softmax and p the
    teacher's, d kl / dz = q sum(p) - p and d ce / dz = q - onehot(target)."""
    s = z.float()
    lse = s.logsumexp(-1, keepdim=True)
    q = (s - lse).exp()
    t = F.log_softmax(teacher_logits.float(), -1)
    p = t.exp()
    kl = (p * (t - (s - lse))).sum()
    s_y = s.gather(-1, targets[..., None])
    ce = (lse - s_y).sum()
    dz = q * (p.sum(-1, keepdim=True) + ce_weight) - p
    dz = dz.scatter_add(-1, targets[..., None], torch.full_like(s_y, -ce_weight))
    return kl, ce, (dz * scale).to(z.dtype)


def topk_kd_loss_grad(z, top: TeacherTopK, targets, ce_weight: float, scale: float):
    """`topk_kd_loss` over one chunk as sums, and the gradient of scale x (kl + ce_weight x ce)
    with respect to z, written out as `kd_loss_grad`. With p_k the teacher's top-k probabilities,
    T its tail and Q the student's mass outside the top-k: d kl / dz_j = q_j (sum p_k + T) - p_j
    for j in the top-k, q_j (sum p_k + T) - T q_j / Q outside it (q_j / Q = exp(z_j - logsumexp of
    the logits outside the top-k), stable where Q is tiny)."""
    s = z.float()
    lse = s.logsumexp(-1, keepdim=True)
    q = (s - lse).exp()
    pk = top.logp.exp()
    kl = (pk * (top.logp - (s.gather(-1, top.idx) - lse))).sum(-1)
    mass = pk.sum(-1, keepdim=True)
    dz = q * (mass + ce_weight)
    if top.idx.shape[-1] < s.shape[-1]:  # as topk_kd_loss: the "any other token" outcome
        outside = s.scatter(-1, top.idx, float("-inf"))
        lse_out = outside.logsumexp(-1, keepdim=True)
        tail = top.tail[..., None]
        t_log = torch.where(tail > 0, tail, torch.ones_like(tail)).log()
        kl = kl + (tail * (t_log - (lse_out - lse)))[..., 0]
        dz = dz + tail * (q - (outside - lse_out).exp())
    dz = dz.scatter_add(-1, top.idx, -pk)
    s_y = s.gather(-1, targets[..., None])
    dz = dz.scatter_add(-1, targets[..., None], torch.full_like(s_y, -ce_weight))
    return kl.sum(), (lse - s_y).sum(), (dz * scale).to(z.dtype)


class _FusedKD(torch.autograd.Function):
    """`chunked_kd_loss` for a linear head with the gradient taken during the forward pass: per
    chunk, the logits, the loss and its gradient with respect to them in one pass over the
    vocabulary, then that gradient through the head (into the hidden states and the weight) at
    once; backward only scales what was kept. The autograd path instead keeps nothing, computes
    the chunk's logits and loss again in backward (checkpointing) and passes over the logits a
    third time for the softmax's backward. Memory is the same: one chunk's logits at a time, plus
    the hidden states' gradient ([rows, seq, d]) and the weight's (float32).

    Only the total loss has a gradient (kl and ce are reported, not differentiated); the head's
    hooks do not run (it is read as weight and bias)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ce_weight, rows, compiled, top, *teacher):
        grad = kd_loss_grad if not top else topk_kd_loss_grad
        grad = _compiled(grad) if compiled else grad
        n, scale = hidden.shape[0], 1.0 / targets.numel()  # the loss is a mean over every token
        # only the gradients autograd will ask for (adaptation's LM head is frozen: no weight's)
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        g_h = torch.empty_like(hidden) if want_h else None  # every chunk writes its rows
        g_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        g_b = torch.zeros_like(bias, dtype=torch.float32) if want_b else None
        kl, ce = hidden.new_zeros((), dtype=torch.float32), hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, n, rows):
            h = hidden[i:i + rows]
            z = F.linear(h, weight, bias)  # under autocast as lm_head(h) would be
            t = TeacherTopK(*(x[i:i + rows] for x in teacher)) if top else teacher[0][i:i + rows]
            kl_c, ce_c, dz = grad(z, t, targets[i:i + rows], ce_weight, scale)
            kl, ce = kl + kl_c, ce + ce_c
            if g_h is not None:
                g_h[i:i + rows] = dz @ weight.to(dz.dtype)
            if g_w is not None:
                g_w += (dz.flatten(0, -2).T @ h.flatten(0, -2).to(dz.dtype)).float()
            if g_b is not None:
                g_b += dz.flatten(0, -2).float().sum(0)
        kl, ce = kl * scale, ce * scale
        ctx.grads = g_h, g_w, g_b  # not inputs or outputs: held as they are until backward
        ctx.dtypes = weight.dtype, None if bias is None else bias.dtype
        ctx.n_teacher = len(teacher)
        ctx.mark_non_differentiable(kl, ce)
        return kl + ce_weight * ce, kl, ce

    @staticmethod
    def backward(ctx, g_loss, _g_kl, _g_ce):
        g_h, g_w, g_b = ctx.grads
        ctx.grads = None
        w_dtype, b_dtype = ctx.dtypes
        # one gradient per forward input: hidden, weight, bias, then none for the rest
        return (None if g_h is None else g_h * g_loss.to(g_h.dtype),
                None if g_w is None else (g_w * g_loss).to(w_dtype),
                None if g_b is None else (g_b * g_loss).to(b_dtype), *([None] * (5 + ctx.n_teacher)))


def chunked_kd_loss(lm_head, hidden, teacher_logits, targets, ce_weight: float, rows: int = 8,
                    compiled: bool = False):
    """`kd_loss(lm_head(hidden), ...)` with the same value and gradients, a few rows at a time;
    with a `TeacherTopK` in place of the logits, `topk_kd_loss` the same way.

    Full-vocabulary float32 log-softmaxes of a 64 x 512 batch are ~6 GB each and the loss keeps
    several for backward: at batch 64 they were 85 GiB of peak memory on an H200, and the trainer
    ran out of memory beside the sampler (2026-12-01). Each chunk's loss is recomputed in backward
    (activation checkpointing), so only one chunk's logits are alive at a time. `compiled`: the
    loss after the LM head through torch.compile (`_compiled`).

    With a plain linear head and a gradient wanted (`FUSED_GRAD`), the gradient is taken in the
    forward pass instead (`_FusedKD`): the same values and gradients, nothing recomputed; kl and
    ce are then reported without a gradient of their own."""
    from torch.utils.checkpoint import checkpoint

    top = isinstance(teacher_logits, TeacherTopK)
    if (FUSED_GRAD and torch.is_grad_enabled() and type(lm_head) is torch.nn.Linear
            and not (lm_head._forward_hooks or lm_head._forward_pre_hooks)
            and (hidden.requires_grad or any(p.requires_grad for p in lm_head.parameters()))):
        teacher = tuple(teacher_logits) if top else (teacher_logits,)
        return _FusedKD.apply(hidden, lm_head.weight, lm_head.bias, targets, ce_weight, rows, compiled, top, *teacher)
    loss = topk_kd_loss if top else kd_loss
    loss = _compiled(loss) if compiled else loss

    def part(h, y, *t):
        return torch.stack(loss(lm_head(h), TeacherTopK(*t) if top else t[0], y, ce_weight))

    n = hidden.shape[0]
    total = hidden.new_zeros(3, dtype=torch.float32)
    teacher = tuple(teacher_logits) if top else (teacher_logits,)
    for i in range(0, n, rows):
        sl = slice(i, min(n, i + rows))
        w = (sl.stop - sl.start) / n  # kd_loss averages over tokens: weigh chunks by their size
        total = total + w * checkpoint(part, hidden[sl], targets[sl], *(t[sl] for t in teacher), use_reentrant=False)
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
