#!/usr/bin/python3
"""Independent numpy reference implementation of Hugging Face OPT (OPTForCausalLM).

It reads a Hugging Face OPT checkpoint directory exactly as users download it
(config.json plus model.safetensors, sharded model-0000k-of-0000n.safetensors with
model.safetensors.index.json, pytorch_model.bin, or sharded pytorch_model-*.bin with
pytorch_model.bin.index.json) and computes the model in float32 with numpy.  Weights of
any stored dtype (F32, F16, BF16) are upcast to float32.  It shares no code with the C
runtime; it is the oracle the C tests compare against.  Run it with the Debian
interpreter (/usr/bin/python3), which has numpy (and torch, needed only for .bin files).

Usage (token ids are given as space-separated integers, one sequence per line on stdin,
or in a file given with -i; a blank input line gives a blank output line):

  ref_opt.py score  -m DIR [--batch]
      For each line, print the natural-log probability of every token after the first,
      given the tokens before it: space-separated, formatted %.6f (a line with one
      token prints an empty line).  With --batch all lines run as ONE left-padded batch
      (pad id 1, attention mask 0 on pads) to exercise the padding path; the results
      equal the one-at-a-time ones up to float rounding.
  ref_opt.py greedy -m DIR -n N [--margins] [--batch] [--no-cache]
      For each line, print the N greedily chosen ids (argmax of the logits; exactly N,
      end-of-sequence is not treated specially).  With --margins the line is followed by
      a TAB and the top-1 minus top-2 logit margin at each step (%.6f, space-separated),
      so tests can ignore steps with near ties.  Decoding is incremental with a KV cache
      (--no-cache recomputes the whole sequence at each step).  --batch runs all lines as
      one left-padded batch.
  ref_opt.py logits -m DIR
      For each line, print the full logits (%.6f) of the last position.
  ref_opt.py info -m DIR
      Print the parsed configuration and the tensors found (for debugging).

Importable: load_model(dir, compute="f32"|"bf16") -> Model (bf16: every GEMM's inputs and
weights rounded to bf16, as opt --compute bf16); model.score(ids), model.score_batch(list_of_ids),
model.greedy(ids, n), model.forward(...).  Errors are reported as one line
"ref_opt: error: ..." on stderr with exit status 1.

Semantics follow transformers' modeling_opt.py (checked against transformers 4.36.2 by
tests/check_ref_vs_hf.py):
  * position ids: pos = cumsum(mask) * mask - 1, looked up at pos + 2 in the
    (max_position_embeddings + 2, hidden) table; a pad position therefore uses row 1.
  * q = (x @ Wq^T + bq) * head_dim**-0.5 (the bias is scaled too).
  * masked scores are set to float32's most negative finite value (not -inf), so a query
    row whose keys are all masked (a pad query under left padding) gets a uniform softmax
    instead of NaN, as in HF; such rows never influence unmasked positions.
  * pre-LN (do_layer_norm_before): LN -> attn -> +res ; LN -> fc1 -> relu -> fc2 -> +res;
    then decoder.final_layer_norm unless _remove_final_layer_norm.
    post-LN (opt-350m): attn -> +res -> LN ; fc1 -> relu -> fc2 -> +res -> LN; no final LN.
  * project_in / project_out (no bias) exist when word_embed_proj_dim != hidden_size;
    project_in is applied to token embeddings before the positions are added,
    project_out after the final layer norm.
  * lm_head.weight is used when the checkpoint has it, else embed_tokens.weight (tied).
    (When config.json ties the embeddings -- tie_word_embeddings absent or true -- and the
    checkpoint holds an lm_head.weight that differs from embed_tokens.weight, transformers
    4.36 ends up using lm_head.weight for BOTH the input embedding and the head, since both
    names load into one shared parameter; a warning is printed in that case.  mkckpt.py
    --no-tie writes tie_word_embeddings false, which removes the ambiguity.)

Speed: Debian's numpy here is linked to the reference (netlib) BLAS, about 1-2 GFLOP/s:
tiny test models take milliseconds; an opt-125m-sized model ~10 s per 100 scored tokens.
"""

