/* tests/test_q4.c: unit tests of the 4-bit group-wise format (quant.c) and its kernels.
 *
 * Built and run by tests/test_q4.py (from the repository root):
 *   cc -std=c11 -O2 -fopenmp -ffp-contract=off -D_GNU_SOURCE -DOPT_NO_MAIN -I. \
 *      tests/test_q4.c quant.c offload.c lp.c -lm -lpthread && ./a.out [SEED]
 *
 * It includes opt.c (as tests/test_kernels.c does) for gemm(), the static f32 attention
 * kernels, the SIMD globals and the helpers. Each run draws fresh inputs from a seed (argv[1],
 * $TEST_SEED or the clock), printed first so that a failure can be reproduced. Outputs are
 * poisoned with a NaN before each call and the gaps of strided inputs hold NaN, so an element
 * a kernel forgets to write, or reads past the end of, shows up.
 *
 * Groups (each prints PASS/FAIL; exit status 1 when any failed):
 *   roundtrip  q4_quantize_row then q4_dequantize_row on rows of every kind (normal, uniform,
 *              outliers, constant, near-constant, subnormal and f16-edge ranges), cols not
 *              multiples of 16 or of the group: |x - deq| <= half a step (+ the f16
 *              rounding of min and scale, and f32 rounding); constant groups store scale 0,
 *              codes 0 and dequantize exactly to min; padding codes past cols are 0; the row
 *              is q4_row_bytes long (a canary after it stays).
 *   gemm       gemm() on a DT_Q4 tensor equals gemm() on the DT_F32 tensor of its dequantized
 *              rows BIT FOR BIT, for every M in 1..70 (the small-M tiles and, from 64 rows, the
 *              lane GEMM), at every SIMD level; a row's result is the same bits at every level
 *              and every M (batch invariance); bias/residual/ReLU, strided x and y, split
 *              tensors (rows at data and data2, as offloading splits them); groups 32/64/128,
 *              K not multiples of 16 or of the group, N not multiples of the tiles.
 *   attention  q4_attn_scores / q4_attn_mix as cpu_attention calls them (up to AQ query rows,
 *              the rows' own lengths, the mix continued per row): scores equal the f32 GEMM
 *              order dot (dot_scalar) over the dequantized keys bit for bit and the f32
 *              attention (attn_scores, keys transposed) within rounding; the mix equals the
 *              f32 attn_mix over the dequantized values bit for bit (same order); both
 *              bitwise across levels; head_dim 16..512 (not multiples of 16 too).
 *
 * Run it with OMP_WAIT_POLICY=passive (test_q4.py does): opt.c sets that default from a
 * constructor, which a dynamically linked libgomp has already read by then, and spinning
 * threads make this test 20x slower on a 2-vCPU machine.
 *
 * Helper modes for test_q4.py's numpy comparison (raw little-endian files):
 *   ./a.out quant G COLS IN.f32 OUT.q4     rows of COLS floats -> q4_quantize_row
 *   ./a.out dequant G COLS IN.q4 OUT.f32   rows of q4_row_bytes(COLS, G) -> q4_dequantize_row
 */
#ifndef OPT_NO_MAIN
#define OPT_NO_MAIN
#endif
#include "../opt.c"

#include <float.h>
#include <time.h>

#include "check.h"

static float rnd_normal(void) {
    double u = rnd_unit() + 0x1p-60, v = rnd_unit();
    return (float)(sqrt(-2 * log(u)) * cos(6.283185307179586 * v));
}

static uint32_t bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static int g_levels[3], g_nlevels;
static const char *const level_names[] = {"scalar", "avx2", "avx512"};
static char g_level_list[64];

static const int GROUPS[3] = {32, 64, 128};

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) { printf("out of memory\n"); exit(2); }
    return p;
}

/* ---------------------------------------------------------------------------------------
 * Rows of every kind, for the round trip and as weights. */

static void fill_row(float *r, int n, int kind) {
    float base = rnd_normal(), amp = (float)pow(10.0, rnd_int(-3, 2));
    for (int i = 0; i < n; i++) {
        switch (kind) {
        case 0: r[i] = amp * rnd_normal(); break;                                  /* normal */
        case 1: r[i] = amp * rnd_sym() + base; break;                              /* uniform, offset */
        case 2: r[i] = rnd_u64() % 13 ? 0.02f * rnd_normal() : 8 * rnd_normal(); break; /* outliers */
        case 3: r[i] = base; break;                                                /* constant row */
        case 4: r[i] = i / 16 % 2 ? base : rnd_normal(); break;                    /* constant 16-runs */
        case 5: r[i] = 1.0f + (float)(rnd_u64() % 3) * FLT_EPSILON; break;         /* near-constant: scale underflows f16 */
        case 6: r[i] = 1e-6f * rnd_sym(); break;                                   /* subnormal f16 min and scale */
        case 7: r[i] = 60000.0f * rnd_sym(); break;                                /* near the f16 range */
        case 8: r[i] = (float)rnd_int(-7, 8); break;                               /* integers: ties in rint */
        default: r[i] = (float)(rnd_u64() % 5) * 0.25f - 0.5f; break;               /* few levels: exact steps */
        }
    }
}
enum { N_KINDS = 10 };

