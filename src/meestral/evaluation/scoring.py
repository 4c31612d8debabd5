"""Teacher-forced scoring with per-token early exits: what lm-eval's log-likelihoods need.

A request is a token sequence whose last `n` tokens are scored. As in generation, the context is
the prompt (run at full depth: the first scored token comes from it) and every later scored token
is predicted by a decode step that may exit early. Three paths, one result type (`Scored`):

- **exact** (`catchup`, `verify`, and the full model): under catch-up every layer's state is the
  full model's, so the hidden state a decode step sees at each layer is the full model's too. One
  parallel HF forward (`Backbone.collect`) therefore gives, per scored token, the confidence at
  every exit point and the log-probability of the target at every exit point: a `Table`. Any
  threshold is then scored from the table without touching the model again (`decide`), which
  is what makes threshold sweeps cheap. `decide` replays the catch-up schedule (backlog, forced
  deep passes at `max_backlog`) to charge each token the layers, FLOPs and weight bytes the
  decoder would spend. Under `verify` the emitted distribution is the full model's (lossless);
  the cost is catch-up's (teacher forcing has no rejected drafts to roll back).
- **sequential** (`copy`, `propagate`): skipped layers hold approximate states that change what
  later tokens see, so the decoder itself runs token by token (`EarlyExitDecoder._step`) with the
  targets forced.
- **pruned** (the layer-drop baseline): a model without some blocks is deterministic, so one
  parallel pass through the kept blocks scores the whole sequence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from meestral.accounting import TokenStats


@dataclass
class Scored:
    """One request's result: lm-eval wants (logprob, greedy); the rest is our accounting."""

    logprob: float
    greedy: bool
    stats: list[TokenStats]  # per scored token; the first comes from the full-depth prompt pass
    agree: list[bool]  # per scored token: emitted top-1 == the full model's top-1
    wall_s: float = 0.0


@dataclass
class Table:
    """Per scored token, what every exit point would give (exact path)."""

    conf: torch.Tensor  # [n, J] confidence at each exit point
    lp: torch.Tensor  # [n, J+1] log-prob of the target at each exit point, then at full depth
    top: torch.Tensor  # [n, J+1] top-1 token at each exit point, then at full depth
    target: torch.Tensor  # [n]
    start: int  # tokens seen before the first scored prediction's input (its context - 1)
    wall_s: float = 0.0  # time of the pass that built it (shared across the batch by tokens)
    extra: dict = field(default_factory=dict)


def _chunks(n, size):
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


@torch.no_grad()
def build_tables(bb, heads, rows, chunk: int = 256) -> list[Table]:
    """Tables for requests `rows` = [(tokens fed, number of scored tokens)], one batched forward.

    `tokens fed` is the input (context + continuation minus its last token, as lm-eval feeds
    it); the scored positions are its last n, their targets the continuation. Right padding is
    harmless: every position only sees earlier ones.
    """
    seqs = [list(s) for s, _ in rows]
    targets = [t for _, t in rows]
    T = max(len(s) for s in seqs)
    dev = bb.device
    ids = torch.zeros(len(seqs), T, dtype=torch.long, device=dev)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, device=dev)
    points = list(heads.exit_points) if heads is not None else []
    need = set(points)
    if heads is not None and heads.kind == "saturation":
        need |= {p - 1 for p in points if p > 0}
    t0 = time.perf_counter()
    lo = min(len(s) - len(t) for s, t in zip(seqs, targets))
    keep = torch.arange(lo, T, device=dev)  # final logits only where some row is scored
    hidden, aux, final = bb.collect(ids, sorted(need), aux=heads is not None and heads.features == "hidden+aux",
                                    logits_at=keep)
    emb = bb.embed(ids) if heads is not None and heads.kind == "saturation" and 0 in points else None
    tables = []
    for b, (s, tgt) in enumerate(zip(seqs, targets)):
        n = len(tgt)
        pos = torch.arange(len(s) - n, len(s), device=dev)
        target = torch.tensor(tgt, device=dev)
        J = len(points)
        conf = torch.zeros(n, J)
        lp = torch.zeros(n, J + 1)
        top = torch.zeros(n, J + 1, dtype=torch.long)
        full = final[b, pos - lo].float().log_softmax(-1)
        lp[:, J] = full.gather(-1, target[:, None])[:, 0].cpu()
        top[:, J] = full.argmax(-1).cpu()
        for j, p in enumerate(points):
            h = hidden[p][b, pos]
            a = aux[p][b, pos] if aux else None
            for sl in _chunks(n, chunk):
                lg = bb.logits(h[sl]).float()
                ls = lg.log_softmax(-1)
                if heads.kind in ("softmax", "margin"):  # the same numbers, without a second softmax
                    p_top = ls.topk(2, dim=-1).values.exp()
                    c = p_top[:, 0] if heads.kind == "softmax" else p_top[:, 0] - p_top[:, 1]
                else:
                    prev = None
                    if heads.kind == "saturation":
                        prev = (hidden[p - 1][b, pos] if p > 0 else emb[b, pos])[sl]
                    c = heads.confidence(j, h[sl], None if a is None else a[sl], prev, None)
                conf[sl, j] = c.float().cpu()
                lp[sl, j] = ls.gather(-1, target[sl, None])[:, 0].cpu()
                top[sl, j] = ls.argmax(-1).cpu()
        tables.append(Table(conf, lp, top, target.cpu(), len(s) - n))
    wall = time.perf_counter() - t0
    total = sum(len(t) for t in targets)
    for tab, tgt in zip(tables, targets):
        tab.wall_s = wall * len(tgt) / total
    return tables


