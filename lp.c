/* lp.c: a small dense simplex solver and a free-format MPS reader (`opt lp FILE.mps`).
 *
 * The offloading cost model is a linear program of ~30 variables, so everything here is dense:
 * a bounded-variable primal simplex with an explicit basis inverse, two phases (artificial
 * variables only on the rows whose slack cannot absorb the starting residual), Dantzig pricing
 * with Bland's rule as the fallback while pivots stall, and a Harris ratio test. The inverse is
 * recomputed from the basis columns every LP_REFACTOR pivots and before every final verdict, so
 * rounding errors of the rank-one updates cannot pile up.
 *
 * Internally row i reads  sum_j A[i][j] x[j] + s[i] (+ g[i] a[i]) = b[i], where the slack s[i]
 * carries the row sense as bounds ('<': s >= 0, '>': s <= 0, '=': s = 0) and the artificial
 * a[i] >= 0 (sign g[i]) exists in phase 1 only. Columns are numbered structural (0..n-1), slack
 * (n..n+m-1), artificial (n+m..n+2m-1); Bland's rule uses that order. */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L /* getline */
#endif
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include "opt.h"

const char *const lp_status_names[4] = {"optimal", "infeasible", "unbounded", "iterlimit"};

/* ---- tolerances ----
 * Rows and columns are first scaled by powers of two (lp_scale) so that the entries of A are
 * O(1), every column's largest in [0.5, 2); the tolerances below are meant for that scaled
 * problem, where a unit change of any variable moves the rows it touches by O(1). */

/* Smallest |alpha_i| accepted as a pivot, relative to the largest entry of the entering column:
 * a smaller one is likely cancellation noise, and dividing by it would multiply the rounding
 * error of the whole basis inverse by more than 1e9. */
#define LP_PIV_TOL 1e-9
/* Primal feasibility: a variable may sit this far (times 1 + |bound|) outside a bound. Harris'
 * ratio test spends it to pick larger pivots; phase 1 calls a problem infeasible only when the
 * artificials cannot be driven below it. Tighter than GLPK's 1e-7 because we refactor often. */
#define LP_FEAS_TOL 1e-9
/* Dual feasibility: a reduced cost must beat this (times 1 + max|c_j|) to be worth a pivot, so
 * that rounding noise in d_j = c_j - y'a_j never keeps an optimal basis pivoting. */
#define LP_OPT_TOL 1e-9
/* Pivots between recomputing B^-1 and x_B from the problem data: each rank-one update adds a
 * little rounding error, and an O(m^3) refactor every 32 pivots costs less than the pricing. */
#define LP_REFACTOR 32
/* Consecutive degenerate pivots before switching to Bland's rule. Dantzig's rule can cycle; the
 * classic cycles (Beale's, Kuhn's, Chvatal's) take 6 pivots, so we switch before one can close.
 * Bland's rule cannot cycle but moves slowly, so it is dropped at the first pivot that makes
 * progress; at our sizes its extra pivots cost microseconds. */
#define LP_DEGEN_MAX 5
/* Geometric-mean scaling passes; each costs 2mn, and a handful settle any diagonal scaling. */
#define LP_SCALE_PASSES 8
/* Scaled pivot-entry magnitude under which a basis is treated as singular during a refactor. */
#define LP_SING_TOL 1e-11

/* ---- solver state ---- */

enum { NB_LO, NB_HI, NB_FREE, BASIC }; /* where a column sits: nonbasic at lo / hi / 0, or basic */

typedef struct {
    int m, n;          /* rows, structural columns */
    int nc;            /* all columns: n + 2m */
    double *A;         /* (m, n) scaled structural matrix, row-major */
    double *b;         /* (m) scaled right-hand sides */
    double *g;         /* (m) sign of artificial column n+m+i, which is g[i] * e_i */
    double *cost;      /* (nc) costs of the current phase */
    double *lo, *hi;   /* (nc) bounds of every column (scaled) */
    double *x;         /* (nc) current value of every column */
    int *stat;         /* (nc) NB_LO, NB_HI, NB_FREE or BASIC */
    int *head;         /* (m) column that is basic in row i */
    double *Binv;      /* (m, m) inverse of the basis matrix [a_head[0] ... a_head[m-1]] */
    double *work;      /* (m, 2m) scratch for the refactor */
    double *alpha;     /* (m) B^-1 a_q for the entering column q */
    double *y;         /* (m) simplex multipliers c_B' B^-1 */
    int since;         /* pivots and bound flips since the last refactor */
    int iter;          /* pivots and bound flips so far, both phases */
    int max_iter;      /* safety net against numerical trouble */
} Simplex;

static double *dalloc(size_t n, const char *what) { return check_calloc((n ? n : 1) * sizeof(double), what); }

/* Entry (i) of column j, for the three kinds of columns. */
static double col_at(const Simplex *s, int j, int i) {
    if (j < s->n) return s->A[(size_t)i * s->n + j];
    if (j < s->n + s->m) return j - s->n == i ? 1.0 : 0.0;
    return j - s->n - s->m == i ? s->g[i] : 0.0;
}

