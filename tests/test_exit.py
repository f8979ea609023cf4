#!/usr/bin/python3
"""Exit paths and what a fresh clone sees: messages, half-written output, the terminal.

    tests/test_exit.py [--opt ./opt] [--cuda OPT_CUDA_BINARY] [--tmp DIR] [-k SUBSTRING]

Every check prints one line ("  ok    NAME", "  FAIL  NAME" with details under it, or
"  skip  NAME: why"), the last line is "test_exit: N passed, M failed, K skipped", and the
exit status is 0 only when nothing failed.  Every opt run has a time limit.

What is checked, and what each group guards against:
  gpu       the CPU build's `opt info` gpu line says it was built without CUDA; a CUDA build
            (--cuda PATH, $OPT_CUDA, or --opt itself when it is one) on a machine without an NVIDIA driver is silent with
            --device auto (nothing on stderr, the CPU build's output), `--device gpu` dies in
            one line naming "no NVIDIA driver", and `opt info` says so on its gpu line.  Skipped
            for a CUDA build on a machine that has a driver (tests/gpu.sh covers that).
  synth     `opt synth` writes DIR.tmp-PID and renames it: killed by SIGTERM in the middle,
            failing on a write (RLIMIT_FSIZE: EFBIG, then SIGXFSZ), nothing is left, neither DIR
            nor a temporary; an existing non-empty DIR is refused in one line and left as it
            was; an existing empty DIR is filled.
  convert   a write killed by SIGXFSZ leaves no FILE.partial and an existing FILE untouched;
            quantizing a quantized file (4-bit or W8A8 to --int4-weights, 4-bit to --w8a8) is
            refused in one line naming the file, writing nothing; a native f16 file converts to
            4-bit exactly as its source checkpoint does (same tensor bytes, same scores).
  progress  on a terminal (a pty as stdout and stderr) every generated line appears whole on
            its own screen line: the progress line is cleared before stdout writes; under a
            policy the line names the block, its phase and token.
  info      the parameter count and the per-dtype counts both equal the count computed here
            from the shape: tied and untied, f16 and 4-bit (whose line once showed bytes).
"""
import argparse
import ctypes
import glob
import os
import pty
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import harness  # noqa: E402
from harness import check, skip  # noqa: E402

VOCAB, MAX_POS = 50272, 2048  # what opt synth writes for every HxLxAxF shape


def opt(args, binary=None, env=None, **kw):
    e = {'OPT_DEVICE': 'cpu'}
    e.update(env or {})
    return harness.run([binary or OPT] + args, env=e, **kw)


def auto(args, binary, **kw):
    """A run with --device auto: OPT_DEVICE unset (tests/run.sh sets it to cpu)."""
    return harness.run([binary] + args, drop=('OPT_SIMD', 'OPT_DEVICE'), **kw)


def err_lines(r):
    return [l for l in r.errtext.split('\n') if l]


def one_line_error(r, names=()):
    """exit 1, nothing on stdout, one stderr line starting 'opt: ' naming each of names."""
    lines, probs = err_lines(r), []
    if r.rc != 1:
        probs.append('exit %s, wanted 1' % r.rc)
    if r.out:
        probs.append('stdout not empty: %r' % r.out[:100])
    if len(lines) != 1 or not lines[0].startswith('opt: '):
        probs.append('stderr is not one "opt: " line: %r' % lines[:3])
    elif any(n not in lines[0] for n in names):
        probs.append('%r does not name %s' % (lines[0], names))
    return probs


def synth(name, shape, *extra):
    d = os.path.join(TMP, name)
    return harness.fixture(d, opt, ['synth', '--shape', shape, '-o', d] + list(extra))


def convert(src, name, *extra):
    f = os.path.join(TMP, name)
    return harness.fixture(f, opt, ['convert', '-m', src, '-o', f] + list(extra))


def around(path):
    """Names beside path that start with its name (the target and any temporary)."""
    return sorted(os.path.basename(p) for p in glob.glob(path + '*'))


# ----------------------------------------------------------------------------
# gpu

