"""tests/test_mpi.py: pipeline stages over MPI (./opt-mpi under mpirun) against the single
process (./opt). Rows never see each other and every kernel has one reduction order, so N
stages must print exactly the bytes one process prints: for N = 2, 3 and 4 stages, uneven
layer counts, greedy and seeded sampling, score, continuous batching with more prompts than
slots, offloading policies with disk shares (the CPU computing, and the host standing in for
a GPU), 4-bit weights and cache, W8A8. Then the start-up checks and the failures: a rank with
an unreadable model, a rank SIGKILLed mid-run, a rank over its memory budget (beside the other
rank, and alone in its own offload dir as on its own host): each ends the whole job within a
time limit, with one line naming the rank and host, and no files or opt-pipe-* directory left.

usage: test_mpi.py --opt ./opt --mpi ./opt-mpi --tmp DIR"""
import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import check, skip  # noqa: E402

OPT = MPI = TMP = None
ENV = {'OMPI_ALLOW_RUN_AS_ROOT': '1', 'OMPI_ALLOW_RUN_AS_ROOT_CONFIRM': '1', 'OMP_NUM_THREADS': '1'}
LIMIT = 120  # seconds any one run may take on this 2-core machine with 4 ranks


def mpirun(*apps, timeout=LIMIT, stdin=b'', env=None):
    """mpirun over one app (a list of opt arguments, run as np ranks) or several (MPMD, each
    (np, args)): -q, so that a failure is opt's one line and not the launcher's banner."""
    if apps and isinstance(apps[0], int):
        apps = [apps]
    argv = ['mpirun', '-q', '--oversubscribe', '--bind-to', 'none']
    for i, (np_, args) in enumerate(apps):
        argv += ([':'] if i else []) + ['-np', str(np_), MPI] + list(args)
    e = dict(ENV)
    e.update(env or {})
    return harness.run(argv, stdin=stdin, env=e, timeout=timeout)


def opt(args, env=None, **kw):
    e = dict(ENV)
    e.update(env or {})
    return harness.run([OPT] + list(args), env=e, **kw)


def synth(name, shape, *extra):
    return harness.fixture(os.path.join(TMP, name), opt, ['synth', '--shape', shape, '--seed', '3', '-o', os.path.join(TMP, name)] + list(extra))


def same(label, ref, got):
    """got (N stages) prints ref's bytes (one process), and both succeeded."""
    ok = ref.rc == 0 and got.rc == 0 and ref.out == got.out and len(ref.out) > 0
    why = ''
    if not ok:
        why = 'single: %s\npipeline: %s' % (ref.tail(3), got.tail(3))
        if ref.rc == 0 and got.rc == 0:
            a, b = ref.lines, got.lines
            d = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
            why = 'first difference at line %d of %d/%d:\n  single   %r\n  pipeline %r' % (
                d + 1, len(a), len(b), a[d][:120] if d < len(a) else None, b[d][:120] if d < len(b) else None)
    return check(ok, label, why)


PROMPTS = ['Hello, world', 'The quick brown fox jumps over the lazy dog', '', 'a',
           'Pipelines keep every stage busy while the hidden states move',
           'one two three four five six seven eight nine ten eleven twelve', 'x y z']


