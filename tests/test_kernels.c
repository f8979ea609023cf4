/* tests/test_kernels.c: unit tests of opt's CPU kernels and number formats.
 *
 * Built and run by tests/run.sh (from the repository root, which .incbin needs):
 *   cc -std=c11 -O2 -fopenmp -ffp-contract=off -D_GNU_SOURCE -DOPT_NO_MAIN -I. \
 *      tests/test_kernels.c lp.c quant.c ... -lm && ./a.out [SEED]
 * (every top-level C file but opt.c, which this file includes).
 *
 * It includes opt.c itself (as llama2.c's test.c includes run.c), so it sees
 * the static kernels and the global SIMD level; it therefore follows their
 * signatures, and must be updated when they change. Every run draws fresh
 * random inputs (never all zeros) from a seed taken from the clock (or argv[1],
 * or $TEST_SEED); the seed is printed first, so a failure can be reproduced
 * with `./a.out SEED`. Outputs are poisoned with a NaN sentinel before each
 * call, so an element a kernel forgets to write shows up as a failure instead
 * of a stale value, and the gaps past the rows of strided inputs hold NaN, so
 * a kernel reading past K or T would poison its result.
 *
 * Groups (each prints its max errors and PASS/FAIL; exit status 1 when any failed):
 *   f16, bf16     exhaustive conversions against bit-exact references written
 *                 here: all 65536 patterns each way, the round-to-nearest-even
 *                 ties, overflow and subnormal edges, 2M random floats
 *   utf8          utf8_valid_prefix on crafted sequences (overlong, surrogates,
 *                 > U+10FFFF, truncated), every code point, random byte strings
 *   gemm-convert  every f16/bf16 bit pattern through each SIMD level's weight loader
 *   gemm          against a double-precision reference for M, N, K that are not
 *                 tile multiples, each weight dtype, bias/acc/relu variants
 *   gemm-simd     every SIMD level the CPU has gives bitwise identical results;
 *                 a row's result does not depend on M (its batch) or on the thread count
 *   gemm-bf16     --compute bf16 against a reference on bf16-rounded inputs, near the f32
 *                 result, batch- and thread-invariant (skipped without AVX-512 BF16)
 *   attention     attn_scores and attn_mix against double references; bitwise
 *                 across levels, grouped rows vs rows alone, split vs whole mixes
 *   softmax, layernorm   against double references; bitwise across levels,
 *                 in place vs out of place, row alone vs in a batch
 *   stage-split   plan_stage_split (lp.c): layers sum to L, each >= 1, -1 when N > L; the
 *                 slowest stage is no slower than any split's, by brute force over every split
 *                 of small random configs; OPT-125m's last stage holds fewer layers (lm_head)
 */
#ifndef OPT_NO_MAIN
#define OPT_NO_MAIN
#endif
#include "../opt.c"

#include <float.h>
#include <time.h>
#include <unistd.h>

#include "check.h"

/* ---- bit-exact reference conversions, written independently of opt.c ---- */

static uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* IEEE binary16 -> double by its definition: (-1)^s * 2^(e-15) * 1.m, or 2^-14 * 0.m. */
static double ref_half_to_double(uint16_t h) {
    int s = h >> 15, e = h >> 10 & 31, m = h & 1023;
    double v;
    if (e == 31) v = m ? NAN : INFINITY;
    else if (e == 0) v = ldexp((double)m, -24);
    else v = ldexp((double)(1024 + m), e - 25);
    return s ? -v : v;
}

/* bfloat16 -> double: the top 16 bits of a float32. */
static double ref_bf16_to_double(uint16_t h) { return (double)u2f((uint32_t)h << 16); }

/* float -> binary16 bits, round to nearest, ties to even, by search: the
 * non-negative finite halves 0x0000..0x7BFF are increasing in value, and
 * 0x7C00 (infinity) stands for 65536 for rounding purposes, as IEEE prescribes
 * (a value at or above 65520 rounds to infinity). NaN gives a quiet NaN with
 * the same sign. This is the logic numpy's npy_floatbits_to_halfbits
 * implements, written as a search instead of bit tricks. */
static double half_value_for_rounding(uint16_t b) { return b == 0x7C00 ? 65536.0 : ref_half_to_double(b); }
static uint16_t ref_float_to_half(float f) {
    uint16_t sign = signbit(f) ? 0x8000 : 0;
    if (isnan(f)) return sign | 0x7E00;
    double a = fabs((double)f);
    if (a >= 65536.0) return sign | 0x7C00;
    int lo = 0, hi = 0x7C00; /* invariant: value(lo) <= a < value(hi) */
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (half_value_for_rounding((uint16_t)mid) <= a) lo = mid; else hi = mid;
    }
    double dl = a - half_value_for_rounding((uint16_t)lo), dh = half_value_for_rounding((uint16_t)hi) - a;
    int r = dl < dh ? lo : dh < dl ? hi : (lo & 1 ? hi : lo);
    return sign | (uint16_t)r;
}

/* float -> bfloat16 bits, round to nearest even: choose between the truncation
 * and the next pattern up by distance (0x7F80 = infinity stands for 2^128). */
static uint16_t ref_float_to_bf16(float f) {
    uint32_t u = f2u(f);
    if (isnan(f)) return (uint16_t)((u >> 16) | 0x40);
    uint16_t sign = (uint16_t)(u >> 16 & 0x8000), lo = (uint16_t)(u >> 16 & 0x7FFF), hi = (uint16_t)(lo + 1);
    if (lo == 0x7F80) return sign | 0x7F80; /* infinity stays */
    double a = fabs((double)f), vl = (double)u2f((uint32_t)lo << 16);
    double vh = hi == 0x7F80 ? ldexp(1.0, 128) : (double)u2f((uint32_t)hi << 16);
    double dl = a - vl, dh = vh - a;
    int r = dl < dh ? lo : dh < dl ? hi : (lo & 1 ? hi : lo);
    return sign | (uint16_t)r;
}

/* Same float, bit for bit; any NaN matches any NaN of the same sign. */
static bool same_float(float a, float b) {
    if (isnan(a) || isnan(b)) return isnan(a) && isnan(b) && signbit(a) == signbit(b);
    return f2u(a) == f2u(b);
}

/* ---- the poison: a NaN whose bits we recognise ---- */

static bool is_poison(float f) { return f2u(f) == POISON; }


/* ============================================================================
 * gemm */

typedef struct {
    int M, N, K;
    DType dt;
    int64_t ldx, ldy;
    float *x;           /* (M, ldx), the gap past K is NaN: reading it would poison a result */
    void *wdata;        /* (N, K) in dt, followed by a NaN-filled guard */
    double *wref;       /* (N, K) the same weights exactly, as doubles */
    float *bias;        /* (N) */
    float *y0;          /* (M, ldy) initial y for acc */
    Tensor w;
} GemmCase;

static void gemm_case_init(GemmCase *c, int M, int N, int K, DType dt) {
    memset(c, 0, sizeof *c);
    c->M = M; c->N = N; c->K = K; c->dt = dt;
    c->ldx = K + (rnd_u64() % 3) * 5;  /* sometimes strided */
    c->ldy = N + (rnd_u64() % 3) * 3;
    c->x = malloc(sizeof(float) * (size_t)(M * c->ldx));
    poison(c->x, (size_t)(M * c->ldx));
    /* A scale per row of x makes the magnitudes differ between rows. */
    for (int m = 0; m < M; m++) {
        float s = (float)ldexp(1.0, (int)(rnd_u64() % 7) - 3);
        for (int k = 0; k < K; k++) c->x[m * c->ldx + k] = rnd_sym() * s;
    }
    size_t esz = dt == DT_F32 ? 4 : 2, guard = 64;
    c->wdata = malloc(esz * ((size_t)N * K + guard));
    c->wref = malloc(sizeof(double) * (size_t)N * K);
    for (size_t i = 0; i < (size_t)N * K; i++) {
        float v = rnd_sym();
        if (dt == DT_F32) { ((float *)c->wdata)[i] = v; c->wref[i] = v; }
        else if (dt == DT_F16) { uint16_t h = ref_float_to_half(v); ((uint16_t *)c->wdata)[i] = h; c->wref[i] = ref_half_to_double(h); }
        else { uint16_t h = ref_float_to_bf16(v); ((uint16_t *)c->wdata)[i] = h; c->wref[i] = ref_bf16_to_double(h); }
    }
    for (size_t i = (size_t)N * K; i < (size_t)N * K + guard; i++) { /* NaN guard after the last row */
        if (dt == DT_F32) memcpy((float *)c->wdata + i, &POISON, 4);
        else ((uint16_t *)c->wdata)[i] = dt == DT_F16 ? 0x7E00 : 0x7FC0;
    }
    c->bias = malloc(sizeof(float) * (size_t)N);
    for (int n = 0; n < N; n++) c->bias[n] = rnd_sym();
    c->y0 = malloc(sizeof(float) * (size_t)(M * c->ldy));
    poison(c->y0, (size_t)(M * c->ldy));
    for (int m = 0; m < M; m++) for (int n = 0; n < N; n++) c->y0[m * c->ldy + n] = rnd_sym() * 4;
    c->w = (Tensor){.dtype = dt, .rows = N, .cols = K, .data = c->wdata, .tier = TIER_CPU, .name = "test"};
}

