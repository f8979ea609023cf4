"""plan_flexgen_lp.py: FlexGen's own LP cost formulas (experimental/cost_model.py, as summarized in
the FlexGen paper (Sheng et al., ICML 2023), section 4; written from those formulas, not from its code) evaluated
for a fixed policy, to put beside `opt plan --eval` in bench/plan_t4.md. Their LP models no cache
compression and divides weight bytes by 4 for 4-bit weights; we follow it in both.

usage: plan_flexgen_lp.py   (prints FlexGen's published T4 policies with their LP's prediction)
"""
import math

GB, T = 2.0 ** 30, 1e12
C = dict(ctog=12.89 * GB, gtoc_cache=0.97 * GB, gtoc_hidden=4.82 * GB, dtoc=0.473 * GB,
         ctod_cache_p=0.746 * GB, ctod_hidden_p=2.015 * GB, ctod_g=2.015 * GB,
         mm_p=21.24 * T, mm_g=4.3 * T, bmm_p=9.97 * T, bmm_g=0.079 * T, cpu=0.0123 * T,
         c1=0.0168, c2=0.0328, c3=0.0621)
SHAPES = {"opt-6.7b": (4096, 16384, 32), "opt-30b": (7168, 28672, 48), "opt-175b": (12288, 49152, 96)}


def flexgen_lp_time(model, pct, gbs, ngb, compress_w=False, s=512, n=32):
    """Seconds for one block under FlexGen's LP formulas (fractions from percents)."""
    h1, h2, l = SHAPES[model]
    wg, wc, cg, cc, hg, hc = (p / 100 for p in pct)
    wn, cn, hn = 1 - wg - wc, 1 - cg - cc, 1 - hg - hc
    bls = gbs * ngb
    wi = 8 * h1 * h1 + 4 * h1 * h2
    if compress_w:
        wi /= 4
    ctogp = (wi * (wc + wn) + 2 * s * h1 * bls * (hc + hn)) / C["ctog"]
    gtocp = 4 * (s + 1) * h1 * bls * (cc + cn) / C["gtoc_cache"] + 2 * s * h1 * bls * (hc + hn) / C["gtoc_hidden"]
    dtocp = (wi * wn + 2 * s * h1 * bls * hn) / C["dtoc"]
    ctodp = 4 * bls * (s + 1) * h1 * cn / C["ctod_cache_p"] + 2 * s * h1 * bls * hn / C["ctod_hidden_p"]
    compp = bls * (8 * s * h1 * h1 + 4 * s * h1 * h2) / C["mm_p"] + 4 * bls * s * s * h1 / C["bmm_p"]
    tpre = max(ctogp + dtocp, gtocp + ctodp, compp)
    a, b = max(0, math.log2(64 / gbs)), max(0, math.log2(4096 / h1))
    cpu = C["cpu"] * max(0.1, 1 + C["c1"] * a * b - C["c2"] * a - C["c3"] * b)
    ctogg = (wi * (wc + wn) + 2 * h1 * bls * (hc + hn)) / C["ctog"]
    gtocg = 2 * h1 * bls * (hc + hn) / C["gtoc_hidden"]
    dtocg = (4 * bls * (s + n / 2) * h1 * cn + 2 * h1 * bls * hn) / C["dtoc"] + wi * wn / (0.95 * C["dtoc"])
    ctodg = (4 * bls * h1 * cn + 2 * h1 * bls * hn) / C["ctod_g"]
    compg = (bls * (8 * h1 * h1 + 4 * h1 * h2) / C["mm_g"] + 4 * bls * (s + n / 2) * h1 * cg / C["bmm_g"]
             + 4 * bls * (s + n / 2) * h1 * (cc + cn) / cpu)
    tgen = ctogg + max(gtocg, dtocg, ctodg, compg)
    return tpre * l + tgen * (n - 1) * l


if __name__ == "__main__":
    published = [  # flexgen.md sections 8 and 9
        ("opt-6.7b", (100, 0, 100, 0, 100, 0), 2, 1, False, 25.26),
        ("opt-6.7b", (100, 0, 100, 0, 100, 0), 72, 1, True, 29.12),
        ("opt-30b", (20, 80, 0, 100, 0, 100), 48, 3, False, 7.32),
        ("opt-30b", (0, 100, 0, 100, 0, 100), 64, 8, False, 8.38),  # cache compression: not in their LP
        ("opt-175b", (0, 50, 0, 0, 0, 100), 32, 8, False, 0.69),
        ("opt-175b", (0, 100, 0, 100, 0, 100), 48, 3, True, 1.12),
    ]
    for model, pct, gbs, ngb, cw, meas in published:
        t = flexgen_lp_time(model, pct, gbs, ngb, cw)
        print("%-9s %-24s %3d x %-2d %s  FlexGen's LP %7.3f token/s   measured %5.2f" %
              (model, " ".join(map(str, pct)), gbs, ngb, "4-bit w" if cw else "       ", gbs * ngb * 32 / t, meas))
