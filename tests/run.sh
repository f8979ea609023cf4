#!/bin/sh
# tests/run.sh [--cuda OPT_CUDA_BINARY] [GROUP ...]: the test suite behind `make test`.
#
# Runs, in order (or only the GROUPs named):
#   kernels  tests/test_kernels.c, compiled here against opt.c: gemm, attention, softmax,
#            layernorm against double references and bitwise across SIMD levels, batch
#            sizes and threads; f16/bf16 conversions; utf8_valid_prefix; plan_stage_split
#            against a brute force
#   tok      tests/test_tok.py: `opt tokenize` against the tokenizers library
#   lp       tests/test_lp.sh: `opt lp` against GLPK
#   model    tests/test_model.py: `opt score` / `opt generate` end to end against the numpy
#            reference tests/ref_opt.py on synthetic checkpoints of every layout
#   bad      tests/test_bad_input.py: bad checkpoints, input and options under ./opt-asan
#   cli      tests/test_cli.py: every command's options, --version, input hygiene (BOM, CRLF,
#            blank lines), --truncate, stdout write errors (input checks also under ./opt-asan)
#   fuzz     tests/fuzz/replay.c, built with $CC plain and with ASan/UBSan: every regression
#            input (tests/fuzz/regress/TARGET/) is rejected cleanly, every seed (corpus/) returns;
#            then, where clang has libFuzzer, every harness fuzzed FUZZ_SECONDS (20; 0 skips)
#   w8a8     tests/test_w8a8.py: int8 GEMM exactness, SmoothQuant folding, the outlier model
#   q4       tests/test_q4.py (+ tests/test_q4.c): the 4-bit format byte for byte against numpy,
#            fused kernels against dequantize-then-GEMM bitwise, 4-bit score against ref_opt.py
#   offload  tests/test_offload.py: every placement policy gives the plain run's output (the
#            CPU computing, and the host standing in for a GPU), plans, budgets, the disk tier
#   exit     tests/test_exit.py: interrupted synth/convert leave nothing, the progress line on
#            a terminal, info's counts, a CUDA build's silence without a driver (--cuda)
#   plan     tests/test_plan.sh: the cost model, `opt plan`, `opt probe`
#   mpi      tests/test_mpi.py: pipeline stages (./opt-mpi under mpirun, 2-4 ranks) print the
#            single process's bytes; start-up checks; a failing, a killed, an over-budget rank
#   readme   tests/test_readme.py: every command of README.md's ```sh blocks, as written
#   cuda     a smoke test of a CUDA build, when one is given (--cuda PATH or $OPT_CUDA)
#   gpu      tests/gpu.sh: the GPU tests, where there is a GPU (skipped otherwise)
# The CPU groups run with OPT_DEVICE=cpu, so a CUDA build on a GPU machine tests its CPU path.
# One line per group (PASS/FAIL/SKIP and seconds), the failures' details under a failed
# group, then a summary. Exit status 0 only when no group failed.
#
# Environment: OPT (default ./opt), OPT_ASAN (./opt-asan), OPT_MPI (./opt-mpi), PYTHON
# (/usr/bin/python3), CC (cc), CLANG (clang, for libFuzzer), FUZZ_SECONDS (20: each harness's
# short run; 0 skips them), TEST_SEED (test_kernels' seed; default from the clock, printed),
# OPT_REAL_MODEL_DIR (a real opt-125m/350m checkpoint for test_model's published
# outputs), VERBOSE=1 (print every group's whole log).
set -u
cd "$(dirname "$0")/.." || exit 2

OPT=${OPT:-./opt}
OPT_ASAN=${OPT_ASAN:-./opt-asan}
PYTHON=${PYTHON:-/usr/bin/python3}
CC=${CC:-cc}
CUDA_BIN=${OPT_CUDA:-}
GROUPS="kernels tok lp model bad cli fuzz w8a8 q4 offload exit plan mpi readme cuda gpu"
SEL=""
while [ $# -gt 0 ]; do
    case $1 in
        --cuda) [ $# -ge 2 ] || { echo "run.sh: --cuda needs a path"; exit 2; }; CUDA_BIN=$2; shift 2 ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        -*) echo "run.sh: unknown option '$1'"; exit 2 ;;
        *) case " $GROUPS " in
               *" $1 "*) SEL="$SEL $1"; shift ;;
               *) echo "run.sh: unknown group '$1' (groups: $GROUPS)"; exit 2 ;;
           esac ;;
    esac
