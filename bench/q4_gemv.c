/* bench/q4_gemv.c: the batch-1 decode GEMV alone, 4-bit against f16 and a streaming read.
 *
 *   cc -O3 -fopenmp -ffp-contract=off -fno-math-errno -D_GNU_SOURCE -DOPT_NO_MAIN -I. bench/q4_gemv.c \
 *      quant.c offload.c lp.c -lm -lpthread -o build/q4_gemv
 * (-O3 as the Makefile builds opt: at -O2 GCC keeps the 8-row tile's accumulators and tables in
 * memory, and the 4-bit kernel runs 40% slower)
 *   OMP_WAIT_POLICY=passive build/q4_gemv [REPS] [LAYERS]
 *
 * It includes opt.c (as the tests do) and calls gemm() with M = 1 over the matrices of LAYERS
 * OPT-1.3b layers (hidden 2048, ffn 8192: q, k, v, out, fc1, fc2 per layer; random contents,
 * valid f16 scales and mins), in order, as one decode step does; REPS passes, best and median.
 * Each row: the format, threads, seconds per pass, the weight bytes read per second, and the
 * same bytes read by a plain streaming loop (AVX-512 XOR) over a buffer of the same size in the
 * same run, so the "% of stream" column is the kernel's efficiency against the memory system.
 * "hot" rows run the same kernel on one 2048 x 2048 matrix that stays in the L2/L3 caches:
 * the kernel's compute ceiling (bytes per second when memory is not the limit).
 * Threads: 1 and the OpenMP default (omp_set_num_threads). */
#ifndef OPT_NO_MAIN
#define OPT_NO_MAIN
#endif
#include "../opt.c"

#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static int cmp_dbl(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

T_AVX512 static uint64_t stream_read(const char *p, size_t n) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i + 256 <= n; i += 256) {
        a0 = _mm512_xor_si512(a0, _mm512_loadu_si512((const void *)(p + i)));
        a1 = _mm512_xor_si512(a1, _mm512_loadu_si512((const void *)(p + i + 64)));
        a2 = _mm512_xor_si512(a2, _mm512_loadu_si512((const void *)(p + i + 128)));
        a3 = _mm512_xor_si512(a3, _mm512_loadu_si512((const void *)(p + i + 192)));
    }
    a0 = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
    uint64_t o[8];
    _mm512_storeu_si512((void *)o, a0);
    return o[0] ^ o[1] ^ o[2] ^ o[3] ^ o[4] ^ o[5] ^ o[6] ^ o[7];
}

