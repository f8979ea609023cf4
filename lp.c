/* lp.c: the offloading planner. Sections, in order: a small dense simplex solver (lp_solve);
 * a free-format MPS reader (`opt lp FILE.mps`); the cost model, FlexGen's LP corrected (its
 * terms are documented in the comment that opens that section); the hardware profiles (t4,
 * h100) and the probe-file reader; the policy search (plan_eval, plan_search); `opt plan`;
 * `opt probe`, which measures this machine.
 *
 * The offloading cost model is a linear program of ~13 variables, so everything here is dense:
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
#include <fcntl.h>
#include <omp.h>
#include <pthread.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>
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

/* Reads the whole file (path "-": stdin, named "<stdin>") into p; dies naming the file and line
 * on any error. */
static void mps_read(Mps *p, const char *path) {
    enum { S_NONE, S_NAME, S_ROWS, S_COLUMNS, S_RHS, S_RANGES, S_BOUNDS, S_OBJSENSE } sec = S_NONE;
    static const char *const heads[] = {"", "NAME", "ROWS", "COLUMNS", "RHS", "RANGES", "BOUNDS", "OBJSENSE"};
    int in = !strcmp(path, "-");
    if (in) path = "<stdin>";
    FILE *f = in ? stdin : fopen(path, "r");
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
    if (!in) fclose(f);
}

static void mps_free(Mps *p) {
    names_free(&p->rows), names_free(&p->cols);
    free(p->type), free(p->rhs), free(p->range), free(p->last);
    free(p->c), free(p->lo), free(p->hi), free(p->ei), free(p->ej), free(p->ev);
}

/* Reads an MPS file: the fuzz harnesses' entry (tests/fuzz). The last file's
 * tables are freed first, since a die() there returns to the harness. */
void mps_check(const char *path) {
    static Mps p;
    mps_free(&p);
    memset(&p, 0, sizeof p);
    mps_read(&p, path);
}

/* ---- opt lp ---- */

const char lp_usage[] =
    "usage: opt lp FILE.mps|-\n"
    "  Solves a linear program in free MPS (- reads it from stdin) with opt's own simplex solver:\n"
    "  minimizes (OBJSENSE MAX: maximizes) the first N row over the ROWS, RHS, RANGES and BOUNDS.\n"
    "  Prints \"status optimal|infeasible|unbounded|iterlimit\"; when optimal, then\n"
    "  \"objective Z\" and one \"COLUMN VALUE\" line per column. Exit status 0 for optimal,\n"
    "  infeasible and unbounded alike (answers, not failures); 1 for iterlimit or bad input.\n";

