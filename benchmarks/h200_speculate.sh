#!/usr/bin/env bash
# `speculate` on the H200 box (issue 22's GPU half): its CUDA tests, then the benchmark tables, each
# part under its own time limit and writing under $OUT as it goes (a cut-short call returns what ran).
#   bash benchmarks/h200_speculate.sh [PARTS]     (repository root; default: tests,smollm2,7b)
# Parts: tests = cuda tests of the graph engine incl. speculate; smollm2 = real weights (bf16): our
# full depth, HF static, HF assistant_early_exit, speculate at several E/k and the controller (each
# row per prompt too: the controller must not be slower than full depth on any of them),
# verify and catchup; 7b = random 7B shapes with injected acceptance 0.5-0.9 at k 2, 3, 4 beside
# the cost model's prediction. Env: T_TESTS, T_SMOL, T_7B (s), REPEATS, SHAPES, PROMPTS (smollm2: how many
# of the bench's six prompts, in the chat template), SMOL_K (smollm2's --draft-tokens).
set -u
OUT=${OUT:-out/h200}; mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
D=$(date +%F)
PARTS=${1:-tests,smollm2,7b}
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv > "$OUT/gpu.txt" 2>&1
case ",$PARTS," in *,tests,*)
  timeout ${T_TESTS:-240} $PY -m pytest -m cuda tests/test_graph_engine.py -q -p no:cacheprovider -n ${T_WORKERS:-6} \
    > "$OUT/cuda-tests.log" 2>&1
  echo "cuda tests rc=$?" | tee -a "$OUT/cuda-tests.log"; tail -3 "$OUT/cuda-tests.log";;
esac
case ",$PARTS," in *,smollm2,*)
  timeout ${T_SMOL:-300} $PY benchmarks/bench_decode.py --backbone smollm2 --device cuda --dtype bfloat16 --tokens 64 \
    --repeats ${REPEATS:-3} --prompts ${PROMPTS:-6} --chat --exits 7,15 --policies catchup,verify,speculate \
    --draft-tokens ${SMOL_K:-2,4,auto} --peers hf-static,hf-assisted > "$OUT/$D-h200-smollm2-speculate.jsonl" 2> "$OUT/smollm2.err"
  echo "smollm2 rc=$?" >> "$OUT/smollm2.err"; grep -v "^measured" "$OUT/smollm2.err" | tail -30;;
esac
case ",$PARTS," in *,7b,*)
  for shape in ${SHAPES:-mistral-7b codestral-mamba-7b}; do
    E=$([ $shape = mistral-7b ] && echo 8 || echo 16)
    timeout ${T_7B:-400} $PY benchmarks/bench_decode.py --backbone random:$shape --device cuda --dtype bfloat16 \
      --prompt-tokens 128 --tokens 128 --repeats ${REPEATS:-1} --exits $E --policies speculate --draft-tokens 2,3,4 \
      --inject 0.5,0.6,0.7,0.8,0.9 --peers hf-compiled > "$OUT/$D-h200-$shape-speculate.jsonl" 2> "$OUT/$shape.err"
    echo "$shape rc=$?" >> "$OUT/$shape.err"; grep -v "^measured" "$OUT/$shape.err" | tail -22
  done;;
esac
