#!/usr/bin/python3
"""lp_gen.py DIR [SEED]: writes a suite of linear programs as free MPS files into DIR.

Every LP is  min c'x  s.t.  rl <= A x <= ru,  lo <= x <= hi  (any bound may be infinite); the
writer turns each row into an N/L/G/E row, with RANGES where both ends are finite. What a problem
is, is known by construction, and DIR/expect.txt records it, one line per file:

    name status objective

status is optimal, infeasible or unbounded; objective is the known optimum or '-' when only a
solver can tell. How the cases are built:
  - optimal, planted: a point x0 is made feasible with many rows and bounds tight at it (a
    degenerate vertex), and c = A'y + z with the multipliers y, z living on the tight rows and
    bounds only, so x0 is optimal by complementary slackness and the optimum is c'x0.
  - optimal, dual: x0 feasible and c = A'y + z with random sign-correct multipliers: the LP is
    feasible and bounded, the optimum unknown.
  - infeasible: a feasible system plus a row that a nonnegative combination of the others
    contradicts (Farkas), or a row that the box cannot reach, or inconsistent equalities.
  - unbounded: x0 feasible plus a direction d with A d inside the recession cone of the rows and
    bounds, and c'd < 0.
  - assignment and transportation problems: the classic degenerate LPs.
  - cost-model LPs shaped like FlexGen's, with bytes, seconds and flops in one matrix.
plus textbook problems with published optima (Klee-Minty cubes, Beale's and Chvatal's cycling
examples, Chvatal's two-phase, infeasible and unbounded examples, a degenerate apex).
"""
import itertools
import os
import sys

import numpy as np

INF = float("inf")


# ---- MPS writer ----

def num(v):
    """Shortest text that reads back as the same double."""
    v = float(v)
    return str(int(v)) if v == int(v) and abs(v) < 1e15 else repr(v)


def write_mps(path, name, A, rl, ru, c, lo, hi, rng=None, objconst=0.0):
    """Writes min c'x s.t. rl <= A x <= ru, lo <= x <= hi. rng picks among the equivalent range
    encodings (L, G, E with R > 0, E with R < 0) so that all of them are exercised."""
    m, n = A.shape
    rows, ranges = [], []
    for i in range(m):
        if rl[i] == ru[i]:
            rows.append(("E", rl[i]))
        elif rl[i] == -INF:
            rows.append(("L", ru[i]))
        elif ru[i] == INF:
            rows.append(("G", rl[i]))
        else:  # two-sided: a range
            k = rng.integers(4) if rng is not None else 0
            w = ru[i] - rl[i]
            t, b, r = [("L", ru[i], w), ("G", rl[i], w), ("E", rl[i], w), ("E", ru[i], -w)][k]
            rows.append((t, b))
            ranges.append((i, r))
    out = ["NAME %s" % name, "ROWS", " N COST"]
    out += [" %s R%d" % (t, i + 1) for i, (t, _) in enumerate(rows)]
    out.append("COLUMNS")
    for j in range(n):
        ents = [("COST", c[j])] if c[j] != 0 else []
        ents += [("R%d" % (i + 1), A[i, j]) for i in range(m) if A[i, j] != 0]
        if not ents:
            ents = [("COST", 0.0)]  # a column must appear somewhere to exist
        for k in range(0, len(ents), 2):  # one or two entries per line, both forms occur
            pair = ents[k:k + 2]
            out.append(" X%d " % (j + 1) + " ".join("%s %s" % (r, num(v)) for r, v in pair))
    out.append("RHS")
    if objconst:
        out.append(" RHS COST %s" % num(objconst))
    out += [" RHS R%d %s" % (i + 1, num(b)) for i, (_, b) in enumerate(rows) if b != 0]
    if ranges:
        out.append("RANGES")
        out += [" RNG R%d %s" % (i + 1, num(r)) for i, r in ranges]
    bnd = []
    for j in range(n):
        x = "X%d" % (j + 1)
        if lo[j] == hi[j]:
            bnd.append(" FX BND %s %s" % (x, num(lo[j])))
        elif lo[j] == -INF and hi[j] == INF:
            bnd.append(" FR BND %s" % x)
        else:
            if lo[j] == -INF:
                bnd.append(" MI BND %s" % x)
            elif lo[j] != 0:
                bnd.append(" LO BND %s %s" % (x, num(lo[j])))
            if hi[j] != INF:
                bnd.append(" UP BND %s %s" % (x, num(hi[j])))
    if bnd:
        out.append("BOUNDS")
        out += bnd
    out.append("ENDATA")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


