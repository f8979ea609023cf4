/* tests/test_i8.c: unit tests of the int8 (W8A8) GEMM in quant.c.
 *
 * Built and run by tests/test_w8a8.py (from the repository root):
 *   cc -std=c11 -O2 -fopenmp -ffp-contract=off -D_GNU_SOURCE -DOPT_NO_MAIN -I. \
 *      tests/test_i8.c $(ls *.c | grep -v '^opt.c$') -lm && ./a.out [SEED]
 *
 * It includes opt.c (as tests/test_kernels.c does) for gemm(), the SIMD globals and the
 * helpers, and reaches quant.c's kernels through gemm(). Each run draws fresh inputs from a
 * seed (argv[1], $TEST_SEED or the clock), printed first so a failure can be reproduced.
 * Outputs are poisoned with a NaN before each call, so an element a kernel forgets to write
 * shows up.
 *
 * Every SIMD level the CPU has is run: scalar, AVX2, AVX-512 without VNNI (g_vnni forced to 0)
 * and AVX-512 VNNI; the row counts cover both the streaming (few rows) and the packed path.
 *
 * Groups (each prints PASS/FAIL; exit status 1 when any failed):
 *   exact      integer-valued inputs whose scales are exactly 1 (x rows reach +-127, weight
 *              scales 1): y must equal the exact integer product, computed here in int64, bit
 *              for bit (|dot| < 2^24, so the float holds it exactly); weights and x hit the
 *              extremes -127 and 127; K, N and M are not multiples of any tile. Long rows
 *              (K up to 65536) with the largest possible sums check that int32 does not wrap.
 *   semantics  random float x, int8 weights with random scales, bias/residual/ReLU, dynamic and
 *              static (saturating) activation scales: y equals this file's own reference of
 *              the documented formula bit for bit.
 *   invariance a row's result is the same bits whether it is computed alone (M = 1) or inside
 *              a batch, with 1 or 2 threads, at every level.
 * Half the cases split the weight tensor in two places (Tensor.data2), as offloading does.
 */
#ifndef OPT_NO_MAIN
#define OPT_NO_MAIN
#endif
#include "../opt.c"

#include <time.h>

#include "check.h"

/* The levels to run: (g_simd, g_vnni) pairs this CPU supports. */
typedef struct { int simd, vnni; const char *name; } Level;
static Level g_levels[4];
static int g_nlevels;
static void levels_init(void) {
    g_levels[g_nlevels++] = (Level){SIMD_SCALAR, 0, "scalar"};
    if (g_simd_max >= SIMD_AVX2) g_levels[g_nlevels++] = (Level){SIMD_AVX2, 0, "avx2"};
    if (g_simd_max >= SIMD_AVX512) g_levels[g_nlevels++] = (Level){SIMD_AVX512, 0, "avx512bw"};
    if (g_simd_max >= SIMD_AVX512 && g_vnni) g_levels[g_nlevels++] = (Level){SIMD_AVX512, 1, "avx512vnni"};
}
static int g_vnni_cpu;
static void level_set(const Level *l) { g_simd = l->simd; g_vnni = l->vnni && g_vnni_cpu; }

/* One GEMM problem with its own copies of everything. */
typedef struct {
    int M, N, K;
    int64_t ldx, ldy;
    float *x, *bias, *y0, *scale;
    int8_t *w;             /* (N, K) the weights, as the reference reads them */
    int8_t *wa, *wb;       /* a split tensor's two parts, or NULL */
    Tensor t;
} Case;

static void case_alloc(Case *c, int M, int N, int K) {
    memset(c, 0, sizeof *c);
    c->M = M; c->N = N; c->K = K;
    c->ldx = K + (rnd_u64() % 2) * 7;
    c->ldy = N + (rnd_u64() % 2) * 3;
    c->x = malloc(sizeof(float) * (size_t)(M * c->ldx));
    poison(c->x, (size_t)(M * c->ldx)); /* the gap past K is NaN: reading it would show */
    c->w = malloc((size_t)N * K);
    c->scale = malloc(sizeof(float) * (size_t)N);
    c->bias = malloc(sizeof(float) * (size_t)N);
    c->y0 = malloc(sizeof(float) * (size_t)(M * c->ldy));
    for (int n = 0; n < N; n++) c->bias[n] = rnd_sym();
    for (int64_t i = 0; i < M * c->ldy; i++) c->y0[i] = 4 * rnd_sym();
    c->t = (Tensor){.dtype = DT_I8, .rows = N, .cols = K, .data = c->w, .scale = c->scale, .tier = TIER_CPU, .name = "test"};
}

