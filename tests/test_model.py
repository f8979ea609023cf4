#!/usr/bin/python3
"""End-to-end tests of `opt score` and `opt generate` on synthetic checkpoints.

    tests/test_model.py [--opt ./opt] [--tmp DIR] [--keep] [--only NAME,...]

The oracle is tests/ref_opt.py, an independent numpy implementation of Hugging Face's
OPTForCausalLM, imported in-process (it shares no code with opt).  Checkpoints come
from `opt synth` and from tests/mkckpt.py (which shares no code with opt either), so
a loader bug on one side cannot hide the same bug on the other.

Checks, each printed as one "ok"/"FAIL" line (details indented under a failure):

  checkpoints  `opt synth` writes config.json as transformers reads it (an untied
               lm_head needs "tie_word_embeddings": false).
  score        `opt score --ids` equals ref_opt's log-probabilities to 1e-3 on every
               checkpoint variant: pre-LN and post-LN, project_in/out, no final LN,
               no biases, non-affine LayerNorm, f32/f16/bf16, safetensors and .bin,
               sharded or not, prefixes model.decoder. and decoder., tied and untied
               lm_head; prompts of many lengths share a batch (-b 64), and -b 1 / -b 2
               give the same bytes.
  convert      the same weights in another container (mkckpt.py convert) give
               byte-identical output: a loader that misreads one format shows up.
  greedy       `opt generate --ids --ignore-eos` picks ref_opt's greedy tokens
               wherever the reference's top-2 logit margin exceeds 0.05.
  invariance   outputs are byte-identical across -b 1/2/3/64, -t 1/2, --step-rows
               and every SIMD level the CPU has (OPT_SIMD), for score and generate:
               a sequence's result must not depend on its batch-mates or the machine.
  bf16         --compute bf16 against ref_opt.py rounding every GEMM's inputs to bf16
               (f32 tolerance), byte-identical across -b, -t, --step-rows; greedy ids
               where the margin is big; one error line where the CPU lacks AVX-512 BF16.
  text         text prompts: `opt generate` prints the decoded continuation of what
               `--ids` generates for the tokenized prompt (tokenized and decoded here
               with the `tokenizers` library and vocab.json); text `score` equals
               `score --ids` of the tokenized prompt with BOS.
  eos          a small-vocabulary model where greedy decoding reaches </s> (id 2):
               generation stops right after it (and prints "</s>" in text modes),
               --ignore-eos continues; sequences that stop early do not disturb
               the others in their batch.
  sampling     --temperature/--top-k/--top-p/--seed: reproducible across -t, -b and
               SIMD levels; another seed gives other text; --top-k 1 is greedy; and
               the empirical distribution of 4000 one-token samples matches the
               reference's filtered softmax (a G-test).
  jsonl        --jsonl output parses as JSON with exactly the documented fields and
               agrees with the plain outputs; perplexity == exp(-mean(logprobs)).
  escapes      \\n \\t \\\\ round-trip through `tokenize` and `tokenize --decode`.
  n0           -n 0 generates nothing (an empty completion per prompt).
  positions    prompts up to max_position_embeddings work (and match the reference);
               one token more is refused with a one-line error naming the input line,
               before anything is printed.
  file         -f FILE and stdin give identical output.
  real         with $OPT_REAL_MODEL_DIR set to a facebook/opt-125m or opt-350m
               checkpoint: the published greedy outputs of transformers' tests in
               tests/data/hf_opt_expected.json,
               including the left-padded batch (skipped, saying so, when unset).

Exit status 0 only when every check passed.  Every opt run has a time limit, so a hang
is reported as a failure instead of stalling the suite.
"""
import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import ref_opt  # noqa: E402
import harness  # noqa: E402
from harness import check, section, skip  # noqa: E402

PY = sys.executable or '/usr/bin/python3'
import hf_tok  # noqa: E402
# Seconds per opt run: tiny models take well under one. After the first hang the limit
# drops to HUNG_TIMEOUT, so a bug that hangs every run cannot stall the suite for long.
TIMEOUT = int(os.environ.get('OPT_TEST_TIMEOUT', '20'))
HUNG_TIMEOUT = 8
MARGIN = 0.05      # greedy steps with a smaller top-2 margin in the reference are not compared
SCORE_TOL = 1e-3   # absolute, on natural-log probabilities
GPU_NOTE = 'opt: no usable GPU'  # a CUDA build's note on a machine without one: not an error line

_hung = set()  # checkpoints an opt run hung on: later runs on them are not started


def opt(args, stdin=b'', env=None):
    """Runs OPT with args; stdin is bytes or a list of str lines. A run that exceeds
    TIMEOUT is killed and reported; later runs on the same checkpoint fail at once,
    so one hang costs one timeout, not one per check."""
    model = args[args.index('-m') + 1] if '-m' in args[:-1] else None
    if model in _hung:
        return harness.Run([OPT] + args, 'not run: an earlier run on this checkpoint hung', b'', b'')
    r = harness.run([OPT] + args, stdin=stdin, env=env, timeout=HUNG_TIMEOUT if _hung else TIMEOUT)
    if isinstance(r.rc, str) and r.rc.startswith('hung'):
        _hung.add(model)
    return r


def ok_run(r, what):
    """A check that the run exited 0; returns whether it did."""
    if r.rc == 0:
        return True
    return check(False, what, r.describe())


def id_lines(seqs):
    return [' '.join(map(str, s)) for s in seqs]


def parse_floats(line):
    return [float(x) for x in line.split()]


# ---------------------------------------------------------------------------------------
# tokenizer side (independent of opt): tokenizers library + vocab.json byte mapping
# ---------------------------------------------------------------------------------------

