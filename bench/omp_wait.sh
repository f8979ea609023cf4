#!/bin/sh
# bench/omp_wait.sh: what the OpenMP wait policy costs. Batch-1 decode of synthetic OPT-125m and
# OPT-1.3b (bench/models, made by `make bench`, or by this script when missing) with opt's default
# (GOMP_SPINCOUNT=1000: spin ~10 us, then sleep), with GOMP_SPINCOUNT=0 (sleep at once, the
# plain OMP_WAIT_POLICY=passive) and with 10000; alone, and as two jobs at once on the machine
# (each with all threads: the oversubscribed case of a shared lab machine). Rounds rotate the
# order; medians. Writes the "omp-wait" section of bench/RESULTS.md.
#   sh bench/omp_wait.sh          ROUNDS=3 OPT=./opt
set -eu
cd "$(dirname "$0")/.."
OPT=${OPT:-./opt}
ROUNDS=${ROUNDS:-3}
PY=${PYTHON:-/usr/bin/python3}
W=build/bench-omp
mkdir -p "$W" bench/models
[ -x "$OPT" ] || make CUDA=0 opt >&2
for s in opt-125m opt-1.3b; do
    [ -f bench/models/$s/config.json ] || "$OPT" synth --shape $s --seed 1 -o bench/models/$s >&2
done
run() { # MODEL SPIN -> decode tok/s
    GOMP_SPINCOUNT=$2 "$OPT" bench -m bench/models/$1 --prompt-len 32 --gen-len 32 -b 1 --json 2>/dev/null |
        "$PY" -c 'import json, sys; print("%.3f" % json.load(sys.stdin)["decode_throughput"])'
}
: >"$W/raw.txt"
start=$(cut -d' ' -f1-3 /proc/loadavg)
for r in $(seq "$ROUNDS"); do
    for m in opt-125m opt-1.3b; do
        for spin in 1000 0 10000; do
            echo "$m $spin alone $(run $m $spin)" >>"$W/raw.txt"
            run $m $spin >"$W/a" & run $m $spin >"$W/b"; wait
            echo "$m $spin shared $(cat "$W/a") $(cat "$W/b")" >>"$W/raw.txt"
        done
    done
    echo "[omp_wait] round $r of $ROUNDS done" >&2
done
"$PY" - "$W/raw.txt" "$start" "$(cut -d' ' -f1-3 /proc/loadavg)" "$(git rev-parse --short HEAD)$(git diff --quiet || echo +)" <<'EOF' | "$PY" bench/section.py omp-wait
import statistics as st, sys
rows = {}
for l in open(sys.argv[1]):
    m, spin, mode, *v = l.split()
    rows.setdefault((m, int(spin), mode), []).append(sum(map(float, v)))
cpu = [l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')]
print('## OpenMP wait policy: spin briefly, then sleep\n')
print('Written by `sh bench/omp_wait.sh` (opt git %s). Machine: %s, %d vCPUs. Load average at the start %s, '
      'at the end %s. Batch-1 decode tok/s (`opt bench --prompt-len 32 --gen-len 32 -b 1`), median of %d rounds; '
      '"two jobs" is the sum of two `opt bench` run at once, each with all threads.\n' % (
          sys.argv[4], cpu[0], len(cpu), sys.argv[2], sys.argv[3], len(next(iter(rows.values())))))
print('| model | GOMP_SPINCOUNT | alone tok/s | vs 0 | two jobs, total tok/s | vs 0 |')
print('|---|---:|---:|---:|---:|---:|')
for m in ('opt-125m', 'opt-1.3b'):
    base = {mode: st.median(rows[(m, 0, mode)]) for mode in ('alone', 'shared')}
    for spin in (0, 1000, 10000):
        a, s = st.median(rows[(m, spin, 'alone')]), st.median(rows[(m, spin, 'shared')])
        print('| %s | %d%s | %.2f | %.2fx | %.2f | %.2fx |' % (m, spin, ' (default)' if spin == 1000 else '', a, a / base['alone'],
                                                           s, s / base['shared']))
print('\nSleeping at once (0) pays a futex wake-up of the other thread per parallel region (30-100 us on this VM, '
      'whose idle vCPU halts); decode opens about 7 regions per layer. Spinning longer (10000) wins alone and '
      'loses more when the vCPUs are shared.')
EOF
echo "[omp_wait] wrote the omp-wait section of bench/RESULTS.md" >&2
