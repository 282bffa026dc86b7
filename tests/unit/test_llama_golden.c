/* Golden test of the forward pass against HF transformers (fp32, CPU): tiny random llama (GQA,
 * untied), qwen2 (qkv bias, tied), llama3 rope scaling — loaded from HF directories and from GGUF
 * — for every prefill position and every decode step, run one sequence at a time and all cases
 * batched together. Tolerance: max |Δ| <= 1e-4 · max(1, max |logit|). Runs on every available
 * backend: the CPU against HF, CUDA against the CPU's rows (parity.h states the tolerance). */
#include "ds_test.h"
#include "golden.h"
#include "parity.h"

#define REL_TOL 1e-4

static parity P; /* per model: the CPU run records, later backends compare */

static void check_rows(const char *what, const float *logits, const cJSON *rows, int n_rows, int n_vocab) {
    for (int r = 0; r < n_rows; r++) {
        char key[512];
        snprintf(key, sizeof key, "%s row %d", what, r);
        parity_row(&P, key, logits + (size_t)r * n_vocab, n_vocab);
        if (!P.record) continue;
        const cJSON *ref = cJSON_GetArrayItem(rows, r);
        double tol = REL_TOL * fmax(1.0, golden_max_abs(ref));
        double d = golden_max_diff(logits + (size_t)r * n_vocab, ref, n_vocab);
        CHECK_MSG(d <= tol, "%s row %d: max|diff| %.3g > tol %.3g", what, r, d, tol);
    }
}

/* Case by case: prefill (all positions) then each decode step. */
static void run_single(ds_llama *L, const cJSON *cases, int n_vocab, const char *label) {
    const cJSON *c;
    int ci = 0;
    cJSON_ArrayForEach(c, cases) {
        int n;
        int32_t *prompt = golden_ids(cJSON_GetObjectItem(c, "prompt"), &n);
        golden_seqs g;
        golden_seqs_init(&g, 1, 64);
        float *logits = malloc(sizeof(float) * (size_t)n * n_vocab);
        CHECK(golden_step(L, &g, &prompt, &n, logits, 1) == 0);
        char what[400];
        snprintf(what, sizeof what, "%s case %d prefill(n=%d)", label, ci, n);
        check_rows(what, logits, cJSON_GetObjectItem(c, "prefill_logits"), n, n_vocab);
        const cJSON *step;
        int k = 0;
        cJSON_ArrayForEach(step, cJSON_GetObjectItem(c, "decode")) {
            int32_t tok = (int32_t)cJSON_GetObjectItem(step, "token")->valuedouble;
            int32_t *tp = &tok;
            int one = 1;
            CHECK(golden_step(L, &g, &tp, &one, logits, 1) == 0);
            cJSON *rows = cJSON_CreateArray();
            cJSON_AddItemReferenceToArray(rows, cJSON_GetObjectItem(step, "logits"));
            snprintf(what, sizeof what, "%s case %d decode step %d", label, ci, k++);
            check_rows(what, logits, rows, 1, n_vocab);
            cJSON_Delete(rows);
        }
        free(logits);
        free(prompt);
        golden_seqs_free(&g);
        ci++;
    }
}

/* All cases in one batch: one prefill step for every sequence, then decode steps together. */
static void run_batched(ds_llama *L, const cJSON *cases, int n_vocab, const char *label) {
    int ns = cJSON_GetArraySize(cases), total = 0;
    int32_t **toks = calloc((size_t)ns, sizeof *toks);
    int *n = calloc((size_t)ns, sizeof *n);
    for (int s = 0; s < ns; s++) {
        toks[s] = golden_ids(cJSON_GetObjectItem(cJSON_GetArrayItem(cases, s), "prompt"), &n[s]);
        total += n[s];
    }
    golden_seqs g;
    golden_seqs_init(&g, ns, 64);
    float *logits = malloc(sizeof(float) * (size_t)total * n_vocab);
    CHECK(golden_step(L, &g, toks, n, logits, 1) == 0);
    size_t off = 0;
    char what[400];
    for (int s = 0; s < ns; s++) {
        snprintf(what, sizeof what, "%s batched prefill seq %d", label, s);
        check_rows(what, logits + off, cJSON_GetObjectItem(cJSON_GetArrayItem(cases, s), "prefill_logits"), n[s], n_vocab);
        off += (size_t)n[s] * n_vocab;
    }
    int steps = cJSON_GetArraySize(cJSON_GetObjectItem(cJSON_GetArrayItem(cases, 0), "decode"));
    for (int k = 0; k < steps; k++) {
        int32_t *dt = calloc((size_t)ns, sizeof *dt);
        int32_t **dp = calloc((size_t)ns, sizeof *dp);
        int *ones = calloc((size_t)ns, sizeof *ones);
        for (int s = 0; s < ns; s++) {
            const cJSON *st = cJSON_GetArrayItem(cJSON_GetObjectItem(cJSON_GetArrayItem(cases, s), "decode"), k);
            dt[s] = (int32_t)cJSON_GetObjectItem(st, "token")->valuedouble;
            dp[s] = &dt[s];
            ones[s] = 1;
        }
        CHECK(golden_step(L, &g, dp, ones, logits, 1) == 0);
        for (int s = 0; s < ns; s++) {
            const cJSON *st = cJSON_GetArrayItem(cJSON_GetObjectItem(cJSON_GetArrayItem(cases, s), "decode"), k);
            cJSON *rows = cJSON_CreateArray();
            cJSON_AddItemReferenceToArray(rows, cJSON_GetObjectItem(st, "logits"));
            snprintf(what, sizeof what, "%s batched decode step %d seq %d", label, k, s);
            check_rows(what, logits + (size_t)s * n_vocab, rows, 1, n_vocab);
            cJSON_Delete(rows);
        }
        free(dt);
        free(dp);
        free(ones);
    }
    for (int s = 0; s < ns; s++) free(toks[s]);
    free(toks);
    free(n);
    free(logits);
    golden_seqs_free(&g);
}

