#!/usr/bin/python3
"""Cross-check tests/ref_opt.py (and tests/mkckpt.py) against Hugging Face transformers.

  /usr/bin/python3 tests/check_ref_vs_hf.py [--keep DIR] [--tol 1e-5]

Prints "skip: transformers not installed" and exits 0 when transformers (or torch) is not
importable; otherwise exits 1 on any disagreement.  Needs no network: every model is
built locally from random weights (tiny sizes, a few seconds on a CPU).

Two directions are checked:
  1. mkckpt.py writes checkpoints (pre-LN and post-LN opt-350m-like models with
     word_embed_proj_dim != hidden_size, tied and untied heads, no-bias / no-LN-affine /
     _remove_final_layer_norm variants, f32/f16/bf16, safetensors and .bin, single and
     sharded, "model.decoder." and "decoder." prefixes, and a `mkckpt.py convert` copy);
     transformers loads each with OPTForCausalLM.from_pretrained (which must report no
     missing or unexpected tensors) and ref_opt.py reads the same directory.
  2. transformers builds a random OPTForCausalLM and writes it with save_pretrained (sharded
     safetensors, and .bin); ref_opt.py reads what HF wrote.
For each model the natural-log probabilities of random id sequences are compared: HF one
sequence at a time, HF as one left-padded batch with attention_mask, ref_opt one at a time
and ref_opt --batch (all must agree within --tol); greedy decoding (ref with and without
KV cache, one at a time and batched) is compared with HF's incremental decoding with
past_key_values, ignoring steps after a near tie (top-1 minus top-2 margin < 1e-3).  The
command-line interface of ref_opt.py is exercised once through a subprocess.
"""

import argparse
import copy
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

try:
    import torch
    import transformers
    from transformers import OPTConfig, OPTForCausalLM
except Exception:  # ImportError, or a broken install
    print("skip: transformers not installed")
    sys.exit(0)

import ref_opt

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
torch.set_grad_enabled(False)

FAILS = []
MAXDIFF = {"HF batch": 0.0, "ref single": 0.0, "ref batch": 0.0, "margin": 0.0,
           "ref vs HF64": 0.0, "HF vs HF64": 0.0}


def fail(msg):
    print("FAIL: " + msg)
    FAILS.append(msg)


def random_seqs(rng, vocab, max_pos, n=6, max_len=20):
    seqs = [list(map(int, rng.integers(0, vocab, size=int(rng.integers(2, max_len + 1)))))
            for _ in range(n)]
    # the longest scorable sequence: its first max_pos tokens use every position
    seqs.append(list(map(int, rng.integers(0, vocab, size=max_pos + 1))))
    seqs.append([2, 1, 1, 5])   # pad id used as a real token (ids are taken as given)
    seqs.append([7, 3])
    return seqs


def _lp(logits, targets):
    """log-softmax computed in float64 from the model's logits (as ref_opt does), so that
    the comparison measures the model, not the rounding of a float32 log-sum-exp over the
    vocabulary (which alone is ~1e-5 for vocab 50272)."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    return lp[torch.arange(len(targets)), torch.tensor(targets)].numpy()


def hf_logprobs(model, seqs):
    """HF one-at-a-time and as one left-padded batch -> (list, list) of arrays.  The model
    sees s[:-1] (the last token is only a target), so a sequence of max_pos + 1 fits."""
    single = [_lp(model(input_ids=torch.tensor([s[:-1]])).logits[0], s[1:]) for s in seqs]
    T = max(len(s) - 1 for s in seqs)
    ids = torch.full((len(seqs), T), 1, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s) + 1:] = torch.tensor(s[:-1])
        mask[b, T - len(s) + 1:] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits
    batch = [_lp(logits[b, T - len(s) + 1:], s[1:]) for b, s in enumerate(seqs)]
    return single, batch


def hf64_logprobs(model, seqs):
    """The same model evaluated in float64 (a float32-free opinion of the exact value)."""
    m64 = copy.deepcopy(model).double()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # HF 4.36 builds its causal mask in the default dtype
    try:
        return [_lp(m64(input_ids=torch.tensor([s[:-1]])).logits[0], s[1:]) for s in seqs]
    finally:
        torch.set_default_dtype(old)


def hf_greedy(model, prompt, n):
    """Incremental greedy decoding with HF's KV cache; -> (ids, margins)."""
    ids = torch.tensor([prompt])
    out = model(input_ids=ids, use_cache=True)
    past, gen, margins = out.past_key_values, [], []
    for step in range(n):
        lg = out.logits[0, -1].float()
        top = torch.topk(lg, 2).values
        nxt = int(torch.argmax(lg))
        gen.append(nxt)
        margins.append(float(top[0] - top[1]))
        if step + 1 < n:
            out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
    return gen, margins


