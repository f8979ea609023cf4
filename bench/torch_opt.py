#!/usr/bin/python3
"""bench/torch_opt.py: a plain, reasonably optimized PyTorch fp32 OPT, the baseline for `opt bench`.

    /usr/bin/python3 bench/torch_opt.py -m DIR --prompt-len P --gen-len G -b B [-t T] [--reps N] [--hf]

Loads the same Hugging Face checkpoint directory `opt` reads (safetensors, one file or a shard
index; F16/BF16/F32) with a small reader of its own, converts every tensor to fp32, and runs
greedy generation: one prefill step over the B prompts of P tokens (same synthetic ids as
`opt bench`) and G-1 decode steps with a preallocated KV cache. Eager mode, inference_mode,
torch.set_num_threads(T); fused QKV projection with the HF query scaling folded into it;
single-row linears through BLAS gemv; OMP_WAIT_POLICY=passive and GOMP_SPINCOUNT=1000 (as opt
sets for itself) unless the environment says otherwise.

Prints one JSON line per repetition (after an untimed warm-up) with `opt bench --json`'s keys,
FlexGen's definitions: prefill latency = the prompt step including the first token's logits
and sampling; decode latency = the other G-1 steps; prefill throughput = B*P / prefill latency;
decode throughput = B*(G-1) / decode latency; total throughput = B*G / (prefill + decode).
peak_rss_gib is the process's resident high-water mark (VmHWM), reset before each repetition.

With --hf, times transformers' OPTForCausalLM.generate (greedy, KV cache, fp32) instead, loaded
with from_pretrained from the same directory; prefill/decode are split with a streamer's
per-token timestamps.
"""
import argparse
import json
import os
import struct
import sys
import time


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("-b", "--batch", type=int, default=1)
    ap.add_argument("-t", "--threads", type=int, default=0, help="0 = all cores (os.cpu_count)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--hf", action="store_true", help="time transformers' OPTForCausalLM.generate")
    return ap.parse_args()


ARGS = parse_args()
THREADS = ARGS.threads or os.cpu_count()
# OpenBLAS (Debian's torch calls it for fp32 GEMMs) keeps its own thread pool, sized before import.
os.environ.setdefault("OPENBLAS_NUM_THREADS", str(THREADS))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
# Sleeping, not spinning, OpenMP workers, as `opt` sets for itself: torch's spinning OpenMP pool
# and OpenBLAS's threads fight over two hyperthreads otherwise (prefill 4x and decode 1.3x
# slower on the 2-vCPU machine of bench/RESULTS.md).
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # opt's brief spin before sleeping (no effect on torch here)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(THREADS)


# ---------------------------------------------------------------------------- checkpoint

def st_files(d):
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            return sorted(set(os.path.join(d, v) for v in json.load(f)["weight_map"].values()))
    one = os.path.join(d, "model.safetensors")
    if os.path.exists(one):
        return [one]
    sys.exit(f"torch_opt.py: {d}: no model.safetensors or model.safetensors.index.json")


def st_read(path, out):
    """Every tensor of one safetensors file into out[name] as fp32 torch tensors."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        hdr = json.loads(f.read(n))
        base = 8 + n
        for name, t in hdr.items():
            if name == "__metadata__":
                continue
            a, b = t["data_offsets"]
            count = 1
            for s in t["shape"]:
                count *= s
            dt = t["dtype"]
            f.seek(base + a)
            if dt not in ("F32", "F16", "BF16"):
                sys.exit(f"torch_opt.py: {path}: tensor {name} has dtype {dt}, expected F32, F16 or BF16")
            arr = np.fromfile(f, dtype={"F32": "<f4", "F16": "<f2", "BF16": "<i2"}[dt], count=count)
            if arr.size != count or b - a != count * arr.itemsize:
                sys.exit(f"torch_opt.py: {path}: tensor {name} is truncated")
            x = torch.from_numpy(arr)
            if dt == "BF16":
                x = x.view(torch.bfloat16)
            out[name] = x.float().reshape(t["shape"])  # torch converts far faster than numpy's astype


def load(d):
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    raw = {}
    for p in st_files(d):
        st_read(p, raw)
    w = {}
    for k, v in raw.items():  # model.decoder.X / decoder.X / X -> X; lm_head.weight stays
        for pre in ("model.decoder.", "decoder."):
            if k.startswith(pre):
                k = k[len(pre):]
                break
        w[k] = v
    return cfg, w


# ---------------------------------------------------------------------------- model

def linear(x, w, b=None):
    """F.linear, except that a single row goes to BLAS gemv (torch.mv/addmv): OpenBLAS's sgemm
    with M = 1 packs the whole weight and streams it at a third of gemv's speed."""
    if x.shape[0] == 1:
        return (torch.mv(w, x[0]) if b is None else torch.addmv(b, w, x[0])).unsqueeze(0)
    return F.linear(x, w, b)


