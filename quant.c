/* quant.c: compressed weights and KV cache, and their CPU kernels.
 *
 * Sections: 4-bit group-wise format, 4-bit GEMM tiles, 4-bit KV-cache
 * attention, int8 GEMM (SmoothQuant W8A8), SmoothQuant conversion. The 4-bit
 * kernels keep opt.c's reduction order (16 lanes, fixed tree), so a fused
 * kernel equals dequantize-then-f32-GEMM bit for bit, at every SIMD level, and
 * results stay independent of the batch; the int8 ones are exact integer sums. */
#include "opt.h"

#include <immintrin.h>
#include <math.h>
#include <stdbool.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* ----------------------------------------------------------------------------
 * 4-bit format (DT_Q4). Groups run along a row (the input dimension of a
 * weight, head_dim of a cache row), so a kernel's 16-wide step never crosses a
 * group and the row is one contiguous stream. A row of K values is ceil(K/G)
 * blocks of [f16 scale][f16 min][G/2 bytes of codes]. The codes of each 16
 * elements are a little-endian 64-bit word with element e at bit
 * 4*(e/2) + 32*(e%2) (even elements in its low half, odd in its high), so one
 * 64-bit broadcast and a variable shift per 32-bit lane put element e in lane
 * e. A value is fmaf(code, scale, min): one rounding, the same
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

static inline long long ld64(const void *p);

/* The same by the 4-bit tiles' table: a block's 16 values fma'd once, codes
 * permuted into lanes (the GEMM widens a block of rows per 48 outputs with it,
 * so on batches 4-bit weights cost what f16 ones do). */
T_AVX512 static void q4_dequantize_row_avx512(float *out, const uint8_t *in, int64_t cols, int group) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i shifts = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
    size_t bs = 4 + (size_t)group / 2;
    for (int64_t g0 = 0; g0 < cols; g0 += group, in += bs) {
        uint32_t sm32;
        memcpy(&sm32, in, 4);
        __m128 sm = _mm_cvtph_ps(_mm_cvtsi32_si128((int)sm32));
        __m512 lut = _mm512_fmadd_ps(iota, _mm512_broadcastss_ps(sm), _mm512_broadcastss_ps(_mm_shuffle_ps(sm, sm, 1)));
        for (int e = 0; e < group && g0 + e < cols; e += 16) {
            int64_t left = cols - g0 - e;
            __mmask16 mk = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
            __m512i c = _mm512_srlv_epi32(_mm512_set1_epi64(ld64(in + 4 + e / 2)), shifts);
            _mm512_mask_storeu_ps(out + g0 + e, mk, _mm512_permutexvar_ps(c, lut));
        }
    }
}

void q4_dequantize_row(float *out, const uint8_t *in, int64_t cols, int group) {
    if (g_simd == SIMD_AVX512) { q4_dequantize_row_avx512(out, in, cols, group); return; }
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

/* Unaligned loads (4-bit rows are 36 or 68 bytes, say): memcpy compiles to one mov. */
static inline int32_t ld32(const void *p) { int32_t v; memcpy(&v, p, 4); return v; }
static inline long long ld64(const void *p) { long long v; memcpy(&v, p, 8); return v; }

/* The block's scale and min, broadcast (F16C conversion: exact). */
T_AVX2 static inline void q4_params_avx2(const uint8_t *blk, __m256 *s, __m256 *m) {
    __m128 sm = _mm_cvtph_ps(_mm_cvtsi32_si128(ld32(blk)));
    *s = _mm256_broadcastss_ps(sm);
    *m = _mm256_broadcastss_ps(_mm_shuffle_ps(sm, sm, 1));
}

/* The 16 codes of a word as two vectors of 8 dword lanes: broadcast, shift
 * each lane to its element, mask (see the format). */
T_AVX2 static inline void q4_codes_avx2(const uint8_t *p, __m256i *lo, __m256i *hi) {
    __m256i w = _mm256_set1_epi64x(ld64(p)), m = _mm256_set1_epi32(15);
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
            __m128 sm = _mm_cvtph_ps(_mm_cvtsi32_si128(ld32(blk[j])));                     \
            lut[j] = _mm512_fmadd_ps(iota, _mm512_broadcastss_ps(sm), _mm512_broadcastss_ps(_mm_shuffle_ps(sm, sm, 1))); \
        }                                                                                              \
        for (int e = 0; e < G && k0 + e < K; e += 16) {                                                \
            int k = k0 + e;                                                                            \
            __mmask16 mk = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);                    \
            __m512 xv[MR];                                                                             \
            for (int i = 0; i < MR; i++) xv[i] = _mm512_maskz_loadu_ps(mk, x[i] + k);                  \
            for (int j = 0; j < NR; j++) { /* codes to lanes: broadcast, shift; the table ignores high bits */ \
                __m512i c = _mm512_srlv_epi32(_mm512_set1_epi64(ld64(blk[j] + 4 + e / 2)), shifts); \
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

/* The AVX-512 weighted sum: a value row dequantized 16 lanes at a time, then
 * one FMA per lane and row: the scalar loop's roundings exactly. */
T_AVX512 static void q4_mix_avx512(float *const *out, const float *const *p, int n, const uint8_t *v, int D, int G, int t0, int t1) {
    size_t rb = q4_row_bytes(D, G);
    const __m512i shifts = _mm512_set_epi32(28, 28, 24, 24, 20, 20, 16, 16, 12, 12, 8, 8, 4, 4, 0, 0), m15 = _mm512_set1_epi32(15);
    float row[512 + 16];
    for (int t = t0; t < t1; t++) {
        const uint8_t *blk = v + rb * (size_t)t;
        for (int g0 = 0; g0 < D; g0 += G, blk += 4 + G / 2) {
            uint16_t hs, hm;
            memcpy(&hs, blk, 2);
            memcpy(&hm, blk + 2, 2);
            __m512 s = _mm512_set1_ps(f16_to_f32(hs)), m = _mm512_set1_ps(f16_to_f32(hm));
            for (int e = 0; e < G && g0 + e < D; e += 16) {
                __m512i c = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi64(ld64(blk + 4 + e / 2)), shifts), m15);
                _mm512_storeu_ps(row + g0 + e, _mm512_fmadd_ps(_mm512_cvtepi32_ps(c), s, m));
            }
        }
        for (int i = 0; i < n; i++) {
            __m512 pt = _mm512_set1_ps(p[i][t]);
            float *o = out[i];
            for (int d = 0; d < D; d += 16) {
                __mmask16 k = D - d >= 16 ? 0xffff : (__mmask16)((1u << (D - d)) - 1);
                _mm512_mask_storeu_ps(o + d, k, _mm512_fmadd_ps(pt, _mm512_maskz_loadu_ps(k, row + d), _mm512_maskz_loadu_ps(k, o + d)));
            }
        }
    }
}

/* out[i][d] (+)= sum_{t0 <= t < t1} p[i][t] * value[t][d]; from zero when init. */
void q4_attn_mix(float *const *out, const float *const *p, int n, const uint8_t *v, int D, int G, int t0, int t1, int init) {
    size_t rb = q4_row_bytes(D, G);
    float row[512];
    for (int i = 0; i < n; i++) if (init) memset(out[i], 0, sizeof(float) * (size_t)D);
    if (g_simd == SIMD_AVX512 && D <= 512) { q4_mix_avx512(out, p, n, v, D, G, t0, t1); return; }
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

/* I8_PACK_M: the packed path from 5 rows on. The streaming path reads the weights once per 4
 * rows of x, the packed one once in all (and spends about as long repacking them as one
 * streaming pass takes): with the weights coming from RAM, as in a real model's decode, two
 * passes already cost more than the repacking. */
enum { I8_MR = 6,        /* rows of x per micro-tile (packed path) */
       I8_PACK_M = 5 };  /* rows from which the packed path is taken */

/* The quantized activations of one GEMM. */
typedef struct {
    void *q;               /* (M, Kp) int8 or int16 values, zero past K */
    float *sx;             /* (M) scale of each row */
    int32_t *comp;         /* (M) what the kernel adds to every dot of the row: 128 * sum_k qx for VNNI, else 0 */
    int Kp;                /* row length: K rounded up to 64 */
    int wide;              /* int16 values (vpmaddwd levels) instead of int8 */
} I8Act;

/* Weight row n: a tensor split across tiers keeps rows [split, N) at data2. */
static inline const int8_t *i8_wrow(const Tensor *w, int64_t n) {
    if (w->data2 && n >= w->split) return (const int8_t *)w->data2 + (size_t)(n - w->split) * (size_t)w->cols;
    return (const int8_t *)w->data + (size_t)n * (size_t)w->cols;
}

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

/* a[d] <- dword d of the 16 rows a[0..15]: rows interleaved by dword and by
 * qword within 128-bit lanes (a[4j + c], lane L: dword 4L + c of rows 4j..4j+3),
 * then the lanes gathered. */
T_AVX512 static inline void transpose16_epi32(__m512i *a) {
    __m512i b[16];
    for (int j = 0; j < 16; j += 2) {
        b[j] = _mm512_unpacklo_epi32(a[j], a[j + 1]);
        b[j + 1] = _mm512_unpackhi_epi32(a[j], a[j + 1]);
    }
    for (int j = 0; j < 16; j += 4) {
        a[j] = _mm512_unpacklo_epi64(b[j], b[j + 2]);
        a[j + 1] = _mm512_unpackhi_epi64(b[j], b[j + 2]);
        a[j + 2] = _mm512_unpacklo_epi64(b[j + 1], b[j + 3]);
        a[j + 3] = _mm512_unpackhi_epi64(b[j + 1], b[j + 3]);
    }
    for (int c = 0; c < 4; c++) { /* dwords c, c+4, c+8, c+12 of all 16 rows */
        __m512i v = _mm512_shuffle_i32x4(a[c], a[4 + c], 0x88), w = _mm512_shuffle_i32x4(a[c], a[4 + c], 0xDD);
        __m512i x = _mm512_shuffle_i32x4(a[8 + c], a[12 + c], 0x88), y = _mm512_shuffle_i32x4(a[8 + c], a[12 + c], 0xDD);
        b[c] = _mm512_shuffle_i32x4(v, x, 0x88), b[8 + c] = _mm512_shuffle_i32x4(v, x, 0xDD);
        b[4 + c] = _mm512_shuffle_i32x4(w, y, 0x88), b[12 + c] = _mm512_shuffle_i32x4(w, y, 0xDD);
    }
    for (int d = 0; d < 16; d++) a[d] = b[d];
}

/* VNNI panel of weight rows n0 .. n0 + cnt - 1: dst[k/4][j][k%4] = w[n0 + j][k] + 128 as a
 * byte, for 64 rows j (rows past cnt and columns past K hold weight 0, i.e. 0x80): blocks of
 * 16 rows x 64 bytes, loaded masked at the edges and transposed as 16 x 16 dwords. */
T_AVX512 static void i8_pack_vnni(void *dst, const Tensor *t, int n0, int cnt, int Kp) {
    const int8_t *r[64];
    int K = (int)t->cols;
    for (int j = 0; j < cnt; j++) r[j] = i8_wrow(t, n0 + j);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int k0 = 0; k0 < Kp; k0 += 64) {
        __mmask64 mk = K - k0 >= 64 ? ~0ull : K > k0 ? (1ull << (K - k0)) - 1 : 0;
        int32_t *d = (int32_t *)dst + (size_t)k0 * 16; /* (k0 / 4) steps of 64 dwords */
        for (int q = 0; q < 64; q += 16) {
            __m512i a[16];
            for (int j = 0; j < 16; j++) a[j] = q + j < cnt ? _mm512_maskz_loadu_epi8(mk, r[q + j] + k0) : _mm512_setzero_si512();
            transpose16_epi32(a);
            for (int c = 0; c < 16; c++) _mm512_storeu_si512(d + c * 64 + q, _mm512_xor_si512(a[c], flip));
        }
    }
}

