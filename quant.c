/* quant.c: compressed weights and KV cache, and their CPU kernels.
 *
 * Sections: 4-bit group-wise format, 4-bit GEMM tiles, 4-bit KV-cache
 * attention. The kernels keep opt.c's reduction order (16 lanes, fixed tree),
 * so a fused kernel equals dequantize-then-f32-GEMM bit for bit, at every
 * SIMD level, and results stay independent of the batch. */
#include "opt.h"

#include <immintrin.h>
#include <math.h>
#include <stdbool.h>
#include <string.h>

/* ----------------------------------------------------------------------------
 * 4-bit format (DT_Q4). Groups run along a row (the input dimension of a
 * weight, head_dim of a cache row), so a kernel's 16-wide step never crosses a
 * group and the row is one contiguous stream. A row of K values is ceil(K/G)
 * blocks of [f16 scale][f16 min][G/2 bytes of codes], element 2i in the low
 * nibble of byte i. A value is fmaf(code, scale, min): one rounding, the same
 * in every kernel. Quantizing: min and scale = (max - min)/15 are rounded to
 * f16 first, then code = clamp(rint((x - min) / scale), 0, 15) with those
 * rounded values; a constant group (scale 0) stores codes 0 and its value
 * exactly as min. */

size_t q4_row_bytes(int64_t cols, int group) {
    return (size_t)((cols + group - 1) / group) * (size_t)(4 + group / 2);
}

void q4_quantize_row(uint8_t *out, const float *in, int64_t cols, int group, const char *what) {
    size_t bs = 4 + (size_t)group / 2;
    for (int64_t g0 = 0; g0 < cols; g0 += group, out += bs) {
        int n = cols - g0 < group ? (int)(cols - g0) : group;
        float mn = INFINITY, mx = -INFINITY;
        for (int i = 0; i < n; i++) {
            float x = in[g0 + i];
            if (!isfinite(x)) die("%s: %s value at column %lld cannot be quantized to 4 bits", what, isnan(x) ? "NaN" : "infinite", (long long)(g0 + i));
            mn = x < mn ? x : mn;
            mx = x > mx ? x : mx;
        }
        uint16_t smin = f32_to_f16(mn), sscale = f32_to_f16((mx - mn) / 15.0f);
        float fmin = f16_to_f32(smin), fscale = f16_to_f32(sscale);
        if (!isfinite(fmin) || !isfinite(fscale)) die("%s: values near column %lld exceed the f16 range of 4-bit scales", what, (long long)g0);
        memcpy(out, &sscale, 2);
        memcpy(out + 2, &smin, 2);
        memset(out + 4, 0, bs - 4);
        if (fscale == 0) continue; /* constant group: every value is min */
        for (int i = 0; i < n; i++) {
            float q = rintf((in[g0 + i] - fmin) / fscale);
            int c = q < 0 ? 0 : q > 15 ? 15 : (int)q;
            int nib = (i & ~15) + (i & 15) / 2 + 8 * (i & 1); /* nibble within the block's codes */
            out[4 + nib / 2] |= (uint8_t)(c << (4 * (nib & 1)));
        }
    }
}

/* Code of element e (within its block) of a block's codes. */
static inline int q4_code(const uint8_t *codes, int e) {
    int nib = (e & ~15) + (e & 15) / 2 + 8 * (e & 1);
    return codes[nib / 2] >> (4 * (nib & 1)) & 15;
}

void q4_dequantize_row(float *out, const uint8_t *in, int64_t cols, int group) {
    size_t bs = 4 + (size_t)group / 2;
    for (int64_t g0 = 0; g0 < cols; g0 += group, in += bs) {
        uint16_t s, m;
        memcpy(&s, in, 2);
        memcpy(&m, in + 2, 2);
        float fs = f16_to_f32(s), fm = f16_to_f32(m);
        int n = cols - g0 < group ? (int)(cols - g0) : group;
        for (int i = 0; i < n; i++) out[g0 + i] = fmaf((float)q4_code(in + 4, i), fs, fm);
    }
}

/* The scalar reference dot product in opt.c's order (lanes past K add 0*0). */
float q4_dot_scalar(const float *x, const uint8_t *w, int K, int group) {
    float l[16] = {0}, v[16];
    size_t bs = 4 + (size_t)group / 2;
    for (int k = 0; k < K; k += 16) {
        const uint8_t *b = w + (size_t)(k / group) * bs;
        uint16_t s, m;
        memcpy(&s, b, 2);
        memcpy(&m, b + 2, 2);
        float fs = f16_to_f32(s), fm = f16_to_f32(m);
        for (int i = 0; i < 16; i++) {
            int e = k % group + i;
            v[i] = k + i < K ? fmaf((float)q4_code(b + 4, e), fs, fm) : 0.0f;
            l[i] = fmaf(k + i < K ? x[k + i] : 0.0f, v[i], l[i]);
        }
    }
    return lanes_sum16(l);
}

/* ----------------------------------------------------------------------------
 * 4-bit GEMM tiles for opt.c's gemm_tiled: the 16 codes of a step become
 * floats in registers (nibbles split and interleaved, widened, converted,
 * fma'd with the block's scale and min); no f32 copy of the matrix exists.
 * Groups are multiples of 16, so a step stays inside one block. */

/* The block's scale and min, broadcast (F16C conversion: exact). */
T_AVX2 static inline void q4_params_avx2(const uint8_t *blk, __m256 *s, __m256 *m) {
    __m128 sm = _mm_cvtph_ps(_mm_cvtsi32_si128(*(const int32_t *)blk));
    *s = _mm256_broadcastss_ps(sm);
    *m = _mm256_broadcastss_ps(_mm_shuffle_ps(sm, sm, 1));
}

