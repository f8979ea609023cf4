#!/usr/bin/env python3
"""tests/fuzz/make_inputs.py [OPT]: writes the seed corpora (tests/fuzz/corpus/TARGET/) and the
regression inputs (tests/fuzz/regress/TARGET/) that are committed, all small and by hand, the
native file through `OPT convert` (default ./opt) of a tiny checkpoint written here.

Each regression input is one hostile-checkpoint class of issue 14 (or a crash the fuzzers
found): the fixed readers must reject it with one line; the old ones crashed, tripped a
sanitizer or accepted it. Run from anywhere; rerunning rewrites the same bytes."""
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OPT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "opt")


def put(kind, target, name, data):
    d = os.path.join(HERE, kind, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


# --- safetensors -------------------------------------------------------------------

def st(header, body=b"", pad=True):
    """A safetensors file from a header dict (or raw header bytes) and the data."""
    h = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + body


def st_tensors(tensors, meta=None):
    """tensors: [(name, dtype, shape, bytes)] laid out in order."""
    hdr, off, body = {"__metadata__": meta or {"format": "pt"}}, 0, b""
    for name, dt, shape, data in tensors:
        hdr[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
        body += data
    return st(hdr, body)


F32x2 = struct.pack("<2f", 1.0, -2.0)

# --- torch.save zip + pickle ---------------------------------------------------------


def pk_str(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def pk_int(v):
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if -2**31 <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    return b"\x8a\x08" + struct.pack("<q", v) if v < 2**63 else b"\x8a\x08" + struct.pack("<Q", v)


def pk_tuple(items):
    return b"(" + b"".join(items) + b"t"


def pk_tensor(key, storage_type, numel, offset, shape, stride):
    """torch._utils._rebuild_tensor_v2(persistent storage, offset, size, stride, False, OrderedDict())"""
    storage = pk_tuple([pk_str("storage"), b"ctorch\n%s\n" % storage_type.encode(), pk_str(key), pk_str("cpu"), pk_int(numel)]) + b"Q"
    return (b"ctorch._utils\n_rebuild_tensor_v2\n" +
            pk_tuple([storage, pk_int(offset), pk_tuple([pk_int(s) for s in shape]), pk_tuple([pk_int(s) for s in stride]),
                      b"\x89", b"ccollections\nOrderedDict\n)R"]) + b"R")


def pk_state_dict(entries):
    """entries: [(name, tensor pickle)] -> an OrderedDict pickle (protocol 2)"""
    return (b"\x80\x02ccollections\nOrderedDict\n)R(" + b"".join(pk_str(n) + t for n, t in entries) + b"u.")


def torch_zip(pkl, storages):
    """The zip torch.save writes: archive/data.pkl and archive/data/KEY, stored (dated 1980, so
    that a rerun writes the same bytes)."""
    import io
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr(zipfile.ZipInfo("archive/data.pkl"), pkl)
        for k, v in storages.items():
            z.writestr(zipfile.ZipInfo("archive/data/%s" % k), v)
    return buf.getvalue()


def tiny_bin():
    f16 = struct.pack("<6e", 1, 2, 3, 4, 5, 6)
    return torch_zip(pk_state_dict([
        ("model.decoder.a", pk_tensor("0", "FloatStorage", 2, 0, [2], [1])),
        ("model.decoder.b", pk_tensor("1", "HalfStorage", 6, 0, [2, 3], [3, 1])),
        ("model.decoder.c", pk_tensor("1", "HalfStorage", 6, 3, [3], [1])),
    ]), {"0": F32x2, "1": f16})


# --- native files ---------------------------------------------------------------------

CONFIG = {"architectures": ["OPTForCausalLM"], "model_type": "opt", "hidden_size": 32, "num_hidden_layers": 1,
          "num_attention_heads": 2, "ffn_dim": 32, "vocab_size": 16, "max_position_embeddings": 4,
          "word_embed_proj_dim": 32, "do_layer_norm_before": True, "enable_bias": True,
          "layer_norm_elementwise_affine": True, "tie_word_embeddings": True, "bos_token_id": 2,
          "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "float16"}


def tiny_checkpoint(d):
    """A Hugging Face directory of CONFIG's shape, f16 weights (opt convert's input)."""
    H, F, V, P = 32, 32, 16, 4 + 2
    shapes = {"embed_tokens.weight": [V, H], "embed_positions.weight": [P, H],
              "final_layer_norm.weight": [H], "final_layer_norm.bias": [H]}
    for n, s in [("self_attn.q_proj", [H, H]), ("self_attn.k_proj", [H, H]), ("self_attn.v_proj", [H, H]),
                 ("self_attn.out_proj", [H, H]), ("fc1", [F, H]), ("fc2", [H, F])]:
        shapes["layers.0.%s.weight" % n] = s
        shapes["layers.0.%s.bias" % n] = [s[0]]
    for n in ["self_attn_layer_norm", "final_layer_norm"]:
        shapes["layers.0.%s.weight" % n] = [H]
        shapes["layers.0.%s.bias" % n] = [H]
    tensors = []
    for i, (n, s) in enumerate(sorted(shapes.items())):
        k = s[0] * (s[1] if len(s) > 1 else 1)
        vals = [((i * 7 + j * 13) % 17 - 8) / 64 for j in range(k)]
        tensors.append(("model.decoder." + n, "F16", s, struct.pack("<%de" % k, *vals)))
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(st_tensors(tensors))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(CONFIG, f)


def native_header(formats, tensors, config=None):
    meta = {"format": "opt", "opt.version": "1", "opt.config": json.dumps(config or CONFIG), "opt.formats": json.dumps(formats)}
    return st_tensors(tensors, meta)


def main():
    for kind in ("corpus", "regress"):
        shutil.rmtree(os.path.join(HERE, kind), ignore_errors=True)
    tmp = tempfile.mkdtemp()
    try:
        seeds(tmp)
        regress()
    finally:
        shutil.rmtree(tmp)


def seeds(tmp):
    # json / config
    put("corpus", "json", "config", json.dumps(CONFIG, indent=1))
    put("corpus", "json", "escapes", '{"a": [1, -2.5e3, true, false, null], "b": "\\u00e9\\ud83d\\ude00\\n\\"", "c": {}}')
    # safetensors
    put("corpus", "safetensors", "tiny", st_tensors([("model.decoder.a", "F32", [2], F32x2),
                                                     ("model.decoder.b", "F16", [2, 1], struct.pack("<2e", 1, 2)),
                                                     ("model.decoder.c", "BF16", [1], b"\x80\x3f")]))
    # bin
    put("corpus", "bin", "tiny", tiny_bin())
    # index
    put("corpus", "index", "two", json.dumps({"metadata": {"total_size": 16},
                                              "weight_map": {"model.decoder.a": "a.safetensors", "model.decoder.b": "b.safetensors"}}))
    # native: opt convert of a tiny checkpoint, f16 and 4-bit
    ck = os.path.join(tmp, "ck")
    os.makedirs(ck)
    tiny_checkpoint(ck)
    for name, extra in (("f16", []), ("q4", ["--int4-weights", "--group-size", "32"])):
        out = os.path.join(tmp, name + ".opt")
        subprocess.run([OPT, "convert", "-m", ck, "-o", out] + extra, check=True, stderr=subprocess.DEVNULL)
        put("corpus", "native", name, open(out, "rb").read())
    # tok: built-in tokenizer text, and a tiny vocab\0merges\0text
    put("corpus", "tok", "text", "Hello, world! It's 2026 — naïve café 😀 </s>  tabs\tand\nnewlines<pad>")
    vocab = {"a": 0, "b": 1, "ab": 2, "Ġ": 3, "Ġab": 4, "</s>": 5, "<pad>": 6}
    put("corpus", "tok", "custom", json.dumps(vocab) + "\0#version: 0.2\na b\nĠ ab\n\0ab ab</s>ba")
    # lines: text with escapes, ids
    put("corpus", "lines", "mixed", "Hello\\tworld\\n\n2 100 200, 300\n\n\\\\ caf\xc3\xa9\n")
    # mps
    put("corpus", "mps", "small", "NAME small\nROWS\n N obj\n L c1\n G c2\n E c3\nCOLUMNS\n x obj 1 c1 1\n x c2 1\n"
        " y obj 2 c1 1\n y c3 1\nRHS\n rhs c1 4 c2 1\n rhs c3 2\nRANGES\n rng c1 2\nBOUNDS\n UP bnd x 3\n MI bnd y\nENDATA\n")
    # probe
    put("corpus", "probe", "cpu", json.dumps({"format": "opt-probe-1", "gpu": False, "cpu_mem": 16 << 30, "disk_mem": 100 << 30,
                                              "disk_read_bw": 2e9, "disk_write_bw": 2e9, "cpu_gemv_bw": 8e9,
                                              "cpu_gemv_q4_bw": 4e9, "cpu_gemm_flops_g": 50e9, "cpu_gemm_flops_p": 80e9,
                                              "cpu_mem_bw": 8e9, "layer_overhead": 1e-4}))
    # jobs: the mode byte (targets.c: 1 --jsonl, 2 --ids, 4 score, 8 --truncate left, 16-48 -n, 64 a small
    # vocabulary), then the prompt file
    put("corpus", "jobs", "text", b"\x10" + "Hello\\tworld\n\ncaf\u00e9 </s> 😀\n".encode())
    put("corpus", "jobs", "jsonl", b"\x15" + b'{"prompt": "Hi there"}\n  \n{"ids": [2, 100, 7]}\n{"prompt": ""}\n')
    put("corpus", "jobs", "ids", b"\x16" + b"2 100 200, 300\n2\n")
    put("corpus", "jobs", "truncate", b"\x18" + b" ".join([b"word"] * 80) + b"\n")
    # policy: opt plan --eval's words
    put("corpus", "policy", "offload", "--percent 20 80 0 100 0 100 --gpu-batch-size 48 --num-gpu-batches 3 --cpu-attention")
    put("corpus", "policy", "largest-block", "--gpu-batch-size 1024 --num-gpu-batches 1024 --percent 0 100 0 100 0 100")
    put("corpus", "policy", "flags", "--compress-weight --compress-cache --pin-weights --no-overlap\t--percent 100 0 100 0 100 0")
    # args: generate's flags, NUL-separated
    put("corpus", "args", "offload", "\0".join(["--percent", "0", "50", "0", "100", "0", "100", "--gpu-batch-size", "4",
                                                "--num-gpu-batches", "2", "--cpu-mem", "1.5G", "--disk-mem", "100MiB",
                                                "-b", "8", "--temperature", "0.7", "--group-size", "64"]))


def regress():
    # 1. .bin: a storage of 2^62 f32 elements: numel * 4 wraps to 0 and passed the size check;
    #    the tensor's offset then pointed 8 EiB past the mapping (SIGSEGV on the first read)
    put("regress", "bin", "storage-length-wrap", torch_zip(pk_state_dict([
        ("model.decoder.a", pk_tensor("0", "FloatStorage", 2**62, 2**61, [2], [1]))]), {"0": F32x2}))
    # 2. zip64 locator at offset 2^64 - 8: `z + 56 > n` wrapped and the reader read before the mapping
    z = tiny_bin()
    eocd = z.rindex(b"PK\x05\x06")
    loc = b"PK\x06\x07" + struct.pack("<IQI", 0, 2**64 - 8, 1)
    put("regress", "bin", "zip64-locator-wrap", z[:eocd] + loc + z[eocd:])
    # 3. _rebuild_from_type_v2 nested 5000 deep: the pickle machine recursed until the stack overflowed
    g = b"ctorch._tensor\n_rebuild_from_type_v2\nq\x00"
    deep = b"\x80\x02" + g + b")q\x01" + b"h\x00Nh\x01\x87q\x01" * 5000 + b"h\x00h\x01R."
    put("regress", "bin", "pickle-depth", torch_zip(deep, {}))
    # 4. .bin shape product overflow (signed): [2^32, 2^32] with 0 storage elements
    put("regress", "bin", "shape-overflow", torch_zip(pk_state_dict([
        ("model.decoder.a", pk_tensor("0", "FloatStorage", 0, 0, [2**32, 2**32], [2**32, 1]))]), {"0": b""}))
    # 5. .bin offset + numel overflow (signed): offset 2^63 - 1
    put("regress", "bin", "offset-overflow", torch_zip(pk_state_dict([
        ("model.decoder.a", pk_tensor("0", "FloatStorage", 2, 2**63 - 1, [2], [1]))]), {"0": F32x2}))
    # 6. the error message for a short storage computed numel * 4 in int64: overflow
    put("regress", "bin", "message-size-overflow", torch_zip(pk_state_dict([
        ("model.decoder.a", pk_tensor("0", "FloatStorage", 2**62 + 1, 0, [2], [1]))]), {"0": b""}))
    # 7. safetensors shape product overflow: [2^32, 2^32] F32 "fits" 0 data bytes
    put("regress", "safetensors", "shape-overflow", st({"model.decoder.a": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}))
    put("regress", "safetensors", "shape-overflow-4d", st({"model.decoder.a": {"dtype": "F16", "shape": [10**12] * 4, "data_offsets": [0, 0]}}))
    # 8. no tensors at all: qsort(NULL, 0)
    put("regress", "safetensors", "no-tensors", st({"__metadata__": {"format": "pt"}}))
    # 9. header of 9 bytes: the F32 data starts misaligned (typed loads of F16/F32 data, int8 scales)
    put("regress", "safetensors", "misaligned-data", st(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', F32x2, pad=False))
    # 10. the format's tiling: overlapping tensors, a gap, a tail, fractional offsets
    two = lambda a, b, body: st({"model.decoder.a": {"dtype": "F32", "shape": [1], "data_offsets": a},
                                 "model.decoder.b": {"dtype": "F32", "shape": [1], "data_offsets": b}}, body)
    put("regress", "safetensors", "overlap", two([0, 4], [0, 4], F32x2))
    put("regress", "safetensors", "gap", two([0, 4], [8, 12], F32x2 + F32x2[:4]))
    put("regress", "safetensors", "tail", two([0, 4], [4, 8], F32x2 + b"\0" * 8))
    put("regress", "safetensors", "fractional-offsets", two([0, 4], [4.5, 8.5], F32x2 + b"\0"))
    put("regress", "safetensors", "offsets-past-end", two([0, 4], [4, 2**64 + 4], F32x2))
    # 11. native file: "group" 1e300 converted to int before its range check
    q4 = struct.pack("<B", 0) * 16 * 20
    put("regress", "native", "group-float", native_header({"embed_tokens.weight": {"format": "q4", "group": 1e300, "cols": 32}},
                                                          [("embed_tokens.weight", "U8", [16, 20], q4)]))
    # 12. native int8 weights whose f32 scales start misaligned (an odd number of int8 bytes before them)
    put("regress", "native", "misaligned-scale", native_header(
        {"embed_tokens.weight": {"format": "i8", "act_scale": 0.5}},
        [("embed_tokens.weight", "I8", [1, 3], b"\1\2\3"), ("embed_tokens.weight.scale", "F32", [1], F32x2[:4])]))
    # 13. native act_scale beyond float's range (float conversion overflow)
    put("regress", "native", "act-scale-float", native_header(
        {"embed_tokens.weight": {"format": "i8", "act_scale": 1e300}},
        [("embed_tokens.weight", "I8", [16, 32], b"\1" * 512), ("embed_tokens.weight.scale", "F32", [16], F32x2 * 8)]))
    # 14. opt plan --eval took a block of 2^20 x 2^20 sequences: the cost model's int product overflowed
    put("regress", "policy", "block-overflow", "--gpu-batch-size 1048576 --num-gpu-batches 1048576")


if __name__ == "__main__":
    main()