/* v' a_j: prices column j against the row vector v (m). */
static double col_dot(const Simplex *s, const double *v, int j) {
    if (j >= s->n) return j < s->n + s->m ? v[j - s->n] : s->g[j - s->n - s->m] * v[j - s->n - s->m];
    double d = 0;
    for (int i = 0; i < s->m; i++) d += v[i] * s->A[(size_t)i * s->n + j];
    return d;
}

/* out = B^-1 a_j. */
static void col_ftran(const Simplex *s, int j, double *out) {
    int m = s->m;
    if (j >= s->n) { /* unit column: one column of B^-1 */
        int k = j < s->n + m ? j - s->n : j - s->n - m;
        double sg = j < s->n + m ? 1.0 : s->g[k];
        for (int i = 0; i < m; i++) out[i] = sg * s->Binv[(size_t)i * m + k];
        return;
    }
    for (int i = 0; i < m; i++) out[i] = 0;
    for (int k = 0; k < m; k++) {
        double a = s->A[(size_t)k * s->n + j];
        if (a == 0) continue;
        for (int i = 0; i < m; i++) out[i] += s->Binv[(size_t)i * m + k] * a;
    }
}

/* Recomputes the basic values from the nonbasic ones: x_B = B^-1 (b - N x_N). */
static void simplex_update_xb(Simplex *s) {
    int m = s->m;
    double *r = s->alpha; /* scratch */
    for (int i = 0; i < m; i++) r[i] = s->b[i];
    for (int j = 0; j < s->nc; j++) {
        if (s->stat[j] == BASIC || s->x[j] == 0) continue;
        for (int i = 0; i < m; i++) r[i] -= col_at(s, j, i) * s->x[j];
    }
    for (int i = 0; i < m; i++) {
        double v = 0;
        for (int k = 0; k < m; k++) v += s->Binv[(size_t)i * m + k] * r[k];
        s->x[s->head[i]] = v;
    }
}

/* Inverts the basis from scratch (Gauss-Jordan, partial pivoting) and recomputes x_B.
 * Returns 0 when the basis has become numerically singular. */
static int simplex_refactor(Simplex *s) {
    int m = s->m, w = 2 * m;
    double *W = s->work;
    for (int i = 0; i < m; i++)
        for (int k = 0; k < m; k++) {
            W[(size_t)i * w + k] = col_at(s, s->head[k], i);
            W[(size_t)i * w + m + k] = i == k;
        }
    for (int k = 0; k < m; k++) {
        int p = k;
        for (int i = k + 1; i < m; i++)
            if (fabs(W[(size_t)i * w + k]) > fabs(W[(size_t)p * w + k])) p = i;
        if (fabs(W[(size_t)p * w + k]) < LP_SING_TOL) return 0;
        if (p != k)
            for (int c = 0; c < w; c++) {
                double t = W[(size_t)p * w + c];
                W[(size_t)p * w + c] = W[(size_t)k * w + c], W[(size_t)k * w + c] = t;
            }
        double inv = 1 / W[(size_t)k * w + k];
        for (int c = 0; c < w; c++) W[(size_t)k * w + c] *= inv;
        for (int i = 0; i < m; i++) {
            double f = W[(size_t)i * w + k];
            if (i == k || f == 0) continue;
            for (int c = 0; c < w; c++) W[(size_t)i * w + c] -= f * W[(size_t)k * w + c];
        }
    }
    for (int i = 0; i < m; i++) memcpy(s->Binv + (size_t)i * m, W + (size_t)i * w + m, m * sizeof(double));
    simplex_update_xb(s);
    s->since = 0;
    return 1;
}

/* Makes column q basic in row r (alpha = B^-1 a_q): the rank-one update of B^-1. */
static void simplex_pivot(Simplex *s, int r, int q) {
    int m = s->m;
    double *pr = s->Binv + (size_t)r * m, inv = 1 / s->alpha[r];
    for (int k = 0; k < m; k++) pr[k] *= inv;
    for (int i = 0; i < m; i++) {
        double f = s->alpha[i];
        if (i == r || f == 0) continue;
        double *row = s->Binv + (size_t)i * m;
        for (int k = 0; k < m; k++) row[k] -= f * pr[k];
    }
    s->stat[s->head[r]] = NB_LO; /* the caller sets the exact bound */
    s->head[r] = q;
    s->stat[q] = BASIC;
}

/* Primal simplex on s->cost from a basis whose values are within bounds. Returns LP_OPTIMAL,
 * LP_UNBOUNDED, or LP_ITERLIMIT (iteration cap or a singular basis). */
