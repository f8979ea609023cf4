#!/bin/sh
# tests/gpu.sh [PART ...]: the GPU tests, in parts (default: all, in this order):
#   build      the CUDA binary and tests/test_gpu.c (into build/gpu-tests/)
#   unit       test_gpu: every kernel against the CPU backend (GEMMs f16/bf16/4-bit/int8,
#              LayerNorm, attention up to 1031 positions and head_dim 64/80/128, sampling)
#   models     GPU against the CPU and the numpy reference on every variant: pre-LN and
#              post-LN with projections, f16 and bf16, 4-bit weights and cache, W8A8 (dynamic
#              and static), one batch of prompts of different lengths against ref_opt's
#              left-padded batch, continuous batching with long prompts arriving after decode
#              graphs were captured, seeded sampling. Log-probs agree to 2e-2; greedy ids are
#              identical wherever the CPU reference's top-2 margin exceeds 0.05.
#   memcheck   compute-sanitizer memcheck on test_gpu --quick and one small generate
#   racecheck  racecheck on test_gpu --quick
#   offload    offloading with the GPU computing, across placement policies (GPU, CPU and
#              disk tiers), against the CPU run
# Without a GPU (nvidia-smi sees none) it skips, saying so, unless GPU_REQUIRED=1
# (tests/device.sh); with a GPU, a missing nvcc or a GPU the binary cannot use fails.
# Logs go to $OUT (or a temp dir); models and binaries to build/gpu-tests/.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || echo /usr/bin/python3)}
LOG=${OUT:-$(mktemp -d)}
W=build/gpu-tests
mkdir -p "$LOG" "$W"
PARTS=${*:-build unit models memcheck racecheck offload}
fail=0
note() { echo "gpu.sh: $*" | tee -a "$LOG/gpu.log"; }

if [ "${GPU_REQUIRED:-0}" != 1 ]; then
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then echo "gpu.sh: skipped: no GPU on this machine"; exit 0; fi
fi
if ! command -v nvcc >/dev/null 2>&1; then note "FAIL: a GPU is expected here but nvcc is not on the PATH"; exit 1; fi
CUDA=$(dirname "$(dirname "$(command -v nvcc)")")
SAN=$(command -v compute-sanitizer || echo "$CUDA/bin/compute-sanitizer")

# logged CMD...: runs CMD with its output into the log too; its own exit status (sh has no pipefail)
logged() { "$@" >"$W/logged.out"; st=$?; tee -a "$LOG/gpu.log" <"$W/logged.out"; return $st; }
# score_close A B LABEL: two score outputs have the same shape and agree to 2e-2
score_close() {
    logged "$PY" - "$1" "$2" "$3" <<'PYEOF'
import sys
a = [[float(v) for v in l.split()] for l in open(sys.argv[1])]
b = [[float(v) for v in l.split()] for l in open(sys.argv[2])]
if not a or len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
    print(f"FAIL {sys.argv[3]}: {len(a)} vs {len(b)} lines or their lengths differ"); sys.exit(1)
d = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
print(("ok  " if d <= 2e-2 else "FAIL") + f" {sys.argv[3]}: max |d log-prob| = {d:.3g} (limit 2e-2)")
sys.exit(d > 2e-2)
PYEOF
}
# greedy_same REF GEN LABEL: ids identical while ref_opt's top-2 margin exceeds 0.05
greedy_same() {
    logged "$PY" - "$1" "$2" "$3" <<'PYEOF'
import sys
ref, gen = open(sys.argv[1]).read().splitlines(), open(sys.argv[2]).read().splitlines()
ok, cmp = len(ref) == len(gen) and len(ref) > 0, 0
for i, (r, g) in enumerate(zip(ref, gen)):
    ids, margins = r.split("\t")
    for t, (a, b, mg) in enumerate(zip(ids.split(), g.split(), map(float, margins.split()))):
        if mg <= 0.05: break
        cmp += 1
        if a != b: ok = False; print(f"FAIL greedy {sys.argv[3]} line {i + 1} step {t}: cpu {a} gpu {b} (margin {mg:.3f})"); break
print(("ok  " if ok else "FAIL") + f" greedy {sys.argv[3]}: {len(gen)} lines, {cmp} decisive steps identical")
sys.exit(not ok)
PYEOF
}
# gpu_run ARGS...: ./opt on the GPU; its stderr into the log
# (GPU_SH_DEVICE=cpu rehearses this script without a GPU: every comparison is then CPU to
# CPU, offloading onto the host standing in for a GPU)
gpu_run() { OPT_HOST_DEVICE=1 ./opt "$@" --device "${GPU_SH_DEVICE:-gpu}" 2>>"$LOG/gpu.log"; }
cpu_run() { ./opt "$@" --device cpu 2>>"$LOG/gpu.log"; }