/* ---------------------------------------------------------------------------------------
 * roundtrip */

static void test_roundtrip(void) {
    double worst = 0, worst_sub = 0, worst_bound = 0; /* max |x - deq| / scale: normal f16 scales, subnormal ones */
    long constant = 0, groups = 0;
    for (int it = 0; it < 600; it++) {
        int G = GROUPS[it % 3], cols = it < 30 ? 1 + it : rnd_int(1, 600), kind = it % N_KINDS;
        size_t rb = q4_row_bytes(cols, G);
        float *x = xmalloc(sizeof(float) * (size_t)cols), *d = xmalloc(sizeof(float) * (size_t)cols + 64);
        uint8_t *q = xmalloc(rb + 16);
        fill_row(x, cols, kind);
        memset(q, 0xA5, rb + 16);
        poison(d, (size_t)cols + 16);
        q4_quantize_row(q, x, cols, G, "test row");
        q4_dequantize_row(d, q, cols, G);
        { /* every level dequantizes to the same bits as the scalar loop */
            float *ds = xmalloc(sizeof(float) * (size_t)cols);
            g_simd = SIMD_SCALAR;
            q4_dequantize_row(ds, q, cols, G);
            g_simd = g_simd_max;
            g_checks++;
            if (memcmp(ds, d, sizeof(float) * (size_t)cols)) fail("cols %d G %d: %s dequantization differs from the scalar one", cols, G, level_names[g_simd_max]);
            free(ds);
        }
        g_checks += 3;
        if (rb != (size_t)((cols + G - 1) / G) * (size_t)(4 + G / 2)) fail("q4_row_bytes(%d, %d) = %zu", cols, G, rb);
        for (int i = 0; i < 16; i++) if (q[rb + (size_t)i] != 0xA5) { fail("quantize wrote past the row (cols %d, G %d)", cols, G); break; }
        for (int i = 0; i < 16; i++) if (bits(d[cols + i]) != POISON) { fail("dequantize wrote past the row (cols %d, G %d)", cols, G); break; }
        for (int g0 = 0; g0 < cols; g0 += G) {
            const uint8_t *blk = q + (size_t)(g0 / G) * (4 + (size_t)G / 2);
            int n = cols - g0 < G ? cols - g0 : G;
            uint16_t sb, mb;
            memcpy(&sb, blk, 2);
            memcpy(&mb, blk + 2, 2);
            float fs = f16_to_f32(sb), fm = f16_to_f32(mb), mn = INFINITY, mx = -INFINITY;
            for (int i = 0; i < n; i++) { mn = fminf(mn, x[g0 + i]); mx = fmaxf(mx, x[g0 + i]); }
            groups++;
            g_checks += 3;
            if (mb != f32_to_f16(mn)) fail("cols %d G %d group %d: min bits %04x, expected f16(%.9g) = %04x", cols, G, g0 / G, mb, mn, f32_to_f16(mn));
            if (sb != f32_to_f16((mx - mn) / 15.0f)) fail("cols %d G %d group %d: scale bits %04x, expected %04x", cols, G, g0 / G, sb, f32_to_f16((mx - mn) / 15.0f));
            /* padding codes past the row's end are 0 */
            for (int i = n; i < G; i++) {
                int nib = (i & ~15) + (i & 15) / 2 + 8 * (i & 1);
                if (blk[4 + nib / 2] >> (4 * (nib & 1)) & 15) { fail("cols %d G %d: padding code %d of the last group is not 0", cols, G, i); break; }
            }
            if (fs == 0) { /* constant (or scale below f16): codes 0, values exactly min */
                constant++;
                for (int i = 0; i < G / 2; i++) if (blk[4 + i]) { fail("cols %d G %d group %d: constant group with a non-zero code byte", cols, G, g0 / G); break; }
                for (int i = 0; i < n; i++) {
                    g_checks++;
                    if (!same_bits(d[g0 + i], fm)) { fail("cols %d G %d: constant group value %.9g != min %.9g", cols, G, d[g0 + i], fm); break; }
                }
                continue;
            }
            /* half a step, plus what the f16 rounding of min and scale moves the grid by */
            double s_exact = ((double)mx - mn) / 15.0;
            double bound = 0.5 * fs + fabs((double)fm - mn) + 15.0 * fabs((double)fs - s_exact) + 4.0 * FLT_EPSILON * fmax(fabs(mn), fabs(mx));
            for (int i = 0; i < n; i++) {
                double e = fabs((double)x[g0 + i] - d[g0 + i]);
                g_checks++;
                if (!(e <= bound)) { fail("cols %d G %d kind %d: |x - deq| = %.3g > bound %.3g (scale %.3g) at %d", cols, G, kind, e, bound, fs, g0 + i); break; }
                if (e / bound > worst_bound) worst_bound = e / bound;
                if (fs >= 0x1p-14f && e / fs > worst) worst = e / fs; /* normal f16 scales */
                if (fs < 0x1p-14f && e / fs > worst_sub) worst_sub = e / fs;
            }
        }
        free(x); free(d); free(q);
    }
    char s[300];
    snprintf(s, sizeof s, "600 rows, %ld groups (%ld constant); max |x - deq| = %.3f of the bound, %.3f steps (%.3f where the f16 scale is subnormal; beyond 0.5 only from the f16 min and scale)", groups, constant, worst_bound, worst, worst_sub);
    group_end("roundtrip", s);
}