static void case_free(Case *c) { free(c->x); free(c->w); free(c->wa); free(c->wb); free(c->scale); free(c->bias); free(c->y0); }

/* Half the time, after the weights are filled: the tensor split across two places as the
 * offloading policy splits it (rows [split, N) at data2; data holds junk past split). */
static void case_split(Case *c) {
    if (c->N < 2 || rnd_u64() % 2) return;
    int split = rnd_int(1, c->N - 1);
    size_t K = (size_t)c->K;
    c->wa = malloc((size_t)c->N * K);
    c->wb = malloc((size_t)(c->N - split) * K);
    memcpy(c->wa, c->w, (size_t)split * K);
    for (size_t i = (size_t)split * K; i < (size_t)c->N * K; i++) c->wa[i] = (int8_t)rnd_int(-127, 127);
    memcpy(c->wb, c->w + (size_t)split * K, (size_t)(c->N - split) * K);
    c->t.data = c->wa;
    c->t.data2 = c->wb;
    c->t.split = split;
}

/* x[m] . w[n] in int64: the exact integer product the int8 GEMM must give */
static int64_t exact_dot(const Case *c, int m, int n, int K) {
    int64_t d = 0;
    for (int k = 0; k < K; k++) d += (int64_t)(int)c->x[(int64_t)m * c->ldx + k] * c->w[(size_t)n * K + k];
    return d;
}

/* Rows [m0, m0 + M) of the case into y (whole (c->M, ldy) buffer, poisoned or y0 for acc). */
static void run(const Case *c, float *y, int m0, int M, bool bias, bool acc, bool relu) {
    size_t ny = (size_t)(c->M * c->ldy);
    if (acc) memcpy(y, c->y0, sizeof(float) * ny);
    else poison(y, ny);
    Gemm g = {.y = y + (int64_t)m0 * c->ldy, .x = c->x + (int64_t)m0 * c->ldx, .w = &c->t, .bias = bias ? c->bias : NULL,
              .ldy = c->ldy, .ldx = c->ldx, .M = M, .N = c->N, .K = c->K, .acc = acc, .relu = relu};
    gemm(&g);
}

/* ---- the reference, written from the documented formula ---- */

static float ref_row_scale(const float *x, int K, float act) {
    if (act > 0) return act;
    float m = 0;
    for (int k = 0; k < K; k++) if (fabsf(x[k]) > m) m = fabsf(x[k]);
    return m / 127.0f;
}

static int ref_q(float x, float s) {
    if (!(s > 0)) return 0;
    double t = rint((double)(x / s)); /* x / s in float, as documented; rint: half to even */
    return t > 127 ? 127 : t < -127 ? -127 : (int)t;
}

static float ref_out(const Case *c, int m, int n, bool bias, bool acc, bool relu, int64_t *dot_out) {
    const float *x = c->x + (int64_t)m * c->ldx;
    float s = ref_row_scale(x, c->K, c->t.act_scale);
    int64_t d = 0;
    for (int k = 0; k < c->K; k++) d += (int64_t)ref_q(x[k], s) * c->w[(size_t)n * c->K + k];
    if (dot_out) *dot_out = d;
    float v = (float)d * (s * c->scale[n]);
    if (bias) v = v + c->bias[n];
    if (acc) v = c->y0[(int64_t)m * c->ldy + n] + v;
    if (relu && v < 0) v = 0;
    return v;
}

/* ---- exact ---- */

static const int Ms[] = {1, 2, 3, 5, 6, 7, 13, 16, 17, 31};
static const int Ns[] = {1, 3, 8, 17, 63, 64, 65, 130};
static const int Ks[] = {1, 3, 4, 5, 17, 31, 63, 64, 65, 127, 200, 1039};