static void gemm_case_free(GemmCase *c) { free(c->x); free(c->wdata); free(c->wref); free(c->bias); free(c->y0); }

/* Runs gemm on rows [m0, m0 + M) of the case into y (poisoned, or y0 when acc). */
static void run_gemm(const GemmCase *c, float *y, int m0, int M, bool bias, bool acc, bool relu) {
    size_t ny = (size_t)(c->M * c->ldy);
    if (acc) memcpy(y, c->y0, sizeof(float) * ny);
    else {
        poison(y, ny);
    }
    Gemm g = {.y = y + (int64_t)m0 * c->ldy, .x = c->x + (int64_t)m0 * c->ldx, .w = &c->w, .bias = bias ? c->bias : NULL,
              .ldy = c->ldy, .ldx = c->ldx, .M = M, .N = c->N, .K = c->K, .acc = acc, .relu = relu};
    gemm(&g);
}

static const char *dt_name(DType d) { return d == DT_F32 ? "f32" : d == DT_F16 ? "f16" : "bf16"; }

/* The double-precision reference of a case (weights converted exactly) and
 * each element's tolerance: the rounding bound of a float dot product in 16
 * lanes plus a 4-level tree, (K/16 + 8) float epsilons of sum|x*w| (+ |bias|
 * + |y0| for the final additions). A wrong element, a skipped K tail or a
 * stale output is off by far more than that. */
static void gemm_reference(const GemmCase *c, bool bias, bool acc, bool relu, double *ref, double *tol) {
    for (int m = 0; m < c->M; m++)
        for (int n = 0; n < c->N; n++) {
            double dot = 0, mag = 0;
            for (int k = 0; k < c->K; k++) {
                double p = (double)c->x[m * c->ldx + k] * c->wref[(size_t)n * c->K + k];
                dot += p;
                mag += fabs(p);
            }
            if (bias) { dot += c->bias[n]; mag += fabs(c->bias[n]); }
            if (acc) { dot += c->y0[m * c->ldy + n]; mag += fabs(c->y0[m * c->ldy + n]); }
            if (relu && dot < 0) dot = 0;
            ref[m * c->N + n] = dot;
            tol[m * c->N + n] = (c->K / 16 + 8) * (double)FLT_EPSILON * mag + 1e-30;
        }
}

/* y against the reference; returns the worst error as a fraction of its tolerance. */
static double check_gemm_accuracy(const GemmCase *c, const float *y, const double *ref, const double *tol, bool bias, bool acc,
                                  bool relu, double *max_abs) {
    double worst = 0;
    for (int m = 0; m < c->M; m++)
        for (int n = 0; n < c->N; n++) {
            float got = y[m * c->ldy + n];
            double want = ref[m * c->N + n], t = tol[m * c->N + n], err = fabs((double)got - want);
            if (!(err <= t)) /* NaN fails too */
                fail("gemm %s M=%d N=%d K=%d bias=%d acc=%d relu=%d simd=%s: y[%d][%d] = %.9g, reference %.9g (tolerance %.3g)",
                     dt_name(c->dt), c->M, c->N, c->K, bias, acc, relu, simd_names[g_simd], m, n, got, want, t);
            if (relu && got < 0) fail("gemm relu: y[%d][%d] = %g < 0", m, n, got);
            g_checks++;
            if (err / t > worst) worst = err / t;
            if (err > *max_abs) *max_abs = err;
        }
    /* the gaps between rows (ldy > N) are never written */
    for (int m = 0; m < c->M; m++)
        for (int64_t n = c->N; n < c->ldy; n++)
            if (!is_poison(y[m * c->ldy + n])) fail("gemm wrote past N: y[%d][%lld]", m, (long long)n);
    return worst;
}

static void test_gemm(void) {
    static const int Ms[] = {1, 2, 3, 4, 5, 7, 13, 64}, Ns[] = {1, 5, 7, 8, 47, 48, 49, 100}, Ks[] = {1, 15, 16, 17, 100, 768};
    static const DType dts[] = {DT_F32, DT_F16, DT_BF16};
    const int nM = 8, nN = 8, nK = 6;
    double worst_frac[3] = {0}, worst_abs[3] = {0};
    long simd_checks = 0, simd_fail = 0, m_checks = 0, m_fail = 0, t_checks = 0, t_fail = 0;

    group_begin();
    int variant = (int)(rnd_u64() % 5);
    for (int di = 0; di < 3; di++)
        for (int a = 0; a < nM; a++)
            for (int b = 0; b < nN; b++)
                for (int kk = 0; kk < nK; kk++) {
                    int M = Ms[a], N = Ns[b], K = Ks[kk];
                    GemmCase c;
                    gemm_case_init(&c, M, N, K, dts[di]);
                    size_t ny = (size_t)(M * c.ldy);
                    float *y = malloc(sizeof(float) * ny), *y_lvl = malloc(sizeof(float) * ny), *y_row = malloc(sizeof(float) * ny);
                    double *ref = malloc(sizeof(double) * (size_t)(M * N)), *tol = malloc(sizeof(double) * (size_t)(M * N));
                    /* The five variants take turns over the sizes (each size x dtype gets
                     * one, each variant sees every dtype and a spread of sizes); plain
                     * and bias+acc+relu run everywhere at the small sizes. */
                    static const bool V[5][3] = {{0, 0, 0}, {1, 0, 0}, {1, 1, 0}, {1, 0, 1}, {1, 1, 1}};
                    int vs[3] = {variant++ % 5, -1, -1}, nv = 1;
                    if ((long)M * N * K <= 20000) { vs[nv++] = 0; vs[nv++] = 4; }
                    for (int vi = 0; vi < nv; vi++) {
                        if (vi && vs[vi] == vs[0]) continue;
                        bool bias = V[vs[vi]][0], acc = V[vs[vi]][1], relu = V[vs[vi]][2];
                        /* accuracy at the best level, and bitwise equality of every level with it */
                        g_simd = g_simd_max;
                        gemm_reference(&c, bias, acc, relu, ref, tol);
                        run_gemm(&c, y, 0, M, bias, acc, relu);
                        double f = check_gemm_accuracy(&c, y, ref, tol, bias, acc, relu, &worst_abs[di]);
                        if (f > worst_frac[di]) worst_frac[di] = f;
                        for (int lvl = 0; lvl < g_simd_max; lvl++) {
                            g_simd = lvl;
                            run_gemm(&c, y_lvl, 0, M, bias, acc, relu);
                            f = check_gemm_accuracy(&c, y_lvl, ref, tol, bias, acc, relu, &worst_abs[di]);
                            if (f > worst_frac[di]) worst_frac[di] = f;
                            simd_checks++;
                            if (memcmp(y, y_lvl, sizeof(float) * ny)) {
                                simd_fail++;
                                int at = 0;
                                while (at < (int)ny && f2u(y[at]) == f2u(y_lvl[at])) at++;
                                fail("gemm %s M=%d N=%d K=%d: %s and %s differ at y[%d][%d]: %.9g vs %.9g", dt_name(c.dt), M, N, K,
                                     simd_names[g_simd_max], simd_names[lvl], at / (int)c.ldy, at % (int)c.ldy, y[at], y_lvl[at]);
                            }
                        }
                        g_simd = g_simd_max;
                        /* a row's result does not depend on its batch: rows computed
                         * alone, or as a sub-batch starting at an odd row, match */
                        if (M > 1) {
                            int m0 = (int)(rnd_u64() % (unsigned)M), mlen = 1 + (int)(rnd_u64() % (unsigned)(M - m0));
                            for (int lvl = 0; lvl <= g_simd_max; lvl++) {
                                g_simd = lvl;
                                float *ref = y;
                                if (lvl != g_simd_max) { run_gemm(&c, y_lvl, 0, M, bias, acc, relu); ref = y_lvl; }
                                run_gemm(&c, y_row, m0, mlen, bias, acc, relu);
                                m_checks++;
                                if (memcmp(ref + (size_t)m0 * c.ldy, y_row + (size_t)m0 * c.ldy, sizeof(float) * (size_t)mlen * c.ldy)) {
                                    m_fail++;
                                    fail("gemm %s M=%d N=%d K=%d %s: rows %d..%d computed as a batch of %d differ from the batch of %d",
                                         dt_name(c.dt), M, N, K, simd_names[lvl], m0, m0 + mlen - 1, mlen, M);
                                }
                            }
                            g_simd = g_simd_max;
                        }
                        /* thread count: one thread vs all (gemm splits N into blocks) */
                        if ((long)M * N * K > 100000 && N > 48) {
                            int nt = omp_get_max_threads();
                            omp_set_num_threads(1);
                            run_gemm(&c, y_row, 0, M, bias, acc, relu);
                            omp_set_num_threads(nt);
                            t_checks++;
                            if (memcmp(y, y_row, sizeof(float) * ny)) {
                                t_fail++;
                                fail("gemm %s M=%d N=%d K=%d: 1 thread and %d threads differ", dt_name(c.dt), M, N, K, nt);
                            }
                        }
                    }
                    free(y); free(y_lvl); free(y_row); free(ref); free(tol);
                    gemm_case_free(&c);
                }
    long acc_fail = g_fail - simd_fail - m_fail - t_fail;
    char buf[400];
    snprintf(buf, sizeof buf, "max error / tolerance f32 %.3f f16 %.3f bf16 %.3f; max abs error f32 %.2e f16 %.2e bf16 %.2e",
             worst_frac[0], worst_frac[1], worst_frac[2], worst_abs[0], worst_abs[1], worst_abs[2]);
    group_line("gemm", acc_fail, g_checks, buf);
    snprintf(buf, sizeof buf, "levels scalar..%s: %ld/%ld bitwise equal across levels, %ld/%ld batch-invariant, %ld/%ld thread-invariant",
             simd_names[g_simd_max], simd_checks - simd_fail, simd_checks, m_checks - m_fail, m_checks, t_checks - t_fail, t_checks);
    group_line("gemm-simd", simd_fail + m_fail + t_fail, simd_checks + m_checks + t_checks, buf);
}

