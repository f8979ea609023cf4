#!/usr/bin/python3
"""Offloading (issue 4): the block schedule with the CPU as the compute device.

    tests/test_offload.py [--opt ./opt] [--asan ./opt-asan] [--tmp DIR] [-k SUBSTRING]

Every check prints one line ("  ok    NAME", "  FAIL  NAME" with details under it, or
"  skip  NAME: why"), the last line is "test_offload: N passed, M failed, K skipped", and
the exit status is 0 only when nothing failed.  Every opt run has a time limit.

What is checked, and what each group guards against:
  equivalence   (the issue's central test) `score --ids` and greedy `generate --ids -n N`
                under a grid of policies -- all in RAM, all on disk (0 0 0 0 0 0), one class on
                disk at a time, mixed, odd percentages (0 37 0 13 0 61), near-edge ones
                (1 / 99), one to several GPU batches, blocks smaller and larger than the
                7 prompts of different lengths (1..33 tokens: partial key blocks of 16) --
                give byte-identical output to the plain run (no policy).  Guards the
                split-tensor arithmetic (weights by rows, cache by (layer, batch, seq,
                head) areas, activations by columns), the double buffers and the
                asynchronous write-back of the schedule.  Also: --no-overlap; 4-bit
                weights and/or cache (compared to the plain run with the same flags); .bin,
                sharded safetensors, sharded bf16 .bin with a separate lm_head, a post-LN
                f32 model with project_in/out (tests/mkckpt.py), native files from
                `opt convert --int4-weights` and `--w8a8`; -t 1; sampling with a seed;
                --policy auto (with a CPU-only probe file).
  early stop    generate with an EOS that some sequences of a block reach before others
                (the checkpoint's eos_token_id is set to a token the greedy outputs contain,
                chosen so that a middle GPU batch finishes while its neighbours run):
                the schedule must skip finished batches without two live batches sharing a
                staging buffer.
  dummy         `-m dummy:SHAPE` with and without a policy (disk share written into the
                offload dir) scores exactly as `opt synth --shape SHAPE --seed 1`.
  percentages   the memory plan on stderr (rows weights / kv cache / activations, columns
                gpu / cpu / disk, unit in the header): cpu / (cpu + disk) is within 1% of
                the requested share for each class (weights: the rows left in the checkpoint
                count as disk), the GPU column is 0, the peak row adds up.
  budgets       `bench --json`: the accounted peak never exceeds the plan, nor a budget
                given with --cpu-mem / --disk-mem; a policy over a budget is refused before
                anything is allocated or written: exit 1, nothing on stdout, the plan and one
                reason line on stderr, promptly, no files in the offload dir (a dummy model's
                disk share must not be written first: RLIMIT_FSIZE catches a write).
  disk tier     a full offload dir (a 256 KiB tmpfs; skipped when mounting fails), a
                read-only one (a read-only bind mount: root ignores permissions), a missing
                one and a regular file: one clear error line, exit 1, no files left; no
                opt-* files after a normal run, after an error in the middle of a run
                (stdout is /dev/full) and after SIGTERM / SIGINT in the middle of a run.
  exit paths    SIGPIPE (stdout's reader gone after one line) and SIGHUP in the middle of a run:
                the process dies of the signal and the offload dir is empty; files of a run
                killed by SIGKILL (a dead pid in our exact names) are removed by the next run in
                one stderr line, a live pid's file and other names kept; without --cpu-mem the
                CPU budget is the memory available (MemAvailable, the cgroup's limit): a policy
                over it is refused by the plan at once (dummy:opt-66b all in RAM), as is
                dummy:opt-66b without a policy.
  asan          mixed policies with disk shares under opt-asan (ASan + UBSan): exit 0, no
                sanitizer report, the plain run's output.
  host device   the GPU tier's schedule with the host standing in for the GPU
                (OPT_HOST_DEVICE=1: device memory in RAM, the CPU backend computing, every copy
                queued on its stream and run only when an event forces it, so a missing
                ordering makes a copy land late): GPU shares of every class, --cpu-attention
                (the attention split between device and host areas), compression, other
                layouts, give byte-identical output to the plain run; the plan's GPU and CPU
                shares within 1%; --gpu-mem refused; GPU shares without a device refused.
"""
import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = '/usr/bin/python3' if os.path.exists('/usr/bin/python3') else sys.executable
TIMEOUT = 60

sys.path.insert(0, HERE)
import harness  # noqa: E402
from harness import check as report, skip  # noqa: E402

ONLY = None
# independent opt runs go two at a time (the runs are short: start-up and I/O waits dominate)
POOL = ThreadPoolExecutor(max_workers=2)


def want(group):
    return ONLY is None or ONLY in group


def run(binary, args, stdin=None, env=None, timeout=TIMEOUT, stdout=subprocess.PIPE, preexec=None):
    return harness.run([binary] + args, stdin=stdin, env=dict({'OPT_DEVICE': 'cpu'}, **(env or {})), timeout=timeout, stdout=stdout, preexec=preexec)


def opt(args, **kw):
    return run(OPT, args, **kw)


def holds(d, n, seen):
    """A ready() for harness.interrupt: d holds n of our files (listed into seen)."""
    def ready():
        seen[:] = leftovers(d)
        return len(seen) >= n
    return ready


def leftovers(d):
    try:
        return sorted(f for f in os.listdir(d) if f.startswith('opt-'))
    except OSError:
        return []


def pol_args(pol, gbs, nb, extra=()):
    return ['--percent'] + pol.split() + ['--gpu-batch-size', str(gbs), '--num-gpu-batches', str(nb),
                                          '--offload-dir', OFFDIR] + list(extra)


def first_diff(a, b):
    la, lb = a.decode().split('\n'), b.decode().split('\n')
    for i, (x, y) in enumerate(zip(la, lb)):
        if x != y:
            return 'line %d differs:\n  plain : %s\n  policy: %s' % (i + 1, x[:150], y[:150])
    return 'line counts differ: %d vs %d' % (len(la), len(lb))


# ----------------------------------------------------------------------------
# fixtures

def write_prompts(path, lengths, vocab_hi, seed):
    import random
    r = random.Random(seed)
    with open(path, 'w') as f:
        for n in lengths:
            f.write(' '.join(['2'] + [str(r.randrange(4, vocab_hi)) for _ in range(n - 1)]) + '\n')
    return path


def synth(dirname, shape, *extra):
    d = os.path.join(TMP, dirname)
    return harness.fixture(d, opt, ['synth', '--shape', shape, '-o', d] + list(extra))


