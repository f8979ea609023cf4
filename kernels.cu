/* kernels.cu: the GPU backend behind opt.h's plain C functions.
 *
 * The CUDA runtime is linked statically and cuBLASLt is loaded with dlopen,
 * so the same binary starts on a machine without a GPU, a driver, or the CUDA
 * libraries, and runs on the CPU after saying why once.
 *
 * On the device: weights in their stored 16-bit format (f32 checkpoints are
 * narrowed to f16 on upload; 4-bit stays 4-bit), activations in f32 like the
 * CPU path, GEMMs on tensor cores (16-bit inputs, f32 accumulation and
 * output, bias and ReLU in cuBLASLt's epilogue), the KV cache in f16 (or
 * 4-bit), attention in f32 split over positions (flash-decoding), sampling
 * on the device.
 *
 * Sections: runtime and errors, cuBLASLt, memory and upload, kernels, the
 * backend ops, logits and sampling, probes. */
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cublasLt.h>
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "opt.h"
}

/* ----------------------------------------------------------------------------
 * Runtime and errors: every CUDA and cuBLAS call is checked and a failure
 * names the call's file:line and, for allocations, what did not fit. */

#define checkCuda(call) cuda_check((call), __FILE__, __LINE__, #call)
#define checkCublas(call) cublas_check((call), __FILE__, __LINE__, #call)

static void cuda_check(cudaError_t e, const char *file, int line, const char *what) {
    if (e != cudaSuccess) die_at(file, line, "CUDA: %s: %s", what, cudaGetErrorString(e));
}

static const char *(*lt_status_name)(cublasStatus_t);
static void cublas_check(cublasStatus_t s, const char *file, int line, const char *what) {
    if (s != CUBLAS_STATUS_SUCCESS) die_at(file, line, "cuBLAS: %s: %s", what, lt_status_name ? lt_status_name(s) : "error");
}

static int g_gpu_state = -1;      /* -1 unknown, 0 none, 1 usable */
static int g_gpu_present;         /* a GPU is there, usable or not (not just a CUDA build) */
static char g_gpu_desc[256];      /* what gpu_describe() reports */
static cudaStream_t g_stream;     /* every kernel and the engine's copies */
static cudaStream_t g_copies[3]; /* offloading's uploads, downloads and weight uploads, overlapping g_stream */
static int g_sms;                 /* the GPU's multiprocessors: how finely attention splits */

static void *lt_lib;              /* dlopen'd cuBLASLt */
static decltype(&cublasLtCreate) lt_create;
static decltype(&cublasLtMatmul) lt_matmul;
static decltype(&cublasLtMatmulDescCreate) lt_desc_create;
static decltype(&cublasLtMatmulDescDestroy) lt_desc_destroy;
static decltype(&cublasLtMatmulDescSetAttribute) lt_desc_set;
static decltype(&cublasLtMatrixLayoutCreate) lt_layout_create;
static decltype(&cublasLtMatrixLayoutDestroy) lt_layout_destroy;
static decltype(&cublasLtMatmulPreferenceCreate) lt_pref_create;
static decltype(&cublasLtMatmulPreferenceSetAttribute) lt_pref_set;
static decltype(&cublasLtMatmulPreferenceDestroy) lt_pref_destroy;
static decltype(&cublasLtMatmulAlgoGetHeuristic) lt_heuristic;
static cublasLtHandle_t g_lt;
static void *g_workspace;         /* cuBLASLt's */
static const size_t WORKSPACE = 32u << 20;

/* Loads cuBLASLt by name; false (with the reason in g_gpu_desc) when absent. */
static bool lt_load(void) {
    static const char *const names[] = {"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so.11", "libcublasLt.so"};
    for (size_t i = 0; i < sizeof names / sizeof *names && !lt_lib; i++) lt_lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    if (!lt_lib) { snprintf(g_gpu_desc, sizeof g_gpu_desc, "cuBLASLt not found (%s)", dlerror()); return false; }
#define SYM(var, name) if (!(*(void **)&var = dlsym(lt_lib, name))) { snprintf(g_gpu_desc, sizeof g_gpu_desc, "cuBLASLt lacks %s", name); return false; }
    SYM(lt_create, "cublasLtCreate") SYM(lt_matmul, "cublasLtMatmul") SYM(lt_desc_create, "cublasLtMatmulDescCreate")
    SYM(lt_desc_destroy, "cublasLtMatmulDescDestroy") SYM(lt_desc_set, "cublasLtMatmulDescSetAttribute")
    SYM(lt_layout_create, "cublasLtMatrixLayoutCreate") SYM(lt_layout_destroy, "cublasLtMatrixLayoutDestroy")
    SYM(lt_pref_create, "cublasLtMatmulPreferenceCreate") SYM(lt_pref_set, "cublasLtMatmulPreferenceSetAttribute")
    SYM(lt_pref_destroy, "cublasLtMatmulPreferenceDestroy") SYM(lt_heuristic, "cublasLtMatmulAlgoGetHeuristic")
    SYM(lt_status_name, "cublasLtGetStatusName")
#undef SYM
    return true;
}

/* Finds out once whether there is a usable device, and if not, why: no driver
 * and no device are the common case of a CUDA build on a CPU machine (g_gpu_present
 * 0, not worth a word unless a GPU was asked for); a device that is there but
 * cannot be used is (g_gpu_present 1). */
static void gpu_probe_state(void) {
    if (g_gpu_state >= 0) return;
    g_gpu_state = 0;
    /* the runtime reports a missing driver as an old one: look for the driver itself */
    void *drv = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!drv) { snprintf(g_gpu_desc, sizeof g_gpu_desc, "no NVIDIA driver: libcuda.so.1 not found"); return; }
    dlclose(drv);
    int n = 0, dv = 0, rv = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e == cudaErrorInsufficientDriver) {
        cudaDriverGetVersion(&dv);
        cudaRuntimeGetVersion(&rv);
        g_gpu_present = 1;
        snprintf(g_gpu_desc, sizeof g_gpu_desc, "the NVIDIA driver is too old: it supports CUDA %d.%d, this build's runtime is CUDA %d.%d",
                 dv / 1000, dv % 1000 / 10, rv / 1000, rv % 1000 / 10);
        return;
    }
    if (e == cudaErrorNoDevice || (e == cudaSuccess && n == 0)) { snprintf(g_gpu_desc, sizeof g_gpu_desc, "no CUDA device"); return; }
    g_gpu_present = 1;
    if (e != cudaSuccess) { snprintf(g_gpu_desc, sizeof g_gpu_desc, "CUDA: %s", cudaGetErrorString(e)); return; }
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, 0) != cudaSuccess) { snprintf(g_gpu_desc, sizeof g_gpu_desc, "cannot query device 0"); return; }
    if (p.major < 8) { snprintf(g_gpu_desc, sizeof g_gpu_desc, "%.120s is compute %d.%d; opt needs 8.0 or newer", p.name, p.major, p.minor); return; }
    if (!lt_load()) return;
    snprintf(g_gpu_desc, sizeof g_gpu_desc, "%.200s, compute %d.%d, %.1f GiB", p.name, p.major, p.minor, (double)p.totalGlobalMem / (1 << 30));
    g_gpu_state = 1;
}

/* Starts the device side once: context, streams, cuBLASLt handle,
 * workspace. One that cannot start (a busy or exclusive device, no memory
 * left) is unusable, with the reason in g_gpu_desc: auto mode then runs on
 * the CPU, --device gpu dies saying why. */
static bool gpu_try_start(void) {
    static bool started;
    if (started) return true;
    gpu_probe_state();
    if (g_gpu_state != 1) return false;
    cudaError_t e = cudaSetDevice(0);
    if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking);
    for (int i = 0; i < 3 && e == cudaSuccess; i++) e = cudaStreamCreateWithFlags(&g_copies[i], cudaStreamNonBlocking);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&g_sms, cudaDevAttrMultiProcessorCount, 0);
    if (e == cudaSuccess) e = cudaMalloc(&g_workspace, WORKSPACE);
    cublasStatus_t ls = e == cudaSuccess ? lt_create(&g_lt) : CUBLAS_STATUS_SUCCESS;
    if (e != cudaSuccess || ls != CUBLAS_STATUS_SUCCESS) {
        snprintf(g_gpu_desc, sizeof g_gpu_desc, "cannot start it: %s", e != cudaSuccess ? cudaGetErrorString(e) : lt_status_name(ls));
        g_gpu_state = 0;
        return false;
    }
    started = true;
    return true;
}

static void gpu_start(void) {
    if (!gpu_try_start()) die("no usable GPU: %s", g_gpu_desc);
}

extern "C" int gpu_available(void) { gpu_probe_state(); return g_gpu_state == 1; }
extern "C" int gpu_present(void) { gpu_probe_state(); return g_gpu_present; }
extern "C" const char *gpu_describe(void) { gpu_probe_state(); return g_gpu_desc; }

/* ----------------------------------------------------------------------------
 * Memory and upload. Allocations name what did not fit. */

static double g_gpu_used; /* bytes we hold on the device */

static void *dev_alloc(size_t bytes, const char *what) {
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        size_t fr = 0, tot = 0;
        cudaMemGetInfo(&fr, &tot);
        die("GPU out of memory allocating %.2f GiB for %s (%.2f GiB free of %.2f GiB; use a policy that offloads, or --device cpu)",
            (double)bytes / (1 << 30), what, (double)fr / (1 << 30), (double)tot / (1 << 30));
    }
    g_gpu_used += (double)bytes;
    return p;
}

/* Host to device, complete on return. On g_stream like everything else: a
 * legacy-stream cudaMemcpy does not order with the non-blocking g_stream,
 * and from pageable memory it may return before its last DMA lands. */
static void dev_put(void *d, const void *src, size_t bytes) {
    checkCuda(cudaMemcpyAsync(d, src, bytes, cudaMemcpyHostToDevice, g_stream));
    checkCuda(cudaStreamSynchronize(g_stream));
}

static void *dev_upload(const void *src, size_t bytes, const char *what) {
    void *d = dev_alloc(bytes, what);
    dev_put(d, src, bytes);
    return d;
}

