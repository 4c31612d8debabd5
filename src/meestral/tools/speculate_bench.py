"""The `speculate` rows of the decode benchmark (tools/bench.py), and HF's own self-speculation as
a peer.

Rows. For each exit point E and each number of drafts k: one `speculate` row with the drafts'
natural acceptance (on real weights), and, with `inject`, one row per injected acceptance α (each
draft accepted with chance α whatever its token; states handled exactly as in real rejections).
Random weights cannot agree with themselves, so injection is how the 7B shapes are measured; a
`--draft-tokens auto` row runs the controller. Each row gives the acceptance it measured (drafts
accepted over drafts checked up to the first rejection), tokens per cycle, and beside the measured
speed-up the cost model's prediction (the design notes' arithmetic, `predicted_speedup`):

    (1 + α + ... + α^k) / cycle_cost(E, k)        cycle_cost: weight bytes, in full-depth steps

with α the injected acceptance (or the measured one), and `of_predicted` = measured / predicted:
what fixed costs (launches, the host's read, bookkeeping) take from the byte arithmetic. Beside
it, the same formula with the draft step's and the rest of the cycle's costs fitted to the
measured cycle times (`add_time_predictions`: `predicted_speedup_time`, `of_predicted_time`).

Peer `hf-assisted`: HF `generate(assistant_early_exit=E)` (LayerSkip's self-speculation in
transformers) on the same weights, one row per E, timed end to end with the prompt pass subtracted
(its logits processors run on multi-token candidates, so per-step stamps would not be per token).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from meestral.decoding.config import ExitConfig
from meestral.decoding.heads import ExitHeads
from meestral.decoding.speculate import cycle_cost
from meestral.decoding.speculation_control import expected_tokens


def speculate_cases(bb, exits, draft_tokens, inject, draft_vocab=(0,)):
    """(name, ExitConfig, α or None) per speculate row: static heads at E (confidence 1: the
    threshold never ends a cycle early), fixed k per entry of `draft_tokens` ('auto': the
    controller), one row per injected α (None: the drafts' own acceptance), per trimmed draft
    vocabulary in `draft_vocab` (0: the whole LM head)."""
    alphas = list(inject) if inject else [None]
    for e in exits:
        heads = ExitHeads("static", [e], bb)
        for k in draft_tokens:
            adaptive = str(k) == "auto"
            for n in draft_vocab:
                cfg = ExitConfig(heads=heads, thresholds=0.0, policy="speculate", draft_tokens=6 if adaptive else int(k),
                                 adaptive=adaptive, draft_vocab=n).checked(bb)
                for a in alphas:
                    name = (f"spec@{e} k={'auto' if adaptive else k}" + (f" v={n}" if n else "")
                            + ("" if a is None else f" a={a:g}"))
                    yield name, cfg, a


def speculate_fields(bb, cfg, alpha, counts: list[dict]) -> dict:
    """The speculate-only fields of a row from the policy's counts over its timed runs."""
    tot = {k: sum(c[k] for c in counts) for k in counts[0]}
    acceptance = tot["accepted"] / tot["checked"] if tot["checked"] else None
    e, k = cfg.exit_points[0], cfg.draft_tokens
    out = {"exit": e, "draft_tokens": "auto" if cfg.adaptive else k, "draft_vocab": cfg.draft_vocab, "inject_alpha": alpha,
           "acceptance": acceptance, "cycles": tot["cycles"], "full_steps": tot["full_steps"],
           "accepted_per_cycle": tot["accepted"] / tot["cycles"] if tot["cycles"] else None,
           "predicted_speedup": None,
           "decode_ms": tot.get("ms")}  # wall time of the timed runs' steps (the prompt pass not in it)
    a = alpha if alpha is not None else acceptance
    if not cfg.adaptive and a is not None:
        out["predicted_speedup"] = expected_tokens(a, k) / cycle_cost(bb, e, k, draft_vocab=cfg.draft_vocab)
    return out


def add_time_predictions(rows, full_ms: float) -> None:
    """The cost model's prediction from measured times, on every fixed-k speculate row.

    A cycle of k drafts costs k draft steps plus a fixed part (the last draft's shallow step, the
    deep pass, the LM head over k+1 slots, the read): t(k) = fixed + k * draft. The two are fitted
    (least squares) to the measured `cycle_ms` (set here) of the rows that share an exit point, trimmed head
    and engine, over their k (a cycle's time does not depend on α: its shapes are fixed); then,
    with d = draft / full and v = fixed / full (full: our full-depth ms/token),

        predicted_speedup_time = (1 + α + ... + α^k) / (k d + v)

    and `of_predicted_time` = measured / that: how far acceptance's spread and the cycle-to-cycle
    costs the fit leaves out take the speed-up from the time model (the byte model,
    `predicted_speedup`, also charges what fixed costs take). Rows of a group with a single k get none."""
    groups = {}
    for r in rows:
        if r.get("decode_ms") is not None and r.get("cycles") and r.get("draft_tokens") != "auto":
            # An eager engine's last step may be a plain full-depth one (no room for a draft): priced
            # at our full depth's ms/token and taken out.
            r["cycle_ms"] = (r["decode_ms"] - r["full_steps"] * full_ms) / r["cycles"]
            groups.setdefault((r["exit"], r["draft_vocab"], r["engine"]), []).append(r)
    for group in groups.values():
        ks = [r["draft_tokens"] for r in group]
        if len(set(ks)) < 2:
            continue
        ts = [r["cycle_ms"] for r in group]
        mk, mt = statistics.mean(ks), statistics.mean(ts)
        draft = sum((k - mk) * (t - mt) for k, t in zip(ks, ts)) / sum((k - mk) ** 2 for k in ks)
        fixed = mt - draft * mk
        for r in group:
            a = r["inject_alpha"] if r["inject_alpha"] is not None else r["acceptance"]
            k = r["draft_tokens"]
            r["draft_step_ms"], r["cycle_fixed_ms"] = draft, fixed
            if a is None or fixed + k * draft <= 0:
                continue
            r["predicted_speedup_time"] = expected_tokens(a, k) / ((fixed + k * draft) / full_ms)
            r["of_predicted_time"] = r["speedup_vs_full"] / r["predicted_speedup_time"]


def hf_assisted_ms(bb, ids, tokens, repeats, exit_layer) -> float:
    """Decode ms/token of HF `generate(assistant_early_exit=...)` drafting from our exit point
    `exit_layer` (HF counts layers: blocks 0..E are E+1 of them), greedy: (time of `tokens` new
    tokens - time of one) / (tokens - 1), median over `repeats` after a warm-up run."""
    x = torch.tensor([ids], device=bb.device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, assistant_early_exit=exit_layer + 1)

    def timed(n):
        if bb.device.type == "cuda":
            torch.cuda.synchronize(bb.device)
        t0 = time.perf_counter()
        bb.model.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
        if bb.device.type == "cuda":
            torch.cuda.synchronize(bb.device)
        return time.perf_counter() - t0

    timed(tokens)  # warm-up
    runs = [(timed(tokens) - timed(1)) * 1000 / (tokens - 1) for _ in range(repeats)]
    return statistics.median(runs)


def assisted_peer_ms(bb, ids, tokens, repeats, exits) -> dict:
    """{E: ms/token} of the hf-assisted peer; a backbone HF cannot self-speculate is reported."""
    out = {}
    for e in exits:
        try:
            out[e] = hf_assisted_ms(bb, ids, tokens, repeats, e)
        except Exception as err:  # a peer that cannot run this backbone is reported, not fatal
            print(f"peer hf-assisted@{e} skipped: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                  file=sys.stderr)
            out[e] = None
    return out