def test_equivalence():
    m5 = synth('m5', '64x5x4x256')      # 5 layers: no even split for 2, 3 or 4 stages
    m350 = synth('m350', '64x4x4x256')  # a second model, checked with the policies
    pf = os.path.join(TMP, 'prompts.txt')
    with open(pf, 'w') as f:
        f.write('\n'.join(PROMPTS) + '\n')
    cases = [
        ('generate greedy, -b 3 (7 prompts: continuous batching)', ['generate', '-m', m5, '-f', pf, '-n', '9', '-b', '3']),
        ('generate sampled (--temperature 0.9 --top-k 40 --top-p 0.9 --seed 7)',
         ['generate', '-m', m5, '-f', pf, '-n', '9', '-b', '4', '--temperature', '0.9', '--top-k', '40', '--top-p', '0.9', '--seed', '7']),
        ('score -b 2', ['score', '-m', m5, '-f', pf, '-b', '2']),
        ('generate -n 0 (prompts only)', ['generate', '-m', m5, '-f', pf, '-n', '0', '-b', '3']),
        ('generate --compress-weight --compress-cache', ['generate', '-m', m5, '-f', pf, '-n', '6', '-b', '5', '--compress-weight', '--compress-cache']),
    ]
    for n in (2, 3, 4):
        for label, args in cases:
            same('%d stages: %s' % (n, label), opt(args), mpirun(n, args))
    # offloading: each stage places its own layers; disk shares on every stage
    pols = [('--percent 0 50 0 50 0 50, 2 x 3 block', ['--percent', '0', '50', '0', '50', '0', '50', '--gpu-batch-size', '2', '--num-gpu-batches', '3']),
            ('all on disk, 1 x 4 block, --no-overlap', ['--percent', '0', '0', '0', '0', '0', '0', '--gpu-batch-size', '1', '--num-gpu-batches', '4', '--no-overlap']),
            ('--compress-cache --percent 0 30 0 60 0 0, 3 x 2', ['--compress-cache', '--percent', '0', '30', '0', '60', '0', '0', '--gpu-batch-size', '3', '--num-gpu-batches', '2'])]
    for n in (2, 3):
        for label, pol in pols:
            od = os.path.join(TMP, 'off-%d' % n)
            os.makedirs(od, exist_ok=True)
            args = ['generate', '-m', m350, '-f', pf, '-n', '7', '--offload-dir', od] + pol
            same('%d stages, offloading %s' % (n, label), opt(args), mpirun(n, args))
            check(os.listdir(od) == [], '%d stages, offloading %s: offload dir empty after' % (n, label), str(os.listdir(od)))
        args = ['score', '-m', m350, '-f', pf] + pols[0][1]
        same('%d stages, score with offloading' % n, opt(args), mpirun(n, args))
    # the GPU schedule, with the host standing in for the device
    args = ['generate', '-m', m350, '-f', pf, '-n', '5', '--percent', '50', '30', '40', '30', '50', '25', '--gpu-batch-size', '2', '--num-gpu-batches', '2']
    env = {'OPT_HOST_DEVICE': '1'}
    same('2 stages, device schedule (OPT_HOST_DEVICE=1) with GPU, CPU and disk shares', opt(args, env=env), mpirun(2, args, env=env))
    # more groups in flight than stages: --micro-batches
    args = ['generate', '-m', m5, '-f', pf, '-n', '7', '-b', '6', '--micro-batches', '3']
    same('2 stages, --micro-batches 3 of -b 6', opt(args), mpirun(2, args))
    args = ['generate', '-m', m350, '-f', pf, '-n', '5', '--gpu-batch-size', '1', '--num-gpu-batches', '5', '--micro-batches', '5'] + pols[0][1][:7]
    same('2 stages, a policy, --micro-batches 5 (every GPU batch a group)', opt(args), mpirun(2, args))
    # MPMD: each stage its own policy, one block shape
    a0 = ['generate', '-m', m350, '-f', pf, '-n', '6', '--gpu-batch-size', '2', '--num-gpu-batches', '2', '--percent', '0', '100', '0', '100', '0', '100']
    a1 = a0[:-7] + ['--percent', '0', '0', '0', '20', '0', '0']
    same('2 stages, each with its own policy (mpirun ... : ...)', opt(a0), mpirun((1, a0), (1, a1)))


def test_formats():
    src = synth('mo', '64x6x4x256', '--outliers')
    calib = os.path.join(TMP, 'calib.txt')
    with open(calib, 'w') as f:
        f.write('\n'.join(PROMPTS * 3) + '\n')
    w8 = os.path.join(TMP, 'w8a8.bin')
    q4 = os.path.join(TMP, 'q4.bin')
    r1 = opt(['convert', '-m', src, '-o', w8, '--w8a8', '--calib', calib, '--calib-samples', '8', '--calib-len', '16']) if not os.path.exists(w8) else None
    r2 = opt(['convert', '-m', src, '-o', q4, '--int4-weights', '--group-size', '32']) if not os.path.exists(q4) else None
    if (r1 and r1.rc) or (r2 and r2.rc):
        check(False, 'convert the W8A8 and 4-bit files', (r1 or r2).tail())
        return
    pf = os.path.join(TMP, 'prompts.txt')
    for name, path in (('W8A8', w8), ('4-bit native', q4)):
        for n in (2, 3):
            args = ['generate', '-m', path, '-f', pf, '-n', '8', '-b', '3']
            same('%d stages, %s file' % (n, name), opt(args), mpirun(n, args))
        args = ['score', '-m', path, '-f', pf]
        same('3 stages, score, %s file' % name, opt(args), mpirun(3, args))
    # --stages: the split given; the output does not depend on it
    args = ['generate', '-m', src, '-f', pf, '-n', '6', '-b', '2']
    ref = opt(args)
    for st in ('1,4,1', '3,2,1', '1,1,4'):
        same('3 stages --stages %s' % st, ref, mpirun(3, args + ['--stages', st]))
    same('--stages 6 in one process', ref, opt(args + ['--stages', '6']))
    # the MPI build without a launcher, and with one rank, is the plain binary
    same('./opt-mpi without mpirun', ref, harness.run([MPI] + args, env=ENV))
    same('mpirun -np 1 ./opt-mpi', ref, mpirun(1, args))
    # bench runs across stages and prints one report
    b = mpirun(2, ['bench', '-m', src, '--prompt-len', '16', '--gen-len', '4', '-b', '4', '--json'])
    check(b.rc == 0 and len(b.lines) == 1 and '"total_throughput"' in b.text and '"batch": 4' in b.text,
          '2 stages: bench prints one JSON report, rank 0\'s', b.describe() + '\n' + b.text[:300])
    b = mpirun(2, ['bench', '-m', src, '--prompt-len', '16', '--gen-len', '4', '--percent', '0', '50', '0', '50', '0', '50',
                   '--gpu-batch-size', '2', '--num-gpu-batches', '2', '--offload-dir', TMP])
    check(b.rc == 0 and b.text.count('total    throughput') == 1, '2 stages: bench with a policy', b.describe() + '\n' + b.text[:300])


