"""Decode benchmark: full depth against exits forced at two layers, under each state policy.

Exits are forced with `static` heads (confidence 1, no probe cost), so the numbers isolate the
mechanism: what skipping layers and filling their state costs and saves. Each case is timed
`repeats` times, round-robin across cases so drift hits all of them alike; the median is kept, and
ratios are taken against the full-depth case of the same run. One JSON line per case.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time

import torch

from meestral.backbones.loading import load_backbone
from meestral.decoding import EarlyExitDecoder
from meestral.exit_config import ExitConfig
from meestral.heads import ExitHeads, check_exit_points
from meestral.sampling import SamplingOptions

PROMPT = "The history of the printing press begins"


POLICIES = ("copy", "propagate", "catchup", "verify")


def cases(bb, exits, max_backlog):
    """(name, ExitConfig) per case. Under catchup a forced exit still goes deep every
    `max_backlog + 1` tokens (the backlog bound); under verify the random drafts are mostly
    rejected, so that row shows the cost of verification, not a quality-preserving speed-up."""
    yield "full", ExitConfig()
    for e in exits:
        heads = ExitHeads("static", [e], bb)
        for policy in POLICIES:
            yield f"exit@{e}", ExitConfig(heads, 0.0, policy, max_backlog)


def _hf_generate_ms(bb, tokens, repeats):
    """Decode ms/token of HF's own `generate` (greedy, its default cache) on the same prompt: the
    reference our block-by-block full-depth path is held to. A logits processor stamps the time
    at every step, so the prefill is left out and each decode step is timed on its own."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            if scores.is_cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            return scores

    ids = torch.tensor([bb.tokenizer.encode(PROMPT)], device=bb.device)
    steps = []
    try:
        for _ in range(repeats + 1):  # the first run warms up
            stamp = Stamp()
            bb.model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0,
                              eos_token_id=None, logits_processor=LogitsProcessorList([stamp]))
            steps.append([(b - a) * 1000 for a, b in zip(stamp.times, stamp.times[1:])])
    except Exception as e:  # a backbone HF cannot `generate` with is still benchmarked
        print(f"hf_generate skipped: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    return statistics.median(statistics.mean(s) for s in steps[1:])


def run_bench(backbone="smollm2", exits=None, tokens=32, device="cpu", dtype=None, repeats=3, out=None,
              max_backlog=4):
    out = out or sys.stdout  # resolved per call, so redirections made after import are honoured
    bb = load_backbone(backbone, dtype=dtype, device=device)
    L = bb.num_layers
    exits = check_exit_points(exits or [L // 3, 2 * L // 3], L)
    opts = SamplingOptions(max_new_tokens=tokens)
    decs = [(name, cfg.policy, EarlyExitDecoder(bb, config=cfg)) for name, cfg in cases(bb, exits, max_backlog)]
    decs[0][2].generate([PROMPT], SamplingOptions(max_new_tokens=4))  # warm-up: allocator, kernels
    runs = {i: [] for i in range(len(decs))}
    for _ in range(repeats):
        for i, (_, _, dec) in enumerate(decs):
            # dec.summary charges the work on rolled-back (verify) tokens to the kept ones.
            runs[i].append(dec.summary(dec.generate([PROMPT], opts)[0]))
    hf_ms = _hf_generate_ms(bb, tokens, repeats)
    rows = []
    for i, (name, policy, dec) in enumerate(decs):
        s = runs[i]
        ms = statistics.median(r["ms_per_token"] for r in s)
        rows.append({
            "case": name, "policy": policy if name != "full" else "-", "backbone": bb.name, "device": str(bb.device),
            "dtype": str(bb.dtype).removeprefix("torch."), "layers": L,
            "decoded_tokens": s[0]["tokens"], "mean_layers_run": s[0]["mean_layers_run"],
            "draft_mean_layers_run": s[0].get("draft_mean_layers_run"),
            "deep_passes_per_token": s[0]["deep_passes_per_token"], "rolled_back": s[0]["rolled_back"],
            "max_backlog": max_backlog if policy in ("catchup", "verify") else None,
            "weight_bytes_per_token": s[0]["weight_bytes_per_token"],
            "flops_per_token": s[0]["flops_per_token"], "ms_per_token": ms, "tokens_per_s": 1000.0 / ms,
        })
    if hf_ms is not None:
        rows.append(dict(rows[0], case="hf_generate", policy="-", ms_per_token=hf_ms, tokens_per_s=1000.0 / hf_ms))
    base = rows[0]
    for r in rows:
        r["speedup_vs_full"] = base["ms_per_token"] / r["ms_per_token"]
        r["weight_bytes_ratio"] = r["weight_bytes_per_token"] / base["weight_bytes_per_token"]
        r["host"] = platform.node() or "unknown"
        r["torch"] = torch.__version__
        r["date"] = time.strftime("%Y-%m-%d")
        print(json.dumps(r), file=out)
    print(f"\n{'case':<11} {'policy':<10} {'layers':>7} {'deep':>5} {'tok/s':>8} {'speed-up':>9} {'MB/token':>9} "
          f"{'bytes':>6}", file=sys.stderr)
    for r in rows:
        print(f"{r['case']:<11} {r['policy']:<10} {r['mean_layers_run']:>7.1f} {r['deep_passes_per_token']:>5.2f} "
              f"{r['tokens_per_s']:>8.1f} {r['speedup_vs_full']:>8.2f}x {r['weight_bytes_per_token'] / 1e6:>9.1f} "
              f"{r['weight_bytes_ratio']:>5.2f}x", file=sys.stderr)
    return rows
