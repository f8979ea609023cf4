/* test_gpu.c: the GPU backend's ops against the CPU backend's, with fresh
 * random inputs every run (the seed is printed), NaN-poisoned outputs, and
 * sizes that are not multiples of any tile. Built and run by tests/gpu.sh on
 * a machine with a GPU:
 *   cc -std=c11 -O2 -fopenmp -ffp-contract=off -D_GNU_SOURCE -DOPT_NO_MAIN -DOPT_CUDA -I. -I$CUDA/include \
 *      tests/test_gpu.c quant.c offload.c lp.c build/cuda/kernels.o -L$CUDA/lib64 -lcudart_static ... */
#include "../opt.c"
#include <cuda_runtime.h>

static int fails;
static uint64_t rng_state;
static float frand(void) { return (float)((double)(splitmix64(&rng_state) >> 11) * 0x1.0p-53) * 2.0f - 1.0f; }

static float *dev_of(const float *h, size_t n) {
    float *d;
    if (cudaMalloc((void **)&d, 4 * n) != cudaSuccess) die("cudaMalloc");
    cudaMemcpy(d, h, 4 * n, cudaMemcpyHostToDevice);
    return d;
}
static void host_of(float *h, const float *d, size_t n) { gpu_sync(); cudaMemcpy(h, d, 4 * n, cudaMemcpyDeviceToHost); }

/* |gpu - cpu| within tol * scale per element; reports the worst. */
static void compare(const char *what, const float *cpu, const float *gpu, size_t n, const float *scale, float tol) {
    double worst = 0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)gpu[i] - cpu[i]) / (scale ? scale[i] + 1e-6 : 1.0);
        if (!(e <= worst) || isnan(gpu[i])) { worst = isnan(gpu[i]) ? INFINITY : e; at = i; }
    }
    bool ok = worst <= tol;
    printf("%s %-44s worst %.3g (tol %.3g) at %zu: cpu %.6g gpu %.6g\n", ok ? "ok  " : "FAIL", what, worst, tol, at, cpu[at], gpu[at]);
    fails += !ok;
}

static void test_linear(DType dt, int rows, int N, int K, int acc, int relu, int bias) {
    size_t nw = (size_t)N * K;
    float *wf = malloc(4 * nw), *x = malloc(4 * (size_t)rows * K), *b = malloc(4 * (size_t)N);
    float *yc = malloc(4 * (size_t)rows * N), *yg = malloc(4 * (size_t)rows * N), *sc = malloc(4 * (size_t)rows * N);
    for (size_t i = 0; i < nw; i++) wf[i] = frand() * 0.5f;
    for (int i = 0; i < rows * K; i++) x[i] = frand();
    for (int i = 0; i < N; i++) b[i] = frand();
    for (int i = 0; i < rows * N; i++) yc[i] = frand();
    Tensor w = {.dtype = dt, .rows = N, .cols = K, .group = 64, .name = "test"};
    void *wd = malloc(dt == DT_Q4 ? q4_row_bytes(K, 64) * N : 2 * nw);
    if (dt == DT_Q4) for (int n = 0; n < N; n++) q4_quantize_row((uint8_t *)wd + q4_row_bytes(K, 64) * n, wf + (size_t)n * K, K, 64, "test");
    else for (size_t i = 0; i < nw; i++) ((uint16_t *)wd)[i] = dt == DT_F16 ? f32_to_f16(wf[i]) : f32_to_bf16(wf[i]);
    w.data = wd;
    Tensor wg = gpu_tensor_upload(&w);
    float *xd = dev_of(x, (size_t)rows * K), *bd = dev_of(b, N), *yd;
    if (!acc) for (int i = 0; i < rows * N; i++) yg[i] = NAN; /* poison */
    else memcpy(yg, yc, 4 * (size_t)rows * N);
    yd = dev_of(yg, (size_t)rows * N);
    cpu_backend.linear(yc, x, &w, bias ? b : NULL, rows, acc, relu);
    gpu_backend.linear(yd, xd, &wg, bias ? bd : NULL, rows, acc, relu);
    host_of(yg, yd, (size_t)rows * N);
    for (int m = 0; m < rows; m++) /* scale: sum |x w| of the dot, plus what acc and bias add */
        for (int n = 0; n < N; n++) {
            double s = 0;
            for (int k = 0; k < K; k++) s += fabs((double)x[(size_t)m * K + k] * wf[(size_t)n * K + k]);
            sc[(size_t)m * N + n] = (float)(s + 1.0);
        }
    char what[96];
    snprintf(what, sizeof what, "linear %s %dx%dx%d%s%s%s", dtype_names[dt], rows, N, K, acc ? " acc" : "", relu ? " relu" : "", bias ? " bias" : "");
    compare(what, yc, yg, (size_t)rows * N, sc, dt == DT_BF16 ? 2e-2f : 4e-3f);
    cudaFree(xd); cudaFree(bd); cudaFree(yd); cudaFree((void *)wg.data);
    free(wf); free(x); free(b); free(yc); free(yg); free(sc); free(wd);
}

