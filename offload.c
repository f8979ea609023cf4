/* offload.c: FlexGen's offloading, done for real on this machine's tiers.
 *
 * Weights, KV cache and activations are placed on GPU, CPU RAM and disk by a
 * Policy, to within one row or one area of each class's percentages: tensors
 * are split (weights by rows, the cache by (layer, batch, head, sequence)
 * areas, activations by columns of the hidden state), never rounded to whole
 * tensors. Disk data is read into staging buffers by a pool of I/O threads
 * while the previous unit computes; the cache's new positions and the
 * activations' disk columns are written back behind the compute.
 *
 * Two compute modes. Without a device the CPU computes and RAM-resident data
 * is used in place. With a Device (the GPU; or the host standing in for one
 * in tests), weights' GPU rows, the cache's GPU areas and the activations'
 * GPU columns live in device memory and the rest is copied to device staging
 * buffers on a copy stream, events ordering copies and compute; with
 * --cpu-attention the cache's CPU and disk areas are attended on the CPU
 * instead, only q, k, v and the attention output crossing PCIe.
 *
 * Sections: I/O pool, placement and memory plan, staging, device transfers,
 * leftovers and limits, block schedule. Our files are temporary files
 * (opt.c's tmp_add): removed at exit and on any signal that ends the run. */
#include "opt.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
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
 * The host standing in for a device (OPT_HOST_DEVICE=1, for the tests): its
 * memory is RAM and the CPU backend computes as ops are issued, but copies
 * wait in their stream's queue until an event forces them (a wait or a
 * sync): the latest moment the events allow. A missing event then makes a
 * copy land late and the bitwise comparison with the plain run fails, as a
 * race would on the GPU. Streams: 0 compute, 1 uploads, 2 downloads, 3
 * weight uploads. */

typedef struct {
    int on;                /* -1: a copy; else a wait for stream `on` up to op `upto` */
    long upto;
    char *dst;             /* the copy: rows of w bytes, pitches dp and sp */
    const char *src;
    size_t dp, sp, w, rows;
} HostOp;

typedef struct { int stream; long at; } HostEv; /* the ops of a stream issued before the record */

static struct {
    HostOp *q[4];          /* per stream, ops [base, n) at q[s][i - base]; stream 0 queues nothing */
    long base[4], n[4];    /* window of kept ops, ops issued */
    long done[4];          /* ops run */
    long cap[4];           /* q's capacity */
} g_hq;

static void hq_run(int s, long upto) {
    while (g_hq.done[s] < upto) {
        HostOp op = g_hq.q[s][g_hq.done[s]++ - g_hq.base[s]];
        if (op.on >= 0) hq_run(op.on, op.upto);
        else for (size_t r = 0; r < op.rows; r++) memcpy(op.dst + r * op.dp, op.src + r * op.sp, op.w);
    }
    if (g_hq.done[s] == g_hq.n[s]) g_hq.base[s] = g_hq.n[s]; /* drained: reuse the storage */
}

static HostOp *hq_push(int s) {
    long k = g_hq.n[s]++ - g_hq.base[s];
    if (k == g_hq.cap[s]) {
        g_hq.cap[s] = g_hq.cap[s] ? 2 * g_hq.cap[s] : 1024;
        g_hq.q[s] = check_realloc(g_hq.q[s], sizeof(HostOp) * (size_t)g_hq.cap[s], "the host device's queue");
    }
    return &g_hq.q[s][k];
}

static void *hd_alloc(size_t n, const char *what) {
    void *p = NULL;
    if (posix_memalign(&p, IO_ALIGN, n ? n : 1) || !p) die("out of memory allocating %zu bytes for %s", n, what);
    return memset(p, 0, n);
}
static void hd_release(void *p) { free(p); }
static void hd_pin(void *h, size_t n) { (void)h; (void)n; }
static void hd_unpin(void *h) { (void)h; }
static void hd_copy2d(void *dst, size_t dp, const void *src, size_t sp, size_t w, size_t rows, int kind, int stream) {
    (void)kind;
    if (!w || !rows) return;
    if (stream == 0) { for (size_t r = 0; r < rows; r++) memcpy((char *)dst + r * dp, (const char *)src + r * sp, w); return; }
    *hq_push(stream) = (HostOp){-1, 0, dst, src, dp, sp, w, rows};
}
static void *hd_event(void) { return check_calloc(sizeof(HostEv), "events"); }
static void hd_record(void *ev, int s) { *(HostEv *)ev = (HostEv){s, g_hq.n[s]}; }
static void hd_wait(int s, void *ev) {
    HostEv *e = ev;
    if (e->stream == s || e->stream == 0) return; /* in order; or compute, which ran when issued */
    if (s == 0) hq_run(e->stream, e->at);
    else *hq_push(s) = (HostOp){e->stream, e->at, NULL, NULL, 0, 0, 0, 0};
}
static void hd_sync(void *ev) { HostEv *e = ev; if (e->stream) hq_run(e->stream, e->at); }
static double hd_free_bytes(void) { return 0; }

const Device host_device = {"host", 0, &cpu_backend, hd_alloc, hd_release, hd_pin, hd_unpin, hd_copy2d, hd_event, hd_record,
                            hd_wait, hd_sync, scratch_init, scratch_free, hd_free_bytes};
/* ----------------------------------------------------------------------------
 * Placement. A matrix's rows [0, gpu_rows) live on the device, [gpu_rows,
 * ram_end) in RAM, the rest on disk, read from the checkpoint itself (the
 * model is never copied to disk). The CPU looks the embedding tables up by
 * row, so their (and project_in's) device share is held in RAM. Cache areas
 * are placed head-major (all sequences of head 0, then head 1, ...), so that
 * a head's device/host boundary is one range of sequences, and activations
 * by columns of the hidden state. */

typedef struct WPlace {
    Tensor *t;             /* the model's tensor; on the CPU, data = RAM rows, data2 = staged disk rows */
    Tensor *dv;            /* device mode: the device's view of it (in Offload.dm), else NULL */
    int gather;            /* embedding tables: rows read one by one as tokens need them */
    int64_t gpu_rows;      /* rows [0, gpu_rows) on the device, at dres */
    int64_t ram_end;       /* rows [gpu_rows, ram_end) in RAM, at hrows; the rest on disk */
    const char *dres;      /* device copy of the GPU rows */
    const char *hrows;     /* RAM copy of the RAM rows */
    int fd;                /* file holding the disk rows */
    off_t off;             /* their offset in it */
    size_t bytes;          /* their size */
    size_t stage_off;      /* where their aligned read lands in the unit's host staging */
    size_t lead;           /* bytes from the aligned read's start to the data */
    size_t span;           /* bytes read (aligned) */
    size_t dstage_off;     /* device mode, a matrix not wholly on the device: its place in the device staging */
    const char *file;      /* for messages */
    const struct WPlace *same; /* the place whose disk rows these are (a tied lm_head's: the embedding's), or NULL */
} WPlace;

typedef struct {
    WPlace *w;             /* (n) matrices of the unit */
    int n;
    size_t stage;          /* host staging bytes the unit needs */
    size_t dstage;         /* device staging bytes */
} WUnit;

typedef struct {
    int active;            /* host work waits on the buffer's downloads */
    int l, k, r0, r1;      /* layer, batch and its rows */
} Pending;

struct Offload {
    Model *m;              /* the model, whose tensors we point at staged data */
    Policy pol;            /* placement and schedule */
    const Device *dev;     /* the compute device; NULL: the CPU computes, using RAM data in place */
    int gbs, nb;           /* GPU batch size, number of GPU batches (block = gbs * nb) */
    int cap;               /* positions per sequence */
    int rows_max;          /* most rows of one step (a block's prompts) */
    int kv_group;          /* the 4-bit cache's group */
    int tied;              /* lm_head is the embedding: its RAM and disk rows are the embedding's */
    char dir[3072];        /* offload directory */
    IoPool io;             /* disk reads and writes */
    int *wfd;              /* (ck.n_files) descriptors of the weight files (O_DIRECT where possible) */
    WUnit *units;          /* (n_layer + 2): embeddings and project_in, layers, output */
    char *wstage[3];       /* host staging of a unit's disk rows: layers alternate 0 and 1, the output unit 2 */
    size_t wstage_cap[3];
    IoGroup wg[3];         /* their reads */
    int ahead;             /* the CPU: layer 0's weights were read ahead, at the end of the last step */
    char *egather;         /* embedding rows read on demand: a sparse mapping as large as the disk rows */
    size_t egather_len;
    /* cache: (layer, batch) units of gbs * n_head areas */
    DType kv_dt, dkv_dt;   /* format of the areas on the host, on the device */
    size_t hb, dhb;        /* bytes of a key (or value) area on the host, on the device */
    int areas;             /* areas per unit */
    int *kv_gpu, *kv_cpu;  /* (n_layer * nb) areas of each unit on the device, in RAM (in placement order) */
    char *kv_mem;          /* RAM areas, key then value area each */
    size_t *kv_mem_off;    /* (n_layer * nb) offset of each unit's first RAM area */
    int kv_fd;             /* cache file */
    off_t *kv_file_off;    /* (n_layer * nb) offset of each unit's first disk area */
    char *kstage[2];       /* host double buffer for a unit's disk areas */
    size_t kstage_cap;
    IoGroup kread[2];      /* reads into each */
    IoGroup *kwrite;       /* (n_layer * nb) writes back of each unit */
    int kbuf_unit[2];      /* unit staged in each buffer (-1 none) */
    char **kptr[2];        /* (2 * areas) host area tables (device areas NULL) */
    KVLayer kview[2];      /* host views */
    /* activations: columns [0, hgpu) on the device, [hgpu, hgpu + hcpu) in RAM, the rest on disk */
    int hgpu, hcpu;
    float *x_cpu;          /* (rows_max, hcpu) */
    int act_fd;            /* activation file: (rows_max, disk columns) floats */
    float *xs[2];          /* (xs_rows, hidden - hgpu) a batch's host columns, double buffered */
    float *xdisk[2];       /* (xs_rows, disk columns) packed */
    IoGroup xread[2], *xwrite; /* reads into each buffer; (nb) writes of each batch */
    int xbuf_batch[2];     /* batch whose activations a buffer last held (-1 none) */
    int xs_rows;           /* rows a staging buffer holds */
    Scratch s;             /* the compute's workspace (on the device in device mode) */
    /* device mode */
    Model dm;              /* the model as the device sees it: device vectors, matrix views */
    float *dvec;           /* the model's 1-D tensors on the device */
    char *dwstage[3];      /* device staging of a unit's matrices, whole, like wstage */
    size_t dwstage_cap[3];
    char *dkv_mem;         /* device-resident cache areas */
    size_t *dkv_off;       /* (n_layer * nb) offset of each unit's first device area */
    char *dkstage[2];      /* device staging of a unit's host areas (without --cpu-attention) */
    size_t dkstage_cap;
    char **dkptr[2];       /* (2 * areas) device area tables, and their host sources */
    char **hdkptr[2];
    KVLayer dview[2];      /* device views */
    float *dkn[2], *dvn[2]; /* (xs_rows, hidden) a batch's new keys and values for the host areas: on the device, */
    float *hk[2], *hv[2];  /* and down on the host */
    float *dxg;            /* (rows_max, hgpu) device-resident activation columns */
    float *dxs[2];         /* (xs_rows, hidden) a batch's activations on the device */
    int *dstep, *hstep;    /* (3 * rows_max) each batch's tok, slot, pos: on the device, on the host */
    float *dfinal;         /* (rows_max, embed_dim) final hidden states */
    float *dhid, *dlog;    /* (64, embed_dim), (64, vocab) offload_logits' rows and logits */
    Scratch hs;            /* host workspace: embeddings, CPU attention */
    Backend hybrid;        /* the device's backend with attention split between it and the CPU */
    const KVLayer *att_view; /* the hybrid attention's batch: host view, step, first row of each head on the host */
    const Step *att_step;
    int *att_row0;         /* (n_head) */
    int att_dev;           /* some of its areas are on the device */
    void *w_ready[3], *w_free[3]; /* a weight buffer's upload done; its compute done */
    void *up[2], *c_done[2], *down[2]; /* a batch buffer's uploads, compute, downloads done */
    void *ev[3];           /* one-off orderings */
    int *xlast;            /* (nb) buffer each batch last used (-1 none) */
    Pending pend[2];       /* host work after each buffer's downloads */
    /* accounting and statistics */
    double mem[TIER_COUNT];      /* bytes allocated per tier now */
    double peak[TIER_COUNT];     /* and at most */
    double plan_mem[TIER_COUNT]; /* the plan's peak per tier */
    double t_compute, t_wait;    /* seconds computing (issuing, on a device), and waiting on I/O or the device */
    double pcie[2];        /* bytes copied to the device, from it */
    char files[3][3200];   /* files we created: cache, activations, weights */
    int slot[3];           /* their temporary-file slots (removed at exit or on a signal), -1 none */
};

