/* bench_sgmv: the backend's segmented LoRA op (SGMV shrink + expand, ds_backend_iface.lora) per
 * projection of a model shape, for every rank × number of distinct adapters × batch size, beside
 * the op's byte floor at the bandwidth of a measured device-to-device copy.
 *
 *   build/bench_sgmv [--backend cpu|cuda] [--shape llama3-8b|tiny] [--ranks 8,16,64]
 *                    [--adapters 1,8,64] [--batches 1,2,4,...,256] [--iters N] [--copy-mb N]
 *                    [--threads N] [--json FILE]
 *
 * Byte floor of one call: x read (n·in), y read and written (2·n·out) and each distinct adapter's
 * A (r·in) and B (out·r) read once, all fp32; the rank-sized intermediate is left out (a fused
 * kernel keeps it on chip). Floor time = bytes / copy bandwidth, where the copy bandwidth counts
 * bytes read + written by the backend's own copy op (cudaMemcpyAsync device→device on CUDA).
 * Tokens are split into `adapters` equal contiguous segments, as the engine batches them; a
 * configuration with more adapters than tokens is skipped. Timing: `iters` calls after 3 warm-up
 * calls, closed by the backend's synchronize; the segments are planned (plan_upload) once before,
 * as an engine step plans once for every layer. */
#include "../bench_bw.h"
#include "ds/backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_LIST 16

typedef struct shape {
    const char *name;
    int32_t d_model, kv_dim, d_ff, q_dim;
} shape;

static const shape SHAPES[] = {
    {"llama3-8b", 4096, 1024, 14336, 4096}, /* Llama-3-8B: 32 heads, 8 KV heads × 128 */
    {"tiny", 256, 64, 512, 256},
};

typedef struct proj {
    const char *name;
    int32_t in, out;
} proj;

typedef struct opts {
    const char *backend, *shape, *json;
    int ranks[MAX_LIST], n_ranks;
    int adapters[MAX_LIST], n_adapters;
    int batches[MAX_LIST], n_batches;
    int iters, copy_mb, threads;
} opts;

static int parse_list(const char *s, int *out) {
    int n = 0;
    while (s && *s && n < MAX_LIST) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v <= 0 || v > 1 << 20) return -1;
        out[n++] = (int)v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return -1;
    }
    return n;
}

static void usage(FILE *f) {
    fprintf(f, "usage: bench_sgmv [--backend cpu|cuda] [--shape llama3-8b|tiny] [--ranks 8,16,64] [--adapters 1,8,64]\n"
               "                  [--batches 1,2,4,8,16,32,64,128,256] [--iters N] [--copy-mb N] [--threads N] [--json FILE]\n");
}

static int parse(int argc, char **argv, opts *o) {
    *o = (opts){.backend = "cpu", .shape = "llama3-8b", .iters = 50, .copy_mb = 0};
    o->n_ranks = parse_list("8,16,64", o->ranks);
    o->n_adapters = parse_list("1,8,64", o->adapters);
    o->n_batches = parse_list("1,2,4,8,16,32,64,128,256", o->batches);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int ok = v != NULL;
        if (!strcmp(a, "--help")) return usage(stdout), 1;
        else if (!strcmp(a, "--backend") && v) o->backend = v;
        else if (!strcmp(a, "--shape") && v) o->shape = v;
        else if (!strcmp(a, "--json") && v) o->json = v;
        else if (!strcmp(a, "--ranks") && v) ok = (o->n_ranks = parse_list(v, o->ranks)) > 0;
        else if (!strcmp(a, "--adapters") && v) ok = (o->n_adapters = parse_list(v, o->adapters)) > 0;
        else if (!strcmp(a, "--batches") && v) ok = (o->n_batches = parse_list(v, o->batches)) > 0;
        else if (!strcmp(a, "--iters") && v) ok = (o->iters = atoi(v)) > 0;
        else if (!strcmp(a, "--copy-mb") && v) ok = (o->copy_mb = atoi(v)) > 0;
        else if (!strcmp(a, "--threads") && v) o->threads = atoi(v);
        else ok = 0;
        if (!ok) return fprintf(stderr, "bench_sgmv: bad argument '%s'\n", a), usage(stderr), 2;
        i++;
    }
    return 0;
}

static int max_of(const int *v, int n) {
    int m = 0;
    for (int i = 0; i < n; i++) m = v[i] > m ? v[i] : m;
    return m;
}

