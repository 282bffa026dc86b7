#include "dist.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void dsb_arrivals_init(dsb_arrivals *a, double rate, double burstiness, dsb_rng rng) {
    a->rate = rate;
    a->burstiness = burstiness > 0.0 ? burstiness : 1.0;
    a->rng = rng;
}

double dsb_arrivals_next_gap(dsb_arrivals *a) {
    if (!(a->rate > 0.0) || isinf(a->rate)) return 0.0;
    /* theta = 1/(rate·shape) keeps the mean gap at 1/rate for every shape (vLLM serve.py). */
    double theta = 1.0 / (a->rate * a->burstiness);
    return dsb_rng_gamma(&a->rng, a->burstiness, theta);
}

int dsb_popularity_parse(const char *spec, dsb_pop_kind *kind, double *alpha, char *err, size_t errlen) {
    *alpha = 1.0;
    if (strcmp(spec, "uniform") == 0) {
        *kind = DSB_POP_UNIFORM;
        return 0;
    }
    if (strcmp(spec, "round-robin") == 0) {
        *kind = DSB_POP_ROUND_ROBIN;
        return 0;
    }
    const char *colon = strchr(spec, ':');
    size_t name_len = colon ? (size_t)(colon - spec) : strlen(spec);
    if (colon && name_len == 4 && strncmp(spec, "zipf", 4) == 0) {
        *kind = DSB_POP_ZIPF;
    } else if (colon && name_len == 5 && strncmp(spec, "power", 5) == 0) {
        *kind = DSB_POP_POWER;
    } else {
        snprintf(err, errlen, "unknown adapter distribution '%s' (uniform, round-robin, zipf:A, power:A)", spec);
        return -1;
    }
    char *end = NULL;
    double a = strtod(colon + 1, &end);
    if (end == colon + 1 || *end != '\0' || !(a > 0.0) || !isfinite(a)) {
        snprintf(err, errlen, "bad alpha in '%s' (want a positive number)", spec);
        return -1;
    }
    *alpha = a;
    return 0;
}

static int build_cdf(dsb_popularity *p, const double *w) {
    p->cdf = malloc(sizeof(double) * (size_t)p->n);
    if (!p->cdf) return -1;
    double sum = 0.0;
    for (int k = 0; k < p->n; k++) {
        double wk = w ? w[k] : pow((double)k + 1.0, -p->alpha);
        if (!(wk >= 0.0) || !isfinite(wk)) return -1;
        sum += wk;
        p->cdf[k] = sum;
    }
    if (!(sum > 0.0)) return -1;
    for (int k = 0; k < p->n; k++) p->cdf[k] /= sum;
    p->cdf[p->n - 1] = 1.0; /* no rounding gap at the top: every u < 1 finds an item */
    return 0;
}

int dsb_popularity_init(dsb_popularity *p, dsb_pop_kind kind, int n, double alpha, const double *weights) {
    memset(p, 0, sizeof(*p));
    if (n < 1) return -1;
    p->kind = kind;
    p->n = n;
    p->alpha = alpha;
    if (kind == DSB_POP_ZIPF || kind == DSB_POP_POWER) {
        if (!(alpha > 0.0)) return -1;
    }
    if (kind == DSB_POP_SPLIT && !weights) return -1;
    if (kind == DSB_POP_ZIPF || kind == DSB_POP_SPLIT) {
        if (build_cdf(p, kind == DSB_POP_SPLIT ? weights : NULL) != 0) {
            dsb_popularity_free(p);
            return -1;
        }
    }
    return 0;
}

void dsb_popularity_free(dsb_popularity *p) {
    free(p->cdf);
    p->cdf = NULL;
}

/* First index whose cumulative probability exceeds u (inverse CDF by bisection). */
static int cdf_search(const double *cdf, int n, double u) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (cdf[mid] > u)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

int dsb_popularity_sample(dsb_popularity *p, dsb_rng *rng) {
    switch (p->kind) {
    case DSB_POP_ROUND_ROBIN: return (int)(p->next++ % (unsigned long)p->n);
    case DSB_POP_ZIPF:
    case DSB_POP_SPLIT: return cdf_search(p->cdf, p->n, dsb_rng_uniform(rng));
    case DSB_POP_POWER: {
        /* numpy.random.power(a) is U^(1/a); S-LoRA maps it to floor(x·n). */
        double x = pow(dsb_rng_uniform(rng), 1.0 / p->alpha);
        int k = (int)floor(x * p->n);
        return k < p->n ? k : p->n - 1;
    }
    case DSB_POP_UNIFORM:
    default: return (int)dsb_rng_below(rng, (uint64_t)p->n);
    }
}

double dsb_popularity_pmf(const dsb_popularity *p, int k) {
    if (k < 0 || k >= p->n) return 0.0;
    switch (p->kind) {
    case DSB_POP_ZIPF:
    case DSB_POP_SPLIT: return p->cdf[k] - (k > 0 ? p->cdf[k - 1] : 0.0);
    case DSB_POP_POWER: {
        /* P(floor(X·n) = k) = F((k+1)/n) − F(k/n) with F(x) = x^α. */
        double n = p->n;
        return pow((k + 1) / n, p->alpha) - pow(k / n, p->alpha);
    }
    case DSB_POP_UNIFORM:
    case DSB_POP_ROUND_ROBIN:
    default: return 1.0 / p->n;
    }
}

int dsb_len_sample(dsb_rng *rng, int mean, double ratio) {
    if (ratio < 0.0) ratio = 0.0;
    if (ratio > 1.0) ratio = 1.0;
    int lo = (int)floor(mean * (1.0 - ratio));
    int hi = (int)floor(mean * (1.0 + ratio));
    if (lo < 1) lo = 1;
    if (hi < lo) hi = lo;
    return lo + (int)dsb_rng_below(rng, (uint64_t)(hi - lo + 1));
}
