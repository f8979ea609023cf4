#!/usr/bin/python3
"""Write Hugging Face OPT checkpoint directories with seeded random weights (test fixtures).

Independent of the C runtime.  Run with /usr/bin/python3 (numpy; torch only for .bin).

Make a checkpoint:
  mkckpt.py -o DIR [--hidden H] [--layers L] [--heads A] [--ffn F] [--vocab V]
            [--max-pos P] [--embed-dim E] [--post-ln] [--no-final-ln] [--no-bias]
            [--no-ln-affine] [--dtype f32|f16|bf16] [--format safetensors|bin]
            [--shards N] [--prefix model.decoder.|decoder.] [--tie|--no-tie] [--seed S]

  DIR gets config.json (HF style: model_type "opt", architectures ["OPTForCausalLM"],
  torch_dtype, ...), vocab.json and merges.txt copied from the repository's tokenizer/
  directory, and the weights:
    --format safetensors: model.safetensors, or with --shards N > 1
        model-00001-of-0000N.safetensors ... + model.safetensors.index.json
        (written by the small safetensors writer below: JSON header padded with spaces
        to a multiple of 8 bytes, {"__metadata__": {"format": "pt"}}, like the official
        library).
    --format bin: pytorch_model.bin, or pytorch_model-00001-of-0000N.bin ... +
        pytorch_model.bin.index.json (torch.save of a dict of tensors: the genuine
        zip/pickle format).
  Tensor names are PREFIX + "embed_tokens.weight" etc. (default prefix "model.decoder.");
  lm_head.weight is written only with --no-tie (which also sets "tie_word_embeddings":
  false in config.json, so transformers uses it too); --tie (default) omits it.
  (transformers refuses --no-tie together with --prefix decoder.: a checkpoint with the
  bare prefix is taken as an OPTModel state dict, which has no lm_head; a warning says so.)
  --post-ln makes an opt-350m-like model (do_layer_norm_before false, no final LN);
  --embed-dim E != H adds project_in/project_out; --no-final-ln sets
  _remove_final_layer_norm; --no-bias sets enable_bias false; --no-ln-affine sets
  layer_norm_elementwise_affine false.

  Random weights (float32 from numpy's default_rng(seed), then rounded to --dtype):
    token embeddings    N(0, s^2) with s = clip(4/sqrt(E), 0.1, 0.5)  (logit std ~2-4)
    position embeddings N(0, 1.5^2)  (large: it keeps random models out of
                        repetition loops, so greedy outputs vary along the sequence)
    linear weights      N(0, 1/fan_in);  linear biases N(0, 0.02^2)
    LayerNorm           weight 1 + N(0, 0.1^2), bias N(0, 0.05^2)
    lm_head (--no-tie)  N(0, s^2) like the token embeddings
  so that log-probabilities vary clearly across tokens and greedy argmax is rarely tied.

Convert a checkpoint into another container (same weights, e.g. for loader tests):
  mkckpt.py convert SRC DST [--format safetensors|bin] [--shards N] [--prefix P]
            [--dtype f32|f16|bf16]
  Reads SRC (any supported layout, via ref_opt's reader), writes DST.  Without --dtype
  each tensor keeps its stored dtype bit-exactly; with --dtype all are cast to it (and
  config.json's torch_dtype is updated).  Without --prefix the source's prefix is kept.
  Non-weight files (config.json, vocab.json, merges.txt, ...) are copied.

Importable: make_weights(args-like), write_checkpoint(...), write_safetensors(path, dict).
"""

import argparse
import json
import os
import re
import shutil
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_DIR = os.path.join(os.path.dirname(HERE), "tokenizer")
sys.path.insert(0, HERE)

DTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
TORCH_DTYPE_NAME = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
ESIZE = {"F32": 4, "F16": 2, "BF16": 2}


# ---------------------------------------------------------------------------------------
# dtype conversion: float32 -> stored array (BF16 as uint16 bit patterns)
# ---------------------------------------------------------------------------------------

