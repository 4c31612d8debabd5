#!/usr/bin/env bash
# One device call (nvidia-h200): the CUDA tests of the fixed-shape engine, then the decode
# benchmark on both 7B shapes (bf16, batch 1, prompt 128, 128 new tokens). Each part has its own
# time limit and writes under $OUT as it goes, so a cut-short call still returns what ran.
#   bash benchmarks/h200_graph_engine.sh            (from the repository root, on the box)
set -u
OUT=${OUT:-out/h200}; mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
D=$(date +%F)
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv > "$OUT/gpu.txt" 2>&1
[ "${T_TESTS:-45}" = 0 ] || timeout ${T_TESTS:-45} $PY -m pytest -m cuda tests/test_graph_engine.py -q -x -p no:cacheprovider > "$OUT/cuda-tests.log" 2>&1
echo "cuda tests rc=$?" | tee -a "$OUT/cuda-tests.log"
for shape in mistral-7b codestral-mamba-7b; do
  L=$([ $shape = mistral-7b ] && echo 10,21 || echo 21,42)
  timeout ${T_BENCH:-70} $PY benchmarks/bench_decode.py --backbone random:$shape --device cuda --dtype bfloat16 \
    --prompt-tokens 128 --tokens 128 --repeats ${REPEATS:-1} --exits $L --policies copy,catchup \
    --peers ${PEERS:-hf} > "$OUT/$D-h200-$shape-graph.jsonl" 2> "$OUT/$shape.err"
  echo "$shape rc=$?" >> "$OUT/$shape.err"
  tail -12 "$OUT/$shape.err"
done
tail -5 "$OUT/cuda-tests.log"