/* --compute bf16: x and the weights rounded to bf16 (nearest even, by the
 * reference conversion above), then summed in f32 (vdpbf16ps). The reference
 * rounds the inputs the same way and sums their exact products in double, so
 * only the f32 accumulation is left to tolerate: (K/16 + 8) float epsilons of
 * sum|x*w|, as for f32 compute (a lane adds two products per 32 of K). Not
 * rounding x, or truncating instead of rounding, is off by tens of
 * tolerances at K = 768. Bitwise: a row alone or in any batch
 * (tiles below 64 rows, the lane GEMM from 64) and 1 thread or all agree. */
/* The order opt.c documents for vdpbf16ps, on the instruction: lane l adds the
 * product of the odd element (2l + 1) first, then the even one, each an fmaf. */
T_BF16 static long bf16_dot_order_fails(void) {
    long bad = 0;
    for (int t = 0; t < 20000; t++) {
        uint16_t a[32], b[32];
        float acc[16], out[16];
        for (int i = 0; i < 32; i++) a[i] = ref_float_to_bf16(rnd_sym()), b[i] = ref_float_to_bf16(rnd_sym() * 64);
        for (int l = 0; l < 16; l++) acc[l] = rnd_sym() * 16;
        _mm512_storeu_ps(out, _mm512_dpbf16_ps(_mm512_loadu_ps(acc), (__m512bh)_mm512_loadu_si512(a), (__m512bh)_mm512_loadu_si512(b)));
        for (int l = 0; l < 16; l++) {
            float odd = fmaf(u2f((uint32_t)a[2 * l + 1] << 16), u2f((uint32_t)b[2 * l + 1] << 16), acc[l]);
            float want = fmaf(u2f((uint32_t)a[2 * l] << 16), u2f((uint32_t)b[2 * l] << 16), odd);
            g_checks++;
            if (!same_bits(out[l], want) && bad++ < 3) fail("vdpbf16ps lane %d: %.9g, odd-then-even fmaf gives %.9g", l, out[l], want);
        }
    }
    return bad;
}