/* ---------------------------------------------------------------------------------------
 * gemm: fused 4-bit vs dequantize + f32 GEMM */

typedef struct {
    int N, K, G, Mmax;
    int64_t ldx, ldy;
    bool bias, acc, relu;
    float *x, *b, *y0;
    uint8_t *wq;          /* (N, rb) quantized rows */
    float *wf;            /* (N, K) their dequantized values */
    uint8_t *qa, *qb;     /* a split q4 tensor's parts */
    float *fa, *fb;       /* a split f32 tensor's parts */
    Tensor tq, tf;
} GCase;

static void gcase_make(GCase *c, int N, int K, int G, int Mmax) {
    memset(c, 0, sizeof *c);
    c->N = N; c->K = K; c->G = G; c->Mmax = Mmax;
    c->ldx = K + (rnd_u64() % 2) * rnd_int(1, 9);
    c->ldy = N + (rnd_u64() % 2) * rnd_int(1, 5);
    c->bias = rnd_u64() % 2; c->acc = rnd_u64() % 3 == 0; c->relu = rnd_u64() % 2;
    size_t rb = q4_row_bytes(K, G);
    c->x = xmalloc(sizeof(float) * (size_t)(Mmax * c->ldx));
    poison(c->x, (size_t)(Mmax * c->ldx)); /* the gaps past K stay NaN */
    for (int m = 0; m < Mmax; m++)
        for (int k = 0; k < K; k++) c->x[m * c->ldx + k] = rnd_u64() % 17 ? rnd_normal() : 0.0f;
    c->b = xmalloc(sizeof(float) * (size_t)N);
    for (int n = 0; n < N; n++) c->b[n] = rnd_sym();
    c->y0 = xmalloc(sizeof(float) * (size_t)(Mmax * c->ldy));
    for (int64_t i = 0; i < Mmax * c->ldy; i++) c->y0[i] = 2 * rnd_sym();
    c->wq = xmalloc(rb * (size_t)N);
    c->wf = xmalloc(sizeof(float) * (size_t)N * K);
    float *row = xmalloc(sizeof(float) * (size_t)K);
    for (int n = 0; n < N; n++) {
        int kind = rnd_u64() % 4 ? 0 : rnd_int(0, N_KINDS - 1);
        fill_row(row, K, kind);
        q4_quantize_row(c->wq + rb * (size_t)n, row, K, G, "test weights");
        q4_dequantize_row(c->wf + (size_t)n * K, c->wq + rb * (size_t)n, K, G);
    }
    free(row);
    c->tq = (Tensor){.dtype = DT_Q4, .rows = N, .cols = K, .data = c->wq, .group = G, .tier = TIER_CPU, .name = "q4"};
    c->tf = (Tensor){.dtype = DT_F32, .rows = N, .cols = K, .data = c->wf, .tier = TIER_CPU, .name = "f32"};
    if (N >= 2 && rnd_u64() % 2) { /* split: rows [split, N) at data2, junk past split at data */
        int split = rnd_int(1, N - 1);
        c->qa = xmalloc(rb * (size_t)N);
        c->qb = xmalloc(rb * (size_t)(N - split));
        for (size_t i = 0; i < rb * (size_t)N; i++) c->qa[i] = (uint8_t)rnd_u64();
        memcpy(c->qa, c->wq, rb * (size_t)split);
        memcpy(c->qb, c->wq + rb * (size_t)split, rb * (size_t)(N - split));
        c->fa = xmalloc(sizeof(float) * (size_t)N * K);
        c->fb = xmalloc(sizeof(float) * (size_t)(N - split) * K);
        poison(c->fa, (size_t)N * K);
        memcpy(c->fa, c->wf, sizeof(float) * (size_t)split * K);
        memcpy(c->fb, c->wf + (size_t)split * K, sizeof(float) * (size_t)(N - split) * K);
        c->tq.data = c->qa; c->tq.data2 = c->qb; c->tq.split = split;
        c->tf.data = c->fa; c->tf.data2 = c->fb; c->tf.split = split;
    }
}

