#!/bin/sh
# bench/offload.sh: issue 4's CPU-machine benchmark. A synthetic OPT-1.3b (opt synth, cached in
# bench/models/) with its weights 50% on disk (--percent 0 50 0 100 0 100: the disk half is read
# from the checkpoint itself with O_DIRECT every step): decode throughput against the disk-read
# bound, for GPU batch sizes 1 and 8, with the all-in-RAM policy (0 100 ...), all weights on
# disk (0 0 0 100 0 100) and the plain engine (no policy) for comparison; then, when it fits,
# a larger-than-RAM demonstration: -m dummy:opt-13b with its weights mostly on disk.
# Writes the "Offloading on the CPU machine (issue 4)" section of bench/RESULTS.md (between its
# marker comments; other sections are kept) via bench/offload_report.py. Not run by the tests;
# a benchmark reports, it does not assert.
#
# Environment knobs (defaults in brackets):
#   REPS     repetitions of every opt-1.3b case [2]       BATCHES  GPU batch sizes ["1 8"]
#   P, G     prompt and generation lengths [128, 16]      THREADS  opt's threads [nproc]
#   BIG      1: the dummy:opt-13b demonstration when the offload dir has room, 0: skip [1]
#   BIG_PCT  its --percent [0 10 0 100 0 100]  BIG_P, BIG_G  its lengths [8, 3]
#   OFFDIR   --offload-dir (and where the disk is probed) [bench/models]
#   OUT      raw output [build/bench-offload]             RESULTS  [bench/RESULTS.md]
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-/usr/bin/python3}
REPS=${REPS:-2}
BATCHES=${BATCHES:-"1 8"}
P=${P:-128}
G=${G:-16}
THREADS=${THREADS:-$(nproc)}
BIG=${BIG:-1}
BIG_PCT=${BIG_PCT:-"0 10 0 100 0 100"}
BIG_P=${BIG_P:-8}
BIG_G=${BIG_G:-3}
OFFDIR=${OFFDIR:-bench/models}
OUT=${OUT:-build/bench-offload}
RESULTS=${RESULTS:-bench/RESULTS.md}
MODEL=bench/models/opt-1.3b

