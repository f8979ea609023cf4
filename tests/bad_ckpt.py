#!/usr/bin/python3
"""Write broken Hugging Face OPT checkpoint directories for bad-input tests.

  /usr/bin/python3 tests/bad_ckpt.py OUTDIR [--vocab V]

Each case is a subdirectory OUTDIR/NAME holding an otherwise valid tiny OPT checkpoint
(made with mkckpt.py: hidden 16, 2 layers, 4 heads, ffn 32, max positions 32, vocab V
(default 50272, the real OPT vocab size, so token ids of the real tokenizer are in range),
f16 weights, config.json, vocab.json, merges.txt) with exactly one defect.  A loader
must refuse every one of them with a clear message and a non-zero exit, never crash.
On stdout one line per case: the directory path, a TAB, and a one-line description.
Use mkckpt.py with the same sizes for a valid control checkpoint.
"""

import argparse
import json
import os
import pickletools
import shutil
import sys
import types
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mkckpt  # noqa: E402

CASES = []


def case(name, desc):
    def deco(fn):
        CASES.append((name, desc, fn))
        return fn
    return deco


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------

def base_args(vocab):
    return types.SimpleNamespace(
        hidden=16, layers=2, heads=4, ffn=32, vocab=vocab, max_pos=32, embed_dim=0,
        post_ln=False, no_final_ln=False, no_bias=False, no_ln_affine=False, dtype="f16",
        format="safetensors", shards=1, prefix="model.decoder.", tie=True, seed=0, out=None)


def base_tensors(a):
    dt = mkckpt.DTYPES[a.dtype]
    order = [mkckpt.full_name(n, a.prefix) for n, _ in mkckpt.make_weights(a)]
    t = {mkckpt.full_name(n, a.prefix): (dt, mkckpt.from_f32(x, dt))
         for n, x in mkckpt.make_weights(a)}
    return t, order


def write_base(d, a, fmt="safetensors", shards=1, tensors=None):
    """Valid checkpoint in d; returns the list of weight files written."""
    os.makedirs(d, exist_ok=True)
    mkckpt.write_config(d, mkckpt.make_config(a))
    mkckpt.copy_tokenizer(d)
    t, order = base_tensors(a)
    if tensors is not None:
        t = tensors
        order = [n for n in order if n in t] + sorted(set(t) - set(order))
    return mkckpt.write_weights(d, t, fmt, shards, order)


def st_read(path):
    with open(path, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def st_write(path, header, body):
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little") + hb + body)


def st_rebuild(path, change):
    """Rewrite a safetensors file from its entries; change(entries) edits the list of
    [name, dtype, shape, bytes] before the offsets are recomputed."""
    header, body = st_read(path)
    meta = header.pop("__metadata__", None)
    entries = [[k, v["dtype"], v["shape"], body[v["data_offsets"][0]:v["data_offsets"][1]]]
               for k, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])]
    change(entries)
    new = {"__metadata__": meta} if meta is not None else {}
    off, chunks = 0, []
    for name, dt, shape, b in entries:
        new[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(b)]}
        off += len(b)
        chunks.append(b)
    st_write(path, new, b"".join(chunks))


def rezip(src, dst, replace):
    """Copy a torch zip checkpoint, replacing some members' bytes; members stay stored
    (uncompressed) with their data 64-byte aligned like torch.save, CRCs consistent."""
    zin = zipfile.ZipFile(src)
    items = [(i.filename, replace.get(i.filename, None)) for i in zin.infolist()]
    tmp = dst + ".tmp"
    with open(tmp, "wb") as raw:
        with zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as zout:
            for name, new in items:
                data = zin.read(name) if new is None else new
                zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                zi.compress_type = zipfile.ZIP_STORED
                start = raw.tell() + 30 + len(name.encode())
                pad = (-(start + 4)) % 64
                zi.extra = b"FB" + pad.to_bytes(2, "little") + b"Z" * pad
                zout.writestr(zi, data)
    zin.close()
    os.replace(tmp, dst)


def pkl_member(path):
    with zipfile.ZipFile(path) as z:
        name = [n for n in z.namelist() if n.endswith("/data.pkl")][0]
        return name, z.read(name)


def opcode_boundary(pkl, frac):
    """Offset of the first pickle opcode at or after frac * len(pkl)."""
    for op, arg, pos in pickletools.genops(pkl):
        if pos >= frac * len(pkl):
            return pos
    raise RuntimeError("no opcode found")


def H(a):
    return a.hidden


# ---------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------

@case("st_short", "model.safetensors shorter than the 8-byte header length")
def _(d, a):
    write_base(d, a)
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00")


@case("st_hdrlen", "safetensors header length larger than the file")
def _(d, a):
    write_base(d, a)
    p = os.path.join(d, "model.safetensors")
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.write((size * 2).to_bytes(8, "little"))