__global__ void k_f32_to_f16(const float *in, __half *out, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) out[i] = __float2half_rn(in[i]);
}

static int grid_for(size_t n, int block) {
    size_t g = (n + block - 1) / block;
    return (int)(g > 65535 ? 65535 : g < 1 ? 1 : g);
}

/* A matrix on the device: 16-bit and 4-bit as stored, f32 narrowed to f16
 * (tensor cores take 16-bit inputs). Rows may be split in two host places. */
static Tensor dev_matrix(const Tensor *t) {
    Tensor d = *t;
    if (!t->data) return d;
    size_t rb = tensor_row_bytes(t), n1 = (size_t)(t->data2 ? t->split : t->rows);
    if (t->dtype == DT_I8) { /* int8 rows and their per-row scales */
        if (t->data2) die("%s: int8 weights split across tiers are not supported on the GPU", t->name); /* before reading past data */
        d.data = dev_upload(t->data, (size_t)t->rows * t->cols, t->name ? t->name : "int8 weights");
        d.scale = (const float *)dev_upload(t->scale, sizeof(float) * (size_t)t->rows, "int8 weight scales");
        d.tier = TIER_GPU;
        return d;
    }
    if (t->dtype == DT_F32) {
        size_t n = (size_t)t->rows * t->cols;
        float *tmp = (float *)dev_alloc(n * 4, "an f32 weight being narrowed");
        dev_put(tmp, t->data, n1 * rb);
        if (n1 < (size_t)t->rows) dev_put((char *)tmp + n1 * rb, t->data2, ((size_t)t->rows - n1) * rb);
        __half *h = (__half *)dev_alloc(n * 2, t->name ? t->name : "a weight");
        k_f32_to_f16<<<grid_for(n, 256), 256, 0, g_stream>>>(tmp, h, n);
        checkCuda(cudaStreamSynchronize(g_stream));
        checkCuda(cudaFree(tmp));
        g_gpu_used -= (double)n * 4;
        d.dtype = DT_F16;
        d.data = h;
    } else {
        char *p = (char *)dev_alloc(rb * (size_t)t->rows, t->name ? t->name : "a weight");
        dev_put(p, t->data, n1 * rb);
        if (n1 < (size_t)t->rows) dev_put(p + n1 * rb, t->data2, ((size_t)t->rows - n1) * rb);
        d.data = p;
    }
    d.data2 = NULL;
    d.split = 0;
    d.tier = TIER_GPU;
    return d;
}

/* One tensor to the device (kernel tests). */
extern "C" Tensor gpu_tensor_upload(const Tensor *t) { gpu_start(); return dev_matrix(t); }

static float *dev_vector(const float *v, int64_t n) { return v ? (float *)dev_upload(v, sizeof(float) * (size_t)n, "biases and LayerNorms") : NULL; }

/* The model with every tensor on the device; dev's pointers are device memory. */
extern "C" void gpu_model_upload(const Model *m, Model *dev) {
    gpu_start();
    const Config *c = &m->cfg;
    *dev = *m;
    dev->embed = dev_matrix(&m->embed);
    dev->pos = dev_matrix(&m->pos);
    if (m->proj_in.data) { dev->proj_in = dev_matrix(&m->proj_in); dev->proj_out = dev_matrix(&m->proj_out); }
    dev->lm_head = m->lm_head.data == m->embed.data ? dev->embed : dev_matrix(&m->lm_head);
    dev->lnfw = dev_vector(m->lnfw, c->hidden);
    dev->lnfb = dev_vector(m->lnfb, c->hidden);
    dev->layers = (Layer *)check_malloc(sizeof(Layer) * (size_t)c->n_layer, "layers");
    for (int l = 0; l < c->n_layer; l++) {
        const Layer *L = &m->layers[l];
        Layer *D = &dev->layers[l];
        D->q = dev_matrix(&L->q); D->k = dev_matrix(&L->k); D->v = dev_matrix(&L->v); D->o = dev_matrix(&L->o);
        D->fc1 = dev_matrix(&L->fc1); D->fc2 = dev_matrix(&L->fc2);
        D->qb = dev_vector(L->qb, c->hidden); D->kb = dev_vector(L->kb, c->hidden); D->vb = dev_vector(L->vb, c->hidden);
        D->ob = dev_vector(L->ob, c->hidden); D->fc1b = dev_vector(L->fc1b, c->ffn); D->fc2b = dev_vector(L->fc2b, c->hidden);
        D->ln1w = dev_vector(L->ln1w, c->hidden); D->ln1b = dev_vector(L->ln1b, c->hidden);
        D->ln2w = dev_vector(L->ln2w, c->hidden); D->ln2b = dev_vector(L->ln2b, c->hidden);
    }
}

/* Bytes the model takes on the device (f32 matrices become f16). */
extern "C" double gpu_model_bytes(const Model *m) {
    double b = 0;
    const Config *c = &m->cfg;
    const Tensor *t[4] = {&m->embed, &m->pos, &m->proj_in, &m->proj_out};
    for (int i = 0; i < 4; i++) if (t[i]->data) b += (double)t[i]->rows * tensor_row_bytes(t[i]) / (t[i]->dtype == DT_F32 ? 2 : 1);
    if (m->lm_head.data != m->embed.data) b += (double)m->lm_head.rows * tensor_row_bytes(&m->lm_head) / (m->lm_head.dtype == DT_F32 ? 2 : 1);
    for (int l = 0; l < c->n_layer; l++) {
        const Layer *L = &m->layers[l];
        const Tensor *ts[6] = {&L->q, &L->k, &L->v, &L->o, &L->fc1, &L->fc2};
        for (int i = 0; i < 6; i++) b += (double)ts[i]->rows * tensor_row_bytes(ts[i]) / (ts[i]->dtype == DT_F32 ? 2 : 1);
    }
    return b + 4.0 * c->n_layer * (9.0 * c->hidden + c->ffn);
}

/* Free device memory; 0 when no context can be made (gpu_available() then says so). */
extern "C" double gpu_free_bytes(void) {
    if (!gpu_try_start()) return 0;
    size_t fr = 0, tot = 0;
    checkCuda(cudaMemGetInfo(&fr, &tot));
    return (double)fr;
}

/* ----------------------------------------------------------------------------
 * Kernels. f32 arithmetic throughout; 16-bit only as storage. */

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Sum (or max) over the block; every thread gets the result. sh: 32 floats. */
__device__ float block_sum(float v, float *sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (!lane) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0f;
    return warp_sum(v);
}
__device__ float block_max(float v, float *sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (!lane) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : -INFINITY;
    return warp_max(v);
}

__device__ __forceinline__ float ld_w(const void *p, DType dt, size_t i) {
    return dt == DT_BF16 ? __bfloat162float(((const __nv_bfloat16 *)p)[i]) : __half2float(((const __half *)p)[i]);
}

/* Element e of a 4-bit row (see quant.c: words of 16 codes, broadcast order). */
__device__ __forceinline__ float q4_at(const uint8_t *row, int G, int e) {
    const uint8_t *blk = row + (size_t)(e / G) * (4 + G / 2);
    float s = __half2float(*(const __half *)blk), m = __half2float(*(const __half *)(blk + 2));
    int i = e % G, nib = (i & ~15) + (i & 15) / 2 + 8 * (i & 1);
    int code = blk[4 + nib / 2] >> (4 * (nib & 1)) & 15;
    return fmaf((float)code, s, m);
}

/* LayerNorm: a block per row, two passes in f32, eps 1e-5. */
__global__ void k_layernorm(float *out, const float *x, const float *w, const float *b, int n) {
    __shared__ float sh[32];
    const float *xr = x + (size_t)blockIdx.x * n;
    float *o = out + (size_t)blockIdx.x * n, s = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += xr[i];
    float mean = block_sum(s, sh) / n, v = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) { float d = xr[i] - mean; v += d * d; }
    float rstd = rsqrtf(block_sum(v, sh) / n + 1e-5f);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float y = (xr[i] - mean) * rstd;
        o[i] = w ? y * w[i] + b[i] : y;
    }
}

/* Rows of a table (token ids, or positions + offset) as f32. */
__global__ void k_embed(float *out, const void *table, DType dt, int G, size_t rb, int cols, const int *idx, int offset) {
    int r = blockIdx.x, row = idx[r] + offset;
    const char *src = (const char *)table + rb * (size_t)row;
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        out[(size_t)r * cols + c] = dt == DT_Q4 ? q4_at((const uint8_t *)src, G, c) : ld_w(src, dt, c);
}

__global__ void k_add(float *y, const float *x, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) y[i] += x[i];
}

template <typename T> __device__ T to16(float v);
template <> __device__ __half to16<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __nv_bfloat16 to16<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T> struct __align__(8) Quad { T v[4]; }; /* four 16-bit values, one 8-byte store */

/* n contiguous floats to 16 bits: a 16-byte load and an 8-byte store per four
 * where x is 16-byte aligned (cudaMalloc's and our scratch rows are) */
template <typename T>
__global__ void k_narrow(const float *x, T *out, size_t n) {
    size_t i0 = blockIdx.x * (size_t)blockDim.x + threadIdx.x, step = (size_t)gridDim.x * blockDim.x;
    if (!((uintptr_t)x & 15) && !(n & 3)) {
        for (size_t i = i0; i < n / 4; i += step) {
            float4 v = ((const float4 *)x)[i];
            Quad<T> q = {{to16<T>(v.x), to16<T>(v.y), to16<T>(v.z), to16<T>(v.w)}};
            ((Quad<T> *)out)[i] = q;
        }
    } else
        for (size_t i = i0; i < n; i += step) out[i] = to16<T>(x[i]);
}

/* Epilogue for our own GEMM kernels: + bias, + y (residual), ReLU. */
__device__ __forceinline__ void store_out(float *y, const float *bias, int n, float v, int acc, int relu) {
    if (bias) v += bias[n];
    if (acc) v += *y;
    if (relu) v = fmaxf(v, 0.0f);
    *y = v;
}

