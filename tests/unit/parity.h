/* Whole-model parity across backends for the golden tests.
 *
 * A golden test runs its forwards once per available backend (parity_backends: "cpu" first, then
 * "cuda" when ds_backend_create succeeds; otherwise it prints "cuda: skipped: <reason>" and goes
 * on with the CPU alone). The CPU run is checked against the Hugging Face references and RECORDS
 * every logits row and greedy continuation under a key; the CUDA run is checked against those
 * CPU records:
 *
 *   logits   max |cuda − cpu| ≤ 2e-2 · max(1, max |cpu row|)  (bf16 weights and GEMM inputs on
 *            CUDA: 8 mantissa bits, relative rounding ≤ 2^-9 per product, summed over a forward)
 *   greedy   argmax(cuda row) == argmax(cpu row), unless the CPU's top-2 margin is within twice
 *            that tolerance (a near-tie: counted and printed, not failed); greedy continuations
 *            through the engine equal the CPU's token for token up to the first such near-tie.
 *
 * Each test prints one summary line per backend and model: rows compared, worst |Δ| as a share of
 * the tolerance, near-ties. $DS_PARITY_BACKENDS overrides the list (comma-separated, CPU first):
 * "cpu,cpu" runs the comparison path without a GPU. Header-only; test programs only. */
#ifndef DS_TEST_PARITY_H
#define DS_TEST_PARITY_H

#include "ds/backend.h"
#include "ds_test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PARITY_REL_TOL 2e-2
#define PARITY_FN static __attribute__((unused))

typedef struct parity_rec {
    char *key;
    float *v; /* logits row, or tokens as floats */
    int n;
} parity_rec;

typedef struct parity {
    const char *backend; /* backend of the current run */
    bool record;         /* the first (CPU) run: record; later runs compare */
    int runs;
    parity_rec *recs;
    size_t n_recs, cap;
    /* summary of the current run */
    int rows, near_ties, missing;
    double worst; /* worst |Δ| / tolerance */
} parity;

/* Golden data roots: $DS_TEST_DATA / $DS_MODELS_DIR when set (a GPU kit runs the tests from a
 * copy of the tree at another path), else the paths compiled in. */
PARITY_FN const char *parity_data_dir(void) {
    const char *e = getenv("DS_TEST_DATA");
    return e && *e ? e : DS_TEST_DATA;
}

/* Backends to run, in order, created with default params: cpu always; cuda when it exists here
 * (else it prints why not). Returns how many were created into out[] (caller frees each). */
PARITY_FN int parity_backends(ds_backend **out, int max) {
    char list[64];
    const char *env = getenv("DS_PARITY_BACKENDS");
    snprintf(list, sizeof list, "%s", env && *env ? env : "cpu,cuda");
    int n = 0;
    for (char *save = NULL, *name = strtok_r(list, ",", &save); name && n < max; name = strtok_r(NULL, ",", &save)) {
        ds_err err = {{0}};
        ds_backend *b = ds_backend_create(name, NULL, &err);
        if (b && n == 0 && strcmp(b->iface->name, "cpu")) {
            CHECK_MSG(0, "DS_PARITY_BACKENDS: the first backend must be cpu (the reference), not %s", name);
            ds_backend_free(b);
            return 0;
        }
        if (b) out[n++] = b;
        else if (!strcmp(name, "cpu")) CHECK_MSG(0, "the cpu backend must always exist: %s", err.msg);
        else printf("%s: skipped: %s\n", name, err.msg);
    }
    return n;
}

/* Starts a run on backend b (the first run must be the CPU's: it records). */
PARITY_FN void parity_begin(parity *p, const ds_backend *b) {
    p->backend = b->iface->name;
    p->record = p->runs++ == 0;
    p->rows = p->near_ties = p->missing = 0;
    p->worst = 0;
}

PARITY_FN void parity_free(parity *p) {
    for (size_t i = 0; i < p->n_recs; i++) free(p->recs[i].key), free(p->recs[i].v);
    free(p->recs);
    memset(p, 0, sizeof *p);
}