static LpStatus simplex_run(Simplex *s) {
    int m = s->m, degen = 0;
    double cmax = 0;
    for (int j = 0; j < s->nc; j++) cmax = fmax(cmax, fabs(s->cost[j]));
    double dtol = LP_OPT_TOL * (1 + cmax);
    for (;;) {
        if (s->since >= LP_REFACTOR && !simplex_refactor(s)) return LP_ITERLIMIT;
        int bland = degen >= LP_DEGEN_MAX;
        /* pricing: y = c_B' B^-1, then the reduced costs of the nonbasic columns */
        for (int k = 0; k < m; k++) s->y[k] = 0;
        for (int i = 0; i < m; i++) {
            double c = s->cost[s->head[i]];
            if (c != 0)
                for (int k = 0; k < m; k++) s->y[k] += c * s->Binv[(size_t)i * m + k];
        }
        int q = -1;
        double dq = 0;
        for (int j = 0; j < s->nc; j++) {
            int st = s->stat[j];
            if (st == BASIC || s->lo[j] == s->hi[j]) continue;
            double d = s->cost[j] - col_dot(s, s->y, j);
            int ok = (st == NB_LO && d < -dtol) || (st == NB_HI && d > dtol) || (st == NB_FREE && fabs(d) > dtol);
            if (ok && (q < 0 || (!bland && fabs(d) > fabs(dq)))) q = j, dq = d;
            if (ok && bland) break; /* Bland: the lowest-numbered improving column */
        }
        if (q < 0) {
            if (s->since > 0) { /* confirm with fresh numbers before saying optimal */
                if (!simplex_refactor(s)) return LP_ITERLIMIT;
                continue;
            }
            return LP_OPTIMAL;
        }
        double dir = dq < 0 ? 1 : -1; /* x_q increases or decreases */
        col_ftran(s, q, s->alpha);

        /* Harris ratio test. Pass 1: the longest step with every basic variable at most
         * LP_FEAS_TOL beyond its bound (exact bounds under Bland's rule, which needs exact ties).
         * Pass 2: among the rows that block within that step, the largest pivot (Bland: the
         * lowest-numbered leaving column). */
        double amax = 0;
        for (int i = 0; i < m; i++) amax = fmax(amax, fabs(s->alpha[i]));
        double ptol = LP_PIV_TOL * fmax(1, amax), tmax = INFINITY;
        for (int i = 0; i < m; i++) {
            double a = dir * s->alpha[i];
            if (fabs(a) <= ptol) continue;
            int k = s->head[i];
            double bd = a > 0 ? s->lo[k] : s->hi[k];
            if (!isfinite(bd)) continue;
            double slack = bland ? 0 : LP_FEAS_TOL * (1 + fabs(bd));
            tmax = fmin(tmax, (a > 0 ? s->x[k] - bd + slack : bd - s->x[k] + slack) / fabs(a));
        }
        tmax = fmax(tmax, 0); /* a variable already beyond its slack blocks at once */
        int r = -1;
        double t = INFINITY;
        for (int i = 0; i < m && isfinite(tmax); i++) {
            double a = dir * s->alpha[i];
            if (fabs(a) <= ptol) continue;
            int k = s->head[i];
            double bd = a > 0 ? s->lo[k] : s->hi[k];
            if (!isfinite(bd)) continue;
            double ti = fmax(0, (s->x[k] - bd) / a);
            if (ti > tmax) continue;
            if (r < 0 || (bland ? k < s->head[r] : fabs(a) > fabs(s->alpha[r]))) r = i, t = ti;
        }
        double flip = s->hi[q] - s->lo[q]; /* inf unless q is boxed */
        if (isfinite(flip) && (r < 0 || flip <= t)) r = -1, t = flip;
        if (!isfinite(t)) {
            if (s->since > 0) {
                if (!simplex_refactor(s)) return LP_ITERLIMIT;
                continue;
            }
            return LP_UNBOUNDED;
        }
        if (++s->iter > s->max_iter) return LP_ITERLIMIT;

        /* step: move x_q by dir * t and the basic variables along -dir * t * alpha */
        degen = t * amax <= LP_FEAS_TOL ? degen + 1 : 0;
        for (int i = 0; i < m; i++) s->x[s->head[i]] -= dir * t * s->alpha[i];
        s->since++;
        if (r < 0) { /* bound flip: the basis stays */
            s->stat[q] = dir > 0 ? NB_HI : NB_LO;
            s->x[q] = dir > 0 ? s->hi[q] : s->lo[q];
            continue;
        }
        int k = s->head[r];
        int at_lo = dir * s->alpha[r] > 0;
        s->x[q] += dir * t;
        simplex_pivot(s, r, q);
        s->stat[k] = at_lo ? NB_LO : NB_HI;
        s->x[k] = at_lo ? s->lo[k] : s->hi[k];
        if (k >= s->n + m) s->hi[k] = 0; /* an artificial that left has done its job */
    }
}

/* Scale factors rs (m) and cs (n) for A: geometric-mean passes (each row, then each column,
 * divided by sqrt(min|a| * max|a|) over its nonzeros), which undo any diagonal scaling of the
 * matrix -- a cost model mixes bytes (1e10) with seconds (1e-3) -- then a pass bringing every
 * column's largest |a| to 1. Factors are rounded to powers of two, so scaling loses no bits. */