/* The 16 codes of a word as two vectors of 8 dword lanes: broadcast, shift
 * each lane to its element, mask (see the format). */
T_AVX2 static inline void q4_codes_avx2(const uint8_t *p, __m256i *lo, __m256i *hi) {
    __m256i w = _mm256_set1_epi64x(*(const long long *)p), m = _mm256_set1_epi32(15);
    *lo = _mm256_and_si256(_mm256_srlv_epi32(w, _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12)), m);
    *hi = _mm256_and_si256(_mm256_srlv_epi32(w, _mm256_setr_epi32(16, 16, 20, 20, 24, 24, 28, 28)), m);
}

/* Blocks outer, 16-element steps inner, so scale and min convert once per
 * block. Padding codes beyond K dequantize to min, not 0, so the tail step
 * masks x and the weights to +0, as the other formats' tails do. */
#define Q4_TILE_AVX2(MR, NR)                                                                            \
T_AVX2 static void q4_tile_avx2_##MR(const float *const *x, const char *const *w, int K, size_t pf, int G, float *out) { \
    __m256 a[MR][NR][2];                                                                               \
    size_t bs = 4 + (size_t)G / 2;                                                                     \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++) a[i][j][0] = a[i][j][1] = _mm256_setzero_ps(); \
    for (int k0 = 0; k0 < K; k0 += G) {                                                                \
        const uint8_t *blk[NR];                                                                        \
        __m256 sc[NR], mn[NR];                                                                         \
        for (int j = 0; j < NR; j++) {                                                                 \
            blk[j] = (const uint8_t *)w[j] + (size_t)(k0 / G) * bs;                                    \
            _mm_prefetch((const char *)blk[j] + pf, _MM_HINT_T0);                                      \
            q4_params_avx2(blk[j], &sc[j], &mn[j]);                                                    \
        }                                                                                              \
        for (int e = 0; e < G && k0 + e < K; e += 16) {                                                \
            int k = k0 + e;                                                                            \
            __m256 xv[MR][2];                                                                          \
            float xt[MR][16];                                                                          \
            int32_t keep[16];                                                                          \
            bool tail = k + 16 > K;                                                                    \
            for (int i = 0; i < MR; i++) {                                                             \
                const float *xp = x[i] + k;                                                            \
                if (tail) { for (int l = 0; l < 16; l++) xt[i][l] = k + l < K ? xp[l] : 0.0f; xp = xt[i]; } \
                xv[i][0] = _mm256_loadu_ps(xp); xv[i][1] = _mm256_loadu_ps(xp + 8);                    \
            }                                                                                          \
            if (tail) for (int l = 0; l < 16; l++) keep[l] = k + l < K ? -1 : 0;                       \
            for (int j = 0; j < NR; j++) {                                                             \
                __m256i cl, ch;                                                                        \
                q4_codes_avx2(blk[j] + 4 + e / 2, &cl, &ch);                                           \
                __m256 wl = _mm256_fmadd_ps(_mm256_cvtepi32_ps(cl), sc[j], mn[j]);                     \
                __m256 wh = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ch), sc[j], mn[j]);                     \
                if (tail) {                                                                            \
                    wl = _mm256_and_ps(wl, _mm256_loadu_ps((const float *)keep));                       \
                    wh = _mm256_and_ps(wh, _mm256_loadu_ps((const float *)keep + 8));                   \
                }                                                                                      \
                for (int i = 0; i < MR; i++) {                                                         \
                    a[i][j][0] = _mm256_fmadd_ps(xv[i][0], wl, a[i][j][0]);                            \
                    a[i][j][1] = _mm256_fmadd_ps(xv[i][1], wh, a[i][j][1]);                            \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++) {                                        \
        __m256 s8 = _mm256_add_ps(a[i][j][0], a[i][j][1]);                                             \
        __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));              \
        __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));                                             \
        out[i * NR + j] = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));                    \
    }                                                                                                  \
}
Q4_TILE_AVX2(2, 3)
Q4_TILE_AVX2(1, 4)

#define Q4_TILE_AVX512(MR, NR)                                                                          \
T_AVX512 static void q4_tile_avx512_##MR(const float *const *x, const char *const *w, int K, size_t pf, int G, float *out) { \
    __m512 a[MR][NR];                                                                                  \
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);         \
    const __m512i shifts = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);     \
    size_t bs = 4 + (size_t)G / 2;                                                                     \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++) a[i][j] = _mm512_setzero_ps();           \
    for (int k0 = 0; k0 < K; k0 += G) {                                                                \
        const uint8_t *blk[NR];                                                                        \
        __m512 lut[NR]; /* the block's 16 values: fmaf(code, scale, min) */                            \
        for (int j = 0; j < NR; j++) {                                                                 \
            blk[j] = (const uint8_t *)w[j] + (size_t)(k0 / G) * bs;                                    \
            _mm_prefetch((const char *)blk[j] + pf, _MM_HINT_T0);                                      \
            __m128 sm = _mm_cvtph_ps(_mm_cvtsi32_si128(*(const int32_t *)blk[j]));                     \
            lut[j] = _mm512_fmadd_ps(iota, _mm512_broadcastss_ps(sm), _mm512_broadcastss_ps(_mm_shuffle_ps(sm, sm, 1))); \
        }                                                                                              \
        for (int e = 0; e < G && k0 + e < K; e += 16) {                                                \
            int k = k0 + e;                                                                            \
            __mmask16 mk = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);                    \
            __m512 xv[MR];                                                                             \
            for (int i = 0; i < MR; i++) xv[i] = _mm512_maskz_loadu_ps(mk, x[i] + k);                  \
            for (int j = 0; j < NR; j++) { /* codes to lanes: broadcast, shift; the table ignores high bits */ \
                __m512i c = _mm512_srlv_epi32(_mm512_set1_epi64(*(const long long *)(blk[j] + 4 + e / 2)), shifts); \
                __m512 wv = _mm512_maskz_permutexvar_ps(mk, c, lut[j]);                                \
                for (int i = 0; i < MR; i++) a[i][j] = _mm512_fmadd_ps(xv[i], wv, a[i][j]);            \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++) {                                        \
        __m512 v = a[i][j];                                                                            \
        __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));            \
        __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));              \
        __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));                                             \
        out[i * NR + j] = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));                    \
    }                                                                                                  \
}
Q4_TILE_AVX512(4, 6)
Q4_TILE_AVX512(2, 8)
Q4_TILE_AVX512(1, 8)

