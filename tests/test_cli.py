#!/usr/bin/python3
"""The command line: one consistent interface across opt's commands.

    tests/test_cli.py [--opt ./opt] [--asan ./opt-asan] [--tmp DIR]

Every refusal must be exit status 1, nothing on stdout and exactly one line on stderr,
starting with "opt: " and naming what is wrong. Sections:
  options    every option that some command's --help lists is accepted by exactly the
             commands whose --help lists it, and refused by the others with
             "opt: OPT does not apply to opt CMD"; the brief's examples (score -n, tokenize
             --percent, convert --calib without --w8a8, synth --temperature, info -b);
             score --stream; --stream with --jsonl or --ids; --top-k/--top-p sample at
             temperature 1 unless --temperature 0 is given, which is refused
  version    opt --version and opt version: one line, the version and the build
  input      -f - is stdin; tokenize -m naming no directory is refused (a directory
             without a tokenizer uses the built-in one); a BOM and CRLF line ends give the
             same ids and scores as the clean file; an empty line is a prompt (BOS alone,
             also under the sanitizers); blank --jsonl lines are skipped and "index" counts
             prompts
  truncate   a too-long prompt is one error naming FILE:LINE, its token count and the
             limit, before any output (score: the positions; generate: less -n);
             --truncate left scores and generates exactly as the kept ids given directly
  stdout     stdout on /dev/full: info, plan, lp, probe, bench --json, tokenize, version
             and --help exit 1 with "opt: <stdout>: write failed: No space left on device"
Exit status 0 only when every check passed.
"""
import argparse
import os
import re
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402
from harness import check, section, skip  # noqa: E402

OPT = ASAN = TMP = MODEL = None
COMMANDS = ('generate', 'score', 'tokenize', 'synth', 'info', 'bench', 'convert', 'version')
FULL = 'opt: <stdout>: write failed: No space left on device'
SAN_ENV = {'ASAN_OPTIONS': 'detect_leaks=0:abort_on_error=0', 'UBSAN_OPTIONS': 'print_stacktrace=1'}


def opt(args, stdin=b'', binary=None, **kw):
    return harness.run([binary or OPT] + args, stdin=stdin, env=SAN_ENV if binary == ASAN else None, timeout=120, **kw)


def err_lines(r):
    # a CUDA build on a machine without a GPU says so first: that note is not the error
    return [l for l in r.errtext.split('\n') if l and not l.startswith('opt: no usable GPU')]


def refused(what, r, *names):
    """r is a clean refusal: exit 1, no stdout, one stderr line "opt: ..." naming each of names."""
    lines = err_lines(r)
    problems = []
    if r.rc != 1:
        problems.append('exit %s, expected 1' % r.rc)
    if r.out:
        problems.append('stdout not empty: %r' % r.out[:100])
    if len(lines) != 1 or not lines[0].startswith('opt: '):
        problems.append('stderr is not one "opt: " line')
    for n in names:
        if not lines or n not in lines[0]:
            problems.append('the error does not name %r' % n)
    return check(not problems, what, '; '.join(problems) + '\n' + r.describe())


def ran(what, r):
    """r exited 0 without a sanitizer report."""
    ok = r.rc == 0 and 'Sanitizer' not in r.errtext and 'runtime error' not in r.errtext
    return check(ok, what, r.describe())


def write(name, data):
    p = os.path.join(TMP, name)
    with open(p, 'wb') as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return p


# ---- options ----

# A value each option accepts (anything not here takes '1'); -m names no checkpoint, so
# every accepted combination stops at a one-line error or at the end of empty input,
# without writing anything.
VALUES = {'-m': ['/nonexistent-opt-model'], '--model': ['/nonexistent-opt-model'], '-f': ['-'], '--file': ['-'],
          '-o': ['/nonexistent-opt-dir/out'], '--output': ['/nonexistent-opt-dir/out'], '--temperature': ['0.5'],
          '--top-p': ['0.5'], '--truncate': ['left'], '--shape': ['64x2x4x256'], '--format': ['bin'], '--dtype': ['f16'],
          '--prefix': ['decoder.'], '--device': ['cpu'], '--group-size': ['64'], '--percent': ['100', '0', '100', '0', '100', '0'],
          '--policy': ['auto'], '--hw': ['t4'], '--offload-dir': ['/tmp'], '--gpu-mem': ['1G'], '--cpu-mem': ['1G'],
          '--disk-mem': ['1G'], '--calib': ['/nonexistent-calib'], '--alpha': ['0.5'], '--calib-len': ['8']}
