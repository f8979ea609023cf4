#!/usr/bin/python3
"""SmoothQuant W8A8 tests (issue 7): `opt convert --w8a8`, the int8 kernels, the converted files.

    tests/test_w8a8.py [--opt ./opt] [--asan ./opt-asan] [--cc cc] [--tmp DIR] [--keep]
                       [--only NAME,...]

Run from anywhere (paths are relative to the repository root) with /usr/bin/python3 (numpy).
Checkpoints come from `opt synth` (f32, with and without --outliers) and tests/mkckpt.py
(post-LN); the oracle for the calibration is tests/ref_opt.py (independent numpy OPT), whose
`linear` is wrapped to record every linear layer's input.  Each check prints "ok"/"FAIL";
the exit status is 0 only when every check passed.

  kernels     builds tests/test_i8.c (it includes opt.c, links quant.c) and runs it: the int8
              GEMM equals the exact integer product (int64) bit for bit, at every SIMD level,
              for any batch size, thread count and split tensor.
  calib       the statistics written into the file (layers.N.*.act_max: per-channel input
              maxima over all calibration tokens) equal ref_opt's over the same samples, one
              per line and cut from a plain text; the smoothing factors (.smooth) follow
              s = max|X|^a / max|W|^(1-a) from them; the folded LayerNorms and weights are
              exactly ln / s and W * s; the int8 weights and scales are the documented
              rounding of those; the static (O3) act_scales are the per-tensor input maxima
              of the smoothed model / 127.
  smoothing   smoothing alone is exact: OPT_SQ_NO_QUANT=1 stops after the folding, and
              `score` of the folded fp32 model equals the original's to 1e-4 (alpha 0.5 and
              1, outlier and plain models) while the factors are far from 1.
  outliers    on `opt synth --outliers` (LayerNorm channels 50-100x the rest) naive W8A8
              (OPT_SQ_NO_SMOOTH=1) visibly breaks and SmoothQuant (O1 and O3) recovers, to
              within twice the error int8 has on the same model without outliers; the table
              of mean/max |d log-prob| against fp32 is printed (fp16 weights for scale).
  file        the converted file loads: score, generate, info (int8 tensors); every linear
              weight is I8 [out, in] with F32 scales [out]; W8A8 results are bitwise the same
              at every SIMD level, batch size and thread count.
  postln      a post-LayerNorm model (opt-350m-like) converts to plain W8A8 with one note.
  errors      empty, whitespace-only, non-UTF-8 (the line is named) and missing calibration
              files, --alpha 1.5, --w8a8 without --calib, --calib-len beyond the positions,
              calibration tokens outside a small vocabulary: one-line errors, non-zero exit,
              no output file; the same under opt-asan (ASAN_OPTIONS=detect_leaks=0).
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
sys.path.insert(0, HERE)
import ref_opt  # noqa: E402
import harness  # noqa: E402
from harness import check, section, skip  # noqa: E402

PY = sys.executable or '/usr/bin/python3'
TIMEOUT = int(os.environ.get('OPT_TEST_TIMEOUT', '120'))  # seconds per run
SHAPE = '256x2x4x1024'       # hidden x layers x heads x ffn of the test models

ARGS = None
SQ_ENV = ('OPT_SIMD', 'OPT_SQ_NO_SMOOTH', 'OPT_SQ_NO_QUANT')  # knobs a caller's environment must not leak in


def run(argv, env=None, stdin=b''):
    return harness.run(argv, stdin=stdin, env=env, timeout=TIMEOUT, drop=SQ_ENV)


def opt(args, env=None, binary=None, stdin=b''):
    return run([binary or ARGS.opt] + args, env, stdin)


def logprobs(r):
    """score output: one line of log-probs per input line -> list of arrays."""
    return [np.array([float(v) for v in l.split()], dtype=np.float64) for l in r.text.split('\n')[:-1]]


# ---------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------

WORDS = ('the of and to in a is that for it as was with be by on not he I this are or his from at '
         'which but have an they you were her she there one all we their time people year way day '
         'man thing woman life child world school state family student group country problem hand '
         'part place case week company system program question work government number night point '
         'home water room mother area money story fact month lot right study book eye job word '
         'business issue side kind head house service friend father power hour game line end member '
         'law car city community name president team minute idea body information back parent face '
         'level office door health person art war history party result change morning reason').split()


def sentences(seed, n, lo, hi):
    r = random.Random(seed)
    return [' '.join(r.choice(WORDS) for _ in range(r.randint(lo, hi))) + '.' for _ in range(n)]


class Fx:
    """Temporary files and models, made once."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.calib = self.write('calib.txt', '\n'.join(sentences(1, 48, 20, 70)) + '\n')
        self.eval = self.write('eval.txt', '\n'.join(sentences(2, 16, 40, 60)) + '\n')
        self.models = {}

    def path(self, name):
        return os.path.join(self.tmp, name)

    def write(self, name, text, binary=False):
        p = self.path(name)
        with open(p, 'wb') as f:
            f.write(text if binary else text.encode('utf-8'))
        return p

    def synth(self, name, dtype='f32', outliers=False, shape=SHAPE):
        if name not in self.models:
            d = self.path(name)
            r = opt(['synth', '--shape', shape, '--dtype', dtype, '--seed', '1', '-o', d] + (['--outliers'] if outliers else []))
            if r.rc != 0:
                raise RuntimeError(r.describe())
            self.models[name] = d
        return self.models[name]

    def convert(self, model, out, extra=(), env=None, samples=32, length=64, calib=None):
        return opt(['convert', '-m', model, '-o', self.path(out), '--calib', calib or self.calib,
                    '--calib-samples', str(samples), '--calib-len', str(length)] + list(extra), env)


