"""Teacher-forced scoring with per-token early exits: what lm-eval's log-likelihoods need.

A request is a token sequence whose last `n` tokens are scored. As in generation, the context is
the prompt (run at full depth: the first scored token comes from it) and every later scored token
is predicted by a decode step that may exit early. Three paths, one result type (`Scored`):

- **exact** (`catchup`, `verify`, and the full model): under catch-up every layer's state is the
  full model's, so the hidden state a decode step sees at each layer is the full model's too. One
  parallel HF forward (`Backbone.collect`) therefore gives, per scored token, the confidence at
  every exit point and the log-probability of the target at every exit point: a `Table`. Any
  threshold is then scored from the table without touching the model again (`decide`), which
  is what makes threshold sweeps cheap. `decide` steps the decoder's own catch-up schedule
  (decoding/schedule.py: backlog, forced deep passes at `max_backlog`, the step logs) to charge
  each token the layers, FLOPs and weight bytes the decoder would spend. Under `verify` the emitted distribution is the full model's (lossless);
  the cost is what greedy generation would pay on the sequence, rejected drafts included
  (verify_replay.py: a draft whose top-1 is not the full model's is rolled back at the next deep
  pass, and the drafts generation would make after it are run through the model to price them).
- **sequential** (`copy`, `propagate`): skipped layers hold approximate states that change what
  later tokens see, so the decoder's own policy step runs token by token with the targets forced.
- **pruned** (the layer-drop baseline): a model without some blocks is deterministic, so one
  parallel pass through the kept blocks scores the whole sequence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from meestral.data import right_padded
from meestral.decoding.accounting import StepLog, TokenStats, account, token_stats
from meestral.decoding.exit_rule import first_exit
from meestral.decoding.schedule import BacklogSchedule, probes_asked


@dataclass
class Scored:
    """One request's result: lm-eval wants (logprob, greedy); the rest is our accounting."""

    logprob: float
    greedy: bool
    stats: list[TokenStats]  # per scored token; the first comes from the full-depth prompt pass
    agree: list[bool]  # per scored token: emitted top-1 == the full model's top-1
    wall_s: float = 0.0
    discarded: list[TokenStats] = field(default_factory=list)  # verify: work on rolled-back drafts
    #                                  and the final flush, as the decoder's Generation.discarded


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
    fed: list = field(default_factory=list)  # the tokens fed (what verify's branches start from)
    # [n, J] per exit point, the smallest token id an argmax over the LM head's first rows would pick
    # instead of the full model's top-1 (the vocabulary size when none would): a draft from a head
    # trimmed to N rows is the full model's top-1 f iff f < N <= beat (speculate's draft_vocab).
    beat: torch.Tensor | None = None
    vocab: int = 0  # the LM head's rows


def _chunks(n, size):
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