def mkckpt(dirname, *extra):
    d = os.path.join(TMP, dirname)
    if not os.path.exists(os.path.join(d, 'config.json')):
        p = subprocess.run([PY, os.path.join(HERE, 'mkckpt.py'), '-o', d] + list(extra), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=120)
        if p.returncode != 0:
            raise SystemExit('fixture: mkckpt.py failed: %s' % p.stdout.decode()[-800:])
    return d


def convert(src, name, *extra):
    f = os.path.join(TMP, name)
    return harness.fixture(f, opt, ['convert', '-m', src, '-o', f] + list(extra))


# ----------------------------------------------------------------------------
# equivalence

# policy strings (WG WC CG CC AG AC) and GPU batch grids
P_ALL_RAM = '0 100 0 100 0 100'
P_ALL_DISK = '0 0 0 0 0 0'
P_ODD = '0 37 0 13 0 61'
GRID_POLICIES = [P_ALL_RAM, P_ALL_DISK, '0 50 0 50 0 50', P_ODD, '0 100 0 0 0 100', '0 0 0 100 0 100',
                 '0 100 0 100 0 0', '0 99 0 1 0 99', '0 1 0 99 0 1']
GRID_BATCHES = [(1, 1), (2, 2), (3, 1), (1, 3), (4, 2), (2, 4)]


def equivalence(model, prompts, policies, batches, label, extra=(), gen_n=6, score=True, generate=True, env=None):
    """Plain score / generate vs each (policy, batches); one check line per mode and model."""
    modes = []
    if score:
        modes.append(('score', ['score', '--ids', '-m', model, '-f', prompts] + list(extra)))
    if generate:
        modes.append(('generate -n %d' % gen_n, ['generate', '--ids', '-n', str(gen_n), '-m', model, '-f', prompts] + list(extra)))
    for mode, base in modes:
        plain = opt(base)
        if plain.rc != 0 or not plain.out:
            report(False, '%s: %s plain run' % (label, mode), plain.tail())
            continue
        bad = []
        combos = [(pol, gbs, nb) for pol in policies for gbs, nb in batches]
        n = len(combos)
        for (pol, gbs, nb), r in zip(combos, POOL.map(lambda c: opt(base + pol_args(*c), env=env), combos)):
            if r.rc != 0:
                bad.append('--percent %s, %dx%d: %s' % (pol, gbs, nb, r.tail(2)))
            elif r.out != plain.out:
                bad.append('--percent %s, %dx%d: %s' % (pol, gbs, nb, first_diff(plain.out, r.out)))
        report(not bad, '%s: %s identical to the plain run under %d policies%s' % (label, mode, n, ' (%d differ)' % len(bad) if bad else ''),
               '\n'.join(bad[:4]))


def test_equivalence(models):
    A, P7 = models['A'], models['P7']
    equivalence(A, P7, GRID_POLICIES, GRID_BATCHES, 'synth 128x4x8x512 f16')
    equivalence(A, P7, [P_ALL_DISK, P_ODD, '0 50 0 50 0 50'], [(2, 2), (1, 3), (3, 1)], 'synth 128x4x8x512 --no-overlap',
                extra=['--no-overlap'])
    for flags in (['--compress-weight'], ['--compress-cache'], ['--compress-weight', '--compress-cache', '--group-size', '32']):
        equivalence(A, P7, [P_ALL_RAM, P_ALL_DISK, P_ODD], [(2, 2), (1, 3)], 'synth 128x4x8x512 %s' % ' '.join(flags), extra=flags)
    equivalence(A, P7, [P_ALL_RAM, P_ODD], [(2, 2)], 'synth 128x4x8x512 --pin-weights --cpu-attention',
                extra=['--pin-weights', '--cpu-attention'])
    few = [P_ALL_RAM, P_ALL_DISK, P_ODD]
    fewb = [(2, 2), (3, 1), (1, 3)]
    equivalence(models['bin'], P7, few, fewb, '.bin (pytorch_model.bin)')
    equivalence(models['shard'], P7, few, fewb, 'sharded safetensors (3 files)')
    equivalence(models['binshard'], P7, few, fewb, 'sharded .bin, bf16, separate lm_head')
    equivalence(models['post'], P7, few + ['0 0 0 100 0 100'], fewb, 'post-LN f32, embed_dim 48 (project_in/out), no tie')
    equivalence(models['q4'], P7, few, fewb, 'native 4-bit file (opt convert --int4-weights)')
    equivalence(models['w8'], P7, few, [(2, 2), (1, 3)], 'native W8A8 file (opt convert --w8a8)')

    # -t 1 under a policy against the plain run with all threads
    plain = opt(['score', '--ids', '-m', A, '-f', P7])
    r = opt(['score', '--ids', '-t', '1', '-m', A, '-f', P7] + pol_args(P_ODD, 2, 2))
    report(r.rc == 0 and r.out == plain.out, 'score -t 1 under --percent %s equals the plain run' % P_ODD,
           r.tail() if r.rc else first_diff(plain.out, r.out))

    # sampling: each sequence's generator is its own, so the policy does not change it
    s = ['generate', '--ids', '-n', '8', '--temperature', '0.9', '--top-p', '0.95', '--seed', '11', '-m', A, '-f', P7]
    plain = opt(s)
    bad = []
    for pol, gbs, nb in ((P_ALL_DISK, 2, 2), (P_ODD, 1, 3)):
        r = opt(s + pol_args(pol, gbs, nb))
        if r.rc != 0 or r.out != plain.out:
            bad.append('%s %dx%d: %s' % (pol, gbs, nb, r.tail() if r.rc else first_diff(plain.out, r.out)))
    report(plain.rc == 0 and not bad, 'sampled generate (--temperature 0.9 --top-p 0.95 --seed 11) identical under policies', '\n'.join(bad))

    # --policy auto with a CPU-only probe file whose small RAM (32 MiB) makes disk shares one of
    # the cost model's options; whatever it picks must fit its plan and score the same
    hw = os.path.join(TMP, 'hw-cpu.json')
    with open(hw, 'w') as f:
        json.dump({'format': 'opt-probe-1', 'gpu': False, 'cpu_mem': 32 << 20, 'disk_mem': 1e11, 'disk_read_bw': 1.5e9,
                   'disk_write_bw': 1e9, 'cpu_gemv_bw': 2e10, 'cpu_gemv_q4_bw': 1e10, 'cpu_gemm_flops_g': 2e11,
                   'cpu_gemm_flops_p': 3e11, 'cpu_mem_bw': 2e10}, f)
    plain = opt(['score', '--ids', '-m', A, '-f', P7])
    r = opt(['score', '--ids', '-m', A, '-f', P7, '--policy', 'auto', '--hw', hw, '--offload-dir', OFFDIR])
    chose = re.search(r'chose (--percent [0-9. ]+)', r.errtext)
    report(r.rc == 0 and r.out == plain.out, '--policy auto (CPU-only probe file, 32 MiB) scores as the plain run [%s]' % (
        chose.group(1).strip() if chose else 'no choice printed'), r.tail() if r.rc else first_diff(plain.out, r.out))


