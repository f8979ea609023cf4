/* tests/fuzz/libfuzzer.c: the libFuzzer driver for targets.c; the harness is the
 * environment's OPT_FUZZ_TARGET (json, safetensors, bin, ...), as `make fuzz` sets it. */
#include "targets.c"

static const FuzzTarget *g_target;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    const char *name = getenv("OPT_FUZZ_TARGET");
    if (!name || !(g_target = fuzz_target(name))) {
        fprintf(stderr, "libfuzzer: set OPT_FUZZ_TARGET to a harness of tests/fuzz/targets.c\n");
        exit(2);
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) {
    fuzz_one(g_target, d, n);
    return 0;
}