import argparse
import json
import mmap
import os
import sys

import numpy as np

LN_EPS = 1e-5
PAD_ID = 1
POS_OFFSET = 2
F32_MIN = np.finfo(np.float32).min


class RefError(Exception):
    """An input problem, reported as one line without a traceback."""


# ---------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------

# Defaults of transformers' OPTConfig.__init__ (used when a key is absent).
CONFIG_DEFAULTS = {
    "vocab_size": 50272,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "ffn_dim": 3072,
    "max_position_embeddings": 2048,
    "do_layer_norm_before": True,
    "_remove_final_layer_norm": False,
    "word_embed_proj_dim": None,
    "num_attention_heads": 12,
    "activation_function": "relu",
    "enable_bias": True,
    "layer_norm_elementwise_affine": True,
    "pad_token_id": 1,
    "bos_token_id": 2,
    "eos_token_id": 2,
}


class Config:
    def __init__(self, d, path="config.json"):
        if not isinstance(d, dict):
            raise RefError("%s: top level is not a JSON object" % path)
        g = {k: d.get(k, v) for k, v in CONFIG_DEFAULTS.items()}
        ints = ["vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim",
                "max_position_embeddings", "num_attention_heads"]
        for k in ints:
            v = g[k]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise RefError("%s: %s must be a positive integer, got %r" % (path, k, v))
        self.vocab_size = g["vocab_size"]
        self.hidden = g["hidden_size"]
        self.layers = g["num_hidden_layers"]
        self.ffn = g["ffn_dim"]
        self.max_pos = g["max_position_embeddings"]
        self.heads = g["num_attention_heads"]
        e = g["word_embed_proj_dim"]
        if e is None:
            e = self.hidden
        if isinstance(e, bool) or not isinstance(e, int) or e <= 0:
            raise RefError("%s: word_embed_proj_dim must be a positive integer, got %r" % (path, e))
        self.embed_dim = e
        for k in ["do_layer_norm_before", "_remove_final_layer_norm", "enable_bias",
                  "layer_norm_elementwise_affine"]:
            if not isinstance(g[k], bool):
                raise RefError("%s: %s must be true or false, got %r" % (path, k, g[k]))
        self.pre_ln = g["do_layer_norm_before"]
        self.remove_final_ln = g["_remove_final_layer_norm"]
        self.bias = g["enable_bias"]
        self.ln_affine = g["layer_norm_elementwise_affine"]
        if g["activation_function"] != "relu":
            raise RefError("%s: activation_function %r is not supported (only \"relu\")"
                           % (path, g["activation_function"]))
        if self.hidden % self.heads != 0:
            raise RefError("%s: hidden_size %d is not divisible by num_attention_heads %d"
                           % (path, self.hidden, self.heads))
        self.head_dim = self.hidden // self.heads
        self.final_ln = self.pre_ln and not self.remove_final_ln
        self.project = self.embed_dim != self.hidden
        self.eos_token_id = g["eos_token_id"]
        self.raw = d

    def describe(self):
        return ("vocab=%d hidden=%d layers=%d heads=%d ffn=%d max_pos=%d embed_dim=%d "
                "pre_ln=%s final_ln=%s bias=%s ln_affine=%s"
                % (self.vocab_size, self.hidden, self.layers, self.heads, self.ffn, self.max_pos,
                   self.embed_dim, self.pre_ln, self.final_ln, self.bias, self.ln_affine))

    def expected_tensors(self):
        """Canonical names (prefix 'decoder.') -> shape; lm_head.weight is optional."""
        H, E, F = self.hidden, self.embed_dim, self.ffn
        t = {
            "decoder.embed_tokens.weight": (self.vocab_size, E),
            "decoder.embed_positions.weight": (self.max_pos + POS_OFFSET, H),
        }
        if self.project:
            t["decoder.project_in.weight"] = (H, E)
            t["decoder.project_out.weight"] = (E, H)
        if self.final_ln and self.ln_affine:
            t["decoder.final_layer_norm.weight"] = (H,)
            t["decoder.final_layer_norm.bias"] = (H,)
        for i in range(self.layers):
            p = "decoder.layers.%d." % i
            for n in ["q_proj", "k_proj", "v_proj", "out_proj"]:
                t[p + "self_attn.%s.weight" % n] = (H, H)
                if self.bias:
                    t[p + "self_attn.%s.bias" % n] = (H,)
            t[p + "fc1.weight"] = (F, H)
            t[p + "fc2.weight"] = (H, F)
            if self.bias:
                t[p + "fc1.bias"] = (F,)
                t[p + "fc2.bias"] = (H,)
            if self.ln_affine:
                for n in ["self_attn_layer_norm", "final_layer_norm"]:
                    t[p + n + ".weight"] = (H,)
                    t[p + n + ".bias"] = (H,)
        return t