def compare_greedy(name, ref_res, hf_res, what):
    g1, m1 = ref_res
    g2, m2 = hf_res
    for i in range(len(g2)):
        if abs(m2[i]) < 1e-3:
            break  # near tie: the continuation may legitimately differ
        if g1[i] != g2[i]:
            fail("%s: greedy %s step %d: ref %d vs HF %d (margin %.4f)"
                 % (name, what, i, g1[i], g2[i], m2[i]))
            return
        MAXDIFF["margin"] = max(MAXDIFF["margin"], abs(m1[i] - m2[i]))


def check_model(name, ckpt_dir, hf_model, tol, rng, vocab):
    ref = ref_opt.load_model(ckpt_dir)
    seqs = random_seqs(rng, vocab, ref.cfg.max_pos)
    hs, hb = hf_logprobs(hf_model, seqs)
    rs = [ref.score(s) for s in seqs]
    rb = ref.score_batch(seqs)
    worst = 0.0
    for i, s in enumerate(seqs):
        for label, x in [("HF batch", hb[i]), ("ref single", rs[i]), ("ref batch", rb[i])]:
            d = float(np.max(np.abs(x - hs[i])))
            worst = max(worst, d)
            MAXDIFF[label] = max(MAXDIFF[label], d)
            if not d <= tol:
                fail("%s: seq %d: %s vs HF single differ by %.3g" % (name, i, label, d))
    h64 = hf64_logprobs(hf_model, seqs)
    for i in range(len(seqs)):
        MAXDIFF["ref vs HF64"] = max(MAXDIFF["ref vs HF64"], float(np.max(np.abs(rs[i] - h64[i]))))
        MAXDIFF["HF vs HF64"] = max(MAXDIFF["HF vs HF64"], float(np.max(np.abs(hs[i] - h64[i]))))
    spread = float(np.std(np.concatenate(hs)))
    if spread < 0.3:
        fail("%s: log-probabilities barely vary (std %.3f): degenerate weights?" % (name, spread))
    prompts = [s[:k] for s, k in zip(seqs[:4], [1, 2, 5, 9])]
    n = 12
    hfg = [hf_greedy(hf_model, p, n) for p in prompts]
    for p, h in zip(prompts, hfg):
        compare_greedy(name, ref.greedy(p, n, use_cache=True), h, "cached")
        compare_greedy(name, ref.greedy(p, n, use_cache=False), h, "recomputed")
    for res, h in zip(ref.greedy_batch(prompts, n), hfg):
        compare_greedy(name, res, h, "batched")
    ntie = sum(sum(1 for m in h[1] if m < 1e-3) for h in hfg)
    print("ok   %-34s max |dlogp| %.2e  logp std %.2f  greedy %s (near ties: %d)"
          % (name, worst, spread, " ".join(str(t) for t in hfg[2][0][:6]) + " ...", ntie))
    return seqs, hs