static void test_exact(void) {
    int cases = 0;
    for (int iter = 0; iter < 40; iter++) {
        int M = Ms[rnd_u64() % (sizeof Ms / sizeof *Ms)], N = Ns[rnd_u64() % (sizeof Ns / sizeof *Ns)], K = Ks[rnd_u64() % (sizeof Ks / sizeof *Ks)];
        if (iter < 4) { M = 17; N = 65; K = 1039; } /* extremes below */
        Case c;
        case_alloc(&c, M, N, K);
        for (int n = 0; n < N; n++) {
            c.scale[n] = 1.0f;
            for (int k = 0; k < K; k++) c.w[(size_t)n * K + k] = (int8_t)(iter == 0 ? 127 : iter == 1 ? -127 : iter == 2 ? ((k & 1) ? 127 : -127) : rnd_int(-127, 127));
        }
        case_split(&c);
        bool stat = iter & 1; /* static scale 1, or dynamic with each row reaching +-127 */
        c.t.act_scale = stat ? 1.0f : 0.0f;
        for (int m = 0; m < M; m++) {
            float *x = c.x + (int64_t)m * c.ldx;
            for (int k = 0; k < K; k++) x[k] = (float)(iter < 3 ? ((iter == 2 && (k & 1)) ? -127 : 127) : rnd_int(-127, 127));
            if (!stat) x[rnd_u64() % (uint64_t)K] = rnd_u64() & 1 ? 127.0f : -127.0f;
        }
        float *y = malloc(sizeof(float) * (size_t)(M * c.ldy));
        for (int l = 0; l < g_nlevels; l++) {
            level_set(&g_levels[l]);
            run(&c, y, 0, M, false, false, false);
            for (int m = 0; m < M; m++)
                for (int n = 0; n < N; n++) {
                    int64_t d = exact_dot(&c, m, n, K);
                    g_checks++;
                    if (y[(int64_t)m * c.ldy + n] != (float)d || fabs((double)d) >= 16777216.0)
                        fail("%s M=%d N=%d K=%d %s: y[%d][%d] = %.1f, exact %lld", g_levels[l].name, M, N, K, stat ? "static" : "dynamic", m, n,
                             y[(int64_t)m * c.ldy + n], (long long)d);
                }
        }
        cases++;
        free(y);
        case_free(&c);
    }
    /* Long rows at the int32 limit: every product 127 * 127 (the VNNI kernel's intermediate
     * is 127 * 255 per product), then alternating signs; compared through the float. */
    static const int bigK[] = {8192, 49152, 65536};
    for (int b = 0; b < 3; b++) {
        int K = bigK[b], M = b == 2 ? 17 : 2, N = 3;
        Case c;
        case_alloc(&c, M, N, K);
        for (int n = 0; n < N; n++) {
            c.scale[n] = 1.0f;
            for (int k = 0; k < K; k++) c.w[(size_t)n * K + k] = (int8_t)(n == 0 ? 127 : n == 1 ? -127 : rnd_int(-127, 127));
        }
        c.t.act_scale = 1.0f;
        for (int m = 0; m < M; m++) for (int k = 0; k < K; k++) c.x[(int64_t)m * c.ldx + k] = (float)(m == 0 ? 127 : rnd_int(-127, 127));
        float *y = malloc(sizeof(float) * (size_t)(M * c.ldy));
        for (int l = 0; l < g_nlevels; l++) {
            level_set(&g_levels[l]);
            run(&c, y, 0, M, false, false, false);
            for (int m = 0; m < M; m++)
                for (int n = 0; n < N; n++) {
                    int64_t d = exact_dot(&c, m, n, K);
                    g_checks++;
                    if (!same_bits(y[(int64_t)m * c.ldy + n], (float)d))
                        fail("%s K=%d: y[%d][%d] = %.1f, exact %lld", g_levels[l].name, K, m, n, y[(int64_t)m * c.ldy + n], (long long)d);
                }
        }
        free(y);
        case_free(&c);
    }
    char s[96];
    snprintf(s, sizeof s, "%d shapes + 3 long rows at %d levels", cases, g_nlevels);
    group_end("exact", s);
}

/* ---- semantics and invariance ---- */

static void fill_random(Case *c, int mode) {
    for (int n = 0; n < c->N; n++) {
        c->scale[n] = (0.5f + (float)(rnd_u64() % 1000) / 1000.0f) * 0.01f;
        for (int k = 0; k < c->K; k++) c->w[(size_t)n * c->K + k] = (int8_t)rnd_int(-127, 127);
    }
    for (int m = 0; m < c->M; m++) {
        float *x = c->x + (int64_t)m * c->ldx, rs = (float)ldexp(1.0, rnd_int(-4, 4));
        for (int k = 0; k < c->K; k++) x[k] = rnd_sym() * rs;
        if (mode == 1 && c->K > 4) x[rnd_u64() % (uint64_t)c->K] = 80 * rs;      /* an outlier */
        if (mode == 2) for (int k = 0; k < c->K; k++) x[k] = 0;                 /* a zero row */
    }
    /* static: a scale small enough that a good share of the values saturate */
    c->t.act_scale = mode == 3 ? 0.004f : 0.0f;
    case_split(c);
}

