/* Test harness: checks a group of (adapter, reference case) pairs run together through ds_llama
 * (adapter_run.h), against reference.json cases as the golden generators write them
 * (tests/golden/gen_models.py, gen_bottleneck.py, gen_delta.py): "prompt" token ids,
 * "prefill_logits" (one row per prompt position) and "decode" steps ({"token", "logits"}).
 * Shared by test_adapter_golden.c, test_bottleneck.c and test_delta.c. */
#ifndef DS_TEST_ADAPTER_GROUP_H
#define DS_TEST_ADAPTER_GROUP_H

#include "adapter_run.h"
#include "ds_test.h"
#include "golden.h"

/* One sequence of a group: its adapter (NULL = the base model) and its reference case. */
typedef struct ag_member {
    const char *name;
    const ds_adapter_dev *dev;
    const cJSON *ref_case;
    int case_idx; /* for messages */
} ag_member;

/* Compares one logits row with its reference row; what names the row for the failure message. */
typedef void (*ag_check_fn)(const char *what, const float *logits, const cJSON *ref, int n_vocab);

/* Runs mem[0..n) in shared batches: one prefill step (every prompt), then the reference's decode
 * tokens, one step each, passing every real token row to check. Returns the prefill step's status
 * (nothing is checked when it fails: the caller decides, e.g. a backend lacking an op); failed
 * decode steps are CHECKed here. */
static __attribute__((unused)) int ag_run(ds_llama *L, const ds_model *m, const ag_member *mem, int n,
                                          const char *label, ag_check_fn check) {
    const int V = m->cfg.n_vocab;
    ar_ctx c;
    ar_init(&c, L, m);
    int32_t *toks[AR_MAX_SEQS] = {0};
    int nt[AR_MAX_SEQS] = {0}, total = 0;
    for (int i = 0; i < n; i++) {
        ar_add(&c, mem[i].dev);
        toks[i] = golden_ids(cJSON_GetObjectItem(mem[i].ref_case, "prompt"), &nt[i]);
        total += nt[i];
    }
    float *logits = malloc(sizeof(float) * (size_t)total * V);
    const int st = ar_step(&c, toks, nt, logits);
    char what[512];
    size_t off = 0;
    for (int i = 0; !st && i < n; i++)
        for (int r = 0; r < nt[i]; r++, off += (size_t)V) {
            snprintf(what, sizeof what, "%s %s case %d prefill pos %d", label, mem[i].name,
                     mem[i].case_idx, r);
            check(what, logits + off, cJSON_GetArrayItem(cJSON_GetObjectItem(mem[i].ref_case, "prefill_logits"), r), V);
        }
    const int steps = st ? 0 : cJSON_GetArraySize(cJSON_GetObjectItem(mem[0].ref_case, "decode"));
    for (int k = 0; k < steps; k++) {
        int32_t dt[AR_MAX_SEQS], *dp[AR_MAX_SEQS];
        int ones[AR_MAX_SEQS];
        const cJSON *ds[AR_MAX_SEQS];
        for (int i = 0; i < n; i++) {
            ds[i] = cJSON_GetArrayItem(cJSON_GetObjectItem(mem[i].ref_case, "decode"), k);
            dt[i] = ds[i] ? (int32_t)cJSON_GetObjectItem(ds[i], "token")->valuedouble : 0;
            dp[i] = &dt[i];
            ones[i] = ds[i] ? 1 : 0;
        }
        CHECK(ar_step(&c, dp, ones, logits) == 0);
        for (int i = 0, row = 0; i < n; i++) {
            if (!ones[i]) continue;
            snprintf(what, sizeof what, "%s %s case %d decode %d", label, mem[i].name, mem[i].case_idx, k);
            check(what, logits + (size_t)row++ * V, cJSON_GetObjectItem(ds[i], "logits"), V);
        }
    }
    for (int i = 0; i < n; i++) free(toks[i]);
    free(logits);
    ar_free(&c);
    return st;
}
#endif