static Offload *g_off;     /* for the hybrid attention */

static void off_account(Offload *o, Tier t, double bytes) {
    o->mem[t] += bytes;
    if (o->mem[t] > o->peak[t]) o->peak[t] = o->mem[t];
}

static void *off_alloc(Offload *o, Tier t, size_t bytes, const char *what) {
    off_account(o, t, (double)bytes);
    if (t == TIER_GPU) return o->dev->alloc(bytes ? bytes : 1, what);
    void *p = NULL;
    if (posix_memalign(&p, IO_ALIGN, bytes ? bytes : 1) || !p) die("out of memory allocating %zu bytes for %s", bytes, what);
    memset(p, 0, bytes); /* cache blocks past the end are read, never used: keep them finite */
    return p;
}

/* Whole pages: two buffers sharing a page could not both be page-locked. */
void *host_pinned(const Device *d, size_t bytes, const char *what) {
    void *p = NULL;
    size_t n = (bytes + IO_ALIGN - 1) / IO_ALIGN * IO_ALIGN;
    if (posix_memalign(&p, IO_ALIGN, n ? n : IO_ALIGN) || !p) die("out of memory allocating %zu bytes for %s", bytes, what);
    if (d) d->pin(p, n ? n : IO_ALIGN);
    return p;
}

void host_pinned_free(const Device *d, void *p) {
    if (d && p) d->unpin(p);
    free(p);
}

/* Host staging the device copies from: page-locked, so copies overlap. */
static void *off_staging(Offload *o, size_t bytes, const char *what) {
    void *p = off_alloc(o, TIER_CPU, bytes, what);
    if (o->dev) o->dev->pin(p, (bytes + IO_ALIGN - 1) / IO_ALIGN * IO_ALIGN); /* off_alloc's are whole pages apart */
    return p;
}

static size_t align_up(size_t x) { return (x + IO_ALIGN - 1) / IO_ALIGN * IO_ALIGN; }

