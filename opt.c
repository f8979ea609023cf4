/* opt.c: OPT language models on the CPU, from Hugging Face checkpoints.
 *
 * Sections, in order: utilities, JSON, config, checkpoints (safetensors, PyTorch
 * zip/pickle, shard indexes), CPU kernels (runtime SIMD dispatch), the model,
 * tokenizer, sampler, command line. See README.md for the design. */
#include "opt.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* ----------------------------------------------------------------------------
 * Utilities */

static const char *g_prog = "opt";  /* names us in messages ("opt (rank 2 on node7)" in a pipeline) */
const Comm *g_comm;
FILE *g_err;
static bool g_bar; /* a progress line is open on stderr (a terminal): a message ends it first */

static void bar_end(void) {
    if (g_bar) { fputc('\n', stderr); g_bar = false; }
}

/* The first thread to die reports and exits; any other (an OpenMP worker
 * hitting the same bad value) waits for that exit instead of interleaving
 * its message and racing exit(). */
static volatile sig_atomic_t g_signalled; /* a fatal signal is ending us: its files are going */

static void die_begin(void) {
    static atomic_flag dying = ATOMIC_FLAG_INIT;
    /* another thread's signal handler removing our files is what made this one fail: say nothing */
    if (atomic_flag_test_and_set(&dying) || g_signalled) for (;;) pause();
}

/* Fuzz builds only: a harness catches die() and goes on with the next input. */
#ifdef OPT_FUZZ
jmp_buf *g_fuzz_jmp;
char g_fuzz_msg[256];
#define FUZZ_CATCH(fmt) do { if (g_fuzz_jmp) { va_list fa; va_start(fa, fmt); \
    vsnprintf(g_fuzz_msg, sizeof g_fuzz_msg, fmt, fa); va_end(fa); longjmp(*g_fuzz_jmp, 1); } } while (0)
#else
#define FUZZ_CATCH(fmt) ((void)0)
#endif

static void tmp_unlink_own(void);

/* After the message: the temporary files removed (by exit), and the exit. A
 * pipeline rank takes every other rank down with it (their signal handlers
 * clean up), having removed its own files. */
static _Noreturn void die_end(void) {
    if (g_comm) { tmp_unlink_own(); g_comm->abort(); }
    exit(1);
}

void die(const char *fmt, ...) {
    FUZZ_CATCH(fmt);
    die_begin();
    bar_end();
    FILE *f = g_err ? g_err : stderr;
    va_list ap;
    va_start(ap, fmt);
    fprintf(f, "%s: ", g_prog);
    vfprintf(f, fmt, ap);
    fputc('\n', f);
    fflush(f);
    va_end(ap);
    die_end();
}

void die_at(const char *file, int line, const char *fmt, ...) {
    FUZZ_CATCH(fmt);
    die_begin();
    bar_end();
    FILE *f = g_err ? g_err : stderr;
    va_list ap;
    va_start(ap, fmt);
    fprintf(f, "%s: %s:%d: ", g_prog, file, line);
    vfprintf(f, fmt, ap);
    fputc('\n', f);
    fflush(f);
    va_end(ap);
    die_end();
}

void warn_once(int *flag, const char *fmt, ...) {
    if (flag && *flag) return;
    if (flag) *flag = 1;
    bar_end();
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: ", g_prog);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

/* Temporary files: output not yet complete (a file or a directory renamed
 * into place when done) and offloading's scratch files. Whatever is still
 * registered is removed at exit (die() included) and on every signal that
 * ends the process, so an interrupted run leaves nothing that looks finished
 * and nothing that fills the disk. The handler only unlinks: it is
 * async-signal-safe, and paths are published by their first byte last. */
#define TMP_SLOTS 16
static char g_tmp[TMP_SLOTS][4096];   /* paths to remove; "" is a free slot */
static char g_tmp_dir[TMP_SLOTS];     /* 1: a flat directory, emptied first */

/* A directory's files (no subdirectories), then itself; no allocation, no stdio. */
static void dir_remove_flat(const char *path) {
    for (int pass = 0; pass < 3 && rmdir(path) != 0 && errno == ENOTEMPTY; pass++) {
        int fd = open(path, O_RDONLY | O_DIRECTORY);
        if (fd < 0) return;
        char buf[4096];
        long n;
        while ((n = syscall(SYS_getdents64, fd, buf, sizeof buf)) > 0)
            for (long at = 0; at < n;) { /* struct linux_dirent64: ino, off, reclen, type, name */
                unsigned short len;
                memcpy(&len, buf + at + 16, sizeof len);
                const char *name = buf + at + 19;
                if (!(name[0] == '.' && (!name[1] || (name[1] == '.' && !name[2])))) unlinkat(fd, name, 0);
                at += len;
            }
        close(fd);
    }
}

void tmp_remove(int slot) {
    if (slot < 0 || !g_tmp[slot][0]) return;
    if (g_tmp_dir[slot]) dir_remove_flat(g_tmp[slot]); else unlink(g_tmp[slot]);
    g_tmp[slot][0] = 0;
}

static void tmp_unlink_all(void) {
    for (int i = 0; i < TMP_SLOTS; i++) tmp_remove(i);
}

/* A dying pipeline rank's: its files, then the job's shared directory if that
 * left it empty: a rank alone on its host is the last one there. Ranks beside
 * it keep a file in it from the start (pipe_offload_dir), so it stays for
 * them to remove when the launcher ends them. */
static void tmp_unlink_own(void) {
    for (int i = 0; i < TMP_SLOTS; i++)
        if (g_tmp[i][0] && !g_tmp_dir[i]) unlink(g_tmp[i]);
    for (int i = 0; i < TMP_SLOTS; i++) {
        if (g_tmp[i][0] && g_tmp_dir[i]) rmdir(g_tmp[i]);
        g_tmp[i][0] = 0; /* MPI_Abort may exit(): nothing left for atexit */
    }
}

static void tmp_on_signal(int sig) {
    g_signalled = 1;
    tmp_unlink_all();
    raise(sig); /* SA_RESETHAND: the default action, once the handler returns */
}

int tmp_add(const char *path, int dir) {
    static int armed;
    if (!armed) {
        armed = 1;
        atexit(tmp_unlink_all);
        static const int sigs[] = {SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGPIPE, SIGALRM, SIGUSR1, SIGUSR2, SIGXCPU, SIGXFSZ, SIGVTALRM, SIGPROF};
        for (size_t i = 0; i < sizeof sigs / sizeof *sigs; i++) {
            struct sigaction old, sa = {.sa_handler = tmp_on_signal, .sa_flags = SA_RESETHAND};
            if (sigaction(sigs[i], NULL, &old) == 0 && old.sa_handler == SIG_IGN) continue; /* nohup's choice stands */
            sigfillset(&sa.sa_mask);
            sigaction(sigs[i], &sa, NULL);
        }
    }
    size_t n = strlen(path);
    for (int i = 0; i < TMP_SLOTS; i++) {
        if (g_tmp[i][0]) continue;
        if (n >= sizeof g_tmp[i]) die("%s: path too long", path);
        g_tmp_dir[i] = (char)dir;
        memcpy(g_tmp[i] + 1, path + 1, n);
        atomic_signal_fence(memory_order_seq_cst);
        g_tmp[i][0] = path[0];
        return i;
    }
    die("%s: more than %d temporary files", path, TMP_SLOTS);
}

void tmp_keep(int slot) { if (slot >= 0) g_tmp[slot][0] = 0; }

void *check_malloc(size_t n, const char *what) {
    void *p = malloc(n ? n : 1);
    if (!p) die("out of memory allocating %zu bytes for %s", n, what);
    return p;
}

void *check_calloc(size_t n, const char *what) {
    void *p = calloc(1, n ? n : 1);
    if (!p) die("out of memory allocating %zu bytes for %s", n, what);
    return p;
}

void *check_realloc(void *p, size_t n, const char *what) {
    p = realloc(p, n ? n : 1);
    if (!p) die("out of memory allocating %zu bytes for %s", n, what);
    return p;
}

char *check_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    return memcpy(check_malloc(n, "a string"), s, n);
}

/* Checked multiplication, the one place the readers multiply what a file
 * declares (element counts, byte sizes): false on overflow, so a hostile size is
 * refused instead of wrapping into a small one that passes a bounds check. Sums
 * and offsets are checked as `x > n - k` once k <= n is known, which cannot wrap. */
bool size_mul(size_t a, size_t b, size_t *r) { return !__builtin_mul_overflow(a, b, r); }

/* ----------------------------------------------------------------------------
 * JSON: a strict recursive-descent parser into a small tree. Big inputs (a
 * 900 kB vocab.json) are fine; nesting depth is bounded so hostile headers
 * cannot overflow the stack. */

typedef struct {
    const char *s, *end, *start; /* cursor, end, beginning (for offsets in errors) */
    char *err; size_t errlen;    /* where the first error goes */
    int depth;                   /* current nesting */
} JsonParser;

static bool jp_fail(JsonParser *p, const char *what) {
    if (p->err && !p->err[0]) snprintf(p->err, p->errlen, "byte %td: %s", p->s - p->start, what);
    return false;
}

static void jp_ws(JsonParser *p) {
    while (p->s < p->end && (*p->s == ' ' || *p->s == '\t' || *p->s == '\n' || *p->s == '\r')) p->s++;
}

static int jp_hex4(const char *s) {
    int v = 0;
    for (int i = 0; i < 4; i++) {
        int c = s[i], d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

static int utf8_put(char *o, unsigned cp) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) { o[0] = (char)(0xC0 | cp >> 6); o[1] = (char)(0x80 | (cp & 63)); return 2; }
    if (cp < 0x10000) { o[0] = (char)(0xE0 | cp >> 12); o[1] = (char)(0x80 | (cp >> 6 & 63)); o[2] = (char)(0x80 | (cp & 63)); return 3; }
    o[0] = (char)(0xF0 | cp >> 18); o[1] = (char)(0x80 | (cp >> 12 & 63)); o[2] = (char)(0x80 | (cp >> 6 & 63)); o[3] = (char)(0x80 | (cp & 63));
    return 4;
}

/* Length of the valid UTF-8 sequence at s (1-4), or 0 when it is invalid
 * (overlong, surrogate, beyond U+10FFFF, truncated). */
static int utf8_len(const unsigned char *s, size_t n, unsigned *cp) {
    unsigned c = s[0];
    if (c < 0x80) { *cp = c; return 1; }
    int len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 ? 2 : 0;
    if (!len || c > 0xF4 || (size_t)len > n) return 0;
    unsigned v = c & (0x3F >> (len - 1));
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        v = v << 6 | (s[i] & 0x3F);
    }
    if ((len == 3 && v < 0x800) || (len == 4 && (v < 0x10000 || v > 0x10FFFF)) || (v >= 0xD800 && v <= 0xDFFF)) return 0;
    *cp = v;
    return len;
}

static bool jp_string(JsonParser *p, char **out, size_t *outlen) {
    p->s++; /* opening quote */
    const char *q = p->s;
    size_t cap = 0;
    while (q < p->end && *q != '"') { if (*q == '\\') q++; q++; cap++; }
    if (q >= p->end) return jp_fail(p, "unterminated string");
    char *o = check_malloc(cap * 4 + 1, "a JSON string"), *w = o;
    while (*p->s != '"') {
        unsigned char c = (unsigned char)*p->s;
        if (c < 0x20) { free(o); return jp_fail(p, "control character in string"); }
        if (c != '\\') {
            unsigned cp;
            int n = utf8_len((const unsigned char *)p->s, (size_t)(p->end - p->s), &cp);
            if (!n) { free(o); return jp_fail(p, "invalid UTF-8 in string"); }
            memcpy(w, p->s, (size_t)n); w += n; p->s += n;
            continue;
        }
        p->s++;
        char e = *p->s++;
        switch (e) {
        case '"': *w++ = '"'; break;
        case '\\': *w++ = '\\'; break;
        case '/': *w++ = '/'; break;
        case 'b': *w++ = '\b'; break;
        case 'f': *w++ = '\f'; break;
        case 'n': *w++ = '\n'; break;
        case 'r': *w++ = '\r'; break;
        case 't': *w++ = '\t'; break;
        case 'u': {
            int h = p->end - p->s >= 4 ? jp_hex4(p->s) : -1;
            if (h < 0) { free(o); return jp_fail(p, "bad \\u escape"); }
            p->s += 4;
            unsigned cp = (unsigned)h;
            if (cp >= 0xD800 && cp <= 0xDBFF) { /* surrogate pair */
                int l = p->end - p->s >= 6 && p->s[0] == '\\' && p->s[1] == 'u' ? jp_hex4(p->s + 2) : -1;
                if (l < 0xDC00 || l > 0xDFFF) { free(o); return jp_fail(p, "unpaired surrogate"); }
                p->s += 6;
                cp = 0x10000 + ((cp - 0xD800) << 10) + ((unsigned)l - 0xDC00);
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) { free(o); return jp_fail(p, "unpaired surrogate"); }
            w += utf8_put(w, cp);
            break;
        }
        default: free(o); p->s--; return jp_fail(p, "bad escape");
        }
    }
    p->s++;
    *w = 0;
    *out = o;
    *outlen = (size_t)(w - o);
    return true;
}

static bool jp_value(JsonParser *p, Json *v);

static bool jp_container(JsonParser *p, Json *v, bool obj) {
    char close = obj ? '}' : ']';
    int cap = 0;
    v->type = obj ? J_OBJ : J_ARR;
    p->s++;
    if (++p->depth > 64) return jp_fail(p, "nesting too deep");
    jp_ws(p);
    if (p->s < p->end && *p->s == close) { p->s++; p->depth--; return true; }
    for (;;) {
        if (v->n == cap) {
            cap = cap ? cap * 2 : 8;
            v->kids = check_realloc(v->kids, (size_t)cap * sizeof(Json), "JSON");
            if (obj) v->keys = check_realloc(v->keys, (size_t)cap * sizeof(char *), "JSON");
        }
        Json *k = &v->kids[v->n];
        memset(k, 0, sizeof *k);
        jp_ws(p);
        if (obj) {
            size_t kl;
            if (p->s >= p->end || *p->s != '"') return jp_fail(p, "expected a key");
            if (!jp_string(p, &v->keys[v->n], &kl)) return false;
            jp_ws(p);
            if (p->s >= p->end || *p->s != ':') { v->n++; k->type = J_NULL; return jp_fail(p, "expected ':'"); }
            p->s++;
        }
        v->n++;
        if (!jp_value(p, k)) return false;
        jp_ws(p);
        if (p->s < p->end && *p->s == ',') { p->s++; continue; }
        if (p->s < p->end && *p->s == close) { p->s++; p->depth--; return true; }
        return jp_fail(p, obj ? "expected ',' or '}'" : "expected ',' or ']'");
    }
}

static bool jp_value(JsonParser *p, Json *v) {
    jp_ws(p);
    if (p->s >= p->end) return jp_fail(p, "unexpected end of input");
    char c = *p->s;
    if (c == '{' || c == '[') return jp_container(p, v, c == '{');
    if (c == '"') { v->type = J_STR; return jp_string(p, &v->str, &v->len); }
    static const char *const words[] = {"true", "false", "null"};
    for (int i = 0; i < 3; i++) {
        size_t n = strlen(words[i]);
        if ((size_t)(p->end - p->s) >= n && !memcmp(p->s, words[i], n)) {
            v->type = i == 2 ? J_NULL : J_BOOL;
            v->num = i == 0;
            p->s += n;
            return true;
        }
    }
    if (c == '-' || (c >= '0' && c <= '9')) {
        char buf[64];
        size_t n = 0;
        while (p->s + n < p->end && n < sizeof buf - 1 && strchr("+-0123456789.eE", p->s[n])) n++;
        memcpy(buf, p->s, n);
        buf[n] = 0;
        char *e;
        v->type = J_NUM;
        v->num = strtod(buf, &e);
        if (e != buf + n) return jp_fail(p, "bad number");
        p->s += n;
        return true;
    }
    return jp_fail(p, "unexpected character");
}

Json *json_parse(const char *text, size_t len, char *err, size_t errlen) {
    JsonParser p = {text, text + len, text, err, errlen, 0};
    if (err && errlen) err[0] = 0;
    Json *v = check_calloc(sizeof *v, "JSON");
    bool ok = jp_value(&p, v);
    if (ok) { jp_ws(&p); if (p.s != p.end) ok = jp_fail(&p, "trailing characters"); }
    if (!ok) { json_free(v); return NULL; }
    return v;
}

static void json_free_in(Json *j) {
    for (int i = 0; i < j->n; i++) {
        json_free_in(&j->kids[i]);
        if (j->keys) free(j->keys[i]);
    }
    free(j->kids);
    free(j->keys);
    free(j->str);
}

void json_free(Json *j) {
    if (!j) return;
    json_free_in(j);
    free(j);
}

const Json *json_get(const Json *obj, const char *key) {
    if (!obj || obj->type != J_OBJ) return NULL;
    for (int i = 0; i < obj->n; i++)
        if (!strcmp(obj->keys[i], key)) return &obj->kids[i];
    return NULL;
}

/* Bytes an invalid UTF-8 sequence at s occupies under the "maximal subpart"
 * rule that Python's errors="replace" follows: one U+FFFD per such run. */
static int utf8_bad_len(const unsigned char *s, size_t n) {
    unsigned c = s[0], lo = 0x80, hi = 0xBF;
    int len;
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c == 0xE0) { len = 3; lo = 0xA0; }
    else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) len = 3;
    else if (c == 0xED) { len = 3; hi = 0x9F; }
    else if (c == 0xF0) { len = 4; lo = 0x90; }
    else if (c >= 0xF1 && c <= 0xF3) len = 4;
    else if (c == 0xF4) { len = 4; hi = 0x8F; }
    else return 1;
    if (n < 2 || s[1] < lo || s[1] > hi) return 1;
    int i = 2;
    while (i < len && (size_t)i < n && (s[i] & 0xC0) == 0x80) i++;
    return i;
}

/* Writes s as a JSON string. Invalid UTF-8 (a generation cut inside a
 * character) becomes U+FFFD, as Hugging Face's errors="replace" decoding does. */
void json_write_str(FILE *f, const char *s, size_t len) {
    fputc('"', f);
    for (size_t i = 0; i < len;) {
        unsigned char c = (unsigned char)s[i];
        unsigned cp;
        int n = utf8_len((const unsigned char *)s + i, len - i, &cp);
        if (!n) { fputs("\xEF\xBF\xBD", f); i += utf8_bad_len((const unsigned char *)s + i, len - i); continue; }
        if (c == '"' || c == '\\') { fputc('\\', f); fputc(c, f); }
        else if (c == '\n') fputs("\\n", f);
        else if (c == '\t') fputs("\\t", f);
        else if (c == '\r') fputs("\\r", f);
        else if (c < 0x20 || c == 0x7F) fprintf(f, "\\u%04x", c);
        else fwrite(s + i, 1, (size_t)n, f);
        i += (size_t)n;
    }
    fputc('"', f);
}

/* Reads a whole small file (config.json, an index) into a NUL-terminated buffer. */
static char *file_read(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = check_malloc(cap, path);
    for (size_t r; (r = fread(buf + n, 1, cap - n - 1, f)) > 0;) {
        n += r;
        if (n + 1 == cap) buf = check_realloc(buf, cap *= 2, path);
    }
    bool err = ferror(f);
    fclose(f);
    if (err) die("%s: read error: %s", path, strerror(errno));
    buf[n] = 0;
    if (len) *len = n;
    return buf;
}

static Json *json_load(const char *path) {
    size_t n;
    char *text = file_read(path, &n), err[128];
    if (!text) die("%s: %s", path, strerror(errno));
    Json *j = json_parse(text, n, err, sizeof err);
    free(text);
    if (!j) die("%s: invalid JSON: %s", path, err);
    return j;
}

static char *path_join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = check_malloc(n, "a path");
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static bool file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* ----------------------------------------------------------------------------
 * Config: config.json as Hugging Face writes it for OPTForCausalLM. */

static int cfg_int(const Json *j, const char *key, int def, const char *path) {
    const Json *v = json_get(j, key);
    if (!v || v->type == J_NULL) {
        if (def == INT32_MIN) die("%s: missing \"%s\"", path, key);
        return def;
    }
    if (v->type != J_NUM || v->num != floor(v->num) || v->num < 0 || v->num > 1e9)
        die("%s: \"%s\" must be a non-negative integer", path, key);
    return (int)v->num;
}

static int cfg_bool(const Json *j, const char *key, int def, const char *path) {
    const Json *v = json_get(j, key);
    if (!v || v->type == J_NULL) return def;
    if (v->type != J_BOOL) die("%s: \"%s\" must be true or false", path, key);
    return (int)v->num;
}

/* Validates the sizes so that nothing later can overflow or divide by zero. */
static void config_check(const Config *c, const char *path) {
    if (c->hidden <= 0 || c->ffn <= 0 || c->n_layer <= 0 || c->n_head <= 0 || c->vocab <= 0 || c->max_pos <= 0 || c->embed_dim <= 0)
        die("%s: sizes must be positive", path);
    if (c->hidden % c->n_head) die("%s: hidden_size %d is not a multiple of num_attention_heads %d", path, c->hidden, c->n_head);
    if (c->hidden / c->n_head > 512) die("%s: head dimension %d exceeds 512", path, c->hidden / c->n_head);
    if (c->hidden > 65536 || c->ffn > 262144 || c->n_layer > 1024 || c->vocab > 1 << 22 || c->max_pos > 1 << 20 || c->embed_dim > 65536)
        die("%s: sizes are implausibly large", path);
}

/* The fields of a parsed config.json; `what` names it in errors. */
static void config_from_json(Config *c, const Json *j, const char *path) {
    if (j->type != J_OBJ) die("%s: not a JSON object", path);
    const Json *mt = json_get(j, "model_type");
    if (mt && mt->type == J_STR && strcmp(mt->str, "opt")) die("%s: model_type is \"%s\", not \"opt\"", path, mt->str);
    const Json *act = json_get(j, "activation_function");
    if (act && (act->type != J_STR || strcmp(act->str, "relu")))
        die("%s: activation_function must be \"relu\" (OPT)", path);
    memset(c, 0, sizeof *c);
    c->hidden = cfg_int(j, "hidden_size", INT32_MIN, path);
    c->ffn = cfg_int(j, "ffn_dim", INT32_MIN, path);
    c->n_layer = cfg_int(j, "num_hidden_layers", INT32_MIN, path);
    c->n_head = cfg_int(j, "num_attention_heads", INT32_MIN, path);
    c->vocab = cfg_int(j, "vocab_size", INT32_MIN, path);
    c->max_pos = cfg_int(j, "max_position_embeddings", INT32_MIN, path);
    c->embed_dim = cfg_int(j, "word_embed_proj_dim", c->hidden, path);
    c->pre_ln = cfg_bool(j, "do_layer_norm_before", 1, path);
    c->final_ln = c->pre_ln && !cfg_bool(j, "_remove_final_layer_norm", 0, path);
    c->bias = cfg_bool(j, "enable_bias", 1, path);
    c->ln_affine = cfg_bool(j, "layer_norm_elementwise_affine", 1, path);
    c->bos = 2; /* OPT's tokenizer prepends </s>, whatever bos_token_id says (opt-30b says 0) */
    c->eos = cfg_int(j, "eos_token_id", 2, path);
    c->pad = cfg_int(j, "pad_token_id", 1, path);
    config_check(c, path);
    c->head_dim = c->hidden / c->n_head;
}

static void config_name(Config *c, const char *path) {
    const char *base = strrchr(path, '/');
    base = base && base[1] ? base + 1 : path;
    snprintf(c->name, sizeof c->name, "%s", base);
}

void config_load(Config *c, const char *dir) {
    char *path = path_join(dir, "config.json");
    if (!file_exists(path)) die("%s: missing (is %s an OPT checkpoint directory?)", path, dir);
    Json *j = json_load(path);
    config_from_json(c, j, path);
    config_name(c, dir);
    json_free(j);
    free(path);
}

/* Parameter count of the architecture the config describes. */
int64_t config_params(const Config *c) {
    int64_t h = c->hidden, f = c->ffn, e = c->embed_dim;
    int64_t layer = 4 * h * h + 2 * h * f + (c->bias ? 4 * h + f + h : 0) + (c->ln_affine ? 4 * h : 0);
    int64_t n = (int64_t)c->vocab * e + (int64_t)(c->max_pos + 2) * h + c->n_layer * layer;
    if (e != h) n += 2 * e * h;
    if (c->final_ln && c->ln_affine) n += 2 * h;
    return n;
}

/* ----------------------------------------------------------------------------
 * Checkpoints. Every weight file is mmap'd read-only; tensors point into the
 * mapping, so the page cache holds the only copy of the model. Formats: a
 * Hugging Face directory with model.safetensors, sharded safetensors with
 * model.safetensors.index.json, pytorch_model.bin (torch.save's zip of a
 * pickle plus raw storages) or its sharded variant. */

const char *const dtype_names[DT_COUNT] = {"f32", "f16", "bf16", "q4", "i8"};
const char *const tier_names[TIER_COUNT] = {"gpu", "cpu", "disk"};

size_t dtype_bytes(DType t, int64_t n) {
    switch (t) {
    case DT_F32: return (size_t)n * 4;
    case DT_F16: case DT_BF16: return (size_t)n * 2;
    case DT_Q4: return (size_t)(n + 1) / 2;
    default: return (size_t)n;
    }
}




static void map_file(MapFile *m, const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("%s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) die("%s: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode)) die("%s: not a regular file", path);
    if (st.st_size == 0) die("%s: empty file", path);
    void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) die("%s: mmap: %s", path, strerror(errno));
    close(fd);
    m->path = check_strdup(path);
    m->base = p;
    m->size = (size_t)st.st_size;
}

static const char *ck_key(const char *name) {
    if (!strncmp(name, "model.", 6)) name += 6;
    if (!strncmp(name, "decoder.", 8)) name += 8;
    return name;
}

static CkTensor *ck_add(Checkpoint *ck, const char *name, size_t namelen) {
    if (ck->n == ck->cap) ck->t = check_realloc(ck->t, (size_t)(ck->cap = ck->cap ? 2 * ck->cap : 256) * sizeof *ck->t, "tensor list");
    CkTensor *t = &ck->t[ck->n++];
    memset(t, 0, sizeof *t);
    t->name = check_malloc(namelen + 1, "a tensor name");
    memcpy(t->name, name, namelen);
    t->name[namelen] = 0;
    t->key = ck_key(t->name);
    t->file = ck->n_files - 1;
    return t;
}

/* Element count of a declared shape; false when it does not fit an int64. */
static bool ck_count(const CkTensor *t, size_t *n) {
    *n = 1;
    for (int i = 0; i < t->ndim; i++)
        if (t->shape[i] < 0 || !size_mul(*n, (size_t)t->shape[i], n)) return false;
    return *n <= INT64_MAX;
}

/* A loaded tensor's element count (the readers checked it fits). */
static int64_t ck_numel(const CkTensor *t) {
    size_t n;
    return ck_count(t, &n) ? (int64_t)n : -1;
}

/* Bytes per stored element (a native file's 4-bit codes are stored as U8),
 * which is also the alignment the kernels' typed loads need. */
static size_t ck_align(DType t) { return t == DT_F32 ? 4 : t == DT_F16 || t == DT_BF16 ? 2 : 1; }

/* --- safetensors: u64 header length, JSON header, raw little-endian data --- */

static bool dtype_parse(const char *s, DType *t) {
    static const char *const st[] = {"F32", "F16", "BF16"};
    for (int i = 0; i < 3; i++) if (!strcmp(s, st[i])) { *t = (DType)i; return true; }
    if (!strcmp(s, "U8")) { *t = DT_Q4; return true; }  /* native packed file: 4-bit codes */
    if (!strcmp(s, "I8")) { *t = DT_I8; return true; }  /* native packed file: int8 weights */
    return false;
}

/* A header offset: a whole number of bytes within the data. */
static bool st_offset(const Json *v, size_t dlen, size_t *out) {
    if (v->type != J_NUM || !(v->num >= 0 && v->num < 0x1p63) || v->num != floor(v->num)) return false;
    *out = (size_t)v->num;
    return *out <= dlen;
}

static size_t ck_bytes(const CkTensor *t) { /* of a tensor whose count the reader checked */
    size_t n;
    ck_count(t, &n);
    return n * ck_align(t->dtype);
}

static int ck_data_cmp(const void *x, const void *y) {
    const CkTensor *a = x, *b = y;
    if (a->data != b->data) return (const uint8_t *)a->data < (const uint8_t *)b->data ? -1 : 1;
    return ck_bytes(a) < ck_bytes(b) ? -1 : ck_bytes(a) > ck_bytes(b);
}

/* The format requires the tensors to tile the data exactly: an overlap would
 * alias two weights, and a gap or tail hides bytes nothing accounts for.
 * Sorts the file's tensors, t[first..n), by where their data lies. */
static void st_check_tiling(Checkpoint *ck, const char *path, int first, const uint8_t *data, size_t dlen) {
    int n = ck->n - first;
    CkTensor *t = n ? ck->t + first : NULL;
    if (n) qsort(t, (size_t)n, sizeof *t, ck_data_cmp);
    size_t pos = 0;
    for (int i = 0; i < n; i++) {
        size_t b = (size_t)((const uint8_t *)t[i].data - data);
        if (b < pos) die("%s: tensor %s: data bytes [%zu, %zu) overlap tensor %s's", path, t[i].name, b, b + ck_bytes(&t[i]), t[i - 1].name);
        if (b > pos) die("%s: tensor %s: data starts at byte %zu, leaving a gap after byte %zu", path, t[i].name, b, pos);
        pos = b + ck_bytes(&t[i]);
    }
    if (pos != dlen) die("%s: %zu data bytes after the last tensor (data_offsets must cover the data exactly)", path, dlen - pos);
}

static void ck_read_safetensors(Checkpoint *ck, const char *path) {
    ck->files = check_realloc(ck->files, (size_t)(ck->n_files + 1) * sizeof(MapFile), "files");
    MapFile *m = &ck->files[ck->n_files++];
    memset(m, 0, sizeof *m); /* ck_close may see it before map_file fills it */
    map_file(m, path);
    if (m->size < 8) die("%s: truncated safetensors file (%zu bytes, no header)", path, m->size);
    uint64_t hlen;
    memcpy(&hlen, m->base, 8);
    if (hlen > m->size - 8) die("%s: truncated safetensors file: header of %llu bytes, file of %zu", path, (unsigned long long)hlen, m->size);
    char err[128];
    Json *h = ck->hdr = json_parse((const char *)m->base + 8, (size_t)hlen, err, sizeof err);
    if (!h) die("%s: corrupt safetensors header: %s", path, err);
    if (h->type != J_OBJ) die("%s: corrupt safetensors header: not an object", path);
    const uint8_t *data = m->base + 8 + hlen;
    size_t dlen = m->size - 8 - hlen;
    const Json *md = json_get(h, "__metadata__"), *fmt = json_get(md, "format");
    bool native = fmt && fmt->type == J_STR && !strcmp(fmt->str, "opt");
    int first = ck->n;
    for (int i = 0; i < h->n; i++) {
        const char *name = h->keys[i];
        if (!strcmp(name, "__metadata__")) continue;
        const Json *e = &h->kids[i], *dt = json_get(e, "dtype"), *sh = json_get(e, "shape"), *off = json_get(e, "data_offsets");
        if (!dt || dt->type != J_STR || !sh || sh->type != J_ARR || !off || off->type != J_ARR || off->n != 2)
            die("%s: tensor %s: header entry needs dtype, shape and data_offsets", path, name);
        CkTensor *t = ck_add(ck, name, strlen(name));
        if (!dtype_parse(dt->str, &t->dtype) || (!native && t->dtype > DT_BF16))
            die("%s: tensor %s: unsupported dtype %s (F32, F16 and BF16 are)", path, name, dt->str);
        if (sh->n > 4) die("%s: tensor %s: %d dimensions", path, name, sh->n);
        t->ndim = sh->n;
        for (int d = 0; d < sh->n; d++) {
            const Json *v = &sh->kids[d];
            if (v->type != J_NUM || v->num < 0 || v->num != floor(v->num) || v->num > 1e12) die("%s: tensor %s: bad shape", path, name);
            t->shape[d] = (int64_t)v->num;
        }
        size_t b, e2, numel, want;
        if (!st_offset(&off->kids[0], dlen, &b) || !st_offset(&off->kids[1], dlen, &e2) || e2 < b)
            die("%s: tensor %s: data offsets [%.15g, %.15g) outside the %zu data bytes (truncated file?)", path, name, off->kids[0].num, off->kids[1].num, dlen);
        if (!ck_count(t, &numel) || !size_mul(numel, ck_align(t->dtype), &want))
            die("%s: tensor %s: shape too large", path, name);
        if (e2 - b != want) die("%s: tensor %s: %zu data bytes for shape and dtype needing %zu", path, name, e2 - b, want);
        t->data = data + b;
        if ((uintptr_t)t->data % ck_align(t->dtype))
            die("%s: tensor %s: data at file offset %zu is not aligned to its %zu-byte elements (re-save the file with a current safetensors)", path, name, (size_t)(8 + hlen + b), ck_align(t->dtype));
    }
    st_check_tiling(ck, path, first, data, dlen);
    ck->hdr = NULL;
    if (native && !ck->meta) ck->meta = h; /* kept: the config and tensor formats */
    else json_free(h);
}

/* --- PyTorch: a zip archive (stored, not deflated) holding data.pkl and one
 * file per storage. We walk the central directory, then run a small pickle
 * machine that understands exactly what torch.save writes for a state dict. --- */

typedef struct {
    char *name;            /* entry name, e.g. "archive/data/0" */
    const uint8_t *data;   /* entry bytes inside the mapping */
    uint64_t size;         /* entry size */
} ZipEntry;

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t rd32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }
static uint64_t rd64(const uint8_t *p) { return rd32(p) | (uint64_t)rd32(p + 4) << 32; }

typedef enum { PV_NONE, PV_BOOL, PV_INT, PV_FLOAT, PV_STR, PV_TUPLE, PV_LIST, PV_DICT, PV_GLOBAL, PV_STORAGE, PV_TENSOR, PV_MARK } PvType;
typedef struct Pv {
    PvType type;           /* what this value is */
    int64_t i;             /* PV_INT, PV_BOOL; PV_STORAGE: element count */
    double f;              /* PV_FLOAT */
    char *s;               /* PV_STR text; PV_GLOBAL "module.name"; PV_STORAGE key */
    struct Pv **items;     /* PV_TUPLE/PV_LIST items; PV_DICT alternating keys and values */
    int n, cap;            /* items used/allocated */
    DType dtype;           /* PV_STORAGE, PV_TENSOR */
    int64_t offset;        /* PV_TENSOR: storage offset in elements */
    int ndim;              /* PV_TENSOR */
    int64_t shape[4], stride[4]; /* PV_TENSOR */
    struct Pv *storage;    /* PV_TENSOR */
    struct Pv *next_alloc; /* every value, for freeing in one sweep */
} Pv;

typedef struct {
    const char *path;      /* for messages */
    const uint8_t *start, *p, *end; /* pickle bytes and cursor */
    Pv **stack; int sp, scap;
    Pv **memo; int64_t nmemo;  /* memo table and its allocated size */
    int64_t memo_count;        /* entries set, the index MEMOIZE uses next */
    Pv *all;               /* allocation list */
} Unpickler;

__attribute__((noreturn, format(printf, 2, 3))) static void up_fail(Unpickler *u, const char *fmt, ...) {
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    die("%s: corrupt pickle (data.pkl byte %td): %s", u->path, u->p - u->start, msg);
}

static Pv *pv_new(Unpickler *u, PvType t) {
    Pv *v = check_calloc(sizeof *v, "pickle value");
    v->type = t;
    v->next_alloc = u->all;
    u->all = v;
    return v;
}

static void pv_append(Pv *l, Pv *x) {
    if (l->n == l->cap) l->items = check_realloc(l->items, (size_t)(l->cap = l->cap ? 2 * l->cap : 8) * sizeof(Pv *), "pickle");
    l->items[l->n++] = x;
}

static void up_push(Unpickler *u, Pv *v) {
    if (u->sp == u->scap) u->stack = check_realloc(u->stack, (size_t)(u->scap = u->scap ? 2 * u->scap : 64) * sizeof(Pv *), "pickle stack");
    u->stack[u->sp++] = v;
}

static Pv *up_pop(Unpickler *u) {
    if (u->sp == 0 || u->stack[u->sp - 1]->type == PV_MARK) up_fail(u, "stack underflow");
    return u->stack[--u->sp];
}

static int up_marker(Unpickler *u) { /* index just above the topmost MARK */
    for (int i = u->sp; i-- > 0;) if (u->stack[i]->type == PV_MARK) return i;
    up_fail(u, "no MARK on the stack");
}

static const uint8_t *up_take(Unpickler *u, uint64_t n) {
    if ((uint64_t)(u->end - u->p) < n) up_fail(u, "truncated");
    const uint8_t *r = u->p;
    u->p += n;
    return r;
}

static Pv *up_str(Unpickler *u, uint64_t n) {
    Pv *v = pv_new(u, PV_STR);
    const uint8_t *s = up_take(u, n);
    v->s = check_malloc(n + 1, "pickle string");
    memcpy(v->s, s, n);
    v->s[n] = 0;
    return v;
}

static void up_memo_put(Unpickler *u, int64_t idx, Pv *v) {
    if (idx < 0 || idx > 1 << 24) up_fail(u, "bad memo index");
    if (idx >= u->nmemo) {
        int64_t n = idx + 64;
        u->memo = check_realloc(u->memo, (size_t)n * sizeof(Pv *), "pickle memo");
        memset(u->memo + u->nmemo, 0, (size_t)(n - u->nmemo) * sizeof(Pv *));
        u->nmemo = n;
    }
    if (!u->memo[idx]) u->memo_count++;
    u->memo[idx] = v;
}

static Pv *up_memo_get(Unpickler *u, int64_t idx) {
    if (idx < 0 || idx >= u->nmemo || !u->memo[idx]) up_fail(u, "bad memo reference %lld", (long long)idx);
    return u->memo[idx];
}

static bool storage_dtype(const char *g, DType *t) {
    static const struct { const char *name; DType t; } map[] = {
        {"torch.FloatStorage", DT_F32}, {"torch.HalfStorage", DT_F16}, {"torch.BFloat16Storage", DT_BF16}};
    for (size_t i = 0; i < sizeof map / sizeof *map; i++) if (!strcmp(g, map[i].name)) { *t = map[i].t; return true; }
    return false;
}

static int64_t pv_int(Unpickler *u, const Pv *v, const char *what) {
    if (v->type != PV_INT) up_fail(u, "%s is not an integer", what);
    return v->i;
}

/* torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata]) */
static Pv *up_rebuild_tensor(Unpickler *u, Pv *args) {
    if (args->type != PV_TUPLE || args->n < 4) up_fail(u, "_rebuild_tensor_v2 needs (storage, offset, size, stride, ...)");
    Pv *st = args->items[0], *size = args->items[2], *stride = args->items[3];
    if (st->type != PV_STORAGE) up_fail(u, "tensor without a storage");
    if (size->type != PV_TUPLE || stride->type != PV_TUPLE || size->n != stride->n || size->n > 4) up_fail(u, "bad tensor size/stride");
    Pv *t = pv_new(u, PV_TENSOR);
    t->storage = st;
    t->dtype = st->dtype;
    t->offset = pv_int(u, args->items[1], "storage offset");
    t->ndim = size->n;
    for (int i = 0; i < size->n; i++) {
        t->shape[i] = pv_int(u, size->items[i], "size");
        t->stride[i] = pv_int(u, stride->items[i], "stride");
        if (t->shape[i] < 0) up_fail(u, "negative size");
    }
    return t;
}

/* depth counts nested _rebuild_from_type_v2 calls: torch nests one; a hostile
 * chain of them would otherwise recurse until the stack overflows. */
static Pv *up_call(Unpickler *u, Pv *fn, Pv *args, int depth) {
    if (fn->type != PV_GLOBAL) up_fail(u, "REDUCE on a non-callable");
    if (depth > 8) up_fail(u, "calls nested too deeply");
    const char *g = fn->s;
    if (!strcmp(g, "torch._utils._rebuild_tensor_v2")) return up_rebuild_tensor(u, args);
    if (!strcmp(g, "torch._utils._rebuild_parameter") || !strcmp(g, "torch._utils._rebuild_parameter_with_state")) {
        if (args->type != PV_TUPLE || args->n < 1 || args->items[0]->type != PV_TENSOR) up_fail(u, "bad parameter");
        return args->items[0];
    }
    if (!strcmp(g, "torch._tensor._rebuild_from_type_v2")) { /* (func, type, args, state) */
        if (args->type != PV_TUPLE || args->n < 3 || args->items[2]->type != PV_TUPLE) up_fail(u, "bad _rebuild_from_type_v2");
        return up_call(u, args->items[0], args->items[2], depth + 1);
    }
    if (!strcmp(g, "collections.OrderedDict") || !strcmp(g, "builtins.dict")) return pv_new(u, PV_DICT);
    up_fail(u, "unsupported object %s (only tensors and dicts of tensors can be loaded)", g);
}

/* Runs the pickle program and returns the top-level object. */
static Pv *up_run(Unpickler *u) {
    for (;;) {
        uint8_t op = *up_take(u, 1);
        Pv *v, *k, *w;
        int m;
        switch (op) {
        case 0x80: up_take(u, 1); break;                              /* PROTO */
        case 0x95: up_take(u, 8); break;                              /* FRAME */
        case '.': return up_pop(u);                                   /* STOP */
        case '(': up_push(u, pv_new(u, PV_MARK)); break;              /* MARK */
        case 'N': up_push(u, pv_new(u, PV_NONE)); break;
        case 0x88: case 0x89: v = pv_new(u, PV_BOOL); v->i = op == 0x88; up_push(u, v); break;
        case 'J': v = pv_new(u, PV_INT); v->i = (int32_t)rd32(up_take(u, 4)); up_push(u, v); break;
        case 'K': v = pv_new(u, PV_INT); v->i = *up_take(u, 1); up_push(u, v); break;
        case 'M': v = pv_new(u, PV_INT); v->i = rd16(up_take(u, 2)); up_push(u, v); break;
        case 0x8a: { /* LONG1 */
            unsigned n = *up_take(u, 1);
            const uint8_t *b = up_take(u, n);
            if (n > 8) up_fail(u, "integer too large");
            uint64_t x = 0;
            for (unsigned i = 0; i < n; i++) x |= (uint64_t)b[i] << (8 * i);
            if (n && n < 8 && (b[n - 1] & 0x80)) x |= ~0ull << (8 * n);
            v = pv_new(u, PV_INT); v->i = (int64_t)x; up_push(u, v);
            break;
        }
        case 'G': { /* BINFLOAT, big-endian */
            const uint8_t *b = up_take(u, 8);
            uint64_t x = 0;
            for (int i = 0; i < 8; i++) x = x << 8 | b[i];
            v = pv_new(u, PV_FLOAT); memcpy(&v->f, &x, 8); up_push(u, v);
            break;
        }
        case 'X': up_push(u, up_str(u, rd32(up_take(u, 4)))); break; /* BINUNICODE */
        case 0x8c: up_push(u, up_str(u, *up_take(u, 1))); break;     /* SHORT_BINUNICODE */
        case 0x8d: up_push(u, up_str(u, rd64(up_take(u, 8)))); break;/* BINUNICODE8 */
        case 'U': up_push(u, up_str(u, *up_take(u, 1))); break;      /* SHORT_BINSTRING */
        case 'T': up_push(u, up_str(u, rd32(up_take(u, 4)))); break; /* BINSTRING */
        case 'c': { /* GLOBAL "module\nname\n" */
            const uint8_t *s = u->p, *nl1 = memchr(s, '\n', (size_t)(u->end - s));
            const uint8_t *nl2 = nl1 ? memchr(nl1 + 1, '\n', (size_t)(u->end - nl1 - 1)) : NULL;
            if (!nl2) up_fail(u, "bad GLOBAL");
            v = pv_new(u, PV_GLOBAL);
            v->s = check_malloc((size_t)(nl2 - s) + 1, "pickle global");
            memcpy(v->s, s, (size_t)(nl2 - s));
            v->s[nl1 - s] = '.';
            v->s[nl2 - s] = 0;
            u->p = nl2 + 1;
            up_push(u, v);
            break;
        }
        case 0x93: { /* STACK_GLOBAL */
            w = up_pop(u); k = up_pop(u);
            if (k->type != PV_STR || w->type != PV_STR) up_fail(u, "bad STACK_GLOBAL");
            v = pv_new(u, PV_GLOBAL);
            size_t n = strlen(k->s) + strlen(w->s) + 2;
            v->s = check_malloc(n, "pickle global");
            snprintf(v->s, n, "%s.%s", k->s, w->s);
            up_push(u, v);
            break;
        }
        case ')': up_push(u, pv_new(u, PV_TUPLE)); break;
        case ']': up_push(u, pv_new(u, PV_LIST)); break;
        case '}': up_push(u, pv_new(u, PV_DICT)); break;
        case 't': case 'l': case 'd': /* TUPLE, LIST, DICT from MARK */
            m = up_marker(u);
            v = pv_new(u, op == 't' ? PV_TUPLE : op == 'l' ? PV_LIST : PV_DICT);
            if (op == 'd' && (u->sp - m - 1) % 2) up_fail(u, "odd DICT");
            for (int i = m + 1; i < u->sp; i++) pv_append(v, u->stack[i]);
            u->sp = m;
            up_push(u, v);
            break;
        case 0x85: case 0x86: case 0x87: { /* TUPLE1..3 */
            int n = op - 0x84;
            if (u->sp < n) up_fail(u, "stack underflow");
            v = pv_new(u, PV_TUPLE);
            for (int i = u->sp - n; i < u->sp; i++) { if (u->stack[i]->type == PV_MARK) up_fail(u, "MARK in tuple"); pv_append(v, u->stack[i]); }
            u->sp -= n;
            up_push(u, v);
            break;
        }
        case 'a': w = up_pop(u); v = up_pop(u); if (v->type != PV_LIST) up_fail(u, "APPEND to a non-list"); pv_append(v, w); up_push(u, v); break;
        case 'e': case 'u': /* APPENDS, SETITEMS */
            m = up_marker(u);
            if (m == 0) up_fail(u, "stack underflow");
            v = u->stack[m - 1];
            if (v->type != (op == 'e' ? PV_LIST : PV_DICT) || (op == 'u' && (u->sp - m - 1) % 2)) up_fail(u, "bad APPENDS/SETITEMS");
            for (int i = m + 1; i < u->sp; i++) pv_append(v, u->stack[i]);
            u->sp = m;
            break;
        case 's': w = up_pop(u); k = up_pop(u); v = up_pop(u); if (v->type != PV_DICT) up_fail(u, "SETITEM on a non-dict"); pv_append(v, k); pv_append(v, w); up_push(u, v); break;
        case 'q': up_memo_put(u, *up_take(u, 1), u->sp ? u->stack[u->sp - 1] : NULL); break;
        case 'r': up_memo_put(u, rd32(up_take(u, 4)), u->sp ? u->stack[u->sp - 1] : NULL); break;
        case 0x94: up_memo_put(u, u->memo_count, u->sp ? u->stack[u->sp - 1] : NULL); break;
        case 'h': up_push(u, up_memo_get(u, *up_take(u, 1))); break;
        case 'j': up_push(u, up_memo_get(u, rd32(up_take(u, 4)))); break;
        case 'R': w = up_pop(u); v = up_pop(u); up_push(u, up_call(u, v, w, 0)); break;     /* REDUCE */
        case 0x81: w = up_pop(u); v = up_pop(u); up_push(u, up_call(u, v, w, 0)); break;  /* NEWOBJ */
        case 'b': up_pop(u); break; /* BUILD: state of an OrderedDict or tensor; nothing we need */
        case 'Q': { /* BINPERSID: ('storage', StorageType, key, location, numel) */
            w = up_pop(u);
            if (w->type != PV_TUPLE || w->n < 5 || w->items[0]->type != PV_STR || strcmp(w->items[0]->s, "storage") ||
                w->items[1]->type != PV_GLOBAL || w->items[2]->type != PV_STR)
                up_fail(u, "unsupported persistent id");
            v = pv_new(u, PV_STORAGE);
            if (!storage_dtype(w->items[1]->s, &v->dtype)) up_fail(u, "unsupported dtype %s (float32, float16 and bfloat16 are)", w->items[1]->s);
            v->s = check_strdup(w->items[2]->s); /* its own copy: every value frees its string */
            v->i = pv_int(u, w->items[4], "storage size");
            up_push(u, v);
            break;
        }
        default: up_fail(u, "unsupported opcode 0x%02x", op);
        }
    }
}

/* The .bin reader's temporaries, held by the checkpoint while it runs so that
 * ck_close frees them even after a die() (the fuzz harnesses go on running). */
typedef struct BinRead {
    ZipEntry *ents; int ne;  /* zip entries, those with names */
    Unpickler u;             /* the pickle machine and every value it made */
} BinRead;

static void bin_read_free(BinRead *r) {
    if (!r) return;
    for (Pv *v = r->u.all, *nx; v; v = nx) { nx = v->next_alloc; free(v->s); free(v->items); free(v); }
    free(r->u.stack);
    free(r->u.memo);
    for (int i = 0; i < r->ne; i++) free(r->ents[i].name);
    free(r->ents);
    free(r);
}

static void zip_entries(const MapFile *m, BinRead *r) {
    const char *path = m->path;
    const uint8_t *b = m->base;
    size_t n = m->size;
    if (n < 22) die("%s: not a zip archive (truncated; torch.save writes zip files)", path);
    size_t eocd = 0;
    bool found = false;
    for (size_t i = n - 22 + 1, lim = n > 65557 ? n - 65557 : 0; i-- > lim;)
        if (rd32(b + i) == 0x06054b50) { eocd = i; found = true; break; }
    if (!found) die("%s: not a zip archive or truncated (no end-of-central-directory record)", path);
    uint64_t nent = rd16(b + eocd + 10), cdsize = rd32(b + eocd + 12), cdoff = rd32(b + eocd + 16);
    if (eocd >= 20 && rd32(b + eocd - 20) == 0x07064b50) { /* zip64 locator */
        uint64_t z = rd64(b + eocd - 20 + 8);
        if (n < 56 || z > n - 56 || rd32(b + z) != 0x06064b50) die("%s: corrupt zip64 directory", path);
        nent = rd64(b + z + 32);
        cdsize = rd64(b + z + 40);
        cdoff = rd64(b + z + 48);
    }
    if (cdoff > n || cdsize > n - cdoff || nent > cdsize / 46 || nent > INT_MAX) die("%s: corrupt zip central directory (truncated file?)", path);
    ZipEntry *e = r->ents = check_calloc(nent * sizeof *e, "zip entries");
    const uint8_t *p = b + cdoff, *end = b + cdoff + cdsize;
    for (uint64_t i = 0; i < nent; i++) {
        if (end - p < 46 || rd32(p) != 0x02014b50) die("%s: corrupt zip central directory entry %llu", path, (unsigned long long)i);
        unsigned method = rd16(p + 10), nlen = rd16(p + 28), xlen = rd16(p + 30), clen = rd16(p + 32);
        uint64_t csize = rd32(p + 20), usize = rd32(p + 24), loff = rd32(p + 42);
        if ((size_t)(end - p) < 46u + nlen + xlen + clen) die("%s: corrupt zip central directory entry %llu", path, (unsigned long long)i);
        for (const uint8_t *x = p + 46 + nlen, *xe = x + xlen; xe - x >= 4;) { /* zip64 extra field */
            unsigned id = rd16(x), sz = rd16(x + 2);
            const uint8_t *f = x + 4;
            if (sz > xe - f) break; /* a field claiming more than the extra area holds */
            x = f + sz;
            if (id == 1) {
                if (usize == 0xFFFFFFFF && sz >= 8) { usize = rd64(f); f += 8; sz -= 8; }
                if (csize == 0xFFFFFFFF && sz >= 8) { csize = rd64(f); f += 8; sz -= 8; }
                if (loff == 0xFFFFFFFF && sz >= 8) loff = rd64(f);
            }
        }
        e[i].name = check_malloc(nlen + 1u, "zip name");
        memcpy(e[i].name, p + 46, nlen);
        e[i].name[nlen] = 0;
        r->ne = (int)i + 1;
        if (method != 0) die("%s: entry %s is compressed (method %u); torch.save stores entries uncompressed", path, e[i].name, method);
        if (n < 30 || loff > n - 30 || rd32(b + loff) != 0x04034b50) die("%s: entry %s: bad local header (truncated file?)", path, e[i].name);
        uint64_t start = loff + 30 + rd16(b + loff + 26) + rd16(b + loff + 28);
        if (start > n || csize > n - start || csize != usize) die("%s: entry %s runs past the end of the file (truncated?)", path, e[i].name);
        e[i].data = b + start;
        e[i].size = csize;
        p += 46 + nlen + xlen + clen;
    }
}

static void ck_read_bin(Checkpoint *ck, const char *path) {
    ck->files = check_realloc(ck->files, (size_t)(ck->n_files + 1) * sizeof(MapFile), "files");
    MapFile *m = &ck->files[ck->n_files++];
    memset(m, 0, sizeof *m); /* ck_close may see it before map_file fills it */
    map_file(m, path);
    if (m->size >= 2 && m->base[0] == 0x80 && m->base[1] <= 5)
        die("%s: legacy (pre-1.6) torch.save format; re-save it with a current PyTorch or convert to safetensors", path);
    BinRead *r = ck->bin = check_calloc(sizeof *r, "the .bin reader");
    zip_entries(m, r);
    const ZipEntry *ents = r->ents;
    int ne = r->ne;
    const ZipEntry *pkl = NULL;
    for (int i = 0; i < ne; i++) {
        size_t l = strlen(ents[i].name);
        if (l >= 8 && !strcmp(ents[i].name + l - 8, "data.pkl") && (l == 8 || ents[i].name[l - 9] == '/')) pkl = &ents[i];
    }
    if (!pkl) die("%s: no data.pkl in the archive (not a torch.save file)", path);
    size_t plen = strlen(pkl->name) - 8; /* archive prefix, "archive/" */
    r->u = (Unpickler){.path = path, .start = pkl->data, .p = pkl->data, .end = pkl->data + pkl->size};
    Pv *root = up_run(&r->u);
    if (root->type != PV_DICT) die("%s: the pickle holds no state dict", path);
    for (int i = 0; i + 1 < root->n; i += 2) {
        Pv *k = root->items[i], *t = root->items[i + 1];
        if (k->type != PV_STR) die("%s: state dict key is not a string", path);
        if (t->type != PV_TENSOR) continue; /* e.g. "_metadata" entries */
        char ename[512];
        snprintf(ename, sizeof ename, "%.*sdata/%s", (int)plen, pkl->name, t->storage->s);
        const ZipEntry *se = NULL;
        for (int j = 0; j < ne; j++) if (!strcmp(ents[j].name, ename)) { se = &ents[j]; break; }
        if (!se) die("%s: tensor %s: storage %s missing from the archive", path, k->s, ename);
        size_t esz = dtype_bytes(t->dtype, 1), sbytes, numel;
        if (t->storage->i < 0 || !size_mul((size_t)t->storage->i, esz, &sbytes) || se->size < sbytes)
            die("%s: tensor %s: storage %s holds %llu bytes, too few for its %lld elements (truncated?)", path, k->s, ename, (unsigned long long)se->size, (long long)t->storage->i);
        CkTensor *c = ck_add(ck, k->s, strlen(k->s));
        c->dtype = t->dtype;
        c->ndim = t->ndim;
        memcpy(c->shape, t->shape, sizeof c->shape);
        if (!ck_count(c, &numel)) die("%s: tensor %s: shape too large", path, k->s);
        size_t expect = 1;
        for (int d = t->ndim; d-- > 0;) {
            if (t->shape[d] > 1 && (size_t)t->stride[d] != expect) die("%s: tensor %s is not contiguous", path, k->s);
            if (!size_mul(expect, (size_t)t->shape[d], &expect)) break; /* only beside a zero dimension: nothing to read */
        }
        if (t->offset < 0 || numel > (size_t)t->storage->i || (size_t)t->offset > (size_t)t->storage->i - numel)
            die("%s: tensor %s runs past its storage", path, k->s);
        c->data = se->data + (size_t)t->offset * esz;
        if ((uintptr_t)c->data % esz) die("%s: tensor %s: data not aligned to its %zu-byte elements", path, k->s, esz);
    }
    bin_read_free(r);
    ck->bin = NULL;
}

/* --- the directory: one file, or shards listed by an index --- */

static void ck_read_file(Checkpoint *ck, const char *path) {
    size_t l = strlen(path);
    if (l > 12 && !strcmp(path + l - 12, ".safetensors")) ck_read_safetensors(ck, path);
    else ck_read_bin(ck, path);
}

static int ck_cmp(const void *a, const void *b) { return strcmp(((const CkTensor *)a)->key, ((const CkTensor *)b)->key); }

static void ck_sort(Checkpoint *ck) {
    if (ck->n == 0) die("%s: the checkpoint holds no tensors", ck->dir);
    qsort(ck->t, (size_t)ck->n, sizeof *ck->t, ck_cmp);
    for (int k = 1; k < ck->n; k++)
        if (!strcmp(ck->t[k].key, ck->t[k - 1].key)) die("%s: tensor %s appears twice (as %s and %s)", ck->dir, ck->t[k].key, ck->t[k - 1].name, ck->t[k].name);
}

static void ck_read_index(Checkpoint *ck, const char *index) {
    Json *j = json_load(index);
    const Json *wm = json_get(j, "weight_map");
    if (!wm || wm->type != J_OBJ || wm->n == 0) die("%s: no \"weight_map\" object", index);
    char **done = check_calloc((size_t)wm->n * sizeof(char *), "shards");
    int nd = 0;
    for (int i = 0; i < wm->n; i++) {
        const Json *f = &wm->kids[i];
        if (f->type != J_STR || !f->len || strchr(f->str, '/')) die("%s: weight_map[\"%s\"] is not a file name", index, wm->keys[i]);
        bool seen = false;
        for (int d = 0; d < nd; d++) seen |= !strcmp(done[d], f->str);
        if (seen) continue;
        done[nd++] = f->str;
        char *p = path_join(ck->dir, f->str);
        if (!file_exists(p)) die("%s: shard %s listed in %s is missing", p, f->str, index);
        ck_read_file(ck, p);
        free(p);
    }
    free(done);
    json_free(j);
}

void ck_open(Checkpoint *ck, const char *dir) {
    memset(ck, 0, sizeof *ck);
    ck->dir = check_strdup(dir);
    if (file_exists(dir)) { /* a native packed file (opt convert) */
        ck_read_safetensors(ck, dir);
        if (!ck->meta) die("%s: not a native opt file (write one with opt convert, or give a checkpoint directory)", dir);
        ck_sort(ck);
        return;
    }
    static const char *const names[] = {"model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin"};
    int i;
    char *p = NULL;
    for (i = 0; i < 4; i++) {
        free(p);
        p = path_join(dir, names[i]);
        if (file_exists(p)) break;
    }
    if (i == 4) die("%s: no model.safetensors, pytorch_model.bin or shard index found", dir);
    if (strstr(names[i], "index.json")) ck_read_index(ck, p);
    else ck_read_file(ck, p);
    free(p);
    ck_sort(ck);
}

static CkTensor *ck_find(Checkpoint *ck, const char *key) {
    CkTensor probe = {.key = key};
    return bsearch(&probe, ck->t, (size_t)ck->n, sizeof *ck->t, ck_cmp);
}

void ck_close(Checkpoint *ck) {
    for (int i = 0; i < ck->n_files; i++) { munmap((void *)ck->files[i].base, ck->files[i].size); free(ck->files[i].path); }
    for (int i = 0; i < ck->n; i++) free(ck->t[i].name);
    free(ck->files);
    free(ck->t);
    free(ck->dir);
    json_free(ck->meta);
    json_free(ck->hdr);
    bin_read_free(ck->bin);
    memset(ck, 0, sizeof *ck);
}

/* ----------------------------------------------------------------------------
 * Numbers: exact half/bfloat16 conversions (the SIMD kernels use F16C or
 * AVX-512 for the same results). */

/* Converts n elements of any float format to f32. */
static void to_f32(float *out, const void *in, DType dt, int64_t n) {
    const uint16_t *h = in;
    if (dt == DT_F32) memcpy(out, in, (size_t)n * 4);
    else if (dt == DT_F16) for (int64_t i = 0; i < n; i++) out[i] = f16_to_f32(h[i]);
    else if (dt == DT_BF16) for (int64_t i = 0; i < n; i++) out[i] = bf16_to_f32(h[i]);
    else die("internal: to_f32 on %s", dtype_names[dt]);
}

/* ----------------------------------------------------------------------------
 * The model's weights, bound from a checkpoint by name and shape. Matrices keep
 * their stored dtype and point into the mapping; the small 1-D tensors (biases,
 * LayerNorm) are converted to f32 once, since every kernel reads them whole. */



static inline size_t row_bytes(const Tensor *w) {
    return w->dtype == DT_Q4 ? q4_row_bytes(w->cols, w->group) : dtype_bytes(w->dtype, w->cols);
}

size_t tensor_row_bytes(const Tensor *w) { return row_bytes(w); }

/* The mapped file holding p, and p's offset in it; -1 when p is not mapped. */
int ck_locate(const Checkpoint *ck, const void *p, off_t *off) {
    for (int i = 0; i < ck->n_files; i++) {
        const uint8_t *b = ck->files[i].base;
        if ((const uint8_t *)p >= b && (const uint8_t *)p < b + ck->files[i].size) { *off = (const uint8_t *)p - b; return i; }
    }
    return -1;
}

static inline const void *w_row(const Tensor *w, int64_t n) {
    if (w->data2 && n >= w->split) return (const char *)w->data2 + (size_t)(n - w->split) * row_bytes(w);
    return (const char *)w->data + (size_t)n * row_bytes(w);
}

/* One row of a matrix in any format, as f32 (embedding lookups). */
static void tensor_row_f32(const Tensor *w, int64_t n, float *out) {
    if (w->dtype == DT_Q4) q4_dequantize_row(out, w_row(w, n), w->cols, w->group);
    else to_f32(out, w_row(w, n), w->dtype, w->cols);
}

/* Quantizes a matrix to 4 bits into new memory, a band of rows at a time:
 * rows in parallel, each independent. A dummy model's rows are generated per
 * band (never the whole f16 matrix); a checkpoint's mapped pages are dropped
 * from memory as each band is done (MADV_DONTNEED, pages wholly inside the
 * band: a read-only mapping refaults from the file if a neighbour needs
 * them), so peak RSS is the 4-bit weights plus one band, not the f16 file. */
static Tensor tensor_to_q4(const Model *m, const Tensor *w, int group) {
    size_t rb = q4_row_bytes(w->cols, group), sb = row_bytes(w);
    uint8_t *q = check_malloc(rb * (size_t)w->rows, "4-bit weights");
    int64_t band = (int64_t)((8u << 20) / sb) + 1;
    void *gen = w->gen ? check_malloc(sb * (size_t)band, "a band of rows") : NULL;
    off_t off;
    bool mapped = !w->gen && !w->data2 && ck_locate(&m->ck, w->data, &off) >= 0;
    for (int64_t r0 = 0; r0 < w->rows; r0 += band) {
        int64_t n = w->rows - r0 < band ? w->rows - r0 : band;
        if (gen) dummy_rows(m, w, r0, n, gen);
        #pragma omp parallel
        {
            float *row = check_malloc(sizeof(float) * (size_t)w->cols, "a row");
            #pragma omp for schedule(static)
            for (int64_t r = r0; r < r0 + n; r++) {
                if (gen) to_f32(row, (const char *)gen + (size_t)(r - r0) * sb, w->dtype, w->cols);
                else tensor_row_f32(w, r, row);
                q4_quantize_row(q + rb * (size_t)r, row, w->cols, group, w->name);
            }
            free(row);
        }
        if (mapped) {
            uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE), a = (uintptr_t)w_row(w, r0), b = a + (size_t)n * sb;
            a = (a + pg - 1) / pg * pg, b = b / pg * pg;
            if (b > a) madvise((void *)a, b - a, MADV_DONTNEED);
        }
    }
    free(gen);
    Tensor t = *w;
    t.dtype = DT_Q4;
    t.data = q;
    t.group = group;
    t.gen = 0;
    return t;
}

static CkTensor *model_need(Model *m, const char *key, int64_t rows, int64_t cols) {
    CkTensor *t = ck_find(&m->ck, key);
    if (!t) die("%s: missing tensor %s (looked for model.decoder.%s and decoder.%s)", m->ck.dir, key, key, key);
    bool ok = rows ? t->ndim == 2 && t->shape[0] == rows && t->shape[1] == cols : t->ndim == 1 && t->shape[0] == cols;
    if (!ok) {
        char got[96] = "", *w = got;
        for (int i = 0; i < t->ndim; i++) w += snprintf(w, (size_t)(got + sizeof got - w), "%s%lld", i ? ", " : "", (long long)t->shape[i]);
        if (rows) die("%s: tensor %s has shape [%s], expected [%lld, %lld]", m->ck.files[t->file].path, t->name, got, (long long)rows, (long long)cols);
        die("%s: tensor %s has shape [%s], expected [%lld]", m->ck.files[t->file].path, t->name, got, (long long)cols);
    }
    if (t->dtype != DT_F32 && t->dtype != DT_F16 && t->dtype != DT_BF16)
        die("%s: tensor %s has dtype %s, expected F32, F16 or BF16", m->ck.files[t->file].path, t->name, dtype_names[t->dtype]);
    t->used = true;
    return t;
}

/* A native file's format entry for a tensor: {"format": "q4", "group": G, "cols": K}. */
static const Json *model_format(const Model *m, const char *key) {
    return json_get(m->formats, key);
}

static int dummy_find(const Model *m, const char *key);

static Tensor model_matrix(Model *m, const char *key, int64_t rows, int64_t cols) {
    if (m->dummy) { /* values are made where the policy puts them */
        int g = dummy_find(m, key);
        return (Tensor){.dtype = DT_F16, .rows = rows, .cols = cols, .tier = TIER_CPU, .name = key, .gen = g + 1};
    }
    CkTensor *c = ck_find(&m->ck, key);
    const Json *f = c && (c->dtype == DT_Q4 || c->dtype == DT_I8) ? model_format(m, key) : NULL;
    if (f && c->dtype == DT_I8) { /* int8 rows with per-row scales in "<key>.scale" */
        char sk[128];
        snprintf(sk, sizeof sk, "%s.scale", key);
        CkTensor *sc = ck_find(&m->ck, sk);
        const Json *as = json_get(f, "act_scale");
        if (c->ndim != 2 || c->shape[0] != rows || c->shape[1] != cols) die("%s: tensor %s: int8 data of the wrong shape", m->ck.dir, key);
        if (!sc || sc->dtype != DT_F32 || sc->ndim != 1 || sc->shape[0] != rows) die("%s: tensor %s: missing or bad %s", m->ck.dir, key, sk);
        if (as && (as->type != J_NUM || !(as->num >= 0 && as->num <= FLT_MAX))) die("%s: tensor %s: bad act_scale", m->ck.dir, key);
        c->used = sc->used = true;
        return (Tensor){.dtype = DT_I8, .rows = rows, .cols = cols, .data = c->data, .scale = sc->data,
                        .act_scale = as && as->type == J_NUM ? (float)as->num : 0, .tier = TIER_CPU, .name = c->name};
    }
    if (f) { /* 4-bit rows stored as bytes */
        const Json *fg = json_get(f, "group"), *fc = json_get(f, "cols");
        int g = fg && fg->type == J_NUM && (fg->num == 32 || fg->num == 64 || fg->num == 128) ? (int)fg->num : 0; /* in range before converting */
        if ((g != 32 && g != 64 && g != 128) || !fc || fc->type != J_NUM || fc->num != (double)cols)
            die("%s: tensor %s: bad 4-bit format entry (group 32, 64 or 128 and cols %lld needed)", m->ck.dir, key, (long long)cols);
        if (c->ndim != 2 || c->shape[0] != rows || (size_t)c->shape[1] != q4_row_bytes(cols, g))
            die("%s: tensor %s: 4-bit data of the wrong shape for [%lld, %lld]", m->ck.dir, key, (long long)rows, (long long)cols);
        c->used = true;
        return (Tensor){.dtype = DT_Q4, .rows = rows, .cols = cols, .data = c->data, .group = g, .tier = TIER_CPU, .name = c->name};
    }
    c = model_need(m, key, rows, cols);
    return (Tensor){.dtype = c->dtype, .rows = rows, .cols = cols, .data = c->data, .tier = TIER_CPU, .name = c->name};
}

static float *model_vector(Model *m, const char *key, int64_t n) {
    check(m->owned_used + (size_t)n <= m->owned_n, "vector pool overflow");
    float *v = m->owned + m->owned_used;
    m->owned_used += (size_t)n;
    if (m->dummy) {
        uint16_t *h = check_malloc(sizeof(uint16_t) * (size_t)n, "a vector");
        Tensor t = {.dtype = DT_F16, .rows = 1, .cols = n, .gen = dummy_find(m, key) + 1};
        dummy_rows(m, &t, 0, 1, h);
        to_f32(v, h, DT_F16, n);
        free(h);
        return v;
    }
    CkTensor *c = model_need(m, key, 0, n);
    to_f32(v, c->data, c->dtype, n);
    return v;
}

static void *dummy_specs(const Config *c);

/* A checkpoint directory, a native file written by opt convert, or
 * dummy:SHAPE (seeded random weights, made on demand in their tiers). */
void model_load(Model *m, const char *dir) {
    memset(m, 0, sizeof *m);
    if (!strncmp(dir, "dummy:", 6)) {
        shape_config(&m->cfg, dir + 6);
        snprintf(m->cfg.name, sizeof m->cfg.name, "%s", dir);
        m->dummy = dummy_specs(&m->cfg);
        m->dummy_seed = 1;
    } else if (file_exists(dir)) {
        ck_open(&m->ck, dir);
        const Json *md = json_get(m->ck.meta, "__metadata__"), *cj = json_get(md, "opt.config"), *fj = json_get(md, "opt.formats");
        char err[128];
        Json *cfg = cj && cj->type == J_STR ? json_parse(cj->str, cj->len, err, sizeof err) : NULL;
        if (!cfg) die("%s: no valid opt.config in the header", dir);
        config_from_json(&m->cfg, cfg, dir);
        config_name(&m->cfg, dir);
        json_free(cfg);
        if (fj && fj->type == J_STR && !(m->formats = json_parse(fj->str, fj->len, err, sizeof err))) die("%s: bad opt.formats: %s", dir, err);
    } else {
        config_load(&m->cfg, dir);
        ck_open(&m->ck, dir);
    }
    const Config *c = &m->cfg;
    int64_t h = c->hidden, f = c->ffn, e = c->embed_dim;
    m->owned_n = (size_t)c->n_layer * (size_t)(9 * h + f) + 2 * (size_t)h;
    m->owned = check_malloc(m->owned_n * sizeof(float), "biases and LayerNorms");
    m->embed = model_matrix(m, "embed_tokens.weight", c->vocab, e);
    m->pos = model_matrix(m, "embed_positions.weight", c->max_pos + 2, h);
    if (e != h) {
        m->proj_in = model_matrix(m, "project_in.weight", h, e);
        m->proj_out = model_matrix(m, "project_out.weight", e, h);
    }
    if (c->final_ln && c->ln_affine) {
        m->lnfw = model_vector(m, "final_layer_norm.weight", h);
        m->lnfb = model_vector(m, "final_layer_norm.bias", h);
    }
    m->lm_head = !m->dummy && ck_find(&m->ck, "lm_head.weight") ? model_matrix(m, "lm_head.weight", c->vocab, e) : m->embed;
    m->layers = check_calloc((size_t)c->n_layer * sizeof(Layer), "layers");
    m->n_layer_all = c->n_layer;
    for (int l = 0; l < c->n_layer; l++) {
        Layer *L = &m->layers[l];
        char k[128];
#define MAT(field, name, r, cc) (snprintf(k, sizeof k, "layers.%d.%s.weight", l, name), L->field = model_matrix(m, k, r, cc))
#define VEC(name, what, n) (snprintf(k, sizeof k, "layers.%d.%s.%s", l, name, what), model_vector(m, k, n))
        MAT(q, "self_attn.q_proj", h, h);
        MAT(k, "self_attn.k_proj", h, h);
        MAT(v, "self_attn.v_proj", h, h);
        MAT(o, "self_attn.out_proj", h, h);
        MAT(fc1, "fc1", f, h);
        MAT(fc2, "fc2", h, f);
        if (c->bias) {
            L->qb = VEC("self_attn.q_proj", "bias", h);
            L->kb = VEC("self_attn.k_proj", "bias", h);
            L->vb = VEC("self_attn.v_proj", "bias", h);
            L->ob = VEC("self_attn.out_proj", "bias", h);
            L->fc1b = VEC("fc1", "bias", f);
            L->fc2b = VEC("fc2", "bias", h);
        }
        if (c->ln_affine) {
            L->ln1w = VEC("self_attn_layer_norm", "weight", h);
            L->ln1b = VEC("self_attn_layer_norm", "bias", h);
            L->ln2w = VEC("final_layer_norm", "weight", h);
            L->ln2b = VEC("final_layer_norm", "bias", h);
        }
#undef MAT
#undef VEC
    }
}

void model_stage(Model *m, int l0, int l1) {
    int L = m->cfg.n_layer;
    check(0 <= l0 && l0 < l1 && l1 <= L, "stage layers [%d, %d) of %d", l0, l1, L);
    Layer *all = m->layers;
    m->layers = check_malloc(sizeof(Layer) * (size_t)(l1 - l0), "layers");
    memcpy(m->layers, all + l0, sizeof(Layer) * (size_t)(l1 - l0));
    free(all);
    m->layer0 = l0;
    m->cfg.n_layer = l1 - l0;
    if (l0 > 0) m->embed = m->pos = m->proj_in = (Tensor){0};
    if (l1 < L) { m->lm_head = m->proj_out = (Tensor){0}; m->lnfw = m->lnfb = NULL; }
}

void model_own_add(Model *m, void *p) {
    if (m->n_q4 == m->cap_q4) m->q4 = check_realloc(m->q4, sizeof(void *) * (size_t)(m->cap_q4 = m->cap_q4 ? 2 * m->cap_q4 : 64), "the model");
    m->q4[m->n_q4++] = p;
}

void *model_own(Model *m, size_t bytes, const char *what) {
    void *p = check_malloc(bytes, what);
    model_own_add(m, p);
    return p;
}

/* --compress-weight: every matrix but the position table to 4 bits, one at a
 * time (tensor_to_q4), before a dummy model is materialized. */
void model_compress(Model *m, int group) {
    Tensor *mats[8 + 6 * 1024];
    int n = 0;
    bool tied = m->embed.rows && m->lm_head.data == m->embed.data && m->lm_head.gen == m->embed.gen;
    if (m->embed.rows) mats[n++] = &m->embed; /* a later pipeline stage has none */
    if (!tied && m->lm_head.rows) mats[n++] = &m->lm_head;
    if (m->proj_in.data) mats[n++] = &m->proj_in;
    if (m->proj_out.data) mats[n++] = &m->proj_out;
    for (int l = 0; l < m->cfg.n_layer; l++) {
        Layer *L = &m->layers[l];
        Tensor *lm[] = {&L->q, &L->k, &L->v, &L->o, &L->fc1, &L->fc2};
        for (int i = 0; i < 6; i++) mats[n++] = lm[i];
    }
    for (int i = 0; i < n; i++) {
        if (mats[i]->dtype == DT_Q4 || mats[i]->dtype == DT_I8) continue;
        *mats[i] = tensor_to_q4(m, mats[i], group);
        model_own_add(m, (void *)mats[i]->data);
    }
    if (tied) m->lm_head = m->embed;
}

void model_free(Model *m) {
    json_free(m->formats);
    for (int i = 0; i < m->n_extra; i++) free(m->extra[i].data);
    free(m->extra);
    for (int i = 0; i < m->n_q4; i++) free(m->q4[i]);
    free(m->q4);
    ck_close(&m->ck);
    free(m->layers);
    free(m->owned);
}

/* ----------------------------------------------------------------------------
 * CPU kernels, chosen at run time by cpuid (OPT_SIMD=scalar|avx2|avx512 forces
 * a level). Every dot product has one fixed reduction order: 16 lanes, lane l
 * accumulating k = l, l+16, l+32, ... with fused multiply-adds, then the
 * pairwise tree (l, l+8), (l, l+4), (l, l+2), (l, l+1). AVX-512 does that
 * natively, AVX2 with two 8-lane halves, the scalar code with a 16-float
 * array. So every level, batch size, tiling and thread count gives bitwise
 * identical results: a prompt's output cannot depend on its batch-mates, the
 * policy, or the machine's SIMD width. */

#include <cpuid.h>
#include <immintrin.h>
#include <omp.h>

static const char *const simd_names[] = {"scalar", "avx2", "avx512"};
int g_simd = SIMD_SCALAR;          /* level in use */
int g_simd_max = SIMD_SCALAR;      /* best level this CPU and OS support */
int g_vnni = 0;                    /* AVX-512 VNNI present (int8 dot products) */
int g_has_bf16 = 0;                /* AVX-512 BF16 present (vdpbf16ps) */
int g_bf16 = 0;                    /* --compute bf16: GEMMs on bf16 inputs, f32 sums */

static int simd_detect(void) {
    unsigned a, b, c, d, xlo, xhi;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return SIMD_SCALAR;
    bool fma = c >> 12 & 1, osxsave = c >> 27 & 1, avx = c >> 28 & 1, f16c = c >> 29 & 1;
    if (!osxsave || !avx) return SIMD_SCALAR;
    __asm__("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
    if ((xlo & 6) != 6) return SIMD_SCALAR; /* the OS does not save YMM state */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return SIMD_SCALAR;
    bool avx2 = b >> 5 & 1, f = b >> 16 & 1, bw = b >> 30 & 1, vl = b >> 31 & 1;
    if (!(avx2 && fma && f16c)) return SIMD_SCALAR;
    if (!(f && bw && vl) || (xlo & 0xE0) != 0xE0) return SIMD_AVX2; /* no ZMM state */
    g_vnni = c >> 11 & 1;
    if (a >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) g_has_bf16 = a >> 5 & 1;
    return SIMD_AVX512;
}

/* OpenMP threads that spin while waiting steal the issue slots of their
 * sibling hyperthread, and the CPU of other processes: unbounded spinning made
 * decode 6x slower on a shared 2-vCPU machine. Sleeping at once costs a futex
 * wake per parallel region instead, 30-100 us on a VM whose idle vCPU halts,
 * and decode opens ~7 regions per layer. So: spin briefly (1000 rounds, ~10 us,
 * most gaps between regions are shorter), then sleep: OPT-125m decode 1.35x on
 * an idle 2-vCPU machine, 0.9x with a second job competing (bench/RESULTS.md).
 * Both stay overridable. This runs before libgomp reads its environment
 * (constructors with a priority run first in a static link, and libgomp is
 * linked statically in every build). */
__attribute__((constructor(101))) static void omp_env_default(void) {
    setenv("OMP_WAIT_POLICY", "passive", 0);
    setenv("GOMP_SPINCOUNT", "1000", 0);
}

static void tiles_init(void);

void simd_init(void) {
    tiles_init();
    g_simd = g_simd_max = simd_detect();
    const char *e = getenv("OPT_SIMD");
    if (!e || !*e) return;
    int want = -1;
    for (int i = 0; i < 3; i++) if (!strcmp(e, simd_names[i])) want = i;
    if (want < 0) die("OPT_SIMD=%s: expected scalar, avx2 or avx512", e);
    if (want > g_simd_max) die("OPT_SIMD=%s: this CPU supports only %s", e, simd_names[g_simd_max]);
    g_simd = want;
}

/* --- scalar: the reference order, written out --- */

static inline float w_at(const void *w, DType dt, int64_t k) {
    return dt == DT_F32 ? ((const float *)w)[k] : dt == DT_F16 ? f16_to_f32(((const uint16_t *)w)[k]) : bf16_to_f32(((const uint16_t *)w)[k]);
}

static float dot_scalar(const float *x, const void *w, DType dt, int K) {
    float l[16] = {0};
    int k = 0;
    for (; k + 16 <= K; k += 16)
        for (int i = 0; i < 16; i++) l[i] = fmaf(x[k + i], w_at(w, dt, k + i), l[i]);
    if (k < K) /* lanes past the end add 0*0, as the masked SIMD loads do */
        for (int i = 0; i < 16; i++) l[i] = k + i < K ? fmaf(x[k + i], w_at(w, dt, k + i), l[i]) : fmaf(0.0f, 0.0f, l[i]);
    return lanes_sum16(l);
}

static void gemm_scalar(const Gemm *g, int n0, int n1) {
    for (int m = 0; m < g->M; m++)
        for (int n = n0; n < n1; n++) {
            const float *x = g->x + (int64_t)m * g->ldx;
            float d = g->w->dtype == DT_Q4 ? q4_dot_scalar(x, w_row(g->w, n), g->K, g->w->group) : dot_scalar(x, w_row(g->w, n), g->w->dtype, g->K);
            gemm_store(g, m, n, &d, 1);
        }
}

/* --- AVX2: 16 lanes as two 8-float halves --- */


T_AVX2 static inline __m256 ld8_f16(const void *p) { return _mm256_cvtph_ps(_mm_loadu_si128(p)); }
T_AVX2 static inline __m256 ld8_bf16(const void *p) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p)), 16)); }
T_AVX2 static inline __m256 ld8_f32(const void *p) { return _mm256_loadu_ps(p); }

T_AVX2 static inline float hsum16_avx2(__m256 lo, __m256 hi) {
    __m256 s8 = _mm256_add_ps(lo, hi);
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

/* A tile: MR rows of x against NR weight rows, over all of K. The K tail is
 * copied into zero-padded buffers so the last step adds the same 0*0 the
 * masked AVX-512 loads add. `pf` is the distance to the next tile's weights,
 * prefetched as we go: interleaved row streams alone reach only ~60% of the
 * memory bandwidth. */
#define GEMM_TILE_AVX2(SUF, ESZ, LD, MR, NR)                                                              \
T_AVX2 static void tile_avx2_##SUF##_##MR(const float *const *x, const char *const *w, int K, size_t pf, int G, float *out) { \
    (void)G;                                                                                           \
    __m256 a[MR][NR][2];                                                                               \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++) a[i][j][0] = a[i][j][1] = _mm256_setzero_ps(); \
    int k = 0;                                                                                         \
    for (; k + 16 <= K; k += 16) {                                                                     \
        if (!(k & (31 >> (ESZ / 4)))) for (int j = 0; j < NR; j++) _mm_prefetch(w[j] + (size_t)k * ESZ + pf, _MM_HINT_T0); \
        for (int h = 0; h < 2; h++) {                                                                  \
            __m256 xv[MR];                                                                             \
            for (int i = 0; i < MR; i++) xv[i] = _mm256_loadu_ps(x[i] + k + 8 * h);                    \
            for (int j = 0; j < NR; j++) {                                                             \
                __m256 wv = LD(w[j] + (size_t)(k + 8 * h) * ESZ);                                      \
                for (int i = 0; i < MR; i++) a[i][j][h] = _mm256_fmadd_ps(xv[i], wv, a[i][j][h]);      \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
    if (k < K) {                                                                                       \
        float xt[MR][16] = {{0}}; char wt[NR][64] = {{0}};                                             \
        for (int i = 0; i < MR; i++) memcpy(xt[i], x[i] + k, (size_t)(K - k) * 4);                     \
        for (int j = 0; j < NR; j++) memcpy(wt[j], w[j] + (size_t)k * ESZ, (size_t)(K - k) * ESZ);     \
        for (int h = 0; h < 2; h++)                                                                    \
            for (int j = 0; j < NR; j++) {                                                             \
                __m256 wv = LD(wt[j] + 8 * h * ESZ);                                                   \
                for (int i = 0; i < MR; i++) a[i][j][h] = _mm256_fmadd_ps(_mm256_loadu_ps(xt[i] + 8 * h), wv, a[i][j][h]); \
            }                                                                                          \
    }                                                                                                  \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++) out[i * NR + j] = hsum16_avx2(a[i][j][0], a[i][j][1]); \
}
#define GEMM_TILES_AVX2(SUF, ESZ, LD) GEMM_TILE_AVX2(SUF, ESZ, LD, 1, 4) GEMM_TILE_AVX2(SUF, ESZ, LD, 2, 3)
GEMM_TILES_AVX2(f32, 4, ld8_f32)
GEMM_TILES_AVX2(f16, 2, ld8_f16)
GEMM_TILES_AVX2(bf16, 2, ld8_bf16)

/* --- AVX-512: 16 lanes in one register --- */

T_AVX512 static inline __m512 ld16_f16(const void *p) { return _mm512_cvtph_ps(_mm256_loadu_si256(p)); }
T_AVX512 static inline __m512 ld16_bf16(const void *p) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p)), 16)); }
T_AVX512 static inline __m512 ld16_f32(const void *p) { return _mm512_loadu_ps(p); }
T_AVX512 static inline __m512 ldm16_f16(__mmask16 m, const void *p) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
T_AVX512 static inline __m512 ldm16_bf16(__mmask16 m, const void *p) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16)); }
T_AVX512 static inline __m512 ldm16_f32(__mmask16 m, const void *p) { return _mm512_maskz_loadu_ps(m, p); }

T_AVX512 static inline float hsum16_avx512(__m512 v) {
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

#define GEMM_TILE_AVX512(SUF, ESZ, LD, LDM, MR, NR)                                                       \
T_AVX512 static void tile_avx512_##SUF##_##MR(const float *const *x, const char *const *w, int K, size_t pf, int G, float *out) { \
    (void)G;                                                                                           \
    __m512 a[MR][NR];                                                                                  \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++) a[i][j] = _mm512_setzero_ps();           \
    int k = 0;                                                                                         \
    for (; k + 16 <= K; k += 16) {                                                                     \
        if (!(k & (31 >> (ESZ / 4)))) for (int j = 0; j < NR; j++) _mm_prefetch(w[j] + (size_t)k * ESZ + pf, _MM_HINT_T0); \
        __m512 xv[MR];                                                                                 \
        for (int i = 0; i < MR; i++) xv[i] = _mm512_loadu_ps(x[i] + k);                                \
        for (int j = 0; j < NR; j++) {                                                                 \
            __m512 wv = LD(w[j] + (size_t)k * ESZ);                                                    \
            for (int i = 0; i < MR; i++) a[i][j] = _mm512_fmadd_ps(xv[i], wv, a[i][j]);                \
        }                                                                                              \
    }                                                                                                  \
    if (k < K) {                                                                                       \
        __mmask16 mk = (__mmask16)((1u << (K - k)) - 1);                                               \
        __m512 xv[MR];                                                                                 \
        for (int i = 0; i < MR; i++) xv[i] = _mm512_maskz_loadu_ps(mk, x[i] + k);                      \
        for (int j = 0; j < NR; j++) {                                                                 \
            __m512 wv = LDM(mk, w[j] + (size_t)k * ESZ);                                               \
            for (int i = 0; i < MR; i++) a[i][j] = _mm512_fmadd_ps(xv[i], wv, a[i][j]);                \
        }                                                                                              \
    }                                                                                                  \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++) out[i * NR + j] = hsum16_avx512(a[i][j]); \
}
#define GEMM_TILES_AVX512(SUF, ESZ, LD, LDM) \
    GEMM_TILE_AVX512(SUF, ESZ, LD, LDM, 1, 8) GEMM_TILE_AVX512(SUF, ESZ, LD, LDM, 2, 8) GEMM_TILE_AVX512(SUF, ESZ, LD, LDM, 4, 6)
GEMM_TILES_AVX512(f32, 4, ld16_f32, ldm16_f32)
GEMM_TILES_AVX512(f16, 2, ld16_f16, ldm16_f16)
GEMM_TILES_AVX512(bf16, 2, ld16_bf16, ldm16_bf16)

/* --- bf16 compute (--compute bf16): both inputs rounded to bf16 (nearest
 * even), products summed in f32 by AVX-512 BF16's vdpbf16ps, which adds two
 * products per lane. Its own reduction order, the same in every kernel: lane l
 * of a dot product accumulates, for q = 0, 1, ... in order, the product at
 * k = 32q + 2l + 1 and then the one at k = 32q + 2l (each product exact, each
 * sum rounded to nearest even, subnormal inputs and sums flushed to zero, as
 * the instruction defines it), then the lanes meet in the f32 tree. So the
 * tiles and the lane GEMM give the same bits and results stay independent of
 * batch, tiling and threads; against f32 compute they differ by the inputs'
 * rounding (2^-8 relative each: half an ulp of bf16's 8 bits), checked on the
 * instruction itself by tests/test_kernels.c. x rows are rounded once per GEMM
 * into pairs (one 32-bit word holds k = 2i and 2i + 1), zero-padded to a
 * multiple of 32 (the padding adds 0*0, as the f32 kernels' does). --- */

/* --compute MODE needs AVX-512 with the extension ext (present: have). */
static void compute_need(const char *mode, int have, const char *ext) {
    if (!have || g_simd != SIMD_AVX512)
        die("--compute %s: needs AVX-512 %s (this CPU%s has SIMD %s %s %s); use --compute f32", mode, ext,
            getenv("OPT_SIMD") ? ", as OPT_SIMD sets it," : "", simd_names[g_simd], have ? "with" : "without", ext);
}

void compute_set(const char *mode) {
    g_bf16 = mode && !strcmp(mode, "bf16");
    g_w4a8 = mode && !strcmp(mode, "int8");
    if (g_w4a8) compute_need("int8", g_vnni, "VNNI");
    if (g_bf16) compute_need("bf16", g_has_bf16, "BF16");
}

/* --compute int8 changes the arithmetic of 4-bit weights only: on float weights
 * it would silently be f32. */
static void compute_check(const Model *m, const char *path) {
    DType dt = m->layers[0].fc1.dtype;
    if (g_w4a8 && dt != DT_Q4 && dt != DT_I8)
        die("%s: --compute int8 needs 4-bit weights (--compress-weight, or a file of opt convert --int4-weights); these are %s", path, dtype_names[dt]);
}

static inline __mmask16 mask16(int n) { return n >= 16 ? 0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

/* 32 weights from k (n of them left) as bf16, rounded from the stored format */
T_BF16 static inline __m512i bf16_w32(const char *p, DType dt, int n) {
    __mmask16 m0 = mask16(n), m1 = mask16(n - 16);
    if (dt == DT_BF16) return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_maskz_loadu_epi16(m0, p)), _mm256_maskz_loadu_epi16(m1, p + 32), 1);
    __m512 lo = dt == DT_F16 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m0, p)) : _mm512_maskz_loadu_ps(m0, p);
    __m512 hi = dt == DT_F16 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m1, p + 32)) : _mm512_maskz_loadu_ps(m1, p + 64);
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

/* rows of K floats (stride ld) -> rows of K2 = 16 ceil(K/32) bf16 pairs */
T_BF16 static void bf16_round_rows(uint32_t *out, const float *in, int64_t ld, int rows, int K, int K2) {
    for (int r = 0; r < rows; r++, in += ld, out += K2)
        for (int k = 0; k < 2 * K2; k += 32) _mm512_storeu_si512(out + k / 2, bf16_w32((const char *)(in + k), DT_F32, K - k));
}

/* A tile as the f32 ones, x rows holding bf16 pairs (K2 words, zero-padded). */
#define GEMM_TILE_BF16(SUF, DT, MR, NR)                                                                   \
T_BF16 static void tile_bf16_##SUF##_##MR(const float *const *x, const char *const *w, int K, size_t pf, int G, float *out) { \
    (void)G;                                                                                           \
    const size_t esz = DT == DT_F32 ? 4 : 2;                                                           \
    __m512 a[MR][NR];                                                                                  \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++) a[i][j] = _mm512_setzero_ps();           \
    for (int k = 0; k < K; k += 32) {                                                                  \
        for (int j = 0; j < NR; j++) _mm_prefetch(w[j] + (size_t)k * esz + pf, _MM_HINT_T0);          \
        if (esz == 4) for (int j = 0; j < NR; j++) _mm_prefetch(w[j] + (size_t)k * esz + pf + 64, _MM_HINT_T0); \
        __m512i xv[MR];                                                                                \
        for (int i = 0; i < MR; i++) xv[i] = _mm512_loadu_si512(x[i] + k / 2);                         \
        for (int j = 0; j < NR; j++) {                                                                 \
            __m512i wv = bf16_w32(w[j] + (size_t)k * esz, DT, K - k >= 32 ? 32 : K - k);                \
            for (int i = 0; i < MR; i++) a[i][j] = _mm512_dpbf16_ps(a[i][j], (__m512bh)xv[i], (__m512bh)wv); \
        }                                                                                              \
    }                                                                                                  \
    for (int i = 0; i < MR; i++) for (int j = 0; j < NR; j++) out[i * NR + j] = hsum16_avx512(a[i][j]); \
}
#define GEMM_TILES_BF16(SUF, DT) GEMM_TILE_BF16(SUF, DT, 1, 8) GEMM_TILE_BF16(SUF, DT, 2, 8) GEMM_TILE_BF16(SUF, DT, 4, 6)
GEMM_TILES_BF16(f32, DT_F32)
GEMM_TILES_BF16(f16, DT_F16)
GEMM_TILES_BF16(bf16, DT_BF16)

/* f16/bf16 -> f32 with the vector units (exact, as the scalar code). */
T_AVX2 static void widen_avx2(float *out, const void *in, DType dt, int64_t n) {
    const char *p = in;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, dt == DT_F16 ? ld8_f16(p + 2 * i) : ld8_bf16(p + 2 * i));
    for (; i < n; i++) out[i] = dt == DT_F16 ? f16_to_f32(((const uint16_t *)in)[i]) : bf16_to_f32(((const uint16_t *)in)[i]);
}

/* rows x cols of weights (row stride rb bytes) into f32 rows of cols */
static void widen(float *out, const char *in, const Tensor *w, int64_t rows, size_t rb) {
    for (int64_t r = 0; r < rows; r++, in += rb, out += w->cols)
        if (w->dtype == DT_Q4) q4_dequantize_row(out, (const uint8_t *)in, w->cols, w->group);
        else if (w->dtype == DT_F32 || g_simd == SIMD_SCALAR) to_f32(out, in, w->dtype, w->cols);
        else widen_avx2(out, in, w->dtype, w->cols);
}

typedef struct { int mr, nr; TileFn fn[4]; } Tile; /* fn by dtype: f32, f16, bf16, q4 */
static Tile tiles_avx2[] = {
    {2, 3, {tile_avx2_f32_2, tile_avx2_f16_2, tile_avx2_bf16_2, NULL}},
    {1, 4, {tile_avx2_f32_1, tile_avx2_f16_1, tile_avx2_bf16_1, NULL}}, {0, 0, {0}}};
static Tile tiles_avx512[] = {
    {4, 6, {tile_avx512_f32_4, tile_avx512_f16_4, tile_avx512_bf16_4, NULL}},
    {2, 8, {tile_avx512_f32_2, tile_avx512_f16_2, tile_avx512_bf16_2, NULL}},
    {1, 8, {tile_avx512_f32_1, tile_avx512_f16_1, tile_avx512_bf16_1, NULL}}, {0, 0, {0}}};
static Tile tiles_bf16[] = { /* 4-bit weights go through an f32 panel (gemm) */
    {4, 6, {tile_bf16_f32_4, tile_bf16_f16_4, tile_bf16_bf16_4, NULL}},
    {2, 8, {tile_bf16_f32_2, tile_bf16_f16_2, tile_bf16_bf16_2, NULL}},
    {1, 8, {tile_bf16_f32_1, tile_bf16_f16_1, tile_bf16_bf16_1, NULL}}, {0, 0, {0}}};

static void tiles_init(void) { /* quant.c's 4-bit tiles, same shapes */
    for (int i = 0; i < 2; i++) tiles_avx2[i].fn[DT_Q4] = q4_tiles_avx2[i];
    for (int i = 0; i < 3; i++) tiles_avx512[i].fn[DT_Q4] = q4_tiles_avx512[i];
}

/* Rows [0, M) x weight rows [n0, n1), found at w + (n - n0) * rb in format dt,
 * with the largest tiles that fit the rows left; a tile at the weight edge
 * repeats the last row and drops the copy. */
static void gemm_tiled(const Gemm *g, int n0, int n1, const char *w, DType dt, size_t rb, const Tile *tiles) {
    for (int m0 = 0; m0 < g->M;) {
        const Tile *t = tiles;
        while (t->mr > g->M - m0) t++;
        const float *x[4];
        for (int i = 0; i < t->mr; i++) x[i] = g->x + (int64_t)(m0 + i) * g->ldx;
        for (int nb = n0; nb < n1; nb += t->nr) {
            const char *wr[8];
            float out[32];
            int cnt = n1 - nb < t->nr ? n1 - nb : t->nr;
            for (int j = 0; j < t->nr; j++) wr[j] = w + (size_t)(nb - n0 + (j < cnt ? j : cnt - 1)) * rb;
            t->fn[dt](x, wr, g->K, rb * (size_t)t->nr, g->w->group, out);
            for (int i = 0; i < t->mr; i++) gemm_store(g, m0 + i, nb, out + i * t->nr, cnt);
        }
        m0 += t->mr;
    }
}

/* --- many rows: the 16 lanes as 16 GEMMs. Lane l of every dot product sums
 * k = l, l+16, ... in order, so X and W are packed split by lane (zero-padded
 * to a multiple of 16, the 0*0 the other kernels add too) and each lane runs
 * a BLAS-style outer-product micro-kernel: a broadcast x times a vector of
 * 16 weight rows, one accumulator per output, k in order. The lanes then meet
 * in the same tree. Same bits as the tiles, at the arithmetic intensity of an
 * outer product. --- */

#define LMR 8      /* x rows per micro-kernel */
#define LNB 48     /* weight rows per block (AVX-512: 3 vectors; AVX2: 6) */

/* X rows (M, K) -> xp[mt][l][k'][i] for m-tiles of LMR rows, K' = ceil(K/16) */
static void pack_x(float *xp, const Gemm *g, int Kq) {
    int mt = (g->M + LMR - 1) / LMR;
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < mt; t++)
        for (int l = 0; l < 16; l++) {
            float *o = xp + ((size_t)t * 16 + l) * Kq * LMR;
            for (int kq = 0; kq < Kq; kq++)
                for (int i = 0; i < LMR; i++) {
                    int m = t * LMR + i, k = 16 * kq + l;
                    o[kq * LMR + i] = m < g->M && k < g->K ? g->x[(int64_t)m * g->ldx + k] : 0.0f;
                }
        }
}

/* f32 weight rows (n, K) -> wp[l][k'][j] for the block's LNB rows, zero-padded */
static void pack_w_scalar(float *wp, const float *w, int n, int K, int Kq) {
    for (int l = 0; l < 16; l++)
        for (int kq = 0; kq < Kq; kq++) {
            float *o = wp + ((size_t)l * Kq + kq) * LNB;
            int k = 16 * kq + l;
            for (int j = 0; j < LNB; j++) o[j] = j < n && k < K ? w[(size_t)j * K + k] : 0.0f;
        }
}

/* The same by 16 x 16 transposes in registers: 16 rows' 16 values of one k'
 * become the 16 lane planes' 16 rows. */
T_AVX512 static void pack_w_avx512(float *wp, const float *w, int n, int K, int Kq) {
    for (int j0 = 0; j0 < LNB; j0 += 16)
        for (int kq = 0; kq < Kq; kq++) {
            int left = K - 16 * kq;
            __mmask16 mk = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
            __m512 r[16], t[16];
            for (int i = 0; i < 16; i++) r[i] = j0 + i < n ? _mm512_maskz_loadu_ps(mk, w + (size_t)(j0 + i) * K + 16 * kq) : _mm512_setzero_ps();
            for (int i = 0; i < 16; i += 2) { t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]); t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]); }
            for (int i = 0; i < 16; i += 4)
                for (int q = 0; q < 2; q++) {
                    r[i + q] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + q]), _mm512_castps_pd(t[i + 2 + q])));
                    r[i + 2 + q] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + q]), _mm512_castps_pd(t[i + 2 + q])));
                }
            for (int i = 0; i < 4; i++) { /* 128-bit blocks: rows 0-3, 4-7, 8-11, 12-15 */
                t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
                t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
                t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
                t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
            }
            for (int i = 0; i < 4; i++) {
                r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
                r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
                r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
                r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xDD);
            }
            /* r[c] holds one column (k = 16 kq + lane) of the 16 rows; the unpacks leave lanes 1/2 swapped in each quad */
            static const int lane_of[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};
            for (int c = 0; c < 16; c++) _mm512_storeu_ps(wp + ((size_t)lane_of[c] * Kq + kq) * LNB + j0, r[c]);
        }
}

static void pack_w(float *wp, const float *w, int n, int K, int Kq) {
    if (g_simd == SIMD_AVX512) pack_w_avx512(wp, w, n, K, Kq);
    else pack_w_scalar(wp, w, n, K, Kq);
}

/* acc (LMR, LNB) = sum over k' of x[k'][i] * w[k'][j], k' in order. */
T_AVX512 static void lane_kernel_avx512(const float *xp, const float *wp, int Kq, float *acc) {
    __m512 a[LMR][3];
    for (int i = 0; i < LMR; i++) a[i][0] = a[i][1] = a[i][2] = _mm512_setzero_ps();
    for (int kq = 0; kq < Kq; kq++) {
        const float *w = wp + (size_t)kq * LNB, *x = xp + (size_t)kq * LMR;
        __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16), w2 = _mm512_loadu_ps(w + 32);
        for (int i = 0; i < LMR; i++) {
            __m512 xb = _mm512_set1_ps(x[i]);
            a[i][0] = _mm512_fmadd_ps(xb, w0, a[i][0]);
            a[i][1] = _mm512_fmadd_ps(xb, w1, a[i][1]);
            a[i][2] = _mm512_fmadd_ps(xb, w2, a[i][2]);
        }
    }
    for (int i = 0; i < LMR; i++)
        for (int c = 0; c < 3; c++) _mm512_storeu_ps(acc + i * LNB + 16 * c, a[i][c]);
}

/* The same on bf16 pairs: each step adds two products per output (vdpbf16ps). */
T_BF16 static void lane_kernel_bf16(const float *xp, const float *wp, int Kq, float *acc) {
    __m512 a[LMR][3];
    for (int i = 0; i < LMR; i++) a[i][0] = a[i][1] = a[i][2] = _mm512_setzero_ps();
    for (int kq = 0; kq < Kq; kq++) {
        const float *w = wp + (size_t)kq * LNB, *x = xp + (size_t)kq * LMR;
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(w), w1 = (__m512bh)_mm512_loadu_si512(w + 16), w2 = (__m512bh)_mm512_loadu_si512(w + 32);
        for (int i = 0; i < LMR; i++) {
            __m512bh xb = (__m512bh)_mm512_castps_si512(_mm512_set1_ps(x[i]));
            a[i][0] = _mm512_dpbf16_ps(a[i][0], xb, w0);
            a[i][1] = _mm512_dpbf16_ps(a[i][1], xb, w1);
            a[i][2] = _mm512_dpbf16_ps(a[i][2], xb, w2);
        }
    }
    for (int i = 0; i < LMR; i++)
        for (int c = 0; c < 3; c++) _mm512_storeu_ps(acc + i * LNB + 16 * c, a[i][c]);
}

T_AVX2 static void lane_kernel_avx2(const float *xp, const float *wp, int Kq, float *acc) {
    for (int j0 = 0; j0 < LNB; j0 += 16) /* 4 rows x 16 weights per pass: 8 accumulators */
        for (int i0 = 0; i0 < LMR; i0 += 4) {
            __m256 a[4][2];
            for (int i = 0; i < 4; i++) a[i][0] = a[i][1] = _mm256_setzero_ps();
            for (int kq = 0; kq < Kq; kq++) {
                const float *w = wp + (size_t)kq * LNB + j0, *x = xp + (size_t)kq * LMR + i0;
                __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
                for (int i = 0; i < 4; i++) {
                    __m256 xb = _mm256_set1_ps(x[i]);
                    a[i][0] = _mm256_fmadd_ps(xb, w0, a[i][0]);
                    a[i][1] = _mm256_fmadd_ps(xb, w1, a[i][1]);
                }
            }
            for (int i = 0; i < 4; i++) {
                _mm256_storeu_ps(acc + (i0 + i) * LNB + j0, a[i][0]);
                _mm256_storeu_ps(acc + (i0 + i) * LNB + j0 + 8, a[i][1]);
            }
        }
}

/* part[l] (LMR x LNB) of the 16 lanes -> dots, by opt's tree (l, l+8),
 * (l, l+4), (l, l+2), (l, l+1), element-wise so it vectorizes over outputs. */
static void lanes_reduce(float part[16][LMR * LNB], float *dot) {
    for (int k = 0; k < 8; k++) for (int e = 0; e < LMR * LNB; e++) part[k][e] += part[k + 8][e];
    for (int k = 0; k < 4; k++) for (int e = 0; e < LMR * LNB; e++) part[k][e] += part[k + 4][e];
    for (int e = 0; e < LMR * LNB; e++) dot[e] = (part[0][e] + part[2][e]) + (part[1][e] + part[3][e]);
}

/* Rows of x (packed) against a packed block of weights (n0..n1); Kq steps per lane. */
static void gemm_lanes(const Gemm *g, const float *xp, int Kq, int n0, int n1, const float *wp) {
    static _Thread_local float part[16][LMR * LNB];
    float dot[LMR * LNB];
    for (int m0 = 0; m0 < g->M; m0 += LMR) {
        const float *x = xp + (size_t)(m0 / LMR) * 16 * Kq * LMR;
        for (int l = 0; l < 16; l++) {
            if (g_bf16) lane_kernel_bf16(x + (size_t)l * Kq * LMR, wp + (size_t)l * Kq * LNB, Kq, part[l]);
            else if (g_simd == SIMD_AVX512) lane_kernel_avx512(x + (size_t)l * Kq * LMR, wp + (size_t)l * Kq * LNB, Kq, part[l]);
            else lane_kernel_avx2(x + (size_t)l * Kq * LMR, wp + (size_t)l * Kq * LNB, Kq, part[l]);
        }
        lanes_reduce(part, dot);
        for (int i = 0; i < LMR && m0 + i < g->M; i++) gemm_store(g, m0 + i, n0, dot + i * LNB, n1 - n0);
    }
}

/* Splits N into blocks that threads take whole. Up to 63 rows: the tiles,
 * straight from the stored weights (memory-bound: conversions hide behind the
 * loads). More: the lane GEMM on packed panels (widened exactly, once per
 * block). Both give the same bits. With --compute bf16, x is rounded to bf16
 * pairs first and both paths run on those (a pair of k per 32-bit word, so the
 * f32 packing moves pairs unchanged). 4-bit weights reach the tiles through an
 * f32 panel too from 8 rows (and always with bf16): dequantized once per block,
 * not once per tile of 4 rows (batched decode 1.1-1.4x on Zen 5). */
void gemm(const Gemm *g) {
    if (g->M <= 0 || g->N <= 0) return;
    DType dt = g->w->dtype;
    if (dt == DT_I8) { gemm_i8(g); return; }
    if (dt == DT_Q4 && g_w4a8) { gemm_w4a8(g); return; }
    check(dt == DT_F32 || dt == DT_F16 || dt == DT_BF16 || dt == DT_Q4, "gemm on dtype %d", (int)dt);
    check(!g_bf16 || g_simd == SIMD_AVX512, "bf16 compute at SIMD level %s", simd_names[g_simd]);
    const int nb = LNB;
    /* blocks never straddle the split of a tensor whose rows live in two places */
    int split = g->w->data2 && g->w->split > 0 && g->w->split < g->N ? (int)g->w->split : g->N;
    int nblk0 = (split + nb - 1) / nb, nblk = nblk0 + (g->N - split + nb - 1) / nb;
    bool lanes = g->M >= 64 && g_simd != SIMD_SCALAR; /* packing pays for itself only over many rows */
    const Tile *tiles = g_bf16 ? tiles_bf16 : g_simd == SIMD_AVX512 ? tiles_avx512 : tiles_avx2;
    size_t rb = row_bytes(g->w);
    /* what the kernels read: x itself, or (bf16) its rows of K2 pairs, which pack as floats do */
    Gemm gx = *g;
    uint32_t *xb = NULL;
    int K2 = 16 * ((g->K + 31) / 32), Kq = g_bf16 ? K2 / 16 : (g->K + 15) / 16;
    if (g_bf16) {
        xb = check_malloc(sizeof(uint32_t) * (size_t)g->M * K2, "bf16 activations");
        bf16_round_rows(xb, g->x, g->ldx, g->M, g->K, K2);
        gx.x = (const float *)xb;
        gx.ldx = K2; /* K stays: the weights' length (pack_x reads only k < K2 of the zero-padded rows) */
    }
    float *xp = NULL;
    if (lanes) {
        xp = check_malloc(sizeof(float) * (size_t)((g->M + LMR - 1) / LMR) * 16 * Kq * LMR, "packed activations");
        pack_x(xp, &gx, Kq);
    }
    /* the tiles stream: runs of consecutive blocks per thread, so a tile's prefetch of the
     * next rows lands in the thread's own next block (a quarter of a thread's share each) */
    int nt = omp_get_max_threads(), chunk = lanes || nblk < 8 * nt ? 1 : nblk / (4 * nt);
    #pragma omp parallel for schedule(dynamic, chunk) if (nblk > 1 && (int64_t)g->M * g->N * g->K > 100000)
    for (int b = 0; b < nblk; b++) {
        int n0 = b < nblk0 ? b * nb : split + (b - nblk0) * nb, end = b < nblk0 ? split : g->N, n1 = n0 + nb < end ? n0 + nb : end;
        const char *w = w_row(g->w, n0);
        if (g_simd == SIMD_SCALAR) { gemm_scalar(g, n0, n1); continue; }
        if (!lanes && !(dt == DT_Q4 && (g_bf16 || g->M >= 8))) { gemm_tiled(&gx, n0, n1, w, dt, rb, tiles); continue; }
        static _Thread_local float *panel, *packed;
        static _Thread_local size_t panel_cap;
        size_t need = (size_t)nb * 16 * ((g->K + 15) / 16);
        if (need > panel_cap) {
            free(panel); free(packed);
            panel = check_malloc(need * sizeof(float), "a weight panel");
            packed = check_malloc(need * sizeof(float), "a weight panel");
            panel_cap = need;
        }
        widen(panel, w, g->w, n1 - n0, rb);
        if (!lanes) { gemm_tiled(&gx, n0, n1, (const char *)panel, DT_F32, sizeof(float) * (size_t)g->K, tiles); continue; }
        if (g_bf16) { /* rows rounded to pairs (into packed), then packed by lane (into panel) */
            bf16_round_rows((uint32_t *)packed, panel, g->K, n1 - n0, g->K, K2);
            pack_w(panel, packed, n1 - n0, K2, Kq);
            gemm_lanes(g, xp, Kq, n0, n1, panel);
        } else {
            pack_w(packed, panel, n1 - n0, g->K, Kq);
            gemm_lanes(g, xp, Kq, n0, n1, packed);
        }
    }
    free(xp);
    free(xb);
}

/* --- attention: scores vectorize over positions (keys are stored transposed),
 * the weighted sum over head_dim; both accumulate in order with FMAs, so the
 * vector width does not change a bit of the result. Up to 4 query rows of one
 * sequence and head go together so each key and value is loaded once for all. */

#define AQ 4 /* query rows per attention pass */

/* Keys are stored in blocks of 16 positions, transposed within a block:
 * k[(t / 16) * D * 16 + d * 16 + t % 16], so scores vectorize over positions
 * and a new position touches one contiguous block. */
#define KB 16

/* s[i][t] = sum_d q[i][d] * key[t][d] for t < T (T of the last, longest row). */
static void attn_scores_scalar(float *const *s, const float *const *q, int n, const float *k, int D, int T) {
    for (int i = 0; i < n; i++)
        for (int t = 0; t < T; t++) {
            const float *kb = k + (size_t)(t / KB) * D * KB + t % KB;
            float acc = 0;
            for (int d = 0; d < D; d++) acc = fmaf(q[i][d], kb[d * KB], acc);
            s[i][t] = acc;
        }
}

/* out[i][d] (+)= sum_{t0 <= t < t1} p[i][t] * v[t][d]; from zero when init. */
static void attn_mix_scalar(float *const *out, const float *const *p, int n, const float *v, int64_t ld, int D, int t0, int t1, int init) {
    for (int i = 0; i < n; i++) {
        if (init) for (int d = 0; d < D; d++) out[i][d] = 0;
        for (int t = t0; t < t1; t++)
            for (int d = 0; d < D; d++) out[i][d] = fmaf(p[i][t], v[t * ld + d], out[i][d]);
    }
}

T_AVX2 static void attn_scores_avx2(float *const *s, const float *const *q, int n, const float *k, int D, int T) {
    for (int t = 0; t < T; t += KB) {
        const float *kb = k + (size_t)(t / KB) * D * KB;
        __m256 a[AQ][2];
        for (int i = 0; i < AQ; i++) a[i][0] = a[i][1] = _mm256_setzero_ps();
        for (int d = 0; d < D; d++) {
            __m256 k0 = _mm256_loadu_ps(kb + d * KB), k1 = _mm256_loadu_ps(kb + d * KB + 8);
            for (int i = 0; i < AQ; i++) {
                __m256 qd = _mm256_set1_ps(q[i < n ? i : n - 1][d]);
                a[i][0] = _mm256_fmadd_ps(qd, k0, a[i][0]);
                a[i][1] = _mm256_fmadd_ps(qd, k1, a[i][1]);
            }
        }
        int left = T - t < KB ? T - t : KB;
        for (int i = 0; i < n; i++) {
            float o[KB];
            _mm256_storeu_ps(o, a[i][0]);
            _mm256_storeu_ps(o + 8, a[i][1]);
            memcpy(s[i] + t, o, sizeof(float) * (size_t)left);
        }
    }
}

T_AVX2 static void attn_mix_avx2(float *const *out, const float *const *p, int n, const float *v, int64_t ld, int D, int t0, int t1, int init) {
    int d = 0;
    for (; d + 16 <= D; d += 16) {
        __m256 a[AQ][2];
        for (int i = 0; i < AQ; i++) {
            int r = i < n ? i : n - 1;
            a[i][0] = init ? _mm256_setzero_ps() : _mm256_loadu_ps(out[r] + d);
            a[i][1] = init ? _mm256_setzero_ps() : _mm256_loadu_ps(out[r] + d + 8);
        }
        for (int t = t0; t < t1; t++) {
            __m256 v0 = _mm256_loadu_ps(v + t * ld + d), v1 = _mm256_loadu_ps(v + t * ld + d + 8);
            for (int i = 0; i < AQ; i++) {
                __m256 pt = _mm256_set1_ps(p[i < n ? i : n - 1][t]);
                a[i][0] = _mm256_fmadd_ps(pt, v0, a[i][0]);
                a[i][1] = _mm256_fmadd_ps(pt, v1, a[i][1]);
            }
        }
        for (int i = 0; i < n; i++) { _mm256_storeu_ps(out[i] + d, a[i][0]); _mm256_storeu_ps(out[i] + d + 8, a[i][1]); }
    }
    if (d < D) {
        float *ot[AQ];
        for (int i = 0; i < n; i++) ot[i] = out[i] + d;
        attn_mix_scalar(ot, p, n, v + d, ld, D - d, t0, t1, init);
    }
}

T_AVX512 static void attn_scores_avx512(float *const *s, const float *const *q, int n, const float *k, int D, int T) {
    for (int t = 0; t < T; t += 2 * KB) {
        const float *kb = k + (size_t)(t / KB) * D * KB;
        int two = T - t > KB; /* a second block exists */
        __m512 a[AQ][2];
        for (int i = 0; i < AQ; i++) a[i][0] = a[i][1] = _mm512_setzero_ps();
        for (int d = 0; d < D; d++) {
            __m512 k0 = _mm512_loadu_ps(kb + d * KB), k1 = two ? _mm512_loadu_ps(kb + (size_t)D * KB + d * KB) : k0;
            for (int i = 0; i < AQ; i++) {
                __m512 qd = _mm512_set1_ps(q[i < n ? i : n - 1][d]);
                a[i][0] = _mm512_fmadd_ps(qd, k0, a[i][0]);
                a[i][1] = _mm512_fmadd_ps(qd, k1, a[i][1]);
            }
        }
        for (int c = 0; c < 2; c++) {
            int left = T - t - KB * c;
            __mmask16 mk = left >= KB ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
            for (int i = 0; i < n; i++) _mm512_mask_storeu_ps(s[i] + t + KB * c, mk, a[i][c]);
        }
    }
}

T_AVX512 static void attn_mix_avx512(float *const *out, const float *const *p, int n, const float *v, int64_t ld, int D, int t0, int t1, int init) {
    for (int d = 0; d < D; d += 32) {
        __mmask16 mk[2];
        for (int c = 0; c < 2; c++) {
            int left = D - d - 16 * c;
            mk[c] = left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
        }
        __m512 a[AQ][2];
        for (int i = 0; i < AQ; i++) {
            int r = i < n ? i : n - 1;
            for (int c = 0; c < 2; c++) a[i][c] = init ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mk[c], out[r] + d + 16 * c);
        }
        for (int t = t0; t < t1; t++) {
            __m512 v0 = _mm512_maskz_loadu_ps(mk[0], v + t * ld + d), v1 = _mm512_maskz_loadu_ps(mk[1], v + t * ld + d + 16);
            for (int i = 0; i < AQ; i++) {
                __m512 pt = _mm512_set1_ps(p[i < n ? i : n - 1][t]);
                a[i][0] = _mm512_fmadd_ps(pt, v0, a[i][0]);
                a[i][1] = _mm512_fmadd_ps(pt, v1, a[i][1]);
            }
        }
        for (int i = 0; i < n; i++)
            for (int c = 0; c < 2; c++) _mm512_mask_storeu_ps(out[i] + d + 16 * c, mk[c], a[i][c]);
    }
}

static void attn_scores(float *const *s, const float *const *q, int n, const float *k, int D, int T) {
    if (g_simd == SIMD_AVX512) attn_scores_avx512(s, q, n, k, D, T);
    else if (g_simd == SIMD_AVX2) attn_scores_avx2(s, q, n, k, D, T);
    else attn_scores_scalar(s, q, n, k, D, T);
}

static void attn_mix(float *const *out, const float *const *p, int n, const float *v, int64_t ld, int D, int t0, int t1, int init) {
    if (g_simd == SIMD_AVX512) attn_mix_avx512(out, p, n, v, ld, D, t0, t1, init);
    else if (g_simd == SIMD_AVX2) attn_mix_avx2(out, p, n, v, ld, D, t0, t1, init);
    else attn_mix_scalar(out, p, n, v, ld, D, t0, t1, init);
}

/* In-place softmax of s[0..T). Plain C compiled once, so identical everywhere. */
static void softmax(float *s, int T) {
    float mx = -INFINITY, l[16] = {0};
    for (int t = 0; t < T; t++) mx = s[t] > mx ? s[t] : mx;
    for (int t = 0; t < T; t++) {
        s[t] = expf(s[t] - mx);
        l[t & 15] += s[t];
    }
    float sum = lanes_sum16(l);
    for (int t = 0; t < T; t++) s[t] /= sum;
}

/* LayerNorm over rows of n, eps 1e-5 as OPT uses; w/b NULL when not affine. */
static void layernorm(float *out, const float *x, const float *w, const float *b, int rows, int n) {
    #pragma omp parallel for if (rows > 4)
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (int64_t)r * n;
        float *o = out + (int64_t)r * n, l[16] = {0}, v[16] = {0};
        for (int i = 0; i < n; i++) l[i & 15] += xr[i];
        float mean = lanes_sum16(l) / (float)n;
        for (int i = 0; i < n; i++) { float d = xr[i] - mean; v[i & 15] += d * d; }
        float rstd = 1.0f / sqrtf(lanes_sum16(v) / (float)n + 1e-5f);
        for (int i = 0; i < n; i++) {
            float y = (xr[i] - mean) * rstd;
            o[i] = w ? y * w[i] + b[i] : y;
        }
    }
}

/* ----------------------------------------------------------------------------
 * The model: one step over a set of rows (tokens), each belonging to a cache
 * slot at a position. Prefill is a step with all prompt tokens (packed, no
 * padding computed); decode is a step with one row per live sequence. A
 * sequence's rows never see another's, so batch-mates cannot change a result. */



/* Bytes of one (sequence, head) area of keys (or values): whole blocks of 16
 * positions for f32. */
size_t kv_head_bytes(DType dt, int head_dim, int cap, int group) {
    int cap16 = (cap + KB - 1) / KB * KB;
    return dt == DT_Q4 ? q4_row_bytes(head_dim, group) * (size_t)cap : dt == DT_F16 ? 2 * (size_t)head_dim * cap : sizeof(float) * (size_t)head_dim * cap16;
}

void kv_span(DType dt, int head_dim, int group, int p0, int p1, int value, size_t *off, size_t *len) {
    size_t a, b, hd = (size_t)head_dim;
    if (p1 <= p0) { *off = *len = 0; return; }
    if (dt == DT_Q4) { a = q4_row_bytes(head_dim, group) * (size_t)p0; b = q4_row_bytes(head_dim, group) * (size_t)p1; }
    else if (dt == DT_F16) { a = 2 * hd * (size_t)p0; b = 2 * hd * (size_t)p1; }
    else if (value) { a = 4 * hd * (size_t)p0; b = 4 * hd * (size_t)p1; }
    else { a = 4 * hd * KB * (size_t)(p0 / KB); b = 4 * hd * KB * (size_t)((p1 + KB - 1) / KB); } /* whole key blocks */
    *off = a;
    *len = b - a;
}

/* The 4-bit cache's group: the chosen size, or head_dim rounded up to the
 * kernels' step of 16 when that is smaller. */
int kv_group(int head_dim, int group) {
    int hd16 = (head_dim + 15) / 16 * 16;
    return group < hd16 ? group : hd16;
}

void kv_init(KVCache *kv, const Config *c, int n_slot, int cap, DType dt, int group) {
    int g = kv_group(c->head_dim, group), areas = n_slot * c->n_head;
    size_t hb = kv_head_bytes(dt, c->head_dim, cap, g), per = hb * (size_t)areas;
    kv->n_layer = c->n_layer;
    kv->layer = check_calloc(sizeof(KVLayer) * (size_t)c->n_layer, "the KV cache");
    kv->ptrs = check_malloc(sizeof(char *) * 2 * (size_t)areas * c->n_layer, "the KV cache");
    kv->mem = calloc(1, 2 * per * (size_t)c->n_layer); /* zeroed: blocks past the end are read, never used */
    if (!kv->mem) die("out of memory for the KV cache: %.2f GiB for %d sequences of %d positions (lower -b or use --compress-cache)",
                      2.0 * (double)per * c->n_layer / (1 << 30), n_slot, cap);
    for (int l = 0; l < c->n_layer; l++) {
        char **kp = kv->ptrs + 2 * (size_t)areas * l, **vp = kp + areas, *base = kv->mem + 2 * per * (size_t)l;
        for (int a = 0; a < areas; a++) { kp[a] = base + hb * (size_t)a; vp[a] = base + per + hb * (size_t)a; }
        kv->layer[l] = (KVLayer){dt, n_slot, c->n_head, c->head_dim, cap, g, hb, kp, vp};
    }
}

void kv_free(KVCache *kv) { free(kv->mem); free(kv->layer); free(kv->ptrs); }

static char *kv_k(const KVLayer *kv, int slot, int head) { return kv->k[(size_t)slot * kv->n_head + head]; }
static char *kv_v(const KVLayer *kv, int slot, int head) { return kv->v[(size_t)slot * kv->n_head + head]; }

void kv_store(const KVLayer *kv, int slot, int head, int pos, const float *k, const float *v) {
    int D = kv->head_dim;
    if (kv->dtype == DT_F16) { /* the GPU's layout, kept on the host by offloading */
        uint16_t *K = (uint16_t *)kv_k(kv, slot, head) + (size_t)pos * D, *V = (uint16_t *)kv_v(kv, slot, head) + (size_t)pos * D;
        for (int d = 0; d < D; d++) { K[d] = f32_to_f16(k[d]); V[d] = f32_to_f16(v[d]); }
        return;
    }
    if (kv->dtype == DT_Q4) {
        size_t rb = q4_row_bytes(D, kv->group);
        q4_quantize_row((uint8_t *)kv_k(kv, slot, head) + rb * (size_t)pos, k, D, kv->group, "the key cache");
        q4_quantize_row((uint8_t *)kv_v(kv, slot, head) + rb * (size_t)pos, v, D, kv->group, "the value cache");
        return;
    }
    float *kb = (float *)kv_k(kv, slot, head) + (size_t)(pos / KB) * D * KB + pos % KB;
    for (int d = 0; d < D; d++) kb[d * KB] = k[d];
    memcpy((float *)kv_v(kv, slot, head) + (size_t)pos * D, v, sizeof(float) * D);
}



void scratch_init(Scratch *s, const Config *c, int rows, int cap) {
    memset(s, 0, sizeof *s);
    s->be = &cpu_backend;
    s->rows = rows;
    int64_t h = c->hidden, e = c->embed_dim, big = h > e ? h : e;
    s->x = check_malloc(sizeof(float) * rows * h, "activations");
    s->h = check_malloc(sizeof(float) * rows * big, "activations");
    s->q = check_malloc(sizeof(float) * rows * h, "activations");
    s->k = check_malloc(sizeof(float) * rows * h, "activations");
    s->v = check_malloc(sizeof(float) * rows * h, "activations");
    s->att = check_malloc(sizeof(float) * rows * h, "activations");
    s->f = check_malloc(sizeof(float) * rows * c->ffn, "activations");
    s->e = check_malloc(sizeof(float) * rows * e, "activations");
    s->score_cap = cap;
    s->scores = check_malloc(sizeof(float) * (size_t)omp_get_max_threads() * AQ * cap, "attention scores");
    s->qscaled = check_malloc(sizeof(float) * (size_t)omp_get_max_threads() * AQ * 512, "attention queries");
    s->grp = check_malloc(sizeof(int) * (size_t)(rows + 1), "attention groups");
}

void scratch_free(Scratch *s) {
    free(s->x); free(s->h); free(s->q); free(s->k); free(s->v); free(s->att); free(s->f); free(s->e); free(s->scores); free(s->qscaled); free(s->grp);
}

static void cpu_linear(float *y, const float *x, const Tensor *w, const float *b, int rows, int acc, int relu) {
    Gemm g = {.y = y, .x = x, .w = w, .bias = b, .ldy = w->rows, .ldx = w->cols, .M = rows, .N = (int)w->rows, .K = (int)w->cols, .acc = acc, .relu = relu};
    gemm(&g);
}

/* Writes the step's keys and values into the cache, then attends: row r sees
 * positions 0..pos[r] of its own slot. Areas whose pointer is NULL belong to
 * another device (offloading's split attention) and are skipped. */
static void cpu_attention(const Config *c, const KVLayer *kv, const Step *st, Scratch *s) {
    int H = c->n_head, D = c->head_dim;
    float scale = 1.0f / sqrtf((float)D);
    #pragma omp parallel for collapse(2) if (kv->dtype == DT_Q4 && st->n * H > 64)
    for (int r = 0; r < st->n; r++)
        for (int hh = 0; hh < H; hh++)
            if (kv_k(kv, st->slot[r], hh))
                kv_store(kv, st->slot[r], hh, st->pos[r], s->k + (size_t)r * c->hidden + hh * D, s->v + (size_t)r * c->hidden + hh * D);
    /* groups of up to AQ consecutive rows of one sequence (positions ascend) */
    int ng = 0;
    for (int r = 0; r < st->n; ng++) {
        s->grp[ng] = r;
        int k = 1;
        while (k < AQ && r + k < st->n && st->slot[r + k] == st->slot[r] && st->pos[r + k] == st->pos[r] + k) k++;
        r += k;
    }
    s->grp[ng] = st->n;
    #pragma omp parallel for collapse(2) schedule(dynamic, 2)
    for (int g = 0; g < ng; g++)
        for (int hh = 0; hh < H; hh++) {
            if (!kv_k(kv, st->slot[s->grp[g]], hh)) continue;
            int r0 = s->grp[g], n = s->grp[g + 1] - r0, T[AQ];
            float *sc[AQ], *out[AQ];
            const float *q[AQ];
            float *qs = s->qscaled + (size_t)omp_get_thread_num() * AQ * 512;
            for (int i = 0; i < n; i++) {
                const float *qr = s->q + (size_t)(r0 + i) * c->hidden + hh * D;
                for (int d = 0; d < D; d++) qs[i * 512 + d] = qr[d] * scale; /* HF scales q_proj's output */
                q[i] = qs + i * 512;
                sc[i] = s->scores + ((size_t)omp_get_thread_num() * AQ + i) * s->score_cap;
                out[i] = s->att + (size_t)(r0 + i) * c->hidden + hh * D;
                T[i] = st->pos[r0 + i] + 1;
            }
            const char *kt = kv_k(kv, st->slot[r0], hh), *v = kv_v(kv, st->slot[r0], hh);
            if (kv->dtype == DT_Q4) q4_attn_scores(sc, q, n, (const uint8_t *)kt, D, kv->group, T[n - 1]);
            else attn_scores(sc, q, n, (const float *)kt, D, T[n - 1]);
            for (int i = 0; i < n; i++) softmax(sc[i], T[i]);
            /* all rows up to the first one's length, then each row's own tail,
             * continuing the same accumulators: one chain of FMAs per output */
            for (int i = 0; i < n; i++) {
                int t0 = i ? T[0] : 0, rows = i ? 1 : n;
                if (kv->dtype == DT_Q4) q4_attn_mix(out + i, (const float *const *)sc + i, rows, (const uint8_t *)v, D, kv->group, t0, T[i], !i);
                else attn_mix(out + i, (const float *const *)sc + i, rows, (const float *)v, D, D, t0, T[i], !i);
            }
        }
}

static void cpu_embed(const Tensor *t, const Step *st, int offset, float *out) {
    for (int r = 0; r < st->n; r++) tensor_row_f32(t, offset ? st->pos[r] + offset : st->tok[r], out + (size_t)r * t->cols);
}

static void cpu_add(float *y, const float *x, size_t n) { for (size_t i = 0; i < n; i++) y[i] += x[i]; }
static void cpu_copy(float *y, const float *x, size_t n) { memcpy(y, x, sizeof(float) * n); }

static void cpu_qkv(const Layer *L, const float *x, int rows, Scratch *s) {
    cpu_linear(s->q, x, &L->q, L->qb, rows, 0, 0);
    cpu_linear(s->k, x, &L->k, L->kb, rows, 0, 0);
    cpu_linear(s->v, x, &L->v, L->vb, rows, 0, 0);
}

const Backend cpu_backend = {"cpu", cpu_linear, cpu_qkv, layernorm, cpu_attention, cpu_embed, cpu_add, cpu_copy};

/* Token embeddings (through project_in) plus positions into x (n, hidden). */
void model_embed(const Model *m, const Step *st, float *x, Scratch *s) {
    const Config *c = &m->cfg;
    const Backend *be = s->be;
    int n = st->n, h = c->hidden, e = c->embed_dim;
    check(n <= s->rows, "step of %d rows exceeds scratch of %d", n, s->rows);
    for (int r = 0; r < n; r++) {
        check(st->pos[r] >= 0 && st->pos[r] < c->max_pos, "position %d out of range", st->pos[r]);
        check(st->tok[r] >= 0 && st->tok[r] < c->vocab, "token %d out of range", st->tok[r]);
    }
    be->embed(&m->embed, st, 0, s->e);
    if (e != h) be->linear(x, s->e, &m->proj_in, NULL, n, 0, 0);
    else be->copy(x, s->e, (size_t)n * h);
    be->embed(&m->pos, st, 2, s->h); /* OPT's learned positions are offset by 2 */
    be->add(x, s->h, (size_t)n * h);
}

/* Decoder layer l (weights L, cache kv) over the step's rows, x in place:
 * the one description of an OPT layer, for every backend. */
void layer_forward(const Model *m, const Layer *L, int l, const KVLayer *kv, const Step *st, float *x, Scratch *s) {
    const Config *c = &m->cfg;
    const Backend *be = s->be;
    int n = st->n, h = c->hidden;
    const float *in = x;
    if (c->pre_ln) { be->layernorm(s->h, x, L->ln1w, L->ln1b, n, h); in = s->h; }
    if (s->observe) s->observe(s->observe_ctx, l, OBS_QKV, in, n, h);
    be->qkv(L, in, n, s);
    be->attention(c, kv, st, s);
    if (s->observe) s->observe(s->observe_ctx, l, OBS_O, s->att, n, h);
    be->linear(x, s->att, &L->o, L->ob, n, 1, 0);
    if (!c->pre_ln) be->layernorm(x, x, L->ln1w, L->ln1b, n, h);
    in = x;
    if (c->pre_ln) { be->layernorm(s->h, x, L->ln2w, L->ln2b, n, h); in = s->h; }
    if (s->observe) s->observe(s->observe_ctx, l, OBS_FC1, in, n, h);
    be->linear(s->f, in, &L->fc1, L->fc1b, n, 0, 1);
    if (s->observe) s->observe(s->observe_ctx, l, OBS_FC2, s->f, n, c->ffn);
    be->linear(x, s->f, &L->fc2, L->fc2b, n, 1, 0);
    if (!c->pre_ln) be->layernorm(x, x, L->ln2w, L->ln2b, n, h);
}

/* Final LayerNorm and project_out: x (n, hidden) to out (n, embed_dim). */
void model_final(const Model *m, const float *x, int n, float *out, Scratch *s) {
    const Config *c = &m->cfg;
    const float *y = x;
    if (c->final_ln) { s->be->layernorm(s->h, x, m->lnfw, m->lnfb, n, c->hidden); y = s->h; }
    if (c->embed_dim != c->hidden) s->be->linear(out, y, &m->proj_out, NULL, n, 0, 0);
    else s->be->copy(out, y, (size_t)n * c->hidden);
}

/* The whole decoder over the step's rows; leaves the final hidden states in
 * s->e, (n, embed_dim). */
void model_forward(const Model *m, const KVCache *kv, const Step *st, Scratch *s) {
    for (int r = 0; r < st->n; r++) check(st->pos[r] < kv->layer[0].cap, "position %d beyond the cache", st->pos[r]);
    model_embed(m, st, s->x, s);
    for (int l = 0; l < m->cfg.n_layer; l++) layer_forward(m, &m->layers[l], l, &kv->layer[l], st, s->x, s);
    model_final(m, s->x, st->n, s->e, s);
}

/* logits (rows, vocab) for the given final hidden rows. */
void model_logits(const Model *m, float *logits, const float *hid, int rows) {
    cpu_linear(logits, hid, &m->lm_head, NULL, rows, 0, 0);
}

/* ----------------------------------------------------------------------------
 * Synthetic checkpoints (`opt synth`): seeded random weights written in real
 * Hugging Face layout, as safetensors or as torch.save's zip/pickle, so tests
 * and benchmarks need no downloads. The values are deterministic functions of
 * (seed, tensor, element), independent of the thread count. */

/* The tokenizer files travel inside the binary, so `opt synth` and
 * `opt tokenize` work from anywhere. */
__asm__(".section .rodata\n"
        ".balign 16\n.global opt_vocab_json\nopt_vocab_json:\n.incbin \"tokenizer/vocab.json\"\n.global opt_vocab_json_end\nopt_vocab_json_end:\n"
        ".balign 16\n.global opt_merges_txt\nopt_merges_txt:\n.incbin \"tokenizer/merges.txt\"\n.global opt_merges_txt_end\nopt_merges_txt_end:\n"
        ".previous\n");
extern const char opt_vocab_json[], opt_vocab_json_end[], opt_merges_txt[], opt_merges_txt_end[];

typedef struct { const char *name; int hidden, layers, heads, ffn, embed; } Shape;
static const Shape opt_shapes[] = { /* the published OPT family */
    {"opt-125m", 768, 12, 12, 3072, 768},     {"opt-350m", 1024, 24, 16, 4096, 512},
    {"opt-1.3b", 2048, 24, 32, 8192, 2048},   {"opt-2.7b", 2560, 32, 32, 10240, 2560},
    {"opt-6.7b", 4096, 32, 32, 16384, 4096},  {"opt-13b", 5120, 40, 40, 20480, 5120},
    {"opt-30b", 7168, 48, 56, 28672, 7168},   {"opt-66b", 9216, 64, 72, 36864, 9216},
    {"opt-175b", 12288, 96, 96, 49152, 12288},
};

/* "opt-1.3b" or HxLxAxF (hidden x layers x heads x ffn) into a Config. */
void shape_config(Config *c, const char *spec) {
    memset(c, 0, sizeof *c);
    const Shape *s = NULL;
    for (size_t i = 0; i < sizeof opt_shapes / sizeof *opt_shapes; i++)
        if (!strcmp(spec, opt_shapes[i].name) || !strcmp(spec, opt_shapes[i].name + 4)) s = &opt_shapes[i];
    if (s) {
        *c = (Config){.hidden = s->hidden, .n_layer = s->layers, .n_head = s->heads, .ffn = s->ffn, .embed_dim = s->embed};
        c->pre_ln = s->embed == s->hidden; /* only 350m is post-LN */
    } else {
        int h, l, a, f, n = 0;
        if (sscanf(spec, "%dx%dx%dx%d%n", &h, &l, &a, &f, &n) != 4 || spec[n])
            die("unknown shape '%s': use opt-125m ... opt-175b or HIDDENxLAYERSxHEADSxFFN, e.g. 256x2x4x1024", spec);
        *c = (Config){.hidden = h, .n_layer = l, .n_head = a, .ffn = f, .embed_dim = h, .pre_ln = 1};
    }
    c->vocab = 50272;
    c->max_pos = 2048;
    c->final_ln = c->pre_ln;
    c->bias = c->ln_affine = 1;
    c->bos = 2; c->eos = 2; c->pad = 1;
    snprintf(c->name, sizeof c->name, "%s", spec);
    config_check(c, spec);
    c->head_dim = c->hidden / c->n_head;
}

enum { W_LINEAR, W_EMBED, W_POS, W_LNW, W_BIAS };
typedef struct {
    char name[96];         /* Hugging Face name, prefix included */
    int64_t rows, cols;    /* rows = 0 for 1-D tensors */
    int kind;              /* W_* distribution */
    int ln_feed;           /* W_LNW: a LayerNorm feeding q/k/v or fc1; W_LINEAR: one of those linears */
} WSpec;

typedef struct {
    const char *out;       /* output directory */
    DType dtype;           /* weight dtype */
    int bin;               /* torch.save format instead of safetensors */
    int shards;            /* number of weight files (1 = unsharded) */
    const char *prefix;    /* "model.decoder." or "decoder." */
    int tie;               /* omit lm_head.weight (tied to the embedding) */
    uint64_t seed;         /* weight seed */
    int n_out;             /* --outliers: channels whose LayerNorm outputs are 50-100x the rest */
    int out_ch[8];         /* (n_out) those channels */
    float out_f[8];        /* (n_out) their factors */
} SynthOpts;

/* Every tensor an OPTForCausalLM checkpoint holds, in HF's order. */
static int wspec_list(const Config *c, const char *prefix, bool tie, WSpec **out) {
    int cap = 16 + 16 * c->n_layer, n = 0;
    WSpec *w = check_malloc(sizeof(WSpec) * (size_t)cap, "tensor list");
#define ADD(r, cc, k_, ...) (snprintf(w[n].name, sizeof w[n].name, __VA_ARGS__), w[n].rows = r, w[n].cols = cc, w[n].kind = k_, n++)
    int64_t h = c->hidden, e = c->embed_dim;
    ADD(c->vocab, e, W_EMBED, "%sembed_tokens.weight", prefix);
    ADD(c->max_pos + 2, h, W_POS, "%sembed_positions.weight", prefix);
    if (c->final_ln) { ADD(0, h, W_LNW, "%sfinal_layer_norm.weight", prefix); ADD(0, h, W_BIAS, "%sfinal_layer_norm.bias", prefix); }
    if (e != h) { ADD(e, h, W_LINEAR, "%sproject_out.weight", prefix); ADD(h, e, W_LINEAR, "%sproject_in.weight", prefix); }
    static const char *const attn[] = {"k_proj", "v_proj", "q_proj", "out_proj"};
    for (int l = 0; l < c->n_layer; l++) {
        for (int i = 0; i < 4; i++) {
            ADD(h, h, W_LINEAR, "%slayers.%d.self_attn.%s.weight", prefix, l, attn[i]);
            w[n - 1].ln_feed = attn[i][0] != 'o' && c->pre_ln;
            if (c->bias) ADD(0, h, W_BIAS, "%slayers.%d.self_attn.%s.bias", prefix, l, attn[i]);
        }
        ADD(0, h, W_LNW, "%slayers.%d.self_attn_layer_norm.weight", prefix, l);
        w[n - 1].ln_feed = c->pre_ln;
        ADD(0, h, W_BIAS, "%slayers.%d.self_attn_layer_norm.bias", prefix, l);
        ADD(c->ffn, h, W_LINEAR, "%slayers.%d.fc1.weight", prefix, l);
        w[n - 1].ln_feed = c->pre_ln;
        if (c->bias) ADD(0, c->ffn, W_BIAS, "%slayers.%d.fc1.bias", prefix, l);
        ADD(h, c->ffn, W_LINEAR, "%slayers.%d.fc2.weight", prefix, l);
        if (c->bias) ADD(0, h, W_BIAS, "%slayers.%d.fc2.bias", prefix, l);
        ADD(0, h, W_LNW, "%slayers.%d.final_layer_norm.weight", prefix, l);
        w[n - 1].ln_feed = c->pre_ln;
        ADD(0, h, W_BIAS, "%slayers.%d.final_layer_norm.bias", prefix, l);
    }
    if (!tie) ADD(c->vocab, e, W_EMBED, "lm_head.weight");
#undef ADD
    *out = w;
    return n;
}

static inline uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Approximately N(0, 1): Irwin-Hall of four 16-bit uniforms. Cheap enough to
 * fill a 175B-parameter dummy model; the tails are irrelevant for tests. */
static inline float gauss16(uint64_t r) {
    float s = (float)(r & 0xFFFF) + (float)(r >> 16 & 0xFFFF) + (float)(r >> 32 & 0xFFFF) + (float)(r >> 48);
    return (s / 65536.0f - 2.0f) * 1.7320508f;
}

/* Fills n values of tensor `idx`'s elements [start, start+n) into out (as dt).
 * With outliers, a few channels of every LayerNorm that feeds q/k/v or fc1
 * are scaled up 50-100x and the matching input columns of those linears
 * scaled down as much: the same function in exact arithmetic, but with the
 * activation outliers real OPT models above 6.7B have. */
static void synth_fill(void *out, DType dt, const WSpec *w, const SynthOpts *o, int idx, int64_t start, int64_t n) {
    uint64_t seed = o->seed;
    float sd = 0, mean = 0;
    switch (w->kind) {
    case W_LINEAR: sd = 1.0f / sqrtf((float)w->cols); break;
    case W_EMBED: sd = 0.1f; break;
    case W_POS: sd = 0.1f; break;
    case W_LNW: sd = 0.1f; mean = 1; break;
    case W_BIAS: sd = 0.02f; break;
    }
    uint64_t base = seed * 0x100000001B3ull ^ (uint64_t)idx * 0x9E3779B97F4A7C15ull;
    for (int64_t i = 0; i < n; i++) {
        uint64_t s = base + (uint64_t)(start + i) * 0xD1B54A32D192ED03ull;
        float v = mean + sd * gauss16(splitmix64(&s));
        if (w->ln_feed && o->n_out) {
            int64_t ch = (start + i) % w->cols;
            for (int k = 0; k < o->n_out; k++)
                if (ch == o->out_ch[k]) v = w->kind == W_LNW ? v * o->out_f[k] : v / o->out_f[k];
        }
        if (dt == DT_F32) ((float *)out)[i] = v;
        else ((uint16_t *)out)[i] = dt == DT_F16 ? f32_to_f16(v) : f32_to_bf16(v);
    }
}

/* --- dummy models (-m dummy:SHAPE): the synth generators, used in place --- */

typedef struct { WSpec *w; int n; } DummySpecs;

static void *dummy_specs(const Config *c) {
    DummySpecs *d = check_malloc(sizeof *d, "dummy model");
    d->n = wspec_list(c, "", true, &d->w);
    return d;
}

static int dummy_find(const Model *m, const char *key) {
    const DummySpecs *d = m->dummy;
    for (int i = 0; i < d->n; i++) if (!strcmp(d->w[i].name, key)) return i;
    die("internal: dummy tensor %s", key);
}

void dummy_rows(const Model *m, const Tensor *t, int64_t r0, int64_t n, void *out) {
    const DummySpecs *d = m->dummy;
    check(d && t->gen > 0 && t->gen <= d->n, "not a dummy tensor");
    SynthOpts so = {.seed = m->dummy_seed};
    const WSpec *w = &d->w[t->gen - 1];
    int64_t cols = t->cols, chunk = 1 << 16;
    #pragma omp parallel for schedule(dynamic, 1) if (n * cols > chunk)
    for (int64_t e0 = 0; e0 < n * cols; e0 += chunk) {
        int64_t k = n * cols - e0 < chunk ? n * cols - e0 : chunk;
        synth_fill((uint16_t *)out + e0, DT_F16, w, &so, t->gen - 1, r0 * cols + e0, k);
    }
}

/* A dummy model run without a policy: every matrix made in RAM now. */
void model_materialize(Model *m) {
    if (!m->dummy) return;
    Tensor *mats[8 + 6 * 1024];
    int n = 0;
    bool tied = m->embed.rows && m->lm_head.gen == m->embed.gen; /* a last pipeline stage's lm_head is its own */
    mats[n++] = &m->embed;
    mats[n++] = &m->pos;
    if (!tied) mats[n++] = &m->lm_head;
    for (int l = 0; l < m->cfg.n_layer; l++) {
        Layer *L = &m->layers[l];
        Tensor *lm[] = {&L->q, &L->k, &L->v, &L->o, &L->fc1, &L->fc2};
        for (int i = 0; i < 6; i++) mats[n++] = lm[i];
    }
    if (m->cfg.embed_dim != m->cfg.hidden) { mats[n++] = &m->proj_in; mats[n++] = &m->proj_out; }
    double need = 0;
    for (int i = 0; i < n; i++) need += mats[i]->gen ? 2.0 * (double)mats[i]->rows * (double)mats[i]->cols : 0; /* 4-bit ones are made */
    if (need > mem_usable())
        die("%s needs %.1f GiB of RAM for its weights, %.1f GiB are available; give a policy with a disk share, e.g. --percent 0 50 0 100 0 100",
            m->cfg.name, need / (1 << 30), mem_usable() / (1 << 30));
    for (int i = 0; i < n; i++) {
        if (!mats[i]->gen) continue;
        void *p = model_own(m, 2 * (size_t)mats[i]->rows * (size_t)mats[i]->cols, "dummy weights");
        dummy_rows(m, mats[i], 0, mats[i]->rows, p);
        mats[i]->data = p;
        mats[i]->gen = 0;
    }
    if (tied) m->lm_head = m->embed;
}

static void write_all(FILE *f, const void *p, size_t n, const char *path) {
    if (n && fwrite(p, 1, n, f) != n) die("%s: write failed: %s", path, strerror(errno));
}

/* Output files are written as PATH.partial and renamed when complete; a
 * temporary file until then, so an interrupted write leaves nothing that looks
 * finished. One at a time. */
static char g_partial[4096]; /* the file being written */
static int g_partial_slot = -1; /* its temporary-file slot */

static FILE *file_create(const char *path) {
    snprintf(g_partial, sizeof g_partial, "%s.partial", path);
    FILE *f = fopen(g_partial, "wb");
    if (!f) die("%s: %s", path, strerror(errno));
    g_partial_slot = tmp_add(g_partial, 0);
    return f;
}

static void file_commit(FILE *f, const char *path) {
    if (fflush(f) != 0 || fsync(fileno(f)) != 0 || fclose(f) != 0) die("%s: write failed: %s", path, strerror(errno));
    if (rename(g_partial, path) != 0) die("%s: %s", path, strerror(errno));
    tmp_keep(g_partial_slot);
    g_partial_slot = -1;
}

/* Streams tensor idx's bytes to f in chunks generated in parallel. */
static uint32_t crc32_update(uint32_t crc, const void *p, size_t n);
static void synth_write_tensor(FILE *f, const WSpec *w, DType dt, const SynthOpts *o, int idx, const char *path, uint32_t *crc) {
    int64_t numel = (w->rows ? w->rows : 1) * w->cols, chunk = 1 << 20;
    int nt = omp_get_max_threads();
    size_t esz = dtype_bytes(dt, 1);
    char *buf = check_malloc((size_t)chunk * esz * (size_t)nt, "synthesis buffer");
    for (int64_t s0 = 0; s0 < numel; s0 += chunk * nt) {
        #pragma omp parallel for
        for (int t = 0; t < nt; t++) {
            int64_t a = s0 + (int64_t)t * chunk, b = a + chunk < numel ? a + chunk : numel;
            if (a < b) synth_fill(buf + (size_t)t * chunk * esz, dt, w, o, idx, a, b - a);
        }
        size_t bytes = (size_t)((s0 + chunk * nt < numel ? chunk * nt : numel - s0)) * esz;
        if (crc) *crc = crc32_update(*crc, buf, bytes);
        write_all(f, buf, bytes, path);
    }
    free(buf);
}

static const char *dtype_st_name(DType dt) { return dt == DT_F32 ? "F32" : dt == DT_F16 ? "F16" : dt == DT_BF16 ? "BF16" : dt == DT_Q4 ? "U8" : "I8"; }

static void synth_safetensors(const char *path, const WSpec *w, int n, DType dt, const SynthOpts *o, int first) {
    size_t cap = 256 + (size_t)n * 160, len = 0, off = 0;
    char *hdr = check_malloc(cap, "safetensors header");
    len += (size_t)snprintf(hdr + len, cap - len, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (int i = 0; i < n; i++) {
        size_t bytes = dtype_bytes(dt, (w[i].rows ? w[i].rows : 1) * w[i].cols);
        if (w[i].rows) len += (size_t)snprintf(hdr + len, cap - len, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[%lld,%lld],\"data_offsets\":[%zu,%zu]}", w[i].name, dtype_st_name(dt), (long long)w[i].rows, (long long)w[i].cols, off, off + bytes);
        else len += (size_t)snprintf(hdr + len, cap - len, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[%lld],\"data_offsets\":[%zu,%zu]}", w[i].name, dtype_st_name(dt), (long long)w[i].cols, off, off + bytes);
        off += bytes;
    }
    len += (size_t)snprintf(hdr + len, cap - len, "}");
    while (len % 8) hdr[len++] = ' '; /* the data starts 8-aligned, as the reference writer does */
    FILE *f = file_create(path);
    uint64_t hl = len;
    write_all(f, &hl, 8, path);
    write_all(f, hdr, len, path);
    for (int i = 0; i < n; i++) synth_write_tensor(f, &w[i], dt, o, first + i, path, NULL);
    file_commit(f, path);
    free(hdr);
}

/* --- torch.save's format: a zip (stored entries, 64-byte aligned data) of
 * data.pkl, a protocol-2 pickle of an OrderedDict of _rebuild_tensor_v2 calls
 * whose storages are persistent ids, plus one entry per storage --- */

static uint32_t crc_table[8][256];
static uint32_t crc32_update(uint32_t crc, const void *p, size_t n) {
    if (!crc_table[0][1]) {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            crc_table[0][i] = c;
        }
        for (int t = 1; t < 8; t++)
            for (int i = 0; i < 256; i++) crc_table[t][i] = crc_table[t - 1][i] >> 8 ^ crc_table[0][crc_table[t - 1][i] & 255];
    }
    const uint8_t *b = p;
    crc = ~crc;
    for (; n >= 8; n -= 8, b += 8) { /* slicing by 8 */
        uint32_t lo = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
        lo ^= crc;
        crc = crc_table[7][lo & 255] ^ crc_table[6][lo >> 8 & 255] ^ crc_table[5][lo >> 16 & 255] ^ crc_table[4][lo >> 24] ^
              crc_table[3][b[4]] ^ crc_table[2][b[5]] ^ crc_table[1][b[6]] ^ crc_table[0][b[7]];
    }
    while (n--) crc = crc_table[0][(crc ^ *b++) & 255] ^ crc >> 8;
    return ~crc;
}

typedef struct { char name[128]; uint64_t off, size; uint32_t crc; } ZipOut;

typedef struct { char *p; size_t n, cap; } Buf;
static void buf_put(Buf *b, const void *p, size_t n) {
    if (b->n + n > b->cap) b->p = check_realloc(b->p, b->cap = (b->n + n) * 2 + 256, "buffer");
    memcpy(b->p + b->n, p, n);
    b->n += n;
}
static void buf_u8(Buf *b, unsigned v) { uint8_t c = (uint8_t)v; buf_put(b, &c, 1); }
static void buf_u16(Buf *b, unsigned v) { buf_u8(b, v & 255); buf_u8(b, v >> 8 & 255); }
static void buf_u32(Buf *b, uint32_t v) { buf_u16(b, v & 0xFFFF); buf_u16(b, v >> 16); }
static void buf_u64(Buf *b, uint64_t v) { buf_u32(b, (uint32_t)v); buf_u32(b, (uint32_t)(v >> 32)); }
static void pk_str(Buf *b, const char *s) { buf_u8(b, 'X'); buf_u32(b, (uint32_t)strlen(s)); buf_put(b, s, strlen(s)); }
static void pk_int(Buf *b, int64_t v) {
    if (v >= 0 && v < 256) { buf_u8(b, 'K'); buf_u8(b, (unsigned)v); }
    else if (v >= INT32_MIN && v <= INT32_MAX) { buf_u8(b, 'J'); buf_u32(b, (uint32_t)v); }
    else { buf_u8(b, 0x8a); buf_u8(b, 8); buf_u64(b, (uint64_t)v); }
}
static void pk_global(Buf *b, const char *mod, const char *name) {
    buf_u8(b, 'c'); buf_put(b, mod, strlen(mod)); buf_u8(b, '\n'); buf_put(b, name, strlen(name)); buf_u8(b, '\n');
}

/* Starts an entry of known size: a local header with zip64 sizes and an
 * extra field padding the data to 64 bytes, as torch does. The CRC is patched
 * in by zip_end_entry once the data is written. */
static void zip_begin_entry(FILE *f, ZipOut *e, const char *path) {
    Buf b = {0};
    size_t nl = strlen(e->name);
    uint64_t pos = (uint64_t)ftello(f), base = pos + 30 + nl + 20 + 4, pad = (64 - base % 64) % 64;
    e->off = pos;
    buf_u32(&b, 0x04034b50); buf_u16(&b, 45); buf_u16(&b, 0); buf_u16(&b, 0); buf_u32(&b, 0);
    buf_u32(&b, 0); buf_u32(&b, 0xFFFFFFFF); buf_u32(&b, 0xFFFFFFFF);
    buf_u16(&b, (unsigned)nl); buf_u16(&b, (unsigned)(20 + 4 + pad));
    buf_put(&b, e->name, nl);
    buf_u16(&b, 1); buf_u16(&b, 16); buf_u64(&b, e->size); buf_u64(&b, e->size);
    buf_u16(&b, 0x4246); buf_u16(&b, (unsigned)pad); /* padding field */
    for (uint64_t i = 0; i < pad; i++) buf_u8(&b, 'Z');
    write_all(f, b.p, b.n, path);
    free(b.p);
}

static void zip_end_entry(FILE *f, const ZipOut *e, const char *path) {
    off_t end = ftello(f);
    uint8_t crc[4] = {(uint8_t)e->crc, (uint8_t)(e->crc >> 8), (uint8_t)(e->crc >> 16), (uint8_t)(e->crc >> 24)};
    if (fseeko(f, (off_t)e->off + 14, SEEK_SET) || fwrite(crc, 1, 4, f) != 4 || fseeko(f, end, SEEK_SET))
        die("%s: write failed: %s", path, strerror(errno));
}

static void zip_entry(FILE *f, ZipOut *e, const void *data, size_t n, const char *path) {
    e->size = n;
    e->crc = crc32_update(0, data, n);
    zip_begin_entry(f, e, path);
    write_all(f, data, n, path);
    zip_end_entry(f, e, path);
}

static void zip_finish(FILE *f, const ZipOut *e, int n, const char *path) {
    Buf b = {0};
    uint64_t cd = (uint64_t)ftello(f);
    for (int i = 0; i < n; i++) {
        size_t nl = strlen(e[i].name);
        buf_u32(&b, 0x02014b50); buf_u16(&b, 45); buf_u16(&b, 45); buf_u16(&b, 0); buf_u16(&b, 0);
        buf_u32(&b, 0); buf_u32(&b, e[i].crc); buf_u32(&b, 0xFFFFFFFF); buf_u32(&b, 0xFFFFFFFF);
        buf_u16(&b, (unsigned)nl); buf_u16(&b, 28); buf_u16(&b, 0); buf_u16(&b, 0); buf_u16(&b, 0); buf_u32(&b, 0);
        buf_u32(&b, 0xFFFFFFFF);
        buf_put(&b, e[i].name, nl);
        buf_u16(&b, 1); buf_u16(&b, 24); buf_u64(&b, e[i].size); buf_u64(&b, e[i].size); buf_u64(&b, e[i].off);
    }
    uint64_t cdsize = b.n, z64 = cd + cdsize;
    buf_u32(&b, 0x06064b50); buf_u64(&b, 44); buf_u16(&b, 45); buf_u16(&b, 45); buf_u32(&b, 0); buf_u32(&b, 0);
    buf_u64(&b, (uint64_t)n); buf_u64(&b, (uint64_t)n); buf_u64(&b, cdsize); buf_u64(&b, cd);
    buf_u32(&b, 0x07064b50); buf_u32(&b, 0); buf_u64(&b, z64); buf_u32(&b, 1);
    buf_u32(&b, 0x06054b50); buf_u16(&b, 0); buf_u16(&b, 0); buf_u16(&b, 0xFFFF); buf_u16(&b, 0xFFFF);
    buf_u32(&b, 0xFFFFFFFF); buf_u32(&b, 0xFFFFFFFF); buf_u16(&b, 0);
    write_all(f, b.p, b.n, path);
    free(b.p);
}

static void synth_bin(const char *path, const WSpec *w, int n, DType dt, const SynthOpts *o, int first) {
    FILE *f = file_create(path);
    const char *stype = dt == DT_F32 ? "FloatStorage" : dt == DT_F16 ? "HalfStorage" : "BFloat16Storage";
    Buf pk = {0};
    buf_u8(&pk, 0x80); buf_u8(&pk, 2);
    pk_global(&pk, "collections", "OrderedDict");
    buf_u8(&pk, ')'); buf_u8(&pk, 'R'); buf_u8(&pk, '(');
    for (int i = 0; i < n; i++) {
        char key[16];
        snprintf(key, sizeof key, "%d", i);
        int64_t numel = (w[i].rows ? w[i].rows : 1) * w[i].cols;
        pk_str(&pk, w[i].name);
        pk_global(&pk, "torch._utils", "_rebuild_tensor_v2");
        buf_u8(&pk, '(');
        buf_u8(&pk, '('); pk_str(&pk, "storage"); pk_global(&pk, "torch", stype); pk_str(&pk, key); pk_str(&pk, "cpu"); pk_int(&pk, numel); buf_u8(&pk, 't');
        buf_u8(&pk, 'Q');
        pk_int(&pk, 0);
        buf_u8(&pk, '(');
        if (w[i].rows) pk_int(&pk, w[i].rows);
        pk_int(&pk, w[i].cols);
        buf_u8(&pk, 't');
        buf_u8(&pk, '(');
        if (w[i].rows) pk_int(&pk, w[i].cols);
        pk_int(&pk, 1);
        buf_u8(&pk, 't');
        buf_u8(&pk, 0x89);
        pk_global(&pk, "collections", "OrderedDict"); buf_u8(&pk, ')'); buf_u8(&pk, 'R');
        buf_u8(&pk, 't'); buf_u8(&pk, 'R');
    }
    buf_u8(&pk, 'u'); buf_u8(&pk, '.');
    ZipOut *e = check_calloc(sizeof(ZipOut) * (size_t)(n + 3), "zip entries");
    int ne = 0;
    snprintf(e[ne].name, sizeof e[ne].name, "archive/data.pkl");
    zip_entry(f, &e[ne++], pk.p, pk.n, path);
    snprintf(e[ne].name, sizeof e[ne].name, "archive/byteorder");
    zip_entry(f, &e[ne++], "little", 6, path);
    for (int i = 0; i < n; i++, ne++) {
        snprintf(e[ne].name, sizeof e[ne].name, "archive/data/%d", i);
        e[ne].size = dtype_bytes(dt, (w[i].rows ? w[i].rows : 1) * w[i].cols);
        zip_begin_entry(f, &e[ne], path);
        synth_write_tensor(f, &w[i], dt, o, first + i, path, &e[ne].crc);
        zip_end_entry(f, &e[ne], path);
    }
    snprintf(e[ne].name, sizeof e[ne].name, "archive/version");
    zip_entry(f, &e[ne++], "3\n", 2, path);
    zip_finish(f, e, ne, path);
    file_commit(f, path);
    free(e);
    free(pk.p);
}

static void write_text(const char *path, const char *text, size_t n) {
    FILE *f = file_create(path);
    write_all(f, text, n, path);
    file_commit(f, path);
}

/* config.json as Hugging Face writes it for OPT (sorted keys, indent 2). */
static int config_json(const Config *c, DType dt, int tied, char *buf, size_t cap) {
    char name[64];
    size_t k = 0;
    for (const char *p = c->name; *p && k + 1 < sizeof name; p++) if (*p != '"' && *p != '\\' && (unsigned char)*p >= 0x20) name[k++] = *p;
    name[k] = 0;
    return snprintf(buf, cap,
        "{\n  \"_name_or_path\": \"%s\",\n  \"_remove_final_layer_norm\": %s,\n  \"activation_dropout\": 0.0,\n"
        "  \"activation_function\": \"relu\",\n  \"architectures\": [\n    \"OPTForCausalLM\"\n  ],\n  \"attention_dropout\": 0.0,\n"
        "  \"bos_token_id\": 2,\n  \"do_layer_norm_before\": %s,\n  \"dropout\": 0.1,\n  \"enable_bias\": %s,\n  \"eos_token_id\": %d,\n"
        "  \"ffn_dim\": %d,\n  \"hidden_size\": %d,\n  \"init_std\": 0.02,\n  \"layer_norm_elementwise_affine\": %s,\n  \"layerdrop\": 0.0,\n"
        "  \"max_position_embeddings\": %d,\n  \"model_type\": \"opt\",\n  \"num_attention_heads\": %d,\n  \"num_hidden_layers\": %d,\n"
        "  \"pad_token_id\": %d,\n  \"prefix\": \"</s>\",\n  \"tie_word_embeddings\": %s,\n  \"torch_dtype\": \"%s\",\n"
        "  \"transformers_version\": \"4.36.2\",\n  \"use_cache\": true,\n  \"vocab_size\": %d,\n  \"word_embed_proj_dim\": %d\n}\n",
        name, c->pre_ln && !c->final_ln ? "true" : "false", c->pre_ln ? "true" : "false", c->bias ? "true" : "false", c->eos, c->ffn, c->hidden,
        c->ln_affine ? "true" : "false", c->max_pos, c->n_head, c->n_layer, c->pad, tied ? "true" : "false",
        dt == DT_F32 ? "float32" : dt == DT_BF16 ? "bfloat16" : "float16", c->vocab, c->embed_dim);
}

static void config_write(const Config *c, const char *path, DType dt, int tied) {
    char buf[2048];
    int n = config_json(c, dt, tied, buf, sizeof buf);
    write_text(path, buf, (size_t)n);
}


/* 1 when path is a directory with nothing in it. */
static int dir_empty(const char *path) {
    DIR *d = opendir(path);
    if (!d) return 0;
    struct dirent *e;
    int n = 0;
    while ((e = readdir(d))) n += strcmp(e->d_name, ".") && strcmp(e->d_name, "..");
    closedir(d);
    return n == 0;
}

/* The checkpoint goes into DIR.tmp-PID, renamed to DIR when complete (over an
 * empty directory, never a full one), so that an interrupted synth leaves no
 * directory that a later run would take for a checkpoint. */
void synth_write(const Config *c, const SynthOpts *o) {
    struct stat st;
    if (!stat(o->out, &st) && !dir_empty(o->out)) die("%s: already exists; opt synth writes a new directory (or fills an empty one)", o->out);
    char out[4096];
    if (snprintf(out, sizeof out, "%s.tmp-%d", o->out, (int)getpid()) >= (int)sizeof out) die("%s: path too long", o->out);
    if (mkdir(out, 0777) != 0) die("%s: %s", out, strerror(errno));
    int slot = tmp_add(out, 1);
    WSpec *w;
    int n = wspec_list(c, o->prefix, o->tie, &w);
    char *p = path_join(out, "config.json");
    config_write(c, p, o->dtype, o->tie);
    free(p);
    static const char gen[] = "{\n  \"_from_model_config\": true,\n  \"bos_token_id\": 2,\n  \"eos_token_id\": 2,\n  \"pad_token_id\": 1,\n  \"transformers_version\": \"4.27.0.dev0\"\n}\n";
    static const char stm[] = "{\"bos_token\": \"</s>\", \"eos_token\": \"</s>\", \"unk_token\": \"</s>\", \"pad_token\": \"<pad>\"}";
    static const char tcfg[] = "{\"errors\": \"replace\", \"unk_token\": \"</s>\", \"bos_token\": \"</s>\", \"eos_token\": \"</s>\", \"pad_token\": \"<pad>\", \"add_prefix_space\": false, \"add_bos_token\": true, \"tokenizer_class\": \"GPT2Tokenizer\"}";
    struct { const char *name; const char *data; size_t n; } files[] = {
        {"generation_config.json", gen, sizeof gen - 1}, {"special_tokens_map.json", stm, sizeof stm - 1}, {"tokenizer_config.json", tcfg, sizeof tcfg - 1},
        {"vocab.json", opt_vocab_json, (size_t)(opt_vocab_json_end - opt_vocab_json)}, {"merges.txt", opt_merges_txt, (size_t)(opt_merges_txt_end - opt_merges_txt)}};
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        p = path_join(out, files[i].name);
        write_text(p, files[i].data, files[i].n);
        free(p);
    }
    int shards = o->shards < 1 ? 1 : o->shards > n ? n : o->shards;
    size_t total = 0;
    for (int i = 0; i < n; i++) total += dtype_bytes(o->dtype, (w[i].rows ? w[i].rows : 1) * w[i].cols);
    Buf idx = {0};
    char line[256];
    int first = 0;
    size_t done = 0;
    for (int s = 0; s < shards; s++) {
        int last = first;
        if (s == shards - 1) last = n;
        else { /* fill to an equal share of the bytes, at least one tensor, leaving one per later shard */
            size_t target = total * (size_t)(s + 1) / (size_t)shards;
            do done += dtype_bytes(o->dtype, (w[last].rows ? w[last].rows : 1) * w[last].cols), last++;
            while (last < n - (shards - 1 - s) && done < target);
        }
        char name[64];
        if (shards == 1) snprintf(name, sizeof name, o->bin ? "pytorch_model.bin" : "model.safetensors");
        else snprintf(name, sizeof name, o->bin ? "pytorch_model-%05d-of-%05d.bin" : "model-%05d-of-%05d.safetensors", s + 1, shards);
        p = path_join(out, name);
        if (o->bin) synth_bin(p, w + first, last - first, o->dtype, o, first);
        else synth_safetensors(p, w + first, last - first, o->dtype, o, first);
        free(p);
        for (int i = first; i < last; i++) {
            int l = snprintf(line, sizeof line, "%s    \"%s\": \"%s\"", idx.n ? ",\n" : "", w[i].name, name);
            buf_put(&idx, line, (size_t)l);
        }
        first = last;
    }
    if (shards > 1) {
        p = path_join(out, o->bin ? "pytorch_model.bin.index.json" : "model.safetensors.index.json");
        FILE *f = file_create(p);
        fprintf(f, "{\n  \"metadata\": {\n    \"total_size\": %zu\n  },\n  \"weight_map\": {\n", total);
        write_all(f, idx.p, idx.n, p);
        fprintf(f, "\n  }\n}\n");
        file_commit(f, p);
        free(p);
    }
    free(idx.p);
    free(w);
    if (rename(out, o->out) != 0) die("%s: %s", o->out, strerror(errno));
    tmp_keep(slot);
}

/* ----------------------------------------------------------------------------
 * Native files (`opt convert`): one safetensors container holding our tensor
 * names ("layers.3.fc1.weight"), the config in the header's metadata
 * ("opt.config"), and each compressed tensor's format ("opt.formats"). -m
 * takes the file, and the disk tier maps it like any checkpoint. */

static void buf_str(Buf *b, const char *s) { buf_put(b, s, strlen(s)); }

static void buf_json_str(Buf *b, const char *s, size_t n) { /* a JSON string literal */
    buf_put(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        char e[8];
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') { e[0] = '\\'; e[1] = (char)c; buf_put(b, e, 2); }
        else if (c < 0x20) { snprintf(e, sizeof e, "\\u%04x", c); buf_put(b, e, 6); }
        else buf_put(b, s + i, 1);
    }
    buf_put(b, "\"", 1);
}

typedef struct {
    char name[128];        /* our tensor name */
    const Tensor *mat;     /* a matrix, or NULL */
    const float *vec;      /* a 1-D f32 tensor, or NULL */
    int64_t n;             /* vec length */
    int q4;                /* write mat as 4 bits with this group (0: as stored) */
} NativeT;

static size_t native_bytes(const NativeT *t, const char **dtype, int64_t shape[2]) {
    if (t->vec) { *dtype = "F32"; shape[0] = t->n; shape[1] = 0; return sizeof(float) * (size_t)t->n; }
    int g = t->q4 ? t->q4 : t->mat->dtype == DT_Q4 ? t->mat->group : 0;
    shape[0] = t->mat->rows;
    if (g) { *dtype = "U8"; shape[1] = (int64_t)q4_row_bytes(t->mat->cols, g); return (size_t)shape[0] * (size_t)shape[1]; }
    *dtype = dtype_st_name(t->mat->dtype);
    shape[1] = t->mat->cols;
    return dtype_bytes(t->mat->dtype, shape[0] * shape[1]);
}

static void nt_vec(NativeT *t, int *n, const float *v, int64_t len, const char *name) {
    if (!v) return;
    snprintf(t[*n].name, sizeof t[*n].name, "%s", name);
    t[*n].vec = v;
    t[(*n)++].n = len;
}

/* A matrix (4-bit when group > 0 unless already compressed); int8 ones bring their scales. */
static void nt_mat(NativeT *t, int *n, const Tensor *w, int group, const char *name) {
    snprintf(t[*n].name, sizeof t[*n].name, "%s", name);
    t[*n].mat = w;
    t[(*n)++].q4 = w->dtype == DT_I8 || w->dtype == DT_Q4 ? 0 : group;
    if (w->dtype == DT_I8) {
        char sn[112];
        snprintf(sn, sizeof sn, "%s.scale", name);
        nt_vec(t, n, w->scale, w->rows, sn);
    }
}

/* Writes the model's tensors; matrices to 4 bits when group > 0. */
void native_write(const Model *m, const char *path, int group) {
    const Config *c = &m->cfg;
    NativeT *t = check_calloc(sizeof(NativeT) * (size_t)(16 + 24 * c->n_layer + m->n_extra), "tensor list");
    int n = 0;
    char nm[96];
    nt_mat(t, &n, &m->embed, group, "embed_tokens.weight");
    nt_mat(t, &n, &m->pos, 0, "embed_positions.weight"); /* kept as stored */
    if (m->proj_in.data) { nt_mat(t, &n, &m->proj_in, group, "project_in.weight"); nt_mat(t, &n, &m->proj_out, group, "project_out.weight"); }
    nt_vec(t, &n, m->lnfw, c->hidden, "final_layer_norm.weight");
    nt_vec(t, &n, m->lnfb, c->hidden, "final_layer_norm.bias");
    if (m->lm_head.data != m->embed.data) nt_mat(t, &n, &m->lm_head, group, "lm_head.weight");
    static const char *const names[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"};
    for (int l = 0; l < c->n_layer; l++) {
        const Layer *L = &m->layers[l];
        const Tensor *mats[] = {&L->q, &L->k, &L->v, &L->o, &L->fc1, &L->fc2};
        const float *bias[] = {L->qb, L->kb, L->vb, L->ob, L->fc1b, L->fc2b};
        for (int i = 0; i < 6; i++) {
            snprintf(nm, sizeof nm, "layers.%d.%s.weight", l, names[i]);
            nt_mat(t, &n, mats[i], group, nm);
            snprintf(nm, sizeof nm, "layers.%d.%s.bias", l, names[i]);
            nt_vec(t, &n, bias[i], i == 4 ? c->ffn : c->hidden, nm);
        }
        const float *ln[] = {L->ln1w, L->ln1b, L->ln2w, L->ln2b};
        static const char *const lnn[] = {"self_attn_layer_norm.weight", "self_attn_layer_norm.bias", "final_layer_norm.weight", "final_layer_norm.bias"};
        for (int i = 0; i < 4; i++) {
            snprintf(nm, sizeof nm, "layers.%d.%s", l, lnn[i]);
            nt_vec(t, &n, ln[i], c->hidden, nm);
        }
    }
    for (int i = 0; i < m->n_extra; i++) nt_vec(t, &n, m->extra[i].data, m->extra[i].n, m->extra[i].name);
    Buf fm = {0}, h = {0};
    buf_str(&fm, "{");
    for (int i = 0; i < n; i++) {
        char e[200];
        if (t[i].mat && t[i].mat->dtype == DT_I8) {
            snprintf(e, sizeof e, "%s\"%s\": {\"format\": \"i8\", \"act_scale\": %.9g}", fm.n > 1 ? ", " : "", t[i].name, t[i].mat->act_scale);
            buf_str(&fm, e);
            continue;
        }
        int g = t[i].mat ? (t[i].q4 ? t[i].q4 : t[i].mat->dtype == DT_Q4 ? t[i].mat->group : 0) : 0;
        if (!g) continue;
        snprintf(e, sizeof e, "%s\"%s\": {\"format\": \"q4\", \"group\": %d, \"cols\": %lld}", fm.n > 1 ? ", " : "", t[i].name, g, (long long)t[i].mat->cols);
        buf_str(&fm, e);
    }
    buf_str(&fm, "}");
    char cfg[2048];
    int cl = config_json(c, m->embed.dtype == DT_Q4 ? DT_F16 : m->embed.dtype, m->lm_head.data == m->embed.data, cfg, sizeof cfg);
    buf_str(&h, "{\"__metadata__\": {\"format\": \"opt\", \"opt.version\": \"1\", \"opt.config\": ");
    buf_json_str(&h, cfg, (size_t)cl);
    buf_str(&h, ", \"opt.formats\": ");
    buf_json_str(&h, fm.p, fm.n);
    buf_str(&h, "}");
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        const char *dt;
        int64_t sh[2];
        size_t bytes = native_bytes(&t[i], &dt, sh);
        char e[256];
        if (t[i].vec) snprintf(e, sizeof e, ", \"%s\": {\"dtype\": \"%s\", \"shape\": [%lld], \"data_offsets\": [%zu, %zu]}", t[i].name, dt, (long long)sh[0], off, off + bytes);
        else snprintf(e, sizeof e, ", \"%s\": {\"dtype\": \"%s\", \"shape\": [%lld, %lld], \"data_offsets\": [%zu, %zu]}", t[i].name, dt, (long long)sh[0], (long long)sh[1], off, off + bytes);
        buf_str(&h, e);
        off += bytes;
    }
    buf_str(&h, "}");
    while (h.n % 8) buf_put(&h, " ", 1);
    FILE *f = file_create(path);
    uint64_t hl = h.n;
    write_all(f, &hl, 8, path);
    write_all(f, h.p, h.n, path);
    for (int i = 0; i < n; i++) {
        const char *dt;
        int64_t sh[2];
        size_t bytes = native_bytes(&t[i], &dt, sh);
        if (t[i].vec) { write_all(f, t[i].vec, bytes, path); continue; }
        const Tensor *w = t[i].mat;
        if (!t[i].q4 || w->dtype == DT_Q4) { write_all(f, w->data, bytes, path); continue; }
        size_t rb = (size_t)sh[1];
        int64_t chunk = 256;
        uint8_t *q = check_malloc(rb * (size_t)chunk, "4-bit rows");
        for (int64_t r0 = 0; r0 < w->rows; r0 += chunk) {
            int64_t r1 = r0 + chunk < w->rows ? r0 + chunk : w->rows;
            #pragma omp parallel
            {
                float *row = check_malloc(sizeof(float) * (size_t)w->cols, "a row");
                #pragma omp for
                for (int64_t r = r0; r < r1; r++) {
                    tensor_row_f32(w, r, row);
                    q4_quantize_row(q + rb * (size_t)(r - r0), row, w->cols, t[i].q4, w->name);
                }
                free(row);
            }
            write_all(f, q, rb * (size_t)(r1 - r0), path);
        }
        free(q);
    }
    file_commit(f, path);
    free(t); free(fm.p); free(h.p);
}

/* ----------------------------------------------------------------------------
 * Tokenizer: byte-level BPE, identical to Hugging Face's GPT2Tokenizer for OPT. */

#include "unicode_tab.h"


/* ----------------------------------------------------------------------------
 * Tokenizer: Hugging Face's GPT2Tokenizer as OPT uses it, byte for byte.
 *
 * Encoding runs in three steps, as in HF:
 *  1. The special tokens "</s>" and "<pad>" are cut out of the text wherever
 *     they occur (the added tokens of OPT's tokenizer.json; "<s>", "<unk>" and
 *     "<mask>" are plain text there). Spaces around them stay with the
 *     neighbouring text: "a </s> b" is "a", " ", </s>, " b".
 *  2. The rest is split into pre-tokens by GPT-2's pattern
 *       's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *     matched by hand (tok_pretoken_end) with the classes of unicode_tab.h.
 *  3. Each pre-token's bytes are merged by byte-level BPE: every byte starts
 *     as its own token and the adjacent pair of lowest merges.txt rank merges
 *     first, the leftmost of equals first (tok_bpe).
 * Token strings in vocab.json spell bytes through GPT-2's bytes_to_unicode
 * (a space is "Ġ"); tok_piece gives the bytes back, so that the pieces of
 * encode(x) concatenate to x. */

enum { TC_OTHER, TC_LETTER, TC_NUMBER, TC_SPACE }; /* pre-tokenizer classes of a character */

typedef struct {
    uint32_t str;     /* offset of its vocab.json string (NUL-terminated) in strs; UINT32_MAX: no such id */
    uint32_t str_len; /* its length in bytes */
    uint32_t raw;     /* offset of the bytes it decodes to in Tokenizer.raws */
    uint32_t raw_len; /* their length */
} TokEntry;

typedef struct {
    uint64_t pair;    /* left id << 32 | right id */
    int rank;         /* position in merges.txt, lower merges first; -1 marks an empty slot */
    int id;           /* the merged token */
} TokMerge;

/* A direct-mapped cache of short words, because running text repeats its
 * words: "the" need not be merged again every time. */
#define TOK_CACHE_SLOTS 8192
#define TOK_CACHE_WORD 15 /* longest word cached, in bytes; it has at most as many ids */
typedef struct {
    uint8_t len;                   /* word length; 0 = empty slot */
    uint8_t n_ids;                 /* ids it encodes to */
    char word[TOK_CACHE_WORD];     /* the word's bytes */
    int ids[TOK_CACHE_WORD];       /* its ids */
} TokCacheSlot;

typedef struct {
    int id;           /* current token; -1 once merged into its left neighbour */
    int prev, next;   /* neighbours in the word, -1 at the ends */
} TokSym;

typedef struct {
    int pos;          /* left symbol of a candidate pair */
    int next;         /* next entry of the same rank's list, -1 at its end */
} TokLink;

typedef struct {      /* tok_bpe's working memory, kept between words */
    TokSym *sym;      /* (word_cap) symbols of the word being merged */
    int word_cap;     /* capacity of sym */
    TokLink *link;    /* (link_cap) entries of the per-rank candidate lists */
    int *order;       /* (link_cap) one rank's positions, sorted */
    int link_cap;     /* capacity of link and order */
    int n_link;       /* entries of link in use */
    int *first;       /* (n_ranks) head of each rank's list in link; -1 = empty, as between words */
    int *rank_heap;   /* (n_ranks) min-heap of the ranks whose lists are not empty */
    int n_heap;       /* ranks in rank_heap */
} TokWork;

struct Tokenizer {
    int n_vocab;              /* entries in vocab.json */
    int n_ids;                /* largest id + 1: the length of tok */
    TokEntry *tok;            /* (n_ids) indexed by id */
    char *strs;               /* vocab.json strings, back to back */
    char *raws;               /* decoded bytes of every token, back to back */
    int *vocab_slot;          /* (vocab_mask + 1) open addressing: id by string hash; -1 = empty */
    uint32_t vocab_mask;      /* table size - 1, a power of two minus one */
    TokMerge *merge_slot;     /* (merge_mask + 1) open addressing: merge by pair hash */
    uint32_t merge_mask;      /* table size - 1 */
    int byte_id[256];         /* the one-byte token of each byte */
    int special_id[2];        /* ids of "</s>" and "<pad>"; -1 when the vocab lacks one */
    uint8_t latin1[256];      /* TC_* of U+0000..U+00FF, spared the table search */
    int n_ranks;              /* merges.txt merge lines: ranks are 0 .. n_ranks - 1 */
    TokCacheSlot *cache;      /* (TOK_CACHE_SLOTS) filled by tok_encode */
    TokWork *work;            /* tok_bpe's working memory; it and the cache make tok_encode non-reentrant */
    Json *vocab_json;         /* vocab.json parsed, held while it loads so that tok_free frees it after a die() */
};

static const char *const tok_special[2] = {"</s>", "<pad>"};

/* ---- character classes and UTF-8 ---- */

static bool uni_in(const uint32_t (*tab)[2], int n, uint32_t cp) {
    int lo = 0, hi = n - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (cp < tab[mid][0]) hi = mid - 1;
        else if (cp > tab[mid][1]) lo = mid + 1;
        else return true;
    }
    return false;
}

static int tok_class_cp(uint32_t cp) {
#define UNI_N(tab) ((int)(sizeof tab / sizeof tab[0]))
    if (uni_in(uni_letter, UNI_N(uni_letter), cp)) return TC_LETTER;
    if (uni_in(uni_number, UNI_N(uni_number), cp)) return TC_NUMBER;
    if (uni_in(uni_space, UNI_N(uni_space), cp)) return TC_SPACE;
    return TC_OTHER;
#undef UNI_N
}

/* Class of the character at s[i]; *next gets the index after it. The text is
 * valid UTF-8 by contract; should it not be, a stray byte is one "other"
 * character and nothing is read past len, so encoding still round-trips. */
static int tok_class_at(const Tokenizer *t, const unsigned char *s, size_t len, size_t i, size_t *next) {
    unsigned c = s[i];
    if (c < 0x80) { *next = i + 1; return t->latin1[c]; }
    size_t n = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
    if (n > len - i) n = len - i;
    uint32_t cp = n == 1 ? 0xFFFD : c & (0x7F >> n);
    for (size_t k = 1; k < n; k++) cp = cp << 6 | (s[i + k] & 0x3F);
    *next = i + n;
    return cp < 256 ? t->latin1[cp] : tok_class_cp(cp);
}

size_t utf8_valid_prefix(const char *s, size_t len) {
    size_t i = 0;
    unsigned cp;
    for (int n; i < len && (n = utf8_len((const unsigned char *)s + i, len - i, &cp)) > 0;) i += (size_t)n;
    return i;
}

/* GPT-2's bytes_to_unicode: the printable bytes stand for themselves and the
 * other 68 (controls, space, U+007F..U+00A0, U+00AD) for U+0100 onwards, in
 * byte order, so that every token is printable text. */
static void tok_byte_chars(uint32_t cp[256]) {
    uint32_t n = 0;
    for (uint32_t b = 0; b < 256; b++) {
        bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        cp[b] = printable ? b : 256 + n++;
    }
}

/* ---- hash tables ---- */

/* FNV-1a, continued from h (2166136261 to start): a string hashes the same in two pieces */
static uint32_t tok_hash_more(uint32_t h, const char *s, size_t n) {
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

static uint32_t tok_hash_str(const char *s, size_t n) { return tok_hash_more(2166136261u, s, n); }

static uint32_t tok_hash_pair(uint64_t pair) {
    return (uint32_t)((pair * 0x9E3779B97F4A7C15ull) >> 32);
}

static uint32_t tok_table_size(size_t n) { /* a power of two at least twice n: short probe runs */
    uint32_t size = 16;
    while (size < 2 * n) size *= 2;
    return size;
}

/* The id of the string a then b, without joining them: a merge's halves. */
static int tok_lookup_cat(const Tokenizer *t, const char *a, size_t na, const char *b, size_t nb) {
    for (uint32_t h = tok_hash_more(tok_hash_str(a, na), b, nb) & t->vocab_mask;; h = (h + 1) & t->vocab_mask) {
        int id = t->vocab_slot[h];
        if (id < 0) return -1;
        const TokEntry *e = &t->tok[id];
        if (e->str_len == na + nb && !memcmp(t->strs + e->str, a, na) && !memcmp(t->strs + e->str + na, b, nb)) return id;
    }
}

static int tok_lookup_n(const Tokenizer *t, const char *s, size_t n) { return tok_lookup_cat(t, s, n, "", 0); }

static const TokMerge *tok_merge_find(const Tokenizer *t, int left, int right) {
    uint64_t pair = (uint64_t)left << 32 | (uint32_t)right;
    for (uint32_t h = tok_hash_pair(pair) & t->merge_mask;; h = (h + 1) & t->merge_mask) {
        const TokMerge *m = &t->merge_slot[h];
        if (m->rank < 0) return NULL;
        if (m->pair == pair) return m;
    }
}

/* ---- loading ---- */

/* A token as an error message shows it: on one line, at most 48 bytes, with
 * control bytes as \xNN. */
static const char *tok_shown(const char *s, size_t n, char buf[256]) {
    size_t o = 0;
    for (size_t i = 0; i < n && i < 48; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c == 0x7F) o += (size_t)snprintf(buf + o, 5, "\\x%02X", c);
        else buf[o++] = (char)c;
    }
    if (n > 48) { memcpy(buf + o, "...", 3); o += 3; }
    buf[o] = 0;
    return buf;
}

static char *tok_file_read(const char *path, size_t *len) {
    char *text = file_read(path, len);
    if (!text) die("%s: %s", path, strerror(errno));
    return text;
}

/* vocab.json: {"token": id, ...}. Ids need not be dense, but each is used once. */
static void tok_load_vocab(Tokenizer *t, const char *text, size_t n, const char *path) {
    char err[128];
    Json *j = t->vocab_json = json_parse(text, n, err, sizeof err);
    if (!j) die("%s: %s", path, err);
    if (j->type != J_OBJ) die("%s: expected a JSON object of token -> id", path);
    if (j->n == 0) die("%s: the vocabulary is empty", path);
    int max_id = -1;
    size_t str_bytes = 0;
    char shown[256], shown2[256];
    for (int i = 0; i < j->n; i++) {
        double v = j->kids[i].num; /* range first: converting a huge double to int is undefined */
        if (j->kids[i].type != J_NUM || !(v >= 0 && v < (1 << 24)) || v != (double)(int)v)
            die("%s: entry %d (\"%s\"): the id is not an integer in [0, 16777216)", path, i + 1,
                tok_shown(j->keys[i], strlen(j->keys[i]), shown));
        if ((int)v > max_id) max_id = (int)v;
        str_bytes += strlen(j->keys[i]) + 1;
    }
    if (str_bytes > UINT32_MAX / 2) die("%s: too large", path);
    t->n_vocab = j->n;
    t->n_ids = max_id + 1;
    t->tok = check_malloc((size_t)t->n_ids * sizeof *t->tok, "the vocabulary");
    for (int id = 0; id < t->n_ids; id++) t->tok[id] = (TokEntry){UINT32_MAX, 0, 0, 0};
    t->strs = check_malloc(str_bytes, "the vocabulary");
    /* a token decodes to at most as many bytes as its string has */
    t->raws = check_malloc(str_bytes, "the vocabulary");
    uint32_t size = tok_table_size((size_t)j->n);
    t->vocab_mask = size - 1;
    t->vocab_slot = check_malloc(size * sizeof(int), "the vocabulary");
    memset(t->vocab_slot, 0xFF, size * sizeof(int));

    /* bytes_to_unicode inverted: code point (< 324) -> byte, -1 for none */
    uint32_t byte_cp[256];
    int cp_byte[324];
    tok_byte_chars(byte_cp);
    for (int c = 0; c < 324; c++) cp_byte[c] = -1;
    for (int b = 0; b < 256; b++) cp_byte[byte_cp[b]] = b;

    uint32_t str_at = 0, raw_at = 0;
    for (int i = 0; i < j->n; i++) {
        const char *key = j->keys[i];
        int id = (int)j->kids[i].num;
        size_t len = strlen(key);
        TokEntry *e = &t->tok[id];
        if (e->str != UINT32_MAX)
            die("%s: id %d is given to both \"%s\" and \"%s\"", path, id,
                tok_shown(t->strs + e->str, e->str_len, shown), tok_shown(key, len, shown2));
        if (tok_lookup_n(t, key, len) >= 0) die("%s: token \"%s\" appears twice", path, tok_shown(key, len, shown));
        *e = (TokEntry){str_at, (uint32_t)len, raw_at, 0};
        memcpy(t->strs + str_at, key, len + 1);
        str_at += (uint32_t)len + 1;
        uint32_t h = tok_hash_str(key, len) & t->vocab_mask;
        while (t->vocab_slot[h] >= 0) h = (h + 1) & t->vocab_mask;
        t->vocab_slot[h] = id;
        /* Decode the string through bytes_to_unicode. Like HF's ByteLevel
         * decoder, a token with any character outside that map (none in OPT's
         * vocab) decodes to its UTF-8 text as it stands. */
        const unsigned char *s = (const unsigned char *)key;
        size_t k = 0;
        while (k < len) {
            size_t next;
            uint32_t cp = s[k];
            if (cp >= 0x80) { /* json_parse only gives valid UTF-8 */
                next = k + (cp >= 0xF0 ? 4 : cp >= 0xE0 ? 3 : 2);
                cp &= 0x7F >> (next - k);
                for (size_t q = k + 1; q < next; q++) cp = cp << 6 | (s[q] & 0x3F);
            } else next = k + 1;
            if (cp >= 324 || cp_byte[cp] < 0) break;
            t->raws[raw_at + e->raw_len++] = (char)cp_byte[cp];
            k = next;
        }
        if (k < len) { memcpy(t->raws + raw_at, key, len); e->raw_len = (uint32_t)len; }
        raw_at += e->raw_len;
    }
    json_free(j);
    t->vocab_json = NULL;

    for (int b = 0; b < 256; b++) {
        char c[4];
        int n_c = utf8_put(c, byte_cp[b]);
        if ((t->byte_id[b] = tok_lookup_n(t, c, (size_t)n_c)) < 0)
            die("%s: no token \"%.*s\" for the byte 0x%02X", path, n_c, c, b);
    }
    for (int k = 0; k < 2; k++) t->special_id[k] = tok_lookup_n(t, tok_special[k], strlen(tok_special[k]));
}

/* merges.txt: an optional "#version" line, then one "left right" merge per
 * line, highest priority first; both halves and their concatenation must be
 * vocabulary tokens. */
static void tok_load_merges(Tokenizer *t, const char *text, size_t n, const char *path) {
    size_t lines = 1;
    for (size_t i = 0; i < n; i++) lines += text[i] == '\n';
    uint32_t size = tok_table_size(lines);
    t->merge_mask = size - 1;
    t->merge_slot = check_malloc(size * sizeof *t->merge_slot, "the merges");
    for (uint32_t h = 0; h < size; h++) t->merge_slot[h].rank = -1;
    char shown[256], shown2[256];
    int rank = 0, line_no = 0;
    for (size_t at = 0; at < n;) {
        const char *s = text + at, *nl = memchr(s, '\n', n - at), *e = nl ? nl : text + n;
        at = (size_t)(e - text) + 1;
        line_no++;
        if (e > s && e[-1] == '\r') e--; /* tolerate CRLF files */
        if (e - s >= 8 && !memcmp(s, "#version", 8)) continue;
        const char *sp = memchr(s, ' ', (size_t)(e - s));
        if (!sp || sp == s || sp + 1 == e || memchr(sp + 1, ' ', (size_t)(e - sp - 1)))
            die("%s:%d: expected two tokens separated by one space", path, line_no);
        size_t la = (size_t)(sp - s), lb = (size_t)(e - sp - 1);
        int a = tok_lookup_n(t, s, la), b = tok_lookup_n(t, sp + 1, lb);
        if (a < 0) die("%s:%d: \"%s\" is not in vocab.json", path, line_no, tok_shown(s, la, shown));
        if (b < 0) die("%s:%d: \"%s\" is not in vocab.json", path, line_no, tok_shown(sp + 1, lb, shown));
        int ab = tok_lookup_cat(t, s, la, sp + 1, lb);
        if (ab < 0)
            die("%s:%d: the merged token \"%s%s\" is not in vocab.json", path, line_no, tok_shown(s, la, shown),
                tok_shown(sp + 1, lb, shown2));
        /* a repeated pair takes its later rank, as HF's map insertion does */
        uint64_t pair = (uint64_t)a << 32 | (uint32_t)b;
        uint32_t h = tok_hash_pair(pair) & t->merge_mask;
        while (t->merge_slot[h].rank >= 0 && t->merge_slot[h].pair != pair) h = (h + 1) & t->merge_mask;
        t->merge_slot[h] = (TokMerge){pair, rank++, ab};
    }
    t->n_ranks = rank;
}

/* Fills the zeroed t from the texts of vocab.json and merges.txt (which need
 * no NUL at the end, so embedded copies do); the names are for error messages.
 * The caller holds t, so that after a die() here tok_free frees what it has
 * (the fuzz harness goes on). */
static void tok_load_text(Tokenizer *t, const char *vocab, size_t vocab_len, const char *vocab_name,
                          const char *merges, size_t merges_len, const char *merges_name) {
    tok_load_vocab(t, vocab, vocab_len, vocab_name);
    tok_load_merges(t, merges, merges_len, merges_name);
    for (uint32_t cp = 0; cp < 256; cp++) t->latin1[cp] = (uint8_t)tok_class_cp(cp);
    t->cache = check_calloc(TOK_CACHE_SLOTS * sizeof *t->cache, "the tokenizer cache");
    t->work = check_calloc(sizeof *t->work, "the tokenizer");
    t->work->first = check_malloc((size_t)(t->n_ranks + 1) * sizeof(int), "the merges");
    for (int r = 0; r < t->n_ranks; r++) t->work->first[r] = -1;
    t->work->rank_heap = check_malloc((size_t)(t->n_ranks + 1) * sizeof(int), "the merges");
}

Tokenizer *tok_load(const char *dir) {
    size_t n = strlen(dir) + 16, vocab_len, merges_len;
    char *vocab_path = check_malloc(n, "a path"), *merges_path = check_malloc(n, "a path");
    snprintf(vocab_path, n, "%s/vocab.json", dir);
    snprintf(merges_path, n, "%s/merges.txt", dir);
    char *vocab = tok_file_read(vocab_path, &vocab_len), *merges = tok_file_read(merges_path, &merges_len);
    Tokenizer *t = check_calloc(sizeof *t, "the tokenizer");
    tok_load_text(t, vocab, vocab_len, vocab_path, merges, merges_len, merges_path);
    free(vocab);
    free(merges);
    free(vocab_path);
    free(merges_path);
    return t;
}

void tok_free(Tokenizer *t) {
    if (!t) return;
    free(t->tok);
    free(t->strs);
    free(t->raws);
    free(t->vocab_slot);
    free(t->merge_slot);
    free(t->cache);
    if (t->work) {
        free(t->work->sym);
        free(t->work->link);
        free(t->work->order);
        free(t->work->first);
        free(t->work->rank_heap);
        free(t->work);
    }
    json_free(t->vocab_json);
    free(t);
}

int tok_count(const Tokenizer *t) { return t->n_vocab; }

int tok_lookup(const Tokenizer *t, const char *token) { return tok_lookup_n(t, token, strlen(token)); }

const char *tok_piece(const Tokenizer *t, int id, size_t *len) {
    if (id < 0 || id >= t->n_ids || t->tok[id].str == UINT32_MAX) return NULL;
    if (len) *len = t->tok[id].raw_len;
    return t->raws + t->tok[id].raw;
}

/* ---- encoding ---- */

typedef struct {      /* where tok_encode's ids go */
    int **ids;        /* the caller's array */
    int *cap;         /* its capacity */
    int n;            /* ids written */
} TokOut;

static void tok_emit(TokOut *out, int id) {
    if (out->n == *out->cap) {
        if (*out->cap > INT_MAX / 2) die("tok_encode: too many tokens");
        *out->cap = *out->cap ? 2 * *out->cap : 256;
        *out->ids = check_realloc(*out->ids, (size_t)*out->cap * sizeof(int), "token ids");
    }
    (*out->ids)[out->n++] = id;
}

static void tok_rank_push(TokWork *w, int rank) {
    int i = w->n_heap++;
    while (i > 0 && rank < w->rank_heap[(i - 1) / 2]) {
        w->rank_heap[i] = w->rank_heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    w->rank_heap[i] = rank;
}

static int tok_rank_pop(TokWork *w) {
    int top = w->rank_heap[0], last = w->rank_heap[--w->n_heap], i = 0;
    for (;;) {
        int kid = 2 * i + 1;
        if (kid >= w->n_heap) break;
        if (kid + 1 < w->n_heap && w->rank_heap[kid + 1] < w->rank_heap[kid]) kid++;
        if (w->rank_heap[kid] >= last) break;
        w->rank_heap[i] = w->rank_heap[kid];
        i = kid;
    }
    w->rank_heap[i] = last;
    return top;
}

static void tok_list_add(TokWork *w, int rank, int pos) {
    if (w->n_link == w->link_cap) {
        if (w->link_cap > INT_MAX / 4) die("tok_encode: a word is too long");
        w->link_cap = w->link_cap ? 2 * w->link_cap : 1024;
        w->link = check_realloc(w->link, (size_t)w->link_cap * sizeof *w->link, "a word");
        w->order = check_realloc(w->order, (size_t)w->link_cap * sizeof *w->order, "a word");
    }
    if (w->first[rank] < 0) tok_rank_push(w, rank);
    w->link[w->n_link] = (TokLink){pos, w->first[rank]};
    w->first[rank] = w->n_link++;
}

/* Queues the pair that starts at symbol pos, if it has a merge; returns its rank or -1. */
static int tok_add_pair(const Tokenizer *t, TokWork *w, int pos) {
    if (pos < 0 || w->sym[pos].next < 0) return -1;
    const TokMerge *m = tok_merge_find(t, w->sym[pos].id, w->sym[w->sym[pos].next].id);
    if (!m) return -1;
    tok_list_add(w, m->rank, pos);
    return m->rank;
}

static int tok_int_cmp(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

/* Byte-level BPE of one pre-token: the adjacent pair of lowest merges.txt
 * rank merges first, the leftmost of equals first, as HF's Word::merge_all
 * does with a heap of all candidate pairs. Here the candidates wait in one
 * list per rank, and a small heap holds the ranks present, so that a long
 * word (a 1 MB run of digits is one pre-token) costs O(n log n) with small
 * constants: a rank's positions are sorted and merged left to right in one
 * sweep. Merging creates pairs of higher rank in a well-made merges.txt,
 * where a merge builds on earlier ones (OPT's is); should a new pair rank
 * lower or equal, the rest of the sweep goes back to wait, so the order stays
 * exact. A queued pair that has changed since is skipped: its rank tells,
 * since each rank belongs to one pair. */
static void tok_bpe(const Tokenizer *t, TokOut *out, const unsigned char *word, size_t len) {
    if (len == 1) { tok_emit(out, t->byte_id[word[0]]); return; }
    TokCacheSlot *slot = NULL;
    if (len <= TOK_CACHE_WORD) {
        slot = &t->cache[tok_hash_str((const char *)word, len) & (TOK_CACHE_SLOTS - 1)];
        if (slot->len == len && !memcmp(slot->word, word, len)) {
            for (int i = 0; i < slot->n_ids; i++) tok_emit(out, slot->ids[i]);
            return;
        }
    }
    TokWork *w = t->work;
    if (len > (size_t)w->word_cap) {
        if (len > INT_MAX / 4) die("tok_encode: a word of %zu bytes is too long", len);
        w->word_cap = (int)len;
        w->sym = check_realloc(w->sym, len * sizeof *w->sym, "a word");
    }
    int n = (int)len;
    TokSym *sym = w->sym;
    for (int i = 0; i < n; i++) sym[i] = (TokSym){t->byte_id[word[i]], i - 1, i + 1 < n ? i + 1 : -1};
    w->n_link = 0;
    for (int i = n - 2; i >= 0; i--) tok_add_pair(t, w, i); /* backwards: the lists come out in order */
    while (w->n_heap > 0) {
        int rank = tok_rank_pop(w), m = 0;
        for (int e = w->first[rank]; e >= 0; e = w->link[e].next) w->order[m++] = w->link[e].pos;
        w->first[rank] = -1;
        bool sorted = true;
        for (int k = 1; k < m && sorted; k++) sorted = w->order[k - 1] <= w->order[k];
        if (!sorted) qsort(w->order, (size_t)m, sizeof(int), tok_int_cmp);
        for (int k = 0; k < m; k++) {
            int pos = w->order[k];
            TokSym *l = &sym[pos];
            if (l->next < 0) continue;
            TokSym *r = &sym[l->next];
            const TokMerge *mg = tok_merge_find(t, l->id, r->id);
            if (!mg || mg->rank != rank) continue;
            l->id = mg->id;
            l->next = r->next;
            if (r->next >= 0) sym[r->next].prev = pos;
            *r = (TokSym){-1, -1, -1}; /* gone: its queued pairs die with it */
            int left = tok_add_pair(t, w, l->prev), right = tok_add_pair(t, w, pos);
            if ((left >= 0 && left <= rank) || (right >= 0 && right <= rank)) {
                while (++k < m) tok_list_add(w, rank, w->order[k]);
                break;
            }
        }
    }
    int first = out->n;
    for (int i = 0; i >= 0; i = sym[i].next) tok_emit(out, sym[i].id);
    if (slot) {
        slot->len = (uint8_t)len;
        slot->n_ids = (uint8_t)(out->n - first);
        memcpy(slot->word, word, len);
        memcpy(slot->ids, *out->ids + first, (size_t)slot->n_ids * sizeof(int));
    }
}

/* End of the pre-token that starts at s[i]: GPT-2's pattern, whose
 * alternatives are tried in order and always match at i, since every
 * character is a letter, a number, a space or "other". */
static size_t tok_pretoken_end(const Tokenizer *t, const unsigned char *s, size_t len, size_t i) {
    /* 's 't 're 've 'm 'll 'd come first, lower case only: "IT'S" is IT ' S */
    if (s[i] == '\'' && len - i >= 2) {
        unsigned a = s[i + 1], b = len - i >= 3 ? s[i + 2] : 0;
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
    }
    size_t j, k;
    int c = tok_class_at(t, s, len, i, &j);
    /* " ?\p{L}+", " ?\p{N}+", " ?[^\s\p{L}\p{N}]+": one ASCII space (no other
     * kind) may lead a run of letters, numbers or others */
    if (s[i] == ' ' && j < len) {
        int d = tok_class_at(t, s, len, j, &k);
        if (d != TC_SPACE) { c = d; j = k; }
    }
    if (c != TC_SPACE) {
        while (j < len && tok_class_at(t, s, len, j, &k) == c) j = k;
        return j;
    }
    /* "\s+(?!\S)|\s+": a run of spaces at the end of the text is one
     * pre-token; before a non-space, the run backs off by one character so
     * that a last " " can lead the next word ("a   b" is a, "  ", " b"); a
     * single space character before a non-space is a pre-token of its own */
    size_t last = i;
    while (j < len && tok_class_at(t, s, len, j, &k) == TC_SPACE) { last = j; j = k; }
    return j < len && last > i ? last : j;
}

/* Where the next special token starts in s[from..len), len when none;
 * *which gets its index in tok_special. */
static size_t tok_find_special(const Tokenizer *t, const char *s, size_t len, size_t from, int *which) {
    for (const char *p = s + from; (p = memchr(p, '<', len - (size_t)(p - s))); p++)
        for (int k = 0; k < 2; k++) {
            size_t n = strlen(tok_special[k]);
            if (t->special_id[k] >= 0 && n <= len - (size_t)(p - s) && !memcmp(p, tok_special[k], n)) {
                *which = k;
                return (size_t)(p - s);
            }
        }
    return len;
}

int tok_encode(const Tokenizer *t, const char *text, size_t len, int **ids, int *cap) {
    TokOut out = {ids, cap, 0};
    const unsigned char *s = (const unsigned char *)text;
    for (size_t at = 0; at <= len;) {
        int which = -1;
        size_t end = tok_find_special(t, text, len, at, &which);
        for (size_t i = at; i < end;) {
            size_t j = tok_pretoken_end(t, s, end, i);
            tok_bpe(t, &out, s + i, j - i);
            i = j;
        }
        if (which < 0) break;
        tok_emit(&out, t->special_id[which]);
        at = end + strlen(tok_special[which]);
    }
    return out.n;
}

/* ----------------------------------------------------------------------------
 * Sampler: greedy, temperature, top-k, top-p. Each sequence draws from its own
 * random stream, seeded by (--seed, its input index), so a result does not
 * depend on the batch it ran in or on the thread count. */

typedef struct {
    float temperature;     /* 0 = greedy */
    int top_k;             /* keep the k most likely tokens; 0 = all */
    float top_p;           /* keep the smallest set with this much mass; 1 = all */
} SamplerCfg;

static inline uint64_t rng_next(uint64_t s[2]) { /* xorshift128+ */
    uint64_t a = s[0], b = s[1];
    s[0] = b;
    a ^= a << 23;
    s[1] = a ^ b ^ (a >> 17) ^ (b >> 26);
    return s[1] + b;
}

static void rng_seed(uint64_t s[2], uint64_t seed, uint64_t index) {
    uint64_t x = seed ^ (index * 0xA0761D6478BD642Full);
    s[0] = splitmix64(&x);
    s[1] = splitmix64(&x) | 1;
}

static int argmax(const float *x, int n) { /* first maximum, as torch.argmax */
    int best = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}

typedef struct { float p; int id; } ProbId;
static int probid_cmp(const void *a, const void *b) {
    const ProbId *x = a, *y = b;
    return x->p > y->p ? -1 : x->p < y->p ? 1 : x->id - y->id;
}

/* Picks the next token from logits (n). `work` has room for n ProbIds. */
static int sample(const SamplerCfg *sc, const float *logits, int n, uint64_t rng[2], ProbId *work) {
    if (sc->temperature <= 0) return argmax(logits, n);
    float mx = logits[argmax(logits, n)];
    double sum = 0;
    for (int i = 0; i < n; i++) {
        work[i].id = i;
        work[i].p = expf((logits[i] - mx) / sc->temperature);
        sum += work[i].p;
    }
    int keep = n;
    if ((sc->top_k > 0 && sc->top_k < n) || sc->top_p < 1) {
        qsort(work, (size_t)n, sizeof *work, probid_cmp);
        if (sc->top_k > 0 && sc->top_k < n) keep = sc->top_k;
        if (sc->top_p < 1) { /* of the top-k mass, as Hugging Face's warpers chain */
            double acc = 0;
            if (keep < n) {
                sum = 0;
                for (int i = 0; i < keep; i++) sum += work[i].p;
            }
            for (int i = 0; i < keep; i++) {
                acc += work[i].p / sum;
                if (acc >= sc->top_p) { keep = i + 1; break; }
            }
        }
        sum = 0;
        for (int i = 0; i < keep; i++) sum += work[i].p;
    }
    double r = (double)(rng_next(rng) >> 11) * 0x1.0p-53 * sum, acc = 0;
    for (int i = 0; i < keep; i++) {
        acc += work[i].p;
        if (r < acc) return work[i].id;
    }
    return work[keep - 1].id;
}

/* ----------------------------------------------------------------------------
 * The engine: continuous batching over cache slots. Each step feeds, for every
 * busy slot, either its next chunk of prompt tokens or its last sampled token;
 * a slot that finishes takes the next prompt at once. Kernels are row-
 * independent, so this changes throughput, never results. */

typedef struct {
    int *ids;              /* (n_ids) prompt token ids, BOS included for text */
    int n_ids;
    int *out;              /* (n_out) generated ids */
    int n_out;
    float *lp;             /* score: (n_ids - 1) log-probabilities */
    char *text;            /* prompt text as given (for --jsonl), or NULL */
    size_t text_len;
    int line;              /* input line, for messages */
    uint64_t rng[2];       /* this sequence's sampling stream */
    bool done;             /* finished; waiting to be printed in order */
} Job;

typedef struct {
    const Model *m;        /* the model */
    int slots;             /* sequences in flight (-b) */
    int max_new;           /* -n */
    int score;             /* log-probs of the given tokens instead of generating */
    int ignore_eos;        /* keep generating past </s> */
    int step_rows;         /* rows per step: bounds activation memory */
    SamplerCfg sc;         /* sampling */
    int compress_cache;    /* 4-bit KV cache */
    int group;             /* its group size */
    void (*emit)(void *ctx, Job *j, int index); /* prints a finished job */
    void (*on_token)(void *ctx, Job *j, int index); /* after each sampled token (--stream) */
    void *ctx;             /* for emit/on_token */
    const OffloadCfg *offcfg; /* a placement policy (block schedule), or NULL */
    int gpu;               /* run on the GPU backend (the whole model in device memory) */
    OffloadStats ostats;   /* its statistics, after the run */
    double t_prefill, t_decode; /* seconds spent in steps with/without prompt rows */
    int64_t n_prompt_tok, n_gen_tok; /* tokens processed */
} Engine;

double now_sec(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* log-softmax at target, in a fixed order */
static float logprob_at(const float *logits, int n, int target) {
    float mx = logits[argmax(logits, n)], l[16] = {0};
    for (int i = 0; i < n; i++) l[i & 15] += expf(logits[i] - mx);
    return logits[target] - mx - logf(lanes_sum16(l));
}

/* Stdout going to the same terminal would continue the progress line: clear it first. */
static void progress_clear(void) {
    static int out_tty = -1;
    if (!g_bar) return;
    if (out_tty < 0) out_tty = isatty(1);
    if (out_tty) { fputs("\r\033[K", stderr); g_bar = false; }
}

/* The progress line, on stderr when it is a terminal: jobs done, and under a
 * policy (whose blocks may take hours) the block, its phase and token too.
 * frac: the share of the work done, for the ETA. */
static void progress(const Engine *e, int done, int total, double t0, double frac, const char *phase) {
    static double last;
    static int err_tty = -1;
    double t = now_sec();
    if (err_tty < 0) err_tty = isatty(2);
    if (!err_tty || (t - last < 0.2 && done < total)) return;
    last = t;
    double rate = (double)(e->n_gen_tok + (e->score ? e->n_prompt_tok : 0)) / (t - t0 + 1e-9);
    char eta[32] = "";
    if (frac > 0 && frac < 1) {
        long r = lround((t - t0) / frac * (1 - frac));
        if (r >= 3600) snprintf(eta, sizeof eta, ", ETA %ldh%02ldm", r / 3600, r / 60 % 60);
        else snprintf(eta, sizeof eta, ", ETA %ldm%02lds", r / 60, r % 60);
    }
    int w = 30, fill = total ? (int)((int64_t)w * done / total) : w;
    fprintf(stderr, "\r[%.*s%*s] %d/%d %s%s%s, %.1f tok/s%s\033[K", fill, "==============================", w - fill, "", done, total,
            e->score ? "scored" : "done", phase ? ", " : "", phase ? phase : "", rate, eta);
    g_bar = done < total;
    if (done == total) fputc('\n', stderr);
}

/* The scheduler's state: which job each cache slot holds. Only the process
 * that reads the input (rank 0 of a pipeline) has one. */
typedef struct {
    Job *jobs;             /* (n_jobs) */
    int n_jobs;
    int *job_of;           /* (slots) the job in each slot, -1 free */
    int *fed;              /* (slots) its prompt tokens fed so far */
    int next_job;          /* the next job to start */
    int next_emit;         /* the next job to print (output keeps input order) */
    int n_done;            /* jobs finished */
} Sched;

/* One step's rows, as the scheduler built them. */
typedef struct {
    int n;                 /* rows */
    int *tok, *slot, *pos; /* (rows_max) each row's token, cache slot and position */
    int *need;             /* (rows_max) the job that takes the row's logits, -1 none */
    int *tgt;              /* (rows_max) score: the token whose log-probability the row gives */
    bool prefill;          /* some rows are prompt tokens */
} Rows;

static void rows_init(Rows *r, int rows_max) {
    r->tok = check_malloc(sizeof(int) * 5 * (size_t)rows_max, "step");
    r->slot = r->tok + rows_max; r->pos = r->slot + rows_max; r->need = r->pos + rows_max; r->tgt = r->need + rows_max;
}

static void sched_init(Sched *q, Job *jobs, int n_jobs, int slots) {
    *q = (Sched){.jobs = jobs, .n_jobs = n_jobs};
    q->job_of = check_malloc(sizeof(int) * 2 * (size_t)slots, "slots");
    q->fed = q->job_of + slots;
    for (int i = 0; i < slots; i++) q->job_of[i] = -1, q->fed[i] = 0;
}

static bool sched_idle(const Sched *q, int s0, int s1) {
    for (int i = s0; i < s1; i++) if (q->job_of[i] >= 0) return false;
    return true;
}

/* The next step of slots [s0, s1): free slots take the next jobs (under a
 * policy only when all of them are free: FlexGen's blocks), decoding slots
 * give a row each, prompt chunks fill the rest up to rows_max. A pipeline of
 * `stages` (> 1) feeds every prompt in 2 x stages parts (at least 16 rows
 * each), all sequences side by side: only the last part needs logits, so rank
 * 0 sends the others ahead, the next stage starts after the first part and
 * the last stage finishes alone only the last: a smaller fill and drain bubble. */
static void sched_step(Engine *e, Sched *q, int s0, int s1, bool blocks, int rows_max, int stages, Rows *r) {
    if (!blocks || sched_idle(q, s0, s1))
        for (int i = s0; i < s1 && q->next_job < q->n_jobs; i++)
            if (q->job_of[i] < 0) { q->job_of[i] = q->next_job++; q->fed[i] = 0; }
    int n = 0;
    r->prefill = false;
    for (int i = s0; i < s1; i++) { /* a sequence decodes once its last token is back (a pipeline sends prompts ahead) */
        Job *j = q->job_of[i] >= 0 ? &q->jobs[q->job_of[i]] : NULL;
        if (!j || q->fed[i] < j->n_ids || e->score || !j->n_out) continue;
        r->tok[n] = j->out[j->n_out - 1]; r->slot[n] = i; r->pos[n] = j->n_ids + j->n_out - 1; r->need[n] = q->job_of[i]; r->tgt[n] = 0;
        n++;
    }
    for (int i = s0; i < s1 && n < rows_max; i++) {
        Job *j = q->job_of[i] >= 0 ? &q->jobs[q->job_of[i]] : NULL;
        if (!j || q->fed[i] >= j->n_ids) continue;
        int k = j->n_ids - q->fed[i] < rows_max - n ? j->n_ids - q->fed[i] : rows_max - n;
        int part = stages > 1 && !blocks ? (j->n_ids + 2 * stages - 1) / (2 * stages) : k;
        k = k < (part > 16 ? part : 16) ? k : (part > 16 ? part : 16);
        for (int t = 0; t < k; t++, n++) {
            int p = q->fed[i] + t;
            r->tok[n] = j->ids[p]; r->slot[n] = i; r->pos[n] = p;
            r->need[n] = e->score ? (p + 1 < j->n_ids ? q->job_of[i] : -1) : (p + 1 == j->n_ids && e->max_new > 0 ? q->job_of[i] : -1);
            r->tgt[n] = e->score && p + 1 < j->n_ids ? j->ids[p + 1] : 0;
        }
        q->fed[i] += k;
        e->n_prompt_tok += k;
        r->prefill = true;
    }
    r->n = n;
}

/* The step's outputs into the jobs: a token per generating row, a
 * log-probability per scored one. */
static void sched_apply(Engine *e, Sched *q, const Rows *r, const int *rtok, const float *rlp) {
    for (int i = 0; i < r->n; i++) {
        if (r->need[i] < 0) continue;
        Job *j = &q->jobs[r->need[i]];
        if (e->score) { j->lp[r->pos[i]] = rlp[i]; continue; }
        if (rtok[i] < 0 || rtok[i] >= e->m->cfg.vocab) die("internal: sampled token %d of a %d-token vocabulary", rtok[i], e->m->cfg.vocab);
        j->out[j->n_out++] = rtok[i];
        e->n_gen_tok++;
        if (e->on_token) progress_clear(), e->on_token(e->ctx, j, r->need[i]);
    }
}

/* Frees the finished sequences' slots in [s0, s1) and prints, in input
 * order, every job that is done. */
static void sched_retire(Engine *e, Sched *q, int s0, int s1) {
    for (int i = s0; i < s1; i++) {
        Job *j = q->job_of[i] >= 0 ? &q->jobs[q->job_of[i]] : NULL;
        if (!j || q->fed[i] < j->n_ids) continue;
        bool fin = e->score || j->n_out >= e->max_new || (!e->ignore_eos && j->n_out && j->out[j->n_out - 1] == e->m->cfg.eos);
        if (fin) { j->done = true; q->job_of[i] = -1; q->n_done++; }
    }
    while (q->next_emit < q->n_jobs && q->jobs[q->next_emit].done) {
        progress_clear();
        e->emit(e->ctx, &q->jobs[q->next_emit], q->next_emit);
        q->next_emit++;
    }
}

/* The run's shape: positions per sequence, slots, and the most rows of a step
 * (a block's prompts are one step). */
typedef struct { int cap, slots, rows_max; } RunShape;

static RunShape engine_shape(const Engine *e, const Job *jobs, int n_jobs) {
    RunShape sh = {1, 0, 1};
    for (int i = 0; i < n_jobs; i++) {
        int need = jobs[i].n_ids + (e->score ? 0 : e->max_new);
        sh.cap = need > sh.cap ? need : sh.cap;
    }
    bool blocks = e->offcfg != NULL;
    sh.slots = blocks ? e->offcfg->pol.gpu_batch_size * e->offcfg->pol.num_gpu_batches : e->slots < n_jobs ? e->slots : n_jobs;
    int block_rows = 1;
    for (int i = 0; blocks && i < n_jobs; i += sh.slots) {
        int sum = 0;
        for (int k = i; k < i + sh.slots && k < n_jobs; k++) sum += jobs[k].n_ids;
        block_rows = sum > block_rows ? sum : block_rows;
    }
    sh.rows_max = blocks ? (block_rows > sh.slots ? block_rows : sh.slots) : e->step_rows > sh.slots ? e->step_rows : sh.slots;
    return sh;
}

/* The buffers a step runs in: the cache and workspace in RAM, on the GPU, or
 * an offloading plan's. Each pipeline stage opens its own, for its layers. */
typedef struct {
    KVCache kv;            /* the cache (without a policy) */
    Scratch s;             /* the workspace (without a policy) */
    Offload *off;          /* the policy's placement, or NULL */
    Model dm;              /* the device copy of the model (GPU, no policy) */
    const Model *fm;       /* the model the forward pass reads */
    const Device *pd;      /* offloading's device: final, hid and logits cross PCIe */
    float *final;          /* (rows_max, max(hidden, embed_dim)) the step's last hidden states */
    float *logits, *hid;   /* (64, vocab), (64, embed_dim) the rows needing logits */
    ProbId *work;          /* (vocab) the sampler's */
} Bufs;

static void bufs_open(Engine *e, Bufs *b, RunShape sh) {
    const Config *c = &e->m->cfg;
    DType kv_dt = e->compress_cache ? DT_Q4 : DT_F32;
    memset(b, 0, sizeof *b);
    b->fm = e->m;
    if (e->offcfg) {
        b->pd = e->offcfg->dev;
        b->off = offload_open((Model *)e->m, e->offcfg, sh.rows_max, sh.cap, kv_dt, e->group);
        int w = c->hidden > c->embed_dim ? c->hidden : c->embed_dim; /* a stage before the last passes on (n, hidden) */
        b->final = host_pinned(b->pd, sizeof(float) * (size_t)sh.rows_max * w, "final hidden states");
    } else if (e->gpu) {
        gpu_model_upload(e->m, &b->dm);
        b->fm = &b->dm;
        gpu_kv_init(&b->kv, c, sh.slots, sh.cap, e->compress_cache ? DT_Q4 : DT_F16, e->group);
        gpu_scratch_init(&b->s, c, sh.rows_max, sh.cap);
        b->final = b->s.e;
    } else {
        if (g_w4a8) model_w4_interleave((Model *)e->m); /* decode without reduction trees */
        kv_init(&b->kv, c, sh.slots, sh.cap, kv_dt, e->group);
        scratch_init(&b->s, c, sh.rows_max, sh.cap);
        b->final = b->s.e;
    }
    b->logits = host_pinned(b->pd, sizeof(float) * 64 * (size_t)c->vocab, "logits");
    b->hid = host_pinned(b->pd, sizeof(float) * 64 * (size_t)c->embed_dim, "logits input");
    b->work = check_malloc(sizeof(ProbId) * (size_t)c->vocab, "sampler");
}

static void bufs_close(Engine *e, Bufs *b) {
    if (b->off) {
        offload_stats(b->off, &e->ostats);
        offload_close(b->off);
        host_pinned_free(b->pd, b->final);
    } else if (e->gpu) {
        gpu_sync();
        gpu_graphs_reset();
        gpu_kv_free(&b->kv);
        gpu_scratch_free(&b->s);
    } else {
        kv_free(&b->kv);
        scratch_free(&b->s);
    }
    host_pinned_free(b->pd, b->logits); host_pinned_free(b->pd, b->hid); free(b->work);
}

/* Logits of the rows that need them, 64 at a time, from final hidden states
 * (n, embed_dim); then a token per generating row (jobs[need].rng draws it) or
 * the target's log-probability per scored row. */
static void engine_outputs(const Engine *e, Bufs *b, const Rows *r, Job *jobs, int *rtok, float *rlp) {
    const Config *c = &e->m->cfg;
    for (int r0 = 0; r0 < r->n;) {
        int idx[64], cnt = 0;
        for (; r0 < r->n && cnt < 64; r0++)
            if (r->need[r0] >= 0) {
                memcpy(b->hid + (size_t)cnt * c->embed_dim, b->final + (size_t)r0 * c->embed_dim, sizeof(float) * c->embed_dim);
                idx[cnt++] = r0;
            }
        if (!cnt) continue;
        if (b->off) offload_logits(b->off, b->logits, b->hid, cnt);
        else model_logits(e->m, b->logits, b->hid, cnt);
        for (int q = 0; q < cnt; q++) {
            int i = idx[q];
            const float *lg = b->logits + (size_t)q * c->vocab;
            if (e->score) rlp[i] = logprob_at(lg, c->vocab, r->tgt[i]);
            else rtok[i] = sample(&e->sc, lg, c->vocab, jobs[r->need[i]].rng, b->work);
        }
    }
}

/* The GPU without a policy: the step as a CUDA graph when its shape has come
 * before, and lm_head, sampling and log-probabilities on the device. */
static void engine_gpu_step(Engine *e, Bufs *b, const Rows *r, Job *jobs, char *seen, int *rtok, float *rlp) {
    static int *gidx, *gtgt, *gtok, cap;
    static float *gu, *glp;
    if (r->n > cap) {
        cap = r->n;
        gidx = check_realloc(gidx, sizeof(int) * 3 * (size_t)cap, "logit rows"); gtgt = gidx + cap; gtok = gtgt + cap;
        gu = check_realloc(gu, sizeof(float) * 2 * (size_t)cap, "uniforms"); glp = gu + cap;
    }
    Step st = {r->n, r->tok, r->slot, r->pos, NULL};
    gpu_step_upload(&st, &b->s);
    if (r->prefill || !gpu_graph_launch(r->n)) { /* decode shapes: plain once, captured the second time, replayed after */
        bool capture = !r->prefill && seen[r->n] && !gpu_profile(NULL);
        if (capture) gpu_capture_begin();
        model_forward(b->fm, &b->kv, &st, &b->s);
        if (capture) gpu_capture_end(r->n);
        if (!r->prefill) seen[r->n] = 1;
    }
    int cnt = 0;
    for (int i = 0; i < r->n; i++) {
        if (r->need[i] < 0) continue;
        gidx[cnt] = i;
        gtgt[cnt] = r->tgt[i];
        gu[cnt++] = (float)((double)(rng_next(jobs[r->need[i]].rng) >> 11) * 0x1.0p-53);
    }
    if (cnt) gpu_logits(b->fm, b->final, e->m->cfg.embed_dim, gidx, cnt, e->score ? gtgt : NULL, e->sc.temperature, e->sc.top_k, e->sc.top_p, gu, gtok, glp);
    for (int q = 0; q < cnt; q++) rtok[gidx[q]] = gtok[q], rlp[gidx[q]] = glp[q];
}

/* Runs every job. Without a policy: continuous batching, the cache in RAM.
 * With one (e->off): FlexGen's blocks of gbs * nb sequences, each prefilled
 * at once and decoded in lockstep by offload_forward. */
void engine_run(Engine *e, Job *jobs, int n_jobs) {
    if (n_jobs < 1) return;
    RunShape sh = engine_shape(e, jobs, n_jobs);
    if (sh.slots < 1) return;
    bool blocks = e->offcfg != NULL;
    Bufs b;
    bufs_open(e, &b, sh);
    Sched q;
    sched_init(&q, jobs, n_jobs, sh.slots);
    Rows r;
    rows_init(&r, sh.rows_max);
    int *rtok = check_malloc(sizeof(int) * (size_t)sh.rows_max, "step");
    float *rlp = check_malloc(sizeof(float) * (size_t)sh.rows_max, "step");
    char *seen = check_calloc((size_t)sh.rows_max + 1, "graph shapes"); /* GPU: decode shapes run once */
    /* blocks: one prefill step, then a decode step per token (fewer when all stop early) */
    int n_blocks = (n_jobs + sh.slots - 1) / sh.slots, per_block = e->score || e->max_new < 1 ? 1 : e->max_new, bstep = 0;
    char ph[64] = ""; /* the block's phase, for the progress line */
    double t0 = now_sec();
    while (q.n_done < n_jobs) {
        if (sched_idle(&q, 0, sh.slots)) bstep = 0;
        sched_step(e, &q, 0, sh.slots, blocks, sh.rows_max, 1, &r);
        int blk = (q.next_job - 1) / sh.slots;
        if (blocks) {
            if (r.prefill) snprintf(ph, sizeof ph, "block %d/%d prefill", blk + 1, n_blocks);
            else snprintf(ph, sizeof ph, "block %d/%d token %d/%d", blk + 1, n_blocks, bstep + 1, per_block);
            progress(e, q.n_done, n_jobs, t0, ((double)blk * per_block + bstep) / ((double)n_blocks * per_block), ph);
        }
        double ts = now_sec();
        Step st = {r.n, r.tok, r.slot, r.pos, NULL};
        if (b.off) offload_forward(b.off, &st, NULL, b.final), engine_outputs(e, &b, &r, jobs, rtok, rlp);
        else if (e->gpu) engine_gpu_step(e, &b, &r, jobs, seen, rtok, rlp);
        else model_forward(e->m, &b.kv, &st, &b.s), engine_outputs(e, &b, &r, jobs, rtok, rlp);
        sched_apply(e, &q, &r, rtok, rlp);
        double dt = now_sec() - ts;
        if (r.prefill) e->t_prefill += dt; else e->t_decode += dt;
        sched_retire(e, &q, 0, sh.slots);
        bstep++;
        if (blocks) progress(e, q.n_done, n_jobs, t0, ((double)blk * per_block + bstep) / ((double)n_blocks * per_block), ph);
        else progress(e, q.n_done, n_jobs, t0, (double)q.n_done / n_jobs, NULL);
    }
    bufs_close(e, &b);
    free(q.job_of); free(r.tok); free(rtok); free(rlp); free(seen);
}

/* ----------------------------------------------------------------------------
 * Pipeline stages (mpirun -np N; pipe.c is the transport). Stage r holds a
 * contiguous range of layers; stage 0 also reads the input, schedules, embeds
 * and prints; the last stage applies the output and the sampler. The slots
 * are split into G >= N groups, each stepping on its own: stage 0 sends group
 * g's step (its rows and hidden states) down the pipe, and starts g's next
 * step when the last stage has sent back its tokens, computing the other
 * groups' steps meanwhile, so that every stage is busy in the steady state.
 * Messages between two ranks arrive in the order sent and every stage takes
 * the groups in the order they come, so the results come back in the order
 * the steps went out. Rows are independent, so the output is bit for bit the
 * single process's. */

enum { MSG_HDR = 4 };      /* a message's header ints: rows (-1: the end), prefill, group, 0 */

static size_t msg_bytes(int n, int h) { return sizeof(int) * (MSG_HDR + 5 * (size_t)n) + sizeof(float) * (size_t)n * h; }

/* Lays a step's message out in buf: header, the rows' five index arrays,
 * then (n, h) floats, which the caller writes (msg_x). */
static void msg_pack(char *buf, const Rows *r, int group) {
    int *hd = (int *)buf, n = r->n;
    hd[0] = n; hd[1] = r->prefill; hd[2] = group; hd[3] = 0;
    const int *src[5] = {r->tok, r->slot, r->pos, r->need, r->tgt};
    for (int i = 0; i < 5; i++) memcpy(hd + MSG_HDR + (size_t)i * n, src[i], sizeof(int) * (size_t)n);
}

static float *msg_x(char *buf, int n) { return (float *)(buf + sizeof(int) * (MSG_HDR + 5 * (size_t)n)); }

/* A received message as Rows pointing into it; its group. */
static int msg_view(char *buf, size_t got, int h, Rows *r) {
    int *hd = (int *)buf, n = hd[0];
    check(got >= sizeof(int) * MSG_HDR && (n < 0 || got == msg_bytes(n, h)), "pipeline message of %zu bytes", got);
    r->n = n;
    r->prefill = hd[1];
    int *p = hd + MSG_HDR;
    r->tok = p; r->slot = p + n; r->pos = p + 2 * (size_t)(n > 0 ? n : 0); r->need = p + 3 * (size_t)(n > 0 ? n : 0); r->tgt = p + 4 * (size_t)(n > 0 ? n : 0);
    return hd[2];
}

/* This stage's layers over a step: from the embeddings (stage 0) or the
 * hidden states xin; into b->final (the last stage) or xout. */
static void stage_forward(const Engine *e, Bufs *b, const Rows *r, const float *xin, float *xout) {
    const Model *m = e->m;
    Step st = {r->n, r->tok, r->slot, r->pos, NULL};
    size_t nh = (size_t)r->n * m->cfg.hidden;
    if (b->off) { offload_forward(b->off, &st, xin, model_last(m) ? b->final : xout); return; }
    Scratch *s = &b->s;
    for (int i = 0; i < r->n; i++) check(r->pos[i] < b->kv.layer[0].cap, "position %d beyond the cache", r->pos[i]);
    if (xin) memcpy(s->x, xin, sizeof(float) * nh);
    else model_embed(m, &st, s->x, s);
    for (int l = 0; l < m->cfg.n_layer; l++) {
        layer_forward(m, &m->layers[l], l, &b->kv.layer[l], &st, s->x, s);
        g_comm->progress();
    }
    if (model_last(m)) model_final(m, s->x, r->n, s->e, s);
    else memcpy(xout, s->x, sizeof(float) * nh);
}

/* Group g's slots: whole GPU batches under a policy. */
static void group_range(const Engine *e, RunShape sh, int G, int g, int *s0, int *s1) {
    int unit = e->offcfg ? e->offcfg->pol.gpu_batch_size : 1, units = sh.slots / unit;
    *s0 = (int)((int64_t)units * g / G) * unit;
    *s1 = (int)((int64_t)units * (g + 1) / G) * unit;
}

/* Every rank runs this with the same sh and G; rank 0 has the jobs, the last
 * rank their random streams (jobs[i].rng). */
static void engine_pipe(Engine *e, Job *jobs, int n_jobs, RunShape sh, int G) {
    const Comm *cm = g_comm;
    int rank = cm->rank, N = cm->size, h = e->m->cfg.hidden;
    bool last = rank == N - 1;
    Bufs b;
    bufs_open(e, &b, sh);
    size_t cap = msg_bytes(sh.rows_max, h), rcap = sizeof(int) * (MSG_HDR + 2 * (size_t)sh.rows_max);
    double t0 = now_sec();
    if (rank == 0) {
        Sched q;
        sched_init(&q, jobs, n_jobs, sh.slots);
        Rows *gr = check_malloc(sizeof(Rows) * (size_t)G, "groups");
        char **out = check_calloc(sizeof(char *) * (size_t)G, "groups");
        void **sreq = check_calloc(sizeof(void *) * (size_t)G, "groups");
        /* steps in flight, oldest first: group, rows, and whether their results decide the
         * group's next step (a prompt chunk without logits does not: the next chunk goes at once) */
        int cap_fifo = 64 * G, head = 0, count = 0, pre_left = 0;
        int *fifo = check_malloc(sizeof(int) * 3 * (size_t)cap_fifo, "groups"), *wait = check_calloc(sizeof(int) * (size_t)G, "groups");
        for (int g = 0; g < G; g++) { rows_init(&gr[g], sh.rows_max); out[g] = host_pinned(b.pd, cap, "pipeline messages"); }
        char *res = check_malloc(rcap, "pipeline results");
        void *rreq = cm->irecv(res, rcap, N - 1);
        for (;;) {
            for (int g = 0; g < G; g++) /* every group free to step goes in, prompt chunks while they need nothing back */
                while (!wait[g] && count < cap_fifo) {
                    int s0, s1;
                    group_range(e, sh, G, g, &s0, &s1);
                    sched_step(e, &q, s0, s1, e->offcfg != NULL, sh.rows_max, N, &gr[g]);
                    if (!gr[g].n) break;
                    if (sreq[g]) cm->wait(sreq[g]);
                    msg_pack(out[g], &gr[g], g);
                    stage_forward(e, &b, &gr[g], NULL, msg_x(out[g], gr[g].n));
                    sreq[g] = cm->isend(out[g], msg_bytes(gr[g].n, h), 1);
                    for (int i = 0; i < gr[g].n; i++) wait[g] |= gr[g].need[i] >= 0;
                    int *f = fifo + 3 * ((head + count++) % cap_fifo);
                    f[0] = g, f[1] = gr[g].n, f[2] = wait[g];
                    pre_left += gr[g].prefill && wait[g];
                }
            if (!count) break;
            int *f = fifo + 3 * head, g = f[0], s0, s1;
            head = (head + 1) % cap_fifo, count--;
            size_t got = cm->wait(rreq);
            int *hd = (int *)res;
            check(got == sizeof(int) * (MSG_HDR + 2 * (size_t)f[1]) && hd[0] == f[1] && hd[2] == g, "pipeline result for group %d out of order", g);
            if (f[2]) { /* the results the group waited for */
                sched_apply(e, &q, &gr[g], hd + MSG_HDR, (const float *)(hd + MSG_HDR + gr[g].n));
                wait[g] = 0;
                if (gr[g].prefill && --pre_left == 0 && !e->t_prefill) e->t_prefill = now_sec() - t0; /* every group's first tokens */
            }
            rreq = cm->irecv(res, rcap, N - 1);
            group_range(e, sh, G, g, &s0, &s1);
            if (!wait[g]) sched_retire(e, &q, s0, s1); /* every row the group sent has its results */
            progress(e, q.n_done, n_jobs, t0, (double)q.n_done / n_jobs, NULL);
        }
        int stop[MSG_HDR] = {-1, 0, 0, 0};
        cm->wait(cm->isend(stop, sizeof stop, 1));
        cm->wait(rreq); /* the last stage's end */
        for (int g = 0; g < G; g++) { if (sreq[g]) cm->wait(sreq[g]); host_pinned_free(b.pd, out[g]); free(gr[g].tok); }
        free(gr); free(out); free(sreq); free(fifo); free(wait); free(res); free(q.job_of);
    } else {
        char *in[2], *out[2];
        void *rq[2], *sq[2] = {NULL, NULL};
        for (int i = 0; i < 2; i++) {
            in[i] = host_pinned(b.pd, cap, "pipeline messages"); /* page-locked for a GPU stage's copies */
            out[i] = host_pinned(b.pd, last ? rcap : cap, "pipeline messages");
            rq[i] = cm->irecv(in[i], cap, rank - 1); /* posted ahead: the next step arrives while this one computes */
        }
        int *rtok = check_malloc(sizeof(int) * (size_t)sh.rows_max, "step");
        float *rlp = check_malloc(sizeof(float) * (size_t)sh.rows_max, "step");
        for (int i = 0, j = 0;; i ^= 1, j ^= 1) {
            Rows r;
            int g = msg_view(in[i], cm->wait(rq[i]), h, &r);
            if (sq[j]) cm->wait(sq[j]);
            if (r.n < 0) { /* the end: passed on, and the other receive withdrawn */
                int stop[MSG_HDR] = {-1, 0, 0, 0};
                cm->wait(cm->isend(stop, sizeof stop, last ? 0 : rank + 1));
                cm->cancel(rq[i ^ 1]);
                if (sq[j ^ 1]) cm->wait(sq[j ^ 1]);
                break;
            }
            if (last) {
                stage_forward(e, &b, &r, msg_x(in[i], r.n), NULL);
                memset(rtok, 0, sizeof(int) * (size_t)r.n);
                memset(rlp, 0, sizeof(float) * (size_t)r.n);
                engine_outputs(e, &b, &r, jobs, rtok, rlp);
                int *hd = (int *)out[j];
                hd[0] = r.n; hd[1] = r.prefill; hd[2] = g; hd[3] = 0;
                memcpy(hd + MSG_HDR, rtok, sizeof(int) * (size_t)r.n);
                memcpy(hd + MSG_HDR + r.n, rlp, sizeof(float) * (size_t)r.n);
                sq[j] = cm->isend(out[j], sizeof(int) * (MSG_HDR + 2 * (size_t)r.n), 0);
            } else {
                msg_pack(out[j], &r, g);
                stage_forward(e, &b, &r, msg_x(in[i], r.n), msg_x(out[j], r.n));
                sq[j] = cm->isend(out[j], msg_bytes(r.n, h), rank + 1);
            }
            rq[i] = cm->irecv(in[i], cap, rank - 1);
        }
        for (int i = 0; i < 2; i++) host_pinned_free(b.pd, in[i]), host_pinned_free(b.pd, out[i]);
        free(rtok); free(rlp);
    }
    if (rank == 0) e->t_decode = now_sec() - t0 - e->t_prefill;
    bufs_close(e, &b);
}

/* ----------------------------------------------------------------------------
 * Command line. stdout carries data only; diagnostics and progress go to
 * stderr, so `opt ... | next-program` always works. */

typedef struct {
    const char *cmd;       /* subcommand */
    const char *model;     /* -m */
    const char *file;      /* -f, NULL or "-" = stdin */
    const char *out;       /* -o (synth, convert) */
    int batch;             /* -b */
    int threads;           /* -t, 0 = all cores */
    int max_new;           /* -n */
    SamplerCfg sc;         /* --temperature --top-k --top-p */
    uint64_t seed;         /* --seed */
    int ignore_eos, jsonl, ids, stream, no_bos, decode, json; /* flags */
    const char *truncate;  /* --truncate error|left: what a too-long prompt does (NULL = error) */
    int prompt_len, gen_len; /* bench */
    const char *shape;     /* synth --shape */
    const char *format;    /* synth --format */
    const char *dtype;     /* synth --dtype */
    int shards;            /* synth --shards */
    const char *prefix;    /* synth --prefix */
    int tie;               /* synth: tie lm_head to the embedding */
    int step_rows;         /* --step-rows */
    int compress_weight;   /* --compress-weight: 4-bit weights at load time */
    int compress_cache;    /* --compress-cache: 4-bit KV cache */
    const char *compute;   /* --compute f32|bf16|int8: the CPU GEMMs' arithmetic (NULL = f32) */
    int group;             /* --group-size for 4-bit formats */
    int int4;              /* convert --int4-weights */
    int outliers;          /* synth --outliers */
    int w8a8;              /* convert --w8a8 (or --w8a8-static) */
    SqOpts sq;             /* its calibration */
    int offload;           /* a placement policy was given (any option marked so in opt_specs) */
    const char *policy;    /* --policy: "auto" or NULL */
    int policy_auto;       /* --policy auto: lp.c chooses it */
    const char *device;    /* --device cpu|gpu|auto */
    const char *hw;        /* --hw for --policy auto: t4, h100 or a probe file */
    OffloadCfg off;        /* --percent, --gpu-batch-size, --num-gpu-batches, budgets, ... */
    int help;              /* -h: print the command's help instead of running it */
    const char *stages;    /* --stages N0,N1,...: decoder layers per pipeline stage (NULL: balanced) */
    int micro;             /* --micro-batches: groups in flight through the stages (0: one per stage) */
} Opts;

#define DEVICE_HELP \
     "  -m dummy:SHAPE         seeded random weights of an OPT size (opt-30b) or HxLxAxF, made in their tiers\n" \
     "      --device D         cpu, gpu or auto (default: the GPU when there is one and the model fits)\n" \
     "      --compress-weight  4-bit group-wise weights, quantized at load time\n" \
     "      --compress-cache   4-bit group-wise KV cache\n" \
     "      --group-size N     4-bit group size: 32, 64 (default) or 128\n" \
     "      --compute C        CPU GEMM arithmetic: f32 (default; the reference the exactness tests\n" \
     "                         hold) or bf16 (inputs rounded to bf16, f32 sums; AVX-512 BF16; 1.4-1.7x\n" \
     "                         f32 prefill on Zen 5, 0.6x on Sapphire Rapids, where vdpbf16ps is slow)\n" \
     "                         or int8 (4-bit weights only: x quantized to int8 per weight group,\n" \
     "                         exact integer sums, as llama.cpp's Q4 x Q8; AVX-512 VNNI)\n" \
     "      --stages N0,N1,... decoder layers per pipeline stage, one count per mpirun rank (make\n" \
     "                         MPI=1; default: balanced by the cost model; README: pipeline stages)\n" \
     "      --micro-batches G  groups of the block in flight through the stages (default: one per\n" \
     "                         rank; whole GPU batches under a policy)\n"
#define OFFLOAD_HELP \
     "  Offloading (FlexGen's block schedule; any of these turns it on):\n" \
     "      --percent WG WC CG CC AG AC  percent of weights, KV cache and activations on GPU and CPU;\n" \
     "                         the rest of each goes to disk (e.g. --percent 0 50 0 100 0 100)\n" \
     "      --gpu-batch-size N --num-gpu-batches K  a block is N*K sequences (16 x 1)\n" \
     "      --policy auto      let the cost model choose (lp.c); --hw t4|h100|probe.json names the\n" \
     "                         hardware, else this machine is measured first\n" \
     "      --offload-dir DIR  where the cache's and activations' disk share lives ($TMPDIR or /tmp);\n" \
     "                         files removed at exit, also on SIGINT and SIGTERM\n" \
     "      --gpu-mem S --cpu-mem S --disk-mem S  budgets (512M, 16G, 1.5T); a policy over one is\n" \
     "                         refused, with the memory plan, before anything is allocated\n" \
     "      --cpu-attention    attention where the cache lives (always so when the CPU computes)\n" \
     "      --pin-weights      lock the CPU-resident weights in RAM (mlock)\n" \
     "      --no-overlap       synchronous I/O, for debugging\n"
#define INPUT_HELP \
     "  Input: a UTF-8 byte order mark at its start and the CR of CRLF line ends are dropped.\n"

static const char *help_text[][2] = {
    {"generate",
     "usage: opt generate -m DIR [-f FILE] [options]\n"
     "  One prompt per input line (stdin without -f); escapes \\n \\t \\\\ are decoded.\n"
     "  One completion per output line, in input order, escaped the same way.\n"
     INPUT_HELP
     "  An empty line is a prompt too (BOS alone); in --jsonl input blank lines are skipped.\n"
     "  -m, --model DIR        Hugging Face OPT checkpoint directory (or a file from opt convert)\n"
     "  -f, --file FILE        read prompts from FILE instead of stdin (- is stdin)\n"
     "  -n, --max-new-tokens N tokens to generate per prompt (default 32)\n"
     "  -b, --batch-size N     sequences in flight (default 16)\n"
     "  -t, --threads N        CPU threads (default: all cores)\n"
     "      --temperature T    0 = greedy (default 0, or 1 when --top-k or --top-p is given)\n"
     "      --top-k K          sample among the K most likely tokens (0 = off)\n"
     "      --top-p P          nucleus sampling mass (default 1 = off)\n"
     "      --seed S           sampling seed (default 0); same seed, same output\n"
     "      --ignore-eos       do not stop at </s> (otherwise </s> is printed and ends the line)\n"
     "      --jsonl            JSON lines in ({\"prompt\": ...} or {\"ids\": [...]}) and out ({\"index\",\n"
     "                         \"prompt\", \"completion\", \"ids\"}); \"index\" counts prompts from 0\n"
     "      --ids              input lines are token ids (no BOS added); output lines are the new ids\n"
     "      --stream           print tokens as they come (a single prompt; raw text, so not with\n"
     "                         --jsonl or --ids)\n"
     "      --truncate M       a prompt longer than the model's positions less -n: error (default,\n"
     "                         before any output) or left (keep BOS and the last tokens that fit)\n"
     "      --step-rows N      tokens per forward step (default 1024; bounds activation memory)\n"
     DEVICE_HELP OFFLOAD_HELP},
    {"score",
     "usage: opt score -m DIR [-f FILE] [options]\n"
     "  For each input line, the natural-log probability of every token after the first\n"
     "  (BOS for text) given the ones before it, space-separated, one line per input, each\n"
     "  printed as soon as it is complete.\n"
     INPUT_HELP
     "  An empty line is a prompt too (BOS alone: an empty result); in --jsonl input blank lines\n"
     "  are skipped.\n"
     "  -m, --model DIR        Hugging Face OPT checkpoint directory (or a file from opt convert)\n"
     "  -f, --file FILE        read the lines from FILE instead of stdin (- is stdin)\n"
     "  -b, --batch-size N     sequences in flight (default 16)\n"
     "  -t, --threads N        CPU threads (default: all cores)\n"
     "      --ids              input lines are token ids, used as given\n"
     "      --jsonl            JSON lines in ({\"prompt\": ...} or {\"ids\": [...]}) and out ({\"index\",\n"
     "                         \"tokens\", \"ids\", \"logprobs\", \"perplexity\"}); \"index\" counts lines scored\n"
     "      --truncate M       a line longer than the model's positions: error (default, before any\n"
     "                         output) or left (keep the first token and the last ones that fit)\n"
     "      --step-rows N      tokens per forward step (default 1024)\n"
     DEVICE_HELP OFFLOAD_HELP},
    {"tokenize",
     "usage: opt tokenize [-m DIR] [-f FILE] [--no-bos | --decode]\n"
     "  Text lines to token ids (BOS 2 first unless --no-bos); with --decode, id lines to text.\n"
     INPUT_HELP
     "  -m, --model DIR        a checkpoint directory whose vocab.json and merges.txt to use; without\n"
     "                         them (or without -m) the built-in OPT tokenizer (all OPT sizes share it)\n"
     "  -f, --file FILE        read lines from FILE instead of stdin (- is stdin)\n"
     "      --no-bos           no BOS before each line's ids\n"
     "      --decode           id lines to text, escaped as generate escapes it\n"},
    {"synth",
     "usage: opt synth --shape SHAPE -o DIR [--seed S] [--format safetensors|bin] [--dtype f16|f32|bf16]\n"
     "                 [--shards N] [--prefix model.decoder.|decoder.] [--tie|--no-tie] [--outliers]\n"
     "  Writes a random-weight OPT checkpoint in Hugging Face layout (config, tokenizer, weights).\n"
     "  SHAPE: opt-125m, opt-350m, opt-1.3b, opt-2.7b, opt-6.7b, opt-13b, opt-30b, opt-66b, opt-175b,\n"
     "         or HIDDENxLAYERSxHEADSxFFN (e.g. 256x2x4x1024). Defaults: f16, safetensors, tied, seed 0.\n"
     "  -o, --output DIR: the directory to write.\n"
     "  --outliers: 4 fixed channels of the LayerNorms feeding q/k/v and fc1 are 50-100x the rest\n"
     "  (and the matching weight columns as much smaller), like OPT models above 6.7B.\n"
     "  DIR must not exist (or be empty): it appears, complete, only when everything is written.\n"},
    {"info", "usage: opt info -m DIR (-m, --model)\n  The config, parameter count, bytes per dtype, and what this machine has.\n"},
    {"bench",
     "usage: opt bench -m DIR|dummy:SHAPE [--prompt-len P] [--gen-len G] [-b B] [-t T] [--json] [options]\n"
     "  Synthetic prompts of P (512) tokens, G (32) generated each, B at once (a policy's block\n"
     "  when one is given). Prints prefill and decode latency and throughput, total throughput\n"
     "  (FlexGen's definitions: total = B*G / (prefill + decode)) and peak memory; with a policy\n"
     "  also the accounted peak per tier, the disk bandwidth achieved and the I/O-compute overlap.\n"
     "  -m, --model DIR   -b, --batch-size B (16)   -t, --threads T (all cores)\n"
     "      --json             one JSON object instead of the table\n"
     "      --step-rows N      tokens per forward step (default 1024, at least B*P)\n"
     DEVICE_HELP OFFLOAD_HELP},
    {"lp", lp_usage}, {"plan", plan_usage}, {"probe", probe_usage},
    {"convert",
     "usage: opt convert -m DIR -o FILE [--int4-weights [--group-size N] | --w8a8 --calib FILE [...]]\n"
     "  Writes the native packed file (a safetensors container with opt's tensor names, the\n"
     "  config and each tensor's format in its metadata) that -m accepts and the disk tier maps.\n"
     "  -m, --model DIR        the checkpoint to convert\n"
     "  -o, --output FILE      the file to write\n"
     "  -t, --threads N        CPU threads for the calibration (default: all cores)\n"
     "      --int4-weights     4-bit group-wise weights (asymmetric, f16 scale and minimum per group)\n"
     "      --group-size N     values per group along each row: 32, 64 (default) or 128\n"
     "      --w8a8             SmoothQuant: int8 weights (per output channel) and int8 activations\n"
     "                         (per token, dynamic); outliers migrated into the weights first\n"
     "      --w8a8-static      the same with static per-tensor activation scales (the paper's O3)\n"
     "      --calib FILE       calibration text: one sample per line, or plain text cut into samples\n"
     "      --alpha A          migration strength in [0, 1] (default 0.5)\n"
     "      --calib-samples N  samples (default 512)    --calib-len N  tokens per sample (default 512)\n"},
    {"version", "usage: opt version (or opt --version)\n  One line: opt's version, whether it was built with CUDA, and the SIMD level in use.\n"},
};

static void usage(FILE *f) {
    fprintf(f, "opt: OPT language models from Hugging Face checkpoints, on one machine.\n\n"
               "usage: opt [COMMAND] [options]      (COMMAND defaults to generate)\n\n"
               "commands:\n"
               "  generate   complete prompts, one per line (stdin -> stdout)\n"
               "  score      log-probabilities of every token of each line\n"
               "  tokenize   text to token ids, or back with --decode\n"
               "  synth      write a random-weight checkpoint for tests and demos\n"
               "  info       describe a checkpoint and this machine\n"
               "  bench      measure prefill and decode throughput\n"
               "  convert    write the native packed file (4-bit or SmoothQuant W8A8 weights)\n"
               "  plan       choose an offloading policy with the cost model (lp.c)\n"
               "  probe      measure this machine for plan\n"
               "  lp         solve a linear program (MPS) with the built-in simplex\n"
               "  version    the version and build (also opt --version)\n\n"
               "`opt COMMAND --help` documents each command's options. OPT_SIMD=scalar|avx2|avx512\n"
               "forces a SIMD level.\n");
}

static bool is_help(const char *a) { return !strcmp(a, "-h") || !strcmp(a, "--help"); }

static void cmd_help(const char *cmd) {
    for (size_t i = 0; i < sizeof help_text / sizeof *help_text; i++)
        if (cmd && !strcmp(cmd, help_text[i][0])) { fputs(help_text[i][1], stdout); return; }
    usage(stdout);
}

static void cmd_version(void) {
#ifdef OPT_CUDA
    const char *cuda = "with CUDA";
#else
    const char *cuda = "without CUDA";
#endif
    printf("opt %s (%s, SIMD %s of %s)\n", OPT_VERSION, cuda, simd_names[g_simd], simd_names[g_simd_max]);
}

static long parse_int(const char *flag, const char *v, long lo, long hi) {
    char *e;
    errno = 0;
    long x = strtol(v, &e, 10);
    if (!*v || *e || errno || x < lo || x > hi) die("%s: expected an integer in [%ld, %ld], got '%s'", flag, lo, hi, v);
    return x;
}

static double parse_num(const char *flag, const char *v, double lo, double hi) {
    char *e;
    double x = strtod(v, &e);
    if (!*v || *e || !(x >= lo && x <= hi)) die("%s: expected a number in [%g, %g], got '%s'", flag, lo, hi, v);
    return x;
}

/* --- options: one table says what each one is, where it goes and which
 * commands it applies to, so every command refuses the options that mean
 * nothing to it instead of ignoring them --- */

enum { /* the commands opts_parse serves, as bits */
    C_GEN = 1, C_SCORE = 2, C_TOK = 4, C_SYNTH = 8, C_INFO = 16, C_BENCH = 32, C_CONV = 64, C_VERSION = 128,
    C_RUN = C_GEN | C_SCORE, C_MODEL = C_RUN | C_BENCH,
};
static const char *const cmd_names[] = {"generate", "score", "tokenize", "synth", "info", "bench", "convert", "version"};

enum { /* what an option needs alongside it to mean anything */
    N_W8A8 = 1, N_Q4 = 2, N_AUTO = 4,
};
static const char *const need_names[] = {"--w8a8 or --w8a8-static", "--int4-weights, --compress-weight or --compress-cache",
                                         "--policy auto"};

typedef enum { A_SET, A_CLEAR, A_INT, A_FLOAT, A_U64, A_STR, A_SIZE, A_PERCENT } ArgKind;

typedef struct {
    const char *name;      /* long spelling */
    const char *brief;     /* short spelling, or NULL */
    unsigned cmds;         /* the commands it applies to (C_ bits) */
    ArgKind kind;          /* its value's type: how it is parsed and stored */
    size_t at;             /* where in Opts it is stored */
    double lo, hi;         /* a number's accepted range */
    const char *choices;   /* the accepted values, '|'-separated, or NULL for any */
    unsigned needs;        /* meaningful only with one of these (N_ bits), or 0 */
    bool offload;          /* giving it asks for a placement policy */
    const char *why;       /* said when it does not apply, or NULL */
} OptSpec;

#define O(name, brief, cmds, kind, field, lo, hi, choices, needs, offload) \
    {name, brief, cmds, kind, offsetof(Opts, field), lo, hi, choices, needs, offload, NULL}
static const OptSpec opt_specs[] = {
    O("--model", "-m", C_MODEL | C_TOK | C_INFO | C_CONV, A_STR, model, 0, 0, NULL, 0, 0),
    O("--file", "-f", C_RUN | C_TOK, A_STR, file, 0, 0, NULL, 0, 0),
    O("--output", "-o", C_SYNTH | C_CONV, A_STR, out, 0, 0, NULL, 0, 0),
    O("--batch-size", "-b", C_MODEL, A_INT, batch, 1, 1 << 20, NULL, 0, 0),
    O("--threads", "-t", C_MODEL | C_CONV, A_INT, threads, 1, 4096, NULL, 0, 0),
    O("--max-new-tokens", "-n", C_GEN, A_INT, max_new, 0, 1 << 20, NULL, 0, 0),
    O("--temperature", NULL, C_GEN, A_FLOAT, sc.temperature, 0, 1e6, NULL, 0, 0),
    O("--top-k", NULL, C_GEN, A_INT, sc.top_k, 0, 1 << 30, NULL, 0, 0),
    O("--top-p", NULL, C_GEN, A_FLOAT, sc.top_p, 1e-9, 1, NULL, 0, 0),
    O("--seed", NULL, C_GEN | C_SYNTH, A_U64, seed, 0, 1.8e19, NULL, 0, 0),
    O("--ignore-eos", NULL, C_GEN, A_SET, ignore_eos, 0, 0, NULL, 0, 0),
    O("--jsonl", NULL, C_RUN, A_SET, jsonl, 0, 0, NULL, 0, 0),
    O("--ids", NULL, C_RUN, A_SET, ids, 0, 0, NULL, 0, 0),
    {"--stream", NULL, C_GEN, A_SET, offsetof(Opts, stream), 0, 0, NULL, 0, 0,
     "streaming is for generate; score and tokenize print each line as soon as it is complete"},
    O("--truncate", NULL, C_RUN, A_STR, truncate, 0, 0, "error|left", 0, 0),
    O("--step-rows", NULL, C_MODEL, A_INT, step_rows, 1, 1 << 20, NULL, 0, 0),
    O("--no-bos", NULL, C_TOK, A_SET, no_bos, 0, 0, NULL, 0, 0),
    O("--decode", NULL, C_TOK, A_SET, decode, 0, 0, NULL, 0, 0),
    O("--json", NULL, C_BENCH, A_SET, json, 0, 0, NULL, 0, 0),
    O("--prompt-len", NULL, C_BENCH, A_INT, prompt_len, 1, 1 << 20, NULL, 0, 0),
    O("--gen-len", NULL, C_BENCH, A_INT, gen_len, 1, 1 << 20, NULL, 0, 0),
    O("--shape", NULL, C_SYNTH, A_STR, shape, 0, 0, NULL, 0, 0),
    O("--format", NULL, C_SYNTH, A_STR, format, 0, 0, NULL, 0, 0),
    O("--dtype", NULL, C_SYNTH, A_STR, dtype, 0, 0, NULL, 0, 0),
    O("--shards", NULL, C_SYNTH, A_INT, shards, 1, 100000, NULL, 0, 0),
    O("--prefix", NULL, C_SYNTH, A_STR, prefix, 0, 0, NULL, 0, 0),
    O("--tie", NULL, C_SYNTH, A_SET, tie, 0, 0, NULL, 0, 0),
    O("--no-tie", NULL, C_SYNTH, A_CLEAR, tie, 0, 0, NULL, 0, 0),
    O("--outliers", NULL, C_SYNTH, A_SET, outliers, 0, 0, NULL, 0, 0),
    O("--device", NULL, C_MODEL, A_STR, device, 0, 0, "cpu|gpu|auto", 0, 0),
    O("--stages", NULL, C_MODEL, A_STR, stages, 0, 0, NULL, 0, 0),
    O("--micro-batches", NULL, C_MODEL, A_INT, micro, 1, 1 << 16, NULL, 0, 0),
    O("--compress-weight", NULL, C_MODEL, A_SET, compress_weight, 0, 0, NULL, 0, 0),
    O("--compress-cache", NULL, C_MODEL, A_SET, compress_cache, 0, 0, NULL, 0, 0),
    O("--compute", NULL, C_MODEL, A_STR, compute, 0, 0, "f32|bf16|int8", 0, 0),
    O("--group-size", NULL, C_MODEL | C_CONV, A_INT, group, 32, 128, "32|64|128", N_Q4, 0),
    O("--percent", NULL, C_MODEL, A_PERCENT, off.pol, 0, 100, NULL, 0, 1),
    O("--gpu-batch-size", NULL, C_MODEL, A_INT, off.pol.gpu_batch_size, 1, 1 << 16, NULL, 0, 1),
    O("--num-gpu-batches", NULL, C_MODEL, A_INT, off.pol.num_gpu_batches, 1, MAX_GPU_BATCHES, NULL, 0, 1),
    O("--policy", NULL, C_MODEL, A_STR, policy, 0, 0, "auto", 0, 1),
    O("--hw", NULL, C_MODEL, A_STR, hw, 0, 0, NULL, N_AUTO, 0),
    O("--offload-dir", NULL, C_MODEL, A_STR, off.dir, 0, 0, NULL, 0, 1),
    O("--gpu-mem", NULL, C_MODEL, A_SIZE, off.mem[TIER_GPU], 0, 0, NULL, 0, 0),
    O("--cpu-mem", NULL, C_MODEL, A_SIZE, off.mem[TIER_CPU], 0, 0, NULL, 0, 1),
    O("--disk-mem", NULL, C_MODEL, A_SIZE, off.mem[TIER_DISK], 0, 0, NULL, 0, 1),
    O("--cpu-attention", NULL, C_MODEL, A_SET, off.pol.cpu_attention, 0, 0, NULL, 0, 0),
    O("--pin-weights", NULL, C_MODEL, A_SET, off.pol.pin_weights, 0, 0, NULL, 0, 0),
    O("--no-overlap", NULL, C_MODEL, A_CLEAR, off.pol.overlap, 0, 0, NULL, 0, 0),
    O("--int4-weights", NULL, C_CONV, A_SET, int4, 0, 0, NULL, 0, 0),
    O("--w8a8", NULL, C_CONV, A_SET, w8a8, 0, 0, NULL, 0, 0),
    O("--w8a8-static", NULL, C_CONV, A_SET, sq.static_act, 0, 0, NULL, 0, 0),
    O("--calib", NULL, C_CONV, A_STR, sq.calib, 0, 0, NULL, N_W8A8, 0),
    O("--alpha", NULL, C_CONV, A_FLOAT, sq.alpha, 0, 1, NULL, N_W8A8, 0),
    O("--calib-samples", NULL, C_CONV, A_INT, sq.samples, 1, 1 << 20, NULL, N_W8A8, 0),
    O("--calib-len", NULL, C_CONV, A_INT, sq.len, 2, 1 << 20, NULL, N_W8A8, 0),
};
#undef O
#define N_SPECS (sizeof opt_specs / sizeof *opt_specs)

/* Pairs that contradict each other: the first named is refused beside the second. */
static const char *const opt_conflicts[][2] = {
    {"--stream", "--jsonl"}, {"--stream", "--ids"}, {"--no-bos", "--decode"},
    {"--w8a8", "--int4-weights"}, {"--w8a8-static", "--int4-weights"},
};

static int spec_find(const char *a) {
    for (size_t k = 0; k < N_SPECS; k++)
        if (!strcmp(a, opt_specs[k].name) || (opt_specs[k].brief && !strcmp(a, opt_specs[k].brief))) return (int)k;
    return -1;
}

/* Is v one of the '|'-separated choices? */
static bool choice_ok(const char *choices, const char *v) {
    size_t n = strlen(v);
    for (const char *p = choices; *p;) {
        size_t k = strcspn(p, "|");
        if (k == n && !strncmp(p, v, n)) return true;
        p += k + (p[k] == '|');
    }
    return false;
}

static void opts_parse(Opts *o, int argc, char **argv) {
    unsigned cmd = 0;
    for (size_t c = 0; c < sizeof cmd_names / sizeof *cmd_names; c++)
        if (!strcmp(o->cmd, cmd_names[c])) cmd = 1u << c;
    bool given[N_SPECS] = {0};
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (is_help(a)) { o->help = 1; return; }
        int k = spec_find(a);
        if (k < 0) die("unknown option '%s' for opt %s (see opt %s --help)", a, o->cmd, o->cmd);
        const OptSpec *s = &opt_specs[k];
        if (!(s->cmds & cmd) && s->why) die("%s does not apply to opt %s: %s", a, o->cmd, s->why);
        if (!(s->cmds & cmd)) die("%s does not apply to opt %s (see opt %s --help)", a, o->cmd, o->cmd);
        given[k] = true;
        void *at = (char *)o + s->at;
        if (s->kind == A_SET || s->kind == A_CLEAR) { *(int *)at = s->kind == A_SET; continue; }
        if (s->kind == A_PERCENT) { /* six values: weights, cache, activations on GPU and CPU */
            Policy *p = at;
            double *pc[6] = {&p->w_gpu, &p->w_cpu, &p->c_gpu, &p->c_cpu, &p->a_gpu, &p->a_cpu};
            for (int q = 0; q < 6; q++) {
                if (i + 1 >= argc) die("%s needs 6 values (see opt %s --help)", a, o->cmd);
                *pc[q] = parse_num(a, argv[++i], s->lo, s->hi);
            }
            for (int q = 0; q < 6; q += 2)
                if (*pc[q] + *pc[q + 1] > 100) die("%s: %s on GPU and CPU add up to more than 100", a, q == 0 ? "weights" : q == 2 ? "cache" : "activations");
            continue;
        }
        if (i + 1 >= argc) die("%s needs a value (see opt %s --help)", a, o->cmd);
        const char *v = argv[++i];
        if (s->choices && !choice_ok(s->choices, v)) die("%s: expected %s, got '%s'", a, s->choices, v);
        switch (s->kind) {
        case A_INT: *(int *)at = (int)parse_int(a, v, (long)s->lo, (long)s->hi); break;
        case A_FLOAT: *(float *)at = (float)parse_num(a, v, s->lo, s->hi); break;
        case A_U64: *(uint64_t *)at = (uint64_t)parse_num(a, v, s->lo, s->hi); break;
        case A_SIZE: *(double *)at = size_parse(a, v); break;
        default: *(const char **)at = v; break;
        }
    }
    o->w8a8 |= o->sq.static_act;
    o->policy_auto = o->policy != NULL;
    unsigned have = (o->w8a8 ? N_W8A8 : 0) | (o->int4 || o->compress_weight || o->compress_cache ? N_Q4 : 0) | (o->policy_auto ? N_AUTO : 0);
    for (size_t k = 0; k < N_SPECS; k++) {
        if (!given[k]) continue;
        o->offload |= opt_specs[k].offload;
        unsigned need = opt_specs[k].needs;
        if (need && !(need & have))
            for (int b = 0; b < 3; b++)
                if (need & 1u << b) die("%s applies only with %s (see opt %s --help)", opt_specs[k].name, need_names[b], o->cmd);
    }
    for (size_t q = 0; q < sizeof opt_conflicts / sizeof *opt_conflicts; q++)
        if (given[spec_find(opt_conflicts[q][0])] && given[spec_find(opt_conflicts[q][1])])
            die("%s and %s cannot be used together (see opt %s --help)", opt_conflicts[q][0], opt_conflicts[q][1], o->cmd);
    /* asking for top-k or top-p is asking to sample; greedy would ignore them */
    bool filter = o->sc.top_k > 0 || o->sc.top_p < 1;
    int t = spec_find("--temperature");
    if (filter && given[t] && o->sc.temperature == 0)
        die("%s needs sampling: --temperature 0 is greedy and would ignore it (leave --temperature out to sample at 1)",
            o->sc.top_k > 0 ? "--top-k" : "--top-p");
    if (filter && !given[t]) o->sc.temperature = 1;
}

/* --- input: one item per line, escapes decoded, UTF-8 checked --- */

typedef struct {
    FILE *f;               /* the stream */
    const char *name;      /* file name or "<stdin>", for messages */
    int line;              /* current line number */
    char *buf; size_t cap; /* getline buffer */
} Input;

static void input_open(Input *in, const char *file) {
    memset(in, 0, sizeof *in);
    bool std = !file || !strcmp(file, "-");
    in->name = std ? "<stdin>" : file;
    in->f = std ? stdin : fopen(file, "rb");
    if (!in->f) die("%s: %s", file, strerror(errno));
}

static void input_close(Input *in) { /* a zeroed or closed in too */
    if (in->f && in->f != stdin) fclose(in->f);
    free(in->buf);
    memset(in, 0, sizeof *in);
}

/* Next line without its newline, escapes decoded in place; false at EOF.
 * Editors' artifacts are not text: a byte order mark opening the input and
 * the CR of a CRLF line end are dropped, so they never become tokens. */
static bool input_line(Input *in, char **text, size_t *len, bool unescape) {
    ssize_t got = getline(&in->buf, &in->cap, in->f);
    if (got < 0) {
        if (ferror(in->f)) die("%s: read error: %s", in->name, strerror(errno));
        return false;
    }
    in->line++;
    size_t n = (size_t)got, r = 0;
    if (n && in->buf[n - 1] == '\n') {
        n--;
        if (n && in->buf[n - 1] == '\r') n--;
    }
    if (in->line == 1 && n >= 3 && !memcmp(in->buf, "\xEF\xBB\xBF", 3)) r = 3;
    size_t ok = r + utf8_valid_prefix(in->buf + r, n - r);
    if (ok < n) die("%s:%d: invalid UTF-8 at byte %zu", in->name, in->line, ok + 1);
    size_t w = 0;
    for (; r < n; r++) {
        char c = in->buf[r];
        if (unescape && c == '\\' && r + 1 < n && strchr("nt\\", in->buf[r + 1])) {
            c = in->buf[++r];
            c = c == 'n' ? '\n' : c == 't' ? '\t' : '\\';
        }
        in->buf[w++] = c;
    }
    in->buf[w] = 0;
    *text = in->buf;
    *len = w;
    return true;
}

/* Writes text with newline, tab and backslash escaped; invalid UTF-8 (a
 * generation cut inside a character) becomes U+FFFD as in HF's decode. */
static void write_escaped(FILE *f, const char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        unsigned cp;
        int k = utf8_len((const unsigned char *)s + i, n - i, &cp);
        if (!k) { fputs("\xEF\xBF\xBD", f); i += (size_t)utf8_bad_len((const unsigned char *)s + i, n - i); continue; }
        if (s[i] == '\\') fputs("\\\\", f);
        else if (s[i] == '\n') fputs("\\n", f);
        else if (s[i] == '\t') fputs("\\t", f);
        else fwrite(s + i, 1, (size_t)k, f);
        i += (size_t)k;
    }
}

static void parse_ids(const char *s, const char *where, int line, int vocab, int **ids, int *n) {
    int cap = 16;
    *ids = check_malloc(sizeof(int) * (size_t)cap, "ids");
    *n = 0;
    for (const char *p = s;;) {
        while (*p == ' ' || *p == '\t' || *p == ',') p++;
        if (!*p) break;
        char *e;
        errno = 0;
        long v = strtol(p, &e, 10);
        if (e == p || errno || v < 0 || v >= vocab || (*e && *e != ' ' && *e != '\t' && *e != ','))
            die("%s:%d: token ids must be integers in [0, %d)", where, line, vocab);
        if (*n == cap) *ids = check_realloc(*ids, sizeof(int) * (size_t)(cap *= 2), "ids");
        (*ids)[(*n)++] = (int)v;
        p = e;
    }
}

/* --- generate and score --- */

typedef struct {
    const Opts *o;         /* options */
    const Tokenizer *tok;  /* for text in and out */
    FILE *out;             /* stdout */
    size_t streamed;       /* --stream: bytes of the completion already printed */
} Printer;

static void piece_append(const Tokenizer *tok, Buf *b, int id) {
    size_t n;
    const char *p = tok_piece(tok, id, &n);
    if (p) buf_put(b, p, n);
}

static void print_ids(FILE *f, const int *ids, int n) {
    for (int i = 0; i < n; i++) fprintf(f, i ? " %d" : "%d", ids[i]);
}

static void emit_generate(void *ctx, Job *j, int index) {
    Printer *p = ctx;
    Buf b = {0};
    for (int i = 0; i < j->n_out; i++) piece_append(p->tok, &b, j->out[i]);
    if (p->o->stream) { /* the rest of the completion, raw, then the end of the line */
        if (b.n > p->streamed) fwrite(b.p + p->streamed, 1, b.n - p->streamed, p->out);
        fputc('\n', p->out);
    } else if (p->o->jsonl) {
        fprintf(p->out, "{\"index\": %d, \"prompt\": ", index);
        if (j->text) json_write_str(p->out, j->text, j->text_len);
        else {
            fputc('[', p->out);
            for (int i = 0; i < j->n_ids; i++) fprintf(p->out, i ? ", %d" : "%d", j->ids[i]);
            fputc(']', p->out);
        }
        fputs(", \"completion\": ", p->out);
        json_write_str(p->out, b.p ? b.p : "", b.n);
        fputs(", \"ids\": [", p->out);
        for (int i = 0; i < j->n_out; i++) fprintf(p->out, i ? ", %d" : "%d", j->out[i]);
        fputs("]}\n", p->out);
    } else if (p->o->ids) {
        print_ids(p->out, j->out, j->n_out);
        fputc('\n', p->out);
    } else {
        write_escaped(p->out, b.p ? b.p : "", b.n);
        fputc('\n', p->out);
    }
    if (fflush(p->out) != 0 || ferror(p->out)) die("<stdout>: write failed: %s", strerror(errno));
    free(b.p);
    free(j->ids); free(j->out); free(j->text);
    j->ids = j->out = NULL; j->text = NULL;
}

/* --stream: print what the new token completes (whole UTF-8 characters only). */
static void stream_token(void *ctx, Job *j, int index) {
    (void)index;
    Printer *p = ctx;
    Buf b = {0};
    for (int i = 0; i < j->n_out; i++) piece_append(p->tok, &b, j->out[i]);
    size_t end = b.n;
    while (end > p->streamed && end > 0 && ((unsigned char)b.p[end - 1] & 0xC0) == 0x80) end--;
    if (end > p->streamed && end > 0 && (unsigned char)b.p[end - 1] >= 0xC0) {
        unsigned cp; /* a lead byte: keep it back until its character is complete */
        if (!utf8_len((const unsigned char *)b.p + end - 1, b.n - end + 1, &cp)) end--; else end = b.n;
    } else end = b.n;
    if (end > p->streamed) {
        fwrite(b.p + p->streamed, 1, end - p->streamed, p->out);
        fflush(p->out);
        p->streamed = end;
    }
    free(b.p);
}

static void emit_score(void *ctx, Job *j, int index) {
    Printer *p = ctx;
    int n = j->n_ids - 1;
    if (p->o->jsonl) {
        double sum = 0;
        for (int i = 0; i < n; i++) sum += j->lp[i];
        fprintf(p->out, "{\"index\": %d, \"tokens\": [", index);
        for (int i = 0; i < j->n_ids; i++) {
            size_t len;
            const char *s = tok_piece(p->tok, j->ids[i], &len);
            if (i) fputs(", ", p->out);
            json_write_str(p->out, s ? s : "", s ? len : 0);
        }
        fputs("], \"ids\": [", p->out);
        for (int i = 0; i < j->n_ids; i++) fprintf(p->out, i ? ", %d" : "%d", j->ids[i]);
        fputs("], \"logprobs\": [", p->out);
        for (int i = 0; i < n; i++) fprintf(p->out, i ? ", %.9g" : "%.9g", j->lp[i]);
        fprintf(p->out, "], \"perplexity\": %.9g}\n", n ? exp(-sum / n) : 1.0);
    } else {
        for (int i = 0; i < n; i++) fprintf(p->out, i ? " %.9g" : "%.9g", j->lp[i]);
        fputc('\n', p->out);
    }
    if (fflush(p->out) != 0 || ferror(p->out)) die("<stdout>: write failed: %s", strerror(errno));
    free(j->ids); free(j->lp); free(j->text);
    j->ids = NULL; j->lp = NULL; j->text = NULL;
}

static Tokenizer *tokenizer_for(const char *dir) {
    if (dir) {
        char *v = path_join(dir, "vocab.json"), *m = path_join(dir, "merges.txt");
        bool have = file_exists(v) && file_exists(m);
        free(v); free(m);
        if (have) return tok_load(dir);
    }
    Tokenizer *t = check_calloc(sizeof *t, "the tokenizer");
    tok_load_text(t, opt_vocab_json, (size_t)(opt_vocab_json_end - opt_vocab_json), "built-in vocab.json", opt_merges_txt,
                  (size_t)(opt_merges_txt_end - opt_merges_txt), "built-in merges.txt");
    return t;
}

/* The prompts as jobs, and what reading them holds, so that jobs_free frees
 * all of it after a die() too (the fuzz harness goes on). */
typedef struct {
    Job *job;  /* (n) the jobs; while reading, the last may be half-built */
    int n;     /* jobs begun */
    int cap;   /* capacity of job */
    Input in;  /* the prompt file while it is read */
    Json *obj; /* the --jsonl line being read, parsed */
} Jobs;

static void jobs_free(Jobs *js) {
    for (int i = 0; i < js->n; i++) { Job *j = &js->job[i]; free(j->ids); free(j->out); free(j->lp); free(j->text); }
    free(js->job);
    input_close(&js->in);
    json_free(js->obj);
    memset(js, 0, sizeof *js);
}

/* Reads every input line into the zeroed js (validating all of it before any work). */
static void read_jobs(const Opts *o, const Tokenizer *tok, const Config *c, Jobs *js) {
    Input *in = &js->in;
    input_open(in, o->file);
    char *text;
    size_t len;
    bool score = !strcmp(o->cmd, "score"), left = o->truncate && !strcmp(o->truncate, "left");
    int limit = c->max_pos - (score ? 0 : o->max_new), n_cut = 0; /* prompt tokens that fit */
    char less[32] = "";
    if (!score) snprintf(less, sizeof less, " less -n %d", o->max_new);
    while (input_line(in, &text, &len, !o->jsonl)) {
        if (o->jsonl && strspn(text, " \t") == len) continue; /* blank: no prompt; "index" counts prompts */
        if (js->n == js->cap) js->job = check_realloc(js->job, sizeof(Job) * (size_t)(js->cap = js->cap ? 2 * js->cap : 64), "jobs");
        Job *j = &js->job[js->n++];
        memset(j, 0, sizeof *j);
        j->line = in->line;
        const char *src = text;
        size_t srclen = len;
        if (o->jsonl) {
            char err[128];
            const Json *obj = js->obj = json_parse(text, len, err, sizeof err);
            if (!obj || obj->type != J_OBJ) die("%s:%d: not a JSON object%s%s", in->name, in->line, obj ? "" : ": ", obj ? "" : err);
            const Json *pr = json_get(obj, "prompt"), *ids = json_get(obj, "ids");
            if (ids && ids->type == J_ARR) {
                j->ids = check_malloc(sizeof(int) * (size_t)(ids->n + 1), "ids");
                for (int i = 0; i < ids->n; i++) {
                    const Json *v = &ids->kids[i];
                    if (v->type != J_NUM || v->num < 0 || v->num >= c->vocab || v->num != floor(v->num))
                        die("%s:%d: \"ids\" must hold integers in [0, %d)", in->name, in->line, c->vocab);
                    j->ids[j->n_ids++] = (int)v->num;
                }
            } else if (pr && pr->type == J_STR) { src = pr->str; srclen = pr->len; }
            else die("%s:%d: expected {\"prompt\": \"...\"} or {\"ids\": [...]}", in->name, in->line);
        }
        if (!j->ids) {
            if (o->ids && !o->jsonl) parse_ids(src, in->name, in->line, c->vocab, &j->ids, &j->n_ids);
            else {
                int *tmp = NULL, tcap = 0, k = tok_encode(tok, src, srclen, &tmp, &tcap);
                j->ids = check_malloc(sizeof(int) * (size_t)(k + 1), "ids");
                j->ids[0] = c->bos; /* OPT's tokenizer prepends </s> */
                if (k) memcpy(j->ids + 1, tmp, sizeof(int) * (size_t)k); /* an empty line is BOS alone, and tmp NULL */
                j->n_ids = k + 1;
                free(tmp);
            }
            if (o->jsonl || !o->ids) { j->text = check_malloc(srclen + 1, "prompt"); memcpy(j->text, src, srclen); j->text_len = srclen; }
        }
        json_free(js->obj);
        js->obj = NULL;
        if (j->n_ids == 0) die("%s:%d: no tokens", in->name, in->line);
        for (int i = 0; i < j->n_ids; i++) /* a small model's vocabulary may not hold every tokenizer id */
            if (j->ids[i] >= c->vocab) die("%s:%d: token %d is outside the model's vocabulary of %d", in->name, in->line, j->ids[i], c->vocab);
        if (j->n_ids > limit) {
            if (limit < 1) die("%s:%d: -n %d leaves no room for a prompt in the model's %d positions", in->name, in->line, o->max_new, c->max_pos);
            if (!left)
                die("%s:%d: %d prompt tokens, more than the %d that fit (the model's %d positions%s; see --truncate)", in->name, in->line,
                    j->n_ids, limit, c->max_pos, less);
            memmove(j->ids + 1, j->ids + j->n_ids - (limit - 1), sizeof(int) * (size_t)(limit - 1)); /* BOS and the last tokens */
            j->n_ids = limit;
            n_cut++;
        }
        if (score) j->lp = check_malloc(sizeof(float) * (size_t)(j->n_ids > 1 ? j->n_ids - 1 : 1), "log-probs");
        else j->out = check_malloc(sizeof(int) * (size_t)(o->max_new + 1), "generated ids");
        rng_seed(j->rng, o->seed, (uint64_t)(js->n - 1));
    }
    input_close(in);
    if (n_cut)
        fprintf(stderr, "opt: --truncate left: %d of %d prompts were longer than %d tokens (the model's %d positions%s); kept the first token and the last %d of each\n",
                n_cut, js->n, limit, c->max_pos, less, limit - 1);
}

/* --policy auto: the cost model's best policy for this workload and these
 * budgets, on the hardware --hw names or, without it, this machine measured
 * now. The block is capped at the number of sequences there are. */
static void policy_auto(Opts *o, const Config *c, int prompt_len, int gen_len, int n_seq) {
    Hardware hw = {0};
    if (o->hw) hw_load(&hw, o->hw);
    else {
        GpuProbe gp = {0};
        int direct = 1;
        fprintf(stderr, "opt: --policy auto: measuring this machine (save `opt probe -o probe.json` and pass --hw probe.json to skip this)\n");
        hw_probe(&hw, &gp, o->off.dir ? o->off.dir : getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp", 256.0 * (1 << 20), &direct);
    }
    PlanReq rq;
    plan_req_default(&rq, &hw);
    rq.prompt_len = prompt_len;
    rq.gen_len = gen_len > 0 ? gen_len : 1;
    for (int t = 0; t < TIER_COUNT; t++) if (o->off.mem[t] > 0) rq.budget[t] = o->off.mem[t];
    rq.compress_weight = o->compress_weight;
    rq.compress_cache = o->compress_cache;
    rq.group_size = o->group;
    Policy p;
    PlanResult r;
    if (plan_search(c, &hw, &rq, &p, &r) < 0) {
        char b[3][32];
        for (int t = 0; t < TIER_COUNT; t++) size_format(b[t], sizeof b[t], r.need[t]);
        die("--policy auto: no policy fits these budgets; the smallest block needs --gpu-mem %s, --cpu-mem %s or --disk-mem %s", b[0], b[1], b[2]);
    }
    if (p.gpu_batch_size > n_seq) p.gpu_batch_size = n_seq;
    if (p.num_gpu_batches > (n_seq + p.gpu_batch_size - 1) / p.gpu_batch_size) p.num_gpu_batches = (n_seq + p.gpu_batch_size - 1) / p.gpu_batch_size;
    p.overlap = o->off.pol.overlap;
    p.pin_weights = p.pin_weights || o->off.pol.pin_weights;
    o->off.pol = p;
    fprintf(stderr, "opt: --policy auto chose --percent %g %g %g %g %g %g --gpu-batch-size %d --num-gpu-batches %d%s (predicted %.2f token/s on %s)\n",
            p.w_gpu, p.w_cpu, p.c_gpu, p.c_cpu, p.a_gpu, p.a_cpu, p.gpu_batch_size, p.num_gpu_batches, p.cpu_attention ? " --cpu-attention" : "",
            r.tput_total, hw.name);
}

/* --device: gpu when asked (or, for auto, when there is one and the model,
 * its cache and workspace fit in 90% of its free memory, or a placement
 * policy says what goes where); otherwise cpu. */
static int device_pick(const Opts *o, const Model *m, int slots, int cap, int rows) {
    const char *d = o->device ? o->device : getenv("OPT_DEVICE") && *getenv("OPT_DEVICE") ? getenv("OPT_DEVICE") : "auto";
    if (strcmp(d, "cpu") && strcmp(d, "gpu") && strcmp(d, "auto")) die("OPT_DEVICE=%s: expected cpu, gpu or auto", d);
    if (!strcmp(d, "cpu")) return 0;
    if (!strcmp(d, "gpu")) {
        if (!gpu_available()) die("--device gpu: no usable GPU (%s)", gpu_describe());
        return 1;
    }
    double fr = gpu_available() ? gpu_free_bytes() : 0; /* creates the context, which can fail too */
    if (!gpu_available()) { /* no driver or no device: a CPU machine, nothing to say */
        if (gpu_present()) fprintf(stderr, "opt: no usable GPU (%s); running on the CPU\n", gpu_describe());
        return 0;
    }
    if (o->offload) return 1; /* a placement policy streams what does not fit */
    const Config *c = &m->cfg;
    double kv = 2.0 * c->n_layer * (double)slots * c->hidden * cap * (o->compress_cache ? 0.5625 / 2 : 2);
    int wide = c->ffn > c->hidden ? c->ffn : c->hidden, lrows = strcmp(o->cmd, "score") ? slots : rows; /* rows needing logits */
    double act = 4.0 * rows * (6.0 * c->hidden + c->ffn + c->embed_dim) + 2.0 * rows * (wide > c->embed_dim ? wide : c->embed_dim)
                 + 4.0 * lrows * ((double)c->vocab + c->embed_dim) + (32 << 20); /* scratch, narrowed inputs, logits, cuBLASLt */
    double need = gpu_model_bytes(m) + kv + act;
    if (need > 0.9 * fr) {
        fprintf(stderr, "opt: the model needs %.1f GiB on the GPU, %.1f GiB are free; running on the CPU (see --percent to offload)\n",
                need / (1 << 30), fr / (1 << 30));
        return 0;
    }
    return 1;
}

/* The device a placement policy computes on: the GPU, or the host standing
 * in for one (OPT_HOST_DEVICE=1, tests), or none (the CPU). */
static const Device *off_device(int gpu) {
    const char *h = getenv("OPT_HOST_DEVICE");
    return gpu ? &gpu_device : h && !strcmp(h, "1") ? &host_device : NULL;
}

/* Rank 0 goes first through a step every rank would fail alike (the options,
 * the model's files): call with done = false before it, true after, so such
 * an error is printed once, by rank 0. */
static void pipe_first(bool done) {
    int ok = 1;
    if (g_comm && (g_comm->rank == 0) == done) g_comm->bcast(&ok, sizeof ok);
}

/* --- pipeline set-up (mpirun -np N): every rank runs the same command; rank 0
 * reads the input, and the ranks agree on the layers, the model and the block --- */

/* This rank's layers [*l0, *l1): --stages, else the cost model's split. */
static void pipe_layers(const Opts *o, const Config *c, int prompt_len, int gen_len, int *l0, int *l1) {
    int N = g_comm ? g_comm->size : 1, rank = g_comm ? g_comm->rank : 0, L = c->n_layer, *n = check_calloc(sizeof(int) * (size_t)N, "stages");
    if (o->stages) {
        const char *p = o->stages;
        int k = 0, sum = 0;
        for (; *p && k <= N; k++) {
            char *e;
            long v = strtol(p, &e, 10);
            if (e == p || v < 1 || v > L || (*e && *e != ',')) die("--stages %s: expected layer counts like 12,12, each at least 1", o->stages);
            if (k < N) n[k] = (int)v;
            sum += (int)v;
            p = *e ? e + 1 : e;
        }
        if (k != N) die("--stages %s: %d stages, but %d %s (mpirun -np %d)", o->stages, k, N, N == 1 ? "process runs" : "ranks run", k);
        if (sum != L) die("--stages %s: %d layers, but %s has %d", o->stages, sum, c->name, L);
    } else if (N > L || plan_stage_split(c, N, prompt_len, gen_len, n) < 0) die("%d pipeline stages for %d layers: at most one stage per layer", N, L);
    *l0 = 0;
    for (int i = 0; i < rank; i++) *l0 += n[i];
    *l1 = *l0 + n[rank];
    free(n);
}

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    for (size_t i = 0; i < n; i++) h = (h ^ ((const uint8_t *)p)[i]) * 0x100000001b3ull;
    return h;
}

/* What rank 0 compares every rank's against before any work. */
typedef struct {
    uint64_t model;        /* digest of the config and the checkpoint's file sizes */
    char version[32];      /* OPT_VERSION and build */
    char host[64];         /* for the message */
    int policy[3];         /* offloading or not, gpu_batch_size, num_gpu_batches */
} PipeId;

/* Same binary, same model, same block on every rank, else one line from rank 0. */
static void pipe_check(const Model *m, const Opts *o) {
    const Config *c = &m->cfg;
    PipeId me = {0}, *all = check_calloc(sizeof(PipeId) * (size_t)g_comm->size, "ranks");
    int cf[] = {m->n_layer_all, c->hidden, c->ffn, c->n_head, c->vocab, c->max_pos, c->embed_dim, c->pre_ln, c->final_ln, c->bias, c->ln_affine};
    me.model = fnv(0xcbf29ce484222325ull, cf, sizeof cf);
    for (int i = 0; i < m->ck.n_files; i++) me.model = fnv(me.model, &m->ck.files[i].size, sizeof m->ck.files[i].size);
    if (m->dummy) me.model = fnv(me.model, c->name, strlen(c->name));
#ifdef OPT_CUDA
    snprintf(me.version, sizeof me.version, "%s cuda", OPT_VERSION);
#else
    snprintf(me.version, sizeof me.version, "%s cpu", OPT_VERSION);
#endif
    snprintf(me.host, sizeof me.host, "%s", g_comm->host);
    me.policy[0] = o->offload;
    me.policy[1] = o->offload ? o->off.pol.gpu_batch_size : 0;
    me.policy[2] = o->offload ? o->off.pol.num_gpu_batches : 0;
    g_comm->gather(&me, sizeof me, all);
    for (int r = 1; g_comm->rank == 0 && r < g_comm->size; r++) {
        if (strcmp(all[r].version, me.version))
            die("rank %d on %s runs opt %s, rank 0 on %s runs %s: every rank needs the same binary", r, all[r].host, all[r].version, me.host, me.version);
        if (all[r].model != me.model)
            die("rank %d on %s loaded a different model than rank 0 on %s (config or file sizes differ): every rank needs the same -m", r, all[r].host, me.host);
        if (memcmp(all[r].policy, me.policy, sizeof me.policy))
            die("rank %d on %s has a block of %d x %d sequences%s, rank 0 on %s %d x %d%s: the stages need one block shape", r, all[r].host, all[r].policy[1],
                all[r].policy[2], all[r].policy[0] ? "" : " (no policy)", me.host, me.policy[1], me.policy[2], me.policy[0] ? "" : " (no policy)");
    }
    free(all);
}

/* --policy auto chooses per stage, for its own layers and node; the block is
 * the smallest of their choices, which fits every stage's memory. */
static void pipe_block(Opts *o) {
    int me[2] = {o->off.pol.gpu_batch_size, o->off.pol.num_gpu_batches}, *all = check_calloc(sizeof(int) * 2 * (size_t)g_comm->size, "ranks");
    g_comm->gather(me, sizeof me, all);
    for (int r = 1; r < g_comm->size; r++)
        for (int i = 0; i < 2; i++) if (all[2 * r + i] < all[i]) all[i] = all[2 * r + i];
    g_comm->bcast(all, sizeof me);
    o->off.pol.gpu_batch_size = all[0];
    o->off.pol.num_gpu_batches = all[1];
    free(all);
}

/* Groups in flight: --micro-batches, else one per stage; whole GPU batches under a policy. */
static int pipe_groups(const Opts *o, RunShape sh) {
    int N = g_comm->size, units = o->offload ? o->off.pol.num_gpu_batches : sh.slots, G = o->micro ? o->micro : N;
    if (o->micro > (o->offload ? units : o->batch) && g_comm->rank == 0)
        die("--micro-batches %d: more groups than the block's %d %s", G, o->offload ? units : o->batch, o->offload ? "GPU batches (--num-gpu-batches)" : "sequences (-b)");
    G = G < units ? G : units; /* fewer prompts than the block */
    if (G < N && g_comm->rank == 0)
        fprintf(stderr, "opt: the block splits into %d group%s for %d stages, so stages idle; give %s %d or more\n", G, G == 1 ? "" : "s", N,
                o->offload ? "--num-gpu-batches" : "-b", N);
    return G;
}

/* The engine on every rank: rank 0's jobs, the shape of the run and the
 * sequences' random streams (which the last stage samples with) sent to all. */
static void pipe_run(Opts *o, Engine *e, Job *jobs, int n_jobs) {
    RunShape sh = g_comm->rank == 0 ? engine_shape(e, jobs, n_jobs) : (RunShape){0};
    g_comm->bcast(&sh, sizeof sh);
    bool owned = !jobs;
    if (owned) jobs = check_calloc(sizeof(Job) * (size_t)n_jobs, "jobs");
    uint64_t *rng = check_malloc(sizeof(uint64_t) * 2 * (size_t)n_jobs, "random streams");
    for (int i = 0; g_comm->rank == 0 && i < n_jobs; i++) memcpy(rng + 2 * i, jobs[i].rng, sizeof jobs[i].rng);
    g_comm->bcast(rng, sizeof(uint64_t) * 2 * (size_t)n_jobs);
    for (int i = 0; i < n_jobs; i++) memcpy(jobs[i].rng, rng + 2 * i, sizeof jobs[i].rng);
    free(rng);
    engine_pipe(e, jobs, n_jobs, sh, pipe_groups(o, sh));
    if (owned) free(jobs);
}

/* A pipeline's offload files on a host live in one directory, named after
 * rank 0's PID, that every rank there removes when it ends, however it ends:
 * so a rank killed with SIGKILL leaves nothing once the others have exited.
 * Each rank keeps a file of its own in it, so that a dying rank removes the
 * directory only when no other rank there is using it; a rank creating it
 * again is one that came in after it was removed (and will remove it too). */
static void pipe_offload_dir(Opts *o) {
    static char dir[4000];
    char mine[4100];
    int pid0 = (int)getpid(), fd = -1;
    g_comm->bcast(&pid0, sizeof pid0);
    snprintf(dir, sizeof dir, "%s/opt-pipe-%d", o->off.dir ? o->off.dir : getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp", pid0);
    snprintf(mine, sizeof mine, "%s/rank-%d", dir, g_comm->rank);
    tmp_add(dir, 1);
    tmp_add(mine, 0);
    for (int tries = 0; fd < 0 && tries < 3; tries++) {
        if (mkdir(dir, 0700) != 0 && errno != EEXIST) break;
        if ((fd = open(mine, O_WRONLY | O_CREAT | O_TRUNC, 0600)) < 0 && errno != ENOENT) break;
    }
    if (fd < 0) die("%s: cannot create the offload directory: %s", dir, strerror(errno));
    close(fd);
    o->off.dir = dir;
}

/* A stage computes on the GPU through the offloading engine, which takes hidden
 * states in and out of device memory; without a policy it computes on the CPU. */
static int pipe_device(const Opts *o, int gpu) {
    if (!g_comm || !gpu || o->offload) return gpu;
    if (o->device && !strcmp(o->device, "gpu"))
        die("--device gpu: pipeline stages reach the GPU through a placement policy (e.g. --percent 100 0 100 0 100 0)");
    if (g_comm->rank == 0) fprintf(stderr, "opt: pipeline stages without a placement policy compute on the CPU (--percent 100 0 100 0 100 0 puts them on the GPU)\n");
    return 0;
}

/* A stage's model: its layers only, checked against every other rank's. */
static void pipe_model(const Opts *o, Model *m, int prompt_len, int gen_len) {
    int l0 = 0, l1 = m->cfg.n_layer;
    pipe_first(false);
    pipe_layers(o, &m->cfg, prompt_len, gen_len, &l0, &l1);
    pipe_first(true);
    if (g_comm) { model_stage(m, l0, l1); pipe_check(m, o); }
}

static void cmd_run(const Opts *o) {
    bool score = !strcmp(o->cmd, "score");
    if (!o->model) die("opt %s: -m DIR is required (see opt %s --help)", o->cmd, o->cmd);
    Model m;
    pipe_first(false);
    model_load(&m, o->model);
    pipe_first(true);
    Tokenizer *tok = NULL;
    Jobs js = {0};
    int n_jobs = 0, longest = 1, in[2]; /* a pipeline's input is rank 0's */
    if (!g_comm || g_comm->rank == 0) {
        tok = tokenizer_for(o->model);
        read_jobs(o, tok, &m.cfg, &js);
        n_jobs = js.n;
        for (int i = 0; i < n_jobs; i++) longest = js.job[i].n_ids > longest ? js.job[i].n_ids : longest;
    }
    Job *jobs = js.job;
    in[0] = n_jobs, in[1] = longest;
    if (g_comm) g_comm->bcast(in, sizeof in);
    n_jobs = in[0], longest = in[1];
    pipe_model(o, &m, longest, score ? 1 : o->max_new);
    if (o->compress_weight) model_compress(&m, o->group);
    compute_check(&m, o->model);
    if (!o->offload || o->compress_weight) model_materialize(&m);
    if (g_comm && o->offload) pipe_offload_dir((Opts *)o);
    if (o->policy_auto && n_jobs) policy_auto((Opts *)o, &m.cfg, longest, score ? 1 : o->max_new, n_jobs);
    if (g_comm && o->policy_auto) pipe_block((Opts *)o);
    if (o->stream && n_jobs != 1) die("--stream takes exactly one prompt (got %d)", n_jobs);
    Printer pr = {.o = o, .tok = tok, .out = stdout};
    int gpu = pipe_device(o, device_pick(o, &m, o->batch, longest + (score ? 0 : o->max_new), o->step_rows > o->batch ? o->step_rows : o->batch));
    ((Opts *)o)->off.dev = off_device(gpu);
    Engine e = {.m = &m, .gpu = gpu, .slots = o->batch, .max_new = o->max_new, .score = score, .ignore_eos = o->ignore_eos,
                .step_rows = o->step_rows, .sc = o->sc, .emit = score ? emit_score : emit_generate,
                .compress_cache = o->compress_cache, .group = o->group, .offcfg = o->offload ? &o->off : NULL,
                .on_token = o->stream ? stream_token : NULL, .ctx = &pr};
    if (g_comm && n_jobs) pipe_run((Opts *)o, &e, jobs, n_jobs);
    else engine_run(&e, jobs, n_jobs);
    jobs_free(&js);
    if (tok) tok_free(tok);
    model_free(&m);
}

static void cmd_tokenize(const Opts *o) {
    struct stat st; /* a mistyped -m must not pass silently for the built-in tokenizer */
    if (o->model && stat(o->model, &st)) die("-m %s: %s", o->model, strerror(errno));
    if (o->model && !S_ISDIR(st.st_mode) && !S_ISREG(st.st_mode)) die("-m %s: not a checkpoint directory or file", o->model);
    Tokenizer *tok = tokenizer_for(o->model);
    Input in;
    input_open(&in, o->file);
    char *text;
    size_t len;
    int *ids = NULL, cap = 0;
    while (input_line(&in, &text, &len, !o->decode)) {
        if (o->decode) {
            int *v, n;
            parse_ids(text, in.name, in.line, tok_count(tok), &v, &n);
            Buf b = {0};
            for (int i = 0; i < n; i++) piece_append(tok, &b, v[i]);
            write_escaped(stdout, b.p ? b.p : "", b.n);
            free(b.p);
            free(v);
        } else {
            int n = tok_encode(tok, text, len, &ids, &cap);
            if (!o->no_bos) fputs(n ? "2 " : "2", stdout);
            print_ids(stdout, ids, n);
        }
        fputc('\n', stdout);
    }
    free(ids);
    input_close(&in);
    tok_free(tok);
}

static void cmd_synth(const Opts *o) {
    if (!o->shape || !o->out) die("opt synth: --shape and -o DIR are required (see opt synth --help)");
    Config c;
    shape_config(&c, o->shape);
    SynthOpts so = {.out = o->out, .dtype = DT_F16, .shards = o->shards, .prefix = o->prefix ? o->prefix : "model.decoder.",
                    .tie = o->tie, .seed = o->seed};
    if (o->format && strcmp(o->format, "safetensors") && strcmp(o->format, "bin")) die("--format: expected safetensors or bin, got '%s'", o->format);
    so.bin = o->format && !strcmp(o->format, "bin");
    if (o->dtype && !strcmp(o->dtype, "f32")) so.dtype = DT_F32;
    else if (o->dtype && !strcmp(o->dtype, "bf16")) so.dtype = DT_BF16;
    else if (o->dtype && strcmp(o->dtype, "f16")) die("--dtype: expected f16, f32 or bf16, got '%s'", o->dtype);
    if (strcmp(so.prefix, "model.decoder.") && strcmp(so.prefix, "decoder.")) die("--prefix: expected model.decoder. or decoder.");
    if (o->outliers) { /* 4 fixed channels, 50-100x, chosen by the seed */
        if (!c.pre_ln) die("--outliers needs a pre-LayerNorm shape (every OPT size but 350m)");
        uint64_t r = o->seed ^ 0x5EEDull;
        so.n_out = c.hidden >= 64 ? 4 : 1;
        for (int k = 0; k < so.n_out; k++) {
            int ch;
            bool dup;
            do {
                ch = (int)(splitmix64(&r) % (uint64_t)c.hidden);
                dup = false;
                for (int q = 0; q < k; q++) dup |= so.out_ch[q] == ch;
            } while (dup);
            so.out_ch[k] = ch;
            so.out_f[k] = 50.0f + 50.0f * (float)(splitmix64(&r) >> 11) * 0x1.0p-53f;
        }
    }
    synth_write(&c, &so);
    fprintf(stderr, "opt: wrote %s (%s, %.1fM parameters, %s)\n", o->out, o->shape, (double)config_params(&c) / 1e6, dtype_names[so.dtype]);
}

static void cmd_convert(const Opts *o) {
    if (!o->model || !o->out) die("opt convert: -m DIR and -o FILE are required (see opt convert --help)");
    if (o->w8a8 && o->int4) die("opt convert: --w8a8 and --int4-weights are alternatives");
    if (o->w8a8 && !o->sq.calib) die("opt convert: --w8a8 needs --calib FILE (calibration text)");
    Model m;
    model_load(&m, o->model);
    DType q = m.layers[0].q.dtype; /* quantizing twice compounds the error: start from the floats */
    if ((o->int4 || o->w8a8) && (q == DT_Q4 || q == DT_I8))
        die("%s: already quantized (%s); %s converts a float checkpoint", o->model, q == DT_Q4 ? "4-bit weights" : "W8A8", o->int4 ? "--int4-weights" : "--w8a8");
    if (o->w8a8) {
        Tokenizer *tok = tokenizer_for(o->model);
        sq_convert(&m, tok, &o->sq);
        tok_free(tok);
    }
    native_write(&m, o->out, o->int4 ? o->group : 0);
    struct stat st;
    stat(o->out, &st);
    fprintf(stderr, "opt: wrote %s (%.2f GiB%s)\n", o->out, (double)st.st_size / (1 << 30),
            o->int4 ? ", 4-bit weights" : o->w8a8 ? (o->sq.static_act ? ", W8A8 static" : ", W8A8") : "");
    model_free(&m);
}

long meminfo_kb(const char *key) {
    FILE *f = fopen("/proc/meminfo", "r");
    char line[256];
    long v = -1;
    size_t kl = strlen(key);
    while (f && fgets(line, sizeof line, f)) if (!strncmp(line, key, kl)) v = atol(line + kl);
    if (f) fclose(f);
    return v;
}

static long peak_rss_kb(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long v = -1;
    while (f && fgets(line, sizeof line, f)) if (!strncmp(line, "VmHWM:", 6)) v = atol(line + 6);
    if (f) fclose(f);
    return v;
}

static void cmd_info(const Opts *o) {
    if (!o->model) die("opt info: -m DIR is required");
    Model m;
    model_load(&m, o->model);
    const Config *c = &m.cfg;
    printf("model        %s\n", o->model);
    printf("layers       %d\nhidden       %d\nffn          %d\nheads        %d (head_dim %d)\n", c->n_layer, c->hidden, c->ffn, c->n_head, c->head_dim);
    printf("vocab        %d\npositions    %d\nembed_dim    %d%s\n", c->vocab, c->max_pos, c->embed_dim, c->embed_dim != c->hidden ? " (project_in/out)" : "");
    printf("layer norm   %s%s%s\n", c->pre_ln ? "pre-LN" : "post-LN", c->final_ln ? ", final LayerNorm" : ", no final LayerNorm", c->ln_affine ? "" : ", not affine");
    int tied = m.lm_head.data == m.embed.data;
    printf("bias         %s\nlm_head      %s\n", c->bias ? "yes" : "no", tied ? "tied to embed_tokens" : "separate");
    int64_t n_params = config_params(c) + (tied ? 0 : (int64_t)c->vocab * c->embed_dim);
    printf("parameters   %lld (%.2fB)\n", (long long)n_params, (double)n_params / 1e9);
    if (m.layers[0].q.dtype == DT_I8)
        printf("quantization W8A8 (SmoothQuant), %s activation scales\n", m.layers[0].q.act_scale > 0 ? "static per-tensor" : "dynamic per-token");
    else if (m.layers[0].q.dtype == DT_Q4)
        printf("quantization 4-bit weights, groups of %d\n", m.layers[0].q.group);
    size_t bytes[DT_COUNT] = {0}, params[DT_COUNT] = {0};
    for (int i = 0; i < m.ck.n; i++) { /* 4-bit and int8 data are stored as bytes; scales and the like are not parameters */
        const CkTensor *t = &m.ck.t[i];
        size_t k = strlen(t->key), n = (size_t)ck_numel(t);
        const Json *cols = t->dtype == DT_Q4 ? json_get(model_format(&m, t->key), "cols") : NULL;
        bytes[t->dtype] += t->dtype == DT_Q4 ? n : dtype_bytes(t->dtype, (int64_t)n);
        if ((k > 7 && !strcmp(t->key + k - 7, ".weight")) || (k > 5 && !strcmp(t->key + k - 5, ".bias")))
            if (!(tied && !strcmp(t->key, "lm_head.weight"))) /* the embedding again */
                params[t->dtype] += cols ? (size_t)t->shape[0] * (size_t)cols->num : n;
    }
    for (int d = 0; d < DT_COUNT; d++)
        if (bytes[d]) printf("dtype %-6s %zu parameters, %.2f GiB\n", dtype_names[d], params[d], (double)bytes[d] / (1 << 30));
    printf("files        %d\n", m.ck.n_files);
    for (int i = 0; i < m.ck.n_files; i++) printf("  %s (%.2f GiB)\n", m.ck.files[i].path, (double)m.ck.files[i].size / (1 << 30));
    printf("machine      %d threads, SIMD %s (best %s)%s, %.1f GiB RAM (%.1f GiB available)\n", omp_get_max_threads(), simd_names[g_simd],
           simd_names[g_simd_max], g_vnni ? ", AVX-512 VNNI" : "", (double)meminfo_kb("MemTotal:") / (1 << 20), (double)meminfo_kb("MemAvailable:") / (1 << 20));
    printf("gpu          %s\n", gpu_describe());
    model_free(&m);
}

static void bench_emit(void *ctx, Job *j, int index) {
    (void)ctx; (void)index;
    free(j->ids); free(j->out);
    j->ids = j->out = NULL;
}

static void cmd_bench(const Opts *o) {
    if (!o->model) die("opt bench: -m DIR is required");
    Model m;
    pipe_first(false);
    model_load(&m, o->model);
    pipe_first(true);
    int P = o->prompt_len ? o->prompt_len : 512, G = o->gen_len ? o->gen_len : 32;
    pipe_model(o, &m, P, G);
    if (o->compress_weight) model_compress(&m, o->group);
    compute_check(&m, o->model);
    if (!o->offload || o->compress_weight) model_materialize(&m);
    if (g_comm && o->offload) pipe_offload_dir((Opts *)o);
    if (o->policy_auto) policy_auto((Opts *)o, &m.cfg, P, G, 1 << 20);
    if (g_comm && o->policy_auto) pipe_block((Opts *)o);
    int B = o->offload ? o->off.pol.gpu_batch_size * o->off.pol.num_gpu_batches : o->batch;
    int gpu = pipe_device(o, device_pick(o, &m, B, P + G, B * P > o->step_rows ? B * P : o->step_rows));
    ((Opts *)o)->off.dev = off_device(gpu);
    if (P + G > m.cfg.max_pos) die("--prompt-len %d + --gen-len %d exceed the model's %d positions", P, G, m.cfg.max_pos);
    for (int pass = o->offload; pass < 2; pass++) { /* pass 0 warms the page cache and the allocator; offloading reads for real */
        int n = pass ? B : 1, p = pass ? P : 8, g = pass ? G : 2;
        Job *jobs = check_calloc(sizeof(Job) * (size_t)n, "jobs");
        uint64_t r = 42;
        for (int i = 0; i < n; i++) {
            jobs[i].ids = check_malloc(sizeof(int) * (size_t)p, "ids");
            jobs[i].out = check_malloc(sizeof(int) * (size_t)g, "ids");
            jobs[i].n_ids = p;
            jobs[i].ids[0] = 2;
            for (int t = 1; t < p; t++) jobs[i].ids[t] = 4 + (int)(splitmix64(&r) % (uint64_t)(m.cfg.vocab > 50004 ? 50000 : m.cfg.vocab - 4));
        }
        Engine e = {.m = &m, .gpu = gpu, .slots = n, .max_new = g, .ignore_eos = 1, .step_rows = o->step_rows > n * p ? o->step_rows : n * p,
                    .emit = bench_emit, .compress_cache = o->compress_cache, .group = o->group,
                    .offcfg = pass && o->offload ? &o->off : NULL};
        double p0[2];
        gpu_profile(p0);
        if (g_comm) pipe_run((Opts *)o, &e, jobs, n); /* every rank makes the same jobs */
        else engine_run(&e, jobs, n);
        free(jobs);
        if (!pass || (g_comm && g_comm->rank > 0)) continue;
        double pre = e.t_prefill, dec = e.t_decode;
        double pre_tp = (double)B * P / pre, dec_tp = G > 1 ? (double)B * (G - 1) / dec : 0, tot = (double)B * G / (pre + dec);
        double peak = (double)peak_rss_kb() / (1 << 20), G2 = 1 << 30;
        const OffloadStats *os = &e.ostats;
        double wall = pre + dec, overlap = o->offload ? fmax(0, os->t_compute + os->io_busy - wall) / wall : 0;
        if (o->json) {
            printf("{\"model\": \"%s\", \"prompt_len\": %d, \"gen_len\": %d, \"batch\": %d, \"threads\": %d, \"simd\": \"%s\", "
                   "\"prefill_latency_s\": %.6f, \"prefill_throughput\": %.3f, \"decode_latency_s\": %.6f, \"decode_throughput\": %.3f, "
                   "\"total_throughput\": %.3f, \"peak_rss_gib\": %.3f",
                   o->model, P, G, B, omp_get_max_threads(), simd_names[g_simd], pre, pre_tp, dec, dec_tp, tot, peak);
            double pm[2];
            if (gpu && gpu_profile(pm)) printf(", \"gpu_gemm_ms\": %.3f, \"gpu_other_ms\": %.3f", pm[0] - p0[0], pm[1] - p0[1]);
            if (o->offload)
                printf(", \"peak_gpu_gib\": %.4f, \"peak_cpu_gib\": %.4f, \"peak_disk_gib\": %.4f, \"plan_gpu_gib\": %.4f, \"plan_cpu_gib\": %.4f, \"plan_disk_gib\": %.4f, "
                       "\"h2d_gib\": %.4f, \"d2h_gib\": %.4f, \"disk_read_gib\": %.4f, \"disk_write_gib\": %.4f, \"disk_read_gibps\": %.4f, \"disk_write_gibps\": %.4f, "
                       "\"compute_s\": %.4f, \"io_wait_s\": %.4f, \"io_busy_s\": %.4f, \"overlap_fraction\": %.4f",
                       os->peak[TIER_GPU] / G2, os->peak[TIER_CPU] / G2, os->peak[TIER_DISK] / G2, os->plan[TIER_GPU] / G2, os->plan[TIER_CPU] / G2, os->plan[TIER_DISK] / G2,
                       os->h2d_bytes / G2, os->d2h_bytes / G2, os->read_bytes / G2, os->write_bytes / G2, os->read_bw / G2, os->write_bw / G2, os->t_compute, os->t_wait, os->io_busy, overlap);
            printf("}\n");
        } else {
            printf("model %s: prompt %d, generate %d, batch %d, %d threads, %s\n"
                   "prefill  latency %.3f s   throughput %.1f token/s\n"
                   "decode   latency %.3f s   throughput %.2f token/s (%.1f ms/step)\n"
                   "total    throughput %.2f token/s\n"
                   "peak memory %.2f GiB (resident, mapped weights included)\n",
                   o->model, P, G, B, omp_get_max_threads(), simd_names[g_simd], pre, pre_tp, dec, dec_tp,
                   G > 1 ? 1000 * dec / (G - 1) : 0, tot, peak);
            double pm[2];
            if (gpu && gpu_profile(pm)) {
                pm[0] -= p0[0], pm[1] -= p0[1];
                printf("gpu      %.1f ms in GEMMs, %.1f ms in the other kernels (%.0f%% of kernel time)\n", pm[0], pm[1], 100 * pm[1] / (pm[0] + pm[1] + 1e-9));
            }
            if (o->offload && o->off.dev)
                printf("pcie     up %.3f GiB, down %.3f GiB: %.2f GiB/s over the run\n", os->h2d_bytes / G2, os->d2h_bytes / G2,
                       (os->h2d_bytes + os->d2h_bytes) / G2 / (pre + dec + 1e-9));
            if (o->offload)
                printf("tiers    accounted peak gpu %.3f / cpu %.3f / disk %.3f GiB (plan: gpu %.3f, cpu %.3f, disk %.3f)\n"
                       "disk     read %.3f GiB at %.2f GiB/s, wrote %.3f GiB at %.2f GiB/s\n"
                       "overlap  compute %.2f s, waiting for I/O %.2f s, I/O busy %.2f s: %.0f%% of the time both ran\n",
                       os->peak[TIER_GPU] / G2, os->peak[TIER_CPU] / G2, os->peak[TIER_DISK] / G2, os->plan[TIER_GPU] / G2, os->plan[TIER_CPU] / G2, os->plan[TIER_DISK] / G2,
                       os->read_bytes / G2, os->read_bw / G2, os->write_bytes / G2, os->write_bw / G2, os->t_compute, os->t_wait, os->io_busy, 100 * overlap);
        }
    }
    model_free(&m);
}

#ifndef OPT_CUDA /* stand-ins: --device auto never picks the GPU here, and --device gpu dies first */
int gpu_available(void) { return 0; }
int gpu_present(void) { return 0; }
const char *gpu_describe(void) { return "none (this binary was built without CUDA)"; }
const Backend gpu_backend = {"gpu", NULL, NULL, NULL, NULL, NULL, NULL, NULL};
const Device gpu_device = {"gpu", 1, &gpu_backend, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
#define NO_GPU die("this binary was built without CUDA")
void gpu_model_upload(const Model *m, Model *dev) { (void)m; (void)dev; NO_GPU; }
Tensor gpu_tensor_upload(const Tensor *t) { (void)t; NO_GPU; }
double gpu_model_bytes(const Model *m) { (void)m; return 0; }
double gpu_free_bytes(void) { return 0; }
void gpu_scratch_init(Scratch *s, const Config *c, int rows, int cap) { (void)s; (void)c; (void)rows; (void)cap; NO_GPU; }
void gpu_scratch_free(Scratch *s) { (void)s; }
void gpu_kv_init(KVCache *kv, const Config *c, int n_slot, int cap, DType dt, int group) { (void)kv; (void)c; (void)n_slot; (void)cap; (void)dt; (void)group; NO_GPU; }
void gpu_kv_free(KVCache *kv) { (void)kv; }
void gpu_step_upload(Step *st, Scratch *s) { (void)st; (void)s; NO_GPU; }
void gpu_sync(void) {}
void gpu_logits(const Model *dm, const float *fin, int ld, const int *rows, int cnt, const int *target, float temp, int topk, float topp,
                const float *u, int *tok, float *lp) {
    (void)dm; (void)fin; (void)ld; (void)rows; (void)cnt; (void)target; (void)temp; (void)topk; (void)topp; (void)u; (void)tok; (void)lp; NO_GPU;
}
int gpu_graph_launch(int n) { (void)n; return 0; }
void gpu_capture_begin(void) { NO_GPU; }
void gpu_capture_end(int n) { (void)n; NO_GPU; }
void gpu_graphs_reset(void) {}
int gpu_profile(double ms[2]) { if (ms) ms[0] = ms[1] = 0; return 0; }
#undef NO_GPU
#endif

#ifndef OPT_NO_MAIN
int main(int argc, char **argv) {
#ifdef OPT_MPI
    if (pipe_start(&argc, &argv)) {
        static char prog[160];
        snprintf(prog, sizeof prog, "opt (rank %d on %s)", g_comm->rank, g_comm->host);
        g_prog = prog;
    }
#endif
    simd_init();
    Opts o = {.cmd = "generate", .batch = 16, .group = 64, .sq = {.alpha = 0.5f, .samples = 512, .len = 512},
              .off = {.pol = {.gpu_batch_size = 16, .num_gpu_batches = 1, .w_cpu = 100, .c_cpu = 100, .a_cpu = 100, .overlap = 1, .group_size = 64}}, .max_new = 32, .sc = {.temperature = 0, .top_k = 0, .top_p = 1}, .tie = 1, .step_rows = 1024};
    int first = 1, rc = 0;
    const char *a1 = argc > 1 ? argv[1] : "";
    if (argc > 1 && (a1[0] != '-' || !strcmp(a1, "--version"))) { o.cmd = a1[0] != '-' ? a1 : "version"; first = 2; }
    bool known = false;
    for (size_t i = 0; i < sizeof cmd_names / sizeof *cmd_names; i++) known |= !strcmp(o.cmd, cmd_names[i]);
    if (g_comm && strcmp(o.cmd, "generate") && strcmp(o.cmd, "score") && strcmp(o.cmd, "bench")) {
        pipe_first(false);
        die("opt %s runs in one process; generate, score and bench run as pipeline stages (without mpirun: %s)", o.cmd, o.cmd);
    }
    if (is_help(a1)) usage(stdout);
    else if (!strcmp(o.cmd, "help")) cmd_help(argc > 2 ? argv[2] : NULL);
    else if (!strcmp(o.cmd, "lp")) rc = lp_main(argc - 1, argv + 1);
    else if (!strcmp(o.cmd, "plan")) rc = plan_main(argc - 1, argv + 1);
    else if (!strcmp(o.cmd, "probe")) rc = probe_main(argc - 1, argv + 1);
    else if (!known) { fprintf(stderr, "opt: unknown command '%s' (see opt --help)\n", o.cmd); return 2; }
    else {
        pipe_first(false);
        opts_parse(&o, argc - first, argv + first);
        pipe_first(true);
        if (o.threads) omp_set_num_threads(o.threads);
        compute_set(o.compute);
        if (o.help) cmd_help(o.cmd);
        else if (!strcmp(o.cmd, "generate") || !strcmp(o.cmd, "score")) cmd_run(&o);
        else if (!strcmp(o.cmd, "tokenize")) cmd_tokenize(&o);
        else if (!strcmp(o.cmd, "synth")) cmd_synth(&o);
        else if (!strcmp(o.cmd, "info")) cmd_info(&o);
        else if (!strcmp(o.cmd, "bench")) cmd_bench(&o);
        else if (!strcmp(o.cmd, "convert")) cmd_convert(&o);
        else if (!strcmp(o.cmd, "version")) cmd_version();
    }
    /* data on stdout is complete only if it reached its file: a full disk is an error */
    int bad = fflush(stdout), err = errno;
    if (bad || ferror(stdout)) die("<stdout>: write failed: %s", strerror(bad ? err : EIO));
#ifdef OPT_MPI
    pipe_end();
#endif
    return rc;
}
#endif
