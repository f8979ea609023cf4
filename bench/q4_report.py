#!/usr/bin/python3
"""bench/q4_report.py: the markdown report of bench/q4.sh (speed from OUT/speed.jsonl and
OUT/stream.jsonl, accuracy from OUT/accuracy.md); see bench/q4.sh."""
import argparse
import json
import os
import statistics
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def st_header(path):
    with open(path, 'rb') as f:
        (n,) = struct.unpack('<Q', f.read(8))
        return json.loads(f.read(n))


def decode_bytes(path):
    """Bytes one batch-1 decode step reads from a checkpoint (HF or native): every layer tensor,
    the final LayerNorm, project_in/out, lm_head (the whole embedding when tied), one embedding
    row and one position row."""
    hdr = st_header(path)
    total, embed, lm_head = 0, None, None
    for name, t in hdr.items():
        if name == '__metadata__':
            continue
        nbytes = t['data_offsets'][1] - t['data_offsets'][0]
        short = name.split('decoder.', 1)[-1]
        if short == 'embed_tokens.weight':
            embed = (nbytes, t['shape'])
        elif short == 'embed_positions.weight':
            total += nbytes // t['shape'][0]
        elif short == 'lm_head.weight':
            lm_head = nbytes
        else:
            total += nbytes
    total += embed[0] // embed[1][0]
    total += lm_head if lm_head is not None else embed[0]
    return total


