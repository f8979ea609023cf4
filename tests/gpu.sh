#!/bin/sh
# GPU tests, for a machine with an NVIDIA GPU (skips, saying so, elsewhere):
# builds the CUDA binary, runs the kernel unit tests and a GPU score under
# compute-sanitizer (memcheck, then racecheck), and compares GPU `score` with
# the CPU path on every variant: pre-LN and post-LN with projections, f16 and
# bf16, several prompts of different lengths in one batch. Log-probs must
# agree to 2e-2; greedy continuations must be identical wherever the CPU
# reference's top-2 margin exceeds 0.05. Then offloading with the GPU
# computing, across placement policies. Logs go to $OUT (or a temp dir).
set -u
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then echo "gpu.sh: skipped: no nvcc"; exit 0; fi
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then echo "gpu.sh: skipped: no GPU on this machine"; exit 0; fi
PY=${PYTHON:-/usr/bin/python3}; command -v "$PY" >/dev/null 2>&1 || PY=python3
LOG=${OUT:-$(mktemp -d)}
mkdir -p "$LOG"
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fail=0
note() { echo "gpu.sh: $*" | tee -a "$LOG/gpu.log"; }
# logged CMD...: runs CMD with its output into the log too; its own exit status (sh has no pipefail)
logged() { "$@" >"$T/logged.out"; st=$?; tee -a "$LOG/gpu.log" <"$T/logged.out"; return $st; }
# score_close CPU GPU LABEL: the two score outputs have the same shape and agree to 2e-2
score_close() {
    logged "$PY" - "$1" "$2" "$3" <<'PYEOF'
import sys
a = [[float(v) for v in l.split()] for l in open(sys.argv[1])]
b = [[float(v) for v in l.split()] for l in open(sys.argv[2])]
assert len(a) == len(b) and all(len(x) == len(y) for x, y in zip(a, b)), "shape mismatch"
d = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
print(("ok  " if d <= 2e-2 else "FAIL") + f" {sys.argv[3]}: max |gpu - cpu| = {d:.3g} (limit 2e-2)")
sys.exit(d > 2e-2)
PYEOF
}
nvidia-smi -L | tee -a "$LOG/gpu.log"

make -s opt CUDA=1 >"$LOG/build.log" 2>&1 || { note "FAIL: CUDA build (see build.log)"; exit 1; }
CUDA=$(dirname "$(dirname "$(command -v nvcc)")")
cc -std=c11 -O2 -fopenmp -ffp-contract=off -D_GNU_SOURCE -DOPT_NO_MAIN -DOPT_CUDA -I. -I"$CUDA/include" tests/test_gpu.c quant.c offload.c lp.c \
   build/cuda/kernels.o -L"$CUDA/lib64" -lcudart_static -ldl -lpthread -lrt -lstdc++ -lm -o "$T/test_gpu" >>"$LOG/build.log" 2>&1 \
   || { note "FAIL: test_gpu build"; exit 1; }

# 1. kernel unit tests, plain and under the sanitizers
"$T/test_gpu" >"$LOG/test_gpu.log" 2>&1 && note "ok: kernel unit tests" || { note "FAIL: kernel unit tests (test_gpu.log)"; fail=1; }
SAN=$(command -v compute-sanitizer || echo "$CUDA/bin/compute-sanitizer")
for tool in memcheck racecheck; do
    "$SAN" --tool $tool --error-exitcode 9 "$T/test_gpu" >"$LOG/test_gpu.$tool.log" 2>&1 \
        && note "ok: kernel unit tests under $tool" || { note "FAIL: kernel unit tests under $tool ($tool log)"; fail=1; }
done

# 2. models: every variant, CPU vs GPU
./opt synth --shape 256x2x4x1024 --seed 3 -o "$T/pre16" >/dev/null 2>&1
./opt synth --shape 256x2x4x1024 --seed 4 --dtype bf16 -o "$T/pre-bf16" >/dev/null 2>&1
"$PY" tests/mkckpt.py -o "$T/post" --hidden 256 --layers 2 --heads 4 --ffn 1024 --vocab 50272 --max-pos 128 --embed-dim 128 --post-ln \
      --dtype f16 --no-tie --seed 5 >/dev/null 2>&1
"$PY" - "$T/ids.txt" <<'PYEOF'
import random, sys
random.seed(11)
with open(sys.argv[1], "w") as f:
    for n in (5, 17, 40, 3, 29, 64, 11):
        f.write(" ".join(["2"] + [str(random.randint(4, 50000)) for _ in range(n)]) + "\n")