FLAGS = ('--ignore-eos', '--jsonl', '--ids', '--stream', '--no-bos', '--decode', '--json', '--tie', '--no-tie', '--outliers',
         '--compress-weight', '--compress-cache', '--cpu-attention', '--pin-weights', '--no-overlap', '--int4-weights', '--w8a8',
         '--w8a8-static')


def test_options():
    section('options: each command accepts what its --help lists and refuses the rest')
    helps = {}
    for cmd in COMMANDS:
        r = opt([cmd, '--help'])
        check(r.rc == 0 and r.out and not r.err, 'opt %s --help: exit 0, text on stdout only' % cmd, r.describe())
        # an option is a word starting with - or -- and a letter, not inside another word
        helps[cmd] = set(re.findall(r'(?<![\w.-])(--?[a-z][a-z0-9-]*)', r.text)) - {'-h', '--help', '--version'}
    for cmd in ('lp', 'plan', 'probe', 'generate'):
        a, b = opt(['help', cmd]), opt([cmd, '--help'])
        check(a.rc == 0 and b.rc == 0 and a.out == b.out and a.text.startswith('usage: opt %s' % cmd),
              'opt help %s is opt %s --help' % (cmd, cmd), a.describe() + '\n' + b.describe())
    every = sorted(set().union(*helps.values()))
    check(len(every) > 40, 'the help texts list %d options' % len(every))
    wrong = []
    for cmd in COMMANDS:
        for o in every:
            r = opt([cmd, o] + ([] if o in FLAGS else VALUES.get(o, ['1'])))
            text = r.errtext
            if o in helps[cmd]:
                if 'does not apply' in text or 'unknown option' in text or not isinstance(r.rc, int) or r.rc < 0:
                    wrong.append('%s %s: listed in its help, but %s' % (cmd, o, r.tail(1)))
            else:
                want = 'opt: %s does not apply to opt %s' % (o, cmd)
                lines = err_lines(r)
                if r.rc != 1 or r.out or len(lines) != 1 or not lines[0].startswith(want):
                    wrong.append('%s %s: not in its help, but not refused with "%s": %s' % (cmd, o, want, r.tail(2)))
    check(not wrong, 'all %d options x %d commands: accepted exactly where listed' % (len(every), len(COMMANDS)),
          '%d wrong:\n%s' % (len(wrong), '\n'.join(wrong)))

    section('options: the refusals one by one')
    for args, name in ((['score', '-n', '5'], '-n does not apply to opt score'),
                       (['tokenize', '--percent', '0', '100', '0', '100', '0', '100'], '--percent does not apply to opt tokenize'),
                       (['synth', '--temperature', '1'], '--temperature does not apply to opt synth'),
                       (['info', '-b', '4'], '-b does not apply to opt info'),
                       (['bench', '-f', 'x'], '-f does not apply to opt bench'),
                       (['generate', '-o', 'x'], '-o does not apply to opt generate'),
                       (['score', '--seed', '1'], '--seed does not apply to opt score'),
                       (['convert', '-m', MODEL, '-o', os.path.join(TMP, 'c.opt'), '--calib', 'F', '--int4-weights'],
                        '--calib applies only with --w8a8'),
                       (['generate', '--hw', 't4'], '--hw applies only with --policy auto'),
                       (['score', '--group-size', '32'], '--group-size applies only with'),
                       (['generate', '--stream', '--jsonl'], '--stream and --jsonl'),
                       (['generate', '--stream', '--ids'], '--stream and --ids'),
                       (['tokenize', '--no-bos', '--decode'], '--no-bos and --decode'),
                       (['generate', '--device', 'tpu'], "--device: expected cpu|gpu|auto, got 'tpu'"),
                       (['score', '--truncate', 'right'], "--truncate: expected error|left, got 'right'"),
                       (['version', '-m', 'x'], '-m does not apply to opt version'),
                       (['--version', '-t', '2'], '-t does not apply to opt version')):
        refused('opt %s' % ' '.join(args), opt(args, 'hi\n'), name)
    r = opt(['bogus', '-m', 'x'])
    check(r.rc == 2 and not r.out and err_lines(r) == ["opt: unknown command 'bogus' (see opt --help)"],
          'an unknown command: exit 2, one line naming it', r.describe())
    r = opt(['score', '-m', MODEL, '--stream'], 'hi\n')
    refused('score --stream says streaming is for generate', r, '--stream does not apply to opt score', 'generate')

    section('options: --top-k and --top-p sample at temperature 1 unless --temperature 0 says greedy')
    prompts = ['Hello', 'The sky', 'One two', 'A']
    base = ['generate', '-m', MODEL, '-n', '8', '--ignore-eos', '--seed', '5']
    greedy = opt(base, prompts)
    for flag, val in (('--top-k', '20'), ('--top-p', '0.9')):
        r = opt(base + [flag, val], prompts)
        t1 = opt(base + [flag, val, '--temperature', '1'], prompts)
        if ran('generate %s %s runs' % (flag, val), r) and ran('generate %s %s --temperature 1 runs' % (flag, val), t1):
            check(r.out == t1.out, '%s without --temperature gives what --temperature 1 gives' % flag,
                  'got %r\nexpected %r' % (r.out[:200], t1.out[:200]))
            check(r.out != greedy.out, '%s without --temperature is not greedy' % flag, r.out[:200])
        refused('%s with --temperature 0 is refused' % flag, opt(base + [flag, val, '--temperature', '0'], prompts),
                flag, '--temperature 0')
    r = opt(base + ['--top-k', '0', '--top-p', '1', '--temperature', '0'], prompts)
    check(r.rc == 0 and r.out == greedy.out, '--top-k 0 --top-p 1 (both off) with --temperature 0 is plain greedy', r.describe())