def read_config(model_dir):
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise RefError("%s: missing (not a Hugging Face model directory?)" % path)
    try:
        with open(path, "rb") as f:
            d = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise RefError("%s: not valid JSON: %s" % (path, e))
    return Config(d, path)


# ---------------------------------------------------------------------------------------
# weight files
# ---------------------------------------------------------------------------------------

# safetensors dtype -> (numpy dtype of the stored bytes, bytes per element)
ST_DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2)}


def bf16_bits_to_f32(u16):
    """bfloat16 bit patterns (uint16 array) -> float32, exactly (bits << 16)."""
    return (u16.astype(np.uint32) << 16).view(np.float32)


def to_f32(dtype, arr):
    """Upcast a stored array (as returned by the readers) to a float32 array."""
    if dtype == "BF16":
        return bf16_bits_to_f32(arr)
    return np.asarray(arr, dtype=np.float32)


def read_safetensors(path):
    """Own safetensors reader: 8-byte little-endian header length N, N bytes of JSON,
    then raw little-endian tensor data; data_offsets are relative to the data start.
    Returns {name: (dtype, shape, stored_array)}; BF16 arrays hold uint16 bit patterns.
    The file is memory-mapped; arrays are read-only views into it."""
    size = os.path.getsize(path)
    if size < 8:
        raise RefError("%s: file too short for a safetensors header (%d bytes)" % (path, size))
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise RefError("%s: header length %d exceeds the file size %d" % (path, n, size))
        raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise RefError("%s: corrupt safetensors header JSON: %s" % (path, e))
        if not isinstance(header, dict):
            raise RefError("%s: safetensors header is not a JSON object" % path)
        data_len = size - 8 - n
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else b""
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = tuple(int(s) for s in info["shape"])
            b, e = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise RefError("%s: tensor %s: malformed header entry %r" % (path, name, info))
        if dtype not in ST_DTYPES:
            raise RefError("%s: tensor %s: unsupported dtype %s (supported: F32, F16, BF16)"
                           % (path, name, dtype))
        npdt, esz = ST_DTYPES[dtype]
        if any(s < 0 for s in shape):
            raise RefError("%s: tensor %s: negative dimension in shape %r" % (path, name, shape))
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if not (0 <= b <= e <= data_len):
            raise RefError("%s: tensor %s: data offsets [%d, %d) run past the data section "
                           "(%d bytes)" % (path, name, b, e, data_len))
        if e - b != count * esz:
            raise RefError("%s: tensor %s: data is %d bytes but %s%r needs %d"
                           % (path, name, e - b, dtype, list(shape), count * esz))
        arr = np.frombuffer(buf, dtype=np.dtype(npdt).newbyteorder("<"), count=count,
                            offset=8 + n + b).reshape(shape)
        out[name] = (dtype, shape, arr)
    return out




