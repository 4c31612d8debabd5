#!/usr/bin/env bash
# The SmolLM2 early-exit adaptation run that made smollm2-ee on one H200 (2026-12-04; recipes/adapt/README.md).
# It ran from a snapshot of commit dd5eab4 placed at <repo>/.gpu (git archive of src, recipes,
# benchmarks, pyproject.toml, without the tracked GGUF); `python -m meestral.cli` still runs there.
# Runs from the frozen snapshot in <repo>/.gpu; carried pieces are in <repo>/.carryK.
#   run.sh xfer K [info]        keep payload piece K in /tmp (info: print what the box has)
#   run.sh go K TRAIN_S LIMIT    last piece K; join, install, sample teacher text, probe, start
#                                `adapt train` (setsid) to end TRAIN_S s after this phase began; watch to LIMIT
#   run.sh watch LIMIT           watch; partial results into $OUT
#   run.sh final LIMIT           wait for the trainer, export, compare, collect into $OUT
set -uo pipefail
cd "$(dirname "$0")/../.."          # .gpu
ROOT=$(cd .. && pwd)                # the repo root on the box (the .carryK folders)
W=${GS_WORK:-/tmp/gs}
PARTS=${G24_PARTS:-/tmp/g24parts}
SITE=${GS_SITE:-/tmp/site}
PY=${GS_PY:-python3}
DEV=${GS_DEVICE:-cuda}
NPARTS=${G24_NPARTS:-7}
PAY_SHA=${G24_PAY_SHA:-85aac0ebb8bb1fe41ef692ef054ba01ba0382e4f54bb7776dc88be81b79bb1f5}
SAMPLE_BATCH=${G24_SAMPLE_BATCH:-8192}
SAMPLE_FALLBACK=${G24_SAMPLE_FALLBACK:-3072}
SAMPLE_SHARDS=${G24_SAMPLE_SHARDS:-2}
SAMPLE_SECS=${G24_SAMPLE_SECS:-55}     # no new shard is begun after this long
SAMPLE_NEW=${G24_SAMPLE_NEW:-384}
BATCH=${G24_BATCH:-32}
SEQ=${G24_SEQ:-512}
LR=${G24_LR:-3e-4}
FINAL_WEIGHT=${G24_FINAL_WEIGHT:-4}
VAL_TOKENS=${G24_VAL_TOKENS:-16384}
PROBE_STEPS=${G24_PROBE_STEPS:-16}
LOAD_S=${G24_LOAD_S:-30}               # trainer start: load, pool, step-0 validation
TAIL_S=${G24_TAIL_S:-15}               # last validation + checkpoint + export
SLACK=${G24_SLACK:-1.06}               # validations and checkpoints on top of the probe's step time
COMPARE_TOKENS=${G24_COMPARE_TOKENS:-46592}
WATCH_EVERY=${G24_WATCH_EVERY:-60}
CODE=$W/code/src
mkdir -p "$W/pids" "$PARTS"
if [ "${1:-}" != xfer ] && [ ! -d "$CODE" ]; then
    mkdir -p "$W/code"; rm -rf "$CODE.tmp"; cp -r src "$CODE.tmp"; mv "$CODE.tmp" "$CODE"
fi
export PYTHONPATH=$SITE:$CODE PYTHONUNBUFFERED=1 MEESTRAL_CACHE=$W/cache TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
M="$PY -m meestral.cli"
HERE=recipes/gpu-session   # status.py: tick / final / weights

ts() { echo "[$(date +%T) +${SECONDS}s] $*"; }
now() { date +%s; }
left() { echo $(( $(cat "$W/deadline") - $(now) )); }
alive() { [ -f "$W/pids/$1" ] && kill -0 "$(cat "$W/pids/$1")" 2> /dev/null; }
start() {
    local name=$1 log=$2; shift 2
    setsid nohup "$@" >> "$log" 2>&1 < /dev/null &
    echo $! > "$W/pids/$name"
    ts "started $name (pid $!): $*" | cut -c1-600
}
stop() {
    alive "$1" || return 0
    local pid; pid=$(cat "$W/pids/$1")
    kill -TERM "$pid" 2> /dev/null || true
    for _ in $(seq 20); do kill -0 "$pid" 2> /dev/null || break; sleep 1; done
    kill -KILL "$pid" 2> /dev/null || true
    ts "stopped $1 (pid $pid)"
}
tick() { $PY $HERE/status.py tick "$W" 2>&1 | grep -v '^  distill' || true; }

