/* test_gpu.c: the GPU backend's ops against the CPU backend's, with fresh
 * random inputs every run (the seed is printed), NaN-poisoned outputs, and
 * sizes that are not multiples of any tile: GEMMs on f16, bf16, 4-bit and
 * int8 weights, LayerNorm, attention (up to 1031 positions, head_dim 64, 80,
 * 128, f16 and 4-bit cache), greedy and seeded sampling on identical logits.
 * Fails (does not skip) when nvidia-smi sees a GPU this binary cannot use.
 * Built and run by tests/gpu.sh (its `build` and `unit` parts):
 *   cc -std=c11 -O2 -fopenmp -ffp-contract=off -D_GNU_SOURCE -DOPT_NO_MAIN -DOPT_CUDA -I. -I$CUDA/include \
 *      tests/test_gpu.c quant.c offload.c lp.c build/cuda/kernels.o -L$CUDA/lib64 -lcudart_static ... */
#include "../opt.c"
#include <cuda_runtime.h>

static int fails;
static uint64_t rng_state;
static float frand(void) { return (float)((double)(splitmix64(&rng_state) >> 11) * 0x1.0p-53) * 2.0f - 1.0f; }

/* Host to device, landed before return: the backend's kernels run on its own
 * non-blocking stream, which a legacy-stream copy does not order with. */