static void test_gemm_bf16(void) {
    if (!g_has_bf16 || g_simd_max != SIMD_AVX512) { printf("SKIP gemm-bf16     this CPU has no AVX-512 BF16\n"); return; }
    static const int Ms[] = {1, 3, 7, 64, 67, 130}, Ns[] = {5, 48, 49, 100}, Ks[] = {1, 17, 31, 32, 33, 100, 768};
    static const DType dts[] = {DT_F32, DT_F16, DT_BF16, DT_Q4};
    double worst = 0, worst_f32 = 0;
    long bit_checks = 0, bit_fail = 0;
    group_begin();
    long order_fail = bf16_dot_order_fails();
    g_simd = SIMD_AVX512;
    for (int di = 0; di < 4; di++)
        for (int a = 0; a < 6; a++)
            for (int b = 0; b < 4; b++)
                for (int kk = 0; kk < 7; kk++) {
                    int M = Ms[a], N = Ns[b], K = Ks[kk];
                    bool q4 = dts[di] == DT_Q4, bias = rnd_u64() & 1, acc = rnd_u64() & 1, relu = rnd_u64() & 1;
                    GemmCase c;
                    gemm_case_init(&c, M, N, K, q4 ? DT_F32 : dts[di]);
                    uint8_t *qw = NULL;
                    if (q4) { /* 4-bit weights; the reference takes their dequantized values */
                        size_t rb = q4_row_bytes(K, 32);
                        qw = malloc(rb * (size_t)N);
                        float *row = malloc(sizeof(float) * (size_t)K);
                        for (int n = 0; n < N; n++) {
                            q4_quantize_row(qw + rb * n, (const float *)c.wdata + (size_t)n * K, K, 32, "test");
                            q4_dequantize_row(row, qw + rb * n, K, 32);
                            for (int k = 0; k < K; k++) c.wref[(size_t)n * K + k] = row[k];
                        }
                        free(row);
                        c.w = (Tensor){.dtype = DT_Q4, .rows = N, .cols = K, .data = qw, .group = 32, .tier = TIER_CPU, .name = "test"};
                    }
                    size_t ny = (size_t)(M * c.ldy);
                    float *y = malloc(sizeof(float) * ny), *y2 = malloc(sizeof(float) * ny), *y32 = malloc(sizeof(float) * ny);
                    double *ref = malloc(sizeof(double) * (size_t)(M * N)), *tol = malloc(sizeof(double) * (size_t)(M * N));
                    /* the f32 result first: each product's inputs move by at most half an ulp
                     * of bf16's 8 bits (u = 2^-8), the product by 2u + u^2, so bf16 compute stays
                     * within (2^-7 + 2^-16) sum|x*w| plus both accumulations' rounding of it */
                    g_bf16 = 0;
                    run_gemm(&c, y32, 0, M, bias, acc, relu);
                    /* the reference on bf16-rounded inputs */
                    float *x32 = c.x;
                    double *w32 = c.wref;
                    c.x = malloc(sizeof(float) * (size_t)(M * c.ldx));
                    c.wref = malloc(sizeof(double) * (size_t)N * K);
                    for (int m = 0; m < M; m++)
                        for (int k = 0; k < K; k++) c.x[m * c.ldx + k] = u2f((uint32_t)ref_float_to_bf16(x32[m * c.ldx + k]) << 16);
                    for (size_t i = 0; i < (size_t)N * K; i++) c.wref[i] = u2f((uint32_t)ref_float_to_bf16((float)w32[i]) << 16);
                    gemm_reference(&c, bias, acc, relu, ref, tol);
                    free(c.x); free(c.wref);
                    c.x = x32; c.wref = w32;
                    g_bf16 = 1;
                    run_gemm(&c, y, 0, M, bias, acc, relu);
                    double max_abs = 0, f = check_gemm_accuracy(&c, y, ref, tol, bias, acc, relu, &max_abs);
                    if (f > worst) worst = f;
                    for (int m = 0; m < M; m++)
                        for (int n = 0; n < N; n++) { /* tol / (K/16 + 8) / FLT_EPSILON is sum|x*w| (+ bias, y0) */
                            double t = (0x1p-7 + 0x1p-16) * tol[m * N + n] / (K / 16 + 8) / FLT_EPSILON + 2 * tol[m * N + n];
                            double d = fabs((double)y[m * c.ldy + n] - y32[m * c.ldy + n]);
                            if (!(d <= t)) fail("gemm bf16 %s M=%d N=%d K=%d: y[%d][%d] = %.9g is %.3g from f32's %.9g (bound %.3g)",
                                                q4 ? "q4" : dt_name(c.dt), M, N, K, m, n, y[m * c.ldy + n], d, y32[m * c.ldy + n], t);
                            if (d / t > worst_f32) worst_f32 = d / t;
                        }
                    /* a sub-batch (other path when it crosses 64 rows) and one thread give the same bits */
                    int m0 = (int)(rnd_u64() % (unsigned)M), mlen = 1 + (int)(rnd_u64() % (unsigned)(M - m0));
                    run_gemm(&c, y2, m0, mlen, bias, acc, relu);
                    bit_checks++;
                    if (memcmp(y + (size_t)m0 * c.ldy, y2 + (size_t)m0 * c.ldy, sizeof(float) * (size_t)mlen * c.ldy)) {
                        bit_fail++;
                        fail("gemm bf16 %s M=%d N=%d K=%d: rows %d..%d as a batch of %d differ from the batch of %d", q4 ? "q4" : dt_name(c.dt), M, N, K, m0, m0 + mlen - 1, mlen, M);
                    }
                    int nt = omp_get_max_threads();
                    omp_set_num_threads(1);
                    run_gemm(&c, y2, 0, M, bias, acc, relu);
                    omp_set_num_threads(nt);
                    bit_checks++;
                    if (memcmp(y, y2, sizeof(float) * ny)) { bit_fail++; fail("gemm bf16 %s M=%d N=%d K=%d: 1 thread and %d differ", q4 ? "q4" : dt_name(c.dt), M, N, K, nt); }
                    g_bf16 = 0;
                    free(y); free(y2); free(y32); free(ref); free(tol); free(qw);
                    gemm_case_free(&c);
                }
    g_simd = g_simd_max;
    char buf[400];
    snprintf(buf, sizeof buf, "vdpbf16ps %s; f32, f16, bf16, 4-bit weights: max error / tolerance %.3f, distance from f32 compute / its bound %.3f; %ld/%ld bitwise batch- and thread-invariant",
             order_fail ? "NOT odd-then-even" : "odd-then-even", worst, worst_f32, bit_checks - bit_fail, bit_checks);
    group_end("gemm-bf16", buf);
}

/* The SIMD weight loaders (F16C, AVX-512 conversions, the bf16 shifts) against
 * the reference conversions, for all 65536 bit patterns: a (65536 x 1)
 * weight matrix times x = 1 gives each weight back exactly (NaN as any NaN;
 * -0 may come back as +0, since the dot product adds zeros). */
static void test_gemm_conversions(void) {
    group_begin();
    uint16_t *w = malloc(65536 * 2 + 128);
    float *y = malloc(sizeof(float) * 65536), x[1] = {1.0f};
    for (int i = 0; i < 65536; i++) w[i] = (uint16_t)i;
    long bad = 0;
    for (int d = 0; d < 2; d++) {
        DType dt = d ? DT_BF16 : DT_F16;
        Tensor t = {.dtype = dt, .rows = 65536, .cols = 1, .data = w, .name = "all"};
        for (int lvl = 0; lvl <= g_simd_max; lvl++) {
            g_simd = lvl;
            poison(y, 65536);
            Gemm g = {.y = y, .x = x, .w = &t, .ldy = 1, .ldx = 1, .M = 1, .N = 65536, .K = 1};
            gemm(&g);
            for (int i = 0; i < 65536; i++) {
                double want = d ? ref_bf16_to_double((uint16_t)i) : ref_half_to_double((uint16_t)i);
                bool ok = isnan(want) ? isnan(y[i]) : (double)y[i] == want;
                g_checks++;
                if (!ok) { bad++; fail("%s weight 0x%04x through gemm at %s: %.9g, want %.9g", dt_name(dt), i, simd_names[lvl], y[i], want); }
            }
        }
    }
    g_simd = g_simd_max;
    free(w); free(y);
    char buf[100];
    snprintf(buf, sizeof buf, "all f16 and bf16 weights through every level's loader: %ld wrong", bad);
    group_end("gemm-convert", buf);
}

/* ============================================================================
 * attention kernels, softmax, layernorm */

/* attn_scores(s[], q[], n, k, D, T): s[i][t] = q[i] . key[t] for up to AQ query
 * rows at once, keys in blocks of KB positions, transposed within a block
 * (key[t][d] at k[(t / KB) * D * KB + d * KB + t % KB]); attn_mix(out[], p[], n,
 * v, ld, D, t0, t1, init): out[i][d] (+)= sum_{t0<=t<t1} p[i][t] v[t][d].
 * The engine groups up to AQ consecutive positions of one sequence (row i sees
 * T0 + i keys) and mixes 0..T0 for all of them, then each row's own tail. So
 * beyond accuracy: a row's scores in a group equal its scores alone, the split
 * mix equals one mix over the row's whole range, bit for bit, and every level
 * gives the same bits (the model's batch invariance rests on these). */
static size_t key_at(int t, int d, int D) { return (size_t)(t / KB) * (size_t)D * KB + (size_t)d * KB + (size_t)(t % KB); }