def test_early_stop(models):
    """EOS reached at different steps by the sequences of a block."""
    A, P7 = models['A'], models['P7']
    N = 10
    g = opt(['generate', '--ids', '--ignore-eos', '-n', str(N), '-m', A, '-f', P7])
    if g.rc != 0:
        report(False, 'early stop: plain generate', g.tail())
        return
    outs = [[int(x) for x in l.split()] for l in g.out.decode().strip('\n').split('\n')]

    def stops(t):
        return [o.index(t) + 1 if t in o else N for o in outs]

    def middle_gaps(st, gbs, nb):
        """(block, step) situations with a finished GPU batch between two live ones."""
        n = 0
        blk = gbs * nb
        for b0 in range(0, len(st), blk):
            seqs = st[b0:b0 + blk]
            for step in range(1, N):
                live = [any(s > step for s in seqs[k * gbs:(k + 1) * gbs]) for k in range(nb)]
                idx = [k for k in range(nb) if live[k]]
                n += sum(1 for a, b in zip(idx, idx[1:]) if b - a >= 2)
        return n

    cands = sorted({t for o in outs for t in o[:N - 1]})
    best = max(cands, key=lambda t: (middle_gaps(stops(t), 1, 3) + middle_gaps(stops(t), 1, 4), -t))
    if middle_gaps(stops(best), 1, 3) + middle_gaps(stops(best), 1, 4) == 0:
        skip('early stop', 'no token of the greedy outputs makes a middle GPU batch finish first')
        return
    d = os.path.join(TMP, 'eos-model')
    if not os.path.exists(d):
        shutil.copytree(A, d)
    cfgp = os.path.join(d, 'config.json')
    with open(cfgp) as f:
        cfg = json.load(f)
    cfg['eos_token_id'] = best
    with open(cfgp, 'w') as f:
        json.dump(cfg, f, indent=2)
    print('          (eos_token_id %d: sequences stop after %s tokens)' % (best, stops(best)))
    equivalence(d, P7, [P_ALL_RAM, '0 100 0 0 0 100', '0 100 0 100 0 0', P_ODD], [(1, 3), (1, 4), (2, 2)],
                'early stop (EOS %d)' % best, gen_n=N, score=False)
    equivalence(d, P7, [P_ALL_DISK], [(1, 3)], 'early stop (EOS %d) --no-overlap' % best, gen_n=N, score=False,
                extra=['--no-overlap'])


def test_dummy(models):
    shape = '128x4x8x512'
    d = synth('dummy-ref', shape, '--seed', '1')
    P7 = models['P7']
    ref = opt(['score', '--ids', '-m', d, '-f', P7])
    plain = opt(['score', '--ids', '-m', 'dummy:' + shape, '-f', P7])
    report(plain.rc == 0 and plain.out == ref.out, '-m dummy:%s scores as opt synth --shape %s --seed 1' % (shape, shape),
           plain.tail() if plain.rc else first_diff(ref.out, plain.out))
    bad = []
    for pol, gbs, nb in ((P_ALL_RAM, 2, 2), (P_ALL_DISK, 2, 2), (P_ODD, 1, 3), ('0 50 0 100 0 100', 3, 1)):
        r = opt(['score', '--ids', '-m', 'dummy:' + shape, '-f', P7] + pol_args(pol, gbs, nb))
        if r.rc != 0 or r.out != ref.out:
            bad.append('%s %dx%d: %s' % (pol, gbs, nb, r.tail() if r.rc else first_diff(ref.out, r.out)))
    report(not bad, '-m dummy:%s with disk shares (written into the offload dir) scores the same' % shape, '\n'.join(bad))
    ref = opt(['generate', '--ids', '-n', '5', '-m', d, '-f', P7])
    r = opt(['generate', '--ids', '-n', '5', '-m', 'dummy:' + shape, '-f', P7] + pol_args(P_ODD, 2, 2, ['--compress-cache']))
    r0 = opt(['generate', '--ids', '-n', '5', '-m', d, '-f', P7, '--compress-cache'])
    report(r.rc == 0 and r.out == r0.out, '-m dummy:%s generate --compress-cache under --percent %s equals the synth model' % (shape, P_ODD),
           r.tail() if r.rc else first_diff(r0.out, r.out))
    report(not leftovers(OFFDIR), 'no opt-* files left in the offload dir after the dummy runs', ' '.join(leftovers(OFFDIR)))


# ----------------------------------------------------------------------------
# the device schedule, with the host standing in for the GPU

HOST = {'OPT_HOST_DEVICE': '1'}
DEV_POLICIES = ['100 0 100 0 100 0', '30 40 20 50 10 60', '0 0 0 0 0 0', '50 50 50 50 50 50', '20 80 0 100 0 100',
                '0 100 0 100 0 100', '60 40 100 0 100 0', '99 1 1 98 1 0', '37 0 13 0 61 0']


