/* offload.c: FlexGen's offloading, done for real on this machine's tiers.
 *
 * Weights, KV cache and activations are placed on GPU, CPU RAM and disk by a
 * Policy, to within one row or one (sequence, head) area of each class's
 * percentages: tensors are split (weights by rows, the cache by areas,
 * activations by rows), never rounded to whole tensors. The compute device
 * here is the CPU (a CUDA build adds the GPU tier): CPU-resident data is used
 * in place, disk-resident data is read into staging buffers by a pool of I/O
 * threads while the previous unit computes, and the cache's new positions and
 * the activations' disk rows are written back asynchronously.
 *
 * Sections: I/O pool, placement and memory plan, staging, block schedule,
 * files and signals. */
#include "opt.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

/* ----------------------------------------------------------------------------
 * I/O pool: threads taking read and write requests off one queue. A request
 * belongs to a group that its issuer waits on; bytes and busy time are
 * counted for the bandwidths `bench` reports. */

#define IO_ALIGN 4096

typedef struct {
    pthread_mutex_t mu;    /* guards pending */
    pthread_cond_t cv;     /* signalled when pending reaches 0 */
    int pending;           /* requests not finished */
    int error;             /* first errno seen, 0 if none */
} IoGroup;

typedef struct {
    int write;             /* 1 = pwrite, 0 = pread */
    int fd;                /* file */
    off_t off;             /* file offset */
    size_t len;            /* bytes */
    char *buf;             /* memory */
    IoGroup *g;            /* completion group */
    const char *what;      /* file name, for errors */
} IoReq;

typedef struct {
    pthread_t *th;         /* (n_th) workers */
    int n_th;
    pthread_mutex_t mu;    /* guards the queue and the counters */
    pthread_cond_t cv;     /* work available or stopping */
    IoReq *q;              /* ring of cap requests */
    int cap, head, count;
    int stop;              /* workers exit when set and the queue is empty */
    double read_bytes, write_bytes;   /* totals */
    double read_busy, write_busy;     /* seconds some thread spent in each */
    int active;            /* requests being served now */
    double busy_since;     /* when active went from 0 to 1 */
    double busy_total;     /* seconds with at least one request in service */
} IoPool;

static void group_init(IoGroup *g) {
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
    g->pending = 0;
    g->error = 0;
}

static void io_do(IoPool *p, IoReq *r) {
    double t0 = now_sec();
    size_t done = 0;
    int err = 0;
    while (done < r->len) {
        ssize_t k = r->write ? pwrite(r->fd, r->buf + done, r->len - done, r->off + (off_t)done)
                             : pread(r->fd, r->buf + done, r->len - done, r->off + (off_t)done);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) { err = errno; break; }
        if (k == 0) { /* reading past the end: an O_DIRECT read's aligned tail */
            if (r->write) { err = EIO; break; }
            memset(r->buf + done, 0, r->len - done);
            break;
        }
        done += (size_t)k;
    }
    double dt = now_sec() - t0;
    pthread_mutex_lock(&p->mu);
    if (r->write) { p->write_bytes += (double)done; p->write_busy += dt; }
    else { p->read_bytes += (double)done; p->read_busy += dt; }
    pthread_mutex_unlock(&p->mu);
    pthread_mutex_lock(&r->g->mu);
    if (err && !r->g->error) r->g->error = err;
    if (--r->g->pending == 0) pthread_cond_broadcast(&r->g->cv);
    pthread_mutex_unlock(&r->g->mu);
}

static void *io_worker(void *arg) {
    IoPool *p = arg;
    for (;;) {
        pthread_mutex_lock(&p->mu);
        while (!p->count && !p->stop) pthread_cond_wait(&p->cv, &p->mu);
        if (!p->count) { pthread_mutex_unlock(&p->mu); return NULL; }
        IoReq r = p->q[p->head];
        p->head = (p->head + 1) % p->cap;
        p->count--;
        if (p->active++ == 0) p->busy_since = now_sec();
        pthread_mutex_unlock(&p->mu);
        io_do(p, &r);
        pthread_mutex_lock(&p->mu);
        if (--p->active == 0) p->busy_total += now_sec() - p->busy_since;
        pthread_mutex_unlock(&p->mu);
    }
}

static void io_init(IoPool *p, int n_th) {
    memset(p, 0, sizeof *p);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->cap = 4096;
    p->q = check_malloc(sizeof(IoReq) * (size_t)p->cap, "the I/O queue");
    p->n_th = n_th;
    p->th = check_malloc(sizeof(pthread_t) * (size_t)n_th, "I/O threads");
    for (int i = 0; i < n_th; i++)
        if (pthread_create(&p->th[i], NULL, io_worker, p)) die("cannot start I/O threads: %s", strerror(errno));
}

static void io_stop(IoPool *p) {
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n_th; i++) pthread_join(p->th[i], NULL);
    free(p->th);
    free(p->q);
}

/* Queues a request (split into pieces of at most 8 MiB so that one big
 * tensor spreads over the threads). sync: serve it here, now (--no-overlap). */