static void test_attention(void) {
    group_begin();
    static const int HDs[] = {1, 7, 8, 16, 17, 33, 64, 80, 128}, Ts[] = {1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 129, 300};
    double worst_s = 0, worst_m = 0;
    long inv_checks = 0, inv_fail = 0;
    for (size_t a = 0; a < sizeof HDs / sizeof *HDs; a++)
        for (size_t b = 0; b < sizeof Ts / sizeof *Ts; b++) {
            int D = HDs[a], T0 = Ts[b], n = 1 + (int)(rnd_u64() % AQ), Tn = T0 + n - 1, T[AQ];
            for (int i = 0; i < n; i++) T[i] = T0 + i;
            /* whole key blocks; the positions past Tn in the last one are NaN (lanes
             * a kernel computes there must never reach a stored score) */
            size_t nk = (size_t)((Tn + KB - 1) / KB) * KB * (size_t)D;
            float *qb = malloc(sizeof(float) * (size_t)(AQ * D)), *kt = malloc(sizeof(float) * nk);
            float *sb[3], *sc[3][AQ]; /* [0]: best level, [1]: other level or alone, [2]: scratch */
            const float *q[AQ];
            size_t scap = (size_t)Tn + 16;
            for (int k = 0; k < 3; k++) {
                sb[k] = malloc(sizeof(float) * scap * AQ);
                for (int i = 0; i < AQ; i++) sc[k][i] = sb[k] + (size_t)i * scap;
            }
            for (int i = 0; i < AQ * D; i++) qb[i] = rnd_sym() * 2;
            for (int i = 0; i < AQ; i++) q[i] = qb + (size_t)i * D;
            poison(kt, nk);
            for (int d = 0; d < D; d++) for (int t = 0; t < Tn; t++) kt[key_at(t, d, D)] = rnd_sym() * 2;
            /* v is (Tn, ld2) with a NaN gap past D; p rows are probabilities */
            int64_t ld2 = D + (int64_t)(rnd_u64() % 5);
            float *v = malloc(sizeof(float) * (size_t)(Tn * ld2)), *pb = malloc(sizeof(float) * (size_t)(AQ * Tn));
            const float *p[AQ];
            poison(v, (size_t)(Tn * ld2));
            for (int t = 0; t < Tn; t++) for (int d = 0; d < D; d++) v[t * ld2 + d] = rnd_sym() * 3;
            for (int i = 0; i < AQ; i++) {
                double sum = 0;
                float *pr = pb + (size_t)i * Tn;
                for (int t = 0; t < Tn; t++) { pr[t] = (float)(rnd_unit() + 1e-3); sum += pr[t]; }
                for (int t = 0; t < Tn; t++) pr[t] = (float)(pr[t] / sum);
                p[i] = pr;
            }
            size_t ocap = (size_t)D + 16;
            float *ob[3], *out[3][AQ];
            for (int k = 0; k < 3; k++) {
                ob[k] = malloc(sizeof(float) * ocap * AQ);
                for (int i = 0; i < AQ; i++) out[k][i] = ob[k] + (size_t)i * ocap;
            }
            for (int lvl = g_simd_max; lvl >= 0; lvl--) {
                g_simd = lvl;
                int k = lvl == g_simd_max ? 0 : 1;
                /* scores for the group, as the engine calls it */
                poison(sb[k], scap * AQ);
                attn_scores(sc[k], q, n, kt, D, Tn);
                for (int i = 0; i < AQ; i++)
                    for (size_t t = i < n ? (size_t)Tn : 0; t < scap; t++)
                        if (!is_poison(sc[k][i][t])) { fail("attn_scores %s D=%d T=%d n=%d wrote s[%d][%zu]", simd_names[lvl], D, Tn, n, i, t); break; }
                /* each row alone, with its own T */
                for (int i = 0; i < n; i++) {
                    poison(sb[2], scap);
                    attn_scores(&sc[2][0], &q[i], 1, kt, D, T[i]);
                    inv_checks++;
                    if (memcmp(sc[2][0], sc[k][i], sizeof(float) * (size_t)T[i])) {
                        inv_fail++;
                        fail("attn_scores %s D=%d: row %d of a group of %d differs from the row alone", simd_names[lvl], D, i, n);
                    }
                }
                /* the mix, split as the engine does it */
                poison(ob[k], ocap * AQ);
                attn_mix(out[k], p, n, v, ld2, D, 0, T[0], 1);
                for (int i = 1; i < n; i++) attn_mix(out[k] + i, p + i, 1, v, ld2, D, T[0], T[i], 0);
                for (int i = 0; i < AQ; i++)
                    for (size_t d = i < n ? (size_t)D : 0; d < ocap; d++)
                        if (!is_poison(out[k][i][d])) { fail("attn_mix %s D=%d T=%d n=%d wrote out[%d][%zu]", simd_names[lvl], D, Tn, n, i, d); break; }
                for (int i = 0; i < n; i++) {
                    poison(ob[2], ocap);
                    attn_mix(&out[2][0], &p[i], 1, v, ld2, D, 0, T[i], 1);
                    inv_checks++;
                    if (memcmp(out[2][0], out[k][i], sizeof(float) * (size_t)D)) {
                        inv_fail++;
                        fail("attn_mix %s D=%d: row %d of a group of %d (split at %d) differs from one mix over 0..%d", simd_names[lvl], D, i, n, T[0], T[i]);
                    }
                }
                if (k == 1) { /* bitwise equal to the best level */
                    for (int i = 0; i < n; i++) {
                        inv_checks += 2;
                        if (memcmp(sc[0][i], sc[1][i], sizeof(float) * (size_t)Tn)) { inv_fail++; fail("attn_scores D=%d T=%d: %s differs from %s", D, Tn, simd_names[lvl], simd_names[g_simd_max]); }
                        if (memcmp(out[0][i], out[1][i], sizeof(float) * (size_t)D)) { inv_fail++; fail("attn_mix D=%d T=%d: %s differs from %s", D, T[i], simd_names[lvl], simd_names[g_simd_max]); }
                    }
                    continue;
                }
                for (int i = 0; i < n; i++) {
                    for (int t = 0; t < Tn; t++) {
                        double ref = 0, mag = 0;
                        for (int d = 0; d < D; d++) { double x = (double)q[i][d] * kt[key_at(t, d, D)]; ref += x; mag += fabs(x); }
                        double tol = (D + 2) * (double)FLT_EPSILON * mag + 1e-30, err = fabs(sc[0][i][t] - ref);
                        g_checks++;
                        if (!(err <= tol)) fail("attn_scores D=%d T=%d: s[%d][%d] = %.9g, reference %.9g", D, Tn, i, t, sc[0][i][t], ref);
                        if (err / tol > worst_s) worst_s = err / tol;
                    }
                    for (int d = 0; d < D; d++) {
                        double ref = 0, mag = 0;
                        for (int t = 0; t < T[i]; t++) { double x = (double)p[i][t] * v[t * ld2 + d]; ref += x; mag += fabs(x); }
                        double tol = (T[i] + 2) * (double)FLT_EPSILON * mag + 1e-30, err = fabs(out[0][i][d] - ref);
                        g_checks++;
                        if (!(err <= tol)) fail("attn_mix D=%d T=%d: out[%d][%d] = %.9g, reference %.9g", D, T[i], i, d, out[0][i][d], ref);
                        if (err / tol > worst_m) worst_m = err / tol;
                    }
                }
            }
            g_simd = g_simd_max;
            free(qb); free(kt); free(v); free(pb);
            for (int k = 0; k < 3; k++) { free(sb[k]); free(ob[k]); }
        }
    g_checks += inv_checks;
    char buf[200];
    snprintf(buf, sizeof buf, "max error / tolerance scores %.3f mix %.3f; %ld/%ld bitwise (levels, groups vs rows alone, split mix)",
             worst_s, worst_m, inv_checks - inv_fail, inv_checks);
    group_end("attention", buf);
}

/* softmax: probabilities to a few ulps of the double reference, summing to 1,
 * stable for large scores (it must subtract the maximum), the same at every level. */
static void test_softmax(void) {
    group_begin();
    static const int Ts[] = {1, 2, 3, 15, 16, 17, 33, 100, 1000, 2048};
    double worst = 0;
    for (size_t a = 0; a < sizeof Ts / sizeof *Ts; a++)
        for (int shift = 0; shift < 3; shift++) {
            int T = Ts[a];
            float *in = malloc(sizeof(float) * T), *s = malloc(sizeof(float) * (size_t)(T + 8)), *s2 = malloc(sizeof(float) * (size_t)(T + 8));
            double off = shift == 0 ? 0 : shift == 1 ? 80 : -200; /* exp(80+) overflows a float without the max shift */
            for (int t = 0; t < T; t++) in[t] = (float)(off + 8 * rnd_sym());
            for (int lvl = 0; lvl <= g_simd_max; lvl++) {
                g_simd = lvl;
                float *out = lvl ? s2 : s;
                poison(out, (size_t)T + 8);
                memcpy(out, in, sizeof(float) * T);
                softmax(out, T);
                for (int t = T; t < T + 8; t++) if (!is_poison(out[t])) fail("softmax T=%d wrote past T", T);
                if (lvl) { if (memcmp(s, s2, sizeof(float) * T)) fail("softmax T=%d: %s differs from scalar", T, simd_names[lvl]); g_checks++; }
            }
            double mx = -INFINITY, sum = 0, got_sum = 0;
            for (int t = 0; t < T; t++) mx = in[t] > mx ? in[t] : mx;
            for (int t = 0; t < T; t++) sum += exp((double)in[t] - mx);
            for (int t = 0; t < T; t++) {
                double ref = exp((double)in[t] - mx) / sum, err = fabs(s[t] - ref);
                double tol = 16 * (double)FLT_EPSILON * ref + 1e-12 + (double)T * FLT_EPSILON * ref;
                g_checks++;
                got_sum += s[t];
                if (!(err <= tol)) fail("softmax T=%d offset %g: p[%d] = %.9g, reference %.9g", T, off, t, s[t], ref);
                if (err / tol > worst) worst = err / tol;
            }
            g_checks++;
            if (!(fabs(got_sum - 1) <= 1e-5)) fail("softmax T=%d offset %g: probabilities sum to %.9g", T, off, got_sum);
            free(in); free(s); free(s2);
        }
    g_simd = g_simd_max;
    char buf[100];
    snprintf(buf, sizeof buf, "max error / tolerance %.3f", worst);
    group_end("softmax", buf);
}

