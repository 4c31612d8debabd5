"""CPU/GPU decode benchmark: full depth vs exits forced at two layers, under each state policy,
beside the full-depth peers (HF generate, and on a GPU its static-cache and compiled variants).

    python benchmarks/bench_decode.py                       # SmolLM2 on the CPU
    python benchmarks/bench_decode.py --backbone random:mistral-7b --device cuda --dtype bfloat16 \
        --prompt-tokens 128 --tokens 128 --peers hf,hf-static,hf-compiled

Prints one JSON line per case (tokens/s, ms/token, layers run, weight bytes, GB/s and share of the
copy bandwidth, ratios to our full depth and to the best peer, all measured in the same run), then
a table on stderr. Figures go to benchmarks/NOTES.md. Same options as `meestral bench`.
"""

import sys

from meestral.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