int lp_main(int argc, char **argv) {
    if (argc == 2 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) { fputs(lp_usage, stdout); return 0; }
    if (argc == 2 && argv[1][0] == '-' && argv[1][1]) die("lp: unknown option '%s' (usage: opt lp FILE.mps|-)", argv[1]);
    if (argc != 2) die("usage: opt lp FILE.mps|- (free MPS, - for stdin; prints status, objective and x; see opt lp --help)");
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

/* ============================================================================
 * The cost model: FlexGen's LP (flexgen.md section 4), corrected.
 *
 * One block = gpu_batch_size (g) x num_gpu_batches (k) = b sequences, each with a prompt of s
 * tokens and n generated ones (the first by prefill, n - 1 by decode). The block schedule runs
 * token -> layer -> GPU batch: a layer's weights are fetched once per token step and used by all
 * k batches. For a fixed (g, k, cpu_attention) the model is linear in the placement fractions,
 * so the best placement is an LP; the search enumerates (g, k, cpu_attention) around it.
 *
 * Variables. Fractions wg wc wn (weights), cg cc cn (KV cache), ag ac an (activations: the
 * hidden state of the whole block between layers) on GPU, CPU and disk, each triple summing to
 * 1; FlexGen forces activations onto one tier, we let them split. Times: Tp and Tg, seconds of
 * one transformer layer's step in prefill and decode for the whole block; Ep and Eg, the same
 * for the embedding "layer" (token + position tables, tied to the output head), which FlexGen's
 * LP leaves out although for OPT-6.7B it is as big as a transformer layer.
 * Objective: min  T = l Tp + Ep + (n - 1)(l Tg + Eg)   (b is fixed, so this is min T/b),
 *   plus 1e-4 x every channel's total load (LP_TIE), which breaks ties between placements
 *   that only differ in the load of channels that are not the bottleneck.
 *   Throughput (FlexGen's definitions): prefill b s / (l Tp + Ep), decode b (n - 1) /
 *   ((n - 1)(l Tg + Eg)), total b n / T.
 *
 * Sizes (bytes). h hidden, f ffn, l layers, nh heads, V vocab, e embed dim, G group size (64).
 *   rw = (4 + 32/G)/16 with --compress-weight, else 1: 4-bit codes plus an f16 scale and an f16
 *        minimum per group of G (4.5 bits at G = 64; FlexGen's LP divides by 4, forgetting the
 *        scales). Biases and LayerNorms stay f16.
 *   cb = bytes per cached value: (4 + 32/G)/8 with --compress-cache, else 2 on a GPU (fp16)
 *        and 4 on the CPU-only path (the engine's CPU cache is f32)
 *   x  = bytes per activation value: 2 on a GPU (fp16), 4 on the CPU-only path (f32)
 *   WL = 2 (4h^2 + 2hf) rw + 2 (9h + f)      one layer's weights (matrices, then 1-D tensors)
 *   WE = 2 (V e + (max_pos + 2) h) rw + ...  the embedding tables (+ project_in/out, final LN)
 *   W  = l WL + WE;   kv(t) = 2 h cb t       K and V of t positions, one sequence, one layer
 *   C  = kv(s + n) b l                       the whole cache (room for every position)
 *   Ap = x s h b, Ag = x h b                 the block's hidden state in prefill, decode
 *   Decode attends over s + n/2 positions on average (FlexGen's mean).
 *
 * Time of one step: every channel below is a pipeline stage working on its own stream or
 * thread, double-buffered, so a step takes as long as its slowest channel:
 *   T >= h2d, T >= d2h, T >= disk, T >= compute          (one constraint each)
 * FlexGen writes the prefill that way but, in decode, adds the CPU->GPU weight copy to every
 * other term (Tgen >= ctog + X): weight loading never overlapped compute. We overlap it (fix 1).
 * With --no-overlap (eval only) the channels are summed instead. Disk reads and writes share one
 * device, so they form one channel (FlexGen's LP lets them run in parallel).
 *   h2d   prefill: WL(wc+wn) + Ap(ac+an)                                     / h2d_bw
 *         decode:  WL(wc+wn) + Ag(ac+an) + [no cpu_attention: the off-GPU cache to the GPU]
 *                  kv(s+n/2) b (cc+cn)  or  [cpu_attention: attention output] x h b (cc+cn)
 *         embed:   WE(wc+wn)
 *   d2h   prefill: Ap(ac+an) / d2h_bw + kv(s) b (cc+cn) / d2h_cache_bw    (the prompt's K, V)
 *         decode:  Ag(ac+an) / d2h_bw + kv(1) b (cc+cn) / d2h_cache_bw    (the new K, V)
 *                  + [cpu_attention: q to the CPU] x h b (cc+cn) / d2h_bw   (FlexGen: omitted)
 *   disk  prefill: (WL wn + Ap an) / read + Ap an / write + kv(s) b cn / write_cache
 *         decode:  (WL wn + Ag an + kv(s+n/2) b cn) / read + (Ag an + kv(1) b cn) / write
 *         embed:   WE wn / read
 *   compute, prefill: k [gemm(g s) + 4 g s^2 h / bmm_p + dq + o]
 *         decode:  k [gemm(g) + dq + o]
 *                  + A (cg + (cc+cn) without cpu_attention) (1/bmm_g + [--compress-cache]
 *                    1/gpu_dequant_bw), A = 4 b (s+n/2) h: GPU attention FLOPs = fp16 bytes
 *                  + [cpu_attention] kv(s+n/2) b (cc+cn) / cpu_attn_bw (cpu_attn_q4_bw for a
 *                    4-bit cache: a fused kernel, or FlexGen's decompress-then-attend)
 *         embed:   k [gemm over V x e at g rows + dq + o]  (only the last position's logits)
 *     gemm(M) = max(2 M P / rate(M), bytes of the weights / gpu_mem_bw): a roofline, so that
 *       small batches are bound by reading the weights from device memory, which FlexGen's
 *       single fitted decode rate cannot express. rate(M) interpolates geometrically between
 *       the M = 64 and M >= 512 rates (decode- and prefill-sized GEMMs).
 *     dq = 2P / gpu_dequant_bw with --compress-weight: weights cross PCIe in 4 bits and are
 *       dequantized on the GPU per GPU batch, as FlexGen does (fix 3; its LP had no such term).
 *     o = layer_overhead, per layer and GPU batch.
 *   CPU attention delegation (fix 2): with cpu_attention the heads whose cache lives on the CPU
 *   or disk are attended on the CPU; only q goes down and the attention output comes back, the
 *   cache never crosses PCIe. The CPU's work is added to the GPU's (the decode step waits for
 *   it), as in FlexGen's implementation. On the T4 profile the CPU rate is FlexGen's cpu_flops
 *   (1 FLOP per fp16 cache byte) x max(0.1, 1 + c1 a b - c2 a - c3 b), a = log2(64/g)+,
 *   b = log2(4096/h)+; elsewhere the CPU's GEMV rate (decode attention is a GEMV per head over
 *   the cache's rows). Without cpu_attention the off-GPU cache is copied to the GPU every step,
 *   a case FlexGen's LP cannot express: it always assumed CPU attention.
 *   CPU-only mode (no GPU): no GPU tier (wg = cg = ag = 0), no PCIe; the CPU computes and the
 *   disk is the only other tier. Its step times are built apart (cost_cpu_steps, documented
 *   there), from what was measured against the engine on a 2-vCPU machine (bench/
 *   plan_validate.sh): the engine's GEMM paths (tiled under 64 rows, at the probe's 8-row rate
 *   or the weights' streaming; the lane path's time per weight measured at 64 and 512 rows), its
 *   own attention kernels (over a 4-bit cache ~3x
 *   slower per cached value than over an f32 one), OpenMP parallel regions per layer and batch, the
 *   CPU the I/O threads take for the buffered cache and activation files, the first layer's
 *   weight read that nothing hides, and the logits computed once per block. The probe's figures
 *   are means, not medians, so that a shared machine's slow moments count as they do in the
 *   engine, and its GEMV streams 1 GiB, not a matrix that a large last-level cache holds.
 *
 * Peak memory (fix 5: FlexGen's LP counts one weight buffer and approximates the rest by
 * multiplying capacities by 0.8; we count our own buffers and keep a stated headroom, usable[]):
 *   GPU, both phases: W wg + C cg                          the resident shares
 *         + 2 WL (wc+wn) + WE (wc+wn)      streamed weights: this layer's and the next's buffer
 *         + 2 max(h f, V e) with --compress-weight (the fp16 dequantization workspace)
 *     prefill: + Ap ag + 2 kv(s) g (cc+cn) + 2 x s h g (ac+an) + work(prefill)
 *     decode:  + Ag ag + 2 kv(s+n) g (cc+cn) (only without cpu_attention: the cache buffers of
 *              this batch and the next) + 2 x h g (ac+an) + work(decode)
 *              + 4 h (s+n) g with --compress-cache (one batch-layer dequantized)
 *     work = x g (6 s h + max(nh s^2, s f)) + 4 g V (prefill), x g (6h + max(nh (s+n), f))
 *     + 4 g V (decode): one GPU batch's intermediates (residual, LayerNorm out, q, k, v,
 *     attention out; the scores during attention or the FFN's hidden layer in the MLP; f32
 *     logits). FlexGen sums all of them.
 *   CPU: W wc + C cc + 2 WL wn + WE wn (pinned staging of disk weights, double-buffered)
 *         + 2 WL wc if CPU weights are not pinned (their staging buffers; pinned by default)
 *     prefill: + Ap ac + 2 kv(s) g cn + 2 x s h g an      (staging of disk cache, activations)
 *     decode:  + Ag ac + 2 kv(s+n) g cn + 2 x h g an
 *              + 4 g (nh (s+n) + 3h) with cpu attention (f32 scores, q, output)
 *     CPU-only mode adds work(prefill) / work(decode) here.
 *   Disk: W wn + C cn + Ap an.
 * Each tier's peak must stay under usable x budget; the LP keeps a further 2e-4 of the sum of
 * each row's coefficients in reserve, so that rounding the fractions to 0.01% (and folding a
 * disk share under 0.015% into the larger tier) cannot break a budget.
 *
 * Units (fix 4): the LP works in fractions; plan_search converts them to the percents that
 * Policy and --percent take (FlexGen's search returned fractions where percents were expected),
 * and plan_eval converts back. Every reported number comes from evaluating the rounded policy.
 *
 * The search: g over 1 2 3 4 6 8 12 16 24 ... (powers of two and 1.5x them) up to
 * --max-gpu-batch, k over every integer while g k <= --max-block and k G <= 64 (generate's limit,
 * MAX_GPU_BATCHES, for a pipeline's G groups of k), cpu_attention both ways. Two
 * exact cuts: memory grows with g and k term by term, so the first infeasible k ends that g
 * (and an infeasible k = 1 every larger g); and compute's constant part is k C(g), so no block
 * of g beats g n / C(g): g's are visited best bound first, skipped when the bound cannot beat
 * the best found, and k stops once the bound is met. FlexGen's stop at the first throughput
 * drop in k, which can miss the optimum, is gone. Nothing fits: for the smallest block (1 x 1),
 * an LP per tier finds the least extra budget of that tier alone that makes it fit. On the
 * CPU-only path the search then takes the smallest block within 5% of the best throughput
 * (PLAN_CPU_SLACK): the CPU's throughput curve is flat long before memory runs out, and the
 * largest block would only add waiting (OPT-125m, 512 + 32: block 256 for 2% more than 8).
 *
 * A pipeline stage (PlanReq.embed, output, groups; `opt plan --stages`, below): l is its layers;
 * its embedding "layer" holds the token table if it embeds or applies lm_head (tied), the
 * positions and project_in if it embeds, project_out, the final LayerNorm and lm_head's GEMM and
 * logits if it applies the output; only the output's weights stream (the CPU looks embeddings
 * up), so a stage that only embeds moves nothing for them. A middle stage has no such "layer".
 * It keeps the cache of all its micro-batch groups: C = kv(s + n) b l G.
 *
 * Left out, stated: quantizing the new cache entries (small against attention), the logits'
 * copy (greedy sampling stays on the GPU), CPU memory bandwidth taken by staging copies, the
 * CPU attention overlapping the next batch's GPU work (the engine may do better than this). */

/* ---- hardware profiles ---- */

#define GiB 1073741824.0
#define TiB (1024 * GiB)

/* FlexGen's T4 (GCP: 16 GB T4, Xeon @ 2.00 GHz, 208 GB DRAM, 1.5 TB NVMe). The constants of
 * experimental/cost_model.py, exactly (GB = 2^30, T = 1e12), mapped onto our channels:
 * ctog_bdw -> h2d, gtoc_bdw_hidden -> d2h, gtoc_bdw_cache -> d2h_cache, dtoc_bdw -> disk read,
 * ctod_bdw_hidden_p (= ctod_bdw_g) -> disk write, ctod_bdw_cache_p -> disk write of prefill's
 * cache, mm_flops_g/p -> GEMM at M = 64 / M >= 512, bmm_flops_p/g, cpu_flops and c1..c3.
 * FlexGen has no number for the rest; ours: device memory 250 GB/s (the T4's 320 GB/s spec at a
 * copy kernel's ~80%); GPU dequantization 25 GB/s of fp16 out (FlexGen's decompress is a chain
 * of PyTorch element-wise ops: two nibble shifts, a cat, a cast, a scale, a shift and a copy,
 * ~20 bytes of memory traffic per fp16 value, i.e. 1/10 of 250 GB/s); CPU attention over a
 * 4-bit cache at 1 / (1/cpu_flops + 1/(2 x 20e9)): FlexGen decompresses into its fp32 workspace
 * (20 G values/s, 2 FLOPs a value) where it would otherwise copy, a copy that the fitted
 * cpu_flops already includes; no per-layer overhead (the fitted rates absorb it); and for the
 * CPU-only path, rates typical of a 16-core 2.0 GHz Skylake with 6 DDR4 channels. */
static const Hardware hw_t4 = {
    .name = "t4", .has_gpu = 1,
    .gpu_mem = 16 * GiB, .cpu_mem = 208 * GiB, .disk_mem = 1.5 * TiB,
    .h2d_bw = 12.89 * GiB, .d2h_bw = 4.82 * GiB, .d2h_cache_bw = 0.97 * GiB,
    .disk_read_bw = 0.473 * GiB, .disk_write_bw = 2.015 * GiB, .disk_write_cache_bw = 0.746 * GiB,
    .gpu_mem_bw = 250e9, .gpu_gemm_flops_g = 4.3e12, .gpu_gemm_flops_p = 21.24e12,
    .gpu_bmm_flops_p = 9.97e12, .gpu_bmm_flops_g = 0.079e12, .gpu_dequant_bw = 25e9,
    .cpu_gemv_bw = 20e9, .cpu_gemv_q4_bw = 8e9, .cpu_gemm_flops_g = 0.3e12, .cpu_gemm_flops_p = 0.6e12,
    .cpu_attn_bw = 0.0123e12, .cpu_attn_q4_bw = 4.5 / 16 / (1 / 0.0123e12 + 1 / 40e9),
    .cpu_attn_c = {0.0168, 0.0328, 0.0621}, .cpu_mem_bw = 40e9, .layer_overhead = 0,
};

/* An H100 PCIe host, from published specifications at realistic efficiencies (assumptions, to
 * be replaced by `opt probe` on the machine): PCIe Gen5 x16 is 64 GB/s per direction, pinned
 * copies reach ~50-55 GB/s (52 / 50 here); HBM2e 2.0 TB/s, ~1.6 TB/s achieved; fp16 dense tensor
 * 756 TFLOPS peak at 350 W, large cuBLAS GEMMs ~60% (450 T), M = 64 GEMMs 250 T (the roofline
 * term binds there anyway), prefill attention GEMMs 250 T, decode attention at ~70% of HBM
 * (1 FLOP per cache byte: 1.1e12), a fused 4-bit dequantization 1.2 TB/s of fp16 out. Host: 32
 * cores with AVX-512 and 8 DDR5 channels (~200 GB/s streaming; f16 GEMV 100 GB/s, 4-bit GEMV 40
 * GB/s of 4-bit bytes, fp32 GEMM 0.6 / 1.2 TFLOPS at M = 64 / 512), 256 GiB RAM; one PCIe Gen4
 * datacenter NVMe (6.5-7 GB/s read, 3.5-5 GB/s write spec: 6 / 3.5 GB/s with O_DIRECT), 3.5 TiB;
 * 20 us per layer and GPU batch for ~10 kernel launches and a sync. */
static const Hardware hw_h100 = {
    .name = "h100", .has_gpu = 1,
    .gpu_mem = 80 * GiB, .cpu_mem = 256 * GiB, .disk_mem = 3.5 * TiB,
    .h2d_bw = 52e9, .d2h_bw = 50e9, .d2h_cache_bw = 50e9,
    .disk_read_bw = 6e9, .disk_write_bw = 3.5e9, .disk_write_cache_bw = 3.5e9,
    .gpu_mem_bw = 1.6e12, .gpu_gemm_flops_g = 250e12, .gpu_gemm_flops_p = 450e12,
    .gpu_bmm_flops_p = 250e12, .gpu_bmm_flops_g = 1.1e12, .gpu_dequant_bw = 1.2e12,
    .cpu_gemv_bw = 100e9, .cpu_gemv_q4_bw = 40e9, .cpu_gemm_flops_g = 0.6e12, .cpu_gemm_flops_p = 1.2e12,
    .cpu_attn_bw = 100e9, .cpu_attn_q4_bw = 40e9, .cpu_mem_bw = 200e9, .layer_overhead = 20e-6,
};

/* The probe file: one JSON object, "format": "opt-probe-1", numbers in bytes, bytes/s, FLOP/s and
 * seconds. Keys with gpu = 1 only when "gpu" is true; keys with opt = 1 may be absent (files of
 * earlier probes), and hw_derive then fills them in. */
typedef struct { const char *key; size_t off; int gpu, opt; } ProbeKey;
#define PK(k, g) {#k, offsetof(Hardware, k), g, 0}
#define PKO(k) {#k, offsetof(Hardware, k), 0, 1}
static const ProbeKey probe_keys[] = {
    PK(cpu_mem, 0), PK(disk_mem, 0), PK(disk_read_bw, 0), PK(disk_write_bw, 0),
    PK(cpu_gemv_bw, 0), PK(cpu_gemv_q4_bw, 0), PK(cpu_gemm_flops_g, 0), PK(cpu_gemm_flops_p, 0),
    PK(cpu_mem_bw, 0),
    PK(gpu_mem, 1), PK(h2d_bw, 1), PK(d2h_bw, 1), PK(gpu_mem_bw, 1), PK(gpu_gemm_flops_g, 1),
    PK(gpu_gemm_flops_p, 1), PK(gpu_bmm_flops_p, 1), PK(gpu_bmm_flops_g, 1), PK(gpu_dequant_bw, 1),
    PKO(cpu_gemm_flops_8), PKO(cpu_gemm_q4_flops_8), PKO(cpu_gemm_q4_flops_g), PKO(cpu_gemm_q4_flops_p), PKO(cpu_attn_bw), PKO(cpu_attn_q4_bw),
    PKO(cpu_attn_flops_p), PKO(cpu_attn_q4_flops_p), PKO(cpu_region_s), PKO(io_req_cpu_s),
};
#define PROBE_FORMAT "opt-probe-1"

/* What the probe does not measure separately: cache stores as fast as other copies. What older
 * probe files lack (and the built-in profiles leave at 0): decode attention on the CPU at the
 * GEMV rates (bytes/s), a GEMV per head over the cache's rows; prefill attention and the tiled
 * GEMM path at the M = 64 GEMM rate; 4-bit GEMMs as fast as f16 ones; one parallel region per 16th of the layer
 * overhead (what earlier probes measured: 16 regions); 5 us of CPU per I/O request. */
static void hw_derive(Hardware *hw) {
    hw->d2h_cache_bw = hw->d2h_bw;
    hw->disk_write_cache_bw = hw->disk_write_bw;
    if (!(hw->cpu_attn_bw > 0)) hw->cpu_attn_bw = hw->cpu_gemv_bw;
    if (!(hw->cpu_attn_q4_bw > 0)) hw->cpu_attn_q4_bw = hw->cpu_gemv_q4_bw;
    if (!(hw->cpu_attn_flops_p > 0)) hw->cpu_attn_flops_p = hw->cpu_gemm_flops_g;
    if (!(hw->cpu_attn_q4_flops_p > 0)) hw->cpu_attn_q4_flops_p = hw->cpu_attn_flops_p;
    if (!(hw->cpu_gemm_flops_8 > 0)) hw->cpu_gemm_flops_8 = hw->cpu_gemm_flops_g;
    if (!(hw->cpu_gemm_q4_flops_g > 0)) hw->cpu_gemm_q4_flops_g = hw->cpu_gemm_flops_g;
    if (!(hw->cpu_gemm_q4_flops_8 > 0)) hw->cpu_gemm_q4_flops_8 = hw->cpu_gemm_q4_flops_g / 8;
    if (!(hw->cpu_gemm_q4_flops_p > 0)) hw->cpu_gemm_q4_flops_p = hw->cpu_gemm_flops_p;
    if (!(hw->cpu_region_s > 0) && !hw->has_gpu) hw->cpu_region_s = hw->layer_overhead / 16, hw->layer_overhead = 0;
    if (!(hw->io_req_cpu_s > 0)) hw->io_req_cpu_s = 5e-6;
}

void hw_load(Hardware *hw, const char *spec) {
    if (!strcmp(spec, "t4")) { *hw = hw_t4; return; }
    if (!strcmp(spec, "h100")) { *hw = hw_h100; return; }
    int in = !strcmp(spec, "-"); /* `opt probe | opt plan --hw -` */
    if (in) spec = "<stdin>";
    FILE *f = in ? stdin : fopen(spec, "rb");
    if (!f) {
        if (errno == ENOENT && !strchr(spec, '/') && !strchr(spec, '.'))
            die("unknown --hw '%s': use t4, h100 or a probe file written by `opt probe -o FILE`", spec);
        die("%s: %s (--hw wants t4, h100 or a probe file written by `opt probe -o FILE`)", spec, strerror(errno));
    }
    char *text = NULL;
    size_t len = 0, cap = 0, got;
    do {
        if (len + 4096 > cap) text = check_realloc(text, cap = 2 * cap + 4096, "probe file");
        got = fread(text + len, 1, cap - len, f);
        len += got;
    } while (got > 0 && len < (1 << 20));
    int bad = ferror(f) ? errno : 0;
    if (!in) fclose(f);
    if (bad) die("%s: %s (--hw wants t4, h100 or a probe file)", spec, strerror(bad));
    if (len >= (1 << 20)) die("%s: not a probe file (over 1 MiB)", spec);
    char err[128];
    Json *j = json_parse(text, len, err, sizeof err);
    free(text);
    if (!j) die("%s: corrupt probe file: %s", spec, err);
    const Json *fmt = json_get(j, "format");
    if (j->type != J_OBJ || !fmt || fmt->type != J_STR || strcmp(fmt->str, PROBE_FORMAT))
        die("%s: not a probe file (no \"format\": \"" PROBE_FORMAT "\"; write one with `opt probe -o FILE`)", spec);
    const Json *g = json_get(j, "gpu");
    if (!g || g->type != J_BOOL) die("%s: probe file: \"gpu\" must be true or false", spec);
    memset(hw, 0, sizeof *hw);
    snprintf(hw->name, sizeof hw->name, "%s", spec);
    hw->has_gpu = (int)g->num;
    for (size_t i = 0; i < sizeof probe_keys / sizeof *probe_keys; i++) {
        const ProbeKey *k = &probe_keys[i];
        if (k->gpu && !hw->has_gpu) continue;
        const Json *v = json_get(j, k->key);
        if (!v && k->opt) continue;
        if (!v || v->type != J_NUM || !(v->num > 0) || !isfinite(v->num))
            die("%s: probe file: \"%s\" is missing or not a positive number", spec, k->key);
        *(double *)((char *)hw + k->off) = v->num;
    }
    const Json *o = json_get(j, "layer_overhead");
    if (o && (o->type != J_NUM || !(o->num >= 0) || o->num > 1)) die("%s: probe file: \"layer_overhead\" must be seconds in [0, 1]", spec);
    hw->layer_overhead = o ? o->num : hw->has_gpu ? 20e-6 : 0;
    hw_derive(hw);
    json_free(j);
}

void plan_req_default(PlanReq *r, const Hardware *hw) {
    *r = (PlanReq){.prompt_len = 512, .gen_len = 32, .group_size = 64, .cpu_attention = -1,
                   .max_gpu_batch = 512, .max_block = 4096, .embed = 1, .output = 1, .groups = 1,
                   .budget = {hw->has_gpu ? hw->gpu_mem : 0, hw->cpu_mem, hw->disk_mem},
                   .usable = {0.9, 0.9, 0.95}};
}

/* ---- the model as linear rows ---- */

enum { X_WG, X_WC, X_WN, X_CG, X_CC, X_CN, X_AG, X_AC, X_AN, NF }; /* placement fractions */
enum { T_P, T_G, T_EP, T_EG, NT };                                /* time variables, after them */
enum { CH_H2D, CH_D2H, CH_DISK, CH_COMP, NCH };                   /* channels of a step */
enum { MV_H2D, MV_D2H, MV_READ, MV_WRITE, NMV };                  /* traffic tallies */
enum { PH_PRE, PH_DEC };                                          /* memory peaks */
static const char *const ch_names[NCH] = {"pcie h2d", "pcie d2h", "disk", "compute"};

typedef struct { double c0, a[NF]; } CostLin; /* c0 + sum_j a[j] x[j] */

typedef struct {
    CostLin time[NT][NCH];     /* seconds of one step of each time variable, per channel */
    CostLin cpu_attn[NT];      /* the CPU-attention part of time[][CH_COMP], for reports */
    CostLin moved[NT][NMV];    /* bytes of one step over h2d, d2h, disk read, disk write */
    CostLin mem[TIER_COUNT][2];/* bytes per tier at the prefill and decode peaks */
    double mult[NT];       /* steps per block of each time variable: l, l(n-1), 1, n-1 */
    int gpu;               /* a GPU computes (else the CPU-only path) */
    int overlap;           /* channels overlap (else a step is their sum) */
} CostModel;

static CostLin lin_c(double c) { CostLin l = {.c0 = c}; return l; }
/* v (x_i + x_j); j < 0 for one variable. */
static CostLin lin_x(double v, int i, int j) {
    CostLin l = {0};
    l.a[i] += v;
    if (j >= 0) l.a[j] += v;
    return l;
}
static void lin_add(CostLin *d, double k, CostLin s) {
    d->c0 += k * s.c0;
    for (int j = 0; j < NF; j++) d->a[j] += k * s.a[j];
}
static double lin_at(const CostLin *l, const double *x) {
    double v = l->c0;
    for (int j = 0; j < NF; j++) v += l->a[j] * x[j];
    return v;
}

/* bytes over channel ch at bandwidth bw, tallied as traffic mv. */
static void cost_move(CostModel *M, int t, int ch, int mv, double bw, CostLin bytes) {
    lin_add(&M->time[t][ch], 1 / bw, bytes);
    lin_add(&M->moved[t][mv], 1, bytes);
}

/* Geometric interpolation between the M = 64 and M = 512 GEMM rates. */
static double cost_gemm_rate(double M, double r64, double r512) {
    if (M <= 64) return r64;
    if (M >= 512) return r512;
    return r64 * pow(r512 / r64, log2(M / 64) / 3);
}

/* Seconds of one GPU GEMM of M rows against P weights stored in `bytes` (the roofline). */
static double cost_gemm_time(const Hardware *hw, double M, double P, double bytes) {
    return fmax(2 * M * P / cost_gemm_rate(M, hw->gpu_gemm_flops_g, hw->gpu_gemm_flops_p), bytes / hw->gpu_mem_bw);
}

/* Seconds of one CPU GEMM of M rows against P weights stored in `bytes` (4-bit when q4), as
 * opt.c's gemm() runs it. Under CPU_LANES_M rows (its `lanes` cut-off) the tiled path: each block
 * of 48 weight rows is read from RAM once and kept in L2 while every 4-row tile of x passes over
 * it, so T = bytes / GEMV rate + 2 (M - 1) P / tile rate, the tile rate being the probe's GEMM
 * at M = 8 (a cache-resident matrix: the kernel's own speed): the GEMV streams the weights with
 * one row's FMAs, and every further row adds its FMAs on top, since loads and FMAs share the
 * core's issue slots (2 vCPUs = 2 hyperthreads). (Before: max(bytes / GEMV rate, 2 M P / tile
 * rate), perfect overlap, which put OPT-125m's decode at 4 rows 1.4x faster than measured and
 * had the planner pick 6-row batches at 0.83 of the best.) From CPU_LANES_M rows on, the lane
 * path: x is packed, each weight block widened to f32 and multiplied by outer-product micro-
 * kernels whose efficiency grows with M; its time per weight is measured at M = 64 and 512 and
 * taken linear in M between them, and beyond 512 the rate at 512 (the probe has not seen more).
 * Never faster than streaming the weights. (Before: a geometric interpolation of the FLOP rate
 * between 64 and 512, flat below 64, which put a decode GEMM of 8 rows at 8/64 of the time of
 * 64 rows; the engine's lane path then started at 8 rows and cost a fifth to a half of it.) */
#define CPU_LANES_M 64
static double cost_cpu_gemm(const Hardware *hw, int q4, double M, double P, double bytes) {
    double stream = bytes / (q4 ? hw->cpu_gemv_q4_bw : hw->cpu_gemv_bw);
    double r8 = q4 ? hw->cpu_gemm_q4_flops_8 : hw->cpu_gemm_flops_8, r64 = q4 ? hw->cpu_gemm_q4_flops_g : hw->cpu_gemm_flops_g;
    double r512 = q4 ? hw->cpu_gemm_q4_flops_p : hw->cpu_gemm_flops_p;
    if (M < CPU_LANES_M) return stream + 2 * fmax(0, M - 1) * P / r8;
    if (M >= 512) return fmax(2 * M * P / r512, stream);
    double t0 = 128 / r64, t1 = 1024 / r512;                             /* seconds per weight at 64, 512 */
    return fmax(P * fmax(0, t0 + (t1 - t0) * (M - 64) / 448), stream);
}

/* OpenMP parallel regions the CPU engine opens per layer and GPU batch of `rows` rows (opt.c's
 * layer_forward): one per GEMM (6) and the attention; one more per GEMM to pack its input on
 * the lane path; the two LayerNorms when rows > 4; the 4-bit cache's stores when rows x heads
 * > 64. Each costs the probe's cpu_region_s: waking the other threads and joining them, from a
 * few microseconds to tens (on a VM whose idle vCPUs halt) or more (a busy machine). */
static double cost_cpu_regions(double rows, int nh, int cc) {
    return 7 + (rows > 4 ? 2 : 0) + (rows >= CPU_LANES_M ? 6 : 0) + (cc && rows * nh > 64 ? 1 : 0);
}

typedef struct {
    int gbs, ngb;          /* GPU batch size and number of GPU batches */
    int cpu_attention;     /* attend off-GPU cache on the CPU */
    int pin;               /* CPU-resident weights pinned (no staging buffers) */
    int overlap;           /* channels overlap */
} PlanShape;

/* The CPU-only path (no GPU): the CPU computes and the disk is the only other tier. Per token
 * step the engine (offload.c) runs: the embeddings; layer 1's weights read while nothing else
 * overlaps them; then for each layer l, its GPU batches computed while layer l+1's weights (the
 * output unit's after the last layer) and the next batch's cache and activations are read;
 * then, after offload_forward, the logits of the block's rows, 64 rows at a time. So a step is
 *   R(1) + sum_{l<L} max(C, R(l+1)) + max(C, R_out) + C_logits
 * for R a layer's disk time and C its compute: l - 1 steps of the layer variable (Tp, Tg) plus
 * the embedding variable (Ep, Eg) >= R(1) + C + C_logits and >= R(1) + R_out + C_logits.
 * (FlexGen's shape, l x max(C, R) + max(C_logits, R_out), hid the first read and exposed all of
 * the output unit's; with --no-overlap every term is summed as before.)
 * Compute of a layer and GPU batch of M rows (M = g s in prefill, g in decode):
 *   cost_cpu_gemm(M) over its 6 matrices (f16, or 4-bit with --compress-weight: the fused kernel
 *   reads the 4-bit bytes)
 *   + attention: prefill 2 g s (s+1) h causal FLOPs / cpu_attn_flops_p (cpu_attn_q4_flops_p for
 *     a 4-bit cache, whose new entries are quantized on the way in); decode kv(s+n/2) g /
 *     cpu_attn_bw (cpu_attn_q4_bw): both measured on the engine's own attention. (Earlier: the
 *     GEMV rates, here ~2x too fast for an f32 cache and ~20x for a 4-bit one, whose rows of
 *     head_dim values dequantize far slower than a long weight row.)
 *   + cost_cpu_regions(M) parallel regions x cpu_region_s, + layer_overhead (0 from the probe)
 *   + the CPU that the I/O threads take from it: io_req_cpu_s per request and a copy through
 *     the page cache (2 bytes of RAM traffic per byte at cpu_mem_bw) for the cache's and the
 *     activations' disk share, which offload.c reads and writes with buffered I/O: per (sequence,
 *     head) area on disk 2 reads and 2 writes per decode step (prefill: 2 writes), per GPU batch
 *     with activations on disk 1 read and 1 write (counted as 2 an). The weights' disk share is
 *     read with O_DIRECT in requests of up to 8 MiB: no copy, few requests; not counted.
 *   Two vCPUs and two compute threads: the I/O threads' CPU delays the compute as much as it
 *   takes.
 * Disk channel of a layer (whole block): WL wn / read; decode: the cache's read kv(s+n/2) b cn
 *   / read, its writes / write where, for an f32 cache, the engine writes the new position's
 *   whole key block (16 positions, the keys are stored transposed in blocks) and its value row:
 *   17 x 4 bytes x h per sequence, not kv(1); prefill: kv(s) b cn / write; activations A an each
 *   way. (The files of the cache and the activations are buffered: while RAM has room their
 *   reads come from the page cache, faster than this; the model keeps the device's rate, which
 *   is what is left when RAM is short, the case the disk tier is for.)
 * Logits: the output unit's disk share R_out = 2 (V e + proj_out) rw wn / read; C_logits =
 *   cost_cpu_gemm over V x e for each group of up to 64 of the block's b rows (the engine
 *   computes them after offload_forward, for the whole block at once, not per GPU batch). */
static void cost_cpu_steps(CostModel *M, const Config *c, const Hardware *hw, const PlanReq *rq, const PlanShape *sh,
                           double WL, double kv1, double ctx) {
    double h = c->hidden, f = c->ffn, l = c->n_layer, nh = c->n_head, V = c->vocab, e = c->embed_dim;
    double s = rq->prompt_len, n = rq->gen_len, g = sh->gbs, k = sh->ngb, b = g * k, G = rq->group_size;
    int cw = rq->compress_weight, cc = rq->compress_cache, ov = sh->overlap;
    double rw = cw ? (4 + 32 / G) / 16 : 1, PL = 4 * h * h + 2 * h * f, wbytes = 2 * PL * rw;
    double rd = hw->disk_read_bw, wr = hw->disk_write_bw, copy = 2 / hw->cpu_mem_bw, req = hw->io_req_cpu_s;
    double Ao = rq->output ? 2 * (V * e + (e != h ? e * h : 0)) * rw : 0; /* the output unit's bytes */
    if (ov) M->mult[T_P] = l - 1, M->mult[T_G] = (l - 1) * (n - 1);
    CostLin layer[2] = {{0}}, disk[2] = {{0}};                          /* one layer's compute and disk */
    for (int ph = 0; ph < 2; ph++) {
        int pre = ph == 0, t = pre ? T_P : T_G, te = pre ? T_EP : T_EG;
        double rows = pre ? g * s : g, A = 4 * h * g * (pre ? s : 1);  /* one batch's activations, f32 */
        /* compute of one GPU batch, then k of them */
        double att = pre ? 2 * g * s * (s + 1) * h / (cc ? hw->cpu_attn_q4_flops_p : hw->cpu_attn_flops_p)
                         : kv1 * ctx * g / (cc ? hw->cpu_attn_q4_bw : hw->cpu_attn_bw);
        double fixed = cost_cpu_gemm(hw, cw, rows, PL, wbytes) + att + cost_cpu_regions(rows, (int)nh, cc) * hw->cpu_region_s
                     + hw->layer_overhead;
        double kw = pre ? kv1 * s * g : cc ? kv1 * g : 17 * 4 * h * g;    /* cache bytes written per batch */
        double kr = pre ? 0 : kv1 * ctx * g;                             /* and read */
        double areas = g * nh, nreq = (pre ? 2 : 4) * areas;
        CostLin cb = lin_c(fixed);
        lin_add(&cb, 1, lin_x(nreq * req + (kr + kw) * copy, X_CN, -1));
        lin_add(&cb, 1, lin_x(2 * req + 2 * A * copy, X_AN, -1));
        lin_add(&layer[ph], k, cb);
        if (!pre) lin_add(&M->cpu_attn[t], k, lin_c(att));
        /* disk of one layer (k batches), counted as traffic too */
        CostLin *dk = &disk[ph];
        lin_add(dk, 1 / rd, lin_x(WL, X_WN, -1));
        lin_add(&M->moved[t][MV_READ], 1, lin_x(WL, X_WN, -1));
        lin_add(dk, 1 / rd + 1 / wr, lin_x(k * A, X_AN, -1));
        lin_add(&M->moved[t][MV_READ], 1, lin_x(k * A, X_AN, -1));
        lin_add(&M->moved[t][MV_WRITE], 1, lin_x(k * A, X_AN, -1));
        lin_add(dk, k / rd, lin_x(kr, X_CN, -1));
        lin_add(&M->moved[t][MV_READ], k, lin_x(kr, X_CN, -1));
        lin_add(dk, k / wr, lin_x(kw, X_CN, -1));
        lin_add(&M->moved[t][MV_WRITE], k, lin_x(kw, X_CN, -1));
        lin_add(&M->time[t][CH_COMP], 1, layer[ph]);
        lin_add(&M->time[t][CH_DISK], 1, *dk);
        /* the embedding "layer": the first read, the last layer against the output unit, logits */
        double logits = 0;
        for (double r0 = 0; rq->output && r0 < b; r0 += 64) logits += cost_cpu_gemm(hw, cw, fmin(64, b - r0), V * e, 2 * V * e * rw);
        CostLin first = lin_x(WL / rd, X_WN, -1), out = lin_x(Ao / rd, X_WN, -1);
        lin_add(&M->moved[te][MV_READ], 1, lin_x(Ao, X_WN, -1));
        if (ov) { /* the first layer's read, then the last layer (its "next" read is the output unit) */
            lin_add(&M->time[te][CH_COMP], 1, first);
            lin_add(&M->time[te][CH_COMP], 1, layer[ph]);
            lin_add(&M->time[te][CH_COMP], 1, lin_c(logits));
            lin_add(&M->time[te][CH_DISK], 1, *dk);
            lin_add(&M->time[te][CH_DISK], 1, out);
            lin_add(&M->time[te][CH_DISK], 1, lin_c(logits));
            for (int mv = 0; mv < NMV; mv++) lin_add(&M->moved[te][mv], 1, M->moved[t][mv]);
            if (!pre) lin_add(&M->cpu_attn[te], k, lin_c(att));
        } else {
            lin_add(&M->time[te][CH_COMP], 1, lin_c(logits));
            lin_add(&M->time[te][CH_DISK], 1, out);
        }
    }
}

static void cost_build(CostModel *M, const Config *c, const Hardware *hw, const PlanReq *rq, const PlanShape *sh) {
    memset(M, 0, sizeof *M);
    int gpu = M->gpu = hw->has_gpu;
    M->overlap = sh->overlap;
    double h = c->hidden, f = c->ffn, l = c->n_layer, nh = c->n_head, V = c->vocab, e = c->embed_dim;
    double s = rq->prompt_len, n = rq->gen_len, g = sh->gbs, k = sh->ngb, b = g * k, G = rq->group_size;
    int cw = rq->compress_weight, cc = rq->compress_cache, ca = gpu && sh->cpu_attention;
    double rw = cw ? (4 + 32 / G) / 16 : 1;                              /* of fp16 weight bytes */
    double cb = cc ? (4 + 32 / G) / 8 : gpu ? 2 : 4;                     /* bytes per cached value */
    double PL = 4 * h * h + 2 * h * f;                                   /* matrix weights of a layer */
    double WL = 2 * PL * rw + 2 * ((c->bias ? 5 * h + f : 0) + (c->ln_affine ? 4 * h : 0));
    /* the embedding "layer" of a pipeline stage: the token table if it embeds or applies lm_head
     * (tied), positions and project_in if it embeds, project_out and the final LayerNorm if it
     * applies the output; only the output's weights stream (the CPU looks the embeddings up) */
    int has_in = rq->embed, has_out = rq->output;
    double PE = (has_in || has_out ? V * e : 0) + (has_in ? (c->max_pos + 2.0) * h : 0) + (e != h ? (has_in + has_out) * e * h : 0);
    double WE = 2 * PE * rw + (has_out && c->final_ln && c->ln_affine ? 4 * h : 0), WEm = has_out ? WE : 0;
    double W = l * WL + WE;
    double kv1 = 2 * h * cb, ctx = s + n / 2, ctxm = s + n;            /* kv bytes per position */
    double C = kv1 * ctxm * b * l * rq->groups;
    double x = gpu ? 2 : 4;                                              /* bytes per activation */
    double Ap = x * s * h * b, Ag = x * h * b;
    M->mult[T_P] = l, M->mult[T_G] = l * (n - 1), M->mult[T_EP] = 1, M->mult[T_EG] = n - 1;

    if (!gpu) {
        cost_cpu_steps(M, c, hw, rq, sh, WL, kv1, ctx);
        goto peaks;
    }
    /* transfers */
    for (int t = 0; t < NT; t++) {
        int emb = t == T_EP || t == T_EG, pre = t == T_P;
        double A = pre ? Ap : Ag;
        if (emb) {
            if (gpu) cost_move(M, t, CH_H2D, MV_H2D, hw->h2d_bw, lin_x(WEm, X_WC, X_WN));
            cost_move(M, t, CH_DISK, MV_READ, hw->disk_read_bw, lin_x(WEm, X_WN, -1));
            continue;
        }
        if (gpu) {
            cost_move(M, t, CH_H2D, MV_H2D, hw->h2d_bw, lin_x(WL, X_WC, X_WN));
            cost_move(M, t, CH_H2D, MV_H2D, hw->h2d_bw, lin_x(A, X_AC, X_AN));
            cost_move(M, t, CH_D2H, MV_D2H, hw->d2h_bw, lin_x(A, X_AC, X_AN));
            if (pre) {
                cost_move(M, t, CH_D2H, MV_D2H, hw->d2h_cache_bw, lin_x(kv1 * s * b, X_CC, X_CN));
            } else {
                cost_move(M, t, CH_D2H, MV_D2H, hw->d2h_cache_bw, lin_x(kv1 * b, X_CC, X_CN));
                if (ca) {
                    cost_move(M, t, CH_D2H, MV_D2H, hw->d2h_bw, lin_x(x * h * b, X_CC, X_CN));
                    cost_move(M, t, CH_H2D, MV_H2D, hw->h2d_bw, lin_x(x * h * b, X_CC, X_CN));
                } else {
                    cost_move(M, t, CH_H2D, MV_H2D, hw->h2d_bw, lin_x(kv1 * ctx * b, X_CC, X_CN));
                }
            }
        }
        cost_move(M, t, CH_DISK, MV_READ, hw->disk_read_bw, lin_x(WL, X_WN, -1));
        cost_move(M, t, CH_DISK, MV_READ, hw->disk_read_bw, lin_x(A, X_AN, -1));
        cost_move(M, t, CH_DISK, MV_WRITE, hw->disk_write_bw, lin_x(A, X_AN, -1));
        if (pre) {
            cost_move(M, t, CH_DISK, MV_WRITE, hw->disk_write_cache_bw, lin_x(kv1 * s * b, X_CN, -1));
        } else {
            cost_move(M, t, CH_DISK, MV_READ, hw->disk_read_bw, lin_x(kv1 * ctx * b, X_CN, -1));
            cost_move(M, t, CH_DISK, MV_WRITE, hw->disk_write_bw, lin_x(kv1 * b, X_CN, -1));
        }
    }

    /* compute: GEMMs, dequantization and overhead per GPU batch, then attention */
    double o = hw->layer_overhead;
    double dq = gpu && cw ? 2 * PL / hw->gpu_dequant_bw : 0, dqe = gpu && cw ? 2 * V * e / hw->gpu_dequant_bw : 0;
    double wbytes = gpu || !cw ? 2 * PL : 2 * PL * rw, ebytes = gpu || !cw ? 2 * V * e : 2 * V * e * rw;
    double mm_p = cost_gemm_time(hw, g * s, PL, wbytes), mm_g = cost_gemm_time(hw, g, PL, wbytes);
    double mm_e = cost_gemm_time(hw, g, V * e, ebytes);
    double bmm_p = gpu ? hw->gpu_bmm_flops_p : hw->cpu_gemm_flops_g;     /* small per-head GEMMs */
    lin_add(&M->time[T_P][CH_COMP], k, lin_c(mm_p + 4 * g * s * s * h / bmm_p + dq + o));
    lin_add(&M->time[T_G][CH_COMP], k, lin_c(mm_g + dq + o));
    double te = has_out ? mm_e + dqe + o : has_in ? o : 0;
    lin_add(&M->time[T_EP][CH_COMP], k, lin_c(te));
    lin_add(&M->time[T_EG][CH_COMP], k, lin_c(te));
    double aw = 4 * b * ctx * h;                                         /* decode attention FLOPs */
    double cpu_attn = cc ? hw->cpu_attn_q4_bw : hw->cpu_attn_bw;
    if (hw->cpu_attn_c[0] || hw->cpu_attn_c[1] || hw->cpu_attn_c[2]) {  /* FlexGen's T4 fit */
        double a = fmax(0, log2(64 / g)), bb = fmax(0, log2(4096 / h));
        cpu_attn *= fmax(0.1, 1 + hw->cpu_attn_c[0] * a * bb - hw->cpu_attn_c[1] * a - hw->cpu_attn_c[2] * bb);
    }
    double t_cpu = kv1 * ctx * b / cpu_attn;                           /* reads K and V once */
    if (gpu) {
        double t_gpu = aw / hw->gpu_bmm_flops_g + (cc ? aw / hw->gpu_dequant_bw : 0);
        lin_add(&M->time[T_G][CH_COMP], 1, ca ? lin_x(t_gpu, X_CG, -1) : lin_c(t_gpu));
        if (ca) {
            lin_add(&M->time[T_G][CH_COMP], 1, lin_x(t_cpu, X_CC, X_CN));
            lin_add(&M->cpu_attn[T_G], 1, lin_x(t_cpu, X_CC, X_CN));
        }
    } else {
        lin_add(&M->time[T_G][CH_COMP], 1, lin_c(t_cpu));
        lin_add(&M->cpu_attn[T_G], 1, lin_c(t_cpu));
    }

peaks:; /* a label before a declaration: C23, or this empty statement */
    /* memory peaks */
    /* one GPU batch's intermediates: the residual stream, LayerNorm output, q, k, v and the
     * attention output live through attention, the scores (nh s^2, not a fused kernel's tiles)
     * only within it and the FFN's hidden layer only within the MLP; f32 logits at the end */
    double ws_p = x * g * (6 * s * h + fmax(nh * s * s, s * f)) + 4 * g * V * has_out;
    double ws_g = x * g * (6 * h + fmax(nh * ctxm, f)) + 4 * g * V * has_out;
    double dq_ws = cw ? 2 * fmax(h * f, V * e * has_out) : 0;
    for (int ph = 0; ph < 2; ph++) {
        int pre = ph == PH_PRE;
        double A = pre ? Ap : Ag, sp = pre ? s : 1;                    /* positions per batch step */
        CostLin *m = M->mem[TIER_GPU];
        if (gpu) {
            lin_add(&m[ph], 1, lin_x(W, X_WG, -1));
            lin_add(&m[ph], 1, lin_x(C, X_CG, -1));
            lin_add(&m[ph], 1, lin_x(2 * WL + WEm, X_WC, X_WN));
            lin_add(&m[ph], 1, lin_x(A, X_AG, -1));
            lin_add(&m[ph], 1, lin_x(2 * x * sp * h * g, X_AC, X_AN));
            lin_add(&m[ph], 1, lin_c(dq_ws + (pre ? ws_p : ws_g)));
            if (pre) lin_add(&m[ph], 1, lin_x(2 * kv1 * s * g, X_CC, X_CN));
            else if (!ca) lin_add(&m[ph], 1, lin_x(2 * kv1 * ctxm * g, X_CC, X_CN));
            if (!pre && cc) lin_add(&m[ph], 1, lin_c(4 * h * ctxm * g));
        }
        m = M->mem[TIER_CPU];
        lin_add(&m[ph], 1, lin_x(W, X_WC, -1));
        lin_add(&m[ph], 1, lin_x(C, X_CC, -1));
        lin_add(&m[ph], 1, lin_x(2 * WL + WEm, X_WN, -1));
        if (!sh->pin && gpu) lin_add(&m[ph], 1, lin_x(2 * WL, X_WC, -1));
        lin_add(&m[ph], 1, lin_x(A, X_AC, -1));
        lin_add(&m[ph], 1, lin_x(2 * kv1 * (pre ? s : ctxm) * g, X_CN, -1));
        lin_add(&m[ph], 1, lin_x(2 * x * sp * h * g, X_AN, -1));
        if (!pre && (ca || !gpu)) lin_add(&m[ph], 1, lin_c(4 * g * (nh * ctxm + 3 * h)));
        if (!gpu) lin_add(&m[ph], 1, lin_c(pre ? ws_p : ws_g));
        m = M->mem[TIER_DISK];
        lin_add(&m[ph], 1, lin_x(W, X_WN, -1));
        lin_add(&m[ph], 1, lin_x(C, X_CN, -1));
        lin_add(&m[ph], 1, lin_x(Ap, X_AN, -1));
    }
}

/* The time of one step of variable t at placement x: the slowest channel, or their sum. */
static double cost_step(const CostModel *M, int t, const double *x, int *bound) {
    double v = 0, best = -1;
    for (int ch = 0; ch < NCH; ch++) {
        double u = lin_at(&M->time[t][ch], x);
        if (u > best) best = u, *bound = ch;
        v = M->overlap ? fmax(v, u) : v + u;
    }
    return v;
}

/* Percents (the CLI's unit) to the model's fractions; the disk gets what is left. */
static void plan_fractions(const Policy *p, double *x) {
    x[X_WG] = p->w_gpu / 100, x[X_WC] = p->w_cpu / 100, x[X_WN] = fmax(0, 100 - p->w_gpu - p->w_cpu) / 100;
    x[X_CG] = p->c_gpu / 100, x[X_CC] = p->c_cpu / 100, x[X_CN] = fmax(0, 100 - p->c_gpu - p->c_cpu) / 100;
    x[X_AG] = p->a_gpu / 100, x[X_AC] = p->a_cpu / 100, x[X_AN] = fmax(0, 100 - p->a_gpu - p->a_cpu) / 100;
}

/* Bottleneck description, e.g. "compute (cpu attention 81%)". */
static void cost_bound_name(char *out, size_t cap, const CostModel *M, int t, int ch, const double *x) {
    if (ch != CH_COMP) { snprintf(out, cap, "%s", ch_names[ch]); return; }
    double all = lin_at(&M->time[t][CH_COMP], x), cpu = lin_at(&M->cpu_attn[t], x);
    if (!M->gpu) snprintf(out, cap, "cpu compute");
    else if (cpu > 0.005 * all) snprintf(out, cap, "compute (cpu attention %.0f%%)", 100 * cpu / all);
    else snprintf(out, cap, "gpu compute");
}

static void cost_eval(const CostModel *M, const PlanReq *rq, int block, const double *x, PlanResult *r) {
    double T[NT];
    int bound[NT];
    for (int t = 0; t < NT; t++) T[t] = cost_step(M, t, x, &bound[t]);
    r->t_prefill = M->mult[T_P] * T[T_P] + M->mult[T_EP] * T[T_EP];
    r->t_decode = M->mult[T_G] * T[T_G] + M->mult[T_EG] * T[T_EG];
    r->tput_prefill = block * (double)rq->prompt_len / r->t_prefill;
    r->tput_decode = rq->gen_len > 1 ? block * (rq->gen_len - 1.0) / r->t_decode : 0;
    r->tput_total = block * (double)rq->gen_len / (r->t_prefill + r->t_decode);
    r->feasible = 1;
    for (int tier = 0; tier < TIER_COUNT; tier++) {
        r->peak[tier] = fmax(lin_at(&M->mem[tier][0], x), lin_at(&M->mem[tier][1], x));
        if (r->peak[tier] > rq->usable[tier] * rq->budget[tier] * (1 + 1e-12)) r->feasible = 0;
    }
    for (int v = 0; v < NMV; v++) {
        r->moved[v] = 0;
        for (int t = 0; t < NT; t++) r->moved[v] += M->mult[t] * lin_at(&M->moved[t][v], x);
    }
    cost_bound_name(r->bound_prefill, sizeof r->bound_prefill, M, T_P, bound[T_P], x);
    cost_bound_name(r->bound_decode, sizeof r->bound_decode, M, T_G, bound[T_G], x);
    for (int tier = 0; tier < TIER_COUNT; tier++) r->need[tier] = NAN;
}

/* Validates percents (as the runtime will) and dies naming the offending field. */
static void plan_policy_check(const Policy *p, int has_gpu) {
    const double v[6] = {p->w_gpu, p->w_cpu, p->c_gpu, p->c_cpu, p->a_gpu, p->a_cpu};
    static const char *const what[3] = {"weights", "cache", "activations"};
    for (int i = 0; i < 6; i++)
        if (!(v[i] >= 0 && v[i] <= 100)) die("--percent: %g is not a percentage in [0, 100]", v[i]);
    for (int i = 0; i < 3; i++) {
        if (v[2 * i] + v[2 * i + 1] > 100 + 1e-9) die("--percent: the GPU and CPU shares of the %s add up to %g%% (> 100)", what[i], v[2 * i] + v[2 * i + 1]);
        if (!has_gpu && v[2 * i] > 0) die("--percent: %g%% of the %s on a GPU, but the hardware has none", v[2 * i], what[i]);
    }
    if (p->gpu_batch_size < 1 || p->num_gpu_batches < 1) die("policy: --gpu-batch-size and --num-gpu-batches must be at least 1");
    if ((long)p->gpu_batch_size * p->num_gpu_batches > 1 << 20) /* --max-block's bound; the cost model counts a block in int */
        die("policy: a block of %ld sequences (--gpu-batch-size x --num-gpu-batches), more than 1048576", (long)p->gpu_batch_size * p->num_gpu_batches);
}

void plan_eval(const Config *c, const Hardware *hw, const PlanReq *req, const Policy *p, PlanResult *res) {
    plan_policy_check(p, hw->has_gpu);
    PlanReq rq = *req;
    rq.compress_weight = p->compress_weight, rq.compress_cache = p->compress_cache;
    if (p->group_size > 0) rq.group_size = p->group_size;
    PlanShape sh = {p->gpu_batch_size, p->num_gpu_batches, p->cpu_attention, p->pin_weights, p->overlap};
    CostModel M;
    cost_build(&M, c, hw, &rq, &sh);
    double x[NF];
    plan_fractions(p, x);
    memset(res, 0, sizeof *res);
    cost_eval(&M, &rq, sh.gbs * sh.ngb, x, res);
}

/* ---- the LP for one shape ---- */

#define NV (NF + NT)        /* LP columns: fractions, then the time variables */
#define NROW (NT * NCH + 2 * TIER_COUNT + 3 + 1)
#define NW (NV + TIER_COUNT)   /* row width: then one slack column per tier (extra budget) */

typedef struct {
    double A[NROW * NW];         /* (m, NW) rows; the last TIER_COUNT columns are budget slacks */
    double b[NROW];              /* right-hand sides */
    char sense[NROW];            /* '<' or '=' */
    int m;                       /* rows used */
} LpRows;

static void lprows_add(LpRows *L, const double *a, int na, char sense, double rhs) {
    double *row = L->A + (size_t)L->m * NW;
    memset(row, 0, NW * sizeof(double));
    memcpy(row, a, na * sizeof(double));
    L->sense[L->m] = sense, L->b[L->m++] = rhs;
}

/* Weight of the tie-breaking load term against the objective: it can cost at most ~4e-4 of the
 * predicted time (four channels), which the evaluation of the chosen policy then reports. */
#define LP_TIE 1e-4

/* Byte rows go to the LP in GiB so that every row is O(1) before the solver's own scaling. */
#define LP_BYTES GiB

/* Memory rows of M against the usable budgets; each tier in the bit mask `slack` gets its
 * column NV + tier (an extra budget for that tier, in GiB). Returns 0 when a row cannot hold
 * even with every fraction at 0 and no slack (a shortcut the LP would also find). */
static int lprows_mem(LpRows *L, const CostModel *M, const PlanReq *rq, int slack) {
    for (int tier = 0; tier < TIER_COUNT; tier++) {
        if (tier == TIER_GPU && !M->gpu) continue;
        for (int ph = 0; ph < 2; ph++) {
            const CostLin *r = &M->mem[tier][ph];
            double a[NW] = {0}, sum = 0;
            for (int j = 0; j < NF; j++) a[j] = r->a[j] / LP_BYTES, sum += fabs(r->a[j]);
            if (slack >> tier & 1) a[NV + tier] = -1;
            /* reserve: rounding to 0.01% (5e-5) and folding a disk share under 0.015% into
             * another tier move each fraction by < 2e-4 */
            double rhs = (rq->usable[tier] * rq->budget[tier] - r->c0 - 2e-4 * sum) / LP_BYTES;
            int any = 0;
            for (int j = 0; j < NW; j++) any |= a[j] != 0;
            if (!any) {
                if (rhs < 0) return 0;
                continue;
            }
            lprows_add(L, a, NW, '<', rhs);
        }
    }
    return 1;
}

static void lprows_sums(LpRows *L) {
    for (int i = 0; i < 3; i++) {
        double a[NV] = {0};
        a[3 * i] = a[3 * i + 1] = a[3 * i + 2] = 1;
        lprows_add(L, a, NV, '=', 1);
    }
}

static void cost_bounds(const CostModel *M, double *lo, double *hi, int ncol) {
    for (int j = 0; j < ncol; j++) lo[j] = 0, hi[j] = j < NF ? 1 : INFINITY;
    if (!M->gpu) hi[X_WG] = hi[X_CG] = hi[X_AG] = 0;
}

/* Solves the placement LP of one shape; fills x (NF fractions) and returns the LP status. */
static LpStatus cost_solve(const CostModel *M, const PlanReq *rq, double *x) {
    LpRows L;
    L.m = 0;
    if (!lprows_mem(&L, M, rq, 0)) return LP_INFEASIBLE;
    lprows_sums(&L);
    for (int t = 0; t < NT; t++) {
        if (M->overlap) {
            for (int ch = 0; ch < NCH; ch++) { /* c0 + a.x <= T_t */
                const CostLin *r = &M->time[t][ch];
                double a[NV] = {0};
                int any = r->c0 != 0;
                for (int j = 0; j < NF; j++) a[j] = r->a[j], any |= r->a[j] != 0;
                if (!any) continue;
                a[NF + t] = -1;
                lprows_add(&L, a, NV, '<', -r->c0);
            }
        } else {
            CostLin sum = {0};
            for (int ch = 0; ch < NCH; ch++) lin_add(&sum, 1, M->time[t][ch]);
            double a[NV] = {0};
            for (int j = 0; j < NF; j++) a[j] = sum.a[j];
            a[NF + t] = -1;
            lprows_add(&L, a, NV, '<', -sum.c0);
        }
    }
    /* lprows_add wrote NW wide rows; compact to NV columns for the solver */
    double A[NROW * NV], c[NV] = {0}, lo[NV], hi[NV], sol[NV];
    for (int i = 0; i < L.m; i++) memcpy(A + i * NV, L.A + (size_t)i * NW, NV * sizeof(double));
    for (int t = 0; t < NT; t++) c[NF + t] = M->mult[t];
    /* Ties: the objective only sees each step's slowest channel, so placements that load the
     * others more (weights on disk while the GPU computes) would tie. A small cost on every
     * channel's total load picks, among (near-)optimal placements, the one that moves least. */
    for (int t = 0; t < NT; t++)
        for (int ch = 0; ch < NCH; ch++)
            for (int j = 0; j < NF; j++) c[j] += LP_TIE * M->mult[t] * M->time[t][ch].a[j];
    cost_bounds(M, lo, hi, NV);
    Lp lp = {.m = L.m, .n = NV, .A = A, .b = L.b, .sense = L.sense, .c = c, .lo = lo, .hi = hi};
    LpStatus st = lp_solve(&lp, sol, NULL);
    if (st == LP_OPTIMAL) memcpy(x, sol, NF * sizeof(double));
    return st;
}

/* The least extra budgets (bytes, into extra[]) of the tiers in the bit mask `slack` that make
 * M's memory rows feasible: one tier alone, or several lexicographically (least GPU memory,
 * then least CPU memory with that GPU, then least disk), one LP per tier, since weighting them
 * in one objective would let the solver's tolerance swallow the cheaper tiers. Returns 0, or
 * -1 when no amount on those tiers does. */
static int cost_min_extra(const CostModel *M, const PlanReq *rq, int slack, double *extra) {
    LpRows L;
    L.m = 0;
    /* a slack column keeps every row of its tier; a constant row of another tier over its
     * budget makes lprows_mem fail, and then nothing on these tiers helps */
    if (!lprows_mem(&L, M, rq, slack)) return -1;
    lprows_sums(&L);
    double c[NW], lo[NW], hi[NW], sol[NW];
    cost_bounds(M, lo, hi, NW);
    for (int t = 0; t < NT; t++) hi[NF + t] = 0; /* times play no part */
    for (int t = 0; t < TIER_COUNT; t++) lo[NV + t] = 0, hi[NV + t] = slack >> t & 1 ? INFINITY : 0;
    for (int t = 0; t < TIER_COUNT; t++) {
        if (!(slack >> t & 1)) {
            extra[t] = 0;
            continue;
        }
        memset(c, 0, sizeof c);
        c[NV + t] = 1;
        Lp lp = {.m = L.m, .n = NW, .A = L.A, .b = L.b, .sense = L.sense, .c = c, .lo = lo, .hi = hi};
        if (lp_solve(&lp, sol, NULL) != LP_OPTIMAL) return -1;
        extra[t] = sol[NV + t] * LP_BYTES;
        hi[NV + t] = sol[NV + t] + 1e-6; /* keep this tier at its least (+1 KiB) for the next */
    }
    return 0;
}

/* ---- the search ---- */

/* Fractions to the percents the CLI takes, to 0.01%; the disk share is what is left. */
static void plan_percents(const double *x, Policy *p) {
    double v[6] = {x[X_WG], x[X_WC], x[X_CG], x[X_CC], x[X_AG], x[X_AC]};
    for (int i = 0; i < 6; i++) v[i] = round(fmin(fmax(v[i], 0), 1) * 1e4) / 100;
    for (int i = 0; i < 3; i++) {
        if (v[2 * i] + v[2 * i + 1] > 100) v[2 * i + 1] = 100 - v[2 * i];
        /* a disk share under 0.01% is rounding noise: give it to the larger tier */
        double rest = 100 - v[2 * i] - v[2 * i + 1];
        if (rest > 0 && rest < 0.015) v[2 * i + (v[2 * i + 1] >= v[2 * i])] += rest;
    }
    p->w_gpu = v[0], p->w_cpu = v[1], p->c_gpu = v[2], p->c_cpu = v[3], p->a_gpu = v[4], p->a_cpu = v[5];
}

/* GPU batch sizes tried: powers of two and 1.5x them (1 2 3 4 6 8 12 16 24 32 48 ...), a finer
 * grid than FlexGen's doublings, so that e.g. its 48 and 72-like batches are reachable. */
static int plan_gbs_next(int g) { return g < 2 ? g + 1 : (g & (g - 1)) ? g / 3 * 4 : g / 2 * 3; }

/* The budget at which usable x budget covers the old usable part plus `extra` bytes, rounded
 * up to 0.1 GiB. */
static double plan_budget_for(const PlanReq *rq, int tier, double extra) {
    if (extra <= 0) return rq->budget[tier];
    double b = rq->budget[tier] + (extra + 1e-3 * GiB) / rq->usable[tier];
    return ceil(b / (0.1 * GiB)) * 0.1 * GiB;
}

/* Nothing fits: the smallest block (1 x 1) is the least memory any policy needs, so its least
 * extra budgets are what to ask for: per tier alone, else all tiers together, in turn: the
 * least GPU budget (rounded up), then the least CPU budget given that one, then the disk. */
static void plan_need(const Config *c, const Hardware *hw, const PlanReq *rq, PlanResult *res) {
    int any = 0, all = (1 << TIER_COUNT) - 1 - (hw->has_gpu ? 0 : 1 << TIER_GPU), nca = hw->has_gpu ? 2 : 1;
    CostModel M[2];
    for (int ca = 0; ca < nca; ca++) {
        PlanShape sh = {1, 1, ca, 1, 1};
        cost_build(&M[ca], c, hw, rq, &sh);
    }
    int ok_ca[2] = {rq->cpu_attention != 1, nca > 1 && rq->cpu_attention != 0};
    for (int t = 0; t < TIER_COUNT; t++) {
        res->need[t] = INFINITY;
        for (int ca = 0; ca < nca; ca++) {
            double extra[TIER_COUNT];
            if (!(all >> t & 1) || !ok_ca[ca] || cost_min_extra(&M[ca], rq, 1 << t, extra)) continue;
            res->need[t] = fmin(res->need[t], plan_budget_for(rq, t, extra[t]));
            any = 1;
        }
    }
    if (any) return;
    PlanReq r2 = *rq;
    for (int t = 0; t < TIER_COUNT; t++) {
        if (!(all >> t & 1)) continue;
        double least = INFINITY, extra[TIER_COUNT];
        for (int ca = 0; ca < nca; ca++) /* this tier and the later ones may grow */
            if (ok_ca[ca] && !cost_min_extra(&M[ca], &r2, all & ~((1 << t) - 1), extra)) least = fmin(least, extra[t]);
        if (!isfinite(least)) return; /* nothing helps: need[] stays INFINITY */
        res->need[t] = r2.budget[t] = plan_budget_for(&r2, t, least);
    }
    res->need_joint = 1;
    for (int t = 0; t < TIER_COUNT; t++)
        if (!(all >> t & 1)) res->need[t] = INFINITY;
}

/* A candidate (g, cpu_attention) of the search and the most any block of it can achieve. */
typedef struct {
    int g, ca;             /* GPU batch size, CPU attention */
    double ub;             /* upper bound on total throughput over every k and placement */
} PlanCand;

static int plan_cand_cmp(const void *a, const void *b) {
    const PlanCand *x = a, *y = b;
    if (x->ub != y->ub) return x->ub < y->ub ? 1 : -1;
    return x->ca != y->ca ? x->ca - y->ca : x->g - y->g;
}

/* Better policy: higher throughput; within 1e-9 (a tie), no CPU attention, then the smaller
 * block, then the smaller GPU batch -- so the answer does not depend on the search order. */
static int plan_better(const PlanResult *r, const Policy *p, const PlanResult *br, const Policy *bp) {
    double tol = 1e-9 * br->tput_total;
    if (r->tput_total > br->tput_total + tol) return 1;
    if (r->tput_total < br->tput_total - tol) return 0;
    int blk = p->gpu_batch_size * p->num_gpu_batches, bblk = bp->gpu_batch_size * bp->num_gpu_batches;
    if (p->cpu_attention != bp->cpu_attention) return p->cpu_attention < bp->cpu_attention;
    if (blk != bblk) return blk < bblk;
    return p->gpu_batch_size < bp->gpu_batch_size;
}

#define PLAN_CPU_SLACK 0.05 /* the CPU path takes the smallest block within 5% of the best */

int plan_search(const Config *c, const Hardware *hw, const PlanReq *rq, Policy *out, PlanResult *res) {
    memset(res, 0, sizeof *res);
    /* Every term of a step's compute channel is >= 0 and its constant part grows linearly
     * with k, so a block of any k and placement takes at least k C(g) seconds (C from k = 1)
     * and yields at most g n / C(g) token/s. Candidates are visited best bound first; one whose
     * bound cannot beat the best found is skipped, and k stops growing once the bound is
     * reached. Both cuts are exact: they never skip a better policy. */
    PlanCand cand[2 * 64];
    int nc = 0;
    for (int ca = 0; ca <= (hw->has_gpu ? 1 : 0); ca++) {
        if (rq->cpu_attention >= 0 && ca != rq->cpu_attention && hw->has_gpu) continue;
        for (int g = 1; g <= rq->max_gpu_batch && g <= (rq->block ? rq->block : rq->max_block) && nc < 2 * 64; g = plan_gbs_next(g)) {
            PlanShape sh = {g, 1, ca, 1, 1};
            CostModel M;
            cost_build(&M, c, hw, rq, &sh);
            double C = 0;
            for (int t = 0; t < NT; t++) C += M.mult[t] * M.time[t][CH_COMP].c0;
            cand[nc++] = (PlanCand){g, ca, C > 0 ? g * (double)rq->gen_len / C : INFINITY};
        }
    }
    qsort(cand, nc, sizeof *cand, plan_cand_cmp);
    int k_max = MAX_GPU_BATCHES / rq->groups; /* what generate takes: a pipeline runs G groups of k as one block */
    int g_unfit[2] = {INT32_MAX, INT32_MAX}; /* smallest g whose single batch did not fit */
    Policy best = {0};
    PlanResult br = {0};
    int found = 0, n_lp = 0, n_ok = 0;
    for (int i = 0; i < nc; i++) {
        int g = cand[i].g, ca = cand[i].ca;
        if (found && cand[i].ub < br.tput_total * (1 - 1e-9)) break; /* sorted: none left can win */
        if (g >= g_unfit[ca]) continue; /* memory grows with g too */
        if (rq->block && (rq->block % g || rq->block / g > k_max)) continue;
        int k0 = rq->block ? rq->block / g : 1, k1 = rq->block ? k0 : rq->max_block / g < k_max ? rq->max_block / g : k_max;
        for (int k = k0; k <= k1; k++) {
            PlanShape sh = {g, k, ca, 1, 1};
            CostModel M;
            cost_build(&M, c, hw, rq, &sh);
            double x[NF];
            n_lp++;
            LpStatus st = cost_solve(&M, rq, x);
            /* Memory grows with k term by term, so once a shape is infeasible every larger one
             * is. Throughput is not monotone in k, so there is no stop at its first drop (as in
             * FlexGen's search): only the exact bound below ends k early. */
            if (st == LP_INFEASIBLE) {
                if (k == k0) g_unfit[ca] = g;
                break;
            }
            if (st != LP_OPTIMAL) continue;
            Policy p = {.gpu_batch_size = g, .num_gpu_batches = k, .cpu_attention = ca, .pin_weights = hw->has_gpu,
                        .overlap = 1, .compress_weight = rq->compress_weight, .compress_cache = rq->compress_cache,
                        .group_size = rq->group_size};
            plan_percents(x, &p);
            if (p.c_gpu >= 100) p.cpu_attention = 0; /* nothing to delegate */
            PlanResult r;
            plan_eval(c, hw, rq, &p, &r);
            if (!r.feasible) continue;
            n_ok++;
            if (!found || plan_better(&r, &p, &br, &best)) best = p, br = r, found = 1;
            if (r.tput_total >= cand[i].ub * (1 - 1e-9)) break; /* this g can do no better */
        }
    }
    /* The CPU path: the smallest block within PLAN_CPU_SLACK of the best throughput. The CPU's
     * GEMMs stop gaining speed with rows after a few dozen (cost_cpu_gemm), so the throughput
     * curve is flat long before the memory runs out: on this machine OPT-125m (512 + 32) gains 2%
     * from a block of 8 to one of 256, for 31 times the wait and the memory. Blocks in order of
     * size, GPU batch size ascending within one; stops at the first that qualifies. */
    if (found && !hw->has_gpu && !rq->block) {
        double want = br.tput_total * (1 - PLAN_CPU_SLACK);
        int bb = best.gpu_batch_size * best.num_gpu_batches, done = 0;
        for (int blk = 1; blk < bb && !done; blk++)
            for (int g = 1; g <= blk && g <= rq->max_gpu_batch && !done; g = plan_gbs_next(g)) {
                if (blk % g || blk / g > k_max) continue;
                PlanShape sh = {g, blk / g, 0, 1, 1};
                CostModel M;
                cost_build(&M, c, hw, rq, &sh);
                double x[NF];
                n_lp++;
                if (cost_solve(&M, rq, x) != LP_OPTIMAL) continue;
                Policy p = {.gpu_batch_size = g, .num_gpu_batches = blk / g, .overlap = 1,
                            .compress_weight = rq->compress_weight, .compress_cache = rq->compress_cache, .group_size = rq->group_size};
                plan_percents(x, &p);
                PlanResult r;
                plan_eval(c, hw, rq, &p, &r);
                if (!r.feasible || r.tput_total < want) continue;
                n_ok++;
                best = p, br = r, done = 1;
            }
    }
    if (found) {
        *out = best;
        *res = br;
    } else {
        plan_need(c, hw, rq, res);
    }
    res->n_lp = n_lp, res->n_feasible = n_ok;
    return found ? 0 : -1;
}

/* ---- pipeline stages ---- */

/* The layer split that `opt generate` uses when --stages is not given: cheap (no LP, no probe)
 * and deterministic. A stage is weighed by the matmul work of one row through it, in units of
 * one decoder layer's 4h^2 + 2hf weights: a layers cost a; stage 0 adds project_in (e h, on
 * every row; the embedding itself is a lookup), the last stage project_out and lm_head
 * (e h + V e) on the rows that need logits: one per prompt in prefill and every decode row,
 * n of the s + n - 1 rows a sequence passes through. Attention, LayerNorms and the sampler are
 * left out (attention is the same in every layer, the rest is small). For OPT-125m lm_head is
 * 5.5 layers of work per row, so the last stage of a short-prompt workload holds fewer layers.
 * Every stage starts with one layer and each further layer goes to the stage that is cheapest
 * (the first on a tie). That minimises the slowest stage exactly: when the slowest stage, at
 * cost M, got its last layer (if it ever got one: one layer is every split's least), every
 * stage cost at least M - 1, so each already held the most layers a stage can hold at a cost
 * under M; a split whose slowest stage is cheaper than M would hold fewer than the L layers. */
int plan_stage_split(const Config *c, int n_stages, int prompt_len, int gen_len, int *layers) {
    int n = n_stages;
    if (n < 1 || n > c->n_layer) return -1;
    double h = c->hidden, e = c->embed_dim, unit = 4 * h * h + 2 * h * c->ffn;
    double rows = prompt_len + gen_len - 1.0, share = rows > 0 && gen_len > 0 ? gen_len / rows : 1;
    double proj = e != h ? e * h : 0, cost[n];
    for (int i = 0; i < n; i++)
        layers[i] = 1, cost[i] = 1 + (i == 0 ? proj / unit : 0) + (i == n - 1 ? (proj + (double)c->vocab * e) * share / unit : 0);
    for (int k = n; k < c->n_layer; k++) {
        int low = 0;
        for (int i = 1; i < n; i++)
            if (cost[i] < cost[low]) low = i;
        layers[low]++, cost[low]++;
    }
    return 0;
}

/* ---- opt plan ---- */

const char plan_usage[] =
    "usage: opt plan -m DIR|SHAPE|dummy:SHAPE [options]\n"
    "  Chooses an offloading policy: solves the cost model's LP for every GPU batch size and\n"
    "  number of GPU batches and prints the best policy as the flags generate/bench take (the\n"
    "  first line, to paste as it is), its predicted throughput (prefill, decode, total = block *\n"
    "  gen-len / time) and peak memory.\n"
    "  -m DIR|SHAPE        a checkpoint directory (config.json), opt-125m ... opt-175b, or HxLxAxF;\n"
    "                      dummy:SHAPE, generate's spelling, is the same as SHAPE\n"
    "  --prompt-len N      prompt tokens per sequence (512)\n"
    "  --gen-len N         generated tokens per sequence (32)\n"
    "  --gpu-mem SIZE      budgets; SIZE in binary units: 512M, 16G, 1.5T, 200GiB (G = GB = GiB =\n"
    "  --cpu-mem SIZE        2^30 bytes). Defaults come from the hardware profile. The plan fills\n"
    "  --disk-mem SIZE       90%, 90% and 95% of them (headroom for the CUDA context and the OS)\n"
    "  --hw t4|h100|FILE   hardware: FlexGen's fitted T4, an H100 PCIe host, or a file written by\n"
    "                      `opt probe -o FILE` (- reads it from stdin). Default: this machine,\n"
    "                      measured now (~6 s, disk in $TMPDIR or /tmp); stderr says which\n"
    "  --compress-weight   4-bit group-wise weights\n"
    "  --compress-cache    4-bit group-wise KV cache\n"
    "  --no-cpu-attention  never attend on the CPU (default: the search tries both)\n"
    "  --max-gpu-batch N   largest GPU batch tried (512); --max-block N: largest block (4096)\n"
    "  --eval \"POLICY\"     predict a given policy instead of searching, e.g. --eval \"--percent\n"
    "                      20 80 0 100 0 100 --gpu-batch-size 48 --num-gpu-batches 3 --cpu-attention\"\n"
    "                      POLICY is generate's flags, with generate's defaults: --percent (0 100 0\n"
    "                      100 0 100), --gpu-batch-size (16), --num-gpu-batches (1), --cpu-attention,\n"
    "                      --compress-weight, --compress-cache, --pin-weights, --no-overlap\n"
    "  --stages N          a pipeline over N nodes of the given hardware, each with the budgets:\n"
    "                      the layer split (generate's without --stages), each stage's policy,\n"
    "                      the micro-batch groups, link times, the bubble and the throughput,\n"
    "                      against one node's (the cost model's pipeline: DESIGN.md)\n"
    "  --nodes-bw BW       the link between consecutive stages, default 10Gb (10 Gb/s Ethernet):\n"
    "                      10Gb, 100Gbit, 25Gbps are bits/s (decimal, as links are rated); 1.25G,\n"
    "                      1.25GiB/s are bytes/s (binary, as the budgets)\n"
    "  --json              one JSON object on one line on stdout (also when nothing fits)\n"
    "  Exit status 1 when nothing fits; the message names the smallest budgets that would.\n";

/* "16G", "1.5T", "512M", "200GiB", "4096" (bytes) -> bytes; dies with one line otherwise. */
double size_parse(const char *flag, const char *v) {
    char *e;
    errno = 0;
    double x = strtod(v, &e);
    if (e == v || errno || !isfinite(x) || !(isdigit((unsigned char)v[0]) || v[0] == '.' || v[0] == '-' || v[0] == '+'))
        die("%s '%s': not a size (use e.g. 512M, 16G, 1.5T: binary units, 1G = 2^30 bytes)", flag, v);
    if (x < 0) die("%s '%s': a size cannot be negative", flag, v);
    double unit = 1;
    const char *u = e;
    static const char units[] = "KMGTP";
    const char *at = *u ? strchr(units, toupper((unsigned char)*u)) : NULL;
    if (at) {
        unit = ldexp(1, 10 * (int)(at - units + 1));
        u++;
        if (*u == 'i') u++;
        if (*u == 'B' || *u == 'b') u++;
    } else if (*u == 'B' || *u == 'b') {
        u++;
    }
    if (*u) die("%s '%s': unknown unit '%s' (use K, M, G, T: binary units, 1G = 2^30 bytes)", flag, v, e);
    if (u == e && x > 0 && x < 1048576)
        die("%s '%s': no unit; did you mean %sG? (sizes without a unit are bytes)", flag, v, v);
    return x * unit;
}

static long count_parse(const char *flag, const char *v, long lo, long hi) {
    char *e;
    errno = 0;
    long x = strtol(v, &e, 10);
    if (!*v || *e || errno || x < lo || x > hi) die("%s: expected an integer in [%ld, %ld], got '%s'", flag, lo, hi, v);
    return x;
}

void size_format(char *out, size_t cap, double b) {
    if (!isfinite(b)) snprintf(out, cap, "-");
    else if (b >= TiB) snprintf(out, cap, "%.2f TiB", b / TiB);
    else if (b >= GiB) snprintf(out, cap, "%.1f GiB", b / GiB);
    else if (b >= 1048576) snprintf(out, cap, "%.0f MiB", b / 1048576);
    else if (b < 0.5) snprintf(out, cap, "0 B"); /* also -1e-9 from rounding */
    else snprintf(out, cap, "%.0f B", b);
}

/* A percent as the CLI reads it: up to two decimals, no trailing zeros. */
static void percent_format(char *out, size_t cap, double v) {
    snprintf(out, cap, "%.2f", v);
    char *d = strchr(out, '.');
    if (!d) return;
    char *z = out + strlen(out) - 1;
    while (z > d && *z == '0') *z-- = 0;
    if (z == d) *z = 0;
}

/* The policy as the flags generate/bench take, so that the line runs as printed. */
static void plan_policy_flags(char *out, size_t cap, const Policy *p) {
    double v[6] = {p->w_gpu, p->w_cpu, p->c_gpu, p->c_cpu, p->a_gpu, p->a_cpu};
    char num[6][16];
    for (int i = 0; i < 6; i++) percent_format(num[i], sizeof num[i], v[i]);
    snprintf(out, cap, "--percent %s %s %s %s %s %s --gpu-batch-size %d --num-gpu-batches %d%s%s%s%s%s",
             num[0], num[1], num[2], num[3], num[4], num[5], p->gpu_batch_size, p->num_gpu_batches,
             p->cpu_attention && p->c_gpu < 100 ? " --cpu-attention" : "", p->compress_weight ? " --compress-weight" : "",
             p->compress_cache ? " --compress-cache" : "", p->pin_weights ? " --pin-weights" : "",
             p->overlap ? "" : " --no-overlap");
}

/* Parses the policy of --eval: generate's flags and defaults, so that a policy means here what
 * it means there. FlexGen's spellings, which generate rejects, are refused naming opt's. The
 * words are split in text itself, which the caller owns: nothing is left to free after a die(). */
static void plan_policy_parse(Policy *p, char *text) {
    char *tok[64];
    int nt = 0;
    for (char *q = strtok(text, " \t\n"); q; q = strtok(NULL, " \t\n")) {
        if (nt == 64) die("--eval: too many words");
        tok[nt++] = q;
    }
    *p = (Policy){.gpu_batch_size = 16, .num_gpu_batches = 1, .overlap = 1, .group_size = 64,
                  .w_cpu = 100, .c_cpu = 100, .a_cpu = 100};
    for (int i = 0; i < nt; i++) {
        const char *a = tok[i];
#define EVAL_VAL() (i + 1 < nt ? tok[++i] : (die("--eval: %s needs a value", a), ""))
        if (!strcmp(a, "--percent")) {
            double v[6];
            for (int k = 0; k < 6; k++) {
                const char *w = EVAL_VAL();
                char *e;
                v[k] = strtod(w, &e);
                if (!*w || *e) die("--eval: --percent wants 6 numbers (w_gpu w_cpu cache_gpu cache_cpu act_gpu act_cpu), got '%s'", w);
            }
            p->w_gpu = v[0], p->w_cpu = v[1], p->c_gpu = v[2], p->c_cpu = v[3], p->a_gpu = v[4], p->a_cpu = v[5];
        } else if (!strcmp(a, "--gpu-batch-size")) {
            p->gpu_batch_size = (int)count_parse(a, EVAL_VAL(), 1, 1 << 20);
        } else if (!strcmp(a, "--num-gpu-batches")) {
            p->num_gpu_batches = (int)count_parse(a, EVAL_VAL(), 1, 1 << 20);
        } else if (!strcmp(a, "--cpu-attention")) {
            p->cpu_attention = 1;
        } else if (!strcmp(a, "--compress-weight")) {
            p->compress_weight = 1;
        } else if (!strcmp(a, "--compress-cache")) {
            p->compress_cache = 1;
        } else if (!strcmp(a, "--pin-weights")) {
            p->pin_weights = 1;
        } else if (!strcmp(a, "--no-overlap")) {
            p->overlap = 0;
        } else if (!strcmp(a, "--cpu") || !strcmp(a, "--cpu-cache-compute")) {
            die("--eval: '%s' is FlexGen's spelling; opt's is --cpu-attention", a);
        } else if (!strcmp(a, "--pin-weight")) {
            die("--eval: '--pin-weight' is FlexGen's spelling; opt's is --pin-weights (no value; without it weights are not pinned)");
        } else if (!strcmp(a, "--overlap")) {
            die("--eval: '--overlap' is FlexGen's spelling; opt's is --no-overlap (no value; without it I/O overlaps compute)");
        } else {
            die("--eval: unknown policy flag '%s' (want --percent, --gpu-batch-size, --num-gpu-batches, --cpu-attention, --compress-weight, --compress-cache, --pin-weights, --no-overlap)", a);
        }
#undef EVAL_VAL
    }
    plan_policy_check(p, 1); /* now, before any measuring; the GPU shares once the hardware is known */
}

static void plan_json_num(FILE *f, const char *k, double v, int comma) {
    fprintf(f, "\"%s\": ", k);
    if (isfinite(v)) fprintf(f, "%.6g", v);
    else fprintf(f, "null");
    if (comma) fprintf(f, ", ");
}

/* A plan's JSON line up to its mode's own fields: model, hardware, workload, mode, feasible. */
static void plan_json_head(FILE *f, const Config *c, const Hardware *hw, const PlanReq *rq, const char *mode, int feasible) {
    fprintf(f, "{\"model\": ");
    json_write_str(f, c->name, strlen(c->name));
    fprintf(f, ", \"hardware\": ");
    json_write_str(f, hw->name, strlen(hw->name));
    fprintf(f, ", \"gpu\": %s, \"prompt_len\": %d, \"gen_len\": %d, \"mode\": \"%s\", \"feasible\": %s, ",
            hw->has_gpu ? "true" : "false", rq->prompt_len, rq->gen_len, mode, feasible ? "true" : "false");
}

/* "k": {"prefill": p, "decode": d, "total": t} */
static void plan_json_phases(FILE *f, const char *k, double p, double d, double t) {
    fprintf(f, "\"%s\": {", k);
    plan_json_num(f, "prefill", p, 1);
    plan_json_num(f, "decode", d, 1);
    plan_json_num(f, "total", t, 0);
    fprintf(f, "}");
}

static void plan_json_tiers(FILE *f, const char *key, const double *v) {
    fprintf(f, "\"%s\": {", key);
    for (int t = 0; t < TIER_COUNT; t++) plan_json_num(f, tier_names[t], v[t], t + 1 < TIER_COUNT);
    fprintf(f, "}");
}

static void plan_print(const Config *c, const Hardware *hw, const PlanReq *rq, const Policy *p, const PlanResult *r,
                       int json, int eval, double secs) {
    char flags[256], sz[3][32], bud[3][32];
    plan_policy_flags(flags, sizeof flags, p);
    double usable[TIER_COUNT];
    for (int t = 0; t < TIER_COUNT; t++) {
        usable[t] = rq->usable[t] * rq->budget[t];
        size_format(sz[t], sizeof sz[t], r->peak[t]);
        size_format(bud[t], sizeof bud[t], rq->budget[t]);
    }
    int block = p->gpu_batch_size * p->num_gpu_batches;
    if (json) {
        FILE *f = stdout;
        plan_json_head(f, c, hw, rq, eval ? "eval" : "search", r->feasible);
        fprintf(f, "\"flags\": ");
        json_write_str(f, flags, strlen(flags));
        fprintf(f, ", \"policy\": {\"gpu_batch_size\": %d, \"num_gpu_batches\": %d, \"block\": %d, \"percent\": [%.4g, %.4g, %.4g, %.4g, %.4g, %.4g], "
                   "\"cpu_attention\": %s, \"compress_weight\": %s, \"compress_cache\": %s, \"pin_weights\": %s, \"overlap\": %s}, ",
                p->gpu_batch_size, p->num_gpu_batches, block, p->w_gpu, p->w_cpu, p->c_gpu, p->c_cpu, p->a_gpu, p->a_cpu,
                p->cpu_attention && p->c_gpu < 100 ? "true" : "false", p->compress_weight ? "true" : "false",
                p->compress_cache ? "true" : "false", p->pin_weights ? "true" : "false", p->overlap ? "true" : "false");
        fprintf(f, " ");
        plan_json_phases(f, "throughput", r->tput_prefill, r->tput_decode, r->tput_total);
        fprintf(f, ", ");
        plan_json_phases(f, "time", r->t_prefill, r->t_decode, r->t_prefill + r->t_decode);
        fprintf(f, ", \"bottleneck\": {\"prefill\": \"%s\", \"decode\": \"%s\"}, ", r->bound_prefill, r->bound_decode);
        plan_json_tiers(f, "peak_bytes", r->peak);
        fprintf(f, ", ");
        plan_json_tiers(f, "budget_bytes", rq->budget);
        fprintf(f, ", ");
        plan_json_tiers(f, "usable_bytes", usable);
        fprintf(f, ", \"moved_bytes\": {");
        plan_json_num(f, "h2d", r->moved[MV_H2D], 1);
        plan_json_num(f, "d2h", r->moved[MV_D2H], 1);
        plan_json_num(f, "disk_read", r->moved[MV_READ], 1);
        plan_json_num(f, "disk_write", r->moved[MV_WRITE], 0);
        fprintf(f, "}, \"search\": {\"lps\": %d, \"feasible_lps\": %d, \"seconds\": %.3f}}\n", r->n_lp, r->n_feasible, secs);
        return;
    }
    printf("%s\n", flags);
    printf("model       %s: %d layers, hidden %d, %d heads, ffn %d, %.2fB parameters\n", c->name, c->n_layer, c->hidden,
           c->n_head, c->ffn, (double)config_params(c) / 1e9);
    printf("hardware    %s%s; budgets gpu %s, cpu %s, disk %s (%.0f%%, %.0f%%, %.0f%% usable)\n", hw->name,
           hw->has_gpu ? "" : ": no GPU, the CPU computes", bud[0], bud[1], bud[2], 100 * rq->usable[0], 100 * rq->usable[1], 100 * rq->usable[2]);
    printf("workload    prompt %d, generate %d, block %d = %d x %d sequences\n", rq->prompt_len, rq->gen_len, block,
           p->gpu_batch_size, p->num_gpu_batches);
    printf("throughput  prefill %.4g token/s   decode %.4g token/s   total %.4g token/s\n", r->tput_prefill, r->tput_decode, r->tput_total);
    printf("time        prefill %.4g s   decode %.4g s (%.4g s/token)   block %.4g s\n", r->t_prefill, r->t_decode,
           rq->gen_len > 1 ? r->t_decode / (rq->gen_len - 1) : 0.0, r->t_prefill + r->t_decode);
    printf("bottleneck  prefill: %s   decode: %s\n", r->bound_prefill, r->bound_decode);
    printf("peak memory gpu %s   cpu %s   disk %s\n", sz[0], sz[1], sz[2]);
    char mv[4][32];
    for (int v = 0; v < NMV; v++) size_format(mv[v], sizeof mv[v], r->moved[v]);
    printf("moved       pcie h2d %s   d2h %s   disk read %s   write %s (per block)\n", mv[0], mv[1], mv[2], mv[3]);
    if (!r->feasible)
        for (int t = 0; t < TIER_COUNT; t++)
            if (r->peak[t] > usable[t]) {
                char u[32];
                size_format(u, sizeof u, usable[t]);
                printf("over budget %s: peak %s > usable %s\n", tier_names[t], sz[t], u);
            }
    if (!eval) printf("search      %d LPs (%d feasible) in %.2f s\n", r->n_lp, r->n_feasible, secs);
}

/* ---- opt plan --stages: a pipeline over identical nodes ----
 *
 * N nodes, each the given hardware with the full budgets, run N pipeline stages: stage i holds
 * the plan_stage_split layers (what `opt generate` runs without --stages), stage 0 also embeds
 * and the last stage applies the output. The block is split into G >= N micro-batch groups of m
 * sequences; every stage runs a group as one offloading block of its own policy (g_i x k_i = m)
 * and keeps the KV cache of all G groups (PlanReq.groups). A stage's times per group, P_i
 * (prefill) and D_i (one decode step), are the cost model's for its layers plus its embedding
 * or output. Between consecutive stages a group's hidden states cross a link of bandwidth bw:
 * c_p = m s h x / bw in prefill, c_d = m h x / bw per decode step, x = 4 bytes (PIPE_X: the
 * engine's hidden states are f32, on the GPU too; f16 on the wire would halve these); the
 * sampled tokens go back from the last stage to stage 0, c_t = 4 m / bw (the token ring).
 * Links are full-duplex, their transfers overlap the stages' compute (MPI's non-blocking
 * sends), and latency and protocol overhead are left out: against stage steps of milliseconds,
 * tens of microseconds do not count.
 * Stages and links are servers in a ring that serve groups first come, first served: (token t,
 * group g) in lexicographic order. Job (t, g) at stage i starts at max(its arrival, the end of
 * the stage's previous job) and takes P_i (t = 0) or D_i; its send starts at max(that end, the
 * end of the link's previous send). Group g's step t + 1 arrives at stage 0 when its tokens of
 * step t have come back. The block's makespan T is when the last stage ends (n - 1, G - 1); the
 * prefill time Tp when it ends (0, G - 1); Td = T - Tp. Throughput, FlexGen's definitions over
 * the block B = G m: prefill B s / Tp, decode B (n - 1) / Td, total B n / T. In steady state a
 * decode step of all G groups takes max(G max_i D_i, G c_d, R) with R = sum_i D_i + (N - 1) c_d
 * + c_t the round trip of one group: G ~ N keeps the slowest stage busy once R <= G max D_i. The
 * bubble is the bottleneck stage's idle share of T: 1 - G (P_b + (n - 1) D_b) / T (fill, drain
 * and waits). One stage, one group: T = P + (n - 1) D, plain plan's prediction.
 * The search: for G in N, N + 1, N + 2, 3N/2, 2N, 3N, 4N (one stage: G = 1), each kind of stage
 * (stage 0, the last, the middle ones: 2-4 kinds) is planned freely (plan_search with the
 * cache of G groups); each block size m they chose is then tried for all stages (the search
 * with that one block), and the (G, m) of highest total throughput wins, the smaller G on a tie.
 * G stops growing when a stage no longer fits (the cache grows with G). */

#define PIPE_X 4.0 /* bytes per hidden-state value between stages (f32) */

typedef struct {
    int first, layers;         /* decoder layers [first, first + layers) */
    int embed, output;         /* stage 0 also embeds, the last applies the output */
    Policy p;                  /* its own policy; its block is the group */
    PlanResult r;              /* its prediction for one group: t_prefill, t_decode */
} PipeStage;

typedef struct {
    int n, groups, group;      /* stages N, micro-batch groups G, sequences per group m */
    double bw;                 /* link bandwidth between consecutive stages, bytes/s */
    double c_pre, c_dec, c_tok;/* seconds on a link per group: prefill's hidden states, one
                                * decode step's, the sampled tokens back to stage 0 */
    double t_prefill, t_decode;/* the block: until the last group's first token, then the rest */
    double tput_prefill, tput_decode, tput_total; /* token/s over the block G m */
    double bubble;             /* idle share of the bottleneck stage over the block */
    int bottleneck;            /* the stage busiest over the block */
    PipeStage *st;             /* (n) */
} PipePlan;

/* The makespan of the ring (see above) and what follows from it. */
static void pipe_simulate(PipePlan *pp, const PlanReq *rq, double h) {
    int N = pp->n, G = pp->groups, n = rq->gen_len;
    double m = pp->group;
    pp->c_pre = N > 1 ? m * rq->prompt_len * h * PIPE_X / pp->bw : 0;
    pp->c_dec = N > 1 ? m * h * PIPE_X / pp->bw : 0;
    pp->c_tok = N > 1 ? 4 * m / pp->bw : 0;
    double stage[N], link[N], back[G];
    for (int i = 0; i < N; i++) stage[i] = link[i] = 0;
    for (int t = 0; t < n; t++) {
        for (int g = 0; g < G; g++) {
            double at = t ? back[g] : 0;
            for (int i = 0; i < N; i++) {
                const PlanResult *r = &pp->st[i].r;
                stage[i] = fmax(at, stage[i]) + (t ? r->t_decode / (n - 1) : r->t_prefill);
                if (N == 1) { at = stage[i]; continue; }
                at = link[i] = fmax(stage[i], link[i]) + (i < N - 1 ? (t ? pp->c_dec : pp->c_pre) : pp->c_tok);
            }
            back[g] = at;
        }
        if (!t) pp->t_prefill = stage[N - 1];
    }
    double T = stage[N - 1], busy = -1, B = G * m;
    pp->t_decode = T - pp->t_prefill;
    for (int i = 0; i < N; i++) {
        double b = G * (pp->st[i].r.t_prefill + pp->st[i].r.t_decode);
        if (b > busy) busy = b, pp->bottleneck = i;
    }
    pp->bubble = fmax(0, 1 - busy / T);
    pp->tput_prefill = B * rq->prompt_len / pp->t_prefill;
    pp->tput_decode = n > 1 ? B * (n - 1) / pp->t_decode : 0;
    pp->tput_total = B * n / T;
}

/* Plans stage i (its layers, embedding, output) with rq, reusing an earlier stage alike. */
static int pipe_stage_plan(const Config *c, const Hardware *hw, const PlanReq *rq, PipeStage *st, int i) {
    for (int j = 0; j < i; j++)
        if (st[j].layers == st[i].layers && st[j].embed == st[i].embed && st[j].output == st[i].output) {
            st[i].p = st[j].p, st[i].r = st[j].r;
            return 0;
        }
    Config ci = *c;
    ci.n_layer = st[i].layers;
    PlanReq r = *rq;
    r.embed = st[i].embed, r.output = st[i].output;
    return plan_search(&ci, hw, &r, &st[i].p, &st[i].r);
}

/* The best pipeline of 1 <= n <= c->n_layer stages (see above) into *best, whose st the caller
 * frees: 0, or -1 when stage *bad does not fit even with G = n groups (-1: no group size fits
 * every stage). */
static int pipe_plan(const Config *c, const Hardware *hw, const PlanReq *rq, int n, double bw, PipePlan *best, int *bad) {
    int split[n];
    PipeStage *free_st = check_calloc(2 * n * sizeof *free_st, "pipeline stages"), *st = free_st + n;
    PipePlan pp = {.n = n, .bw = bw, .st = st};
    *best = pp, best->st = check_calloc(n * sizeof *st, "pipeline stages"), *bad = -1;
    plan_stage_split(c, n, rq->prompt_len, rq->gen_len, split);
    for (int i = 0, at = 0; i < n; at += split[i++])
        free_st[i] = st[i] = best->st[i] = (PipeStage){.first = at, .layers = split[i], .embed = i == 0, .output = i == n - 1};
    int gs[7] = {n, n + 1, n + 2, n * 3 / 2, 2 * n, 3 * n, 4 * n}, found = 0, tried = 0;
    for (int gi = 0; gi < (n > 1 ? 7 : 1); gi++) {
        if (gs[gi] <= tried) continue; /* ascending, once each */
        tried = gs[gi];
        PlanReq rg = *rq;
        rg.groups = pp.groups = gs[gi];
        int ok = 1;
        for (int i = 0; i < n && ok; i++)
            if (pipe_stage_plan(c, hw, &rg, free_st, i)) ok = 0, *bad = i;
        if (!ok) break; /* more groups, more cache */
        for (int i = 0; i < n; i++) {
            int m = free_st[i].p.gpu_batch_size * free_st[i].p.num_gpu_batches, seen = 0;
            for (int j = 0; j < i; j++) seen |= m == free_st[j].p.gpu_batch_size * free_st[j].p.num_gpu_batches;
            if (seen) continue;
            rg.block = m;
            for (int j = 0; j < n && ok; j++) {
                if (free_st[j].p.gpu_batch_size * free_st[j].p.num_gpu_batches == m) st[j] = free_st[j];
                else if (pipe_stage_plan(c, hw, &rg, st, j)) ok = 0;
            }
            if (!ok) { ok = 1; continue; }
            pp.group = m;
            pipe_simulate(&pp, rq, c->hidden);
            if (!found || pp.tput_total > best->tput_total * (1 + 1e-9)) {
                PipeStage *keep = best->st;
                *best = pp, best->st = keep, found = 1;
                memcpy(keep, st, n * sizeof *st);
            }
        }
    }
    free(free_st);
    return found ? 0 : -1;
}

/* --nodes-bw: "10Gb", "100Gbit", "25Gbps" (bits/s, decimal, as links are rated) or "1.25G",
 * "1.25GiB/s" (bytes/s in plan's binary units); dies with one line otherwise. */
static double bw_parse(const char *flag, const char *v) {
    char *e;
    errno = 0;
    double x = strtod(v, &e);
    const char *at = *e ? strchr("KMGT", toupper((unsigned char)*e)) : NULL, *u = at ? e + 1 : e;
    int ex = at ? (int)(at - "KMGT") + 1 : 0;
    double bw = -1;
    if (!strcmp(u, "b") || !strcmp(u, "bit") || !strcmp(u, "bps") || !strcmp(u, "b/s") || !strcmp(u, "bit/s"))
        bw = x * pow(1000, ex) / 8;
    else if (!*u || !strcmp(u, "B") || !strcmp(u, "iB") || !strcmp(u, "/s") || !strcmp(u, "B/s") || !strcmp(u, "iB/s"))
        bw = x * ldexp(1, 10 * ex);
    int bare = !at && (!*u || !strcmp(u, "/s")); /* bits or bytes? */
    if (e == v || errno || !isfinite(x) || !(isdigit((unsigned char)v[0]) || v[0] == '.') || bare || !(bw > 0))
        die("%s '%s': not a link bandwidth (use e.g. 10Gb or 100Gbit: bits/s, decimal; or 1.25G: bytes/s, 1G = 2^30)", flag, v);
    return bw;
}

static void pipe_print(const Config *c, const Hardware *hw, const PlanReq *rq, const PipePlan *pp, const Policy *p1,
                       const PlanResult *r1, int json, double secs) {
    int N = pp->n, B = pp->groups * pp->group;
    char flags[256];
    if (json) {
        FILE *f = stdout;
        plan_json_head(f, c, hw, rq, "pipeline", 1);
        fprintf(f, "\"stages\": %d, ", N);
        plan_json_num(f, "link_bw", pp->bw, 1);
        fprintf(f, "\"groups\": %d, \"group\": %d, \"block\": %d, \"split\": [", pp->groups, pp->group, B);
        for (int i = 0; i < N; i++) fprintf(f, "%s%d", i ? ", " : "", pp->st[i].layers);
        fprintf(f, "], \"stage\": [");
        for (int i = 0; i < N; i++) {
            const PipeStage *s = &pp->st[i];
            plan_policy_flags(flags, sizeof flags, &s->p);
            fprintf(f, "%s{\"first_layer\": %d, \"layers\": %d, \"embed\": %s, \"output\": %s, \"flags\": ", i ? ", " : "",
                    s->first, s->layers, s->embed ? "true" : "false", s->output ? "true" : "false");
            json_write_str(f, flags, strlen(flags));
            fprintf(f, ", \"time\": {");
            plan_json_num(f, "prefill", s->r.t_prefill, 1);
            plan_json_num(f, "decode", s->r.t_decode, 0);
            fprintf(f, "}, \"bottleneck\": {\"prefill\": \"%s\", \"decode\": \"%s\"}, ", s->r.bound_prefill, s->r.bound_decode);
            plan_json_tiers(f, "peak_bytes", s->r.peak);
            fprintf(f, "}");
        }
        fprintf(f, "], \"link_time\": {");
        plan_json_num(f, "prefill", pp->c_pre, 1);
        plan_json_num(f, "decode", pp->c_dec, 1);
        plan_json_num(f, "tokens", pp->c_tok, 0);
        fprintf(f, "}, ");
        plan_json_phases(f, "throughput", pp->tput_prefill, pp->tput_decode, pp->tput_total);
        fprintf(f, ", ");
        plan_json_phases(f, "time", pp->t_prefill, pp->t_decode, pp->t_prefill + pp->t_decode);
        fprintf(f, ", \"bottleneck_stage\": %d, ", pp->bottleneck);
        plan_json_num(f, "bubble", pp->bubble, 1);
        fprintf(f, "\"single\": ");
        if (r1) {
            plan_policy_flags(flags, sizeof flags, p1);
            fprintf(f, "{\"flags\": ");
            json_write_str(f, flags, strlen(flags));
            fprintf(f, ", \"block\": %d, ", p1->gpu_batch_size * p1->num_gpu_batches);
            plan_json_phases(f, "throughput", r1->tput_prefill, r1->tput_decode, r1->tput_total);
            fprintf(f, "}, ");
        } else {
            fprintf(f, "null, ");
        }
        fprintf(f, "\"seconds\": %.3f}\n", secs);
        return;
    }
    char bw[32];
    snprintf(bw, sizeof bw, pp->bw * 8 >= 1e9 ? "%.4g Gb/s" : "%.4g Mb/s", pp->bw * 8 / (pp->bw * 8 >= 1e9 ? 1e9 : 1e6));
    printf("pipeline    %s on %d x %s%s%s: %d group%s x %d sequences = block %d, prompt %d, generate %d\n", c->name, N, hw->name,
           N > 1 ? ", links " : "", N > 1 ? bw : "", pp->groups, pp->groups > 1 ? "s" : "", pp->group, B, rq->prompt_len, rq->gen_len);
    for (int i = 0; i < N; i++) {
        const PipeStage *s = &pp->st[i];
        char sz[3][32];
        for (int t = 0; t < TIER_COUNT; t++) size_format(sz[t], sizeof sz[t], s->r.peak[t]);
        plan_policy_flags(flags, sizeof flags, &s->p);
        printf("stage %-5d layers %d-%d%s%s: %s\n", i, s->first, s->first + s->layers - 1, s->embed ? " + embedding" : "",
               s->output ? " + output" : "", flags);
        printf("            per group: prefill %.4g s, decode %.4g s/token (%s); peak gpu %s, cpu %s, disk %s\n", s->r.t_prefill,
               rq->gen_len > 1 ? s->r.t_decode / (rq->gen_len - 1) : 0.0, s->r.bound_decode, sz[0], sz[1], sz[2]);
    }
    if (N > 1)
        printf("links       per group and boundary: prefill %.3g s, decode %.3g s/token, tokens back %.3g s\n", pp->c_pre, pp->c_dec, pp->c_tok);
    printf("time        prefill %.4g s   decode %.4g s   block %.4g s\n", pp->t_prefill, pp->t_decode, pp->t_prefill + pp->t_decode);
    printf("bubble      stage %d (the busiest) idle %.1f%% of the block\n", pp->bottleneck, 100 * pp->bubble);
    printf("throughput  prefill %.4g token/s   decode %.4g token/s   total %.4g token/s\n", pp->tput_prefill, pp->tput_decode, pp->tput_total);
    if (N > 1) { /* the whole block is G groups of each stage's own block: generate's flags for it */
        char run[4096];
        size_t at = (size_t)snprintf(run, sizeof run, "mpirun");
        bool same = true;
        for (int i = 1; i < N; i++) same &= !memcmp(&pp->st[i].p, &pp->st[0].p, sizeof(Policy));
        for (int i = 0; i < (same ? 1 : N); i++) {
            Policy q = pp->st[i].p;
            q.num_gpu_batches *= pp->groups;
            plan_policy_flags(flags, sizeof flags, &q);
            at += (size_t)snprintf(run + at, at < sizeof run ? sizeof run - at : 0, "%s -np %d ./opt generate -m %s --stages ", i ? " :" : "", same ? N : 1, c->name);
            for (int k = 0; k < N; k++) at += (size_t)snprintf(run + at, at < sizeof run ? sizeof run - at : 0, "%s%d", k ? "," : "", pp->st[k].layers);
            at += (size_t)snprintf(run + at, at < sizeof run ? sizeof run - at : 0, " --micro-batches %d %s", pp->groups, flags);
        }
        printf("run         %s\n", run);
    }
    if (r1) printf("one node    prefill %.4g token/s   decode %.4g token/s   total %.4g token/s (block %d): pipeline %.2fx\n", r1->tput_prefill,
                   r1->tput_decode, r1->tput_total, p1->gpu_batch_size * p1->num_gpu_batches, pp->tput_total / r1->tput_total);
    else printf("one node    no policy fits\n");
    printf("search      %.2f s\n", secs);
}

static int g_probe_quiet; /* hw_probe without progress lines: `opt plan` sums them up in one */

int plan_main(int argc, char **argv) {
    const char *model = NULL, *hwspec = NULL, *eval = NULL, *bwspec = NULL;
    int json = 0, cw = 0, cc = 0, no_ca = 0;
    long s = 512, n = 32, max_g = -1, max_b = -1, stages = 0;
    double bud[TIER_COUNT];
    int have_bud[TIER_COUNT] = {0};
    static const char *const mem_flags[TIER_COUNT] = {"--gpu-mem", "--cpu-mem", "--disk-mem"};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
#define PLAN_VAL() (i + 1 < argc ? argv[++i] : (die("%s needs a value (see opt plan --help)", a), ""))
        int tier = -1;
        for (int t = 0; t < TIER_COUNT; t++)
            if (!strcmp(a, mem_flags[t])) tier = t;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { fputs(plan_usage, stdout); return 0; }
        else if (tier >= 0) bud[tier] = size_parse(a, PLAN_VAL()), have_bud[tier] = 1;
        else if (!strcmp(a, "-m") || !strcmp(a, "--model")) model = PLAN_VAL();
        else if (!strcmp(a, "--hw")) hwspec = PLAN_VAL();
        else if (!strcmp(a, "--prompt-len")) s = count_parse(a, PLAN_VAL(), 1, 1 << 20);
        else if (!strcmp(a, "--gen-len")) n = count_parse(a, PLAN_VAL(), 1, 1 << 20);
        else if (!strcmp(a, "--max-gpu-batch")) max_g = count_parse(a, PLAN_VAL(), 1, 1 << 16);
        else if (!strcmp(a, "--max-block")) max_b = count_parse(a, PLAN_VAL(), 1, 1 << 20);
        else if (!strcmp(a, "--compress-weight")) cw = 1;
        else if (!strcmp(a, "--compress-cache")) cc = 1;
        else if (!strcmp(a, "--no-cpu-attention")) no_ca = 1;
        else if (!strcmp(a, "--eval")) eval = PLAN_VAL();
        else if (!strcmp(a, "--stages")) stages = count_parse(a, PLAN_VAL(), 1, 1 << 16);
        else if (!strcmp(a, "--nodes-bw")) bwspec = PLAN_VAL();
        else if (!strcmp(a, "--json")) json = 1;
        else die("plan: unknown option '%s' (see opt plan --help)", a);
#undef PLAN_VAL
    }
    if (!model) die("plan: -m DIR|SHAPE is required (e.g. -m opt-30b; see opt plan --help)");
    Config c;
    struct stat st;
    if (!strncmp(model, "dummy:", 6)) shape_config(&c, model + 6);
    else if (strchr(model, '/') || stat(model, &st) == 0) config_load(&c, model);
    else shape_config(&c, model);
    if (s + n > c.max_pos)
        die("plan: --prompt-len %ld + --gen-len %ld exceeds %s's %d positions", s, n, c.name, c.max_pos);
    double link_bw = bwspec ? bw_parse("--nodes-bw", bwspec) : 10e9 / 8; /* 10 Gb/s Ethernet */
    if (bwspec && !stages) die("plan: --nodes-bw is the link between pipeline stages; it needs --stages N");
    if (stages && eval) die("plan: --eval predicts one node's policy; it does not combine with --stages");
    if (stages > c.n_layer)
        die("plan: --stages %ld: %s has %d decoder layers, and every stage holds at least one", stages, c.name, c.n_layer);
    Policy p;
    if (eval) { /* before the hardware: a mistyped policy costs no measuring */
        char *full = check_malloc(strlen(eval) + 40, "eval policy");
        sprintf(full, "%s%s%s", eval, cw ? " --compress-weight" : "", cc ? " --compress-cache" : "");
        plan_policy_parse(&p, full);
        free(full);
    }
    Hardware hw;
    if (hwspec) hw_load(&hw, hwspec);
    else { /* the machine it runs on, as --policy auto measures it: a plan it can run */
        GpuProbe gp = {0};
        int direct = 1;
        g_probe_quiet = 1;
        hw_probe(&hw, &gp, getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp", 256.0 * (1 << 20), &direct);
        g_probe_quiet = 0;
        fprintf(stderr, "opt plan: planning for %s; --hw t4|h100|FILE plans for another\n", hw.name);
    }
    PlanReq rq;
    plan_req_default(&rq, &hw);
    rq.prompt_len = (int)s, rq.gen_len = (int)n, rq.compress_weight = cw, rq.compress_cache = cc;
    if (no_ca) rq.cpu_attention = 0;
    if (max_g > 0) rq.max_gpu_batch = (int)max_g;
    if (max_b > 0) rq.max_block = (int)max_b;
    for (int t = 0; t < TIER_COUNT; t++)
        if (have_bud[t]) rq.budget[t] = bud[t];
    if (!hw.has_gpu) {
        if (have_bud[TIER_GPU] && bud[TIER_GPU] > 0)
            fprintf(stderr, "opt plan: --gpu-mem ignored: %s has no GPU (the CPU computes)\n", hw.name);
        rq.budget[TIER_GPU] = 0;
    }

    PlanResult r;
    double t0 = now_sec();
    if (stages) {
        PipePlan pp;
        int bad, one = plan_search(&c, &hw, &rq, &p, &r);
        if (pipe_plan(&c, &hw, &rq, (int)stages, link_bw, &pp, &bad) == 0) {
            pipe_print(&c, &hw, &rq, &pp, &p, one ? NULL : &r, json, now_sec() - t0);
            free(pp.st);
            return 0;
        }
        char msg[512];
        if (bad >= 0)
            snprintf(msg, sizeof msg, "no policy fits stage %d of %ld (%d layers%s%s of %s, prompt %ld, generate %ld) on %s with the cache of %ld groups: more stages, or larger budgets",
                     bad, stages, pp.st[bad].layers, bad == 0 ? " + embedding" : "", bad == stages - 1 ? " + output" : "", c.name, s, n, hw.name, stages);
        else
            snprintf(msg, sizeof msg, "no group size fits every stage of %s over %ld stages on %s", c.name, stages, hw.name);
        free(pp.st);
        if (json) {
            printf("{\"model\": ");
            json_write_str(stdout, c.name, strlen(c.name));
            printf(", \"mode\": \"pipeline\", \"feasible\": false, \"error\": ");
            json_write_str(stdout, msg, strlen(msg));
            printf("}\n");
        }
        fprintf(stderr, "opt plan: %s\n", msg);
        return 1;
    }
    if (eval) {
        plan_eval(&c, &hw, &rq, &p, &r);
        plan_print(&c, &hw, &rq, &p, &r, json, 1, now_sec() - t0);
        return 0;
    }
    if (plan_search(&c, &hw, &rq, &p, &r) == 0) {
        plan_print(&c, &hw, &rq, &p, &r, json, 0, now_sec() - t0);
        return 0;
    }
    /* nothing fits: one line naming the smallest budgets that would */
    char msg[2048], b[3][32], alt[256] = "";
    for (int t = 0; t < TIER_COUNT; t++) size_format(b[t], sizeof b[t], rq.budget[t]);
    int na = 0;
    for (int t = 0; t < TIER_COUNT; t++) {
        if (!isfinite(r.need[t]) || (r.need_joint && r.need[t] <= rq.budget[t])) continue;
        size_t len = strlen(alt);
        snprintf(alt + len, sizeof alt - len, "%s%s %.1fG", na++ ? (r.need_joint ? " " : ", or ") : "", mem_flags[t], r.need[t] / GiB);
    }
    snprintf(msg, sizeof msg, "no policy fits %s (prompt %ld, generate %ld%s%s) on %s in gpu %s, cpu %s, disk %s (%.0f%%/%.0f%%/%.0f%% usable): %s%s%s",
             c.name, s, n, cw ? ", 4-bit weights" : "", cc ? ", 4-bit cache" : "", hw.name, b[0], b[1], b[2], 100 * rq.usable[0],
             100 * rq.usable[1], 100 * rq.usable[2], na ? "the smallest block needs " : "no budget makes the smallest block fit",
             alt, !na ? "" : r.need_joint ? " together (no single budget suffices)" : na > 1 ? " (each with the other budgets as given)" : "");
    if (json) {
        printf("{\"model\": ");
        json_write_str(stdout, c.name, strlen(c.name));
        printf(", \"hardware\": ");
        json_write_str(stdout, hw.name, strlen(hw.name));
        printf(", \"feasible\": false, \"need_joint\": %s, ", r.need_joint ? "true" : "false");
        plan_json_tiers(stdout, "need_bytes", r.need);
        printf(", ");
        plan_json_tiers(stdout, "budget_bytes", rq.budget);
        printf(", \"error\": ");
        json_write_str(stdout, msg, strlen(msg));
        printf("}\n");
    }
    fprintf(stderr, "opt plan: %s\n", msg);
    return 1;
}

/* ---- opt probe ---- */

/* The GPU half of the probe lives in kernels.cu; these weak stand-ins answer "no GPU" in
 * CPU-only builds, and kernels.cu's strong definitions replace them at link time. */
__attribute__((weak)) int gpu_probe_bandwidth(GpuProbe *p) { (void)p; return -1; }
__attribute__((weak)) int gpu_probe_compute(GpuProbe *p) { (void)p; return -1; }

/* Mean time of fn over at least 3 runs (and up to ~0.5 s of them), after one warm-up. The mean,
 * not the median: the engine's time is a sum of such operations, so the rare slow one (another
 * process took the CPU, a thread was descheduled while its partner waited at a barrier) costs
 * the engine as much as it costs here; on a machine shared with other jobs that is most of the
 * difference between a quiet minute and a busy one. */
static double g_probe_window = 0.15; /* seconds per measurement: `opt probe` 0.5 (--quick 0.15),
                                      * --policy auto's probe 0.15 */

__attribute__((format(printf, 1, 2))) static void probe_note(const char *fmt, ...) {
    if (g_probe_quiet) return;
    va_list ap;
    va_start(ap, fmt);
    fputs("probe: ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
}

static double probe_time(void (*fn)(void *), void *ctx) {
    int r = 0;
    fn(ctx);
    double start = now_sec(), sum = 0;
    while (r < 1000 && (r < 3 || now_sec() - start < g_probe_window)) {
        double t0 = now_sec();
        fn(ctx);
        sum += now_sec() - t0;
        r++;
    }
    return sum / r;
}

typedef struct {
    const uint64_t *buf;   /* streamed memory */
    size_t n;              /* its 64-bit words */
    volatile uint64_t sink;/* keeps the sum alive */
} StreamCtx;

static void probe_stream(void *p) {
    StreamCtx *s = p;
    uint64_t sum = 0;
    #pragma omp parallel for reduction(+ : sum) schedule(static)
    for (size_t i = 0; i < s->n; i++) sum += s->buf[i];
    s->sink = sum;
}

typedef struct {
    Gemm g;                /* the GEMM timed */
    const char *base;      /* n_w copies of the weights, stride bytes apart: one per run in turn */
    size_t stride;
    int n_w, at;
} GemmCtx;

static void probe_gemm_run(void *p) {
    GemmCtx *c = p;
    Tensor t = *c->g.w;
    if (c->base) t.data = c->base + c->stride * (size_t)(c->at++ % c->n_w);
    Gemm g = c->g;
    g.w = &t;
    gemm(&g);
}

static void probe_omp_empty(void *p) {
    (void)p;
    #pragma omp parallel
    { __asm__ volatile("" ::: "memory"); }
}

/* f16 weights in [-1, 1] from a fixed seed. */
static void probe_fill_f16(uint16_t *w, size_t n) {
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        w[i] = (uint16_t)(0x3800 | (x & 0x3FF) | (x >> 20 & 1) << 15); /* +-[0.5, 1) */
    }
}

/* The engine's GEMMs, as the cost model sees them (cost_cpu_gemm): at M = 1 the rate of
 * streaming the weights (bytes/s), and the FLOP rates at M = 64 and 512 that fix the lane
 * path's cost per weight and per FLOP. The GEMVs rotate over copies of the matrix filling
 * PROBE_WS bytes, more than any last-level cache (this VM reports 480 MiB of L3), so that they
 * measure RAM, as the engine's decode does for any model worth offloading; a single 128 MiB
 * matrix stays in such a cache and reads several times faster than the engine ever does. */
#define PROBE_WS (1024.0 * 1048576)
static void probe_cpu(Hardware *hw) {
    const int K = 4096, N1 = 16384, N = 4096;
    size_t nw = (size_t)N1 * K;
    double ws = fmin(PROBE_WS, hw->cpu_mem / 16);
    int nrot = (int)fmax(1, ceil(ws / (2.0 * nw)));
    uint16_t *w = check_malloc(nw * 2 * (size_t)nrot, "probe weights");
    probe_fill_f16(w, nw);
    for (int i = 1; i < nrot; i++) memcpy(w + nw * (size_t)i, w, nw * 2);
    float *x = check_calloc((size_t)512 * K * sizeof(float), "probe inputs");
    float *y = check_calloc((size_t)512 * N1 * sizeof(float), "probe outputs");
    for (size_t i = 0; i < (size_t)512 * K; i++) x[i] = (float)((i * 2654435761u) % 1000) / 1000 - 0.5f;
    Tensor t = {.dtype = DT_F16, .rows = N1, .cols = K, .data = w, .tier = TIER_CPU, .name = "probe"};
    GemmCtx gc = {.g = {.y = y, .x = x, .w = &t, .ldy = N1, .ldx = K, .M = 1, .N = N1, .K = K},
                  .base = (const char *)w, .stride = nw * 2, .n_w = nrot};
    hw->cpu_gemv_bw = 2.0 * nw / probe_time(probe_gemm_run, &gc);
    probe_note("cpu gemv f16 (1 x %d x %d, %d copies) %.1f GB/s of weights\n", N1, K, nrot, hw->cpu_gemv_bw / 1e9);
    t.rows = N, gc.g.N = N, gc.g.ldy = N, gc.base = NULL;
    gc.g.M = 8;
    hw->cpu_gemm_flops_8 = 2.0 * 8 * N * K / probe_time(probe_gemm_run, &gc);
    gc.g.M = 64;
    hw->cpu_gemm_flops_g = 2.0 * 64 * N * K / probe_time(probe_gemm_run, &gc);
    probe_note("cpu gemm f16 (8 / 64 x %d x %d) %.1f / %.1f GFLOP/s\n", N, K, hw->cpu_gemm_flops_8 / 1e9, hw->cpu_gemm_flops_g / 1e9);
    gc.g.M = 512;
    hw->cpu_gemm_flops_p = 2.0 * 512 * N * K / probe_time(probe_gemm_run, &gc);
    probe_note("cpu gemm f16 (512 x %d x %d) %.1f GFLOP/s\n", N, K, hw->cpu_gemm_flops_p / 1e9);
    free(w);

    /* 4-bit: one quantized row copied to every row (the rate does not depend on the values) */
    const int G = 64;
    size_t rb = q4_row_bytes(K, G), qb = rb * N1;
    int nq = (int)fmax(1, ceil(ws / (double)qb));
    uint8_t *q = check_malloc(qb * (size_t)nq, "probe 4-bit weights");
    float *row = check_malloc(sizeof(float) * K, "probe row");
    for (int i = 0; i < K; i++) row[i] = (float)((i * 7919) % 255) / 127.0f - 1;
    q4_quantize_row(q, row, K, G, "probe");
    for (size_t r = 1; r < (size_t)N1 * nq; r++) memcpy(q + rb * r, q, rb);
    Tensor tq = {.dtype = DT_Q4, .rows = N1, .cols = K, .data = q, .group = G, .tier = TIER_CPU, .name = "probe"};
    gc = (GemmCtx){.g = {.y = y, .x = x, .w = &tq, .ldy = N1, .ldx = K, .M = 1, .N = N1, .K = K},
                   .base = (const char *)q, .stride = qb, .n_w = nq};
    hw->cpu_gemv_q4_bw = (double)qb / probe_time(probe_gemm_run, &gc);
    probe_note("cpu gemv 4-bit (1 x %d x %d, %d copies) %.1f GB/s of 4-bit weights\n", N1, K, nq, hw->cpu_gemv_q4_bw / 1e9);
    tq.rows = N, gc.g.N = N, gc.g.ldy = N, gc.base = NULL;
    gc.g.M = 8;
    hw->cpu_gemm_q4_flops_8 = 2.0 * 8 * N * K / probe_time(probe_gemm_run, &gc);
    gc.g.M = 64;
    hw->cpu_gemm_q4_flops_g = 2.0 * 64 * N * K / probe_time(probe_gemm_run, &gc);
    gc.g.M = 512;
    hw->cpu_gemm_q4_flops_p = 2.0 * 512 * N * K / probe_time(probe_gemm_run, &gc);
    probe_note("cpu gemm 4-bit (8 / 64 / 512 x %d x %d) %.1f / %.1f / %.1f GFLOP/s\n", N, K, hw->cpu_gemm_q4_flops_8 / 1e9,
               hw->cpu_gemm_q4_flops_g / 1e9, hw->cpu_gemm_q4_flops_p / 1e9);
    /* one OpenMP parallel region: waking the other threads and joining them. On a VM whose idle
     * vCPUs halt this is tens of microseconds, and the engine runs ~7-16 of them per layer and
     * GPU batch (cost_cpu_regions) */
    hw->cpu_region_s = probe_time(probe_omp_empty, NULL);
    probe_note("cpu parallel region             %.1f us\n", hw->cpu_region_s * 1e6);
    hw->layer_overhead = 0; /* the CPU path counts its regions instead */
    free(row), free(q), free(x), free(y);
}

/* The engine's own attention (cpu_backend.attention) over a cache of `dt`: decode, one new
 * position per sequence over 512 cached ones (bytes of cache read per second), and prefill, 256
 * new positions per sequence (causal FLOPs per second, 4 h (p + 1) for the row at position p;
 * storing the new keys and values, quantized for a 4-bit cache, included). */
typedef struct {
    const Config *c;
    KVLayer *kv;
    Step st;
    Scratch *s;
} AttnCtx;

static void probe_attn_run(void *p) {
    AttnCtx *a = p;
    cpu_backend.attention(a->c, a->kv, &a->st, a->s);
}

static void probe_attention(Hardware *hw) {
    Config c = {.hidden = 1024, .ffn = 4096, .n_layer = 1, .n_head = 16, .head_dim = 64, .vocab = 64, .max_pos = 1024,
                .embed_dim = 1024, .pre_ln = 1, .final_ln = 1, .bias = 1, .ln_affine = 1};
    const int nseq = 16, cap = 528, pos = 512, pseq = 2, plen = 256, rows = pseq * plen > nseq ? pseq * plen : nseq;
    int *tok = check_calloc(sizeof(int) * 3 * (size_t)rows, "probe steps"), *slot = tok + rows, *ps = slot + rows;
    Scratch s;
    scratch_init(&s, &c, rows, cap);
    for (size_t i = 0; i < (size_t)rows * c.hidden; i++)
        s.q[i] = s.k[i] = s.v[i] = (float)((i * 2654435761u) % 1000) / 4000 - 0.125f;
    for (int q4 = 0; q4 < 2; q4++) {
        KVCache kv;
        DType dt = q4 ? DT_Q4 : DT_F32;
        kv_init(&kv, &c, nseq, cap, dt, 64);
        for (int i = 0; i < nseq; i++) slot[i] = i, ps[i] = pos;
        AttnCtx a = {&c, &kv.layer[0], {nseq, tok, slot, ps, NULL}, &s};
        double t = probe_time(probe_attn_run, &a);
        double per_pos = q4 ? 2.0 * c.n_head * q4_row_bytes(c.head_dim, kv_group(c.head_dim, 64)) : 2.0 * c.hidden * 4;
        double bw = nseq * (pos + 1.0) * per_pos / t;
        for (int r = 0; r < pseq * plen; r++) slot[r] = r / plen, ps[r] = r % plen;
        a.st.n = pseq * plen;
        t = probe_time(probe_attn_run, &a);
        double fl = 2.0 * c.hidden * pseq * plen * (plen + 1.0) / t;
        if (q4) hw->cpu_attn_q4_bw = bw, hw->cpu_attn_q4_flops_p = fl;
        else hw->cpu_attn_bw = bw, hw->cpu_attn_flops_p = fl;
        probe_note("cpu attention, %s cache: decode %.1f GB/s of cache, prefill %.1f GFLOP/s\n", q4 ? "4-bit" : "f32  ",
                   bw / 1e9, fl / 1e9);
        kv_free(&kv);
    }
    scratch_free(&s);
    free(tok);
}

static void probe_memory(Hardware *hw) {
    double phys = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
    hw->cpu_mem = phys;
    size_t bytes = (size_t)fmin(GiB, fmax(64.0 * 1048576, phys / 16));
    StreamCtx s = {.n = bytes / 8};
    uint64_t *buf = check_malloc(bytes, "probe memory buffer");
    for (size_t i = 0; i < s.n; i++) buf[i] = i; /* touches every page */
    s.buf = buf;
    hw->cpu_mem_bw = (double)bytes / probe_time(probe_stream, &s);
    probe_note("cpu memory read (%.0f MiB)    %.1f GB/s\n", bytes / 1048576.0, hw->cpu_mem_bw / 1e9);
    free(buf);
}

/* Writes then reads `bytes` in 4 MiB requests from 4 threads (the queue depth of the engine's
 * I/O threads): O_DIRECT where the filesystem allows, else buffered I/O with fdatasync and
 * POSIX_FADV_DONTNEED so that the read comes from the device, not the page cache. */
static int probe_disk_try(const char *dir, double bytes, int direct, double *wr, double *rd) {
    const size_t chunk = 4 << 20;
    const int nthr = 4;
    size_t nchunk = (size_t)fmax(1, bytes / chunk);
    char path[4096];
    snprintf(path, sizeof path, "%s/opt-probe-%ld.tmp", dir, (long)getpid());
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | (direct ? O_DIRECT : 0), 0600);
    if (fd < 0 && direct && errno == EINVAL) return -1; /* no O_DIRECT here */
    if (fd < 0) die("%s: cannot create the disk probe's file there: %s", dir, strerror(errno));
    int slot = tmp_add(path, 0); /* removed however we end */
    char *buf;
    if (posix_memalign((void **)&buf, 4096, chunk * nthr)) die("out of memory for the disk probe's buffers");
    uint64_t xs = 88172645463325252ull;
    for (size_t i = 0; i < chunk * nthr / 8; i++) { /* incompressible */
        xs ^= xs << 13, xs ^= xs >> 7, xs ^= xs << 17;
        ((uint64_t *)buf)[i] = xs;
    }
    int err = 0;
    double t0 = now_sec();
    #pragma omp parallel for num_threads(nthr) schedule(dynamic, 1)
    for (size_t c = 0; c < nchunk; c++) {
        const char *b = buf + (size_t)omp_get_thread_num() * chunk;
        for (size_t done = 0; done < chunk && !err;) {
            ssize_t w = pwrite(fd, b + done, chunk - done, (off_t)(c * chunk + done));
            if (w <= 0) { err = w < 0 ? errno : ENOSPC; break; }
            done += (size_t)w;
        }
    }
    if (!err && fdatasync(fd)) err = errno;
    *wr = (double)nchunk * chunk / (now_sec() - t0);
    if (err == EINVAL && direct) { /* O_DIRECT accepted at open, refused at write */
        close(fd), tmp_remove(slot), free(buf);
        return -1;
    }
    if (err) {
        close(fd), tmp_remove(slot);
        if (err == ENOSPC) die("%s: no space left for the disk probe's %.0f MiB file (use --disk-bytes or another --offload-dir)", dir, nchunk * 4.0);
        die("%s: writing the disk probe's file failed: %s", dir, strerror(err));
    }
    if (!direct) posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED); /* clean pages: dropped */
    t0 = now_sec();
    #pragma omp parallel for num_threads(nthr) schedule(dynamic, 1)
    for (size_t c = 0; c < nchunk; c++) {
        char *b = buf + (size_t)omp_get_thread_num() * chunk;
        for (size_t done = 0; done < chunk && !err;) {
            ssize_t r = pread(fd, b + done, chunk - done, (off_t)(c * chunk + done));
            if (r <= 0) { err = r < 0 ? errno : EIO; break; }
            done += (size_t)r;
        }
    }
    *rd = (double)nchunk * chunk / (now_sec() - t0);
    close(fd);
    tmp_remove(slot);
    free(buf);
    if (err) die("%s: reading the disk probe's file back failed: %s", dir, strerror(err));
    return 0;
}