/* BW/AVX2 panel of np rows: dst[k/2][j][k%2] = w[n0 + j][k] as int16 (0 past cnt and K). */
static void i8_pack_pairs(void *dst, const Tensor *t, int n0, int cnt, int Kp, int np) {
    const int8_t *r[64];
    int K = (int)t->cols;
    for (int j = 0; j < cnt; j++) r[j] = i8_wrow(t, n0 + j);
    int16_t *d = dst;
    for (int k = 0; k < Kp; k += 2, d += 2 * np)
        for (int j = 0; j < np; j++) {
            d[2 * j] = (int16_t)(j < cnt && k < K ? r[j][k] : 0);
            d[2 * j + 1] = (int16_t)(j < cnt && k + 1 < K ? r[j][k + 1] : 0);
        }
}

/* The micro-kernels keep their 24 (12) accumulators in named variables: written as arrays,
 * GCC spills them to the stack on every step. ROW6(M) applies M(i) to the rows 0..5. */
#define ROW6(M) M(0) M(1) M(2) M(3) M(4) M(5)
#define ACC4_ZERO(i) __m512i a##i##0 = _mm512_setzero_si512(), a##i##1 = a##i##0, a##i##2 = a##i##0, a##i##3 = a##i##0;
#define ACC4_STORE(i) _mm512_storeu_si512(out + i * 64, a##i##0); _mm512_storeu_si512(out + i * 64 + 16, a##i##1); \
                      _mm512_storeu_si512(out + i * 64 + 32, a##i##2); _mm512_storeu_si512(out + i * 64 + 48, a##i##3);
/* 4 bytes (VNNI) or 2 int16 (vpmaddwd) of row i at k, for every lane */
#define X_BCAST512(i) _mm512_set1_epi32(ld32(x##i + k))
#define X_BCAST256(i) _mm256_set1_epi32(ld32(x##i + k))

T_VNNI static inline __m512i dp_vnni(__m512i a, __m512i w, __m512i x) { return _mm512_dpbusd_epi32(a, w, x); }
T_AVX512 static inline __m512i dp_bw(__m512i a, __m512i w, __m512i x) { return _mm512_add_epi32(a, _mm512_madd_epi16(x, w)); }
T_AVX2 static inline __m256i dp_avx2(__m256i a, __m256i w, __m256i x) { return _mm256_add_epi32(a, _mm256_madd_epi16(x, w)); }

#define DOT4_VNNI(i) { __m512i b_ = X_BCAST512(i); a##i##0 = dp_vnni(a##i##0, w0, b_); a##i##1 = dp_vnni(a##i##1, w1, b_); \
                       a##i##2 = dp_vnni(a##i##2, w2, b_); a##i##3 = dp_vnni(a##i##3, w3, b_); }
#define DOT4_BW(i) { __m512i b_ = X_BCAST512(i); a##i##0 = dp_bw(a##i##0, w0, b_); a##i##1 = dp_bw(a##i##1, w1, b_); \
                     a##i##2 = dp_bw(a##i##2, w2, b_); a##i##3 = dp_bw(a##i##3, w3, b_); }

/* out[i][j] (i < 6, j < 64) = sum_k (w[j][k] + 128) * x[i][k]: one 64-byte load of the panel
 * holds 4 k of 16 weight rows, multiplied with 4 k of a row of x in every lane. */
T_VNNI static void i8_micro_vnni(const void *const *xv, const void *wpv, int Kp, int32_t *out) {
    const int8_t *x0 = xv[0], *x1 = xv[1], *x2 = xv[2], *x3 = xv[3], *x4 = xv[4], *x5 = xv[5];
    const uint8_t *wp = wpv;
    ROW6(ACC4_ZERO)
    for (int k = 0; k < Kp; k += 4, wp += 256) {
        _mm_prefetch((const char *)wp + 2048, _MM_HINT_T0);
        _mm_prefetch((const char *)wp + 2048 + 64, _MM_HINT_T0);
        _mm_prefetch((const char *)wp + 2048 + 128, _MM_HINT_T0);
        _mm_prefetch((const char *)wp + 2048 + 192, _MM_HINT_T0);
        __m512i w0 = _mm512_loadu_si512(wp), w1 = _mm512_loadu_si512(wp + 64);
        __m512i w2 = _mm512_loadu_si512(wp + 128), w3 = _mm512_loadu_si512(wp + 192);
        ROW6(DOT4_VNNI)
    }
    ROW6(ACC4_STORE)
}

/* out[i][j] (i < 6, j < 64) = sum_k w[j][k] * x[i][k]: one load holds 2 k of 16 weight rows as
 * int16 pairs, vpmaddwd'd with 2 k of a row of x. */
T_AVX512 static void i8_micro_bw(const void *const *xv, const void *wpv, int Kp, int32_t *out) {
    const int16_t *x0 = xv[0], *x1 = xv[1], *x2 = xv[2], *x3 = xv[3], *x4 = xv[4], *x5 = xv[5];
    const int16_t *wp = wpv;
    ROW6(ACC4_ZERO)
    for (int k = 0; k < Kp; k += 2, wp += 128) {
        _mm_prefetch((const char *)wp + 2048, _MM_HINT_T0);
        _mm_prefetch((const char *)wp + 2048 + 64, _MM_HINT_T0);
        _mm_prefetch((const char *)wp + 2048 + 128, _MM_HINT_T0);
        _mm_prefetch((const char *)wp + 2048 + 192, _MM_HINT_T0);
        __m512i w0 = _mm512_loadu_si512(wp), w1 = _mm512_loadu_si512(wp + 32);
        __m512i w2 = _mm512_loadu_si512(wp + 64), w3 = _mm512_loadu_si512(wp + 96);
        ROW6(DOT4_BW)
    }
    ROW6(ACC4_STORE)
}

#define ACC2_ZERO(i) __m256i a##i##0 = _mm256_setzero_si256(), a##i##1 = a##i##0;
#define ACC2_STORE(i) _mm256_storeu_si256((__m256i *)(out + i * 16), a##i##0); _mm256_storeu_si256((__m256i *)(out + i * 16 + 8), a##i##1);
#define DOT2_AVX2(i) { __m256i b_ = X_BCAST256(i); a##i##0 = dp_avx2(a##i##0, w0, b_); a##i##1 = dp_avx2(a##i##1, w1, b_); }

/* out[i][j] (i < 6, j < 16) = sum_k w[j][k] * x[i][k], the same on 256 bits. */
T_AVX2 static void i8_micro_avx2(const void *const *xv, const void *wpv, int Kp, int32_t *out) {
    const int16_t *x0 = xv[0], *x1 = xv[1], *x2 = xv[2], *x3 = xv[3], *x4 = xv[4], *x5 = xv[5];
    const int16_t *wp = wpv;
    ROW6(ACC2_ZERO)
    for (int k = 0; k < Kp; k += 2, wp += 32) {
        _mm_prefetch((const char *)wp + 1024, _MM_HINT_T0);
        __m256i w0 = _mm256_loadu_si256((const __m256i *)wp), w1 = _mm256_loadu_si256((const __m256i *)(wp + 16));
        ROW6(DOT2_AVX2)
    }
    ROW6(ACC2_STORE)
}

/* The epilogue of one row of a micro-tile: dot[j] = (float)(acc[j] - comp) * (sx * sw[j]), then
 * gemm_store. sw holds np scales, zero past the panel's last row. The scalar level has no
 * packed path; i8_gemm_rows writes the same formula out. */
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

/* --- streaming path: 4 (AVX2: 2) rows of x against 4 weight rows, dot products along k --- */

/* out[i * 4 + j] = sum_k x[i][k] * (w[j][k] (+ 128 with VNNI)) over K, for i < MR (the
 * caller repeats the last row of x when it has fewer) and j < 4. x is zero-padded to a
 * multiple of 64; the weights are read up to K only (masked, or copied at the tail: reading
 * past the matrix could leave its mapping). pf: prefetch distance in bytes. */
typedef void (*I8RowFn)(const void *const *x, const int8_t *const *w, int K, size_t pf, int32_t *out);

#define COL4(M, i) M(i, 0) M(i, 1) M(i, 2) M(i, 3)
#define ALL16(M) COL4(M, 0) COL4(M, 1) COL4(M, 2) COL4(M, 3)
#define ALL8(M) COL4(M, 0) COL4(M, 1)
#define Z512(i, j) __m512i a##i##j = _mm512_setzero_si512();
#define Z256(i, j) __m256i a##i##j = _mm256_setzero_si256();
#define RED512(i, j) out[i * 4 + j] = _mm512_reduce_add_epi32(a##i##j);
#define RED256(i, j) out[i * 4 + j] = i8_hsum_avx2(a##i##j);

#define STEP_VNNI(j) { _mm_prefetch((const char *)w##j + k + pf, _MM_HINT_T0);                                \
    __m512i v = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, w##j + k), flip);                                \
    a0##j = dp_vnni(a0##j, v, X0); a1##j = dp_vnni(a1##j, v, X1); a2##j = dp_vnni(a2##j, v, X2); a3##j = dp_vnni(a3##j, v, X3); }

T_VNNI static void i8_rows_vnni(const void *const *xv, const int8_t *const *w, int K, size_t pf, int32_t *out) {
    const int8_t *x0 = xv[0], *x1 = xv[1], *x2 = xv[2], *x3 = xv[3], *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    ALL16(Z512)
    for (int k = 0; k < K; k += 64) {
        __mmask64 mk = K - k >= 64 ? ~0ull : (1ull << (K - k)) - 1;
        __m512i X0 = _mm512_loadu_si512(x0 + k), X1 = _mm512_loadu_si512(x1 + k), X2 = _mm512_loadu_si512(x2 + k), X3 = _mm512_loadu_si512(x3 + k);
        STEP_VNNI(0) STEP_VNNI(1) STEP_VNNI(2) STEP_VNNI(3)
    }
    ALL16(RED512)
}

#define STEP_BW(j) { if (!(k & 63)) _mm_prefetch((const char *)w##j + k + pf, _MM_HINT_T0);                   \
    __m512i v = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mk, w##j + k));                                 \
    a0##j = dp_bw(a0##j, v, X0); a1##j = dp_bw(a1##j, v, X1); a2##j = dp_bw(a2##j, v, X2); a3##j = dp_bw(a3##j, v, X3); }

T_AVX512 static void i8_rows_bw(const void *const *xv, const int8_t *const *w, int K, size_t pf, int32_t *out) {
    const int16_t *x0 = xv[0], *x1 = xv[1], *x2 = xv[2], *x3 = xv[3];
    const int8_t *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
    ALL16(Z512)
    for (int k = 0; k < K; k += 32) {
        __mmask32 mk = K - k >= 32 ? ~0u : (1u << (K - k)) - 1;
        __m512i X0 = _mm512_loadu_si512(x0 + k), X1 = _mm512_loadu_si512(x1 + k), X2 = _mm512_loadu_si512(x2 + k), X3 = _mm512_loadu_si512(x3 + k);
        STEP_BW(0) STEP_BW(1) STEP_BW(2) STEP_BW(3)
    }
    ALL16(RED512)
}

T_AVX2 static inline int32_t i8_hsum_avx2(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

T_AVX2 static inline __m128i i8_load16_avx2(const int8_t *p, int n) { /* n < 16: the rest zero */
    if (n >= 16) return _mm_loadu_si128((const __m128i *)p);
    int8_t t[16] = {0};
    memcpy(t, p, (size_t)n);
    return _mm_loadu_si128((const __m128i *)t);
}

#define STEP_AVX2(j) { if (!(k & 63)) _mm_prefetch((const char *)w##j + k + pf, _MM_HINT_T0);                 \
    __m256i v = _mm256_cvtepi8_epi16(i8_load16_avx2(w##j + k, K - k));                                         \
    a0##j = dp_avx2(a0##j, v, X0); a1##j = dp_avx2(a1##j, v, X1); }

T_AVX2 static void i8_rows_avx2(const void *const *xv, const int8_t *const *w, int K, size_t pf, int32_t *out) {
    const int16_t *x0 = xv[0], *x1 = xv[1];
    const int8_t *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
    ALL8(Z256)
    for (int k = 0; k < K; k += 16) {
        __m256i X0 = _mm256_loadu_si256((const __m256i *)(x0 + k)), X1 = _mm256_loadu_si256((const __m256i *)(x1 + k));
        STEP_AVX2(0) STEP_AVX2(1) STEP_AVX2(2) STEP_AVX2(3)
    }
    ALL8(RED256)
}

/* The reference: one row of x (mr = 1) against the 4 weight rows, in plain int32. */
static void i8_rows_scalar(const void *const *xv, const int8_t *const *w, int K, size_t pf, int32_t *out) {
    (void)pf;
    const int8_t *x = xv[0];
    for (int j = 0; j < 4; j++) {
        int32_t d = 0;
        for (int k = 0; k < K; k++) d += (int32_t)x[k] * w[j][k];
        out[j] = d;
    }
}

/* --- levels and the driver --- */

typedef struct {
    int wide;              /* x quantized to int16 (vpmaddwd) instead of int8 */
    int comp;              /* the kernels add 128 to the weights (VNNI): subtract 128 * sum qx */
    int np;                /* packed path: weight rows per panel; 0 = no packed path */
    float (*scale)(const float *x, int K, float act);                                  /* row scale */
    int32_t (*quant)(void *q, int wide, const float *x, int K, int Kp, float s);       /* row values */
    void (*pack)(void *dst, const Tensor *t, int n0, int cnt, int Kp);                 /* a panel */
    void (*micro)(const void *const *x, const void *wp, int Kp, int32_t *out);         /* 6 x np */
    void (*epi)(const Gemm *g, int m, int n0, int cnt, const int32_t *acc, int np, int32_t comp, float sx, const float *sw);
    int mr;                /* streaming path: rows of x per call of rows() */
    I8RowFn rows;          /* streaming path: mr rows x 4 weight rows */
} I8Level;

static void i8_pack_pairs64(void *dst, const Tensor *t, int n0, int cnt, int Kp) { i8_pack_pairs(dst, t, n0, cnt, Kp, 64); }
static void i8_pack_pairs16(void *dst, const Tensor *t, int n0, int cnt, int Kp) { i8_pack_pairs(dst, t, n0, cnt, Kp, 16); }

static const I8Level i8_levels[4] = {
    {0, 0, 0, i8_scale_scalar, i8_quant_scalar, NULL, NULL, NULL, 1, i8_rows_scalar},
    {1, 0, 16, i8_scale_avx2, i8_quant_avx2, i8_pack_pairs16, i8_micro_avx2, i8_epi_avx2, 2, i8_rows_avx2},
    {1, 0, 64, i8_scale_avx512, i8_quant_avx512, i8_pack_pairs64, i8_micro_bw, i8_epi_avx512, 4, i8_rows_bw},
    {0, 1, 64, i8_scale_avx512, i8_quant_avx512, i8_pack_vnni, i8_micro_vnni, i8_epi_avx512, 4, i8_rows_vnni},
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
    int cnt = n1 - n0, np = L->np;
    L->pack(panel, g->w, n0, cnt, a->Kp);
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

/* Weight rows [n0, n1) against all rows of x, streamed as stored: tiles of mr rows of x
 * (the last one repeated when fewer are left) by 4 weight rows (likewise). */
static void i8_gemm_rows(const Gemm *g, const I8Act *a, const I8Level *L, int n0, int n1) {
    size_t rb = (size_t)a->Kp << a->wide;
    for (int m0 = 0; m0 < g->M; m0 += L->mr) {
        const void *x[4];
        int mr = g->M - m0 < L->mr ? g->M - m0 : L->mr;
        for (int i = 0; i < L->mr; i++) x[i] = (const char *)a->q + rb * (size_t)(m0 + (i < mr ? i : mr - 1));
        for (int nb = n0; nb < n1; nb += 4) {
            const int8_t *wr[4];
            int32_t out[16];
            float dot[4];
            int cnt = n1 - nb < 4 ? n1 - nb : 4;
            for (int j = 0; j < 4; j++) wr[j] = i8_wrow(g->w, nb + (j < cnt ? j : cnt - 1));
            L->rows(x, wr, g->K, (size_t)g->K * 4, out);
            for (int i = 0; i < mr; i++) {
                int m = m0 + i;
                for (int j = 0; j < cnt; j++) dot[j] = (float)(out[i * 4 + j] - a->comp[m]) * (a->sx[m] * g->w->scale[nb + j]);
                gemm_store(g, m, nb, dot, cnt);
            }
        }
    }
}

static void i8_quantize_row(const Gemm *g, const I8Act *a, const I8Level *L, int m) {
    const float *x = g->x + (int64_t)m * g->ldx;
    float s = L->scale(x, g->K, g->w->act_scale);
    int32_t sum = L->quant((char *)a->q + ((size_t)m * a->Kp << a->wide), a->wide, x, g->K, a->Kp, s);
    a->sx[m] = s;
    a->comp[m] = L->comp ? 128 * sum : 0;
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
    /* Few rows are quantized before the threads start: one barrier less where the whole GEMM
     * takes microseconds. */
    if (!packed) for (int m = 0; m < g->M; m++) i8_quantize_row(g, &a, L, m);
    #pragma omp parallel if ((int64_t)g->M * g->N * g->K > 100000)
    {
        if (packed) {
            #pragma omp for schedule(static)
            for (int m = 0; m < g->M; m++) i8_quantize_row(g, &a, L, m);
        }
        #pragma omp for schedule(dynamic, 1)
        for (int b = 0; b < nblk; b++) {
            int n0 = b * nb, n1 = n0 + nb < g->N ? n0 + nb : g->N;
            if (packed) i8_gemm_panel(g, &a, L, n0, n1);
            else i8_gemm_rows(g, &a, L, n0, n1);
        }
    }
}

/* ----------------------------------------------------------------------------
 * W4A8 (--compute int8): 4-bit weights against int8 activations, as
 * llama.cpp's Q4_1 x Q8_1 dot products. Each row of x is quantized per group
 * of the weights (the same G inputs): a = max|x| / 127, q = rint(x / a)
 * clamped to [-127, 127] (half to even), xs = a * sum(q); an outlier costs
 * only its own group's precision. A group's dot product with the codes c is
 * an exact integer, sum(q * c) (u8 x s8: vpdpbusd), and for groups in order
 *     y = fmaf(sum(q * c), scale * a, y);  y = fmaf(min, xs, y)
 * which is the dot product of the dequantized activations with the
 * dequantized weights, rounded twice per group. Every path below evaluates
 * exactly that, so results are independent of batch, tiling and threads
 * (tests/test_q4.c checks them against a plain scalar evaluation).
 * Layout: the code bytes of 16 elements hold elements 0,4,8,12,1,5,9,13 in
 * their low nibbles and 2,6,10,14,3,7,11,15 in the high ones (the format
 * above). A group's pieces of up to 64 elements (32 code bytes) unpack to one
 * 64-byte vector: low nibbles in bytes 0..31, high ones in 32..63. x is
 * quantized into that order, 64 bytes per piece, so no kernel permutes.
 * Shapes: the CPU engine's matrices are interleaved once (below) and run
 * 6/4/2/1-row tiles at every M. Matrices in the stored layout (streamed by an
 * offloading policy):
 *   M >= W4_PACK_M: threads take blocks of 32 weight rows, unpack and
 *     transpose them once into [dword][32 rows] order with f32 scales and
 *     mins, then run 6-row micro-tiles down all of x: a 64-byte load feeds 4
 *     inputs of 16 outputs, a broadcast dword of x 4 inputs of a row.
 *   fewer rows (decode): weight rows are read as stored, 16 dot products at a
 *     time (1 row of x by 16 weight rows, 2 by 8, or 4 by 4); the group sums
 *     of the 16 meet in one vector by a transposing tree. */

enum { W4_MR = 6,        /* rows of x per micro-tile (packed path) */
       W4_NB = 32,       /* weight rows per packed block */
       W4_PACK_M = 8 };  /* rows from which the packed path is taken */

int g_w4a8 = 0;          /* --compute int8: 4-bit GEMMs on int8 activations */

/* The quantized rows of x of one GEMM. */
typedef struct {
    int8_t *q;             /* (M, rb) values in code order, 64 bytes per piece, zero past K */
    float *a;              /* (M, ng) group scales */
    float *xs;             /* (M, ng) a * sum(q) per group */
    int ng, pp;            /* groups per row, pieces per group */
    size_t rb;             /* bytes per row of q: ng * pp * 64 */
} W4Act;

static inline const uint8_t *w4_wrow(const Tensor *w, int64_t n) {
    size_t rb = q4_row_bytes(w->cols, w->group);
    if (w->data2 && n >= w->split) return (const uint8_t *)w->data2 + (size_t)(n - w->split) * rb;
    return (const uint8_t *)w->data + (size_t)n * rb;
}

/* Row m of x into A: per group its scale, then 16 values at a time, permuted
 * into code order (8 bytes to the low half of the piece, 8 to the high). */
T_VNNI static void w4_quant_row(const W4Act *A, int m, const float *x, int K, int G) {
    const __m512i perm = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    int8_t *q = A->q + A->rb * (size_t)m;
    memset(q, 0, A->rb);
    for (int g = 0; g < A->ng; g++) {
        int k0 = g * G, n = K - k0 < G ? K - k0 : G;
        __m512 mx = _mm512_setzero_ps();
        for (int e = 0; e < n; e += 16) /* NaN: keeps mx, as i8_scale_avx512 */
            mx = _mm512_max_ps(_mm512_abs_ps(_mm512_maskz_loadu_ps(n - e >= 16 ? 0xFFFF : (__mmask16)((1u << (n - e)) - 1), x + k0 + e)), mx);
        float a = _mm512_reduce_max_ps(mx) / 127.0f;
        int32_t sum = 0;
        if (a > 0) {
            __m512 va = _mm512_set1_ps(a);
            __m512i s = _mm512_setzero_si512();
            for (int e = 0; e < n; e += 16) {
                __m512 t = _mm512_div_ps(_mm512_maskz_loadu_ps(n - e >= 16 ? 0xFFFF : (__mmask16)((1u << (n - e)) - 1), x + k0 + e), va);
                __m512i v = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(t, lo), hi)); /* NaN -> -127 */
                s = _mm512_add_epi32(s, v);
                __m128i b = _mm512_cvtepi32_epi8(_mm512_permutexvar_epi32(perm, v));
                int8_t *p = q + (size_t)(g * A->pp + e / 64) * 64 + (e % 64) / 2;
                _mm_storel_epi64((__m128i *)p, b);
                _mm_storel_epi64((__m128i *)(p + 32), _mm_unpackhi_epi64(b, b));
            }
            sum = _mm512_reduce_add_epi32(s);
        }
        A->a[(size_t)m * A->ng + g] = a;
        A->xs[(size_t)m * A->ng + g] = a * (float)sum;
    }
}

/* The codes of a piece of n elements (n/2 bytes at c) as 64 bytes: low nibbles, high nibbles
 * (the 32 bytes in both halves, the high half shifted by 4 as 16-bit words, then masked). */
T_VNNI static inline __m512i w4_unpack(const uint8_t *c, int n) {
    const __m512i shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    __m256i v = _mm256_maskz_loadu_epi8(n >= 64 ? ~0u : (1u << (n / 2)) - 1, c);
    return _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i64x4(v), shift), _mm512_set1_epi8(15));
}

/* Lane t of the result = the sum of the 16 lanes of d[t]: pairs interleaved by
 * dword, then by qword (4 sums per 128-bit lane), then the 128-bit lanes. */
T_VNNI static inline __m512i w4_hsum16(const __m512i *d) {
    __m512i u[8], v[4];
    for (int i = 0; i < 8; i++) u[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(d[2 * i], d[2 * i + 1]), _mm512_unpackhi_epi32(d[2 * i], d[2 * i + 1]));
    for (int i = 0; i < 4; i++) v[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(u[2 * i], u[2 * i + 1]), _mm512_unpackhi_epi64(u[2 * i], u[2 * i + 1]));
    __m512i a = _mm512_add_epi32(_mm512_shuffle_i32x4(v[0], v[1], 0x88), _mm512_shuffle_i32x4(v[0], v[1], 0xDD));
    __m512i b = _mm512_add_epi32(_mm512_shuffle_i32x4(v[2], v[3], 0x88), _mm512_shuffle_i32x4(v[2], v[3], 0xDD));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(a, b, 0x88), _mm512_shuffle_i32x4(a, b, 0xDD));
}