start_adapt() {  # [--resume]
    local secs=$(( $(left) - LOAD_S - TAIL_S ))
    start adapt "$W/adapt.log" $M adapt train $(cat "$W/adapt.args") --seconds "$secs" "$@"
}

# A trainer that ended without its adapter and without a clean stop is resumed once (time permitting).
watchdog() {
    [ -f "$W/pids/adapt" ] || return 0
    alive adapt && return 0
    [ -f "$W/adapt/adapter.safetensors" ] && return 0
    grep -q "stopped after" "$W/adapt.log" 2> /dev/null && return 0
    [ -f "$W/adapt.restarted" ] && return 0
    [ "$(left)" -gt 150 ] || return 0
    touch "$W/adapt.restarted"
    ts "adapt died: $(grep -v '^\[transformers\]' "$W/adapt.log" | tail -n 3 | tr '\n' ' ' | cut -c1-400)"
    if [ -f "$W/adapt/checkpoint.pt" ]; then start_adapt --resume; else rm -rf "$W/adapt"; start_adapt; fi
}

watch_until() {  # LIMIT (seconds of this call)
    while [ $SECONDS -lt "$1" ]; do
        local d=$(( $1 - SECONDS )); [ $d -gt $WATCH_EVERY ] && d=$WATCH_EVERY
        sleep $d
        ts "tick"; tick
        watchdog
    done
}

partial() {  # what this call brings back: logs, curves, an interim adapter from the last checkpoint
    mkdir -p "$OUT" "$W/res"
    if [ -f "$W/adapt/checkpoint.pt" ] && [ ! -f "$W/adapt/adapter.safetensors" ]; then
        timeout 60 $M adapt export --out "$W/adapt" --file "$W/interim.safetensors" --export-dtype bfloat16 \
            --device "$DEV" 2>&1 | grep -v '^\[transformers\]' | tail -n 1 || true
        [ -f "$W/interim.safetensors" ] && cp "$W/interim.safetensors" "$OUT/adapter-interim.safetensors"
    fi
    [ -f "$W/adapt/adapter.safetensors" ] && cp "$W/adapt/adapter.safetensors" "$OUT/adapter.safetensors"
    for f in adapt/log.jsonl adapt/curves.png; do [ -f "$W/$f" ] && cp "$W/$f" "$OUT/"; done
    collect_res
    tar -czf "$OUT/results.tar.gz" -C "$W" res
    ls -la "$OUT"
}

collect_res() {
    mkdir -p "$W/res"
    $PY $HERE/status.py final "$W" > "$W/res/summary.txt" 2>&1 || true
    (cd "$W" && sha256sum adapt/adapter.safetensors interim.safetensors 2> /dev/null) > "$W/res/sha256.txt" || true
    for f in adapt/log.jsonl adapt/curves.png adapt.args adapt.steps adapt-probe/log.jsonl compare/compare.json \
        compare/agreement.png gpu.csv timing.txt; do
        [ -f "$W/$f" ] && cp "$W/$f" "$W/res/${f//\//-}"
    done
    for f in sample.log adapt.log adapt-probe.log compare.log; do
        [ -f "$W/$f" ] && grep -v '^\[transformers\]' "$W/$f" | tail -n 300 > "$W/res/$f"
    done
    ls -la "$W"/samples > "$W/res/samples-ls.txt" 2> /dev/null || true
}

