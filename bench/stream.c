/* bench/stream.c: streaming-read memory bandwidth probe for the decode bound.
 *
 *   cc -O2 -fopenmp bench/stream.c -o build/stream && build/stream [MiB] [reps] [--json]
 *
 * Reads a buffer much larger than the last-level cache (default: 4x L3, at
 * least 1 GiB) with 512-bit (or 256-bit) loads into several XOR accumulators,
 * so the loop is limited by memory, not by the core. Each thread reads its
 * own contiguous slice, first-touched by that thread. Prints the best and the
 * median GB/s (1e9 bytes/s) of `reps` passes, with 1 thread and with all
 * OpenMP threads. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

__attribute__((target("avx512f"))) static uint64_t read_avx512(const char *p, size_t n) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i + 256 <= n; i += 256) {
        a0 = _mm512_xor_si512(a0, _mm512_load_si512((const void *)(p + i)));
        a1 = _mm512_xor_si512(a1, _mm512_load_si512((const void *)(p + i + 64)));
        a2 = _mm512_xor_si512(a2, _mm512_load_si512((const void *)(p + i + 128)));
        a3 = _mm512_xor_si512(a3, _mm512_load_si512((const void *)(p + i + 192)));
    }
    a0 = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
    uint64_t o[8];
    _mm512_storeu_si512((void *)o, a0);
    return o[0] ^ o[1] ^ o[2] ^ o[3] ^ o[4] ^ o[5] ^ o[6] ^ o[7];
}

__attribute__((target("avx2"))) static uint64_t read_avx2(const char *p, size_t n) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i + 128 <= n; i += 128) {
        a0 = _mm256_xor_si256(a0, _mm256_load_si256((const __m256i *)(p + i)));
        a1 = _mm256_xor_si256(a1, _mm256_load_si256((const __m256i *)(p + i + 32)));
        a2 = _mm256_xor_si256(a2, _mm256_load_si256((const __m256i *)(p + i + 64)));
        a3 = _mm256_xor_si256(a3, _mm256_load_si256((const __m256i *)(p + i + 96)));
    }
    a0 = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
    uint64_t o[4];
    _mm256_storeu_si256((__m256i *)o, a0);
    return o[0] ^ o[1] ^ o[2] ^ o[3];
}

static uint64_t read_scalar(const char *p, size_t n) {
    const uint64_t *q = (const uint64_t *)p;
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (size_t i = 0; i + 4 <= n / 8; i += 4) { a0 ^= q[i]; a1 ^= q[i + 1]; a2 ^= q[i + 2]; a3 ^= q[i + 3]; }
    return a0 ^ a1 ^ a2 ^ a3;
}

static uint64_t (*read_fn)(const char *, size_t) = read_scalar;
static const char *isa = "scalar";

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* One pass per rep over buf[0, n) split evenly among `nt` threads; returns GB/s per rep. */
static void measure(char *buf, size_t n, int nt, int reps, double *best, double *median) {
    double *gbs = malloc(sizeof(double) * reps);
    volatile uint64_t sink = 0;
    size_t chunk = (n / nt) & ~(size_t)4095;
    for (int r = -1; r < reps; r++) { /* r = -1: warm-up pass, not counted */
        uint64_t acc = 0;
        double t0 = now();
        #pragma omp parallel num_threads(nt) reduction(^ : acc)
        acc ^= read_fn(buf + (size_t)omp_get_thread_num() * chunk, chunk);
        double dt = now() - t0;
        sink ^= acc;
        if (r >= 0) gbs[r] = (double)chunk * nt / dt / 1e9;
    }
    (void)sink;
    qsort(gbs, reps, sizeof(double), cmp_d);
    *best = gbs[reps - 1];
    *median = reps % 2 ? gbs[reps / 2] : 0.5 * (gbs[reps / 2 - 1] + gbs[reps / 2]);
    free(gbs);
}

int main(int argc, char **argv) {
    long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    size_t mib = 0;
    int reps = 10, json = 0;
    for (int i = 1, pos = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--json")) json = 1;
        else if (pos++ == 0) mib = (size_t)atol(argv[i]);
        else reps = atoi(argv[i]);
    }
    if (!mib) {
        mib = l3 > 0 ? 4 * (size_t)l3 >> 20 : 1024;
        if (mib < 1024) mib = 1024;
    }
    if (reps < 1) reps = 1;
    if (__builtin_cpu_supports("avx512f")) read_fn = read_avx512, isa = "avx512";
    else if (__builtin_cpu_supports("avx2")) read_fn = read_avx2, isa = "avx2";
    size_t n = mib << 20;
    int nt = omp_get_max_threads();
    char *buf = aligned_alloc(4096, n);
    if (!buf) { fprintf(stderr, "stream: cannot allocate %zu MiB\n", mib); return 1; }
    size_t chunk = (n / nt) & ~(size_t)4095;
    #pragma omp parallel num_threads(nt) /* first touch: each thread its own slice */
    memset(buf + (size_t)omp_get_thread_num() * chunk, 1 + omp_get_thread_num(), chunk);
    double b1, m1, bn, mn;
    measure(buf, n, 1, reps, &b1, &m1);
    measure(buf, n, nt, reps, &bn, &mn);
    if (json)
        printf("{\"buffer_mib\": %zu, \"reps\": %d, \"isa\": \"%s\", \"l3_bytes\": %ld, \"threads\": %d, "
               "\"gbs_1t_best\": %.2f, \"gbs_1t_median\": %.2f, \"gbs_all_best\": %.2f, \"gbs_all_median\": %.2f}\n",
               mib, reps, isa, l3, nt, b1, m1, bn, mn);
    else
        printf("stream read, %zu MiB buffer, %d reps, %s loads (L3 %ld MiB)\n"
               "  1 thread   best %6.2f GB/s  median %6.2f GB/s\n"
               "  %d threads  best %6.2f GB/s  median %6.2f GB/s\n",
               mib, reps, isa, l3 >> 20, b1, m1, nt, bn, mn);
    free(buf);
    return 0;
}