static void lp_scale(const Lp *lp, double *rs, double *cs) {
    int m = lp->m, n = lp->n;
    for (int i = 0; i < m; i++) rs[i] = 1;
    for (int j = 0; j < n; j++) cs[j] = 1;
    for (int pass = 0; pass <= LP_SCALE_PASSES; pass++) {
        for (int i = 0; i < m && pass < LP_SCALE_PASSES; i++) {
            double lo = INFINITY, hi = 0;
            for (int j = 0; j < n; j++) {
                double v = fabs(lp->A[(size_t)i * n + j]) * rs[i] * cs[j];
                if (v > 0) lo = fmin(lo, v), hi = fmax(hi, v);
            }
            if (hi > 0) rs[i] /= sqrt(lo) * sqrt(hi);
        }
        for (int j = 0; j < n; j++) {
            double lo = INFINITY, hi = 0;
            for (int i = 0; i < m; i++) {
                double v = fabs(lp->A[(size_t)i * n + j]) * rs[i] * cs[j];
                if (v > 0) lo = fmin(lo, v), hi = fmax(hi, v);
            }
            if (hi > 0) cs[j] /= pass < LP_SCALE_PASSES ? sqrt(lo) * sqrt(hi) : hi; /* last: max */
        }
    }
    int e;
    for (int i = 0; i < m; i++) frexp(rs[i], &e), rs[i] = ldexp(1.0, e - 1);
    for (int j = 0; j < n; j++) frexp(cs[j], &e), cs[j] = ldexp(1.0, e - 1);
}

/* ---- lp_solve ---- */

LpStatus lp_solve(const Lp *lp, double *x, double *obj) {
    int m = lp->m, n = lp->n, nc = n + 2 * m;
    for (int j = 0; j < n; j++) {
        double l = lp->lo ? lp->lo[j] : 0, h = lp->hi ? lp->hi[j] : INFINITY;
        if (l > h || l == INFINITY || h == -INFINITY) return LP_INFEASIBLE;
    }
    Simplex S = {.m = m, .n = n, .nc = nc};
    Simplex *s = &S;
    s->A = dalloc((size_t)m * n, "lp matrix");
    s->b = dalloc(m, "lp rhs");
    s->g = dalloc(m, "lp signs");
    s->cost = dalloc(nc, "lp costs");
    s->lo = dalloc(nc, "lp bounds");
    s->hi = dalloc(nc, "lp bounds");
    s->x = dalloc(nc, "lp values");
    s->stat = check_calloc(((size_t)nc + 1) * sizeof(int), "lp status");
    s->head = check_calloc(((size_t)m + 1) * sizeof(int), "lp basis");
    s->Binv = dalloc((size_t)m * m, "lp basis inverse");
    s->work = dalloc((size_t)m * 2 * m, "lp factor");
    s->alpha = dalloc(m, "lp column");
    s->y = dalloc(m, "lp prices");
    s->max_iter = 20000 + 100 * (m + n);

    double *rs = dalloc(m, "lp scales"), *cs = dalloc(n, "lp scales");
    lp_scale(lp, rs, cs);
    for (int i = 0; i < m; i++) {
        for (int j = 0; j < n; j++) s->A[(size_t)i * n + j] = lp->A[(size_t)i * n + j] * rs[i] * cs[j];
        s->b[i] = lp->b[i] * rs[i];
    }

    /* Bounds; nonbasic structurals start at a finite bound, free ones at 0. */
    for (int j = 0; j < n; j++) {
        s->lo[j] = (lp->lo ? lp->lo[j] : 0) / cs[j];
        s->hi[j] = (lp->hi ? lp->hi[j] : INFINITY) / cs[j];
        s->stat[j] = isfinite(s->lo[j]) ? NB_LO : isfinite(s->hi[j]) ? NB_HI : NB_FREE;
        s->x[j] = s->stat[j] == NB_LO ? s->lo[j] : s->stat[j] == NB_HI ? s->hi[j] : 0;
    }
    /* Slacks absorb the starting residual where their sign allows; elsewhere an artificial
     * takes it and the slack waits at 0, the one finite bound every slack has. */
    int nart = 0;
    for (int i = 0; i < m; i++) {
        int sl = n + i, ar = n + m + i;
        char sense = lp->sense[i];
        check(sense == '<' || sense == '=' || sense == '>', "lp row %d: bad sense '%c'", i, sense);
        s->lo[sl] = sense == '>' ? -INFINITY : 0;
        s->hi[sl] = sense == '<' ? INFINITY : 0;
        double res = s->b[i];
        for (int j = 0; j < n; j++) res -= s->A[(size_t)i * n + j] * s->x[j];
        s->g[i] = res < 0 ? -1 : 1;
        s->lo[ar] = s->hi[ar] = 0;
        s->stat[sl] = sense == '>' ? NB_HI : NB_LO, s->stat[ar] = NB_LO;
        if (res >= s->lo[sl] && res <= s->hi[sl]) {
            s->head[i] = sl, s->stat[sl] = BASIC, s->x[sl] = res;
        } else {
            s->head[i] = ar, s->stat[ar] = BASIC, s->x[ar] = fabs(res);
            s->hi[ar] = INFINITY, s->cost[ar] = 1, nart++;
        }
    }
    for (int i = 0; i < m; i++) s->Binv[(size_t)i * m + i] = s->head[i] >= n + m ? s->g[i] : 1;

    LpStatus st = LP_OPTIMAL;
    if (nart > 0) {
        /* Phase 1: minimise the sum of the artificials. */
        double bmax = 0;
        for (int i = 0; i < m; i++) bmax = fmax(bmax, fabs(s->b[i]) + fabs(s->x[s->head[i]]));
        st = simplex_run(s);
        if (st == LP_UNBOUNDED) st = LP_ITERLIMIT; /* impossible: the sum is >= 0 */
        double sum = 0;
        for (int i = 0; i < m; i++)
            if (s->head[i] >= n + m) sum += fabs(s->x[s->head[i]]);
        if (st == LP_OPTIMAL && sum > LP_FEAS_TOL * (1 + bmax)) st = LP_INFEASIBLE;
        if (st == LP_OPTIMAL) {
            /* Drive the artificials left at ~0 out of the basis; one that cannot leave marks a
             * redundant row and stays basic, fixed at 0 (no other column has an entry there). */
            for (int r = 0; r < m; r++) {
                if (s->head[r] < n + m) continue;
                int q = -1;
                double best = 0;
                for (int j = 0; j < n + m; j++) {
                    if (s->stat[j] == BASIC) continue;
                    double v = fabs(col_dot(s, s->Binv + (size_t)r * m, j));
                    if (v > best) best = v, q = j;
                }
                if (q < 0 || best <= LP_PIV_TOL) continue;
                col_ftran(s, q, s->alpha);
                double xq = s->x[q];
                int k = s->head[r];
                simplex_pivot(s, r, q);
                s->x[q] = xq, s->x[k] = 0;
            }
            for (int j = n + m; j < nc; j++) s->lo[j] = s->hi[j] = 0, s->cost[j] = 0;
            if (!simplex_refactor(s)) st = LP_ITERLIMIT;
        }
    }
    if (st == LP_OPTIMAL) {
        /* Phase 2: the real objective. */
        for (int j = 0; j < n; j++) s->cost[j] = lp->c[j] * cs[j];
        st = simplex_run(s);
    }
    if (st == LP_OPTIMAL) {
        double z = 0;
        for (int j = 0; j < n; j++) {
            double v = s->x[j] * cs[j];
            double l = lp->lo ? lp->lo[j] : 0, h = lp->hi ? lp->hi[j] : INFINITY;
            x[j] = fmin(fmax(v, l), h); /* undo Harris' tolerance on the bounds */
            z += lp->c[j] * x[j];
        }
        if (obj) *obj = z;
    }
    free(rs), free(cs);
    free(s->A), free(s->b), free(s->g), free(s->cost), free(s->lo), free(s->hi), free(s->x);
    free(s->stat), free(s->head), free(s->Binv), free(s->work), free(s->alpha), free(s->y);
    return st;
}