case "${1:-}" in
xfer)
    k=${2:?piece}
    cp "$ROOT/.carry$k"/payload.part* "$PARTS/"
    ts "pieces in $PARTS: $(ls "$PARTS" | tr '\n' ' ')"
    if [ "${3:-}" = info ]; then
        $PY -V; $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
        nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader 2> /dev/null || true
        nproc; free -g | head -2; df -h /tmp | tail -n 1
        ls ~/.cache/huggingface 2> /dev/null | head || echo "no HF cache"
    fi
    ;;
go)
    k=${2:?piece}; train_s=${3:?training seconds from now}; limit=${4:?call limit}
    echo $(( $(now) + train_s )) > "$W/deadline"
    ts "deadline in $(left) s"
    cp "$ROOT/.carry$k"/payload.part* "$PARTS/"
    [ "$(ls "$PARTS"/payload.part* | wc -l)" = "$NPARTS" ] || { ts "missing pieces: $(ls "$PARTS")"; exit 2; }
    if [ ! -d "$W/whl" ]; then
        cat $(ls "$PARTS"/payload.part* | sort -V) > "$W/payload.tar"
        echo "$PAY_SHA  $W/payload.tar" | sha256sum -c --quiet - || { ts "payload damaged"; exit 2; }
        mkdir -p "$W/whl.tmp" && tar -xf "$W/payload.tar" -C "$W/whl.tmp" && mv "$W/whl.tmp" "$W/whl" && rm -f "$W/payload.tar"
    fi
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$W"/whl/*.whl 2>&1 | tail -n 3
    ts "installed"
    if command -v nvidia-smi > /dev/null && ! alive gpulog; then
        start gpulog "$W/gpu.csv" nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,memory.total \
            --format=csv,noheader -l 10
    fi
    $PY -c "from meestral.assets import smollm2_dir; print(smollm2_dir())" 2>&1 | tail -n 1
    ts "teacher cache built"
    # Teacher text, the GPU to itself; the adapt pool is fixed when the trainer starts.
    if [ -z "$(ls "$W"/samples/shard-*.pt 2> /dev/null)" ]; then
        $M distill sample --out "$W/samples" --seed 1 --batch "$SAMPLE_BATCH" --max-new-tokens "$SAMPLE_NEW" \
            --shards "$SAMPLE_SHARDS" --seconds "$SAMPLE_SECS" --device "$DEV" >> "$W/sample.log" 2>&1
        if [ -z "$(ls "$W"/samples/shard-*.pt 2> /dev/null)" ]; then
            grep -v '^\[transformers\]' "$W/sample.log" | tail -n 3
            ts "sampler failed at batch $SAMPLE_BATCH: again at $SAMPLE_FALLBACK"
            $M distill sample --out "$W/samples" --seed 1 --batch "$SAMPLE_FALLBACK" --max-new-tokens "$SAMPLE_NEW" \
                --shards "$SAMPLE_SHARDS" --seconds "$SAMPLE_SECS" --device "$DEV" >> "$W/sample.log" 2>&1
        fi
    fi
    grep '"shard"' "$W/sample.log"
    ts "sampled: $(ls "$W"/samples | wc -l) shards"
    weights=$($PY $HERE/status.py weights 30)
    common="--backbone smollm2 --samples $W/samples --corpus embedded --corpus-share 0.3 --seq-len $SEQ --batch $BATCH
            --rank 16 --export-dtype bfloat16 --curriculum rotate --rotation 4 --layer-dropout 0.1
            --final-weight $FINAL_WEIGHT --exit-weights $weights --device $DEV --no-progress"
    if [ ! -f "$W/adapt.args" ]; then
        rm -rf "$W/adapt-probe"
        $M adapt train $common --out "$W/adapt-probe" --steps "$PROBE_STEPS" --lr "$LR" --log-every $(( PROBE_STEPS / 2 )) \
            --val-every 100000 --val-tokens "$SEQ" --ckpt-every 100000 > "$W/adapt-probe.log" 2>&1 \
            || { grep -v '^\[transformers\]' "$W/adapt-probe.log" | tail -n 8; exit 1; }
        grep '"train"' "$W/adapt-probe/log.jsonl" | cut -c1-300
        ts "probe done"
        plan=$($PY - "$W/adapt-probe/log.jsonl" "$(( $(left) - LOAD_S - TAIL_S ))" "$BATCH" "$SEQ" "$SLACK" << 'EOF'
import json, sys
path, secs, batch, seq, slack = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
tr = [json.loads(l) for l in open(path) if '"train"' in l]
tok_s = tr[-1]["tok_per_s"]
s_step = batch * seq / tok_s
steps = max(100, int(secs / (s_step * slack)))
val = min(250, max(100, int(round(steps / 14 / 50.0)) * 50))
warm = max(20, steps // 10)
print(steps, val, warm, f"{tok_s:.0f}", f"{s_step:.4f}")
EOF
)
        read -r steps val warm tok_s s_step <<< "$plan"
        ts "plan: probe $tok_s tok/s ($s_step s/step) -> $steps steps ($(( steps * BATCH * SEQ )) tokens), val every $val, warm-up $warm"
        echo "$steps" > "$W/adapt.steps"
        echo "$common --out $W/adapt --steps $steps --lr $LR --warmup $warm --val-every $val --val-tokens $VAL_TOKENS
              --ckpt-every 100 --log-every 20" > "$W/adapt.args.tmp"
        mv "$W/adapt.args.tmp" "$W/adapt.args"
    fi
    if ! alive adapt && [ ! -f "$W/adapt/adapter.safetensors" ]; then
        if [ -f "$W/adapt/checkpoint.pt" ]; then start_adapt --resume; else start_adapt; fi
    fi
    watch_until $(( limit - 75 ))
    partial
    ;;
watch)
    limit=${2:?limit}
    watch_until $(( limit - 75 ))
    partial
    ;;
