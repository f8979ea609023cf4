#!/bin/sh
# bench/run.sh (`make bench`): opt's CPU engine against a PyTorch fp32 implementation of the same
# model (bench/torch_opt.py, and transformers' OPTForCausalLM.generate where it imports), on the
# same synthetic checkpoints, in the same run; plus a streaming-read bandwidth probe for the
# batch-1 decode bound. Writes the "CPU engine (issue 2)" section of bench/RESULTS.md.
# Benchmarks never assert: the report states each target and whether this run met it.
#
# Environment knobs (defaults in brackets):
#   MODELS   shapes to run ["opt-125m opt-1.3b"]          REPS    repetitions, median [3]
#   THREADS  threads for every engine [nproc]             HF      transformers rows: all|small|0 [small:
#   THR_REPS repetitions of the batch-16 case on shapes            shapes under 1B, batch-1 cases only]
#            of 1B+ parameters [1] (it dominates the runtime)
#   PYTHON   [/usr/bin/python3]                           OUT     where raw JSON goes [build/bench]
#   CASES    "name:B:P:G ..." ["latency:1:128:32 prefill:1:512:8 throughput:16:128:32"]
#   RESULTS  the markdown file to update [bench/RESULTS.md]
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-/usr/bin/python3}
MODELS=${MODELS:-"opt-125m opt-1.3b"}
REPS=${REPS:-3}
THR_REPS=${THR_REPS:-1}
THREADS=${THREADS:-$(nproc)}
HF=${HF:-small}
OUT=${OUT:-build/bench}
RESULTS=${RESULTS:-bench/RESULTS.md}
# case name:batch:prompt length:generation length (the report knows latency, prefill, throughput)
CASES=${CASES:-"latency:1:128:32 prefill:1:512:8 throughput:16:128:32"}

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
T0=$(date +%s)

[ -x ./opt ] || { log "building ./opt"; make CUDA=0 >&2; }
mkdir -p "$OUT" bench/models
rm -f "$OUT"/*.json "$OUT"/*.jsonl "$OUT"/manifest.tsv "$OUT"/machine.txt "$OUT"/opt
cc -O2 -fopenmp bench/stream.c -o "$OUT/stream"
# A snapshot of the binary under test, so a rebuild during the run cannot mix two versions.
cp ./opt "$OUT/opt"
OPT="$OUT/opt"

# The machine, and how busy it is (other processes on the same cores skew everything).
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "cpu: $(lscpu | sed -n 's/^Model name: *//p') ($(nproc) logical CPUs; $(lscpu | sed -n 's/^Thread(s) per core: *//p') thread(s) per core, $(lscpu | sed -n 's/^Core(s) per socket: *//p') core(s) per socket as the hypervisor reports; L2 $(lscpu | sed -n 's/^L2 cache: *//p'), L3 $(lscpu | sed -n 's/^L3 cache: *//p'))"
    echo "flags: $(lscpu | grep -o -w -E 'avx2|avx512f|avx512_fp16|avx512_bf16|amx_bf16|f16c|fma' | sort -u | tr '\n' ' ')"
    echo "memory: $(free -g | awk '/^Mem:/ {print $2 " GiB total, " $7 " GiB available"}')"
    echo "hypervisor: $(lscpu | sed -n 's/^Hypervisor vendor: *//p')"
    echo "kernel: $(uname -r)"
    echo "compiler: $(cc --version | head -n 1)"
    echo "torch: $($PYTHON -c 'import torch; print(torch.__version__)' 2>/dev/null || echo none), BLAS: $(readlink -f /etc/alternatives/libblas.so.3-x86_64-linux-gnu 2>/dev/null || echo unknown)"
    echo "transformers: $($PYTHON -c 'import transformers; print(transformers.__version__)' 2>/dev/null || echo 'not importable')"
    echo "opt: git $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- opt.c opt.h quant.c lp.c Makefile 2>/dev/null || echo ' + uncommitted changes'), binary sha256 $(sha256sum ./opt | cut -c1-16), built $(date -u -r ./opt '+%H:%M:%S UTC')"
    echo "threads: $THREADS; reps: $REPS (batch-16 case on 1B+ shapes: $THR_REPS)"
    echo "load_start: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$OUT/machine.txt"

# run ENGINE MODEL CASE B P G REPS CMD...: appends JSON lines to $OUT/MODEL.CASE.ENGINE.jsonl
run() {
    eng=$1 model=$2 case=$3 b=$4 p=$5 g=$6 reps=$7
    shift 7
    f="$OUT/$model.$case.$eng.jsonl"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$model" "$case" "$b" "$p" "$g" "$eng" "$f" "$*" >> "$OUT/manifest.tsv"
    log "$model $case (b=$b p=$p g=$g) $eng x$reps"
    if [ "$eng" = opt ]; then
        i=0
        while [ $i -lt "$reps" ]; do
            # batch-1 decode is compared with the bandwidth measured right before it (other
            # processes on a shared machine move both)
            [ "$case" = latency ] && "$OUT/stream" 1920 3 --json >> "$OUT/$model.$case.stream-rep.jsonl"
            "$@" >> "$f" || log "FAILED: $*"
            i=$((i + 1))
        done
    else
        "$@" --reps "$reps" >> "$f" || log "FAILED: $*"
    fi
}

for model in $MODELS; do
    dir=bench/models/$model
    if [ ! -f "$dir/config.json" ] || [ ! -f "$dir/model.safetensors" ]; then
        log "synthesizing $dir"
        "$OPT" synth --shape "$model" --seed 0 -o "$dir" >&2
    fi
    cat "$dir/model.safetensors" > /dev/null  # warm the page cache: nobody is timed on disk reads
    log "$model: stream bandwidth"
    "$OUT/stream" --json > "$OUT/$model.stream.json"
    big=$($PYTHON -c "import json; c=json.load(open('$dir/config.json')); print(int(c['num_hidden_layers'] * 12 * c['hidden_size'] ** 2 >= 1e9))")
    for spec in $CASES; do
        case=${spec%%:*}; rest=${spec#*:}; b=${rest%%:*}; rest=${rest#*:}; p=${rest%%:*}; g=${rest#*:}
        reps=$REPS
        [ "$case" = throughput ] && [ "$big" = 1 ] && reps=$THR_REPS
        run opt "$model" "$case" "$b" "$p" "$g" "$reps" "$OPT" bench -m "$dir" --prompt-len "$p" --gen-len "$g" -b "$b" -t "$THREADS" --json
        run torch "$model" "$case" "$b" "$p" "$g" "$reps" "$PYTHON" bench/torch_opt.py -m "$dir" --prompt-len "$p" --gen-len "$g" -b "$b" -t "$THREADS"
        if [ "$HF" = all ] || { [ "$HF" = small ] && [ "$big" = 0 ] && [ "$case" != throughput ]; }; then
            if $PYTHON -c 'import transformers' 2>/dev/null; then
                run hf "$model" "$case" "$b" "$p" "$g" "$reps" "$PYTHON" bench/torch_opt.py --hf -m "$dir" --prompt-len "$p" --gen-len "$g" -b "$b" -t "$THREADS"
            fi
        fi
    done
    "$OUT/stream" --json > "$OUT/$model.stream-after.json"
done

echo "load_end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/machine.txt"
echo "runtime_s: $(( $(date +%s) - T0 ))" >> "$OUT/machine.txt"
$PYTHON bench/report.py "$OUT" "$RESULTS"
log "done in $(( $(date +%s) - T0 )) s; see $RESULTS"