def f32_to_bf16_bits(x):
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (as torch does)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def from_f32(x, dtype):
    x = np.asarray(x, dtype=np.float32)
    if dtype == "F32":
        return x
    if dtype == "F16":
        return x.astype(np.float16)
    if dtype == "BF16":
        return f32_to_bf16_bits(x)
    raise ValueError(dtype)


def stored_to_f32(dtype, arr):
    if dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


# ---------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------

def write_safetensors(path, tensors, metadata=None):
    """tensors: {name: (dtype, stored array)}; written in name order, 8-byte padded
    header (spaces), little-endian data."""
    header = {"__metadata__": metadata if metadata is not None else {"format": "pt"}}
    off = 0
    names = sorted(tensors)
    for n in names:
        dt, arr = tensors[n]
        nb = arr.size * ESIZE[dt]
        header[n] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + nb]}
        off += nb
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for n in names:
            dt, arr = tensors[n]
            le = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False)
            f.write(le.tobytes())


def write_torch_bin(path, tensors):
    import torch
    sd = {}
    for n, (dt, arr) in tensors.items():
        if dt == "BF16":
            t = torch.from_numpy(np.ascontiguousarray(arr).view(np.int16).copy()).view(torch.bfloat16)
        else:
            t = torch.from_numpy(np.ascontiguousarray(arr).copy())
        sd[n] = t
    torch.save(sd, path)


def split_shards(names, tensors, n):
    """Split the ordered names into exactly min(n, len(names)) contiguous, non-empty
    groups of roughly equal byte size."""
    N = len(names)
    n = max(1, min(n, N))
    sizes = [tensors[k][1].size * ESIZE[tensors[k][0]] for k in names]
    total = max(1, sum(sizes))
    groups = [[] for _ in range(n)]
    prev, cum = -1, 0
    for i, (k, s) in enumerate(zip(names, sizes)):
        g = int((cum + s / 2) * n / total)
        g = min(g, prev + 1, n - 1)          # contiguous, no empty group skipped
        g = max(g, prev, n - (N - i))        # leave enough names for the remaining groups
        groups[g].append(k)
        prev, cum = g, cum + s
    return groups


def write_weights(out_dir, tensors, fmt="safetensors", shards=1, order=None):
    """tensors: {full name: (dtype, stored array)}.  Writes single or sharded files with
    HF file names and index."""
    if "lm_head.weight" in tensors and any(n.startswith("decoder.") for n in tensors):
        sys.stderr.write("mkckpt: warning: lm_head.weight with the bare 'decoder.' prefix: "
                         "transformers refuses such a checkpoint (it takes 'decoder.*' for an "
                         "OPTModel state dict, which has no lm_head)\n")
    names = order if order is not None else sorted(tensors)
    if fmt == "safetensors":
        single, pattern, index = ("model.safetensors", "model-%05d-of-%05d.safetensors",
                                  "model.safetensors.index.json")
        writer = write_safetensors
    elif fmt == "bin":
        single, pattern, index = ("pytorch_model.bin", "pytorch_model-%05d-of-%05d.bin",
                                  "pytorch_model.bin.index.json")
        writer = write_torch_bin
    else:
        raise SystemExit("mkckpt: unknown format %r" % fmt)
    if shards <= 1:
        writer(os.path.join(out_dir, single), tensors)
        return [single]
    groups = split_shards(names, tensors, shards)
    n = len(groups)
    weight_map, files = {}, []
    total = 0
    for i, g in enumerate(groups, 1):
        fn = pattern % (i, n)
        writer(os.path.join(out_dir, fn), {k: tensors[k] for k in g})
        files.append(fn)
        for k in g:
            weight_map[k] = fn
            total += tensors[k][1].size * ESIZE[tensors[k][0]]
    with open(os.path.join(out_dir, index), "w") as f:
        json.dump({"metadata": {"total_size": total},
                   "weight_map": {k: weight_map[k] for k in sorted(weight_map)}}, f, indent=2)
        f.write("\n")
    return files + [index]


# ---------------------------------------------------------------------------------------
# random model
# ---------------------------------------------------------------------------------------

