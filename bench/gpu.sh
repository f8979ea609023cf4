#!/bin/sh
# GPU benchmark (issue 3), for a machine with an NVIDIA GPU. Measures the
# card's ceilings first (opt probe: device-to-device copy bandwidth, cuBLAS
# fp16 GEMM rates), then `opt bench` on synthetic OPT-1.3b and OPT-6.7b:
#   decode at batch 1 against the HBM bound (weight bytes per token over the
#   measured copy bandwidth); decode at batch 64 and a 512-token prefill with
#   OPT_GPU_PROFILE=1 for the GEMM / other-kernel split and the time per kind of op
#   (attention, LayerNorm, logits and sampling, ...); PyTorch fp16 eager
#   (transformers) on the same checkpoints for the ratio.
# Writes $OUT/gpu-bench.md (or bench/gpu-bench.md) and the raw JSON beside it.
# BENCH_SHAPES picks the models (default "opt-1.3b opt-6.7b"); Python is $PYTHON or python3.
set -eu
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then echo "bench/gpu.sh: skipped: no GPU"; exit 0; fi
OUTD=${OUT:-bench}
mkdir -p "$OUTD" bench/models
PY=${PYTHON:-python3}
make -s opt CUDA=1
CARD=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)
./opt probe -o "$OUTD/probe.json" --offload-dir "${TMPDIR:-/tmp}" --disk-bytes 256M 2>"$OUTD/probe.log"
MEMBW=$($PY -c "import json;print(json.load(open('$OUTD/probe.json'))['gpu_mem_bw'])")
R=$OUTD/gpu-bench.json
: >"$R"
for shape in ${BENCH_SHAPES:-opt-1.3b opt-6.7b}; do
    M=bench/models/$shape-f16
    [ -f "$M/config.json" ] || ./opt synth --shape $shape --seed 1 -o "$M" >/dev/null
    for case in "1 128 64" "64 128 32" "1 512 1"; do
        set -- $case
        ./opt bench --device gpu -m "$M" -b $1 --prompt-len $2 --gen-len $3 --json | sed "s/^{/{\"engine\": \"opt\", \"shape\": \"$shape\", /" >>"$R"
        OPT_GPU_PROFILE=1 ./opt bench --device gpu -m "$M" -b $1 --prompt-len $2 --gen-len $3 --json 2>"$OUTD/profile-$shape-b$1-p$2-g$3.log" \
            | sed "s/^{/{\"engine\": \"opt-profiled\", \"shape\": \"$shape\", /" >>"$R"
        $PY bench/torch_gpu.py -m "$M" -b $1 --prompt-len $2 --gen-len $3 | sed "s/^{/{\"shape\": \"$shape\", /" >>"$R" || echo "torch failed for $shape $case" >&2
    done
done
$PY - "$R" "$OUTD/probe.json" "$CARD" >"$OUTD/gpu-bench.md" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
probe = json.load(open(sys.argv[2]))
card = sys.argv[3]
wbytes = {"opt-1.3b": 2 * 1.316e9, "opt-6.7b": 2 * 6.658e9}
print(f"## GPU ({card})\n")
print(f"Ceilings (opt probe): device copy {probe['gpu_mem_bw']/1e9:.0f} GB/s (read + write), "
      f"h2d {probe['h2d_bw']/1e9:.1f} GB/s, fp16 GEMM {probe['gpu_gemm_flops_g']/1e12:.0f} TFLOP/s at M=64, "
      f"{probe['gpu_gemm_flops_p']/1e12:.0f} at M=4096.\n")
def gemm_bound_ms(r):
    """The GEMMs' floor for the run at the probe's rates: the prefill at cuBLAS's M=4096 rate,
    each decode step at the slower of reading the weights once and cuBLAS's M=64 rate."""
    if r["shape"] not in wbytes: return None
    w = wbytes[r["shape"]]; params = w / 2; B, P, G = r["batch"], r["prompt_len"], r["gen_len"]
    step = max(w / (probe["gpu_mem_bw"] / 2), 2 * params * B / probe["gpu_gemm_flops_g"])
    return 1e3 * (2 * params * B * P / probe["gpu_gemm_flops_p"] + (G - 1) * step)
print("| shape | B x P + G | engine | prefill tok/s | decode tok/s | total tok/s | GEMM ms | GEMM bound ms | other ms | other % |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    other = r.get("gpu_other_ms"); gemm = r.get("gpu_gemm_ms"); bound = gemm_bound_ms(r) if gemm else None
    frac = f"{100*other/(other+gemm):.0f}" if other is not None and gemm else ""
    print(f"| {r['shape']} | {r['batch']} x {r['prompt_len']} + {r['gen_len']} | {r['engine']} | {r['prefill_throughput']:.1f} | "
          f"{r['decode_throughput']:.2f} | {r['total_throughput']:.2f} | {gemm or ''} | {f'{bound:.1f}' if bound else ''} | {other or ''} | {frac} |")
print()
for shape in wbytes:
    o = [r for r in rows if r["shape"] == shape and r["engine"] == "opt" and r["batch"] == 1 and r["gen_len"] > 1]
    t = [r for r in rows if r["shape"] == shape and r["engine"].startswith("pytorch") and r["batch"] == 1 and r["gen_len"] > 1]
    if o:
        bound = probe["gpu_mem_bw"] / 2 / wbytes[shape]  # the copy moves each byte twice
        print(f"- {shape} batch-1 decode: {o[0]['decode_throughput']:.1f} tok/s = {100*o[0]['decode_throughput']/bound:.0f}% of the HBM bound "
              f"({bound:.1f} tok/s at {probe['gpu_mem_bw']/2e9:.0f} GB/s of reads)"
              + (f"; {o[0]['decode_throughput']/t[0]['decode_throughput']:.2f}x PyTorch fp16 eager" if t else ""))
PYEOF
{ echo; echo "GPU time by kind of op (OPT_GPU_PROFILE=1, each op timed alone; ms / calls):"; echo
  for f in "$OUTD"/profile-*.log; do echo "- $(basename "$f" .log | sed 's/^profile-//'): $(grep -h 'GPU time by op' "$f" | sed 's/^opt: GPU time by op: //')"; done
} >>"$OUTD/gpu-bench.md"
cat "$OUTD/gpu-bench.md"