def read_torch_bin(path):
    """pytorch_model.bin (torch.save zip/pickle format) via torch.load(map_location='cpu').
    Returns {name: (dtype, shape, stored_array)} like read_safetensors."""
    try:
        import torch
    except ImportError:
        raise RefError("%s: reading .bin checkpoints needs torch (use /usr/bin/python3)" % path)
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except TypeError:  # very old torch without weights_only
            sd = torch.load(path, map_location="cpu")
    except Exception as e:  # torch raises many kinds for damaged files
        msg = str(e)
        if "WeightsUnpickler error:" in msg:   # torch's weights_only wrapper: keep the cause
            msg = msg.split("WeightsUnpickler error:")[-1]
        msg = msg.strip().splitlines()[0] if msg.strip() else "(no message; truncated data?)"
        raise RefError("%s: cannot load PyTorch checkpoint: %s: %s"
                       % (path, type(e).__name__, msg))
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise RefError("%s: does not hold a dict of tensors" % path)
    out = {}
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise RefError("%s: entry %s is not a tensor (%s)" % (path, name, type(t).__name__))
        t = t.detach().contiguous()
        if t.dtype == torch.float32:
            dtype, arr = "F32", t.numpy()
        elif t.dtype == torch.float16:
            dtype, arr = "F16", t.numpy()
        elif t.dtype == torch.bfloat16:
            dtype, arr = "BF16", t.view(torch.int16).numpy().view(np.uint16)
        else:
            raise RefError("%s: tensor %s: unsupported dtype %s" % (path, name, t.dtype))
        out[name] = (dtype, tuple(t.shape), arr)
    return out


def read_index(path):
    try:
        with open(path, "rb") as f:
            idx = json.loads(f.read().decode("utf-8"))
        wm = idx["weight_map"]
        if not isinstance(wm, dict):
            raise TypeError
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise RefError("%s: not a valid shard index (%s)" % (path, e))
    return wm


def find_weight_files(model_dir):
    """-> (list of files, reader). Preference as in transformers: safetensors first."""
    j = lambda n: os.path.join(model_dir, n)
    for single, index, reader in [("model.safetensors", "model.safetensors.index.json",
                                   read_safetensors),
                                  ("pytorch_model.bin", "pytorch_model.bin.index.json",
                                   read_torch_bin)]:
        if os.path.isfile(j(single)):
            return [j(single)], reader, None
        if os.path.isfile(j(index)):
            wm = read_index(j(index))
            files = []
            for fn in wm.values():
                if not isinstance(fn, str) or "/" in fn or fn in ("", ".", ".."):
                    raise RefError("%s: bad shard file name %r" % (j(index), fn))
                if fn not in files:
                    files.append(fn)
            for fn in files:
                if not os.path.isfile(j(fn)):
                    raise RefError("%s: shard %s named in the index is missing" % (j(index), fn))
            return [j(fn) for fn in files], reader, wm
    raise RefError("%s: no weights found (model.safetensors, model.safetensors.index.json, "
                   "pytorch_model.bin or pytorch_model.bin.index.json)" % model_dir)


def canonical_name(name):
    """'model.decoder.X' and 'decoder.X' -> 'decoder.X'; 'lm_head.weight' stays."""
    if name.startswith("model.decoder."):
        return name[len("model."):]
    return name


def read_raw_tensors(model_dir):
    """All tensors of a checkpoint directory as {stored name: (dtype, shape, array)}."""
    files, reader, wm = find_weight_files(model_dir)
    out = {}
    where = {}
    for fn in files:
        for name, v in reader(fn).items():
            if name in out:
                raise RefError("%s: tensor %s also appears in %s" % (fn, name, where[name]))
            out[name] = v
            where[name] = fn
    if wm is not None:
        for name, fn in wm.items():
            if name not in out:
                raise RefError("%s: tensor %s listed in the shard index is not in that file"
                               % (os.path.join(model_dir, fn), name))
    return out