def test_version():
    section('version')
    r = opt(['--version'])
    pat = r'opt \d+\.\d+\.\d+\S* \((with|without) CUDA, SIMD (scalar|avx2|avx512) of (scalar|avx2|avx512)\)\n'
    check(r.rc == 0 and re.fullmatch(pat, r.text) and not r.err, 'opt --version: one line, version and build',
          r.describe() + '\nstdout: %r' % r.out)
    r2 = opt(['version'])
    check(r2.rc == 0 and r2.out == r.out, 'opt version prints the same line', r2.describe())
    r3 = harness.run([OPT, '--version'], env={'OPT_SIMD': 'scalar'})
    check(r3.rc == 0 and ' SIMD scalar of ' in r3.text, 'the SIMD level shown is the one in use (OPT_SIMD=scalar)', r3.text)


def test_input():
    section('input: -f -, tokenize -m, BOM, CRLF, empty and blank lines')
    text = 'Hello world\nsecond line, caf\u00e9\n\nlast\n'
    clean = write('clean.txt', text)
    r_in = opt(['tokenize'], text)
    r_dash = opt(['tokenize', '-f', '-'], text)
    check(r_in.rc == 0 and r_dash.rc == 0 and r_dash.out == r_in.out and len(r_in.lines) == 4,
          'tokenize -f - reads stdin, as no -f does', r_dash.describe())
    s_in = opt(['score', '-m', MODEL], text)
    s_dash = opt(['score', '-m', MODEL, '-f', '-'], text)
    check(s_in.rc == 0 and s_dash.out == s_in.out, 'score -f - reads stdin', s_dash.describe())

    missing = os.path.join(TMP, 'no-such-dir')
    refused('tokenize -m a missing directory is refused', opt(['tokenize', '-m', missing], 'hi\n'), missing)
    # a native packed file (what convert writes) carries no tokenizer: the built-in one, as generate does
    r = opt(['tokenize', '-m', clean], text)
    check(r.rc == 0 and r.out == r_in.out, 'tokenize -m FILE uses the built-in tokenizer', r.describe())
    refused('tokenize -m /dev/null (not a file or directory) is refused', opt(['tokenize', '-m', '/dev/null'], 'hi\n'),
            '/dev/null', 'not a checkpoint')
    empty_dir = os.path.join(TMP, 'no-tokenizer')
    os.makedirs(empty_dir, exist_ok=True)
    r = opt(['tokenize', '-m', empty_dir], text)
    check(r.rc == 0 and r.out == r_in.out, 'tokenize -m a directory without vocab.json/merges.txt: the built-in tokenizer',
          r.describe())
    r = opt(['tokenize', '-m', MODEL], text)
    check(r.rc == 0 and r.out == r_in.out, "tokenize -m a checkpoint: its tokenizer (the same ids)", r.describe())

    # the same text as a Windows editor saves it: a byte order mark, CRLF line ends
    dirty = write('dirty.txt', b'\xef\xbb\xbf' + text.replace('\n', '\r\n').encode())
    r = opt(['tokenize', '-f', dirty])
    check(r.rc == 0 and r.out == r_in.out, 'tokenize: BOM + CRLF file gives the clean file\'s ids',
          'got %r\nexpected %r' % (r.out, r_in.out))
    r = opt(['tokenize', '--decode'], r_in.text.replace('\n', '\r\n'))
    back = opt(['tokenize', '--decode'], r_in.text)
    check(r.rc == 0 and r.out == back.out, 'tokenize --decode: CRLF id lines decode as LF ones', r.describe())
    ids_clean = write('ids.txt', r_in.out)
    ids_dirty = write('ids-crlf.txt', b'\xef\xbb\xbf' + r_in.out.replace(b'\n', b'\r\n'))
    for binary in [OPT] + ([ASAN] if ASAN else []):
        tag = ' (%s)' % os.path.basename(binary)
        s_text = opt(['score', '-m', MODEL, '-f', clean], binary=binary)
        s_dirty = opt(['score', '-m', MODEL, '-f', dirty], binary=binary)
        s_ids = opt(['score', '--ids', '-m', MODEL, '-f', ids_clean], binary=binary)
        s_ids_dirty = opt(['score', '--ids', '-m', MODEL, '-f', ids_dirty], binary=binary)
        if ran('score of the text, the BOM + CRLF text and their ids runs' + tag, s_text) and \
                ran('score of BOM + CRLF text runs' + tag, s_dirty) and ran('score --ids runs' + tag, s_ids) and \
                ran('score --ids of BOM + CRLF ids runs' + tag, s_ids_dirty):
            check(s_dirty.out == s_text.out, 'score: BOM + CRLF text scores as the clean text' + tag, s_dirty.text[:300])
            check(s_ids.out == s_text.out and s_ids_dirty.out == s_text.out,
                  'score --ids of tokenize\'s ids (clean and CRLF) scores as the text' + tag, s_ids.text[:300])
            check(len(s_text.lines) == 4 and s_text.lines[2] == '',
                  'an empty line is a prompt: BOS alone, an empty line of scores' + tag, s_text.text[:300])
        g = opt(['generate', '-m', MODEL, '-n', '3', '--ignore-eos'], '\nHi\n', binary=binary)
        check(g.rc == 0 and len(g.lines) == 2 and 'runtime error' not in g.errtext,
              'generate: an empty line is a prompt too' + tag, g.describe())
        j_clean = opt(['score', '--jsonl', '-m', MODEL], '{"prompt": "a b"}\n{"prompt": "c"}\n', binary=binary)
        j_blank = opt(['score', '--jsonl', '-m', MODEL], '\ufeff\n{"prompt": "a b"}\r\n \t\r\n\n{"prompt": "c"}\n\n',
                      binary=binary)
        check(j_clean.rc == 0 and j_blank.rc == 0 and j_blank.out == j_clean.out and
              [l.split(',')[0] for l in j_blank.lines] == ['{"index": 0', '{"index": 1'],
              '--jsonl: BOM, CRLF and blank lines skipped; "index" counts prompts' + tag, j_blank.describe())
    g = opt(['generate', '--jsonl', '-m', MODEL, '-n', '2'], '\n{"prompt": "a"}\n\n{"prompt": "b"}\n')
    check(g.rc == 0 and [l.split(',')[0] for l in g.lines] == ['{"index": 0', '{"index": 1'],
          'generate --jsonl: blank lines skipped, "index" counts prompts', g.describe())


