#!/bin/sh
# bench/ct2.sh: opt against CTranslate2 on the CPU (issue 13). Same synthetic checkpoints
# (`opt synth --shape SHAPE --seed 0`, cached in bench/models/ as bench/run.sh makes them),
# converted for CTranslate2 by its own converter; same prompt ids (bench/ct2.py replays opt
# bench's generator); the same thread count and OpenMP wait settings for both (opt's
# defaults, OMP_WAIT_POLICY=passive GOMP_SPINCOUNT=1000; CTranslate2's Intel OpenMP spins
# 200 ms by default, which collapses under competing load, so it gets KMP_BLOCKTIME=0, i.e.
# passive). Workloads: prefill 1x512 (one generated token), decode batch 1 (128 + 32),
# total 16 x (128 + 32). REPS rounds, each running every (mode, workload) once in a rotating
# order, so load from other processes hits all alike; medians, and each opt mode's ratio to
# the best CTranslate2 setting of the same column, go into bench/RESULTS.md (section ct2)
# through bench/section.py. The machine load is recorded with them: on a shared machine
# absolute numbers are noisy, ratios from one run less so. Never asserts.
#
# Installs Debian's python3-torch (1.13, which the converter loads the checkpoint with) when
# /usr/bin/python3 lacks torch (as root; otherwise it says what to install), then into a
# virtual environment ($VENV) on that python3: ctranslate2 4.5.0 (4.6 passes transformers a `dtype`
# argument that 4.36 does not take) and transformers 4.36.2 (the version tests/check_ref_vs_hf.py
# checks ref_opt.py against, and the last that supports torch 1.13 well).
#
# Knobs: SHAPES [opt-125m opt-1.3b], REPS [3], THREADS [2], OUT [/tmp/opt-bench-ct2],
# VENV [$HOME/.cache/opt-bench-ct2], CT2_TYPES [int8 float32] (its CPU
# backend refuses bfloat16 here: "do not support efficient bfloat16 computation"),
# OPT_MODES [f16 f16-bf16 q4 q4-bf16 q4-int8 w8a8], NO_RESULTS=1 (print the section, leave RESULTS.md).
set -eu
cd "$(dirname "$0")/.."
SHAPES=${SHAPES:-"opt-125m opt-1.3b"}
REPS=${REPS:-3}
THREADS=${THREADS:-2}
OUT=${OUT:-/tmp/opt-bench-ct2}
VENV=${VENV:-$HOME/.cache/opt-bench-ct2}
CT2_TYPES=${CT2_TYPES:-"int8 float32"}
OPT_MODES=${OPT_MODES:-"f16 f16-bf16 q4 q4-bf16 q4-int8 w8a8"}
OPT=./opt
log() { echo "ct2.sh: $*" >&2; }
mkdir -p "$OUT" bench/models

if ! /usr/bin/python3 -c 'import torch' 2>/dev/null; then
    [ "$(id -u)" = 0 ] || { log "needs torch for /usr/bin/python3: apt-get install python3-torch (as root)"; exit 1; }
    log "installing python3-torch (Debian) for CTranslate2's converter"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-torch >&2
fi
if ! "$VENV/bin/python" -c 'import ctranslate2, transformers' 2>/dev/null; then
    log "installing ctranslate2 4.5.0 and transformers 4.36.2 into $VENV"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
    "$VENV/bin/pip" install -q ctranslate2==4.5.0 transformers==4.36.2
fi
[ -x "$OPT" ] || make CUDA=0 opt >&2

