#!/bin/sh
# bench/q4.sh: 4-bit group-wise weights and KV cache on the CPU (issue 6). Prints markdown
# sections on stdout for bench/RESULTS.md (raw outputs stay in $OUT); progress goes to stderr.
# Never asserts: the report states each target and whether this run met it.
#
#   1. Speed: batch-1 decode on synthetic OPT-1.3b (`opt synth --shape opt-1.3b --seed 0`, the
#      model bench/run.sh uses, cached in bench/models/): `opt bench --prompt-len 32 --gen-len 32
#      -b 1` with the f16 checkpoint, with --compress-weight (quantized at load) and with the
#      native 4-bit file `opt convert --int4-weights` writes (cached next to it). REPS rounds;
#      each round first probes the streaming-read bandwidth (bench/stream.c, both threads), then
#      runs f16, --compress-weight, the file (and --compress-weight at the XGROUPS sizes) in a
#      rotating order, so load from other processes hits all alike. Reports
#      medians and bests, the speed ratio against f16 (target >= 2.5x) and the fraction of the
#      bandwidth bound for the bytes a 4-bit decode step reads (4-bit codes + f16 scales/mins of
#      every layer matrix and the (tied) lm_head, one position row, the f32 vectors; target >=
#      60%), against the probe of the same round and the best probe of the run.
#   2. Accuracy (bench/q4_accuracy.py): score with 4-bit weights, cache and both, groups
#      32/64/128, against the fp16 run: mean/max |d log-prob| and the perplexity change, on a
#      random synthetic model (incompressible noise: the worst case) and on a synthetic model
#      with realistic structure (low-rank weights plus small noise).
#   4. The 4-bit KV cache's speed (PARTS "cache"): `opt bench` on synthetic OPT-125m (bench/models/,
#      as bench/run.sh makes it) with a long prompt (CACHE_P, 1024) + 32, batch 1 and 8, with
#      and without --compress-cache, REPS rounds: what attention over the 4-bit cache costs.
#   3. The decode GEMV alone (bench/q4_gemv.c, PARTS "gemv"): gemm() with M = 1 over 24
#      OPT-1.3b layers' matrices, f16 and 4-bit G 32/64/128, 1 and 2 threads, against a streaming
#      read of the same bytes in the same run, and on one matrix that stays in cache (the
#      kernel's compute ceiling).
#
# Environment knobs (defaults in brackets):
#   SHAPE   speed model [opt-1.3b]     G        group size of the 4-bit runs [64]
#   REPS    rounds [5]                 THREADS  threads [nproc]
#   PARTS   "speed acc gemv cache" [all]  OUT  raw outputs [build/bench-q4]
#   PROMPT  prompt length [32]         GEN      generated tokens [32]
#   XGROUPS other group sizes run with --compress-weight in each round, for the speed/group
#           trade-off ["32 128"; "" for none]
#   CACHE_P prompt length of the cache runs [1024]
#   PYTHON  [/usr/bin/python3]
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-/usr/bin/python3}
SHAPE=${SHAPE:-opt-1.3b}
G=${G:-64}
REPS=${REPS:-5}
THREADS=${THREADS:-$(nproc)}
PARTS=${PARTS:-"speed acc gemv cache"}
CACHE_P=${CACHE_P:-1024}
OUT=${OUT:-build/bench-q4}
PROMPT=${PROMPT:-32}
GEN=${GEN:-32}
XGROUPS=${XGROUPS-"32 128"}
log() { printf '[q4 %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
T0=$(date +%s)

[ -x ./opt ] || { log "building ./opt"; make CUDA=0 >&2; }
mkdir -p "$OUT" bench/models
cp ./opt "$OUT/opt"   # the binary under test, safe from rebuilds during the run
OPT="$OUT/opt"
export OPT_DEVICE=cpu

{
    echo "- Machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) vCPUs ($THREADS threads; $(lscpu | sed -n 's/^Thread(s) per core: *//p') thread(s) per core as the hypervisor reports), $(free -g | awk '/^Mem:/ {print $2}') GiB RAM, L3 $(lscpu | sed -n 's/^L3 cache: *//p');" \
         "flags $(lscpu | grep -o -w -E 'avx2|avx512f|avx512bw|avx512_vnni|f16c|fma' | sort -u | tr '\n' ' ')"
    echo "- opt: git $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- opt.c opt.h quant.c offload.c 2>/dev/null || echo ' + uncommitted changes'), binary sha256 $(sha256sum ./opt | cut -c1-16); compiler $(cc --version | head -n 1)"
    echo "- Load average at the start: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$OUT/machine.md"

# ---------------------------------------------------------------------------------------------
if echo "$PARTS" | grep -q speed; then
    dir=bench/models/$SHAPE
    if [ ! -f "$dir/config.json" ] || [ ! -f "$dir/model.safetensors" ]; then
        log "synthesizing $dir"
        "$OPT" synth --shape "$SHAPE" --seed 0 -o "$dir" >&2
    fi
    q4file=bench/models/$SHAPE-q4g$G.safetensors
    if [ ! -f "$q4file" ] || [ "$q4file" -ot "$dir/model.safetensors" ] || [ "$q4file" -ot ./opt ]; then
        log "converting $dir to $q4file"
        t=$(date +%s)
        "$OPT" convert -m "$dir" -o "$q4file" --int4-weights --group-size "$G" >&2
        echo "{\"convert_s\": $(( $(date +%s) - t ))}" > "$OUT/convert.json"
    fi
    cc -O2 -fopenmp bench/stream.c -o "$OUT/stream"
    rm -f "$OUT/speed.jsonl" "$OUT/stream.jsonl"
    cfgs="fp16 q4load q4file"
    for g in $XGROUPS; do cfgs="$cfgs q4load$g"; done
    r=1
    while [ $r -le "$REPS" ]; do
        log "round $r/$REPS: stream probe"
        printf '{"rep": %d, "load": "%s", "stream": %s}\n' $r "$(cut -d' ' -f1-3 /proc/loadavg)" \
            "$(OMP_NUM_THREADS=$THREADS "$OUT/stream" 1920 3 --json)" >> "$OUT/stream.jsonl"
        for c in $cfgs; do
            case $c in
                fp16) args="-m $dir" ;;
                q4load) args="-m $dir --compress-weight --group-size $G" ;;
                q4file) args="-m $q4file" ;;
                q4load*) args="-m $dir --compress-weight --group-size ${c#q4load}" ;;
            esac
            log "round $r/$REPS: $c"
            load=$(cut -d' ' -f1-3 /proc/loadavg)
            # shellcheck disable=SC2086
            res=$("$OPT" bench $args --prompt-len "$PROMPT" --gen-len "$GEN" -b 1 -t "$THREADS" --json) || { log "FAILED: opt bench $args"; res=null; }
            printf '{"rep": %d, "cfg": "%s", "load": "%s", "result": %s}\n' $r "$c" "$load" "$res" >> "$OUT/speed.jsonl"
        done
        cfgs="$(echo "$cfgs" | cut -d' ' -f2-) $(echo "$cfgs" | cut -d' ' -f1)"   # rotate the order
        r=$((r + 1))
    done
    echo "- Load average at the end of the speed runs: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/machine.md"