def test_truncate():
    section('truncate: too-long prompts')
    limit = 2048  # opt synth's max_position_embeddings
    body = [4 + (i * 7919) % 5000 for i in range(limit + 60)]
    ok_line = '2 10 11 12'
    long_line = ' '.join(map(str, [2] + body))
    lines = ok_line + '\n' + long_line + '\n'
    n_long = len(body) + 1
    r = opt(['score', '--ids', '-m', MODEL], lines)
    refused('score: a too-long line is an error before any output', r, '<stdin>:2', '%d prompt tokens' % n_long,
            'the %d that fit' % limit)
    r = opt(['score', '--ids', '-m', MODEL, '--truncate', 'error'], lines)
    refused('score --truncate error: the same', r, '<stdin>:2')
    f = write('long.txt', lines)
    r = opt(['generate', '--ids', '-m', MODEL, '-n', '10', '-f', f], lines)
    refused('generate: the limit is the positions less -n', r, f + ':2', '%d prompt tokens' % n_long,
            'the %d that fit' % (limit - 10), '-n 10')
    r = opt(['generate', '--ids', '-m', MODEL, '-n', '2100', '--truncate', 'left'], ok_line + '\n')
    refused('generate --truncate left: -n leaving no room is an error', r, '<stdin>:1', '-n 2100')

    kept = ' '.join(map(str, [2] + body[-(limit - 1):]))
    want = opt(['score', '--ids', '-m', MODEL], ok_line + '\n' + kept + '\n')
    got = opt(['score', '--ids', '-m', MODEL, '--truncate', 'left'], lines)
    if ran('score --ids of BOS + the last %d ids runs' % (limit - 1), want) and ran('score --truncate left runs', got):
        check(got.out == want.out, 'score --truncate left scores as BOS + the last ids given directly',
              'lines %d vs %d' % (len(got.lines), len(want.lines)))
        el = err_lines(got)
        check(len(el) == 1 and '1 of 2 prompts' in el[0], 'score --truncate left says once how many were cut', got.errtext)
    kept = ' '.join(map(str, [2] + body[-(limit - 8 - 1):]))
    want = opt(['generate', '--ids', '-m', MODEL, '-n', '8', '--ignore-eos'], ok_line + '\n' + kept + '\n')
    got = opt(['generate', '--ids', '-m', MODEL, '-n', '8', '--ignore-eos', '--truncate', 'left'], lines)
    if ran('generate of the kept ids runs', want) and ran('generate --truncate left runs', got):
        check(got.out == want.out, 'generate --truncate left generates as BOS + the last ids given directly',
              'got %r\nexpected %r' % (got.out, want.out))
    # text: BOS stays first, the end of the text is kept
    words = 'word ' * 3000
    r = opt(['score', '--jsonl', '-m', MODEL, '--truncate', 'left'], '{"prompt": "%s end"}\n' % words)
    check(r.rc == 0 and r.text.count(', ') > 0 and '"ids": [2, ' in r.text and r.text.count('"tokens"') == 1,
          'score --jsonl --truncate left of text: BOS first', r.describe())