def test_device(models):
    A, P7 = models['A'], models['P7']
    grid = [(1, 1), (2, 2), (3, 1), (1, 3), (2, 4)]
    for ca in ([], ['--cpu-attention']):
        equivalence(A, P7, DEV_POLICIES, grid, 'host device%s, synth 128x4x8x512 f16' % (' ' + ca[0] if ca else ''), extra=ca, env=HOST)
    few = ['30 40 20 50 10 60', '100 0 100 0 100 0', '0 0 0 0 0 0']
    fewb = [(2, 2), (1, 3)]
    for flags in (['--compress-weight'], ['--compress-cache'], ['--compress-weight', '--compress-cache', '--cpu-attention']):
        equivalence(A, P7, few, fewb, 'host device %s' % ' '.join(flags), extra=flags, env=HOST)
    equivalence(models['binshard'], P7, few, fewb, 'host device, sharded .bin, bf16, separate lm_head', extra=['--cpu-attention'], env=HOST)
    equivalence(models['post'], P7, few, fewb, 'host device, post-LN f32, embed_dim 48 (project_in/out)', env=HOST)
    equivalence(models['q4'], P7, few, fewb, 'host device, native 4-bit file', extra=['--cpu-attention'], env=HOST)
    equivalence(models['w8'], P7, few, fewb, 'host device, native W8A8 file', env=HOST)
    equivalence(A, P7, few, fewb, 'host device --no-overlap', extra=['--no-overlap'], env=HOST, generate=False)

    # the plan: each class's GPU and CPU shares within 1% of what was asked
    mdl, P = models['pct'], models['Ppct']
    for pol, gbs, nb, extra in (('30 40 20 50 10 60', 4, 2, []), ('63 20 17 70 42 11', 8, 1, ['--cpu-attention']),
                                ('100 0 100 0 100 0', 4, 2, [])):
        r = opt(['score', '--ids', '-m', mdl, '-f', P] + pol_args(pol, gbs, nb, extra), env=HOST)
        rows, unit = parse_plan(r.err)
        name = 'host device plan honours --percent %s (%dx%d%s) within 1%% per class and tier' % (pol, gbs, nb, ' ' + ' '.join(extra) if extra else '')
        if r.rc != 0 or not rows:
            report(False, name, r.tail())
            continue
        want_pct = [float(x) / 100 for x in pol.split()]
        vec = vector_bytes(mdl)
        bad = []
        for i, cls in enumerate(('weights', 'kv cache', 'activations')):
            g, c, d = rows.get(cls, (0, 0, 0))
            v = vec if cls == 'weights' else 0  # 1-D tensors: whole on the device and in RAM, never split
            tot = g + c + d - 2 * v
            res = 0.0005 * unit
            for tier, got, w in (('gpu', g - v, want_pct[2 * i]), ('cpu', c - v, want_pct[2 * i + 1])):
                if cls == 'kv cache' and tier == 'cpu' and '--cpu-attention' not in extra:
                    pass  # host areas are in the device's format: same bytes per area here (f32 on the host device)
                if abs(got - w * tot) > 0.01 * tot + 2 * res:
                    bad.append('%s: %s %.4f of %.4f %s = %.2f%%, asked %.0f%%' % (cls, tier, got / unit, tot / unit, 'MiB' if unit == 1 << 20 else 'GiB',
                                                                             100 * got / tot, 100 * w))
        report(not bad, name, '\n'.join(bad))

    # --gpu-mem: refused before allocating, with the plan
    r = opt(['score', '--ids', '-m', A, '-f', P7] + pol_args('100 0 100 0 100 0', 2, 2, ['--gpu-mem', '1M']), env=HOST)
    report(r.rc == 1 and not r.out and b'does not fit' in r.err and b'gpu needs' in r.err, '--gpu-mem 1M refused: "%s"' % (
        r.errtext.strip().split('\n')[-1] if r.err else ''), r.tail())
    # without a device, GPU shares are refused
    r = opt(['score', '--ids', '-m', A, '-f', P7] + pol_args('30 40 20 50 10 60', 2, 2))
    report(r.rc == 1 and not r.out and b'no usable GPU' in r.err, 'GPU shares without a device are refused', r.tail())


# ----------------------------------------------------------------------------
# the memory plan

def parse_plan(err):
    """{row: (gpu, cpu, disk)} in bytes from the plan on stderr, or None."""
    lines = err.decode('utf-8', 'replace').split('\n')
    for i, l in enumerate(lines):
        m = re.match(r'\s+gpu (MiB|GiB)\s+cpu (MiB|GiB)\s+disk (MiB|GiB)\s*$', l)
        if not m:
            continue
        unit = 1 << (30 if m.group(1) == 'GiB' else 20)
        rows = {}
        for l2 in lines[i + 1:]:
            m2 = re.match(r'\s+(\S.*?)\s+(-?[0-9.]+)\s+(-?[0-9.]+)\s+(-?[0-9.]+)(\s.*)?$', l2)
            if not m2:
                break
            rows[m2.group(1)] = tuple(float(m2.group(k)) * unit for k in (2, 3, 4))
        return rows, unit
    return None, None


def vector_bytes(model_dir):
    """Bytes of the 1-D tensors (biases, LayerNorm weights and biases) held as f32."""
    with open(os.path.join(model_dir, 'config.json')) as f:
        c = json.load(f)
    H, F, L = c['hidden_size'], c['ffn_dim'], c['num_hidden_layers']
    bias = c.get('enable_bias', True)
    aff = c.get('layer_norm_elementwise_affine', True)
    pre = c.get('do_layer_norm_before', True)
    final = pre and not c.get('_remove_final_layer_norm', False)
    n = L * ((4 * H + F + H if bias else 0) + (4 * H if aff else 0)) + (2 * H if final and aff else 0)
    return 4 * n


def test_percentages(models):
    mdl, P = models['pct'], models['Ppct']
    cases = [('0 37 0 13 0 61', 4, 2, []), ('0 50 0 50 0 50', 2, 4, []), ('0 83 0 71 0 7', 8, 1, []),
             ('0 0 0 0 0 0', 4, 2, []), ('0 100 0 100 0 100', 4, 2, []), ('0 29 0 57 0 43', 4, 2, ['--compress-weight', '--compress-cache'])]
    for pol, gbs, nb, extra in cases:
        r = opt(['score', '--ids', '-m', mdl, '-f', P] + pol_args(pol, gbs, nb, extra))
        rows, unit = parse_plan(r.err)
        name = 'plan honours --percent %s (%dx%d%s) within 1%% per class' % (pol, gbs, nb, ' ' + ' '.join(extra) if extra else '')
        if r.rc != 0 or not rows:
            report(False, name, r.tail())
            continue
        want_cpu = [float(x) / 100 for x in pol.split()[1::2]]
        vec = vector_bytes(mdl)
        bad, got = [], []
        for cls, w in zip(('weights', 'kv cache', 'activations'), want_cpu):
            if cls not in rows:
                bad.append('no "%s" row in the plan' % cls)
                continue
            g, c, d = rows[cls]
            tot = c + d
            res = 0.0005 * unit  # the plan prints 3 decimals
            if g != 0:
                bad.append('%s: %g bytes on the GPU of a CPU-only build' % (cls, g))
            if tot <= 0:
                bad.append('%s: empty' % cls)
                continue
            # The weights' 1-D tensors (biases, LayerNorms: f32, never split) stay in RAM; the
            # matrices carry the split.  1% of the class's bytes, plus the printing resolution.
            v = vec if cls == 'weights' else 0
            frac = (c - v) / (tot - v)
            got.append('%s %.2f%%' % (cls, 100 * frac))
            if abs((c - v) - w * (tot - v)) > 0.01 * tot + 2 * res:
                bad.append('%s: cpu %.4f / (cpu + disk) %.4f %s= %.2f%%, asked %.0f%%' % (
                    cls, c / unit, tot / unit, '(less %.4f of vectors) ' % (v / unit) if v else '', 100 * frac, 100 * w))
        peak = rows.get('peak')
        if peak:
            s_cpu = sum(v[1] for k, v in rows.items() if k != 'peak')
            if abs(s_cpu - peak[1]) > 0.003 * unit * len(rows):
                bad.append('peak cpu %.3f is not the sum of the rows %.3f' % (peak[1] / unit, s_cpu / unit))
        else:
            bad.append('no peak row')
        report(not bad, name + ' [%s]' % ', '.join(got), '\n'.join(bad))


