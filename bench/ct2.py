#!/usr/bin/python3
"""bench/ct2.py: the CTranslate2 side of bench/ct2.sh, and its report.

  ct2.py run CT2DIR --prompt-len P --gen-len G -b B --compute-type T --threads N --vocab V
      One JSON line as `opt bench --json` prints it (prefill_throughput, decode_throughput,
      total_throughput, FlexGen's definitions), for the same prompt ids opt bench makes:
      BOS then splitmix64(42) draws, 4 + r % min(50000, V - 4), one stream across the batch.
      Prefill is timed as a generation of one token, the whole run as one of G tokens (EOS
      forbidden: min_length), decode is their difference.
  ct2.py report RAW.jsonl
      The markdown section: medians over rounds per (model, mode, workload) and each opt
      mode's ratio to the best CTranslate2 setting of the same model and workload."""
import json
import statistics
import sys
import time


def splitmix64(s):
    s = (s + 0x9E3779B97F4A7C15) & (2**64 - 1)
    z = s
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return s, z ^ (z >> 31)


def bench_prompts(B, P, vocab):
    r, out = 42, []
    for _ in range(B):
        ids = [2]
        for _ in range(1, P):
            r, z = splitmix64(r)
            ids.append(4 + z % (50000 if vocab > 50004 else vocab - 4))
        out.append(ids)
    return out


def run(a):
    import ctranslate2
    gen = ctranslate2.Generator(a['dir'], device='cpu', compute_type=a['compute_type'], intra_threads=a['threads'])
    vocab = json.load(open(a['dir'] + '/vocabulary.json'))
    B, P, G = a['b'], a['prompt_len'], a['gen_len']
    toks = [[vocab[i] for i in p] for p in bench_prompts(B, P, len(vocab))]

    def timed(n):
        t = time.perf_counter()
        gen.generate_batch(toks, max_length=n, min_length=n, sampling_topk=1, include_prompt_in_result=False)
        return time.perf_counter() - t

    gen.generate_batch([toks[0][:8]], max_length=2, sampling_topk=1)  # warm up, as opt bench does
    pre = timed(1)
    dec = timed(G) - pre if G > 1 else 0.0
    dec = max(dec, 1e-9)
    print(json.dumps({'engine': 'ct2', 'compute_type': a['compute_type'], 'prompt_len': P, 'gen_len': G, 'batch': B,
                      'threads': a['threads'], 'prefill_latency_s': pre, 'prefill_throughput': B * P / pre,
                      'decode_latency_s': dec, 'decode_throughput': B * (G - 1) / dec if G > 1 else 0,
                      'total_throughput': B * G / (pre + dec)}))


COLUMNS = [('prefill', 'prefill 1x512', 'prefill_throughput'), ('decode', 'decode b1 (128+32)', 'decode_throughput'),
           ('total', 'total 16x128+32', 'total_throughput')]


def report(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    med = {}
    for r in rows:
        key = (r['shape'], r['mode'], r['workload'])
        med.setdefault(key, []).append(r[dict((c[0], c[2]) for c in COLUMNS)[r['workload']]])
    med = {k: statistics.median(v) for k, v in med.items()}
    shapes = sorted({k[0] for k in med}, key=lambda s: [k[0] for k in med].index(s))
    modes = []
    for r in rows:
        if r['mode'] not in modes:
            modes.append(r['mode'])
    out = []
    for shape in shapes:
        best = {}
        for (s, mode, w), v in med.items():
            if s == shape and mode.startswith('ct2'):
                if v > best.get(w, (0, ''))[0]:
                    best[w] = (v, mode)
        out.append('\n%s: throughput in tokens/s (median of rounds), and opt / the best CTranslate2 setting\n' % shape)
        out.append('| mode | ' + ' | '.join(c[1] for c in COLUMNS) + ' |')
        out.append('|---|' + '---:|' * len(COLUMNS))
        for mode in modes:
            cells = []
            for w, _, _ in COLUMNS:
                v = med.get((shape, mode, w))
                if v is None:
                    cells.append('-')
                elif mode.startswith('ct2'):
                    cells.append('%.1f' % v)
                else:
                    b = best.get(w)
                    cells.append('%.1f (**%.2fx**)' % (v, v / b[0]) if b else '%.1f' % v)
            out.append('| %s | %s |' % (mode, ' | '.join(cells)))
        out.append('\nbest CTranslate2 setting per column: ' + ', '.join('%s %s' % (w, best[w][1]) for w, _, _ in COLUMNS if w in best))
    print('\n'.join(out))


if __name__ == '__main__':
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    if sys.argv[1] == 'report':
        report(sys.argv[2])
    elif sys.argv[1] == 'run':
        a, args = {'dir': sys.argv[2]}, sys.argv[3:]
        names = {'--prompt-len': 'prompt_len', '--gen-len': 'gen_len', '-b': 'b', '--compute-type': 'compute_type',
                 '--threads': 'threads'}
        for i in range(0, len(args), 2):
            a[names[args[i]]] = args[i + 1] if args[i] == '--compute-type' else int(args[i + 1])
        run(a)
    else:
        sys.exit(__doc__)