const TileFn q4_tiles_avx2[2] = {q4_tile_avx2_2, q4_tile_avx2_1};
const TileFn q4_tiles_avx512[3] = {q4_tile_avx512_4, q4_tile_avx512_2, q4_tile_avx512_1};

/* ----------------------------------------------------------------------------
 * Attention over a 4-bit cache: keys and values are 4-bit rows of head_dim.
 * Scores are dot products in the GEMM order (q rows x key rows); the weighted
 * sum dequantizes each value row and accumulates over positions in order, per
 * element, so vector width changes nothing. */

/* s[i][t] = q[i] . key[t] for t < T. */
void q4_attn_scores(float *const *s, const float *const *q, int n, const uint8_t *k, int D, int G, int T) {
    size_t rb = q4_row_bytes(D, G);
    if (g_simd == SIMD_SCALAR) {
        for (int i = 0; i < n; i++)
            for (int t = 0; t < T; t++) s[i][t] = q4_dot_scalar(q[i], k + rb * (size_t)t, D, G);
        return;
    }
    const TileFn fn = g_simd == SIMD_AVX512 ? q4_tiles_avx512[2] : q4_tiles_avx2[1]; /* 1 row x 8 (4) keys */
    int nr = g_simd == SIMD_AVX512 ? 8 : 4;
    for (int i = 0; i < n; i++)
        for (int t = 0; t < T; t += nr) {
            const char *w[8];
            float out[8];
            int cnt = T - t < nr ? T - t : nr;
            for (int j = 0; j < nr; j++) w[j] = (const char *)k + rb * (size_t)(t + (j < cnt ? j : cnt - 1));
            fn(q + i, w, D, rb * (size_t)nr, G, out);
            memcpy(s[i] + t, out, sizeof(float) * (size_t)cnt);
        }
}

/* out[i][d] (+)= sum_{t0 <= t < t1} p[i][t] * value[t][d]; from zero when init. */
void q4_attn_mix(float *const *out, const float *const *p, int n, const uint8_t *v, int D, int G, int t0, int t1, int init) {
    size_t rb = q4_row_bytes(D, G);
    float row[512];
    for (int i = 0; i < n; i++) if (init) memset(out[i], 0, sizeof(float) * (size_t)D);
    for (int t = t0; t < t1; t++) {
        q4_dequantize_row(row, v + rb * (size_t)t, D, G);
        for (int i = 0; i < n; i++) {
            float pt = p[i][t], *o = out[i];
            for (int d = 0; d < D; d++) o[d] = fmaf(pt, row[d], o[d]);
        }
    }
}

/* ----------------------------------------------------------------------------
 * int8 GEMM (SmoothQuant W8A8; weights DT_I8).
 *
 *   y[m, n] = (float)dot(qx[m], qw[n]) * (sx[m] * sw[n])   then + bias, + y, ReLU (gemm_store)
 *
 * qw[n] is an int8 weight row (values in [-127, 127]) and sw[n] = w->scale[n] its
 * per-output-channel scale. sx[m] is w->act_scale when that is set (static, the paper's O3),
 * else absmax(x[m]) / 127 (per token, dynamic, O1), and qx[m][k] = rint(clamp(x[m][k] / sx[m],
 * -127, 127)), rounding half to even; a zero row gets sx 0 and qx 0. Each row of x is quantized
 * once per GEMM, before any tile runs.
 *
 * dot is the exact integer dot product, accumulated in int32: integer sums do not depend on
 * their order, so every SIMD level, tile shape, batch size and thread count gives the same
 * int32, and the float epilogue (the same two multiplications everywhere) the same bits. int32
 * cannot overflow while K <= 65536 (checked): the largest partial sum is K * 127 * 255.
 *
 * Kernels, by level:
 *   AVX-512 VNNI  vpdpbusd multiplies unsigned bytes by signed bytes, 4 pairs per int32 lane.
 *                 The weights become the unsigned operand by adding 128 (w ^ 0x80, done as they
 *                 are loaded or repacked) and x stays signed, so the sum is off by 128 * sum_k
 *                 qx[m][k]: a per-token constant computed while x is quantized. The correction
 *                 therefore costs one subtraction per output, needs no per-tensor state (no
 *                 cached weight row sums, which would go stale with the tensor) and keeps the
 *                 file format plain int8.
 *   AVX-512 BW    vpmaddwd on int16: x is quantized straight to int16, weights sign-extended.
 *   AVX2          the same on 256 bits.
 *   scalar        plain int32 loops: the reference.
 * Shapes:
 *   M >= I8_PACK_M rows: a blocked GEMM. Threads take panels of 64 (AVX2: 16) weight rows,
 *     repack each once into the micro-kernel's order (VNNI: [K/4][64 rows][4 bytes], so one
 *     64-byte load feeds 16 output channels 4 k deep; BW/AVX2: int16 pairs), then run 6-row
 *     micro-tiles down all of x with 24 (AVX2: 12) accumulators in registers, broadcasting 4
 *     (2) k of a row at a time. The repacking is amortised over the M rows.
 *   fewer rows (decode): weight rows are streamed as stored, 64 k per step, with dot products
 *     along k and a horizontal sum at the end, as opt.c's tiles do (GEMV-style, memory-bound). */

