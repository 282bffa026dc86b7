/* ds-bench — summary statistics with numpy's conventions (np.mean, np.median, np.std with
 * ddof=0, np.percentile with the default "linear" method). Pure functions, any thread. */
#ifndef DSB_STATS_H
#define DSB_STATS_H

#include <stddef.h>

#define DSB_MAX_PERCENTILES 8

/* Growable array of doubles. Zero-initialise; free with dsb_vec_free. */
typedef struct dsb_vec {
    double *v;
    size_t n, cap;
} dsb_vec;

/* Appends x; returns 0, or -1 when out of memory (the vector is unchanged). */
int dsb_vec_push(dsb_vec *a, double x);
void dsb_vec_free(dsb_vec *a);

/* q-th percentile (0 <= q <= 100) of `sorted` (ascending, n >= 1), linear interpolation between
 * closest ranks: h = (n-1)·q/100, result = x[floor h] + (h - floor h)·(x[floor h + 1] - x[floor h]).
 * Returns 0 for n == 0. */
double dsb_percentile_sorted(const double *sorted, size_t n, double q);

typedef struct dsb_summary {
    size_t n;
    double mean, median, std;          /* std: population (ddof = 0), as vLLM reports */
    double pct[DSB_MAX_PERCENTILES];   /* values at the requested percentiles, same order */
} dsb_summary;

/* Sorts v[0..n) in place and fills `out`. Every field is 0 when n == 0 (vLLM reports 0 for an
 * empty metric). npct is clamped to DSB_MAX_PERCENTILES. */
void dsb_summarize(double *v, size_t n, const double *pcts, int npct, dsb_summary *out);

#endif