# The test models (made once): pre-LN f16 and bf16, post-LN f16 with projections, W8A8 of pre16.
models() {
    [ -f "$W/ready" ] && return 0
    ./opt synth --shape 256x2x4x1024 --seed 3 -o "$W/pre16" >/dev/null 2>&1 &&
    ./opt synth --shape 256x2x4x1024 --seed 4 --dtype bf16 -o "$W/pre-bf16" >/dev/null 2>&1 &&
    "$PY" tests/mkckpt.py -o "$W/post" --hidden 256 --layers 2 --heads 4 --ffn 1024 --vocab 50272 --max-pos 256 --embed-dim 128 \
          --post-ln --dtype f16 --no-tie --seed 5 >/dev/null 2>&1 &&
    ./opt convert -m "$W/pre16" -o "$W/w8a8.safetensors" --w8a8 --calib tests/tok_corpus.txt --calib-samples 8 --calib-len 32 >/dev/null 2>&1 &&
    ./opt convert -m "$W/pre16" -o "$W/w8a8s.safetensors" --w8a8-static --calib tests/tok_corpus.txt --calib-samples 8 --calib-len 32 >/dev/null 2>&1 &&
    "$PY" - "$W" <<'PYEOF' && touch "$W/ready"
import random, sys
random.seed(11)
w = sys.argv[1]
def line(n): return " ".join(["2"] + [str(random.randint(4, 50000)) for _ in range(n)]) + "\n"
with open(w + "/ids.txt", "w") as f:   # one batch, lengths that are not multiples of anything
    for n in (5, 17, 40, 3, 29, 64, 11): f.write(line(n))
with open(w + "/late.txt", "w") as f:  # -b 4: short prompts decode (graphs captured), then long ones
    for n in (3, 4, 2, 5, 150, 90, 120, 7): f.write(line(n))
PYEOF
}

part_build() {
    arch=""
    cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
    [ -n "$cc" ] && arch="CUDA_ARCH=-gencode arch=compute_$cc,code=sm_$cc" # this card only: the build is faster
    if [ -n "$arch" ]; then make -s -j"$(nproc)" opt CUDA=1 "$arch" >"$LOG/make.log" 2>&1; else make -s -j"$(nproc)" opt CUDA=1 >"$LOG/make.log" 2>&1; fi \
        || { note "FAIL: CUDA build: $(grep -m1 -i 'error' "$LOG/make.log" || tail -n 1 "$LOG/make.log")"; return 1; }
    cc -std=c11 -O2 -fopenmp -ffp-contract=off -D_GNU_SOURCE -DOPT_NO_MAIN -DOPT_CUDA -I. -I"$CUDA/include" tests/test_gpu.c quant.c offload.c lp.c \
       build/cuda/kernels.o -L"$CUDA/lib64" -lcudart_static -ldl -lpthread -lrt -lstdc++ -lm -o "$W/test_gpu" >>"$LOG/make.log" 2>&1 \
       || { note "FAIL: test_gpu build: $(grep -m1 -i 'error' "$LOG/make.log")"; return 1; }
    note "ok: CUDA build and test_gpu"
}