# ----------------------------------------------------------------------------
# budgets

def bench(model, pol, gbs, nb, extra=(), plen=32, glen=4, **kw):
    return opt(['bench', '-m', model, '--prompt-len', str(plen), '--gen-len', str(glen), '--json'] + pol_args(pol, gbs, nb, extra), **kw)


def refused_ok(r, flag):
    """exit 1, nothing on stdout, the plan then one reason line naming the flag."""
    errs = r.errtext.strip().split('\n')
    plan, _ = parse_plan(r.err)
    problems = []
    if r.rc != 1:
        problems.append('exit %s, wanted 1' % r.rc)
    if r.out:
        problems.append('stdout not empty: %r' % r.out[:200])
    if not plan:
        problems.append('no memory plan on stderr')
    last = errs[-1] if errs else ''
    if not (last.startswith('opt: ') and 'does not fit' in last and flag in last):
        problems.append('last stderr line is not the refusal naming %s: %r' % (flag, last))
    non_plan = [l for l in errs if l.startswith('opt: ') and 'memory plan' not in l]
    if len(non_plan) != 1:
        problems.append('%d reason lines: %r' % (len(non_plan), non_plan[:3]))
    if r.dt > 5:
        problems.append('took %.1f s (not prompt)' % r.dt)
    return problems


def small_fsize():
    """preexec_fn: files the child writes may not exceed 64 KiB (EFBIG, not SIGXFSZ)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


def test_budgets(models):
    A = models['A']
    G = float(1 << 30)
    for mdl, label in ((A, 'synth 128x4x8x512'), ('dummy:128x4x8x512', 'dummy:128x4x8x512')):
        for pol, gbs, nb, extra in ((P_ALL_DISK, 2, 2, []), (P_ODD, 3, 2, []), ('0 50 0 100 0 100', 4, 1, []),
                                    (P_ODD, 2, 2, ['--compress-weight', '--compress-cache']), (P_ALL_RAM, 2, 2, [])):
            r = bench(mdl, pol, gbs, nb, extra)
            name = '%s --percent %s %dx%d%s: accounted peak <= plan' % (label, pol, gbs, nb, ' ' + ' '.join(extra) if extra else '')
            try:
                j = json.loads(r.out.decode().strip().split('\n')[-1])
            except (ValueError, IndexError):
                report(False, name, 'no JSON: ' + r.tail())
                continue
            bad = []
            for t in ('cpu', 'disk'):
                if j['peak_%s_gib' % t] > j['plan_%s_gib' % t]:
                    bad.append('%s: peak %.4f GiB > plan %.4f GiB' % (t, j['peak_%s_gib' % t], j['plan_%s_gib' % t]))
            if j.get('peak_gpu_gib', 0) != 0:
                bad.append('gpu peak %s on a CPU-only run' % j['peak_gpu_gib'])
            report(r.rc == 0 and not bad, name + ' (cpu %.4f/%.4f, disk %.4f/%.4f GiB)' % (
                j['peak_cpu_gib'], j['plan_cpu_gib'], j['peak_disk_gib'], j['plan_disk_gib']), '\n'.join(bad) or r.tail())
            if pol != P_ODD or extra:
                continue
            # budgets: just above the plan runs (and stays under), just below is refused before anything
            plan, unit = parse_plan(r.err)
            if not plan:
                report(False, label + ': budgets', 'no plan on stderr')
                continue
            cpu_need, disk_need = plan['peak'][1], plan['peak'][2]
            cb, db = int(cpu_need + 0.002 * unit), int(disk_need + 0.002 * unit)
            r2 = bench(mdl, pol, gbs, nb, ['--cpu-mem', '%dB' % cb, '--disk-mem', '%dB' % db])
            try:
                j2 = json.loads(r2.out.decode().strip().split('\n')[-1])
                ok = r2.rc == 0 and j2['peak_cpu_gib'] * G <= cb + 0.00005 * G and j2['peak_disk_gib'] * G <= db + 0.00005 * G
                det = 'peak cpu %.4f GiB vs budget %.4f; disk %.4f vs %.4f' % (j2['peak_cpu_gib'], cb / G, j2['peak_disk_gib'], db / G)
            except (ValueError, IndexError, KeyError):
                ok, det = False, r2.tail()
            report(ok, '%s: --cpu-mem/--disk-mem just above the plan run, peak within the budgets' % label, det)
            for flag, need in (('--cpu-mem', cpu_need), ('--disk-mem', disk_need)):
                before = leftovers(OFFDIR)
                r3 = bench(mdl, pol, gbs, nb, [flag, '%dB' % int(need * 0.97)])
                probs = refused_ok(r3, flag)
                if leftovers(OFFDIR) != before:
                    probs.append('files left: %s' % leftovers(OFFDIR))
                report(not probs, '%s: %s 3%% under the plan is refused before allocating' % (label, flag), '\n'.join(probs))

    # A dummy model's disk share must not be written before the budgets are checked (the
    # refusal must come from the plan, before anything is allocated or written).  With
    # RLIMIT_FSIZE at 64 KiB (SIGXFSZ ignored) any such write fails at once with EFBIG,
    # so a premature write shows as the wrong error instead of filling the disk.
    for shape, flag, size in (('128x4x8x512', '--disk-mem', '32K'), ('opt-1.3b', '--disk-mem', '32K'),
                              ('opt-175b', '--cpu-mem', '1G'), ('opt-175b', '--disk-mem', '100G')):
        r = opt(['score', '--ids', '-m', 'dummy:' + shape, '-f', models['P7']] + pol_args(P_ALL_DISK, 8, 1, [flag, size]),
                preexec=small_fsize, timeout=30)
        probs = refused_ok(r, flag)
        left = leftovers(OFFDIR)
        for f in left:  # do not let one failure cascade into the checks after it
            os.unlink(os.path.join(OFFDIR, f))
        report(not probs and not left,
               'dummy:%s with %s %s is refused by the plan before its disk share is written (%.2f s)' % (shape, flag, size, r.dt),
               '\n'.join(probs + (['files left: %s' % left] if left else [])))


# ----------------------------------------------------------------------------
# the disk tier's failure modes

def one_error_line(r, must=()):
    """exit 1, empty stdout, exactly one 'opt: ' line besides the plan's header."""
    errs = [l for l in r.errtext.strip().split('\n') if l.startswith('opt: ') and 'memory plan' not in l]
    probs = []
    if r.rc != 1:
        probs.append('exit %s, wanted 1' % r.rc)
    if r.out:
        probs.append('stdout not empty: %r' % r.out[:200])
    if len(errs) != 1:
        probs.append('%d error lines: %r' % (len(errs), errs[:3]))
    elif any(m not in errs[0] for m in must):
        probs.append('error %r does not name %s' % (errs[0], must))
    if 'runtime error' in r.errtext or 'Sanitizer' in r.errtext:
        probs.append('sanitizer report')
    return probs