static void run_model(ds_backend **backends, int n_backends, const char *name, const char *file, const char *refname) {
    char path[512], refpath[512];
    snprintf(path, sizeof path, "%s/models/%s%s%s", parity_data_dir(), name, file ? "/" : "", file ? file : "");
    snprintf(refpath, sizeof refpath, "%s/models/%s/%s", parity_data_dir(), name, refname);
    if (access(path, R_OK) != 0 || access(refpath, R_OK) != 0) {
        printf("skip %s (%s): golden files missing\n", name, file ? file : "hf dir");
        return;
    }
    cJSON *ref = golden_load_json(refpath);
    CHECK_MSG(ref != NULL, "cannot parse %s", refpath);
    if (!ref) return;
    ds_err err = {{0}};
    ds_model_params mp = ds_model_default_params();
    mp.verbose = false;
    ds_model *m = ds_model_load(path, &mp, &err);
    CHECK_MSG(m != NULL, "load %s: %s", path, err.msg);
    for (int i = 0; i < n_backends && m; i++) {
        ds_backend *b = backends[i];
        parity_begin(&P, b);
        ds_llama_params lp = ds_llama_default_params();
        lp.kv_bytes = (size_t)16 << 20;
        lp.max_blocks_per_seq = 64;
        ds_llama *L = ds_llama_create(m, b, &lp, &err);
        CHECK_MSG(L != NULL, "%s: llama_create: %s", b->iface->name, err.msg);
        if (L) {
            char label[256];
            snprintf(label, sizeof label, "%s/%s", name, file ? file : "hf");
            int n_vocab = (int)cJSON_GetObjectItem(ref, "n_vocab")->valuedouble;
            CHECK_EQ_INT(n_vocab, m->cfg.n_vocab);
            run_single(L, cJSON_GetObjectItem(ref, "cases"), n_vocab, label);
            run_batched(L, cJSON_GetObjectItem(ref, "cases"), n_vocab, label);
            printf("%s: checked on %s\n", label, b->iface->name);
            parity_report(&P, label);
        }
        ds_llama_free(L);
    }
    parity_free(&P);
    ds_model_free(m);
    cJSON_Delete(ref);
}

/* The sliding window is what makes a windowed model's reference: the same weights with full attention
 * (window switched off) miss it on the positions past the window. */
static void check_window_matters(ds_backend *b, const char *name, int32_t window) {
    char path[512], refpath[600];
    snprintf(path, sizeof path, "%s/models/%s", parity_data_dir(), name);
    snprintf(refpath, sizeof refpath, "%s/reference.json", path);
    cJSON *ref = golden_load_json(refpath);
    ds_err err = {{0}};
    ds_model_params mp = ds_model_default_params();
    mp.verbose = false;
    ds_model *m = ref ? ds_model_load(path, &mp, &err) : NULL;
    if (!m) {
        cJSON_Delete(ref);
        return;
    }
    CHECK(m->cfg.sliding_window == window && ds_model_layer_window(&m->cfg, 1) == window);
    m->cfg.sliding_window = 0;
    ds_llama_params lp = ds_llama_default_params();
    lp.kv_bytes = (size_t)16 << 20;
    lp.max_blocks_per_seq = 64;
    ds_llama *L = ds_llama_create(m, b, &lp, &err);
    const cJSON *c = cJSON_GetArrayItem(cJSON_GetObjectItem(ref, "cases"), 1); /* the 12-token prompt */
    int n, V = m->cfg.n_vocab;
    int32_t *prompt = golden_ids(cJSON_GetObjectItem(c, "prompt"), &n);
    float *logits = malloc(sizeof(float) * (size_t)n * V);
    golden_seqs g;
    golden_seqs_init(&g, 1, 64);
    CHECK(L && golden_step(L, &g, &prompt, &n, logits, 1) == 0);
    double worst = 0;
    for (int r = window; r < n; r++) {
        const cJSON *row = cJSON_GetArrayItem(cJSON_GetObjectItem(c, "prefill_logits"), r);
        worst = fmax(worst, golden_max_diff(logits + (size_t)r * V, row, V) / (REL_TOL * fmax(1.0, golden_max_abs(row))));
    }
    printf("%s with full attention instead of its window: worst diff %.0fx the tolerance\n", name, worst);
    CHECK_MSG(worst > 10, "full attention matches the sliding-window reference (%.2f x tol)", worst);
    golden_seqs_free(&g);
    free(logits);
    free(prompt);
    ds_llama_free(L);
    ds_model_free(m);
    cJSON_Delete(ref);
}