/* Checks DIR before anything is measured, so that a bad one costs one line and no time; the
 * free space becomes the disk budget. */
static void probe_disk_check(Hardware *hw, const char *dir, double bytes) {
    struct stat st;
    if (stat(dir, &st)) die("%s: %s (--offload-dir)", dir, strerror(errno));
    if (!S_ISDIR(st.st_mode)) die("%s: not a directory (--offload-dir)", dir);
    if (access(dir, W_OK)) die("%s: not writable: %s (--offload-dir)", dir, strerror(errno));
    struct statvfs vfs;
    if (statvfs(dir, &vfs)) die("%s: %s", dir, strerror(errno));
    hw->disk_mem = (double)vfs.f_bavail * (double)vfs.f_frsize;
    if (hw->disk_mem < bytes + 64.0 * 1048576)
        die("%s: %.0f MiB free, the disk probe needs %.0f MiB (use --disk-bytes or another --offload-dir)", dir,
            hw->disk_mem / 1048576, bytes / 1048576 + 64);
}

static void probe_disk(Hardware *hw, const char *dir, double bytes, int *direct) {
    offload_sweep(dir);
    if (!*direct || probe_disk_try(dir, bytes, 1, &hw->disk_write_bw, &hw->disk_read_bw)) {
        *direct = 0;
        probe_disk_try(dir, bytes, 0, &hw->disk_write_bw, &hw->disk_read_bw);
    }
    probe_note("disk write (%s, %.0f MiB, %s) %.2f GB/s\n", dir, bytes / 1048576, *direct ? "O_DIRECT" : "buffered + fadvise",
               hw->disk_write_bw / 1e9);
    probe_note("disk read                      %.2f GB/s\n", hw->disk_read_bw / 1e9);
}