done
[ -n "$SEL" ] || SEL=$GROUPS
export OPT_DEVICE=cpu
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive} # test programs linking libgomp dynamically would spin otherwise

TMP=$(mktemp -d "${TMPDIR:-/tmp}/opt-tests.XXXXXX") || exit 2
cleanup() {
    # a tmpfs the bad-input test mounted, should it have been interrupted
    for m in $(awk -v t="$TMP" 'index($2, t) == 1 { print $2 }' /proc/mounts 2>/dev/null); do umount "$m" 2>/dev/null; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

n_pass=0 n_fail=0 n_skip=0 failed_groups=""
T_ALL=$(date +%s)

# result GROUP STATUS DETAIL LOG: the group's line; a failed group's log follows,
# without the lines of passed checks.
result() {
    printf '%-4s %-8s %4ss  %s\n' "$2" "$1" "$(( $(date +%s) - T0 ))" "$3"
    case $2 in
        PASS) n_pass=$((n_pass + 1)) ;;
        SKIP) n_skip=$((n_skip + 1)) ;;
        *) n_fail=$((n_fail + 1)); failed_groups="$failed_groups $1" ;;
    esac
    if [ -n "${4:-}" ] && [ -f "$4" ]; then
        if [ "${VERBOSE:-0}" = 1 ]; then sed 's/^/    | /' "$4"
        elif [ "$2" = FAIL ]; then grep -v -e '^  ok ' -e '^PASS ' "$4" | head -n 120 | sed 's/^/    | /'
        fi
    fi
}

# last_line LOG: the log's last non-empty line (each test ends with its summary)
last_line() { grep -v '^[[:space:]]*$' "$1" | tail -n 1; }

need_bin() { # need_bin GROUP BINARY: FAIL the group when the binary is missing
    [ -x "$2" ] && return 0
    result "$1" FAIL "$2 is missing: build it (make CUDA=0; make CUDA=0 opt-asan)"
    return 1
}