def mount_tmpfs(d, size):
    os.makedirs(d, exist_ok=True)
    p = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=%s' % size, 'tmpfs', d], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return p.returncode == 0, p.stdout.decode().strip()


def umount(d):
    subprocess.run(['umount', d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_disk_tier(models):
    A, P7 = models['A'], models['P7']
    base = ['score', '--ids', '-m', A, '-f', P7]
    # normal run: no files after
    r = opt(base + pol_args(P_ALL_DISK, 2, 2))
    report(r.rc == 0 and not leftovers(OFFDIR), 'no opt-* files in the offload dir after a normal run', r.tail() + ' ' + ' '.join(leftovers(OFFDIR)))

    # full offload dir: a 256 KiB tmpfs
    full = os.path.join(TMP, 'full')
    ok, msg = mount_tmpfs(full, '256k')
    if not ok:
        skip('full offload dir', 'cannot mount a tmpfs (%s)' % msg)
    else:
        try:
            for mdl, label in ((A, 'synth'), ('dummy:128x4x8x512', 'dummy (disk share of the weights into the dir)')):
                r = opt(['score', '--ids', '-m', mdl, '-f', P7, '--percent'] + P_ALL_DISK.split() +
                        ['--gpu-batch-size', '4', '--num-gpu-batches', '2', '--offload-dir', full])
                probs = one_error_line(r, (full,))
                if os.listdir(full):
                    probs.append('files left: %s' % os.listdir(full))
                if r.dt > 10:
                    probs.append('took %.1f s' % r.dt)
                report(not probs, 'full offload dir (256 KiB tmpfs), %s: one clear error, no files left' % label, '\n'.join(probs) or r.tail(2))
        finally:
            umount(full)

    # an error after the files exist: stdout is /dev/full, so generation fails writing it
    with open('/dev/full', 'wb') as devfull:
        r = opt(['generate', '--ids', '-n', '4', '-m', 'dummy:128x4x8x512', '-f', P7] + pol_args(P_ODD, 2, 2), stdout=devfull)
    left = leftovers(OFFDIR)
    report(isinstance(r.rc, int) and r.rc > 0 and not left,
           'an error in the middle of a run (stdout is /dev/full): exit non-zero, no files left',
           'exit %s, files %s; %s' % (r.rc, left, r.tail(2)))

    # read-only offload dir (a read-only bind mount: root is not stopped by permissions)
    ro_src, ro = os.path.join(TMP, 'ro-src'), os.path.join(TMP, 'ro')
    os.makedirs(ro_src, exist_ok=True)
    os.makedirs(ro, exist_ok=True)
    p1 = subprocess.run(['mount', '--bind', ro_src, ro], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    p2 = p1.returncode == 0 and subprocess.run(['mount', '-o', 'remount,bind,ro', ro], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if p1.returncode != 0 or not p2 or p2.returncode != 0:
        if p1.returncode == 0:
            umount(ro)
        if os.geteuid() != 0:
            os.chmod(ro, 0o555)
            ro_ok = True
        else:
            ro_ok = False
            skip('read-only offload dir', 'cannot make a read-only bind mount')
    else:
        ro_ok = True
    try:
        if ro_ok:
            for mdl, label in ((A, 'synth'), ('dummy:128x4x8x512', 'dummy')):
                r = opt(['score', '--ids', '-m', mdl, '-f', P7] + pol_args(P_ALL_DISK, 2, 2)[:-2] + ['--offload-dir', ro])
                probs = one_error_line(r, (ro,))
                if os.listdir(ro_src):
                    probs.append('files: %s' % os.listdir(ro_src))
                report(not probs, 'read-only offload dir, %s: one clear error' % label, '\n'.join(probs))
    finally:
        umount(ro)
    for what, path in (('missing', os.path.join(TMP, 'no-such-dir')), ('a regular file as', P7)):
        for mdl, label in ((A, 'synth'), ('dummy:128x4x8x512', 'dummy')):
            r = opt(['score', '--ids', '-m', mdl, '-f', P7] + pol_args(P_ALL_DISK, 2, 2)[:-2] + ['--offload-dir', path])
            report(not one_error_line(r, (path,)), '%s offload dir, %s: one clear error' % (what, label), '\n'.join(one_error_line(r, (path,))))
    # a policy with nothing on disk does not need the directory at all
    r = opt(base + pol_args(P_ALL_RAM, 2, 2)[:-2] + ['--offload-dir', os.path.join(TMP, 'no-such-dir')])
    report(r.rc == 0, 'a policy with no disk share runs with a missing --offload-dir', r.tail())

    # signals in the middle of a run
    # (SIGTERM: a dummy model, whose weights' disk share is a third file; SIGINT: a checkpoint)
    for sig, mdl, nfiles in ((signal.SIGTERM, 'dummy:128x4x8x512', 3), (signal.SIGINT, A, 2)):
        d = os.path.join(TMP, 'sig-%d' % sig)
        os.makedirs(d, exist_ok=True)
        e = dict(os.environ, OPT_DEVICE='cpu')
        args = [OPT, 'bench', '-m', mdl, '--prompt-len', '256', '--gen-len', '400', '--percent'] + P_ALL_DISK.split() + \
               ['--gpu-batch-size', '4', '--offload-dir', d]
        # as from a terminal: a background job of a script starts with SIGINT ignored, and opt keeps it so
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=e,
                             preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL))
        seen = []
        running, err = harness.interrupt(p, sig, holds(d, nfiles, seen), settle=0.2)  # into the decode steps
        left = leftovers(d)
        name = '%s in the middle of a run: the process dies of it and its files (%s) are removed' % (signal.Signals(sig).name, ' '.join(seen) or 'none seen')
        if not running or not seen:
            report(False, name, 'the run was not in progress with its files (exit %s): %s' % (p.returncode, err[-300:]))
        else:
            report(p.returncode == -sig and not left, name, 'exit %s, files left %s; %s' % (p.returncode, left, err[-300:]))


# ----------------------------------------------------------------------------
# exit paths: signals that end the process, files of killed runs, the machine's memory

def fresh_dir(name):
    d = os.path.join(TMP, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


def dead_pid():
    p = subprocess.Popen(['true'])
    p.wait()  # reaped: no process has this pid until it is reused
    return p.pid


def test_exit_paths(models):
    A, P7 = models['A'], models['P7']
    # SIGPIPE: the reader goes away after the first line (`opt generate ... | head -1`)
    d = fresh_dir('sigpipe')
    args = [OPT, 'generate', '--ids', '-n', '8', '-m', A, '-f', P7] + pol_args(P_ALL_DISK, 1, 1)[:-2] + ['--offload-dir', d]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, OPT_DEVICE='cpu'))
    first = p.stdout.readline()
    seen = leftovers(d)
    p.stdout.close()
    err = harness.reap(p, 30)
    report(first and seen and p.returncode == -signal.SIGPIPE and os.listdir(d) == [],
           'SIGPIPE (the reader of stdout gone after one line): the process dies of it, the offload dir is empty',
           'first line %r, files while running %s, exit %s, left %s; %s' % (first[:60], seen, p.returncode, os.listdir(d), err[-300:]))

    # SIGHUP (a dropped ssh session), in the middle of a run with the dummy model's weight file too
    d = fresh_dir('sighup')
    args = [OPT, 'bench', '-m', 'dummy:128x4x8x512', '--prompt-len', '256', '--gen-len', '400', '--percent'] + P_ALL_DISK.split() + \
           ['--gpu-batch-size', '4', '--offload-dir', d]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ, OPT_DEVICE='cpu'),
                         preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    seen = []
    running, err = harness.interrupt(p, signal.SIGHUP, holds(d, 3, seen))
    report(running and len(seen) == 3 and p.returncode == -signal.SIGHUP and os.listdir(d) == [],
           'SIGHUP in the middle of a run: the process dies of it, the offload dir is empty',
           'running %s with %s; exit %s, left %s; %s' % (running, seen, p.returncode, os.listdir(d), err[-300:]))

    # files of a killed run (SIGKILL cannot be caught): removed by the next run, only when the
    # pid is dead and the name is exactly ours; a live pid's file (this test's) stays
    d = fresh_dir('stale')
    dead, live = dead_pid(), os.getpid()
    stale = ['opt-cache-%d.bin' % dead, 'opt-activations-%d.bin' % dead, 'opt-weights-%d.bin' % dead, 'opt-probe-%d.tmp' % dead]
    keep = ['opt-cache-%d.bin' % live, 'opt-cache-%d.bin.old' % dead, 'opt-notes-%d.bin' % dead, 'opt-cache-x%d.bin' % dead]
    for f in stale + keep:
        with open(os.path.join(d, f), 'wb') as fh:
            fh.write(b'x' * 100)
    r = opt(['score', '--ids', '-m', A, '-f', P7] + pol_args(P_ALL_DISK, 2, 2)[:-2] + ['--offload-dir', d])
    plain = opt(['score', '--ids', '-m', A, '-f', P7])
    notes = [l for l in r.errtext.split('\n') if 'killed runs' in l]
    left = sorted(os.listdir(d))
    report(r.rc == 0 and r.out == plain.out and left == sorted(keep) and len(notes) == 1 and all(f in notes[0] for f in stale),
           'files of a dead pid (opt-cache/activations/weights-PID.bin, opt-probe-PID.tmp) removed in one stderr line; a live pid\'s and other names kept',
           'left %s\nnotes %s\n%s' % (left, notes, r.tail(2)))
    for f in keep:
        os.unlink(os.path.join(d, f))
    report(os.listdir(d) == [], 'the stale-file test\'s offload dir is empty after', str(os.listdir(d)))

    # no --cpu-mem: the budget is what the machine can give; a policy over it is refused at
    # once (RLIMIT_AS: a binary that went on allocating fails there instead of meeting the OOM killer)
    def as_limit():
        resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))
    with open('/proc/meminfo') as f:
        avail = [int(l.split()[1]) << 10 for l in f if l.startswith('MemAvailable:')][0]
    if avail > 150 << 30:
        skip('dummy:opt-66b all in RAM refused without --cpu-mem', 'this machine has %.0f GiB available' % (avail / 2 ** 30))
        return
    d = fresh_dir('ram')
    r = opt(['bench', '-m', 'dummy:opt-66b', '--percent', '0', '100', '0', '100', '0', '100', '--gpu-batch-size', '1',
             '--num-gpu-batches', '1', '--offload-dir', d], preexec=as_limit, timeout=30)
    probs = refused_ok(r, 'the memory available')
    if os.listdir(d):
        probs.append('files left: %s' % os.listdir(d))
    report(not probs, 'dummy:opt-66b, every weight in RAM, no --cpu-mem: refused by the plan against the memory available', '\n'.join(probs))
    r = opt(['generate', '-m', 'dummy:opt-66b', '-n', '2'], stdin='hello\n', preexec=as_limit, timeout=30)
    probs = one_error_line(r, ('GiB of RAM',))
    report(not probs and r.dt < 5, 'dummy:opt-66b without a policy: refused in one line (%.1f s)' % r.dt, '\n'.join(probs) + r.tail(2))