class OPT:
    def __init__(self, cfg, w):
        self.h = cfg["hidden_size"]
        self.nh = cfg["num_attention_heads"]
        self.hd = self.h // self.nh
        self.L = cfg["num_hidden_layers"]
        self.vocab = cfg["vocab_size"]
        self.max_pos = cfg["max_position_embeddings"]
        self.pre_ln = cfg.get("do_layer_norm_before", True)
        self.final_ln = self.pre_ln and not cfg.get("_remove_final_layer_norm", False)
        self.affine = cfg.get("layer_norm_elementwise_affine", True)
        self.bias = cfg.get("enable_bias", True)
        self.embed = w["embed_tokens.weight"]
        self.pos = w["embed_positions.weight"]
        self.proj_in = w.get("project_in.weight")
        self.proj_out = w.get("project_out.weight")
        self.lm_head = w.get("lm_head.weight", self.embed)
        self.lnf = (w.get("final_layer_norm.weight"), w.get("final_layer_norm.bias")) if self.final_ln else None
        scale = self.hd ** -0.5
        self.layers = []
        for i in range(self.L):
            p = f"layers.{i}."
            g = lambda n: w.get(p + n)  # noqa: E731
            # HF: q = q_proj(x) * scaling; fold the scaling into q_proj's weight and bias.
            qkv_w = torch.cat([g("self_attn.q_proj.weight") * scale, g("self_attn.k_proj.weight"), g("self_attn.v_proj.weight")]).contiguous()
            qkv_b = torch.cat([g("self_attn.q_proj.bias") * scale, g("self_attn.k_proj.bias"), g("self_attn.v_proj.bias")]) if self.bias else None
            self.layers.append(dict(
                qkv_w=qkv_w, qkv_b=qkv_b,
                o_w=g("self_attn.out_proj.weight"), o_b=g("self_attn.out_proj.bias"),
                fc1_w=g("fc1.weight"), fc1_b=g("fc1.bias"), fc2_w=g("fc2.weight"), fc2_b=g("fc2.bias"),
                ln1=(g("self_attn_layer_norm.weight"), g("self_attn_layer_norm.bias")),
                ln2=(g("final_layer_norm.weight"), g("final_layer_norm.bias")),
            ))

    def ln(self, x, wb):
        return F.layer_norm(x, (self.h,), wb[0], wb[1], 1e-5)

    def new_cache(self, B, T):
        shape = (self.L, B, self.nh, T, self.hd)
        return torch.empty(shape), torch.empty(shape)

    def forward(self, ids, start, kc, vc):
        """ids (B, S) at positions start..start+S-1; fills the caches; returns the last position's hidden (B, embed_dim)."""
        B, S = ids.shape
        H, nh, hd = self.h, self.nh, self.hd
        x = F.embedding(ids, self.embed)
        if self.proj_in is not None:
            x = F.linear(x, self.proj_in)
        x = (x + self.pos[start + 2:start + 2 + S]).reshape(B * S, H)  # learned positions, offset 2
        T = start + S
        mask = None
        if S > 1:  # causal within the new tokens; everything cached before is visible
            mask = torch.full((S, T), float("-inf")).triu_(start + 1)
        for i, Lw in enumerate(self.layers):
            h = self.ln(x, Lw["ln1"]) if self.pre_ln else x
            qkv = linear(h, Lw["qkv_w"], Lw["qkv_b"]).view(B, S, 3, nh, hd)
            q = qkv[:, :, 0].transpose(1, 2)                      # (B, nh, S, hd)
            kc[i, :, :, start:T] = qkv[:, :, 1].transpose(1, 2)
            vc[i, :, :, start:T] = qkv[:, :, 2].transpose(1, 2)
            k, v = kc[i, :, :, :T], vc[i, :, :, :T]               # (B, nh, T, hd)
            s = torch.matmul(q, k.transpose(2, 3))                # (B, nh, S, T)
            if mask is not None:
                s += mask
            a = torch.matmul(torch.softmax(s, dim=-1), v)         # (B, nh, S, hd)
            a = a.transpose(1, 2).reshape(B * S, H)
            x = x + linear(a, Lw["o_w"], Lw["o_b"])
            if not self.pre_ln:
                x = self.ln(x, Lw["ln1"])
            h = self.ln(x, Lw["ln2"]) if self.pre_ln else x
            f = torch.relu_(linear(h, Lw["fc1_w"], Lw["fc1_b"]))
            x = x + linear(f, Lw["fc2_w"], Lw["fc2_b"])
            if not self.pre_ln:
                x = self.ln(x, Lw["ln2"])
        x = x.view(B, S, H)[:, -1]
        if self.lnf is not None:
            x = F.layer_norm(x, (H,), self.lnf[0], self.lnf[1], 1e-5)
        if self.proj_out is not None:
            x = linear(x, self.proj_out)
        return x

    def generate(self, ids, G):
        """Greedy; returns (new ids (B, G), prefill seconds, decode seconds)."""
        B, P = ids.shape
        kc, vc = self.new_cache(B, P + G)
        out = torch.empty(B, G, dtype=torch.long)
        t0 = time.perf_counter()
        hid = self.forward(ids, 0, kc, vc)
        out[:, 0] = linear(hid, self.lm_head).argmax(-1)
        t1 = time.perf_counter()
        for g in range(1, G):
            hid = self.forward(out[:, g - 1:g], P + g - 1, kc, vc)
            out[:, g] = linear(hid, self.lm_head).argmax(-1)
        t2 = time.perf_counter()
        return out, t1 - t0, t2 - t1