/* out[t] (t = i * 16/R + j) = row m0 + i of x (the last of mr repeated) . weight row w[j]. */
#define W4_ROWS(R)                                                                                       \
T_VNNI static void w4_rows_##R(const W4Act *A, int m0, int mr, const uint8_t *const *w, int G, float *out) { \
    enum { NJ = 16 / R };                                                                              \
    const int8_t *x[R];                                                                                \
    const float *av[R], *xv[R];                                                                        \
    for (int i = 0; i < R; i++) {                                                                      \
        size_t m = (size_t)(m0 + (i < mr ? i : mr - 1));                                               \
        x[i] = A->q + A->rb * m, av[i] = A->a + m * A->ng, xv[i] = A->xs + m * A->ng;                  \
    }                                                                                                  \
    size_t bs = 4 + (size_t)G / 2;                                                                     \
    /* lane t's weight row as a byte offset from w[0] (gathers its scale and min), and its row  \
     * of x as an offset into A->a and A->xs; rows too far apart (a split tensor) are copied */  \
    int32_t wo[16], xo[16];                                                                            \
    bool near = true;                                                                                  \
    for (int t = 0; t < 16; t++) {                                                                     \
        ptrdiff_t d = w[t % NJ] - w[0];                                                                \
        near = near && d > -(1L << 30) && d < (1L << 30);                                              \
        wo[t] = (int32_t)d, xo[t] = (int32_t)(av[t / NJ] - av[0]);                                     \
    }                                                                                                  \
    __m512i wov = _mm512_loadu_si512(wo), xov = _mm512_loadu_si512(xo);                                \
    __m512 acc = _mm512_setzero_ps();                                                                  \
    for (int g = 0; g < A->ng; g++) {                                                                  \
        __m512i d[16];                                                                                 \
        for (int t = 0; t < 16; t++) d[t] = _mm512_setzero_si512();                                    \
        for (int p = 0; p < A->pp; p++) {                                                              \
            int e = 64 * p, n = G - e < 64 ? G - e : 64;                                               \
            __m512i xq[R];                                                                             \
            for (int i = 0; i < R; i++) xq[i] = _mm512_loadu_si512(x[i] + (size_t)(g * A->pp + p) * 64); \
            for (int j = 0; j < NJ; j++) {                                                             \
                const uint8_t *c = w[j] + g * bs + 4 + e / 2;                                          \
                _mm_prefetch((const char *)c + 4 * bs, _MM_HINT_T0);                                   \
                __m512i u = w4_unpack(c, n);                                                           \
                for (int i = 0; i < R; i++) d[i * NJ + j] = _mm512_dpbusd_epi32(d[i * NJ + j], u, xq[i]); \
            }                                                                                          \
        }                                                                                              \
        __m512i smv;                                                                                   \
        if (near) smv = _mm512_i32gather_epi32(wov, w[0] + g * bs, 1);                                 \
        else {                                                                                         \
            uint32_t sm[16];                                                                           \
            for (int t = 0; t < 16; t++) sm[t] = (uint32_t)ld32(w[t % NJ] + g * bs);                   \
            smv = _mm512_loadu_si512(sm);                                                              \
        }                                                                                              \
        __m512 s = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(smv));                                        \
        __m512 mn = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(smv, 16)));                \
        __m512 a = R == 1 ? _mm512_set1_ps(av[0][g]) : _mm512_i32gather_ps(xov, av[0] + g, 4);         \
        __m512 xs = R == 1 ? _mm512_set1_ps(xv[0][g]) : _mm512_i32gather_ps(xov, xv[0] + g, 4);        \
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(w4_hsum16(d)), _mm512_mul_ps(s, a), acc);             \
        acc = _mm512_fmadd_ps(mn, xs, acc);                                                            \
    }                                                                                                  \
    _mm512_storeu_ps(out, acc);                                                                        \
}
W4_ROWS(1)
W4_ROWS(2)
W4_ROWS(4)

