/* tests/check.h: what the C kernel tests that include opt.c (test_kernels.c, test_q4.c,
 * test_i8.c) share: failures reported by group (the first 12 of a group printed, then
 * counted) and a seeded generator of our own (splitmix64, so the tests do not lean on opt's),
 * so a failing run is reproduced from the seed it prints. */
#include <stdarg.h>

static int g_failed_groups, g_fail; /* groups that failed; failures in the current group */
static long g_checks;               /* checks in the current group */

__attribute__((format(printf, 1, 2))) static void fail(const char *fmt, ...) {
    if (g_fail++ < 12) {
        va_list ap;
        va_start(ap, fmt);
        printf("  fail: ");
        vprintf(fmt, ap);
        printf("\n");
        va_end(ap);
    } else if (g_fail == 13) printf("  (further failures in this group not shown)\n");
}

/* "PASS|FAIL name N checks; summary", one line per group, read by the drivers */
static void group_line(const char *name, long fails, long checks, const char *summary) {
    printf("%-4s %-12s %ld checks%s%s\n", fails ? "FAIL" : "PASS", name, checks, *summary ? "; " : "", summary);
    fflush(stdout);
    if (fails) g_failed_groups++;
}
static void group_begin(void) { g_fail = 0, g_checks = 0; }
static void group_end(const char *name, const char *summary) { group_line(name, g_fail, g_checks, summary), group_begin(); }

static uint64_t g_rng; /* the generator's state: the seed */
static inline uint64_t rnd_u64(void) {
    uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static inline int rnd_int(int lo, int hi) { return lo + (int)(rnd_u64() % (uint64_t)(hi - lo + 1)); } /* [lo, hi] */
static inline double rnd_unit(void) { return (double)(rnd_u64() >> 11) * 0x1p-53; }                   /* [0, 1) */
/* Uniform in [-1, 1), never exactly zero, so no input vector is all zeros. */
static inline float rnd_sym(void) {
    float v;
    do v = (float)(2 * rnd_unit() - 1); while (v == 0);
    return v;
}

/* outputs are poisoned with a NaN of this payload before a kernel runs: an element it forgets
 * to write shows, and so does one written past the end */
static const uint32_t POISON = 0x7FC0DEADu;
static inline void poison(float *p, size_t n) { for (size_t i = 0; i < n; i++) memcpy(&p[i], &POISON, 4); }
static inline bool same_bits(float a, float b) { return !memcmp(&a, &b, 4); }
