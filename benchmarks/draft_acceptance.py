"""How often a draft from each exit point would be accepted on a backbone's OWN greedy output (what
`speculate` meets in generation), and what that is worth by the weight-byte cost model.

    python benchmarks/draft_acceptance.py --backbones smollm2,smollm2-ee --tokens 64 [--draft-vocab 0,8192]

For each backbone: greedy continuations of chat prompts at full depth, then one teacher-forced pass
over prompt + continuation; at every generated position and candidate exit point E, whether the
logit lens at E (over the whole LM head, or its first N rows) ranks first the token the model
wrote. Per E: that agreement, the expected tokens per cycle at each k from the real runs of
agreement (evaluation/draft_exit.py), and the best k's predicted speed-up by weight bytes
(decoding/speculate.cycle_cost). One JSON line per (backbone, N, E) on stdout, a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from meestral.backbones.loading import load_backbone
from meestral.decoding.decoder import EarlyExitDecoder, SamplingOptions
from meestral.decoding.speculate import cycle_cost
from meestral.evaluation.draft_exit import expected_cycle_tokens, run_lengths
from meestral.evaluation.oracle import layer_predictions

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write one sentence about the sea.",
    "Explain photosynthesis to a ten-year-old.",
    "List three uses of a paperclip.",
    "Write a short Python function that reverses a string.",
    "Why is the sky blue?",
]


def measure(bb, tokens: int, layers, draft_vocab: int, max_k: int = 6):
    dec = EarlyExitDecoder(bb)
    rows = []
    for p in PROMPTS:
        g = dec.generate([p], SamplingOptions(max_new_tokens=tokens), chat=True)[0]
        rows.append((g.prompt_ids, g.token_ids))
    match = {e: [] for e in layers}
    row_ids = []
    for r, (prompt, cont) in enumerate(rows):
        ids = torch.tensor([prompt + cont])
        preds = layer_predictions(bb, ids, layers, draft_vocab=draft_vocab or None)
        at = slice(len(prompt) - 1, len(prompt) - 1 + len(cont))  # positions that predict the written tokens
        for c, e in enumerate(layers):
            match[e].append(preds.layer_argmax[at, c] == np.array(cont))
        row_ids.append(np.full(len(cont), r))
    row = np.concatenate(row_ids)
    out = []
    for e in layers:
        m = np.concatenate(match[e])
        runs = run_lengths(m, row)
        per_k = {k: expected_cycle_tokens(runs, k) / cycle_cost(bb, e, k, draft_vocab=draft_vocab) for k in range(1, max_k + 1)}
        k = max(per_k, key=per_k.get)
        out.append({"backbone": bb.name, "draft_vocab": draft_vocab, "exit": e, "agreement": float(m.mean()),
                    "best_k": k, "tokens_per_cycle": expected_cycle_tokens(runs, k), "predicted_speedup": per_k[k],
                    "positions": int(len(m))})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="smollm2,smollm2-ee")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--draft-vocab", default="0,8192", help="trimmed draft heads to measure (0: the whole head)")
    ap.add_argument("--every", type=int, default=2, help="candidate exit points: every N-th layer")
    args = ap.parse_args(argv)
    for name in args.backbones.split(","):
        bb = load_backbone(name)
        layers = list(range(1, bb.num_layers - 1, args.every))
        for n in (int(x) for x in args.draft_vocab.split(",")):
            for r in measure(bb, args.tokens, layers, n):
                print(json.dumps(r), flush=True)
                print(f"{r['backbone']:<12} N={n:<6} E={r['exit']:>2}  agreement {r['agreement']:.3f}  best k {r['best_k']}  "
                      f"{r['tokens_per_cycle']:.2f} tokens/cycle  predicted {r['predicted_speedup']:.2f}x", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