def one_line(r, must, what, limit=30):
    """r failed in time with exactly one error line on stderr, containing each of must (rank 0's
    memory plan may come before it, as in one process)."""
    lines = [l for l in r.errtext.split('\n') if l.startswith('opt') and not l.startswith('opt: memory plan')]
    ok = isinstance(r.rc, int) and r.rc != 0 and r.dt < limit and len(lines) == 1 and all(m in lines[0] for m in must)
    return check(ok, what, '%s\n(%.1f s)' % (r.describe(), r.dt))


def test_refusals():
    m5 = os.path.join(TMP, 'm5')
    pf = os.path.join(TMP, 'prompts.txt')
    host = socket.gethostname()
    base = ['generate', '-m', m5, '-f', pf, '-n', '4']
    one_line(mpirun(3, base + ['--stages', '2,3']), ['rank 0 on', '--stages 2,3: 2 stages, but 3 ranks run'], '--stages with too few counts: one line, from rank 0')
    one_line(mpirun(2, base + ['--stages', '2,2']), ['--stages 2,2: 4 layers, but', 'has 5'], '--stages summing to the wrong count')
    one_line(opt(base + ['--stages', '2,3']), ['--stages 2,3: 2 stages, but 1 process runs'], '--stages 2,3 in one process')
    one_line(mpirun(6, base), ['6 pipeline stages for 5 layers'], 'more stages than layers')
    one_line(mpirun(2, base + ['-b', '3', '--micro-batches', '4']), ['--micro-batches 4: more groups than the block\'s 3 sequences (-b)'], '--micro-batches over the block')
    one_line(mpirun(2, base + ['--bogus']), ['rank 0 on', '--bogus'], 'a bad option: one line, from rank 0 only')
    one_line(mpirun(2, ['tokenize', '-f', pf]), ['opt tokenize runs in one process'], 'tokenize under mpirun')
    m4 = os.path.join(TMP, 'm350')
    one_line(mpirun((1, base), (1, ['generate', '-m', m4, '-f', pf, '-n', '4'])),
             ['rank 1 on %s loaded a different model than rank 0' % host], 'a rank with another model')
    pol = ['--percent', '0', '100', '0', '100', '0', '100', '--num-gpu-batches', '2']
    one_line(mpirun((1, base + pol + ['--gpu-batch-size', '2']), (1, base + pol + ['--gpu-batch-size', '3'])),
             ['rank 1 on', 'block of 3 x 2', 'one block shape'], 'ranks with different blocks')


def leftover_procs():
    r = subprocess.run(['pgrep', '-f', MPI], stdout=subprocess.PIPE)
    return r.stdout.decode().split()