def check_cli(ckpt_dir, seqs, hs, tol):
    """Run ref_opt.py as a program once and parse its output."""
    inp = "".join(" ".join(map(str, s)) + "\n" for s in seqs) + "\n"
    prog = [sys.executable, os.path.join(HERE, "ref_opt.py")]
    for extra in [[], ["--batch"]]:
        r = subprocess.run(prog + ["score", "-m", ckpt_dir] + extra, input=inp,
                           capture_output=True, text=True)
        lines = r.stdout.split("\n")
        if r.returncode != 0 or len(lines) != len(seqs) + 2 or lines[-2] != "":
            fail("CLI score %s: rc %d, %d lines, stderr %r" % (extra, r.returncode, len(lines),
                                                              r.stderr[-300:]))
            continue
        for i, s in enumerate(seqs):
            x = np.array([float(t) for t in lines[i].split()])
            if x.shape != hs[i].shape or np.max(np.abs(x - hs[i])) > tol + 1e-6:
                fail("CLI score %s: line %d disagrees with HF" % (extra, i))
    r = subprocess.run(prog + ["greedy", "-m", ckpt_dir, "-n", "5", "--margins"],
                       input="2 10 20\n5\n", capture_output=True, text=True)
    lines = r.stdout.split("\n")
    ok = r.returncode == 0 and len(lines) == 3
    if ok:
        for ln in lines[:2]:
            g, m = ln.split("\t")
            ok = ok and len(g.split()) == 5 and len(m.split()) == 5
    if not ok:
        fail("CLI greedy --margins: unexpected output %r %r" % (r.stdout, r.stderr[-300:]))
    else:
        print("ok   CLI score / score --batch / greedy --margins")


def mk_args(**kw):
    a = dict(hidden=32, layers=2, heads=4, ffn=64, vocab=1000, max_pos=64, embed_dim=0,
             post_ln=False, no_final_ln=False, no_bias=False, no_ln_affine=False, dtype="f32",
             format="safetensors", shards=1, prefix="model.decoder.", tie=True, seed=0)
    a.update(kw)
    args = []
    for k, v in a.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            if k == "tie":
                args.append("--tie" if v else "--no-tie")
            elif v:
                args.append(flag)
        else:
            args += [flag, str(v)]
    return args