static void gcase_free(GCase *c) { free(c->x); free(c->b); free(c->y0); free(c->wq); free(c->wf); free(c->qa); free(c->qb); free(c->fa); free(c->fb); }

static float *g_xm; /* x with the rows past M poisoned */
static void gcase_run(const GCase *c, const Tensor *w, int M, float *y) {
    size_t ny = (size_t)(c->Mmax * c->ldy);
    g_xm = realloc(g_xm, sizeof(float) * (size_t)(c->Mmax * c->ldx));
    poison(g_xm, (size_t)(c->Mmax * c->ldx));
    memcpy(g_xm, c->x, sizeof(float) * (size_t)(M * c->ldx));
    if (c->acc) memcpy(y, c->y0, sizeof(float) * ny);
    else poison(y, ny);
    Gemm g = {.y = y, .x = g_xm, .w = w, .bias = c->bias ? c->b : NULL, .ldy = c->ldy, .ldx = c->ldx,
              .M = M, .N = c->N, .K = c->K, .acc = c->acc, .relu = c->relu};
    gemm(&g);
}

/* Compares rows [0, M) of y (all N columns) with want; the gaps past N must be untouched. */
static void gcase_cmp(const GCase *c, int M, const float *y, const float *want, const char *what, int lvl) {
    for (int m = 0; m < M; m++) {
        for (int n = 0; n < c->N; n++) {
            float a = y[m * c->ldy + n], b = want[m * c->ldy + n];
            g_checks++;
            if (!same_bits(a, b)) {
                fail("%s: N %d K %d G %d M %d at %s: y[%d][%d] = %.9g (%08x), expected %.9g (%08x)%s", what, c->N, c->K, c->G, M,
                     level_names[lvl], m, n, a, bits(a), b, bits(b), c->tq.data2 ? " (split)" : "");
                return;
            }
        }
        for (int64_t n = c->N; n < c->ldy; n++) {
            float a = y[m * c->ldy + n], b = c->acc ? c->y0[m * c->ldy + n] : 0;
            if (c->acc ? !same_bits(a, b) : bits(a) != POISON) { fail("%s: wrote the gap past N (N %d ldy %lld)", what, c->N, (long long)c->ldy); return; }
        }
    }
}

static void test_gemm(void) {
    int ncase = 0, lanes_rows = 0;
    /* shapes: (N, K) with K < 16, K < G, K not a multiple of 16 or of G, exact multiples;
     * each group size gets the fixed ones and random ones */
    static const int fixed[][2] = {{1, 1}, {7, 15}, {13, 40}, {9, 100}, {50, 144}, {3, 128}, {17, 257}, {49, 96}};
    for (int gi = 0; gi < 3; gi++) {
        int G = GROUPS[gi];
        int nshape = (int)(sizeof fixed / sizeof fixed[0]) + 4;
        for (int s = 0; s < nshape; s++) {
            int N, K;
            if (s < (int)(sizeof fixed / sizeof fixed[0])) { N = fixed[s][0]; K = fixed[s][1]; }
            else { N = rnd_int(1, 110); K = rnd_int(1, 420); if (K % 16 == 0) K += rnd_int(1, 15); }
            GCase c;
            gcase_make(&c, N, K, G, 70);
            ncase++;
            size_t ny = (size_t)(70 * c.ldy);
            float *ref = xmalloc(sizeof(float) * ny), *yq = xmalloc(sizeof(float) * ny), *yf = xmalloc(sizeof(float) * ny);
            /* the reference rows: scalar level, all 70 rows at once (the scalar path is per row) */
            g_simd = SIMD_SCALAR;
            gcase_run(&c, &c.tq, 70, ref);
            for (int li = 0; li < g_nlevels; li++) {
                g_simd = g_levels[li];
                for (int M = 1; M <= 70; M++) {
                    /* the scalar path is per row: a few batch sizes suffice there */
                    if (g_levels[li] == SIMD_SCALAR && M != 1 && M != 2 && M != 5 && M != 63 && M != 64 && M != 70) continue;
                    gcase_run(&c, &c.tq, M, yq);
                    gcase_run(&c, &c.tf, M, yf);
                    gcase_cmp(&c, M, yq, yf, "q4 gemm vs dequantized f32 gemm", g_levels[li]);
                    gcase_cmp(&c, M, yq, ref, "q4 gemm vs the scalar level at M = 70 (levels, batch invariance)", g_levels[li]);
                    if (M >= 64 && g_levels[li] != SIMD_SCALAR) lanes_rows += M;
                }
            }
            free(ref); free(yq); free(yf);
            gcase_free(&c);
        }
    }
    /* threads: one thread gives the same bits as the default team */
    {
        GCase c;
        gcase_make(&c, 97, 333, 64, 70);
        size_t ny = (size_t)(70 * c.ldy);
        float *a = xmalloc(sizeof(float) * ny), *b = xmalloc(sizeof(float) * ny);
        int nt = omp_get_max_threads();
        for (int li = 0; li < g_nlevels; li++) {
            g_simd = g_levels[li];
            for (int M = 1; M <= 70; M += 23) {
                gcase_run(&c, &c.tq, M, a);
                omp_set_num_threads(1);
                gcase_run(&c, &c.tq, M, b);
                omp_set_num_threads(nt);
                gcase_cmp(&c, M, b, a, "q4 gemm with 1 thread vs the team", g_levels[li]);
            }
        }
        free(a); free(b);
        gcase_free(&c);
    }
    g_simd = g_simd_max;
    char s[320];
    snprintf(s, sizeof s, "%d shapes x M 1..70 at %s (scalar: M 1 2 5 63 64 70); bitwise = dequantized f32 GEMM, across levels and batch sizes (%d lane-path rows)",
             ncase, g_level_list, lanes_rows);
    group_end("gemm", s);
}