def calibration_data(bb, heads, rows: torch.Tensor, batch: int = 8, progress: bool = True):
    """Per-token (conf [N, J], agree [N, J+1], sequence id [N]) on packed text rows, from exact
    tables: what Learn-then-Test calibrates on (agree[:, j]: exit point j gives the full model's
    top-1; the last column, full depth, always does)."""
    import numpy as np
    from tqdm import tqdm

    confs, agrees, groups = [], [], []
    for s in tqdm(range(0, rows.shape[0], batch), desc="calibration data", disable=not progress):
        chunk = [(r[:-1].tolist(), r[1:].tolist()) for r in rows[s:s + batch]]
        for k, tab in enumerate(build_tables(bb, heads, chunk)):
            J = tab.conf.shape[1]
            confs.append(tab.conf.numpy())
            agrees.append((tab.top == tab.top[:, J:J + 1]).numpy())
            groups.append(np.full(tab.conf.shape[0], s + k))
    return np.concatenate(confs), np.concatenate(agrees), np.concatenate(groups)


def decide(table: Table, thresholds, exit_points, cost, num_layers: int, verify: bool, max_backlog: int,
           needs_logits: bool) -> Scored:
    """Score one table at given thresholds under catch-up (or verify): exits, emitted log-probs
    and the catch-up schedule's cost per token (weights of a layer read once per step for all the
    backlog tokens it carries; FLOPs paid per token)."""
    L, J = num_layers, len(exit_points)
    n = table.lp.shape[0]
    th = torch.tensor(list(thresholds), dtype=torch.float32) if J else torch.zeros(0)
    above = table.conf > th[None, :] if J else torch.zeros(n, 0, dtype=torch.bool)
    if J:
        first = torch.where(above.any(1), above.float().argmax(1), torch.full((n,), J)).tolist()
    else:
        first = [0] * n  # no exit points: J == 0 is full depth
    pending: list[int] = []  # depths of backlog tokens (exited, not yet through every layer)
    stats, agree, logprob, greedy = [], [], 0.0, True
    lp, top, target = table.lp.tolist(), table.top.tolist(), table.target.tolist()
    for t in range(n):
        context = table.start + t + 1
        if t == 0:  # predicted by the prompt pass, at full depth
            j = J
            flops, nbytes = cost.token(range(L), [], 0, context, True)
            st = TokenStats(L - 1, L, 0, flops * context, nbytes, 0.0, prefill=True)
        else:
            forced = len(pending) >= max_backlog
            j = J if forced else first[t]
            e = L - 1 if j == J else exit_points[j]
            probes = 0 if forced else (J if j == J else j + 1)
            slots = [1 + sum(d < i for d in pending) if i <= e else 0 for i in range(L)]
            head_read = not (j < J and needs_logits)
            flops, nbytes = cost.token(range(e + 1), [], probes, context, head_read, slots=slots)
            st = TokenStats(e, e + 1, probes, flops, nbytes, 0.0, caught_up=sum(slots) - (e + 1), deep=j == J)
            pending = [] if j == J else [max(d, e) for d in pending] + [e]
        out = J if verify else j
        logprob += lp[t][out]
        greedy &= top[t][out] == target[t]
        agree.append(top[t][out] == top[t][J])
        stats.append(st)
    if verify and pending and stats:
        # Every scored token needs the full model's distribution: drafts still waiting at the end
        # are verified by one more deep pass (generation flushes them the same way).
        slots = [sum(d < i for d in pending) for i in range(L)]
        ran = [i for i in range(L) if slots[i]]
        flops, nbytes = cost.token(ran, [], 0, table.start + n, True, slots=slots)
        last = stats[-1]
        last.flops += flops
        last.weight_bytes += nbytes - cost.embed_bytes  # no new token is embedded
        last.caught_up += sum(slots)
    per = table.wall_s / max(n, 1) * 1000
    for s in stats:
        s.wall_ms = per
    return Scored(logprob, bool(greedy), stats, agree, table.wall_s)