def hf_load(d):
    model, info = OPTForCausalLM.from_pretrained(d, output_loading_info=True)
    model.eval()
    bad = {k: v for k, v in info.items() if v and k != "mismatched_keys"} if info else {}
    bad.update({"mismatched_keys": info.get("mismatched_keys")} if info.get("mismatched_keys")
               else {})
    return model, bad


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", help="write the checkpoints here and keep them")
    ap.add_argument("--tol", type=float, default=1e-5)
    a = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(1234)
    root = a.keep or tempfile.mkdtemp(prefix="opt-ref-hf-")
    os.makedirs(root, exist_ok=True)
    print("transformers %s, torch %s, numpy %s" % (transformers.__version__, torch.__version__,
                                                  np.__version__))
    cases = [
        ("preln-tied-st", dict(seed=1)),
        ("preln-vocab50272-h64", dict(seed=9, hidden=64, ffn=256, vocab=50272, max_pos=128)),
        ("preln-untied-st3", dict(seed=2, tie=False, shards=3, layers=3)),
        ("preln-tied-st3-decoder", dict(seed=8, shards=3, prefix="decoder.")),
        ("postln350m-tied-bin-decoder", dict(seed=3, post_ln=True, embed_dim=16, format="bin",
                                             prefix="decoder.")),
        ("postln350m-untied-bin2-f16", dict(seed=4, post_ln=True, embed_dim=16, format="bin",
                                            shards=2, tie=False, dtype="f16")),
        ("preln-nofinal-nobias-noaff-bf16", dict(seed=5, no_final_ln=True, no_bias=True,
                                                 no_ln_affine=True, dtype="bf16")),
        ("preln-proj-f16-st2", dict(seed=6, embed_dim=48, dtype="f16", shards=2,
                                    hidden=64, heads=8, ffn=128)),
        ("postln-proj-bf16-bin", dict(seed=7, post_ln=True, embed_dim=16, dtype="bf16",
                                      format="bin", tie=False)),
    ]
    first = None
    for name, kw in cases:
        d = os.path.join(root, name)
        if os.path.isdir(d):
            shutil.rmtree(d)
        r = subprocess.run([sys.executable, os.path.join(HERE, "mkckpt.py"), "-o", d]
                           + mk_args(**kw), capture_output=True, text=True)
        if r.returncode != 0:
            fail("%s: mkckpt failed: %s" % (name, r.stderr[-500:]))
            continue
        model, bad = hf_load(d)
        if bad:
            fail("%s: transformers reported loading problems: %r" % (name, bad))
        vocab = kw.get("vocab", 1000)
        seqs, hs = check_model(name, d, model, a.tol, rng, vocab)
        if first is None:
            first = (d, seqs, hs)

    # mkckpt convert: same weights in another container must give the same numbers
    src = os.path.join(root, "preln-untied-st3")
    for name, extra in [("convert-bin2", ["--format", "bin", "--shards", "2"]),
                        ("convert-st-bf16", ["--dtype", "bf16"])]:
        d = os.path.join(root, name)
        if os.path.isdir(d):
            shutil.rmtree(d)
        r = subprocess.run([sys.executable, os.path.join(HERE, "mkckpt.py"), "convert", src, d]
                           + extra, capture_output=True, text=True)
        if r.returncode != 0:
            fail("%s: convert failed: %s" % (name, r.stderr[-500:]))
            continue
        model, bad = hf_load(d)
        if bad:
            fail("%s: transformers reported loading problems: %r" % (name, bad))
        check_model(name, d, model, a.tol, rng, 1000)
        if "bf16" not in name:
            w1 = ref_opt.load_model(src).W
            w2 = ref_opt.load_model(d).W
            if set(w1) != set(w2) or any(not np.array_equal(w1[k], w2[k]) for k in w1):
                fail("%s: converted weights differ from the source" % name)

    # the other direction: checkpoints written by transformers itself
    for name, post, E, tie, safe in [("hf-save-preln-st-sharded", False, 32, True, True),
                                     ("hf-save-postln350m-bin", True, 16, True, False),
                                     ("hf-save-preln-untied-st", False, 32, False, True)]:
        cfg = OPTConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                        num_attention_heads=4, max_position_embeddings=64,
                        do_layer_norm_before=not post, word_embed_proj_dim=E,
                        tie_word_embeddings=tie)
        torch.manual_seed(len(name))
        model = OPTForCausalLM(cfg).eval()
        g = torch.Generator().manual_seed(len(name))
        for pn, p in model.named_parameters():     # mkckpt-like, non-degenerate weights
            if "embed_tokens" in pn or "lm_head" in pn:
                std = 0.5
            elif "embed_positions" in pn:
                std = 1.5
            elif p.dim() == 2:
                std = p.shape[1] ** -0.5
            else:
                std = 0.05
            v = torch.randn(p.shape, generator=g) * std
            if pn.endswith("layer_norm.weight"):
                v = 1 + 0.1 * torch.randn(p.shape, generator=g)
            p.copy_(v)
        d = os.path.join(root, name)
        if os.path.isdir(d):
            shutil.rmtree(d)
        model.save_pretrained(d, safe_serialization=safe, max_shard_size="60KB" if safe else "10GB")
        files = sorted(os.listdir(d))
        check_model(name + " (%d files)" % len(files), d, model, a.tol, rng, 1000)

    if first:
        check_cli(*first, a.tol)
    print("max |logp - HF single| over all models: ref single %.3g, ref batch %.3g, "
          "HF batch %.3g; max |greedy margin ref - HF| %.3g"
          % (MAXDIFF["ref single"], MAXDIFF["ref batch"], MAXDIFF["HF batch"],
             MAXDIFF["margin"]))
    print("against HF run in float64: max |ref - HF64| %.3g, max |HF fp32 - HF64| %.3g"
          % (MAXDIFF["ref vs HF64"], MAXDIFF["HF vs HF64"]))
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)
    if FAILS:
        print("%d failures" % len(FAILS))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
