/* ds-bench — workload distributions: request arrivals, adapter popularity, token lengths.
 * All objects are single-threaded values owned by the caller. */
#ifndef DSB_DIST_H
#define DSB_DIST_H

#include <stdbool.h>
#include <stddef.h>

#include "rng.h"

/* ---- Arrivals ------------------------------------------------------------------------------ */

/* Inter-arrival gaps of an open-loop client (vLLM `bench serve` convention): gaps are
 * Gamma(shape = burstiness, scale = 1 / (rate · burstiness)), so the mean gap is 1/rate and the
 * coefficient of variation is 1/sqrt(burstiness). burstiness 1 is a Poisson process; < 1 is
 * burstier; S-LoRA's cv maps to burstiness = 1/cv². A rate of +inf (or <= 0) sends everything
 * at t = 0. */
typedef struct dsb_arrivals {
    double rate;       /* requests per second; INFINITY = all at once */
    double burstiness; /* gamma shape, > 0 */
    dsb_rng rng;
} dsb_arrivals;

void dsb_arrivals_init(dsb_arrivals *a, double rate, double burstiness, dsb_rng rng);
/* Returns the next gap in seconds (0 when the rate is infinite). */
double dsb_arrivals_next_gap(dsb_arrivals *a);

/* ---- Adapter popularity -------------------------------------------------------------------- */

typedef enum {
    DSB_POP_UNIFORM = 0,  /* every adapter equally likely */
    DSB_POP_ZIPF,         /* P(k) ∝ (k+1)^-α, k = 0..n-1, sampled by inverse CDF */
    DSB_POP_POWER,        /* S-LoRA: k = floor(X·n), X ~ power(α) with pdf α·x^(α-1) on [0,1] */
    DSB_POP_ROUND_ROBIN,  /* 0, 1, …, n-1, 0, … (deterministic) */
    DSB_POP_SPLIT,        /* explicit weights (traffic split), normalised */
} dsb_pop_kind;

typedef struct dsb_popularity {
    dsb_pop_kind kind;
    int n;
    double alpha;
    double *cdf;        /* [n] cumulative probabilities for ZIPF and SPLIT, else NULL; owned */
    unsigned long next; /* round-robin cursor */
} dsb_popularity;

/* Parses "uniform", "round-robin", "zipf:ALPHA" or "power:ALPHA" (ALPHA > 0).
 * Returns 0, or -1 with a message in err. */
int dsb_popularity_parse(const char *spec, dsb_pop_kind *kind, double *alpha, char *err, size_t errlen);

/* Initialises over n >= 1 items. `weights` (n non-negative values, positive sum) is required for
 * DSB_POP_SPLIT and ignored otherwise. Returns 0, or -1 on bad arguments / out of memory.
 * Free with dsb_popularity_free. */
int dsb_popularity_init(dsb_popularity *p, dsb_pop_kind kind, int n, double alpha, const double *weights);
void dsb_popularity_free(dsb_popularity *p);

/* Draws an item index in [0, n). */
int dsb_popularity_sample(dsb_popularity *p, dsb_rng *rng);

/* Exact probability of item k (for tests and for reporting the configured split). */
double dsb_popularity_pmf(const dsb_popularity *p, int k);

/* ---- Lengths ------------------------------------------------------------------------------- */

/* Uniform integer in [floor(mean·(1-ratio)), floor(mean·(1+ratio))] (vLLM's --random-range-ratio),
 * never below 1. ratio is clamped to [0, 1]. */
int dsb_len_sample(dsb_rng *rng, int mean, double ratio);

#endif