@torch.no_grad()
def score_sequential(dec, rows) -> list[Scored]:
    """Teacher-forced decoding for `copy` / `propagate` (and pruned models through the decoder):
    rows = [(context tokens, continuation tokens)], decoded as a batch with left padding. The
    prompt runs at full depth (like generation); each continuation token but the last is then fed
    through `EarlyExitDecoder._step`, whose logits predict the next one."""
    bb, L = dec.bb, dec.bb.num_layers
    dev = bb.device
    B = len(rows)
    P = max(len(c) for c, _ in rows)
    N = max(len(x) for _, x in rows)
    pad = torch.tensor([P - len(c) for c, _ in rows], device=dev)
    ids = torch.zeros(B, P, dtype=torch.long, device=dev)
    cont = torch.zeros(B, N, dtype=torch.long, device=dev)
    for b, (c, x) in enumerate(rows):
        ids[b, P - len(c):] = torch.tensor(c, device=dev)
        cont[b, : len(x)] = torch.tensor(x, device=dev)
    lengths = torch.tensor([len(x) for _, x in rows], device=dev)
    # The full model's top-1 at every scored position, for agreement (one parallel pass).
    whole = torch.cat([ids, cont], 1)
    mask = torch.cat([torch.arange(P, device=dev)[None, :] >= pad[:, None], torch.ones_like(cont, dtype=torch.bool)], 1)
    full_top = bb.model(input_ids=whole, attention_mask=mask.long()).logits[:, P - 1: P - 1 + N].argmax(-1)

    t0 = time.perf_counter()
    state = bb.new_state(B, P + N)
    step = bb.make_step(0, P, pad)
    h = bb.embed(ids)
    for i in range(L):
        if i not in dec.skip:
            h, _ = bb.forward_layer(i, h, state, step)
    logits = bb.logits(h[:, -1]).float()
    wall = time.perf_counter() - t0
    kept = [i for i in range(L) if i not in dec.skip]
    out = []
    for b, (c, x) in enumerate(rows):
        flops, nbytes = dec.cost.token(kept, [], 0, len(c), True)
        out.append(Scored(0.0, True, [TokenStats(L - 1, len(kept), 0, flops * len(c), nbytes, wall * 1000, prefill=True)],
                          [], wall))
    for t in range(N):
        ls = logits.log_softmax(-1)
        emitted = ls.argmax(-1)
        active = t < lengths
        lp = ls.gather(-1, cont[:, t:t + 1])[:, 0]
        for b in torch.nonzero(active).flatten().tolist():
            r = out[b]
            r.logprob += float(lp[b])
            r.greedy &= bool(emitted[b] == cont[b, t])
            r.agree.append(bool(emitted[b] == full_top[b, t]))
        nxt = active & (t + 1 < lengths)
        if t + 1 >= N or not nxt.any():
            break
        t1 = time.perf_counter()
        logits, info = dec._step(cont[:, t], P + t, pad, nxt, state)
        logits = logits.float()
        w = time.perf_counter() - t1
        dec._record(out, info, nxt, P + t + 1 - pad, w * 1000)  # appends to each row's .stats
        for r in out:
            r.wall_s += w
    return out
