/* Random training examples for the trainer tests (test_train_units.c, test_train_shim.c): three
 * sequences of 45, 20 and 58 token ids drawn from an LCG seeded by the test, no label masks. */
#ifndef DS_TEST_TRAIN_EXAMPLES_H
#define DS_TEST_TRAIN_EXAMPLES_H

#include "ds/train.h"

#include <stdint.h>

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

#endif
