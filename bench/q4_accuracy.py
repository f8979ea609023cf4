#!/usr/bin/python3
"""bench/q4_accuracy.py: the end-to-end accuracy table of 4-bit weights and KV cache (issue 6).

    bench/q4_accuracy.py [--opt ./opt] [--out DIR] [--shape 512x4x8x2048] [--rank 32] [--seqs 16] [--len 128]

Prints markdown on stdout (bench/q4.sh puts it into its report). For each model: `opt score --ids`
of the same token sequences with f16 weights (the reference), then with --compress-weight,
--compress-cache and both, at group sizes 32, 64 and 128: mean and max |d log-prob| over all
scored tokens, and the perplexity change. Also the relative RMS error the scheme (the numpy
implementation in tests/test_q4.py) puts on the layer matrices.

Models (f16):
  random      `opt synth --shape SHAPE`: i.i.d. Gaussian weights. Random weights are
              incompressible noise and a random network has no redundancy to absorb errors,
              so this is the worst case: errors far larger than on trained models.
  structured  the same shape with realistic structure, written here with numpy (tests/mkckpt.py's
              writer): the residual stream lives in a rank-R subspace (token and position
              embeddings span it), every matrix is low-rank and aligned with the subspace it
              reads from and writes to (q/k/v/fc1 read it, out_proj/fc2 write into it; out_proj
              reads v's output space, fc2 fc1's), plus i.i.d. noise of 10% of the entries' RMS;
              activations of about unit variance (attention logits of O(1)), and output logits
              of standard deviation ~3 (perplexity ~50 on its own samples).
              Per-weight 4-bit error is the same ~8-10% of the RMS (a group of Gaussian-like
              values spans ~4-5 sigma in 15 steps); what changes is how much of it reaches the
              output, as in trained models whose activations occupy few directions.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))
import mkckpt  # noqa: E402
import test_q4  # noqa: E402  (the numpy scheme)

GROUPS = (32, 64, 128)


def run(argv):
    env = dict(os.environ, OPT_DEVICE='cpu')
    env.pop('OPT_SIMD', None)
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    if p.returncode != 0:
        sys.exit('q4_accuracy: %s failed: %s' % (' '.join(argv), p.stderr.decode()[-600:]))
    return p.stdout.decode()


def logprobs(text):
    return np.concatenate([np.array([float(v) for v in l.split()]) for l in text.split('\n') if l.strip()])


def structured_model(path, shape, rank, seed):
    H, L, A, F = (int(x) for x in shape.split('x'))
    a = types.SimpleNamespace(hidden=H, layers=L, heads=A, ffn=F, vocab=50272, max_pos=2048, embed_dim=0, post_ln=False,
                              no_final_ln=False, no_bias=False, no_ln_affine=False, dtype='f16', tie=True, seed=seed,
                              prefix='model.decoder.', format='safetensors', shards=1)
    rng = np.random.default_rng(seed)
    w = dict(mkckpt.make_weights(a))  # LayerNorms and biases as mkckpt makes them
    noise = 0.1

    def basis(n, r):
        q, _ = np.linalg.qr(rng.standard_normal((n, r)))
        return q.astype(np.float32)

    def lowrank(n_out, n_in, u, v):
        """u (n_out, r), v (n_in, r) orthonormal: u diag(s) v^T, plus noise; outputs of about
        unit variance for inputs of about unit variance per element that lie in span(v)"""
        r = u.shape[1]
        s = rng.uniform(0.5, 1.5, r).astype(np.float32) * np.float32(np.sqrt(n_out / n_in))
        m = (u * s) @ v.T
        rms = np.sqrt(np.mean(m * m))
        return (m + rng.standard_normal((n_out, n_in)).astype(np.float32) * np.float32(noise * rms)).astype(np.float32)

    B = basis(H, rank)  # the residual stream's subspace
    # tied embedding: logits = e . LN(h) with |LN(h)| ~ sqrt(H) in span(B): entries of RMS
    # 3 sqrt(R) / H give logits of standard deviation ~3 (a peaked, trained-like distribution:
    # perplexity ~50 on its own samples); positions at the same scale
    s_e = 3.0 * np.sqrt(rank) / H
    emb = rng.standard_normal((a.vocab, rank)).astype(np.float32) @ B.T
    emb *= np.float32(s_e / np.sqrt(np.mean(emb * emb)))
    w['decoder.embed_tokens.weight'] = emb + rng.standard_normal(emb.shape).astype(np.float32) * np.float32(noise * s_e)
    pos = rng.standard_normal((a.max_pos + 2, rank)).astype(np.float32) @ B.T
    w['decoder.embed_positions.weight'] = pos * np.float32(s_e / np.sqrt(np.mean(pos * pos)))
    for i in range(L):
        p = 'decoder.layers.%d.' % i
        uq, uk, uv, u1 = basis(H, rank), basis(H, rank), basis(H, rank), basis(F, rank)
        w[p + 'self_attn.q_proj.weight'] = lowrank(H, H, uq, B)
        w[p + 'self_attn.k_proj.weight'] = lowrank(H, H, uk, B)
        w[p + 'self_attn.v_proj.weight'] = lowrank(H, H, uv, B)
        w[p + 'self_attn.out_proj.weight'] = lowrank(H, H, B, uv) * np.float32(0.5)
        w[p + 'fc1.weight'] = lowrank(F, H, u1, B)
        w[p + 'fc2.weight'] = lowrank(H, F, B, u1) * np.float32(0.5)
    tensors = {mkckpt.full_name(k, a.prefix): ('F16', mkckpt.from_f32(v, 'F16')) for k, v in w.items()}
    os.makedirs(path, exist_ok=True)
    mkckpt.write_config(path, mkckpt.make_config(a))
    mkckpt.copy_tokenizer(path)
    mkckpt.write_weights(path, tensors)
    return path


def weight_error(path, G):
    st = test_q4.SafeTensors(os.path.join(path, 'model.safetensors'))
    num = den = 0.0
    for n in st.names():
        if '.layers.' in n and n.endswith('.weight') and len(st.info(n)['shape']) == 2:
            W = st.f32(n)
            D = test_q4.q4_dequantize(test_q4.q4_quantize(W, G), W.shape[1], G)
            num += float(np.sum((W.astype(np.float64) - D) ** 2))
            den += float(np.sum(W.astype(np.float64) ** 2))
    return np.sqrt(num / den)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--opt', default=os.path.join(ROOT, 'opt'))
    ap.add_argument('--out', default=None)
    ap.add_argument('--shape', default='512x4x8x2048')
    ap.add_argument('--rank', type=int, default=32)
    ap.add_argument('--seqs', type=int, default=16)
    ap.add_argument('--len', type=int, default=128)
    a = ap.parse_args()
    out = a.out or tempfile.mkdtemp(prefix='q4acc-')
    os.makedirs(out, exist_ok=True)
    rnd = os.path.join(out, 'acc-random')
    if not os.path.isfile(os.path.join(rnd, 'model.safetensors')):
        run([a.opt, 'synth', '--shape', a.shape, '--dtype', 'f16', '--seed', '7', '-o', rnd])
    stru = os.path.join(out, 'acc-structured-r%d' % a.rank)
    if not os.path.isfile(os.path.join(stru, 'model.safetensors')):
        structured_model(stru, a.shape, a.rank, 7)
    rng = np.random.default_rng(11)
    prompts = os.path.join(out, 'acc-prompts.txt')
    with open(prompts, 'w') as f:
        for _ in range(a.seqs):
            f.write('2 %d\n' % rng.integers(3, 50272))

    def samples(m, name):
        """token sequences the f16 model itself samples (temperature 1): text it finds likely, as
        real text is for a trained model"""
        ids = os.path.join(out, 'acc-ids-%s.txt' % name)
        gen = run([a.opt, 'generate', '--ids', '-m', m, '-f', prompts, '-n', str(a.len - 1), '--temperature', '1',
                   '--seed', '5', '--ignore-eos'])
        with open(ids, 'w') as f:
            for p, g in zip(open(prompts).read().split('\n')[:a.seqs], gen.split('\n')[:a.seqs]):
                f.write(p + ' ' + g.strip() + '\n')
        return ids
    H = int(a.shape.split('x')[0]) // int(a.shape.split('x')[2])
    L = []
    L.append('### Accuracy: `opt score` against the f16 run (%s, %d sequences x %d tokens sampled from each f16 model)' % (a.shape, a.seqs, a.len))
    L.append('')
    L.append('|d log-prob| over all %d scored tokens; perplexity change relative to the f16 run. The KV cache\'s group is '
             'min(G, head_dim) = min(G, %d), so its rows for G 64 and 128 are the same. Weight error: RMS of (W - dequantized) '
             'over RMS of W, all layer matrices (numpy, tests/test_q4.py\'s implementation).' % (a.seqs * a.len, H))
    L.append('')
    L.append('| model | f16 perplexity | 4-bit | G | mean \\|Δ log-prob\\| | max \\|Δ log-prob\\| | perplexity change | weight RMS error |')
    L.append('|---|---:|---|---:|---:|---:|---:|---:|')
    res = {}
    for label, m in (('random (`opt synth`)', rnd), ('structured (rank %d + 10%% noise)' % a.rank, stru)):
        ids = samples(m, os.path.basename(m))
        ref = logprobs(run([a.opt, 'score', '--ids', '-m', m, '-f', ids]))
        ppl0 = float(np.exp(-ref.mean()))
        for G in GROUPS:
            werr = weight_error(m, G)
            for mode, flags in (('weights', ['--compress-weight']), ('KV cache', ['--compress-cache']),
                                ('both', ['--compress-weight', '--compress-cache'])):
                lp = logprobs(run([a.opt, 'score', '--ids', '-m', m, '-f', ids, '--group-size', str(G)] + flags))
                d = np.abs(lp - ref)
                ppl = float(np.exp(-lp.mean()))
                res[(m, mode, G)] = (d.mean(), ppl / ppl0 - 1)
                L.append('| %s | %.1f | %s | %d | %.4f | %.3f | %+.2f%% | %s |' % (
                    label, ppl0, mode, G, d.mean(), d.max(), 100 * (ppl / ppl0 - 1), '%.2f%%' % (100 * werr) if mode != 'KV cache' else '—'))
    L.append('')
    w = [res[(rnd, 'weights', G)][0] / res[(stru, 'weights', G)][0] for G in GROUPS]
    c = [res[(rnd, 'KV cache', G)][0] / res[(stru, 'KV cache', G)][0] for G in (32, 64)]
    L.append('Random weights are incompressible noise and a random network has no redundancy that absorbs the error, so its '
             'figures are far worse than a trained model\'s would be. The structured model (activations in a few directions, '
             'as in trained models) shows the scheme behaving as expected: the same per-weight error (last column), but '
             '%.0f-%.0fx less of it reaching the log-probabilities with 4-bit weights and %.0f-%.0fx less with the 4-bit cache; '
             'perplexity within %.1f%% of f16 with both; smaller groups more accurate (weights: G 32 %.4f, 64 %.4f, 128 %.4f).'
             % (min(w), max(w), min(c), max(c), 100 * max(abs(res[(stru, 'both', G)][1]) for G in GROUPS),
                res[(stru, 'weights', 32)][0], res[(stru, 'weights', 64)][0], res[(stru, 'weights', 128)][0]))
    print('\n'.join(L))


if __name__ == '__main__':
    main()