def read_native(path):
    """A native file: ({name: array}, {name: format entry}). I8 -> int8, F32 -> float32, F16/BF16 -> float32."""
    with open(path, 'rb') as f:
        n = struct.unpack('<Q', f.read(8))[0]
        hdr = json.loads(f.read(n))
        base = 8 + n
        meta = hdr.pop('__metadata__')
        formats = json.loads(meta.get('opt.formats', '{}'))
        data = {}
        for name, t in hdr.items():
            a, b = t['data_offsets']
            f.seek(base + a)
            raw = f.read(b - a)
            dt = t['dtype']
            if dt == 'I8':
                arr = np.frombuffer(raw, dtype=np.int8)
            elif dt == 'F32':
                arr = np.frombuffer(raw, dtype=np.float32)
            elif dt == 'F16':
                arr = np.frombuffer(raw, dtype=np.float16).astype(np.float32)
            elif dt == 'BF16':
                arr = ref_opt.bf16_bits_to_f32(np.frombuffer(raw, dtype=np.uint16))
            else:
                arr = np.frombuffer(raw, dtype=np.uint8)
            data[name] = arr.reshape(t['shape'])
    return data, formats


def tokenize(fx, lines):
    """opt tokenize (BOS first) of each text line; newlines inside a line are escaped."""
    esc = [l.replace('\\', '\\\\').replace('\n', '\\n').replace('\t', '\\t') for l in lines]
    r = opt(['tokenize'], stdin=''.join(l + '\n' for l in esc).encode('utf-8'))
    if r.rc != 0:
        raise RuntimeError(r.describe())
    return [[int(t) for t in l.split()] for l in r.text.split('\n')[:-1]]


def samples_like_opt(fx, path, n, length):
    """The calibration samples as documented: >= n non-empty lines: the first n, one each;
    otherwise the whole text, cut into BOS + (length - 1) tokens."""
    text = open(path, encoding='utf-8').read()
    lines = [l[:-1] if l.endswith('\r') else l for l in text.split('\n')]
    nonblank = [l for l in lines if l.strip()]
    if len(nonblank) >= n:
        return [ids[:length] for ids in tokenize(fx, nonblank[:n])], True
    ids = tokenize(fx, [text])[0][1:]
    step = length - 1
    return [[2] + ids[t:t + step] for t in range(0, len(ids), step)][:n], False