@case("st_hdrhuge", "safetensors header length 2^63 (overflow bait)")
def _(d, a):
    write_base(d, a)
    with open(os.path.join(d, "model.safetensors"), "r+b") as f:
        f.write((1 << 63).to_bytes(8, "little"))


@case("st_badjson", "safetensors header is not valid JSON")
def _(d, a):
    write_base(d, a)
    p = os.path.join(d, "model.safetensors")
    with open(p, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n // 2)
        f.write(b"}{\"")


@case("st_offsets", "tensor data_offsets run past the end of the file")
def _(d, a):
    write_base(d, a)
    p = os.path.join(d, "model.safetensors")
    header, body = st_read(p)
    name = "model.decoder.layers.1.fc2.weight"
    b, e = header[name]["data_offsets"]
    header[name]["data_offsets"] = [len(body) + 4096, len(body) + 4096 + (e - b)]
    st_write(p, header, body)


@case("st_offsets_size", "tensor data_offsets span does not match its shape and dtype")
def _(d, a):
    write_base(d, a)
    p = os.path.join(d, "model.safetensors")
    header, body = st_read(p)
    name = "model.decoder.layers.0.fc1.weight"
    b, e = header[name]["data_offsets"]
    header[name]["data_offsets"] = [b, b + (e - b) // 2]
    st_write(p, header, body)


@case("st_overlap", "two tensors' data_offsets cover the same bytes (the rest of the file is a gap)")
def _(d, a):
    write_base(d, a)
    p = os.path.join(d, "model.safetensors")
    header, body = st_read(p)
    header["model.decoder.layers.1.fc2.weight"]["data_offsets"] = header["model.decoder.layers.1.fc1.weight"]["data_offsets"]
    st_write(p, header, body)


@case("st_tail", "8 bytes after the last tensor's data, which no data_offsets cover")
def _(d, a):
    write_base(d, a)
    p = os.path.join(d, "model.safetensors")
    header, body = st_read(p)
    st_write(p, header, body + b"\0" * 8)


@case("st_dtype_f8", "a tensor with dtype F8_E4M3 (unsupported), consistent size")
def _(d, a):
    write_base(d, a)

    def ch(entries):
        for e in entries:
            if e[0] == "model.decoder.layers.0.self_attn.q_proj.bias":
                e[1], e[3] = "F8_E4M3", bytes(np.full(H(a), 0x38, np.uint8))
    st_rebuild(os.path.join(d, "model.safetensors"), ch)


@case("st_dtype_i64", "a tensor with dtype I64 (not a float type), consistent size")
def _(d, a):
    write_base(d, a)

    def ch(entries):
        for e in entries:
            if e[0] == "model.decoder.layers.0.fc2.bias":
                e[1], e[3] = "I64", np.arange(H(a), dtype="<i8").tobytes()
    st_rebuild(os.path.join(d, "model.safetensors"), ch)


@case("shape_qproj", "q_proj.weight of layer 0 has the wrong size (hidden/2 x hidden)")
def _(d, a):
    t, _ = base_tensors(a)
    n = "model.decoder.layers.0.self_attn.q_proj.weight"
    t[n] = (t[n][0], np.ascontiguousarray(t[n][1][: H(a) // 2]))
    write_base(d, a, tensors=t)


@case("shape_fc1_T", "fc1.weight of layer 1 stored transposed (hidden x ffn)")
def _(d, a):
    t, _ = base_tensors(a)
    n = "model.decoder.layers.1.fc1.weight"
    t[n] = (t[n][0], np.ascontiguousarray(t[n][1].T))
    write_base(d, a, tensors=t)


@case("shape_vocab", "embed_tokens has one row fewer than config vocab_size")
def _(d, a):
    t, _ = base_tensors(a)
    n = "model.decoder.embed_tokens.weight"
    t[n] = (t[n][0], np.ascontiguousarray(t[n][1][:-1]))
    write_base(d, a, tensors=t)


@case("shape_positions", "embed_positions has max_position_embeddings rows (no +2 offset)")
def _(d, a):
    t, _ = base_tensors(a)
    n = "model.decoder.embed_positions.weight"
    t[n] = (t[n][0], np.ascontiguousarray(t[n][1][:-2]))
    write_base(d, a, tensors=t)


@case("missing_tensor", "layers.1.fc2.weight is absent")
def _(d, a):
    t, _ = base_tensors(a)
    del t["model.decoder.layers.1.fc2.weight"]
    write_base(d, a, tensors=t)


@case("missing_layer", "config says 3 layers, the weights have 2")
def _(d, a):
    write_base(d, a)
    cfg = mkckpt.make_config(a)
    cfg["num_hidden_layers"] = 3
    mkckpt.write_config(d, cfg)


@case("no_config", "config.json is missing")
def _(d, a):
    write_base(d, a)
    os.remove(os.path.join(d, "config.json"))


@case("config_notjson", "config.json is not JSON")
def _(d, a):
    write_base(d, a)
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write('{"hidden_size": 16, "num_hidden_layers": 2,\n  this is not json\n')


@case("config_gelu", "config.json activation_function \"gelu\" (only relu is OPT)")
def _(d, a):
    write_base(d, a)
    cfg = mkckpt.make_config(a)
    cfg["activation_function"] = "gelu"
    mkckpt.write_config(d, cfg)


@case("config_heads", "config.json hidden_size not divisible by num_attention_heads")
def _(d, a):
    write_base(d, a)
    cfg = mkckpt.make_config(a)
    cfg["num_attention_heads"] = 3
    mkckpt.write_config(d, cfg)


@case("no_weights", "config.json but no weight files")
def _(d, a):
    os.makedirs(d, exist_ok=True)
    mkckpt.write_config(d, mkckpt.make_config(a))
    mkckpt.copy_tokenizer(d)


@case("bin_truncated", "pytorch_model.bin cut to 60% of its size (zip directory lost)")
def _(d, a):
    write_base(d, a, fmt="bin")
    p = os.path.join(d, "pytorch_model.bin")
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.truncate(size * 6 // 10)


@case("bin_notzip", "pytorch_model.bin holds random bytes, not a zip archive")
def _(d, a):
    write_base(d, a, fmt="bin")
    p = os.path.join(d, "pytorch_model.bin")
    size = os.path.getsize(p)
    with open(p, "wb") as f:
        f.write(np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8).tobytes())


@case("bin_badpickle", "pytorch_model.bin: data.pkl has an invalid opcode (0xff) mid-stream")
def _(d, a):
    write_base(d, a, fmt="bin")
    p = os.path.join(d, "pytorch_model.bin")
    name, pkl = pkl_member(p)
    at = opcode_boundary(pkl, 0.5)
    rezip(p, p, {name: pkl[:at] + b"\xff" + pkl[at + 1:]})


@case("bin_pickle_cut", "pytorch_model.bin: data.pkl ends mid-stream (no STOP opcode)")
def _(d, a):
    write_base(d, a, fmt="bin")
    p = os.path.join(d, "pytorch_model.bin")
    name, pkl = pkl_member(p)
    rezip(p, p, {name: pkl[:opcode_boundary(pkl, 0.5)]})


@case("bin_unknown_global", "pytorch_model.bin: pickle calls an unknown global "
                            "torch._utils._rebuild_nonexistent")
def _(d, a):
    write_base(d, a, fmt="bin")
    p = os.path.join(d, "pytorch_model.bin")
    name, pkl = pkl_member(p)
    old = b"torch._utils\n_rebuild_tensor_v2\n"
    assert old in pkl
    rezip(p, p, {name: pkl.replace(old, b"torch._utils\n_rebuild_nonexistent\n", 1)})


@case("bin_missing_storage", "pytorch_model.bin: a tensor's storage record is absent")
def _(d, a):
    write_base(d, a, fmt="bin")
    p = os.path.join(d, "pytorch_model.bin")
    with zipfile.ZipFile(p) as z:
        names = z.namelist()
    victim = [n for n in names if "/data/" in n][3]
    tmp = p + ".x"
    with zipfile.ZipFile(p) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zout:
        for n in names:
            if n != victim:
                zout.writestr(zipfile.ZipInfo(n, date_time=(1980, 1, 1, 0, 0, 0)), zin.read(n))
    os.replace(tmp, p)


@case("index_missing_shard", "model.safetensors.index.json names a shard file that is absent")
def _(d, a):
    files = write_base(d, a, shards=3)
    os.remove(os.path.join(d, files[1]))


@case("bin_index_missing_shard", "pytorch_model.bin.index.json names a shard file that is absent")
def _(d, a):
    files = write_base(d, a, fmt="bin", shards=2)
    os.remove(os.path.join(d, files[1]))


@case("index_notjson", "model.safetensors.index.json is not JSON")
def _(d, a):
    write_base(d, a, shards=2)
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        f.write('{"metadata": {"total_size": 12}, "weight_map": {')


@case("index_wrong_shard", "index maps a tensor to a shard that does not hold it")
def _(d, a):
    files = write_base(d, a, shards=2)
    p = os.path.join(d, "model.safetensors.index.json")
    with open(p) as f:
        idx = json.load(f)
    idx["weight_map"]["model.decoder.embed_tokens.weight"] = files[1]
    with open(p, "w") as f:
        json.dump(idx, f, indent=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--vocab", type=int, default=50272)
    a = ap.parse_args()
    os.makedirs(a.outdir, exist_ok=True)
    for name, desc, fn in CASES:
        d = os.path.join(a.outdir, name)
        if os.path.isdir(d):
            shutil.rmtree(d)
        fn(d, base_args(a.vocab))
        print("%s\t%s" % (d, desc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