/* 4-bit GEMV for up to 8 rows: a warp per weight row, each lane a 16-code
 * word at a time, dequantized in registers, x read 16 bytes at a time; no
 * 16-bit copy of the matrix. */
__global__ void k_q4_gemv(const float *x, int ldx, int M, const uint8_t *w, size_t rb, int K, int G,
                          const float *bias, float *y, int ldy, int N, int acc, int relu) {
    int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (n >= N) return;
    const uint8_t *row = w + rb * (size_t)n;
    float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    bool vec = !(K & 15) && !(ldx & 3) && !((uintptr_t)x & 15); /* whole words, rows 16-byte aligned */
    for (int k0 = lane * 16; k0 < K; k0 += 32 * 16) {
        const uint8_t *blk = row + (size_t)(k0 / G) * (4 + G / 2);
        float s = __half2float(*(const __half *)blk), m = __half2float(*(const __half *)(blk + 2));
        const uint32_t *wp = (const uint32_t *)(blk + 4 + (k0 % G) / 2); /* 4-byte aligned: blocks are 4 + G/2 bytes */
        unsigned long long word = wp[0] | (unsigned long long)wp[1] << 32;
        float wv[16];
        for (int e = 0; e < 16; e++) wv[e] = fmaf((float)((word >> (4 * (e / 2) + 32 * (e & 1))) & 15), s, m);
        if (vec) /* the same sums in the same order, x four at a time */
            for (int i = 0; i < 8; i++) {
                if (i >= M) break;
                const float4 *xp = (const float4 *)(x + (size_t)i * ldx + k0);
                for (int j = 0; j < 4; j++) {
                    float4 v = xp[j];
                    a[i] = fmaf(v.x, wv[4 * j], a[i]); a[i] = fmaf(v.y, wv[4 * j + 1], a[i]);
                    a[i] = fmaf(v.z, wv[4 * j + 2], a[i]); a[i] = fmaf(v.w, wv[4 * j + 3], a[i]);
                }
            }
        else
            for (int e = 0; e < 16 && k0 + e < K; e++)
                for (int i = 0; i < 8; i++) if (i < M) a[i] = fmaf(x[(size_t)i * ldx + k0 + e], wv[e], a[i]);
    }
    for (int i = 0; i < M; i++) {
        float v = warp_sum(a[i]);
        if (!lane) store_out(y + (size_t)i * ldy + n, bias, n, v, acc, relu);
    }
}

/* 4-bit GEMM for more rows: 64x64 output tiles on tensor cores (WMMA), the
 * weights dequantized into shared memory 32 columns of K at a time, a 16-code
 * word per thread: G is a template parameter, so a word's block and offset
 * are a shift and a mask, and its scale and minimum are read once for 16
 * values. Each value is q4_at's fmaf(code, s, m) rounded to f16, the same
 * operands as the per-element form. */
#include <mma.h>
#define QT 64
#define QK 32
template <int G>
__global__ void k_q4_gemm(const float *x, int ldx, int M, const uint8_t *w, size_t rb, int K,
                          const float *bias, float *y, int ldy, int N, int acc, int relu) {
    using namespace nvcuda;
    static_assert(G % 16 == 0 && QK % 16 == 0 && QT * QK / 16 == 128, "a 16-code word per thread per step");
    __shared__ __align__(32) __half xs[QT][QK + 8], ws[QT][QK + 8]; /* WMMA pointers are 256-bit aligned */
    __shared__ __align__(32) float cs[QT][QT + 4];
    int m0 = blockIdx.y * QT, n0 = blockIdx.x * QT, warp = threadIdx.x >> 5; /* 4 warps: 2 x 2 of 32 x 32 */
    int wr = threadIdx.x >> 1, wk = (threadIdx.x & 1) * 16; /* this thread's word: tile row, first column */
    const uint8_t *wrow = n0 + wr < N ? w + rb * (size_t)(n0 + wr) : NULL;
    bool vec = !(K & 3) && !(ldx & 3) && !((uintptr_t)x & 15); /* x rows in whole, aligned float4s */
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[2][2];
    for (int i = 0; i < 2; i++) for (int j = 0; j < 2; j++) wmma::fill_fragment(c[i][j], 0.0f);
    for (int k0 = 0; k0 < K; k0 += QK) {
        if (vec)
            for (int e = threadIdx.x; e < QT * QK / 4; e += blockDim.x) {
                int r = e / (QK / 4), k = e % (QK / 4) * 4, m = m0 + r;
                float4 v = m < M && k0 + k < K ? *(const float4 *)(x + (size_t)m * ldx + k0 + k) : make_float4(0, 0, 0, 0);
                *(__half2 *)&xs[r][k] = __floats2half2_rn(v.x, v.y);
                *(__half2 *)&xs[r][k + 2] = __floats2half2_rn(v.z, v.w);
            }
        else
            for (int e = threadIdx.x; e < QT * QK; e += blockDim.x) {
                int r = e / QK, k = e % QK, m = m0 + r;
                xs[r][k] = __float2half_rn(m < M && k0 + k < K ? x[(size_t)m * ldx + k0 + k] : 0.0f);
            }
        int k = k0 + wk;
        __align__(16) __half2 hv[8];
        if (wrow && k < K) { /* a row's last block is whole (zero codes past K), so the word is in it */
            const uint8_t *blk = wrow + (size_t)((unsigned)k / G) * (4 + G / 2);
            float s = __half2float(*(const __half *)blk), mn = __half2float(*(const __half *)(blk + 2));
            const uint32_t *wp = (const uint32_t *)(blk + 4 + (unsigned)k % G / 2); /* 4-byte aligned: blocks are 4 + G/2 bytes */
            uint32_t lo = wp[0], hi = wp[1]; /* even elements in lo, odd in hi, nibble e/2 */
            for (int p = 0; p < 8; p++) {
                float a = fmaf((float)(lo >> 4 * p & 15), s, mn), b = fmaf((float)(hi >> 4 * p & 15), s, mn);
                hv[p] = __floats2half2_rn(k + 2 * p < K ? a : 0.0f, k + 2 * p + 1 < K ? b : 0.0f);
            }
        } else
            for (int p = 0; p < 8; p++) hv[p] = __floats2half2_rn(0.0f, 0.0f);
        ((uint4 *)&ws[wr][wk])[0] = ((const uint4 *)hv)[0]; /* two 16-byte stores: rows are 80 bytes */
        ((uint4 *)&ws[wr][wk])[1] = ((const uint4 *)hv)[1];
        __syncthreads();
        for (int kk = 0; kk < QK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb[2];
            for (int i = 0; i < 2; i++) wmma::load_matrix_sync(fa[i], &xs[(warp >> 1) * 32 + 16 * i][kk], QK + 8);
            for (int j = 0; j < 2; j++) wmma::load_matrix_sync(fb[j], &ws[(warp & 1) * 32 + 16 * j][kk], QK + 8);
            for (int i = 0; i < 2; i++) for (int j = 0; j < 2; j++) wmma::mma_sync(c[i][j], fa[i], fb[j], c[i][j]);
        }
        __syncthreads();
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++) wmma::store_matrix_sync(&cs[(warp >> 1) * 32 + 16 * i][(warp & 1) * 32 + 16 * j], c[i][j], QT + 4, wmma::mem_row_major);
    __syncthreads();
    for (int e = threadIdx.x; e < QT * QT; e += blockDim.x) {
        int r = e / QT, cc = e % QT, m = m0 + r, n = n0 + cc;
        if (m < M && n < N) store_out(y + (size_t)m * ldy + n, bias, n, cs[r][cc], acc, relu);
    }
}

/* SmoothQuant W8A8: each activation row quantized to int8 (per token:
 * absmax / 127; or the static per-tensor scale), rounding half to even and
 * saturating like the CPU path, so the int32 accumulations are the CPU's
 * exactly; y = acc * s_x[m] * s_w[n] (+ bias, + y, ReLU). */
__global__ void k_quant_rows(const float *x, int ldx, int K, float act_scale, int8_t *q, float *sx) {
    __shared__ float sh[32];
    const float *xr = x + (size_t)blockIdx.x * ldx;
    float s = act_scale;
    if (s <= 0) {
        float m = 0;
        for (int k = threadIdx.x; k < K; k += blockDim.x) m = fmaxf(m, fabsf(xr[k]));
        m = block_max(m, sh);
        s = m > 0 ? m / 127.0f : 1.0f;
    }
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        int v = __float2int_rn(xr[k] / s);
        q[(size_t)blockIdx.x * K + k] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
    }
    if (!threadIdx.x) sx[blockIdx.x] = s;
}

/* up to 8 rows: a warp per output, dp4a over 4 int8 at a time */
__global__ void k_i8_gemv(const int8_t *q, const float *sx, int M, const int8_t *w, const float *sw, int K, int N,
                          const float *bias, float *y, int ldy, int acc, int relu) {
    int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (n >= N) return;
    const int8_t *wr = w + (size_t)n * K;
    int a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int k = lane * 4; k < K; k += 128) {
        if (k + 4 <= K && !(((uintptr_t)(wr + k)) & 3) && !(K & 3)) {
            int wv = *(const int *)(wr + k);
            for (int i = 0; i < 8; i++) if (i < M) a[i] = __dp4a(*(const int *)(q + (size_t)i * K + k), wv, a[i]);
        } else
            for (int e = k; e < k + 4 && e < K; e++)
                for (int i = 0; i < 8; i++) if (i < M) a[i] += (int)q[(size_t)i * K + e] * (int)wr[e];
    }
    for (int i = 0; i < M; i++) {
        int v = a[i];
        for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (!lane) store_out(y + (size_t)i * ldy + n, bias, n, (float)v * (sx[i] * sw[n]), acc, relu); /* the CPU's order */
    }
}