/* Block of weight rows n0 .. n0 + cnt - 1 (cnt <= 32) into dst: per group the
 * f32 scales and mins of the 32 rows, then each piece's dwords d (those
 * holding codes: [0, n/8) and [8, 8 + n/8)) as dst[d][row] (rows past cnt:
 * codes, scale and min 0). Returns the bytes written. */
T_VNNI static size_t w4_pack(uint8_t *dst, const Tensor *t, int n0, int cnt, const W4Act *A) {
    const uint8_t *r[W4_NB];
    int G = t->group;
    size_t bs = 4 + (size_t)G / 2;
    for (int j = 0; j < W4_NB; j++) r[j] = j < cnt ? w4_wrow(t, n0 + j) : NULL;
    uint8_t *p = dst;
    for (int g = 0; g < A->ng; g++) {
        float *s = (float *)p, *mn = s + W4_NB;
        for (int j = 0; j < W4_NB; j++) {
            uint16_t h[2] = {0, 0};
            if (r[j]) memcpy(h, r[j] + g * bs, 4);
            s[j] = f16_to_f32(h[0]), mn[j] = f16_to_f32(h[1]);
        }
        p += sizeof(float) * 2 * W4_NB;
        for (int q = 0; q < A->pp; q++) {
            int e = 64 * q, n = G - e < 64 ? G - e : 64;
            for (int j0 = 0; j0 < W4_NB; j0 += 16) {
                __m512i u[16];
                for (int j = 0; j < 16; j++) u[j] = r[j0 + j] ? w4_unpack(r[j0 + j] + g * bs + 4 + e / 2, n) : _mm512_setzero_si512();
                transpose16_epi32(u);
                uint32_t *o = (uint32_t *)p + j0;
                for (int h = 0; h < 2; h++)
                    for (int d = 8 * h; d < 8 * h + n / 8; d++, o += W4_NB) _mm512_storeu_si512(o, u[d]);
            }
            p += (size_t)n / 4 * 4 * W4_NB;
        }
    }
    return (size_t)(p - dst);
}

