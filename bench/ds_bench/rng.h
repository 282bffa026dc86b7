/* ds-bench — seeded random numbers: xoshiro256** plus the continuous distributions the load
 * generator needs (uniform, normal, exponential, gamma).
 * A dsb_rng is a plain value: not thread-safe, copy it to fork a stream. */
#ifndef DSB_RNG_H
#define DSB_RNG_H

#include <stdint.h>

typedef struct dsb_rng {
    uint64_t s[4];
} dsb_rng;

/* Seeds all 256 bits from `seed` through splitmix64; `stream` picks an independent sequence
 * for the same seed (arrivals, adapters, lengths and prompt text use different streams so that
 * changing the request rate does not change which adapter or prompt a request gets). */
void dsb_rng_seed(dsb_rng *r, uint64_t seed, uint64_t stream);

/* Next raw 64-bit value. */
uint64_t dsb_rng_next(dsb_rng *r);

/* Uniform double in [0, 1) with 53 random bits. */
double dsb_rng_uniform(dsb_rng *r);

/* Uniform integer in [0, n) without modulo bias; returns 0 when n == 0. */
uint64_t dsb_rng_below(dsb_rng *r, uint64_t n);

/* Standard normal N(0, 1) (Marsaglia polar method). */
double dsb_rng_normal(dsb_rng *r);

/* Exponential with mean 1. */
double dsb_rng_exp(dsb_rng *r);

/* Gamma(shape k > 0, scale θ > 0): mean kθ, variance kθ². Marsaglia–Tsang (2000) squeeze
 * method; for k < 1 it boosts with Gamma(k+1)·U^(1/k). Returns 0 for a non-positive shape. */
double dsb_rng_gamma(dsb_rng *r, double shape, double scale);

#endif