/* ---------------------------------------------------------------------------------------
 * W4A8 (--compute int8): gemm() against the scheme of quant.c's W4A8 comment written out
 * element by element in natural order (codes read by the format's bit positions), bit for
 * bit; and against double-precision x . dequantized weights within the int8 rounding of x. */

static int q4_code_ref(const uint8_t *blk, int i) { /* element i of a block: bit 4 (e / 2) + 32 (e % 2) of its 16's word */
    uint64_t word;
    memcpy(&word, blk + 4 + 8 * (i / 16), 8);
    int e = i % 16;
    return (int)(word >> (4 * (e / 2) + 32 * (e % 2)) & 15);
}

/* x . w by the scheme; *bound: what int8 rounding of x may move it by (plus f32 slack), *exact:
 * the double dot of x with the dequantized weights. */
static float w4a8_ref(const float *x, const uint8_t *w, int K, int G, double *bound, double *exact) {
    size_t bs = 4 + (size_t)G / 2;
    float y = 0;
    double b = 0, mag = 0, ex = 0;
    int ng = 0;
    for (int k0 = 0; k0 < K; k0 += G, ng++) {
        const uint8_t *blk = w + (size_t)(k0 / G) * bs;
        int n = K - k0 < G ? K - k0 : G;
        float mx = 0;
        for (int i = 0; i < n; i++) { float v = fabsf(x[k0 + i]); mx = v > mx ? v : mx; }
        float a = mx / 127.0f;
        uint16_t h[2];
        memcpy(h, blk, 4);
        float s = f16_to_f32(h[0]), mn = f16_to_f32(h[1]);
        int32_t isum = 0, qsum = 0;
        for (int i = 0; i < n; i++) {
            int q = 0;
            if (a > 0) {
                float t = x[k0 + i] / a;
                t = t > -127.0f ? t : -127.0f;
                t = t < 127.0f ? t : 127.0f;
                q = (int)rintf(t);
            }
            int c = q4_code_ref(blk, i);
            isum += q * c, qsum += q;
            double wv = (double)c * s + mn;
            b += fabs(wv) * a / 2;
            mag += fabs(wv) * (fabs(x[k0 + i]) + a / 2);
            ex += (double)x[k0 + i] * wv;
        }
        y = fmaf((float)isum, s * a, y);
        y = fmaf(mn, a * (float)qsum, y);
    }
    *bound = b * 1.0001 + (2.0 * ng + 4) * 0x1p-24 * mag;
    *exact = ex;
    return y;
}