/* Backend buffer of n floats filled with small pseudo-random values (uploaded from the host). */
static float *rand_buf(ds_backend *b, size_t n, uint64_t seed) {
    float *h = malloc(n * sizeof *h), *d = b->iface->alloc(b->ctx, n * sizeof *h);
    if (!h || !d) {
        free(h);
        if (d) b->iface->release(b->ctx, d);
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
        h[i] = ((float)(seed >> 40) / (float)(1 << 24) - 0.5f) * 0.02f;
    }
    int st = b->iface->upload(b->ctx, d, h, n * sizeof *h);
    free(h);
    if (st) {
        b->iface->release(b->ctx, d);
        return NULL;
    }
    return d;
}

/* Per-projection buffers: the max number of adapters' A and B at the largest rank. */
typedef struct bufs {
    float *x, *y;
    float **A, **B; /* [max_adapters] */
    int n;
} bufs;

/* Times one configuration; returns seconds per call, or < 0 on an op failure. */
static double time_config(ds_backend *b, const bufs *bf, const proj *p, int rank, int n_ad, int n_tok, int iters,
                          ds_lora_seg *segs) {
    for (int i = 0; i < n_ad; i++) {
        int32_t s0 = (int32_t)((int64_t)n_tok * i / n_ad), s1 = (int32_t)((int64_t)n_tok * (i + 1) / n_ad);
        segs[i] = (ds_lora_seg){.start = s0, .len = s1 - s0, .rank = rank, .scale = 2.0f, .A = bf->A[i], .B = bf->B[i]};
    }
    /* Planned once, as a step plans once for all its layers (include/ds/plan.h). */
    const ds_seg_tables tab = {.lora = segs, .n_lora = n_ad};
    const ds_seg_range all = {0, n_ad};
    if (b->iface->plan_upload(b->ctx, &tab)) return -1;
    for (int w = 0; w < 3; w++)
        if (b->iface->lora(b->ctx, bf->x, p->in, bf->y, p->out, all)) return -1;
    if (b->iface->synchronize(b->ctx)) return -1;
    double t0 = ds_time_s();
    for (int it = 0; it < iters; it++)
        if (b->iface->lora(b->ctx, bf->x, p->in, bf->y, p->out, all)) return -1;
    if (b->iface->synchronize(b->ctx)) return -1;
    return (ds_time_s() - t0) / iters;
}

static void free_bufs(ds_backend *b, bufs *bf) {
    for (int i = 0; i < bf->n; i++) {
        if (bf->A && bf->A[i]) b->iface->release(b->ctx, bf->A[i]);
        if (bf->B && bf->B[i]) b->iface->release(b->ctx, bf->B[i]);
    }
    if (bf->x) b->iface->release(b->ctx, bf->x);
    if (bf->y) b->iface->release(b->ctx, bf->y);
    free(bf->A);
    free(bf->B);
    memset(bf, 0, sizeof *bf);
}

static int alloc_bufs(ds_backend *b, bufs *bf, const proj *p, int max_rank, int max_ad, int max_tok) {
    bf->n = max_ad;
    bf->A = calloc((size_t)max_ad, sizeof *bf->A);
    bf->B = calloc((size_t)max_ad, sizeof *bf->B);
    bf->x = rand_buf(b, (size_t)max_tok * p->in, 1);
    bf->y = rand_buf(b, (size_t)max_tok * p->out, 2);
    if (!bf->A || !bf->B || !bf->x || !bf->y) return -1;
    for (int i = 0; i < max_ad; i++) {
        bf->A[i] = rand_buf(b, (size_t)max_rank * p->in, 3 + 2 * (uint64_t)i);
        bf->B[i] = rand_buf(b, (size_t)p->out * max_rank, 4 + 2 * (uint64_t)i);
        if (!bf->A[i] || !bf->B[i]) return -1;
    }
    return 0;
}

/* Every rank × adapters × batch configuration of one projection: a table row and a JSON row each.
 * Returns 0, or 1 on an op failure or out of backend memory. */
