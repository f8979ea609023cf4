/* opt.h: the types shared by opt.c, quant.c, offload.c, lp.c and kernels.cu.
 *
 * Data flow (one direction): CLI -> Config + Tokenizer -> checkpoint mmap'd into
 * Tensors -> Policy (flags or lp.c) -> placement on tiers -> block schedule ->
 * logits -> sampler -> stdout. Everything a kernel needs to know about a weight
 * (format, shape, where it lives) travels in its Tensor. */
#ifndef OPT_H
#define OPT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>
#include <string.h>

#ifndef OPT_VERSION /* the Makefile may set it (-DOPT_VERSION=...) */
#define OPT_VERSION "0.9.0"
#endif

/* ----------------------------------------------------------------------------
 * Errors. User-facing failures name the file, tensor or input line; internal
 * invariants report the source file:line. All of them exit non-zero. */

__attribute__((noreturn, format(printf, 1, 2))) void die(const char *fmt, ...);
__attribute__((noreturn, format(printf, 3, 4))) void die_at(const char *file, int line, const char *fmt, ...);
#define check(cond, ...) do { if (!(cond)) die_at(__FILE__, __LINE__, __VA_ARGS__); } while (0)
void *check_malloc(size_t n, const char *what);  /* dies naming `what` when out of memory */
void *check_calloc(size_t n, const char *what);
void *check_realloc(void *p, size_t n, const char *what);
char *check_strdup(const char *s);
void warn_once(int *flag, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
bool size_mul(size_t a, size_t b, size_t *r);    /* *r = a * b; false when it overflows */
#ifdef OPT_FUZZ
#include <setjmp.h>
extern jmp_buf *g_fuzz_jmp;  /* set by a fuzz harness: die() longjmps here instead of exiting */
extern char g_fuzz_msg[256]; /* the message die() would have printed */
#endif

/* ----------------------------------------------------------------------------
 * JSON (config.json, safetensors headers, shard indexes, vocab.json). */

typedef enum { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ } JType;
typedef struct Json {
    JType type;          /* which of the fields below is meaningful */
    double num;          /* J_NUM value; J_BOOL as 0/1 */
    char *str;           /* J_STR: UTF-8 bytes, NUL-terminated (may contain NUL: use len) */
    size_t len;          /* J_STR: byte length */
    int n;               /* J_ARR/J_OBJ: number of children */
    struct Json *kids;   /* (n) children */
    char **keys;         /* (n) J_OBJ keys, NUL-terminated */
} Json;
/* Parses text[0..len); on error returns NULL and writes "byte N: reason" into err. */
Json *json_parse(const char *text, size_t len, char *err, size_t errlen);
const Json *json_get(const Json *obj, const char *key); /* NULL when absent or obj not an object */
void json_free(Json *j);
void json_write_str(FILE *f, const char *s, size_t len); /* quoted, escaped, valid UTF-8 out */

/* ----------------------------------------------------------------------------
 * Model configuration: everything comes from config.json, nothing per size. */

typedef struct {
    int hidden;        /* hidden_size, e.g. 768 */
    int ffn;           /* ffn_dim, e.g. 3072 */
    int n_layer;       /* num_hidden_layers */
    int n_head;        /* num_attention_heads */
    int head_dim;      /* hidden / n_head */
    int vocab;         /* vocab_size: rows of the embedding (50272 for OPT) */
    int max_pos;       /* max_position_embeddings; the position table has max_pos + 2 rows */
    int embed_dim;     /* word_embed_proj_dim; != hidden means project_in/out exist (350m) */
    int pre_ln;        /* do_layer_norm_before: 1 for all sizes but 350m */
    int final_ln;      /* decoder.final_layer_norm present (pre-LN and not _remove_final_layer_norm) */
    int bias;          /* enable_bias: linear layers carry biases */
    int ln_affine;     /* layer_norm_elementwise_affine: LayerNorms carry weight and bias */
    int bos, eos, pad; /* special token ids (2, 2, 1 for OPT) */
    char name[64];     /* short description, e.g. "opt-125m" or the directory name */
} Config;

/* ----------------------------------------------------------------------------
 * Tensors. A weight keeps the dtype it was stored in; kernels convert inside. */

typedef enum { DT_F32, DT_F16, DT_BF16, DT_Q4, DT_I8, DT_COUNT } DType;
typedef enum { TIER_GPU, TIER_CPU, TIER_DISK, TIER_COUNT } Tier;
extern const char *const dtype_names[DT_COUNT];
extern const char *const tier_names[TIER_COUNT];

typedef struct {
    DType dtype;          /* element format of data */
    int64_t rows, cols;   /* logical shape; a 1-D tensor has rows = 1 */
    const void *data;     /* (rows, cols) row-major; into an mmap or owned memory; NULL = absent */
    const void *data2;    /* rows [split, rows) when a policy splits the tensor across tiers, else NULL */
    int64_t split;        /* rows at data; the rest at data2 */
    const float *scale;   /* DT_I8: (rows) per-output-channel weight scales */
    float act_scale;      /* DT_I8: static per-tensor activation scale (SmoothQuant O3); 0 = per-token dynamic */
    int group;            /* DT_Q4 group size along cols (32, 64, 128) */
    Tier tier;            /* where data lives */
    int gen;              /* dummy models: 1 + index of the generator of its values (made on demand); 0 otherwise */
    int w4i;              /* DT_Q4 interleaved for W4A8 (--compute int8, CPU engine): blocks of 32 rows, quant.c */
    const char *name;     /* checkpoint name, for error messages */
} Tensor;

/* Exact half/bfloat16 conversions (round to nearest even into 16 bits); the
 * SIMD kernels use F16C or AVX-512 for the same results. */
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = h >> 10 & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) bits = sign | 0x7F800000 | man << 13;          /* inf, nan */
    else if (exp) bits = sign | (exp + 112) << 23 | man << 13;       /* normal */
    else if (man) {                                                   /* subnormal: normalize */
        int e = -1;
        do { e++; man <<= 1; } while (!(man & 0x400));
        bits = sign | (uint32_t)(112 - e) << 23 | (man & 0x3FF) << 13;
    } else bits = sign;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_f16(float f) { /* round to nearest even */
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = x >> 16 & 0x8000, ax = x & 0x7FFFFFFF;
    if (ax > 0x7F800000) return (uint16_t)(sign | 0x7E00);           /* nan */
    if (ax >= 0x477FF000) return (uint16_t)(sign | 0x7C00);          /* overflow to inf */
    if (ax < 0x38800000) {                                            /* subnormal or zero */
        if (ax < 0x33000000) return (uint16_t)sign;
        uint32_t e = ax >> 23, m = (ax & 0x7FFFFF) | 0x800000, shift = 126 - e;
        uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = ax - 0x38000000 + 0xFFF + (ax >> 13 & 1);             /* rebias, round */
    return (uint16_t)(sign | r >> 13);
}

static inline float bf16_to_f32(uint16_t h) { uint32_t b = (uint32_t)h << 16; float f; memcpy(&f, &b, 4); return f; }

static inline uint16_t f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7FFFFFFF) > 0x7F800000) return (uint16_t)(x >> 16 | 0x40);
    return (uint16_t)((x + 0x7FFF + (x >> 16 & 1)) >> 16);
}