/* ---- MPS reader ----
 * Free MPS: section headers start in column 1, data lines with blanks; fields are separated
 * by blanks, so names cannot contain any. Supported: NAME, ROWS (N/L/G/E; the first N row is
 * the objective, later ones are free rows and ignored), COLUMNS, RHS, RANGES, BOUNDS (UP, LO,
 * FX, FR, MI, PL), OBJSENSE (MIN/MAX), ENDATA. The vector name in RHS, RANGES and BOUNDS may be
 * left out. Integer markers and bounds are rejected: this is an LP solver. */

typedef struct {
    char **name;  /* (n) names in order of first appearance */
    int n, cap;   /* used and allocated entries of name */
    int *slot;    /* (nslot) open-addressing hash table: index + 1, or 0 when empty */
    int nslot;    /* a power of two, kept above twice n so probes stay short */
} NameMap;

static uint32_t name_hash(const char *s) { /* FNV-1a */
    uint32_t h = 2166136261u;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 16777619u;
    return h;
}

static int names_find(const NameMap *nm, const char *s) {
    if (!nm->nslot) return -1;
    for (uint32_t h = name_hash(s) & (nm->nslot - 1);; h = (h + 1) & (nm->nslot - 1)) {
        int k = nm->slot[h];
        if (!k || !strcmp(nm->name[k - 1], s)) return k - 1;
    }
}

/* Appends s (not yet present) and returns its index. */
static int names_add(NameMap *nm, const char *s) {
    if (nm->n == nm->cap) {
        nm->cap = nm->cap ? 2 * nm->cap : 64;
        nm->name = check_realloc(nm->name, nm->cap * sizeof(char *), "mps names");
    }
    if (2 * (nm->n + 1) > nm->nslot) { /* grow and rehash */
        free(nm->slot);
        nm->nslot = nm->nslot ? 2 * nm->nslot : 128;
        nm->slot = check_calloc(nm->nslot * sizeof(int), "mps name table");
        for (int k = 0; k < nm->n; k++) {
            uint32_t h = name_hash(nm->name[k]) & (nm->nslot - 1);
            while (nm->slot[h]) h = (h + 1) & (nm->nslot - 1);
            nm->slot[h] = k + 1;
        }
    }
    uint32_t h = name_hash(s) & (nm->nslot - 1);
    while (nm->slot[h]) h = (h + 1) & (nm->nslot - 1);
    nm->name[nm->n] = check_strdup(s);
    nm->slot[h] = ++nm->n;
    return nm->n - 1;
}

