/* opt.h: the types shared by opt.c, quant.c, offload.c, lp.c and kernels.cu.
 *
 * Data flow (one direction): CLI -> Config + Tokenizer -> checkpoint mmap'd into
 * Tensors -> Policy (flags or lp.c) -> placement on tiers -> block schedule ->
 * logits -> sampler -> stdout. Everything a kernel needs to know about a weight
 * (format, shape, where it lives) travels in its Tensor. */
#ifndef OPT_H
#define OPT_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

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
    const void *scale;    /* DT_Q4: (rows, cols/group) f16 scales; DT_I8: (rows) f32 scales */
    const void *zero;     /* DT_Q4: (rows, cols/group) f16 minimums */
    int group;            /* DT_Q4 group size along cols (32, 64, 128) */
    Tier tier;            /* where data lives */
    const char *name;     /* checkpoint name, for error messages */
} Tensor;

size_t dtype_bytes(DType t, int64_t n); /* bytes for n elements (packed formats rounded up) */
size_t tensor_bytes(const Tensor *t);   /* data + scales */

/* ----------------------------------------------------------------------------
 * CPU kernels (opt.c, quant.c). Every dot product has one reduction order: 16
 * lanes, lane l accumulating k = l, l+16, ... with fused multiply-adds, then
 * the tree (l, l+8), (l, l+4), (l, l+2), (l, l+1); see opt.c's kernels. */

enum { SIMD_SCALAR, SIMD_AVX2, SIMD_AVX512 };
extern int g_simd;        /* SIMD level in use (OPT_SIMD forces one) */
extern int g_simd_max;    /* best level of this CPU */
extern int g_vnni;        /* AVX-512 VNNI present */
#define T_AVX2 __attribute__((target("avx2,fma,f16c")))
#define T_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

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

/* ----------------------------------------------------------------------------
 * opt.c services for the other files. */

void config_load(Config *c, const char *dir);     /* config.json of a checkpoint directory; dies on error */
void shape_config(Config *c, const char *shape);  /* "opt-1.3b" or HxLxAxF; dies on error */
int64_t config_params(const Config *c);           /* parameter count */
double now_sec(void);                             /* monotonic seconds */

/* ----------------------------------------------------------------------------
 * kernels.cu (CUDA builds); opt.c has the stand-ins for CPU-only builds. */

int gpu_available(void);          /* 1 when a usable CUDA device is present */
const char *gpu_describe(void);   /* the device, or why there is none */

#endif
