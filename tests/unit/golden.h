/* Helpers for golden tests: reading reference.json files written by tests/golden/gen_models.py and
 * running sequences through ds_llama with simple private block tables. */
#ifndef DS_TEST_GOLDEN_H
#define DS_TEST_GOLDEN_H

#include "ds/model.h"
#include <cjson/cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define GOLDEN_FN static __attribute__((unused))

GOLDEN_FN cJSON *golden_load_json(const char *path) {
    char *text = NULL;
    size_t len = 0;
    ds_err err;
    if (ds_file_read_all(path, (size_t)256 << 20, &text, &len, &err) != DS_OK) return NULL;
    cJSON *j = cJSON_ParseWithLength(text, len);
    free(text);
    return j;
}

GOLDEN_FN int32_t *golden_ids(const cJSON *arr, int *n) {
    *n = cJSON_GetArraySize(arr);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)(*n > 0 ? *n : 1));
    for (int i = 0; i < *n; i++) ids[i] = (int32_t)cJSON_GetArrayItem(arr, i)->valuedouble;
    return ids;
}

/* max |a - ref| over n values where ref is a JSON array. */
GOLDEN_FN double golden_max_diff(const float *a, const cJSON *ref, int n) {
    double mx = 0;
    if (cJSON_GetArraySize(ref) != n) return INFINITY;
    int i = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, ref) {
        double d = fabs((double)a[i++] - it->valuedouble);
        if (!(d <= mx)) mx = d; /* NaN-safe */
    }
    return mx;
}

GOLDEN_FN double golden_max_abs(const cJSON *ref) {
    double mx = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, ref) if (fabs(it->valuedouble) > mx) mx = fabs(it->valuedouble);
    return mx;
}

/* Removes an adapter directory a test saved: the files ds_trainer_save and the delta extraction
 * write for any kind (PEFT, delta, AdapterHub) and test_train_bn.c's exported logits, then the
 * directory (left in place if it holds anything else). */
GOLDEN_FN void golden_rm_saved(const char *dir) {
    static const char *const files[] = {"adapter_config.json", "adapter_model.safetensors", "adapter.safetensors",
                                        "adapter_interface.json", "ds_logits.json"};
    char f[1100];
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(f, sizeof f, "%s/%s", dir, files[i]);
        unlink(f);
    }
    rmdir(dir);
}

/* A set of sequences with private, contiguous block tables: sequence s owns blocks
 * [s*max_blocks, (s+1)*max_blocks). */
typedef struct golden_seqs {
    int n_seqs, max_blocks;
    int32_t *tables;
    int32_t *n_past; /* tokens already in the cache per sequence */
} golden_seqs;

GOLDEN_FN void golden_seqs_init(golden_seqs *g, int n_seqs, int max_blocks) {
    g->n_seqs = n_seqs;
    g->max_blocks = max_blocks;
    g->tables = malloc(sizeof(int32_t) * (size_t)(n_seqs * max_blocks));
    g->n_past = calloc((size_t)n_seqs, sizeof(int32_t));
    for (int i = 0; i < n_seqs * max_blocks; i++) g->tables[i] = i;
}

GOLDEN_FN void golden_seqs_free(golden_seqs *g) {
    free(g->tables);
    free(g->n_past);
}

/* Runs one step where sequence s contributes n_tok[s] tokens toks[s] (0 allowed → skipped), all
 * token rows produce logits into `logits` ([total][n_vocab]). Returns 0 or the forward's status. */
GOLDEN_FN int golden_step(ds_llama *L, golden_seqs *g, int32_t *const *toks, const int *n_tok, float *logits,
                       int all_logits) {
    int total = 0;
    for (int s = 0; s < g->n_seqs; s++) total += n_tok[s];
    int32_t *tokens = malloc(sizeof(int32_t) * (size_t)total * 5);
    int32_t *pos = tokens + total, *seq = pos + total, *kv = seq + total, *out = kv + total;
    int t = 0, n_out = 0;
    for (int s = 0; s < g->n_seqs; s++) {
        for (int i = 0; i < n_tok[s]; i++, t++) {
            tokens[t] = toks[s][i];
            pos[t] = kv[t] = g->n_past[s] + i;
            seq[t] = s;
            if (all_logits || i == n_tok[s] - 1) out[n_out++] = t;
        }
        g->n_past[s] += n_tok[s];
    }
    ds_batch b = {.n_tokens = total, .tokens = tokens, .pos = pos, .tok_seq = seq, .tok_kv = kv,
                  .n_seqs = g->n_seqs, .block_tables = g->tables, .max_blocks = g->max_blocks,
                  .seq_prefix = NULL, .n_out = n_out, .out_rows = out, .seq_adapter = NULL};
    ds_err err = {{0}};
    int st = ds_llama_forward(L, &b, NULL, logits, &err);
    if (st) fprintf(stderr, "forward: %s\n", err.msg);
    free(tokens);
    return st;
}
#endif