static void names_free(NameMap *nm) {
    for (int k = 0; k < nm->n; k++) free(nm->name[k]);
    free(nm->name), free(nm->slot);
}

typedef struct {
    const char *path;    /* file name, for error messages */
    int line;            /* current line number, for error messages */
    NameMap rows, cols;  /* row and column names */
    int rcap, ccap;      /* allocated entries of the per-row and per-column arrays */
    char *type;          /* (rows) 'N', 'L', 'G' or 'E' */
    double *rhs;         /* (rows) right-hand side, 0 unless given */
    double *range;       /* (rows) RANGES value, NAN when none */
    int *last;           /* (rows) last column with an entry in the row, to catch duplicates */
    int obj;             /* the objective row (the first N row), -1 while there is none */
    double *c;           /* (cols) objective coefficients */
    double *lo, *hi;     /* (cols) bounds, [0, inf) unless given */
    int *ei, *ej;        /* (ne) row and column of each matrix entry */
    double *ev;          /* (ne) value of each matrix entry */
    int ne, ecap;        /* used and allocated matrix entries */
    double objconst;     /* RHS of the objective row: GLPK adds it to the objective */
    int maximize;        /* OBJSENSE MAX */
} Mps;

__attribute__((noreturn, format(printf, 2, 3))) static void mps_fail(const Mps *p, const char *fmt, ...) {
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    die("%s:%d: %s", p->path, p->line, msg);
}

static double mps_number(const Mps *p, const char *tok) {
    char *end;
    double v = strtod(tok, &end);
    if (end == tok || *end || !isfinite(v)) mps_fail(p, "bad number '%.40s'", tok);
    return v;
}

static int mps_row(const Mps *p, const char *name) {
    int i = names_find(&p->rows, name);
    if (i < 0) mps_fail(p, "unknown row '%.40s'", name);
    return i;
}

static int mps_col(const Mps *p, const char *name) {
    int j = names_find(&p->cols, name);
    if (j < 0) mps_fail(p, "unknown column '%.40s'", name);
    return j;
}

static void mps_add_row(Mps *p, const char *type, const char *name) {
    if (strlen(type) != 1 || !strchr("NLGE", type[0])) mps_fail(p, "bad row type '%.40s'", type);
    if (names_find(&p->rows, name) >= 0) mps_fail(p, "duplicate row '%.40s'", name);
    int i = names_add(&p->rows, name);
    if (i == p->rcap) {
        p->rcap = p->rcap ? 2 * p->rcap : 64;
        p->type = check_realloc(p->type, p->rcap, "mps rows");
        p->rhs = check_realloc(p->rhs, p->rcap * sizeof(double), "mps rows");
        p->range = check_realloc(p->range, p->rcap * sizeof(double), "mps rows");
        p->last = check_realloc(p->last, p->rcap * sizeof(int), "mps rows");
    }
    p->type[i] = type[0], p->rhs[i] = 0, p->range[i] = NAN, p->last[i] = -1;
    if (type[0] == 'N' && p->obj < 0) p->obj = i;
}

static int mps_add_col(Mps *p, const char *name) {
    if (names_find(&p->cols, name) >= 0) mps_fail(p, "column '%.40s' is not contiguous", name);
    int j = names_add(&p->cols, name);
    if (j == p->ccap) {
        p->ccap = p->ccap ? 2 * p->ccap : 64;
        p->c = check_realloc(p->c, p->ccap * sizeof(double), "mps columns");
        p->lo = check_realloc(p->lo, p->ccap * sizeof(double), "mps columns");
        p->hi = check_realloc(p->hi, p->ccap * sizeof(double), "mps columns");
    }
    p->c[j] = 0, p->lo[j] = 0, p->hi[j] = INFINITY;
    return j;
}

static void mps_add_entry(Mps *p, int j, const char *row, const char *val) {
    int i = mps_row(p, row);
    double v = mps_number(p, val);
    if (p->last[i] == j) mps_fail(p, "duplicate entry for row '%.40s'", row);
    p->last[i] = j;
    if (i == p->obj) { p->c[j] = v; return; }
    if (p->type[i] == 'N') return; /* free rows constrain nothing */
    if (p->ne == p->ecap) {
        p->ecap = p->ecap ? 2 * p->ecap : 256;
        p->ei = check_realloc(p->ei, p->ecap * sizeof(int), "mps matrix");
        p->ej = check_realloc(p->ej, p->ecap * sizeof(int), "mps matrix");
        p->ev = check_realloc(p->ev, p->ecap * sizeof(double), "mps matrix");
    }
    p->ei[p->ne] = i, p->ej[p->ne] = j, p->ev[p->ne++] = v;
}