def ref_stats(model, samples):
    """Per-channel absmax of every linear's input, per weight name, over all samples (ref_opt)."""
    names = {id(w): k for k, w in model.W.items()}
    stats = {}
    orig = ref_opt.linear

    def rec(x, w, b):
        k = names.get(id(w))
        if k is not None:
            m = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0)
            stats[k] = np.maximum(stats[k], m) if k in stats else m
        return orig(x, w, b)

    ref_opt.linear = rec
    try:
        for s in samples:
            model.forward(np.array([s]), np.ones((1, len(s)), dtype=np.int64))
    finally:
        ref_opt.linear = orig
    return stats


def rel_err(a, b):
    """Largest relative difference (values below 1e-3 count as 1e-3: float sums in another order)."""
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-3)))


# ---------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------

def test_kernels(fx):
    section('kernels')
    exe = fx.path('test_i8')
    # the other C files of the repository beside opt.c (included by the test), as tests/run.sh does
    srcs = ['tests/test_i8.c'] + sorted(f for f in os.listdir(ROOT) if f.endswith('.c') and f not in ('opt.c', 'pipe.c'))  # pipe.c needs MPI
    cmd = [ARGS.cc, '-std=c11', '-O2', '-fopenmp', '-ffp-contract=off', '-D_GNU_SOURCE', '-DOPT_NO_MAIN', '-I.'] + srcs + ['-lm', '-lpthread', '-o', exe]
    p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if not check(p.returncode == 0, 'tests/test_i8.c builds', ' '.join(cmd) + '\n' + p.stderr.decode()[-1500:]):
        return
    r = run([exe])
    for line in r.text.strip().split('\n'):
        print('        ' + line)
    check(r.rc == 0 and 'all passed' in r.text, 'int8 GEMM: exact integer products, bitwise across levels, batches, threads, splits', r.describe())


