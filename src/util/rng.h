/* deltaserve — the random number generators: splitmix64 for seeding, ids and shuffles, and
 * xoshiro256** for sampling. Deterministic for a given seed, not cryptographic. No globals: each
 * caller owns its state, so any thread may call these on its own state. */
#ifndef DS_UTIL_RNG_H
#define DS_UTIL_RNG_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* splitmix64 (Steele, Lea & Flood 2014, Vigna's constants): advances *state by the golden gamma and
 * returns the mixed value. Any state is valid, including 0. */
uint64_t ds_splitmix64(uint64_t *state);

/* xoshiro256** (Blackman & Vigna 2018). ds_rng_seed fills the four words from `seed` through
 * splitmix64 (never all zero); ds_rng_next returns the next 64 random bits. */
void ds_rng_seed(uint64_t st[4], uint64_t seed);
uint64_t ds_rng_next(uint64_t st[4]);

#ifdef __cplusplus
}
#endif
#endif
