#!/bin/sh
# GPU benchmark (issue 3), for a machine with an NVIDIA GPU. Measures the
# card's ceilings first (opt probe: device-to-device copy bandwidth, cuBLAS
# fp16 GEMM rates), then `opt bench` on synthetic OPT-1.3b and OPT-6.7b:
#   decode at batch 1 against the HBM bound (weight bytes per token over the
#   measured copy bandwidth); decode at batch 64 and a 512-token prefill with
#   OPT_GPU_PROFILE=1 for the GEMM / other-kernel split and the time per kind of op
#   (attention, LayerNorm, logits and sampling, ...); the GEMM time against the
#   HBM / probe bound and against cuBLAS on the run's own GEMM shapes (torch's
#   F.linear); PyTorch fp16 eager (transformers) on the same checkpoints.
# The per-op line of a profiled run also counts opt bench's warm-up pass (one
# prompt of 8 tokens); its GEMM / other columns do not.
# GPU_REQUIRED=1 (tests/device.sh): no skipping; without a usable GPU it fails
# at the probe, on one line.
# Writes $OUT/gpu-bench.md (or bench/gpu-bench.md) and the raw JSON beside it.
# BENCH_SHAPES picks the models (default "opt-1.3b opt-6.7b"); Python is $PYTHON or python3.
set -eu
cd "$(dirname "$0")/.."
if [ "${GPU_REQUIRED:-0}" != 1 ]; then  # tests/device.sh requires one: it fails at the probe instead
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then echo "bench/gpu.sh: skipped: no GPU"; exit 0; fi
fi
OUTD=${OUT:-bench}
mkdir -p "$OUTD" bench/models
PY=${PYTHON:-python3}
make -s opt CUDA=1
CARD=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
./opt probe -o "$OUTD/probe.json" --offload-dir "${TMPDIR:-/tmp}" --disk-bytes 256M 2>"$OUTD/probe.log" \
    || { echo "bench/gpu.sh: FAIL: opt probe: $(tail -n 1 "$OUTD/probe.log")"; exit 1; }
grep -q '"gpu_mem_bw"' "$OUTD/probe.json" \
    || { echo "bench/gpu.sh: FAIL: opt probe measured no GPU: $(grep -m 1 'no GPU' "$OUTD/probe.log" || tail -n 1 "$OUTD/probe.log")"; exit 1; }
R=$OUTD/gpu-bench.json
# cublas_gemms DIR "B P G"...: cuBLAS (torch's fp16 F.linear, bias epilogue) on
# each run's own GEMM shapes: the prefill's B*P rows through every layer, then
# G-1 decode steps of B rows, the lm_head on B rows each time
# as opt computes them; weights cycled through copies well past the L2 cache,
# so decode reads them from HBM as opt does. A JSON line per run: its GEMM ms.
cublas_gemms() {
    $PY - "$@" <<'PYEOF'
import functools, json, sys, torch
d = sys.argv[1]
c = json.load(open(f"{d}/config.json"))
h, f, L, V = c["hidden_size"], c["ffn_dim"], c["num_hidden_layers"], c["vocab_size"]
e = c.get("word_embed_proj_dim", h)
layer = [(h, h)] * 4 + [(f, h), (h, f)]                       # q, k, v, out; fc1; fc2 as (N, K)
head = [(V, e)]                                             # lm_head (OPT-350m's projections left out)
@functools.lru_cache(maxsize=None)
def ms(N, K, M):
    n = max(2, (256 << 20) // (2 * N * K) + 1)              # copies past any L2
    w = [torch.randn(N, K, device="cuda", dtype=torch.float16) for _ in range(n)]
    b = torch.randn(N, device="cuda", dtype=torch.float16)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        for i in range(3): torch.nn.functional.linear(x, w[i % n], b)
        s, t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        reps = 4 * n
        s.record()
        for i in range(reps): torch.nn.functional.linear(x, w[i % n], b)
        t.record(); torch.cuda.synchronize()
    return s.elapsed_time(t) / reps
def fwd(M, Mh): return L * sum(ms(N, K, M) for N, K in layer) + sum(ms(N, K, Mh) for N, K in head)
for case in sys.argv[2:]:
    B, P, G = map(int, case.split())
    pre = fwd(B * P, B)
    dec = fwd(B, B) if G > 1 else 0.0
    print(json.dumps({"engine": "cublas-same-gemms", "model": d, "prompt_len": P, "gen_len": G, "batch": B,
                      "gpu_gemm_ms": round(pre + (G - 1) * dec, 3), "prefill_gemm_ms": round(pre, 3), "decode_step_gemm_ms": round(dec, 3)}))
PYEOF
}
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
    cublas_gemms "$M" "1 128 64" "64 128 32" "1 512 1" | sed "s/^{/{\"shape\": \"$shape\", /" >>"$R" || echo "cuBLAS timing failed for $shape" >&2
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
def num(r, k, f):
    return format(r[k], f) if r.get(k) is not None else ""
print("GEMM ms: opt-profiled's GEMMs (each timed alone), or cublas-same-gemms' cuBLAS time for the run's own GEMM shapes; "
      "GEMM bound: the probe's HBM and 8192-square cuBLAS rates.\n")
print("| shape | B x P + G | engine | prefill tok/s | decode tok/s | total tok/s | GEMM ms | GEMM bound ms | other ms | other % |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    other = r.get("gpu_other_ms"); gemm = r.get("gpu_gemm_ms"); bound = gemm_bound_ms(r) if gemm else None
    frac = f"{100*other/(other+gemm):.0f}" if other is not None and gemm else ""
    print(f"| {r['shape']} | {r['batch']} x {r['prompt_len']} + {r['gen_len']} | {r['engine']} | {num(r, 'prefill_throughput', '.1f')} | "
          f"{num(r, 'decode_throughput', '.2f')} | {num(r, 'total_throughput', '.2f')} | {gemm or ''} | {f'{bound:.1f}' if bound else ''} | {other or ''} | {frac} |")
print()
for r in rows:  # opt's GEMMs against cuBLAS on the same shapes, per run
    if r["engine"] != "opt-profiled" or not r.get("gpu_gemm_ms"): continue
    cb = [c for c in rows if c["engine"] == "cublas-same-gemms" and all(c[k] == r[k] for k in ("shape", "batch", "prompt_len", "gen_len"))]
    if cb:
        print(f"- {r['shape']} {r['batch']} x {r['prompt_len']} + {r['gen_len']}: opt's GEMMs {r['gpu_gemm_ms']:.1f} ms = "
              f"{r['gpu_gemm_ms']/cb[0]['gpu_gemm_ms']:.2f}x cuBLAS on the same shapes ({cb[0]['gpu_gemm_ms']:.1f} ms: "
              f"prefill {cb[0]['prefill_gemm_ms']:.1f}, {cb[0]['decode_step_gemm_ms']:.2f} per decode step)")
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