def make_config(a):
    E = a.embed_dim if a.embed_dim else a.hidden
    return {
        "_name_or_path": "mkckpt-random-opt",
        "_remove_final_layer_norm": bool(a.no_final_ln),
        "activation_dropout": 0.0,
        "activation_function": "relu",
        "architectures": ["OPTForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 2,
        "do_layer_norm_before": not a.post_ln,
        "dropout": 0.1,
        "enable_bias": not a.no_bias,
        "eos_token_id": 2,
        "ffn_dim": a.ffn,
        "hidden_size": a.hidden,
        "init_std": 0.02,
        "layer_norm_elementwise_affine": not a.no_ln_affine,
        "layerdrop": 0.0,
        "max_position_embeddings": a.max_pos,
        "model_type": "opt",
        "num_attention_heads": a.heads,
        "num_hidden_layers": a.layers,
        "pad_token_id": 1,
        "prefix": "</s>",
        "tie_word_embeddings": bool(a.tie),
        "torch_dtype": TORCH_DTYPE_NAME[DTYPES[a.dtype]],
        "transformers_version": "4.36.2",
        "use_cache": True,
        "vocab_size": a.vocab,
        "word_embed_proj_dim": E,
    }


def make_weights(a):
    """-> ordered list of (canonical name, float32 array); canonical prefix 'decoder.'."""
    rng = np.random.default_rng(a.seed)
    H, E, F, V, P = a.hidden, (a.embed_dim or a.hidden), a.ffn, a.vocab, a.max_pos
    s_tok = float(np.clip(4.0 / np.sqrt(E), 0.1, 0.5))
    pre_ln = not a.post_ln
    out = []

    def normal(shape, std):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    def linear(name, n_out, n_in, bias=True):
        out.append((name + ".weight", normal((n_out, n_in), 1.0 / np.sqrt(n_in))))
        if bias and not a.no_bias:
            out.append((name + ".bias", normal((n_out,), 0.02)))

    def ln(name):
        if a.no_ln_affine:
            return
        out.append((name + ".weight", 1.0 + normal((H,), 0.1)))
        out.append((name + ".bias", normal((H,), 0.05)))

    out.append(("decoder.embed_tokens.weight", normal((V, E), s_tok)))
    out.append(("decoder.embed_positions.weight", normal((P + 2, H), 1.5)))
    if E != H:
        linear("decoder.project_in", H, E, bias=False)
        linear("decoder.project_out", E, H, bias=False)
    for i in range(a.layers):
        p = "decoder.layers.%d." % i
        for n in ["k_proj", "v_proj", "q_proj", "out_proj"]:
            linear(p + "self_attn." + n, H, H)
        ln(p + "self_attn_layer_norm")
        linear(p + "fc1", F, H)
        linear(p + "fc2", H, F)
        ln(p + "final_layer_norm")
    if pre_ln and not a.no_final_ln:
        ln("decoder.final_layer_norm")
    if not a.tie:
        out.append(("lm_head.weight", normal((V, E), s_tok)))
    return out


def full_name(canon, prefix):
    if canon.startswith("decoder."):
        return prefix + canon[len("decoder."):]
    return canon


def copy_tokenizer(out_dir):
    for fn in ["vocab.json", "merges.txt"]:
        src = os.path.join(TOKENIZER_DIR, fn)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out_dir, fn))
        else:
            sys.stderr.write("mkckpt: warning: %s not found, not copied\n" % src)


def write_config(out_dir, cfg):
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def cmd_make(a):
    if a.hidden % a.heads:
        raise SystemExit("mkckpt: --hidden must be divisible by --heads")
    os.makedirs(a.out, exist_ok=True)
    dt = DTYPES[a.dtype]
    weights = make_weights(a)
    tensors, order = {}, []
    for canon, x in weights:
        n = full_name(canon, a.prefix)
        tensors[n] = (dt, from_f32(x, dt))
        order.append(n)
    write_config(a.out, make_config(a))
    copy_tokenizer(a.out)
    files = write_weights(a.out, tensors, a.format, a.shards, order)
    sys.stderr.write("mkckpt: wrote %s (%s)\n" % (a.out, ", ".join(["config.json"] + files)))