# ---- random building blocks ----

KINDS = ["std", "lo", "up", "box", "free", "fixed"]


def make_bounds(rng, n, mix):
    """Variable bounds of random kinds (mix: probabilities of KINDS) and a point x0 inside them,
    often on a bound so that vertices are degenerate."""
    lo, hi, x0 = np.zeros(n), np.full(n, INF), np.zeros(n)
    kinds = rng.choice(KINDS, size=n, p=mix)
    for j, k in enumerate(kinds):
        a = float(rng.integers(-5, 6))
        w = float(rng.integers(1, 7))
        at = rng.random() < 0.4
        if k == "std":
            x0[j] = 0.0 if at else float(rng.integers(1, 5))
        elif k == "lo":
            lo[j], x0[j] = a, a if at else a + rng.integers(1, 5)
        elif k == "up":
            lo[j], hi[j], x0[j] = -INF, a, a if at else a - rng.integers(1, 5)
        elif k == "box":
            lo[j], hi[j] = a, a + w
            x0[j] = rng.choice([a, a + w]) if at else a + rng.integers(0, int(w) + 1)
        elif k == "free":
            lo[j], hi[j], x0[j] = -INF, INF, float(rng.integers(-4, 5))
        else:
            lo[j] = hi[j] = x0[j] = a
    return lo, hi, x0, kinds


def make_matrix(rng, m, n, density, ints):
    if ints:
        A = rng.integers(-5, 6, size=(m, n)).astype(float)
    else:
        A = np.round(rng.normal(0, 2, size=(m, n)), 3)
    A[rng.random((m, n)) > density] = 0
    return A


def make_rows(rng, A, x0, pE, pL, ptight, ranges=False):
    """Row intervals around A x0: tight (active at x0) with probability ptight."""
    m = A.shape[0]
    act = A @ x0
    rl, ru = np.full(m, -INF), np.full(m, INF)
    for i in range(m):
        u = rng.random()
        gap = 0.0 if rng.random() < ptight else float(rng.integers(1, 6))
        if u < pE:
            rl[i] = ru[i] = act[i]
        elif u < pE + pL:
            ru[i] = act[i] + gap
        else:
            rl[i] = act[i] - gap
        if ranges and rng.random() < 0.5 and rl[i] != ru[i]:  # close the open side
            w = float(rng.integers(0, 6)) if rng.random() < 0.8 else 0.0
            if rl[i] == -INF:
                rl[i] = min(act[i], ru[i]) - w
            else:
                ru[i] = max(act[i], rl[i]) + w
    return rl, ru


def add_redundant(rng, A, rl, ru, count):
    """Appends scaled copies and sums of rows: linearly dependent rows, equalities included."""
    for _ in range(count):
        m = A.shape[0]
        i, k = rng.integers(m), rng.integers(m)
        s = float(rng.integers(1, 4))
        if rng.random() < 0.5 or m < 2 or not (rl[i] == ru[i] and rl[k] == ru[k]):
            row, lo_, hi_ = s * A[i], s * rl[i], s * ru[i]  # scaled copy, same interval
        else:  # sum of two equalities is an equality
            row, lo_ = A[i] + A[k], rl[i] + rl[k]
            hi_ = lo_
        A = np.vstack([A, row])
        rl, ru = np.append(rl, lo_), np.append(ru, hi_)
    return A, rl, ru