# ----------------------------------------------------------------------------
# sanitizers

def test_asan(models):
    if not ASAN or not os.access(ASAN, os.X_OK):
        report(False, 'opt-asan', '%s is missing: make CUDA=0 opt-asan' % ASAN)
        return
    A, P7 = models['A'], models['P7']
    env = {'ASAN_OPTIONS': 'detect_leaks=0:abort_on_error=0', 'UBSAN_OPTIONS': 'print_stacktrace=1'}
    cases = [('score', A, P_ODD, 2, 2, []), ('generate', A, P_ALL_DISK, 1, 3, []), ('generate', A, P_ODD, 3, 2, ['--no-overlap']),
             ('score', 'dummy:128x4x8x512', '0 50 0 13 0 61', 2, 2, []), ('generate', A, P_ODD, 2, 2, ['--compress-cache']),
             ('score', A, P_ODD, 2, 2, ['--compress-weight']),
             # the device schedule, the host standing in for the GPU
             ('generate', A, '30 40 20 50 10 60', 2, 2, ['--host-device']), ('score', A, '30 40 20 50 10 60', 1, 3, ['--host-device', '--cpu-attention']),
             ('generate', 'dummy:128x4x8x512', '60 20 30 40 50 25', 2, 2, ['--host-device', '--cpu-attention', '--compress-cache'])]
    for cmd, mdl, pol, gbs, nb, extra in cases:
        host = '--host-device' in extra
        extra = [x for x in extra if x != '--host-device']
        base = [cmd, '--ids', '-m', mdl, '-f', P7] + (['-n', '5'] if cmd == 'generate' else []) + extra
        ref = opt(base)
        d = os.path.join(TMP, 'asan-%d' % len(os.listdir(TMP)))
        os.makedirs(d, exist_ok=True)
        r = run(ASAN, base + pol_args(pol, gbs, nb)[:-2] + ['--offload-dir', d], env=dict(env, **(HOST if host else {})), timeout=120)
        extra = extra + (['(host device)'] if host else [])
        et = r.errtext
        probs = []
        if r.rc != 0:
            probs.append('exit %s' % r.rc)
        m = re.search(r'(runtime error:.*|ERROR: AddressSanitizer.*)', et)
        if m:
            probs.append(m.group(1)[:200])
            i = et.find(m.group(1))
            probs.append(et[max(0, i - 120):i].strip().split('\n')[-1][:200])
        if r.rc == 0 and r.out != ref.out:
            probs.append(first_diff(ref.out, r.out))
        if r.rc == 0 and leftovers(d):  # a sanitizer abort skips the exit handlers: only clean exits count
            probs.append('files left: %s' % leftovers(d))
        report(not probs, 'opt-asan %s %s --percent %s %dx%d%s: clean, same output' % (cmd, mdl if mdl.startswith('dummy') else 'synth', pol, gbs, nb,
                                                                                  ' ' + ' '.join(extra) if extra else ''), '\n'.join(probs))