/* layernorm with and without affine parameters, rows that run in parallel,
 * in place (the post-LN model calls it so) equal to out of place, rows
 * independent of how many there are, same at every level. */
static void test_layernorm(void) {
    group_begin();
    static const int Ns[] = {1, 2, 15, 16, 17, 64, 100, 768, 1024}, Rs[] = {1, 3, 8};
    double worst = 0, worst_abs = 0;
    for (size_t a = 0; a < sizeof Ns / sizeof *Ns; a++)
        for (size_t b = 0; b < sizeof Rs / sizeof *Rs; b++)
            for (int affine = 0; affine < 2; affine++) {
                int n = Ns[a], rows = Rs[b];
                size_t tot = (size_t)rows * n;
                float *x = malloc(sizeof(float) * tot), *y = malloc(sizeof(float) * (tot + 8)), *y2 = malloc(sizeof(float) * (tot + 8));
                float *w = malloc(sizeof(float) * n), *bb = malloc(sizeof(float) * n);
                double mean_off[8], scale[8];
                for (int r = 0; r < rows; r++) {
                    mean_off[r] = 4 * rnd_sym();
                    scale[r] = ldexp(1.0, (int)(rnd_u64() % 9) - 4);
                    for (int i = 0; i < n; i++) x[(size_t)r * n + i] = (float)(mean_off[r] + scale[r] * rnd_sym());
                }
                for (int i = 0; i < n; i++) { w[i] = 1 + 0.5f * rnd_sym(); bb[i] = 0.5f * rnd_sym(); }
                const float *W = affine ? w : NULL, *B = affine ? bb : NULL;
                poison(y, tot + 8);
                layernorm(y, x, W, B, rows, n);
                for (size_t i = tot; i < tot + 8; i++) if (!is_poison(y[i])) fail("layernorm wrote past the end");
                for (int r = 0; r < rows; r++) {
                    const float *xr = x + (size_t)r * n;
                    double mu = 0, var = 0;
                    for (int i = 0; i < n; i++) mu += xr[i];
                    mu /= n;
                    for (int i = 0; i < n; i++) var += (xr[i] - mu) * (xr[i] - mu);
                    var /= n;
                    double rstd = 1 / sqrt(var + 1e-5);
                    /* error in the mean and variance: ~n/16+4 ulps of the row's magnitude */
                    double rowmag = fabs(mu) + sqrt(var), e = (n / 16 + 8) * (double)FLT_EPSILON;
                    for (int i = 0; i < n; i++) {
                        double xh = (xr[i] - mu) * rstd, ref = affine ? xh * w[i] + bb[i] : xh;
                        double wi = affine ? fabs(w[i]) : 1, bi = affine ? fabs(bb[i]) : 0;
                        double tol = wi * (e * rowmag * rstd + e * fabs(xh) + 4 * FLT_EPSILON * fabs(xh)) + 2 * FLT_EPSILON * bi + 1e-30;
                        double err = fabs(y[(size_t)r * n + i] - ref);
                        g_checks++;
                        if (!(err <= tol)) fail("layernorm n=%d rows=%d affine=%d: y[%d][%d] = %.9g, reference %.9g", n, rows, affine, r, i, y[(size_t)r * n + i], ref);
                        if (err / tol > worst) worst = err / tol;
                        if (err > worst_abs) worst_abs = err;
                    }
                }
                /* in place */
                memcpy(y2, x, sizeof(float) * tot);
                layernorm(y2, y2, W, B, rows, n);
                g_checks++;
                if (memcmp(y, y2, sizeof(float) * tot)) fail("layernorm n=%d rows=%d: in place differs from out of place", n, rows);
                /* each row alone */
                for (int r = 0; r < rows; r++) {
                    poison(y2, (size_t)n);
                    layernorm(y2, x + (size_t)r * n, W, B, 1, n);
                    g_checks++;
                    if (memcmp(y + (size_t)r * n, y2, sizeof(float) * n)) fail("layernorm n=%d: row %d alone differs from in a batch of %d", n, r, rows);
                }
                /* levels (plain C; the claim is that nothing depends on the level) */
                for (int lvl = 0; lvl < g_simd_max; lvl++) {
                    g_simd = lvl;
                    poison(y2, tot);
                    layernorm(y2, x, W, B, rows, n);
                    g_checks++;
                    if (memcmp(y, y2, sizeof(float) * tot)) fail("layernorm n=%d: %s differs from %s", n, simd_names[lvl], simd_names[g_simd_max]);
                }
                g_simd = g_simd_max;
                free(x); free(y); free(y2); free(w); free(bb);
            }
    char buf[100];
    snprintf(buf, sizeof buf, "max error / tolerance %.3f, max abs error %.2e", worst, worst_abs);
    group_end("layernorm", buf);
}

/* ============================================================================
 * number formats */

static void test_f16(void) {
    group_begin();
    long bad_to = 0, bad_rt = 0, bad_from = 0, n_from = 0;
    /* every half to float, bit-exact (NaN: any NaN of the same sign) */
    for (int i = 0; i < 65536; i++) {
        float got = f16_to_f32((uint16_t)i), want = (float)ref_half_to_double((uint16_t)i);
        g_checks++;
        if (!same_float(got, want)) { bad_to++; fail("f16_to_f32(0x%04x) = %a, want %a", i, got, want); }
        else if (!isnan(want) && f2u(got) != f2u(want)) { bad_to++; fail("f16_to_f32(0x%04x) sign", i); }
        /* and back: every non-NaN half round-trips to itself */
        uint16_t back = f32_to_f16(got);
        g_checks++;
        if (isnan(got) ? !((back & 0x7C00) == 0x7C00 && (back & 0x3FF) && (back & 0x8000) == (i & 0x8000)) : back != i) {
            bad_rt++;
            fail("f32_to_f16(f16_to_f32(0x%04x)) = 0x%04x", i, back);
        }
    }
    /* float to half, round to nearest even, against the search reference:
     * every half, the midpoints between neighbours (exact ties) and one float
     * ulp either side of them, the overflow and underflow edges, random floats */
    float edge[] = {0.0f, -0.0f, 65504.0f, 65505.0f, 65519.0f, 65519.996f, 65520.0f, 65536.0f, 1e10f, INFINITY, -INFINITY, NAN, -NAN,
                    0x1p-24f, 0x1p-25f, 0x1.000002p-25f, 0x1.8p-24f, 0x1.7ffffep-24f, 0x1p-26f, 0x1p-14f, 0x1.ff8p-15f, 0x1.ffcp-15f,
                    0x1.ffep-15f, 0x1.002p0f, 0x1.006p0f, 0x1.004p0f, FLT_MIN, FLT_TRUE_MIN, FLT_MAX, 1.0f / 3, 0.1f, 2049.0f, 2051.0f};
    int n_edge = (int)(sizeof edge / sizeof *edge);
    for (long i = 0; i < n_edge + 3L * 65536 + 2000000; i++) {
        float f;
        if (i < n_edge) f = edge[i];
        else if (i < n_edge + 3L * 65536) {
            long j = i - n_edge;
            int h = (int)(j / 3) & 0x7FFF, which = (int)(j % 3);
            if ((h & 0x7C00) == 0x7C00) continue;
            double lo = ref_half_to_double((uint16_t)h), hi = half_value_for_rounding((uint16_t)(h + 1));
            f = (float)((lo + hi) / 2); /* exact: a half has 11 significant bits */
            if (which == 1) f = nextafterf(f, 0);
            if (which == 2) f = nextafterf(f, INFINITY);
            if ((j / 3) & 0x8000) f = -f;
        } else f = u2f((uint32_t)rnd_u64());
        uint16_t got = f32_to_f16(f), want = ref_float_to_half(f);
        n_from++;
        g_checks++;
        bool ok = isnan(f) ? ((got & 0x7C00) == 0x7C00 && (got & 0x3FF) && (got & 0x8000) == (want & 0x8000)) : got == want;
        if (!ok) { bad_from++; fail("f32_to_f16(%a) = 0x%04x, want 0x%04x", f, got, want); }
    }
    char buf[200];
    snprintf(buf, sizeof buf, "65536 halves: %ld wrong to f32, %ld failed the round trip; %ld floats to half: %ld wrong", bad_to, bad_rt, n_from, bad_from);
    group_end("f16", buf);
}

