/* tests/fuzz/targets.c: one harness per parser, calling it directly on arbitrary bytes.
 *
 * Built into two drivers: tests/fuzz/libfuzzer.c (clang -fsanitize=fuzzer, for `make fuzz`)
 * and tests/fuzz/replay.c (any compiler, for the regression inputs `tests/run.sh fuzz`
 * replays). opt.c and lp.c are included whole, so their static readers are reachable, and
 * built with OPT_FUZZ, where die() longjmps back here: a rejected input is an ordinary return.
 * A harness's state lives in statics so that its cleanup runs after a die() too. */
#define OPT_NO_MAIN
#include "../../opt.c"
#include "../../lp.c"

#include <sys/mman.h>

/* ----------------------------------------------------------------------------
 * Inputs as files: the readers mmap or fopen paths, so each input is written to
 * one memory file, reached as /proc/self/fd/N. */

static int g_memfd = -1;       /* the memory file every input is written to */
static char g_path[64];        /* its path */
static char g_dir[64];         /* a scratch directory (the shard-index harness) */

static const char *fuzz_file(const uint8_t *d, size_t n) {
    if (g_memfd < 0) {
        g_memfd = memfd_create("opt-fuzz", 0);
        if (g_memfd < 0) { perror("memfd_create"); abort(); }
        snprintf(g_path, sizeof g_path, "/proc/self/fd/%d", g_memfd);
    }
    if (ftruncate(g_memfd, 0) != 0 || (n && pwrite(g_memfd, d, n, 0) != (ssize_t)n)) { perror("fuzz input"); abort(); }
    return g_path;
}

/* stdin reads the input: for readers that take "-" and leave a FILE open when they
 * die. Reopened, not rewound: glibc's fseek keeps a buffer it can seek within, so a
 * rewound stdin could serve the last input's bytes. */
static void fuzz_stdin(const uint8_t *d, size_t n) {
    if (!freopen(fuzz_file(d, n), "rb", stdin)) { perror("freopen stdin"); abort(); }
}

static void file_put(const char *path, const void *d, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(d, 1, n, f) != n || fclose(f) != 0) { perror(path); abort(); }
}

/* ----------------------------------------------------------------------------
 * json: the JSON parser, then the config reader on what it accepts. */

static Json *g_json;

static void fuzz_json(const uint8_t *d, size_t n) {
    char err[128];
    g_json = json_parse((const char *)d, n, err, sizeof err);
    if (!g_json) return;
    Config c = {0};
    config_from_json(&c, g_json, "config.json");
}

static void fuzz_json_done(void) { json_free(g_json); g_json = NULL; }

/* ----------------------------------------------------------------------------
 * safetensors (one file) and bin (the zip container and the pickle machine):
 * the readers, then the key sort every checkpoint gets. */

static Checkpoint g_ck;
static volatile float g_sink; /* keeps ck_touch's loads */

/* Loads every tensor's first and last element as the kernels do (typed loads), so
 * that a range outside the file or a misaligned one faults or trips a sanitizer here. */
static void ck_touch(const Checkpoint *ck) {
    for (int i = 0; i < ck->n; i++) {
        const CkTensor *t = &ck->t[i];
        int64_t n = ck_numel(t);
        size_t es = t->dtype == DT_F32 ? 4 : t->dtype == DT_F16 || t->dtype == DT_BF16 ? 2 : 1;
        if (n <= 0) continue;
        const uint8_t *p = t->data, *last = p + (size_t)(n - 1) * es;
        if (es == 4) g_sink += *(const float *)p + *(const float *)last;
        else if (es == 2) g_sink += *(const uint16_t *)p + *(const uint16_t *)last;
        else g_sink += *p + *last;
    }
}

static void fuzz_safetensors(const uint8_t *d, size_t n) {
    g_ck.dir = check_strdup("model.safetensors");
    ck_read_safetensors(&g_ck, fuzz_file(d, n));
    ck_sort(&g_ck);
    ck_touch(&g_ck);
}

static void fuzz_bin(const uint8_t *d, size_t n) {
    g_ck.dir = check_strdup("pytorch_model.bin");
    ck_read_bin(&g_ck, fuzz_file(d, n));
    ck_sort(&g_ck);
    ck_touch(&g_ck);
}

static void fuzz_ck_done(void) { ck_close(&g_ck); }

/* ----------------------------------------------------------------------------
 * index: model.safetensors.index.json over a directory holding two valid
 * one-tensor shards, a.safetensors and b.safetensors. */

static void shard_put(const char *name, const char *tensor) {
    char hdr[128], path[128];
    int hl = snprintf(hdr, sizeof hdr, "{\"%s\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", tensor);
    while (hl % 8) hdr[hl++] = ' ';
    uint8_t buf[8 + sizeof hdr + 8] = {0};
    uint64_t l = (uint64_t)hl;
    memcpy(buf, &l, 8);
    memcpy(buf + 8, hdr, (size_t)hl);
    snprintf(path, sizeof path, "%s/%s", g_dir, name);
    file_put(path, buf, 8 + (size_t)hl + 8);
}