size_t dtype_bytes(DType t, int64_t n); /* bytes for n elements (packed formats rounded up) */
size_t tensor_row_bytes(const Tensor *t); /* bytes of one row in its format */

/* ----------------------------------------------------------------------------
 * CPU kernels (opt.c, quant.c). Every dot product has one reduction order: 16
 * lanes, lane l accumulating k = l, l+16, ... with fused multiply-adds, then
 * the tree (l, l+8), (l, l+4), (l, l+2), (l, l+1); see opt.c's kernels. */

enum { SIMD_SCALAR, SIMD_AVX2, SIMD_AVX512 };
extern int g_simd;        /* SIMD level in use (OPT_SIMD forces one) */
extern int g_simd_max;    /* best level of this CPU */
extern int g_vnni;        /* AVX-512 VNNI present */
extern int g_has_bf16;    /* AVX-512 BF16 present */
extern int g_bf16;        /* --compute bf16 (needs g_has_bf16 and SIMD avx512) */
extern int g_w4a8;        /* --compute int8: 4-bit weights on int8 activations (needs VNNI) */
void compute_set(const char *mode); /* --compute f32|bf16|int8; dies when the CPU cannot */
#define T_AVX2 __attribute__((target("avx2,fma,f16c")))
#define T_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define T_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))

/* y[m, n] = x[m, :] . W[n, :] + bias[n], then optionally += y (residual) and ReLU. */
typedef struct {
    float *y;              /* (M, ldy) output */
    const float *x;        /* (M, ldx) input rows */
    const Tensor *w;       /* (N, K) weights in any format */
    const float *bias;     /* (N) or NULL */
    int64_t ldy, ldx;      /* row strides in floats */
    int M, N, K;           /* sizes */
    int acc;               /* add into y (residual connection) */
    int relu;              /* ReLU after the bias */
} Gemm;
void gemm(const Gemm *g);

/* A GEMM tile: MR rows of x against NR weight rows (pointers w[j]) over K,
 * dots into out[i * NR + j]; pf is the byte distance to the next tile's
 * weights (prefetched), G the 4-bit group size. */
typedef void (*TileFn)(const float *const *x, const char *const *w, int K, size_t pf, int G, float *out);

/* Writes dots (n) into row m at columns n0..: + bias, + y (residual), ReLU. */
static inline void gemm_store(const Gemm *g, int m, int n0, const float *dot, int n) {
    float *y = g->y + (int64_t)m * g->ldy + n0;
    const float *b = g->bias ? g->bias + n0 : NULL;
    for (int j = 0; j < n; j++) {
        float v = b ? dot[j] + b[j] : dot[j];
        if (g->acc) v = y[j] + v;
        if (g->relu && v < 0) v = 0;
        y[j] = v;
    }
}

