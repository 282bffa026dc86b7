/* bench_model's random-weight models: a ds_model built in memory with a real model's shapes, for
 * measuring speed where the weights' values do not matter (Llama-3-8B on a GPU without the
 * checkpoint, or a tiny model in CI).
 *
 * Every layer's matrices are views of ONE host copy (the host needs one layer, not n_layer), with
 * values uniform in ±sqrt(3/in) so activations keep unit variance; norms are 1. A backend that
 * copies weights (CUDA) still holds n_layer distinct device copies, so device traffic is that of a
 * real model. Not thread-safe; any thread. */
#ifndef DS_BENCH_RANDOM_MODEL_H
#define DS_BENCH_RANDOM_MODEL_H

#include "ds/backend.h"
#include "ds/model.h"

typedef struct bench_random_params {
    const char *shape; /* "llama3-8b" or "tiny" */
    bool bf16;         /* weight matrices stored as bf16 (typed-weight builds; else fp32) */
    uint64_t seed;
} bench_random_params;

/* Fills cfg with a named shape. Returns 0, or DS_EINVAL for an unknown name. */
int bench_shape_config(const char *shape, ds_model_config *cfg);

/* Whether this build's model struct holds typed (bf16) matrices; else only fp32. */
bool bench_random_bf16_supported(void);

/* Builds the model. Returns NULL with a message. Free with ds_model_free. */
ds_model *bench_random_model(const bench_random_params *p, ds_err *err);

/* Bytes a backend storing every matrix in `elem_bytes` per element reads for one decode step
 * (every matrix incl. lm_head; the embedding table only for the rows gathered, i.e. none). */
double bench_model_matrix_bytes(const ds_model_config *c, double elem_bytes);

#endif