def test_stdout():
    section('stdout: write failures')
    if not os.path.exists('/dev/full'):
        skip('stdout is /dev/full', 'no /dev/full')
        return
    mps = write('t.mps', 'NAME t\nROWS\n N obj\n L c1\nCOLUMNS\n x obj -1 c1 1\nRHS\n rhs c1 4\nENDATA\n')
    cases = ((['info', '-m', MODEL], ''), (['plan', '-m', 'opt-30b', '--hw', 't4'], ''), (['lp', mps], ''),
             (['bench', '-m', 'dummy:64x2x4x256', '--json', '--prompt-len', '8', '--gen-len', '2', '-b', '1'], ''),
             (['tokenize'], 'hello\n'), (['tokenize', '-f', '-'], 'hello\n'), (['--version'], ''), (['version'], ''),
             (['--help'], ''), (['score', '--help'], ''), (['help', 'plan'], ''), (['lp', '--help'], ''),
             (['probe', '--quick', '--disk-bytes', '4M', '--offload-dir', TMP], ''))
    with open('/dev/full', 'wb') as full:
        for args, stdin in cases:
            r = opt(args, stdin, stdout=full)
            lines = err_lines(r)
            # probe reports its measurements on stderr as it goes; the failure is its last line
            one = args[0] == 'probe' or len(lines) == 1
            check(r.rc == 1 and one and lines and lines[-1] == FULL, 'opt %s > /dev/full: exit 1, "%s"' % (' '.join(args), FULL),
                  r.describe())


def main():
    global OPT, ASAN, TMP, MODEL
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--opt', default='./opt')
    ap.add_argument('--asan', help='the sanitizer build, for the input checks (skipped without it)')
    ap.add_argument('--tmp')
    a = ap.parse_args()
    OPT = os.path.abspath(a.opt)
    ASAN = os.path.abspath(a.asan) if a.asan and os.access(a.asan, os.X_OK) else None
    if not os.access(OPT, os.X_OK):
        sys.exit('test_cli: %s is not an executable' % OPT)
    TMP = a.tmp or tempfile.mkdtemp(prefix='opt-test-cli-')
    os.makedirs(TMP, exist_ok=True)
    t0 = time.time()
    try:
        MODEL = os.path.join(TMP, 'model')
        r = harness.run([OPT, 'synth', '--shape', '64x2x4x256', '-o', MODEL])
        if not check(r.rc == 0, 'opt synth --shape 64x2x4x256', r.describe()):
            return harness.summary('test_cli', t0)
        if not ASAN:
            skip('the input checks under the sanitizers', 'no --asan binary')
        harness.run_sections([('options', test_options), ('version', test_version), ('input', test_input),
                              ('truncate', test_truncate), ('stdout', test_stdout)], None)
    finally:
        if not a.tmp:
            shutil.rmtree(TMP, ignore_errors=True)
    return harness.summary('test_cli', t0)


if __name__ == '__main__':
    sys.exit(main())
