#!/usr/bin/python3
"""4-bit group-wise compression tests (issue 6): the format, convert, --compress-weight/-cache.

    tests/test_q4.py [--opt ./opt] [--cc cc] [--tmp DIR] [--keep] [--only NAME,...] [--seed S]

Run from anywhere with /usr/bin/python3 (numpy). One line per check ("ok"/"FAIL"), report lines
("   ..") for the measured numbers, and "test_q4: N passed, M failed, K skipped" last; the exit status is 0
only when every check passed.

The numpy implementation of the scheme below (q4_quantize / q4_dequantize) is written from
quant.c's description of the format, not by calling opt:
  * a row of K values is ceil(K/G) blocks, G in {32, 64, 128}: [f16 scale][f16 min][G/2 bytes];
  * min = the group's minimum, scale = (max - min) / 15 (in f32), both rounded to f16 (nearest
    even) first; code = clamp(rint((x - min16) / scale16), 0, 15) in f32 with those rounded
    values; a group whose f16 scale is 0 (constant) stores codes 0;
  * value = fmaf(code, scale16, min16): one rounding. (Here in float64, where code * scale +
    min is exact: every f16 is a multiple of 2^-24 below 2^16, so the sum needs < 45 bits;
    the cast to float32 is then the one rounding of fmaf.)
  * codes of 16 consecutive elements (a kernel step) form a little-endian 64-bit word, element
    e at bit 4 * (e // 2) + 32 * (e % 2): the even elements in the low half, the odd ones in
    the high half, so one 64-bit broadcast and a shift per 32-bit lane puts each code in its
    lane. Padding past the row's end has code 0.
  * Ties between equal minima -0.0 and +0.0 go to the first in the row (a scan).

Sections:
  kernels   builds tests/test_q4.c (includes opt.c) and runs it with a fresh seed: fused 4-bit
            GEMM == dequantize + f32 GEMM bit for bit at every SIMD level and M in 1..70 (tile
            and lane paths), across levels and batch sizes; 4-bit attention vs f32 attention;
            quantize/dequantize round trip within half a step. One check per C group.
  rows      q4_quantize_row / q4_dequantize_row (through test_q4.c's helper modes) against the
            numpy scheme on crafted rows: rint ties, f16 subnormal min and scale, a scale that
            underflows to 0, values at the f16 limit, signed zeros, constant and partial groups.
  format    `opt convert --int4-weights --group-size G` (G = 32, 64, 128) of f16, bf16 and
            f32 synthetic checkpoints (hidden 80 and 40, ffn 144 and 100: the last group of a
            row is partial; an untied lm_head): the container (header, "opt.formats",
            "opt.config", U8 tensors [rows, row_bytes]), every quantized byte (codes, f16
            scale and min) equal to numpy's, the dequantized floats (opt's own dequantizer on
            opt's bytes) equal to numpy's bit for bit, the position table and 1-D tensors kept.
  constant  a checkpoint with crafted constant groups (a whole row, a first group, the partial
            last group, zeros) and, in f32, a near-constant group whose scale underflows, a
            subnormal-range group and rint ties: exact against numpy; constant groups have
            scale 0, codes 0 and dequantize exactly to min; the model scores finitely.
  errors    NaN, +Inf, -Inf in a weight (f16, bf16, f32; one element, and a whole embedding,
            where every thread meets one: 40 runs, for the race of two threads dying at once)
            and a value beyond f16's range: convert and score --compress-weight exit 1 with one
            line naming the tensor, no crash, no FILE.partial left, an existing FILE untouched;
            an infinite activation reaching the 4-bit KV cache: exit 0, or exit 1 with one line.
  equiv     score with --compress-weight equals score of the converted file byte for byte
            (every dtype and group size); the converted file scores identically at every SIMD
            level and batch size; `opt info` names the format. Peak RSS of score
            --compress-weight (checkpoint and dummy:) within 1.2x that of the native 4-bit
            file: the f16 pages are dropped as each band of rows is quantized.
  cache     --compress-cache: identical under a policy (--percent 0 50 0 50 0 100
            --gpu-batch-size 2, with and without 4-bit weights), at every SIMD level and batch
            size; head_dim 16 (cache group 16) and 64.
  oracle    opt score with 4-bit weights, cache and both equals tests/ref_opt.py (the independent
            numpy OPT) run on the dequantized weights and with keys/values quantized per
            (position, head) row by the numpy scheme: most tokens to f32 rounding, while 4-bit
            moves the log-probs by far more (head_dim 16, 20, 32: cache groups 16 and 32).
  int8      --compute int8 (W4A8) equals ref_opt.py with the weights dequantized and every
            GEMM input on them (the linears, the logits) quantized to int8 per group by numpy
            (G 32, 64, 128); the same bytes at every batch size, thread count and step size, from
            --compress-weight as from the converted file, and under an offloading policy (the
            stored layout) as without (the interleaved one); generate batched == one at a
            time; float weights and a CPU without VNNI are refused with one line.
  accuracy  score with 4-bit weights, 4-bit cache and both against the fp16 run on a synthetic
            model: mean/max |d log-prob| and the perplexity change are printed; loose sanity
            bounds only (random weights are incompressible noise: see bench/q4.sh).
"""
import argparse
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT = int(os.environ.get('OPT_TEST_TIMEOUT', '120'))
GROUPS = (32, 64, 128)

sys.path.insert(0, HERE)
import harness  # noqa: E402
from harness import check, section  # noqa: E402

ARGS = None


def report(text):
    for line in text.rstrip('\n').split('\n'):
        print('   .. %s' % line)
    sys.stdout.flush()


def run(argv, env=None, stdin=b''):
    return harness.run(argv, stdin=stdin, env=dict({'OPT_DEVICE': 'cpu'}, **(env or {})), timeout=TIMEOUT)


def opt(args, env=None):
    return run([ARGS.opt] + list(args), env)


def logprobs(text):
    return [np.array([float(v) for v in l.split()], dtype=np.float64) for l in text.split('\n') if l.strip()]


# ---------------------------------------------------------------------------------------
# safetensors, read and edited here (no library)
# ---------------------------------------------------------------------------------------

NP_DT = {'F32': np.float32, 'F16': np.float16, 'BF16': np.uint16, 'U8': np.uint8, 'I8': np.int8}


class SafeTensors:
    def __init__(self, path):
        with open(path, 'rb') as f:
            blob = f.read()
        n = struct.unpack('<Q', blob[:8])[0]
        self.header = json.loads(blob[8:8 + n].decode('utf-8'))
        self.meta = self.header.pop('__metadata__', {})
        self.base = 8 + n
        self.blob = bytearray(blob)
        self.hlen = n

    def names(self):
        return list(self.header)

    def info(self, name):
        return self.header[name]

    def raw(self, name):
        a, b = self.header[name]['data_offsets']
        return bytes(self.blob[self.base + a:self.base + b])

    def array(self, name):
        """stored array (BF16 as uint16 bits), shaped"""
        t = self.header[name]
        return np.frombuffer(self.raw(name), dtype=np.dtype(NP_DT[t['dtype']]).newbyteorder('<')).reshape(t['shape'])

    def f32(self, name):
        t = self.header[name]
        a = self.array(name)
        if t['dtype'] == 'BF16':
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32)

    def set_f32(self, name, values):
        """overwrite a tensor with float32 values, stored in its dtype (RNE)"""
        t = self.header[name]
        v = np.ascontiguousarray(values, dtype=np.float32).reshape(t['shape'])
        if t['dtype'] == 'BF16':
            u = v.view(np.uint32).astype(np.uint64)
            bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
            bits[np.isnan(v)] = (v.view(np.uint32)[np.isnan(v)] >> 16 | 0x40).astype(np.uint16)
            data = bits.tobytes()
        elif t['dtype'] == 'F16':
            with np.errstate(over='ignore'):
                data = v.astype('<f2').tobytes()
        else:
            data = v.astype('<f4').tobytes()
        a, b = t['data_offsets']
        assert len(data) == b - a
        self.blob[self.base + a:self.base + b] = data

    def save(self, path):
        with open(path, 'wb') as f:
            f.write(self.blob)