static void test_w4a8(void) {
    if (!g_vnni || g_simd_max != SIMD_AVX512) { printf("SKIP w4a8         (needs AVX-512 VNNI)\n"); return; }
    static const int fixed[][2] = {{1, 1}, {7, 15}, {13, 40}, {9, 100}, {50, 144}, {3, 128}, {17, 257}, {49, 96}, {70, 640}};
    static const int groups[] = {16, 32, 48, 64, 80, 128};
    int ncase = 0, rows = 0;
    double worst = 0;
    g_simd = SIMD_AVX512;
    g_w4a8 = 1;
    int nt = omp_get_max_threads();
    for (int gi = 0; gi < 6; gi++) {
        int G = groups[gi], nfix = (int)(sizeof fixed / sizeof fixed[0]);
        for (int s = 0; s < nfix + 3; s++) {
            int N = s < nfix ? fixed[s][0] : rnd_int(1, 110), K = s < nfix ? fixed[s][1] : rnd_int(1, 700);
            GCase c;
            gcase_make(&c, N, K, G, 70);
            if (s % 3 == 1) /* an outlier channel in x: its groups lose precision, the others keep it */
                for (int m = 0; m < 70; m++) c.x[m * c.ldx + (K - 1) / 2] *= 60;
            ncase++;
            size_t ny = (size_t)(70 * c.ldy), rb = q4_row_bytes(K, G);
            float *want = xmalloc(sizeof(float) * ny), *y = xmalloc(sizeof(float) * ny);
            for (int m = 0; m < 70; m++)
                for (int n = 0; n < N; n++) {
                    double bound, exact;
                    float d = w4a8_ref(c.x + m * c.ldx, c.wq + rb * (size_t)n, K, G, &bound, &exact);
                    g_checks++;
                    if (fabs((double)d - exact) > bound) fail("w4a8 scheme: N %d K %d G %d: |%.9g - %.9g| > %.3g", N, K, G, d, exact, bound);
                    if (bound > 0) worst = fmax(worst, fabs((double)d - exact) / bound);
                    float v = c.bias ? d + c.b[n] : d;
                    if (c.acc) v = c.y0[m * c.ldy + n] + v;
                    if (c.relu && v < 0) v = 0;
                    want[m * c.ldy + n] = v;
                }
            Tensor ti = w4_interleave(&c.tq); /* the CPU engine's layout */
            for (int M = 1; M <= 70; M++) {
                if (M > 20 && M % 7 && M != 64 && M != 70) continue;
                gcase_run(&c, &c.tq, M, y);
                gcase_cmp(&c, M, y, want, "w4a8 gemm vs the scalar scheme", SIMD_AVX512);
                gcase_run(&c, &ti, M, y);
                gcase_cmp(&c, M, y, want, "w4a8 gemm on the interleaved layout vs the scalar scheme", SIMD_AVX512);
                if (M % 5 == 1) {
                    omp_set_num_threads(1);
                    gcase_run(&c, &c.tq, M, y);
                    omp_set_num_threads(nt);
                    gcase_cmp(&c, M, y, want, "w4a8 gemm on 1 thread vs the scalar scheme", SIMD_AVX512);
                }
                rows += M;
            }
            free(want); free(y); free((void *)ti.data);
            gcase_free(&c);
        }
    }
    g_w4a8 = 0;
    g_simd = g_simd_max;
    char s[320];
    snprintf(s, sizeof s, "%d shapes (G 16..128, split tensors, outlier channels), %d rows: bitwise = the scalar scheme at M 1..70 "
             "(streaming 1/2/4 rows, then packed; and the interleaved layout, 6/4/2/1-row tiles) and 1 thread; |scheme - exact| <= int8 bound (worst %.2f of it)", ncase, rows, worst);
    group_end("w4a8", s);
}

/* ---------------------------------------------------------------------------------------
 * attention over a 4-bit cache */