export OMP_WAIT_POLICY=passive GOMP_SPINCOUNT=1000 KMP_BLOCKTIME=0
raw=$OUT/raw.jsonl
: > "$raw"
load0=$(cut -d' ' -f1-3 /proc/loadavg)
workloads="prefill:512:1:1 decode:128:32:1 total:128:32:16"
for shape in $SHAPES; do
    dir=bench/models/$shape
    [ -d "$dir" ] || { log "synthesizing $shape"; "$OPT" synth --shape "$shape" --seed 0 -o "$dir" >&2; }
    [ -f "$dir.q4.opt" ] || { log "converting $shape to 4 bits"; "$OPT" convert -m "$dir" -o "$dir.q4.opt" --int4-weights >&2; }
    if [ ! -f "$dir.w8a8.opt" ]; then
        log "converting $shape to W8A8 (a small calibration: speed does not depend on it)"
        head -c 20000 tests/tok_corpus.txt > "$OUT/calib.txt"
        "$OPT" convert -m "$dir" -o "$dir.w8a8.opt" --w8a8 --calib "$OUT/calib.txt" --calib-samples 4 --calib-len 64 >&2
    fi
    [ -d "$dir.ct2" ] || { log "converting $shape for CTranslate2"; "$VENV/bin/ct2-transformers-converter" --model "$dir" --output_dir "$dir.ct2" >&2; }
    modes="$OPT_MODES"
    for t in $CT2_TYPES; do modes="$modes ct2-$t"; done
    for rep in $(seq 1 "$REPS"); do
        set -- $modes
        i=0; while [ $i -lt $(( (rep - 1) % $# )) ]; do m=$1; shift; set -- "$@" "$m"; i=$((i + 1)); done  # rotate
        for mode in "$@"; do
            for w in $workloads; do
                name=${w%%:*} rest=${w#*:}; P=${rest%%:*} rest=${rest#*:}; G=${rest%%:*} B=${rest#*:}
                case $mode in
                    f16) r=$("$OPT" bench -m "$dir" --json --prompt-len $P --gen-len $G -b $B -t $THREADS) || r= ;;
                    f16-bf16) r=$("$OPT" bench -m "$dir" --json --prompt-len $P --gen-len $G -b $B -t $THREADS --compute bf16) || r= ;;
                    q4) r=$("$OPT" bench -m "$dir.q4.opt" --json --prompt-len $P --gen-len $G -b $B -t $THREADS) || r= ;;
                    q4-bf16) r=$("$OPT" bench -m "$dir.q4.opt" --json --prompt-len $P --gen-len $G -b $B -t $THREADS --compute bf16) || r= ;;
                    q4-int8) r=$("$OPT" bench -m "$dir.q4.opt" --json --prompt-len $P --gen-len $G -b $B -t $THREADS --compute int8) || r= ;;
                    w8a8) r=$("$OPT" bench -m "$dir.w8a8.opt" --json --prompt-len $P --gen-len $G -b $B -t $THREADS) || r= ;;
                    ct2-*) r=$("$VENV/bin/python" bench/ct2.py run "$dir.ct2" --prompt-len $P --gen-len $G -b $B \
                                   --compute-type "${mode#ct2-}" --threads $THREADS) || r= ;;
                esac
                [ -n "$r" ] || { log "$shape round $rep $mode $name: failed (skipped)"; continue; }
                log "$shape round $rep $mode $name: $(echo "$r" | tr ',' '\n' | grep -E "${name}_throughput" | tr -d ' {}')"
                echo "$r" | /usr/bin/python3 -c "import json,sys; d=json.load(sys.stdin); d.update(shape='$shape', mode='$mode', workload='$name', round=$rep); print(json.dumps(d))" >> "$raw"
            done
        done
    done
done
load1=$(cut -d' ' -f1-3 /proc/loadavg)
section=$OUT/section.md
{
    echo "## opt vs CTranslate2 on the CPU (bench/ct2.sh, issue 13)"
    echo
    echo "$(date -u +%Y-%m-%d), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) vCPUs, $THREADS threads each;"
    echo "load average $load0 at the start, $load1 at the end (other engineers' jobs share this machine:"
    echo "absolute numbers are noisy, ratios from the same run less so). $REPS rounds, rotating order."
    echo "CTranslate2 4.5.0 (transformers 4.36.2 converter) with KMP_BLOCKTIME=0; opt with its defaults."
    echo "Modes: f16 = f16 weights, f32 compute; -bf16 = --compute bf16; q4 = the native 4-bit file"
    echo "(f32 compute: each block of weight rows dequantized once into an f32 panel); q4-int8 = the"
    echo "same file with --compute int8 (W4A8: x quantized to int8 per weight group, VNNI integer dots);"
    echo "w8a8 = \`opt convert --w8a8\`."
    /usr/bin/python3 bench/ct2.py report "$raw"
} > "$section"
cat "$section"
[ "${NO_RESULTS:-0}" = 1 ] || /usr/bin/python3 bench/section.py ct2 < "$section"