/* more rows: 64x64 tiles of int32 on tensor cores (WMMA s8, 16x16x16) */
__global__ void k_i8_gemm(const int8_t *q, const float *sx, int M, const int8_t *w, const float *sw, int K, int N,
                          const float *bias, float *y, int ldy, int acc, int relu) {
    using namespace nvcuda;
    /* a 16-wide slice of K per plane: every WMMA pointer 256-bit aligned (a
     * row of QK + 16 put the second slice 16 bytes off) */
    __shared__ __align__(32) int8_t xs[QK / 16][QT][16], ws[QK / 16][QT][16];
    __shared__ __align__(32) int cs[QT][QT + 4];
    int m0 = blockIdx.y * QT, n0 = blockIdx.x * QT, warp = threadIdx.x >> 5;
    wmma::fragment<wmma::accumulator, 16, 16, 16, int> c[2][2];
    for (int i = 0; i < 2; i++) for (int j = 0; j < 2; j++) wmma::fill_fragment(c[i][j], 0);
    for (int k0 = 0; k0 < K; k0 += QK) {
        for (int e = threadIdx.x; e < QT * QK; e += blockDim.x) {
            int r = e / QK, k = e % QK, m = m0 + r, n = n0 + r;
            xs[k / 16][r][k % 16] = m < M && k0 + k < K ? q[(size_t)m * K + k0 + k] : 0;
            ws[k / 16][r][k % 16] = n < N && k0 + k < K ? w[(size_t)n * K + k0 + k] : 0;
        }
        __syncthreads();
        for (int kk = 0; kk < QK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, signed char, wmma::row_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, signed char, wmma::col_major> fb[2];
            for (int i = 0; i < 2; i++) wmma::load_matrix_sync(fa[i], &xs[kk / 16][(warp >> 1) * 32 + 16 * i][0], 16);
            for (int j = 0; j < 2; j++) wmma::load_matrix_sync(fb[j], &ws[kk / 16][(warp & 1) * 32 + 16 * j][0], 16);
            for (int i = 0; i < 2; i++) for (int j = 0; j < 2; j++) wmma::mma_sync(c[i][j], fa[i], fb[j], c[i][j]);
        }
        __syncthreads();
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++) wmma::store_matrix_sync(&cs[(warp >> 1) * 32 + 16 * i][(warp & 1) * 32 + 16 * j], c[i][j], QT + 4, wmma::mem_row_major);
    __syncthreads();
    for (int e = threadIdx.x; e < QT * QT; e += blockDim.x) {
        int r = e / QT, cc = e % QT, m = m0 + r, n = n0 + cc;
        if (m < M && n < N) store_out(y + (size_t)m * ldy + n, bias, n, (float)cs[r][cc] * (sx[m] * sw[n]), acc, relu);
    }
}

/* The KV cache on the device: one key and one value area per (sequence,
 * head), rows of head_dim, f16 (cap, D) or 4-bit (cap, row bytes). */
__global__ void k_kv_store(const float *k, const float *v, const int *slot, const int *pos, char *const *kp, char *const *vp,
                           int H, int D, int hidden, int q4, int G) {
    int r = blockIdx.x, h = blockIdx.y, area = slot[r] * H + h, t = pos[r];
    if (!kp[area]) return; /* another device's area (offloading's split attention) */
    const float *kr = k + (size_t)r * hidden + h * D, *vr = v + (size_t)r * hidden + h * D;
    if (!q4) {
        __half *K = (__half *)kp[area] + (size_t)t * D, *V = (__half *)vp[area] + (size_t)t * D;
        for (int d = threadIdx.x; d < D; d += blockDim.x) { K[d] = __float2half_rn(kr[d]); V[d] = __float2half_rn(vr[d]); }
        return;
    }
    /* one thread per group: min, max, f16 scale and min, codes (quant.c's rounding) */
    size_t rb = (size_t)((D + G - 1) / G) * (4 + G / 2);
    for (int which = 0; which < 2; which++) {
        const float *src = which ? vr : kr;
        uint8_t *dst = (uint8_t *)(which ? vp : kp)[area] + rb * (size_t)t;
        for (int g0 = threadIdx.x * G; g0 < D; g0 += blockDim.x * G) {
            int n = D - g0 < G ? D - g0 : G;
            float mn = INFINITY, mx = -INFINITY;
            for (int i = 0; i < n; i++) { mn = fminf(mn, src[g0 + i]); mx = fmaxf(mx, src[g0 + i]); }
            uint8_t *blk = dst + (size_t)(g0 / G) * (4 + G / 2);
            __half hs = __float2half_rn((mx - mn) / 15.0f), hm = __float2half_rn(mn);
            memcpy(blk, &hs, 2);
            memcpy(blk + 2, &hm, 2);
            float s = __half2float(hs), m = __half2float(hm);
            for (int i = 0; i < G / 2; i++) blk[4 + i] = 0;
            if (s == 0) continue;
            for (int i = 0; i < n; i++) {
                float q = rintf((src[g0 + i] - m) / s);
                int c = q < 0 ? 0 : q > 15 ? 15 : (int)q, nib = (i & ~15) + (i & 15) / 2 + 8 * (i & 1);
                blk[4 + nib / 2] |= (uint8_t)(c << (4 * (nib & 1)));
            }
        }
    }
}

/* Attention, flash-decoding style: the positions of a (row, head) are split
 * across gridDim.z blocks (so a decode step at batch 1 still fills the GPU),
 * each walking its span ACH positions at a time with an online softmax (so
 * shared memory does not grow with the context); every block leaves its
 * running max m, sum l of exp(score - m) and exp-weighted value sum o (D) in
 * part, and k_attention_combine merges them. All in f32: nothing of size
 * (batch x heads x seq x seq) ever reaches global memory. */
#define ACH 256

/* Element (t, d) of a cache area: f16 rows, or 4-bit rows of rb bytes. */
__device__ __forceinline__ float kv_at(const char *area, int q4, size_t rb, int G, int D, int t, int d) {
    return q4 ? q4_at((const uint8_t *)area + rb * t, G, d) : __half2float(((const __half *)area)[(size_t)t * D + d]);
}

/* Block (r, h, z): positions [z * span, min(T, (z + 1) * span)) of row r, head h. */
__global__ void k_attention_part(const float *q, const int *slot, const int *pos, char *const *kp, char *const *vp,
                                 int H, int D, int hidden, float scale, int span, float *part, int q4, int G) {
    extern __shared__ float sm[]; /* q (D), a chunk's scores (ACH), value sums (ng x D) */
    __shared__ float red[32];
    int r = blockIdx.x, h = blockIdx.y, z = blockIdx.z, area = slot[r] * H + h, T = pos[r] + 1;
    int t0 = z * span, t1 = T < t0 + span ? T : t0 + span;
    if (!kp[area] || t0 >= T) return; /* the CPU's area, or past this row's positions */
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int ng = (int)blockDim.x / D > 0 ? (int)blockDim.x / D : 1; /* positions whose values are summed at once */
    float *qs = sm, *sc = sm + D, *acc = sc + ACH;
    size_t rb = (size_t)((D + G - 1) / G) * (4 + G / 2);
    const char *K = kp[area], *V = vp[area];
    for (int d = threadIdx.x; d < D; d += blockDim.x) qs[d] = q[(size_t)r * hidden + h * D + d] * scale; /* HF scales q */
    for (int e = threadIdx.x; e < ng * D; e += blockDim.x) acc[e] = 0;
    /* f16 keys with D a power-of-two multiple of 8, 16-byte aligned: lpp lanes
     * per position, 8 halves (16 bytes) each, 32 / lpp positions per warp step */
    int lpp = D / 8, sub = lane / (lpp ? lpp : 1), j = lane % (lpp ? lpp : 1);
    bool vec = !q4 && !(D & 7) && lpp <= 32 && !(lpp & (lpp - 1)) && !((uintptr_t)K & 15);
    float m = -INFINITY, l = 0; /* the same in every thread */
    for (int c0 = t0; c0 < t1; c0 += ACH) {
        int n = t1 - c0 < ACH ? t1 - c0 : ACH;
        __syncthreads(); /* qs written; the last chunk's sc read */
        if (vec)
            for (int tb = warp * (32 / lpp); tb < n; tb += nw * (32 / lpp)) { /* the whole warp, for the shuffles */
                int t = tb + sub;
                float s = 0;
                if (t < n) {
                    uint4 raw = *(const uint4 *)((const __half *)K + (size_t)(c0 + t) * D + 8 * j);
                    const __half2 *h2 = (const __half2 *)&raw;
                    for (int u = 0; u < 4; u++) {
                        float2 f = __half22float2(h2[u]);
                        s += qs[8 * j + 2 * u] * f.x + qs[8 * j + 2 * u + 1] * f.y;
                    }
                }
                for (int o = lpp / 2; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o); /* within the lpp lanes */
                if (!j && t < n) sc[t] = s;
            }
        else
            for (int t = warp; t < n; t += nw) {
                float s = 0;
                for (int d = lane; d < D; d += 32) s += qs[d] * kv_at(K, q4, rb, G, D, c0 + t, d);
                s = warp_sum(s);
                if (!lane) sc[t] = s;
            }
        __syncthreads();
        float cm = -INFINITY;
        for (int t = threadIdx.x; t < n; t += blockDim.x) cm = fmaxf(cm, sc[t]);
        float m2 = fmaxf(m, block_max(cm, red)), alpha = __expf(m - m2), ps = 0;
        for (int t = threadIdx.x; t < n; t += blockDim.x) { float e = __expf(sc[t] - m2); sc[t] = e; ps += e; }
        l = l * alpha + block_sum(ps, red); /* its barriers also publish sc */
        for (int e = threadIdx.x; e < ng * D; e += blockDim.x) { /* item (g, d): positions g, g + ng, ... of the chunk */
            int g = e / D, d = e % D;
            float o = acc[e] * alpha;
            for (int t = g; t < n; t += ng) o += sc[t] * kv_at(V, q4, rb, G, D, c0 + t, d);
            acc[e] = o;
        }
        m = m2;
    }
    __syncthreads();
    float *pr = part + (((size_t)r * H + h) * gridDim.z + z) * (D + 2);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float o = 0;
        for (int g = 0; g < ng; g++) o += acc[g * D + d];
        pr[2 + d] = o;
    }
    if (!threadIdx.x) { pr[0] = m; pr[1] = l; }
}

