/* deltaserve — fine-tuning datasets: JSONL text → (tokens, labels) examples for ds_trainer.
 * Internal to src/train/ (jobs.c); the public check is ds_ft_data_check in ds/train.h.
 * Thread-safe: no shared state (the tokenizer is read-only). */
#ifndef DS_TRAIN_DATASET_H
#define DS_TRAIN_DATASET_H

#include "ds/model.h"
#include "ds/train.h"

/* A dataset's examples: ex[i] points into toks[i] / labs[i], which the set owns. */
typedef struct ds_ft_examples {
    ds_train_example *ex;
    int32_t **toks, **labs;
    size_t n, cap;
    int64_t n_tokens; /* over all examples */
    int32_t max_len;  /* the longest example, in tokens */
} ds_ft_examples;

/* Tokenises every line of `text` with m's tokenizer (labels: HF convention, -100 where not trained).
 * Returns 0, or DS_EINVAL naming the first bad lines, DS_ERANGE for an example longer than the
 * context, DS_EUNSUPPORTED without a tokenizer, DS_ENOMEM; *out is empty on failure. Free with
 * ds_ft_examples_free. */
int ds_ft_examples_build(const ds_model *m, const char *text, size_t len, ds_ft_examples *out, ds_err *err);
void ds_ft_examples_free(ds_ft_examples *s);

#endif