static void io_submit(IoPool *p, int write, int fd, off_t off, size_t len, char *buf, IoGroup *g, const char *what, int sync) {
    const size_t piece = 8u << 20;
    for (size_t at = 0; at < len; at += piece) {
        IoReq r = {write, fd, off + (off_t)at, len - at < piece ? len - at : piece, buf + at, g, what};
        pthread_mutex_lock(&g->mu);
        g->pending++;
        pthread_mutex_unlock(&g->mu);
        if (sync) { io_do(p, &r); continue; }
        pthread_mutex_lock(&p->mu);
        while (p->count == p->cap) { /* full: wait for a worker to take one */
            pthread_mutex_unlock(&p->mu);
            usleep(50);
            pthread_mutex_lock(&p->mu);
        }
        p->q[(p->head + p->count++) % p->cap] = r;
        pthread_cond_signal(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
}

/* Waits for a group; returns the seconds waited. A failed request is fatal,
 * named by its file. */
static double group_wait(IoGroup *g, const char *what) {
    double t0 = now_sec();
    pthread_mutex_lock(&g->mu);
    while (g->pending) pthread_cond_wait(&g->cv, &g->mu);
    int err = g->error;
    pthread_mutex_unlock(&g->mu);
    if (err) die("%s: I/O failed: %s", what, strerror(err));
    return now_sec() - t0;
}

/* ----------------------------------------------------------------------------
 * Placement. Weights split by rows (rows [0, cpu_rows) resident, the rest read
 * from the checkpoint file itself: the model is never copied to disk); the
 * cache by (layer, batch, sequence, head) areas; activations by columns of
 * the hidden state. */

typedef struct {
    Tensor *t;             /* the model's tensor; staging points its data2 at the disk rows */
    int gather;            /* embedding tables: rows are read one by one as tokens need them */
    int64_t cpu_rows;      /* rows [0, cpu_rows) live in RAM at t->data */
    int fd;                /* file holding rows [cpu_rows, rows) */
    off_t off;             /* their offset in it */
    size_t bytes;          /* their size */
    size_t stage_off;      /* where the aligned read lands in the unit's staging buffer */
    size_t lead;           /* bytes from the aligned read's start to the data */
    size_t span;           /* bytes read (aligned) */
    const char *file;      /* for messages */
} WPlace;

typedef struct {
    WPlace *w;             /* (n) matrices of the unit */
    int n;
    size_t stage;          /* staging bytes the unit needs */
} WUnit;

struct Offload {
    Model *m;              /* the model, whose tensors we point at staged data */
    Policy pol;            /* placement and schedule */
    int gbs, nb;           /* GPU batch size, number of GPU batches (block = gbs * nb) */
    int cap;               /* positions per sequence */
    int rows_max;          /* most rows of one step (a block's prompts) */
    DType kv_dt;           /* cache format */
    int kv_group;          /* its 4-bit group */
    char dir[3072];        /* offload directory */
    IoPool io;             /* disk reads and writes */
    int direct;            /* weight files opened with O_DIRECT */
    int *wfd;              /* (ck.n_files) O_DIRECT descriptors of the weight files (or -1) */
    int dummy_fd;          /* the dummy model's disk share, or -1 */
    WUnit *units;          /* (n_layer + 2): embeddings, layers, output */
    char *wstage[2];       /* double buffer for layer units */
    char *ostage;          /* the output unit's buffer */
    size_t wstage_cap, ostage_cap;
    IoGroup wg[2], og;     /* their reads */
    int wbuf_unit[2];      /* unit staged in each buffer (-1 none) */
    char *egather;         /* embedding rows read on demand: a sparse mapping as large as the disk rows */
    size_t egather_len;
    /* cache */
    size_t hb;             /* bytes of one key (or value) area */
    int areas;             /* areas per (layer, batch): gbs * n_head */
    int *kv_cpu;           /* (n_layer * nb) areas of each (layer, batch) held in RAM: the first ones */
    char *kv_mem;          /* RAM areas, key then value area each */
    size_t *kv_mem_off;    /* (n_layer * nb) offset of each (layer, batch)'s first RAM area */
    int kv_fd;             /* cache file */
    off_t *kv_file_off;    /* (n_layer * nb) offset of each (layer, batch)'s first disk area */
    char *kstage[2];       /* double buffer for a (layer, batch)'s disk areas */
    size_t kstage_cap;
    IoGroup kread[2];      /* reads into each */
    IoGroup *kwrite;       /* (n_layer * nb) writes back of each (layer, batch) */
    int kbuf_unit[2];      /* (layer, batch) index staged in each buffer (-1 none) */
    char **kptr;           /* (2, 2 * areas) area pointer tables for the two views */
    KVLayer kview[2];      /* views handed to the layer */
    /* activations */
    int hcpu;              /* hidden columns held in RAM; the rest on disk */
    float *x_cpu;          /* (rows_max, hcpu) */
    int act_fd;            /* activation file: (rows_max, hidden - hcpu) floats */
    float *xs[2];          /* (gbs rows of a step, hidden) staging per batch, double buffered */
    float *xdisk[2];       /* (same rows, hidden - hcpu) the disk columns, packed */
    IoGroup xread[2], *xwrite; /* reads into each buffer; (nb) writes of each batch */
    int xbuf_batch[2];     /* batch whose activations a buffer last held (-1 none) */
    int xs_rows;           /* rows a staging buffer holds */
    Scratch s;             /* the layer's workspace */
    /* accounting and statistics */
    double mem[TIER_COUNT];      /* bytes allocated per tier now */
    double peak[TIER_COUNT];     /* and at most */
    double plan_mem[TIER_COUNT]; /* the plan's peak per tier */
    double t_compute, t_wait;    /* seconds computing, and waiting on I/O */
    char files[3][3200];   /* files we created (removed at exit) */
};

static Offload *g_off;     /* for the exit and signal cleanup */

static void off_account(Offload *o, Tier t, double bytes) {
    o->mem[t] += bytes;
    if (o->mem[t] > o->peak[t]) o->peak[t] = o->mem[t];
}

static void *off_alloc(Offload *o, Tier t, size_t bytes, const char *what) {
    void *p = NULL;
    if (posix_memalign(&p, IO_ALIGN, bytes ? bytes : 1) || !p) die("out of memory allocating %zu bytes for %s", bytes, what);
    memset(p, 0, bytes); /* cache blocks past the end are read, never used: keep them finite */
    off_account(o, t, (double)bytes);
    return p;
}

static size_t align_up(size_t x) { return (x + IO_ALIGN - 1) / IO_ALIGN * IO_ALIGN; }

/* Removes the files we made. Safe in a signal handler. */
static void off_cleanup_files(void) {
    if (!g_off) return;
    for (int i = 0; i < 3; i++) if (g_off->files[i][0]) unlink(g_off->files[i]);
}

static void off_signal(int sig) {
    off_cleanup_files();
    signal(sig, SIG_DFL);
    raise(sig);
}

static int off_tmpfile(Offload *o, int which, const char *stem) {
    snprintf(o->files[which], sizeof o->files[which], "%s/opt-%s-%d.bin", o->dir, stem, (int)getpid());
    int fd = open(o->files[which], O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) { int e = errno; o->files[which][0] = 0; die("%s: cannot create %s files: %s", o->dir, stem, strerror(e)); }
    return fd;
}

/* Reserves the file's size now (so a full disk fails before generation, not
 * in the middle), and tells the kernel we read it sequentially. */
static void off_reserve(Offload *o, int fd, int which, off_t bytes) {
    if (bytes <= 0) return;
    int e = posix_fallocate(fd, 0, bytes);
    if (e == EOPNOTSUPP || e == EINVAL) e = ftruncate(fd, bytes) ? errno : 0;
    if (e) die("%s: cannot reserve %.2f GiB for offloading: %s", o->files[which], (double)bytes / (1 << 30), strerror(e));
    posix_fadvise(fd, 0, bytes, POSIX_FADV_SEQUENTIAL);
}

static double pct_of(double pct, double total) { return floor(total * pct / 100.0 + 0.5); }

/* Places one matrix: rows [0, cpu_rows) copied into RAM, the rest left in
 * the checkpoint file (or written to our weight file when the tensor lives
 * only in memory: quantized at load time). */
static void place_matrix(Offload *o, WUnit *u, Tensor *t, int *wfile_fd, off_t *wfile_at) {
    if ((!t->data && !t->gen) || t->rows == 0) return;
    size_t rb = tensor_row_bytes(t);
    WPlace *p = &u->w[u->n++];
    memset(p, 0, sizeof *p);
    p->t = t;
    p->cpu_rows = (int64_t)pct_of(o->pol.w_cpu, (double)t->rows);
    p->bytes = rb * (size_t)(t->rows - p->cpu_rows);
    p->fd = -1;
    if (p->bytes) {
        off_t off;
        int f = t->gen ? -1 : ck_locate(&o->m->ck, (const char *)t->data + rb * (size_t)p->cpu_rows, &off);
        if (f >= 0) { p->fd = o->wfd[f]; p->off = off; p->file = o->m->ck.files[f].path; }
        else { /* a tensor made in memory (4-bit at load, or dummy): its disk share goes to our weight file */
            if (*wfile_fd < 0) *wfile_fd = off_tmpfile(o, 2, "weights");
            p->fd = *wfile_fd;
            p->off = *wfile_at;
            p->file = o->files[2];
            int64_t chunk = (int64_t)((64u << 20) / rb) + 1;
            char *tmp = t->gen ? check_malloc(rb * (size_t)chunk, "dummy weights") : NULL;
            for (int64_t r0 = p->cpu_rows; r0 < t->rows; r0 += chunk) {
                int64_t n = t->rows - r0 < chunk ? t->rows - r0 : chunk;
                const char *src = (const char *)t->data + rb * (size_t)r0;
                if (t->gen) { dummy_rows(o->m, t, r0, n, tmp); src = tmp; }
                size_t len = rb * (size_t)n;
                off_t at = p->off + (off_t)(rb * (size_t)(r0 - p->cpu_rows));
                for (size_t done = 0; done < len;) {
                    ssize_t k = pwrite(p->fd, src + done, len - done, at + (off_t)done);
                    if (k <= 0) die("%s: cannot write the weights' disk share: %s", p->file, k < 0 ? strerror(errno) : "short write");
                    done += (size_t)k;
                }
            }
            free(tmp);
            *wfile_at += (off_t)align_up(p->bytes);
        }
        off_t al = p->off / IO_ALIGN * IO_ALIGN;
        p->lead = (size_t)(p->off - al);
        p->span = align_up(p->lead + p->bytes);
        p->stage_off = u->stage;
        u->stage += p->span;
    }
}

/* Copies each matrix's resident rows into memory of our own (the tier the
 * policy names), so the plan's CPU bytes are bytes this process holds; the
 * checkpoint mapping keeps serving only the disk share. */
static void place_resident(Offload *o, WUnit *u) {
    for (int i = 0; i < u->n; i++) {
        WPlace *p = &u->w[i];
        Tensor *t = p->t;
        size_t rb = tensor_row_bytes(t), keep = rb * (size_t)p->cpu_rows;
        char *mem = NULL;
        if (keep) {
            mem = off_alloc(o, TIER_CPU, keep, "resident weights");
            if (t->gen) dummy_rows(o->m, t, 0, p->cpu_rows, mem); /* made in its tier */
            else memcpy(mem, t->data, keep);
            if (o->pol.pin_weights && mlock(mem, keep) != 0)
                warn_once(NULL, "--pin-weights: mlock failed (%s); raise `ulimit -l`", strerror(errno));
        }
        t->data = mem;
        t->split = p->cpu_rows;
        t->data2 = NULL; /* set while staged */
        t->gen = 0;
    }
}

static void plan_print(const Offload *o, const double rows[5][TIER_COUNT], const char *const names[5], const char *disk_note) {
    double tot[TIER_COUNT] = {0}, mx = 0;
    for (int r = 0; r < 5; r++) for (int t = 0; t < TIER_COUNT; t++) tot[t] += rows[r][t];
    for (int t = 0; t < TIER_COUNT; t++) mx = fmax(mx, tot[t]);
    double unit = mx >= (1 << 30) ? 1 << 30 : 1 << 20;
    const char *un = unit > (1 << 20) ? "GiB" : "MiB";
    fprintf(stderr, "opt: memory plan for block %d (%d GPU batch%s of %d), %d positions per sequence\n", o->gbs * o->nb, o->nb,
            o->nb > 1 ? "es" : "", o->gbs, o->cap);
    fprintf(stderr, "  %-22s %8s %s %8s %s %8s %s\n", "", "gpu", un, "cpu", un, "disk", un);
    for (int r = 0; r < 5; r++)
        fprintf(stderr, "  %-22s %12.3f %12.3f %12.3f%s\n", names[r], rows[r][TIER_GPU] / unit, rows[r][TIER_CPU] / unit, rows[r][TIER_DISK] / unit,
                r == 0 ? disk_note : "");
    fprintf(stderr, "  %-22s %12.3f %12.3f %12.3f%s\n", "peak", tot[TIER_GPU] / unit, tot[TIER_CPU] / unit, o->plan_mem[TIER_DISK] / unit,
            rows[0][TIER_DISK] > 0 ? "  (disk: in the offload dir)" : "");
}

int offload_block(const Offload *o) { return o->gbs * o->nb; }

Offload *offload_open(Model *m, const OffloadCfg *cfg, int rows_max, int cap, DType kv_dt, int group) {
    const Config *c = &m->cfg;
    const Policy *pol = &cfg->pol;
    Offload *o = check_calloc(sizeof *o, "offloading");
    o->m = m;
    o->pol = *pol;
    o->gbs = pol->gpu_batch_size;
    o->nb = pol->num_gpu_batches;
    o->cap = cap;
    o->rows_max = rows_max;
    o->kv_dt = kv_dt;
    o->kv_group = kv_group(c->head_dim, group);
    o->dummy_fd = o->kv_fd = o->act_fd = -1;
    snprintf(o->dir, sizeof o->dir, "%s", cfg->dir ? cfg->dir : getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    double wg = pol->w_gpu, cg = pol->c_gpu, ag = pol->a_gpu;
    if ((wg > 0 || cg > 0 || ag > 0) && !gpu_available())
        die("--percent puts %s on the GPU, but there is no usable GPU (%s); give the GPU shares as 0",
            wg > 0 ? "weights" : cg > 0 ? "the KV cache" : "activations", gpu_describe());
    if (wg > 0 || cg > 0 || ag > 0) die("the GPU tier of offloading needs the GPU backend, which this build lacks");
    g_off = o;
    atexit(off_cleanup_files);
    signal(SIGINT, off_signal);
    signal(SIGTERM, off_signal);

    /* weights: open the checkpoint files for direct reads */
    o->wfd = check_malloc(sizeof(int) * (size_t)(m->ck.n_files + 1), "file table");
    o->direct = 1;
    for (int i = 0; i < m->ck.n_files; i++) {
        o->wfd[i] = open(m->ck.files[i].path, O_RDONLY | O_DIRECT);
        if (o->wfd[i] < 0) { o->direct = 0; o->wfd[i] = open(m->ck.files[i].path, O_RDONLY); }
        if (o->wfd[i] < 0) die("%s: %s", m->ck.files[i].path, strerror(errno));
        posix_fadvise(o->wfd[i], 0, 0, POSIX_FADV_SEQUENTIAL);
    }
    int L = c->n_layer, wfile = -1;
    off_t wfile_at = 0;
    o->units = check_calloc(sizeof(WUnit) * (size_t)(L + 2), "weight units");
    for (int u = 0; u < L + 2; u++) o->units[u].w = check_calloc(sizeof(WPlace) * 8, "weight units");
    /* unit 0: embeddings (rows gathered on demand) and project_in; 1..L: layers; L+1: output */
    bool tied = m->lm_head.data == m->embed.data;
    place_matrix(o, &o->units[0], &m->embed, &wfile, &wfile_at);
    place_matrix(o, &o->units[0], &m->pos, &wfile, &wfile_at);
    o->units[0].w[0].gather = o->units[0].w[1].gather = 1;
    o->units[0].stage = 0; /* gathered rows have a region of their own */
    place_matrix(o, &o->units[0], &m->proj_in, &wfile, &wfile_at);
    for (int l = 0; l < L; l++) {
        Layer *y = &m->layers[l];
        Tensor *mats[] = {&y->q, &y->k, &y->v, &y->o, &y->fc1, &y->fc2};
        for (int i = 0; i < 6; i++) place_matrix(o, &o->units[l + 1], mats[i], &wfile, &wfile_at);
    }
    place_matrix(o, &o->units[L + 1], &m->proj_out, &wfile, &wfile_at);
    place_matrix(o, &o->units[L + 1], &m->lm_head, &wfile, &wfile_at); /* tied: the embedding's rows again */

    /* the cache: areas of (layer, batch, sequence, head), the first ones of each (layer, batch) in RAM */
    o->areas = o->gbs * c->n_head;
    o->hb = kv_head_bytes(kv_dt, c->head_dim, cap, o->kv_group);
    int units = L * o->nb;
    double total_areas = (double)units * o->areas, cpu_areas = pct_of(pol->c_cpu, total_areas);
    o->kv_cpu = check_malloc(sizeof(int) * (size_t)units, "cache placement");
    o->kv_mem_off = check_malloc(sizeof(size_t) * (size_t)units, "cache placement");
    o->kv_file_off = check_malloc(sizeof(off_t) * (size_t)units, "cache placement");
    int max_disk = 0;
    size_t mem_at = 0;
    off_t file_at = 0;
    for (int u = 0; u < units; u++) { /* spread evenly: units differ by one area at most */
        int64_t a = (int64_t)cpu_areas / units + (u < (int64_t)cpu_areas % units ? 1 : 0);
        o->kv_cpu[u] = (int)a;
        o->kv_mem_off[u] = mem_at;
        o->kv_file_off[u] = file_at;
        mem_at += 2 * o->hb * (size_t)a;
        file_at += (off_t)(2 * o->hb * (size_t)(o->areas - a));
        if (o->areas - a > max_disk) max_disk = o->areas - (int)a;
    }
    o->kstage_cap = 2 * o->hb * (size_t)max_disk;
    /* activations: the first hcpu columns of every row in RAM */
    o->hcpu = (int)pct_of(pol->a_cpu, c->hidden);
    o->xs_rows = rows_max < o->gbs * cap ? rows_max : o->gbs * cap;

    /* staging sizes */
    for (int u = 1; u <= L; u++) if (o->units[u].stage > o->wstage_cap) o->wstage_cap = o->units[u].stage;
    if (o->units[0].stage > o->wstage_cap) o->wstage_cap = o->units[0].stage;
    o->ostage_cap = o->units[L + 1].stage;

    /* the plan, before allocating anything big */
    double w_cpu = 0, w_disk = 0, vec = (double)m->owned_n * sizeof(float);
    for (int u = 0; u < L + 2; u++)
        for (int i = 0; i < o->units[u].n; i++) {
            WPlace *p = &o->units[u].w[i];
            if (u == L + 1 && p->t == &m->lm_head && tied) continue; /* the embedding's rows */
            w_cpu += (double)tensor_row_bytes(p->t) * (double)p->cpu_rows;
            w_disk += (double)p->bytes;
        }
    double gather = (double)rows_max * (double)(tensor_row_bytes(&m->embed) + tensor_row_bytes(&m->pos));
    double kv_disk = (double)file_at, act_disk = (double)rows_max * (c->hidden - o->hcpu) * 4.0;
    double xs_bytes = 2.0 * o->xs_rows * (c->hidden + (c->hidden - o->hcpu)) * 4.0;
    /* the layer's workspace, and the engine's: final hidden rows, 64 rows of logits, the sampler */
    double scratch = (double)o->xs_rows * (c->hidden * 6.0 + c->ffn + c->embed_dim) * 4.0
                   + (double)rows_max * c->embed_dim * 4.0 + 64.0 * (c->vocab + c->embed_dim) * 4.0 + 8.0 * c->vocab;
    double rows[5][TIER_COUNT] = {
        {0, w_cpu + vec, w_disk},
        {0, (double)mem_at, kv_disk},
        {0, (double)rows_max * o->hcpu * 4.0, act_disk},
        {0, 2.0 * (double)o->wstage_cap + (double)o->ostage_cap + 2.0 * (double)o->kstage_cap + gather + xs_bytes, 0},
        {0, scratch, 0}};
    static const char *const names[5] = {"weights", "kv cache", "activations", "staging (I/O buffers)", "workspace"};
    char note[128] = "";
    if (w_disk > 0) snprintf(note, sizeof note, "  (disk share read from %s)", wfile >= 0 ? "the offload dir" : "the checkpoint, not copied");
    double offdir = kv_disk + act_disk + (wfile >= 0 ? (double)wfile_at : 0);
    for (int t = 0; t < TIER_DISK; t++) for (int r = 0; r < 5; r++) o->plan_mem[t] += rows[r][t];
    o->plan_mem[TIER_DISK] = offdir; /* the checkpoint's own bytes are not new disk use */
    if (!cfg->quiet) plan_print(o, rows, names, note);
    static const char *const flag[TIER_COUNT] = {"--gpu-mem", "--cpu-mem", "--disk-mem"};
    for (int t = TIER_CPU; t < TIER_COUNT; t++) {
        double need = o->plan_mem[t];
        if (cfg->mem[t] > 0 && need > cfg->mem[t]) {
            if (cfg->quiet) plan_print(o, rows, names, note);
            char a[32], b[32];
            size_format(a, sizeof a, need);
            size_format(b, sizeof b, cfg->mem[t]);
            die("the policy does not fit: %s needs %s, %s is %s", tier_names[t], a, flag[t], b);
        }
    }
    if (offdir > 0) { /* a full disk or an unwritable directory fails here, before any generation */
        struct statvfs sv;
        if (statvfs(o->dir, &sv) != 0) die("%s: offload directory: %s", o->dir, strerror(errno));
        if (access(o->dir, W_OK) != 0) die("%s: offload directory is not writable", o->dir);
        double free_b = (double)sv.f_bavail * (double)sv.f_frsize;
        char a[32], b[32];
        size_format(a, sizeof a, free_b);
        size_format(b, sizeof b, offdir);
        if (free_b < offdir) die("%s: offload directory has %s free, the policy needs %s there", o->dir, a, b);
    }

    /* allocate and create */
    off_account(o, TIER_CPU, vec);
    for (int u = 0; u < L + 2; u++) {
        if (u == L + 1 && tied) { /* lm_head is the embedding: share its resident rows, stage its disk rows */
            WUnit *w = &o->units[u];
            for (int i = 0; i < w->n; i++)
                if (w->w[i].t == &m->lm_head) { w->w[i].t->data = m->embed.data; w->w[i].t->split = m->embed.split; }
            WUnit rest = *w;
            rest.n = 0;
            rest.w = check_malloc(sizeof(WPlace) * 8, "weight units");
            for (int i = 0; i < w->n; i++) if (w->w[i].t != &m->lm_head) rest.w[rest.n++] = w->w[i];
            place_resident(o, &rest);
            free(rest.w);
            continue;
        }
        place_resident(o, &o->units[u]);
    }
    io_init(&o->io, 4);
    for (int b = 0; b < 2; b++) {
        o->wstage[b] = off_alloc(o, TIER_CPU, o->wstage_cap, "weight staging");
        o->kstage[b] = off_alloc(o, TIER_CPU, o->kstage_cap, "cache staging");
        o->xs[b] = off_alloc(o, TIER_CPU, sizeof(float) * (size_t)o->xs_rows * c->hidden, "activation staging");
        o->xdisk[b] = off_alloc(o, TIER_CPU, sizeof(float) * (size_t)o->xs_rows * (c->hidden - o->hcpu) + 1, "activation staging");
        group_init(&o->wg[b]);
        group_init(&o->kread[b]);
        group_init(&o->xread[b]);
        o->wbuf_unit[b] = o->kbuf_unit[b] = o->xbuf_batch[b] = -1;
    }
    group_init(&o->og);
    o->ostage = off_alloc(o, TIER_CPU, o->ostage_cap, "output staging");
    o->kv_mem = off_alloc(o, TIER_CPU, mem_at, "the KV cache");
    o->kwrite = check_malloc(sizeof(IoGroup) * (size_t)units, "cache writes");
    for (int u = 0; u < units; u++) group_init(&o->kwrite[u]);
    o->xwrite = check_malloc(sizeof(IoGroup) * (size_t)o->nb, "activation writes");
    for (int k = 0; k < o->nb; k++) group_init(&o->xwrite[k]);
    o->kptr = check_malloc(sizeof(char *) * 4 * (size_t)o->areas, "cache views");
    o->x_cpu = off_alloc(o, TIER_CPU, sizeof(float) * (size_t)rows_max * o->hcpu + 1, "resident activations");
    if (kv_disk > 0) { o->kv_fd = off_tmpfile(o, 0, "cache"); off_reserve(o, o->kv_fd, 0, (off_t)kv_disk); off_account(o, TIER_DISK, kv_disk); }
    if (act_disk > 0) { o->act_fd = off_tmpfile(o, 1, "activations"); off_reserve(o, o->act_fd, 1, (off_t)act_disk); off_account(o, TIER_DISK, act_disk); }
    if (wfile >= 0) off_account(o, TIER_DISK, (double)wfile_at);
    /* gather region for embedding rows on disk: virtual, pages appear as rows are read */
    o->egather_len = align_up(o->units[0].w[0].bytes) + align_up(o->units[0].w[1].bytes) + 2 * IO_ALIGN;
    o->egather = mmap(NULL, o->egather_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (o->egather == MAP_FAILED) die("cannot map %.2f GiB for embedding rows", (double)o->egather_len / (1 << 30));
    off_account(o, TIER_CPU, gather);
    scratch_init(&o->s, c, o->xs_rows, cap);
    off_account(o, TIER_CPU, scratch);
    /* the mappings now serve only disk reads (by descriptor): drop our references to their pages */
    for (int i = 0; i < m->ck.n_files; i++) madvise((void *)m->ck.files[i].base, m->ck.files[i].size, MADV_DONTNEED);
    return o;
}

/* ----------------------------------------------------------------------------
 * Staging: reads into the buffers, and pointing tensors and views at them. */

static double off_wait(Offload *o, IoGroup *g, const char *what) {
    double w = group_wait(g, what);
    o->t_wait += w;
    return w;
}

/* Weights of unit u (a layer or the output) into buffer buf. */
static void stage_weights(Offload *o, int u, char *buf, IoGroup *g) {
    WUnit *w = &o->units[u];
    for (int i = 0; i < w->n; i++) {
        WPlace *p = &w->w[i];
        if (!p->bytes || p->gather) continue;
        io_submit(&o->io, 0, p->fd, p->off - (off_t)p->lead, p->span, buf + p->stage_off, g, p->file, !o->pol.overlap);
    }
}

static void use_weights(Offload *o, int u, char *buf) {
    WUnit *w = &o->units[u];
    for (int i = 0; i < w->n; i++)
        if (w->w[i].bytes && !w->w[i].gather) w->w[i].t->data2 = buf + w->w[i].stage_off + w->w[i].lead;
}

/* The embedding and position rows the step needs, read into the sparse
 * region (each row once: a page already read is kept). */
static void gather_rows(Offload *o, const Step *st) {
    IoGroup g;
    group_init(&g);
    char *base = o->egather;
    for (int i = 0; i < 2; i++) {
        WPlace *p = &o->units[0].w[i];
        if (!p->bytes) continue;
        size_t rb = tensor_row_bytes(p->t);
        p->t->data2 = base + p->lead;
        for (int r = 0; r < st->n; r++) {
            int64_t row = i == 0 ? st->tok[r] : st->pos[r] + 2;
            if (row < p->cpu_rows) continue;
            size_t a0 = (p->lead + rb * (size_t)(row - p->cpu_rows)) / IO_ALIGN * IO_ALIGN;
            size_t a1 = align_up(p->lead + rb * (size_t)(row - p->cpu_rows + 1));
            unsigned char vec;
            if (mincore(base + a0, 1, &vec) == 0 && (vec & 1) && mincore(base + a1 - 1, 1, &vec) == 0 && (vec & 1)) continue;
            io_submit(&o->io, 0, p->fd, p->off - (off_t)p->lead + (off_t)a0, a1 - a0, base + a0, &g, p->file, !o->pol.overlap);
        }
        base += align_up(p->span) + IO_ALIGN;
    }
    off_wait(o, &g, "the embeddings");
}

/* The cache areas of (layer l, batch k) on disk, into buffer b: for each
 * sequence only the positions written so far (whole key blocks). */
static void stage_cache(Offload *o, int l, int k, int b, const int *pos0) {
    int u = l * o->nb + k, first = o->kv_cpu[u];
    if (o->kbuf_unit[b] >= 0) off_wait(o, &o->kwrite[o->kbuf_unit[b]], "the cache file"); /* the buffer's last writes are out */
    off_wait(o, &o->kwrite[u], "the cache file"); /* and this unit's last writes are on disk */
    const Config *c = &o->m->cfg;
    for (int a = first; a < o->areas; a++) {
        int slot = a / c->n_head, have = pos0[slot];
        if (have <= 0) continue;
        size_t kb = o->kv_dt == DT_Q4 ? q4_row_bytes(c->head_dim, o->kv_group) * (size_t)have
                                      : sizeof(float) * (size_t)c->head_dim * 16 * (size_t)((have + 15) / 16);
        size_t vb = o->kv_dt == DT_Q4 ? kb : sizeof(float) * (size_t)c->head_dim * (size_t)have;
        off_t fo = o->kv_file_off[u] + (off_t)(2 * o->hb * (size_t)(a - first));
        char *dst = o->kstage[b] + 2 * o->hb * (size_t)(a - first);
        io_submit(&o->io, 0, o->kv_fd, fo, kb, dst, &o->kread[b], "the cache file", !o->pol.overlap);
        io_submit(&o->io, 0, o->kv_fd, fo + (off_t)o->hb, vb, dst + o->hb, &o->kread[b], "the cache file", !o->pol.overlap);
    }
    o->kbuf_unit[b] = u;
}

/* The view of (layer l, batch k): RAM areas in place, disk areas in buffer b. */
static KVLayer *use_cache(Offload *o, int l, int k, int b) {
    const Config *c = &o->m->cfg;
    int u = l * o->nb + k, first = o->kv_cpu[u];
    char **kp = o->kptr + 2 * (size_t)o->areas * b, **vp = kp + o->areas;
    for (int a = 0; a < o->areas; a++) {
        char *area = a < first ? o->kv_mem + o->kv_mem_off[u] + 2 * o->hb * (size_t)a : o->kstage[b] + 2 * o->hb * (size_t)(a - first);
        kp[a] = area;
        vp[a] = area + o->hb;
    }
    o->kview[b] = (KVLayer){o->kv_dt, o->gbs, c->n_head, c->head_dim, o->cap, o->kv_group, o->hb, kp, vp};
    return &o->kview[b];
}

/* Writes back what the step added to the disk areas: the key blocks and
 * value rows of positions [lo, hi] of each sequence. */
static void store_cache(Offload *o, int l, int k, int b, const int *lo, const int *hi) {
    const Config *c = &o->m->cfg;
    int u = l * o->nb + k, first = o->kv_cpu[u];
    size_t rb = q4_row_bytes(c->head_dim, o->kv_group), blk = sizeof(float) * (size_t)c->head_dim * 16, vrow = sizeof(float) * (size_t)c->head_dim;
    for (int a = first; a < o->areas; a++) {
        int slot = a / c->n_head;
        if (hi[slot] < lo[slot]) continue;
        off_t fo = o->kv_file_off[u] + (off_t)(2 * o->hb * (size_t)(a - first));
        char *src = o->kstage[b] + 2 * o->hb * (size_t)(a - first);
        size_t k0, k1, v0, v1;
        if (o->kv_dt == DT_Q4) { k0 = v0 = rb * (size_t)lo[slot]; k1 = v1 = rb * (size_t)(hi[slot] + 1); }
        else { k0 = blk * (size_t)(lo[slot] / 16); k1 = blk * (size_t)(hi[slot] / 16 + 1); v0 = vrow * (size_t)lo[slot]; v1 = vrow * (size_t)(hi[slot] + 1); }
        io_submit(&o->io, 1, o->kv_fd, fo + (off_t)k0, k1 - k0, src + k0, &o->kwrite[u], "the cache file", !o->pol.overlap);
        io_submit(&o->io, 1, o->kv_fd, fo + (off_t)o->hb + (off_t)v0, v1 - v0, src + o->hb + v0, &o->kwrite[u], "the cache file", !o->pol.overlap);
    }
}

/* Activations of batch k (rows r0..r1 of the step) into buffer b: the disk
 * columns are read now, the RAM columns copied when used. */
static void stage_x(Offload *o, int k, int b, int r0, int r1) {
    int hd = o->m->cfg.hidden - o->hcpu;
    if (o->xbuf_batch[b] >= 0) off_wait(o, &o->xwrite[o->xbuf_batch[b]], "the activation file");
    off_wait(o, &o->xwrite[k], "the activation file");
    o->xbuf_batch[b] = k;
    if (hd > 0 && r1 > r0)
        io_submit(&o->io, 0, o->act_fd, (off_t)sizeof(float) * r0 * hd, sizeof(float) * (size_t)(r1 - r0) * hd, (char *)o->xdisk[b], &o->xread[b],
                  "the activation file", !o->pol.overlap);
}

static float *use_x(Offload *o, int b, int r0, int r1) {
    int h = o->m->cfg.hidden, hc = o->hcpu, hd = h - hc;
    off_wait(o, &o->xread[b], "the activation file");
    for (int r = r0; r < r1; r++) {
        float *x = o->xs[b] + (size_t)(r - r0) * h;
        memcpy(x, o->x_cpu + (size_t)r * hc, sizeof(float) * (size_t)hc);
        memcpy(x + hc, o->xdisk[b] + (size_t)(r - r0) * hd, sizeof(float) * (size_t)hd);
    }
    return o->xs[b];
}

/* Activations of batch k back home: RAM columns copied, disk columns written. */
static void store_x(Offload *o, int k, int b, int r0, int r1) {
    int h = o->m->cfg.hidden, hc = o->hcpu, hd = h - hc;
    for (int r = r0; r < r1; r++) {
        const float *x = o->xs[b] + (size_t)(r - r0) * h;
        memcpy(o->x_cpu + (size_t)r * hc, x, sizeof(float) * (size_t)hc);
        memcpy(o->xdisk[b] + (size_t)(r - r0) * hd, x + hc, sizeof(float) * (size_t)hd);
    }
    o->xbuf_batch[b] = k;
    if (hd > 0 && r1 > r0)
        io_submit(&o->io, 1, o->act_fd, (off_t)sizeof(float) * r0 * hd, sizeof(float) * (size_t)(r1 - r0) * hd, (char *)o->xdisk[b], &o->xwrite[k],
                  "the activation file", !o->pol.overlap);
}

/* ----------------------------------------------------------------------------
 * The block schedule: token -> layer -> GPU batch. A layer's weights are read
 * once per token and serve every batch; while batch k computes, the cache and
 * activations of batch k+1 are read, and while layer l computes, layer l+1's
 * weights are. Writes go out behind the compute. */

void offload_forward(Offload *o, const Step *st, float *out) {
    Model *m = o->m;
    const Config *c = &m->cfg;
    int L = c->n_layer, nb = o->nb, bs = o->gbs * nb;
    /* rows of each batch (slots of batch k are k*gbs .. (k+1)*gbs-1, rows ordered by slot) */
    int r_at[65], *pos0 = check_malloc(sizeof(int) * 3 * (size_t)bs, "step"), *lo = pos0 + bs, *hi = lo + bs;
    check(nb <= 64, "at most 64 GPU batches");
    int *slot_rel = check_malloc(sizeof(int) * (size_t)(st->n + 1), "step");
    for (int i = 0; i < bs; i++) { pos0[i] = INT32_MAX; lo[i] = INT32_MAX; hi[i] = -1; }
    int k = 0;
    r_at[0] = 0;
    for (int r = 0; r < st->n; r++) {
        int sl = st->slot[r];
        check(sl >= 0 && sl < bs && (r == 0 || sl >= st->slot[r - 1]), "offload steps need rows ordered by slot");
        while (sl / o->gbs > k) r_at[++k] = r;
        slot_rel[r] = sl % o->gbs;
        if (st->pos[r] < lo[sl]) lo[sl] = st->pos[r];
        if (st->pos[r] > hi[sl]) hi[sl] = st->pos[r];
        check(st->pos[r] < o->cap, "position %d beyond the cache", st->pos[r]);
    }
    while (k < nb) r_at[++k] = st->n;
    check(st->n <= o->rows_max, "step of %d rows exceeds the plan's %d", st->n, o->rows_max);
    for (int i = 0; i < bs; i++) pos0[i] = lo[i] == INT32_MAX ? 0 : lo[i];
    Step sub[64];
    for (int b = 0; b < nb; b++) {
        sub[b] = (Step){r_at[b + 1] - r_at[b], st->tok + r_at[b], slot_rel + r_at[b], st->pos + r_at[b], NULL};
        check(sub[b].n <= o->xs_rows, "a batch of %d rows exceeds the plan's %d", sub[b].n, o->xs_rows);
    }
    double t0;

    /* embeddings (and project_in) */
    gather_rows(o, st);
    stage_weights(o, 0, o->wstage[0], &o->wg[0]);
    off_wait(o, &o->wg[0], "the weights");
    use_weights(o, 0, o->wstage[0]);
    stage_weights(o, 1, o->wstage[1], &o->wg[1]); /* layer 0 reads while we embed */
    for (int b = 0; b < nb; b++) {
        if (!sub[b].n) continue;
        stage_x(o, b, b & 1, r_at[b], r_at[b]); /* only fences the buffer */
        t0 = now_sec();
        model_embed(m, &sub[b], o->xs[b & 1], &o->s);
        o->t_compute += now_sec() - t0;
        store_x(o, b, b & 1, r_at[b], r_at[b + 1]);
    }
    /* layers */
    for (int l = 0; l < L; l++) {
        int wb = (l + 1) & 1;
        off_wait(o, &o->wg[wb], "the weights");
        use_weights(o, l + 1, o->wstage[wb]);
        if (l + 1 < L) stage_weights(o, l + 2, o->wstage[wb ^ 1], &o->wg[wb ^ 1]);
        else stage_weights(o, L + 1, o->ostage, &o->og);
        int first = 0;
        while (first < nb && !sub[first].n) first++;
        if (first < nb) { stage_cache(o, l, first, first & 1, pos0 + first * o->gbs); stage_x(o, first, first & 1, r_at[first], r_at[first + 1]); }
        for (int b = first; b < nb; b++) {
            if (!sub[b].n) continue;
            int buf = b & 1, nx = b + 1;
            while (nx < nb && !sub[nx].n) nx++;
            off_wait(o, &o->kread[buf], "the cache file");
            KVLayer *view = use_cache(o, l, b, buf);
            float *x = use_x(o, buf, r_at[b], r_at[b + 1]);
            if (nx < nb) { stage_cache(o, l, nx, nx & 1, pos0 + nx * o->gbs); stage_x(o, nx, nx & 1, r_at[nx], r_at[nx + 1]); }
            t0 = now_sec();
            layer_forward(m, &m->layers[l], l, view, &sub[b], x, &o->s);
            o->t_compute += now_sec() - t0;
            store_cache(o, l, b, buf, lo + b * o->gbs, hi + b * o->gbs);
            store_x(o, b, buf, r_at[b], r_at[b + 1]);
        }
    }
    /* output: final LayerNorm, project_out; lm_head stays staged for the logits */
    off_wait(o, &o->og, "the weights");
    use_weights(o, L + 1, o->ostage);
    for (int b = 0; b < nb; b++) {
        if (!sub[b].n) continue;
        stage_x(o, b, b & 1, r_at[b], r_at[b + 1]);
        float *x = use_x(o, b & 1, r_at[b], r_at[b + 1]);
        t0 = now_sec();
        model_final(m, x, sub[b].n, out + (size_t)r_at[b] * c->embed_dim, &o->s);
        o->t_compute += now_sec() - t0;
    }
    free(pos0);
    free(slot_rel);
}

void offload_stats(const Offload *o, OffloadStats *s) {
    memset(s, 0, sizeof *s);
    for (int t = 0; t < TIER_COUNT; t++) { s->peak[t] = o->peak[t]; s->plan[t] = o->plan_mem[t]; }
    s->read_bytes = o->io.read_bytes;
    s->write_bytes = o->io.write_bytes;
    s->read_bw = o->io.read_busy > 0 ? o->io.read_bytes / o->io.read_busy * o->io.n_th : 0;
    s->write_bw = o->io.write_busy > 0 ? o->io.write_bytes / o->io.write_busy * o->io.n_th : 0;
    s->t_compute = o->t_compute;
    s->t_wait = o->t_wait;
    s->io_busy = o->io.busy_total;
}

void offload_close(Offload *o) {
    if (!o) return;
    for (int u = 0; u < o->m->cfg.n_layer * o->nb; u++) group_wait(&o->kwrite[u], "the cache file");
    for (int k = 0; k < o->nb; k++) group_wait(&o->xwrite[k], "the activation file");
    io_stop(&o->io);
    off_cleanup_files();
    for (int i = 0; i < 3; i++) o->files[i][0] = 0;
    for (int i = 0; i < o->m->ck.n_files; i++) close(o->wfd[i]);
    if (o->kv_fd >= 0) close(o->kv_fd);
    if (o->act_fd >= 0) close(o->act_fd);
    munmap(o->egather, o->egather_len);
    scratch_free(&o->s);
    g_off = NULL;
    /* resident weights and buffers live until exit: the model's tensors point into them */
}