/* out[i][j] (i < W4_MR, j < 32) = row rows[i] of x . packed weight row j. */
T_VNNI static void w4_micro(const W4Act *A, const int *rows, const uint8_t *pk, int G, float *out) {
    __m512 f[W4_MR][2];
    const int8_t *x[W4_MR];
    for (int i = 0; i < W4_MR; i++) f[i][0] = f[i][1] = _mm512_setzero_ps(), x[i] = A->q + A->rb * (size_t)rows[i];
    for (int g = 0; g < A->ng; g++) {
        const float *s = (const float *)pk, *mn = s + W4_NB;
        pk += sizeof(float) * 2 * W4_NB;
        __m512i d[W4_MR][2];
        for (int i = 0; i < W4_MR; i++) d[i][0] = d[i][1] = _mm512_setzero_si512();
        for (int q = 0; q < A->pp; q++) {
            int n = G - 64 * q < 64 ? G - 64 * q : 64;
            size_t base = (size_t)(g * A->pp + q) * 64;
            for (int h = 0; h < 2; h++)
                for (int dw = 8 * h; dw < 8 * h + n / 8; dw++, pk += 4 * W4_NB) {
                    _mm_prefetch((const char *)pk + 1024, _MM_HINT_T0);
                    __m512i w0 = _mm512_loadu_si512(pk), w1 = _mm512_loadu_si512(pk + 64);
                    for (int i = 0; i < W4_MR; i++) {
                        __m512i b = _mm512_set1_epi32(ld32(x[i] + base + 4 * dw));
                        d[i][0] = _mm512_dpbusd_epi32(d[i][0], w0, b);
                        d[i][1] = _mm512_dpbusd_epi32(d[i][1], w1, b);
                    }
                }
        }
        __m512 s0 = _mm512_loadu_ps(s), s1 = _mm512_loadu_ps(s + 16), m0 = _mm512_loadu_ps(mn), m1 = _mm512_loadu_ps(mn + 16);
        for (int i = 0; i < W4_MR; i++) {
            size_t ag = (size_t)rows[i] * A->ng + g;
            __m512 a = _mm512_set1_ps(A->a[ag]), xs = _mm512_set1_ps(A->xs[ag]);
            f[i][0] = _mm512_fmadd_ps(m0, xs, _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[i][0]), _mm512_mul_ps(s0, a), f[i][0]));
            f[i][1] = _mm512_fmadd_ps(m1, xs, _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[i][1]), _mm512_mul_ps(s1, a), f[i][1]));
        }
    }
    for (int i = 0; i < W4_MR; i++) _mm512_storeu_ps(out + i * W4_NB, f[i][0]), _mm512_storeu_ps(out + i * W4_NB + 16, f[i][1]);
}

/* --- the interleaved layout: decode without a reduction tree ---
 * The CPU engine under --compute int8 stores each 4-bit layer matrix as blocks
 * of 32 rows; per group: the 32 f16 scales, the 32 f16 mins, then for each
 * piece's code dwords d (those holding codes: n/8 of them) the dword d of the
 * 32 rows (two 64-byte vectors). Dword d's low nibbles multiply x's bytes
 * 4d..4d+3 of the piece, its high nibbles bytes 32+4d..: the storage order, so
 * interleaving only transposes dwords, and the block keeps the bytes of its 32
 * rows (rows past N are zero). A 64-byte load then feeds 8 inputs of 16
 * outputs to every row of x, with no per-call packing and no horizontal sums:
 * the same integers and the same epilogue as the paths above, so the same bits. */

static size_t w4i_block_bytes(int64_t K, int G) {
    return (size_t)((K + G - 1) / G) * (128 + 16 * (size_t)G);
}

/* Block b (rows 32b ..) of t into dst. */
T_VNNI static void w4i_pack_block(uint8_t *dst, const Tensor *t, int64_t b) {
    int G = t->group, ng = (int)((t->cols + G - 1) / G), pp = (G + 63) / 64;
    size_t bs = 4 + (size_t)G / 2;
    const uint8_t *r[W4_NB];
    for (int j = 0; j < W4_NB; j++) r[j] = b * W4_NB + j < t->rows ? w4_wrow(t, b * W4_NB + j) : NULL;
    uint8_t *p = dst;
    for (int g = 0; g < ng; g++) {
        uint16_t *sm = (uint16_t *)p;
        for (int j = 0; j < W4_NB; j++) {
            uint16_t h[2] = {0, 0};
            if (r[j]) memcpy(h, r[j] + g * bs, 4);
            sm[j] = h[0], sm[W4_NB + j] = h[1];
        }
        p += 4 * W4_NB;
        for (int q = 0; q < pp; q++) {
            int e = 64 * q, n = G - e < 64 ? G - e : 64;
            for (int j0 = 0; j0 < W4_NB; j0 += 16) {
                __m512i u[16];
                for (int j = 0; j < 16; j++)
                    u[j] = r[j0 + j] ? _mm512_castsi256_si512(_mm256_maskz_loadu_epi8(n >= 64 ? ~0u : (1u << (n / 2)) - 1, r[j0 + j] + g * bs + 4 + e / 2))
                                     : _mm512_setzero_si512();
                transpose16_epi32(u);
                for (int d = 0; d < n / 8; d++) _mm512_storeu_si512(p + (size_t)d * 4 * W4_NB + 4 * j0, u[d]);
            }
            p += (size_t)n / 8 * 4 * W4_NB;
        }
    }
}

Tensor w4_interleave(const Tensor *t) {
    size_t bb = w4i_block_bytes(t->cols, t->group);
    int64_t nblk = (t->rows + W4_NB - 1) / W4_NB;
    uint8_t *dst = check_malloc(bb * (size_t)nblk, "4-bit weights (W4A8 layout)");
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblk; b++) w4i_pack_block(dst + bb * (size_t)b, t, b);
    Tensor o = *t;
    o.data = dst, o.data2 = NULL, o.split = 0, o.w4i = 1;
    return o;
}

/* out[i][j] (i < MR, j < 32) = row rows[i] of x . row j of an interleaved block. */
#define W4I_MICRO(MR)                                                                                    \
T_VNNI static void w4i_micro_##MR(const W4Act *A, const int *rows, const uint8_t *pk, int G, float *out) { \
    const __m512i nib = _mm512_set1_epi8(15);                                                          \
    __m512 f[MR][2];                                                                                   \
    const int8_t *x[MR];                                                                               \
    for (int i = 0; i < MR; i++) f[i][0] = f[i][1] = _mm512_setzero_ps(), x[i] = A->q + A->rb * (size_t)rows[i]; \
    for (int g = 0; g < A->ng; g++) {                                                                  \
        __m512 s0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)pk));                          \
        __m512 s1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(pk + 32)));                   \
        __m512 m0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(pk + 64)));                   \
        __m512 m1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(pk + 96)));                   \
        pk += 4 * W4_NB;                                                                               \
        __m512i d[MR][2];                                                                              \
        for (int i = 0; i < MR; i++) d[i][0] = d[i][1] = _mm512_setzero_si512();                       \
        for (int q = 0; q < A->pp; q++) {                                                              \
            int n = G - 64 * q < 64 ? G - 64 * q : 64;                                                 \
            size_t base = (size_t)(g * A->pp + q) * 64;                                                \
            for (int dw = 0; dw < n / 8; dw++, pk += 4 * W4_NB) {                                      \
                _mm_prefetch((const char *)pk + 1024, _MM_HINT_T0);                                    \
                _mm_prefetch((const char *)pk + 1024 + 64, _MM_HINT_T0);                               \
                __m512i w0 = _mm512_loadu_si512(pk), w1 = _mm512_loadu_si512(pk + 64);                 \
                __m512i l0 = _mm512_and_si512(w0, nib), h0 = _mm512_and_si512(_mm512_srli_epi16(w0, 4), nib); \
                __m512i l1 = _mm512_and_si512(w1, nib), h1 = _mm512_and_si512(_mm512_srli_epi16(w1, 4), nib); \
                for (int i = 0; i < MR; i++) {                                                         \
                    __m512i bl = _mm512_set1_epi32(ld32(x[i] + base + 4 * dw));                        \
                    __m512i bh = _mm512_set1_epi32(ld32(x[i] + base + 32 + 4 * dw));                   \
                    d[i][0] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(d[i][0], l0, bl), h0, bh);       \
                    d[i][1] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(d[i][1], l1, bl), h1, bh);       \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
        for (int i = 0; i < MR; i++) {                                                                 \
            size_t ag = (size_t)rows[i] * A->ng + g;                                                   \
            __m512 a = _mm512_set1_ps(A->a[ag]), xs = _mm512_set1_ps(A->xs[ag]);                       \
            f[i][0] = _mm512_fmadd_ps(m0, xs, _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[i][0]), _mm512_mul_ps(s0, a), f[i][0])); \
            f[i][1] = _mm512_fmadd_ps(m1, xs, _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[i][1]), _mm512_mul_ps(s1, a), f[i][1])); \
        }                                                                                              \
    }                                                                                                  \
    for (int i = 0; i < MR; i++) _mm512_storeu_ps(out + i * W4_NB, f[i][0]), _mm512_storeu_ps(out + i * W4_NB + 16, f[i][1]); \
}
W4I_MICRO(1)
W4I_MICRO(2)
W4I_MICRO(4)
W4I_MICRO(6)