def load_jsonl(path):
    if not os.path.exists(path):
        return []
    out = []
    for line in open(path):
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def med(v):
    return statistics.median(v) if v else float('nan')


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', required=True)
    ap.add_argument('--shape', default='opt-1.3b')
    ap.add_argument('--group', type=int, default=64)
    ap.add_argument('--reps', type=int, default=5)
    ap.add_argument('--prompt', type=int, default=32)
    ap.add_argument('--gen', type=int, default=32)
    ap.add_argument('--seconds', type=int, default=0)
    ap.add_argument('--cache-prompt', type=int, default=1024)
    a = ap.parse_args()
    L = []
    L.append('## 4-bit weights and KV cache on the CPU (issue 6)')
    L.append('')
    L.append('Written by `sh bench/q4.sh`%s.' % (' (%d s)' % a.seconds if a.seconds else ''))
    L.append('')
    mf = os.path.join(a.out, 'machine.md')
    if os.path.exists(mf):
        L += open(mf).read().rstrip('\n').split('\n')
    L.append('')
    runs = [r for r in load_jsonl(os.path.join(a.out, 'speed.jsonl')) if r.get('result')]
    streams = load_jsonl(os.path.join(a.out, 'stream.jsonl'))
    if runs:
        mdir = os.path.join(ROOT, 'bench', 'models', a.shape)
        q4file = os.path.join(ROOT, 'bench', 'models', '%s-q4g%d.safetensors' % (a.shape, a.group))
        b16 = decode_bytes(os.path.join(mdir, 'model.safetensors'))
        b4 = decode_bytes(q4file)
        cfg = json.load(open(os.path.join(mdir, 'config.json')))
        kv = 2 * cfg['num_hidden_layers'] * cfg['hidden_size'] * 4 * (a.prompt + a.gen / 2)  # f32 cache, mean positions
        bw = {s['rep']: max(s['stream']['gbs_all_best'], s['stream']['gbs_1t_best']) for s in streams}
        bw_best = max(bw.values()) if bw else float('nan')
        names = {'fp16': 'f16 checkpoint', 'q4load': '`--compress-weight` (G %d)' % a.group, 'q4file': 'native 4-bit file (G %d)' % a.group}
        by = {c: [r for r in runs if r['cfg'] == c] for c in names}
        L.append('### Speed: batch-1 decode, synthetic %s, prompt %d + %d generated (`opt bench -b 1`)' % (a.shape, a.prompt, a.gen))
        L.append('')
        L.append('Rounds of: a streaming-read probe (bench/stream.c, 1920 MiB, 3 passes; the round\'s bound is its best of 1 and 2 '
                 'threads), then the runs in a rotating order. Decode tok/s = (G - 1) / decode latency, FlexGen\'s definition.')
        L.append('')
        L.append('| round | load avg (1 min) | stream GB/s | f16 tok/s | `--compress-weight` tok/s | 4-bit file tok/s | ratio (load / file) | 4-bit % of the round\'s bound (load / file) |')
        L.append('|---:|---:|---:|---:|---:|---:|---:|---:|')
        ratios_l, ratios_f, frac_l, frac_f = [], [], [], []
        for rep in sorted({r['rep'] for r in runs}):
            d = {r['cfg']: r['result']['decode_throughput'] for r in runs if r['rep'] == rep}
            ld = [r['load'].split()[0] for r in runs if r['rep'] == rep]
            g = bw.get(rep)
            rl = d.get('q4load', float('nan')) / d.get('fp16', float('nan'))
            rf = d.get('q4file', float('nan')) / d.get('fp16', float('nan'))
            fl = d.get('q4load', float('nan')) * b4 / 1e9 / g if g else float('nan')
            ff = d.get('q4file', float('nan')) * b4 / 1e9 / g if g else float('nan')
            ratios_l.append(rl); ratios_f.append(rf); frac_l.append(fl); frac_f.append(ff)
            L.append('| %d | %s | %.1f | %.2f | %.2f | %.2f | %.2fx / %.2fx | %.0f%% / %.0f%% |' % (
                rep, '–'.join(sorted(set(ld))), g or float('nan'), d.get('fp16', float('nan')), d.get('q4load', float('nan')),
                d.get('q4file', float('nan')), rl, rf, 100 * fl, 100 * ff))
        L.append('')
        L.append('| engine | decode tok/s median (best) | prefill tok/s median | bytes/token | effective GB/s median (best) | % of bound: median of rounds (best run / best probe) | speed vs f16: ratio of medians (best / best) |')
        L.append('|---|---:|---:|---:|---:|---:|---:|')
        f16m = med([r['result']['decode_throughput'] for r in by['fp16']])
        f16b = max([r['result']['decode_throughput'] for r in by['fp16']] or [float('nan')])
        for c, nm in names.items():
            tp = [r['result']['decode_throughput'] for r in by[c]]
            if not tp:
                continue
            pf = [r['result']['prefill_throughput'] for r in by[c]]
            nb = b16 if c == 'fp16' else b4
            fr = [t * nb / 1e9 / bw[r['rep']] for t, r in zip(tp, by[c]) if r['rep'] in bw]
            L.append('| %s | %.2f (%.2f) | %.1f | %.0f MB | %.2f (%.2f) | %.0f%% (%.0f%%) | %s |' % (
                nm, med(tp), max(tp), med(pf), nb / 1e6, med(tp) * nb / 1e9, max(tp) * nb / 1e9, 100 * med(fr),
                100 * max(tp) * nb / 1e9 / bw_best, '1' if c == 'fp16' else '%.2fx (%.2fx)' % (med(tp) / f16m, max(tp) / f16b)))
        L.append('')
        ql = med([r['result']['decode_throughput'] for r in by['q4load']])
        qf = med([r['result']['decode_throughput'] for r in by['q4file']])
        speed_ok = min(ql / f16m, qf / f16m) >= 2.5
        bound_ok = min(med(frac_l), med(frac_f)) >= 0.6
        L.append('bytes/token: what one decode step reads (every layer matrix, the tied lm_head = the whole embedding, one '
                 'embedding and one position row, the f32 vectors); 4-bit: codes plus f16 scale and min per group of %d '
                 '(%.4f bytes per weight). The f32 KV cache adds about %.0f MB per token at these lengths (not in the bound).'
                 % (a.group, (4 + a.group / 2) / a.group, kv / 1e6))
        L.append('')
        L.append('Targets (issue 6): 4-bit decode >= 2.5x the f16 speed: **%s** (median of rounds: %.2fx load-time, %.2fx file); '
                 '>= 60%% of the bandwidth bound for the compressed bytes: **%s** (median of rounds: %.0f%% / %.0f%%; best run '
                 'against the best probe: %.0f%% / %.0f%%).' % (
                     'met' if speed_ok else 'not met', med(ratios_l), med(ratios_f), 'met' if bound_ok else 'not met',
                     100 * med(frac_l), 100 * med(frac_f),
                     100 * max(r['result']['decode_throughput'] for r in by['q4load']) * b4 / 1e9 / bw_best,
                     100 * max(r['result']['decode_throughput'] for r in by['q4file']) * b4 / 1e9 / bw_best))
        extra = sorted({r['cfg'] for r in runs} - set(names), key=lambda c: int(c[len('q4load'):]))
        if extra:
            L.append('')
            L.append('Group size against speed (`--compress-weight`, same rounds; bytes per weight (4 + G/2) / G):')
            L.append('')
            L.append('| group | bytes/weight | decode tok/s median (best) | effective GB/s median | vs f16 (ratio of medians) | prefill tok/s median |')
            L.append('|---:|---:|---:|---:|---:|---:|')
            rows = [(a.group, by['q4load'])] + [(int(c[len('q4load'):]), [r for r in runs if r['cfg'] == c]) for c in extra]
            for g, rs in sorted(rows):
                tp = [r['result']['decode_throughput'] for r in rs]
                nb = b4 * ((4 + g / 2) / g) / ((4 + a.group / 2) / a.group)  # layer matrices and lm_head scale with the format
                L.append('| %d | %.4f | %.2f (%.2f) | %.2f | %.2fx | %.1f |' % (
                    g, (4 + g / 2) / g, med(tp), max(tp), med(tp) * nb / 1e9, med(tp) / f16m, med([r['result']['prefill_throughput'] for r in rs])))
        rss = {c: med([r['result']['peak_rss_gib'] for r in by[c]]) for c in names if by[c]}
        L.append('')
        L.append('Peak RSS (GiB, median): %s.' % ', '.join('%s %.2f' % (names[c], v) for c, v in rss.items()))
        cj = os.path.join(a.out, 'convert.json')
        if os.path.exists(cj):
            L.append('`opt convert --int4-weights` took %d s.' % json.load(open(cj))['convert_s'])
        L.append('')
    gv = os.path.join(a.out, 'gemv.txt')
    if os.path.exists(gv):
        L.append('### The decode GEMV alone (bench/q4_gemv.c)')
        L.append('')
        L.append('`gemm()` with M = 1 over the matrices of 24 OPT-1.3b layers (DRAM), and over one 2048 x 2048 matrix that '
                 'stays in cache (hot: the kernel\'s compute ceiling); "stream" reads the same bytes with plain AVX-512 loads '
                 'in the same run. Gw/s: billions of weights per second.')
        L.append('')
        L.append('```')
        L += open(gv).read().rstrip('\n').split('\n')
        L.append('```')
        L.append('')
    cr = [r for r in load_jsonl(os.path.join(a.out, 'cache.jsonl')) if r.get('result')]
    if cr:
        L.append('### The 4-bit KV cache: speed (synthetic opt-125m, prompt %d + 32, `opt bench`, f16 weights)' % a.cache_prompt)
        L.append('')
        L.append('| batch | cache | prefill tok/s median | decode tok/s median (best) | 4-bit / f32 decode | 4-bit / f32 prefill | n |')
        L.append('|---:|---|---:|---:|---:|---:|---:|')
        for b in sorted({r['batch'] for r in cr}):
            m = {}
            for c in ('f32', 'q4'):
                rs = [r['result'] for r in cr if r['batch'] == b and r['cache'] == c]
                if rs:
                    m[c] = (med([x['prefill_throughput'] for x in rs]), med([x['decode_throughput'] for x in rs]),
                            max(x['decode_throughput'] for x in rs), len(rs))
            for c, nm in (('f32', 'f32 (default)'), ('q4', '4-bit (`--compress-cache`, G %d)' % a.group)):
                if c in m:
                    ratio = c == 'q4' and 'f32' in m
                    L.append('| %d | %s | %.0f | %.1f (%.1f) | %s | %s | %d |' % (
                        b, nm, m[c][0], m[c][1], m[c][2], '%.2fx' % (m[c][1] / m['f32'][1]) if ratio else '', 
                        '%.2fx' % (m[c][0] / m['f32'][0]) if ratio else '', m[c][3]))
        L.append('')
    acc = os.path.join(a.out, 'accuracy.md')
    if os.path.exists(acc):
        L += open(acc).read().rstrip('\n').split('\n')
    print('\n'.join(L))


if __name__ == '__main__':
    main()
