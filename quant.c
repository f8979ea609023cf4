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
            out[4 + i / 2] |= (uint8_t)(c << (4 * (i & 1)));
        }
    }
}

void q4_dequantize_row(float *out, const uint8_t *in, int64_t cols, int group) {
    size_t bs = 4 + (size_t)group / 2;
    for (int64_t g0 = 0; g0 < cols; g0 += group, in += bs) {
        uint16_t s, m;
        memcpy(&s, in, 2);
        memcpy(&m, in + 2, 2);
        float fs = f16_to_f32(s), fm = f16_to_f32(m);
        int n = cols - g0 < group ? (int)(cols - g0) : group;
        for (int i = 0; i < n; i++) out[g0 + i] = fmaf((float)(in[4 + i / 2] >> (4 * (i & 1)) & 15), fs, fm);
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
            v[i] = k + i < K ? fmaf((float)(b[4 + e / 2] >> (4 * (e & 1)) & 15), fs, fm) : 0.0f;
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

/* 16 codes from 8 bytes, in element order: low nibble, high nibble, ... */
T_AVX2 static inline __m128i q4_codes16(const uint8_t *p) {
    __m128i b = _mm_loadl_epi64((const __m128i *)p), mask = _mm_set1_epi8(15);
    return _mm_unpacklo_epi8(_mm_and_si128(b, mask), _mm_and_si128(_mm_srli_epi16(b, 4), mask));
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
                __m128i c = q4_codes16(blk[j] + 4 + e / 2);                                            \
                __m256 wl = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c)), sc[j], mn[j]); \
                __m256 wh = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8))), sc[j], mn[j]); \
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
    size_t bs = 4 + (size_t)G / 2;                                                                     \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++) a[i][j] = _mm512_setzero_ps();           \
    for (int k0 = 0; k0 < K; k0 += G) {                                                                \
        const uint8_t *blk[NR];                                                                        \
        __m512 sc[NR], mn[NR];                                                                         \
        for (int j = 0; j < NR; j++) {                                                                 \
            blk[j] = (const uint8_t *)w[j] + (size_t)(k0 / G) * bs;                                    \
            _mm_prefetch((const char *)blk[j] + pf, _MM_HINT_T0);                                      \
            __m128 sm = _mm_cvtph_ps(_mm_cvtsi32_si128(*(const int32_t *)blk[j]));                     \
            sc[j] = _mm512_broadcastss_ps(sm);                                                         \
            mn[j] = _mm512_broadcastss_ps(_mm_shuffle_ps(sm, sm, 1));                                  \
        }                                                                                              \
        for (int e = 0; e < G && k0 + e < K; e += 16) {                                                \
            int k = k0 + e;                                                                            \
            __mmask16 mk = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);                    \
            __m512 xv[MR];                                                                             \
            for (int i = 0; i < MR; i++) xv[i] = _mm512_maskz_loadu_ps(mk, x[i] + k);                  \
            for (int j = 0; j < NR; j++) {                                                             \
                __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q4_codes16(blk[j] + 4 + e / 2)));   \
                __m512 wv = _mm512_maskz_mov_ps(mk, _mm512_fmadd_ps(q, sc[j], mn[j]));                 \
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
 * int8 (SmoothQuant W8A8). */

void gemm_i8(const Gemm *g) {
    die("%s: int8 weights are not supported by this build yet", g->w->name ? g->w->name : "a tensor");
}

void sq_convert(Model *m, const Tokenizer *tok, const SqOpts *o) {
    (void)m; (void)tok;
    die("%s: SmoothQuant conversion is not supported by this build yet", o->calib);
}