/* RHS and RANGES lines: [vector] row value [row value]. */
static void mps_rhs_line(Mps *p, char **tok, int nt, int ranges) {
    if (nt < 2 || nt > 5) mps_fail(p, "%d fields, expected: [name] row value [row value]", nt);
    for (int f = nt % 2; f + 1 < nt; f += 2) {
        int i = mps_row(p, tok[f]);
        double v = mps_number(p, tok[f + 1]);
        if (!ranges && i == p->obj) p->objconst = v;
        else if (!ranges) p->rhs[i] = v;
        else if (p->type[i] == 'N') mps_fail(p, "RANGES on N row '%.40s'", tok[f]);
        else p->range[i] = v;
    }
}

/* BOUNDS lines: type [vector] column [value]; FR, MI and PL need no value. */
static void mps_bound_line(Mps *p, char **tok, int nt) {
    const char *t = tok[0];
    int novalue = !strcmp(t, "FR") || !strcmp(t, "MI") || !strcmp(t, "PL");
    if (!novalue && strcmp(t, "UP") && strcmp(t, "LO") && strcmp(t, "FX")) {
        if (!strcmp(t, "BV") || !strcmp(t, "LI") || !strcmp(t, "UI") || !strcmp(t, "SC"))
            mps_fail(p, "integer bound type '%s' is not supported (LP only)", t);
        mps_fail(p, "bad bound type '%.40s'", t);
    }
    int j;
    double v = 0;
    if (novalue && nt == 3) { /* type vector column, or type column value */
        j = names_find(&p->cols, tok[2]);
        if (j < 0) j = mps_col(p, tok[1]);
    } else if (novalue && nt == 4) {
        j = mps_col(p, tok[2]);
    } else if (nt == 3 || nt == 4) {
        j = mps_col(p, tok[nt - 2]);
        v = mps_number(p, tok[nt - 1]);
    } else if (novalue && nt == 2) {
        j = mps_col(p, tok[1]);
    } else {
        mps_fail(p, "%d fields in BOUNDS, expected: type [name] column [value]", nt);
    }
    /* GLPK 5 keeps lo = 0 on a negative UP (old MPS readers made lo = -inf); we follow GLPK. */
    switch (t[0] == 'F' ? t[1] : t[0]) {
    case 'U': p->hi[j] = v; break;
    case 'L': p->lo[j] = v; break;
    case 'X': p->lo[j] = p->hi[j] = v; break;
    case 'R': p->lo[j] = -INFINITY, p->hi[j] = INFINITY; break;
    case 'M': p->lo[j] = -INFINITY; break;
    case 'P': p->hi[j] = INFINITY; break;
    }
}

/* Reads the whole file into p; dies naming the file and line on any error. */
static void mps_read(Mps *p, const char *path) {
    enum { S_NONE, S_NAME, S_ROWS, S_COLUMNS, S_RHS, S_RANGES, S_BOUNDS, S_OBJSENSE } sec = S_NONE;
    static const char *const heads[] = {"", "NAME", "ROWS", "COLUMNS", "RHS", "RANGES", "BOUNDS", "OBJSENSE"};
    FILE *f = fopen(path, "r");
    if (!f) die("%s: %s", path, strerror(errno));
    p->path = path, p->obj = -1;
    char *buf = NULL, *tok[8];
    size_t cap = 0;
    int cur = -1, ended = 0; /* cur: the column being read in COLUMNS */
    while (!ended && getline(&buf, &cap, f) != -1) {
        p->line++;
        if (buf[0] == '*') continue; /* comment */
        int nt = 0;
        for (char *q = strtok(buf, " \t\r\n\v\f"); q; q = strtok(NULL, " \t\r\n\v\f")) {
            if (nt == 8) mps_fail(p, "too many fields");
            tok[nt++] = q;
        }
        if (nt == 0) continue;
        if (!isspace((unsigned char)buf[0])) { /* section header */
            if (!strcmp(tok[0], "ENDATA")) { ended = 1; continue; }
            int h = 1;
            while (h < 8 && strcmp(tok[0], heads[h])) h++;
            if (h == 8) mps_fail(p, "unknown section '%.40s'", tok[0]);
            sec = h;
            if (nt == 1 || sec == S_NAME) continue;
            if (sec != S_OBJSENSE) mps_fail(p, "unexpected text after %s", tok[0]);
            for (int k = 1; k < nt; k++) tok[k - 1] = tok[k]; /* OBJSENSE MAX on one line */
            nt--;
        }
        switch (sec) {
        case S_NONE: mps_fail(p, "data before the first section");
        case S_NAME: mps_fail(p, "unexpected data in NAME section");
        case S_ROWS:
            if (nt != 2) mps_fail(p, "%d fields in ROWS, expected: type name", nt);
            mps_add_row(p, tok[0], tok[1]);
            break;
        case S_COLUMNS:
            if (nt >= 2 && !strcmp(tok[1], "'MARKER'")) mps_fail(p, "integer markers are not supported (LP only)");
            if (nt != 3 && nt != 5) mps_fail(p, "%d fields in COLUMNS, expected: column row value [row value]", nt);
            if (cur < 0 || strcmp(p->cols.name[cur], tok[0])) cur = mps_add_col(p, tok[0]);
            mps_add_entry(p, cur, tok[1], tok[2]);
            if (nt == 5) mps_add_entry(p, cur, tok[3], tok[4]);
            break;
        case S_RHS: mps_rhs_line(p, tok, nt, 0); break;
        case S_RANGES: mps_rhs_line(p, tok, nt, 1); break;
        case S_BOUNDS: mps_bound_line(p, tok, nt); break;
        case S_OBJSENSE:
            if (nt != 1) mps_fail(p, "expected MIN or MAX");
            if (!strcmp(tok[0], "MAX") || !strcmp(tok[0], "MAXIMIZE")) p->maximize = 1;
            else if (!strcmp(tok[0], "MIN") || !strcmp(tok[0], "MINIMIZE")) p->maximize = 0;
            else mps_fail(p, "expected MIN or MAX, got '%.40s'", tok[0]);
            break;
        }
    }
    if (ferror(f)) die("%s: %s", path, strerror(errno));
    if (!ended) mps_fail(p, "missing ENDATA (truncated file?)");
    free(buf);
    fclose(f);
}