static uint64_t g_rng = 12345;
static uint64_t rnd(void) {
    uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* A (rows, cols) matrix in format dt (group G for q4) with random contents. */
static Tensor make(DType dt, int rows, int cols, int G) {
    size_t rb = dt == DT_Q4 ? q4_row_bytes(cols, G) : dtype_bytes(dt, cols);
    uint8_t *p = aligned_alloc(64, (rb * rows + 63) / 64 * 64);
    for (size_t i = 0; i < rb * rows; i += 8) { uint64_t r = rnd(); memcpy(p + i, &r, rb * rows - i < 8 ? rb * rows - i : 8); }
    if (dt == DT_Q4) /* valid scales and mins */
        for (int r = 0; r < rows; r++)
            for (int b = 0; b < (cols + G - 1) / G; b++) {
                uint16_t h[2] = {f32_to_f16(0.01f), f32_to_f16(-0.07f)};
                memcpy(p + rb * r + (size_t)b * (4 + G / 2), h, 4);
            }
    if (dt == DT_F16)
        for (size_t i = 0; i < rb * rows / 2; i++) ((uint16_t *)p)[i] = f32_to_f16((float)((int)(rnd() % 2001) - 1000) * 1e-4f);
    return (Tensor){.dtype = dt, .rows = rows, .cols = cols, .data = p, .group = G, .tier = TIER_CPU, .name = "bench"};
}

static double pass(Tensor *mats, int n, const float *x, float *y) {
    double t = now_s();
    for (int i = 0; i < n; i++) {
        Gemm g = {.y = y, .x = x, .w = &mats[i], .ldy = mats[i].rows, .ldx = mats[i].cols, .M = 1, .N = (int)mats[i].rows, .K = (int)mats[i].cols};
        gemm(&g);
    }
    return now_s() - t;
}

int main(int argc, char **argv) {
    simd_init();
    int reps = argc > 1 ? atoi(argv[1]) : 7, layers = argc > 2 ? atoi(argv[2]) : 24;
    int nt_max = omp_get_max_threads();
    const int H = 2048, F = 8192;
    float *x = malloc(sizeof(float) * F), *y = malloc(sizeof(float) * F);
    for (int i = 0; i < F; i++) x[i] = (float)((int)(rnd() % 2001) - 1000) * 1e-3f;
    printf("q4_gemv: %d OPT-1.3b layers, M = 1, %d passes (best / median), SIMD %s, threads 1..%d\n", layers, reps,
           g_simd == SIMD_AVX512 ? "avx512" : g_simd == SIMD_AVX2 ? "avx2" : "scalar", nt_max);
    printf("%-8s %-4s %3s %17s %15s %15s %13s %7s\n", "format", "set", "thr", "ms/pass best/med", "GB/s best/med", "stream best/med", "% of stream", "Gw/s");
    struct { DType dt; int G; const char *name; } fmts[] = {{DT_F16, 0, "f16"}, {DT_Q4, 32, "q4 G32"}, {DT_Q4, 64, "q4 G64"}, {DT_Q4, 128, "q4 G128"}};
    for (int f = 0; f < 4; f++) {
        int n = 6 * layers;
        Tensor *mats = malloc(sizeof(Tensor) * (size_t)n);
        size_t bytes = 0;
        for (int l = 0; l < layers; l++) {
            int shp[6][2] = {{H, H}, {H, H}, {H, H}, {H, H}, {F, H}, {H, F}};
            for (int i = 0; i < 6; i++) {
                mats[6 * l + i] = make(fmts[f].dt, shp[i][0], shp[i][1], fmts[f].G);
                bytes += row_bytes(&mats[6 * l + i]) * (size_t)shp[i][0];
            }
        }
        char *buf = aligned_alloc(64, (bytes + 255) / 256 * 256);
        memset(buf, 1, (bytes + 255) / 256 * 256);
        for (int nt = 1; nt <= nt_max; nt++) {
            omp_set_num_threads(nt);
            for (int hot = 0; hot < 2; hot++) {
                double *t = malloc(sizeof(double) * reps), *s = malloc(sizeof(double) * reps);
                int nm = hot ? 1 : n;
                Tensor *set = hot ? &mats[0] : mats; /* hot: one 2048 x 2048 matrix, repeated */
                size_t by = hot ? row_bytes(&mats[0]) * (size_t)H : bytes;
                int inner = hot ? 64 : 1;
                pass(set, nm, x, y); /* warm-up */
                for (int r = 0; r < reps; r++) {
                    double t0 = now_s();
                    for (int i = 0; i < inner; i++) pass(set, nm, x, y);
                    t[r] = (now_s() - t0) / inner;
                    volatile uint64_t sink = 0;
                    t0 = now_s();
                    uint64_t acc = 0;
                    size_t chunk = (by / nt) & ~(size_t)255;
                    #pragma omp parallel num_threads(nt) reduction(^ : acc)
                    acc ^= stream_read(buf + (size_t)omp_get_thread_num() * chunk, chunk);
                    sink ^= acc;
                    s[r] = now_s() - t0;
                    (void)sink;
                }
                qsort(t, reps, sizeof(double), cmp_dbl);
                qsort(s, reps, sizeof(double), cmp_dbl);
                double best = t[0], med = t[reps / 2];
                size_t wts = hot ? (size_t)H * H : (size_t)layers * (4 * (size_t)H * H + 2 * (size_t)H * F);
                if (hot)
                    printf("%-8s %-4s %3d %7.2f / %-7.2f %6.2f / %-6.2f %15s %13s %7.2f\n", fmts[f].name, "hot", nt, 1e3 * best, 1e3 * med,
                           by / best / 1e9, by / med / 1e9, "-", "-", wts / best / 1e9);
                else
                    printf("%-8s %-4s %3d %7.2f / %-7.2f %6.2f / %-6.2f %6.2f / %-6.2f %5.0f / %-5.0f %7.2f\n", fmts[f].name, "DRAM", nt,
                           1e3 * best, 1e3 * med, by / best / 1e9, by / med / 1e9, by / s[0] / 1e9, by / s[reps / 2] / 1e9,
                           100 * s[0] / best, 100 * s[reps / 2] / med, wts / best / 1e9);
                free(t); free(s);
            }
        }
        for (int i = 0; i < n; i++) free((void *)mats[i].data);
        free(mats);
        free(buf);
    }
    return 0;
}