#include <omp.h>
#include <stdlib.h>

#define T_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

enum { I8_MR = 6,        /* rows of x per micro-tile (packed path) */
       I8_PACK_M = 16 }; /* rows from which the packed path beats streaming the weights */

/* The quantized activations of one GEMM. */
typedef struct {
    void *q;               /* (M, Kp) int8 or int16 values, zero past K */
    float *sx;             /* (M) scale of each row */
    int32_t *comp;         /* (M) what the kernel adds to every dot of the row: 128 * sum_k qx for VNNI, else 0 */
    int Kp;                /* row length: K rounded up to 64 */
    int wide;              /* int16 values (vpmaddwd levels) instead of int8 */
} I8Act;

/* --- activation quantization (one row) --- */

/* absmax / 127, or the static scale. NaNs are skipped (a > m is false), as in the SIMD code. */
static float i8_scale_scalar(const float *x, int K, float act) {
    if (act > 0) return act;
    float m = 0;
    for (int k = 0; k < K; k++) { float a = fabsf(x[k]); m = a > m ? a : m; }
    return m / 127.0f;
}

/* Writes qx (Kp values, zero past K); returns sum_k qx. The clamp comes first and its
 * comparisons send NaN to -127, exactly as maxps/minps do in the SIMD versions. */
static int32_t i8_quant_scalar(void *q, int wide, const float *x, int K, int Kp, float s) {
    int32_t sum = 0;
    for (int k = 0; k < Kp; k++) {
        int v = 0;
        if (k < K && s > 0) {
            float t = x[k] / s;
            t = t > -127.0f ? t : -127.0f;
            t = t < 127.0f ? t : 127.0f;
            v = (int)rintf(t);
        }
        if (wide) ((int16_t *)q)[k] = (int16_t)v;
        else ((int8_t *)q)[k] = (int8_t)v;
        sum += v;
    }
    return sum;
}

T_AVX512 static float i8_scale_avx512(const float *x, int K, float act) {
    if (act > 0) return act;
    __m512 m = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 16) {
        __mmask16 mk = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        m = _mm512_max_ps(_mm512_abs_ps(_mm512_maskz_loadu_ps(mk, x + k)), m); /* NaN: keeps m */
    }
    return _mm512_reduce_max_ps(m) / 127.0f;
}

T_AVX512 static int32_t i8_quant_avx512(void *q, int wide, const float *x, int K, int Kp, float s) {
    if (!(s > 0)) { memset(q, 0, (size_t)Kp << wide); return 0; }
    __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    __m512i sum = _mm512_setzero_si512();
    for (int k = 0; k < Kp; k += 16) {
        __mmask16 mk = K - k >= 16 ? 0xFFFF : k < K ? (__mmask16)((1u << (K - k)) - 1) : 0;
        __m512 t = _mm512_div_ps(_mm512_maskz_loadu_ps(mk, x + k), vs);
        t = _mm512_min_ps(_mm512_max_ps(t, lo), hi);
        __m512i v = _mm512_cvtps_epi32(t); /* round half to even (the default MXCSR mode) */
        sum = _mm512_add_epi32(sum, v);
        if (wide) _mm256_storeu_si256((__m256i *)((int16_t *)q + k), _mm512_cvtepi32_epi16(v));
        else _mm_storeu_si128((__m128i *)((int8_t *)q + k), _mm512_cvtepi32_epi8(v));
    }
    return _mm512_reduce_add_epi32(sum);
}

T_AVX2 static float i8_scale_avx2(const float *x, int K, float act) {
    if (act > 0) return act;
    __m256 m = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
    int k = 0;
    for (; k + 8 <= K; k += 8) m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)), m);
    float l[8], r = 0;
    _mm256_storeu_ps(l, m);
    for (int i = 0; i < 8; i++) r = l[i] > r ? l[i] : r;
    for (; k < K; k++) { float a = fabsf(x[k]); r = a > r ? a : r; }
    return r / 127.0f;
}

T_AVX2 static int32_t i8_quant_avx2(void *q, int wide, const float *x, int K, int Kp, float s) {
    if (!wide || !(s > 0)) return i8_quant_scalar(q, wide, x, K, Kp, s); /* AVX2 kernels take int16 */
    __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    __m256i sum = _mm256_setzero_si256();
    int16_t *q16 = q;
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 t = _mm256_min_ps(_mm256_max_ps(_mm256_div_ps(_mm256_loadu_ps(x + k), vs), lo), hi);
        __m256i v = _mm256_cvtps_epi32(t);
        sum = _mm256_add_epi32(sum, v);
        __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(v, v), 0x08); /* 8 int16 in the low half */
        _mm_storeu_si128((__m128i *)(q16 + k), _mm256_castsi256_si128(p));
    }
    int32_t l[8], r = 0;
    _mm256_storeu_si256((__m256i *)l, sum);
    for (int i = 0; i < 8; i++) r += l[i];
    return r + i8_quant_scalar(q16 + k, 1, x + k, K - k, Kp - k, s);
}

/* --- packed path: weight panels and micro-kernels --- */