def test_gpu(prompts):
    model = synth('s64', '64x2x4x256')
    r = opt(['info', '-m', model])
    gpu = [l for l in r.lines if l.startswith('gpu ')]
    cuda_build = gpu and 'built without CUDA' not in gpu[0]
    if not cuda_build:
        check(r.rc == 0 and gpu and 'built without CUDA' in gpu[0], 'CPU build: the info gpu line says it was built without CUDA',
              '%s\n%s' % (gpu, r.tail()))
    cuda = CUDA or (OPT if cuda_build else None)  # make test's default build is the CUDA one where nvcc exists
    if not cuda:
        skip('CUDA build on a machine without a driver', 'no CUDA build given (--cuda PATH or OPT_CUDA)')
        return
    r = opt(['info', '-m', model], binary=cuda)
    gpu = [l for l in r.lines if l.startswith('gpu ')]
    if not gpu or 'built without CUDA' in gpu[0]:
        check(False, '%s is a CUDA build' % cuda, '%s\n%s' % (gpu, r.tail()))
        return
    try:
        ctypes.CDLL('libcuda.so.1')
        skip('CUDA build on a machine without a driver', 'this machine has one (tests/gpu.sh tests it): %s' % gpu[0])
        return
    except OSError:
        pass
    check(r.rc == 0 and 'no NVIDIA driver' in gpu[0], 'CUDA build, no driver: the info gpu line says so', '%s\n%s' % (gpu[0], r.tail()))
    args = ['generate', '-m', model, '-n', '2', '-f', prompts]
    ref = opt(args)
    r = auto(args, cuda)
    check(r.rc == 0 and r.err == b'' and r.out == ref.out, 'CUDA build, no driver, --device auto: nothing on stderr, the CPU output',
          'exit %s, stderr %r, same output: %s' % (r.rc, r.errtext[:300], r.out == ref.out))
    r = auto(args + ['--device', 'gpu'], cuda)
    check(not one_line_error(r, ['--device gpu', 'no NVIDIA driver']), 'CUDA build, no driver, --device gpu: one line naming the missing driver',
          '\n'.join(one_line_error(r, ['--device gpu', 'no NVIDIA driver'])) + '\n' + r.errtext[:300])


# ----------------------------------------------------------------------------
# synth and convert: output appears whole or not at all

def small_fsize(sigxfsz_ignored):
    def f():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN if sigxfsz_ignored else signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
    return f


