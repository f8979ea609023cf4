/* kernels.cu: the CUDA side of opt, behind the plain C functions opt.h declares.
 * The runtime is linked statically and loaded lazily, so the same binary starts
 * on machines without a GPU, a driver, or the CUDA libraries, and runs on the
 * CPU after saying why once. */
#include <cuda_runtime.h>
#include <stdio.h>
#include <string.h>

extern "C" {
#include "opt.h"
}

static int g_gpu_state = -1;      /* -1 unknown, 0 none, 1 usable */
static char g_gpu_desc[256];      /* what gpu_describe() reports */

static void gpu_probe(void) {
    if (g_gpu_state >= 0) return;
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        snprintf(g_gpu_desc, sizeof g_gpu_desc, "none (%s)", e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA device");
        g_gpu_state = 0;
        return;
    }
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, 0) != cudaSuccess) {
        snprintf(g_gpu_desc, sizeof g_gpu_desc, "none (cannot query device 0)");
        g_gpu_state = 0;
        return;
    }
    snprintf(g_gpu_desc, sizeof g_gpu_desc, "%.200s, compute %d.%d, %.1f GiB", p.name, p.major, p.minor, (double)p.totalGlobalMem / (1 << 30));
    g_gpu_state = 1;
}

extern "C" int gpu_available(void) { gpu_probe(); return g_gpu_state == 1; }
extern "C" const char *gpu_describe(void) { gpu_probe(); return g_gpu_desc; }