/* VNNI panel: dst[k/4][j][k%4] = w[j][k] + 128 as a byte, for 64 rows j (rows past cnt and
 * columns past K hold weight 0, i.e. 0x80). */
static void i8_pack_vnni(void *dst, const int8_t *w, int K, int cnt, int Kp) {
    uint32_t *d = dst;
    for (int k = 0; k < Kp; k += 4, d += 64)
        for (int j = 0; j < 64; j++) {
            uint32_t v = 0;
            if (j < cnt && k + 4 <= K) memcpy(&v, w + (size_t)j * K + k, 4);
            else if (j < cnt)
                for (int b = 0; b < 4 && k + b < K; b++) v |= (uint32_t)(uint8_t)w[(size_t)j * K + k + b] << (8 * b);
            d[j] = v ^ 0x80808080u;
        }
}

/* BW/AVX2 panel of np rows: dst[k/2][j][k%2] = w[j][k] as int16 (0 past cnt and K). */
static void i8_pack_pairs(void *dst, const int8_t *w, int K, int cnt, int Kp, int np) {
    int16_t *d = dst;
    for (int k = 0; k < Kp; k += 2, d += 2 * np)
        for (int j = 0; j < np; j++) {
            const int8_t *r = w + (size_t)j * K + k;
            d[2 * j] = (int16_t)(j < cnt && k < K ? r[0] : 0);
            d[2 * j + 1] = (int16_t)(j < cnt && k + 1 < K ? r[1] : 0);
        }
}

/* out[i][j] (i < 6, j < 64) = sum_k (w[j][k] + 128) * x[i][k]. */
T_VNNI static void i8_micro_vnni(const void *const *xv, const void *wpv, int Kp, int32_t *out) {
    const int8_t *const *x = (const int8_t *const *)xv;
    const uint8_t *wp = wpv;
    __m512i a[I8_MR][4];
    for (int i = 0; i < I8_MR; i++) for (int v = 0; v < 4; v++) a[i][v] = _mm512_setzero_si512();
    for (int k = 0; k < Kp; k += 4, wp += 256) {
        _mm_prefetch((const char *)wp + 2048, _MM_HINT_T0);
        _mm_prefetch((const char *)wp + 2048 + 64, _MM_HINT_T0);
        _mm_prefetch((const char *)wp + 2048 + 128, _MM_HINT_T0);
        _mm_prefetch((const char *)wp + 2048 + 192, _MM_HINT_T0);
        __m512i w0 = _mm512_loadu_si512(wp), w1 = _mm512_loadu_si512(wp + 64);
        __m512i w2 = _mm512_loadu_si512(wp + 128), w3 = _mm512_loadu_si512(wp + 192);
        for (int i = 0; i < I8_MR; i++) {
            int32_t q;
            memcpy(&q, x[i] + k, 4);
            __m512i xb = _mm512_set1_epi32(q);
            a[i][0] = _mm512_dpbusd_epi32(a[i][0], w0, xb);
            a[i][1] = _mm512_dpbusd_epi32(a[i][1], w1, xb);
            a[i][2] = _mm512_dpbusd_epi32(a[i][2], w2, xb);
            a[i][3] = _mm512_dpbusd_epi32(a[i][3], w3, xb);
        }
    }
    for (int i = 0; i < I8_MR; i++) for (int v = 0; v < 4; v++) _mm512_storeu_si512(out + i * 64 + 16 * v, a[i][v]);
}

/* out[i][j] (i < 6, j < 64) = sum_k w[j][k] * x[i][k] with vpmaddwd. */
T_AVX512 static void i8_micro_bw(const void *const *xv, const void *wpv, int Kp, int32_t *out) {
    const int16_t *const *x = (const int16_t *const *)xv;
    const int16_t *wp = wpv;
    __m512i a[I8_MR][4];
    for (int i = 0; i < I8_MR; i++) for (int v = 0; v < 4; v++) a[i][v] = _mm512_setzero_si512();
    for (int k = 0; k < Kp; k += 2, wp += 128) {
        _mm_prefetch((const char *)wp + 2048, _MM_HINT_T0);
        _mm_prefetch((const char *)wp + 2048 + 64, _MM_HINT_T0);
        _mm_prefetch((const char *)wp + 2048 + 128, _MM_HINT_T0);
        _mm_prefetch((const char *)wp + 2048 + 192, _MM_HINT_T0);
        __m512i w0 = _mm512_loadu_si512(wp), w1 = _mm512_loadu_si512(wp + 32);
        __m512i w2 = _mm512_loadu_si512(wp + 64), w3 = _mm512_loadu_si512(wp + 96);
        for (int i = 0; i < I8_MR; i++) {
            int32_t q;
            memcpy(&q, x[i] + k, 4);
            __m512i xb = _mm512_set1_epi32(q);
            a[i][0] = _mm512_add_epi32(a[i][0], _mm512_madd_epi16(xb, w0));
            a[i][1] = _mm512_add_epi32(a[i][1], _mm512_madd_epi16(xb, w1));
            a[i][2] = _mm512_add_epi32(a[i][2], _mm512_madd_epi16(xb, w2));
            a[i][3] = _mm512_add_epi32(a[i][3], _mm512_madd_epi16(xb, w3));
        }
    }
    for (int i = 0; i < I8_MR; i++) for (int v = 0; v < 4; v++) _mm512_storeu_si512(out + i * 64 + 16 * v, a[i][v]);
}