# ---------------------------------------------------------------------------- harness

def prompts(B, P):
    """The ids `opt bench` uses: BOS, then 4 + splitmix64(seed 42) % 50000, one stream over all prompts."""
    M = (1 << 64) - 1
    s = 42
    ids = []
    for _ in range(B):
        row = [2]
        for _ in range(P - 1):
            s = (s + 0x9E3779B97F4A7C15) & M
            z = s
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
            row.append(4 + (z ^ (z >> 31)) % 50000)
        ids.append(row)
    return torch.tensor(ids, dtype=torch.long)


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def peak_rss_gib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / (1 << 20)
    return -1.0


def hf_runner(d):
    import transformers
    from transformers import OPTForCausalLM
    from transformers.generation.streamers import BaseStreamer
    transformers.logging.set_verbosity_error()
    model = OPTForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()

    class Stamps(BaseStreamer):
        def __init__(self):
            self.t = []

        def put(self, value):
            self.t.append(time.perf_counter())

        def end(self):
            pass

    def run(ids, G):
        st = Stamps()
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=G, min_new_tokens=G,
                             do_sample=False, num_beams=1, use_cache=True, pad_token_id=1, streamer=st)
        t2 = time.perf_counter()
        # put() is called with the prompt, then once per new token
        if len(st.t) != G + 1:
            sys.exit(f"torch_opt.py --hf: expected {G + 1} streamer calls, got {len(st.t)}")
        return out[:, ids.shape[1]:], st.t[1] - t0, t2 - st.t[1]

    return run, f"transformers {transformers.__version__}"


def main():
    a = ARGS
    B, P, G = a.batch, a.prompt_len, a.gen_len
    if P < 1 or G < 1 or B < 1:
        sys.exit("torch_opt.py: --prompt-len, --gen-len and -b must be positive")
    t = time.perf_counter()
    with torch.inference_mode():
        if a.hf:
            run, engine = hf_runner(a.model)
        else:
            cfg, w = load(a.model)
            if P + G > cfg["max_position_embeddings"]:
                sys.exit(f"torch_opt.py: --prompt-len {P} + --gen-len {G} exceed {cfg['max_position_embeddings']} positions")
            m = OPT(cfg, w)
            del w
            run, engine = m.generate, "torch-fp32"
        load_s = time.perf_counter() - t
        run(prompts(1, 8), 2)  # warm-up, as `opt bench` does
        ids = prompts(B, P)
        for r in range(a.reps):
            reset_peak_rss()
            _, pre, dec = run(ids, G)
            rec = {
                "engine": engine, "model": a.model, "prompt_len": P, "gen_len": G, "batch": B, "threads": THREADS,
                "torch": torch.__version__, "rep": r, "load_s": round(load_s, 3),
                "prefill_latency_s": pre, "prefill_throughput": B * P / pre,
                "decode_latency_s": dec, "decode_throughput": B * (G - 1) / dec if G > 1 else 0.0,
                "total_throughput": B * G / (pre + dec), "peak_rss_gib": peak_rss_gib(),
            }
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
