#include "stats.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int dsb_vec_push(dsb_vec *a, double x) {
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 16;
        double *v = realloc(a->v, cap * sizeof(double));
        if (!v) return -1;
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = x;
    return 0;
}

void dsb_vec_free(dsb_vec *a) {
    free(a->v);
    memset(a, 0, sizeof(*a));
}

double dsb_percentile_sorted(const double *sorted, size_t n, double q) {
    if (n == 0) return 0.0;
    if (q <= 0.0) return sorted[0];
    if (q >= 100.0) return sorted[n - 1];
    double h = (double)(n - 1) * (q / 100.0); /* numpy: (n-1)·quantile */
    size_t lo = (size_t)floor(h);
    if (lo + 1 >= n) return sorted[n - 1];
    double frac = h - (double)lo;
    /* numpy's _lerp form, so results match bit for bit in the common case. */
    double a = sorted[lo], b = sorted[lo + 1];
    double diff = b - a;
    return frac >= 0.5 ? b - diff * (1.0 - frac) : a + diff * frac;
}

static int cmp_double(const void *pa, const void *pb) {
    double a = *(const double *)pa, b = *(const double *)pb;
    return (a > b) - (a < b);
}

void dsb_summarize(double *v, size_t n, const double *pcts, int npct, dsb_summary *out) {
    memset(out, 0, sizeof(*out));
    out->n = n;
    if (n == 0) return;
    qsort(v, n, sizeof(double), cmp_double);
    double sum = 0.0;
    for (size_t i = 0; i < n; i++) sum += v[i];
    out->mean = sum / (double)n;
    double ss = 0.0;
    for (size_t i = 0; i < n; i++) ss += (v[i] - out->mean) * (v[i] - out->mean);
    out->std = sqrt(ss / (double)n);
    out->median = dsb_percentile_sorted(v, n, 50.0);
    if (npct > DSB_MAX_PERCENTILES) npct = DSB_MAX_PERCENTILES;
    for (int i = 0; i < npct; i++) out->pct[i] = dsb_percentile_sorted(v, n, pcts[i]);
}