static int run_proj(ds_backend *b, const opts *o, const proj *p, double bw, ds_lora_seg *segs, FILE *js, int *first) {
    bufs bf = {0};
    int failed = 0;
    if (alloc_bufs(b, &bf, p, max_of(o->ranks, o->n_ranks), max_of(o->adapters, o->n_adapters),
                   max_of(o->batches, o->n_batches))) {
        fprintf(stderr, "bench_sgmv: %s: out of backend memory\n", p->name);
        failed = 1;
    }
    for (int ri = 0; ri < o->n_ranks && !failed; ri++)
        for (int ai = 0; ai < o->n_adapters && !failed; ai++)
            for (int bi = 0; bi < o->n_batches && !failed; bi++) {
                const int r = o->ranks[ri], na = o->adapters[ai], n = o->batches[bi];
                if (na > n) continue; /* every adapter needs a token */
                double s = time_config(b, &bf, p, r, na, n, o->iters, segs);
                if (s < 0) {
                    fprintf(stderr, "bench_sgmv: lora op failed (%s r%d a%d n%d)\n", p->name, r, na, n);
                    failed = 1;
                    break;
                }
                double bytes = 4.0 * ((double)n * p->in + 2.0 * n * p->out + (double)na * r * (p->in + p->out));
                double floor_s = bytes / bw;
                printf("%-9s %6d %6d %4d %4d %5d %11.2f %11.2f %8.2fx\n", p->name, p->in, p->out, r, na, n, s * 1e6,
                       floor_s * 1e6, s / floor_s);
                if (js)
                    fprintf(js, "%s\n{\"proj\":\"%s\",\"in\":%d,\"out\":%d,\"rank\":%d,\"adapters\":%d,\"batch\":%d,"
                                "\"s_per_call\":%.6g,\"bytes\":%.6g,\"floor_s\":%.6g}",
                            *first ? "" : ",", p->name, p->in, p->out, r, na, n, s, bytes, floor_s);
                *first = 0;
            }
    free_bufs(b, &bf);
    return failed;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0); /* progress survives a timeout kill under a pipe */
    opts o;
    int rc = parse(argc, argv, &o);
    if (rc) return rc == 1 ? 0 : rc;
    const shape *sh = NULL;
    for (size_t i = 0; i < sizeof SHAPES / sizeof SHAPES[0]; i++)
        if (!strcmp(SHAPES[i].name, o.shape)) sh = &SHAPES[i];
    if (!sh) return fprintf(stderr, "bench_sgmv: unknown shape '%s' (llama3-8b or tiny)\n", o.shape), 2;
    ds_err err = {{0}};
    ds_backend_params bp = ds_backend_default_params();
    bp.n_threads = o.threads;
    ds_backend *b = ds_backend_create(o.backend, &bp, &err);
    if (!b) return fprintf(stderr, "bench_sgmv: %s\n", err.msg), 1;
    if (!b->iface->lora) return fprintf(stderr, "bench_sgmv: backend %s has no lora op\n", o.backend), ds_backend_free(b), 1;
    const int copy_mb = o.copy_mb ? o.copy_mb : bench_copy_mb_default(o.backend);
    const double bw = bench_copy_bandwidth(b, copy_mb);
    if (bw <= 0) return fprintf(stderr, "bench_sgmv: copy bandwidth measurement failed\n"), ds_backend_free(b), 1;
    const proj projs[] = {{"q_proj", sh->d_model, sh->q_dim},   {"k_proj", sh->d_model, sh->kv_dim},
                          {"v_proj", sh->d_model, sh->kv_dim},  {"o_proj", sh->q_dim, sh->d_model},
                          {"gate_proj", sh->d_model, sh->d_ff}, {"up_proj", sh->d_model, sh->d_ff},
                          {"down_proj", sh->d_ff, sh->d_model}};
    ds_lora_seg *segs = calloc((size_t)max_of(o.adapters, o.n_adapters), sizeof *segs);
    FILE *js = o.json ? fopen(o.json, "w") : NULL;
    if (o.json && !js) fprintf(stderr, "bench_sgmv: cannot write %s\n", o.json);
    if (js)
        fprintf(js, "{\"backend\":\"%s\",\"shape\":\"%s\",\"iters\":%d,\"copy_mb\":%d,\"copy_bytes_per_s\":%.6g,\"rows\":[",
                o.backend, sh->name, o.iters, copy_mb, bw);
    printf("bench_sgmv: backend %s, shape %s, copy bandwidth %.1f GB/s (read+write, %d MiB), %d iters\n", o.backend,
           sh->name, bw / 1e9, copy_mb, o.iters);
    printf("%-9s %6s %6s %4s %4s %5s %11s %11s %9s\n", "proj", "in", "out", "rank", "ads", "batch", "us/call",
           "floor us", "of floor");
    int first = 1, failed = !segs || (o.json && !js);
    for (size_t pi = 0; pi < sizeof projs / sizeof projs[0] && !failed; pi++)
        failed = run_proj(b, &o, &projs[pi], bw, segs, js, &first);
    if (js) {
        fprintf(js, "\n]}\n");
        fclose(js);
    }
    free(segs);
    ds_backend_free(b);
    return failed;
}