static void test_bf16(void) {
    group_begin();
    long bad_to = 0, bad_rt = 0, bad_from = 0, n_from = 0;
    for (int i = 0; i < 65536; i++) {
        float got = bf16_to_f32((uint16_t)i), want = (float)ref_bf16_to_double((uint16_t)i);
        g_checks++;
        if (!same_float(got, want)) { bad_to++; fail("bf16_to_f32(0x%04x) = %a, want %a", i, got, want); }
        uint16_t back = f32_to_bf16(got);
        g_checks++;
        if (isnan(got) ? !((back & 0x7F80) == 0x7F80 && (back & 0x7F) && (back & 0x8000) == (i & 0x8000)) : back != i) {
            bad_rt++;
            fail("f32_to_bf16(bf16_to_f32(0x%04x)) = 0x%04x", i, back);
        }
    }
    float edge[] = {0.0f, -0.0f, FLT_MAX, -FLT_MAX, u2f(0x7F7F7FFF), u2f(0x7F7F8000), u2f(0x7F7F8001), u2f(0x7F7FFFFF), INFINITY, NAN,
                    u2f(0x7F800001) /* signalling NaN: must stay NaN, not become infinity */, u2f(0xFF800001), FLT_TRUE_MIN, FLT_MIN,
                    u2f(0x00008000), u2f(0x00018000), u2f(0x3F808000), u2f(0x3F818000), 1.0f / 3, 0.1f};
    int n_edge = (int)(sizeof edge / sizeof *edge);
    for (long i = 0; i < n_edge + 3L * 65536 + 2000000; i++) {
        float f;
        if (i < n_edge) f = edge[i];
        else if (i < n_edge + 3L * 65536) { /* the tie point between bf16 j and j+1, and either side */
            long j = i - n_edge;
            uint32_t u = (uint32_t)(j / 3) << 16 | 0x8000;
            if ((u & 0x7F800000) == 0x7F800000) continue;
            f = u2f(u);
            if (j % 3 == 1) f = u2f(u - 1);
            if (j % 3 == 2) f = u2f(u + 1);
        } else f = u2f((uint32_t)rnd_u64());
        uint16_t got = f32_to_bf16(f), want = ref_float_to_bf16(f);
        n_from++;
        g_checks++;
        bool ok = isnan(f) ? ((got & 0x7F80) == 0x7F80 && (got & 0x7F) && (got & 0x8000) == (want & 0x8000)) : got == want;
        if (!ok) { bad_from++; fail("f32_to_bf16(%a) = 0x%04x, want 0x%04x", f, got, want); }
    }
    char buf[200];
    snprintf(buf, sizeof buf, "65536 bf16: %ld wrong to f32, %ld failed the round trip; %ld floats to bf16: %ld wrong", bad_to, bad_rt, n_from, bad_from);
    group_end("bf16", buf);
}

/* ============================================================================
 * utf8_valid_prefix */

/* Reference validator, written from RFC 3629's table of well-formed sequences. */
static size_t ref_utf8_prefix(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t len;
        unsigned lo = 0x80, hi = 0xBF;
        if (c <= 0x7F) { i++; continue; }
        else if (c >= 0xC2 && c <= 0xDF) len = 2;
        else if (c == 0xE0) { len = 3; lo = 0xA0; }
        else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) len = 3;
        else if (c == 0xED) { len = 3; hi = 0x9F; }
        else if (c == 0xF0) { len = 4; lo = 0x90; }
        else if (c >= 0xF1 && c <= 0xF3) len = 4;
        else if (c == 0xF4) { len = 4; hi = 0x8F; }
        else return i;
        if (i + len > n) return i;
        if (s[i + 1] < lo || s[i + 1] > hi) return i;
        for (size_t k = 2; k < len; k++) if (s[i + k] < 0x80 || s[i + k] > 0xBF) return i;
        i += len;
    }
    return i;
}

