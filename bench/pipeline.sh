#!/bin/sh
# bench/pipeline.sh: issue 12's pipeline benchmark on this machine. A synthetic OPT-1.3b (opt
# synth, cached in bench/models/), one block of B sequences: 2 pipeline ranks x 1 thread
# (mpirun -np 2 ./opt-mpi) against 1 process x 1 thread (./opt-mpi without a launcher, which is
# the plain binary), interleaved rounds. Pipeline efficiency = (throughput ratio) / 2. Twice:
# weights in RAM (no policy: continuous batching, the block split into 2 groups of B/2, and into
# 4 with --micro-batches 4), and weights on disk (--percent 0 0 0 100 0 100, 2 GPU batches of
# B/2: each stage streams only its own half of the weights from the checkpoint with O_DIRECT).
# Also 1 process x 2 threads: what the same two CPUs give one process, the ceiling of the
# ratio on a machine whose two vCPUs share a core's FMA units or memory bandwidth. Writes the
# "pipeline" section of bench/RESULTS.md. Not run by the tests: a benchmark reports, it does
# not assert. Run it on a quiet machine.
#
# Environment knobs (defaults in brackets):
#   REPS  rounds [2]     B  block [16]     P, G  prompt and generation lengths [64, 16]
#   OUT   raw output [build/bench-pipeline]      RESULTS  [bench/RESULTS.md]
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-/usr/bin/python3}
REPS=${REPS:-2}
B=${B:-16}
P=${P:-64}
G=${G:-16}
OUT=${OUT:-build/bench-pipeline}
RESULTS=${RESULTS:-bench/RESULTS.md}
MODEL=bench/models/opt-1.3b
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1

log() { printf '[pipeline %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
[ -x ./opt-mpi ] || { log "building ./opt-mpi"; make opt-mpi >&2; }
mkdir -p "$OUT" bench/models
rm -f "$OUT"/*.json "$OUT"/*.err
cp ./opt-mpi "$OUT/opt-mpi"  # a snapshot: a rebuild during the run cannot mix two versions
OPT=$OUT/opt-mpi
if [ ! -f "$MODEL/config.json" ] || [ ! -f "$MODEL/model.safetensors" ]; then
    log "synthesizing $MODEL"
    ./opt-mpi synth --shape opt-1.3b --seed 0 -o "$MODEL" >&2
fi
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "cpu: $(lscpu | sed -n 's/^Model name: *//p') ($(nproc --all) logical CPUs)"
    echo "mpi: $(mpirun --version 2>&1 | head -n 1)"
    echo "opt: git $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- opt.c opt.h offload.c quant.c lp.c pipe.c 2>/dev/null || echo ' + uncommitted changes')"
    echo "load_start: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$OUT/machine.txt"

H=$((B / 2))
run() { # run NAME RANKS THREADS ARGS...: one bench, its JSON in $OUT/NAME.RANKSxTHREADS.REP.json
    name=$1 ranks=$2 th=$3
    shift 3
    f=$OUT/$name.${ranks}x$th.$rep
    if [ "$ranks" = 1 ]; then OMP_NUM_THREADS=$th "$OPT" bench -m "$MODEL" -t "$th" --json "$@" >"$f.json" 2>"$f.err"
    else mpirun -q --bind-to none -np "$ranks" "$OPT" bench -m "$MODEL" -t 1 --json "$@" >"$f.json" 2>"$f.err"
    fi || { log "FAILED: $name $ranks: $(tail -n 2 "$f.err")"; exit 1; }
    log "$name, $ranks rank(s): $(sed 's/.*"total_throughput": \([0-9.]*\).*/total \1 token\/s/' "$f.json")"
}
rep=1
while [ $rep -le "$REPS" ]; do
    run ram 1 1 --prompt-len "$P" --gen-len "$G" -b "$B"
    run ram 2 1 --prompt-len "$P" --gen-len "$G" -b "$B"
    run ram4 2 1 --prompt-len "$P" --gen-len "$G" -b "$B" --micro-batches 4
    run ram 1 2 --prompt-len "$P" --gen-len "$G" -b "$B"
    run disk 1 1 --prompt-len "$P" --gen-len "$G" --percent 0 0 0 100 0 100 --gpu-batch-size "$H" --num-gpu-batches 2 --offload-dir "$OUT"
    run disk 2 1 --prompt-len "$P" --gen-len "$G" --percent 0 0 0 100 0 100 --gpu-batch-size "$H" --num-gpu-batches 2 --offload-dir "$OUT"
    rep=$((rep + 1))
done
echo "load_end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/machine.txt"

"$PYTHON" - "$OUT" "$B" "$P" "$G" "$REPS" <<'EOF' | "$PYTHON" bench/section.py pipeline "$RESULTS"
import glob, json, os, statistics, sys
out, B, P, G, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def med(name, rt, key):
    v = [json.load(open(f))[key] for f in glob.glob('%s/%s.%s.*.json' % (out, name, rt))]
    return statistics.median(v)
print('## Pipeline stages over MPI on this machine (bench/pipeline.sh, issue 12)\n')
for l in open(os.path.join(out, 'machine.txt')):
    print('- ' + l.strip())
print('- command: `sh bench/pipeline.sh` (B=%d P=%d G=%d REPS=%d); a synthetic OPT-1.3b (f16), `bench --json -t 1`, '
      'medians of %d interleaved rounds' % (B, P, G, reps, reps))
print('\nEfficiency = (2-rank throughput / 1-rank throughput) / 2; the goal is >= 0.85. The last column is what')
print('one process gets from the same two vCPUs (1 x 2 threads over 1 x 1): the ratio the hardware allows.\n')
print('| weights | phase | 1 rank x 1 thread (token/s) | 2 ranks x 1 thread (token/s) | ratio | efficiency | 1 x 2 threads / 1 x 1 |')
print('|---|---|---:|---:|---:|---:|---:|')
rows = (('ram', 'ram', 'in RAM, 2 groups of %d' % (B // 2)), ('ram', 'ram4', 'in RAM, `--micro-batches 4` (groups of %d)' % (B // 4)),
        ('disk', 'disk', 'on disk, each stage its half (`--percent 0 0 0 100 0 100`, 2 x %d)' % (B // 2)))
for base, name, label in rows:
    for key, ph in (('prefill_throughput', 'prefill'), ('decode_throughput', 'decode'), ('total_throughput', 'total')):
        a, b = med(base, '1x1', key), med(name, '2x1', key)
        two = '%.2fx' % (med(base, '1x2', key) / a) if base == 'ram' else '-'
        print('| %s | %s | %.2f | %.2f | %.2fx | %.2f | %s |' % (label, ph, a, b, b / a, b / a / 2, two))
EOF
log "wrote the pipeline section of $RESULTS"