PYEOF
for m in pre16 pre-bf16 post; do
    ./opt score --device cpu -m "$T/$m" --ids -b 8 <"$T/ids.txt" >"$T/$m.cpu" 2>>"$LOG/gpu.log"
    ./opt score --device gpu -m "$T/$m" --ids -b 8 <"$T/ids.txt" >"$T/$m.gpu" 2>>"$LOG/gpu.log"
    score_close "$T/$m.cpu" "$T/$m.gpu" "score $m" || fail=1
    # greedy: identical where the CPU reference is decisive (top-2 margin > 0.05)
    "$PY" tests/ref_opt.py greedy -m "$T/$m" -n 12 --margins <"$T/ids.txt" >"$T/$m.ref" 2>>"$LOG/gpu.log"
    ./opt generate --device gpu -m "$T/$m" --ids -n 12 --ignore-eos -b 8 <"$T/ids.txt" >"$T/$m.gen" 2>>"$LOG/gpu.log"
    logged "$PY" - "$T/$m.ref" "$T/$m.gen" "$m" <<'PYEOF' || fail=1
import sys
ok = True
for i, (r, g) in enumerate(zip(open(sys.argv[1]), open(sys.argv[2]))):
    ids, margins = r.rstrip("\n").split("\t")
    ids, margins, got = ids.split(), [float(x) for x in margins.split()], g.split()
    for t, (a, b, mg) in enumerate(zip(ids, got, margins)):
        if mg <= 0.05: break
        if a != b: ok = False; print(f"FAIL greedy {sys.argv[3]} line {i + 1} step {t}: cpu {a} gpu {b} (margin {mg:.3f})"); break
print(("ok  " if ok else "FAIL") + f" greedy {sys.argv[3]}: identical where the margin exceeds 0.05")
sys.exit(not ok)
PYEOF
done
for tool in memcheck racecheck; do
    "$SAN" --tool $tool --error-exitcode 9 ./opt score --device gpu -m "$T/pre16" --ids -b 8 <"$T/ids.txt" >"$LOG/opt.$tool.log" 2>&1 \
        && note "ok: opt score under $tool" || { note "FAIL: opt score under $tool"; fail=1; }
done
./opt score --device gpu -m "$T/pre16" --ids --compress-weight --compress-cache -b 8 <"$T/ids.txt" >"$T/q4.gpu" 2>>"$LOG/gpu.log" \
    && ./opt score --device cpu -m "$T/pre16" --ids --compress-weight --compress-cache -b 8 <"$T/ids.txt" >"$T/q4.cpu" 2>>"$LOG/gpu.log" \
    && note "ok: 4-bit weights and cache run on the GPU" || { note "FAIL: 4-bit on the GPU"; fail=1; }
# 3. offloading with the GPU computing: every policy scores bitwise alike (the same kernels on
# the same batches; only where the bytes sit changes), within 2e-2 of the CPU; --cpu-attention
# (attention in f32 on the CPU for its areas) within 2e-2 too; a --gpu-mem too small is refused
OFF="--offload-dir $T --gpu-batch-size 4 --num-gpu-batches 2"
ref=""
for pol in "100 0 100 0 100 0" "30 40 20 50 10 60" "0 0 0 0 0 0" "20 80 0 100 0 100" "0 100 0 100 0 100"; do
    for ca in "" "--cpu-attention"; do
        out="$T/off.$(echo "$pol$ca" | tr -c 'a-z0-9' _)"
        ./opt score --device gpu -m "$T/pre16" --ids --percent $pol $OFF $ca <"$T/ids.txt" >"$out" 2>>"$LOG/gpu.log" \
            || { note "FAIL: offloading --percent $pol $ca exited non-zero"; fail=1; continue; }
        [ -z "$ca" ] && [ -z "$ref" ] && ref=$out
        if [ -z "$ca" ]; then cmp -s "$ref" "$out" && note "ok: offloading --percent $pol scores bitwise as --percent 100 0 100 0 100 0" \
            || { note "FAIL: offloading --percent $pol differs from --percent 100 0 100 0 100 0"; fail=1; }; fi
        score_close "$T/pre16.cpu" "$out" "offloading --percent $pol $ca" || fail=1
    done
done
"$SAN" --tool memcheck --error-exitcode 9 ./opt score --device gpu -m "$T/pre16" --ids --percent 30 40 20 50 10 60 $OFF --cpu-attention \
    <"$T/ids.txt" >"$LOG/off.memcheck.log" 2>&1 && note "ok: offloading under memcheck" || { note "FAIL: offloading under memcheck"; fail=1; }
./opt score --device gpu -m "$T/pre16" --ids --percent 30 40 20 50 10 60 $OFF --compress-weight --compress-cache <"$T/ids.txt" >"$T/off.q4" 2>>"$LOG/gpu.log" \
    && note "ok: offloading with 4-bit weights and cache" || { note "FAIL: offloading with 4-bit weights and cache"; fail=1; }
./opt score --device gpu -m "$T/pre16" --ids --percent 100 0 100 0 100 0 $OFF --gpu-mem 1M <"$T/ids.txt" >/dev/null 2>"$T/refuse.err"
[ $? -ne 0 ] && grep -q "does not fit" "$T/refuse.err" && note "ok: --gpu-mem 1M refused before allocating" \
    || { note "FAIL: --gpu-mem 1M not refused"; fail=1; }
[ $fail = 0 ] && note "all GPU tests passed" || note "GPU tests FAILED"
exit $fail