# ---------------------------------------------------------------------------------------
# the scheme in numpy (see the module docstring)
# ---------------------------------------------------------------------------------------

SHIFTS = np.array([4 * (e // 2) + 32 * (e % 2) for e in range(16)], dtype=np.uint64)


def q4_row_bytes(cols, G):
    return -(-cols // G) * (4 + G // 2)


def f16_bits(a):
    with np.errstate(over='ignore'):
        return np.asarray(a, dtype=np.float32).astype(np.float16).view(np.uint16)


class Q4Error(Exception):
    pass


def q4_quantize(W, G):
    """(rows, cols) float32 -> (rows, row_bytes) uint8; raises Q4Error on NaN/Inf or f16 overflow."""
    W = np.ascontiguousarray(W, dtype=np.float32)
    if W.ndim == 1:
        W = W[None]
    rows, cols = W.shape
    if not np.isfinite(W).all():
        raise Q4Error('non-finite value')
    nb = -(-cols // G)
    Wp = np.zeros((rows, nb * G), np.float32)
    Wp[:, :cols] = W
    Wg = Wp.reshape(rows, nb, G)
    valid = (np.arange(nb * G) < cols).reshape(nb, G)
    mn = np.where(valid, Wg, np.float32(np.inf)).min(axis=2)
    mx = np.where(valid, Wg, np.float32(-np.inf)).max(axis=2)
    with np.errstate(over='ignore', invalid='ignore'):
        sscale = f16_bits((mx - mn) / np.float32(15))
        smin = f16_bits(mn)
    # -0.0 vs +0.0 as the minimum: the first one in the row wins (a scan keeps it)
    zero = valid & (Wg == 0)
    first = np.argmax(zero, axis=2)
    neg = np.signbit(np.take_along_axis(Wg, first[..., None], axis=2)[..., 0])
    zmin = (mn == 0)
    smin = np.where(zmin, np.where(neg, np.uint16(0x8000), np.uint16(0)), smin).astype(np.uint16)
    fmin = smin.view(np.float16).astype(np.float32)
    fscale = sscale.view(np.float16).astype(np.float32)
    if not (np.isfinite(fmin).all() and np.isfinite(fscale).all()):
        raise Q4Error('beyond the f16 range')
    with np.errstate(divide='ignore', invalid='ignore'):
        q = np.rint((Wg - fmin[..., None]) / fscale[..., None])  # float32 throughout
    keep = valid[None] & (fscale[..., None] != 0)
    c = np.where(keep, np.clip(np.where(keep, q, 0), 0, 15), 0).astype(np.uint64)
    words = (c.reshape(rows, nb, G // 16, 16) << SHIFTS).sum(axis=3, dtype=np.uint64)
    out = np.empty((rows, nb, 4 + G // 2), np.uint8)
    out[..., 0:2] = sscale.astype('<u2').view(np.uint8).reshape(rows, nb, 2)
    out[..., 2:4] = smin.astype('<u2').view(np.uint8).reshape(rows, nb, 2)
    out[..., 4:] = words.astype('<u8').view(np.uint8).reshape(rows, nb, G // 2)
    return out.reshape(rows, nb * (4 + G // 2))


def q4_fields(Q, cols, G):
    """(rows, row_bytes) -> scale bits, min bits (rows, nb) and codes (rows, nb * G)"""
    Q = np.ascontiguousarray(Q, dtype=np.uint8)
    rows, nb = Q.shape[0], -(-cols // G)
    B = Q.reshape(rows, nb, 4 + G // 2)
    sb = np.ascontiguousarray(B[..., 0:2]).view('<u2')[..., 0]
    mb = np.ascontiguousarray(B[..., 2:4]).view('<u2')[..., 0]
    words = np.ascontiguousarray(B[..., 4:]).view('<u8')  # rows, nb, G/16
    codes = ((words[..., None] >> SHIFTS) & np.uint64(15)).reshape(rows, nb * G)
    return sb, mb, codes


def q4_dequantize(Q, cols, G):
    sb, mb, codes = q4_fields(Q, cols, G)
    rows, nb = sb.shape
    fs = sb.view(np.float16).astype(np.float64)
    fm = mb.view(np.float16).astype(np.float64)
    v = codes.reshape(rows, nb, G).astype(np.float64) * fs[..., None] + fm[..., None]  # exact
    return v.astype(np.float32).reshape(rows, nb * G)[:, :cols]


def first_diff(a, b, cols, G):
    """where two quantized matrices first differ, as text"""
    bs = 4 + G // 2
    idx = np.argwhere(a != b)
    r, byte = idx[0]
    blk, off = divmod(int(byte), bs)
    field = 'scale' if off < 2 else 'min' if off < 4 else 'codes (elements %d..%d)' % (blk * G + (off - 4) // 8 * 16, blk * G + (off - 4) // 8 * 16 + 15)
    return '%d bytes differ; first at row %d, block %d, %s: opt %s, numpy %s' % (
        len(idx), r, blk, field, a[r, blk * bs:(blk + 1) * bs].tobytes().hex(), b[r, blk * bs:(blk + 1) * bs].tobytes().hex())


def bits_equal(a, b):
    a = np.ascontiguousarray(a, np.float32)
    b = np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ---------------------------------------------------------------------------------------
# the C helper (tests/test_q4.c)
# ---------------------------------------------------------------------------------------

C_BIN = None
C_ENV = {'OMP_WAIT_POLICY': 'passive'}


C_PROC = None


def c_start(tmp):
    """compiles tests/test_q4.c in the background (the sections that need it wait in c_build)"""
    global C_PROC
    srcs = [os.path.join(ROOT, f) for f in sorted(os.listdir(ROOT)) if f.endswith('.c') and f not in ('opt.c', 'pipe.c')]  # pipe.c needs MPI
    out = os.path.join(tmp, 'test_q4')
    argv = [ARGS.cc, '-std=c11', '-O2', '-fopenmp', '-ffp-contract=off', '-D_GNU_SOURCE', '-DOPT_NO_MAIN', '-I' + ROOT,
            os.path.join(HERE, 'test_q4.c')] + srcs + ['-lm', '-lpthread', '-o', out]
    C_PROC = (subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT), out, argv)


def c_build(tmp):
    global C_BIN
    if C_BIN:
        return C_BIN
    if C_PROC is None:
        c_start(tmp)
    p, out, argv = C_PROC
    log = p.communicate(timeout=TIMEOUT)[0].decode('utf-8', 'replace')
    if p.returncode != 0:
        raise RuntimeError('tests/test_q4.c does not compile:\n%s\n%s' % (' '.join(argv), log[-1500:]))
    C_BIN = out
    return out


def c_quant(tmp, W, G):
    W = np.ascontiguousarray(W, np.float32)
    fi, fo = os.path.join(tmp, 'cq.in'), os.path.join(tmp, 'cq.out')
    W.astype('<f4').tofile(fi)
    r = run([C_BIN, 'quant', str(G), str(W.shape[1]), fi, fo], C_ENV)
    if r.rc != 0:
        raise RuntimeError(r.describe())
    return np.fromfile(fo, dtype=np.uint8).reshape(W.shape[0], q4_row_bytes(W.shape[1], G))


def c_dequant(tmp, Q, cols, G):
    fi, fo = os.path.join(tmp, 'cd.in'), os.path.join(tmp, 'cd.out')
    np.ascontiguousarray(Q, np.uint8).tofile(fi)
    r = run([C_BIN, 'dequant', str(G), str(cols), fi, fo], C_ENV)
    if r.rc != 0:
        raise RuntimeError(r.describe())
    return np.fromfile(fo, dtype='<f4').reshape(Q.shape[0], cols)


# ---------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------

class Fx:
    def __init__(self, tmp, seed):
        self.tmp = tmp
        self.seed = seed
        self.models = {}
        rng = random.Random(seed)
        # token ids: BOS then random ids; lengths 1..40 (score skips the first)
        self.ids = self.write('ids.txt', ''.join('2 ' + ' '.join(str(rng.randrange(3, 50272)) for _ in range(n)) + '\n'
                                                 for n in (1, 5, 17, 33, 40, 12)))
        self.ids_long = self.write('ids_long.txt', ''.join('2 ' + ' '.join(str(rng.randrange(3, 50272)) for _ in range(n)) + '\n'
                                                           for n in (63, 100, 7, 120, 90, 64, 31, 127)))

    def path(self, *p):
        return os.path.join(self.tmp, *p)

    def write(self, name, text):
        p = self.path(name)
        with open(p, 'w') as f:
            f.write(text)
        return p

    def synth(self, shape, dtype, extra=()):
        key = (shape, dtype, tuple(extra))
        if key not in self.models:
            d = self.path('synth-%s-%s%s' % (shape, dtype, ''.join(x.replace('-', '') for x in extra)))
            r = opt(['synth', '--shape', shape, '--dtype', dtype, '--seed', str(self.seed % 1000), '-o', d] + list(extra))
            if r.rc != 0:
                raise RuntimeError(r.describe())
            self.models[key] = d
        return self.models[key]

    def edited(self, src, name, edit):
        """a copy of checkpoint dir src with its weights edited by edit(SafeTensors)"""
        d = self.path(name)
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(src, d)
        st = SafeTensors(os.path.join(d, 'model.safetensors'))
        edit(st)
        st.save(os.path.join(d, 'model.safetensors'))
        return d


HF = 'model.decoder.'


def native_name(hf):
    return hf[len(HF):] if hf.startswith(HF) else hf


def quantized_names(src):
    """HF names of the matrices convert quantizes (every 2-D tensor but the position table)"""
    return [n for n in src.names() if len(src.info(n)['shape']) == 2 and 'embed_positions' not in n]


def compare_file(fx, src_dir, out, G, label, full=True):
    """the native file `out` against the numpy scheme applied to the checkpoint in src_dir"""
    src = SafeTensors(os.path.join(src_dir, 'model.safetensors'))
    nat = SafeTensors(out)
    ok_meta = nat.meta.get('format') == 'opt' and 'opt.config' in nat.meta and 'opt.formats' in nat.meta
    try:
        formats = json.loads(nat.meta.get('opt.formats', '{}'))
        cfg = json.loads(nat.meta.get('opt.config', '{}'))
    except ValueError as x:
        return check(False, '%s: metadata parses' % label, x)
    qn = quantized_names(src)
    want_fmt = {native_name(n): {'format': 'q4', 'group': G, 'cols': src.info(n)['shape'][1]} for n in qn}
    check(ok_meta and formats == want_fmt and cfg.get('hidden_size') == json.load(open(os.path.join(src_dir, 'config.json')))['hidden_size'],
          '%s: header: format "opt", opt.config, opt.formats names the %d quantized matrices with group %d and cols' % (label, len(qn), G),
          'formats %s\nwanted %s' % (json.dumps(formats)[:600], json.dumps(want_fmt)[:600]))
    bad, n_bytes, n_deq = [], 0, 0
    for n in qn:
        nn = native_name(n)
        rows, cols = src.info(n)['shape']
        t = nat.header.get(nn)
        if not t or t['dtype'] != 'U8' or t['shape'] != [rows, q4_row_bytes(cols, G)]:
            bad.append('%s: %s, expected U8 [%d, %d]' % (nn, t and (t['dtype'], t['shape']), rows, q4_row_bytes(cols, G)))
            continue
        got = nat.array(nn)
        want = q4_quantize(src.f32(n), G)
        n_bytes += got.size
        if not np.array_equal(got, want):
            bad.append('%s: %s' % (nn, first_diff(got, want, cols, G)))
            continue
        if full:
            d_opt = c_dequant(fx.tmp, got, cols, G)      # opt's dequantizer on opt's bytes
            d_np = q4_dequantize(want, cols, G)          # numpy's on numpy's
            n_deq += d_np.size
            if not bits_equal(d_opt, d_np):
                i = np.argwhere(d_opt.view(np.uint32) != d_np.view(np.uint32))[0]
                bad.append('%s: dequantized [%d, %d] = %r (opt) vs %r (numpy)' % (nn, i[0], i[1], d_opt[tuple(i)], d_np[tuple(i)]))
    check(not bad, '%s: all %d quantized bytes (f16 scale/min bits, codes) equal numpy\'s%s' % (
        label, n_bytes, ', and %d dequantized floats bit for bit' % n_deq if full else ''), '\n'.join(bad))
    kept = []
    for n in src.names():
        nn = native_name(n)
        if n in qn:
            continue
        t = nat.header.get(nn)
        if 'embed_positions' in n:
            if not t or t['dtype'] != src.info(n)['dtype'] or nat.raw(nn) != src.raw(n):
                kept.append('%s not kept as stored' % nn)
        elif not t or t['dtype'] != 'F32' or not bits_equal(nat.f32(nn), src.f32(n)):
            kept.append('%s: not the F32 of the source' % nn)
    extra = set(nat.names()) - {native_name(n) for n in src.names()}
    check(not kept and not extra, '%s: position table as stored, 1-D tensors as F32, nothing else' % label,
          '\n'.join(kept + ['unexpected tensor %s' % e for e in sorted(extra)]))


# ---------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------

def test_kernels(fx):
    section('kernels')
    c_build(fx.tmp)
    r = run([C_BIN] + ([str(ARGS.seed)] if ARGS.seed is not None else []), C_ENV)
    lines = r.text.strip().split('\n')
    print('   .. ' + (lines[0] if lines else '(no output)'))
    groups = [l for l in lines if l.startswith('PASS ') or l.startswith('FAIL ')]
    for l in groups:
        name = l.split()[1]
        fails = []
        if l.startswith('FAIL'):
            i = lines.index(l)
            j = i
            while j > 0 and lines[j - 1].startswith('  fail'):
                j -= 1
            fails = lines[j:i]
        check(l.startswith('PASS'), 'test_q4.c %s: %s' % (name, ' '.join(l.split()[2:])), '\n'.join(fails))
    skipped = [l for l in lines if l.startswith('SKIP ')]
    for l in skipped:
        print('   .. test_q4.c ' + ' '.join(l.split()[1:]) + ': skipped')
    check(r.rc == 0 and len(groups) + len(skipped) == 4, 'test_q4.c ran every group and exited 0', r.describe() + '\n' + r.text[-600:])


def test_rows(fx):
    section('rows')
    c_build(fx.tmp)
    rng = np.random.default_rng(fx.seed)
    rows = []

    def add(v):
        rows.append(np.asarray(v, dtype=np.float32))

    # rint ties: min 0, max 15 -> scale 1, values at k + 0.5 (half to even)
    add(np.r_[0.0, 15.0, np.arange(30) * 0.5, np.arange(16) + 0.5])
    add(-np.r_[0.0, 15.0, np.arange(30) * 0.5])
    add(np.r_[1.0, 1.0 + 2 ** -23, 1.0 + 2 ** -22, np.ones(40)])            # scale underflows f16 -> constant
    add(rng.uniform(0, 1e-6, 77))                                             # subnormal f16 scale and min
    add(rng.uniform(-3e-5, 3e-5, 100))
    add(np.r_[-65504.0, 65504.0, rng.uniform(-65504, 65504, 61)])           # the f16 limit
    add(np.r_[-0.0, 0.0, np.zeros(30)])                                       # signed zeros, first -0
    add(np.r_[0.0, -0.0, np.zeros(30)])
    add(np.r_[-0.0, 1.0, 2.0, 0.5])
    add(np.full(130, 0.1))                                                    # constant, not an f16
    add(np.full(200, -7.0))
    add(np.r_[np.full(64, 3.0), rng.standard_normal(64), np.full(7, -2.5)])  # constant groups, partial last
    add(1000.0 + rng.uniform(-0.01, 0.01, 96))                               # large offset: min's f16 rounding
    add(rng.standard_normal(1) * 3)
    for k in (1, 7, 15, 16, 17, 31, 33, 47, 63, 65, 100, 127, 129, 255, 300):
        add(rng.standard_normal(k) * 10 ** rng.uniform(-3, 2))
    n_rows = len(rows)
    bad = []
    for G in GROUPS:
        for i, v in enumerate(rows):
            want = q4_quantize(v[None], G)
            got = c_quant(fx.tmp, v[None], G)
            if not np.array_equal(got, want):
                bad.append('G %d row %d (%d values): %s' % (G, i, v.size, first_diff(got, want, v.size, G)))
                continue
            d = c_dequant(fx.tmp, got, v.size, G)
            if not bits_equal(d, q4_dequantize(want, v.size, G)):
                bad.append('G %d row %d: dequantized floats differ' % (G, i))
    check(not bad, '%d crafted rows x G 32/64/128 (ties, subnormal and underflowing scales, f16 limit, signed zeros, '
          'constant and partial groups): q4_quantize_row == numpy bytes, q4_dequantize_row == numpy floats' % n_rows, '\n'.join(bad))
    # spot checks of the documented semantics on the numpy side itself
    q = q4_quantize(rows[0][None], 32)
    sb, mb, codes = q4_fields(q, rows[0].size, 32)
    ties = codes[0, 2:32]   # values 0, 0.5, 1, ... 14.5 with scale 1: half to even
    check(sb[0, 0] == 0x3C00 and mb[0, 0] == 0 and list(ties[1::2]) == [int(np.rint(k + 0.5)) for k in range(15)],
          'numpy scheme: scale 1.0, min 0, and codes of k + 0.5 round half to even (%s)' % ' '.join(map(str, ties[1::2])))


def test_format(fx):
    section('format')
    c_build(fx.tmp)
    cases = [('80x1x5x144', 'f16', ()), ('40x1x2x100', 'bf16', ()), ('40x2x2x100', 'f32', ('--no-tie',))]
    for shape, dt, extra in cases:
        src = fx.synth(shape, dt, extra)
        for G in GROUPS:
            out = fx.path('conv-%s-%s-%d.safetensors' % (shape, dt, G))
            r = opt(['convert', '-m', src, '-o', out, '--int4-weights', '--group-size', str(G)])
            if not check(r.rc == 0 and os.path.isfile(out) and not os.path.exists(out + '.partial'),
                         'convert %s %s%s --group-size %d' % (dt, shape, ' ' + ' '.join(extra) if extra else '', G), r.describe()):
                continue
            compare_file(fx, src, out, G, '%s %s G %d' % (dt, shape, G))


def test_constant(fx):
    section('constant')
    c_build(fx.tmp)
    base16 = fx.synth('80x1x5x144', 'f16')
    P = HF + 'layers.0.'
    marks = []  # (tensor, row, c0, c1, value)

    def edit16(st):
        def setrow(name, row, c0, c1, val):
            w = st.f32(name).copy()
            w[row, c0:c1] = val
            st.set_f32(name, w)
            marks.append((name, row, c0, c1, val))
        setrow(P + 'self_attn.q_proj.weight', 0, 0, 80, 0.375)     # a whole row, partial last group
        setrow(P + 'self_attn.k_proj.weight', 1, 0, 80, 0.0)       # zeros
        setrow(P + 'fc1.weight', 2, 0, 32, -1.25)                  # the first group (G 32)
        setrow(P + 'fc2.weight', 3, 128, 144, 7.0)                 # the partial last group at every G
        setrow(HF + 'embed_tokens.weight', 5, 0, 80, -0.5)         # an embedding row
    d16 = fx.edited(base16, 'const-f16', edit16)
    src16 = SafeTensors(os.path.join(d16, 'model.safetensors'))
    for G in GROUPS:
        out = fx.path('const-f16-%d.safetensors' % G)
        r = opt(['convert', '-m', d16, '-o', out, '--int4-weights', '--group-size', str(G)])
        if not check(r.rc == 0, 'convert (constant groups) G %d' % G, r.describe()):
            continue
        compare_file(fx, d16, out, G, 'constant groups G %d' % G, full=False)
        nat = SafeTensors(out)
        bad = []
        n_groups = 0
        for name, row, c0, c1, val in marks:
            nn = native_name(name)
            cols = src16.info(name)['shape'][1]
            q = nat.array(nn)[row:row + 1]
            sb, mb, codes = q4_fields(q, cols, G)
            d = c_dequant(fx.tmp, q, cols, G)[0]
            for g0 in range(0, cols, G):
                g1 = min(g0 + G, cols)
                if g0 < c0 or g1 > c1:
                    continue  # only groups that lie wholly inside the constant run
                n_groups += 1
                b = g0 // G
                if sb[0, b] != 0 or mb[0, b] != f16_bits(np.float32(val)) or codes[0, g0:g0 + G].any() or \
                        not bits_equal(d[g0:g1], np.full(g1 - g0, val, np.float32)):
                    bad.append('%s row %d group %d: scale %04x min %04x codes %s values %s' % (
                        nn, row, b, sb[0, b], mb[0, b], codes[0, g0:g1][:8], d[g0:g0 + 4]))
        check(not bad and n_groups >= 4, 'G %d: %d constant groups have scale 0, codes 0, and dequantize exactly to min' % (G, n_groups),
              '\n'.join(bad))
        r1 = opt(['score', '--ids', '-m', out, '-f', fx.ids])
        r2 = opt(['score', '--ids', '-m', d16, '-f', fx.ids, '--compress-weight', '--group-size', str(G)])
        lp = logprobs(r1.text) if r1.rc == 0 else []
        check(r1.rc == 0 and lp and all(np.isfinite(x).all() for x in lp) and r1.out == r2.out,
              'G %d: the model with constant groups scores finitely; --compress-weight gives the same bytes' % G, r1.describe() + r2.describe())

    # f32: near-constant (scale below f16), subnormal range, rint ties, large offset
    base32 = fx.synth('40x1x2x100', 'f32')
    rng = np.random.default_rng(fx.seed + 1)

    def edit32(st):
        n = P + 'fc1.weight'
        w = st.f32(n).copy()
        w[0, :] = 1.0
        w[0, 1:40:3] = 1.0 + 2 ** -23          # range 1.2e-7: scale underflows f16 -> constant group
        w[1, :] = rng.uniform(0, 1e-6, 40)     # subnormal f16 scale
        w[2, :32] = np.r_[0.0, 15.0, np.arange(30) * 0.5]  # rint ties with scale 1
        w[3, :] = 500.0 + rng.uniform(-0.05, 0.05, 40)     # min's f16 rounding exceeds half a step
        st.set_f32(n, w)
        n = P + 'fc2.weight'
        w = st.f32(n).copy()
        w[4, 96:] = -3.0                        # partial last group (100 = 3 * 32 + 4)
        st.set_f32(n, w)
    d32 = fx.edited(base32, 'const-f32', edit32)
    for G in GROUPS:
        out = fx.path('const-f32-%d.safetensors' % G)
        r = opt(['convert', '-m', d32, '-o', out, '--int4-weights', '--group-size', str(G)])
        if check(r.rc == 0, 'convert (f32 edge groups) G %d' % G, r.describe()):
            compare_file(fx, d32, out, G, 'f32 edge groups G %d' % G)
            nat = SafeTensors(out)
            sb, mb, codes = q4_fields(nat.array('layers.0.fc1.weight')[0:1], 40, G)
            d = c_dequant(fx.tmp, nat.array('layers.0.fc1.weight')[0:1], 40, G)[0]
            check(sb[0, 0] == 0 and not codes.any() and bits_equal(d, np.ones(40, np.float32)),
                  'G %d: a group of 1.0 and 1.0 + 2^-23 (scale below f16) is constant at its min 1.0' % G)


def test_errors(fx):
    section('errors')
    base = {'f16': fx.synth('80x1x5x144', 'f16'), 'bf16': fx.synth('40x1x2x100', 'bf16'), 'f32': fx.synth('40x1x2x100', 'f32')}
    cases = [('f16', 'layers.0.fc1.weight', (3, 7), np.nan, 'NaN'),
             ('bf16', 'embed_tokens.weight', (4000, 39), np.inf, 'infinite'),
             ('f32', 'layers.0.self_attn.q_proj.weight', (39, 0), -np.inf, 'infinite'),
             ('f32', 'layers.0.fc2.weight', (2, 99), np.nan, 'NaN'),
             ('bf16', 'embed_tokens.weight', None, np.nan, 'NaN'),          # every element: all threads fail at once
             ('f32', 'layers.0.self_attn.v_proj.weight', (5, 5), -1e5, 'f16 range')]  # min below f16's -65504
    for i, (dt, name, where, val, word) in enumerate(cases):
        def edit(st, name=name, where=where, val=val):
            w = st.f32(HF + name).copy()
            if where is None:
                w[:] = val
            else:
                w[where] = val
            st.set_f32(HF + name, w)
        d = fx.edited(base[dt], 'bad-%d' % i, edit)
        what = '%s %s %s' % (dt, name, 'all NaN' if where is None else '%r at %s' % (val, where))
        outdir = fx.path('bad-out-%d' % i)
        os.makedirs(outdir, exist_ok=True)
        out = os.path.join(outdir, 'q.safetensors')
        # every row fails at once: the threads quantizing rows in parallel all reach the error;
        # repeated, since two of them printing (and exiting) together is a race
        reps = 40 if where is None else 1
        for rep in range(reps):
            with open(out, 'wb') as f:
                f.write(b'old contents')
            r = opt(['convert', '-m', d, '-o', out, '--int4-weights'])
            lines = r.errtext.strip().split('\n')
            left = sorted(os.listdir(outdir))
            ok = r.rc == 1 and len(lines) == 1 and name in lines[0] and word in lines[0] and left == ['q.safetensors'] and \
                open(out, 'rb').read() == b'old contents'
            if not ok or rep == reps - 1:
                check(ok, 'convert, %s: exit 1, one line naming the tensor, no .partial, the old file untouched%s' % (
                    what, ' (%d runs)' % reps if reps > 1 else ''), '%s\nfiles: %s' % (r.describe(), left))
            if not ok:
                break
        if where is None or i == 1:
            report('e.g. ' + r.errtext.strip())
        for rep in range(min(reps, 16)):
            r = opt(['score', '--ids', '-m', d, '-f', fx.ids, '--compress-weight'])
            lines = r.errtext.strip().split('\n')
            ok = r.rc == 1 and len(lines) == 1 and name in lines[0] and word in lines[0] and not r.out
            if not ok or rep == min(reps, 16) - 1:
                check(ok, 'score --compress-weight, %s: exit 1, one line naming the tensor, no output%s' % (
                    what, ' (%d runs)' % min(reps, 16) if reps > 1 else ''), r.describe())
            if not ok:
                break
    # a non-finite activation reaching the 4-bit cache (an infinite k_proj bias): the f32 cache
    # gives NaN log-probs; the 4-bit one may refuse, but with one line and exit 1, never a crash
    # or a doubled message (the heads are stored in parallel: every thread meets the value)
    def edit_bias(st):
        n = HF + 'layers.0.self_attn.k_proj.bias'
        w = st.f32(n).copy()
        w[5] = np.inf
        st.set_f32(n, w)
    d = fx.edited(base['f16'], 'bad-act', edit_bias)
    bad = []
    for rep in range(24):
        r = opt(['score', '--ids', '-m', d, '-f', fx.ids, '--compress-cache'])
        lines = r.errtext.strip().split('\n')
        if not (r.rc == 0 or (r.rc == 1 and len(lines) == 1 and 'cache' in lines[0])):
            bad.append('run %d: %s' % (rep + 1, r.describe()))
    check(not bad, 'score --compress-cache with an infinite k_proj bias: exit 0, or exit 1 with one line (24 runs)',
          '%d of 24 runs:\n%s' % (len(bad), '\n'.join(bad[:3])))


def test_equiv(fx):
    section('equiv')
    for shape, dt, extra in [('80x1x5x144', 'f16', ()), ('40x1x2x100', 'bf16', ()), ('40x2x2x100', 'f32', ('--no-tie',))]:
        src = fx.synth(shape, dt, extra)
        for G in GROUPS:
            out = fx.path('conv-%s-%s-%d.safetensors' % (shape, dt, G))
            if not os.path.isfile(out):
                r = opt(['convert', '-m', src, '-o', out, '--int4-weights', '--group-size', str(G)])
                if r.rc != 0:
                    check(False, 'convert %s %s G %d' % (dt, shape, G), r.describe())
                    continue
            a = opt(['score', '--ids', '-m', src, '-f', fx.ids, '--compress-weight', '--group-size', str(G)])
            b = opt(['score', '--ids', '-m', out, '-f', fx.ids])
            check(a.rc == 0 and b.rc == 0 and a.out == b.out and len(logprobs(a.text)) == 6,
                  '%s %s G %d: score --compress-weight == score of the converted file, byte for byte' % (dt, shape, G),
                  a.describe() + '\n' + b.describe() + '\n' + a.text[:300] + '\n' + b.text[:300])
    out = fx.path('conv-80x1x5x144-f16-64.safetensors')
    ref = opt(['score', '--ids', '-m', out, '-f', fx.ids])
    diff = []
    for env, args in [({'OPT_SIMD': 'scalar'}, []), ({'OPT_SIMD': 'avx2'}, []), ({'OPT_SIMD': 'avx512'}, []), ({}, ['-b', '1']),
                      ({}, ['-b', '3', '-t', '1']), ({}, ['--step-rows', '7'])]:
        r = opt(['score', '--ids', '-m', out, '-f', fx.ids] + args, env)
        if 'only supports' in r.errtext:
            continue
        if r.rc != 0 or r.out != ref.out:
            diff.append('%s %s: %s' % (env, ' '.join(args), r.describe()))
    check(ref.rc == 0 and not diff, 'the converted file scores identically at every SIMD level, batch size, thread count and step size',
          '\n'.join(diff))
    r = opt(['info', '-m', out])
    check(r.rc == 0 and '4-bit' in r.text and '64' in r.text, 'opt info names the 4-bit format and group', r.describe() + r.text[-400:])


def peak_rss_kb(args):
    """(peak resident KB of one opt run, (exit status, stdout, stderr)), from wait4's rusage
    of that child alone (RUSAGE_CHILDREN would keep the largest of all earlier runs)"""
    with tempfile.TemporaryFile() as o, tempfile.TemporaryFile() as e:
        p = subprocess.Popen([ARGS.opt] + list(args), stdout=o, stderr=e, env=dict(os.environ, OPT_DEVICE='cpu'))
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        o.seek(0)
        e.seek(0)
        return ru.ru_maxrss, (p.returncode, o.read(), e.read())


def test_rss(fx):
    """--compress-weight keeps no f16 copy: an f16 checkpoint scores within 1.2x the peak
    RSS of its converted 4-bit file (the whole f16 mapping stayed resident before), and a
    dummy: model of that shape (generated a band at a time) within 1.2x too."""
    src = fx.synth('512x6x8x2048', 'f16')
    out = fx.path('conv-512x6x8x2048.safetensors')
    r = opt(['convert', '-m', src, '-o', out, '--int4-weights'])
    if not check(r.rc == 0, 'convert 512x6x8x2048 for the RSS check', r.describe()):
        return
    section('rss')
    native, (rc0, out0, _) = peak_rss_kb(['score', '--ids', '-m', out, '-f', fx.ids, '-t', '2'])
    comp, (rc1, out1, err1) = peak_rss_kb(['score', '--ids', '-m', src, '-f', fx.ids, '-t', '2', '--compress-weight'])
    check(rc0 == 0 and rc1 == 0 and out0 == out1 and comp <= 1.2 * native,
          'score --compress-weight: peak RSS %.0f MB, %.2fx the native 4-bit file\'s %.0f MB (limit 1.2x), same bytes'
          % (comp / 1024, comp / max(native, 1), native / 1024), err1.decode(errors='replace')[-300:])
    dummy, (rc2, _, err2) = peak_rss_kb(['bench', '-m', 'dummy:512x6x8x2048', '--compress-weight', '--prompt-len', '8',
                                         '--gen-len', '2', '-b', '1', '-t', '2'])
    check(rc2 == 0 and dummy <= 1.2 * native, 'bench -m dummy: --compress-weight: peak RSS %.0f MB, %.2fx the native file\'s run'
          % (dummy / 1024, dummy / max(native, 1)), err2.decode(errors='replace')[-300:])


def test_cache(fx):
    section('cache')
    for shape in ('80x1x5x144', '256x2x4x1024'):   # head_dim 16 (cache group 16) and 64
        m = fx.synth(shape, 'f16')
        for w in ([], ['--compress-weight']):
            base = opt(['score', '--ids', '-m', m, '-f', fx.ids_long, '--compress-cache'] + w)
            pol = opt(['score', '--ids', '-m', m, '-f', fx.ids_long, '--compress-cache', '--percent', '0', '50', '0', '50', '0', '100',
                       '--gpu-batch-size', '2', '--offload-dir', fx.tmp] + w)
            check(base.rc == 0 and pol.rc == 0 and base.out == pol.out and len(logprobs(base.text)) == 8,
                  '%s --compress-cache%s: identical under --percent 0 50 0 50 0 100 --gpu-batch-size 2' % (shape, ' ' + ' '.join(w) if w else ''),
                  base.describe() + '\n' + pol.describe())
        # the scalar level is slow on the big vocabulary's logits: the small model and short lines only
        ids = fx.ids if shape == '80x1x5x144' else fx.ids_long
        ref = opt(['score', '--ids', '-m', m, '-f', ids, '--compress-cache'])
        diff = []
        for env, args in [({'OPT_SIMD': 'scalar'}, []), ({'OPT_SIMD': 'avx2'}, []), ({}, ['-b', '1']), ({}, ['-b', '3', '-t', '1']),
                          ({}, ['--step-rows', '5'])]:
            if env.get('OPT_SIMD') == 'scalar' and ids != fx.ids:
                continue
            r = opt(['score', '--ids', '-m', m, '-f', ids, '--compress-cache'] + args, env)
            if r.rc != 0 or r.out != ref.out:
                diff.append('%s %s: %s' % (env, ' '.join(args), r.describe()))
        check(ref.rc == 0 and not diff, '%s --compress-cache: identical at %s, every batch size, thread count and step size' % (
              shape, 'every SIMD level' if ids == fx.ids else 'AVX2 and the best level'),
              '\n'.join(diff))


def kv_group(head_dim, G):
    return min(G, -(-head_dim // 16) * 16)


def dequantize_weights(m, G):
    """ref_opt model m: every matrix but the position table through the numpy 4-bit scheme."""
    for name in list(m.W):
        W = m.W[name]
        if W.ndim == 2 and 'embed_positions' not in name:
            m.W[name] = q4_dequantize(q4_quantize(W, G), W.shape[1], G)


def oracle_seqs(fx, salt, name):
    """Many short sequences and one longer, none sharing a first token (no </s>: a shared first
    row would be one point of failure for all): a value at a rounding tie of its 4-bit (or
    int8) code may round either way in opt's f32 and numpy's (measured: in about one sequence
    in ten), and the difference flows into the later tokens of that sequence only, so the
    median stays at f32 rounding unless the scheme itself differs. -> (seqs, ids file)"""
    rng = random.Random(fx.seed + salt)
    seqs = [[rng.randrange(3, 50272) for _ in range(n + 1)] for n in [40] + [rng.randrange(5, 15) for _ in range(12)]]
    return seqs, fx.write(name, ''.join(' '.join(map(str, q)) + '\n' for q in seqs))


def oracle_score(model_dir, seqs, gw=0, gc=0, ga=0):
    """tests/ref_opt.py (independent numpy OPT) with the numpy scheme applied: every matrix
    but the position table dequantized from 4 bits with group gw; the keys and values
    quantized per (position, head) row of head_dim with the cache's group before attention
    (opt stores a step's keys and values before it attends, so a token sees its own key
    quantized too); with ga (--compute int8), every GEMM input on those weights (the linears
    and the logits) quantized to int8 per group of ga by fake_quant_rows. -> list of log-prob
    arrays"""
    sys.path.insert(0, HERE)
    import ref_opt
    m = ref_opt.load_model(model_dir)
    if gw:
        dequantize_weights(m, gw)
    orig, orig_logits = ref_opt.linear, m.logits
    kv = set()
    if gc:
        hd = m.cfg.head_dim
        g = kv_group(hd, gc)
        kv = {id(m.W['decoder.layers.%d.self_attn.%s_proj.weight' % (i, n)]) for i in range(m.cfg.layers) for n in 'kv'}
    if ga:
        m.logits = lambda h: orig_logits(fake_quant_rows(h, ga))

    def linear(x, w, b):
        y = orig(fake_quant_rows(x, ga) if ga else x, w, b)
        if id(w) in kv:
            rows = np.ascontiguousarray(y, dtype=np.float32).reshape(-1, hd)
            y = q4_dequantize(q4_quantize(rows, g), hd, g).reshape(y.shape)
        return y
    ref_opt.linear = linear
    try:
        return [m.score(ids) for ids in seqs]
    finally:
        ref_opt.linear = orig


def test_oracle(fx):
    section('oracle')
    seqs, ids = oracle_seqs(fx, 3, 'oracle-ids.txt')
    for shape, dt, G in (('80x2x4x144', 'f16', 32), ('64x2x4x256', 'bf16', 64), ('96x2x3x200', 'f32', 128)):
        m = fx.synth(shape, dt)
        hd = int(shape.split('x')[0]) // int(shape.split('x')[2])
        f16 = logprobs(opt(['score', '--ids', '-m', m, '-f', ids]).text)
        for label, flags, gw, gc in (('weights', ['--compress-weight'], G, 0), ('cache', ['--compress-cache'], 0, G),
                                     ('both', ['--compress-weight', '--compress-cache'], G, G)):
            r = opt(['score', '--ids', '-m', m, '-f', ids, '--group-size', str(G)] + flags)
            want = oracle_score(m, seqs, gw, gc)
            got = logprobs(r.text) if r.rc == 0 else []
            if not check(r.rc == 0 and len(got) == len(want) and all(len(a) == len(b) for a, b in zip(got, want)),
                         '%s %s G %d %s: opt score runs' % (dt, shape, G, label), r.describe()):
                continue
            d = np.concatenate([np.abs(a - b) for a, b in zip(got, want)])
            dm = np.concatenate([np.abs(a - b) for a, b in zip(got, f16)])
            moved = float(dm.mean())
            # f32 rounding differs between opt and numpy; in the cache it can move a key or
            # value across a rounding boundary of its 4-bit code (one step of one element:
            # measured, always at a value within ~1e-6 of a tie), and the later tokens of that
            # sequence then differ, by up to a tenth of a nat when it is a value at the first
            # position (attended with weight 1): so the median token must agree to f32
            # rounding, most sequences throughout (measured: 0-3 of 13 are off), and none by
            # more than 4 bits moved a token
            med = float(np.median(d))
            off = sum(np.abs(a - b).max() > 1e-4 for a, b in zip(got, want))
            check(med <= 1e-5 and 2 * off <= len(seqs) and d.max() <= dm.max(),
                  '%s %s (head_dim %d) G %d %s: opt == numpy OPT with the scheme applied (|d| median %.0e, max %.0e; '
                  '%d of %d sequences off f32 rounding; 4-bit moved the log-probs by %.3f on average, %.2f at most)' % (
                      dt, shape, hd, G, label, med, d.max(), off, len(seqs), moved, dm.max()),
                  'median |opt - oracle| = %.3g, mean %.3g, max %.3g, %d sequences beyond 1e-4; |4-bit - f16| mean %.3g max %.3g' % (
                      med, d.mean(), d.max(), off, moved, dm.max()))


def fake_quant_rows(x, G):
    """x (rows, K) float32 -> what --compute int8 multiplies: each row's groups of G quantized
    to int8 with scale a = max|x| / 127 (f32), q = rint(clip(x / a, -127, 127)) (half to even),
    and back as a * q (the scheme of quant.c's W4A8 comment, here in numpy)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    shp = x.shape
    x = x.reshape(-1, shp[-1])
    K = x.shape[1]
    out = np.empty_like(x)
    for k0 in range(0, K, G):
        blk = x[:, k0:k0 + G]
        a = (np.abs(blk).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
        safe = np.where(a > 0, a, np.float32(1))
        q = np.rint(np.clip(blk / safe, np.float32(-127), np.float32(127))).astype(np.float32)
        out[:, k0:k0 + G] = np.where(a > 0, a * q, np.float32(0))
    return out.reshape(shp)


def test_int8(fx):
    section('int8')
    seqs, ids = oracle_seqs(fx, 5, 'int8-ids.txt')
    for shape, dt, G in (('80x2x4x144', 'f16', 32), ('64x2x4x256', 'bf16', 64), ('96x2x3x200', 'f32', 128)):
        m = fx.synth(shape, dt)
        base = ['score', '--ids', '-m', m, '-f', ids, '--compress-weight', '--group-size', str(G)]
        f32 = opt(base)
        r = opt(base + ['--compute', 'int8'])
        want = oracle_score(m, seqs, gw=G, ga=G)
        got = logprobs(r.text) if r.rc == 0 else []
        if not check(r.rc == 0 and f32.rc == 0 and len(got) == len(want) and all(len(a) == len(b) for a, b in zip(got, want)),
                     '%s %s G %d: score --compute int8 runs' % (dt, shape, G), r.describe() + f32.describe()):
            continue
        d = np.concatenate([np.abs(a - b) for a, b in zip(got, want)])
        dq = np.concatenate([np.abs(a - b) for a, b in zip(got, logprobs(f32.text))])
        med = float(np.median(d))
        off = sum(np.abs(a - b).max() > 1e-4 for a, b in zip(got, want))
        # an activation at a rounding tie of its int8 code may round either way in opt's f32 and
        # numpy's, and moves the later tokens of its sequence: the median token must agree to f32
        # rounding, most sequences throughout, and the int8 activations must move the log-probs
        # (against --compute f32) by far more than opt differs from the oracle
        check(med <= 1e-5 and 2 * off <= len(seqs) and float(np.median(dq)) > 100 * max(med, 1e-7),
              '%s %s G %d: --compute int8 == numpy OPT with 4-bit weights and x quantized per group (|d| median %.0e, '
              'max %.0e; %d of %d sequences off f32 rounding; int8 moved the log-probs from --compute f32 by %.4f on average)' % (
                  dt, shape, G, med, d.max(), off, len(seqs), float(dq.mean())),
              'median |opt - oracle| = %.3g, max %.3g, %d sequences beyond 1e-4; |int8 - f32| median %.3g' % (med, d.max(), off, float(np.median(dq))))
    # exactness across batch, threads, step size, load-time vs file quantization
    src = fx.synth('80x1x5x144', 'f16')
    conv = fx.path('int8-conv.safetensors')
    c = opt(['convert', '-m', src, '-o', conv, '--int4-weights'])
    ref = opt(['score', '--ids', '-m', conv, '-f', fx.ids, '--compute', 'int8'])
    diff = []
    # (a policy keeps the stored layout, which the offloading engine streams; without one the
    # CPU engine interleaves the matrices: the same bytes either way)
    for model, args in [(src, ['--compress-weight']), (conv, ['-b', '1']), (conv, ['-b', '3', '-t', '1']), (conv, ['--step-rows', '7']),
                        (conv, ['--percent', '0', '50', '0', '50', '0', '100', '--gpu-batch-size', '2'])]:
        r = opt(['score', '--ids', '-m', model, '-f', fx.ids, '--compute', 'int8'] + args)
        if r.rc != 0 or r.out != ref.out:
            diff.append('%s: %s' % (' '.join(args), r.describe()))
    check(c.rc == 0 and ref.rc == 0 and len(logprobs(ref.text)) == 6 and not diff,
          '--compute int8: the same bytes at every batch size, thread count and step size, from --compress-weight, and under a policy',
          c.describe() + ref.describe() + '\n'.join(diff))
    g = [opt(['generate', '--ids', '-m', conv, '-f', fx.ids, '-n', '12', '--compute', 'int8'] + a) for a in ([], ['-b', '1'])]
    check(all(r.rc == 0 for r in g) and g[0].out == g[1].out and g[0].out.count(b'\n') == 6,
          '--compute int8: generate gives the same tokens batched and one prompt at a time', g[0].describe() + g[1].describe())
    # refusals: one line, exit 1
    for label, args, env, want in [('float weights', ['-m', src], {}, 'needs 4-bit weights'),
                                   ('no VNNI (OPT_SIMD=avx2)', ['-m', conv], {'OPT_SIMD': 'avx2'}, 'needs AVX-512 VNNI')]:
        r = opt(['score', '--ids', '-f', fx.ids, '--compute', 'int8'] + args, env)
        check(r.rc == 1 and want in r.errtext and r.errtext.count('\n') == 1 and not r.out,
              '--compute int8 with %s: exit 1, one line (%s)' % (label, r.errtext.strip()[:90]), r.describe())


def accuracy_rows(model, ids, groups=(64,), extra=()):
    """score runs against fp16: {(mode, G): (mean |d|, max |d|, ppl, ppl_ref)}"""
    ref = opt(['score', '--ids', '-m', model, '-f', ids] + list(extra))
    if ref.rc != 0:
        raise RuntimeError(ref.describe())
    a = np.concatenate(logprobs(ref.text))
    res = {}
    for G in groups:
        for mode, flags in (('weights', ['--compress-weight']), ('cache', ['--compress-cache']),
                            ('both', ['--compress-weight', '--compress-cache'])):
            r = opt(['score', '--ids', '-m', model, '-f', ids, '--group-size', str(G)] + flags + list(extra))
            if r.rc != 0:
                raise RuntimeError(r.describe())
            b = np.concatenate(logprobs(r.text))
            d = np.abs(b - a)
            res[(mode, G)] = (d.mean(), d.max(), float(np.exp(-b.mean())), float(np.exp(-a.mean())), b.size)
    return res


def test_accuracy(fx):
    section('accuracy')
    m = fx.synth('256x2x4x1024', 'f16')
    res = accuracy_rows(m, fx.ids_long, GROUPS)
    report('synthetic 256x2x4x1024 (f16, random weights), %d tokens; fp16 perplexity %.1f' % (res[('weights', 64)][4], res[('weights', 64)][3]))
    report('%-8s %5s %12s %12s %10s' % ('4-bit', 'group', 'mean|dlp|', 'max|dlp|', 'dppl'))
    for (mode, G), (mean, mx, ppl, ppl0, n) in sorted(res.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        report('%-8s %5d %12.4f %12.4f %+9.2f%%' % (mode, G, mean, mx, 100 * (ppl / ppl0 - 1)))
    ok = all(np.isfinite(v[0]) and np.isfinite(v[1]) for v in res.values())
    # loose sanity: a working 4-bit path perturbs a near-uniform random model by a fraction of a
    # nat on average, and the cache (activations) less than the (noise) weights
    check(ok and all(v[0] < 0.5 and v[1] < 5 for v in res.values()), 'every |d log-prob| finite, mean < 0.5 nat, max < 5 nats')
    check(all(res[('cache', G)][0] < res[('weights', G)][0] for G in GROUPS),
          '4-bit cache perturbs less than 4-bit weights at every group size')
    check(res[('weights', 32)][0] < res[('weights', 128)][0], 'smaller groups are more accurate (weights: G 32 < G 128)')
    check(all(abs(res[k][2] / res[k][3] - 1) < 0.5 for k in res), 'perplexity within 50% of fp16')


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--opt', default=os.path.join(ROOT, 'opt'))
    ap.add_argument('--cc', default=os.environ.get('CC', 'cc'))
    ap.add_argument('--tmp')
    ap.add_argument('--keep', action='store_true')
    ap.add_argument('--only')
    ap.add_argument('--seed', type=int, default=None, help="test_q4.c's seed (default: its clock) and the fixtures'")
    ARGS = ap.parse_args()
    ARGS.opt = os.path.abspath(ARGS.opt)
    if not os.path.exists(ARGS.opt):
        sys.exit('test_q4: %s not found (make CUDA=0)' % ARGS.opt)
    tmp = ARGS.tmp or tempfile.mkdtemp(prefix='opt-q4-')
    tmp = os.path.abspath(tmp)
    os.makedirs(tmp, exist_ok=True)
    seed = ARGS.seed if ARGS.seed is not None else int(time.time())
    print('test_q4: %s; fixtures seed %d (rerun: --seed %d)' % (ARGS.opt, seed, seed))
    fx = Fx(tmp, seed)
    # the sections that need tests/test_q4.c run after those that do not, while it compiles
    tests = [('errors', test_errors), ('equiv', test_equiv), ('rss', test_rss), ('cache', test_cache), ('oracle', test_oracle), ('int8', test_int8), ('accuracy', test_accuracy),
             ('kernels', test_kernels), ('rows', test_rows), ('format', test_format), ('constant', test_constant)]
    only = set(ARGS.only.split(',')) if ARGS.only else None
    if not only or only & {'kernels', 'rows', 'format', 'constant'}:
        c_start(tmp)
    t0 = time.time()
    harness.run_sections(tests, only, fx)
    if not ARGS.keep and not ARGS.tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(harness.summary('test_q4', t0))


if __name__ == '__main__':
    main()