/* CPU cost of one request of the engine's I/O threads (offload.c's pool): a queue under a mutex,
 * a condition variable per submission, 4 workers doing pread. The cache's and the activations'
 * disk share is read and written in small requests (two per (sequence, head) area and
 * direction, every layer and GPU batch) through the page cache, so on a small machine their
 * cost is the CPU these take from the compute threads, not the disk's bandwidth. Measured as
 * the process's CPU seconds per 4 KiB buffered read of a cached file. */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv, done;
    int fd, queued, pending, stop;
    char *buf;
} ReqPool;

static void *probe_req_worker(void *arg) {
    ReqPool *p = arg;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->queued && !p->stop) pthread_cond_wait(&p->cv, &p->mu);
        if (!p->queued) break;
        int i = --p->queued;
        pthread_mutex_unlock(&p->mu);
        char tmp[4096];
        if (pread(p->fd, tmp, sizeof tmp, (off_t)(i % 4096) * 4096) < 0) tmp[0] = 0;
        p->buf[i % 64] = tmp[0];
        pthread_mutex_lock(&p->mu);
        if (--p->pending == 0) pthread_cond_broadcast(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

static void probe_io_requests(Hardware *hw, const char *dir) {
    char path[4200];
    snprintf(path, sizeof path, "%s/opt-probe-req-%ld.tmp", dir, (long)getpid());
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0) die("%s: cannot create the probe's file: %s", dir, strerror(errno));
    unlink(path); /* gone when closed, also if we die */
    char *blk = check_calloc(1 << 20, "probe buffer");
    for (int i = 0; i < 16; i++)
        if (pwrite(fd, blk, 1 << 20, (off_t)i << 20) != 1 << 20) die("%s: writing the probe's file failed", dir);
    ReqPool p = {.fd = fd, .buf = blk};
    pthread_mutex_init(&p.mu, NULL);
    pthread_cond_init(&p.cv, NULL);
    pthread_cond_init(&p.done, NULL);
    pthread_t th[4];
    for (int i = 0; i < 4; i++)
        if (pthread_create(&th[i], NULL, probe_req_worker, &p)) die("cannot start the probe's threads");
    const int groups = 60, per = 96; /* e.g. 12 heads x 4 sequences x 2 (keys, values) */
    struct timespec c0, c1;
    double w0 = now_sec();
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c0);
    for (int g = 0; g < groups; g++) {
        pthread_mutex_lock(&p.mu);
        p.pending += per;
        pthread_mutex_unlock(&p.mu);
        for (int r = 0; r < per; r++) { /* one submission at a time, as io_submit does */
            pthread_mutex_lock(&p.mu);
            p.queued++;
            pthread_cond_signal(&p.cv);
            pthread_mutex_unlock(&p.mu);
        }
        pthread_mutex_lock(&p.mu);
        while (p.pending) pthread_cond_wait(&p.done, &p.mu);
        pthread_mutex_unlock(&p.mu);
    }
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c1);
    double cpu = (double)(c1.tv_sec - c0.tv_sec) + 1e-9 * (double)(c1.tv_nsec - c0.tv_nsec), wall = now_sec() - w0;
    pthread_mutex_lock(&p.mu);
    p.stop = 1;
    pthread_cond_broadcast(&p.cv);
    pthread_mutex_unlock(&p.mu);
    for (int i = 0; i < 4; i++) pthread_join(th[i], NULL);
    close(fd);
    free(blk);
    hw->io_req_cpu_s = cpu / (groups * per);
    probe_note("I/O request (4 KiB, page cache) %.1f us of CPU (%.1f us of wall time)\n", hw->io_req_cpu_s * 1e6,
               wall / (groups * per) * 1e6);
}