def load_weights(model_dir, cfg):
    """Read and check all tensors; return {canonical name: float32 array}."""
    raw = read_raw_tensors(model_dir)
    canon = {}
    for name, v in raw.items():
        c = canonical_name(name)
        if c in canon:
            raise RefError("%s: tensor %s present under two prefixes" % (model_dir, c))
        canon[c] = (name, v)
    exp = cfg.expected_tensors()
    W = {}
    for c, shape in exp.items():
        if c not in canon:
            raise RefError("%s: missing tensor %s (or model.%s)" % (model_dir, c, c))
        name, (dtype, sh, arr) = canon[c]
        if tuple(sh) != tuple(shape):
            raise RefError("%s: tensor %s has shape %r, expected %r"
                           % (model_dir, name, list(sh), list(shape)))
        W[c] = to_f32(dtype, arr)
    if "lm_head.weight" in canon:
        name, (dtype, sh, arr) = canon["lm_head.weight"]
        want = (cfg.vocab_size, cfg.embed_dim)
        if tuple(sh) != want:
            raise RefError("%s: tensor lm_head.weight has shape %r, expected %r"
                           % (model_dir, list(sh), list(want)))
        W["lm_head.weight"] = to_f32(dtype, arr)
        if (cfg.raw.get("tie_word_embeddings", True) is not False
                and not np.array_equal(W["lm_head.weight"], W["decoder.embed_tokens.weight"])):
            sys.stderr.write("ref_opt: warning: config.json ties the word embeddings "
                             "(tie_word_embeddings absent or true) but lm_head.weight differs "
                             "from embed_tokens.weight; this reference uses each for its own "
                             "role, transformers 4.36 uses lm_head.weight for both\n")
    else:
        W["lm_head.weight"] = W["decoder.embed_tokens.weight"]
    extra = sorted(set(canon) - set(exp) - {"lm_head.weight"})
    if extra:
        sys.stderr.write("ref_opt: warning: %d unused tensors, e.g. %s\n"
                         % (len(extra), ", ".join(canon[e][0] for e in extra[:3])))
    for k, v in W.items():
        if not np.all(np.isfinite(v)):
            sys.stderr.write("ref_opt: warning: tensor %s has non-finite values\n" % k)
    return W


# ---------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------

def layer_norm(x, w, b):
    mu = x.mean(axis=-1, keepdims=True, dtype=np.float32)
    d = x - mu
    var = (d * d).mean(axis=-1, keepdims=True, dtype=np.float32)
    y = d / np.sqrt(var + np.float32(LN_EPS))
    if w is not None:
        y = y * w + b
    return y.astype(np.float32, copy=False)