static void test_attention(void) {
    static const int dims[] = {16, 20, 32, 48, 64, 80, 96, 100, 128, 256, 500, 512};
    double worst_rel = 0;
    int ncase = 0;
    for (int it = 0; it < 60; it++) {
        int D = dims[it % (int)(sizeof dims / sizeof dims[0])], G = kv_group(D, GROUPS[rnd_int(0, 2)]);
        int n = rnd_int(1, AQ), T0 = rnd_int(1, 200);
        int T[AQ];
        for (int i = 0; i < n; i++) T[i] = T0 + i; /* consecutive positions of one sequence */
        int Tmax = T[n - 1], cap = Tmax + rnd_int(0, 20), cap16 = (cap + KB - 1) / KB * KB;
        size_t rb = q4_row_bytes(D, G);
        uint8_t *kq = xmalloc(rb * (size_t)cap), *vq = xmalloc(rb * (size_t)cap);
        float *kd = xmalloc(sizeof(float) * (size_t)cap * D), *vd = xmalloc(sizeof(float) * (size_t)cap * D);
        float *kt = xmalloc(sizeof(float) * (size_t)cap16 * D); /* f32 keys as kv_store lays them out */
        poison(kt, (size_t)cap16 * D);
        memset(kq, 0, rb * (size_t)cap); /* as kv_init's calloc */
        memset(vq, 0, rb * (size_t)cap);
        float *row = xmalloc(sizeof(float) * (size_t)D);
        for (int t = 0; t < Tmax; t++) {
            fill_row(row, D, rnd_u64() % 5 ? 0 : rnd_int(0, 4));
            q4_quantize_row(kq + rb * (size_t)t, row, D, G, "keys");
            fill_row(row, D, rnd_u64() % 5 ? 0 : rnd_int(0, 4));
            q4_quantize_row(vq + rb * (size_t)t, row, D, G, "values");
            q4_dequantize_row(kd + (size_t)t * D, kq + rb * (size_t)t, D, G);
            q4_dequantize_row(vd + (size_t)t * D, vq + rb * (size_t)t, D, G);
            for (int d = 0; d < D; d++) kt[(size_t)(t / KB) * D * KB + d * KB + t % KB] = kd[(size_t)t * D + d];
        }
        for (int t = Tmax; t < cap16; t++) for (int d = 0; d < D; d++) kt[(size_t)(t / KB) * D * KB + d * KB + t % KB] = 0; /* calloc'd */
        free(row);
        float *qv[AQ], *s4[AQ], *sf[AQ], *o4[AQ], *of[AQ], *s_ref[AQ], *o_ref[AQ], *p[AQ];
        for (int i = 0; i < n; i++) {
            qv[i] = xmalloc(sizeof(float) * 512);
            for (int d = 0; d < D; d++) qv[i][d] = rnd_normal() / sqrtf((float)D);
            s4[i] = xmalloc(sizeof(float) * (size_t)cap16); sf[i] = xmalloc(sizeof(float) * (size_t)cap16);
            s_ref[i] = xmalloc(sizeof(float) * (size_t)cap16);
            o4[i] = xmalloc(sizeof(float) * 512); of[i] = xmalloc(sizeof(float) * 512); o_ref[i] = xmalloc(sizeof(float) * 512);
            p[i] = xmalloc(sizeof(float) * (size_t)cap16);
        }
        for (int li = 0; li < g_nlevels; li++) {
            g_simd = g_levels[li];
            for (int i = 0; i < n; i++) { poison(s4[i], (size_t)cap16); poison(sf[i], (size_t)cap16); poison(o4[i], 512); poison(of[i], 512); }
            q4_attn_scores(s4, (const float *const *)qv, n, kq, D, G, Tmax);
            attn_scores(sf, (const float *const *)qv, n, kt, D, Tmax);
            for (int i = 0; i < n; i++)
                for (int t = 0; t < Tmax; t++) {
                    float want = dot_scalar(qv[i], kd + (size_t)t * D, DT_F32, D);
                    g_checks += 2;
                    if (!same_bits(s4[i][t], want)) { fail("scores D %d G %d T %d at %s: s[%d][%d] = %.9g, GEMM-order dot of the dequantized key %.9g", D, G, Tmax, level_names[g_levels[li]], i, t, s4[i][t], want); goto next; }
                    double mag = 0;
                    for (int d = 0; d < D; d++) mag += fabs((double)qv[i][d] * kd[(size_t)t * D + d]);
                    double err = fabs((double)s4[i][t] - sf[i][t]), tol = 2.0 * D * FLT_EPSILON * mag + 1e-30;
                    if (err / tol > worst_rel) worst_rel = err / tol;
                    if (!(err <= tol)) { fail("scores D %d G %d at %s: q4 %.9g vs f32 attention %.9g (tol %.3g)", D, G, level_names[g_levels[li]], s4[i][t], sf[i][t], tol); goto next; }
                }
            for (int i = 0; i < n; i++) for (int t = Tmax; t < cap16; t++) if (bits(s4[i][t]) != POISON) { fail("scores D %d: wrote s[%d][%d] past T = %d", D, i, t, Tmax); goto next; }
            /* softmax as cpu_attention does, over each row's own length */
            for (int i = 0; i < n; i++) { memcpy(p[i], s4[i], sizeof(float) * (size_t)T[i]); softmax(p[i], T[i]); }
            for (int i = 0; i < n; i++) {
                int t0 = i ? T[0] : 0, rows = i ? 1 : n;
                q4_attn_mix(o4 + i, (const float *const *)p + i, rows, vq, D, G, t0, T[i], !i);
                attn_mix(of + i, (const float *const *)p + i, rows, vd, D, D, t0, T[i], !i);
            }
            for (int i = 0; i < n; i++) {
                for (int d = 0; d < D; d++) {
                    g_checks++;
                    if (!same_bits(o4[i][d], of[i][d])) { fail("mix D %d G %d T %d at %s: out[%d][%d] = %.9g, f32 attn_mix of the dequantized values %.9g", D, G, Tmax, level_names[g_levels[li]], i, d, o4[i][d], of[i][d]); goto next; }
                }
                for (int d = D; d < 512; d++) if (bits(o4[i][d]) != POISON) { fail("mix D %d: wrote out[%d][%d] past D", D, i, d); goto next; }
            }
            if (li == 0) for (int i = 0; i < n; i++) { memcpy(s_ref[i], s4[i], sizeof(float) * (size_t)Tmax); memcpy(o_ref[i], o4[i], sizeof(float) * (size_t)D); }
            else
                for (int i = 0; i < n; i++) {
                    g_checks += 2;
                    if (memcmp(s_ref[i], s4[i], sizeof(float) * (size_t)Tmax)) { fail("scores D %d G %d: %s differs from %s", D, G, level_names[g_levels[li]], level_names[g_levels[0]]); goto next; }
                    if (memcmp(o_ref[i], o4[i], sizeof(float) * (size_t)D)) { fail("mix D %d G %d: %s differs from %s", D, G, level_names[g_levels[li]], level_names[g_levels[0]]); goto next; }
                }
        }
    next:
        ncase++;
        for (int i = 0; i < n; i++) { free(qv[i]); free(s4[i]); free(sf[i]); free(s_ref[i]); free(o4[i]); free(of[i]); free(o_ref[i]); free(p[i]); }
        free(kq); free(vq); free(kd); free(vd); free(kt);
    }
    g_simd = g_simd_max;
    char s[320];
    snprintf(s, sizeof s, "%d caches (head_dim 16..512, 1-4 rows) at %s; scores vs f32 attention within %.2f of the bound", ncase, g_level_list, worst_rel);
    group_end("attention", s);
}

