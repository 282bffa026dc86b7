/* Token sampling on the host: penalties, logit bias, temperature, top-k, top-p, min-p, seeded RNG.
 * One ds_sampler per sequence; not thread-safe (engine thread). */
#ifndef DS_SAMPLER_H
#define DS_SAMPLER_H

#include "ds/engine.h"
#include "util/rng.h" /* the sampler's state is an xoshiro256** generator */

typedef struct ds_sampler {
    ds_sampling_params p;
    ds_logit_bias *bias; /* owned copy */
    uint64_t rng[4];     /* xoshiro256** */
    int32_t n_vocab;
    /* scratch (owned, n_vocab each) */
    float *work;
    int32_t *idx;
} ds_sampler;

/* Initialises s for a vocabulary; copies params (incl. logit_bias). Returns 0 or DS_ENOMEM. */
int ds_sampler_init(ds_sampler *s, const ds_sampling_params *p, int32_t n_vocab, uint64_t fallback_seed);
void ds_sampler_free(ds_sampler *s);

/* Picks the next token from logits[n_vocab] (modified in place). history = prompt + generated
 * tokens (n_prompt of them are the prompt): repetition_penalty uses all, presence/frequency only
 * the generated ones. Returns the token id. */
int32_t ds_sampler_sample(ds_sampler *s, float *logits, const int32_t *history, int32_t n_history,
                          int32_t n_prompt);

/* log-softmax value of token `tok` and the top-n alternatives (sorted, descending) from raw
 * logits. Returns the logprob of tok. */
float ds_logprobs(const float *logits, int32_t n_vocab, int32_t tok, ds_top_logprob *top, int32_t n_top);
#endif
