/* pipe.c: the transport between pipeline stages, over MPI (make MPI=1).
 *
 * `mpirun -np N ./opt generate ...` (or srun) starts N processes; each is one
 * stage of the pipeline the engine runs (opt.c, "Pipeline stages"). This file
 * only moves bytes: non-blocking point-to-point messages in order per pair of
 * ranks, a broadcast and a gather for start-up, and the abort that ends every
 * rank when one fails. Without a launcher, or with one rank, MPI is not used
 * and the binary is the plain one. */

#include "opt.h"
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <unistd.h>
#include <mpi.h>

static char g_host[MPI_MAX_PROCESSOR_NAME];

static int mpi_count(size_t n) {
    if (n > INT_MAX) die("pipeline message of %zu bytes exceeds MPI's int count (lower -b or --step-rows)", n);
    return (int)n;
}

static void *mpi_isend(const void *p, size_t n, int to) {
    MPI_Request *r = check_malloc(sizeof *r, "an MPI request");
    MPI_Isend(p, mpi_count(n), MPI_BYTE, to, 0, MPI_COMM_WORLD, r);
    return r;
}

static void *mpi_irecv(void *p, size_t cap, int from) {
    MPI_Request *r = check_malloc(sizeof *r, "an MPI request");
    MPI_Irecv(p, mpi_count(cap), MPI_BYTE, from, 0, MPI_COMM_WORLD, r);
    return r;
}

static size_t mpi_wait(void *req) {
    MPI_Status st;
    int n = 0;
    MPI_Wait(req, &st);
    MPI_Get_count(&st, MPI_BYTE, &n);
    free(req);
    return n > 0 ? (size_t)n : 0;
}

static void mpi_cancel(void *req) {
    MPI_Cancel(req);
    MPI_Wait(req, MPI_STATUS_IGNORE);
    free(req);
}

static void mpi_bcast(void *p, size_t n) { MPI_Bcast(p, mpi_count(n), MPI_BYTE, 0, MPI_COMM_WORLD); }

static void mpi_gather(const void *p, size_t n, void *all) {
    MPI_Gather(p, mpi_count(n), MPI_BYTE, all, mpi_count(n), MPI_BYTE, 0, MPI_COMM_WORLD);
}

/* After this rank's message: every rank ends (the launcher kills them, and
 * their signal handlers remove their offload files). */
static void mpi_abort(void) { MPI_Abort(MPI_COMM_WORLD, 1); }

/* Over TCP a large message moves only while its sender is inside MPI: a probe
 * between layers keeps the posted sends going during the compute. */
static void mpi_progress(void) {
    int flag;
    MPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, MPI_COMM_WORLD, &flag, MPI_STATUS_IGNORE);
}

static Comm g_mpi = {.isend = mpi_isend, .irecv = mpi_irecv, .wait = mpi_wait, .cancel = mpi_cancel, .bcast = mpi_bcast,
                     .gather = mpi_gather, .abort = mpi_abort, .progress = mpi_progress, .host = g_host};

/* A launcher leaves its mark in the environment: Open MPI's mpirun, MPICH's
 * hydra and Slurm's PMI/PMIx. */
static bool launched(void) {
    static const char *vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK"};
    for (size_t i = 0; i < sizeof vars / sizeof *vars; i++) if (getenv(vars[i])) return true;
    return false;
}

int pipe_start(int *argc, char ***argv) {
    if (!launched()) return 0;
    int provided, size, rank, len = 0;
    MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided); /* only the main thread calls MPI */
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (size < 2) { MPI_Finalize(); return 0; }
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Get_processor_name(g_host, &len);
    g_mpi.rank = rank;
    g_mpi.size = size;
    g_comm = &g_mpi;
    if (rank > 0) { /* quiet unless it fails: die() writes to the real stderr, everything else to /dev/null */
        int fd = dup(2), null = open("/dev/null", O_WRONLY);
        if (fd >= 0 && null >= 0 && (g_err = fdopen(fd, "w"))) dup2(null, 2);
        if (null >= 0) close(null);
    }
    return size;
}

void pipe_end(void) {
    if (g_comm) MPI_Finalize();
}
