/* Shared bits of the subcommands: default model lookup, loading, option parsing. */
#include "cli/cli.h"

#include <ctype.h>
#include <errno.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define DEFAULT_MODEL_FILE "SmolLM2-135M-Instruct.Q4_1.gguf"

const char *ds_cli_default_model(const char *argv0) {
    static char path[PATH_MAX];
    const char *env = getenv("DS_MODEL");
    if (env && *env) return env;
    snprintf(path, sizeof path, "models/%s", DEFAULT_MODEL_FILE);
    if (access(path, R_OK) == 0) return path;
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = 0;
        char *dir = dirname(exe); /* build/ → repo root is one up */
        snprintf(path, sizeof path, "%s/../models/%s", dir, DEFAULT_MODEL_FILE);
        if (access(path, R_OK) == 0) return path;
    }
    (void)argv0;
    fprintf(stderr, "deltaserve: no model given and the default model was not found.\n"
                    "  fetch it with: scripts/fetch_model.sh   (or pass -m MODEL / set DS_MODEL)\n");
    return NULL;
}

ds_model *ds_cli_load_model(const char *path, const char *quantize) {
    ds_err err = {{0}};
    ds_model_params mp = ds_model_default_params();
    if (quantize) {
        mp.quantize = ds_dtype_parse(quantize);
        if (mp.quantize != DS_DTYPE_Q8_0 && mp.quantize != DS_DTYPE_Q4_K) {
            fprintf(stderr, "deltaserve: --quantize: '%s' is not one of q8_0, q4_k\n", quantize);
            return NULL;
        }
    }
    ds_model *m = ds_model_load(path, &mp, &err);
    if (!m) fprintf(stderr, "deltaserve: cannot load model: %s\n", err.msg);
    return m;
}

bool ds_cli_is_option(const char *a) {
    return a[0] == '-' && (a[1] == '-' || isalpha((unsigned char)a[1]));
}

bool ds_cli_int(const char *flag, const char *v, long lo, long hi, long *out) {
    if (!v) {
        fprintf(stderr, "deltaserve: %s needs a value\n", flag);
        return false;
    }
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || *end || end == v || x < lo || x > hi) {
        fprintf(stderr, "deltaserve: %s: '%s' is not an integer in [%ld, %ld]\n", flag, v, lo, hi);
        return false;
    }
    *out = x;
    return true;
}

bool ds_cli_float(const char *flag, const char *v, double lo, double hi, double *out) {
    if (!v) {
        fprintf(stderr, "deltaserve: %s needs a value\n", flag);
        return false;
    }
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || *end || end == v || !(x >= lo && x <= hi)) {
        fprintf(stderr, "deltaserve: %s: '%s' is not a number in [%g, %g]\n", flag, v, lo, hi);
        return false;
    }
    *out = x;
    return true;
}
