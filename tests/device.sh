#!/bin/sh
# tests/device.sh: everything a GPU machine should run, in one go, in under 8 minutes on an
# H100, without network (it builds from the working tree alone; mimalloc's sources are in
# third_party/, outside git, which the runner carries). Each step is time-boxed, so a hang
# cannot eat the rest, and logged to $OUT (default ./device-out): $OUT/STEP.log, and one
# line per step in $OUT/device.log and on stdout:
#   build      the CUDA binary (for this card's architecture) and tests/test_gpu.c
#   info       `opt info`, then one score on the GPU: without a usable GPU the script stops
#              here with the reason on one line
#   unit       the kernel unit tests (test_gpu) against the CPU backend
#   models     GPU against CPU and numpy reference: score and greedy on every variant
#              (pre/post-LN, f16/bf16, 4-bit weights and cache, W8A8, one batch of prompts of
#              different lengths, continuous batching with long prompts arriving late), sampling
#   memcheck   compute-sanitizer memcheck on the kernel tests and one small generate
#   racecheck  racecheck on the kernel tests
#   offload    offloading with the GPU computing (weights, cache, activations over GPU, CPU and
#              disk) against the CPU run
#   bench      bench/gpu.sh: opt against the HBM bound, cuBLAS and PyTorch fp16 eager
# Python comes from $PYTHON, else python3 on the PATH. DEVICE_BUDGET (seconds, default 470)
# bounds the whole run; BENCH_SHAPES (default opt-1.3b) the benchmark's models. Exit status 0
# only when every step passed.
set -u
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-./device-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || { echo "device.sh: cannot create $OUT"; exit 2; }
PYTHON=${PYTHON:-$(command -v python3 || command -v python || echo python3)}
BENCH_SHAPES=${BENCH_SHAPES:-opt-1.3b}
export OUT PYTHON BENCH_SHAPES GPU_REQUIRED=1
BUDGET=${DEVICE_BUDGET:-470}
T0=$(date +%s)
fail=0
: >"$OUT/device.log"
say() { echo "device.sh: $*" | tee -a "$OUT/device.log"; }

# step NAME SECONDS CMD...: CMD time-boxed (never past the budget), output in $OUT/NAME.log;
# one line: ok, or FAIL with the log's first FAIL line, else its last (an error's one line),
# and $STOP when it ends the run
STOP=""
step() {
    name=$1 box=$2
    shift 2
    left=$((T0 + BUDGET - $(date +%s)))
    [ "$box" -gt "$left" ] && box=$left
    if [ "$box" -lt 5 ]; then say "FAIL $name: not run, the ${BUDGET}s budget is spent"; fail=1; return 1; fi
    t=$(date +%s)
    timeout -k 5 "$box" "$@" >"$OUT/$name.log" 2>&1
    st=$?
    dt=$(($(date +%s) - t))
    if [ $st = 0 ]; then say "ok   $name (${dt}s)"; return 0; fi
    if [ $st = 124 ] || [ $st = 137 ]; then why="timed out after ${box}s"
    else why=$(grep -m 1 'FAIL' "$OUT/$name.log" || grep -v '^[[:space:]]*$' "$OUT/$name.log" | tail -n 1); fi
    say "FAIL $name (${dt}s): $why$STOP"
    fail=1
    return 1
}

# the first GPU step: opt info on a tiny model, which is then scored on the GPU
GPU_INFO='d=build/gpu-tests/info-model; mkdir -p build/gpu-tests && ./opt synth --shape 64x2x4x256 --seed 1 -o $d >/dev/null &&
          ./opt info -m $d && printf "2 100 200 300 400\n" | ./opt score --device gpu --ids -m $d'

say "start $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname); python $PYTHON; budget ${BUDGET}s"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >"$OUT/nvidia-smi.log" 2>&1
STOP="; stopped: nothing else runs without the build"
step build 200 sh tests/gpu.sh build || exit 1
STOP="; stopped: no GPU step can run"
step info 30 sh -c "$GPU_INFO" || exit 1
STOP=""
step unit 60 sh tests/gpu.sh unit
step models 150 sh tests/gpu.sh models
step memcheck 100 sh tests/gpu.sh memcheck
step racecheck 60 sh tests/gpu.sh racecheck
step offload 90 sh tests/gpu.sh offload
step bench 200 sh bench/gpu.sh
[ $fail = 0 ] && say "all steps passed in $(($(date +%s) - T0))s" || say "FAILED: see the lines above and $OUT/*.log ($(($(date +%s) - T0))s)"
exit $fail