const char probe_usage[] =
    "usage: opt probe [--offload-dir DIR] [--disk-bytes SIZE] [--buffered] [--quick] [-o FILE]\n"
    "  Measures this machine for `opt plan --hw FILE`:\n"
    "  - GPU (CUDA builds with a device): pinned host<->device bandwidth, GEMM and attention rates\n"
    "  - disk: write then read a temporary file of SIZE (default 1G) in DIR (default .), removed\n"
    "    afterwards; O_DIRECT where the filesystem allows it, else (or with --buffered) page-cache\n"
    "    I/O with the file's pages dropped (fdatasync + POSIX_FADV_DONTNEED) before the read\n"
    "  - CPU: opt's own GEMM at M = 1 over 1 GiB of weights (f16 and 4-bit, bytes/s), at M = 8, 64\n"
    "    and 512 (FLOP/s); the engine's attention (decode and prefill, f32 and 4-bit cache); one\n"
    "    OpenMP parallel region; the CPU cost of an I/O request; RAM streaming bandwidth and size\n"
    "  Each figure is a mean over ~0.5 s (--quick: 0.15 s), so it includes what other processes on\n"
    "  the machine take from the engine at the time.\n"
    "  Writes one JSON object (\"format\": \"" PROBE_FORMAT "\"; bytes, bytes/s, FLOP/s, seconds) to\n"
    "  FILE or stdout (also -o -); progress goes to stderr. Takes ~15 s (--quick: ~6 s).\n";