PARITY_FN const parity_rec *parity_find(const parity *p, const char *key) {
    for (size_t i = 0; i < p->n_recs; i++)
        if (!strcmp(p->recs[i].key, key)) return &p->recs[i];
    return NULL;
}

PARITY_FN void parity_put(parity *p, const char *key, const float *v, int n) {
    if (p->n_recs == p->cap) {
        p->cap = p->cap ? 2 * p->cap : 256;
        p->recs = realloc(p->recs, p->cap * sizeof *p->recs);
    }
    parity_rec *r = &p->recs[p->n_recs++];
    r->key = strdup(key);
    r->v = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
    memcpy(r->v, v, sizeof(float) * (size_t)n);
    r->n = n;
}

/* A logits row of width n under key: recorded (CPU run) or checked against the CPU's. */
PARITY_FN void parity_row(parity *p, const char *key, const float *row, int n) {
    if (p->record) {
        parity_put(p, key, row, n);
        return;
    }
    const parity_rec *r = parity_find(p, key);
    if (!r || r->n != n) {
        p->missing++;
        CHECK_MSG(0, "%s: %s: no CPU row to compare with", p->backend, key);
        return;
    }
    double mx = 0, d = 0;
    int a_cpu = 0, a_dev = 0, second = -1;
    for (int i = 0; i < n; i++) {
        mx = fmax(mx, fabs(r->v[i]));
        double e = fabs((double)row[i] - r->v[i]);
        if (!(e <= d)) d = e; /* NaN-safe */
        if (row[i] > row[a_dev]) a_dev = i;
        if (r->v[i] > r->v[a_cpu]) second = a_cpu, a_cpu = i;
        else if (i != a_cpu && (second < 0 || r->v[i] > r->v[second])) second = i;
    }
    const double tol = PARITY_REL_TOL * fmax(1.0, mx);
    p->rows++;
    p->worst = fmax(p->worst, d / tol);
    CHECK_MSG(d <= tol, "%s: %s: max|%s - cpu| %.3g > tol %.3g", p->backend, key, p->backend, d, tol);
    if (a_dev != a_cpu) {
        const double margin = second >= 0 ? r->v[a_cpu] - r->v[second] : INFINITY;
        if (margin <= 2 * tol) p->near_ties++;
        else CHECK_MSG(0, "%s: %s: greedy token %d, cpu %d (cpu margin %.3g)", p->backend, key, a_dev, a_cpu, margin);
    }
}

/* A greedy continuation (tokens) under key: recorded, or equal to the CPU's up to `upto` tokens
 * (the first near-tie, as the caller knows it from the reference's margins). */
PARITY_FN void parity_tokens(parity *p, const char *key, const int32_t *toks, int n, int upto) {
    float tmp[256];
    if (n > 256) n = 256;
    if (p->record) {
        for (int i = 0; i < n; i++) tmp[i] = (float)toks[i];
        parity_put(p, key, tmp, n);
        return;
    }
    const parity_rec *r = parity_find(p, key);
    if (!r) {
        p->missing++;
        CHECK_MSG(0, "%s: %s: no CPU continuation to compare with", p->backend, key);
        return;
    }
    int m = upto < r->n ? upto : r->n, same = 0;
    while (same < m && same < n && (int32_t)r->v[same] == toks[same]) same++;
    p->rows++;
    CHECK_MSG(same == m, "%s: %s: greedy token %d is %d, cpu %d", p->backend, key, same, same < n ? toks[same] : -1,
              (int32_t)r->v[same]);
}

/* One summary line for the current run (label: model or test part). */
PARITY_FN void parity_report(const parity *p, const char *label) {
    if (p->record) return;
    printf("parity %s vs cpu, %s: %d rows/continuations compared, worst |diff| %.3f of the tolerance "
           "(%.0e relative), %d near-ties, %d missing\n",
           p->backend, label, p->rows, p->worst, PARITY_REL_TOL, p->near_ties, p->missing);
}

#endif
