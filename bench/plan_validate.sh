#!/bin/sh
# plan_validate.sh: the cost model (lp.c) against measurements on this machine (issue 5, phase 2).
#
# 1. copies ./opt to build/plan-validate/opt (the run uses that snapshot throughout);
# 2. makes the synthetic checkpoints it needs under bench/models/ (git-ignored) with `opt synth`:
#    opt-125m and 2048x6x32x8192 (409M parameters, OPT-1.3B's width);
# 3. measures this machine: `opt probe -o build/plan-validate/probe.json --offload-dir DIR`;
# 4. runs a grid of policies with `opt bench ... --json` (CPU computes; weights, cache and
#    activations on RAM and on the local disk in DIR; several GPU batch sizes and counts; 4-bit
#    weights and cache), REPS rounds of every case, and the policies `opt plan` picks with the
#    probe (limited to the grid's largest block; the larger model also under --cpu-mem 640M);
#    each round starts with a fresh probe, since other jobs change the machine's speed;
# 5. predicts each run with `opt plan --eval POLICY --hw PROBE` (its round's probe) and writes the
#    table to bench/plan_validation.md and into its section of bench/RESULTS.md (bench/section.py).
# Raw measurements stay in build/plan-validate/raw.json: `sh bench/plan_validate.sh report`
# recomputes the predictions (after a change to the cost model) without measuring again.
#
# Environment: OFFLOAD_DIR (default: a new directory under ${TMPDIR:-/tmp}, removed afterwards),
# REPS (5), THREADS (default: opt's, all cores), PYTHON (/usr/bin/python3).
# Takes ~15 minutes on 2 vCPUs.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-/usr/bin/python3}
W=build/plan-validate
mkdir -p "$W" bench/models
MODE=${1:-run}

if [ "$MODE" = report ]; then
    [ -f "$W/raw.json" ] || { echo "plan_validate: no $W/raw.json; run without arguments first"; exit 1; }
    [ -x ./opt ] || make CUDA=0
    "$PY" bench/plan_validate.py report --opt ./opt --raw "$W/raw.json" --md bench/plan_validation.md
    exec "$PY" bench/section.py "plan-validation (issue 5)" <bench/plan_validation.md
fi

[ -x ./opt ] || make CUDA=0
cp ./opt "$W/opt"
OPT=$W/opt
for shape in opt-125m 2048x6x32x8192; do
    [ -f "bench/models/$shape/config.json" ] || "$OPT" synth --shape "$shape" -o "bench/models/$shape"
done
if [ -n "${OFFLOAD_DIR:-}" ]; then
    OFF=$OFFLOAD_DIR
    mkdir -p "$OFF"
else
    OFF=$(mktemp -d "${TMPDIR:-/tmp}/opt-plan-validate.XXXXXX")
    trap 'rm -rf "$OFF"' EXIT INT TERM
fi
echo "plan_validate: load average $(cut -d' ' -f1-3 /proc/loadavg); offload dir $OFF"
THR=""
[ -n "${THREADS:-}" ] && THR="--threads $THREADS"
# the probe runs with the thread count the benchmarks use
if [ -n "${THREADS:-}" ]; then
    OMP_NUM_THREADS=$THREADS "$OPT" probe -o "$W/probe.json" --offload-dir "$OFF" --disk-bytes 512M
else
    "$OPT" probe -o "$W/probe.json" --offload-dir "$OFF" --disk-bytes 512M
fi
# shellcheck disable=SC2086
"$PY" bench/plan_validate.py run --opt "$OPT" --probe "$W/probe.json" --offload-dir "$OFF" --raw "$W/raw.json" \
    --reps "${REPS:-5}" $THR
"$PY" bench/plan_validate.py report --opt "$OPT" --raw "$W/raw.json" --md bench/plan_validation.md
"$PY" bench/section.py "plan-validation (issue 5)" <bench/plan_validation.md
echo "plan_validate: load average $(cut -d' ' -f1-3 /proc/loadavg); wrote bench/plan_validation.md"