/* The splits of (row, head) merged: out = sum_z o_z e^(m_z - M) / sum_z l_z e^(m_z - M). */
__global__ void k_attention_combine(const float *part, const int *slot, const int *pos, char *const *kp, int H, int D, int hidden,
                                    int S, int span, float *out) {
    int r = blockIdx.x, h = blockIdx.y, area = slot[r] * H + h, nz = (pos[r] + span) / span; /* splits holding 0..pos */
    if (!kp[area]) return;
    const float *pr = part + ((size_t)r * H + h) * S * (D + 2);
    float M = -INFINITY, L = 0;
    for (int z = 0; z < nz; z++) M = fmaxf(M, pr[z * (D + 2)]);
    for (int z = 0; z < nz; z++) L += pr[z * (D + 2) + 1] * __expf(pr[z * (D + 2)] - M);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float o = 0;
        for (int z = 0; z < nz; z++) o += pr[z * (D + 2) + 2 + d] * __expf(pr[z * (D + 2)] - M);
        out[(size_t)r * hidden + h * D + d] = o / L;
    }
}

/* ----------------------------------------------------------------------------
 * cuBLASLt GEMMs: y (rows, N) = x (rows, K) . W^T in "TN" form: W as a
 * column-major (K, N) matrix transposed, x as (K, rows), y as (N, rows), all
 * column-major views of our row-major buffers. Plans are cached per shape. */

typedef struct {
    int N, K, rows, dt, epi, acc;  /* the key */
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t a, b, c;
    cublasLtMatmulAlgo_t algo;
} LtPlan;
static LtPlan g_plans[512];
static int g_n_plans;