# ----------------------------------------------------------------------------

def main():
    global OPT, ASAN, TMP, OFFDIR, ONLY
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--opt', default=os.path.join(ROOT, 'opt'))
    ap.add_argument('--asan', default=os.path.join(ROOT, 'opt-asan'))
    ap.add_argument('--tmp', default=None, help='scratch directory (default: a new one under $TMPDIR, removed after)')
    ap.add_argument('-k', default=None, help='run only the groups whose name contains this')
    a = ap.parse_args()
    OPT, ASAN, ONLY = os.path.abspath(a.opt), os.path.abspath(a.asan) if a.asan else None, a.k
    own_tmp = a.tmp is None
    TMP = os.path.abspath(a.tmp or tempfile.mkdtemp(prefix='opt-offload-'))
    os.makedirs(TMP, exist_ok=True)
    OFFDIR = os.path.join(TMP, 'offload')
    os.makedirs(OFFDIR, exist_ok=True)
    if not os.access(OPT, os.X_OK):
        print('test_offload: %s is missing: make CUDA=0' % OPT)
        print('test_offload: 0 passed, 1 failed, 0 skipped')
        return 1
    # run copies, so that a rebuild during the run cannot mix versions (or catch a binary half-linked)
    os.makedirs(os.path.join(TMP, 'bins'), exist_ok=True)
    for name in ('OPT', 'ASAN'):
        src = globals()[name]
        if src and os.access(src, os.X_OK):
            dst = os.path.join(TMP, 'bins', os.path.basename(src))
            shutil.copy2(src, dst)
            globals()[name] = dst
    t0 = time.time()
    try:
        models = {
            'A': synth('A', '128x4x8x512'),
            'bin': synth('bin', '128x4x8x512', '--format', 'bin'),
            'shard': synth('shard', '128x4x8x512', '--shards', '3'),
            'binshard': synth('binshard', '128x4x8x512', '--format', 'bin', '--shards', '2', '--dtype', 'bf16', '--no-tie'),
            'post': mkckpt('post', '--hidden', '96', '--layers', '3', '--heads', '6', '--ffn', '256', '--embed-dim', '48',
                           '--post-ln', '--no-tie', '--vocab', '1000', '--dtype', 'f32', '--max-pos', '128'),
            'pct': mkckpt('pct', '--hidden', '256', '--layers', '4', '--heads', '8', '--ffn', '1024', '--vocab', '1000',
                          '--dtype', 'f16', '--no-tie', '--max-pos', '128'),
            # prompts of 1..33 tokens (ids < 1000 so that every model takes them)
            'P7': write_prompts(os.path.join(TMP, 'p7.ids'), [5, 1, 17, 33, 2, 16, 12], 1000, 7),
            'Ppct': write_prompts(os.path.join(TMP, 'ppct.ids'), [64] * 8, 1000, 8),
        }
        models['q4'] = convert(models['A'], 'A.q4', '--int4-weights')
        models['w8'] = convert(models['A'], 'A.w8a8', '--w8a8', '--calib', os.path.join(HERE, 'prompts.txt'),
                               '--calib-samples', '8', '--calib-len', '32')
        print('test_offload: %s, %s; fixtures in %s (%.1f s)' % (OPT, ASAN, TMP, time.time() - t0))
        groups = [('equivalence', test_equivalence), ('early stop', test_early_stop), ('dummy', test_dummy),
                  ('percentages', test_percentages), ('budgets', test_budgets), ('disk tier', test_disk_tier), ('exit paths', test_exit_paths),
                  ('asan', test_asan), ('host device', test_device)]
        for name, fn in groups:
            if not want(name):
                continue
            tg = time.time()
            print('%s:' % name)
            fn(models)
            print('  (%s: %.1f s)' % (name, time.time() - tg))
    finally:
        if own_tmp:
            shutil.rmtree(TMP, ignore_errors=True)
    return harness.summary('test_offload', t0)


if __name__ == '__main__':
    sys.exit(main())