def sign_range(l, u):
    """Allowed sign of a multiplier for l <= v <= u: +1 only, -1 only, 0 (any), or None."""
    if l == u:
        return 0
    if l > -INF and u < INF:
        return 0
    if l > -INF:
        return 1
    if u < INF:
        return -1
    return None


def multiplier(rng, l, u, v=None, ints=True):
    """A random sign-correct multiplier for the constraint l <= v <= u; when the value v is given,
    nonzero only where the constraint is active at v (complementary slackness)."""
    s = sign_range(l, u)
    if s is None or rng.random() < 0.3:
        return 0.0
    if v is not None:
        if v == l and v == u:
            s = 0
        elif v == l:
            s = 1
        elif v == u:
            s = -1
        else:
            return 0.0
    mag = float(rng.integers(1, 6)) if ints else round(rng.uniform(0.1, 5), 3)
    if s == 0:
        return mag if rng.random() < 0.5 else -mag
    return s * mag


def make_cost(rng, A, rl, ru, lo, hi, x0=None, ints=True):
    """c = A'y + z, dual feasible; with x0, optimal at x0."""
    m, n = A.shape
    act = A @ x0 if x0 is not None else [None] * m
    y = np.array([multiplier(rng, rl[i], ru[i], act[i], ints) for i in range(m)])
    z = np.array([multiplier(rng, lo[j], hi[j], None if x0 is None else x0[j], ints) for j in range(n)])
    return A.T @ y + z if m else z


def rescale(rng, A, rl, ru, c, lo, hi, spread):
    """Scales rows and columns by powers of ten up to 10**spread: same LP, worse numbers."""
    m, n = A.shape
    r = 10.0 ** rng.integers(-spread, spread + 1, size=m)
    s = 10.0 ** rng.integers(-spread, spread + 1, size=n)
    A = A * r[:, None] * s[None, :]
    return A, rl * r, ru * r, c * s, lo / s, hi / s


def size(rng, band):
    lo, hi = {"tiny": (1, 4), "small": (5, 15), "medium": (16, 35), "large": (36, 60)}[band]
    return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))


MIX_STD = [0.5, 0.15, 0.1, 0.1, 0.1, 0.05]
MIX_FREE = [0.1, 0.05, 0.05, 0.1, 0.6, 0.1]
MIX_FIXED = [0.3, 0.1, 0.1, 0.1, 0.1, 0.3]
MIX_BOX = [0, 0, 0, 0.9, 0, 0.1]


# ---- problem families ----

def gen_optimal(rng, band, planted, mix=MIX_STD, pE=0.2, ints=True, ranges=False, redundant=0, spread=0):
    m, n = size(rng, band)
    lo, hi, x0, _ = make_bounds(rng, n, mix)
    A = make_matrix(rng, m, n, rng.uniform(0.3, 1.0), ints)
    rl, ru = make_rows(rng, A, x0, pE, 0.4, 0.6 if planted else 0.3, ranges)
    A, rl, ru = add_redundant(rng, A, rl, ru, redundant)
    c = make_cost(rng, A, rl, ru, lo, hi, x0 if planted else None, ints)
    obj = float(c @ x0) if planted else None
    if spread:
        A, rl, ru, c, lo, hi = rescale(rng, A, rl, ru, c, lo, hi, spread)
    return (A, rl, ru, c, lo, hi), "optimal", obj


def gen_boxed(rng, band):
    """All variables boxed: any cost has an optimum."""
    m, n = size(rng, band)
    lo, hi, x0, _ = make_bounds(rng, n, MIX_BOX)
    A = make_matrix(rng, m, n, rng.uniform(0.3, 1.0), rng.random() < 0.5)
    rl, ru = make_rows(rng, A, x0, 0.2, 0.4, 0.3)
    return (A, rl, ru, np.round(rng.normal(0, 3, n), 2), lo, hi), "optimal", None