/* Weight block b (interleaved, at pk) against all rows of x: 6-row tiles, the rest exactly by 4, 2, 1. */
static void w4i_block(const Gemm *g, const W4Act *A, const uint8_t *pk, int b) {
    const Tensor *w = g->w;
    int n0 = b * W4_NB, cnt = g->N - n0 < W4_NB ? g->N - n0 : W4_NB;
    float out[6 * W4_NB];
    for (int m0 = 0; m0 < g->M;) {
        int left = g->M - m0, mr = left >= 6 ? 6 : left >= 4 ? 4 : left >= 2 ? 2 : 1, rows[6];
        for (int i = 0; i < mr; i++) rows[i] = m0 + i;
        if (mr == 6) w4i_micro_6(A, rows, pk, w->group, out);
        else if (mr == 4) w4i_micro_4(A, rows, pk, w->group, out);
        else if (mr == 2) w4i_micro_2(A, rows, pk, w->group, out);
        else w4i_micro_1(A, rows, pk, w->group, out);
        for (int i = 0; i < mr; i++) gemm_store(g, m0 + i, n0, out + i * W4_NB, cnt);
        m0 += mr;
    }
}

/* t to the interleaved layout; its old bytes go: a native file's mapped pages
 * are dropped, --compress-weight's buffer freed. */
static void w4_replace(Model *m, Tensor *t) {
    Tensor o = w4_interleave(t);
    int owned = -1;
    for (int k = 0; k < m->n_q4; k++) if (m->q4[k] == t->data) owned = k;
    if (owned >= 0) free(m->q4[owned]), m->q4[owned] = (void *)o.data;
    else {
        model_own_add(m, (void *)o.data);
        uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE), a = (uintptr_t)t->data, e = a + q4_row_bytes(t->cols, t->group) * (size_t)t->rows;
        a = (a + pg - 1) / pg * pg, e = e / pg * pg;
        if (e > a) madvise((void *)a, e - a, MADV_DONTNEED); /* a read-only mapping: refaults from the file if touched */
    }
    *t = o;
}

/* The CPU engine's 4-bit matrices to the interleaved layout, one at a time. A
 * 4-bit lm_head that is the embedding too (whose rows the embedding reads as
 * stored) gets an interleaved copy: a third of OPT-125m's decode bytes, 8% of
 * OPT-1.3b's. */
void model_w4_interleave(Model *m) {
    Tensor *h = &m->lm_head;
    if (h->dtype == DT_Q4 && !h->w4i && !h->data2 && h->data) {
        if (h->data != m->embed.data) w4_replace(m, h);
        else {
            Tensor o = w4_interleave(h);
            model_own_add(m, (void *)o.data);
            *h = o;
        }
    }
    for (int l = 0; l < m->cfg.n_layer; l++) {
        Layer *L = &m->layers[l];
        Tensor *lm[] = {&L->q, &L->k, &L->v, &L->o, &L->fc1, &L->fc2};
        for (int i = 0; i < 6; i++)
            if (lm[i]->dtype == DT_Q4 && !lm[i]->w4i && !lm[i]->data2 && lm[i]->data) w4_replace(m, lm[i]);
    }
}

void gemm_w4a8(const Gemm *g) {
    if (g->M <= 0 || g->N <= 0) return;
    const Tensor *w = g->w;
    check(w->dtype == DT_Q4 && w->cols == g->K && w->group % 16 == 0, "gemm_w4a8 on a tensor that is not 4-bit [N, K]");
    check(g_simd == SIMD_AVX512 && g_vnni, "--compute int8 without AVX-512 VNNI");
    int G = w->group, M = g->M;
    W4Act A = {.ng = (g->K + G - 1) / G, .pp = (G + 63) / 64};
    A.rb = (size_t)A.ng * A.pp * 64;
    static _Thread_local char *buf; /* the quantized activations, kept per calling thread */
    static _Thread_local size_t buf_cap;
    size_t qb = A.rb * (size_t)M, need = qb + 2 * sizeof(float) * (size_t)M * A.ng;
    if (need > buf_cap) { free(buf); buf = check_malloc(need, "int8 activations"); buf_cap = need; }
    A.q = (int8_t *)buf, A.a = (float *)(buf + qb), A.xs = A.a + (size_t)M * A.ng;
    bool packed = M >= W4_PACK_M && !w->w4i;
    int nb = packed || w->w4i ? W4_NB : 64, nblk = (g->N + nb - 1) / nb;
    if (M < W4_PACK_M) for (int m = 0; m < M; m++) w4_quant_row(&A, m, g->x + (int64_t)m * g->ldx, g->K, G); /* one barrier less */
    #pragma omp parallel if ((int64_t)M * g->N * g->K > 100000)
    {
        if (M >= W4_PACK_M) {
            #pragma omp for schedule(static)
            for (int m = 0; m < M; m++) w4_quant_row(&A, m, g->x + (int64_t)m * g->ldx, g->K, G);
        }
        static _Thread_local uint8_t *panel;
        static _Thread_local size_t panel_cap;
        size_t pneed = (size_t)A.ng * (sizeof(float) * 2 * W4_NB + (size_t)A.pp * 64 * W4_NB);
        if (packed && pneed > panel_cap) { free(panel); panel = check_malloc(pneed, "a 4-bit weight panel"); panel_cap = pneed; }
        #pragma omp for schedule(dynamic, 1)
        for (int b = 0; b < nblk; b++) {
            int n0 = b * nb, cnt = g->N - n0 < nb ? g->N - n0 : nb;
            float out[W4_MR * W4_NB];
            if (w->w4i) { w4i_block(g, &A, (const uint8_t *)w->data + w4i_block_bytes(g->K, G) * (size_t)b, b); continue; }
            if (packed) {
                w4_pack(panel, w, n0, cnt, &A);
                for (int m0 = 0; m0 < M; m0 += W4_MR) {
                    int rows[W4_MR], mr = M - m0 < W4_MR ? M - m0 : W4_MR;
                    for (int i = 0; i < W4_MR; i++) rows[i] = m0 + (i < mr ? i : mr - 1);
                    w4_micro(&A, rows, panel, G, out);
                    for (int i = 0; i < mr; i++) gemm_store(g, m0 + i, n0, out + i * W4_NB, cnt);
                }
                continue;
            }
            int R = M >= 3 ? 4 : M, nj = 16 / R;
            for (int m0 = 0; m0 < M; m0 += R) {
                int mr = M - m0 < R ? M - m0 : R;
                for (int j0 = 0; j0 < cnt; j0 += nj) {
                    const uint8_t *wr[16];
                    int c = cnt - j0 < nj ? cnt - j0 : nj;
                    for (int j = 0; j < nj; j++) wr[j] = w4_wrow(w, n0 + j0 + (j < c ? j : c - 1));
                    if (R == 1) w4_rows_1(&A, m0, mr, wr, G, out);
                    else if (R == 2) w4_rows_2(&A, m0, mr, wr, G, out);
                    else w4_rows_4(&A, m0, mr, wr, G, out);
                    for (int i = 0; i < mr; i++) gemm_store(g, m0 + i, n0 + j0, out + i * nj, c);
                }
            }
        }
    }
}

/* ----------------------------------------------------------------------------
 * SmoothQuant conversion (`opt convert --w8a8`), after Xiao et al. (ICML'23) and
 * mit-han-lab/smoothquant:
 *
 * 1. Calibration text to samples. A file with at least --calib-samples non-empty lines gives
 *    one sample per line (the first that many, in file order); any other file is one text,
 *    tokenized whole and cut into consecutive samples. Every sample is BOS (id 2) plus at most
 *    --calib-len - 1 tokens, as the reference tokenizes each document alone and truncates it.
 * 2. Pass 1: the float model over the samples, batch by batch; an Observer on every linear
 *    layer's input keeps the per-channel absolute maximum over all tokens of all samples
 *    ("the maximum of maximums"). q, k and v share one input.
 * 3. Smoothing (pre-LayerNorm models): for the LayerNorm -> {q, k, v} and LayerNorm -> fc1
 *    points, s_j = max|X_j|^alpha / max|W_j|^(1-alpha), the weight maximum taken over the
 *    columns j of all the linears sharing the input, clamped to >= 1e-5 (and s itself too), as
 *    smooth.py does. 1/s goes into the LayerNorm's weight and bias, s into the weights' input
 *    columns: exact in real arithmetic, since the LayerNorm output feeds only those linears.
 *    The smoothed weights are stored in the checkpoint's own dtype (the reference smooths its
 *    fp16 model in place, in fp16). out_proj and fc2 are not smoothed (the authors: smoothing
 *    QKV and fc1 suffices for OPT). Post-LN models (opt-350m) cannot fold, and get plain W8A8.
 * 4. --w8a8-static (O3): pass 2 over the smoothed float model records each linear's per-tensor
 *    input maximum; act_scale = max / 127 (q, k and v share it). The smoothed copies of every
 *    layer's q, k, v and fc1 are held until then (about 2/3 of the model's bytes); the dynamic
 *    default quantizes layer by layer and holds one layer's.
 * 5. Every linear layer's weights (q, k, v, out_proj, fc1, fc2) to int8 per output channel:
 *    scale = row absmax / 127, q = rint(w / scale) (half to even), clamped to [-127, 127].
 * The statistics go into the file as extra f32 tensors (users ask for them):
 *    layers.N.self_attn.q_proj.act_max, .out_proj.act_max, layers.N.fc1.act_max, .fc2.act_max:
 *        per-channel input maxima of pass 1 (before smoothing); q_proj's stands for k and v;
 *    layers.N.self_attn.q_proj.smooth, layers.N.fc1.smooth: the factors s (pre-LN models).
 * Two environment variables serve tests and experiments: OPT_SQ_NO_SMOOTH=1 quantizes without
 * smoothing (naive W8A8: the baseline SmoothQuant is measured against; note that alpha = 0 is
 * not that, it still divides by the weight maxima), OPT_SQ_NO_QUANT=1 stops after the folding
 * (float weights, smoothed: the model must compute what it computed before). */

#include <errno.h>
#include <unistd.h>

typedef struct {
    int *ids;              /* (n) token ids, BOS first */
    int n;
} SqSample;