/* The tree every 16-lane reduction ends with. */
static inline float lanes_sum16(const float l[16]) {
    float s8[8], s4[4];
    for (int i = 0; i < 8; i++) s8[i] = l[i] + l[i + 8];
    for (int i = 0; i < 4; i++) s4[i] = s8[i] + s8[i + 4];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

/* ----------------------------------------------------------------------------
 * quant.c: 4-bit group-wise format (see there) and its kernels. */

size_t q4_row_bytes(int64_t cols, int group);  /* bytes of one quantized row */
void q4_quantize_row(uint8_t *out, const float *in, int64_t cols, int group, const char *what); /* dies on NaN/Inf naming `what` */
void q4_dequantize_row(float *out, const uint8_t *in, int64_t cols, int group);
float q4_dot_scalar(const float *x, const uint8_t *w, int K, int group);
extern const TileFn q4_tiles_avx2[2];    /* tiles 2x3 and 1x4, as opt.c's AVX2 tiles */
extern const TileFn q4_tiles_avx512[3];  /* tiles 4x6, 2x8 and 1x8 */
/* int8 (SmoothQuant W8A8), quant.c: y = (x quantized per token, or with the
 * static act_scale) . W_int8 * scale[n] + bias; exact int32 accumulation. */
void gemm_i8(const Gemm *g);
/* W4A8 (--compute int8), quant.c: 4-bit weights . x quantized to int8 per group
 * of the weights; exact integer group sums, two f32 roundings per group. */
void gemm_w4a8(const Gemm *g);
Tensor w4_interleave(const Tensor *t);  /* a 4-bit tensor's W4A8 layout, in new memory (free its data) */

void q4_attn_scores(float *const *s, const float *const *q, int n, const uint8_t *k, int D, int G, int T);
void q4_attn_mix(float *const *out, const float *const *p, int n, const uint8_t *v, int D, int G, int t0, int t1, int init);

/* ----------------------------------------------------------------------------
 * Tokenizer (opt.c): byte-level BPE exactly as Hugging Face's GPT2Tokenizer. */

typedef struct Tokenizer Tokenizer;
/* DIR/vocab.json + DIR/merges.txt; dies naming the file and the line or byte on any error. */
Tokenizer *tok_load(const char *dir);
void tok_free(Tokenizer *t);
/* Token ids of valid UTF-8 text, without BOS, into (*ids)[0..count), growing
 * *ids (capacity *cap) as needed; returns count. Not reentrant: the
 * tokenizer keeps a word cache and working memory. */
int tok_encode(const Tokenizer *t, const char *text, size_t len, int **ids, int *cap);
/* The raw bytes id decodes to ("</s>" for 2); NULL when no token has that id. */
const char *tok_piece(const Tokenizer *t, int id, size_t *len);
int tok_lookup(const Tokenizer *t, const char *token); /* id of a vocab.json token string, -1 if absent */
int tok_count(const Tokenizer *t);                     /* vocab.json entries */
/* Length of the longest valid UTF-8 prefix of s (== len when all valid). */
size_t utf8_valid_prefix(const char *s, size_t len);

/* ----------------------------------------------------------------------------
 * Offloading policy: FlexGen's knobs, in percent as the CLI takes them. */

#define MAX_GPU_BATCHES 64 /* --num-gpu-batches' limit: the block schedule's per-batch arrays; plan chooses no more */

typedef struct {
    int gpu_batch_size;    /* sequences per GPU batch */
    int num_gpu_batches;   /* GPU batches per block; block = gpu_batch_size * num_gpu_batches */
    double w_gpu, w_cpu;   /* % of weight bytes on GPU / CPU; the rest on disk */
    double c_gpu, c_cpu;   /* % of KV-cache bytes on GPU / CPU; the rest on disk */
    double a_gpu, a_cpu;   /* % of activation bytes on GPU / CPU; the rest on disk */
    int cpu_attention;     /* attention computed on the CPU where the cache lives there */
    int pin_weights;       /* CPU-resident weights in pinned memory */
    int overlap;           /* overlap I/O with compute (0 only for debugging) */
    int compress_weight;   /* 4-bit group-wise weights */
    int compress_cache;    /* 4-bit group-wise KV cache */
    int group_size;        /* 4-bit group size (64 by default) */
} Policy;

/* ----------------------------------------------------------------------------
 * lp.c: simplex solver, cost model, policy search, hardware probe. */

typedef enum { LP_OPTIMAL, LP_INFEASIBLE, LP_UNBOUNDED, LP_ITERLIMIT } LpStatus;
extern const char *const lp_status_names[4];
typedef struct {
    int m, n;            /* constraints, variables */
    const double *A;     /* (m, n) row-major constraint matrix */
    const double *b;     /* (m) right-hand sides */
    const char *sense;   /* (m) '<' (<=), '=' or '>' (>=) */
    const double *c;     /* (n) objective coefficients, minimised */
    const double *lo;    /* (n) lower bounds, -INFINITY allowed; NULL = all 0 */
    const double *hi;    /* (n) upper bounds, INFINITY allowed; NULL = all +inf */
} Lp;
/* Solves min c'x s.t. A x (sense) b, lo <= x <= hi. On LP_OPTIMAL fills x (n) and *obj (obj may
 * be NULL). Crossed bounds give LP_INFEASIBLE; LP_ITERLIMIT means numerical trouble. */
LpStatus lp_solve(const Lp *lp, double *x, double *obj);
/* `opt lp FILE.mps` (argv[0] = "lp"): solves a free-MPS LP and prints "status S", then, when
 * optimal, "objective Z" and one "name value" line per column. Malformed input dies naming the
 * file and line. Returns the exit status: 0 for optimal, infeasible and unbounded alike. */
int lp_main(int argc, char **argv);
void mps_check(const char *path); /* reads an MPS file, freeing the last one read (fuzz harnesses) */
/* The --help texts of lp, plan and probe (lp.c), which `opt help COMMAND` prints too. */
extern const char lp_usage[], plan_usage[], probe_usage[];

/* The cost model and the policy search (FlexGen's LP with its omissions fixed; the terms are
 * documented at the top of lp.c's cost-model section). All sizes are bytes, bandwidths bytes/s,
 * rates FLOP/s, times seconds. */
typedef struct {
    char name[160];            /* "t4", "h100", or the probe file it came from */
    int has_gpu;               /* 0: the CPU computes and there is no GPU tier and no PCIe */
    double gpu_mem, cpu_mem, disk_mem; /* default budgets when plan is given none */
    double h2d_bw;             /* host-to-device copies from pinned memory */
    double d2h_bw;             /* device-to-host copies into pinned memory (activations, q) */
    double d2h_cache_bw;       /* device-to-host KV-cache stores (strided; FlexGen fits it apart) */
    double disk_read_bw;       /* reads from the offload directory */
    double disk_write_bw;      /* writes of activations and of decode's one-position cache stores */
    double disk_write_cache_bw;/* writes of prefill's whole-prompt cache stores */
    double gpu_mem_bw;         /* device memory: the roofline of small-batch GEMMs */
    double gpu_gemm_flops_g;   /* fp16 GEMM at M = 64 rows (decode-sized) */
    double gpu_gemm_flops_p;   /* fp16 GEMM at M >= 512 rows (prefill-sized) */
    double gpu_bmm_flops_p;    /* prefill attention (batched GEMMs, s x s per head) */
    double gpu_bmm_flops_g;    /* decode attention over the cache (memory-bound) */
    double gpu_dequant_bw;     /* 4-bit -> fp16 dequantization, fp16 bytes written per second */
    double cpu_gemv_bw;        /* CPU GEMM at M = 1 with f16 weights: weight bytes per second */
    double cpu_gemv_q4_bw;     /* the same with 4-bit weights (fused kernel): 4-bit bytes per second */
    double cpu_gemm_flops_g;   /* CPU GEMM at M = 64, f16 weights */
    double cpu_gemm_flops_p;   /* CPU GEMM at M = 512, f16 weights */
    double cpu_attn_bw;        /* decode attention on the CPU: bytes of fp16/f32 cache read per s */
    double cpu_attn_q4_bw;     /* the same over a 4-bit cache: 4-bit bytes per second */
    double cpu_attn_c[3];      /* FlexGen's T4 correction of both (c1, c2, c3); 0 = none */
    double cpu_mem_bw;         /* streaming read bandwidth of RAM */
    double layer_overhead;     /* fixed seconds per layer and GPU batch (launches, syncs) */
    /* CPU-only path (0 = derived from the fields above; see hw_load in lp.c) */
    double cpu_gemm_flops_8;   /* CPU GEMM at M = 8 (the tiled path's own speed), f16 weights */
    double cpu_gemm_q4_flops_8;/* the same with 4-bit weights */
    double cpu_gemm_q4_flops_g;/* CPU GEMM at M = 64 with 4-bit weights */
    double cpu_gemm_q4_flops_p;/* CPU GEMM at M = 512 with 4-bit weights */
    double cpu_attn_flops_p;   /* prefill attention on the CPU, causal FLOPs per second (f32 cache) */
    double cpu_attn_q4_flops_p;/* the same with a 4-bit cache (quantizing the new entries included) */
    double cpu_region_s;       /* seconds per OpenMP parallel region (fork, wake-up, join) */
    double io_req_cpu_s;       /* CPU seconds per request of the engine's I/O threads */
} Hardware;

/* kernels.cu answers these on CUDA builds; lp.c's weak stand-ins return -1 ("no GPU"). */
typedef struct {
    char name[128];            /* device name */
    double mem_bytes;          /* device memory */
    double h2d_bw, d2h_bw;     /* pinned copies of >= 256 MiB, bytes/s */
    double mem_bw;             /* device memory streaming (read + write bytes per second) */
    double gemm_flops_g;       /* fp16 GEMM, M = 64, N = K = 8192: FLOP/s */
    double gemm_flops_p;       /* fp16 GEMM, M = 4096, N = K = 8192: FLOP/s */
    double bmm_flops_p;        /* prefill attention GEMMs (s = 512, head_dim 128): FLOP/s */
    double bmm_flops_g;        /* decode attention (1 query over 512+ keys, head_dim 128): FLOP/s */
    double dequant_bw;         /* 4-bit -> fp16 dequantization: fp16 bytes written per second */
} GpuProbe;
int gpu_probe_bandwidth(GpuProbe *p); /* fills name, mem_bytes, h2d_bw, d2h_bw; -1: no GPU */
int gpu_probe_compute(GpuProbe *p);   /* fills the rest; -1: no GPU */

/* Resolves "t4", "h100" or a probe JSON file written by `opt probe`; dies with one line naming
 * the file (missing, corrupt, wrong format, a missing or non-positive number) or the name. */
void hw_load(Hardware *hw, const char *spec);
/* Measures this machine (disk in dir with disk_bytes, RAM, CPU GEMMs, the GPU if any). */
void hw_probe(Hardware *hw, GpuProbe *gp, const char *dir, double disk_bytes, int *direct);

typedef struct {
    int prompt_len, gen_len;   /* s and n: FlexGen's workload (512, 32) */
    double budget[TIER_COUNT]; /* bytes the plan may use per tier (GPU, CPU, disk) */
    double usable[TIER_COUNT]; /* fraction of each budget the plan fills (headroom for the CUDA
                                * context, allocator slack, the OS): 0.9, 0.9, 0.95 */
    int compress_weight;       /* 4-bit group-wise weights */
    int compress_cache;        /* 4-bit group-wise KV cache */
    int group_size;            /* 4-bit group size (64) */
    int cpu_attention;         /* -1: search both, 0: never, 1: always (when the cache is off-GPU) */
    int max_gpu_batch;         /* largest gpu_batch_size tried */
    int max_block;             /* largest gpu_batch_size * num_gpu_batches tried */
    int block;                 /* 0, or the one block size tried (a pipeline's group) */
    int embed, output;         /* the layers' node also embeds / applies the final LayerNorm,
                                * project_out and lm_head (1 and 1 unless a pipeline stage) */
    int groups;                /* blocks whose KV cache the node keeps: a pipeline stage keeps
                                * every micro-batch group's (1 unless a pipeline stage) */
} PlanReq;
void plan_req_default(PlanReq *r, const Hardware *hw); /* FlexGen's workload, hw's budgets */

typedef struct {
    int feasible;              /* the policy fits the usable budgets */
    double t_prefill, t_decode;/* seconds per block: prefill (1 token out), decode (n - 1 tokens) */
    double tput_prefill;       /* block * s / t_prefill, token/s */
    double tput_decode;        /* block * (n - 1) / t_decode */
    double tput_total;         /* block * n / (t_prefill + t_decode): FlexGen's headline */
    double peak[TIER_COUNT];   /* predicted peak bytes per tier (max of prefill and decode) */
    double moved[4];           /* bytes per block over h2d, d2h, disk read, disk write */
    char bound_prefill[48];    /* bottleneck of a prefill layer step, e.g. "gpu compute" */
    char bound_decode[48];     /* bottleneck of a decode layer step, e.g. "disk" */
    double need[TIER_COUNT];   /* search failed: the smallest budget of each tier, others as
                                * given, that fits the smallest block (INFINITY: none does) */
    int need_joint;            /* no single tier sufficed: need[] is one set of budgets to use
                                * together (least GPU, then least CPU memory) */
    int n_lp, n_feasible;      /* LPs solved by the search, and how many were feasible */
} PlanResult;
/* Predicts throughput, peak memory and traffic of a given policy (percent units, as the CLI);
 * res->feasible says whether it fits. Dies on a policy that is not one (bad percents). */
void plan_eval(const Config *c, const Hardware *hw, const PlanReq *req, const Policy *p, PlanResult *res);
/* Solves the LP for every gpu_batch_size x num_gpu_batches (x cpu_attention; num_gpu_batches x
 * req->groups <= MAX_GPU_BATCHES, what generate takes) and returns the
 * policy of highest predicted total throughput in *out: 0 on success, -1 when nothing fits
 * (res->need then holds the smallest budgets that would). */
int plan_search(const Config *c, const Hardware *hw, const PlanReq *req, Policy *out, PlanResult *res);
/* Splits c->n_layer decoder layers into n_stages contiguous stages of layers[i] >= 1 layers each,
 * balanced by the cost model: stage 0 also embeds, the last stage also applies the final LayerNorm,
 * project_out, lm_head and the sampler to the rows needing logits. 0, or -1 when n_stages > n_layer. */
int plan_stage_split(const Config *c, int n_stages, int prompt_len, int gen_len, int *layers);
/* `opt plan ...` and `opt probe ...` (argv[0] is the command name); return the exit status. */
int plan_main(int argc, char **argv);
int probe_main(int argc, char **argv);

/* ----------------------------------------------------------------------------
 * Checkpoints and the model (opt.c). */

typedef struct {
    char *path;            /* file path, for messages */
    const uint8_t *base;   /* (size) mmap'd bytes */
    size_t size;           /* file size */
} MapFile;

typedef struct {
    char *name;            /* name as stored, e.g. "model.decoder.layers.0.fc1.weight" */
    const char *key;       /* name without "model."/"decoder." prefixes, e.g. "layers.0.fc1.weight" */
    DType dtype;           /* stored format */
    int ndim;              /* 0..4 */
    int64_t shape[4];      /* (ndim) sizes */
    const void *data;      /* into files[file].base */
    int file;              /* index into Checkpoint.files */
    bool used;             /* claimed by the model (to report leftovers) */
} CkTensor;

typedef struct {
    char *dir;             /* the checkpoint directory (or native file) */
    Json *meta;            /* a native file's __metadata__ header (config, formats), else NULL */
    MapFile *files;        /* (n_files) mapped weight files */
    int n_files;
    CkTensor *t;           /* (n) tensors, sorted by key after loading */
    int n, cap;
    Json *hdr;             /* the safetensors header being read: ck_close frees it should the reader die */
    struct BinRead *bin;   /* the .bin reader's zip entries and pickle values, likewise */
} Checkpoint;

/* An f32 tensor carried into native files besides the model's own. */
typedef struct {
    char name[96];         /* e.g. "layers.3.self_attn.q_proj.act_max" */
    float *data;           /* (n) owned by the model */
    int64_t n;
} NativeExtra;

/* A linear layer's input, seen by an observer (SmoothQuant calibration). */
enum { OBS_QKV, OBS_O, OBS_FC1, OBS_FC2 };
typedef void (*Observer)(void *ctx, int layer, int which, const float *x, int rows, int cols);

typedef struct {
    Tensor q, k, v, o;     /* (hidden, hidden) attention projections, nn.Linear (out, in) layout */
    Tensor fc1;            /* (ffn, hidden) */
    Tensor fc2;            /* (hidden, ffn) */
    float *qb, *kb, *vb, *ob; /* (hidden) biases, NULL without enable_bias */
    float *fc1b;           /* (ffn) */
    float *fc2b;           /* (hidden) */
    float *ln1w, *ln1b;    /* (hidden) self_attn_layer_norm, NULL when not affine */
    float *ln2w, *ln2b;    /* (hidden) final_layer_norm of the layer */
} Layer;

typedef struct {
    Config cfg;            /* hyperparameters */
    Tensor embed;          /* (vocab, embed_dim) token embedding */
    Tensor pos;            /* (max_pos + 2, hidden) learned positions, offset 2 */
    Tensor proj_in;        /* (hidden, embed_dim), data NULL unless embed_dim != hidden */
    Tensor proj_out;       /* (embed_dim, hidden), likewise */
    float *lnfw, *lnfb;    /* (hidden) decoder.final_layer_norm, NULL when absent */
    Tensor lm_head;        /* (vocab, embed_dim), the embedding when tied */
    Layer *layers;         /* (cfg.n_layer) the decoder layers this process holds */
    int layer0;            /* the first one's index in the whole model (a pipeline stage's), else 0 */
    int n_layer_all;       /* the whole model's layers (cfg.n_layer but on a pipeline stage) */
    Checkpoint ck;         /* the mapped files the tensors point into */
    float *owned;          /* one allocation holding every f32 1-D tensor */
    size_t owned_n, owned_used; /* its size and fill, in floats */
    Json *formats;         /* a native file's tensor formats, else NULL */
    void **q4;             /* (n_q4) memory the model owns: quantized weights, scales */
    int n_q4, cap_q4;
    NativeExtra *extra;    /* (n_extra) more f32 tensors for native files (e.g. SmoothQuant act scales) */
    int n_extra;
    void *dummy;           /* -m dummy:SHAPE: the tensor generators (seeded random weights), else NULL */
    uint64_t dummy_seed;   /* their seed */
} Model;

void model_load(Model *m, const char *path);      /* a checkpoint directory or a native file */
int ck_locate(const Checkpoint *ck, const void *p, off_t *off); /* mapped file holding p (-1: none) */
void model_compress(Model *m, int group);         /* every matrix to 4 bits */
void model_materialize(Model *m);                 /* a dummy model's matrices into RAM */
void dummy_rows(const Model *m, const Tensor *t, int64_t r0, int64_t n, void *out); /* rows of a dummy tensor, as f16 */
void model_free(Model *m);
/* Keeps layers [l0, l1) only, as a pipeline stage: cfg.n_layer becomes l1 - l0, and the
 * embedding (l0 > 0) and the output (l1 < n_layer) are dropped, so nothing downstream
 * (compression, placement, the cache) touches what another stage holds. */
void model_stage(Model *m, int l0, int l1);
static inline bool model_first(const Model *m) { return m->layer0 == 0; } /* embeds (stage 0, or the whole model) */
static inline bool model_last(const Model *m) { return m->layer0 + m->cfg.n_layer == m->n_layer_all; } /* has the output */
void *model_own(Model *m, size_t bytes, const char *what); /* memory freed with the model */
void model_own_add(Model *m, void *p);                     /* malloc'd memory handed to the model */
void model_w4_interleave(Model *m); /* quant.c: 4-bit layer matrices to the W4A8 layout (--compute int8), the old bytes released */
void native_write(const Model *m, const char *path, int group); /* opt convert's output; group > 0: 4-bit matrices */

/* One layer's cache for a set of sequences: a key area and a value area per
 * (sequence, head), found through pointer tables so that areas may live in
 * RAM or in staging buffers filled from disk. f32: keys in blocks of 16
 * positions, transposed within a block, (cap/16, head_dim, 16), so scores
 * vectorize over positions and a new position touches one block; values
 * (cap, head_dim). q4 (--compress-cache): keys and values as 4-bit rows
 * (cap, row bytes), grouped along head_dim like FlexGen's. */
typedef struct {
    DType dtype;           /* DT_F32 or DT_Q4 */
    int n_slot;            /* sequences */
    int n_head, head_dim;  /* from the config */
    int cap;               /* positions per sequence */
    int group;             /* q4 group along head_dim */
    size_t head_bytes;     /* bytes of one (sequence, head) key or value area */
    char **k, **v;         /* (n_slot * n_head) area pointers, sequence-major */
} KVLayer;

typedef struct {
    int n_layer;           /* layers */
    KVLayer *layer;        /* (n_layer) */
    char *mem;             /* all areas, for a cache held in RAM */
    char **ptrs;           /* the pointer tables of every layer */
} KVCache;

size_t kv_head_bytes(DType dt, int head_dim, int cap, int group); /* one area; DT_F16 is the GPU's (cap, head_dim) */
/* Bytes [*off, *off + *len) of a key (value: 1) area that hold positions [p0, p1). */
void kv_span(DType dt, int head_dim, int group, int p0, int p1, int value, size_t *off, size_t *len);
/* Stores one position's key and value rows (head_dim each) of one head. */
void kv_store(const KVLayer *kv, int slot, int head, int pos, const float *k, const float *v);
int kv_group(int head_dim, int group);                           /* the 4-bit cache's group */

typedef struct {
    int n;                 /* rows in the step */
    const int *tok;        /* (n) token ids */
    const int *slot;       /* (n) cache slot of each row */
    const int *pos;        /* (n) position of each row in its sequence, from 0 */
    const int *dev;        /* GPU: (3, n) copies of tok, slot, pos in device memory; NULL on the CPU */
} Step;

/* The device the layer code runs on: these ops over its buffers (host memory
 * for opt.c's CPU backend, device memory for kernels.cu's GPU backend). */
typedef struct Scratch Scratch;
typedef struct Backend {
    const char *name;      /* "cpu" or "gpu" */
    /* y (rows, N) = x (rows, K) . W^T + b, then += y when acc, ReLU when relu */
    void (*linear)(float *y, const float *x, const Tensor *w, const float *b, int rows, int acc, int relu);
    /* s->q, s->k, s->v = L's three projections of one input x (rows, hidden):
     * one call, so the GPU narrows x once for the three GEMMs (kernels.cu) */
    void (*qkv)(const Layer *L, const float *x, int rows, Scratch *s);
    /* LayerNorm over rows of n, eps 1e-5; w, b NULL when not affine; out may be x */
    void (*layernorm)(float *out, const float *x, const float *w, const float *b, int rows, int n);
    /* the step's k, v into the cache, then attention: s->q, s->k, s->v -> s->att */
    void (*attention)(const Config *c, const KVLayer *kv, const Step *st, Scratch *s);
    /* rows of table t as f32: row tok[r] (offset 0) or pos[r] + offset, into out (n, t->cols) */
    void (*embed)(const Tensor *t, const Step *st, int offset, float *out);
    void (*add)(float *y, const float *x, size_t n);         /* y += x */
    void (*copy)(float *y, const float *x, size_t n);        /* y = x */
} Backend;
extern const Backend cpu_backend;

struct Scratch {
    const Backend *be;     /* the device these buffers live on */
    int rows;              /* capacity in rows */
    float *x;              /* (rows, hidden) residual stream */
    float *h;              /* (rows, max(hidden, embed_dim)) normalized input of a sublayer */
    float *q, *k, *v;      /* (rows, hidden) projections */
    float *att;            /* (rows, hidden) attention output before out_proj */
    float *f;              /* (rows, ffn) MLP hidden */
    float *e;              /* (rows, embed_dim) embeddings / final hidden */
    float *scores;         /* (threads, AQ, cap) per-thread attention scores */
    float *qscaled;        /* (threads, AQ, 512) per-thread scaled queries */
    int *grp;              /* (rows + 1) starts of the attention row groups */
    Observer observe;      /* called with every linear layer's input, or NULL */
    void *observe_ctx;     /* its context */
    int score_cap;         /* cap the scores buffer was sized for */
};

void kv_init(KVCache *kv, const Config *c, int n_slot, int cap, DType dt, int group);
void kv_free(KVCache *kv);
void scratch_init(Scratch *s, const Config *c, int rows, int cap);
void scratch_free(Scratch *s);
void model_forward(const Model *m, const KVCache *kv, const Step *st, Scratch *s);
void model_embed(const Model *m, const Step *st, float *x, Scratch *s);
void layer_forward(const Model *m, const Layer *L, int l, const KVLayer *kv, const Step *st, float *x, Scratch *s);
void model_final(const Model *m, const float *x, int n, float *out, Scratch *s);
void model_logits(const Model *m, float *logits, const float *hid, int rows);

/* ----------------------------------------------------------------------------
 * The compute device of offloading: memory of its own and four in-order
 * streams (compute, uploads, downloads, weight uploads) ordered by events. kernels.cu's GPU;
 * or the host standing in for one (OPT_HOST_DEVICE=1), whose memory is RAM,
 * copies memcpy and compute the CPU backend: it runs every GPU-tier path of
 * the schedule bit-exactly where there is no GPU, for the tests (its copies
 * run as late as the events allow, so a missing one shows). */
typedef struct Device {
    const char *name;      /* "gpu" or "host" */
    int half;              /* computes on 16-bit weights and an f16 cache (the GPU); else as the CPU does */
    const Backend *be;     /* compute on device buffers */
    void *(*alloc)(size_t n, const char *what);  /* device memory; dies naming what */
    void (*release)(void *p);
    void (*pin)(void *host, size_t n);   /* page-lock host memory for asynchronous copies */
    void (*unpin)(void *host);
    /* rows of w bytes between pitched buffers, in stream order: 0 compute, 1
     * uploads, 2 downloads, 3 weight uploads; kind 0 to the device, 1 from it, 2 within */
    void (*copy2d)(void *dst, size_t dpitch, const void *src, size_t spitch, size_t w, size_t rows, int kind, int stream);
    void *(*event)(void);                 /* a new event (never recorded: already complete) */
    void (*record)(void *ev, int stream); /* ev marks the stream's work so far */
    void (*wait)(int stream, void *ev);   /* the stream waits for ev */
    void (*sync)(void *ev);               /* the host waits for ev */
    void (*scratch)(Scratch *s, const Config *c, int rows, int cap); /* a workspace on the device */
    void (*scratch_free)(Scratch *s);
    double (*free_bytes)(void);           /* free device memory, 0 when unknown */
} Device;
extern const Device gpu_device;  /* kernels.cu (CUDA builds) */
extern const Device host_device; /* offload.c */

/* ----------------------------------------------------------------------------
 * offload.c: the policy's placement and FlexGen's block schedule. */

typedef struct {
    Policy pol;            /* percentages, batches, flags */
    const char *dir;       /* --offload-dir for the cache's and activations' disk share */
    double mem[TIER_COUNT];/* --gpu-mem, --cpu-mem, --disk-mem budgets in bytes; 0 = no limit */
    int quiet;             /* do not print the memory plan */
    const Device *dev;     /* the compute device (&gpu_device; &host_device in tests), or NULL: the CPU */
} OffloadCfg;

typedef struct {
    double peak[TIER_COUNT];   /* accounted peak bytes per tier */
    double plan[TIER_COUNT];   /* the plan's peak */
    double read_bytes, write_bytes; /* disk traffic */
    double read_bw, write_bw;  /* achieved bandwidth, bytes/s of busy I/O time */
    double t_compute, t_wait;  /* seconds computing, and computing waited for I/O */
    double io_busy;            /* seconds with some I/O in flight */
    double h2d_bytes, d2h_bytes; /* bytes copied to and from the compute device (0 on the CPU) */
} OffloadStats;

typedef struct Offload Offload;
/* Places the model per the policy, prints the memory plan and refuses (dies)
 * when a budget is exceeded, before allocating. rows_max: most rows of one
 * step (a block's prompt tokens); cap: positions per sequence. */
Offload *offload_open(Model *m, const OffloadCfg *c, int rows_max, int cap, DType kv_dt, int group);
/* One step over a block (slots 0 .. gbs*nb-1), layer by layer, batch by batch;
 * final hidden states of the rows into out (n, embed_dim). The output unit
 * (lm_head) stays staged for model_logits until the next step. On a pipeline
 * stage, xin (n, hidden) replaces the embeddings after stage 0, and out gets
 * the last layer's (n, hidden) before the last stage. */
void offload_forward(Offload *o, const Step *st, const float *xin, float *out);
/* Logits (rows <= 64, vocab) of final hidden rows, on the compute device. */
void offload_logits(Offload *o, float *logits, const float *hid, int rows);
void offload_stats(const Offload *o, OffloadStats *s);
void offload_close(Offload *o);
int offload_block(const Offload *o);       /* sequences per block */
/* A host buffer device d copies to and from: whole pages, page-locked on d
 * (a plain allocation when d is NULL); host_pinned_free releases it. */
void *host_pinned(const Device *d, size_t bytes, const char *what);
void host_pinned_free(const Device *d, void *p);
/* Removes from dir the scratch files (opt-cache-PID.bin, ..., opt-probe-PID.tmp)
 * of our runs that died unable to (SIGKILL), saying so on stderr. */
void offload_sweep(const char *dir);
double mem_usable(void);                   /* bytes of RAM we may still take: MemAvailable, under the cgroup limit */

/* ----------------------------------------------------------------------------
 * quant.c: SmoothQuant conversion. */

typedef struct {
    const char *calib;     /* calibration text: one sample per line, or plain text cut into samples */
    float alpha;           /* migration strength in [0, 1] (0.5) */
    int samples;           /* calibration samples (512) */
    int len;               /* tokens per sample (512) */
    int static_act;        /* O3: static per-tensor activation scales instead of per-token dynamic */
} SqOpts;
/* Calibrates on o->calib, folds the smoothing into the LayerNorms and the
 * linear weights (pre-LN models; post-LN ones get plain W8A8, with a note),
 * and turns every linear layer's weights into DT_I8. */
void sq_convert(Model *m, const Tokenizer *tok, const SqOpts *o);

/* ----------------------------------------------------------------------------
 * opt.c services for the other files. */

void config_load(Config *c, const char *dir);     /* config.json of a checkpoint directory; dies on error */
void shape_config(Config *c, const char *shape);  /* "opt-1.3b" or HxLxAxF; dies on error */
int64_t config_params(const Config *c);           /* parameter count */
double now_sec(void);                             /* monotonic seconds */
long meminfo_kb(const char *key);                  /* a /proc/meminfo line ("MemAvailable:") in kB; -1 absent */
int tmp_add(const char *path, int dir);           /* removed at exit and on a fatal signal (dir: flat); returns its slot */
void tmp_keep(int slot);                          /* no longer temporary (renamed into place): left alone */
void tmp_remove(int slot);                        /* removed now */
double size_parse(const char *flag, const char *v); /* "16G", "1.5T", "512M" (binary units) -> bytes; dies otherwise (lp.c) */
void size_format(char *out, size_t cap, double bytes); /* "1.5 GiB", "300 MiB" (lp.c) */

/* ----------------------------------------------------------------------------
 * Pipeline stages across processes (pipe.c, built with make MPI=1): the
 * transport the engine uses, one message at a time, in order per pair of ranks. */

typedef struct {
    int rank, size;        /* this process's stage, and the number of stages */
    const char *host;      /* this process's host name, for messages */
    void *(*isend)(const void *p, size_t n, int to);   /* posts a send of n bytes; returns its request */
    void *(*irecv)(void *p, size_t cap, int from);     /* posts a receive of up to cap bytes */
    size_t (*wait)(void *req);                          /* completes a request: bytes received (sends: 0) */
    void (*bcast)(void *p, size_t n);                   /* rank 0's n bytes to every rank */
    void (*gather)(const void *p, size_t n, void *all); /* every rank's n bytes to rank 0's all (size * n) */
    void (*cancel)(void *req);                          /* withdraws a posted receive */
    void (*abort)(void);                                /* die(): ends every rank, after this one's message */
    void (*progress)(void);                             /* lets MPI move posted messages (between layers) */
} Comm;
extern const Comm *g_comm; /* NULL: one process */
extern FILE *g_err;        /* where die() writes (NULL: stderr); a quiet pipeline rank's real stderr */
/* Starts MPI when launched with more than one rank (sets g_comm): the number of ranks, else 0. */
int pipe_start(int *argc, char ***argv);
void pipe_end(void);       /* after a successful run */

/* ----------------------------------------------------------------------------
 * kernels.cu (CUDA builds); opt.c has the stand-ins for CPU-only builds. */

int gpu_available(void);          /* 1 when a usable CUDA device is present */
int gpu_present(void);            /* 1 when a GPU is there, usable or not: why not is worth saying */
const char *gpu_describe(void);   /* the device, or why there is none */
/* The GPU backend (CUDA builds; CPU-only builds have stand-ins that die). The
 * same layer code runs on it with a device copy of the model, a device
 * scratch and a device cache. */
extern const Backend gpu_backend;
void gpu_model_upload(const Model *m, Model *dev);  /* every tensor to the device */
Tensor gpu_tensor_upload(const Tensor *t);          /* one (f32 narrowed to f16) */
double gpu_model_bytes(const Model *m);             /* device bytes the upload takes */
double gpu_free_bytes(void);                        /* free device memory */
void gpu_scratch_init(Scratch *s, const Config *c, int rows, int cap);
void gpu_scratch_free(Scratch *s);
void gpu_kv_init(KVCache *kv, const Config *c, int n_slot, int cap, DType dt, int group); /* f16 or 4-bit */
void gpu_kv_free(KVCache *kv);
void gpu_step_upload(Step *st, Scratch *s);         /* sets st->dev */
void gpu_sync(void);
/* lm_head and sampling (target NULL) or log-probabilities (target given) for
 * rows[0..cnt) of the device's final hidden states fin (row stride ld). */
void gpu_logits(const Model *dm, const float *fin, int ld, const int *rows, int cnt, const int *target,
                float temp, int topk, float topp, const float *u, int *tok, float *lp);
int gpu_graph_launch(int n);      /* replays the captured decode step of n rows; 0 if none */
void gpu_capture_begin(void);
void gpu_capture_end(int n);      /* instantiates, keeps and launches it */
void gpu_graphs_reset(void);
int gpu_profile(double ms[2]);    /* OPT_GPU_PROFILE set: ms[0] in GEMMs, ms[1] in the other ops so far */

#endif