def gen_infeasible(rng, band, how):
    m, n = size(rng, band)
    mix = MIX_BOX if how == "box" else MIX_STD
    lo, hi, x0, _ = make_bounds(rng, n, mix)
    ints = rng.random() < 0.6
    A = make_matrix(rng, m, n, rng.uniform(0.3, 1.0), ints)
    rl, ru = make_rows(rng, A, x0, 0.3 if how == "eq" else 0.2, 0.4, 0.3)
    delta = float(rng.integers(1, 4))
    if how == "farkas":  # g = sum y_i a_i with g x >= beta on the feasible set, then g x <= beta - delta
        g, beta = np.zeros(n), 0.0
        for i in rng.choice(m, size=min(m, int(rng.integers(1, 4))), replace=False):
            y = float(rng.integers(1, 4))
            if rl[i] > -INF:
                g, beta = g + y * A[i], beta + y * rl[i]
            else:
                g, beta = g - y * A[i], beta - y * ru[i]
        # (g may be all zero: then beta <= 0 and the empty row 0 <= beta - delta is infeasible)
        A, rl, ru = np.vstack([A, g]), np.append(rl, -INF), np.append(ru, beta - delta)
    elif how == "box":  # a row asking more than the box can give
        a = make_matrix(rng, 1, n, 1.0, True)[0]
        a[lo == hi] = 0
        if not a.any():
            a[0] = 1.0
        best = float(np.sum(np.maximum(a * lo, a * hi)))
        A, rl, ru = np.vstack([A, a]), np.append(rl, best + delta), np.append(ru, INF)
    else:  # inconsistent equalities: e_i + e_k = r_i + r_k + delta
        i, k = rng.choice(m, size=2) if m > 1 else (0, 0)
        A[i], rl[i], ru[i] = A[i], A[i] @ x0, A[i] @ x0
        A[k], rl[k], ru[k] = A[k], A[k] @ x0, A[k] @ x0
        if not (A[i] + A[k]).any():
            A[i, rng.integers(n)] += 1.0
            rl[i] = ru[i] = A[i] @ x0
        v = rl[i] + rl[k] + delta
        A, rl, ru = np.vstack([A, A[i] + A[k]]), np.append(rl, v), np.append(ru, v)
    perm = rng.permutation(A.shape[0])  # hide the contradiction among the rows
    c = make_matrix(rng, 1, n, 0.8, ints)[0]
    return (A[perm], rl[perm], ru[perm], c, lo, hi), "infeasible", None


def gen_unbounded(rng, band, mix=MIX_STD):
    m, n = size(rng, band)
    lo, hi, x0, kinds = make_bounds(rng, n, mix)
    d = np.zeros(n)
    for j, k in enumerate(kinds):
        if k in ("std", "lo"):
            d[j] = float(rng.integers(0, 3))
        elif k == "up":
            d[j] = -float(rng.integers(0, 3))
        elif k == "free":
            d[j] = float(rng.integers(-2, 3))
    if not d.any():  # make one variable a free ray
        j = int(rng.integers(n))
        lo[j], hi[j], d[j] = -INF, INF, 1.0
    ints = rng.random() < 0.6
    A = make_matrix(rng, m, n, rng.uniform(0.3, 1.0), ints)
    pE = 0.2
    rl, ru = make_rows(rng, A, x0, pE, 0.4, 0.3)
    for i in range(m):
        s = A[i] @ d
        if rl[i] == ru[i] and s != 0:  # equality: make a_i orthogonal to d
            k = int(np.flatnonzero(d)[0])
            A[i, k] -= s / d[k]
            rl[i] = ru[i] = A[i] @ x0
        elif (s > 0 and ru[i] < INF) or (s < 0 and rl[i] > -INF):  # d must not leave the row
            act = A[i] @ x0
            rl[i], ru[i] = (act - float(rng.integers(0, 3)), INF) if s > 0 else (-INF, act + float(rng.integers(0, 3)))
    c = make_matrix(rng, 1, n, 0.8, ints)[0]
    if c @ d >= 0:
        c = c - (c @ d + 1.0) / (d @ d) * d
    return (A, rl, ru, c, lo, hi), "unbounded", None


