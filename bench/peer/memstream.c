/* memstream: a noisy neighbour for bench/peer/quant_bench.sh --neighbour. One thread copies a
 * 1 GiB buffer into another (STREAM "copy", 512 MiB each way by default) over and over, so the
 * benchmark beside it shares memory bandwidth with a streaming process, as on a busy host.
 *
 *   memstream [MIB] [SECONDS]     (defaults 1024 and 0 = until killed)
 *
 * Prints the copy bandwidth it achieved (GB/s, counting read + write) to stdout every ~5 s and on
 * SIGTERM/SIGINT. Build: cc -O2 -o memstream memstream.c */
#define _POSIX_C_SOURCE 200809L
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static volatile sig_atomic_t g_stop;
static void on_signal(int sig) { (void)sig; g_stop = 1; }

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(int argc, char **argv) {
    const size_t mib = argc > 1 ? (size_t)atol(argv[1]) : 1024;
    const double limit = argc > 2 ? atof(argv[2]) : 0;
    const size_t half = mib * (1u << 20) / 2, n = half / sizeof(double);
    double *a = malloc(half), *b = malloc(half);
    if (!a || !b || !n) return fprintf(stderr, "memstream: cannot allocate %zu MiB\n", mib), 1;
    for (size_t i = 0; i < n; i++) a[i] = (double)i, b[i] = 0;
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    const double t0 = now();
    double last = t0, bytes = 0, bytes_last = 0;
    while (!g_stop) {
        memcpy(b, a, half); /* the libc copy streams with non-temporal stores past the cache size */
        double *t = a;
        a = b, b = t;
        bytes += 2.0 * (double)half;
        const double t1 = now();
        if (t1 - last >= 5) {
            printf("memstream: %.2f GB/s\n", (bytes - bytes_last) / (t1 - last) / 1e9);
            fflush(stdout);
            last = t1, bytes_last = bytes;
        }
        if (limit > 0 && t1 - t0 >= limit) break;
    }
    printf("memstream: total %.1f GB in %.1f s = %.2f GB/s\n", bytes / 1e9, now() - t0, bytes / 1e9 / (now() - t0));
    free(a);
    free(b);
    return 0;
}