def round_bf16(a):
    """float32 -> the nearest bfloat16 (ties to even) as float32, subnormals flushed to zero
    as AVX-512 BF16 does: what `opt --compute bf16` feeds its GEMMs (inputs and weights)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    r = np.where((u & np.uint32(0x7F800000)) == 0, u & np.uint32(0x80000000), r)
    return r.astype(np.uint32).view(np.float32).reshape(np.shape(a))


def linear(x, w, b):
    y = x @ w.T
    if b is not None:
        y = y + b
    return y


class Model:
    def __init__(self, model_dir, compute="f32"):
        self.dir = model_dir
        self.bf16 = compute == "bf16"   # GEMM inputs rounded to bf16 (opt --compute bf16)
        self.cfg = read_config(model_dir)
        self.W = load_weights(model_dir, self.cfg)

    def _w(self, name):
        return self.W.get(name)

    def _linear(self, x, w, b):
        if self.bf16:
            return linear(round_bf16(x), round_bf16(w), b)
        return linear(x, w, b)

    def _ln(self, x, prefix):
        if self.cfg.ln_affine:
            return layer_norm(x, self.W[prefix + ".weight"], self.W[prefix + ".bias"])
        return layer_norm(x, None, None)

    def check_ids(self, ids, where="input"):
        for t in ids:
            if not 0 <= t < self.cfg.vocab_size:
                raise RefError("%s: token id %d out of range [0, %d)"
                               % (where, t, self.cfg.vocab_size))

    def forward(self, ids, mask, past=None):
        """ids: (B, T) int; mask: (B, P+T) 0/1 over past and new tokens; past: list per
        layer of (k, v) arrays (B, A, P, hd) or None.  Returns (hidden (B, T, E) after the
        final LN / project_out, new past)."""
        cfg, W = self.cfg, self.W
        ids = np.asarray(ids, dtype=np.int64)
        mask = np.asarray(mask, dtype=np.int64)
        B, T = ids.shape
        P = 0 if past is None else past[0][0].shape[2]
        S = P + T
        assert mask.shape == (B, S)
        A, hd, H = cfg.heads, cfg.head_dim, cfg.hidden

        # OPTLearnedPositionalEmbedding: cumsum over the mask, pads get -1 (+2 -> row 1)
        pos = (np.cumsum(mask, axis=1) * mask - 1)[:, P:] + POS_OFFSET
        if pos.max() >= cfg.max_pos + POS_OFFSET:
            raise RefError("sequence longer than max_position_embeddings (%d)" % cfg.max_pos)
        x = W["decoder.embed_tokens.weight"][ids]
        if cfg.project:
            x = self._linear(x, W["decoder.project_in.weight"], None)
        h = (x + W["decoder.embed_positions.weight"][pos]).astype(np.float32)

        # causal + padding: query i (absolute P+i) sees key j iff j <= P+i and mask[j]
        qpos = P + np.arange(T)[:, None]
        kpos = np.arange(S)[None, :]
        allowed = (kpos <= qpos)[None, None, :, :] & (mask[:, None, None, :] != 0)

        scaling = np.float32(hd ** -0.5)
        new_past = []
        for i in range(cfg.layers):
            p = "decoder.layers.%d." % i
            g = lambda n: W.get(p + n)
            res = h
            if cfg.pre_ln:
                h = self._ln(h, p + "self_attn_layer_norm")
            q = self._linear(h, g("self_attn.q_proj.weight"), g("self_attn.q_proj.bias")) * scaling
            k = self._linear(h, g("self_attn.k_proj.weight"), g("self_attn.k_proj.bias"))
            v = self._linear(h, g("self_attn.v_proj.weight"), g("self_attn.v_proj.bias"))
            q = q.reshape(B, T, A, hd).transpose(0, 2, 1, 3)
            k = k.reshape(B, T, A, hd).transpose(0, 2, 1, 3)
            v = v.reshape(B, T, A, hd).transpose(0, 2, 1, 3)
            if past is not None:
                k = np.concatenate([past[i][0], k], axis=2)
                v = np.concatenate([past[i][1], v], axis=2)
            new_past.append((k, v))
            s = q @ k.transpose(0, 1, 3, 2)                       # (B, A, T, S)
            s = np.where(allowed, s, F32_MIN)
            s = s - s.max(axis=-1, keepdims=True)
            e = np.exp(s)
            a = e / e.sum(axis=-1, keepdims=True)
            o = (a @ v).transpose(0, 2, 1, 3).reshape(B, T, H)
            o = self._linear(o, g("self_attn.out_proj.weight"), g("self_attn.out_proj.bias"))
            h = res + o
            if not cfg.pre_ln:
                h = self._ln(h, p + "self_attn_layer_norm")
            res = h
            if cfg.pre_ln:
                h = self._ln(h, p + "final_layer_norm")
            f = np.maximum(self._linear(h, g("fc1.weight"), g("fc1.bias")), np.float32(0))
            f = self._linear(f, g("fc2.weight"), g("fc2.bias"))
            h = res + f
            if not cfg.pre_ln:
                h = self._ln(h, p + "final_layer_norm")
            h = h.astype(np.float32, copy=False)

        if cfg.final_ln:
            h = self._ln(h, "decoder.final_layer_norm")
        if cfg.project:
            h = self._linear(h, W["decoder.project_out.weight"], None)
        return h.astype(np.float32, copy=False), new_past

    def logits(self, h):
        w = self.W["lm_head.weight"]
        if self.bf16:
            h, w = round_bf16(h), round_bf16(w)
        return (h @ w.T).astype(np.float32, copy=False)

    # -- scoring -------------------------------------------------------------------

    def _logprobs_of(self, h, targets):
        """h: (T, E) hidden states; targets: (T,) ids -> log p(target) per row, computed
        from float32 logits (log-sum-exp accumulated in float64)."""
        out = np.empty(len(targets), dtype=np.float64)
        step = max(1, (1 << 24) // max(1, self.cfg.vocab_size))   # bound memory
        for a in range(0, len(targets), step):
            lg = self.logits(h[a:a + step]).astype(np.float64)
            m = lg.max(axis=-1, keepdims=True)
            lse = m[:, 0] + np.log(np.exp(lg - m).sum(axis=-1))
            out[a:a + step] = lg[np.arange(lg.shape[0]), targets[a:a + step]] - lse
        return out

    def score(self, ids):
        """Log-probabilities of ids[1:] given the preceding ids (one sequence)."""
        self.check_ids(ids)
        if len(ids) < 2:
            return np.zeros(0)
        ids = np.asarray(ids, dtype=np.int64)
        h, _ = self.forward(ids[None, :-1], np.ones((1, len(ids) - 1), dtype=np.int64))
        return self._logprobs_of(h[0], ids[1:])

    def score_batch(self, seqs):
        """Like score() for each sequence, but all run as one left-padded batch."""
        for s in seqs:
            self.check_ids(s)
        inp = [s[:-1] for s in seqs]
        T = max([len(s) for s in inp] + [0])
        if T == 0:
            return [np.zeros(0) for _ in seqs]
        ids, mask = left_pad(inp, T)
        h, _ = self.forward(ids, mask)
        out = []
        for b, s in enumerate(seqs):
            n = len(s) - 1
            if n <= 0:
                out.append(np.zeros(0))
                continue
            out.append(self._logprobs_of(h[b, T - n:], np.asarray(s[1:], dtype=np.int64)))
        return out

    # -- generation ----------------------------------------------------------------

    def greedy_batch(self, seqs, n, use_cache=True):
        """Greedy decoding of n tokens for each (non-empty) sequence, all in one
        left-padded batch.  Returns [(ids, margins)]."""
        for s in seqs:
            self.check_ids(s)
            if len(s) == 0:
                raise RefError("greedy needs at least one prompt token per line")
        B = len(seqs)
        T = max(len(s) for s in seqs)
        ids, mask = left_pad(seqs, T)
        gen = [[] for _ in range(B)]
        margins = [[] for _ in range(B)]
        past = None
        cur_ids, cur_mask = ids, mask
        for step in range(n):
            if use_cache:
                h, past = self.forward(cur_ids, cur_mask, past)
            else:
                full = np.concatenate([ids, np.array(gen, dtype=np.int64).reshape(B, step)], 1)
                h, _ = self.forward(full, cur_mask)
            lg = self.logits(h[:, -1])
            nxt = lg.argmax(axis=-1)
            top2 = np.partition(lg, lg.shape[-1] - 2, axis=-1)[:, -2:]
            for b in range(B):
                gen[b].append(int(nxt[b]))
                margins[b].append(float(top2[b, 1]) - float(top2[b, 0]))
            cur_mask = np.concatenate([cur_mask, np.ones((B, 1), dtype=np.int64)], axis=1)
            cur_ids = nxt[:, None].astype(np.int64)
        return [(gen[b], margins[b]) for b in range(B)]

    def greedy(self, ids, n, use_cache=True):
        return self.greedy_batch([list(ids)], n, use_cache)[0]


def left_pad(seqs, T):
    B = len(seqs)
    ids = np.full((B, T), PAD_ID, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    for b, s in enumerate(seqs):
        if len(s):
            ids[b, T - len(s):] = s
            mask[b, T - len(s):] = 1
    return ids, mask


def load_model(model_dir, compute="f32"):
    return Model(model_dir, compute)


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------

def read_id_lines(f):
    lines = []
    for ln, line in enumerate(f, 1):
        try:
            lines.append([int(t) for t in line.split()])
        except ValueError:
            raise RefError("input line %d: not a list of integer token ids: %r"
                           % (ln, line.strip()[:60]))
    return lines


def fmt(xs):
    return " ".join("%.6f" % x for x in xs)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="ref_opt.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ["score", "greedy", "logits", "info"]:
        p = sub.add_parser(name)
        p.add_argument("-m", "--model", required=True, help="checkpoint directory")
        p.add_argument("-i", "--input", help="file of id lines (default: stdin)")
        if name in ("score", "greedy"):
            p.add_argument("--batch", action="store_true",
                           help="run all lines as one left-padded batch")
        if name == "greedy":
            p.add_argument("-n", type=int, required=True, help="tokens to generate")
            p.add_argument("--margins", action="store_true",
                           help="append TAB + top1-top2 logit margin per step")
            p.add_argument("--no-cache", action="store_true",
                           help="recompute the whole sequence at each step")
    a = ap.parse_args(argv)
    try:
        model = Model(a.model)
        if a.cmd == "info":
            print(model.cfg.describe())
            for k in sorted(model.W):
                print("%s\t%s" % (k, list(model.W[k].shape)))
            return 0
        if a.input:
            with open(a.input) as f:
                lines = read_id_lines(f)
        else:
            lines = read_id_lines(sys.stdin)
        # validate every line first, so an error names the input line
        for ln, s in enumerate(lines, 1):
            model.check_ids(s, "input line %d" % ln)
            fed = {"score": len(s) - 1, "logits": len(s),
                   "greedy": len(s) + getattr(a, "n", 0) - 1}[a.cmd]
            if fed > model.cfg.max_pos:
                raise RefError("input line %d: %d tokens need %d positions, more than "
                               "max_position_embeddings (%d)" % (ln, len(s), fed, model.cfg.max_pos))
        out = []
        if a.cmd == "score":
            if a.batch:
                idx = [i for i, s in enumerate(lines) if s]
                res = dict(zip(idx, model.score_batch([lines[i] for i in idx]) if idx else []))
                out = [fmt(res[i]) if i in res else "" for i in range(len(lines))]
            else:
                out = [fmt(model.score(s)) if s else "" for s in lines]
        elif a.cmd == "greedy":
            if a.n < 0:
                raise RefError("-n must be >= 0")
            idx = [i for i, s in enumerate(lines) if s]
            res = {}
            if a.batch and idx:
                res = dict(zip(idx, model.greedy_batch([lines[i] for i in idx], a.n,
                                                       not a.no_cache)))
            else:
                for i in idx:
                    res[i] = model.greedy(lines[i], a.n, not a.no_cache)
            for i in range(len(lines)):
                if i not in res:
                    out.append("")
                    continue
                g, m = res[i]
                s = " ".join(str(t) for t in g)
                if a.margins:
                    s += "\t" + fmt(m)
                out.append(s)
        elif a.cmd == "logits":
            for s in lines:
                if not s:
                    out.append("")
                    continue
                model.check_ids(s)
                h, _ = model.forward(np.asarray([s]), np.ones((1, len(s)), dtype=np.int64))
                out.append(fmt(model.logits(h[0, -1:])[0]))
        sys.stdout.write("".join(o + "\n" for o in out))
        return 0
    except RefError as e:
        sys.stderr.write("ref_opt: error: %s\n" % e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