/* out[i][j] (i < 6, j < 16) = sum_k w[j][k] * x[i][k] with vpmaddwd on 256 bits. */
T_AVX2 static void i8_micro_avx2(const void *const *xv, const void *wpv, int Kp, int32_t *out) {
    const int16_t *const *x = (const int16_t *const *)xv;
    const int16_t *wp = wpv;
    __m256i a[I8_MR][2];
    for (int i = 0; i < I8_MR; i++) a[i][0] = a[i][1] = _mm256_setzero_si256();
    for (int k = 0; k < Kp; k += 2, wp += 32) {
        _mm_prefetch((const char *)wp + 1024, _MM_HINT_T0);
        __m256i w0 = _mm256_loadu_si256((const __m256i *)wp), w1 = _mm256_loadu_si256((const __m256i *)(wp + 16));
        for (int i = 0; i < I8_MR; i++) {
            int32_t q;
            memcpy(&q, x[i] + k, 4);
            __m256i xb = _mm256_set1_epi32(q);
            a[i][0] = _mm256_add_epi32(a[i][0], _mm256_madd_epi16(xb, w0));
            a[i][1] = _mm256_add_epi32(a[i][1], _mm256_madd_epi16(xb, w1));
        }
    }
    for (int i = 0; i < I8_MR; i++) {
        _mm256_storeu_si256((__m256i *)(out + i * 16), a[i][0]);
        _mm256_storeu_si256((__m256i *)(out + i * 16 + 8), a[i][1]);
    }
}

/* The epilogue of one row of a micro-tile: dot[j] = (float)(acc[j] - comp) * (sx * sw[j]), then
 * gemm_store. sw holds np scales, zero past the panel's last row. */
static void i8_epi_scalar(const Gemm *g, int m, int n0, int cnt, const int32_t *acc, int np, int32_t comp, float sx, const float *sw) {
    float dot[64];
    for (int j = 0; j < np; j++) dot[j] = (float)(acc[j] - comp) * (sx * sw[j]);
    gemm_store(g, m, n0, dot, cnt);
}

T_AVX512 static void i8_epi_avx512(const Gemm *g, int m, int n0, int cnt, const int32_t *acc, int np, int32_t comp, float sx, const float *sw) {
    float dot[64];
    __m512i c = _mm512_set1_epi32(comp);
    __m512 vx = _mm512_set1_ps(sx);
    for (int j = 0; j < np; j += 16) {
        __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_loadu_si512(acc + j), c));
        _mm512_storeu_ps(dot + j, _mm512_mul_ps(f, _mm512_mul_ps(vx, _mm512_loadu_ps(sw + j))));
    }
    gemm_store(g, m, n0, dot, cnt);
}

T_AVX2 static void i8_epi_avx2(const Gemm *g, int m, int n0, int cnt, const int32_t *acc, int np, int32_t comp, float sx, const float *sw) {
    float dot[64];
    __m256i c = _mm256_set1_epi32(comp);
    __m256 vx = _mm256_set1_ps(sx);
    for (int j = 0; j < np; j += 8) {
        __m256 f = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_loadu_si256((const __m256i *)(acc + j)), c));
        _mm256_storeu_ps(dot + j, _mm256_mul_ps(f, _mm256_mul_ps(vx, _mm256_loadu_ps(sw + j))));
    }
    gemm_store(g, m, n0, dot, cnt);
}

/* --- streaming path: tiles of MR rows x NR weight rows, dot products along k --- */

/* out[i * NR + j] = sum_k x[i][k] * (w[j][k] (+ 128 with VNNI)) over K (x is zero-padded to a
 * multiple of 64, the weights are read up to K only); pf: prefetch distance in bytes. */
typedef void (*I8RowFn)(const void *const *x, const int8_t *const *w, int K, size_t pf, int32_t *out);
typedef struct { int mr, nr; I8RowFn fn; } I8Tile;

#define I8_ROWS_VNNI(MR, NR)                                                                            \
T_VNNI static void i8_rows_vnni_##MR(const void *const *xv, const int8_t *const *w, int K, size_t pf, int32_t *out) { \
    const int8_t *const *x = (const int8_t *const *)xv;                                                 \
    const __m512i flip = _mm512_set1_epi8((char)0x80);                                                  \
    __m512i a[MR][NR];                                                                                  \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++) a[i][j] = _mm512_setzero_si512();         \
    for (int k = 0; k < K; k += 64) {                                                                   \
        __mmask64 mk = K - k >= 64 ? ~0ull : (1ull << (K - k)) - 1;                                     \
        __m512i xv_[MR];                                                                                \
        for (int i = 0; i < MR; i++) xv_[i] = _mm512_loadu_si512(x[i] + k);                             \
        for (int j = 0; j < NR; j++) {                                                                  \
            _mm_prefetch((const char *)w[j] + k + pf, _MM_HINT_T0);                                     \
            __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, w[j] + k), flip);                  \
            for (int i = 0; i < MR; i++) a[i][j] = _mm512_dpbusd_epi32(a[i][j], wv, xv_[i]);            \
        }                                                                                               \
    }                                                                                                   \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++) out[i * NR + j] = _mm512_reduce_add_epi32(a[i][j]); \
}
I8_ROWS_VNNI(4, 4)
I8_ROWS_VNNI(2, 8)
I8_ROWS_VNNI(1, 8)