def gen_assignment(rng):
    """The assignment LP: n! vertices, each with n of its 2n-1 basic variables at 0, so pivots
    stall (this is where Bland's rule gets exercised). Integral, so brute force gives the optimum."""
    n = int(rng.integers(3, 8))
    A = np.zeros((2 * n, n * n))
    for i in range(n):
        A[i, i * n:(i + 1) * n] = 1
        A[n + i, i::n] = 1
    C = rng.integers(1, 10, size=(n, n)).astype(float)
    best = min(sum(C[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
    return (A, np.ones(2 * n), np.ones(2 * n), C.ravel(), np.zeros(n * n), np.full(n * n, INF)), "optimal", float(best)


def gen_transport(rng):
    """A transportation LP whose partial supply sums hit partial demand sums: degenerate."""
    s, d = int(rng.integers(3, 9)), int(rng.integers(3, 9))
    sup = rng.integers(1, 5, size=s).astype(float)
    tot = int(sup.sum()) + d  # demands: a random split of the total supply plus d spare units
    cut = np.sort(rng.choice(np.arange(1, tot), size=d - 1, replace=False))
    dem = np.diff(np.concatenate([[0], cut, [tot]])).astype(float)
    sup[-1] += d
    A = np.zeros((s + d, s * d))
    for i in range(s):
        A[i, i * d:(i + 1) * d] = 1
        A[s:, i * d:(i + 1) * d] += np.eye(d)
    rl = np.concatenate([np.full(s, -INF), dem])
    ru = np.concatenate([sup, np.full(d, INF)])
    c = rng.integers(1, 20, size=s * d).astype(float)
    return (A, rl, ru, c, np.zeros(s * d), np.full(s * d, INF)), "optimal", None


def gen_costmodel(rng, feasible):
    """An LP shaped like FlexGen's offloading cost model (phase times, transfer terms, placement
    fractions of weights, cache and hidden states on GPU/CPU/disk) in raw units, so one matrix
    holds bytes (1e11) next to seconds per byte (1e-10): the numbers lp.c will really see.
    Infeasible when the three memory capacities together are below the weight bytes."""
    h1 = float(rng.choice([2048, 4096, 5120, 7168, 9216, 12288]))
    h2, l = 4 * h1, float(rng.choice([24, 32, 40, 48, 64, 96]))
    s, n = float(rng.choice([128, 512, 1024])), float(rng.choice([8, 32, 128]))
    bls = float(rng.choice([1, 4, 16, 32]) * rng.integers(1, 12))
    ctog, gtoc_c, gtoc_h, dtoc, ctod_c, ctod_h = rng.uniform([8, .5, 2, .2, .3, 1], [25, 2, 8, 3, 2, 4]) * 2.0 ** 30
    mm_p, mm_g, bmm_p, bmm_g, cpu = rng.uniform([10, 2, 5, .05, .005], [300, 100, 100, 2, .05]) * 1e12
    wi = 8 * h1 * h1 + 4 * h1 * h2
    names = "T Tpre Tgen ctogp gtocp dtocp ctodp compp ctogg gtocg dtocg ctodg compg wg wc wn cg cc cn hg hc hn".split()
    rows = []  # (coefficients by name, lo, hi)
    define = lambda v, d, const=0.0: rows.append(({v: 1.0, **{k: -a for k, a in d.items()}}, const, const))
    define("ctogp", {"wc": wi / ctog, "wn": wi / ctog, "hc": 2 * s * h1 * bls / ctog, "hn": 2 * s * h1 * bls / ctog})
    define("gtocp", {"cc": 4 * (s + 1) * h1 * bls / gtoc_c, "cn": 4 * (s + 1) * h1 * bls / gtoc_c,
                     "hc": 2 * s * h1 * bls / gtoc_h, "hn": 2 * s * h1 * bls / gtoc_h})
    define("dtocp", {"wn": wi / dtoc, "hn": 2 * s * h1 * bls / dtoc})
    define("ctodp", {"cn": 4 * bls * (s + 1) * h1 / ctod_c, "hn": 2 * s * h1 * bls / ctod_h})
    define("compp", {}, bls * (8 * s * h1 * h1 + 4 * s * h1 * h2) / mm_p + 4 * bls * s * s * h1 / bmm_p)
    define("ctogg", {"wc": wi / ctog, "wn": wi / ctog, "hc": 2 * h1 * bls / ctog, "hn": 2 * h1 * bls / ctog})
    define("gtocg", {"hc": 2 * h1 * bls / gtoc_h, "hn": 2 * h1 * bls / gtoc_h})
    define("dtocg", {"cn": 4 * bls * (s + n / 2) * h1 / dtoc, "hn": 2 * h1 * bls / dtoc, "wn": wi / (0.95 * dtoc)})
    define("ctodg", {"cn": 4 * bls * h1 / ctod_h, "hn": 2 * h1 * bls / ctod_h})
    define("compg", {"cg": 4 * bls * (s + n / 2) * h1 / bmm_g, "cc": 4 * bls * (s + n / 2) * h1 / cpu,
                     "cn": 4 * bls * (s + n / 2) * h1 / cpu}, bls * (8 * h1 * h1 + 4 * h1 * h2) / mm_g)
    for a, b in [("ctogp", "dtocp"), ("gtocp", "ctodp"), ("compp", None)]:
        rows.append(({"Tpre": 1.0, a: -1.0, **({b: -1.0} if b else {})}, 0.0, INF))
    for b in ["gtocg", "dtocg", "ctodg", "compg"]:
        rows.append(({"Tgen": 1.0, "ctogg": -1.0, b: -1.0}, 0.0, INF))
    rows.append(({"T": 1.0, "Tpre": -l, "Tgen": -(n - 1) * l}, 0.0, 0.0))
    for t in ("w", "c", "h"):
        rows.append(({t + "g": 1.0, t + "c": 1.0, t + "n": 1.0}, 1.0, 1.0))
    mem = [{"wg": wi * l, "hg": 2 * s * h1 * bls, "cg": 4 * (s + n) * h1 * bls * l},
           {"wc": wi * l, "wg": -wi, "hc": 2 * s * h1 * bls, "cc": 4 * (s + n) * h1 * bls * l},
           {"wn": wi * l, "hn": 2 * s * h1 * bls, "cn": 4 * (s + n) * h1 * bls * l}]
    x0 = dict(zip(names[13:], np.concatenate([rng.dirichlet(np.ones(3)) for _ in range(3)])))
    for d, const in zip(mem, [0.0, wi, 0.0]):  # capacities: room for x0, or together below the weights
        use = sum(a * x0[v] for v, a in d.items()) + const
        cap = use * rng.uniform(1, 1.3) if feasible else wi * l * rng.uniform(0.1, 0.3)
        rows.append((d, -INF, cap - const))
    A = np.array([[d.get(v, 0.0) for v in names] for d, _, _ in rows])
    rl, ru = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
    c = np.array([1.0 / bls if v == "T" else 0.0 for v in names])
    lo, hi = np.zeros(len(names)), np.array([INF] * 13 + [1.0] * 9)
    return (A, rl, ru, c, lo, hi), "optimal" if feasible else "infeasible", None


# ---- textbook problems (max problems are written as min -c'x) ----

def textbook():
    out = []
    for n in range(3, 9):  # Klee-Minty: Dantzig's rule visits all 2^n vertices; optimum 5^n
        A = np.zeros((n, n))
        for i in range(n):
            for j in range(i):
                A[i, j] = 2.0 ** (i - j + 1)
            A[i, i] = 1
        c = -np.array([2.0 ** (n - 1 - j) for j in range(n)])
        ru = np.array([5.0 ** (i + 1) for i in range(n)])
        out.append(("klee_minty_%d" % n, (A, np.full(n, -INF), ru, c, np.zeros(n), np.full(n, INF)), "optimal", -5.0 ** n))
    # Beale (1955): cycles under Dantzig's rule with lowest-index ties; optimum -5/4 at (1, 0, 1, 0)
    A = np.array([[0.25, -8, -1, 9], [0.5, -12, -0.5, 3], [0, 0, 1, 0]])
    c = np.array([-0.75, 20, -0.5, 6])
    out.append(("beale_cycling", (A, np.full(3, -INF), np.array([0, 0, 1.0]), c, np.zeros(4), np.full(4, INF)), "optimal", -1.25))
    # Chvatal, Linear Programming (1983), p. 31: the cycling example; max 10x1-57x2-9x3-24x4 = 1
    A = np.array([[0.5, -5.5, -2.5, 9], [0.5, -1.5, -0.5, 1], [1, 0, 0, 0]])
    c = -np.array([10, -57, -9, -24.0])
    out.append(("chvatal_cycling", (A, np.full(3, -INF), np.array([0, 0, 1.0]), c, np.zeros(4), np.full(4, INF)), "optimal", -1.0))
    # Chvatal ch. 2: max 5x1+4x2+3x3 = 13 at (2, 0, 1)
    A = np.array([[2, 3, 1], [4, 1, 2], [3, 4, 2.0]])
    out.append(("chvatal_ch2", (A, np.full(3, -INF), np.array([5, 11, 8.0]), -np.array([5, 4, 3.0]), np.zeros(3), np.full(3, INF)), "optimal", -13.0))
    # Chvatal ch. 3, two-phase: max x1-x2+x3 = 3/5 at (0, 2.8, 3.4); the origin is infeasible
    A = np.array([[2, -1, 2], [2, -3, 1], [-1, 1, -2.0]])
    out.append(("chvatal_two_phase", (A, np.full(3, -INF), np.array([4, -5, -1.0]), -np.array([1, -1, 1.0]), np.zeros(3), np.full(3, INF)), "optimal", -0.6))
    # Chvatal ch. 1: max 3x1-x2 s.t. x1+x2 <= 2, -2x1-2x2 <= -10: infeasible
    A = np.array([[1, 1], [-2, -2.0]])
    out.append(("chvatal_infeasible", (A, np.full(2, -INF), np.array([2, -10.0]), -np.array([3, -1.0]), np.zeros(2), np.full(2, INF)), "infeasible", None))
    # Chvatal ch. 1: max x1-x2 s.t. -2x1+x2 <= -1, -x1-2x2 <= -2: unbounded
    A = np.array([[-2, 1], [-1, -2.0]])
    out.append(("chvatal_unbounded", (A, np.full(2, -INF), np.array([-1, -2.0]), -np.array([1, -1.0]), np.zeros(2), np.full(2, INF)), "unbounded", None))
    # Hillier-Lieberman's Wyndor glass: max 3x1+5x2 = 36 at (2, 6)
    A = np.array([[1, 0], [0, 2], [3, 2.0]])
    out.append(("wyndor", (A, np.full(3, -INF), np.array([4, 12, 18.0]), -np.array([3, 5.0]), np.zeros(2), np.full(2, INF)), "optimal", -36.0))
    # degenerate apex: max z under 8 planes through (1/2, 1/2, 1/2), a vertex where 8 rows meet
    rows = []
    for a, b in [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1)]:
        rows.append([-a, -b, 1.0])  # z - a x - b y <= 1/2 - a/2 - b/2
    A = np.array(rows)
    ru = np.array([0.5 - r[0] * -0.5 - r[1] * -0.5 for r in rows])
    out.append(("degenerate_apex", (A, np.full(8, -INF), ru, np.array([0, 0, -1.0]), np.zeros(3), np.full(3, INF)), "optimal", -0.5))
    # an equality with a free variable: min x+y, x-y = 1, x free, y >= 0: 1 at (1, 0)
    A = np.array([[1, -1.0]])
    out.append(("free_equality", (A, np.array([1.0]), np.array([1.0]), np.array([1, 1.0]), np.array([-INF, 0]), np.array([INF, INF])), "optimal", 1.0))
    # no rows at all: each variable sits at its best bound
    out.append(("no_rows", (np.zeros((0, 3)), np.zeros(0), np.zeros(0), np.array([1, -2, 0.5]), np.array([-1, 0, 2.0]), np.array([3, 4, 5.0])), "optimal", -1 - 8 + 1.0))
    return out


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: lp_gen.py DIR [SEED]")
    d = sys.argv[1]
    rng = np.random.default_rng(int(sys.argv[2]) if len(sys.argv) == 3 else 20240611)
    os.makedirs(d, exist_ok=True)
    cases = textbook()
    bands = ["tiny", "small", "medium", "large"]
    plan = [  # (family, count, generator)
        ("planted", 80, lambda b: gen_optimal(rng, b, True)),
        ("dual", 60, lambda b: gen_optimal(rng, b, False, ints=rng.random() < 0.5)),
        ("degenerate", 30, lambda b: gen_optimal(rng, b, True, pE=0.1, redundant=int(rng.integers(1, 6)))),
        ("equality", 20, lambda b: gen_optimal(rng, b, rng.random() < 0.5, pE=0.7, redundant=int(rng.integers(0, 4)))),
        ("free", 12, lambda b: gen_optimal(rng, b, rng.random() < 0.5, mix=MIX_FREE)),
        ("fixed", 12, lambda b: gen_optimal(rng, b, rng.random() < 0.5, mix=MIX_FIXED)),
        ("ranges", 12, lambda b: gen_optimal(rng, b, rng.random() < 0.5, ranges=True)),
        ("scaled", 16, lambda b: gen_optimal(rng, b, rng.random() < 0.5, ints=False, spread=2)),
        ("boxed", 16, lambda b: gen_boxed(rng, b)),
        ("assignment", 12, lambda b: gen_assignment(rng)),
        ("transport", 12, lambda b: gen_transport(rng)),
        ("costmodel", 12, lambda b: gen_costmodel(rng, True)),
        ("costmodel_infeas", 4, lambda b: gen_costmodel(rng, False)),
        ("infeas_farkas", 20, lambda b: gen_infeasible(rng, b, "farkas")),
        ("infeas_box", 14, lambda b: gen_infeasible(rng, b, "box")),
        ("infeas_eq", 14, lambda b: gen_infeasible(rng, b, "eq")),
        ("unbounded", 36, lambda b: gen_unbounded(rng, b)),
        ("unbounded_free", 12, lambda b: gen_unbounded(rng, b, MIX_FREE)),
    ]
    for fam, count, fn in plan:
        for k in range(count):
            band = bands[k % 4]
            lp, status, obj = fn(band)
            cases.append(("%s_%s_%02d" % (fam, band, k), lp, status, obj))
    with open(os.path.join(d, "expect.txt"), "w") as f:
        for name, (A, rl, ru, c, lo, hi), status, obj in cases:
            write_mps(os.path.join(d, name + ".mps"), name, A, rl, ru, c, lo, hi, rng)
            f.write("%s %s %s\n" % (name, status, "-" if obj is None else repr(float(obj))))


if __name__ == "__main__":
    main()