static void test_utf8(void) {
    group_begin();
    static const struct { const char *s; size_t len, want; const char *what; } cases[] = {
        {"", 0, 0, "empty"},
        {"abc", 3, 3, "ASCII"},
        {"a\0b", 3, 3, "NUL is valid"},
        {"\xC3\xA9", 2, 2, "U+00E9"},
        {"\xE2\x82\xAC", 3, 3, "U+20AC"},
        {"\xF0\x9F\x98\x80", 4, 4, "U+1F600"},
        {"\xF4\x8F\xBF\xBF", 4, 4, "U+10FFFF, the last code point"},
        {"\xED\x9F\xBF", 3, 3, "U+D7FF, before the surrogates"},
        {"\xEE\x80\x80", 3, 3, "U+E000, after the surrogates"},
        {"\xEF\xBF\xBF", 3, 3, "U+FFFF"},
        {"\xC2\x80", 2, 2, "U+0080, the shortest 2-byte"},
        {"\xE0\xA0\x80", 3, 3, "U+0800, the shortest 3-byte"},
        {"\xF0\x90\x80\x80", 4, 4, "U+10000, the shortest 4-byte"},
        {"\xC0\x80", 2, 0, "overlong NUL"},
        {"\xC1\xBF", 2, 0, "overlong U+007F"},
        {"\xE0\x80\x80", 3, 0, "overlong 3-byte NUL"},
        {"\xE0\x9F\xBF", 3, 0, "overlong U+07FF"},
        {"\xF0\x80\x80\x80", 4, 0, "overlong 4-byte NUL"},
        {"\xF0\x8F\xBF\xBF", 4, 0, "overlong U+FFFF"},
        {"\xED\xA0\x80", 3, 0, "surrogate U+D800"},
        {"\xED\xBF\xBF", 3, 0, "surrogate U+DFFF"},
        {"\xED\xA0\xBD\xED\xB8\x80", 6, 0, "CESU-8 surrogate pair"},
        {"\xF4\x90\x80\x80", 4, 0, "U+110000"},
        {"\xF5\x80\x80\x80", 4, 0, "lead byte F5"},
        {"\xF7\xBF\xBF\xBF", 4, 0, "U+1FFFFF"},
        {"\xF8\x88\x80\x80\x80", 5, 0, "5-byte form"},
        {"\xFC\x84\x80\x80\x80\x80", 6, 0, "6-byte form"},
        {"\xFE", 1, 0, "byte FE"},
        {"\xFF", 1, 0, "byte FF"},
        {"\x80", 1, 0, "lone continuation"},
        {"a\x80" "b", 3, 1, "continuation after ASCII"},
        {"\xC3", 1, 0, "truncated 2-byte at the end"},
        {"a\xE2\x82", 3, 1, "truncated 3-byte at the end"},
        {"ab\xF0\x9F\x98", 5, 2, "truncated 4-byte at the end"},
        {"\xE2\x82\xAC", 2, 0, "a valid character cut by len"},
        {"\xC3" "A", 2, 0, "lead byte then ASCII"},
        {"\xE2" "A\xAC", 3, 0, "ASCII inside a 3-byte sequence"},
        {"\xF0\x9F" "A\x80", 4, 0, "ASCII inside a 4-byte sequence"},
        {"\xC3\xA9\xFF\xC3\xA9", 5, 2, "valid, invalid, valid"},
        {"\xC3\xA9\xC3\xA9\xC3", 5, 4, "two characters and a truncated one"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        size_t got = utf8_valid_prefix(cases[i].s, cases[i].len), ref = ref_utf8_prefix((const unsigned char *)cases[i].s, cases[i].len);
        g_checks += 2;
        if (ref != cases[i].want) fail("the reference validator is wrong on %s: %zu, want %zu", cases[i].what, ref, cases[i].want);
        if (got != cases[i].want) fail("utf8_valid_prefix(%s) = %zu, want %zu", cases[i].what, got, cases[i].want);
    }
    /* every code point encoded by hand: valid exactly outside the surrogates */
    for (uint32_t cp = 0; cp <= 0x10FFFF; cp += (cp < 0x800 ? 1 : 7)) {
        unsigned char b[4];
        size_t n;
        if (cp < 0x80) { b[0] = (unsigned char)cp; n = 1; }
        else if (cp < 0x800) { b[0] = (unsigned char)(0xC0 | cp >> 6); b[1] = (unsigned char)(0x80 | (cp & 63)); n = 2; }
        else if (cp < 0x10000) { b[0] = (unsigned char)(0xE0 | cp >> 12); b[1] = (unsigned char)(0x80 | (cp >> 6 & 63)); b[2] = (unsigned char)(0x80 | (cp & 63)); n = 3; }
        else { b[0] = (unsigned char)(0xF0 | cp >> 18); b[1] = (unsigned char)(0x80 | (cp >> 12 & 63)); b[2] = (unsigned char)(0x80 | (cp >> 6 & 63)); b[3] = (unsigned char)(0x80 | (cp & 63)); n = 4; }
        size_t want = (cp >= 0xD800 && cp <= 0xDFFF) ? 0 : n, got = utf8_valid_prefix((const char *)b, n);
        g_checks++;
        if (got != want) fail("utf8_valid_prefix(U+%04X encoded) = %zu, want %zu", (unsigned)cp, got, want);
    }
    /* random strings over bytes that make interesting sequences */
    static const unsigned char alphabet[] = {'a', 0, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xE1,
                                             0xEC, 0xED, 0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xF8, 0xFE, 0xFF};
    long n_rand = 0;
    for (int it = 0; it < 200000; it++) {
        unsigned char b[12];
        size_t n = rnd_u64() % 12;
        for (size_t i = 0; i < n; i++) b[i] = (rnd_u64() & 3) ? alphabet[rnd_u64() % sizeof alphabet] : (unsigned char)rnd_u64();
        size_t got = utf8_valid_prefix((const char *)b, n), want = ref_utf8_prefix(b, n);
        g_checks++;
        n_rand++;
        if (got != want) {
            char hex[40] = "";
            for (size_t i = 0; i < n; i++) snprintf(hex + 3 * i, 4, "%02X ", b[i]);
            fail("utf8_valid_prefix(%s) = %zu, want %zu", hex, got, want);
        }
    }
    char buf[100];
    snprintf(buf, sizeof buf, "%zu crafted, all code points, %ld random strings", sizeof cases / sizeof *cases, n_rand);
    group_end("utf8", buf);
}

/* ---- stage-split ---- */

/* The slowest stage of a split, by the weights plan_stage_split documents, written out anew:
 * a layer's 4h^2 + 2hf per row; stage 0 adds project_in on every row, the last stage
 * project_out and lm_head on the share n / (s + n - 1) of rows that need logits. */
static double split_cost(const Config *c, int s, int n, const int *layers, int N) {
    double h = c->hidden, e = c->embed_dim, P = 4 * h * h + 2 * h * c->ffn, proj = e != h ? e * h : 0, worst = 0;
    for (int i = 0; i < N; i++) {
        double w = layers[i] * P + (i == 0 ? proj : 0) + (i == N - 1 ? (proj + (double)c->vocab * e) * n / (s + n - 1.0) : 0);
        worst = fmax(worst, w);
    }
    return worst / P;
}

/* The least slowest stage over every split of L layers into N stages of >= 1 (compositions). */
static double split_brute(const Config *c, int s, int n, int L, int N) {
    int cut[16], layers[16];
    double best = INFINITY;
    for (int i = 0; i < N - 1; i++) cut[i] = i + 1; /* cuts 1 <= c_0 < ... < c_{N-2} <= L - 1 */
    for (;;) {
        for (int i = 0, prev = 0; i < N; i++) layers[i] = (i < N - 1 ? cut[i] : L) - prev, prev = i < N - 1 ? cut[i] : L;
        best = fmin(best, split_cost(c, s, n, layers, N));
        int i = N - 2;
        while (i >= 0 && cut[i] == L - (N - 1 - i)) i--;
        if (i < 0) break;
        cut[i]++;
        for (int j = i + 1; j < N - 1; j++) cut[j] = cut[j - 1] + 1;
    }
    return best;
}

static void test_stage_split(void) {
    group_begin();
    Config c;
    int layers[128];
    shape_config(&c, "opt-125m");
    /* prompts as long as their answers: lm_head's 5.5 layers of work on half the rows */
    g_checks++;
    if (plan_stage_split(&c, 4, 32, 32, layers) || layers[3] >= layers[0] || layers[3] >= layers[1])
        fail("opt-125m, 4 stages, 32 + 32: the last stage holds %d layers, stage 0 %d", layers[3], layers[0]);
    g_checks++;
    if (plan_stage_split(&c, 13, 32, 32, layers) != -1) fail("13 stages of 12 layers: not -1");
    g_checks++;
    if (plan_stage_split(&c, 0, 32, 32, layers) != -1) fail("0 stages: not -1");
    shape_config(&c, "opt-175b");
    for (int N = 1; N <= 96; N++) {
        g_checks++;
        long sum = 0;
        int ok = !plan_stage_split(&c, N, 512, 32, layers);
        for (int i = 0; ok && i < N; i++) ok = layers[i] >= 1, sum += layers[i];
        if (!ok || sum != 96) fail("opt-175b, %d stages: a stage without layers, or %ld layers in all", N, sum);
    }
    long worse = 0;
    for (int trial = 0; trial < 400; trial++) {
        char spec[64];
        int h = 8 * rnd_int(1, 64), L = rnd_int(1, 9);
        snprintf(spec, sizeof spec, "%dx%dx1x%d", h, L, 8 * rnd_int(1, 256));
        shape_config(&c, spec);
        c.vocab = rnd_int(1, 60000);
        if (rnd_int(0, 3) == 0) c.embed_dim = 8 * rnd_int(1, 64); /* project_in/out, like 350m */
        int s = rnd_int(1, 2048), n = rnd_int(1, 256);
        for (int N = 1; N <= L; N++) {
            g_checks++;
            if (plan_stage_split(&c, N, s, n, layers)) { fail("%s, %d stages: -1", spec, N); continue; }
            long sum = 0;
            int ok = 1;
            for (int i = 0; i < N; i++) ok &= layers[i] >= 1, sum += layers[i];
            double got = split_cost(&c, s, n, layers, N), want = split_brute(&c, s, n, L, N);
            if (!ok || sum != L) fail("%s V %d e %d, %d stages: a stage without layers, or %ld layers", spec, c.vocab, c.embed_dim, N, sum);
            else if (got > want * (1 + 1e-12)) worse++, fail("%s V %d e %d, s %d n %d, %d stages: slowest %.6g > %.6g (brute force)",
                                                            spec, c.vocab, c.embed_dim, s, n, N, got, want);
        }
    }
    char sum[64];
    snprintf(sum, sizeof sum, "%ld splits slower than the brute force's", worse);
    group_end("stage-split", sum);
}

int main(int argc, char **argv) {
    uint64_t seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 20);
    const char *env = getenv("TEST_SEED");
    if (argc > 1) seed = strtoull(argv[1], NULL, 0);
    else if (env && *env) seed = strtoull(env, NULL, 0);
    g_rng = seed;
    unsetenv("OPT_SIMD"); /* every level is set explicitly below */
    simd_init();
    printf("test_kernels: seed %llu (rerun with: ./test_kernels %llu); SIMD levels scalar..%s; %d threads\n",
           (unsigned long long)seed, (unsigned long long)seed, simd_names[g_simd_max], omp_get_max_threads());
    if (omp_get_max_threads() < 2) omp_set_num_threads(2); /* thread-count checks need two */
    fflush(stdout);
    test_f16();
    test_bf16();
    test_utf8();
    test_gemm_conversions();
    test_gemm();
    test_gemm_bf16();
    test_attention();
    test_softmax();
    test_layernorm();
    test_stage_split();
    printf("test_kernels: %s (seed %llu)\n", g_failed_groups ? "FAILED" : "all passed", (unsigned long long)seed);
    return g_failed_groups ? 1 : 0;
}