part_unit() {
    "$W/test_gpu" >"$LOG/test_gpu.log" 2>&1 && note "ok: kernel unit tests ($(tail -n 1 "$LOG/test_gpu.log"))" \
        || { note "FAIL: kernel unit tests: $(grep -m1 -e FAIL -e 'no usable' "$LOG/test_gpu.log" || tail -n 1 "$LOG/test_gpu.log")"; return 1; }
}

part_sanitizer() { # part_sanitizer TOOL: test_gpu (and for memcheck one small generate) under it
    st=0
    "$SAN" --tool "$1" --error-exitcode 9 "$W/test_gpu" --quick >"$LOG/test_gpu.$1.log" 2>&1 \
        && note "ok: kernel unit tests under $1" || { note "FAIL: kernel unit tests under $1 (test_gpu.$1.log)"; st=1; }
    if [ "$1" = memcheck ]; then
        models || { note "FAIL: making the test models"; return 1; }
        "$SAN" --tool memcheck --error-exitcode 9 ./opt generate --device gpu -m "$W/pre16" --ids -n 6 --ignore-eos -b 4 <"$W/late.txt" \
            >"$LOG/opt.memcheck.log" 2>&1 && note "ok: opt generate under memcheck" || { note "FAIL: opt generate under memcheck (opt.memcheck.log)"; st=1; }
    fi
    return $st
}