final)
    limit=${2:?limit}
    reserve=${G24_RESERVE:-150}
    while alive adapt && [ $SECONDS -lt $(( limit - reserve )) ]; do
        sleep 10
        [ $(( SECONDS % 60 )) -lt 10 ] && { ts tick; tick; }
    done
    tick
    alive adapt && stop adapt
    if [ ! -f "$W/adapt/adapter.safetensors" ] && [ -f "$W/adapt/checkpoint.pt" ]; then
        ts "adapt stopped before its end: exporting its last checkpoint"
        $M adapt export --out "$W/adapt" --export-dtype bfloat16 --device "$DEV" 2>&1 | grep -v '^\[transformers\]' | tail -n 2
    fi
    stop gpulog
    if [ -f "$W/adapt/adapter.safetensors" ] && [ ! -f "$W/compare/compare.json" ]; then
        ts "compare on $COMPARE_TOKENS held-out tokens"
        timeout $(( limit - SECONDS - 45 )) $M adapt compare --backbone smollm2 --adapter "$W/adapt/adapter.safetensors" \
            --tokens "$COMPARE_TOKENS" --seq-len "$SEQ" --batch-size 16 --device "$DEV" --out "$W/compare" \
            > "$W/compare.log" 2>&1 || ts "compare did not finish"
        grep -v '^\[transformers\]' "$W/compare.log" | tail -n 20
    fi
    ts "collect"
    mkdir -p "$OUT"
    [ -f "$W/adapt/adapter.safetensors" ] && cp "$W/adapt/adapter.safetensors" "$OUT/adapter.safetensors"
    for f in adapt/log.jsonl adapt/curves.png compare/compare.json compare/agreement.png; do
        [ -f "$W/$f" ] && cp "$W/$f" "$OUT/"
    done
    collect_res
    cat "$W/res/summary.txt"
    tar -czf "$OUT/results.tar.gz" -C "$W" res
    ls -la "$OUT"
    ;;
*)
    echo "usage: run.sh xfer K [info] | go K TRAIN_S LIMIT | watch LIMIT | final LIMIT" >&2
    exit 2
    ;;
esac