#define I8_ROWS_BW(MR, NR)                                                                              \
T_AVX512 static void i8_rows_bw_##MR(const void *const *xv, const int8_t *const *w, int K, size_t pf, int32_t *out) { \
    const int16_t *const *x = (const int16_t *const *)xv;                                               \
    __m512i a[MR][NR];                                                                                  \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++) a[i][j] = _mm512_setzero_si512();         \
    for (int k = 0; k < K; k += 32) {                                                                   \
        __mmask32 mk = K - k >= 32 ? ~0u : (1u << (K - k)) - 1;                                         \
        __m512i xv_[MR];                                                                                \
        for (int i = 0; i < MR; i++) xv_[i] = _mm512_loadu_si512(x[i] + k);                             \
        for (int j = 0; j < NR; j++) {                                                                  \
            if (!(k & 63)) _mm_prefetch((const char *)w[j] + k + pf, _MM_HINT_T0);                      \
            __m512i wv = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mk, w[j] + k));                   \
            for (int i = 0; i < MR; i++) a[i][j] = _mm512_add_epi32(a[i][j], _mm512_madd_epi16(xv_[i], wv)); \
        }                                                                                               \
    }                                                                                                   \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++) out[i * NR + j] = _mm512_reduce_add_epi32(a[i][j]); \
}
I8_ROWS_BW(4, 4)
I8_ROWS_BW(2, 8)
I8_ROWS_BW(1, 8)

T_AVX2 static inline int32_t i8_hsum_avx2(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* The K tail (under 16) is copied into a zero-padded buffer: reading past the last row of the
 * matrix could leave the mapping. */
#define I8_ROWS_AVX2(MR, NR)                                                                            \
T_AVX2 static void i8_rows_avx2_##MR(const void *const *xv, const int8_t *const *w, int K, size_t pf, int32_t *out) { \
    const int16_t *const *x = (const int16_t *const *)xv;                                               \
    __m256i a[MR][NR];                                                                                  \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++) a[i][j] = _mm256_setzero_si256();         \
    for (int k = 0; k < K; k += 16) {                                                                   \
        __m256i xv_[MR];                                                                                \
        for (int i = 0; i < MR; i++) xv_[i] = _mm256_loadu_si256((const __m256i *)(x[i] + k));          \
        for (int j = 0; j < NR; j++) {                                                                  \
            __m128i wb;                                                                                 \
            if (K - k >= 16) wb = _mm_loadu_si128((const __m128i *)(w[j] + k));                        \
            else { int8_t t[16] = {0}; memcpy(t, w[j] + k, (size_t)(K - k)); wb = _mm_loadu_si128((const __m128i *)t); } \
            if (!(k & 63)) _mm_prefetch((const char *)w[j] + k + pf, _MM_HINT_T0);                      \
            __m256i wv = _mm256_cvtepi8_epi16(wb);                                                      \
            for (int i = 0; i < MR; i++) a[i][j] = _mm256_add_epi32(a[i][j], _mm256_madd_epi16(xv_[i], wv)); \
        }                                                                                               \
    }                                                                                                   \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++) out[i * NR + j] = i8_hsum_avx2(a[i][j]);  \
}
I8_ROWS_AVX2(2, 4)
I8_ROWS_AVX2(1, 4)

/* The reference: one row against one weight row. */
static void i8_rows_scalar(const void *const *xv, const int8_t *const *w, int K, size_t pf, int32_t *out) {
    (void)pf;
    const int8_t *x = xv[0];
    int32_t d = 0;
    for (int k = 0; k < K; k++) d += (int32_t)x[k] * w[0][k];
    out[0] = d;
}

static const I8Tile i8_tiles_vnni[] = {{4, 4, i8_rows_vnni_4}, {2, 8, i8_rows_vnni_2}, {1, 8, i8_rows_vnni_1}, {0, 0, NULL}};
static const I8Tile i8_tiles_bw[] = {{4, 4, i8_rows_bw_4}, {2, 8, i8_rows_bw_2}, {1, 8, i8_rows_bw_1}, {0, 0, NULL}};
static const I8Tile i8_tiles_avx2[] = {{2, 4, i8_rows_avx2_2}, {1, 4, i8_rows_avx2_1}, {0, 0, NULL}};
static const I8Tile i8_tiles_scalar[] = {{1, 1, i8_rows_scalar}, {0, 0, NULL}};

/* --- levels and the driver --- */

typedef struct {
    int wide;              /* x quantized to int16 (vpmaddwd) instead of int8 */
    int comp;              /* the kernels add 128 to the weights (VNNI): subtract 128 * sum qx */
    int np;                /* packed path: weight rows per panel; 0 = no packed path */
    float (*scale)(const float *x, int K, float act);                                  /* row scale */
    int32_t (*quant)(void *q, int wide, const float *x, int K, int Kp, float s);       /* row values */
    void (*pack)(void *dst, const int8_t *w, int K, int cnt, int Kp);                  /* a panel */
    void (*micro)(const void *const *x, const void *wp, int Kp, int32_t *out);         /* 6 x np */
    void (*epi)(const Gemm *g, int m, int n0, int cnt, const int32_t *acc, int np, int32_t comp, float sx, const float *sw);
    const I8Tile *tiles;   /* streaming path, largest first */
} I8Level;

static void i8_pack_pairs64(void *dst, const int8_t *w, int K, int cnt, int Kp) { i8_pack_pairs(dst, w, K, cnt, Kp, 64); }
static void i8_pack_pairs16(void *dst, const int8_t *w, int K, int cnt, int Kp) { i8_pack_pairs(dst, w, K, cnt, Kp, 16); }

static const I8Level i8_levels[4] = {
    {0, 0, 0, i8_scale_scalar, i8_quant_scalar, NULL, NULL, i8_epi_scalar, i8_tiles_scalar},
    {1, 0, 16, i8_scale_avx2, i8_quant_avx2, i8_pack_pairs16, i8_micro_avx2, i8_epi_avx2, i8_tiles_avx2},
    {1, 0, 64, i8_scale_avx512, i8_quant_avx512, i8_pack_pairs64, i8_micro_bw, i8_epi_avx512, i8_tiles_bw},
    {0, 1, 64, i8_scale_avx512, i8_quant_avx512, i8_pack_vnni, i8_micro_vnni, i8_epi_avx512, i8_tiles_vnni},
};