static void test_semantics(void) {
    long inv_checks = 0, inv_fail = 0;
    for (int iter = 0; iter < 48; iter++) {
        int M = Ms[rnd_u64() % (sizeof Ms / sizeof *Ms)] + (iter % 3 == 0 ? 40 : 0), N = Ns[rnd_u64() % (sizeof Ns / sizeof *Ns)];
        int K = Ks[rnd_u64() % (sizeof Ks / sizeof *Ks)];
        Case c;
        case_alloc(&c, M, N, K);
        int mode = iter % 4;
        fill_random(&c, mode);
        bool bias = iter & 1, acc = (iter >> 1) & 1, relu = (iter >> 2) & 1;
        float *want = malloc(sizeof(float) * (size_t)(M * c.ldy)), *y = malloc(sizeof(float) * (size_t)(M * c.ldy));
        float *y1 = malloc(sizeof(float) * (size_t)(M * c.ldy));
        for (int m = 0; m < M; m++) for (int n = 0; n < N; n++) want[(int64_t)m * c.ldy + n] = ref_out(&c, m, n, bias, acc, relu, NULL);
        for (int l = 0; l < g_nlevels; l++) {
            level_set(&g_levels[l]);
            for (int th = 1; th <= 2; th++) {
                omp_set_num_threads(th);
                run(&c, y, 0, M, bias, acc, relu);
                for (int m = 0; m < M; m++)
                    for (int n = 0; n < N; n++) {
                        float got = y[(int64_t)m * c.ldy + n], w = want[(int64_t)m * c.ldy + n];
                        g_checks++;
                        if (!same_bits(got, w))
                            fail("%s t=%d M=%d N=%d K=%d mode %d bias %d acc %d relu %d: y[%d][%d] = %.9g, reference %.9g", g_levels[l].name, th, M, N, K,
                                 mode, bias, acc, relu, m, n, got, w);
                    }
            }
            /* each row alone, and a slice from the middle, must give the same bits */
            int m0 = M > 2 ? 1 : 0, cnt = M > 2 ? M - 2 : M;
            memcpy(y1, y, sizeof(float) * (size_t)(M * c.ldy));
            run(&c, y, m0, cnt, bias, acc, relu);
            for (int m = m0; m < m0 + cnt; m++) {
                inv_checks++;
                if (memcmp(y + (int64_t)m * c.ldy, y1 + (int64_t)m * c.ldy, sizeof(float) * (size_t)N)) { inv_fail++; fail("%s: row %d differs in a slice of %d rows", g_levels[l].name, m, cnt); }
            }
            int m = (int)(rnd_u64() % (uint64_t)M);
            run(&c, y, m, 1, bias, acc, relu);
            inv_checks++;
            if (memcmp(y + (int64_t)m * c.ldy, y1 + (int64_t)m * c.ldy, sizeof(float) * (size_t)N)) { inv_fail++; fail("%s: row %d alone differs from it in a batch of %d", g_levels[l].name, m, M); }
        }
        free(want); free(y); free(y1);
        case_free(&c);
    }
    omp_set_num_threads(2);
    char s[128];
    snprintf(s, sizeof s, "48 cases at %d levels x 1-2 threads; %ld/%ld batch-invariance checks", g_nlevels, inv_checks - inv_fail, inv_checks);
    group_end("semantics", s);
}

int main(int argc, char **argv) {
    simd_init();
    g_vnni_cpu = g_vnni;
    uint64_t seed = argc > 1 ? strtoull(argv[1], NULL, 10) : getenv("TEST_SEED") ? strtoull(getenv("TEST_SEED"), NULL, 10) : (uint64_t)time(NULL);
    g_rng = seed;
    levels_init();
    printf("test_i8: seed %llu (rerun: ./a.out %llu); levels:", (unsigned long long)seed, (unsigned long long)seed);
    for (int l = 0; l < g_nlevels; l++) printf(" %s", g_levels[l].name);
    printf("; %d threads\n", omp_get_max_threads());
    test_exact();
    test_semantics();
    level_set(&g_levels[g_nlevels - 1]);
    printf("%s\n", g_failed_groups ? "FAILED" : "all passed");
    return g_failed_groups ? 1 : 0;
}