/* Partial rotary is what makes tiny-phi3-partial's reference: RoPE over whole heads misses it. */
static void check_partial_rotary_matters(ds_backend *b) {
    char path[512], refpath[600];
    snprintf(path, sizeof path, "%s/models/tiny-phi3-partial", parity_data_dir());
    snprintf(refpath, sizeof refpath, "%s/reference.json", path);
    cJSON *ref = golden_load_json(refpath);
    ds_err err = {{0}};
    ds_model_params mp = ds_model_default_params();
    mp.verbose = false;
    ds_model *m = ref ? ds_model_load(path, &mp, &err) : NULL;
    if (!m) {
        cJSON_Delete(ref);
        return;
    }
    CHECK_EQ_INT(m->cfg.n_rot, 12);
    m->cfg.n_rot = 0;
    ds_rope_inv_freq(&m->cfg, m->inv_freq);
    ds_llama_params lp = ds_llama_default_params();
    lp.kv_bytes = (size_t)16 << 20;
    lp.max_blocks_per_seq = 64;
    ds_llama *L = ds_llama_create(m, b, &lp, &err);
    const cJSON *c = cJSON_GetArrayItem(cJSON_GetObjectItem(ref, "cases"), 1);
    int n, V = m->cfg.n_vocab;
    int32_t *prompt = golden_ids(cJSON_GetObjectItem(c, "prompt"), &n);
    float *logits = malloc(sizeof(float) * (size_t)n * V);
    golden_seqs g;
    golden_seqs_init(&g, 1, 64);
    CHECK(L && golden_step(L, &g, &prompt, &n, logits, 1) == 0);
    double worst = 0;
    for (int r = 1; r < n; r++) {
        const cJSON *row = cJSON_GetArrayItem(cJSON_GetObjectItem(c, "prefill_logits"), r);
        worst = fmax(worst, golden_max_diff(logits + (size_t)r * V, row, V) / (REL_TOL * fmax(1.0, golden_max_abs(row))));
    }
    printf("tiny-phi3-partial with RoPE over whole heads: worst diff %.0fx the tolerance\n", worst);
    CHECK_MSG(worst > 10, "full rotary matches the partial-rotary reference (%.2f x tol)", worst);
    golden_seqs_free(&g);
    free(logits);
    free(prompt);
    ds_llama_free(L);
    ds_model_free(m);
    cJSON_Delete(ref);
}

int main(void) {
    ds_backend *bs[2];
    const int nb = parity_backends(bs, 2);
    const char *models[] = {"tiny-llama", "tiny-qwen2", "tiny-llama3", "tiny-qwen3", "tiny-mistral", "tiny-phi3", "tiny-phi3-partial", "tiny-gemma3"};
    for (size_t i = 0; i < sizeof models / sizeof models[0]; i++) {
        run_model(bs, nb, models[i], NULL, "reference.json");
        run_model(bs, nb, models[i], "model.gguf", "reference.json");
    }
    run_model(bs, nb, "tiny-llama", "model-q8_0.gguf", "reference-q8_0.json");
    run_model(bs, nb, "tiny-qwen3", "model-q8_0.gguf", "reference-q8_0.json");
    run_model(bs, nb, "tiny-phi3", "model-q8_0.gguf", "reference-q8_0.json");
    run_model(bs, nb, "tiny-phi3-partial", "model-q8_0.gguf", "reference-q8_0.json");
    run_model(bs, nb, "tiny-gemma3", "model-q8_0.gguf", "reference-q8_0.json");
    if (nb > 0) check_window_matters(bs[0], "tiny-mistral", 4);
    if (nb > 0) check_window_matters(bs[0], "tiny-phi3", 5);
    if (nb > 0) check_window_matters(bs[0], "tiny-gemma3", 4);
    if (nb > 0) check_partial_rotary_matters(bs[0]);
    for (int i = 0; i < nb; i++) ds_backend_free(bs[i]);
    if (ds_test_checks == 0) SKIP("no golden models under %s/models (run tests/golden/gen_models.py)", parity_data_dir());
    return ds_test_result();
}
