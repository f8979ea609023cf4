#!/usr/bin/python3
"""PyTorch fp16 eager baseline on the GPU for bench/gpu.sh: Hugging Face
transformers' OPTForCausalLM on the same checkpoint, a prefill of B prompts of
P random tokens and G-1 cached decode steps (greedy), timed with CUDA syncs.
Prints one JSON object with opt bench's field names.

usage: torch_gpu.py -m DIR --prompt-len P --gen-len G -b B [--reps N]"""
import argparse, json, os, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the device machine has no network; the checkpoint is local
import torch
from transformers import OPTForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument('-m', required=True)
ap.add_argument('--prompt-len', type=int, default=512)
ap.add_argument('--gen-len', type=int, default=32)
ap.add_argument('-b', type=int, default=1)
ap.add_argument('--reps', type=int, default=3)
a = ap.parse_args()
model = OPTForCausalLM.from_pretrained(a.m, torch_dtype=torch.float16).cuda().eval()
g = torch.Generator().manual_seed(42)
ids = torch.randint(4, 50000, (a.b, a.prompt_len), generator=g)
ids[:, 0] = 2
ids = ids.cuda()

def run():
    with torch.inference_mode():
        torch.cuda.synchronize(); t0 = time.time()
        out = model(input_ids=ids, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        past = out.past_key_values
        torch.cuda.synchronize(); t1 = time.time()
        for _ in range(a.gen_len - 1):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize(); t2 = time.time()
    return t1 - t0, t2 - t1

run()  # warm-up
best = min((run() for _ in range(a.reps)), key=lambda t: t[0] + t[1])
pre, dec = best
B, P, G = a.b, a.prompt_len, a.gen_len
print(json.dumps({"engine": "pytorch-fp16-eager", "model": a.m, "prompt_len": P, "gen_len": G, "batch": B,
                  "prefill_latency_s": pre, "prefill_throughput": B * P / pre,
                  "decode_latency_s": dec, "decode_throughput": B * (G - 1) / dec if G > 1 else 0,
                  "total_throughput": B * G / (pre + dec),
                  "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30}))
