#!/usr/bin/env bash
# The fixed-shape engine on the GPU box: its CUDA tests, the GEMV roofline, then the decode benchmark
# (bf16, batch 1, prompt 128, 128 new tokens) on the given 7B shapes with the peers and a kernel
# profile. Each part has its own time limit and writes under $OUT as it goes, so a cut-short call
# still returns what ran.
#   bash benchmarks/h200_graph_engine.sh [SHAPES]     (repository root; default: both shapes; - none)
# Env: T_TESTS (s, 0 skips the tests), T_WORKERS (test processes: each compiles its own shapes, so
# they run side by side on the box's CPUs), T_K (a pytest -k expression: some of the tests), T_GEMV (s, 0 skips benchmarks/gemv_roofline.py; GEMV_ROWS its --rows), T_BENCH
# (s per shape), PEERS (default: hf-static,hf-compiled; Mamba shapes: mamba-ssm,hf-compiled),
# REPEATS, POLICIES, PROFILE (0: no kernel profile), ONE_STEP (0: no one-step-at-a-time twin rows), SWITCHES (the
# bench's --switches: which kernel switches get a row; none for a shorter run), WHEELS (a folder of wheels to install first, e.g. mamba-ssm's and causal-conv1d's
# from benchmarks/build_mamba_ssm.sh).
set -u
OUT=${OUT:-out/h200}; mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
D=$(date +%F)
SHAPES=${1:-mistral-7b,codestral-mamba-7b}
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv > "$OUT/gpu.txt" 2>&1
# whether this torch can put branches in CUDA graphs (graph_engine.DEVICE_EXITS needs it)
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "graph branches",
hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node"))' 2>&1 | tee -a "$OUT/gpu.txt"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o 'H[0-9][0-9]*' | head -1 | tr A-Z a-z)
GPU=${GPU:-gpu}
if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl 2>&1 | tail -2
  export PYTHONPATH=$PYTHONPATH:/tmp/site
  $PY -c 'import mamba_ssm, causal_conv1d; print("mamba-ssm", mamba_ssm.__version__, "causal-conv1d", causal_conv1d.__version__)' 2>&1 | tail -1
fi
if [ "${T_TESTS:-150}" != 0 ]; then
  timeout ${T_TESTS:-150} $PY -m pytest -m cuda tests/test_graph_engine.py tests/test_mamba_ssm_peer.py tests/test_gemv.py tests/test_ssd.py -vv -rfEs -p no:cacheprovider \
    -n ${T_WORKERS:-6} ${T_K:+-k "$T_K"} > "$OUT/cuda-tests.log" 2>&1
  echo "cuda tests rc=$?" | tee -a "$OUT/cuda-tests.log"
  # -vv (the project's addopts has -q, which one -v cancels): one line per test as it ends, so a run its
  # time limit cuts still names what failed; -rs: why each skip
  grep -E "FAILED|ERROR|passed|failed" "$OUT/cuda-tests.log" | tail -12
fi
if [ "${T_GEMV:-0}" != 0 ]; then
  timeout $T_GEMV $PY benchmarks/gemv_roofline.py --shapes ${GEMV_SHAPES:-mistral-7b,codestral-mamba-7b} --rows ${GEMV_ROWS:-2,5,8} --json "$OUT/$D-$GPU-gemv.jsonl" 2> "$OUT/gemv.err"
  echo "gemv rc=$?" >> "$OUT/gemv.err"
  cat "$OUT/gemv.err"
fi
[ "$SHAPES" = - ] && SHAPES=
for shape in ${SHAPES//,/ }; do
  L=$([ $shape = mistral-7b ] && echo 10,21 || echo 21,42)
  peers=${PEERS:-$([ $shape = mistral-7b ] && echo hf-static,hf-compiled || echo mamba-ssm,hf-compiled)}
  timeout ${T_BENCH:-400} $PY benchmarks/bench_decode.py --backbone random:$shape --device cuda --dtype bfloat16 \
    --prompt-tokens 128 --tokens 128 --repeats ${REPEATS:-1} --exits $L --policies ${POLICIES:-copy,propagate,catchup} \
    --peers $peers ${SWITCHES:+--switches $SWITCHES} $([ "${ONE_STEP:-1}" = 0 ] && echo --no-one-step) $([ "${PROFILE:-1}" = 0 ] || echo --profile "$OUT/$D-$GPU-$shape-profile.json") \
    > "$OUT/$D-$GPU-$shape-graph.jsonl" 2> "$OUT/$shape.err"
  echo "$shape rc=$?" >> "$OUT/$shape.err"
  grep -v "^\s*[0-9.]* ms " "$OUT/$shape.err" | tail -40
done