log() { printf '[offload %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
T0=$(date +%s)
[ -x ./opt ] || { log "building ./opt"; make CUDA=0 >&2; }
mkdir -p "$OUT" "$OFFDIR" bench/models
rm -f "$OUT"/*.json "$OUT"/*.err "$OUT"/manifest.tsv "$OUT"/machine.txt "$OUT"/disk.tsv "$OUT"/opt
cp ./opt "$OUT/opt"  # a snapshot: a rebuild during the run cannot mix two versions
OPT=$OUT/opt

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "cpu: $(lscpu | sed -n 's/^Model name: *//p') ($(nproc) logical CPUs)"
    echo "memory: $(free -g | awk '/^Mem:/ {print $2 " GiB total, " $7 " GiB available"}') ($(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo))"
    echo "disk: $(df -h "$OFFDIR" | awk 'NR == 2 {print $1 ", " $4 " free"}') ($(findmnt -n -o FSTYPE --target "$OFFDIR" 2>/dev/null || echo '?'))"
    echo "opt: git $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- opt.c opt.h offload.c quant.c lp.c 2>/dev/null || echo ' + uncommitted changes'), binary sha256 $(sha256sum ./opt | cut -c1-16)"
    echo "threads: $THREADS; reps: $REPS; prompt $P, generate $G"
    echo "load_start: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$OUT/machine.txt"

if [ ! -f "$MODEL/config.json" ] || [ ! -f "$MODEL/model.safetensors" ]; then
    log "synthesizing $MODEL"
    "$OPT" synth --shape opt-1.3b --seed 0 -o "$MODEL" >&2
fi

# Disk read bandwidth, O_DIRECT: opt probe (its own write-then-read file) and 4 dd streams over
# the checkpoint itself (the pattern of opt's 4 I/O threads), before and after the runs.
disk_probe() { # disk_probe TAG
    if "$OPT" probe --offload-dir "$OFFDIR" --disk-bytes 1G -o "$OUT/probe-$1.json" 2>/dev/null; then
        printf 'probe\t%s\t%s\n' "$1" "$($PYTHON -c "import json; print(json.load(open('$OUT/probe-$1.json'))['disk_read_bw'])")" >> "$OUT/disk.tsv"
    fi
    size=$(stat -c %s "$MODEL/model.safetensors")
    chunk=$(( size / 4 / 8388608 ))   # 8 MiB blocks per stream
    t0=$($PYTHON -c 'import time; print(time.time())')
    for i in 0 1 2 3; do
        dd if="$MODEL/model.safetensors" of=/dev/null bs=8M iflag=direct skip=$(( i * chunk )) count=$chunk 2>/dev/null &
    done
    wait
    t1=$($PYTHON -c 'import time; print(time.time())')
    printf 'dd4\t%s\t%s\n' "$1" "$($PYTHON -c "print($chunk * 4 * 8388608 / ($t1 - $t0))")" >> "$OUT/disk.tsv"
    t0=$t1
    dd if="$MODEL/model.safetensors" of=/dev/null bs=8M iflag=direct 2>/dev/null
    t1=$($PYTHON -c 'import time; print(time.time())')
    printf 'dd1\t%s\t%s\n' "$1" "$($PYTHON -c "print($size / ($t1 - $t0))")" >> "$OUT/disk.tsv"
}
log "disk read bandwidth (before)"
disk_probe before

# case NAME B POLICY...: one opt bench run; JSON on stdout, the plan on stderr
n=0
bench_case() {
    name=$1 b=$2
    shift 2
    n=$((n + 1))
    f=$OUT/$n.json
    load=$(cut -d' ' -f1 /proc/loadavg)
    if [ "$1" = plain ]; then
        log "$name b=$b (plain engine), load $load"
        "$OPT" bench -m "$MODEL" --prompt-len "$P" --gen-len "$G" -b "$b" -t "$THREADS" --json > "$f" 2> "$OUT/$n.err" || log "FAILED: $name"
        pol=-
    else
        log "$name b=$b --percent $*, load $load"
        "$OPT" bench -m "$MODEL" --prompt-len "$P" --gen-len "$G" -t "$THREADS" --json --percent "$@" \
            --gpu-batch-size "$b" --num-gpu-batches 1 --offload-dir "$OFFDIR" > "$f" 2> "$OUT/$n.err" || log "FAILED: $name"
        pol="$*"
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$b" "$pol" "$load" "$(cut -d' ' -f1 /proc/loadavg)" "$f" "$OUT/$n.err" >> "$OUT/manifest.tsv"
}

rep=1
while [ $rep -le "$REPS" ]; do
    for b in $BATCHES; do
        bench_case "weights 50% on disk" "$b" 0 50 0 100 0 100
        bench_case "all in RAM (policy)" "$b" 0 100 0 100 0 100
        bench_case "weights all on disk" "$b" 0 0 0 100 0 100
        [ "$rep" = 1 ] && bench_case "plain engine" "$b" plain
    done
    rep=$((rep + 1))
done

log "disk read bandwidth (after)"
disk_probe after

# Larger than RAM: dummy:opt-13b, weights mostly on disk (the dummy's disk share is first
# written into the offload dir, which needs that much free space).
if [ "$BIG" = 1 ]; then
    need=$($PYTHON -c "print(int(12.85e9 * 2 * (100 - float('$BIG_PCT'.split()[1])) / 100 * 1.05))")
    free=$(df -B1 --output=avail "$OFFDIR" | tail -n 1 | tr -d ' ')
    if [ "$free" -gt $((need + 8 * 1073741824)) ]; then
        n=$((n + 1))
        load=$(cut -d' ' -f1 /proc/loadavg)
        log "dummy:opt-13b --percent $BIG_PCT, prompt $BIG_P, generate $BIG_G (writes $((need / 1073741824)) GiB into $OFFDIR first), load $load"
        t0=$(date +%s)
        "$OPT" bench -m dummy:opt-13b --prompt-len "$BIG_P" --gen-len "$BIG_G" -t "$THREADS" --json --percent $BIG_PCT \
            --gpu-batch-size 1 --offload-dir "$OFFDIR" > "$OUT/$n.json" 2> "$OUT/$n.err" || log "FAILED: dummy:opt-13b"
        echo "big_wall_s: $(( $(date +%s) - t0 ))" >> "$OUT/machine.txt"
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "dummy:opt-13b" 1 "$BIG_PCT" "$load" "$(cut -d' ' -f1 /proc/loadavg)" "$OUT/$n.json" "$OUT/$n.err" >> "$OUT/manifest.tsv"
    else
        log "skipping dummy:opt-13b: $OFFDIR has $((free / 1073741824)) GiB free, it needs $((need / 1073741824)) GiB + 8"
        echo "big_skipped: $OFFDIR has $((free / 1073741824)) GiB free, needs $((need / 1073741824)) GiB" >> "$OUT/machine.txt"
    fi
fi

echo "load_end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/machine.txt"
echo "runtime_s: $(( $(date +%s) - T0 ))" >> "$OUT/machine.txt"
$PYTHON bench/offload_report.py "$OUT" "$RESULTS"
log "done in $(( $(date +%s) - T0 )) s; see $RESULTS"
