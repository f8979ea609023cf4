/* tests/fuzz/replay.c: replays inputs through one harness of targets.c, without libFuzzer.
 *
 *   replay TARGET [--reject] FILE...
 *
 * Prints one line per input (accepted, or rejected with die()'s message) and exits 0 when
 * every input returned; with --reject, 1 if any was accepted. A crash or a sanitizer report
 * (in the -fsanitize=address,undefined build) ends it with that tool's status instead. */
#include "targets.c"

int main(int argc, char **argv) {
    const FuzzTarget *t = argc > 1 ? fuzz_target(argv[1]) : NULL;
    if (!t) { fprintf(stderr, "usage: replay TARGET [--reject] FILE... (targets: see tests/fuzz/README.md)\n"); return 2; }
    int reject = argc > 2 && !strcmp(argv[2], "--reject"), bad = 0;
    for (int i = 2 + reject; i < argc; i++) {
        size_t n;
        char *d = file_read(argv[i], &n); /* opt.c's: dies (exits) when unreadable */
        int r = fuzz_one(t, (const uint8_t *)d, n);
        printf("%s: %s%s\n", argv[i], r ? "rejected: " : "accepted", r ? g_fuzz_msg : "");
        if (reject && !r) bad = 1;
        free(d);
    }
    return bad;
}