static void put(void *d, const void *h, size_t bytes) {
    if (cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice) != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess) die("test_gpu: a copy to the GPU failed");
}
static float *dev_of(const float *h, size_t n) {
    float *d;
    if (cudaMalloc((void **)&d, 4 * n) != cudaSuccess) die("test_gpu: cudaMalloc of %zu bytes failed", 4 * n);
    put(d, h, 4 * n);
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

/* A random N x K weight in format dt on the host (data and int8's scales
 * malloc'd); wf gets the values it stands for. act: int8's static activation
 * scale (0: per token); G: 4-bit group. */
static Tensor weight_make(DType dt, int N, int K, int G, float act, float *wf) {
    size_t nw = (size_t)N * K;
    Tensor w = {.dtype = dt, .rows = N, .cols = K, .group = G, .name = "test", .act_scale = act};
    void *wd = malloc(dt == DT_Q4 ? q4_row_bytes(K, G) * N : 2 * nw);
    for (size_t i = 0; i < nw; i++) wf[i] = frand() * 0.5f;
    if (dt == DT_I8) { /* int8 rows and per-row scales */
        float *ws = malloc(4 * (size_t)N);
        for (int n = 0; n < N; n++) ws[n] = (0.5f + 0.25f * frand()) / 127;
        for (size_t i = 0; i < nw; i++) { ((int8_t *)wd)[i] = (int8_t)(frand() * 127); wf[i] = ((int8_t *)wd)[i] * ws[i / K]; }
        w.scale = ws;
    } else if (dt == DT_Q4) for (int n = 0; n < N; n++) q4_quantize_row((uint8_t *)wd + q4_row_bytes(K, G) * n, wf + (size_t)n * K, K, G, "test");
    else for (size_t i = 0; i < nw; i++) ((uint16_t *)wd)[i] = dt == DT_F16 ? f32_to_f16(wf[i]) : f32_to_bf16(wf[i]);
    w.data = wd;
    return w;
}

static void weight_free(Tensor *w, Tensor *wg) {
    free((void *)w->data); free((void *)w->scale);
    cudaFree((void *)wg->data);
    if (wg->dtype == DT_I8) cudaFree((void *)wg->scale);
}

/* sc (rows, N): sum |x w| of each dot, plus 1 for what acc and bias add: the scale of its rounding */
static void dot_scales(float *sc, const float *x, const float *wf, int rows, int N, int K) {
    for (int m = 0; m < rows; m++)
        for (int n = 0; n < N; n++) {
            double s = 0;
            for (int k = 0; k < K; k++) s += fabs((double)x[(size_t)m * K + k] * wf[(size_t)n * K + k]);
            sc[(size_t)m * N + n] = (float)(s + 1.0);
        }
}

/* int8: the same int32 sums as the CPU (the same quantized rows), so only the epilogue's rounding */
static float linear_tol(DType dt) { return dt == DT_BF16 ? 2e-2f : dt == DT_I8 ? 1e-5f : 4e-3f; }

static void test_linear(DType dt, int rows, int N, int K, int acc, int relu, int bias, float act, int G) {
    float *wf = malloc(4 * (size_t)N * K), *x = malloc(4 * (size_t)rows * K), *b = malloc(4 * (size_t)N);
    float *yc = malloc(4 * (size_t)rows * N), *yg = malloc(4 * (size_t)rows * N), *sc = malloc(4 * (size_t)rows * N);
    Tensor w = weight_make(dt, N, K, G, act, wf), wg = gpu_tensor_upload(&w);
    for (int i = 0; i < rows * K; i++) x[i] = frand();
    for (int i = 0; i < N; i++) b[i] = frand();
    for (int i = 0; i < rows * N; i++) yc[i] = frand();
    float *xd = dev_of(x, (size_t)rows * K), *bd = dev_of(b, N), *yd;
    if (!acc) for (int i = 0; i < rows * N; i++) yg[i] = NAN; /* poison */
    else memcpy(yg, yc, 4 * (size_t)rows * N);
    yd = dev_of(yg, (size_t)rows * N);
    cpu_backend.linear(yc, x, &w, bias ? b : NULL, rows, acc, relu);
    gpu_backend.linear(yd, xd, &wg, bias ? bd : NULL, rows, acc, relu);
    host_of(yg, yd, (size_t)rows * N);
    dot_scales(sc, x, wf, rows, N, K);
    char what[96];
    snprintf(what, sizeof what, "linear %s%s %dx%dx%d%s%s%s%s", dtype_names[dt], dt == DT_Q4 ? (G == 32 ? " g32" : G == 64 ? " g64" : " g128") : "", rows, N, K,
             acc ? " acc" : "", relu ? " relu" : "", bias ? " bias" : "", act > 0 ? " static" : "");
    compare(what, yc, yg, (size_t)rows * N, sc, linear_tol(dt));
    cudaFree(xd); cudaFree(bd); cudaFree(yd);
    weight_free(&w, &wg);
    free(wf); free(x); free(b); free(yc); free(yg); free(sc);
}

/* The qkv op (x narrowed or quantized once for the three GEMMs where their
 * inputs agree) against the CPU's three linears: dt[i] and act[i] per
 * projection, so unequal ones make the GPU prepare x again in between. */
static void test_qkv(const DType dt[3], const float act[3], int rows, int H) {
    Config c = {.hidden = H, .n_head = 1, .head_dim = H, .n_layer = 1, .ffn = 4, .vocab = 8, .max_pos = 8, .embed_dim = H};
    Scratch sc, sg;
    scratch_init(&sc, &c, rows, 8);
    gpu_scratch_init(&sg, &c, rows, 8);
    size_t e = (size_t)rows * H;
    float *x = malloc(4 * e), *wf[3], *bh[3], *out = malloc(4 * e), *scale = malloc(4 * e), *poison = malloc(4 * e);
    Layer L, Lg;
    memset(&L, 0, sizeof L);
    memset(&Lg, 0, sizeof Lg);
    Tensor *w[3] = {&L.q, &L.k, &L.v}, *wg[3] = {&Lg.q, &Lg.k, &Lg.v};
    float **b[3] = {&L.qb, &L.kb, &L.vb}, **bg[3] = {&Lg.qb, &Lg.kb, &Lg.vb};
    for (int i = 0; i < 3; i++) {
        wf[i] = malloc(4 * (size_t)H * H);
        bh[i] = malloc(4 * (size_t)H);
        for (int n = 0; n < H; n++) bh[i][n] = frand();
        *w[i] = weight_make(dt[i], H, H, 64, act[i], wf[i]);
        *wg[i] = gpu_tensor_upload(w[i]);
        *b[i] = bh[i];
        *bg[i] = dev_of(bh[i], H);
    }
    for (size_t i = 0; i < e; i++) { x[i] = frand(); poison[i] = NAN; }
    memcpy(sc.h, x, 4 * e);
    put(sg.h, x, 4 * e);
    put(sg.q, poison, 4 * e); put(sg.k, poison, 4 * e); put(sg.v, poison, 4 * e);
    cpu_backend.qkv(&L, sc.h, rows, &sc);
    gpu_backend.qkv(&Lg, sg.h, rows, &sg);
    float *yc[3] = {sc.q, sc.k, sc.v}, *yg[3] = {sg.q, sg.k, sg.v};
    for (int i = 0; i < 3; i++) {
        host_of(out, yg[i], e);
        dot_scales(scale, x, wf[i], rows, H, H);
        char what[96];
        snprintf(what, sizeof what, "qkv %s%s %s%s %s%s %dx%d: %c", dtype_names[dt[0]], act[0] > 0 ? " static" : "", dtype_names[dt[1]], act[1] > 0 ? " static" : "",
                 dtype_names[dt[2]], act[2] > 0 ? " static" : "", rows, H, "qkv"[i]);
        compare(what, yc[i], out, e, scale, linear_tol(dt[i]));
    }
    for (int i = 0; i < 3; i++) { weight_free(w[i], wg[i]); cudaFree((void *)*bg[i]); free(wf[i]); free(bh[i]); }
    scratch_free(&sc); gpu_scratch_free(&sg);
    free(x); free(out); free(scale); free(poison);
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

/* A prefill of two sequences of len0 and len1 then a decode step, CPU f32
 * cache vs GPU f16 (or both 4-bit); lengths past the block's 128 threads and
 * past 1024 reach every loop's second trip. */
static void test_attention(int H, int D, int q4, int len0, int len1) {
    int cap = (len0 > len1 ? len0 : len1) + 1, lens[2] = {len0, len1}, n = len0 + len1;
    Config c = {.hidden = H * D, .n_head = H, .head_dim = D, .n_layer = 1, .ffn = 4, .vocab = 8, .max_pos = cap, .embed_dim = H * D};
    KVCache kc, kg;
    kv_init(&kc, &c, 2, cap, q4 ? DT_Q4 : DT_F32, 64);
    gpu_kv_init(&kg, &c, 2, cap, q4 ? DT_Q4 : DT_F16, 64);
    Scratch sc, sg;
    scratch_init(&sc, &c, n, cap);
    gpu_scratch_init(&sg, &c, n, cap);
    int *tok = malloc(sizeof(int) * 3 * (size_t)n), *slot = tok + n, *pos = slot + n;
    for (int step = 0; step < 2; step++) {
        int rows = 0;
        for (int sq = 0; sq < 2; sq++)
            for (int p = step ? lens[sq] : 0; p < (step ? lens[sq] + 1 : lens[sq]); p++) { tok[rows] = 1; slot[rows] = sq; pos[rows++] = p; }
        size_t e = (size_t)rows * c.hidden;
        for (size_t i = 0; i < e; i++) { sc.q[i] = frand() * 2; sc.k[i] = frand() * 2; sc.v[i] = frand(); }
        put(sg.q, sc.q, 4 * e);
        put(sg.k, sc.k, 4 * e);
        put(sg.v, sc.v, 4 * e);
        float *poison = malloc(4 * e), *att = malloc(4 * e);
        for (size_t i = 0; i < e; i++) poison[i] = NAN;
        put(sg.att, poison, 4 * e);
        Step st = {rows, tok, slot, pos, NULL};
        gpu_step_upload(&st, &sg);
        cpu_backend.attention(&c, &kc.layer[0], &st, &sc);
        gpu_backend.attention(&c, &kg.layer[0], &st, &sg);
        host_of(att, sg.att, e);
        char what[64];
        snprintf(what, sizeof what, "attention %s H%d D%d T%d,%d %s", q4 ? "q4" : "f16", H, D, len0 + step, len1 + step, step ? "decode" : "prefill");
        compare(what, sc.att, att, e, NULL, q4 ? 6e-2f : 1e-2f);
        free(poison); free(att);
    }
    kv_free(&kc); gpu_kv_free(&kg); scratch_free(&sc); gpu_scratch_free(&sg);
    free(tok);
}

/* Greedy and seeded sampling against opt.c's sample() on identical logits: an
 * identity lm_head turns f16-exact hidden rows into exactly those logits. The
 * rows are distinct multiples of 1/64 (no ties but the planted one), so the
 * CPU's order (vocabulary order, or largest first with top-k / top-p) decides
 * every draw; rounding (expf, float sums) may move one draw near a boundary. */
static void test_sampling(void) {
    enum { V = 1000, R = 128 };
    Model dm;
    memset(&dm, 0, sizeof dm);
    dm.cfg.vocab = dm.cfg.embed_dim = V;
    uint16_t *eye = calloc((size_t)V * V, 2);
    for (int i = 0; i < V; i++) eye[(size_t)i * V + i] = f32_to_f16(1.0f);
    Tensor t = {.dtype = DT_F16, .rows = V, .cols = V, .data = eye, .name = "identity"};
    dm.lm_head = gpu_tensor_upload(&t);
    float *fin = malloc(sizeof(float) * R * V), u[R];
    int perm[V], rows[R], tok[R], cpu[R];
    for (int r = 0; r < R; r++) {
        rows[r] = r;
        for (int i = 0; i < V; i++) perm[i] = i;
        for (int i = V - 1; i > 0; i--) { int j = (int)(splitmix64(&rng_state) % (uint64_t)(i + 1)), k = perm[i]; perm[i] = perm[j]; perm[j] = k; }
        for (int i = 0; i < V; i++) fin[(size_t)r * V + i] = (float)(perm[i] - V / 2) / (r & 1 ? 64 : 16); /* flat and peaked rows */
    }
    fin[5] = fin[900] = 40; /* row 0: two first maxima, the first wins */
    for (int i = 0; i < V; i++) fin[V + i] = NAN; /* row 1: all NaN, greedy gives 0 as the CPU's argmax */
    float *fd = dev_of(fin, (size_t)R * V);
    ProbId *work = malloc(sizeof(ProbId) * V);
    SamplerCfg cfgs[] = {{0, 0, 1}, {0.8f, 0, 1}, {1.0f, 40, 1}, {1.3f, 0, 0.9f}, {0.7f, 0, 0.5f}, {1.0f, 1, 1}, {2.0f, 300, 1}};
    for (size_t ci = 0; ci < sizeof cfgs / sizeof *cfgs; ci++) {
        SamplerCfg *sc = &cfgs[ci];
        int r0 = sc->temperature > 0 ? 2 : 0, bad = 0, at = -1; /* rows 0 and 1 are greedy's */
        for (int r = 0; r < R; r++) {
            uint64_t g[2], h[2];
            rng_seed(g, 7 + ci, (uint64_t)r);
            memcpy(h, g, sizeof g);
            u[r] = (float)((double)(rng_next(h) >> 11) * 0x1.0p-53); /* as engine_run draws it for the GPU */
            cpu[r] = r < r0 ? -1 : sample(sc, fin + (size_t)r * V, V, g, work);
        }
        gpu_logits(&dm, fd, V, rows, R, NULL, sc->temperature, sc->top_k, sc->top_p, u, tok, NULL);
        for (int r = r0; r < R; r++) if (tok[r] != cpu[r]) { bad++; if (at < 0) at = r; }
        bool ok = bad <= (sc->temperature > 0 ? 1 : 0);
        printf("%s sampling T %.1f top-k %d top-p %.2f: %d of %d draws differ from the CPU's%s", ok ? "ok  " : "FAIL", sc->temperature, sc->top_k,
               sc->top_p, bad, R - r0, at >= 0 ? "" : "\n");
        if (at >= 0) printf(" (first: row %d, cpu %d gpu %d)\n", at, cpu[at], tok[at]);
        fails += !ok;
    }
    cudaFree(fd); cudaFree((void *)dm.lm_head.data);
    free(eye); free(fin); free(work);
}

/* --quick: a subset that still reaches every kernel and path, for the sanitizers' slow runs */
int main(int argc, char **argv) {
    bool quick = argc > 1 && !strcmp(argv[1], "--quick");
    if (argc > 2 || (argc > 1 && !quick)) { fprintf(stderr, "usage: test_gpu [--quick]\n"); return 2; }
    simd_init();
    if (!gpu_available()) { /* no GPU: skip; a GPU this binary cannot use: fail */
        bool seen = system("nvidia-smi -L >/dev/null 2>&1") == 0;
        printf("test_gpu: %s: no usable GPU (%s)%s\n", seen ? "FAIL" : "skipped", gpu_describe(), seen ? " though nvidia-smi lists one" : "");
        return seen;
    }
    rng_state = (uint64_t)time(NULL);
    printf("test_gpu: seed %llu on %s\n", (unsigned long long)rng_state, gpu_describe());
    int rows[] = {1, 3, 8, 9, 33, 100}, shapes[][2] = {{17, 48}, {100, 256}, {64, 1000}, {257, 64}};
    size_t nr = quick ? 5 : 6, ns = quick ? 2 : 4; /* quick: rows 1 to 33 (GEMV and GEMM), two shapes */
    DType dts[] = {DT_F16, DT_BF16, DT_Q4, DT_I8};
    for (int d = 0; d < 4; d++)
        for (size_t r = 0; r < nr; r += quick ? 2 : 1)
            for (size_t s = 0; s < ns; s++)
                test_linear(dts[d], rows[r], shapes[s][0], shapes[s][1], (int)(r & 1), (int)(s == 1), (int)(s != 2), 0, 64);
    for (size_t r = 0; r < nr; r++) test_linear(DT_I8, rows[r], 100, 256, 0, 0, 1, 0.02f, 0); /* static scale: saturates */
    /* 4-bit at every group, GEMV and GEMM rows (one, two and four row tiles),
     * K past a group's and a word's end (1000), x not in float4s (90, under a
     * group of 128), whole tiles (64 x 256); quick: two of each */
    int q4_rows[] = {1, 3, 64, 65, 200}, q4_shapes[][2] = {{100, 1000}, {130, 90}, {64, 256}}, groups[] = {32, 64, 128};
    for (int g = 0; g < 3; g++)
        for (int r = quick; r < 5; r += quick ? 2 : 1)
            for (int s = 0; s < (quick ? 2 : 3); s++)
                test_linear(DT_Q4, q4_rows[r], q4_shapes[s][0], q4_shapes[s][1], r & 1, s == 1, s != 2, 0, groups[g]);
    /* q, k, v of one input: shared narrowing (f16, bf16), shared and unshared
     * int8 quantization, mixed formats; one GEMV step and one of GEMM tiles */
    for (int r = 0; r < 2; r++) {
        int rows = r ? 70 : 5;
        float dyn[3] = {0, 0, 0}, stat[3] = {0.02f, 0.02f, 0.03f};
        test_qkv((const DType[3]){DT_F16, DT_F16, DT_F16}, dyn, rows, 192);
        test_qkv((const DType[3]){DT_BF16, DT_BF16, DT_BF16}, dyn, rows, 192);
        test_qkv((const DType[3]){DT_I8, DT_I8, DT_I8}, dyn, rows, 192);
        test_qkv((const DType[3]){DT_I8, DT_I8, DT_I8}, stat, rows, 192);
        test_qkv((const DType[3]){DT_F16, DT_BF16, DT_Q4}, dyn, rows, 192);
    }
    test_layernorm(1, 768);
    test_layernorm(7, 1000);
    test_layernorm(33, 4096);
    /* prefills of many rows take one split of several chunks; decode steps many splits */
    test_attention(3, 64, 0, 23, 17);
    test_attention(3, 64, 1, 23, 17);
    test_attention(4, 64, 0, 600, 130);
    if (!quick) {
        test_attention(2, 80, 0, 23, 17);
        test_attention(4, 128, 0, 23, 17);
        test_attention(2, 80, 0, 300, 129);
        test_attention(2, 128, 0, 1030, 5);
        test_attention(2, 128, 1, 700, 64);
    }
    test_sampling();
    printf("test_gpu: %s (%d failed)\n", fails ? "FAIL" : "ok", fails);
    return fails != 0;
}