static LtPlan *lt_plan(int N, int K, int rows, DType dt, int epi, int acc) {
    for (int i = 0; i < g_n_plans; i++) {
        LtPlan *p = &g_plans[i];
        if (p->N == N && p->K == K && p->rows == rows && p->dt == (int)dt && p->epi == epi && p->acc == acc) return p;
    }
    if (g_n_plans == (int)(sizeof g_plans / sizeof *g_plans)) { /* recycle; shapes are few */
        for (int i = 0; i < g_n_plans; i++) {
            lt_desc_destroy(g_plans[i].desc);
            lt_layout_destroy(g_plans[i].a); lt_layout_destroy(g_plans[i].b); lt_layout_destroy(g_plans[i].c);
        }
        g_n_plans = 0;
    }
    LtPlan *p = &g_plans[g_n_plans++];
    memset(p, 0, sizeof *p);
    p->N = N; p->K = K; p->rows = rows; p->dt = (int)dt; p->epi = epi; p->acc = acc;
    cudaDataType t16 = dt == DT_BF16 ? CUDA_R_16BF : CUDA_R_16F;
    checkCublas(lt_desc_create(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    checkCublas(lt_desc_set(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    checkCublas(lt_desc_set(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    cublasLtEpilogue_t e = (cublasLtEpilogue_t)epi;
    checkCublas(lt_desc_set(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &e, sizeof e));
    checkCublas(lt_layout_create(&p->a, t16, K, N, K));
    checkCublas(lt_layout_create(&p->b, t16, K, rows, K));
    checkCublas(lt_layout_create(&p->c, CUDA_R_32F, N, rows, N));
    cublasLtMatmulPreference_t pref;
    checkCublas(lt_pref_create(&pref));
    uint64_t ws = WORKSPACE;
    checkCublas(lt_pref_set(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    cublasLtMatmulHeuristicResult_t res;
    int got = 0;
    cublasStatus_t st = lt_heuristic(g_lt, p->desc, p->a, p->b, p->c, p->c, pref, 1, &res, &got);
    lt_pref_destroy(pref);
    if (st != CUBLAS_STATUS_SUCCESS || !got) /* NOT_SUPPORTED is how it says none */
        die("cuBLASLt has no algorithm for a %d x %d x %d %s GEMM (%s)", rows, N, K, dtype_names[dt], lt_status_name(st));
    p->algo = res.algo;
    return p;
}

static void *g_x16;          /* x narrowed to 16 bits for the tensor cores, or quantized to int8 */
static size_t g_x16_cap;     /* its bytes */

extern "C" void gpu_graphs_reset(void);

static void *g_part;         /* attention's partial sums per (row, head, split) */
static size_t g_part_cap;    /* its bytes */

/* A scratch buffer (*p, *cap bytes) of at least `need` bytes. Captured graphs
 * hold its address, so a growth drops them; gpu_scratch_init reserves a
 * run's maximum up front, so the engine never grows one between a capture
 * and a replay. */
static void scratch_reserve(void **p, size_t *cap, size_t need, const char *what) {
    if (need <= *cap) return;
    cudaStreamCaptureStatus cs;
    checkCuda(cudaStreamIsCapturing(g_stream, &cs));
    if (cs != cudaStreamCaptureStatusNone) die("internal: %s grow during a graph capture", what);
    checkCuda(cudaStreamSynchronize(g_stream));
    gpu_graphs_reset();
    if (*p) { checkCuda(cudaFree(*p)); g_gpu_used -= (double)*cap; }
    *p = dev_alloc(need, what);
    *cap = need;
}
#define x16_reserve(need) scratch_reserve(&g_x16, &g_x16_cap, (need), "activations narrowed to 16 or 8 bits")

/* g_x16's bytes for `rows` rows of K: 16-bit, or int8 rows then their scales */
static size_t x16_bytes(int rows, int K) {
    size_t a = (size_t)rows * K * 2, b = ((size_t)rows * K + 15) / 16 * 16 + 4 * (size_t)rows;
    return a > b ? a : b;
}

/* x as w's GEMM reads it, into g_x16: narrowed to 16 bits (f16, bf16
 * weights), or int8 rows then their scales (int8 weights); 4-bit kernels
 * read x itself. */
static void linear_input(const float *x, const Tensor *w, int rows) {
    int K = (int)w->cols;
    size_t n = (size_t)rows * K;
    if (w->dtype == DT_Q4) return;
    if (w->dtype != DT_I8 && w->dtype != DT_F16 && w->dtype != DT_BF16) die("%s: the GPU computes on f16, bf16, 4-bit or int8 weights", w->name ? w->name : "a weight");
    x16_reserve(x16_bytes(rows, K));
    if (w->dtype == DT_I8) k_quant_rows<<<rows, 256, 0, g_stream>>>(x, K, K, w->act_scale, (int8_t *)g_x16, (float *)((char *)g_x16 + (n + 15) / 16 * 16));
    else if (w->dtype == DT_BF16) k_narrow<__nv_bfloat16><<<grid_for(n / 4 + 1, 256), 256, 0, g_stream>>>(x, (__nv_bfloat16 *)g_x16, n);
    else k_narrow<__half><<<grid_for(n / 4 + 1, 256), 256, 0, g_stream>>>(x, (__half *)g_x16, n);
}

/* Whether linear_input leaves the same g_x16 from one x for weights a and b:
 * the same kind and width (and for int8 the same activation scale). */
static bool linear_input_same(const Tensor *a, const Tensor *b) {
    return a->dtype == b->dtype && a->cols == b->cols && a->act_scale == b->act_scale;
}

/* y = x . W^T + b (+ y, ReLU) from what linear_input left for w (x itself for 4-bit) */
static void linear_gemm(float *y, const float *x, const Tensor *w, const float *b, int rows, int acc, int relu) {
    int N = (int)w->rows, K = (int)w->cols;
    dim3 tiles((N + QT - 1) / QT, (rows + QT - 1) / QT);
    if (w->dtype == DT_Q4) {
        size_t rb = tensor_row_bytes(w);
        const uint8_t *wd = (const uint8_t *)w->data;
        if (rows <= 8) k_q4_gemv<<<(N + 3) / 4, 128, 0, g_stream>>>(x, K, rows, wd, rb, K, w->group, b, y, N, N, acc, relu);
        else if (w->group == 32) k_q4_gemm<32><<<tiles, 128, 0, g_stream>>>(x, K, rows, wd, rb, K, b, y, N, N, acc, relu);
        else if (w->group == 64) k_q4_gemm<64><<<tiles, 128, 0, g_stream>>>(x, K, rows, wd, rb, K, b, y, N, N, acc, relu);
        else if (w->group == 128) k_q4_gemm<128><<<tiles, 128, 0, g_stream>>>(x, K, rows, wd, rb, K, b, y, N, N, acc, relu);
        else die("%s: 4-bit group %d: the GPU's GEMM takes 32, 64 or 128", w->name ? w->name : "a weight", w->group);
        checkCuda(cudaGetLastError());
        return;
    }
    if (w->dtype == DT_I8) {
        const int8_t *q = (const int8_t *)g_x16;
        const float *sx = (const float *)((char *)g_x16 + ((size_t)rows * K + 15) / 16 * 16);
        if (rows <= 8) k_i8_gemv<<<(N + 3) / 4, 128, 0, g_stream>>>(q, sx, rows, (const int8_t *)w->data, w->scale, K, N, b, y, N, acc, relu);
        else k_i8_gemm<<<tiles, 128, 0, g_stream>>>(q, sx, rows, (const int8_t *)w->data, w->scale, K, N, b, y, N, acc, relu);
        checkCuda(cudaGetLastError());
        return;
    }
    int epi = b ? (relu ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_BIAS) : (relu ? CUBLASLT_EPILOGUE_RELU : CUBLASLT_EPILOGUE_DEFAULT);
    LtPlan *p = lt_plan(N, K, rows, w->dtype, epi, acc);
    if (b) checkCublas(lt_desc_set(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &b, sizeof b));
    float one = 1.0f, beta = acc ? 1.0f : 0.0f;
    checkCublas(lt_matmul(g_lt, p->desc, &one, w->data, p->a, g_x16, p->b, &beta, y, p->c, y, p->c, &p->algo, g_workspace, WORKSPACE, g_stream));
}

static void gpu_linear(float *y, const float *x, const Tensor *w, const float *b, int rows, int acc, int relu) {
    if (rows <= 0) return;
    linear_input(x, w, rows);
    linear_gemm(y, x, w, b, rows, acc, relu);
}

/* ----------------------------------------------------------------------------
 * The backend ops (opt.h's Backend), the device scratch, cache and steps. */

static void gpu_layernorm(float *out, const float *x, const float *w, const float *b, int rows, int n) {
    if (rows > 0) k_layernorm<<<rows, 256, 0, g_stream>>>(out, x, w, b, n);
}

static void gpu_attention(const Config *c, const KVLayer *kv, const Step *st, Scratch *s) {
    int n = st->n, H = c->n_head, D = c->head_dim, q4 = kv->dtype == DT_Q4;
    const int *slot = st->dev + n, *pos = st->dev + 2 * n;
    k_kv_store<<<dim3(n, H), 64, 0, g_stream>>>(s->k, s->v, slot, pos, kv->k, kv->v, H, D, c->hidden, q4, kv->group);
    /* splits of the positions: enough blocks for 8 per SM, spans of at least 64 positions */
    int ng = 128 / D > 0 ? 128 / D : 1, most = (kv->cap + 63) / 64, S = 8 * g_sms / (n * H);
    S = S < 1 ? 1 : S > most ? most : S;
    int span = (kv->cap + S - 1) / S;
    scratch_reserve(&g_part, &g_part_cap, sizeof(float) * (size_t)n * H * S * (D + 2), "attention's partial sums");
    size_t smem = sizeof(float) * (size_t)(D + ACH + ng * D);
    k_attention_part<<<dim3(n, H, S), 128, smem, g_stream>>>(s->q, slot, pos, kv->k, kv->v, H, D, c->hidden, 1.0f / sqrtf((float)D), span,
                                                            (float *)g_part, q4, kv->group);
    k_attention_combine<<<dim3(n, H), 128, 0, g_stream>>>((const float *)g_part, slot, pos, kv->k, H, D, c->hidden, S, span, s->att);
    checkCuda(cudaGetLastError());
}

static void gpu_embed(const Tensor *t, const Step *st, int offset, float *out) {
    const int *idx = offset ? st->dev + 2 * st->n : st->dev;
    k_embed<<<st->n, 256, 0, g_stream>>>(out, t->data, t->dtype, t->group, tensor_row_bytes(t), (int)t->cols, idx, offset);
}

static void gpu_add(float *y, const float *x, size_t n) { k_add<<<grid_for(n, 256), 256, 0, g_stream>>>(y, x, n); }
static void gpu_copy(float *y, const float *x, size_t n) { checkCuda(cudaMemcpyAsync(y, x, n * 4, cudaMemcpyDeviceToDevice, g_stream)); }

/* OPT_GPU_PROFILE=1: each op between two events, GEMMs apart from the rest,
 * for `opt bench`'s breakdown (graphs are off then: timing needs the ops),
 * and per kind of op in one line on stderr at exit (bench/gpu.sh's table). */
enum { PK_LINEAR16, PK_LINEAR4, PK_LINEAR8, PK_ATTENTION, PK_LAYERNORM, PK_EMBED, PK_ADD, PK_COPY, PK_LOGITS, PK_COUNT };
static const char *const prof_names[PK_COUNT] = {"linear-16bit", "linear-4bit", "linear-int8", "attention", "layernorm",
                                                 "embed", "add", "copy", "logits+sampling"};
static int g_profile = -1;
static double g_prof_ms[2];         /* GEMM, everything else but the logits (gpu_profile) */
static double g_prof_op[PK_COUNT];  /* ms per kind */
static long g_prof_n[PK_COUNT];     /* calls per kind */
static cudaEvent_t g_ev[2];

static void prof_report(void) {
    fprintf(stderr, "opt: GPU time by op:");
    for (int k = 0; k < PK_COUNT; k++) if (g_prof_n[k]) fprintf(stderr, " %s %.3f ms / %ld,", prof_names[k], g_prof_op[k], g_prof_n[k]);
    fputc('\n', stderr);
}

static void prof_begin(void) {
    if (g_profile < 0) g_profile = getenv("OPT_GPU_PROFILE") && atoi(getenv("OPT_GPU_PROFILE")) > 0;
    if (!g_profile) return;
    if (!g_ev[0]) { checkCuda(cudaEventCreate(&g_ev[0])); checkCuda(cudaEventCreate(&g_ev[1])); atexit(prof_report); }
    checkCuda(cudaEventRecord(g_ev[0], g_stream));
}

static void prof_end(int kind) {
    if (!g_profile) return;
    checkCuda(cudaEventRecord(g_ev[1], g_stream));
    checkCuda(cudaEventSynchronize(g_ev[1]));
    float ms = 0;
    checkCuda(cudaEventElapsedTime(&ms, g_ev[0], g_ev[1]));
    g_prof_op[kind] += ms;
    g_prof_n[kind]++;
    if (kind != PK_LOGITS) g_prof_ms[kind <= PK_LINEAR8 ? 0 : 1] += ms;
}

extern "C" int gpu_profile(double ms[2]) {
    if (g_profile < 0) g_profile = getenv("OPT_GPU_PROFILE") && atoi(getenv("OPT_GPU_PROFILE")) > 0;
    if (ms) { ms[0] = g_prof_ms[0]; ms[1] = g_prof_ms[1]; }
    return g_profile;
}

static int linear_kind(const Tensor *w) { return w->dtype == DT_Q4 ? PK_LINEAR4 : w->dtype == DT_I8 ? PK_LINEAR8 : PK_LINEAR16; }

static void p_linear(float *y, const float *x, const Tensor *w, const float *b, int rows, int acc, int relu) {
    prof_begin(); gpu_linear(y, x, w, b, rows, acc, relu); prof_end(linear_kind(w));
}

/* q, k and v from x narrowed (or quantized) once, the first GEMM's profile
 * taking the narrowing. Reusing g_x16 is safe here because it spans only this
 * call: the narrowing reads x on g_stream after everything queued before
 * (offloading's uploads into x, its dxs[b], are ordered before layer_forward
 * by the up[b] event), and the three GEMMs follow it on g_stream with no
 * other op between, while only ops on g_stream write g_x16. What is not
 * safe, and why gpu_linear keeps no such reuse across calls, is keying a
 * narrowed copy on x's address: the same address gets new contents that
 * gpu_linear never sees written (offloading's dxs[b] refilled by copies on
 * the upload stream for every batch, s->h by every LayerNorm, a test's
 * cudaMemcpy), and every other GEMM overwrites g_x16 between. Nothing
 * outlives this call, so there is nothing to invalidate. */
static void p_qkv(const Layer *L, const float *x, int rows, Scratch *s) {
    const Tensor *w[3] = {&L->q, &L->k, &L->v};
    const float *b[3] = {L->qb, L->kb, L->vb};
    float *y[3] = {s->q, s->k, s->v};
    if (rows <= 0) return;
    for (int i = 0; i < 3; i++) {
        prof_begin();
        if (!i || !linear_input_same(w[i], w[i - 1])) linear_input(x, w[i], rows);
        linear_gemm(y[i], x, w[i], b[i], rows, 0, 0);
        prof_end(linear_kind(w[i]));
    }
}
static void p_layernorm(float *out, const float *x, const float *w, const float *b, int rows, int n) {
    prof_begin(); gpu_layernorm(out, x, w, b, rows, n); prof_end(PK_LAYERNORM);
}
static void p_attention(const Config *c, const KVLayer *kv, const Step *st, Scratch *s) {
    prof_begin(); gpu_attention(c, kv, st, s); prof_end(PK_ATTENTION);
}
static void p_embed(const Tensor *t, const Step *st, int offset, float *out) { prof_begin(); gpu_embed(t, st, offset, out); prof_end(PK_EMBED); }
static void p_add(float *y, const float *x, size_t n) { prof_begin(); gpu_add(y, x, n); prof_end(PK_ADD); }
static void p_copy(float *y, const float *x, size_t n) { prof_begin(); gpu_copy(y, x, n); prof_end(PK_COPY); }

extern "C" const Backend gpu_backend = {"gpu", p_linear, p_qkv, p_layernorm, p_attention, p_embed, p_add, p_copy};

extern "C" void gpu_scratch_init(Scratch *s, const Config *c, int rows, int cap) {
    gpu_start();
    memset(s, 0, sizeof *s);
    s->be = &gpu_backend;
    s->rows = rows;
    s->score_cap = cap;
    size_t h = c->hidden, e = c->embed_dim, big = h > e ? h : e, r = rows;
    s->x = (float *)dev_alloc(4 * r * h, "activations");
    s->h = (float *)dev_alloc(4 * r * big, "activations");
    s->q = (float *)dev_alloc(4 * r * h, "activations");
    s->k = (float *)dev_alloc(4 * r * h, "activations");
    s->v = (float *)dev_alloc(4 * r * h, "activations");
    s->att = (float *)dev_alloc(4 * r * h, "activations");
    s->f = (float *)dev_alloc(4 * r * c->ffn, "activations");
    s->e = (float *)dev_alloc(4 * r * e, "activations");
    s->grp = (int *)dev_alloc(sizeof(int) * 3 * r, "step indices"); /* the step's tok, slot, pos */
    x16_reserve(x16_bytes(rows, (size_t)c->ffn > big ? c->ffn : (int)big)); /* the widest GEMM input */
    scratch_reserve(&g_part, &g_part_cap, sizeof(float) * ((size_t)rows * c->n_head + 8 * g_sms) * (c->head_dim + 2), "attention's partial sums");
}

extern "C" void gpu_scratch_free(Scratch *s) {
    void *p[] = {s->x, s->h, s->q, s->k, s->v, s->att, s->f, s->e, s->grp};
    for (size_t i = 0; i < sizeof p / sizeof *p; i++) if (p[i]) cudaFree(p[i]);
}

/* The step's indices into the scratch's device copy (st->dev). */
extern "C" void gpu_step_upload(Step *st, Scratch *s) {
    int n = st->n;
    checkCuda(cudaMemcpyAsync(s->grp, st->tok, sizeof(int) * n, cudaMemcpyHostToDevice, g_stream));
    checkCuda(cudaMemcpyAsync(s->grp + n, st->slot, sizeof(int) * n, cudaMemcpyHostToDevice, g_stream));
    checkCuda(cudaMemcpyAsync(s->grp + 2 * n, st->pos, sizeof(int) * n, cudaMemcpyHostToDevice, g_stream));
    st->dev = s->grp;
}

/* f16 (or 4-bit) cache areas on the device, with device pointer tables. */
extern "C" void gpu_kv_init(KVCache *kv, const Config *c, int n_slot, int cap, DType dt, int group) {
    gpu_start();
    int q4 = dt == DT_Q4, g = kv_group(c->head_dim, group), areas = n_slot * c->n_head;
    size_t hb = q4 ? q4_row_bytes(c->head_dim, g) * (size_t)cap : 2 * (size_t)c->head_dim * cap, per = hb * (size_t)areas;
    kv->n_layer = c->n_layer;
    kv->layer = (KVLayer *)check_calloc(sizeof(KVLayer) * (size_t)c->n_layer, "the KV cache");
    kv->mem = (char *)dev_alloc(2 * per * (size_t)c->n_layer, "the KV cache (lower -b, or --compress-cache)");
    checkCuda(cudaMemsetAsync(kv->mem, 0, 2 * per * (size_t)c->n_layer, g_stream));
    char **host = (char **)check_malloc(sizeof(char *) * 2 * (size_t)areas * c->n_layer, "cache tables");
    char **dev = (char **)dev_alloc(sizeof(char *) * 2 * (size_t)areas * c->n_layer, "cache tables");
    for (int l = 0; l < c->n_layer; l++) {
        char *base = kv->mem + 2 * per * (size_t)l;
        for (int a = 0; a < areas; a++) {
            host[2 * (size_t)areas * l + a] = base + hb * (size_t)a;
            host[2 * (size_t)areas * l + areas + a] = base + per + hb * (size_t)a;
        }
        kv->layer[l] = (KVLayer){q4 ? DT_Q4 : DT_F16, n_slot, c->n_head, c->head_dim, cap, g, hb,
                                 dev + 2 * (size_t)areas * l, dev + 2 * (size_t)areas * l + areas};
    }
    dev_put(dev, host, sizeof(char *) * 2 * (size_t)areas * c->n_layer);
    free(host);
    kv->ptrs = dev;
}

extern "C" void gpu_kv_free(KVCache *kv) {
    cudaFree(kv->mem);
    cudaFree(kv->ptrs);
    free(kv->layer);
}

extern "C" void gpu_sync(void) { checkCuda(cudaStreamSynchronize(g_stream)); }

/* ----------------------------------------------------------------------------
 * Logits and sampling on the device: lm_head over the rows that need it,
 * then per row either the log-probability of a target (score) or the next
 * token (greedy, or temperature with top-k / top-p thresholds found by
 * bisection, then an inverse-CDF draw in vocabulary order from the host's
 * uniform number). Only ids and log-probs come back over PCIe. */

__global__ void k_gather(const float *in, int ld, const int *rows, float *out, int cols) {
    int r = blockIdx.x;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out[(size_t)r * cols + c] = in[(size_t)rows[r] * ld + c];
}

__global__ void k_logprob(const float *logits, int V, const int *target, float *out) {
    __shared__ float sh[32];
    const float *x = logits + (size_t)blockIdx.x * V;
    float mx = -INFINITY, s = 0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, x[i]);
    mx = block_max(mx, sh);
    for (int i = threadIdx.x; i < V; i += blockDim.x) s += __expf(x[i] - mx);
    s = block_sum(s, sh);
    if (!threadIdx.x) out[blockIdx.x] = x[target[blockIdx.x]] - mx - logf(s);
}

#define SB 256 /* threads of the sampling kernel */

/* Over a row of probabilities p >= 0, compared by their bits (which order
 * non-negative floats as unsigned integers): the largest bit pattern t such
 * that the count (or the mass) of the p at or above t reaches `need` (or,
 * strict, exceeds it). Exact, in at most 30 passes; every thread gets it. */
__device__ unsigned p_select(const float *p, int V, bool mass, float need, bool strict, float *sh) {
    unsigned lo = 0, hi = 0x3f800000u; /* p <= 1 */
    while (lo < hi) {
        unsigned mid = lo + (hi - lo + 1) / 2;
        float s = 0;
        for (int i = threadIdx.x; i < V; i += blockDim.x)
            if (__float_as_uint(p[i]) >= mid) s += mass ? p[i] : 1.0f;
        s = block_sum(s, sh);
        if (strict ? s > need : s >= need) lo = mid; else hi = mid - 1;
    }
    return lo;
}

/* One row per block. Greedy: the first maximum. Otherwise the CPU sampler's
 * draw (opt.c sample()): p = exp((x - max) / T); top-k keeps the k largest,
 * top-p the smallest prefix of the rest (largest first) with that share of
 * its mass; then the token where the cumulative sum passes u * total, summed
 * in the CPU's order: vocabulary order without top-k and top-p, else largest
 * p first, ties by id. The p overwrite the logits. They differ from the
 * CPU's only where rounding decides (a tie at the k-th largest keeps every
 * tied token here). */
__global__ void k_sample(float *logits, int V, float temp, int topk, float topp, const float *uniform, int *out) {
    __shared__ float sh[32], part[SB];
    __shared__ int ish[SB];
    float *x = logits + (size_t)blockIdx.x * V, *p = x;
    int tid = threadIdx.x;
    if (temp <= 0) { /* greedy: the first maximum, as torch.argmax */
        float best = -INFINITY;
        int bi = V;
        for (int i = tid; i < V; i += SB) if (x[i] > best) { best = x[i]; bi = i; }
        part[tid] = best; ish[tid] = bi;
        __syncthreads();
        for (int o = SB / 2; o; o >>= 1) {
            if (tid < o && (part[tid + o] > part[tid] || (part[tid + o] == part[tid] && ish[tid + o] < ish[tid]))) { part[tid] = part[tid + o]; ish[tid] = ish[tid + o]; }
            __syncthreads();
        }
        if (!tid) out[blockIdx.x] = ish[0] < V ? ish[0] : 0; /* all NaN or -inf: 0, as the CPU's argmax */
        return;
    }
    float mx = -INFINITY;
    for (int i = tid; i < V; i += SB) mx = fmaxf(mx, x[i]);
    mx = block_max(mx, sh);
    for (int i = tid; i < V; i += SB) { float e = expf((x[i] - mx) / temp); p[i] = e >= 0 ? e : 0; } /* NaN: never drawn */
    bool sorted = (topk > 0 && topk < V) || topp < 1;
    if (topk > 0 && topk < V) {
        unsigned t = p_select(p, V, false, (float)topk, false, sh);
        for (int i = tid; i < V; i += SB) if (__float_as_uint(p[i]) < t) p[i] = 0;
    }
    float total = 0;
    for (int i = tid; i < V; i += SB) total += p[i];
    total = block_sum(total, sh);
    if (topp < 1) {
        unsigned t = p_select(p, V, true, topp * total, false, sh);
        total = 0;
        for (int i = tid; i < V; i += SB) { if (__float_as_uint(p[i]) < t) p[i] = 0; total += p[i]; }
        total = block_sum(total, sh);
    }
    float target = uniform[blockIdx.x] * total;
    unsigned only = 0; /* sorted: the draw lies among the p with these bits, in id order */
    if (sorted) {
        only = p_select(p, V, true, target, true, sh);
        float before = 0;
        for (int i = tid; i < V; i += SB) if (__float_as_uint(p[i]) > only) before += p[i];
        target -= block_sum(before, sh);
    }
    /* the walk in id order (over all p, or those with bits `only`): each thread a contiguous chunk */
    int chunk = (V + SB - 1) / SB, c0 = tid * chunk, c1 = c0 + chunk < V ? c0 + chunk : V;
    float mine = 0;
    for (int i = c0; i < c1; i++) if (!sorted || __float_as_uint(p[i]) == only) mine += p[i];
    part[tid] = mine;
    __syncthreads();
    if (!tid) { float acc = 0; for (int t = 0; t < SB; t++) { float v = part[t]; part[t] = acc; acc += v; } }
    __syncthreads();
    float acc = part[tid];
    ish[tid] = -1;
    if (target >= acc && (tid == SB - 1 || target < part[tid + 1]))
        for (int i = c0; i < c1; i++)
            if ((!sorted || __float_as_uint(p[i]) == only) && p[i] > 0) { acc += p[i]; ish[tid] = i; if (target < acc) break; }
    __syncthreads();
    if (!tid) {
        int pick = -1;
        for (int t = 0; t < SB && pick < 0; t++) pick = ish[t];
        if (pick < 0) /* rounding put the target past the end: the last token in that order */
            for (int i = 0; i < V; i++) if (p[i] > 0 && (pick < 0 || !sorted || p[i] <= p[pick])) pick = i;
        out[blockIdx.x] = pick >= 0 ? pick : 0;
    }
}

/* Rows `rows` (cnt, host indices) of the final hidden states fin (device,
 * row stride ld): score mode fills lp[i] with log p(target[i]); generate
 * mode fills tok[i] (greedy when temp is 0; u[i] uniform in [0, 1)). */
extern "C" void gpu_logits(const Model *dm, const float *fin, int ld, const int *rows, int cnt, const int *target,
                           float temp, int topk, float topp, const float *u, int *tok, float *lp) {
    static float *hid, *logits, *fl;
    static int *idx, *ti, cap;
    const Config *c = &dm->cfg;
    if (cnt > cap) {
        if (cap) { cudaFree(hid); cudaFree(logits); cudaFree(fl); cudaFree(idx); cudaFree(ti); }
        cap = cnt;
        hid = (float *)dev_alloc(4 * (size_t)cap * c->embed_dim, "logits input");
        logits = (float *)dev_alloc(4 * (size_t)cap * c->vocab, "logits");
        fl = (float *)dev_alloc(4 * (size_t)cap, "sampling");
        idx = (int *)dev_alloc(4 * (size_t)cap, "sampling");
        ti = (int *)dev_alloc(4 * (size_t)cap, "sampling");
    }
    prof_begin();
    checkCuda(cudaMemcpyAsync(idx, rows, 4 * (size_t)cnt, cudaMemcpyHostToDevice, g_stream));
    k_gather<<<cnt, 256, 0, g_stream>>>(fin, ld, idx, hid, c->embed_dim);
    gpu_linear(logits, hid, &dm->lm_head, NULL, cnt, 0, 0);
    if (target) {
        checkCuda(cudaMemcpyAsync(ti, target, 4 * (size_t)cnt, cudaMemcpyHostToDevice, g_stream));
        k_logprob<<<cnt, 256, 0, g_stream>>>(logits, c->vocab, ti, fl);
        checkCuda(cudaMemcpyAsync(lp, fl, 4 * (size_t)cnt, cudaMemcpyDeviceToHost, g_stream));
    } else {
        checkCuda(cudaMemcpyAsync(fl, u, 4 * (size_t)cnt, cudaMemcpyHostToDevice, g_stream));
        k_sample<<<cnt, SB, 0, g_stream>>>(logits, c->vocab, temp, topk, topp, fl, ti);
        checkCuda(cudaMemcpyAsync(tok, ti, 4 * (size_t)cnt, cudaMemcpyDeviceToHost, g_stream));
    }
    prof_end(PK_LOGITS);
    checkCuda(cudaStreamSynchronize(g_stream));
    checkCuda(cudaGetLastError());
}

/* ----------------------------------------------------------------------------
 * CUDA graphs for decode steps: a step of n rows is captured the second
 * time that shape comes (the first runs plain, sizing every buffer), and
 * replayed after; the step's indices change in device memory, not in the
 * graph. */

static struct { int n; cudaGraphExec_t exec; } g_graphs[64];
static int g_n_graphs;

extern "C" int gpu_graph_launch(int n) {
    if (gpu_profile(NULL)) return 0;
    for (int i = 0; i < g_n_graphs; i++)
        if (g_graphs[i].n == n) { checkCuda(cudaGraphLaunch(g_graphs[i].exec, g_stream)); return 1; }
    return 0;
}

extern "C" void gpu_capture_begin(void) {
    if (gpu_profile(NULL)) die("internal: no graph capture while profiling");
    checkCuda(cudaStreamBeginCapture(g_stream, cudaStreamCaptureModeThreadLocal));
}

extern "C" void gpu_capture_end(int n) {
    cudaGraph_t g;
    checkCuda(cudaStreamEndCapture(g_stream, &g));
    if (g_n_graphs == (int)(sizeof g_graphs / sizeof *g_graphs)) { cudaGraphExecDestroy(g_graphs[0].exec); g_graphs[0] = g_graphs[--g_n_graphs]; }
    checkCuda(cudaGraphInstantiate(&g_graphs[g_n_graphs].exec, g, 0));
    g_graphs[g_n_graphs++].n = n;
    checkCuda(cudaGraphDestroy(g));
    checkCuda(cudaGraphLaunch(g_graphs[g_n_graphs - 1].exec, g_stream));
}

extern "C" void gpu_graphs_reset(void) {
    for (int i = 0; i < g_n_graphs; i++) cudaGraphExecDestroy(g_graphs[i].exec);
    g_n_graphs = 0;
}

/* ----------------------------------------------------------------------------
 * Probes for `opt probe` (lp.c's hooks): pinned copies and GEMM rates. */

static double time_ms(void (*fn)(void *), void *arg, int reps) {
    cudaEvent_t a, b;
    checkCuda(cudaEventCreate(&a));
    checkCuda(cudaEventCreate(&b));
    fn(arg); /* warm */
    checkCuda(cudaEventRecord(a, g_stream));
    for (int i = 0; i < reps; i++) fn(arg);
    checkCuda(cudaEventRecord(b, g_stream));
    checkCuda(cudaEventSynchronize(b));
    float ms = 0;
    checkCuda(cudaEventElapsedTime(&ms, a, b));
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return ms / reps;
}

typedef struct { void *dst; const void *src; size_t n; cudaMemcpyKind kind; } CopyArg;
static void copy_fn(void *p) { CopyArg *c = (CopyArg *)p; checkCuda(cudaMemcpyAsync(c->dst, c->src, c->n, c->kind, g_stream)); }

extern "C" int gpu_probe_bandwidth(GpuProbe *p) {
    if (!gpu_available() || !gpu_try_start()) return -1;
    cudaDeviceProp prop;
    checkCuda(cudaGetDeviceProperties(&prop, 0));
    snprintf(p->name, sizeof p->name, "%.120s", prop.name);
    p->mem_bytes = (double)prop.totalGlobalMem;
    size_t n = 256u << 20;
    void *h, *d, *d2;
    checkCuda(cudaMallocHost(&h, n));
    memset(h, 1, n);
    d = dev_alloc(n, "the bandwidth probe");
    d2 = dev_alloc(n, "the bandwidth probe");
    CopyArg up = {d, h, n, cudaMemcpyHostToDevice}, down = {h, d, n, cudaMemcpyDeviceToHost}, dd = {d2, d, n, cudaMemcpyDeviceToDevice};
    p->h2d_bw = n / (time_ms(copy_fn, &up, 5) / 1e3);
    p->d2h_bw = n / (time_ms(copy_fn, &down, 5) / 1e3);
    p->mem_bw = 2.0 * n / (time_ms(copy_fn, &dd, 10) / 1e3);
    cudaFreeHost(h);
    cudaFree(d);
    cudaFree(d2);
    return 0;
}

typedef struct { Tensor w; float *x, *y; int rows; } GemmArg;
static void gemm_fn(void *p) { GemmArg *g = (GemmArg *)p; gpu_linear(g->y, g->x, &g->w, NULL, g->rows, 0, 0); }

extern "C" int gpu_probe_compute(GpuProbe *p) {
    if (!gpu_available() || !gpu_try_start()) return -1;
    int N = 8192, K = 8192, M[2] = {64, 4096};
    GemmArg g;
    memset(&g, 0, sizeof g);
    g.w.dtype = DT_F16;
    g.w.rows = N;
    g.w.cols = K;
    g.w.data = dev_alloc((size_t)N * K * 2, "the GEMM probe");
    checkCuda(cudaMemsetAsync((void *)g.w.data, 0, (size_t)N * K * 2, g_stream));
    g.x = (float *)dev_alloc(4 * (size_t)M[1] * K, "the GEMM probe");
    g.y = (float *)dev_alloc(4 * (size_t)M[1] * N, "the GEMM probe");
    checkCuda(cudaMemsetAsync(g.x, 0, 4 * (size_t)M[1] * K, g_stream));
    double r[2];
    for (int i = 0; i < 2; i++) { g.rows = M[i]; r[i] = 2.0 * M[i] * N * K / (time_ms(gemm_fn, &g, 10) / 1e3); }
    p->gemm_flops_g = r[0];
    p->gemm_flops_p = r[1];
    p->bmm_flops_p = 0.5 * r[1]; /* attention GEMMs run at about half the dense rate */
    p->bmm_flops_g = p->mem_bw > 0 ? p->mem_bw / 4 : r[0] / 8; /* memory-bound: 2 bytes per f16, 2 flops */
    p->dequant_bw = p->mem_bw > 0 ? 0.5 * p->mem_bw : 1e11;
    cudaFree((void *)g.w.data);
    cudaFree(g.x);
    cudaFree(g.y);
    return 0;
}

/* ----------------------------------------------------------------------------
 * The Device offloading computes on (opt.h): the GPU with a copy stream beside
 * the compute stream. */

static void *gd_alloc(size_t n, const char *what) { gpu_start(); return dev_alloc(n, what); }
static void gd_release(void *p) { if (p) checkCuda(cudaFree(p)); }
static void gd_pin(void *h, size_t n) {
    gpu_start();
    if (n && cudaHostRegister(h, n, cudaHostRegisterDefault) != cudaSuccess) {
        cudaGetLastError();
        warn_once(NULL, "could not page-lock %.2f GiB of staging; transfers will be synchronous", (double)n / (1 << 30));
    }
}
static void gd_unpin(void *h) { if (h && cudaHostUnregister(h) != cudaSuccess) cudaGetLastError(); }
static cudaStream_t gd_stream(int s) { return s ? g_copies[s - 1] : g_stream; }
static void gd_copy2d(void *dst, size_t dp, const void *src, size_t sp, size_t w, size_t rows, int kind, int stream) {
    if (!w || !rows) return;
    cudaMemcpyKind k = kind == 0 ? cudaMemcpyHostToDevice : kind == 1 ? cudaMemcpyDeviceToHost : cudaMemcpyDeviceToDevice;
    dp = dp ? dp : w;
    sp = sp ? sp : w;
    if (rows == 1 || (dp == w && sp == w)) /* one span: a 2-D copy's pitch could pass memPitch (2^31 - 1) */
        checkCuda(cudaMemcpyAsync(dst, src, w * rows, k, gd_stream(stream)));
    else checkCuda(cudaMemcpy2DAsync(dst, dp, src, sp, w, rows, k, gd_stream(stream)));
}
static void *gd_event(void) {
    cudaEvent_t e;
    checkCuda(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    return (void *)e;
}
static void gd_record(void *ev, int stream) { checkCuda(cudaEventRecord((cudaEvent_t)ev, gd_stream(stream))); }
static void gd_wait(int stream, void *ev) { checkCuda(cudaStreamWaitEvent(gd_stream(stream), (cudaEvent_t)ev, 0)); }
static void gd_sync(void *ev) { checkCuda(cudaEventSynchronize((cudaEvent_t)ev)); }
static double gd_free_bytes(void) { return gpu_free_bytes(); }

extern "C" const Device gpu_device = {"gpu", 1, &gpu_backend, gd_alloc, gd_release, gd_pin, gd_unpin, gd_copy2d, gd_event,
                                      gd_record, gd_wait, gd_sync, gpu_scratch_init, gpu_scratch_free, gd_free_bytes};