typedef struct {
    int n_layer;           /* layers */
    int cols[4];           /* input width per OBS_* point: hidden, hidden, hidden, ffn */
    float *mx[4];          /* (n_layer, cols) per-channel absmax of the inputs, per OBS_* point */
} SqStats;

static bool env_on(const char *name) {
    const char *e = getenv(name);
    return e && *e && strcmp(e, "0");
}

/* The whole file; dies naming it when it is missing or unreadable. */
static char *sq_read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die("%s: %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0, r;
    char *buf = check_malloc(cap + 1, "calibration text");
    while ((r = fread(buf + n, 1, cap - n, f)) > 0)
        if ((n += r) == cap) buf = check_realloc(buf, (cap *= 2) + 1, "calibration text");
    if (ferror(f)) die("%s: read error: %s", path, strerror(errno));
    fclose(f);
    buf[n] = 0;
    *len = n;
    return buf;
}

static bool sq_blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n' && s[i] != '\v' && s[i] != '\f') return false;
    return true;
}

/* Cuts n bytes of UTF-8 back to a character boundary. */
static size_t sq_utf8_cut(const char *s, size_t n) {
    while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80) n--;
    return n;
}

/* BOS + the first len - 1 tokens of text[0..n): at most len * 32 bytes are tokenized. */
static SqSample sq_sample(const Tokenizer *tok, int bos, const char *text, size_t n, int len, int **tmp, int *tcap) {
    size_t lim = (size_t)len * 32;
    if (n > lim) n = sq_utf8_cut(text, lim);
    int k = tok_encode(tok, text, n, tmp, tcap);
    if (k > len - 1) k = len - 1;
    SqSample s = {check_malloc(sizeof(int) * (size_t)(k + 1), "calibration tokens"), k + 1};
    s.ids[0] = bos;
    memcpy(s.ids + 1, *tmp, sizeof(int) * (size_t)k);
    return s;
}

/* Reads and checks the calibration text and cuts it into samples (see the section comment). */
static SqSample *sq_samples(const char *path, const Tokenizer *tok, const Config *c, const SqOpts *o, int *n_out, bool *lines_out) {
    int bos = c->bos;
    size_t len;
    char *text = sq_read_file(path, &len);
    if (!len) die("%s: empty calibration file", path);
    size_t ok = utf8_valid_prefix(text, len);
    if (ok < len) {
        int line = 1;
        size_t start = 0;
        for (size_t i = 0; i < ok; i++) if (text[i] == '\n') { line++; start = i + 1; }
        die("%s:%d: invalid UTF-8 at byte %zu of the line (calibration text must be UTF-8)", path, line, ok - start + 1);
    }
    if (sq_blank(text, len)) die("%s: no text in the calibration file (only whitespace)", path);
    int nonblank = 0;
    for (size_t i = 0; i < len;) {
        size_t e = i;
        while (e < len && text[e] != '\n') e++;
        nonblank += !sq_blank(text + i, e - i);
        i = e + 1;
    }
    bool lines = nonblank >= o->samples;
    int cap = lines ? o->samples : 64, n = 0, *tmp = NULL, tcap = 0;
    SqSample *s = check_malloc(sizeof(SqSample) * (size_t)cap, "calibration samples");
    if (lines) {
        for (size_t i = 0; i < len && n < o->samples;) {
            size_t e = i;
            while (e < len && text[e] != '\n') e++;
            size_t l = e - i;
            if (l && text[i + l - 1] == '\r') l--; /* CRLF files */
            if (!sq_blank(text + i, l)) s[n++] = sq_sample(tok, bos, text + i, l, o->len, &tmp, &tcap);
            i = e + 1;
        }
    } else { /* one token stream, cut; only as much text as the samples can use is tokenized */
        size_t lim = (size_t)o->samples * (size_t)o->len * 32, use = len;
        if (use > lim) use = sq_utf8_cut(text, lim);
        int k = tok_encode(tok, text, use, &tmp, &tcap), step = o->len - 1;
        for (int t = 0; t < k && n < o->samples; t += step) {
            int cnt = k - t < step ? k - t : step;
            if (n == cap) s = check_realloc(s, sizeof(SqSample) * (size_t)(cap *= 2), "calibration samples");
            s[n].ids = check_malloc(sizeof(int) * (size_t)(cnt + 1), "calibration tokens");
            s[n].ids[0] = bos;
            memcpy(s[n].ids + 1, tmp + t, sizeof(int) * (size_t)cnt);
            s[n++].n = cnt + 1;
        }
    }
    free(tmp);
    free(text);
    if (!n) die("%s: the calibration text gives no tokens", path);
    for (int i = 0; i < n; i++) /* a model with a smaller vocabulary than the tokenizer's */
        for (int t = 0; t < s[i].n; t++)
            if (s[i].ids[t] < 0 || s[i].ids[t] >= c->vocab)
                die("%s: calibration sample %d has token %d, outside the model's vocabulary of %d", path, i + 1, s[i].ids[t], c->vocab);
    *n_out = n;
    *lines_out = lines;
    return s;
}

/* The Observer: per-channel absmax of a linear layer's input rows (NaNs ignored). */
static void sq_observe(void *ctx, int layer, int which, const float *x, int rows, int cols) {
    SqStats *st = ctx;
    check(cols == st->cols[which], "observer: %d columns at point %d, expected %d", cols, which, st->cols[which]);
    float *mx = st->mx[which] + (size_t)layer * (size_t)cols;
    #pragma omp parallel for schedule(static) if ((int64_t)rows * cols > 65536)
    for (int j0 = 0; j0 < cols; j0 += 256) {
        int j1 = j0 + 256 < cols ? j0 + 256 : cols;
        for (int r = 0; r < rows; r++) {
            const float *xr = x + (size_t)r * (size_t)cols;
            for (int j = j0; j < j1; j++) { float a = fabsf(xr[j]); mx[j] = a > mx[j] ? a : mx[j]; }
        }
    }
}

static void sq_stats_init(SqStats *st, const Config *c) {
    st->n_layer = c->n_layer;
    st->cols[OBS_QKV] = st->cols[OBS_O] = st->cols[OBS_FC1] = c->hidden;
    st->cols[OBS_FC2] = c->ffn;
    for (int p = 0; p < 4; p++) st->mx[p] = check_calloc(sizeof(float) * (size_t)c->n_layer * (size_t)st->cols[p], "calibration statistics");
}

static void sq_stats_free(SqStats *st) { for (int p = 0; p < 4; p++) free(st->mx[p]); }

/* The largest value of point p in layer l over its channels: the per-tensor input maximum. */
static float sq_stats_tensor_max(const SqStats *st, int l, int p) {
    const float *v = st->mx[p] + (size_t)l * (size_t)st->cols[p];
    float m = 0;
    for (int j = 0; j < st->cols[p]; j++) m = v[j] > m ? v[j] : m;
    return m;
}

/* Runs the model over the samples (several sequences per step, about 512 rows) with the
 * observer recording into st; returns the tokens seen. */
static int64_t sq_calibrate(const Model *m, const SqSample *smp, int ns, SqStats *st, const char *what) {
    const Config *c = &m->cfg;
    int cap = 1;
    for (int i = 0; i < ns; i++) cap = smp[i].n > cap ? smp[i].n : cap;
    int slots = 512 / cap > 1 ? 512 / cap : 1;
    if (slots > ns) slots = ns;
    KVCache kv;
    kv_init(&kv, c, slots, cap, DT_F32, 64);
    Scratch s;
    scratch_init(&s, c, slots * cap, cap);
    s.observe = sq_observe;
    s.observe_ctx = st;
    int *tok = check_malloc(sizeof(int) * 3 * (size_t)slots * (size_t)cap, "calibration step"), *slot = tok + slots * cap, *pos = slot + slots * cap;
    int64_t total = 0;
    bool tty = isatty(2);
    for (int i0 = 0; i0 < ns; i0 += slots) {
        int n = 0;
        for (int i = i0; i < i0 + slots && i < ns; i++)
            for (int t = 0; t < smp[i].n; t++, n++) { tok[n] = smp[i].ids[t]; slot[n] = i - i0; pos[n] = t; }
        Step stp = {.n = n, .tok = tok, .slot = slot, .pos = pos};
        model_forward(m, &kv, &stp, &s);
        total += n;
        if (tty) fprintf(stderr, "\ropt: %s: %d/%d samples", what, i0 + slots < ns ? i0 + slots : ns, ns);
    }
    if (tty) fputc('\n', stderr);
    free(tok);
    scratch_free(&s);
    kv_free(&kv);
    return total;
}

/* One row of a float matrix as f32 (rows [split, N) of a split tensor are at data2). */
static void sq_row_f32(const Tensor *t, int64_t r, float *out) {
    size_t rb = dtype_bytes(t->dtype, t->cols);
    const char *p = t->data2 && r >= t->split ? (const char *)t->data2 + rb * (size_t)(r - t->split) : (const char *)t->data + rb * (size_t)r;
    for (int64_t k = 0; k < t->cols; k++)
        out[k] = t->dtype == DT_F32 ? ((const float *)p)[k] : t->dtype == DT_F16 ? f16_to_f32(((const uint16_t *)p)[k]) : bf16_to_f32(((const uint16_t *)p)[k]);
}

/* colmax[j] = max(colmax[j], max_n |W[n][j]|). */
static void sq_colmax(const Tensor *t, float *colmax) {
    #pragma omp parallel
    {
        float *row = check_malloc(sizeof(float) * (size_t)t->cols, "a row"), *mx = check_calloc(sizeof(float) * (size_t)t->cols, "a row");
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < t->rows; r++) {
            sq_row_f32(t, r, row);
            for (int64_t j = 0; j < t->cols; j++) { float a = fabsf(row[j]); mx[j] = a > mx[j] ? a : mx[j]; }
        }
        #pragma omp critical
        for (int64_t j = 0; j < t->cols; j++) colmax[j] = mx[j] > colmax[j] ? mx[j] : colmax[j];
        free(row);
        free(mx);
    }
}

/* s_j = max|X_j|^alpha / max(max|W_j|, 1e-5)^(1 - alpha), at least 1e-5. */
static void sq_factors(float *s, const float *act, const float *wmax, int n, float alpha) {
    for (int j = 0; j < n; j++) {
        double w = wmax[j] > 1e-5f ? wmax[j] : 1e-5;
        double v = pow((double)act[j], alpha) / pow(w, 1.0 - alpha);
        s[j] = (float)(v > 1e-5 ? v : 1e-5);
    }
}