static void shards_remove(void) {
    static const char *const names[] = {"a.safetensors", "b.safetensors", "model.safetensors.index.json"};
    char path[128];
    for (int i = 0; i < 3; i++) snprintf(path, sizeof path, "%s/%s", g_dir, names[i]), unlink(path);
    rmdir(g_dir);
}

static void fuzz_index(const uint8_t *d, size_t n) {
    if (!g_dir[0]) {
        snprintf(g_dir, sizeof g_dir, "%s/opt-fuzz.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
        if (!mkdtemp(g_dir)) { perror(g_dir); abort(); }
        atexit(shards_remove);
        shard_put("a.safetensors", "model.decoder.a");
        shard_put("b.safetensors", "model.decoder.b");
    }
    char path[128];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", g_dir);
    file_put(path, d, n);
    ck_open(&g_ck, g_dir);
    ck_touch(&g_ck);
}

/* ----------------------------------------------------------------------------
 * native: a packed file as `opt convert` writes it, loaded as a model when its
 * config is small enough to allocate (the loader's own limit is the machine's). */

static Model g_model;

static void fuzz_native(const uint8_t *d, size_t n) {
    const char *path = fuzz_file(d, n);
    ck_open(&g_ck, path);
    ck_touch(&g_ck);
    const Json *md = json_get(g_ck.meta, "__metadata__"), *cj = json_get(md, "opt.config");
    char err[128];
    g_json = cj && cj->type == J_STR ? json_parse(cj->str, cj->len, err, sizeof err) : NULL;
    if (!g_json) return;
    Config c = {0};
    config_from_json(&c, g_json, path);
    if (config_params(&c) > 1 << 22 || (int64_t)c.n_layer * c.ffn > 1 << 22) return;
    ck_close(&g_ck);
    model_load(&g_model, path);
    model_free(&g_model);
}

static void fuzz_native_done(void) {
    fuzz_json_done();
    fuzz_ck_done();
    ck_close(&g_model.ck); /* the rest of a half-loaded model is left to leak */
    memset(&g_model, 0, sizeof g_model);
}

/* ----------------------------------------------------------------------------
 * tok: "VOCAB\0MERGES\0TEXT" loads that tokenizer and encodes TEXT with it;
 * anything else is text for the built-in tokenizer. Ids are decoded back. */

static Tokenizer *g_tok, *g_builtin;
static int *g_ids;

static void fuzz_tok(const uint8_t *d, size_t n) {
    const char *s = (const char *)d, *z1 = memchr(s, 0, n), *z2 = z1 ? memchr(z1 + 1, 0, n - (size_t)(z1 + 1 - s)) : NULL;
    const Tokenizer *t;
    if (z2) {
        t = g_tok = check_calloc(sizeof *g_tok, "the tokenizer"); /* held here: a die() in loading leaves it to tok_free */
        tok_load_text(g_tok, s, (size_t)(z1 - s), "vocab.json", z1 + 1, (size_t)(z2 - z1 - 1), "merges.txt");
        s = z2 + 1;
        n -= (size_t)(z2 + 1 - (const char *)d);
    } else {
        if (!g_builtin) g_builtin = tokenizer_for(NULL);
        t = g_builtin;
    }
    int cap = 0, k = tok_encode(t, s, n, &g_ids, &cap);
    for (int i = 0; i < k; i++) {
        size_t len;
        check(g_ids[i] >= 0 && g_ids[i] < tok_count(t) && tok_piece(t, g_ids[i], &len), "id %d out of the vocab", g_ids[i]);
    }
}

static void fuzz_tok_done(void) {
    tok_free(g_tok);
    g_tok = NULL;
    free(g_ids);
    g_ids = NULL;
}

/* ----------------------------------------------------------------------------
 * lines: input lines as generate/score read them (escapes decoded, UTF-8
 * checked), each also parsed as a line of token ids. */

static Input g_in;

static void fuzz_lines(const uint8_t *d, size_t n) {
    fuzz_stdin(d, n);
    g_in = (Input){.f = stdin, .name = "<stdin>"};
    char *text;
    size_t len;
    while (input_line(&g_in, &text, &len, true)) {
        free(g_ids);
        g_ids = NULL;
        int k;
        parse_ids(text, g_in.name, g_in.line, 50272, &g_ids, &k);
    }
}

static void fuzz_lines_done(void) {
    free(g_in.buf);
    memset(&g_in, 0, sizeof g_in);
    free(g_ids);
    g_ids = NULL;
}

/* ----------------------------------------------------------------------------
 * jobs: a prompt file as generate and score read it (read_jobs), in the mode the
 * first byte picks: bit 0 --jsonl, bit 1 --ids, bit 2 score (else generate), bit 3
 * --truncate left, bits 4-5 -n 0, 8, 63 or 64 of the model's 64 positions, bit 6 a
 * vocabulary of 1000 (a small model's, under the tokenizer's ids). The rest is the file. */

static Jobs g_jobs;

static void fuzz_jobs(const uint8_t *d, size_t n) {
    static const int max_new[4] = {0, 8, 63, 64};
    if (!n) return;
    Opts o = {.cmd = d[0] & 4 ? "score" : "generate", .file = fuzz_file(d + 1, n - 1), .max_new = max_new[d[0] >> 4 & 3],
              .jsonl = d[0] & 1, .ids = d[0] >> 1 & 1, .truncate = d[0] & 8 ? "left" : NULL};
    Config c = {.vocab = d[0] & 64 ? 1000 : 50272, .max_pos = 64, .bos = 2};
    if (!g_builtin) g_builtin = tokenizer_for(NULL);
    read_jobs(&o, g_builtin, &c, &g_jobs);
}

static void fuzz_jobs_done(void) { jobs_free(&g_jobs); }

/* ----------------------------------------------------------------------------
 * policy: `opt plan --eval POLICY`'s words (plan_policy_parse), then the cost model
 * on what it accepts, for OPT-30B on the h100 preset as `opt plan` would run it. */

static char *g_text; /* the input as a string, split in place by the parser */

static void fuzz_policy(const uint8_t *d, size_t n) {
    g_text = memcpy(check_malloc(n + 1, "the policy"), d, n);
    g_text[n] = 0;
    Policy p;
    plan_policy_parse(&p, g_text);
    Config c;
    Hardware hw;
    PlanReq rq;
    PlanResult r;
    shape_config(&c, "opt-30b");
    hw_load(&hw, "h100");
    plan_req_default(&rq, &hw);
    plan_eval(&c, &hw, &rq, &p, &r);
}

static void fuzz_policy_done(void) {
    free(g_text);
    g_text = NULL;
}

/* ----------------------------------------------------------------------------
 * mps (opt lp's reader) and probe (files `opt probe` writes, for --hw) */

static void fuzz_mps(const uint8_t *d, size_t n) { fuzz_stdin(d, n); mps_check("-"); }

static void fuzz_probe(const uint8_t *d, size_t n) {
    Hardware hw;
    fuzz_stdin(d, n);
    hw_load(&hw, "-");
}

/* ----------------------------------------------------------------------------
 * args: generate's command line, the input split at NUL bytes into arguments
 * (sizes, --percent, counts); --help is left out since it prints and exits. */

static void fuzz_args(const uint8_t *d, size_t n) {
    char *buf = memcpy(malloc(n + 1), d, n), *argv[64];
    buf[n] = 0;
    int argc = 0;
    for (char *p = buf; p <= buf + n && argc < 64; p += strlen(p) + 1) {
        if (!strcmp(p, "-h") || !strcmp(p, "--help")) { free(buf); return; }
        argv[argc++] = p;
    }
    static char *g_buf; /* freed by the next input: die() may leave this one */
    free(g_buf);
    g_buf = buf;
    Opts o = {.cmd = "generate"};
    opts_parse(&o, argc, argv);
}

static void fuzz_nothing(void) {}

/* ----------------------------------------------------------------------------
 * The table the drivers look targets up in. */

typedef struct {
    const char *name;                        /* the target's name: tests/fuzz/regress/NAME, corpus/NAME */
    void (*run)(const uint8_t *d, size_t n); /* the harness */
    void (*done)(void);                      /* frees what it left, after a return or a die() */
} FuzzTarget;

static const FuzzTarget fuzz_targets[] = {
    {"json", fuzz_json, fuzz_json_done},         {"safetensors", fuzz_safetensors, fuzz_ck_done},
    {"bin", fuzz_bin, fuzz_ck_done},             {"index", fuzz_index, fuzz_ck_done},
    {"native", fuzz_native, fuzz_native_done},   {"tok", fuzz_tok, fuzz_tok_done},
    {"lines", fuzz_lines, fuzz_lines_done},      {"mps", fuzz_mps, fuzz_nothing},
    {"probe", fuzz_probe, fuzz_nothing},         {"args", fuzz_args, fuzz_nothing},
    {"jobs", fuzz_jobs, fuzz_jobs_done},         {"policy", fuzz_policy, fuzz_policy_done},
};

const FuzzTarget *fuzz_target(const char *name) {
    for (size_t i = 0; i < sizeof fuzz_targets / sizeof *fuzz_targets; i++)
        if (!strcmp(fuzz_targets[i].name, name)) return &fuzz_targets[i];
    return NULL;
}

/* Runs one input; 1 when the parser rejected it (die() was called), else 0. */
int fuzz_one(const FuzzTarget *t, const uint8_t *d, size_t n) {
    static jmp_buf jb;
    g_fuzz_jmp = &jb;
    int rejected = setjmp(jb);
    if (!rejected) t->run(d, n);
    g_fuzz_jmp = NULL;
    t->done();
    return rejected;
}
