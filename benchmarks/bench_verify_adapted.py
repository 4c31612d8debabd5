"""`verify` decoding on a backbone before and after early-exit adaptation: wall-clock against our
own full depth on the same backbone, token identity, and how deep the drafts went.

Exits are read through the shared LM head (`softmax` confidence), which is what adaptation
trains; the same prompts, exit points and threshold run on both backbones. One JSON line per
backbone (original, adapted), then a table on stderr.

    python benchmarks/bench_verify_adapted.py --adapter run/adapter.safetensors [--backbone smollm2]
        [--exits 15,22] [--threshold 0.8] [--tokens 48] [--device cpu]
"""

import argparse
import json
import platform
import sys
import time

import torch

from meestral.backbones.loading import load_backbone
from meestral.decoding.decoder import EarlyExitDecoder, SamplingOptions
from meestral.decoding.config import ExitConfig
from meestral.decoding.heads import ExitHeads
from meestral.backbones.lora import apply_adapter

PROMPTS = ["Explain why the sky is blue.", "Write a short story about a lighthouse keeper.",
           "What are the main causes of the French Revolution?"]


def timed(dec, prompts, opts):
    t = time.perf_counter()
    gens = dec.generate(prompts, opts, chat=True)
    return gens, time.perf_counter() - t


def measure(bb, exits, threshold, tokens, max_backlog):
    opts = SamplingOptions(max_new_tokens=tokens)
    full = EarlyExitDecoder(bb)
    heads = ExitHeads("softmax", exits, bb)
    ver = EarlyExitDecoder(bb, ExitConfig(heads=heads, thresholds=threshold, policy="verify", max_backlog=max_backlog))
    full.generate([PROMPTS[0]], SamplingOptions(max_new_tokens=4), chat=True)  # warm-up
    row = {"backbone": bb.name, "exits": exits, "threshold": threshold, "max_backlog": max_backlog}
    full_s = verify_s = 0.0
    n_tok, identical, summaries, full_bytes = 0, True, [], []
    for p in PROMPTS:  # one prompt at a time: batch 1, the case early exit is for
        (f,), fs = timed(full, [p], opts)
        (v,), vs = timed(ver, [p], opts)
        full_s, verify_s, n_tok = full_s + fs, verify_s + vs, n_tok + len(f.token_ids)
        identical &= v.token_ids == f.token_ids
        summaries.append(ver.summary(v))
        full_bytes.append(full.summary(f)["weight_bytes_per_token"])
    row.update(tokens=n_tok, full_ms_per_token=1000 * full_s / n_tok, verify_ms_per_token=1000 * verify_s / n_tok,
               speedup=full_s / verify_s, token_identical=identical,
               draft_mean_layers_run=sum(s.get("draft_mean_layers_run") or 0 for s in summaries) / len(summaries),
               rolled_back=sum(s["rolled_back"] for s in summaries),
               weight_bytes_ratio=sum(s["weight_bytes_per_token"] for s in summaries) / sum(full_bytes),
               device=str(bb.device), host=platform.node() or "unknown", torch=torch.__version__,
               date=time.strftime("%Y-%m-%d"))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="smollm2")
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--exits", default=None, help="exit points (default: L/2, 3L/4)")
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--max-backlog", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    rows = []
    for adapted in (False, True):
        bb = load_backbone(args.backbone, device=args.device)
        if adapted:
            apply_adapter(bb, args.adapter, name=f"{bb.name}+adapter")
        L = bb.num_layers
        exits = [int(x) for x in args.exits.split(",")] if args.exits else [L // 2, 3 * L // 4]
        row = measure(bb, exits, args.threshold, args.tokens, args.max_backlog)
        row["model"] = "adapted" if adapted else "original"
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{'model':<9} {'full ms/tok':>11} {'verify ms/tok':>13} {'speed-up':>9} {'identical':>9} "
          f"{'draft layers':>12} {'rolled back':>11} {'bytes':>6}", file=sys.stderr)
    for r in rows:
        print(f"{r['model']:<9} {r['full_ms_per_token']:>11.1f} {r['verify_ms_per_token']:>13.1f} {r['speedup']:>8.2f}x "
              f"{str(r['token_identical']):>9} {r['draft_mean_layers_run']:>12.1f} {r['rolled_back']:>11} "
              f"{r['weight_bytes_ratio']:>5.2f}x", file=sys.stderr)


if __name__ == "__main__":
    main()