/* Measures this machine into hw (and gp when there is a GPU): what `opt probe`
 * writes, and what `--policy auto` and `opt plan` use when no --hw is given. */
void hw_probe(Hardware *hw, GpuProbe *gp, const char *dir, double disk_bytes, int *direct) {
    probe_disk_check(hw, dir, disk_bytes);
    hw->has_gpu = gpu_probe_bandwidth(gp) == 0 && gpu_probe_compute(gp) == 0;
    if (hw->has_gpu) {
        hw->gpu_mem = gp->mem_bytes, hw->h2d_bw = gp->h2d_bw, hw->d2h_bw = gp->d2h_bw, hw->gpu_mem_bw = gp->mem_bw;
        hw->gpu_gemm_flops_g = gp->gemm_flops_g, hw->gpu_gemm_flops_p = gp->gemm_flops_p;
        hw->gpu_bmm_flops_p = gp->bmm_flops_p, hw->gpu_bmm_flops_g = gp->bmm_flops_g, hw->gpu_dequant_bw = gp->dequant_bw;
        probe_note("gpu %s: h2d %.1f GB/s, d2h %.1f GB/s, gemm %.0f / %.0f TFLOP/s\n", gp->name, gp->h2d_bw / 1e9,
                   gp->d2h_bw / 1e9, gp->gemm_flops_g / 1e12, gp->gemm_flops_p / 1e12);
    } else {
        probe_note("no GPU (%s): the plan will compute on the CPU\n", gpu_describe());
    }
    probe_disk(hw, dir, disk_bytes, direct);
    probe_io_requests(hw, dir);
    probe_memory(hw);
    probe_cpu(hw);
    probe_attention(hw);
    if (hw->has_gpu) hw->layer_overhead = 20e-6; /* launches and a sync; kernels.cu may measure it */
    snprintf(hw->name, sizeof hw->name, "this machine (measured now: %.60s, %d threads, %.0f GiB RAM)",
             hw->has_gpu ? gp->name : "no GPU", omp_get_max_threads(), hw->cpu_mem / GiB);
    hw_derive(hw);
}