/* The smoothed copy of t (column j times s[j], in f32, stored in t's dtype) into dst; t then
 * points at it. */
static void sq_smooth_matrix(Tensor *t, const float *s, void *dst) {
    size_t rb = dtype_bytes(t->dtype, t->cols);
    #pragma omp parallel
    {
        float *row = check_malloc(sizeof(float) * (size_t)t->cols, "a row");
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < t->rows; r++) {
            sq_row_f32(t, r, row);
            char *o = (char *)dst + rb * (size_t)r;
            for (int64_t j = 0; j < t->cols; j++) {
                float v = row[j] * s[j];
                if (t->dtype == DT_F32) ((float *)o)[j] = v;
                else ((uint16_t *)o)[j] = t->dtype == DT_F16 ? f32_to_f16(v) : f32_to_bf16(v);
            }
        }
        free(row);
    }
    t->data = dst;
    t->data2 = NULL;
    t->split = 0;
}

/* The matrix to int8 per output channel, in memory the model owns. */
static void sq_quantize(Model *m, Tensor *t) {
    int8_t *q = model_own(m, (size_t)t->rows * (size_t)t->cols, "int8 weights");
    float *sc = model_own(m, sizeof(float) * (size_t)t->rows, "int8 weight scales");
    #pragma omp parallel
    {
        float *row = check_malloc(sizeof(float) * (size_t)t->cols, "a row");
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < t->rows; r++) {
            sq_row_f32(t, r, row);
            float mx = 0;
            for (int64_t j = 0; j < t->cols; j++) {
                if (!isfinite(row[j])) die("%s: %s value in row %lld cannot be quantized to int8", t->name, isnan(row[j]) ? "NaN" : "infinite", (long long)r);
                float a = fabsf(row[j]);
                mx = a > mx ? a : mx;
            }
            float s = mx / 127.0f;
            int8_t *qr = q + (size_t)r * (size_t)t->cols;
            for (int64_t j = 0; j < t->cols; j++) {
                float v = s > 0 ? rintf(row[j] / s) : 0;
                qr[j] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
            }
            sc[r] = s;
        }
        free(row);
    }
    t->dtype = DT_I8;
    t->data = q;
    t->data2 = NULL;
    t->split = 0;
    t->scale = sc;
    t->act_scale = 0;
}

static void sq_extra(Model *m, const char *name, int layer, const float *v, int64_t n) {
    m->extra = check_realloc(m->extra, sizeof(NativeExtra) * (size_t)(m->n_extra + 1), "extra tensors");
    NativeExtra *e = &m->extra[m->n_extra++];
    snprintf(e->name, sizeof e->name, "layers.%d.%s", layer, name);
    e->data = check_malloc(sizeof(float) * (size_t)n, "extra tensors");
    memcpy(e->data, v, sizeof(float) * (size_t)n);
    e->n = n;
}

void sq_convert(Model *m, const Tokenizer *tok, const SqOpts *o) {
    const Config *c = &m->cfg;
    int h = c->hidden, L = c->n_layer;
    if (!(o->alpha >= 0 && o->alpha <= 1)) die("--alpha %g: expected a number in [0, 1]", o->alpha);
    if (o->samples < 1 || o->len < 2) die("--calib-samples and --calib-len must be at least 1 and 2");
    if (o->len > c->max_pos) die("--calib-len %d exceeds the model's %d positions", o->len, c->max_pos);
    bool no_smooth = env_on("OPT_SQ_NO_SMOOTH"), no_quant = env_on("OPT_SQ_NO_QUANT");
    for (int l = 0; l < L; l++) { /* float weights only: smoothing rewrites them */
        const Layer *y = &m->layers[l];
        const Tensor *mats[] = {&y->q, &y->k, &y->v, &y->o, &y->fc1, &y->fc2};
        for (int i = 0; i < 6; i++)
            if (mats[i]->dtype != DT_F32 && mats[i]->dtype != DT_F16 && mats[i]->dtype != DT_BF16)
                die("%s: tensor %s is %s; --w8a8 converts a float checkpoint", m->ck.dir, mats[i]->name, dtype_names[mats[i]->dtype]);
            else if (!mats[i]->data) die("%s: tensor %s has no weights in memory to convert", m->ck.dir, mats[i]->name);
    }
    double t0 = now_sec();
    int ns;
    bool lines;
    SqSample *smp = sq_samples(o->calib, tok, c, o, &ns, &lines);
    SqStats st1, st2;
    sq_stats_init(&st1, c);
    int64_t ntok = sq_calibrate(m, smp, ns, &st1, "calibration");
    double t1 = now_sec();
    fprintf(stderr, "opt: calibrated on %d samples (%s), %lld tokens, in %.1f s\n", ns,
            lines ? "one per line" : "the text cut into samples", (long long)ntok, t1 - t0);

    /* smoothing */
    bool smooth = !no_smooth && c->pre_ln;
    if (!c->pre_ln)
        fprintf(stderr, "opt: %s is post-LayerNorm (do_layer_norm_before false): the smoothing cannot be folded into its "
                        "LayerNorms, so it gets plain W8A8 without smoothing\n", c->name);
    else if (no_smooth) fprintf(stderr, "opt: OPT_SQ_NO_SMOOTH: no smoothing (naive W8A8)\n");
    if (no_quant) fprintf(stderr, "opt: OPT_SQ_NO_QUANT: the weights stay float (smoothed only)\n");
    float *s_qkv = check_malloc(sizeof(float) * (size_t)h, "smoothing factors"), *s_fc1 = check_malloc(sizeof(float) * (size_t)h, "smoothing factors");
    float *wmax = check_malloc(sizeof(float) * (size_t)h, "weight maxima");
    void **tmp = check_calloc(sizeof(void *) * 4 * (size_t)L, "smoothed weights"); /* copies to free after quantizing */
    bool keep = o->static_act && !no_quant; /* the smoothed float model runs again */
    int n_smoothed = 0;
    for (int l = 0; l < L; l++) {
        Layer *y = &m->layers[l];
        if (smooth && y->ln1w && y->ln2w) {
            Tensor *mats[] = {&y->q, &y->k, &y->v, &y->fc1};
            memset(wmax, 0, sizeof(float) * (size_t)h);
            for (int i = 0; i < 3; i++) sq_colmax(mats[i], wmax);
            sq_factors(s_qkv, st1.mx[OBS_QKV] + (size_t)l * h, wmax, h, o->alpha);
            memset(wmax, 0, sizeof(float) * (size_t)h);
            sq_colmax(&y->fc1, wmax);
            sq_factors(s_fc1, st1.mx[OBS_FC1] + (size_t)l * h, wmax, h, o->alpha);
            for (int j = 0; j < h; j++) {
                y->ln1w[j] /= s_qkv[j]; y->ln1b[j] /= s_qkv[j];
                y->ln2w[j] /= s_fc1[j]; y->ln2b[j] /= s_fc1[j];
            }
            for (int i = 0; i < 4; i++) {
                size_t bytes = dtype_bytes(mats[i]->dtype, mats[i]->rows * mats[i]->cols);
                void *dst = no_quant ? model_own(m, bytes, "smoothed weights") : (tmp[4 * l + i] = check_malloc(bytes, "smoothed weights"));
                sq_smooth_matrix(mats[i], i < 3 ? s_qkv : s_fc1, dst);
            }
            sq_extra(m, "self_attn.q_proj.smooth", l, s_qkv, h);
            sq_extra(m, "fc1.smooth", l, s_fc1, h);
            n_smoothed++;
        }
        if (!keep && !no_quant) { /* dynamic: quantize now, the float copies go at once */
            Tensor *all[] = {&y->q, &y->k, &y->v, &y->o, &y->fc1, &y->fc2};
            for (int i = 0; i < 6; i++) sq_quantize(m, all[i]);
            for (int i = 0; i < 4; i++) { free(tmp[4 * l + i]); tmp[4 * l + i] = NULL; }
        }
    }
    if (smooth && n_smoothed < L) fprintf(stderr, "opt: %d layers without affine LayerNorms were not smoothed\n", L - n_smoothed);

    /* static activation scales from the smoothed model, then the weights */
    const SqStats *scales = &st1;
    if (keep) {
        if (n_smoothed) {
            sq_stats_init(&st2, c);
            sq_calibrate(m, smp, ns, &st2, "static scales");
            scales = &st2;
        }
        for (int l = 0; l < L; l++) {
            Layer *y = &m->layers[l];
            Tensor *all[] = {&y->q, &y->k, &y->v, &y->o, &y->fc1, &y->fc2};
            static const int point[] = {OBS_QKV, OBS_QKV, OBS_QKV, OBS_O, OBS_FC1, OBS_FC2};
            for (int i = 0; i < 6; i++) {
                sq_quantize(m, all[i]);
                float mx = sq_stats_tensor_max(scales, l, point[i]);
                all[i]->act_scale = (mx > 1e-5f ? mx : 1e-5f) / 127.0f;
            }
            for (int i = 0; i < 4; i++) free(tmp[4 * l + i]);
        }
        if (n_smoothed) sq_stats_free(&st2);
    }
    double t3 = now_sec();

    /* the statistics, for the file */
    static const char *const names[] = {"self_attn.q_proj.act_max", "self_attn.out_proj.act_max", "fc1.act_max", "fc2.act_max"};
    for (int l = 0; l < L; l++)
        for (int p = 0; p < 4; p++) sq_extra(m, names[p], l, st1.mx[p] + (size_t)l * (size_t)st1.cols[p], st1.cols[p]);
    char what[128];
    if (no_quant) snprintf(what, sizeof what, "float weights (not quantized)");
    else snprintf(what, sizeof what, "int8 weights per output channel, %s", keep ? "static per-tensor activation scales (O3)" : "dynamic per-token activation scales (O1)");
    fprintf(stderr, "opt: smoothed %d of %d layers (alpha %g); %s; %.1f s\n", n_smoothed, L, o->alpha, what, t3 - t1);
    sq_stats_free(&st1);
    for (int i = 0; i < ns; i++) free(smp[i].ids);
    free(smp); free(s_qkv); free(s_fc1); free(wmax); free(tmp);
}
