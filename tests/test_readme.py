#!/usr/bin/python3
"""Runs every command of the README's ```sh blocks, as written, and checks each exits 0.

    tests/test_readme.py [--opt ./opt] [--readme README.md] [--tmp DIR]

The commands run with sh in a scratch directory holding what the README assumes a user has:
./opt (the binary under test), opt-1.3b (a checkpoint directory: here a tiny synthetic model,
so that the test takes seconds), prompts.txt and docs.jsonl. Commands that start with mpirun
run where ./opt is the pipeline build (--mpi, ./opt-mpi; skipped without it or mpirun). Lines continued with a backslash
are joined; each command gets its own time limit. Blocks that need the network or are the
set-up commands themselves (indented blocks) are not run: CI runs `make test` and `make run`."""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT = 300


def readme_commands(path):
    """(line number, command) for every command of every ```sh block."""
    cmds, block, start = [], None, 0
    with open(path, encoding='utf-8') as f:
        lines = f.read().split('\n')
    i = 0
    while i < len(lines):
        line = lines[i]
        if block is None:
            if line.strip() == '```sh':
                block = []
        elif line.strip() == '```':
            cmds += block
            block = None
        elif line.strip() and not line.lstrip().startswith('#'):
            start, cmd = i + 1, line
            while cmd.endswith('\\') and i + 1 < len(lines):
                i += 1
                cmd = cmd[:-1] + ' ' + lines[i].strip()
            block.append((start, cmd))
        i += 1
    if block is not None:
        sys.exit('test_readme: %s: a ```sh block is not closed' % path)
    return cmds


def setup(tmp, opt):
    os.symlink(opt, os.path.join(tmp, 'opt'))
    r = subprocess.run([opt, 'synth', '--shape', '64x2x4x256', '--seed', '3', '-o', os.path.join(tmp, 'opt-1.3b')],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit('test_readme: opt synth failed: %s' % r.stderr.strip())
    shutil.copy(os.path.join(HERE, 'prompts.txt'), os.path.join(tmp, 'prompts.txt'))
    with open(os.path.join(tmp, 'docs.jsonl'), 'w', encoding='utf-8') as f:
        f.write('{"prompt": "The quick brown fox jumps over the lazy dog."}\n{"prompt": "Paris is the capital of France."}\n')


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--opt', default=os.path.join(ROOT, 'opt'))
    ap.add_argument('--mpi', default=os.path.join(ROOT, 'opt-mpi'))
    ap.add_argument('--readme', default=os.path.join(ROOT, 'README.md'))
    ap.add_argument('--tmp', help='scratch directory (default: a new one, removed at the end)')
    a = ap.parse_args()
    opt = os.path.abspath(a.opt)
    cmds = readme_commands(a.readme)
    tmp = a.tmp or tempfile.mkdtemp(prefix='opt-test-readme-')
    os.makedirs(tmp, exist_ok=True)
    passed = failed = skipped = 0
    try:
        setup(tmp, opt)
        mpi = os.path.join(tmp, 'mpi')  # the same files, ./opt the pipeline build
        have_mpi = os.path.exists(a.mpi) and shutil.which('mpirun')
        if have_mpi:
            os.makedirs(mpi)
            for f in os.listdir(tmp):
                if f != 'mpi':
                    os.symlink(os.path.abspath(a.mpi) if f == 'opt' else os.path.join(tmp, f), os.path.join(mpi, f))
        env = dict(os.environ, TMPDIR=tmp, OMPI_ALLOW_RUN_AS_ROOT='1', OMPI_ALLOW_RUN_AS_ROOT_CONFIRM='1')
        for line, cmd in cmds:
            pipe = cmd.startswith('mpirun')
            if pipe and not have_mpi:
                skipped += 1
                print('  skip README.md:%d: %s (no ./opt-mpi or mpirun)' % (line, cmd))
                continue
            try:
                r = subprocess.run(['sh', '-c', cmd], cwd=mpi if pipe else tmp, env=env, stdin=subprocess.DEVNULL,
                                   capture_output=True, text=True, errors='replace', timeout=TIMEOUT)
                rc, err = r.returncode, r.stderr
            except subprocess.TimeoutExpired:
                rc, err = 'timeout', 'no exit within %d s' % TIMEOUT
            if rc == 0:
                passed += 1
                print('  ok   README.md:%d: %s' % (line, cmd))
            else:
                failed += 1
                tail = '\n'.join(err.strip().split('\n')[-3:])
                print('FAIL README.md:%d: %s\n     exit %s: %s' % (line, cmd, rc, re.sub('\n', '\n     ', tail)))
    finally:
        if not a.tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if not cmds:
        failed += 1
        print('FAIL no ```sh commands found in %s' % a.readme)
    print('test_readme: %d passed, %d failed, %d skipped' % (passed, failed, skipped))
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
