/* What the trainer tests (test_train_units.c, test_train_shim.c) share: random training examples
 * (three sequences of 45, 20 and 58 token ids drawn from an LCG seeded by the test, no label masks)
 * and the two tiny models they train on. */
#ifndef DS_TEST_TRAIN_EXAMPLES_H
#define DS_TEST_TRAIN_EXAMPLES_H

#include "ds/model.h"
#include "ds/train.h"
#include "ds_test.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define TX_N_EX 3
static int32_t tx_toks[TX_N_EX][60];
static const int32_t tx_lens[TX_N_EX] = {45, 20, 58};

static inline void tx_make_examples(ds_train_example *ex, int32_t V, uint64_t seed) {
    uint64_t s = seed;
    for (int e = 0; e < TX_N_EX; e++) {
        for (int i = 0; i < tx_lens[e]; i++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            tx_toks[e][i] = (int32_t)((s >> 33) % (uint64_t)V);
        }
        ex[e] = (ds_train_example){.tokens = tx_toks[e], .labels = NULL, .n_tokens = tx_lens[e]};
    }
}

/* models[0] = tiny-llama, models[1] = tiny-qwen2 (NULL, with a failed check, where one does not
 * load); tx_model picks one by name. Free both with ds_model_free. */
static inline void tx_load_models(ds_model *models[2]) {
    static const char *names[2] = {"tiny-llama", "tiny-qwen2"};
    for (int i = 0; i < 2; i++) {
        char path[512];
        snprintf(path, sizeof path, "%s/models/%s", DS_TEST_DATA, names[i]);
        ds_model_params mp = ds_model_default_params();
        mp.verbose = false;
        mp.load_tokenizer = false;
        ds_err err = {{0}};
        models[i] = ds_model_load(path, &mp, &err);
        CHECK_MSG(models[i] != NULL, "%s: %s", names[i], err.msg);
    }
}
static inline const ds_model *tx_model(ds_model *const models[2], const char *name) {
    return models[strcmp(name, "tiny-llama") ? 1 : 0];
}

#endif