/* ---------------------------------------------------------------------------------------
 * helper modes */

static int io_mode(int argc, char **argv) {
    if (argc != 6) { fprintf(stderr, "usage: %s quant|dequant G COLS IN OUT\n", argv[0]); return 2; }
    int G = atoi(argv[2]), cols = atoi(argv[3]);
    bool quant = !strcmp(argv[1], "quant");
    FILE *f = fopen(argv[4], "rb");
    if (!f || G <= 0 || cols <= 0) { fprintf(stderr, "%s: cannot read %s\n", argv[0], argv[4]); return 2; }
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    size_t rb = q4_row_bytes(cols, G), in_row = quant ? sizeof(float) * (size_t)cols : rb, out_row = quant ? rb : sizeof(float) * (size_t)cols;
    if (sz < 0 || (size_t)sz % in_row) { fprintf(stderr, "%s: %s is not whole rows\n", argv[0], argv[4]); return 2; }
    size_t rows = (size_t)sz / in_row;
    uint8_t *in = xmalloc((size_t)sz), *out = xmalloc(rows * out_row);
    if (fread(in, 1, (size_t)sz, f) != (size_t)sz) return 2;
    fclose(f);
    for (size_t r = 0; r < rows; r++)
        if (quant) q4_quantize_row(out + r * out_row, (const float *)(in + r * in_row), cols, G, "input");
        else q4_dequantize_row((float *)(out + r * out_row), in + r * in_row, cols, G);
    f = fopen(argv[5], "wb");
    if (!f || fwrite(out, 1, rows * out_row, f) != rows * out_row || fclose(f)) { fprintf(stderr, "%s: cannot write %s\n", argv[0], argv[5]); return 2; }
    return 0;
}

int main(int argc, char **argv) {
    simd_init();
    if (argc > 1 && (!strcmp(argv[1], "quant") || !strcmp(argv[1], "dequant"))) return io_mode(argc, argv);
    uint64_t seed = argc > 1 ? strtoull(argv[1], NULL, 10) : getenv("TEST_SEED") ? strtoull(getenv("TEST_SEED"), NULL, 10) : (uint64_t)time(NULL);
    g_rng = seed;
    for (int l = SIMD_SCALAR; l <= g_simd_max; l++) {
        g_levels[g_nlevels++] = l;
        snprintf(g_level_list + strlen(g_level_list), sizeof g_level_list - strlen(g_level_list), "%s%s", l ? "/" : "", level_names[l]);
    }
    printf("test_q4: seed %llu (rerun: ./a.out %llu); levels %s; %d threads\n", (unsigned long long)seed, (unsigned long long)seed,
           g_level_list, omp_get_max_threads());
    fflush(stdout);
    test_roundtrip();
    test_gemm();
    test_w4a8();
    test_attention();
    printf("%s\n", g_failed_groups ? "FAILED" : "all passed");
    return g_failed_groups ? 1 : 0;
}
