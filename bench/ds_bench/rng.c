/* xoshiro256** (Blackman & Vigna, 2018) seeded by splitmix64, and the distributions built on it. */
#include "rng.h"

#include <math.h>

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

void dsb_rng_seed(dsb_rng *r, uint64_t seed, uint64_t stream) {
    /* Mixing the stream id through one splitmix step keeps streams of nearby seeds unrelated. */
    uint64_t x = seed ^ (stream * 0xD1B54A32D192ED03ull);
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&x);
}

uint64_t dsb_rng_next(dsb_rng *r) {
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double dsb_rng_uniform(dsb_rng *r) { return (double)(dsb_rng_next(r) >> 11) * 0x1.0p-53; }

uint64_t dsb_rng_below(dsb_rng *r, uint64_t n) {
    if (n == 0) return 0;
    /* Rejection on the top of the range: the accepted values are an exact multiple of n. */
    uint64_t limit = UINT64_MAX - (UINT64_MAX % n);
    uint64_t x;
    do {
        x = dsb_rng_next(r);
    } while (x >= limit);
    return x % n;
}

double dsb_rng_normal(dsb_rng *r) {
    double u, v, s;
    do {
        u = 2.0 * dsb_rng_uniform(r) - 1.0;
        v = 2.0 * dsb_rng_uniform(r) - 1.0;
        s = u * u + v * v;
    } while (s >= 1.0 || s == 0.0);
    return u * sqrt(-2.0 * log(s) / s);
}

double dsb_rng_exp(dsb_rng *r) {
    /* 1 - U lies in (0, 1], so the log is finite. */
    return -log(1.0 - dsb_rng_uniform(r));
}

double dsb_rng_gamma(dsb_rng *r, double shape, double scale) {
    if (!(shape > 0.0) || !(scale > 0.0)) return 0.0;
    if (shape < 1.0) {
        /* Gamma(k) = Gamma(k+1) · U^(1/k)  (Marsaglia & Tsang, section 6). */
        double u = 1.0 - dsb_rng_uniform(r);
        return dsb_rng_gamma(r, shape + 1.0, scale) * pow(u, 1.0 / shape);
    }
    double d = shape - 1.0 / 3.0;
    double c = 1.0 / sqrt(9.0 * d);
    for (;;) {
        double x, v;
        do {
            x = dsb_rng_normal(r);
            v = 1.0 + c * x;
        } while (v <= 0.0);
        v = v * v * v;
        double u = dsb_rng_uniform(r);
        if (u < 1.0 - 0.0331 * (x * x) * (x * x)) return d * v * scale;
        if (u > 0.0 && log(u) < 0.5 * x * x + d * (1.0 - v + log(v))) return d * v * scale;
    }
}