def test_calib(fx):
    section('calib')
    model = fx.synth('out32', outliers=True)
    ref = ref_opt.load_model(model)
    L = ref.cfg.layers
    alpha = 0.5
    for mode, calib, n, length in (('lines', fx.calib, 32, 64),
                                   ('text', fx.write('calib_text.txt', '\n'.join(sentences(3, 6, 60, 90)) + '\n'), 8, 48)):
        out = 'calib_%s.opt' % mode
        r = fx.convert(model, out, ['--w8a8-static'], samples=n, length=length, calib=calib)
        if not check(r.rc == 0, '%s: convert --w8a8-static' % mode, r.describe()):
            continue
        smp, lines = samples_like_opt(fx, calib, n, length)
        check(lines == (mode == 'lines') and ('one per line' in r.errtext) == lines and ('%d samples' % len(smp)) in r.errtext,
              '%s: %d samples, as documented (stderr: %s)' % (mode, len(smp), r.errtext.strip().split('\n')[0]), r.describe())
        data, formats = read_native(fx.path(out))
        st = ref_stats(ref, smp)
        worst = 0.0
        for l in range(L):
            p = 'decoder.layers.%d.' % l
            for mine, theirs in (('self_attn.q_proj', 'self_attn.q_proj'), ('self_attn.out_proj', 'self_attn.out_proj'),
                                 ('fc1', 'fc1'), ('fc2', 'fc2')):
                worst = max(worst, rel_err(data['layers.%d.%s.act_max' % (l, mine)], st[p + theirs + '.weight']))
        check(worst < 1e-3, '%s: act_max of q_proj/out_proj/fc1/fc2 inputs equal ref_opt\'s (max rel err %.1e)' % (mode, worst))
        if mode != 'lines':
            continue
        # smoothing factors, folding, int8 rounding, static scales: from ref_opt's statistics
        errs = {'smooth': 0.0, 'ln': 0.0, 'w': 0, 'scale': 0.0, 'act': 0.0}
        W = dict(ref.W)
        for l in range(L):
            p = 'decoder.layers.%d.' % l
            for pt, lin, ln in (('self_attn.q_proj', ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'], 'self_attn_layer_norm'),
                                ('fc1', ['fc1'], 'final_layer_norm')):
                act = st[p + lin[0] + '.weight']
                wmax = np.maximum(np.max([np.abs(ref.W[p + x + '.weight']).max(axis=0) for x in lin], axis=0), 1e-5)
                s_ref = np.maximum(act.astype(np.float64) ** alpha / wmax.astype(np.float64) ** (1 - alpha), 1e-5)
                s = data['layers.%d.%s.smooth' % (l, pt)]
                errs['smooth'] = max(errs['smooth'], rel_err(s, s_ref))
                for suf in ('weight', 'bias'):
                    want = (ref.W[p + ln + '.' + suf] / s).astype(np.float32)
                    got = data['layers.%d.%s.%s' % (l, ln, suf)]
                    errs['ln'] = max(errs['ln'], float(np.max(np.abs(got - want))))
                    W[p + ln + '.' + suf] = want
                for x in lin:
                    W[p + x + '.weight'] = (ref.W[p + x + '.weight'] * s[None, :]).astype(np.float32)
            for x in ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.out_proj', 'fc1', 'fc2'):
                w = W[p + x + '.weight']
                sc = (np.abs(w).max(axis=1) / np.float32(127)).astype(np.float32)
                q = np.clip(np.rint(w / sc[:, None]), -127, 127).astype(np.int8)
                errs['w'] = max(errs['w'], int(np.count_nonzero(q != data['layers.%d.%s.weight' % (l, x)])))
                errs['scale'] = max(errs['scale'], rel_err(data['layers.%d.%s.weight.scale' % (l, x)], sc))
        check(errs['smooth'] < 1e-4, 'smoothing factors follow max|X|^a / max|W|^(1-a) (max rel err %.1e)' % errs['smooth'])
        check(errs['ln'] == 0, 'LayerNorm weight and bias are exactly ln / s (max diff %g)' % errs['ln'])
        check(errs['w'] == 0 and errs['scale'] == 0,
              'int8 weights = rint(W*s / (absmax/127)), scales = absmax/127, exactly (%d values, scale rel err %g)' % (errs['w'], errs['scale']))
        ref.W, saved = W, ref.W
        st2 = ref_stats(ref, smp)
        ref.W = saved
        for l in range(L):
            p = 'decoder.layers.%d.' % l
            for x, inp in (('self_attn.q_proj', 'self_attn.q_proj'), ('self_attn.k_proj', 'self_attn.q_proj'), ('self_attn.v_proj', 'self_attn.q_proj'),
                           ('self_attn.out_proj', 'self_attn.out_proj'), ('fc1', 'fc1'), ('fc2', 'fc2')):
                want = max(float(st2[p + inp + '.weight'].max()), 1e-5) / 127
                got = formats['layers.%d.%s.weight' % (l, x)]['act_scale']
                errs['act'] = max(errs['act'], abs(got - want) / want)
        check(errs['act'] < 1e-4, 'static act_scale = per-tensor input max of the smoothed model / 127 (max rel err %.1e)' % errs['act'])


def test_smoothing(fx):
    section('smoothing')
    for name, outl in (('out32', True), ('plain32', False)):
        model = fx.synth(name, outliers=outl)
        base = opt(['score', '-m', model, '-f', fx.eval])
        if not check(base.rc == 0, '%s: score fp32' % name, base.describe()):
            continue
        for alpha in ('0.5', '1'):
            out = '%s_fold_%s.opt' % (name, alpha)
            r = fx.convert(model, out, ['--w8a8', '--alpha', alpha], env={'OPT_SQ_NO_QUANT': '1'})
            if not check(r.rc == 0, '%s alpha %s: OPT_SQ_NO_QUANT=1 convert' % (name, alpha), r.describe()):
                continue
            data, _ = read_native(fx.path(out))
            s = np.concatenate([data[k] for k in data if k.endswith('.smooth')])
            floats = all(data[k].dtype == np.float32 for k in data if k.endswith('proj.weight') or k.endswith('fc1.weight'))
            sc = opt(['score', '-m', fx.path(out), '-f', fx.eval])
            d = max(float(np.max(np.abs(a - b))) for a, b in zip(logprobs(sc), logprobs(base))) if sc.rc == 0 else float('inf')
            check(sc.rc == 0 and floats and d <= 1e-4 and np.abs(np.log(s)).max() > 1,
                  '%s alpha %s: folded fp32 model scores as before: max |d log-prob| %.1e <= 1e-4 (factors %.3g..%.3g)'
                  % (name, alpha, d, s.min(), s.max()), sc.describe())


def test_outliers(fx):
    section('outliers')
    rows, errs = [], {}
    for name, outl in (('out32', True), ('plain32', False)):
        model = fx.synth(name, outliers=outl)
        base = opt(['score', '-m', model, '-f', fx.eval])
        if not check(base.rc == 0, '%s: score fp32' % name, base.describe()):
            return
        ref = np.concatenate(logprobs(base))
        variants = [('fp16 weights', None, None)] if outl else []
        variants += [('W8A8 naive (per-token dynamic)', ['--w8a8'], {'OPT_SQ_NO_SMOOTH': '1'}),
                     ('W8A8 naive (per-tensor static)', ['--w8a8-static'], {'OPT_SQ_NO_SMOOTH': '1'}),
                     ('SmoothQuant O1 (a=0.5, dynamic)', ['--w8a8'], None),
                     ('SmoothQuant O3 (a=0.5, static)', ['--w8a8-static'], None)]
        rows.append((name, 'fp32', 0.0, 0.0, float(np.exp(-ref.mean()))))
        for label, flags, env in variants:
            if flags is None:
                m = fx.synth(name + '_f16', dtype='f16', outliers=outl)
            else:
                out = '%s_%d.opt' % (name, len(rows))
                r = fx.convert(model, out, flags, env)
                if not check(r.rc == 0, '%s: convert %s' % (name, label), r.describe()):
                    continue
                m = fx.path(out)
            sc = opt(['score', '-m', m, '-f', fx.eval])
            if not check(sc.rc == 0, '%s: score %s' % (name, label), sc.describe()):
                continue
            lp = np.concatenate(logprobs(sc))
            d = np.abs(lp - ref)
            errs[(name, label)] = float(d.mean())
            rows.append((name, label, float(d.mean()), float(d.max()), float(np.exp(-lp.mean()))))
    print('        %-8s %-34s %14s %14s %12s' % ('model', 'weights/activations', 'mean|d lp|', 'max|d lp|', 'perplexity'))
    for r in rows:
        print('        %-8s %-34s %14.4f %14.4f %12.1f' % r)
    e = lambda m, l: errs.get((m, l), float('inf'))
    naive, o1, o3 = 'W8A8 naive (per-token dynamic)', 'SmoothQuant O1 (a=0.5, dynamic)', 'SmoothQuant O3 (a=0.5, static)'
    floor = e('plain32', o1)  # what int8 costs on a model without outliers
    check(e('out32', naive) > 0.1 and e('out32', naive) > 8 * e('out32', o1),
          'naive W8A8 breaks on the outlier model: mean |d| %.3f (> 0.1 and > 8x SmoothQuant\'s %.3f)' % (e('out32', naive), e('out32', o1)))
    check(e('out32', naive) > 8 * e('plain32', naive),
          '... because of the outliers: %.3f against %.3f on the same model without them' % (e('out32', naive), e('plain32', naive)))
    check(e('out32', o1) < 2 * floor + 0.005 and e('out32', o1) < 0.06,
          'SmoothQuant O1 recovers: mean |d| %.4f (int8 on the plain model: %.4f)' % (e('out32', o1), floor))
    check(e('out32', o3) < 2 * e('plain32', o3) + 0.005 and e('out32', o3) < 0.1,
          'SmoothQuant O3 recovers: mean |d| %.4f (plain model: %.4f)' % (e('out32', o3), e('plain32', o3)))


def test_file(fx):
    section('file')
    model = fx.synth('out32', outliers=True)
    out = fx.path('file.opt')
    r = fx.convert(model, 'file.opt', ['--w8a8'])
    if not check(r.rc == 0, 'convert --w8a8', r.describe()):
        return
    data, formats = read_native(out)
    bad = []
    for l in range(2):
        for x, (rows, cols) in (('self_attn.q_proj', (256, 256)), ('self_attn.k_proj', (256, 256)), ('self_attn.v_proj', (256, 256)),
                                ('self_attn.out_proj', (256, 256)), ('fc1', (1024, 256)), ('fc2', (256, 1024))):
            k = 'layers.%d.%s.weight' % (l, x)
            w, s, f = data.get(k), data.get(k + '.scale'), formats.get(k, {})
            if w is None or w.dtype != np.int8 or w.shape != (rows, cols) or s is None or s.shape != (rows,) or f.get('format') != 'i8' or f.get('act_scale') != 0:
                bad.append(k)
    extras = [k for k in data if k.endswith('.act_max') or k.endswith('.smooth')]
    check(not bad and len(extras) == 2 * 6, 'linear weights are I8 [out, in] with F32 scales, dynamic; %d statistics tensors' % len(extras), 'bad: %s' % bad)
    info = opt(['info', '-m', out])
    check(info.rc == 0 and ('W8A8' in info.text or 'i8' in info.text), 'opt info reports the int8 weights',
          info.describe() + '\n' + info.text)
    gen = opt(['generate', '-m', out, '-n', '8', '--ignore-eos'], stdin=b'Hello world\nThe quick brown fox\n')
    check(gen.rc == 0 and len(gen.text.split('\n')) == 3, 'opt generate runs on it', gen.describe())
    ids = ' '.join(str(4 + (i * 7919) % 50000) for i in range(40))
    inp = '\n'.join([ids, ids[:60], '2 ' + ids[:100], ids[:30]]) + '\n'
    outs = {}
    for simd in ('scalar', 'avx2', 'avx512'):
        for b, t in (('1', '1'), ('16', '2')):
            r = opt(['score', '-m', out, '--ids', '-b', b, '-t', t], env={'OPT_SIMD': simd}, stdin=inp.encode())
            if r.rc == 0:
                outs['%s -b %s -t %s' % (simd, b, t)] = r.out
            elif 'supports only' not in r.errtext:
                check(False, 'score OPT_SIMD=%s' % simd, r.describe())
    same = len(set(outs.values())) == 1
    check(same and len(outs) >= 2, 'W8A8 scores are bitwise the same over %s' % ', '.join(outs), '\n'.join('%s: %s' % (k, v[:80]) for k, v in outs.items()))


def test_postln(fx):
    section('postln')
    d = fx.path('postln')
    p = subprocess.run([PY, os.path.join(HERE, 'mkckpt.py'), '-o', d, '--hidden', '128', '--layers', '2', '--heads', '4', '--ffn', '512',
                        '--embed-dim', '64', '--post-ln', '--dtype', 'f32', '--seed', '3'], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if not check(p.returncode == 0, 'mkckpt.py --post-ln', p.stderr.decode()[-800:]):
        return
    r = fx.convert(d, 'postln.opt', ['--w8a8'])
    notes = [l for l in r.errtext.split('\n') if 'post-LayerNorm' in l]
    check(r.rc == 0 and len(notes) == 1, 'converts to plain W8A8 and says so once: %s' % (notes[0].strip() if notes else ''), r.describe())
    data, _ = read_native(fx.path('postln.opt')) if r.rc == 0 else ({}, {})
    check(r.rc == 0 and not any(k.endswith('.smooth') for k in data) and data['layers.0.fc1.weight'].dtype == np.int8,
          'no smoothing factors; int8 weights')
    a, b = opt(['score', '-m', d, '-f', fx.eval]), opt(['score', '-m', fx.path('postln.opt'), '-f', fx.eval])
    ok = a.rc == 0 and b.rc == 0
    dd = float(np.mean(np.abs(np.concatenate(logprobs(a)) - np.concatenate(logprobs(b))))) if ok else float('inf')
    check(ok and dd < 0.1, 'scores close to fp32 (mean |d log-prob| %.4f)' % dd, (a.describe() + '\n' + b.describe()))


def test_errors(fx):
    section('errors')
    model = fx.synth('plain32')
    small = fx.path('smallvocab')
    if not os.path.exists(small):
        subprocess.run([PY, os.path.join(HERE, 'mkckpt.py'), '-o', small, '--hidden', '64', '--layers', '1', '--heads', '2', '--ffn', '128',
                        '--vocab', '1000', '--dtype', 'f32'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
    empty = fx.write('empty.txt', '')
    blank = fx.write('blank.txt', '\n  \n\t\n')
    bad = fx.write('bad.txt', b'fine first line\nsecond line \xff\xfe broken\nthird\n', binary=True)
    missing = fx.path('no-such-file.txt')
    cases = [
        ('empty calibration file', ['--w8a8', '--calib', empty], [empty, 'empty']),
        ('whitespace-only calibration file', ['--w8a8', '--calib', blank], [blank, 'no text']),
        ('non-UTF-8 calibration file', ['--w8a8', '--calib', bad], [bad + ':2:', 'UTF-8']),
        ('missing calibration file', ['--w8a8', '--calib', missing], [missing, 'No such file']),
        ('--alpha 1.5', ['--w8a8', '--calib', fx.calib, '--alpha', '1.5'], ['--alpha', '1.5']),
        ('--alpha -0.1', ['--w8a8', '--calib', fx.calib, '--alpha', '-0.1'], ['--alpha']),
        ('--w8a8 without --calib', ['--w8a8'], ['--calib']),
        ('--w8a8 with --int4-weights', ['--w8a8', '--int4-weights', '--calib', fx.calib], ['--int4-weights']),
        ('--calib-len beyond the positions', ['--w8a8', '--calib', fx.calib, '--calib-len', '5000'], ['--calib-len', '2048']),
    ]
    bins = [('opt', ARGS.opt)]
    if ARGS.asan and os.path.exists(ARGS.asan):
        bins.append(('opt-asan', ARGS.asan))
    else:
        skip('the same under opt-asan', '%s not built (make opt-asan)' % ARGS.asan)
    for bname, binary in bins:
        env = {'ASAN_OPTIONS': 'detect_leaks=0', 'UBSAN_OPTIONS': 'halt_on_error=1'}
        for what, flags, needles in cases + [('calibration tokens outside the vocabulary', ['--w8a8', '--calib', fx.calib], ['vocab'])]:
            m = small if 'vocabulary' in what else model
            out = fx.path('err.opt')
            r = opt(['convert', '-m', m, '-o', out, '--calib-samples', '8', '--calib-len', '32'] + flags, env=env, binary=binary)
            lines = [l for l in r.errtext.strip().split('\n') if l]
            ok = (isinstance(r.rc, int) and 0 < r.rc < 128 and len(lines) == 1 and all(n in lines[0] for n in needles)
                  and 'Sanitizer' not in r.errtext and 'runtime error' not in r.errtext
                  and not os.path.exists(out) and not os.path.exists(out + '.partial'))
            check(ok, '%s: %s: %s' % (bname, what, lines[0] if lines else ''), r.describe())


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--opt', default=os.path.join(ROOT, 'opt'))
    ap.add_argument('--asan', default=os.path.join(ROOT, 'opt-asan'))
    ap.add_argument('--cc', default=os.environ.get('CC', 'cc'))
    ap.add_argument('--tmp')
    ap.add_argument('--keep', action='store_true')
    ap.add_argument('--only')
    ARGS = ap.parse_args()
    ARGS.opt, ARGS.asan = os.path.abspath(ARGS.opt), os.path.abspath(ARGS.asan)
    if not os.path.exists(ARGS.opt):
        sys.exit('test_w8a8: %s not found (make CUDA=0)' % ARGS.opt)
    tmp = ARGS.tmp or tempfile.mkdtemp(prefix='opt-w8a8-')
    os.makedirs(tmp, exist_ok=True)
    fx = Fx(tmp)
    tests = [('kernels', test_kernels), ('calib', test_calib), ('smoothing', test_smoothing), ('outliers', test_outliers),
             ('file', test_file), ('postln', test_postln), ('errors', test_errors)]
    only = set(ARGS.only.split(',')) if ARGS.only else None
    t0 = time.time()
    harness.run_sections(tests, only, fx)
    if not ARGS.keep and not ARGS.tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(harness.summary('test_w8a8', t0))


if __name__ == '__main__':
    main()