def test_synth(_):
    # SIGTERM once the temporary directory exists (a ~100 MB checkpoint: a second or so)
    target = os.path.join(TMP, 'synth-killed')
    p = subprocess.Popen([OPT, 'synth', '--shape', '1024x4x16x4096', '-o', target], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tmpdir = '%s.tmp-%d' % (target, p.pid)
    running, err = harness.interrupt(p, signal.SIGTERM, lambda: os.path.exists(os.path.join(tmpdir, 'config.json')), 30)
    left = around(target)
    if not running:
        check(False, 'synth killed by SIGTERM in the middle', 'it was not running with its temporary directory (exit %s): %s' % (p.returncode, err[-300:]))
    else:
        check(p.returncode == -signal.SIGTERM and not left, 'synth killed by SIGTERM in the middle: neither DIR nor DIR.tmp-PID is left',
              'exit %s, left %s; %s' % (p.returncode, left, err[-300:]))
    shutil.rmtree(tmpdir, ignore_errors=True)

    # a write fails half-way: EFBIG (die) and SIGXFSZ (a signal)
    for ignored, how in ((True, 'a write error (EFBIG)'), (False, 'SIGXFSZ')):
        target = os.path.join(TMP, 'synth-fsize-%d' % ignored)
        r = opt(['synth', '--shape', '64x2x4x256', '-o', target], preexec=small_fsize(ignored))
        left = around(target)
        ok = (r.rc == 1 and len(err_lines(r)) == 1) if ignored else r.rc == -signal.SIGXFSZ
        check(ok and not left, 'synth stopped by %s: nothing left' % how, 'exit %s, left %s; %s' % (r.rc, left, r.errtext[-300:]))

    # an existing directory: refused when it has anything in it, filled when empty
    full = os.path.join(TMP, 'synth-full')
    os.makedirs(full, exist_ok=True)
    with open(os.path.join(full, 'notes.txt'), 'w') as f:
        f.write('mine\n')
    r = opt(['synth', '--shape', '64x2x4x256', '-o', full])
    probs = one_line_error(r, [full])
    if os.listdir(full) != ['notes.txt'] or around(full) != ['synth-full']:
        probs.append('the directory changed: %s, beside it %s' % (os.listdir(full), around(full)))
    check(not probs, 'synth into a non-empty directory: refused in one line, the directory untouched', '\n'.join(probs))
    empty = os.path.join(TMP, 'synth-empty')
    os.makedirs(empty, exist_ok=True)
    r = opt(['synth', '--shape', '64x2x4x256', '-o', empty])
    check(r.rc == 0 and os.path.isfile(os.path.join(empty, 'model.safetensors')) and around(empty) == ['synth-empty'],
          'synth into an empty directory fills it', r.tail())


def test_convert(_):
    src = synth('s64-untied', '64x2x4x256', '--no-tie')
    out = os.path.join(TMP, 'cv.q4')
    r = opt(['convert', '-m', src, '-o', out, '--int4-weights'], preexec=small_fsize(False))
    check(r.rc == -signal.SIGXFSZ and around(out) == [], 'convert killed by SIGXFSZ: no FILE, no FILE.partial',
          'exit %s, left %s; %s' % (r.rc, around(out), r.tail()))
    with open(out, 'wb') as f:
        f.write(b'old')
    r = opt(['convert', '-m', src, '-o', out, '--int4-weights'], preexec=small_fsize(False))
    check(r.rc == -signal.SIGXFSZ and around(out) == ['cv.q4'] and open(out, 'rb').read() == b'old',
          'convert killed by SIGXFSZ over an existing FILE: FILE untouched, no FILE.partial', 'exit %s, left %s' % (r.rc, around(out)))
    os.unlink(out)

    q4 = convert(src, 's64.q4', '--int4-weights')
    w8 = convert(src, 's64.w8', '--w8a8', '--calib', os.path.join(HERE, 'prompts.txt'), '--calib-samples', '4', '--calib-len', '16')
    calib = ['--calib', os.path.join(HERE, 'prompts.txt'), '--calib-samples', '4', '--calib-len', '16']
    for f, flags, what in ((q4, ['--int4-weights'], '4-bit to --int4-weights'), (q4, ['--int4-weights', '--group-size', '32'], '4-bit to --int4-weights --group-size 32'),
                           (w8, ['--int4-weights'], 'W8A8 to --int4-weights'), (q4, ['--w8a8'] + calib, '4-bit to --w8a8'),
                           (w8, ['--w8a8'] + calib, 'W8A8 to --w8a8')):
        out = os.path.join(TMP, 'cv-again')
        r = opt(['convert', '-m', f, '-o', out] + flags)
        probs = one_line_error(r, [f, 'already quantized'])
        if around(out):
            probs.append('left %s' % around(out))
        check(not probs, 'convert %s: refused in one line naming the file, nothing written' % what, '\n'.join(probs))

    # a native f16 file is a checkpoint like any other: to 4 bits exactly as its source
    nat = convert(src, 's64.native')
    a = convert(nat, 's64.native.q4', '--int4-weights')

    def tensors(path):
        with open(path, 'rb') as f:
            n = int.from_bytes(f.read(8), 'little')
            f.seek(8 + n)
            return f.read()
    ids = os.path.join(TMP, 'ids')
    with open(ids, 'w') as f:
        f.write('2 5 6 7 100 200 300\n2 9 8\n')
    s1, s2 = opt(['score', '--ids', '-m', q4, '-f', ids]), opt(['score', '--ids', '-m', a, '-f', ids])
    check(tensors(a) == tensors(q4) and s1.rc == 0 and s1.out == s2.out, 'convert of a native f16 file to 4 bits: the same tensor bytes and scores as from its source',
          'tensors equal: %s; %s / %s' % (tensors(a) == tensors(q4), s1.tail(1), s2.tail(1)))


# ----------------------------------------------------------------------------
# progress on a terminal

def screen(raw):
    """The lines a terminal shows for raw output: \\r returns, ESC[K erases to the end, \\n (\\r\\n
    from the pty) ends a line."""
    lines, cur, col = [], [], 0
    text = raw.decode('utf-8', 'replace')
    i = 0
    while i < len(text):
        ch = text[i]
        if text.startswith('\x1b[K', i):
            del cur[col:]
            i += 3
            continue
        if ch == '\r':
            col = 0
        elif ch == '\n':
            lines.append(''.join(cur))
            cur, col = [], 0
        else:
            if col < len(cur):
                cur[col] = ch
            else:
                cur.append(ch)
            col += 1
        i += 1
    if cur:
        lines.append(''.join(cur))
    return lines


def on_pty(argv, timeout=60, stdout=None):
    """Runs argv with a pty as stderr and stdout (or the file stdout); returns (exit status, raw bytes)."""
    master, slave = pty.openpty()
    e = {k: v for k, v in os.environ.items() if k != 'OPT_SIMD'}
    e['OPT_DEVICE'] = 'cpu'
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout or slave, stderr=slave, env=e)
    os.close(slave)
    raw, t0 = b'', time.time()
    while time.time() - t0 < timeout:
        r, _, _ = select.select([master], [], [], 0.5)
        if r:
            try:
                b = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not b:
                break
            raw += b
        elif p.poll() is not None:
            break
    os.close(master)
    try:
        rc = p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        rc = 'hung'
    return rc, raw