static const I8Level *i8_level(void) {
    if (g_simd == SIMD_AVX512) return &i8_levels[g_vnni ? 3 : 2];
    return &i8_levels[g_simd == SIMD_AVX2 ? 1 : 0];
}

/* Weight rows [n0, n1) against all rows of x, packed. */
static void i8_gemm_panel(const Gemm *g, const I8Act *a, const I8Level *L, int n0, int n1) {
    static _Thread_local void *panel;
    static _Thread_local size_t panel_cap;
    size_t need = (size_t)a->Kp * (size_t)L->np * (L->comp ? 1 : 2);
    if (need > panel_cap) { free(panel); panel = check_malloc(need, "an int8 weight panel"); panel_cap = need; }
    int cnt = n1 - n0, np = L->np, K = g->K;
    L->pack(panel, (const int8_t *)g->w->data + (size_t)n0 * K, K, cnt, a->Kp);
    float sw[64] = {0};
    memcpy(sw, g->w->scale + n0, sizeof(float) * (size_t)cnt);
    int32_t acc[I8_MR * 64];
    size_t rb = (size_t)a->Kp << a->wide;
    for (int m0 = 0; m0 < g->M; m0 += I8_MR) {
        const void *x[I8_MR];
        int mr = g->M - m0 < I8_MR ? g->M - m0 : I8_MR;
        for (int i = 0; i < I8_MR; i++) x[i] = (const char *)a->q + rb * (size_t)(m0 + (i < mr ? i : mr - 1));
        L->micro(x, panel, a->Kp, acc);
        for (int i = 0; i < mr; i++) L->epi(g, m0 + i, n0, cnt, acc + i * np, np, a->comp[m0 + i], a->sx[m0 + i], sw);
    }
}

/* Weight rows [n0, n1) against all rows of x, streamed as stored. */
static void i8_gemm_rows(const Gemm *g, const I8Act *a, const I8Level *L, int n0, int n1) {
    size_t rb = (size_t)a->Kp << a->wide, wb = (size_t)g->K;
    const int8_t *w = g->w->data;
    for (int m0 = 0; m0 < g->M;) {
        const I8Tile *t = L->tiles;
        while (t->mr > g->M - m0) t++;
        const void *x[4];
        for (int i = 0; i < t->mr; i++) x[i] = (const char *)a->q + rb * (size_t)(m0 + i);
        for (int nb = n0; nb < n1; nb += t->nr) {
            const int8_t *wr[8];
            int32_t out[32];
            float dot[8];
            int cnt = n1 - nb < t->nr ? n1 - nb : t->nr;
            for (int j = 0; j < t->nr; j++) wr[j] = w + wb * (size_t)(nb + (j < cnt ? j : cnt - 1));
            t->fn(x, wr, g->K, wb * (size_t)t->nr, out);
            for (int i = 0; i < t->mr; i++) {
                int m = m0 + i;
                for (int j = 0; j < cnt; j++) dot[j] = (float)(out[i * t->nr + j] - a->comp[m]) * (a->sx[m] * g->w->scale[nb + j]);
                gemm_store(g, m, nb, dot, cnt);
            }
        }
        m0 += t->mr;
    }
}

void gemm_i8(const Gemm *g) {
    if (g->M <= 0 || g->N <= 0) return;
    const Tensor *w = g->w;
    check(w->dtype == DT_I8 && w->scale && w->cols == g->K, "gemm_i8 on a tensor that is not int8 [N, K] with scales");
    if (g->K > 65536) die("%s: int8 GEMM supports rows of up to 65536 inputs (int32 accumulation), not %d", w->name ? w->name : "a tensor", g->K);
    const I8Level *L = i8_level();
    /* the quantized activations, kept per calling thread between calls */
    static _Thread_local char *buf;
    static _Thread_local size_t buf_cap;
    int Kp = (g->K + 63) & ~63;
    size_t qb = (size_t)g->M * (size_t)Kp << L->wide, need = qb + (size_t)g->M * 8;
    if (need > buf_cap) { free(buf); buf = check_malloc(need, "int8 activations"); buf_cap = need; }
    I8Act a = {.q = buf, .sx = (float *)(buf + qb), .comp = (int32_t *)(buf + qb) + g->M, .Kp = Kp, .wide = L->wide};
    bool packed = L->np && g->M >= I8_PACK_M;
    int nb = packed ? L->np : 64, nblk = (g->N + nb - 1) / nb;
    #pragma omp parallel if ((int64_t)g->M * g->N * g->K > 100000)
    {
        #pragma omp for schedule(static)
        for (int m = 0; m < g->M; m++) {
            const float *x = g->x + (int64_t)m * g->ldx;
            float s = L->scale(x, g->K, w->act_scale);
            int32_t sum = L->quant((char *)a.q + ((size_t)m * Kp << L->wide), L->wide, x, g->K, Kp, s);
            a.sx[m] = s;
            a.comp[m] = L->comp ? 128 * sum : 0;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int b = 0; b < nblk; b++) {
            int n0 = b * nb, n1 = n0 + nb < g->N ? n0 + nb : g->N;
            if (packed) i8_gemm_panel(g, &a, L, n0, n1);
            else i8_gemm_rows(g, &a, L, n0, n1);
        }
    }
}

void sq_convert(Model *m, const Tokenizer *tok, const SqOpts *o) {
    (void)m; (void)tok;
    die("%s: SmoothQuant conversion is not supported by this build yet", o->calib);
}