static void test_layernorm(int rows, int n) {
    float *x = malloc(4 * (size_t)rows * n), *w = malloc(4 * (size_t)n), *b = malloc(4 * (size_t)n), *yc = malloc(4 * (size_t)rows * n), *yg = malloc(4 * (size_t)rows * n);
    for (int i = 0; i < rows * n; i++) x[i] = frand() * 3 + 1;
    for (int i = 0; i < n; i++) { w[i] = 1 + frand() * 0.1f; b[i] = frand() * 0.1f; }
    float *xd = dev_of(x, (size_t)rows * n), *wd = dev_of(w, n), *bd = dev_of(b, n);
    for (int i = 0; i < rows * n; i++) yg[i] = NAN;
    float *yd = dev_of(yg, (size_t)rows * n);
    cpu_backend.layernorm(yc, x, w, b, rows, n);
    gpu_backend.layernorm(yd, xd, wd, bd, rows, n);
    host_of(yg, yd, (size_t)rows * n);
    char what[64];
    snprintf(what, sizeof what, "layernorm %dx%d", rows, n);
    compare(what, yc, yg, (size_t)rows * n, NULL, 1e-4f);
    cudaFree(xd); cudaFree(wd); cudaFree(bd); cudaFree(yd);
    free(x); free(w); free(b); free(yc); free(yg);
}

/* A prefill of two sequences then a decode step, CPU f32 cache vs GPU f16. */
static void test_attention(int H, int D, int q4) {
    Config c = {.hidden = H * D, .n_head = H, .head_dim = D, .n_layer = 1, .ffn = 4, .vocab = 8, .max_pos = 64, .embed_dim = H * D};
    int cap = 40, lens[2] = {23, 17}, n = lens[0] + lens[1];
    KVCache kc, kg;
    kv_init(&kc, &c, 2, cap, q4 ? DT_Q4 : DT_F32, 64);
    gpu_kv_init(&kg, &c, 2, cap, q4 ? DT_Q4 : DT_F16, 64);
    Scratch sc, sg;
    scratch_init(&sc, &c, n, cap);
    gpu_scratch_init(&sg, &c, n, cap);
    int tok[64], slot[64], pos[64];
    for (int step = 0; step < 2; step++) {
        int rows = 0;
        for (int sq = 0; sq < 2; sq++)
            for (int p = step ? lens[sq] : 0; p < (step ? lens[sq] + 1 : lens[sq]); p++) { tok[rows] = 1; slot[rows] = sq; pos[rows++] = p; }
        size_t e = (size_t)rows * c.hidden;
        for (size_t i = 0; i < e; i++) { sc.q[i] = frand() * 2; sc.k[i] = frand() * 2; sc.v[i] = frand(); }
        cudaMemcpy(sg.q, sc.q, 4 * e, cudaMemcpyHostToDevice);
        cudaMemcpy(sg.k, sc.k, 4 * e, cudaMemcpyHostToDevice);
        cudaMemcpy(sg.v, sc.v, 4 * e, cudaMemcpyHostToDevice);
        float *poison = malloc(4 * e), *att = malloc(4 * e);
        for (size_t i = 0; i < e; i++) poison[i] = NAN;
        cudaMemcpy(sg.att, poison, 4 * e, cudaMemcpyHostToDevice);
        Step st = {rows, tok, slot, pos, NULL};
        gpu_step_upload(&st, &sg);
        cpu_backend.attention(&c, &kc.layer[0], &st, &sc);
        gpu_backend.attention(&c, &kg.layer[0], &st, &sg);
        host_of(att, sg.att, e);
        char what[64];
        snprintf(what, sizeof what, "attention %s H%d D%d %s", q4 ? "q4" : "f16", H, D, step ? "decode" : "prefill");
        compare(what, sc.att, att, e, NULL, q4 ? 6e-2f : 1e-2f);
        free(poison); free(att);
    }
    kv_free(&kc); gpu_kv_free(&kg); scratch_free(&sc); gpu_scratch_free(&sg);
}

int main(void) {
    simd_init();
    if (!gpu_available()) { printf("test_gpu: skipped: no usable GPU (%s)\n", gpu_describe()); return 0; }
    rng_state = (uint64_t)time(NULL);
    printf("test_gpu: seed %llu on %s\n", (unsigned long long)rng_state, gpu_describe());
    int rows[] = {1, 3, 8, 9, 33, 100}, shapes[][2] = {{17, 48}, {100, 256}, {64, 1000}, {257, 64}};
    DType dts[] = {DT_F16, DT_BF16, DT_Q4};
    for (int d = 0; d < 3; d++)
        for (size_t r = 0; r < sizeof rows / sizeof *rows; r++)
            for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++)
                test_linear(dts[d], rows[r], shapes[s][0], shapes[s][1], (int)(r & 1), (int)(s == 1), (int)(s != 2));
    test_layernorm(1, 768);
    test_layernorm(7, 1000);
    test_layernorm(33, 4096);
    test_attention(3, 64, 0);
    test_attention(2, 80, 0);
    test_attention(4, 128, 0);
    test_attention(3, 64, 1);
    printf("test_gpu: %s (%d failed)\n", fails ? "FAIL" : "ok", fails);
    return fails != 0;
}