static int off_tmpfile(Offload *o, int which, const char *stem) {
    snprintf(o->files[which], sizeof o->files[which], "%s/opt-%s-%d.bin", o->dir, stem, (int)getpid());
    int fd = open(o->files[which], O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) { int e = errno; o->files[which][0] = 0; die("%s: cannot create %s files: %s", o->dir, stem, strerror(e)); }
    o->slot[which] = tmp_add(o->files[which], 0);
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

/* The weight buffer of unit u: layers alternate, the output unit has its own
 * (it stays staged for the logits). */
static int wbuf(const Offload *o, int u) { return u == o->m->cfg.n_layer + 1 ? 2 : u & 1; }

/* Places one matrix (see the section's comment); dv: its device view, or NULL
 * when the CPU computes with it. A tensor made in memory (4-bit at load time,
 * or dummy) gets its disk share a place in our weight file, written by
 * place_write once the plan has passed its checks. */
static void place_matrix(Offload *o, WUnit *u, Tensor *t, Tensor *dv, int gather, off_t *wfile_at) {
    if ((!t->data && !t->gen) || t->rows == 0) return;
    if (dv && o->dev->half && t->dtype == DT_F32)
        die("%s: f32 weights; offloading to the GPU computes on 16-bit or 4-bit weights (use an f16 checkpoint, or --compress-weight)", t->name);
    size_t rb = tensor_row_bytes(t);
    WPlace *p = &u->w[u->n++];
    memset(p, 0, sizeof *p);
    p->t = t;
    p->dv = dv;
    p->gather = gather;
    p->gpu_rows = dv || (gather && o->dev) ? (int64_t)pct_of(o->pol.w_gpu, (double)t->rows) : 0;
    p->ram_end = (int64_t)pct_of(o->pol.w_gpu + o->pol.w_cpu, (double)t->rows);
    if (p->ram_end < p->gpu_rows) p->ram_end = p->gpu_rows;
    p->bytes = rb * (size_t)(t->rows - p->ram_end);
    p->fd = -1;
    if (dv && p->gpu_rows < t->rows) { p->dstage_off = u->dstage; u->dstage += align_up(rb * (size_t)t->rows); }
    if (!p->bytes) return;
    off_t off;
    int f = t->gen ? -1 : ck_locate(&o->m->ck, (const char *)t->data + rb * (size_t)p->ram_end, &off);
    if (f >= 0) { p->fd = o->wfd[f]; p->off = off; p->file = o->m->ck.files[f].path; }
    else if (o->tied && t == &o->m->lm_head) { p->same = &o->units[0].w[0]; p->off = p->same->off; } /* the embedding's disk rows */
    else {
        p->off = *wfile_at;
        *wfile_at += (off_t)align_up(p->bytes);
    }
    off_t al = p->off / IO_ALIGN * IO_ALIGN;
    p->lead = (size_t)(p->off - al);
    p->span = align_up(p->lead + p->bytes);
    if (!gather) { p->stage_off = u->stage; u->stage += p->span; }
}

/* Writes the disk shares of the tensors made in memory into our weight file,
 * reserved first (a full disk fails before any write). */
static void place_write(Offload *o, off_t wfile_at) {
    int fd = wfile_at > 0 ? off_tmpfile(o, 2, "weights") : -1;
    off_reserve(o, fd, 2, wfile_at);
    for (int u = 0; u < o->m->cfg.n_layer + 2; u++)
        for (int i = 0; i < o->units[u].n; i++) {
            WPlace *p = &o->units[u].w[i];
            Tensor *t = p->t;
            if (!p->bytes || p->fd >= 0 || p->same) continue;
            p->fd = fd;
            p->file = o->files[2];
            size_t rb = tensor_row_bytes(t);
            int64_t chunk = (int64_t)((64u << 20) / rb) + 1;
            char *tmp = t->gen ? check_malloc(rb * (size_t)chunk, "dummy weights") : NULL;
            for (int64_t r0 = p->ram_end; r0 < t->rows; r0 += chunk) {
                int64_t n = t->rows - r0 < chunk ? t->rows - r0 : chunk;
                const char *src = (const char *)t->data + rb * (size_t)r0;
                if (t->gen) { dummy_rows(o->m, t, r0, n, tmp); src = tmp; }
                size_t len = rb * (size_t)n;
                off_t at = p->off + (off_t)(rb * (size_t)(r0 - p->ram_end));
                for (size_t done = 0; done < len;) {
                    ssize_t k = pwrite(fd, src + done, len - done, at + (off_t)done);
                    if (k <= 0) die("%s: cannot write the weights' disk share: %s", p->file, k < 0 ? strerror(errno) : "short write");
                    done += (size_t)k;
                }
            }
            free(tmp);
        }
    for (int u = 0; u < o->m->cfg.n_layer + 2; u++)
        for (int i = 0; i < o->units[u].n; i++)
            if (o->units[u].w[i].same) { o->units[u].w[i].fd = o->units[u].w[i].same->fd; o->units[u].w[i].file = o->units[u].w[i].same->file; }
}

/* Device copies, counting what crosses PCIe. */
static void dcopy(Offload *o, void *dst, size_t dp, const void *src, size_t sp, size_t w, size_t rows, int kind, int stream) {
    if (kind < 2) o->pcie[kind] += (double)w * (double)rows;
    o->dev->copy2d(dst, dp, src, sp, w, rows, kind, stream);
}

/* A host buffer of n bytes onto the device at d, now (set-up only). */
static void dev_put(Offload *o, void *d, const void *h, size_t n) {
    dcopy(o, d, n, h, n, n, 1, 0, 1);
    o->dev->record(o->ev[0], 1);
    o->dev->sync(o->ev[0]);
}

/* Copies each matrix's RAM rows into memory of our own (so the plan's CPU
 * bytes are bytes this process holds; the checkpoint mapping then serves only
 * the disk share) and its device rows to the device. */
static void place_resident(Offload *o, WUnit *u) {
    for (int i = 0; i < u->n; i++) {
        WPlace *p = &u->w[i];
        Tensor *t = p->t;
        int64_t g = p->gpu_rows, e = p->ram_end;
        size_t rb = tensor_row_bytes(t), keep = rb * (size_t)(e - g), up = rb * (size_t)g;
        int tied = o->tied && t == &o->m->lm_head, low = p->gather && g > 0;
        char *mem = NULL, *base = NULL;
        if (tied) mem = (char *)o->m->embed.data + up; /* the embedding's RAM rows */
        else if (keep || low) {
            if (low) { /* a table the CPU looks up: rows [0, g) come from the device as steps need them */
                base = mmap(NULL, rb * (size_t)e, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
                if (base == MAP_FAILED) die("cannot map %.2f GiB for %s", (double)rb * (double)e / (1 << 30), t->name);
                off_account(o, TIER_CPU, (double)keep);
                mem = base + up;
            } else mem = off_alloc(o, TIER_CPU, keep, "resident weights");
            if (t->gen) dummy_rows(o->m, t, g, e - g, mem); /* made in its tier */
            else {
                const char *src = (const char *)t->data + up;
                memcpy(mem, src, keep);
                off_t fo;
                if (ck_locate(&o->m->ck, src, &fo) >= 0) { /* the mapping's copy of these pages is not needed again */
                    uintptr_t a = ((uintptr_t)src + IO_ALIGN - 1) / IO_ALIGN * IO_ALIGN, b = ((uintptr_t)src + keep) / IO_ALIGN * IO_ALIGN;
                    if (b > a) madvise((void *)a, b - a, MADV_DONTNEED);
                }
            }
            if (keep && o->pol.pin_weights && o->dev && p->dv) o->dev->pin(mem, keep);
            else if (keep && o->pol.pin_weights && mlock(mem, keep) != 0)
                warn_once(NULL, "--pin-weights: mlock failed (%s); raise `ulimit -l`", strerror(errno));
        }
        if (up && tied) p->dres = o->units[0].w[0].dres; /* the embedding's device rows */
        else if (up) {
            char *d = off_alloc(o, TIER_GPU, up, t->name ? t->name : "weights"), *tmp = NULL;
            const char *src = t->data;
            if (t->gen) { src = tmp = check_malloc(up, "dummy weights"); dummy_rows(o->m, t, 0, g, tmp); }
            dev_put(o, d, src, up);
            free(tmp);
            p->dres = d;
        }
        p->hrows = mem;
        if (p->dv && t->dtype == DT_I8) { /* the per-row scales live on the device whole */
            float *sc = off_alloc(o, TIER_GPU, sizeof(float) * (size_t)t->rows, "int8 weight scales");
            dev_put(o, sc, t->scale, sizeof(float) * (size_t)t->rows);
            p->dv->scale = sc;
        }
        if (p->dv) { p->dv->data = g == t->rows ? p->dres : NULL; p->dv->data2 = NULL; p->dv->split = 0; p->dv->tier = TIER_GPU; p->dv->gen = 0; }
        t->data = low ? base : mem; /* device mode, a matrix the device computes with: rows from gpu_rows on (the CPU never reads it) */
        t->split = low ? e : e - g;
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
    fprintf(stderr, "opt: memory plan for block %d (%d GPU batch%s of %d), %d positions per sequence, computing on %s%s\n", o->gbs * o->nb,
            o->nb, o->nb > 1 ? "es" : "", o->gbs, o->cap, o->dev ? o->dev->name : "the cpu",
            o->dev && o->pol.cpu_attention ? " (attention where the cache is)" : "");
    fprintf(stderr, "  %-22s %8s %s %8s %s %8s %s\n", "", "gpu", un, "cpu", un, "disk", un);
    for (int r = 0; r < 5; r++)
        fprintf(stderr, "  %-22s %12.3f %12.3f %12.3f%s\n", names[r], rows[r][TIER_GPU] / unit, rows[r][TIER_CPU] / unit, rows[r][TIER_DISK] / unit,
                r == 0 ? disk_note : "");
    fprintf(stderr, "  %-22s %12.3f %12.3f %12.3f%s\n", "peak", tot[TIER_GPU] / unit, tot[TIER_CPU] / unit, o->plan_mem[TIER_DISK] / unit,
            rows[0][TIER_DISK] > 0 ? "  (disk: in the offload dir)" : "");
}

int offload_block(const Offload *o) { return o->gbs * o->nb; }

/* The device copy of one of the model's 1-D tensors (all live in its pool). */
static float *dvec_of(const Offload *o, const float *p) {
    if (!p) return NULL;
    size_t i = (size_t)(p - o->m->owned);
    check(i < o->m->owned_n, "a 1-D tensor outside the model's pool");
    return o->dvec + i;
}

static void hybrid_attention(const Config *c, const KVLayer *kv, const Step *st, Scratch *s);

Offload *offload_open(Model *m, const OffloadCfg *cfg, int rows_max, int cap, DType kv_dt, int group) {
    const Config *c = &m->cfg;
    const Policy *pol = &cfg->pol;
    Offload *o = check_calloc(sizeof *o, "offloading");
    o->m = m;
    o->pol = *pol;
    o->dev = cfg->dev;
    o->gbs = pol->gpu_batch_size;
    o->nb = pol->num_gpu_batches;
    o->cap = cap;
    o->rows_max = rows_max;
    o->kv_group = kv_group(c->head_dim, group);
    o->kv_fd = o->act_fd = -1;
    snprintf(o->dir, sizeof o->dir, "%s", cfg->dir ? cfg->dir : getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    double wg = pol->w_gpu, cg = pol->c_gpu, ag = pol->a_gpu;
    if ((wg > 0 || cg > 0 || ag > 0) && !o->dev)
        die("--percent puts %s on the GPU, but there is no usable GPU (%s); give the GPU shares as 0",
            wg > 0 ? "weights" : cg > 0 ? "the KV cache" : "activations", gpu_describe());
    const Device *D = o->dev;
    check(o->nb <= MAX_GPU_BATCHES, "at most %d GPU batches", MAX_GPU_BATCHES);
    if (D) for (int i = 0; i < 3; i++) o->ev[i] = D->event();
    g_off = o;
    for (int i = 0; i < 3; i++) o->slot[i] = -1;
    offload_sweep(o->dir);

    /* weights: open the checkpoint files for direct reads */
    o->wfd = check_malloc(sizeof(int) * (size_t)(m->ck.n_files + 1), "file table");
    for (int i = 0; i < m->ck.n_files; i++) {
        o->wfd[i] = open(m->ck.files[i].path, O_RDONLY | O_DIRECT);
        if (o->wfd[i] < 0) o->wfd[i] = open(m->ck.files[i].path, O_RDONLY);
        if (o->wfd[i] < 0) die("%s: %s", m->ck.files[i].path, strerror(errno));
        posix_fadvise(o->wfd[i], 0, 0, POSIX_FADV_SEQUENTIAL);
    }
    int L = c->n_layer, H = c->n_head, h = c->hidden;
    off_t wfile_at = 0;
    o->tied = m->embed.rows && m->lm_head.data == m->embed.data && m->lm_head.gen == m->embed.gen;
    if (D) { /* the device's model: vectors and matrix views set below */
        o->dm = *m;
        o->dm.layers = check_malloc(sizeof(Layer) * (size_t)L, "the device model");
        memcpy(o->dm.layers, m->layers, sizeof(Layer) * (size_t)L);
    }
    o->units = check_calloc(sizeof(WUnit) * (size_t)(L + 2), "weight units");
    for (int u = 0; u < L + 2; u++) o->units[u].w = check_calloc(sizeof(WPlace) * 8, "weight units");
    /* unit 0: embeddings (rows gathered on demand) and project_in, on the CPU; 1..L: layers; L+1: output */
    place_matrix(o, &o->units[0], &m->embed, NULL, 1, &wfile_at);
    place_matrix(o, &o->units[0], &m->pos, NULL, 1, &wfile_at);
    place_matrix(o, &o->units[0], &m->proj_in, NULL, 0, &wfile_at);
    for (int l = 0; l < L; l++) {
        Layer *y = &m->layers[l], *dy = D ? &o->dm.layers[l] : NULL;
        Tensor *mats[] = {&y->q, &y->k, &y->v, &y->o, &y->fc1, &y->fc2};
        Tensor *dvs[] = {dy ? &dy->q : NULL, dy ? &dy->k : NULL, dy ? &dy->v : NULL, dy ? &dy->o : NULL, dy ? &dy->fc1 : NULL, dy ? &dy->fc2 : NULL};
        for (int i = 0; i < 6; i++) place_matrix(o, &o->units[l + 1], mats[i], dvs[i], 0, &wfile_at);
    }
    place_matrix(o, &o->units[L + 1], &m->proj_out, D ? &o->dm.proj_out : NULL, 0, &wfile_at);
    place_matrix(o, &o->units[L + 1], &m->lm_head, D ? &o->dm.lm_head : NULL, 0, &wfile_at); /* tied: the embedding's rows again */

    /* the cache: (layer, batch) units of areas, head-major; the first ones on the device, then RAM, then disk */
    o->dkv_dt = D && D->half && kv_dt == DT_F32 ? DT_F16 : kv_dt;
    o->kv_dt = D && !pol->cpu_attention ? o->dkv_dt : kv_dt;
    o->hb = kv_head_bytes(o->kv_dt, c->head_dim, cap, o->kv_group);
    o->dhb = kv_head_bytes(o->dkv_dt, c->head_dim, cap, o->kv_group);
    o->areas = o->gbs * H;
    int units = L * o->nb, max_disk = 0, max_host = 0;
    double total_areas = (double)units * o->areas;
    int64_t G = (int64_t)pct_of(cg, total_areas), C = (int64_t)pct_of(cg + pol->c_cpu, total_areas) - G;
    o->kv_gpu = check_malloc(sizeof(int) * 2 * (size_t)units, "cache placement");
    o->kv_cpu = o->kv_gpu + units;
    o->kv_mem_off = check_malloc(sizeof(size_t) * 2 * (size_t)units, "cache placement");
    o->dkv_off = o->kv_mem_off + units;
    o->kv_file_off = check_malloc(sizeof(off_t) * (size_t)units, "cache placement");
    size_t mem_at = 0, dmem_at = 0;
    off_t file_at = 0;
    for (int u = 0; u < units; u++) { /* spread evenly: units differ by one area at most; device extras first, RAM extras last */
        o->kv_gpu[u] = (int)(G / units + (u < G % units));
        o->kv_cpu[u] = (int)(C / units + (u >= units - C % units));
        int disk = o->areas - o->kv_gpu[u] - o->kv_cpu[u];
        o->dkv_off[u] = dmem_at;
        o->kv_mem_off[u] = mem_at;
        o->kv_file_off[u] = file_at;
        dmem_at += 2 * o->dhb * (size_t)o->kv_gpu[u];
        mem_at += 2 * o->hb * (size_t)o->kv_cpu[u];
        file_at += (off_t)(2 * o->hb * (size_t)disk);
        if (disk > max_disk) max_disk = disk;
        if (o->areas - o->kv_gpu[u] > max_host) max_host = o->areas - o->kv_gpu[u];
    }
    o->kstage_cap = 2 * o->hb * (size_t)max_disk;
    int kv_up = D && !pol->cpu_attention && max_host > 0; /* host areas go up to the device, new positions come down */
    o->dkstage_cap = kv_up ? 2 * o->dhb * (size_t)max_host : 0;
    /* activations: columns */
    o->hgpu = D ? (int)pct_of(ag, h) : 0;
    o->hcpu = (int)pct_of(ag + pol->a_cpu, h) - o->hgpu;
    if (o->hcpu < 0) o->hcpu = 0;
    int hh = h - o->hgpu, hd = hh - o->hcpu;
    o->xs_rows = rows_max < o->gbs * cap ? rows_max : o->gbs * cap;

    /* staging sizes */
    for (int u = 0; u < L + 2; u++) {
        int b = wbuf(o, u);
        if (o->units[u].stage > o->wstage_cap[b]) o->wstage_cap[b] = o->units[u].stage;
        if (u && o->units[u].dstage > o->dwstage_cap[b]) o->dwstage_cap[b] = o->units[u].dstage;
    }

    /* the plan, before allocating anything big */
    double w_t[TIER_COUNT] = {0}, vec = (double)m->owned_n * sizeof(float);
    for (int u = 0; u < L + 2; u++)
        for (int i = 0; i < o->units[u].n; i++) {
            WPlace *p = &o->units[u].w[i];
            double rb = (double)tensor_row_bytes(p->t);
            if (u == L + 1 && p->t == &m->lm_head && o->tied) continue; /* the embedding's rows */
            w_t[TIER_GPU] += rb * (double)p->gpu_rows + (p->dv && p->t->dtype == DT_I8 ? 4.0 * (double)p->t->rows : 0);
            w_t[TIER_CPU] += rb * (double)(p->ram_end - p->gpu_rows);
            w_t[TIER_DISK] += (double)p->bytes;
        }
    double gather = (double)rows_max * (double)(tensor_row_bytes(&m->embed) + tensor_row_bytes(&m->pos));
    double kv_disk = (double)file_at, act_disk = (double)rows_max * hd * 4.0, xsb = 4.0 * o->xs_rows;
    /* a layer's workspace; the engine's: final hidden rows, 64 rows of logits, the sampler */
    double ws = xsb * (h * 6.0 + c->ffn + c->embed_dim), eng = (double)rows_max * c->embed_dim * 4.0 + 64.0 * (c->vocab + c->embed_dim) * 4.0 + 8.0 * c->vocab;
    double wst = (double)o->wstage_cap[0] + (double)o->wstage_cap[1] + (double)o->wstage_cap[2];
    double dwst = (double)o->dwstage_cap[0] + (double)o->dwstage_cap[1] + (double)o->dwstage_cap[2];
    double rows[5][TIER_COUNT] = {
        {w_t[TIER_GPU] + (D ? vec : 0), w_t[TIER_CPU] + vec, w_t[TIER_DISK]},
        {(double)dmem_at, (double)mem_at, kv_disk},
        {(double)rows_max * o->hgpu * 4.0, (double)rows_max * o->hcpu * 4.0, act_disk},
        {D ? dwst + 2.0 * o->dkstage_cap + 32.0 * o->areas + 2 * xsb * h + (kv_up ? 2 * 2 * xsb * h : 0) + 12.0 * rows_max : 0,
         wst + 2.0 * o->kstage_cap + gather + 2 * xsb * (hh + hd) + (kv_up ? 2 * 2 * xsb * h : 0), 0},
        {D ? ws + (double)rows_max * c->embed_dim * 4.0 + 64.0 * (c->vocab + c->embed_dim) * 4.0 : 0, ws + eng}};
    static const char *const names[5] = {"weights", "kv cache", "activations", "staging (I/O buffers)", "workspace"};
    char note[128] = "";
    if (w_t[TIER_DISK] > 0) snprintf(note, sizeof note, "  (disk share read from %s)", wfile_at > 0 ? "the offload dir" : "the checkpoint, not copied");
    double offdir = kv_disk + act_disk + (double)wfile_at;
    for (int t = 0; t < TIER_DISK; t++) for (int r = 0; r < 5; r++) o->plan_mem[t] += rows[r][t];
    o->plan_mem[TIER_DISK] = offdir; /* the checkpoint's own bytes are not new disk use */
    if (!cfg->quiet) plan_print(o, rows, names, note);
    static const char *const flag[TIER_COUNT] = {"--gpu-mem", "--cpu-mem", "--disk-mem"};
    for (int t = 0; t < TIER_COUNT; t++) {
        double need = o->plan_mem[t], have = cfg->mem[t];
        const char *what = flag[t], *hint = "";
        if (t == TIER_GPU && D && !(have > 0)) { have = D->free_bytes(); what = "the device's free memory"; }
        if (t == TIER_CPU && !(have > 0)) { have = mem_usable(); what = "the memory available"; hint = " (--cpu-mem overrides)"; }
        if (have > 0 && need > have) {
            if (cfg->quiet) plan_print(o, rows, names, note);
            char a[32], b[32];
            size_format(a, sizeof a, need);
            size_format(b, sizeof b, have);
            die("the policy does not fit: %s needs %s, %s is %s%s", tier_names[t], a, what, b, hint);
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
    place_write(o, wfile_at);
    off_account(o, TIER_CPU, vec);
    if (D) {
        o->dvec = off_alloc(o, TIER_GPU, (size_t)vec, "biases and LayerNorms");
        dev_put(o, o->dvec, m->owned, (size_t)vec);
        o->dm.lnfw = dvec_of(o, m->lnfw);
        o->dm.lnfb = dvec_of(o, m->lnfb);
        for (int l = 0; l < L; l++) {
            Layer *y = &m->layers[l], *dy = &o->dm.layers[l];
            float **dst[] = {&dy->qb, &dy->kb, &dy->vb, &dy->ob, &dy->fc1b, &dy->fc2b, &dy->ln1w, &dy->ln1b, &dy->ln2w, &dy->ln2b};
            float *src[] = {y->qb, y->kb, y->vb, y->ob, y->fc1b, y->fc2b, y->ln1w, y->ln1b, y->ln2w, y->ln2b};
            for (int i = 0; i < 10; i++) *dst[i] = dvec_of(o, src[i]);
        }
    }
    for (int u = 0; u < L + 2; u++) place_resident(o, &o->units[u]);
    io_init(&o->io, 4);
    for (int b = 0; b < 3; b++) {
        o->wstage[b] = off_staging(o, o->wstage_cap[b], "weight staging");
        group_init(&o->wg[b]);
    }
    for (int b = 0; b < 2; b++) {
        o->kstage[b] = off_staging(o, o->kstage_cap, "cache staging");
        o->xs[b] = off_staging(o, (size_t)xsb * hh + 1, "activation staging");
        o->xdisk[b] = off_alloc(o, TIER_CPU, (size_t)xsb * hd + 1, "activation staging");
        o->kptr[b] = check_malloc(sizeof(char *) * 2 * (size_t)o->areas, "cache views");
        group_init(&o->kread[b]);
        group_init(&o->xread[b]);
        o->kbuf_unit[b] = o->xbuf_batch[b] = -1;
    }
    o->kv_mem = off_alloc(o, TIER_CPU, mem_at, "the KV cache");
    if (kv_up) D->pin(o->kv_mem, mem_at); /* it goes up every token */
    o->kwrite = check_malloc(sizeof(IoGroup) * (size_t)units, "cache writes");
    for (int u = 0; u < units; u++) group_init(&o->kwrite[u]);
    o->xwrite = check_malloc(sizeof(IoGroup) * (size_t)o->nb, "activation writes");
    for (int k = 0; k < o->nb; k++) group_init(&o->xwrite[k]);
    o->x_cpu = off_alloc(o, TIER_CPU, sizeof(float) * (size_t)rows_max * o->hcpu + 1, "resident activations");
    if (kv_disk > 0) { o->kv_fd = off_tmpfile(o, 0, "cache"); off_reserve(o, o->kv_fd, 0, (off_t)kv_disk); off_account(o, TIER_DISK, kv_disk); }
    if (act_disk > 0) { o->act_fd = off_tmpfile(o, 1, "activations"); off_reserve(o, o->act_fd, 1, (off_t)act_disk); off_account(o, TIER_DISK, act_disk); }
    off_account(o, TIER_DISK, (double)wfile_at);
    /* gather region for embedding rows on disk: virtual, pages appear as rows are read */
    o->egather_len = align_up(o->units[0].w[0].bytes) + align_up(o->units[0].w[1].bytes) + 2 * IO_ALIGN;
    o->egather = mmap(NULL, o->egather_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (o->egather == MAP_FAILED) die("cannot map %.2f GiB for embedding rows", (double)o->egather_len / (1 << 30));
    off_account(o, TIER_CPU, gather);
    off_account(o, TIER_CPU, eng);
    if (!D) {
        scratch_init(&o->s, c, o->xs_rows, cap);
        off_account(o, TIER_CPU, ws);
    } else {
        off_account(o, TIER_GPU, ws);
        D->scratch(&o->s, c, o->xs_rows, cap);
        scratch_init(&o->hs, c, o->xs_rows, cap);
        float **hp[] = {&o->hs.x, &o->hs.q, &o->hs.k, &o->hs.v, &o->hs.att}; /* these cross PCIe */
        for (int i = 0; i < 5; i++) { free(*hp[i]); *hp[i] = host_pinned(D, sizeof(float) * (size_t)o->xs_rows * h, "activations"); }
        off_account(o, TIER_CPU, ws);
        for (int b = 0; b < 3; b++) {
            o->dwstage[b] = off_alloc(o, TIER_GPU, o->dwstage_cap[b], "weight staging");
            o->w_ready[b] = D->event();
            o->w_free[b] = D->event();
        }
        o->dkv_mem = off_alloc(o, TIER_GPU, dmem_at, "the KV cache");
        for (int b = 0; b < 2; b++) {
            o->dkstage[b] = off_alloc(o, TIER_GPU, o->dkstage_cap, "cache staging");
            o->dkptr[b] = off_alloc(o, TIER_GPU, sizeof(char *) * 2 * (size_t)o->areas, "cache tables");
            o->hdkptr[b] = check_malloc(sizeof(char *) * 2 * (size_t)o->areas, "cache tables");
            o->dxs[b] = off_alloc(o, TIER_GPU, (size_t)xsb * h, "activation staging");
            if (kv_up) {
                o->dkn[b] = off_alloc(o, TIER_GPU, (size_t)xsb * h, "new keys");
                o->dvn[b] = off_alloc(o, TIER_GPU, (size_t)xsb * h, "new values");
                o->hk[b] = off_staging(o, (size_t)xsb * h, "new keys");
                o->hv[b] = off_staging(o, (size_t)xsb * h, "new values");
            }
            o->up[b] = D->event();
            o->c_done[b] = D->event();
            o->down[b] = D->event();
        }
        o->dxg = off_alloc(o, TIER_GPU, sizeof(float) * (size_t)rows_max * o->hgpu + 1, "resident activations");
        o->dstep = off_alloc(o, TIER_GPU, sizeof(int) * 3 * (size_t)rows_max, "step indices");
        o->hstep = check_malloc(sizeof(int) * 3 * (size_t)rows_max, "step indices");
        o->dfinal = off_alloc(o, TIER_GPU, sizeof(float) * (size_t)rows_max * (model_last(m) ? c->embed_dim : h), "final hidden states");
        o->dhid = off_alloc(o, TIER_GPU, sizeof(float) * 64 * (size_t)c->embed_dim, "logits input");
        o->dlog = off_alloc(o, TIER_GPU, sizeof(float) * 64 * (size_t)c->vocab, "logits");
        o->hybrid = *D->be;
        o->hybrid.attention = hybrid_attention;
        o->att_row0 = check_malloc(sizeof(int) * (size_t)H, "attention split");
    }
    o->xlast = check_malloc(sizeof(int) * (size_t)o->nb, "batches");
    for (int k = 0; k < o->nb; k++) o->xlast[k] = -1;
    /* the mappings now serve only disk reads (by descriptor): drop our references to their pages */
    for (int i = 0; i < m->ck.n_files; i++) madvise((void *)m->ck.files[i].base, m->ck.files[i].size, MADV_DONTNEED);
    return o;
}

/* ----------------------------------------------------------------------------
 * Staging: disk reads into host buffers, and pointing tensors and views at
 * them; on a device, the copies to and from it. */

static double off_wait(Offload *o, IoGroup *g, const char *what) {
    double w = group_wait(g, what);
    o->t_wait += w;
    return w;
}

static void dev_sync(Offload *o, void *ev) {
    double t0 = now_sec();
    o->dev->sync(ev);
    o->t_wait += now_sec() - t0;
}

/* The disk rows of unit u into its host buffer. */
static void stage_weights(Offload *o, int u) {
    WUnit *w = &o->units[u];
    int b = wbuf(o, u);
    for (int i = 0; i < w->n; i++) {
        WPlace *p = &w->w[i];
        if (!p->bytes || p->gather) continue;
        io_submit(&o->io, 0, p->fd, p->off - (off_t)p->lead, p->span, o->wstage[b] + p->stage_off, &o->wg[b], p->file, !o->pol.overlap);
    }
}

/* The CPU computes unit u: its disk rows are in the host buffer. */
static void use_weights(Offload *o, int u) {
    WUnit *w = &o->units[u];
    for (int i = 0; i < w->n; i++)
        if (w->w[i].bytes && !w->w[i].gather) w->w[i].t->data2 = o->wstage[wbuf(o, u)] + w->w[i].stage_off + w->w[i].lead;
}

/* Device mode: unit u's matrices, each whole and contiguous, into its device
 * buffer on the weight stream: GPU rows copied within the device (at its
 * bandwidth, ~1% of what PCIe takes for the rest), RAM rows and staged disk
 * rows up from the host. A matrix wholly on the device is used in place. */
static void dev_weights_in(Offload *o, int u) {
    const Device *D = o->dev;
    WUnit *w = &o->units[u];
    int b = wbuf(o, u);
    D->wait(3, o->w_free[b]); /* the buffer's last unit has computed */
    for (int i = 0; i < w->n; i++) {
        WPlace *p = &w->w[i];
        int64_t g = p->gpu_rows, e = p->ram_end, R = p->t->rows;
        if (g == R) continue;
        size_t rb = tensor_row_bytes(p->t);
        char *dst = o->dwstage[b] + p->dstage_off;
        dcopy(o, dst, 0, p->dres, 0, rb * (size_t)g, 1, 2, 3);
        dcopy(o, dst + rb * (size_t)g, 0, p->hrows, 0, rb * (size_t)(e - g), 1, 0, 3);
        dcopy(o, dst + rb * (size_t)e, 0, o->wstage[b] + p->stage_off + p->lead, 0, rb * (size_t)(R - e), 1, 0, 3);
        p->dv->data = dst;
    }
    D->record(o->w_ready[b], 3);
}

/* Unit u computes next. On the CPU: wait for its reads, start the next
 * unit's. On a device: send the next unit up, start the reads of the one
 * after (disk two units ahead of the compute, PCIe one), and have the compute
 * wait for this unit's upload. */
static void weights_begin(Offload *o, int u) {
    int last = o->m->cfg.n_layer + 1;
    if (!o->dev) {
        off_wait(o, &o->wg[wbuf(o, u)], "the weights");
        use_weights(o, u);
        if (u + 1 <= last && !(u == 0 && o->ahead)) stage_weights(o, u + 1);
        o->ahead = 0;
        return;
    }
    if (u + 1 <= last) {
        off_wait(o, &o->wg[wbuf(o, u + 1)], "the weights");
        dev_weights_in(o, u + 1);
    }
    if (u + 2 <= last) {
        dev_sync(o, o->w_ready[wbuf(o, u + 2)]); /* the host buffer has gone up */
        stage_weights(o, u + 2);
    }
    o->dev->wait(0, o->w_ready[wbuf(o, u)]);
}

static int int_cmp(const void *a, const void *b) { return (*(const int *)a > *(const int *)b) - (*(const int *)a < *(const int *)b); }

/* The embedding and position rows the step needs: from the device (its
 * share of the tables, into their host mapping) or from disk (into the sparse
 * region; each row once: a page already read is kept). */
static void gather_rows(Offload *o, const Step *st) {
    IoGroup g;
    group_init(&g);
    char *base = o->egather;
    madvise(base, o->egather_len, MADV_DONTNEED); /* last step's rows go: the region holds one step's */
    int *rows = NULL, nr = 0;
    for (int i = 0; i < 2; i++) { /* rows on the device come down */
        WPlace *p = &o->units[0].w[i];
        if (!p->gpu_rows) continue;
        size_t rb = tensor_row_bytes(p->t), low = rb * (size_t)p->gpu_rows / IO_ALIGN * IO_ALIGN;
        if (low) madvise((void *)p->t->data, low, MADV_DONTNEED); /* and last step's go */
        if (!rows) rows = check_malloc(sizeof(int) * (size_t)(st->n + 1), "embedding rows");
        nr = 0;
        for (int r = 0; r < st->n; r++) {
            int row = i == 0 ? st->tok[r] : st->pos[r] + 2;
            if (row < p->gpu_rows) rows[nr++] = row;
        }
        qsort(rows, (size_t)nr, sizeof(int), int_cmp);
        for (int k = 0; k < nr; k++)
            if (!k || rows[k] != rows[k - 1]) dcopy(o, (char *)p->t->data + rb * (size_t)rows[k], 0, p->dres + rb * (size_t)rows[k], 0, rb, 1, 1, 2);
    }
    if (rows) { o->dev->record(o->ev[1], 2); dev_sync(o, o->ev[1]); free(rows); }
    for (int i = 0; i < 2; i++) {
        WPlace *p = &o->units[0].w[i];
        if (!p->bytes) continue;
        size_t rb = tensor_row_bytes(p->t);
        p->t->data2 = base + p->lead;
        for (int r = 0; r < st->n; r++) {
            int64_t row = i == 0 ? st->tok[r] : st->pos[r] + 2;
            if (row < p->ram_end) continue;
            size_t a0 = (p->lead + rb * (size_t)(row - p->ram_end)) / IO_ALIGN * IO_ALIGN;
            size_t a1 = align_up(p->lead + rb * (size_t)(row - p->ram_end + 1));
            unsigned char vec;
            if (mincore(base + a0, 1, &vec) == 0 && (vec & 1) && mincore(base + a1 - 1, 1, &vec) == 0 && (vec & 1)) continue;
            io_submit(&o->io, 0, p->fd, p->off - (off_t)p->lead + (off_t)a0, a1 - a0, base + a0, &g, p->file, !o->pol.overlap);
        }
        base += align_up(p->span) + IO_ALIGN;
    }
    off_wait(o, &g, "the embeddings");
}

/* The disk areas of cache unit (layer l, batch k) into host buffer b: for
 * each sequence only the positions written so far. */
static void stage_cache(Offload *o, int l, int k, int b, const int *pos0) {
    int u = l * o->nb + k, first = o->kv_gpu[u] + o->kv_cpu[u];
    if (o->kbuf_unit[b] >= 0) off_wait(o, &o->kwrite[o->kbuf_unit[b]], "the cache file"); /* the buffer's last writes are out */
    off_wait(o, &o->kwrite[u], "the cache file"); /* and this unit's last writes are on disk */
    const Config *c = &o->m->cfg;
    for (int i = first; i < o->areas; i++) {
        int have = pos0[i % o->gbs];
        off_t fo = o->kv_file_off[u] + (off_t)(2 * o->hb * (size_t)(i - first));
        char *dst = o->kstage[b] + 2 * o->hb * (size_t)(i - first);
        for (int v = 0; v < 2; v++) {
            size_t off, len;
            kv_span(o->kv_dt, c->head_dim, o->kv_group, 0, have, v, &off, &len);
            if (len) io_submit(&o->io, 0, o->kv_fd, fo + (off_t)(v * o->hb + off), len, dst + v * o->hb + off, &o->kread[b], "the cache file", !o->pol.overlap);
        }
    }
    o->kbuf_unit[b] = u;
}

/* Writes back what the step added to the disk areas: positions [lo, hi] of
 * each sequence. */
static void store_cache(Offload *o, int l, int k, int b, const int *lo, const int *hi) {
    const Config *c = &o->m->cfg;
    int u = l * o->nb + k, first = o->kv_gpu[u] + o->kv_cpu[u];
    for (int i = first; i < o->areas; i++) {
        int s = i % o->gbs;
        off_t fo = o->kv_file_off[u] + (off_t)(2 * o->hb * (size_t)(i - first));
        char *src = o->kstage[b] + 2 * o->hb * (size_t)(i - first);
        for (int v = 0; v < 2; v++) {
            size_t off, len;
            kv_span(o->kv_dt, c->head_dim, o->kv_group, lo[s], hi[s] + 1, v, &off, &len);
            if (len) io_submit(&o->io, 1, o->kv_fd, fo + (off_t)(v * o->hb + off), len, src + v * o->hb + off, &o->kwrite[u], "the cache file", !o->pol.overlap);
        }
    }
}

/* The area tables of cache unit (layer l, batch k) in buffer b: host areas
 * (RAM in place, disk in kstage[b]) in kptr[b], device ones NULL. On a
 * device, the device's table too, sent up, where without --cpu-attention the
 * host areas are copies in dkstage[b] whose written positions go up now, in
 * runs of areas adjacent in memory with as many positions. */
static void cache_tables(Offload *o, int l, int k, int b, const int *pos0) {
    const Config *c = &o->m->cfg;
    const Device *D = o->dev;
    int u = l * o->nb + k, g = o->kv_gpu[u], cpu = o->kv_cpu[u], A = o->areas, H = c->n_head, up = D && !o->pol.cpu_attention;
    char **hp = o->kptr[b], **dp = D ? o->hdkptr[b] : NULL;
    for (int i = 0; i < A; i++) {
        int a = (i % o->gbs) * H + i / o->gbs; /* placement is head-major, tables sequence-major */
        char *host = NULL, *dev = NULL;
        if (i < g) dev = o->dkv_mem + o->dkv_off[u] + 2 * o->dhb * (size_t)i;
        else {
            host = i < g + cpu ? o->kv_mem + o->kv_mem_off[u] + 2 * o->hb * (size_t)(i - g) : o->kstage[b] + 2 * o->hb * (size_t)(i - g - cpu);
            if (up) dev = o->dkstage[b] + 2 * o->dhb * (size_t)(i - g);
        }
        hp[a] = host;
        hp[A + a] = host ? host + o->hb : NULL;
        if (dp) { dp[a] = dev; dp[A + a] = dev ? dev + o->dhb : NULL; }
    }
    o->kview[b] = (KVLayer){o->kv_dt, o->gbs, H, c->head_dim, o->cap, o->kv_group, o->hb, hp, hp + A};
    if (!D) return;
    o->dview[b] = (KVLayer){o->dkv_dt, o->gbs, H, c->head_dim, o->cap, o->kv_group, o->dhb, o->dkptr[b], o->dkptr[b] + A};
    dcopy(o, o->dkptr[b], 0, dp, 0, sizeof(char *) * 2 * (size_t)A, 1, 0, 1);
    for (int i0 = g, i1; up && i0 < A; i0 = i1) {
        int have = pos0[i0 % o->gbs], ram = i0 < g + cpu;
        for (i1 = i0 + 1; i1 < A && (i1 < g + cpu) == ram && pos0[i1 % o->gbs] == have; i1++) {}
        for (int v = 0; v < 2; v++) {
            size_t off, len, at = (size_t)v * o->hb;
            kv_span(o->kv_dt, c->head_dim, o->kv_group, 0, have, v, &off, &len);
            dcopy(o, (char *)dp[i0 % o->gbs * H + i0 / o->gbs] + at + off, 2 * o->dhb, hp[i0 % o->gbs * H + i0 / o->gbs] + at + off, 2 * o->hb, len,
                      (size_t)(i1 - i0), 0, 1);
        }
    }
}

/* Activations of batch k (rows r0..r1) into buffer b: the disk columns are
 * read now, the RAM columns copied when used. */
static void stage_x(Offload *o, int k, int b, int r0, int r1) {
    int hd = o->m->cfg.hidden - o->hgpu - o->hcpu;
    if (o->xbuf_batch[b] >= 0) off_wait(o, &o->xwrite[o->xbuf_batch[b]], "the activation file");
    off_wait(o, &o->xwrite[k], "the activation file");
    o->xbuf_batch[b] = k;
    if (hd > 0 && r1 > r0)
        io_submit(&o->io, 0, o->act_fd, (off_t)sizeof(float) * r0 * hd, sizeof(float) * (size_t)(r1 - r0) * hd, (char *)o->xdisk[b], &o->xread[b],
                  "the activation file", !o->pol.overlap);
}

/* The host columns of the batch in buffer b, assembled in xs[b]. */
static float *use_x(Offload *o, int b, int r0, int r1) {
    int hh = o->m->cfg.hidden - o->hgpu, hc = o->hcpu, hd = hh - hc;
    off_wait(o, &o->xread[b], "the activation file");
    for (int r = r0; r < r1; r++) {
        float *x = o->xs[b] + (size_t)(r - r0) * hh;
        memcpy(x, o->x_cpu + (size_t)r * hc, sizeof(float) * (size_t)hc);
        memcpy(x + hc, o->xdisk[b] + (size_t)(r - r0) * hd, sizeof(float) * (size_t)hd);
    }
    return o->xs[b];
}

/* The host columns of batch k home from xs[b]: RAM ones copied, disk ones written. */
static void store_x(Offload *o, int k, int b, int r0, int r1) {
    int hh = o->m->cfg.hidden - o->hgpu, hc = o->hcpu, hd = hh - hc;
    for (int r = r0; r < r1; r++) {
        const float *x = o->xs[b] + (size_t)(r - r0) * hh;
        memcpy(o->x_cpu + (size_t)r * hc, x, sizeof(float) * (size_t)hc);
        memcpy(o->xdisk[b] + (size_t)(r - r0) * hd, x + hc, sizeof(float) * (size_t)hd);
    }
    o->xbuf_batch[b] = k;
    if (hd > 0 && r1 > r0)
        io_submit(&o->io, 1, o->act_fd, (off_t)sizeof(float) * r0 * hd, sizeof(float) * (size_t)(r1 - r0) * hd, (char *)o->xdisk[b], &o->xwrite[k],
                  "the activation file", !o->pol.overlap);
}

/* Device mode: the batch's activations into dxs[b] on the upload stream:
 * device columns from dxg, host ones from xs[b]. Waits for the buffer's last
 * user to be down, and for this batch's last write-back to dxg. */
static void dev_x_in(Offload *o, int k, int b, int r0, int r1) {
    const Device *D = o->dev;
    int h = o->m->cfg.hidden, hg = o->hgpu, hh = h - hg, n = r1 - r0;
    D->wait(1, o->down[b]);
    if (o->xlast[k] >= 0) D->wait(1, o->down[o->xlast[k]]);
    size_t f = sizeof(float);
    dcopy(o, o->dxs[b], f * h, o->dxg + (size_t)r0 * hg, f * hg, f * hg, (size_t)n, 2, 1);
    dcopy(o, o->dxs[b] + hg, f * h, o->xs[b], f * hh, f * hh, (size_t)n, 0, 1);
}

/* ----------------------------------------------------------------------------
 * Device mode: a batch through a layer, the hybrid attention, and the host's
 * share of the results. */

/* Attention with the cache split between the device and the CPU
 * (--cpu-attention): the device attends its areas; q, k, v come down, the CPU
 * stores and attends the host areas (OpenMP over rows x heads, f32), and their
 * outputs go up into the device's att, one strided copy per head. */
static void hybrid_attention(const Config *c, const KVLayer *kv, const Step *st, Scratch *s) {
    Offload *o = g_off;
    const Device *D = o->dev;
    int n = st->n, h = c->hidden, HD = c->head_dim;
    size_t f = sizeof(float), bytes = f * (size_t)n * h;
    if (o->att_dev) D->be->attention(c, kv, st, s);
    D->record(o->ev[1], 0);
    D->wait(2, o->ev[1]);
    dcopy(o, o->hs.q, bytes, s->q, bytes, bytes, 1, 1, 2);
    dcopy(o, o->hs.k, bytes, s->k, bytes, bytes, 1, 1, 2);
    dcopy(o, o->hs.v, bytes, s->v, bytes, bytes, 1, 1, 2);
    D->record(o->ev[1], 2);
    dev_sync(o, o->ev[1]);
    cpu_backend.attention(c, o->att_view, o->att_step, &o->hs);
    for (int hd = 0; hd < c->n_head; hd++) {
        int r = o->att_row0[hd];
        dcopy(o, s->att + (size_t)r * h + hd * HD, f * h, o->hs.att + (size_t)r * h + hd * HD, f * h, f * HD, (size_t)(n - r), 0, 1);
    }
    D->record(o->ev[1], 1);
    D->wait(0, o->ev[1]);
}

/* Batch k of layer l (rows r0..r1 of the step, buffer b) onto the device and
 * through the layer; what the host keeps starts down. */
static void dev_layer(Offload *o, int l, int k, int b, const Step *sub, const Step *dsub, int r0, int r1, const int *pos0) {
    const Device *D = o->dev;
    const Config *c = &o->m->cfg;
    int h = c->hidden, hg = o->hgpu, hh = h - hg, n = r1 - r0, u = l * o->nb + k;
    int g = o->kv_gpu[u], host = o->areas - g, catt = o->pol.cpu_attention;
    off_wait(o, &o->kread[b], "the cache file");
    use_x(o, b, r0, r1);
    dev_x_in(o, k, b, r0, r1);
    cache_tables(o, l, k, b, pos0);
    D->record(o->up[b], 1);
    D->wait(0, o->up[b]);
    o->s.be = catt && host ? &o->hybrid : D->be;
    if (catt && host) {
        o->att_view = &o->kview[b];
        o->att_step = sub;
        o->att_dev = g > 0;
        for (int hd = 0, r = 0; hd < c->n_head; hd++) { /* rows are ordered by sequence: a head's host sequences are a tail */
            int s0 = g - hd * o->gbs < 0 ? 0 : g - hd * o->gbs > o->gbs ? o->gbs : g - hd * o->gbs;
            for (r = 0; r < n && sub->slot[r] < s0; r++) {}
            o->att_row0[hd] = r;
        }
    }
    double t0 = now_sec();
    layer_forward(&o->dm, &o->dm.layers[l], l, &o->dview[b], dsub, o->dxs[b], &o->s);
    size_t f = sizeof(float);
    if (host && !catt) { /* the new keys and values, for the host areas (the scratch is the next batch's) */
        dcopy(o, o->dkn[b], 0, o->s.k, 0, f * n * h, 1, 2, 0);
        dcopy(o, o->dvn[b], 0, o->s.v, 0, f * n * h, 1, 2, 0);
    }
    o->t_compute += now_sec() - t0;
    D->record(o->c_done[b], 0);
    D->wait(2, o->c_done[b]);
    dcopy(o, o->dxg + (size_t)r0 * hg, f * hg, o->dxs[b], f * h, f * hg, (size_t)n, 2, 2);
    dcopy(o, o->xs[b], f * hh, o->dxs[b] + hg, f * h, f * hh, (size_t)n, 1, 2);
    if (host && !catt) {
        dcopy(o, o->hk[b], 0, o->dkn[b], 0, f * n * h, 1, 1, 2);
        dcopy(o, o->hv[b], 0, o->dvn[b], 0, f * n * h, 1, 1, 2);
    }
    D->record(o->down[b], 2);
    o->xlast[k] = b;
    o->pend[b] = (Pending){hh > 0 || host > 0, l, k, r0, r1};
}

/* The host's work for buffer b's batch once its downloads are in: the
 * activations' host columns home, the new keys and values into the host
 * areas (without --cpu-attention: with it the CPU stored them), and the
 * disk areas' new positions written back. */
static void dev_flush(Offload *o, int b, const Step *sub, const int *lo, const int *hi) {
    Pending *p = &o->pend[b];
    if (!p->active) return;
    p->active = 0;
    const Config *c = &o->m->cfg;
    int h = c->hidden, H = c->n_head, HD = c->head_dim, u = p->l * o->nb + p->k;
    dev_sync(o, o->down[b]);
    if (h > o->hgpu) store_x(o, p->k, b, p->r0, p->r1);
    if (o->areas == o->kv_gpu[u]) return;
    if (!o->pol.cpu_attention) {
        const Step *st = &sub[p->k];
        const KVLayer *kv = &o->kview[b];
        #pragma omp parallel for collapse(2) if (kv->dtype == DT_Q4 && st->n * H > 64)
        for (int r = 0; r < st->n; r++)
            for (int hd = 0; hd < H; hd++)
                if (kv->k[st->slot[r] * H + hd])
                    kv_store(kv, st->slot[r], hd, st->pos[r], o->hk[b] + (size_t)r * h + hd * HD, o->hv[b] + (size_t)r * h + hd * HD);
    }
    store_cache(o, p->l, p->k, b, lo + p->k * o->gbs, hi + p->k * o->gbs);
}

/* ----------------------------------------------------------------------------
 * Leftovers and limits: the files of runs killed before they could remove
 * them, and how much memory the machine can give (the CPU budget when
 * --cpu-mem is not given, so that a policy too big for RAM is refused rather
 * than met by the OOM killer). */

/* The PID in one of our scratch files' names, or 0 when the name is not exactly ours. */
static long sweep_pid(const char *name) {
    static const char *const stem[] = {"opt-cache-", "opt-activations-", "opt-weights-", "opt-probe-"};
    for (int i = 0; i < 4; i++) {
        size_t n = strlen(stem[i]);
        if (strncmp(name, stem[i], n) || !isdigit((unsigned char)name[n])) continue;
        char *end;
        long pid = strtol(name + n, &end, 10);
        return !strcmp(end, i == 3 ? ".tmp" : ".bin") && pid > 0 && pid <= INT_MAX ? pid : 0;
    }
    return 0;
}

void offload_sweep(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return; /* a missing or unreadable dir is reported where it is needed */
    char list[256] = "";
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        long pid = sweep_pid(e->d_name);
        struct stat st;
        if (!pid || pid == getpid() || fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) || !S_ISREG(st.st_mode) ||
            st.st_uid != geteuid() || kill((pid_t)pid, 0) == 0 || errno != ESRCH || unlinkat(dirfd(d), e->d_name, 0))
            continue;
        size_t l = strlen(list);
        if (l < sizeof list - 1 && snprintf(list + l, sizeof list - l, "%s%s", n ? " " : "", e->d_name) >= (int)(sizeof list - l))
            memcpy(list + sizeof list - 4, "...", 4);
        n++;
    }
    closedir(d);
    if (n) fprintf(stderr, "opt: removed %d file%s left in %s by killed runs: %s\n", n, n > 1 ? "s" : "", dir, list);
}

/* A number from a one-line file ("max" and a missing file: -1). */
static double file_number(const char *dir, const char *name) {
    char path[4200], line[64];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "r");
    double v = -1;
    if (f && fgets(line, sizeof line, f) && isdigit((unsigned char)line[0])) v = strtod(line, NULL);
    if (f) fclose(f);
    return v;
}

double mem_usable(void) {
    char line[4200];
    double avail = 1024.0 * (double)meminfo_kb("MemAvailable:");
    if (avail < 0) avail = (double)sysconf(_SC_AVPHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
    /* our cgroup and its ancestors: each limit less its usage (v2: "0::PATH", v1: "N:...memory...:PATH") */
    FILE *f = fopen("/proc/self/cgroup", "r");
    while (f && fgets(line, sizeof line, f)) {
        char *a = strchr(line, ':'), *b = a ? strchr(a + 1, ':') : NULL;
        if (!b) continue;
        *a = *b = 0;
        b[1 + strcspn(b + 1, "\n")] = 0;
        int v2 = !strcmp(line, "0") && a + 1 == b, v1 = strstr(a + 1, "memory") != NULL;
        if (!v1 && !v2) continue;
        char dir[4200];
        snprintf(dir, sizeof dir, "%s%s", v2 ? "/sys/fs/cgroup" : "/sys/fs/cgroup/memory", b + 1);
        for (;;) {
            double lim = file_number(dir, v2 ? "memory.max" : "memory.limit_in_bytes");
            double use = file_number(dir, v2 ? "memory.current" : "memory.usage_in_bytes");
            if (lim >= 0 && use >= 0 && lim - use < avail) avail = fmax(0, lim - use);
            char *slash = strrchr(dir, '/');
            if (!slash || slash - dir < (v2 ? 14 : 21)) break; /* past the hierarchy's root */
            *slash = 0;
        }
    }
    if (f) fclose(f);
    return avail;
}

/* ----------------------------------------------------------------------------
 * The block schedule: token -> layer -> GPU batch. A layer's weights are read
 * once per token and serve every batch; while batch k computes, the cache and
 * activations of the next batch are read, and while layer l computes, layer
 * l+1's weights are. Writes go out behind the compute. */

typedef struct {
    Step sub[MAX_GPU_BATCHES];  /* each batch's rows; slots relative to the batch */
    Step dsub[MAX_GPU_BATCHES]; /* the same with device copies of the indices */
    int r_at[MAX_GPU_BATCHES + 1]; /* batch k is rows r_at[k] .. r_at[k+1] of the step */
    int *pos0, *lo, *hi;   /* (block) per sequence: positions cached before the step, first and last position written */
    int *slot_rel;         /* (n) */
} Batches;

static void forward_cpu(Offload *o, const Step *st, Batches *B, const float *xin, float *out) {
    Model *m = o->m;
    const Config *c = &m->cfg;
    int L = c->n_layer, nb = o->nb, *r_at = B->r_at, buf[MAX_GPU_BATCHES], nx[MAX_GPU_BATCHES], first = nb, h = c->hidden;
    Step *sub = B->sub;
    double t0;
    /* batches with rows alternate buffers (a finished batch in between must not make two neighbours share one) */
    for (int b = nb - 1, next = nb; b >= 0; b--)
        if (sub[b].n) { nx[b] = next; next = first = b; }
    for (int b = first, i = 0; b < nb; b = nx[b]) buf[b] = i++ & 1;
    /* embeddings (and project_in) */
    gather_rows(o, st);
    stage_weights(o, 0);
    weights_begin(o, 0); /* layer 0 reads while we embed */
    for (int b = first; b < nb; b = nx[b]) {
        stage_x(o, b, buf[b], r_at[b], r_at[b]); /* only fences the buffer */
        t0 = now_sec();
        if (xin) memcpy(o->xs[buf[b]], xin + (size_t)r_at[b] * h, sizeof(float) * (size_t)sub[b].n * h); /* a later pipeline stage */
        else model_embed(m, &sub[b], o->xs[buf[b]], &o->s);
        o->t_compute += now_sec() - t0;
        store_x(o, b, buf[b], r_at[b], r_at[b + 1]);
    }
    /* layers */
    for (int l = 0; l < L; l++) {
        weights_begin(o, l + 1);
        if (first < nb) { stage_cache(o, l, first, buf[first], B->pos0 + first * o->gbs); stage_x(o, first, buf[first], r_at[first], r_at[first + 1]); }
        for (int b = first; b < nb; b = nx[b]) {
            int k = buf[b], n2 = nx[b];
            off_wait(o, &o->kread[k], "the cache file");
            cache_tables(o, l, b, k, B->pos0 + b * o->gbs);
            float *x = use_x(o, k, r_at[b], r_at[b + 1]);
            if (n2 < nb) { stage_cache(o, l, n2, buf[n2], B->pos0 + n2 * o->gbs); stage_x(o, n2, buf[n2], r_at[n2], r_at[n2 + 1]); }
            t0 = now_sec();
            layer_forward(m, &m->layers[l], l, &o->kview[k], &sub[b], x, &o->s);
            o->t_compute += now_sec() - t0;
            if (g_comm) g_comm->progress(); /* a pipeline stage's posted messages move (TCP needs the sender in MPI) */
            store_cache(o, l, b, k, B->lo + b * o->gbs, B->hi + b * o->gbs);
            store_x(o, b, k, r_at[b], r_at[b + 1]);
        }
    }
    /* output: final LayerNorm, project_out; lm_head stays staged for the logits */
    weights_begin(o, L + 1);
    for (int b = first; b < nb; b = nx[b]) {
        stage_x(o, b, buf[b], r_at[b], r_at[b + 1]);
        float *x = use_x(o, buf[b], r_at[b], r_at[b + 1]);
        t0 = now_sec();
        if (model_last(m)) model_final(m, x, sub[b].n, out + (size_t)r_at[b] * c->embed_dim, &o->s);
        else memcpy(out + (size_t)r_at[b] * h, x, sizeof(float) * (size_t)sub[b].n * h); /* to the next stage */
        o->t_compute += now_sec() - t0;
    }
    stage_weights(o, 1); /* the next step's first layer reads during the logits and sampling */
    o->ahead = 1;
}

/* Device mode. The (layer, batch) pairs run as one stream, alternating
 * buffers; each pair's host work is done one pair later, so that the host
 * never waits for the batch the device is computing. */
static void forward_dev(Offload *o, const Step *st, Batches *B, const float *xin, float *out) {
    const Device *D = o->dev;
    Model *m = o->m;
    const Config *c = &m->cfg;
    int L = c->n_layer, nb = o->nb, h = c->hidden, hg = o->hgpu, hh = h - hg, E = c->embed_dim, *r_at = B->r_at;
    Step *sub = B->sub, *dsub = B->dsub;
    size_t f = sizeof(float);
    /* the batches' indices go up */
    for (int k = 0; k < nb; k++) {
        int n = sub[k].n, *d = o->hstep + 3 * r_at[k];
        memcpy(d, sub[k].tok, sizeof(int) * n);
        memcpy(d + n, sub[k].slot, sizeof(int) * n);
        memcpy(d + 2 * n, sub[k].pos, sizeof(int) * n);
        dsub[k] = sub[k];
        dsub[k].dev = o->dstep + 3 * r_at[k];
    }
    dcopy(o, o->dstep, 0, o->hstep, 0, sizeof(int) * 3 * (size_t)st->n, 1, 0, 1);
    /* embeddings on the CPU: device columns up, host ones home */
    gather_rows(o, st);
    stage_weights(o, 0);
    stage_weights(o, 1);
    off_wait(o, &o->wg[0], "the weights");
    use_weights(o, 0);
    for (int k = 0; k < nb; k++) {
        int r0 = r_at[k], n = sub[k].n;
        if (!n) continue;
        stage_x(o, k, 0, r0, r0);
        double t0 = now_sec();
        if (xin) memcpy(o->hs.x, xin + (size_t)r0 * h, f * (size_t)n * h); /* a later pipeline stage */
        else model_embed(m, &sub[k], o->hs.x, &o->hs);
        o->t_compute += now_sec() - t0;
        dcopy(o, o->dxg + (size_t)r0 * hg, f * hg, o->hs.x, f * h, f * hg, (size_t)n, 0, 1);
        for (int r = 0; r < n; r++) memcpy(o->xs[0] + (size_t)r * hh, o->hs.x + (size_t)r * h + hg, f * hh);
        store_x(o, k, 0, r0, r0 + n);
        D->record(o->ev[1], 1);
        dev_sync(o, o->ev[1]); /* hs.x is the next batch's */
    }
    stage_weights(o, 2);
    off_wait(o, &o->wg[1], "the weights");
    dev_weights_in(o, 1);
    /* layers */
    int np = 0, *pl = check_malloc(sizeof(int) * 2 * (size_t)(L * nb + 1), "schedule"), *pk = pl + L * nb;
    for (int l = 0; l < L; l++)
        for (int k = 0; k < nb; k++)
            if (sub[k].n) { pl[np] = l; pk[np++] = k; }
    if (np) { stage_cache(o, pl[0], pk[0], 0, B->pos0 + pk[0] * o->gbs); stage_x(o, pk[0], 0, r_at[pk[0]], r_at[pk[0] + 1]); }
    for (int q = 0; q < np; q++) {
        int l = pl[q], k = pk[q], b = q & 1;
        if (q == 0 || pl[q - 1] != l) weights_begin(o, l + 1);
        dev_layer(o, l, k, b, &sub[k], &dsub[k], r_at[k], r_at[k + 1], B->pos0 + k * o->gbs);
        if (g_comm) g_comm->progress();
        if (q + 1 == np || pl[q + 1] != l) D->record(o->w_free[wbuf(o, l + 1)], 0);
        dev_flush(o, b ^ 1, sub, B->lo, B->hi);
        if (q + 1 < np) {
            int k2 = pk[q + 1];
            if (k2 == k) dev_flush(o, b, sub, B->lo, B->hi); /* one batch: the next pair needs this one's activations */
            stage_cache(o, pl[q + 1], k2, b ^ 1, B->pos0 + k2 * o->gbs);
            stage_x(o, k2, b ^ 1, r_at[k2], r_at[k2 + 1]);
        }
    }
    for (int b = 0; b < 2; b++) dev_flush(o, b, sub, B->lo, B->hi);
    free(pl);
    /* output: final LayerNorm and project_out on the device, the rows down */
    weights_begin(o, L + 1);
    for (int k = 0, q = 0; k < nb; k++) {
        int r0 = r_at[k], b = q++ & 1;
        if (!sub[k].n) continue;
        stage_x(o, k, b, r0, r_at[k + 1]);
        use_x(o, b, r0, r_at[k + 1]);
        dev_x_in(o, k, b, r0, r_at[k + 1]);
        D->record(o->up[b], 1);
        D->wait(0, o->up[b]);
        if (model_last(m)) model_final(&o->dm, o->dxs[b], sub[k].n, o->dfinal + (size_t)r0 * E, &o->s);
        else D->be->copy(o->dfinal + (size_t)r0 * h, o->dxs[b], (size_t)sub[k].n * h); /* to the next stage */
        D->record(o->c_done[b], 0);
        D->wait(2, o->c_done[b]);
        D->record(o->down[b], 2);
        o->xlast[k] = b;
    }
    D->record(o->w_free[2], 0);
    D->record(o->ev[2], 0);
    D->wait(2, o->ev[2]);
    dcopy(o, out, 0, o->dfinal, 0, f * (size_t)st->n * (model_last(m) ? E : h), 1, 1, 2);
    D->record(o->ev[2], 2);
    dev_sync(o, o->ev[2]);
}

void offload_forward(Offload *o, const Step *st, const float *xin, float *out) {
    int nb = o->nb, bs = o->gbs * nb, k = 0;
    Batches B;
    B.pos0 = check_malloc(sizeof(int) * 3 * (size_t)bs, "step");
    B.lo = B.pos0 + bs;
    B.hi = B.lo + bs;
    B.slot_rel = check_malloc(sizeof(int) * (size_t)(st->n + 1), "step");
    for (int i = 0; i < bs; i++) { B.lo[i] = INT32_MAX; B.hi[i] = -1; }
    B.r_at[0] = 0;
    for (int r = 0; r < st->n; r++) { /* slots of batch k are k*gbs .. (k+1)*gbs-1, rows ordered by slot */
        int sl = st->slot[r];
        check(sl >= 0 && sl < bs && (r == 0 || sl >= st->slot[r - 1]), "offload steps need rows ordered by slot");
        while (sl / o->gbs > k) B.r_at[++k] = r;
        B.slot_rel[r] = sl % o->gbs;
        if (st->pos[r] < B.lo[sl]) B.lo[sl] = st->pos[r];
        if (st->pos[r] > B.hi[sl]) B.hi[sl] = st->pos[r];
        check(st->pos[r] < o->cap, "position %d beyond the cache", st->pos[r]);
    }
    while (k < nb) B.r_at[++k] = st->n;
    check(st->n <= o->rows_max, "step of %d rows exceeds the plan's %d", st->n, o->rows_max);
    for (int i = 0; i < bs; i++) B.pos0[i] = B.lo[i] == INT32_MAX ? 0 : B.lo[i];
    for (int b = 0; b < nb; b++) {
        B.sub[b] = (Step){B.r_at[b + 1] - B.r_at[b], st->tok + B.r_at[b], B.slot_rel + B.r_at[b], st->pos + B.r_at[b], NULL};
        check(B.sub[b].n <= o->xs_rows, "a batch of %d rows exceeds the plan's %d", B.sub[b].n, o->xs_rows);
    }
    if (o->dev) forward_dev(o, st, &B, xin, out);
    else forward_cpu(o, st, &B, xin, out);
    free(B.pos0);
    free(B.slot_rel);
}

/* Logits of final hidden rows (at most 64), with the output unit still staged. */
void offload_logits(Offload *o, float *logits, const float *hid, int rows) {
    if (!o->dev) { model_logits(o->m, logits, hid, rows); return; }
    const Device *D = o->dev;
    const Config *c = &o->m->cfg;
    size_t f = sizeof(float);
    check(rows <= 64, "%d logit rows at once", rows);
    dcopy(o, o->dhid, 0, hid, 0, f * (size_t)rows * c->embed_dim, 1, 0, 1);
    D->record(o->ev[0], 1);
    D->wait(0, o->ev[0]);
    D->be->linear(o->dlog, o->dhid, &o->dm.lm_head, NULL, rows, 0, 0);
    D->record(o->w_free[2], 0);
    D->wait(2, o->w_free[2]);
    dcopy(o, logits, 0, o->dlog, 0, f * (size_t)rows * c->vocab, 1, 1, 2);
    D->record(o->ev[0], 2);
    dev_sync(o, o->ev[0]);
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
    s->h2d_bytes = o->pcie[0];
    s->d2h_bytes = o->pcie[1];
}

void offload_close(Offload *o) {
    if (!o) return;
    for (int u = 0; u < o->m->cfg.n_layer * o->nb; u++) group_wait(&o->kwrite[u], "the cache file");
    for (int k = 0; k < o->nb; k++) group_wait(&o->xwrite[k], "the activation file");
    io_stop(&o->io);
    for (int i = 0; i < 3; i++) tmp_remove(o->slot[i]), o->slot[i] = -1;
    for (int i = 0; i < o->m->ck.n_files; i++) close(o->wfd[i]);
    if (o->kv_fd >= 0) close(o->kv_fd);
    if (o->act_fd >= 0) close(o->act_fd);
    munmap(o->egather, o->egather_len);
    if (o->dev) {
        o->dev->scratch_free(&o->s);
        float **hp[] = {&o->hs.x, &o->hs.q, &o->hs.k, &o->hs.v, &o->hs.att};
        for (int i = 0; i < 5; i++) { host_pinned_free(o->dev, *hp[i]); *hp[i] = NULL; }
        scratch_free(&o->hs);
    }
    else scratch_free(&o->s);
    g_off = NULL;
    /* resident weights and buffers live until exit: the model's tensors point into them */
}