run_kernels() {
    log=$TMP/kernels.log
    # every top-level C file but opt.c, which test_kernels.c includes (lp.c, quant.c, ...), and
    # pipe.c, which needs MPI
    srcs=$(ls ./*.c | grep -v -e '^\./opt\.c$' -e '^\./pipe\.c$' | tr '\n' ' ')
    if ! $CC -std=c11 -O2 -fopenmp -ffp-contract=off -D_GNU_SOURCE -DOPT_NO_MAIN -I. tests/test_kernels.c $srcs -lm \
            -o "$TMP/test_kernels" >"$log" 2>&1; then
        result kernels FAIL "tests/test_kernels.c does not compile against opt.c" "$log"
        return
    fi
    if "$TMP/test_kernels" ${TEST_SEED:-} >"$log" 2>&1; then
        result kernels PASS "$(grep -c '^PASS' "$log") groups; $(head -n 1 "$log" | sed 's/^test_kernels: //; s/ (rerun.*//')" "$log"
    else
        result kernels FAIL "$(last_line "$log")" "$log"
    fi
}

run_tok() {
    need_bin tok "$OPT" || return
    log=$TMP/tok.log
    if ! "$OPT" synth --shape 64x2x4x256 -o "$TMP/tokmodel" >"$log" 2>&1; then
        result tok FAIL "opt synth failed" "$log"
        return
    fi
    if "$PYTHON" tests/test_tok.py --opt "$OPT" --model-dir "$TMP/tokmodel" >"$log" 2>&1; then
        result tok PASS "$(last_line "$log")" "$log"
    else
        result tok FAIL "$(last_line "$log")" "$log"
    fi
}

# group NAME BINARY COMMAND...: runs a test script (its log's last line is its summary)
group() {
    name=$1 bin=$2
    shift 2
    need_bin "$name" "$bin" || return
    log=$TMP/$name.log
    if "$@" >"$log" 2>&1; then result "$name" PASS "$(last_line "$log")" "$log"
    else result "$name" FAIL "$(last_line "$log")" "$log"
    fi
}

run_lp() { group lp "$OPT" sh tests/test_lp.sh "$OPT"; }
run_model() { group model "$OPT" "$PYTHON" tests/test_model.py --opt "$OPT" --tmp "$TMP/model"; }
run_bad() { group bad "$OPT_ASAN" "$PYTHON" tests/test_bad_input.py --opt "$OPT_ASAN" --tmp "$TMP/bad"; }
run_cli() { group cli "$OPT" "$PYTHON" tests/test_cli.py --opt "$OPT" --asan "$OPT_ASAN" --tmp "$TMP/cli"; }
# The fuzz harnesses' inputs through both replay builds. A sanitizer report, a crash or an
# accepted regression input fails the group; the 256 KiB stack is where the old pickle
# machine's unbounded recursion overflowed on regress/bin/pickle-depth. Then `make fuzz`
# runs every harness a short time, so that a new parser path is fuzzed on every change;
# a finding fails the group (its log's tail and the input's path are in the group's log).
run_fuzz() {
    log=$TMP/fuzz.log
    flags="-std=c11 -O1 -g -fopenmp -D_GNU_SOURCE -DOPT_FUZZ -I. -Wall -Wextra -Wno-unused-function"
    srcs="tests/fuzz/replay.c quant.c offload.c" # it includes opt.c and lp.c
    if ! { $CC $flags -o "$TMP/replay" $srcs -lm -lpthread &&
           $CC $flags -fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all \
               -o "$TMP/replay-asan" $srcs -lm -lpthread; } >"$log" 2>&1; then
        result fuzz FAIL "tests/fuzz/replay.c does not compile" "$log"
        return
    fi
    nr=0 ns=0 bad=0
    for dir in tests/fuzz/regress/* tests/fuzz/corpus/*; do
        t=${dir##*/} reject=""
        case $dir in tests/fuzz/regress/*) reject=--reject; nr=$((nr + $(ls "$dir" | wc -l))) ;; *) ns=$((ns + $(ls "$dir" | wc -l))) ;; esac
        for b in replay replay-asan; do
            if ! (ulimit -s 256; ASAN_OPTIONS=detect_leaks=0 "$TMP/$b" "$t" $reject "$dir"/*) >"$TMP/fuzz.out" 2>&1 ||
               grep -q -e 'runtime error' -e 'Sanitizer' "$TMP/fuzz.out"; then
                bad=$((bad + 1))
                echo "FAIL $b $dir:" >>"$log"
                grep -v -e ': rejected: ' "$TMP/fuzz.out" | head -n 20 >>"$log"
            else
                sed "s/^/  ok $b /" "$TMP/fuzz.out" >>"$log"
            fi
        done
    done
    if [ $bad != 0 ]; then result fuzz FAIL "$bad input sets failed" "$log"; return; fi
    sec=${FUZZ_SECONDS:-20} replayed="$nr regression inputs rejected, $ns seeds returned, plain and ASan/UBSan"
    if [ "$sec" = 0 ]; then result fuzz PASS "$replayed; short fuzzing skipped (FUZZ_SECONDS=0)" "$log"
    elif ! echo 'int LLVMFuzzerTestOneInput(const char *d, long n) { (void)d; (void)n; return 0; }' |
            ${CLANG:-clang} -fsanitize=fuzzer -x c - -o "$TMP/fuzz-probe" >/dev/null 2>&1; then
        result fuzz PASS "$replayed; short fuzzing skipped: ${CLANG:-clang} has no libFuzzer (tests/deps.sh installs it)" "$log"
    elif ${MAKE:-make} -s fuzz SECONDS="$sec" >>"$log" 2>&1; then
        result fuzz PASS "$replayed; every harness fuzzed $sec s" "$log"
    else
        result fuzz FAIL "$(grep '^make fuzz: ' "$log" | tail -n 1)" "$log"
    fi
}

run_w8a8() { group w8a8 "$OPT" "$PYTHON" tests/test_w8a8.py --opt "$OPT" --asan "$OPT_ASAN" --cc "$CC" --tmp "$TMP/w8a8"; }
run_q4() { group q4 "$OPT" "$PYTHON" tests/test_q4.py --opt "$OPT" --cc "$CC" --tmp "$TMP/q4"; }
run_offload() { group offload "$OPT" "$PYTHON" tests/test_offload.py --opt "$OPT" --asan "$OPT_ASAN" --tmp "$TMP/offload"; }
run_exit() { group exit "$OPT" "$PYTHON" tests/test_exit.py --opt "$OPT" ${CUDA_BIN:+--cuda "$CUDA_BIN"} --tmp "$TMP/exit"; }
run_plan() { group plan "$OPT" sh tests/test_plan.sh "$OPT"; }
run_mpi() {
    if ! command -v mpirun >/dev/null 2>&1; then result mpi SKIP "no mpirun (tests/deps.sh installs Open MPI)"; return; fi
    group mpi "${OPT_MPI:-./opt-mpi}" "$PYTHON" tests/test_mpi.py --opt "$OPT" --mpi "${OPT_MPI:-./opt-mpi}" --tmp "$TMP/mpi"
}
run_readme() { group readme "$OPT" "$PYTHON" tests/test_readme.py --opt "$OPT" --mpi "${OPT_MPI:-./opt-mpi}" --tmp "$TMP/readme"; }

run_gpu() {
    log=$TMP/gpu.log
    if OPT_DEVICE= sh tests/gpu.sh >"$log" 2>&1; then
        if grep -q skipped "$log"; then result gpu SKIP "$(last_line "$log")" "$log"; else result gpu PASS "$(last_line "$log")" "$log"; fi
    else
        result gpu FAIL "$(last_line "$log")" "$log"
    fi
}

# A CUDA build runs a tiny synthetic model like the CPU build: same number of lines and
# log-probabilities within 1e-3 (bitwise equality is not expected from cuBLAS).
run_cuda() {
    if [ -z "$CUDA_BIN" ]; then
        result cuda SKIP "no second build given (--cuda PATH or OPT_CUDA=PATH; where nvcc exists ./opt is the CUDA build, and the groups above ran it)"
        return
    fi
    if [ ! -x "$CUDA_BIN" ]; then
        result cuda FAIL "$CUDA_BIN is not an executable"
        return
    fi
    need_bin cuda "$OPT" || return
    log=$TMP/cuda.log
    d=$TMP/cudamodel
    printf '2 100 200 300 400\n2 5\n2 7 8 9 10 11 12 13 14 15 16 17\n' >"$TMP/cuda-ids"
    if "$OPT" synth --shape 64x2x4x256 -o "$d" >"$log" 2>&1 &&
       "$OPT" score --ids -m "$d" -f "$TMP/cuda-ids" >"$TMP/cuda-cpu" 2>>"$log" &&
       "$CUDA_BIN" score --ids -m "$d" -f "$TMP/cuda-ids" >"$TMP/cuda-gpu" 2>>"$log" &&
       "$CUDA_BIN" generate -m "$d" -n 4 </dev/null >>"$log" 2>&1 &&
       "$PYTHON" - "$TMP/cuda-cpu" "$TMP/cuda-gpu" >>"$log" 2>&1 <<'EOF'
import sys
a = [[float(x) for x in l.split()] for l in open(sys.argv[1])]
b = [[float(x) for x in l.split()] for l in open(sys.argv[2])]
assert len(a) == len(b) and all(len(x) == len(y) for x, y in zip(a, b)), "line or value counts differ"
err = max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))
print("max |cuda - cpu| = %.2e" % err)
sys.exit(0 if err <= 1e-3 else 1)
EOF
    then
        result cuda PASS "$CUDA_BIN: $(last_line "$log")" "$log"
    else
        result cuda FAIL "$CUDA_BIN: $(last_line "$log")" "$log"
    fi
}

echo "opt test suite: $OPT, $OPT_ASAN; scratch in $TMP"
# The tests run copies of the binaries, so a rebuild during the run cannot mix versions.
mkdir -p "$TMP/bin"
if [ -x "$OPT" ]; then cp "$OPT" "$TMP/bin/opt" && OPT=$TMP/bin/opt; fi
if [ -x "$OPT_ASAN" ]; then cp "$OPT_ASAN" "$TMP/bin/opt-asan" && OPT_ASAN=$TMP/bin/opt-asan; fi
for g in $SEL; do
    T0=$(date +%s)
    "run_$g"
done
echo "groups: $(( $(date +%s) - T_ALL ))s${failed_groups:+, failed:$failed_groups}"
echo "summary: $n_pass passed, $n_fail failed, $n_skip skipped"
[ "$n_fail" -eq 0 ]