static void mps_free(Mps *p) {
    names_free(&p->rows), names_free(&p->cols);
    free(p->type), free(p->rhs), free(p->range), free(p->last);
    free(p->c), free(p->lo), free(p->hi), free(p->ei), free(p->ej), free(p->ev);
}

/* ---- opt lp ---- */

int lp_main(int argc, char **argv) {
    if (argc != 2) die("usage: opt lp FILE.mps (free MPS; prints status, objective and x)");
    Mps p = {0};
    mps_read(&p, argv[1]);
    int nr = p.rows.n, n = p.cols.n;

    /* Each MPS row is lo <= a'x <= hi; a range with both ends finite and apart becomes two rows. */
    double *rlo = dalloc(nr, "mps rows"), *rhi = dalloc(nr, "mps rows");
    int *first = check_calloc((nr + 1) * sizeof(int), "mps rows"); /* first Lp row of each MPS row */
    char *two = check_calloc(nr + 1, "mps rows");                  /* the MPS row became two Lp rows */
    int m = 0;
    for (int i = 0; i < nr; i++) {
        double b = p.rhs[i], r = p.range[i];
        char t = p.type[i];
        rlo[i] = t == 'L' ? -INFINITY : b, rhi[i] = t == 'G' ? INFINITY : b;
        if (!isnan(r)) { /* the MPS range convention */
            if (t == 'L') rlo[i] = b - fabs(r);
            if (t == 'G') rhi[i] = b + fabs(r);
            if (t == 'E') rlo[i] = r < 0 ? b + r : b, rhi[i] = r < 0 ? b : b + r;
        }
        first[i] = m;
        two[i] = t != 'N' && rlo[i] != rhi[i] && isfinite(rlo[i]) && isfinite(rhi[i]);
        m += t == 'N' ? 0 : 1 + two[i];
    }
    double *A = dalloc((size_t)m * n, "lp matrix"), *b = dalloc(m, "lp rhs");
    char *sense = check_calloc(m + 1, "lp senses");
    for (int i = 0; i < nr; i++) {
        if (p.type[i] == 'N') continue;
        int k = first[i];
        if (rlo[i] == rhi[i]) sense[k] = '=', b[k] = rlo[i];
        else if (!isfinite(rlo[i])) sense[k] = '<', b[k] = rhi[i];
        else if (!isfinite(rhi[i])) sense[k] = '>', b[k] = rlo[i];
        else sense[k] = '>', b[k] = rlo[i], sense[k + 1] = '<', b[k + 1] = rhi[i];
    }
    for (int e = 0; e < p.ne; e++) {
        int i = p.ei[e], k = first[i];
        A[(size_t)k * n + p.ej[e]] = p.ev[e];
        if (two[i]) A[(size_t)(k + 1) * n + p.ej[e]] = p.ev[e];
    }
    if (p.maximize)
        for (int j = 0; j < n; j++) p.c[j] = -p.c[j];

    double *x = dalloc(n, "lp solution"), z = 0;
    Lp lp = {.m = m, .n = n, .A = A, .b = b, .sense = sense, .c = p.c, .lo = p.lo, .hi = p.hi};
    LpStatus st = lp_solve(&lp, x, &z);
    printf("status %s\n", lp_status_names[st]);
    if (st == LP_OPTIMAL) {
        printf("objective %.17g\n", (p.maximize ? -z : z) + p.objconst + 0.0);
        for (int j = 0; j < n; j++) printf("%s %.17g\n", p.cols.name[j], x[j] + 0.0); /* + 0.0: no "-0" */
    }
    free(A), free(b), free(sense), free(x), free(rlo), free(rhi), free(first), free(two);
    mps_free(&p);
    return st == LP_ITERLIMIT; /* infeasible and unbounded are answers, not failures */
}