part_models() {
    models || { note "FAIL: making the test models"; return 1; }
    st=0
    for m in pre16 pre-bf16 post; do
        cpu_run score -m "$W/$m" --ids -b 8 <"$W/ids.txt" >"$W/$m.cpu"
        gpu_run score -m "$W/$m" --ids -b 8 <"$W/ids.txt" >"$W/$m.gpu"
        score_close "$W/$m.cpu" "$W/$m.gpu" "score $m, GPU vs CPU" || st=1
        "$PY" tests/ref_opt.py greedy -m "$W/$m" -n 12 --margins <"$W/ids.txt" >"$W/$m.ref" 2>>"$LOG/gpu.log"
        gpu_run generate -m "$W/$m" --ids -n 12 --ignore-eos -b 8 <"$W/ids.txt" >"$W/$m.gen"
        greedy_same "$W/$m.ref" "$W/$m.gen" "$m -b 8" || st=1
    done
    # one batch of different lengths against the numpy reference's left-padded batch
    "$PY" tests/ref_opt.py score -m "$W/post" --batch <"$W/ids.txt" >"$W/post.refbatch" 2>>"$LOG/gpu.log"
    score_close "$W/post.refbatch" "$W/post.gpu" "score post -b 8, GPU vs ref_opt's left-padded batch" || st=1
    # continuous batching: decode graphs for 4 rows are captured on short prompts, then long
    # prompts take the freed slots (a larger step than any before) and those graphs replay
    "$PY" tests/ref_opt.py greedy -m "$W/pre16" -n 12 --margins <"$W/late.txt" >"$W/late.ref" 2>>"$LOG/gpu.log"
    gpu_run generate -m "$W/pre16" --ids -n 12 --ignore-eos -b 4 <"$W/late.txt" >"$W/late.gen"
    greedy_same "$W/late.ref" "$W/late.gen" "continuous batching, long prompts arriving late" || st=1
    gpu_run generate -m "$W/pre16" --ids -n 12 --ignore-eos -b 4 --step-rows 64 <"$W/late.txt" >"$W/late64.gen"
    greedy_same "$W/late.ref" "$W/late64.gen" "continuous batching, --step-rows 64 (prompts in chunks)" || st=1
    # 4-bit weights and cache: the GPU's kernels against the CPU's on the same 4-bit model
    for q in "--compress-weight" "--compress-cache" "--compress-weight --compress-cache"; do
        cpu_run score -m "$W/pre16" --ids -b 8 $q <"$W/ids.txt" >"$W/q4.cpu"
        gpu_run score -m "$W/pre16" --ids -b 8 $q <"$W/ids.txt" >"$W/q4.gpu"
        score_close "$W/q4.cpu" "$W/q4.gpu" "score $q, GPU vs CPU" || st=1
    done
    # W8A8 (int8 GEMMs, dynamic and static activation scales)
    for f in w8a8 w8a8s; do
        cpu_run score -m "$W/$f.safetensors" --ids -b 8 <"$W/ids.txt" >"$W/$f.cpu"
        gpu_run score -m "$W/$f.safetensors" --ids -b 8 <"$W/ids.txt" >"$W/$f.gpu"
        score_close "$W/$f.cpu" "$W/$f.gpu" "score $f, GPU vs CPU" || st=1
        cpu_run generate -m "$W/$f.safetensors" --ids -n 8 --ignore-eos -b 8 <"$W/ids.txt" >"$W/$f.cgen"
        gpu_run generate -m "$W/$f.safetensors" --ids -n 8 --ignore-eos -b 8 <"$W/ids.txt" >"$W/$f.ggen"
        same=$(paste -d '|' "$W/$f.cgen" "$W/$f.ggen" | awk -F'|' '$1 == $2' | wc -l)
        note "info: $f greedy: $same of $(wc -l <"$W/$f.cgen") lines identical to the CPU's (no margins for int8: not asserted)"
    done
    # seeded sampling: valid ids, reproducible; test_gpu asserts the CPU's draws on identical logits
    for s in "--temperature 0.8" "--temperature 0.8 --top-k 40" "--temperature 1.2 --top-p 0.9" "--temperature 0.7 --top-k 50 --top-p 0.8"; do
        gpu_run generate -m "$W/pre16" --ids -n 12 --ignore-eos -b 8 --seed 5 $s <"$W/ids.txt" >"$W/samp.a"; r1=$?
        gpu_run generate -m "$W/pre16" --ids -n 12 --ignore-eos -b 8 --seed 5 $s <"$W/ids.txt" >"$W/samp.b"; r2=$?
        cpu_run generate -m "$W/pre16" --ids -n 12 --ignore-eos -b 8 --seed 5 $s <"$W/ids.txt" >"$W/samp.c"
        same=$(paste -d '|' "$W/samp.a" "$W/samp.c" | awk -F'|' '{ split($1, a, " "); split($2, b, " "); if (a[1] == b[1]) n++ } END { print n + 0 }')
        if [ $r1 = 0 ] && [ $r2 = 0 ] && [ "$(wc -l <"$W/samp.a")" = 7 ] && cmp -s "$W/samp.a" "$W/samp.b" \
           && awk '{ for (i = 1; i <= NF; i++) if ($i !~ /^[0-9]+$/ || $i >= 50272) exit 1 }' "$W/samp.a"; then
            note "ok: sampling $s: 7 lines of valid ids, the same twice; first token as the CPU's on $same of 7 lines"
        else note "FAIL: sampling $s (exit $r1/$r2, or lines/ids invalid, or two runs differ)"; st=1; fi
    done
    return $st
}