fi

# ---------------------------------------------------------------------------------------------
if echo "$PARTS" | grep -q acc; then
    log "accuracy"
    $PYTHON bench/q4_accuracy.py --opt "$OPT" --out "$OUT" > "$OUT/accuracy.md"
fi

if echo "$PARTS" | grep -q gemv; then
    log "decode GEMV alone (bench/q4_gemv.c)"
    cc -O3 -fopenmp -ffp-contract=off -fno-math-errno -D_GNU_SOURCE -DOPT_NO_MAIN -I. bench/q4_gemv.c quant.c offload.c lp.c \
        -lm -lpthread -o "$OUT/q4_gemv"
    OMP_WAIT_POLICY=passive OMP_NUM_THREADS=$THREADS "$OUT/q4_gemv" 7 24 > "$OUT/gemv.txt"
fi

if echo "$PARTS" | grep -q cache; then
    cdir=bench/models/opt-125m
    if [ ! -f "$cdir/config.json" ] || [ ! -f "$cdir/model.safetensors" ]; then
        log "synthesizing $cdir"
        "$OPT" synth --shape opt-125m --seed 0 -o "$cdir" >&2
    fi
    rm -f "$OUT/cache.jsonl"
    r=1
    while [ $r -le "$REPS" ]; do
        for b in 1 8; do
            for c in f32 q4; do
                fl=""; [ $c = q4 ] && fl="--compress-cache --group-size $G"
                log "cache round $r/$REPS: batch $b, $c cache"
                # shellcheck disable=SC2086
                res=$("$OPT" bench -m "$cdir" --prompt-len "$CACHE_P" --gen-len 32 -b $b -t "$THREADS" $fl --json) || res=null
                printf '{"rep": %d, "batch": %d, "cache": "%s", "result": %s}\n' $r $b $c "$res" >> "$OUT/cache.jsonl"
            done
        done
        r=$((r + 1))
    done
fi

$PYTHON bench/q4_report.py --out "$OUT" --shape "$SHAPE" --group "$G" --reps "$REPS" --prompt "$PROMPT" --gen "$GEN" \
    --cache-prompt "$CACHE_P" --seconds $(( $(date +%s) - T0 ))