def test_faults():
    m5 = os.path.join(TMP, 'm5')
    pf = os.path.join(TMP, 'prompts.txt')
    host = socket.gethostname()
    bad = os.path.join(TMP, 'm5-truncated')
    if not os.path.exists(bad):
        shutil.copytree(m5, bad)
        with open(os.path.join(bad, 'model.safetensors'), 'r+b') as f:
            f.truncate(1000)
    od = os.path.join(TMP, 'faults')
    os.makedirs(od, exist_ok=True)
    pol = ['--percent', '0', '50', '0', '50', '0', '50', '--gpu-batch-size', '2', '--num-gpu-batches', '2', '--offload-dir', od]
    g = ['generate', '-f', pf, '-n', '4'] + pol
    r = mpirun((1, g + ['-m', m5]), (1, g + ['-m', bad]), timeout=60)
    one_line(r, ['rank 1 on %s' % host, 'm5-truncated/model.safetensors', 'truncated'], 'rank 1 with a truncated model file: one line naming rank, host and file')
    check(os.listdir(od) == [] and not leftover_procs(), 'truncated model: no files, no processes left', '%s %s' % (os.listdir(od), leftover_procs()))
    # a rank over its budget: with its sibling on one host (one directory), and alone on its own
    # (each rank its own --offload-dir, as on two hosts): the rank that dies removes the job's
    # directory there, once its own files are gone
    r = mpirun((1, g + ['-m', m5]), (1, g + ['-m', m5, '--cpu-mem', '1M']), timeout=60)
    one_line(r, ['rank 1 on %s' % host, 'cpu'], 'rank 1 over its --cpu-mem: one line naming rank and host')
    check(os.listdir(od) == [] and not leftover_procs(), 'over budget: no files, no processes left', '%s %s' % (os.listdir(od), leftover_procs()))
    hosts = [os.path.join(od, 'host%d' % i) for i in range(2)]
    for h in hosts:
        os.makedirs(h, exist_ok=True)
    g2 = g[:-1]  # --offload-dir's value, per rank
    for label, bad_rank in (('rank 1 over its --cpu-mem', 1), ('rank 0 over its --cpu-mem', 0)):
        apps = [(1, g2 + [hosts[i], '-m', m5] + (['--cpu-mem', '1M'] if i == bad_rank else [])) for i in range(2)]
        r = mpirun(*apps, timeout=60)
        one_line(r, ['rank %d on %s' % (bad_rank, host), 'cpu'], '%s, each rank its own offload dir: one line' % label)
        left = [os.path.join(h, f) for h in hosts for f in os.listdir(h)]
        check(left == [] and not leftover_procs(), '%s alone in its offload dir: no opt-pipe-* directory, no file, no process left' % label,
              '%s %s' % (left, leftover_procs()))
        for h in hosts:
            shutil.rmtree(h, ignore_errors=True)
            os.makedirs(h)
    for h in hosts:
        os.rmdir(h)
    # SIGKILL of rank 1 mid-run: the others end, their files go, and so do rank 1's
    big = harness.fixture(os.path.join(TMP, 'big'), opt, ['synth', '--shape', '256x8x4x1024', '-o', os.path.join(TMP, 'big')])
    argv = ['mpirun', '-q', '--oversubscribe', '--bind-to', 'none', '-np', '3', MPI, 'bench', '-m', big, '--prompt-len', '128', '--gen-len', '400',
            '--percent', '0', '50', '0', '50', '0', '50', '--gpu-batch-size', '2', '--num-gpu-batches', '3', '--offload-dir', od]
    env = dict(os.environ, **ENV)
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    victim, t0 = None, time.time()
    while victim is None and time.time() - t0 < 60 and p.poll() is None:
        time.sleep(0.2)
        files = [f for d in os.listdir(od) for f in os.listdir(os.path.join(od, d)) if f.endswith('.bin')] if os.listdir(od) else []
        if len(files) < 6:  # every rank has its cache and activation files: mid-run
            continue
        for pid in leftover_procs():
            try:
                with open('/proc/%s/environ' % pid, 'rb') as f:
                    if b'OMPI_COMM_WORLD_RANK=1\0' in f.read():
                        victim = int(pid)
            except OSError:
                pass
    if victim is None:
        p.kill()
        harness.reap(p)
        check(False, 'SIGKILL test: rank 1 running with its offload files', 'never found (%s)' % os.listdir(od))
        return
    time.sleep(1)
    os.kill(victim, signal.SIGKILL)
    t1 = time.time()
    err = harness.reap(p, timeout=60)
    took = time.time() - t1
    time.sleep(0.5)
    check(p.returncode not in (0, None) and took < 30 and not leftover_procs(),
          'rank 1 SIGKILLed mid-run: the job ends within 30 s (%.1f s), non-zero, no process left' % took, 'exit %s; %s; %s' % (p.returncode, err[-400:], leftover_procs()))
    check(os.listdir(od) == [], 'rank 1 SIGKILLed: no offload files left (the other ranks remove the job\'s directory)', str(os.listdir(od)))


def main():
    global OPT, MPI, TMP
    ap = argparse.ArgumentParser()
    ap.add_argument('--opt', default='./opt')
    ap.add_argument('--mpi', default='./opt-mpi')
    ap.add_argument('--tmp', required=True)
    ap.add_argument('only', nargs='*')
    a = ap.parse_args()
    OPT, MPI, TMP = os.path.abspath(a.opt), os.path.abspath(a.mpi), os.path.abspath(a.tmp)
    os.makedirs(TMP, exist_ok=True)
    t0 = time.time()
    if not shutil.which('mpirun'):
        skip('all', 'no mpirun (Open MPI: apt-get install openmpi-bin libopenmpi-dev)')
        return harness.summary('test_mpi', t0)
    tests = [('equivalence', test_equivalence), ('formats', test_formats), ('refusals', test_refusals), ('faults', test_faults)]
    for name, fn in tests:
        if not a.only or name in a.only:
            harness.section(name)
            harness.run_sections([(name, fn)], None)
    return harness.summary('test_mpi', t0)


if __name__ == '__main__':
    sys.exit(main())