int probe_main(int argc, char **argv) {
    const char *dir = ".", *out = NULL;
    double disk_bytes = GiB;
    int direct = 1, quick = 0; /* try O_DIRECT first */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
#define PROBE_VAL() (i + 1 < argc ? argv[++i] : (die("%s needs a value (see opt probe --help)", a), ""))
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { fputs(probe_usage, stdout); return 0; }
        else if (!strcmp(a, "--offload-dir")) dir = PROBE_VAL();
        else if (!strcmp(a, "-o") || !strcmp(a, "--output")) out = PROBE_VAL();
        else if (!strcmp(a, "--disk-bytes")) disk_bytes = size_parse(a, PROBE_VAL());
        else if (!strcmp(a, "--buffered")) direct = 0;
        else if (!strcmp(a, "--quick")) quick = 1;
        else die("probe: unknown option '%s' (see opt probe --help)", a);
#undef PROBE_VAL
    }
    if (disk_bytes < 4 << 20) die("--disk-bytes: at least 4M");
    if (out && !strcmp(out, "-")) out = NULL; /* -o -: stdout, as without -o */
    g_probe_window = quick ? 0.15 : 0.5;
    Hardware hw = {0};
    GpuProbe gp = {0};
    hw_probe(&hw, &gp, dir, disk_bytes, &direct);

    char host[256] = "unknown";
    gethostname(host, sizeof host - 1);
    time_t now = time(NULL);
    char date[32];
    strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    static const char *const simd[] = {"scalar", "avx2", "avx512"};
    FILE *f = stdout; /* opened only now: a failed probe leaves no empty file behind */
    if (out && !(f = fopen(out, "w"))) die("%s: %s", out, strerror(errno));
    fprintf(f, "{\"format\": \"" PROBE_FORMAT "\", \"host\": ");
    json_write_str(f, host, strlen(host));
    fprintf(f, ", \"date\": \"%s\", \"threads\": %d, \"simd\": \"%s\",\n \"gpu\": %s, \"gpu_name\": ", date, omp_get_max_threads(),
            simd[g_simd], hw.has_gpu ? "true" : "false");
    const char *gname = hw.has_gpu ? gp.name : gpu_describe();
    json_write_str(f, gname, strlen(gname));
    fprintf(f, ",\n \"offload_dir\": ");
    json_write_str(f, dir, strlen(dir));
    fprintf(f, ", \"disk_direct_io\": %s, \"disk_probe_bytes\": %.0f,\n", direct ? "true" : "false", disk_bytes);
    for (size_t i = 0; i < sizeof probe_keys / sizeof *probe_keys; i++) {
        const ProbeKey *k = &probe_keys[i];
        if ((k->gpu && !hw.has_gpu) || (k->opt && !(*(const double *)((const char *)&hw + k->off) > 0))) continue;
        fprintf(f, " \"%s\": %.6g,\n", k->key, *(const double *)((const char *)&hw + k->off));
    }
    fprintf(f, " \"layer_overhead\": %.3g}\n", hw.layer_overhead);
    if (ferror(f) || (f != stdout && fclose(f))) die("%s: write error", out ? out : "stdout");
    if (out) probe_note("wrote %s\n", out);
    return 0;
}
