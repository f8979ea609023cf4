#!/usr/bin/python3
"""Bad input must give a clean error, never a crash: run under the sanitizer build.

    tests/test_bad_input.py [--opt ./opt-asan] [--tmp DIR]

Every case runs `opt-asan` (AddressSanitizer + UndefinedBehaviorSanitizer; leak
checking off, since opt exits through die() without freeing) and requires:
  * exit status 1 (not a signal, not a sanitizer abort);
  * nothing on stdout;
  * exactly one line on stderr, starting with "opt: ", that names what is wrong
    (the file or directory, the input line "<stdin>:N" / "FILE:N", the option).
Cases:
  control      valid checkpoints (safetensors, .bin, sharded .bin) and valid input
               (score, generate, sampling, --jsonl, --stream) must run clean: exit 0
               and no sanitizer report, so the cases below fail for the right reason
  checkpoints  every directory tests/bad_ckpt.py writes (each names the offending
               file or directory), a missing -m directory, -m naming a file, a model
               whose vocab_size is smaller than the token ids its tokenizer makes
  input lines  (generate and score read and check all input before printing anything;
               tokenize, a line filter, may print the lines before a bad one)
               invalid UTF-8 (the line number is named), ids that are not integers
               or out of range, an empty --ids line, broken and hostile JSON in
               --jsonl mode, an over-long prompt, a missing -f file
  options      unknown option, missing value, bad numbers (-n -1, --top-p 2, ...),
               --stream with two prompts; an unknown command (exit 2 with usage is
               fine there: only "not a crash, starts with opt:, names it" is required)
  synth        bad --shape, --dtype, --format, --prefix; a full disk (a 2 MiB tmpfs,
               mounted when we may; skipped with a message otherwise)
  stdout       write errors (stdout is /dev/full) for tokenize, score and generate
Exit status 0 only when every case passed.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable or '/usr/bin/python3'
TIMEOUT = 60

sys.path.insert(0, HERE)
import harness  # noqa: E402
from harness import check as report, skip  # noqa: E402


def run(args, stdin=b'', stdout=subprocess.PIPE, env=None):
    e = {'ASAN_OPTIONS': 'detect_leaks=0:abort_on_error=0', 'UBSAN_OPTIONS': 'print_stacktrace=1'}
    e.update(env or {})
    r = harness.run([OPT] + args, stdin=stdin, env=e, timeout=TIMEOUT, stdout=stdout)
    return r.rc, r.out, r.err


def expect_error(what, args, stdin=b'', names=(), status=1, one_line=True, stdout=subprocess.PIPE, streams=False):
    """The case must fail cleanly: see the module docstring. `names`: strings the
    error line must contain. `streams`: the command is a line filter (tokenize) that
    may have printed the lines before the bad one."""
    rc, out, err = run(args, stdin, stdout)
    text = err.decode('utf-8', 'replace')
    # a CUDA build on a machine without a GPU says so first: that note is not the error
    lines = [l for l in text.split('\n') if not l.startswith('opt: no usable GPU')]
    if lines and lines[-1] == '':
        lines.pop()
    problems = []
    if 'Sanitizer' in text or 'runtime error:' in text:
        problems.append('sanitizer report')
    if not isinstance(rc, int) or rc < 0:
        problems.append('killed by %s' % (rc if not isinstance(rc, int) else 'signal %d' % -rc))
    elif rc != status:
        problems.append('exit status %d, expected %d' % (rc, status))
    if out and not streams:
        problems.append('stdout not empty: %r' % out[:100])
    if not lines or not lines[0].startswith('opt: '):
        problems.append('stderr does not start with "opt: "')
    elif one_line and len(lines) != 1:
        problems.append('%d stderr lines, expected 1' % len(lines))
    for s in names:
        if not lines or s not in lines[0]:
            problems.append('the error does not name %r' % s)
    report(not problems, what, '; '.join(problems) + '\n$ opt %s\n%s' % (' '.join(args), text[:1500]))


def clean_run_problem(args, stdin, n_lines):
    """A valid run must exit 0 with n_lines lines on stdout and no sanitizer report;
    returns what went wrong, or None."""
    rc, out, err = run(args, stdin)
    text = err.decode('utf-8', 'replace')
    problems = []
    if 'Sanitizer' in text or 'runtime error:' in text:
        problems.append('sanitizer report')
    if rc != 0:
        problems.append('exit status %s' % rc)
    if out.count(b'\n') != n_lines:
        problems.append('%d output lines, expected %d' % (out.count(b'\n'), n_lines))
    if not problems:
        return None
    report_lines = [l for l in text.split('\n') if 'ERROR' in l or l.strip().startswith(('#1 ', '#2 ', '#3 ')) or
                    l.startswith('opt: ')]
    return '; '.join(problems) + '\n$ opt %s\n%s' % (' '.join(args), '\n'.join(report_lines[:5]))


def mk(tmp, name, *args):
    d = os.path.join(tmp, name)
    subprocess.run([PY, os.path.join(HERE, 'mkckpt.py'), '-o', d] + list(args), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return d


def main():
    global OPT
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--opt', default=os.path.join(ROOT, 'opt-asan'))
    ap.add_argument('--tmp')
    a = ap.parse_args()
    OPT = os.path.abspath(a.opt)
    if not os.access(OPT, os.X_OK):
        sys.exit('test_bad_input: %s is not an executable' % OPT)
    tmp = a.tmp or tempfile.mkdtemp(prefix='opt-test-bad-')
    os.makedirs(tmp, exist_ok=True)
    try:
        cases(tmp)
    finally:
        if not a.tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return harness.summary('test_bad_input')


def cases(tmp):
    print('[control: valid checkpoints and inputs run clean under the sanitizers]')
    controls = [mk(tmp, 'ctl-st', '--hidden', '16', '--heads', '4', '--ffn', '32', '--max-pos', '32', '--dtype', 'f16'),
                mk(tmp, 'ctl-bin', '--hidden', '16', '--heads', '2', '--ffn', '24', '--max-pos', '32', '--format', 'bin',
                   '--post-ln', '--embed-dim', '8', '--no-tie'),
                mk(tmp, 'ctl-bin2', '--hidden', '16', '--heads', '4', '--ffn', '32', '--max-pos', '32', '--format', 'bin',
                   '--shards', '2', '--dtype', 'bf16', '--prefix', 'decoder.')]
    for d in controls:
        problems, labels = [], []
        for args, stdin, n_out in ((['score', '--ids', '-b', '2'], '2 5 6 7\n2\n2 9 10 11 12 13 14\n', 3),
                                   (['generate', '--ids', '-n', '4', '-b', '2', '--ignore-eos'], '2 5 6\n2 7\n2 8 9 10\n', 3),
                                   (['generate', '--jsonl', '-n', '3', '--temperature', '0.8', '--top-k', '5', '--top-p', '0.9'],
                                    '{"prompt": "Hello"}\n{"ids": [2, 5]}\n', 2),
                                   (['score', '--jsonl'], '{"prompt": "Hello world"}\n', 1),
                                   (['generate', '--stream', '-n', '3'], 'Hi\n', 1)):
            labels.append(' '.join(args[:2]))
            p = clean_run_problem(args + ['-m', d], stdin, n_out)
            if p:
                problems.append(p)
        report(not problems, '%s: %s run clean' % (os.path.basename(d), ', '.join(labels)),
               '%d of %d runs failed; the first:\n%s' % (len(problems), len(labels), problems[0]) if problems else '')

    print('[broken checkpoints: tests/bad_ckpt.py]')
    bad = os.path.join(tmp, 'bad')
    p = subprocess.run([PY, os.path.join(HERE, 'bad_ckpt.py'), bad], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 0:
        report(False, 'bad_ckpt.py ran', p.stderr.decode())
    for line in p.stdout.decode().splitlines():
        d, desc = line.split('\t', 1)
        expect_error('%s: %s' % (os.path.basename(d), desc), ['score', '--ids', '-m', d], '2 5 6\n', names=[d])

    print('[other checkpoint problems]')
    good = mk(tmp, 'good', '--hidden', '16', '--heads', '4', '--ffn', '32', '--max-pos', '32', '--dtype', 'f16')
    missing = os.path.join(tmp, 'no-such-dir')
    expect_error('-m names a missing directory', ['score', '--ids', '-m', missing], '2 5\n', names=[missing])
    expect_error('-m names a file', ['score', '--ids', '-m', os.path.join(good, 'config.json')], '2 5\n',
                 names=[os.path.join(good, 'config.json')])
    small = mk(tmp, 'vocab64', '--vocab', '64', '--hidden', '16', '--heads', '4', '--ffn', '32', '--max-pos', '32')
    expect_error('text prompt whose tokens exceed vocab_size 64 (generate)', ['generate', '-m', small, '-n', '2'],
                 'hello world\n', names=['<stdin>:1'])
    expect_error('text prompt whose tokens exceed vocab_size 64 (score --jsonl)', ['score', '--jsonl', '-m', small],
                 '{"prompt": "hello world"}\n', names=['<stdin>:1'])

    print('[input lines]')
    expect_error('invalid UTF-8 on line 3', ['score', '-m', good], b'ok\nfine\nbad \xff byte\n', names=['<stdin>:3'])
    expect_error('invalid UTF-8 (a surrogate) on line 2 of -f FILE',
                 ['generate', '-m', good, '-n', '1', '-f', write(tmp, 'u.txt', b'ok\n\xed\xa0\x80\n')],
                 names=[os.path.join(tmp, 'u.txt') + ':2'])
    expect_error('invalid UTF-8 to tokenize', ['tokenize'], b'a\nb\xc3\n', names=['<stdin>:2'], streams=True)
    for ids, why in (('2 x 5', 'not an integer'), ('2 50272', 'id == vocab_size'), ('2 -1', 'negative id'),
                     ('2 99999999999999999999', 'overflowing id'), ('2 5.0', 'a decimal'), ('2 5abc', 'trailing letters')):
        expect_error('--ids line 2: %s (%r)' % (why, ids), ['score', '--ids', '-m', good], '2 5\n%s\n' % ids,
                     names=['<stdin>:2'])
    expect_error('--ids: an empty line', ['score', '--ids', '-m', good], '2 5\n\n', names=['<stdin>:2'])
    expect_error('tokenize --decode: a bad id', ['tokenize', '--decode'], '5 6\n5 x\n', names=['<stdin>:2'], streams=True)
    for js, why in (('{"prompt": "a"', 'unterminated object'), ('[1, 2]', 'an array'), ('{"prompt": 5}', 'a number prompt'),
                    ('{"ids": [2, 1.5]}', 'a fractional id'), ('{"ids": [2, -1]}', 'a negative id'),
                    ('{"ids": [2, 1e10]}', 'a huge id'), ('{"prompt": "\\ud800"}', 'a lone surrogate escape'),
                    ('{"prompt": "a"} x', 'trailing text'), ('[' * 100000, 'nesting 100000 deep'),
                    ('{"prompt": "a\x01"}', 'a raw control character')):
        expect_error('--jsonl line 2: %s' % why, ['score', '--jsonl', '-m', good], '{"prompt": "ok"}\n%s\n' % js,
                     names=['<stdin>:2'])
    expect_error('an over-long prompt (33 ids on a 32-position model)', ['score', '--ids', '-m', good],
                 '2 5\n' + ' '.join(['5'] * 33) + '\n', names=['<stdin>:2'])
    expect_error('prompt + -n beyond the positions', ['generate', '--ids', '-m', good, '-n', '30'], '2 5 6\n',
                 names=['<stdin>:1'])
    nofile = os.path.join(tmp, 'no-such-file.txt')
    expect_error('-f names a missing file', ['score', '-m', good, '-f', nofile], names=[nofile])

    print('[options]')
    expect_error('unknown option', ['score', '-m', good, '--bogus'], names=['--bogus'])
    expect_error('option without its value', ['score', '-m'], names=['-m'])
    expect_error('unknown command (usage may follow)', ['bogus'], names=['bogus'], status=2, one_line=False)
    for args, flag in ((['-n', '-1'], '-n'), (['--top-p', '2'], '--top-p'), (['--top-p', '0'], '--top-p'),
                       (['-b', '0'], '-b'), (['-t', '0'], '-t'), (['--temperature', '-1'], '--temperature'),
                       (['--temperature', 'nan'], '--temperature'), (['-n', 'abc'], '-n'), (['-n', '1e3'], '-n'),
                       (['--top-k', '-1'], '--top-k'), (['--seed', '-5'], '--seed'), (['-n', ''], '-n'),
                       (['--step-rows', '0'], '--step-rows')):
        expect_error('bad number: %s' % ' '.join(args), ['generate', '-m', good] + args, 'hi\n', names=[flag])
    expect_error('--stream with two prompts', ['generate', '-m', good, '-n', '1', '--stream'], 'a\nb\n',
                 names=['--stream'])

    print('[synth]')
    out = os.path.join(tmp, 'synth-out')
    for shape in ('64x2x3x256', 'abc', '0x1x1x1', '64x2x4', '64x2x4x256x9', '-64x2x4x256', '99999999999x1x1x1'):
        expect_error('synth --shape %s' % shape, ['synth', '--shape', shape, '-o', out], names=[shape])
    for args, flag in ((['--dtype', 'f8'], '--dtype'), (['--format', 'gguf'], '--format'),
                       (['--prefix', 'foo.'], '--prefix'), (['--shards', '0'], '--shards')):
        expect_error('synth %s' % ' '.join(args), ['synth', '--shape', '64x2x4x256', '-o', out] + args, names=[flag])
    full = os.path.join(tmp, 'full')
    os.makedirs(full, exist_ok=True)
    m = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', full], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    if m.returncode != 0:
        skip('synth onto a full disk', 'cannot mount a tmpfs here (%s)' % m.stderr.decode().strip())
    else:
        try:
            for fmt in ('safetensors', 'bin'):
                d = os.path.join(full, fmt)
                expect_error('synth --format %s onto a full 2 MiB disk' % fmt,
                             ['synth', '--shape', '64x2x4x256', '--format', fmt, '-o', d], names=[d])
                shutil.rmtree(d, ignore_errors=True)
        finally:
            subprocess.run(['umount', full])

    print('[write errors on stdout]')
    if not os.path.exists('/dev/full'):
        skip('stdout is /dev/full', 'no /dev/full')
        return
    with open('/dev/full', 'wb') as devfull:
        expect_error('tokenize > /dev/full', ['tokenize'], 'hello\n' * 3, stdout=devfull, names=['stdout'])
        expect_error('tokenize --decode > /dev/full', ['tokenize', '--decode'], '5 6\n', stdout=devfull,
                     names=['stdout'])
        expect_error('score > /dev/full', ['score', '--ids', '-m', good], '2 5 6\n', stdout=devfull, names=['stdout'])
        expect_error('generate > /dev/full', ['generate', '-m', good, '-n', '2'], 'hi\n', stdout=devfull,
                     names=['stdout'])


def write(tmp, name, data):
    p = os.path.join(tmp, name)
    with open(p, 'wb') as f:
        f.write(data)
    return p


OPT = None
if __name__ == '__main__':
    sys.exit(main())