def bytes_to_unicode():
    """GPT-2's byte <-> printable character table."""
    bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class Tok:
    """Encode with the `tokenizers` library (OPT's tokenizer, tests/hf_tok.py), decode via vocab.json."""

    def __init__(self, vocab_json):
        with open(vocab_json, encoding='utf-8') as f:
            vocab = json.load(f)
        inv = {c: b for b, c in bytes_to_unicode().items()}
        self.raw = {}
        for s, i in vocab.items():
            if s in ('</s>', '<s>', '<pad>', '<unk>', '<mask>') or not all(c in inv for c in s):
                self.raw[i] = s.encode('utf-8')
            else:
                self.raw[i] = bytes(inv[c] for c in s)
        self.hf = hf_tok.opt_tokenizer(os.path.dirname(vocab_json))

    def encode(self, text):
        """ids with BOS 2 first, as OPT's tokenizer makes them."""
        ids = self.hf.encode(text).ids
        return ids if ids[:1] == [2] else [2] + ids

    def decode_bytes(self, ids):
        return b''.join(self.raw.get(i, b'') for i in ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode('utf-8', 'replace')


def escape(text):
    return text.replace('\\', '\\\\').replace('\n', '\\n').replace('\t', '\\t')


def unescape(line):
    """The CLI's input escapes: \\n, \\t, \\\\; any other backslash stands for itself."""
    return re.sub(r'\\([nt\\])', lambda m: {'n': '\n', 't': '\t', '\\': '\\'}[m.group(1)], line)


# ---------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------

# name -> (maker, arguments). 'synth' runs `opt synth ARGS -o DIR`; 'mk' runs
# `mkckpt.py -o DIR ARGS`; 'convert' runs `mkckpt.py convert SRC DIR ARGS` (SRC first).
# Together they cover every layout and architecture switch opt reads.
MODELS = [
    ('synth-pre-f16', 'synth', ['--shape', '64x2x4x256', '--seed', '1']),
    ('synth-pre-bf16-bin3-decoder-untied', 'synth', ['--shape', '40x2x5x72', '--dtype', 'bf16', '--format', 'bin',
                                                     '--shards', '3', '--prefix', 'decoder.', '--no-tie', '--seed', '2']),
    ('synth-pre-f32-st3', 'synth', ['--shape', '48x3x3x100', '--dtype', 'f32', '--shards', '3', '--seed', '3']),
    ('mk-pre-f32', 'mk', ['--seed', '4']),
    ('mk-post-proj-f16-untied', 'mk', ['--post-ln', '--embed-dim', '32', '--dtype', 'f16', '--no-tie', '--seed', '5']),
    ('mk-post-proj-f32-bin-tied', 'mk', ['--post-ln', '--hidden', '48', '--heads', '4', '--ffn', '80', '--embed-dim', '64',
                                         '--format', 'bin', '--seed', '6']),
    ('mk-post-nobias-noaffine-bf16-bin', 'mk', ['--post-ln', '--no-bias', '--no-ln-affine', '--dtype', 'bf16', '--format',
                                                'bin', '--hidden', '36', '--heads', '3', '--ffn', '100', '--seed', '7']),
    ('mk-pre-nofinal-nobias-noaffine-f16-bin2-decoder', 'mk', ['--no-final-ln', '--no-bias', '--no-ln-affine', '--dtype',
                                                               'f16', '--format', 'bin', '--shards', '2', '--prefix',
                                                               'decoder.', '--layers', '3', '--seed', '8']),
    ('mk-pre-bf16-st2-decoder', 'mk', ['--dtype', 'bf16', '--shards', '2', '--prefix', 'decoder.', '--seed', '9',
                                       '--hidden', '60', '--heads', '5', '--ffn', '120']),  # head_dim 12
    # conversions: same stored values in another container (byte-identical output expected)
    ('cv-post-proj-f16-untied.bin3-decoder', 'convert', ['mk-post-proj-f16-untied', '--format', 'bin', '--shards', '3',
                                                          '--prefix', 'decoder.']),
    ('cv-pre-nofinal.st', 'convert', ['mk-pre-nofinal-nobias-noaffine-f16-bin2-decoder', '--format', 'safetensors',
                                      '--prefix', 'model.decoder.']),
    ('cv-synth-bf16.st', 'convert', ['synth-pre-bf16-bin3-decoder-untied', '--format', 'safetensors']),
    ('cv-pre-bf16.st1', 'convert', ['mk-pre-bf16-st2-decoder', '--prefix', 'model.decoder.']),
    # converted to another dtype: compared with the reference only
    ('cv-pre-f32-to-bf16.bin', 'convert', ['mk-pre-f32', '--dtype', 'bf16', '--format', 'bin']),
]
# checkpoints the invariance checks run on (every variant would only repeat them)
INVARIANCE_MODELS = ['synth-pre-f16', 'mk-post-proj-f16-untied', 'mk-post-nobias-noaffine-bf16-bin', 'mk-pre-bf16-st2-decoder']


def make_model(tmp, name, kind, args):
    d = os.path.join(tmp, name)
    if kind == 'synth':
        r = opt(['synth'] + args + ['-o', d])
        return d if r.rc == 0 else r.describe()
    if kind == 'mk':
        cmd = [PY, os.path.join(HERE, 'mkckpt.py'), '-o', d] + args
    else:
        cmd = [PY, os.path.join(HERE, 'mkckpt.py'), 'convert', os.path.join(tmp, args[0]), d] + args[1:]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return d if p.returncode == 0 else ' '.join(cmd) + ': ' + p.stderr.decode()


_ref_cache = {}


def ref_model(d):
    if d not in _ref_cache:
        _ref_cache[d] = ref_opt.load_model(d)
    return _ref_cache[d]


def prompts_for(name, vocab, lengths=(1, 2, 3, 9, 16, 17, 33, 48)):
    """Seeded id prompts of several lengths (BOS first on most), ids across the vocabulary."""
    rng = random.Random(int(hashlib.md5(name.encode()).hexdigest()[:8], 16))
    out = []
    for i, n in enumerate(lengths):
        s = [rng.randrange(3, vocab) for _ in range(n)]
        if i % 3 != 2:
            s[0] = 2
        if n > 5:
            s[n // 2] = rng.choice([1, 2, vocab - 1])  # pad, eos and the last id are ordinary inputs too
        out.append(s)
    return out


def compare_greedy(got_lines, ref_results, n):
    """Compares opt's greedy ids with the reference's until its first low-margin step.
    Returns (tokens compared, total tokens, list of mismatch descriptions)."""
    compared, total, bad = 0, 0, []
    for i, (line, (ref_ids, margins)) in enumerate(zip(got_lines, ref_results)):
        got = [int(x) for x in line.split()]
        total += n
        if len(got) != n:
            bad.append('prompt %d: %d tokens, expected %d' % (i, len(got), n))
            continue
        for t in range(n):
            if margins[t] < MARGIN:  # a near tie: float rounding may pick either
                break
            if got[t] != ref_ids[t]:
                bad.append('prompt %d step %d: opt %d, reference %d (margin %.4f)\n  opt %s\n  ref %s'
                           % (i, t, got[t], ref_ids[t], margins[t], got, ref_ids))
                break
            compared += 1
    return compared, total, bad


# ---------------------------------------------------------------------------------------
# the checks
# ---------------------------------------------------------------------------------------

def test_synth_config(models):
    """`opt synth` writes config.json as Hugging Face would: an untied lm_head needs
    "tie_word_embeddings": false, or transformers (default true) loads lm_head.weight
    into the input embedding as well and computes another model than opt does."""
    for name, kind, args in MODELS:
        if kind != 'synth' or name not in models:
            continue
        with open(os.path.join(models[name], 'config.json')) as f:
            cfg = json.load(f)
        untied = '--no-tie' in args
        check(cfg.get('tie_word_embeddings', True) == (not untied),
              'synth %s: config.json tie_word_embeddings is %s' % (' '.join(args), 'false' if untied else 'true or absent'),
              'tie_word_embeddings = %r' % cfg.get('tie_word_embeddings', '(absent, i.e. true)'))


def test_score_and_greedy(models):
    """Every checkpoint variant, scored and decoded greedily, against ref_opt. Guards
    the loaders (formats, shards, prefixes, dtypes, tying) and every architecture
    switch (pre/post-LN, projections, final LN, biases, LayerNorm affinity): a
    misread tensor or a skipped step moves log-probabilities by far more than 1e-3.
    Prompts of lengths 1..48 share one batch, so the packing of rows of different
    lengths is checked too; -b 1 and -b 2 must give the same bytes."""
    section('score: score and greedy vs ref_opt.py, every checkpoint variant')
    outputs = {}
    for name, d in models.items():
        m = ref_model(d)
        V = m.cfg.vocab_size
        prompts = prompts_for(name, V)
        r = opt(['score', '--ids', '-m', d, '-b', '64', '-t', '2'], id_lines(prompts))
        if not ok_run(r, 'score %s' % name):
            continue
        outputs[name] = r.out
        worst, detail = 0.0, ''
        lines = r.lines
        if len(lines) != len(prompts):
            check(False, 'score %s' % name, '%d output lines for %d prompts' % (len(lines), len(prompts)))
            continue
        for i, (p, line) in enumerate(zip(prompts, lines)):
            got, want = parse_floats(line), m.score(p)
            if len(got) != len(want):
                worst, detail = float('inf'), 'prompt %d: %d log-probs, expected %d' % (i, len(got), len(want))
                break
            if len(got):
                e = float(np.max(np.abs(np.array(got) - want)))
                if e > worst:
                    worst, detail = e, 'prompt %d (length %d): max |opt - ref| = %.3g' % (i, len(p), e)
        check(worst <= SCORE_TOL, 'score %s: max error %.2e (limit %g)' % (name, worst, SCORE_TOL), detail)
        bad = []
        for args in (['-b', '1', '-t', '1'], ['-b', '2', '-t', '2']):
            r2 = opt(['score', '--ids', '-m', d] + args, id_lines(prompts))
            if r2.rc != 0 or r2.out != r.out:
                bad.append('%s: %s' % (' '.join(args), r2.describe() if r2.rc else 'output differs from -b 64 -t 2'))
        check(not bad, 'score %s: -b 1 -t 1 and -b 2 -t 2 byte-identical to -b 64 -t 2' % name, '\n'.join(bad))

        n = 12
        gp = [p for p in prompts if len(p) + n <= m.cfg.max_pos]
        r = opt(['generate', '--ids', '--ignore-eos', '-n', str(n), '-m', d, '-b', '64', '-t', '2'], id_lines(gp))
        if not ok_run(r, 'greedy %s' % name):
            continue
        refs = [m.greedy(p, n) for p in gp]
        compared, total, bad = compare_greedy(r.lines, refs, n)
        check(not bad and len(r.lines) == len(gp),
              'greedy %s: %d of %d tokens compared (the rest follow a reference margin < %g)'
              % (name, compared, total, MARGIN), '\n'.join(bad))
        r2 = opt(['generate', '--ids', '--ignore-eos', '-n', str(n), '-m', d, '-b', '1', '-t', '1'], id_lines(gp))
        check(r2.rc == 0 and r2.out == r.out, 'greedy %s: -b 1 -t 1 byte-identical to -b 64 -t 2' % name,
              r2.describe() if r2.rc else 'outputs differ')
    return outputs


def test_conversions(models, score_out):
    """The same stored values in another container must give the same bytes: a
    loader that reads one format slightly differently (an offset, a dtype) shows up
    even where the 1e-3 tolerance against the reference would hide it."""
    section('convert: converted checkpoints give byte-identical output')
    for name, kind, args in MODELS:
        if kind != 'convert' or '--dtype' in args:
            continue
        src = args[0]
        if name in score_out and src in score_out:
            # the prompts are seeded by name: rerun the source's prompts on the copy
            m = ref_model(models[src])
            prompts = prompts_for(src, m.cfg.vocab_size)
            r = opt(['score', '--ids', '-m', models[name], '-b', '64', '-t', '2'], id_lines(prompts))
            check(r.rc == 0 and r.out == score_out[src], 'score %s == score %s' % (name, src),
                  r.describe() if r.rc else 'outputs differ')
        else:
            skip('convert %s' % name, 'the source or the copy failed above')


def simd_levels(d):
    r = opt(['info', '-m', d])
    m = re.search(r'\(best (\w+)\)', r.out.decode())
    best = m.group(1) if m else 'scalar'
    levels = ['scalar', 'avx2', 'avx512']
    return levels[:levels.index(best) + 1] if best in levels else ['scalar']


def test_invariance(models):
    """The design's claim that a sequence's result depends on nothing but itself:
    not on batch size, batch-mates, thread count, --step-rows (prefill chunking) or
    the SIMD level (fixed reduction order). Checked byte for byte."""
    section('invariance: batch, thread, step and SIMD level (byte-identical output)')
    for name in INVARIANCE_MODELS:
        if name not in models:
            continue
        d = models[name]
        m = ref_model(d)
        prompts = prompts_for(name, m.cfg.vocab_size) + prompts_for(name + 'x', m.cfg.vocab_size, (5, 2, 30, 1, 12))
        lines = id_lines(prompts)
        for cmd, extra in (('score', []), ('generate', ['-n', '10', '--ignore-eos'])):
            base = opt([cmd, '--ids', '-m', d, '-b', '64', '-t', '2'] + extra, lines)
            if not ok_run(base, '%s %s' % (cmd, name)):
                continue
            variants = [(['-b', '1', '-t', '1'], None), (['-b', '2', '-t', '2'], None), (['-b', '3', '-t', '1'], None),
                        (['-b', '64', '-t', '1'], None), (['-b', '5', '-t', '2', '--step-rows', '7'], None),
                        (['-b', '64', '-t', '2', '--step-rows', '1'], None)]
            variants += [(['-b', '64', '-t', '2'], {'OPT_SIMD': lv}) for lv in simd_levels(d)]
            variants += [(['-b', '2', '-t', '2'], {'OPT_SIMD': 'scalar'})]
            bad = []
            for args, env in variants:
                r = opt([cmd, '--ids', '-m', d] + args + extra, lines, env)
                label = ' '.join(args) + (' OPT_SIMD=%s' % env['OPT_SIMD'] if env else '')
                if r.rc != 0:
                    bad.append('%s: %s' % (label, r.describe()))
                elif r.out != base.out:
                    diff = [i for i, (a, b) in enumerate(zip(r.lines, base.lines)) if a != b]
                    bad.append('%s: differs from -b 64 -t 2 on prompts %s' % (label, diff[:8]))
            check(not bad, '%s %s: %d configurations identical' % (cmd, name, len(variants)), '\n'.join(bad))


def test_bf16_compute(models):
    """--compute bf16 against ref_opt.py computing the same thing (every GEMM's inputs
    and weights rounded to bf16, nearest even): what is left is f32 accumulation order,
    so the typical log-prob agrees within a tenth of the f32 tolerance and opt is far
    nearer this reference than the f32 one. Not every log-prob: a value within f32
    noise of a bf16 rounding boundary rounds the other way in the reference, an input
    moves by a bf16 ulp, and these random models amplify that; such a flip moves a
    log-prob less than rounding every input does, so the worst error stays within the
    f32 reference's. Truncating, or not rounding x, fails the first two bounds. Greedy
    ids equal where the reference's margin is big; the bytes do not depend on batch,
    threads or --step-rows (64+ rows take the lane GEMM, fewer the tiles: one order).
    Without AVX-512 BF16 (or under OPT_SIMD=avx2) it is one error line, exit 1."""
    section('bf16: --compute bf16 vs a bf16-rounding reference, invariance, refusal')
    d0 = models.get('synth-pre-f16')
    if d0:
        r = opt(['score', '--ids', '-m', d0, '--compute', 'bf16'], b'2 5 6\n', {'OPT_SIMD': 'avx2'})
        err = r.err.decode(errors='replace').strip().split('\n')
        check(r.rc == 1 and r.out == b'' and len(err) == 1 and '--compute bf16' in err[0],
              '--compute bf16 under OPT_SIMD=avx2: one error line, exit 1', r.describe())
        probe = opt(['score', '--ids', '-m', d0, '--compute', 'bf16'], b'2 5 6\n')
        if probe.rc != 0:
            skip('bf16 model checks', probe.err.decode(errors='replace').strip())
            return
    for name in INVARIANCE_MODELS[:3]:
        if name not in models:
            continue
        d = models[name]
        m, m32 = ref_opt.load_model(d, 'bf16'), ref_model(d)
        prompts = prompts_for(name, m.cfg.vocab_size) + prompts_for(name + 'x', m.cfg.vocab_size, (70, 5, 66))
        prompts = [p for p in prompts if len(p) <= m.cfg.max_pos]
        lines = id_lines(prompts)
        base = opt(['score', '--ids', '-m', d, '-b', '64', '-t', '2', '--compute', 'bf16'], lines)
        if not ok_run(base, 'score --compute bf16 %s' % name):
            continue
        errs, errs32, detail = [], [], ''
        for i, (p, line) in enumerate(zip(prompts, base.lines)):
            got, want = np.array(parse_floats(line)), m.score(p)
            if len(got) != len(want):
                errs, detail = [float('inf')], 'prompt %d: %d log-probs, expected %d' % (i, len(got), len(want))
                break
            errs += list(np.abs(got - want))
            errs32 += list(np.abs(got - m32.score(p)))
        errs, errs32 = np.array(errs), np.array(errs32 or [0.0])
        med, ratio = float(np.median(errs)), float(np.mean(errs) / max(np.mean(errs32), 1e-30))
        check(med <= SCORE_TOL / 10 and ratio <= 0.25 and errs.max() <= errs32.max(),
              'score --compute bf16 %s: median error %.1e (limit %g), mean 1/%.0f of the f32 reference\'s (limit 1/4), '
              'worst %.1e within the f32 reference\'s %.1e' % (name, med, SCORE_TOL / 10, 1 / max(ratio, 1e-9), errs.max(), errs32.max()), detail)
        bad = []
        for args in (['-b', '1', '-t', '1'], ['-b', '3', '-t', '2'], ['-b', '64', '-t', '1', '--step-rows', '7']):
            r = opt(['score', '--ids', '-m', d, '--compute', 'bf16'] + args, lines)
            if r.rc != 0 or r.out != base.out:
                bad.append('%s: %s' % (' '.join(args), r.describe() if r.rc else 'output differs from -b 64 -t 2'))
        check(not bad, 'score --compute bf16 %s: batch, threads and --step-rows give the same bytes' % name, '\n'.join(bad))
        n = 8
        gp = [p for p in prompts if len(p) + n <= m.cfg.max_pos]
        r = opt(['generate', '--ids', '--ignore-eos', '-n', str(n), '-m', d, '-b', '64', '-t', '2', '--compute', 'bf16'], id_lines(gp))
        if ok_run(r, 'greedy --compute bf16 %s' % name):
            compared, total, bad = compare_greedy(r.lines, [m.greedy(p, n) for p in gp], n)
            check(not bad and len(r.lines) == len(gp), 'greedy --compute bf16 %s: %d of %d tokens equal the bf16 reference'
                  % (name, compared, total), '\n'.join(bad))


def test_text(models, tok):
    """Text in, text out: prompts are tokenized (BOS first) and completions decoded
    and escaped exactly as the id modes and an independent tokenizer say."""
    section('text: text prompts')
    d = models.get('mk-pre-f32')
    if not d:
        skip('text', 'no model')
        return
    prompts = ['Hello world', 'The\\tquick\\nbrown \\\\ fox', '', 'Ünïcödé ✓ 日本語 😀', 'a' * 40,
               'Paris is the capital of', '  two leading spaces', 'back\\\\slash at the end\\\\']
    texts = [unescape(p) for p in prompts]
    ids = [tok.encode(t) for t in texts]
    n = 10
    g_text = opt(['generate', '-m', d, '-n', str(n), '--ignore-eos'], prompts)
    g_ids = opt(['generate', '--ids', '-m', d, '-n', str(n), '--ignore-eos'], id_lines(ids))
    if ok_run(g_text, 'generate text') and ok_run(g_ids, 'generate --ids'):
        want = [escape(tok.decode([int(x) for x in l.split()])) for l in g_ids.lines]
        bad = ['prompt %d: %r\n  expected %r' % (i, a, b) for i, (a, b) in enumerate(zip(g_text.lines, want)) if a != b]
        check(not bad and len(g_text.lines) == len(prompts),
              'generate prints the escaped, decoded continuation of the tokenized prompt', '\n'.join(bad))
    # --stream prints the raw (unescaped) completion as it comes, then a newline
    i = 1  # the prompt with a tab, a newline and a backslash
    st = opt(['generate', '--stream', '-m', d, '-n', str(n), '--ignore-eos'], [prompts[i]])
    if ok_run(st, 'generate --stream') and g_ids.rc == 0:
        want = tok.decode_bytes([int(x) for x in g_ids.lines[i].split()]) + b'\n'
        check(st.out == want, '--stream prints the raw completion and a newline', 'got %r\nexpected %r' % (st.out, want))
    s_text = opt(['score', '-m', d], prompts)
    s_ids = opt(['score', '--ids', '-m', d], id_lines(ids))
    if ok_run(s_text, 'score text') and ok_run(s_ids, 'score --ids'):
        check(s_text.out == s_ids.out, 'text score == score --ids of BOS + tokens',
              'text: %s\nids:  %s' % (s_text.lines[:2], s_ids.lines[:2]))


def find_eos_prompts(m, rng, candidates, n):
    """Prompts whose reference greedy continuation reaches id 2 with every margin up to
    it above MARGIN: [(prompt, ids up to and including the 2, full ids, margins)]."""
    found = []
    for p in candidates:
        g, mg = m.greedy(p, n)
        if 2 in g:
            k = g.index(2)
            if min(mg[:k + 1]) > MARGIN:
                found.append((p, g[:k + 1], g, mg))
    return found


def test_eos(tmp, tok):
    """</s> (id 2) ends a completion (after printing it) unless --ignore-eos; a
    sequence that stops frees its slot without disturbing its batch-mates. A
    64-token vocabulary makes id 2 a likely greedy choice; the prompts are those
    whose reference continuation reaches it with clear margins."""
    section('eos: end of sequence (</s>, id 2)')
    d = make_model(tmp, 'mk-vocab64', 'mk', ['--vocab', '64', '--hidden', '32', '--ffn', '64', '--seed', '11'])
    if not os.path.isdir(str(d)):
        check(False, 'make the vocab-64 model', d)
        return
    m = ref_model(d)
    rng = random.Random(5)
    n = 16
    cands = [[2] + [rng.randrange(3, 64) for _ in range(rng.randrange(1, 9))] for _ in range(120)]
    found = find_eos_prompts(m, rng, cands, n)
    if len(found) < 2:
        check(False, 'found prompts whose greedy continuation reaches </s>', 'only %d of 120' % len(found))
        return
    found = found[:6]
    # mix them with prompts that do not stop, in one batch
    others = [p for p in cands if 2 not in m.greedy(p, n)[0]][:4]
    prompts = [f[0] for f in found] + others
    r = opt(['generate', '--ids', '-m', d, '-n', str(n), '-b', '64'], id_lines(prompts))
    if ok_run(r, 'generate stopping at </s>'):
        bad = []
        for i, f in enumerate(found):
            got = [int(x) for x in r.lines[i].split()] if i < len(r.lines) else None
            if got != f[1]:
                bad.append('prompt %s: opt %s, expected %s (stop after the 2)' % (f[0], got, f[1]))
        for j, p in enumerate(others):
            i = len(found) + j
            got = [int(x) for x in r.lines[i].split()] if i < len(r.lines) else []
            cmp_, _, b = compare_greedy([' '.join(map(str, got))], [m.greedy(p, n)], n)
            bad += b
        check(not bad, 'generation stops right after </s> (%d prompts; %d others in the batch run on)'
              % (len(found), len(others)), '\n'.join(bad))
    r2 = opt(['generate', '--ids', '-m', d, '-n', str(n), '-b', '64', '--ignore-eos'], id_lines(prompts[:len(found)]))
    if ok_run(r2, 'generate --ignore-eos'):
        _, _, bad = compare_greedy(r2.lines, [(f[2], f[3]) for f in found], n)
        check(not bad and all(len(l.split()) == n for l in r2.lines),
              '--ignore-eos generates all %d tokens through </s>' % n, '\n'.join(bad))
    for b in ('1', '3'):
        r3 = opt(['generate', '--ids', '-m', d, '-n', str(n), '-b', b, '-t', '1'], id_lines(prompts))
        check(r3.rc == 0 and r3.out == r.out, 'stopping sequences: -b %s -t 1 output identical to -b 64' % b, r3.describe())
    # text modes print "</s>" at the end of a stopped completion: prompts made of words
    # whose tokens are all below 64, so this model can read them
    words = [' the', ' to', ' and', ' of', ' a', ' in', ' for', ' that', ' on', ' is', ' with', ' was', ' at', ' it',
             ' as', ' said', ' be', ' by', ' from', ' are', ' have', ' has', ' he', ' I', ' his', ' will', ' an',
             ' this', ' not', ' you', ' their', ' or', ' they', ' we', ' but', ' who', ' more', ' had', ' been',
             ' were', ' about', ' which', ' up', ' its', '.', ',', ':']
    texts = [''.join(rng.choice(words) for _ in range(rng.randrange(1, 7))) for _ in range(300)]
    cands = [(t, tok.encode(t)) for t in texts]
    cands = [(t, i) for t, i in cands if max(i) < 64]
    hits = [(t, f) for t, i in cands for f in find_eos_prompts(m, rng, [i], n)][:4]
    if not hits:
        skip('text generation ending in </s>', 'no text prompt found whose greedy continuation reaches id 2')
        return
    r5 = opt(['generate', '-m', d, '-n', str(n)], [escape(t) for t, _ in hits])
    if ok_run(r5, 'generate text stopping at </s>'):
        want = [escape(tok.decode(f[1])) for _, f in hits]
        bad = ['%r: %r, expected %r' % (t, a, b) for (t, _), a, b in zip(hits, r5.lines, want) if a != b]
        check(not bad and len(r5.lines) == len(hits) and all(l.endswith('</s>') for l in r5.lines),
              'text completions end with "</s>" and stop there (%d prompts)' % len(hits), '\n'.join(bad))
    r4 = opt(['generate', '--jsonl', '-m', d, '-n', str(n)], [json.dumps({'prompt': t}) for t, _ in hits])
    if ok_run(r4, 'generate --jsonl stopping at </s>'):
        bad = []
        for (t, f), line in zip(hits, r4.lines):
            try:
                o = json.loads(line)
            except ValueError as x:
                bad.append('not JSON (%s): %s' % (x, line))
                continue
            if o.get('ids') != f[1] or o.get('completion') != tok.decode(f[1]) or not o['completion'].endswith('</s>'):
                bad.append('%r: ids %s completion %r; expected ids %s and completion %r'
                           % (t, o.get('ids'), o.get('completion'), f[1], tok.decode(f[1])))
        check(not bad and len(r4.lines) == len(hits), '--jsonl: ids end with 2 and the completion with "</s>"',
              '\n'.join(bad))


def sample_dist(logits, temperature, top_k, top_p):
    """HF's processors in order: temperature, top-k, top-p (smallest set with mass >= p)."""
    z = logits.astype(np.float64) / temperature
    if top_k:
        kth = np.sort(z)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind='stable')
        cum = np.cumsum(p[order])
        keep = cum - p[order] < top_p  # a token is kept while the mass before it is below p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0)
        p /= p.sum()
    return p


def test_sampling(models, tmp):
    """Seeded sampling is reproducible whatever the batch, threads or SIMD level
    (each sequence has its own random stream), and it samples the right
    distribution: temperature, then top-k, then top-p, as transformers does."""
    section('sampling: temperature, top-k, top-p, seed')
    d = models.get('mk-pre-f32')
    if not d:
        skip('sampling', 'no model')
        return
    prompts = ['Hello world', 'The meaning of life is', '', 'Once upon a time']
    args = ['generate', '-m', d, '-n', '12', '--temperature', '0.8', '--top-k', '40', '--top-p', '0.9', '--seed', '7']
    base = opt(args + ['-b', '64', '-t', '2'], prompts)
    if not ok_run(base, 'sampling'):
        return
    bad = []
    for extra, env in ((['-b', '1', '-t', '1'], None), (['-b', '2', '-t', '2'], None), (['-b', '3', '-t', '1'], None),
                       (['-b', '64', '-t', '2'], {'OPT_SIMD': 'scalar'})):
        r = opt(args + extra, prompts, env)
        if r.rc != 0 or r.out != base.out:
            bad.append('%s %s: %s' % (' '.join(extra), env or '', r.describe() if r.rc else 'output differs'))
    check(not bad, 'seeded sampling is identical across -b, -t and SIMD levels', '\n'.join(bad))
    again = opt(args + ['-b', '64', '-t', '2'], prompts)
    check(again.out == base.out, 'the same seed twice gives the same output')
    other = opt(args[:-1] + ['8', '-b', '64', '-t', '2'], prompts)
    check(other.rc == 0 and other.out != base.out, '--seed 8 gives other output than --seed 7', other.describe())
    greedy = opt(['generate', '-m', d, '-n', '12', '--ignore-eos'], prompts)
    topk1 = opt(['generate', '-m', d, '-n', '12', '--ignore-eos', '--temperature', '0.8', '--top-k', '1', '--seed', '3'],
                prompts)
    check(greedy.rc == 0 and topk1.out == greedy.out, '--top-k 1 sampling equals greedy', topk1.describe())
    check(base.out != greedy.out, 'sampling at temperature 0.8 differs from greedy')

    # the distribution: 4000 copies of one prompt, one token each, on a 64-token vocabulary
    dv = make_model(tmp, 'mk-vocab64-s', 'mk', ['--vocab', '64', '--hidden', '32', '--ffn', '64', '--seed', '12'])
    if not os.path.isdir(str(dv)):
        check(False, 'make the vocab-64 model', dv)
        return
    m = ref_model(dv)
    prompt = [2, 10, 20, 30]
    h, _ = m.forward(np.asarray([prompt]), np.ones((1, len(prompt)), dtype=np.int64))
    logits = m.logits(h[0, -1:])[0]
    N = 4000
    for T, k, p in ((1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.8), (0.9, 20, 0.7), (2.0, 4, 0.6)):  # the last: top-p of top-k's mass
        want = sample_dist(logits, T, k, p)
        r = opt(['generate', '--ids', '-m', dv, '-n', '1', '--ignore-eos', '--temperature', str(T), '--top-k', str(k),
                 '--top-p', str(p), '--seed', '11', '-b', '256'], id_lines([prompt] * N))
        if not ok_run(r, 'sampling distribution'):
            continue
        counts = np.bincount([int(l) for l in r.lines], minlength=64).astype(np.float64)
        outside = int(counts[want == 0].sum())
        exp_ = want * N
        nz = (counts > 0) & (exp_ > 0)
        g = 2 * float(np.sum(counts[nz] * np.log(counts[nz] / exp_[nz])))
        dof = max(1, int((want > 0).sum()) - 1)
        # G is ~chi-square(dof): mean dof, sd sqrt(2 dof); 6 sd is far beyond chance
        limit = dof + 6 * math.sqrt(2 * dof) + 10
        check(outside == 0 and g < limit,
              'samples at T=%g top-k=%d top-p=%g follow the filtered softmax: G = %.1f (limit %.1f, %d tokens possible)'
              % (T, k, p, g, limit, dof + 1),
              '%d samples fell on tokens the filters exclude' % outside if outside else
              'most frequent: %s' % sorted(zip(counts, want * N, range(64)), reverse=True)[:6])


def test_jsonl(models, tok):
    """--jsonl is for programs: every line must parse, hold exactly the documented
    fields, and agree with the plain-text modes."""
    section('jsonl: --jsonl in and out')
    d = models.get('mk-pre-f32')
    if not d:
        skip('jsonl', 'no model')
        return
    texts = ['Hello world', 'quote " and backslash \\ and\nnewline\ttab', '', 'ünï ✓ 😀', 'Paris is the capital of']
    ids = [tok.encode(t) for t in texts]
    n = 8
    r = opt(['generate', '--jsonl', '-m', d, '-n', str(n), '--ignore-eos'], [json.dumps({'prompt': t}) for t in texts])
    plain = opt(['generate', '--ids', '-m', d, '-n', str(n), '--ignore-eos'], id_lines(ids))
    if ok_run(r, 'generate --jsonl') and ok_run(plain, 'generate --ids'):
        bad = []
        for i, line in enumerate(r.lines):
            try:
                o = json.loads(line)
            except ValueError as x:
                bad.append('line %d is not JSON (%s): %s' % (i, x, line))
                continue
            want_ids = [int(x) for x in plain.lines[i].split()]
            if sorted(o) != ['completion', 'ids', 'index', 'prompt']:
                bad.append('line %d fields %s' % (i, sorted(o)))
            elif o['index'] != i or o['prompt'] != texts[i] or o['ids'] != want_ids or o['completion'] != tok.decode(want_ids):
                bad.append('line %d: %s\n  expected index %d, prompt %r, ids %s, completion %r'
                           % (i, line, i, texts[i], want_ids, tok.decode(want_ids)))
        check(not bad and len(r.lines) == len(texts), 'generate --jsonl: index, prompt, completion, ids', '\n'.join(bad))
    r = opt(['generate', '--jsonl', '-m', d, '-n', str(n), '--ignore-eos'], [json.dumps({'ids': s}) for s in ids])
    if ok_run(r, 'generate --jsonl with {"ids": [...]}'):
        bad = []
        for i, line in enumerate(r.lines):
            try:
                o = json.loads(line)
                if o['prompt'] != ids[i] or o['ids'] != [int(x) for x in plain.lines[i].split()]:
                    bad.append('line %d: %s (expected prompt %s)' % (i, line, ids[i]))
            except (ValueError, KeyError) as x:
                bad.append('line %d is not the documented JSON (%s): %s' % (i, x, line))
        check(not bad, 'generate --jsonl with {"ids": [...]} input: valid JSON, prompt echoes the ids', '\n'.join(bad))

    s = opt(['score', '--jsonl', '-m', d], [json.dumps({'prompt': t}) for t in texts])
    sp = opt(['score', '--ids', '-m', d], id_lines(ids))
    if ok_run(s, 'score --jsonl') and ok_run(sp, 'score --ids'):
        bad = []
        for i, line in enumerate(s.lines):
            try:
                o = json.loads(line)
            except ValueError as x:
                bad.append('line %d is not JSON (%s): %s' % (i, x, line))
                continue
            if sorted(o) != ['ids', 'index', 'logprobs', 'perplexity', 'tokens']:
                bad.append('line %d fields %s' % (i, sorted(o)))
                continue
            lp = o['logprobs']
            want_lp = parse_floats(sp.lines[i])
            ppl = math.exp(-sum(lp) / len(lp)) if lp else 1.0
            if o['index'] != i or o['ids'] != ids[i] or len(o['tokens']) != len(ids[i]) \
                    or o['tokens'] != [tok.decode([t]) for t in ids[i]]:
                bad.append('line %d: index/ids/tokens %s %s %s; expected %d %s %s'
                           % (i, o['index'], o['ids'], o['tokens'], i, ids[i], [tok.decode([t]) for t in ids[i]]))
            elif len(lp) != len(want_lp) or any(abs(a - b) > 1e-6 * max(1, abs(b)) for a, b in zip(lp, want_lp)):
                bad.append('line %d: logprobs %s differ from score --ids %s' % (i, lp, want_lp))
            elif not abs(o['perplexity'] - ppl) <= 1e-6 * ppl:
                bad.append('line %d: perplexity %r, exp(-mean(logprobs)) = %r' % (i, o['perplexity'], ppl))
        check(not bad and len(s.lines) == len(texts),
              'score --jsonl: index, tokens, ids, logprobs (== score --ids), perplexity == exp(-mean)', '\n'.join(bad))


def test_escapes(models, tok):
    """The line format's escapes: \\n, \\t and \\\\ stand for newline, tab and
    backslash on input and are written back the same way, so any text survives a
    round trip through one-line-per-item files."""
    section('escapes: through tokenize and tokenize --decode')
    lines = ['a\\nb', 'tab\\there', 'back\\\\slash', '\\\\n is a backslash and an n', 'ends in a backslash\\\\',
             '\\\\\\\\', '\\n\\n\\t', 'plain', '']
    r = opt(['tokenize'], lines)
    if not ok_run(r, 'tokenize'):
        return
    want = [' '.join(map(str, tok.encode(unescape(l)))) for l in lines]
    bad = ['%r: %s, expected %s' % (l, a, b) for l, a, b in zip(lines, r.lines, want) if a != b]
    check(not bad and len(r.lines) == len(lines), 'escaped input lines tokenize as the text they stand for',
          '\n'.join(bad))
    back = opt(['tokenize', '--decode'], [' '.join(l.split()[1:]) for l in r.lines])
    if ok_run(back, 'tokenize --decode'):
        bad = ['%r came back as %r' % (a, b) for a, b in zip(lines, back.lines) if a != b]
        check(not bad and len(back.lines) == len(lines), 'decode(encode(line)) == line, escapes included',
              '\n'.join(bad))
    # a backslash before any other character stands for itself, and comes back escaped
    r = opt(['tokenize'], ['x\\qy'])
    r2 = opt(['tokenize', '--no-bos'], ['x\\\\qy'])
    check(r.rc == 0 and r2.rc == 0 and r.lines[0].split()[1:] == r2.lines[0].split(),
          'an unknown escape (\\q) is a literal backslash', '%s vs %s' % (r.lines, r2.lines))


def test_n0(models):
    """-n 0 is a request for nothing: no token may be generated."""
    section('n0: -n 0')
    d = models.get('mk-pre-f32')
    if not d:
        skip('-n 0', 'no model')
        return
    r = opt(['generate', '-m', d, '-n', '0'], ['Hello', 'world'])
    check(r.rc == 0 and r.out == b'\n\n', 'generate -n 0 prints an empty completion per prompt',
          'stdout %r\n%s' % (r.out[:200], r.describe()))
    r = opt(['generate', '--ids', '-m', d, '-n', '0'], ['2 100 200'])
    check(r.rc == 0 and r.out == b'\n', 'generate --ids -n 0 prints an empty line', 'stdout %r' % r.out[:200])
    r = opt(['generate', '--jsonl', '-m', d, '-n', '0'], [json.dumps({'prompt': 'Hello'})])
    try:
        o = json.loads(r.lines[0])
        good = o['completion'] == '' and o['ids'] == []
    except (ValueError, KeyError, IndexError):
        good = False
    check(r.rc == 0 and good, 'generate --jsonl -n 0: completion "" and ids []', 'stdout %r' % r.out[:200])


def one_line_error(r, must_contain=()):
    """exit 1, nothing on stdout, exactly one stderr line starting 'opt: ' that contains each string."""
    err = r.err.decode('utf-8', 'replace')
    lines = [l for l in err.split('\n') if not l.startswith(GPU_NOTE)]
    return (r.rc == 1 and r.out == b'' and len(lines) == 2 and lines[1] == '' and lines[0].startswith('opt: ')
            and all(s in lines[0] for s in must_contain))


def test_positions(tmp):
    """The learned position table bounds a sequence: up to max_position_embeddings
    tokens work, one more is refused up front (no partial output) with an error
    naming the input line, instead of reading past the table."""
    section('positions: max_position_embeddings')
    d = make_model(tmp, 'mk-maxpos16', 'mk', ['--max-pos', '16', '--hidden', '32', '--ffn', '64', '--seed', '13'])
    if not os.path.isdir(str(d)):
        check(False, 'make the max-pos-16 model', d)
        return
    m = ref_model(d)
    rng = random.Random(3)
    p16 = [2] + [rng.randrange(3, 50000) for _ in range(15)]
    p10 = p16[:10]
    r = opt(['score', '--ids', '-m', d], id_lines([p10, p16]))
    if ok_run(r, 'score 16 tokens on a 16-position model'):
        e = max(float(np.max(np.abs(np.array(parse_floats(l)) - m.score(p)))) for l, p in zip(r.lines, [p10, p16]))
        check(e <= SCORE_TOL, 'score of max_position_embeddings tokens matches the reference (error %.2e)' % e)
    r = opt(['score', '--ids', '-m', d], id_lines([p10, p16 + [5]]))
    check(one_line_error(r, ['<stdin>:2']), 'score of 17 tokens: one-line error naming <stdin>:2, no output',
          r.describe())
    r = opt(['generate', '--ids', '--ignore-eos', '-m', d, '-n', '6'], id_lines([p10]))
    if ok_run(r, 'generate 10 + 6 tokens on a 16-position model'):
        _, _, bad = compare_greedy(r.lines, [m.greedy(p10, 6)], 6)
        check(not bad, 'prompt + -n == max_position_embeddings works and matches the reference', '\n'.join(bad))
    r = opt(['generate', '--ids', '-m', d, '-n', '7'], id_lines([p10[:3], p10]))
    check(one_line_error(r, ['<stdin>:2']), 'prompt + -n > max_position_embeddings: one-line error naming <stdin>:2',
          r.describe())
    f = os.path.join(tmp, 'long.txt')
    with open(f, 'w') as fh:
        fh.write('Hello\n' + 'word ' * 40 + '\n')
    r = opt(['generate', '-m', d, '-n', '4', '-f', f])
    check(one_line_error(r, [f + ':2']), 'an over-long text prompt in -f FILE: the error names FILE:2', r.describe())


def test_file_vs_stdin(models, tmp):
    """-f FILE and stdin are the same input path (including a last line without a
    newline)."""
    section('file: -f FILE vs stdin')
    d = models.get('mk-pre-f32')
    if not d:
        skip('file', 'no model')
        return
    lines = ['Hello world', 'The\\tquick\\nbrown \\\\ fox', '', 'last line without newline']
    f = os.path.join(tmp, 'prompts.txt')
    with open(f, 'w', encoding='utf-8') as fh:
        fh.write('\n'.join(lines))  # no final newline: the last line still counts
    for cmd in (['generate', '-n', '6'], ['score']):
        a = opt(cmd + ['-m', d, '-f', f])
        b = opt(cmd + ['-m', d], ('\n'.join(lines)).encode())
        check(a.rc == 0 and a.out == b.out and len(a.lines) == len(lines),
              '%s: -f FILE and stdin identical (%d lines)' % (cmd[0], len(lines)), a.describe() + '\n' + b.describe())


def test_real(tok):
    """Greedy outputs published by transformers' OPT tests, for the checkpoint in
    $OPT_REAL_MODEL_DIR (opt-125m or opt-350m as downloaded from the Hub). Each HF test
    generates up to max_length tokens in all, prompt included; a left-padded batch
    generates max_length minus its longest prompt for every row. Decoding skips
    special tokens, so a final </s> is dropped before comparing. The Flax ports (which
    differ) and the non-greedy contrastive search are not compared; the FlexFlow comment
    (unknown provenance) is printed for information only."""
    section('real: a real checkpoint (OPT_REAL_MODEL_DIR)')
    d = os.environ.get('OPT_REAL_MODEL_DIR', '')
    if not d or not os.path.isdir(d):
        skip('real model', 'OPT_REAL_MODEL_DIR is not set to a directory' if not d else '%s is not a directory' % d)
        return
    try:
        with open(os.path.join(d, 'config.json')) as f:
            cfg = json.load(f)
        with open(os.path.join(hf_tok.DATA, 'hf_opt_expected.json'), encoding='utf-8') as f:
            vec = json.load(f)
    except (OSError, ValueError) as x:
        check(False, 'read config.json and hf_opt_expected.json', str(x))
        return
    hidden, proj = cfg.get('hidden_size'), cfg.get('word_embed_proj_dim') or cfg.get('hidden_size')
    size = {(768, 768): 'facebook/opt-125m', (1024, 512): 'facebook/opt-350m'}.get((hidden, proj))
    cases = [g for g in vec['greedy_generation'] if g.get('model') == size]
    if not cases:
        skip('real model', 'no published greedy outputs for this checkpoint (hidden %s, embed %s)' % (hidden, proj))
        return
    encode = tok.encode
    for g in cases:
        name = g.get('test', '')
        if 'Flax' in name or 'contrastive' in name:
            continue
        if 'ids' in g:  # a comment of unknown provenance: informational
            ids = g['ids'][:9]
            r = opt(['generate', '--ids', '-m', d, '-n', str(len(g['ids']) - 9)], id_lines([ids]))
            print('  info  %s: opt %s, the comment %s' % (name[:60], r.lines[:1], g['ids'][9:]))
            continue
        prompts = g.get('prompts') or g.get('sentences') or [g.get('prompt')]
        expected = g.get('expected_outputs') or [g.get('expected_output')]
        max_len = int(re.search(r'\d+', str(g['max_length'])).group())
        lens = [len(encode(p)) for p in prompts]
        if g.get('padding_side') == 'left':
            runs = [(list(range(len(prompts))), max_len - max(lens))]
        else:
            runs = [([i], max_len - lens[i]) for i in range(len(prompts))]
        for idx, n in runs:
            r = opt(['generate', '-m', d, '-n', str(n)], [escape(prompts[i]) for i in idx])
            for k, i in enumerate(idx):
                got = None
                if r.rc == 0 and k < len(r.lines):
                    got = prompts[i] + unescape(r.lines[k])
                    got = got[:-4] if got.endswith('</s>') else got
                check(got == expected[i], '%s (%s): %r' % (size, name.split(' (')[0], expected[i]),
                      'got %r\n%s' % (got, r.describe()))


def main():
    global OPT
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--opt', default=os.path.join(ROOT, 'opt'))
    ap.add_argument('--tmp', help='scratch directory (default: a new one, removed at the end)')
    ap.add_argument('--keep', action='store_true', help='keep the scratch directory')
    ap.add_argument('--only', help='comma-separated sections: score,convert,invariance,bf16,text,eos,sampling,jsonl,'
                                   'escapes,n0,positions,file,real')
    a = ap.parse_args()
    OPT = os.path.abspath(a.opt)
    if not os.access(OPT, os.X_OK):
        sys.exit('test_model: %s is not an executable' % OPT)
    tmp = a.tmp or tempfile.mkdtemp(prefix='opt-test-model-')
    os.makedirs(tmp, exist_ok=True)
    only = set(a.only.split(',')) if a.only else None
    want = lambda s: only is None or s in only  # noqa: E731
    tok = Tok(os.path.join(hf_tok.TOKDIR, 'vocab.json'))
    try:
        section('checkpoints: made with opt synth and mkckpt.py')
        models = {}
        needed = None if only is None or only & {'score', 'convert', 'invariance', 'bf16'} else {'mk-pre-f32'}
        for name, kind, args in MODELS:
            if needed is not None and name not in needed:
                continue
            d = make_model(tmp, name, kind, args)
            if os.path.isdir(str(d)):
                models[name] = d
            else:
                check(False, 'make %s' % name, d)
        print('  made %d checkpoints' % len(models))
        test_synth_config(models)
        score_out = {}
        if want('score'):
            score_out = test_score_and_greedy(models)
        if want('convert'):
            if not score_out:
                score_out = test_score_and_greedy(models)
            test_conversions(models, score_out)
        if want('invariance'):
            test_invariance(models)
        if want('bf16'):
            test_bf16_compute(models)
        if want('text'):
            test_text(models, tok)
        if want('eos'):
            test_eos(tmp, tok)
        if want('sampling'):
            test_sampling(models, tmp)
        if want('jsonl'):
            test_jsonl(models, tok)
        if want('escapes'):
            test_escapes(models, tok)
        if want('n0'):
            test_n0(models)
        if want('positions'):
            test_positions(tmp)
        if want('file'):
            test_file_vs_stdin(models, tmp)
        if want('real'):
            test_real(tok)
    finally:
        if not a.tmp and not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return harness.summary('test_model')


OPT = None
if __name__ == '__main__':
    sys.exit(main())