part_offload() {
    models || { note "FAIL: making the test models"; return 1; }
    [ -f "$W/pre16.cpu" ] || cpu_run score -m "$W/pre16" --ids -b 8 <"$W/ids.txt" >"$W/pre16.cpu"
    # every policy scores bitwise alike (the same kernels on the same batches; only where the
    # bytes sit changes) and within 2e-2 of the CPU; --cpu-attention (attention in f32 on the
    # CPU for its areas) within 2e-2 too; a --gpu-mem too small is refused
    st=0 ref=""
    OFF="--offload-dir $W --gpu-batch-size 4 --num-gpu-batches 2"
    for pol in "100 0 100 0 100 0" "30 40 20 50 10 60" "0 0 0 0 0 0" "20 80 0 100 0 100" "0 100 0 100 0 100"; do
        for ca in "" "--cpu-attention"; do
            out="$W/off.$(echo "$pol$ca" | tr -c 'a-z0-9' _)"
            gpu_run score -m "$W/pre16" --ids --percent $pol $OFF $ca <"$W/ids.txt" >"$out" \
                || { note "FAIL: offloading --percent $pol $ca exited non-zero"; st=1; continue; }
            [ -z "$ca" ] && [ -z "$ref" ] && ref=$out
            if [ -z "$ca" ]; then cmp -s "$ref" "$out" && note "ok: offloading --percent $pol scores bitwise as --percent 100 0 100 0 100 0" \
                || { note "FAIL: offloading --percent $pol differs from --percent 100 0 100 0 100 0"; st=1; }; fi
            score_close "$W/pre16.cpu" "$out" "offloading --percent $pol $ca, GPU vs CPU" || st=1
        done
    done
    gpu_run generate -m "$W/pre16" --ids -n 8 --ignore-eos --percent 30 40 20 50 10 60 $OFF <"$W/ids.txt" >"$W/off.gen" &&
    cpu_run generate -m "$W/pre16" --ids -n 8 --ignore-eos -b 8 <"$W/ids.txt" >"$W/cpu.gen8" &&
    "$PY" tests/ref_opt.py greedy -m "$W/pre16" -n 8 --margins <"$W/ids.txt" >"$W/pre16.ref8" 2>>"$LOG/gpu.log" &&
    greedy_same "$W/pre16.ref8" "$W/off.gen" "offloading --percent 30 40 20 50 10 60 generate" || st=1
    "$SAN" --tool memcheck --error-exitcode 9 ./opt score --device gpu -m "$W/pre16" --ids --percent 30 40 20 50 10 60 $OFF --cpu-attention \
        <"$W/ids.txt" >"$LOG/off.memcheck.log" 2>&1 && note "ok: offloading under memcheck" || { note "FAIL: offloading under memcheck"; st=1; }
    for q in "--compress-weight --compress-cache"; do
        gpu_run score -m "$W/pre16" --ids --percent 30 40 20 50 10 60 $OFF $q <"$W/ids.txt" >"$W/off.q4" &&
        cpu_run score -m "$W/pre16" --ids -b 8 $q <"$W/ids.txt" >"$W/q4.cpu2" &&
        score_close "$W/q4.cpu2" "$W/off.q4" "offloading with 4-bit weights and cache, GPU vs CPU" || st=1
    done
    OPT_HOST_DEVICE=1 ./opt score --device "${GPU_SH_DEVICE:-gpu}" -m "$W/pre16" --ids --percent 100 0 100 0 100 0 $OFF --gpu-mem 1M <"$W/ids.txt" >/dev/null 2>"$W/refuse.err"
    [ $? -ne 0 ] && grep -q "does not fit" "$W/refuse.err" && note "ok: --gpu-mem 1M refused before allocating" \
        || { note "FAIL: --gpu-mem 1M not refused"; st=1; }
    return $st
}

command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >>"$LOG/gpu.log" 2>&1
for p in $PARTS; do
    case $p in
        build) part_build || { fail=1; break; } ;; # nothing else can run
        unit) part_unit || fail=1 ;;
        models) part_models || fail=1 ;;
        memcheck|racecheck) part_sanitizer $p || fail=1 ;;
        offload) part_offload || fail=1 ;;
        *) note "FAIL: unknown part '$p' (build unit models memcheck racecheck offload)"; exit 2 ;;
    esac
done
[ $fail = 0 ] && note "all GPU tests passed ($PARTS)" || note "GPU tests FAILED ($PARTS)"
exit $fail
