#!/usr/bin/env bash
# The fixed-shape engine on the H200 box: its CUDA tests, then the decode benchmark (bf16, batch 1,
# prompt 128, 128 new tokens) on the given 7B shapes with every peer and a kernel profile. Each part
# has its own time limit and writes under $OUT as it goes, so a cut-short call still returns what ran.
#   bash benchmarks/h200_graph_engine.sh [SHAPES]     (repository root; default: both shapes; - none)
# Env: T_TESTS (s, 0 skips the tests), T_WORKERS (test processes: each compiles its own shapes, so
# they run side by side on the box's CPUs), T_BENCH (s per shape), PEERS, REPEATS, POLICIES.
set -u
OUT=${OUT:-out/h200}; mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
D=$(date +%F)
SHAPES=${1:-mistral-7b,codestral-mamba-7b}
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv > "$OUT/gpu.txt" 2>&1
if [ "${T_TESTS:-150}" != 0 ]; then
  timeout ${T_TESTS:-150} $PY -m pytest -m cuda tests/test_graph_engine.py -q -p no:cacheprovider -n ${T_WORKERS:-6} > "$OUT/cuda-tests.log" 2>&1
  echo "cuda tests rc=$?" | tee -a "$OUT/cuda-tests.log"
  tail -3 "$OUT/cuda-tests.log"
fi
[ "$SHAPES" = - ] && SHAPES=
for shape in ${SHAPES//,/ }; do
  L=$([ $shape = mistral-7b ] && echo 10,21 || echo 21,42)
  timeout ${T_BENCH:-400} $PY benchmarks/bench_decode.py --backbone random:$shape --device cuda --dtype bfloat16 \
    --prompt-tokens 128 --tokens 128 --repeats ${REPEATS:-1} --exits $L --policies ${POLICIES:-copy,propagate,catchup} \
    --peers ${PEERS:-hf,hf-static,hf-compiled} --profile "$OUT/$D-h200-$shape-profile.json" \
    > "$OUT/$D-h200-$shape-graph.jsonl" 2> "$OUT/$shape.err"
  echo "$shape rc=$?" >> "$OUT/$shape.err"
  grep -v "^\s*[0-9.]* ms " "$OUT/$shape.err" | tail -25
done
