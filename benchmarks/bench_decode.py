"""CPU/GPU decode benchmark: full depth vs exits forced at two layers, under each state policy.

    python benchmarks/bench_decode.py                       # SmolLM2 on the CPU
    python benchmarks/bench_decode.py --backbone random:mistral-7b --device cuda --dtype bfloat16

Prints one JSON line per case (tokens/s, ms/token, layers run, weight bytes, ratios to full depth
measured in the same run), then a table on stderr. Figures go to benchmarks/NOTES.md.
"""

import argparse

from meestral.bench import run_bench

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--backbone", default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--exits", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-backlog", type=int, default=4)
    a = p.parse_args()
    run_bench(a.backbone, exits=a.exits, tokens=a.tokens, device=a.device, dtype=a.dtype, repeats=a.repeats,
              max_backlog=a.max_backlog)