def test_progress(prompts):
    model = synth('s128', '128x4x8x512')
    offdir = os.path.join(TMP, 'progress-off')
    os.makedirs(offdir, exist_ok=True)
    base = ['generate', '-m', model, '-n', '24', '-f', prompts, '-b', '2']
    pol = ['--percent', '0', '0', '0', '0', '0', '0', '--gpu-batch-size', '1', '--num-gpu-batches', '2', '--offload-dir', offdir]
    for extra, label in (([], 'plain'), (pol, 'under a policy')):
        ref = opt(base + extra)
        want = ref.lines
        rc, raw = on_pty([OPT] + base + extra)
        shown = screen(raw)
        missing = [l for l in want if l not in shown]
        check(ref.rc == 0 and rc == 0 and want and not missing, 'progress on the terminal (%s): every output line whole on its own screen line' % label,
              'exit %s; %d of %d lines garbled, e.g. %r\nscreen: %r' % (rc, len(missing), len(want), missing[:1], shown[:6]))
        if extra:
            bars = re.findall(r'block \d+/\d+ (?:prefill|token \d+/24)', raw.decode('utf-8', 'replace'))
            check(bool(bars), 'progress under a policy names the block, its phase and token', repr(raw[-400:]))
    # an error while the progress line shows starts a line of its own (stdout a full disk)
    with open('/dev/full', 'wb') as full:
        rc, raw = on_pty([OPT] + base, stdout=full)
    shown = screen(raw)
    check(rc == 1 and any(l.startswith('opt: <stdout>: write failed') for l in shown),
          'an error while the progress line shows is on a line of its own', 'exit %s; screen: %r' % (rc, shown[-3:]))
    # not a terminal: no progress line at all
    r = opt(base)
    check(r.rc == 0 and r.err == b'', 'stderr not a terminal: no progress line', r.errtext[:200])


# ----------------------------------------------------------------------------
# info

def shape_params(h, layers, ffn, tied):
    layer = 4 * h * h + 4 * h + 2 * h * ffn + ffn + h + 4 * h  # q k v o, fc1 fc2, biases, 2 LayerNorms
    return VOCAB * h + (MAX_POS + 2) * h + layers * layer + 2 * h + (0 if tied else VOCAB * h)


def info_counts(path):
    r = opt(['info', '-m', path])
    total = re.search(r'^parameters\s+(\d+)', r.text, re.M)
    per = {m.group(1): int(m.group(2)) for m in re.finditer(r'^dtype (\w+)\s+(\d+) parameters', r.text, re.M)}
    return r, int(total.group(1)) if total else None, per


def test_info(_):
    for shape, tied in (('64x2x4x256', True), ('64x2x4x256', False), ('48x3x3x100', False)):
        h, layers, _, ffn = (int(x) for x in shape.split('x'))
        want = shape_params(h, layers, ffn, tied)
        src = synth('info-%s-%s' % (shape, 'tied' if tied else 'untied'), shape, '--tie' if tied else '--no-tie')
        q4 = convert(src, 'info-%s-%s.q4' % (shape, tied), '--int4-weights', '--group-size', '32')
        for path, what in ((src, 'f16'), (q4, '4-bit')):
            r, total, per = info_counts(path)
            check(r.rc == 0 and total == want and sum(per.values()) == want,
                  'info %s %s %s: parameters and the per-dtype counts are %d' % (shape, 'tied' if tied else 'untied', what, want),
                  'parameters %s, per dtype %s (sum %d); %s' % (total, per, sum(per.values()), r.tail(2)))


# ----------------------------------------------------------------------------

def main():
    global OPT, CUDA, TMP
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--opt', default=os.path.join(ROOT, 'opt'))
    ap.add_argument('--cuda', default=os.environ.get('OPT_CUDA') or None, help='a CUDA build (default: $OPT_CUDA)')
    ap.add_argument('--tmp', default=None, help='scratch directory (default: a new one under $TMPDIR, removed after)')
    ap.add_argument('-k', default=None, help='run only the groups whose name contains this')
    a = ap.parse_args()
    OPT, CUDA = os.path.abspath(a.opt), os.path.abspath(a.cuda) if a.cuda else None
    if not os.access(OPT, os.X_OK):
        print('test_exit: %s is missing: make CUDA=0' % OPT)
        print('test_exit: 0 passed, 1 failed, 0 skipped')
        return 1
    own_tmp = a.tmp is None
    TMP = os.path.abspath(a.tmp or tempfile.mkdtemp(prefix='opt-exit-'))
    os.makedirs(TMP, exist_ok=True)
    t0 = time.time()
    try:
        prompts = os.path.join(TMP, 'prompts.txt')
        with open(prompts, 'w') as f:
            f.write('Hello, my name is\nThe capital of France\nOnce upon a time\nIn 1492\nA B C\n')
        groups = [('gpu', test_gpu), ('synth', test_synth), ('convert', test_convert), ('progress', test_progress), ('info', test_info)]
        for name, fn in groups:
            if a.k is None or a.k in name:
                harness.section(name)
                harness.run_sections([(name, fn)], None, prompts)
    finally:
        if own_tmp:
            shutil.rmtree(TMP, ignore_errors=True)
    return harness.summary('test_exit', t0)


if __name__ == '__main__':
    sys.exit(main())