@torch.no_grad()
def first_winner(lg: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Per row of logits lg [n, V], the smallest token id argmax would prefer to f [n] (a higher
    logit, or an equal one at a smaller id: argmax takes the first maximum); V where none is."""
    lf = lg.gather(-1, f[:, None])
    ids = torch.arange(lg.shape[-1], device=lg.device)
    wins = (lg > lf) | ((lg == lf) & (ids < f[:, None]))
    return torch.where(wins.any(-1), wins.int().argmax(-1), lg.shape[-1])


@torch.no_grad()  # trained heads hold parameters that require grad: tables are numbers, not graphs
def build_tables(bb, heads, rows, chunk: int = 256) -> list[Table]:
    """Tables for requests `rows` = [(tokens fed, number of scored tokens)], one batched forward.

    `tokens fed` is the input (context + continuation minus its last token, as lm-eval feeds
    it); the scored positions are its last n, their targets the continuation. Right padding is
    harmless: every position only sees earlier ones.
    """
    seqs = [list(s) for s, _ in rows]
    targets = [t for _, t in rows]
    dev = bb.device
    ids, _ = right_padded(seqs, dev)
    T = ids.shape[1]
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
        beat = torch.zeros(n, J, dtype=torch.long)
        f_top = full.argmax(-1)
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
                beat[sl, j] = first_winner(lg, f_top[sl]).cpu()
        tables.append(Table(conf, lp, top, target.cpu(), len(s) - n, fed=s, beat=beat, vocab=full.shape[-1]))
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


def decide(table: Table, config, cost, num_layers: int, bb=None) -> Scored:
    """Score one table under an exact configuration (`catchup`, `verify`, or no exits): exits by
    the exit rule, emitted log-probs, and what the decoder would run for each token, as the
    decoder's own step logs (its backlog schedule; weights of a layer read once per step for every
    backlog token it carries, FLOPs paid per token). `verify` with exits needs the
    backbone `bb`: the drafts generation would make after a rejected one are not in the table."""
    L, points, verify = num_layers, config.exit_points, config.verify
    J = len(points)
    n = table.lp.shape[0]
    lp, top, target = table.lp.tolist(), table.top.tolist(), table.target.tolist()
    if config.policy == "speculate" and J:  # lossless; priced as greedy generation's cycles (speculate_replay.py)
        from meestral.evaluation.speculate_replay import replay_speculate

        logs, dropped = replay_speculate(table, config, L, bb=bb)
        return Scored(sum(r[J] for r in lp), all(top[t][J] == target[t] for t in range(n)), account(logs, cost),
                      [True] * n, table.wall_s, [token_stats(d, cost) for d in dropped])
    if verify and J:
        logs, dropped = _verify_logs(table, config, L, bb)
        return Scored(sum(r[J] for r in lp), all(top[t][J] == target[t] for t in range(n)), account(logs, cost),
                      [True] * n, table.wall_s, [token_stats(d, cost) for d in dropped])
    first = first_exit(table.conf, config.thresholds).tolist() if J else [0] * n  # J == 0: full depth
    sched = BacklogSchedule(config.max_backlog, L)
    logs, agree, logprob, greedy = [], [], 0.0, True
    for t in range(n):
        context = table.start + t + 1
        if t == 0:  # predicted by the prompt pass, at full depth
            j = J
            log = StepLog.prefill_pass(range(L), context, L)
            log.verified = verify
        else:
            forced = sched.full
            j = J if forced else first[t]
            log = sched.step(L - 1 if j == J else points[j], context, probes=probes_asked(j, J, forced),
                             probe_logits=config.probe_logits, verified=verify)
        logs.append(log)
        logprob += lp[t][j]
        greedy &= top[t][j] == target[t]
        agree.append(top[t][j] == top[t][J])
    return Scored(logprob, bool(greedy), account(logs, cost), agree, table.wall_s)


def _verify_logs(table, config, num_layers, bb):
    """verify_replay on the table, with the table's own store of off-sequence rows (kept across
    thresholds, so a sweep runs each branch through the model once)."""
    from meestral.evaluation.verify_replay import OffSequence, replay_verify

    if bb is None:
        raise ValueError("decide: verify needs the backbone (bb=...) to price the drafts it would reject")
    off = table.extra.get("off")
    if off is None or off.heads is not config.heads:
        off = table.extra["off"] = OffSequence(bb, config.heads, table.fed)
    try:
        return replay_verify(table, config, num_layers, off, bb.can_truncate, bb.tokenizer.eos_ids)
    finally:
        off.release()


@torch.no_grad()
def score_sequential(dec, rows, full_top: dict | None = None) -> list[Scored]:
    """Teacher-forced decoding for `copy` / `propagate` (and pruned models through the decoder):
    rows = [(context tokens, continuation tokens)], decoded as a batch with left padding. The
    prompt runs at full depth (`dec.prefill`, as in generation); each continuation token but the
    last is then fed through the policy's own step (`forward`), whose logits predict the next one.
    The step logs are the decoder's; their time is scoring time, so it is left out of them.

    `full_top`: {(context, continuation) as tuples: the full model's top-1 at each scored
    position}, read and filled here (`MeestralLM` keeps one across configurations): it does not
    depend on the configuration, and computing it is a whole-sequence pass at full depth."""
    bb, cost = dec.bb, dec.cost
    dev = bb.device
    B = len(rows)
    N = max(len(x) for _, x in rows)
    t0 = time.perf_counter()
    batch, logits, logs, _ = dec.prefill([list(c) for c, _ in rows], N)
    P = batch.P
    cont = torch.zeros(B, N, dtype=torch.long, device=dev)
    for b, (_, x) in enumerate(rows):
        cont[b, : len(x)] = torch.tensor(x, device=dev)
    logits = logits.float()
    wall = time.perf_counter() - t0
    out = [Scored(0.0, True, [token_stats(logs[b], cost)], [], wall) for b in range(B)]
    lengths = [len(x) for _, x in rows]
    full_top = _full_top(bb, batch, cont, rows, lengths, {} if full_top is None else full_top)
    for t in range(N):
        ls = logits.log_softmax(-1)
        emitted = ls.argmax(-1)
        lp = ls.gather(-1, cont[:, t:t + 1])[:, 0]
        scored = [b for b in range(B) if t < lengths[b]]
        # One read for the step: log-prob, greedy and agreement of every row.
        vals = torch.stack([lp, (emitted == cont[:, t]).float(), (emitted == full_top[:, t]).float()], 1).tolist()
        for b in scored:
            r = out[b]
            r.logprob += vals[b][0]
            r.greedy &= bool(vals[b][1])
            r.agree.append(bool(vals[b][2]))
        nxt = [t + 1 < lengths[b] for b in range(B)]
        if t + 1 >= N or not any(nxt):
            break
        for b in range(B):
            if batch.active[b] and not nxt[b]:
                batch.retire(b)
        t1 = time.perf_counter()
        logits, logs = dec.policy.forward(batch, cont[:, t], P + t)
        logits = logits.float()
        w = time.perf_counter() - t1
        for b, log in enumerate(logs):
            if log is not None:
                out[b].stats.append(token_stats(log, cost))
        for r in out:
            r.wall_s += w
    return out


def _full_top(bb, batch, cont, rows, lengths, known: dict) -> torch.Tensor:
    """[B, N] the full model's top-1 at every scored position (for agreement): from `known` where
    every row is there, else one parallel pass over prompt and continuation, stored in `known`."""
    keys = [(tuple(c), tuple(x)) for c, x in rows]
    if not all(k in known for k in keys):
        dev, P, N = bb.device, batch.P, cont.shape[1]
        whole = torch.cat([batch.ids, cont], 1)
        mask = torch.cat([torch.arange(P, device=dev)[None, :] >= batch.pad[:, None],
                          torch.ones_like(cont, dtype=torch.bool)], 1)
        # Through `collect` (Mamba-2: the chunked scan; HF's own torch scan is many times slower),
        # with the LM head only at the scored positions.
        at = torch.arange(P - 1, P - 1 + N, device=dev)
        top = bb.collect(whole, [], attention_mask=mask.long(), logits_at=at)[2].argmax(-1).tolist()
        for k, t, n in zip(keys, top, lengths):
            known[k] = t[:n]
    out = torch.zeros(len(rows), cont.shape[1], dtype=torch.long, device=cont.device)
    for b, k in enumerate(keys):
        out[b, : len(known[k])] = torch.tensor(known[k], device=cont.device)
    return out