# ---------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------

WEIGHT_FILE = re.compile(r"^(model(-\d+-of-\d+)?\.safetensors|pytorch_model(-\d+-of-\d+)?\.bin|"
                         r"(model\.safetensors|pytorch_model\.bin)\.index\.json)$")


def layer_order_key(name):
    """Natural order: embeddings, layers by number, then the rest."""
    m = re.search(r"layers\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)), name)
    if "embed" in name or "project_in" in name:
        return (0, 0, name)
    return (2, 0, name)


def cmd_convert(a):
    import ref_opt
    try:
        raw = ref_opt.read_raw_tensors(a.src)
    except ref_opt.RefError as e:
        raise SystemExit("mkckpt: %s" % e)
    os.makedirs(a.dst, exist_ok=True)
    tensors = {}
    for name, (dt, shape, arr) in raw.items():
        canon = ref_opt.canonical_name(name)
        n = full_name(canon, a.prefix) if a.prefix else name
        if a.dtype and DTYPES[a.dtype] != dt:
            tensors[n] = (DTYPES[a.dtype], from_f32(stored_to_f32(dt, arr), DTYPES[a.dtype]))
        else:
            tensors[n] = (dt, np.array(arr))
    for fn in os.listdir(a.src):
        p = os.path.join(a.src, fn)
        if os.path.isfile(p) and not WEIGHT_FILE.match(fn):
            shutil.copyfile(p, os.path.join(a.dst, fn))
    if a.dtype:
        cp = os.path.join(a.dst, "config.json")
        if os.path.isfile(cp):
            with open(cp) as f:
                cfg = json.load(f)
            cfg["torch_dtype"] = TORCH_DTYPE_NAME[DTYPES[a.dtype]]
            write_config(a.dst, cfg)
    order = sorted(tensors, key=layer_order_key)
    files = write_weights(a.dst, tensors, a.format, a.shards, order)
    sys.stderr.write("mkckpt: converted %s -> %s (%s)\n" % (a.src, a.dst, ", ".join(files)))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        ap = argparse.ArgumentParser(prog="mkckpt.py convert",
                                     description="rewrite a checkpoint in another container")
        ap.add_argument("src")
        ap.add_argument("dst")
        ap.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
        ap.add_argument("--shards", type=int, default=1)
        ap.add_argument("--prefix", choices=["model.decoder.", "decoder."], default=None)
        ap.add_argument("--dtype", choices=sorted(DTYPES), default=None)
        a = ap.parse_args(argv[1:])
        cmd_convert(a)
        return 0
    ap = argparse.ArgumentParser(prog="mkckpt.py", description=__doc__.split("\n\n")[0],
                                 epilog="also: mkckpt.py convert SRC DST [--format ...] "
                                        "[--shards N] [--prefix P] [--dtype D]")
    ap.add_argument("-o", "--out", required=True, help="output directory")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=50272)
    ap.add_argument("--max-pos", type=int, default=128)
    ap.add_argument("--embed-dim", type=int, default=0, help="word_embed_proj_dim (default H)")
    ap.add_argument("--post-ln", action="store_true", help="do_layer_norm_before false (350m)")
    ap.add_argument("--no-final-ln", action="store_true", help="_remove_final_layer_norm true")
    ap.add_argument("--no-bias", action="store_true", help="enable_bias false")
    ap.add_argument("--no-ln-affine", action="store_true",
                    help="layer_norm_elementwise_affine false")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    ap.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--prefix", choices=["model.decoder.", "decoder."], default="model.decoder.")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--tie", dest="tie", action="store_true", default=True,
                   help="omit lm_head.weight (tied to embed_tokens; default)")
    g.add_argument("--no-tie", dest="tie", action="store_false",
                   help="write a separate random lm_head.weight")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    for k in ["hidden", "layers", "heads", "ffn", "vocab", "max_pos"]:
        if getattr(a, k) <= 0:
            ap.error("--%s must be positive" % k.replace("_", "-"))
    cmd_make(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
