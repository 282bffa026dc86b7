/* Tests read typed model weights (ds/weight.h) as fp32: TW(w) is a dequantised copy of the whole
 * matrix, kept until exit (so sanitizer leak checks stay quiet), or NULL for an absent weight. */
#ifndef DS_TEST_WEIGHTS_H
#define DS_TEST_WEIGHTS_H

#include "ds/weight.h"

#include <stdlib.h>

static float **tw_bufs;
static size_t tw_n;

static void tw_free_all(void) {
    for (size_t i = 0; i < tw_n; i++) free(tw_bufs[i]);
    free(tw_bufs);
    tw_bufs = NULL;
    tw_n = 0;
}

static const float *tw_dense(const ds_weight *w) {
    if (!w->data) return NULL;
    float *p = malloc((size_t)w->rows * (size_t)w->cols * sizeof *p);
    float **b = realloc(tw_bufs, (tw_n + 1) * sizeof *b);
    if (!p || !b) abort();
    if (!tw_n) atexit(tw_free_all);
    tw_bufs = b;
    tw_bufs[tw_n++] = p;
    for (int32_t r = 0; r < w->rows; r++) ds_weight_row(w, r, p + (size_t)r * w->cols);
    return p;
}

#define TW(w) tw_dense(&(w))

#endif
