/* Delta adapters (sparse weight deltas + bias deltas) against PyTorch, on the CPU backend
 * (tests/data/delta/, written by tests/golden/gen_delta.py):
 *   - ds_delta_extract at 100% keep of the "fully fine-tuned" copy reproduces the tuned model's
 *     logits (prefill at every position + 4 decode steps) within 1e-4 · max(1, max|logit|);
 *   - at 1% keep it selects exactly the entries numpy selected (indices and fp32 values bit for
 *     bit) and the logits equal base + that pruned delta as PyTorch computed them;
 *   - a bias-only delta (F16 values; Llama has no biases, Qwen2 adds to its q/k/v biases) likewise;
 *   - a mixed batch: two delta adapters, LoRA, prefix tuning, prompt tuning and the base, one
 *     forward per step, each sequence against its own reference;
 *   - memory: host and backend bytes of a delta equal its CSR size;
 *   - every malformed directory of tests/data/delta/bad is refused with the expected message. */
#include "adapter/loader.h"
#include "adapter_group.h"
#include "parity.h"

#include <dirent.h>

#define REL_TOL 1e-4

typedef struct ent {
    const char *name;
    ds_adapter *a;
    ds_adapter_dev dev;
    cJSON *ref;
    int case_idx;
} ent;

static ds_backend *B;

static void check_row(const char *what, const float *logits, const cJSON *ref, int n_vocab) {
    double tol = REL_TOL * fmax(1.0, golden_max_abs(ref));
    double d = golden_max_diff(logits, ref, n_vocab);
    CHECK_MSG(d <= tol, "%s: max|diff| %.3g > tol %.3g", what, d, tol);
}

/* Runs entries e[0..n) in one batch: a prefill step, then the reference's decode tokens. */
static void run_group(ds_llama *L, const ds_model *m, ent *e, int n, const char *label) {
    ag_member mem[AR_MAX_SEQS];
    for (int i = 0; i < n; i++)
        mem[i] = (ag_member){e[i].name, e[i].a ? &e[i].dev : NULL,
                             cJSON_GetArrayItem(cJSON_GetObjectItem(e[i].ref, "cases"), e[i].case_idx), e[i].case_idx};
    CHECK(ag_run(L, m, mem, n, label, check_row) == 0);
}

static bool open_ent(ent *e, const char *name, const char *dir, const char *ref, const ds_model *m) {
    memset(e, 0, sizeof *e);
    e->name = name;
    ds_err err = {{0}};
    if (dir) {
        e->a = ds_adapter_load(dir, m, NULL, &err);
        CHECK_MSG(e->a != NULL, "load %s: %s", dir, err.msg);
        if (!e->a) return false;
        CHECK_MSG(ds_adapter_dev_upload(B, e->a, &e->dev, &err) == 0, "upload %s: %s", dir, err.msg);
    }
    e->ref = golden_load_json(ref);
    CHECK_MSG(e->ref != NULL, "%s missing", ref);
    return e->ref != NULL;
}

static void close_ent(ent *e) {
    if (e->a) ds_adapter_dev_release(B, &e->dev);
    ds_adapter_free(e->a);
    cJSON_Delete(e->ref);
    memset(e, 0, sizeof *e);
}

static void run_all_cases(ds_llama *L, const ds_model *m, ent *e, const char *label) {
    const int nc = cJSON_GetArraySize(cJSON_GetObjectItem(e->ref, "cases"));
    for (int k = 0; k < nc; k++) {
        e->case_idx = k;
        run_group(L, m, e, 1, label);
    }
}

/* The extracted adapter's modules equal the generator's bit for bit. */
static void same_modules(const ds_adapter *x, const ds_adapter *y, const char *label) {
    int64_t nnz = 0;
    int bad = 0;
    for (size_t i = 0; i < (size_t)x->n_layer * DS_PROJ_COUNT; i++) {
        const ds_delta_module *a = x->delta ? x->delta[i] : NULL, *b = y->delta ? y->delta[i] : NULL;
        if (!a || !b) {
            bad += (a != NULL) != (b != NULL);
            continue;
        }
        nnz += a->nnz;
        bad += a->nnz != b->nnz || a->rows != b->rows ||
               memcmp(a->row_ptr, b->row_ptr, sizeof(int32_t) * ((size_t)a->rows + 1)) ||
               memcmp(a->col, b->col, sizeof(int32_t) * (size_t)(a->nnz < b->nnz ? a->nnz : b->nnz)) ||
               memcmp(a->val, b->val, sizeof(float) * (size_t)(a->nnz < b->nnz ? a->nnz : b->nnz));
        const float *ba = x->dbias ? x->dbias[i] : NULL, *bb = y->dbias ? y->dbias[i] : NULL;
        bad += (ba != NULL) != (bb != NULL) ||
               (ba && memcmp(ba, bb, sizeof(float) * (size_t)x->proj_out[i % DS_PROJ_COUNT]));
    }
    CHECK_MSG(bad == 0, "%s: %d modules differ from the generator's", label, bad);
    CHECK(nnz > 0);
    printf("%s: extraction at 1%% selected the generator's %lld entries exactly\n", label, (long long)nnz);
}

static size_t csr_bytes(const ds_adapter *a) {
    size_t n = 0;
    for (size_t i = 0; i < (size_t)a->n_layer * DS_PROJ_COUNT; i++) {
        if (a->delta && a->delta[i]) n += ((size_t)a->delta[i]->rows + 1) * 4 + (size_t)a->delta[i]->nnz * 8;
        if (a->dbias && a->dbias[i]) n += (size_t)a->proj_out[i % DS_PROJ_COUNT] * 4;
    }
    return n;
}

static void run_model(const char *model) {
    const char *data = parity_data_dir();
    char mpath[512], tpath[512], ddir[512], p1[600], p2[600];
    snprintf(mpath, sizeof mpath, "%s/models/%s", data, model);
    snprintf(ddir, sizeof ddir, "%s/delta/%s", data, model);
    snprintf(tpath, sizeof tpath, "%s/tuned", ddir);
    ds_err err = {{0}};
    ds_model_params mp = ds_model_default_params();
    mp.verbose = false;
    ds_model *m = ds_model_load(mpath, &mp, &err), *t = m ? ds_model_load(tpath, &mp, &err) : NULL;
    CHECK_MSG(m && t, "%s: %s", model, err.msg);
    if (!m || !t) {
        ds_model_free(m);
        return;
    }
    ds_llama_params lp = ds_llama_default_params();
    lp.kv_bytes = (size_t)32 << 20;
    lp.max_blocks_per_seq = AR_BLOCKS_PER_SEQ + 4;
    ds_llama *L = ds_llama_create(m, B, &lp, &err);
    CHECK_MSG(L != NULL, "%s", err.msg);
    char tmp[] = "/tmp/ds_delta_XXXXXX";
    CHECK(mkdtemp(tmp) != NULL);
    char out_full[600], out_k1[600], label[128];
    snprintf(out_full, sizeof out_full, "%s/full", tmp);
    snprintf(out_k1, sizeof out_k1, "%s/keep1", tmp);

    /* (a) 100% keep reproduces the tuned model. */
    ds_delta_extract_params xp = ds_delta_extract_default_params();
    ds_delta_extract_stats st;
    xp.keep = 1.0;
    CHECK_MSG(ds_delta_extract(m, t, &xp, out_full, &st, &err) == 0, "extract: %s", err.msg);
    CHECK_EQ_INT(st.nnz, st.params); /* a dense perturbation: every entry differs */
    ent e[AR_MAX_SEQS];
    snprintf(p1, sizeof p1, "%s/full/reference.json", ddir);
    snprintf(label, sizeof label, "%s full", model);
    if (open_ent(&e[0], "extract-100%", out_full, p1, m)) {
        CHECK_EQ_INT(e[0].a->host_bytes, csr_bytes(e[0].a));
        CHECK_EQ_INT(e[0].dev.dev_bytes, e[0].a->host_bytes);
        run_all_cases(L, m, &e[0], label);
    }
    close_ent(&e[0]);

    /* (b) 1% keep: the generator's entries, and base + pruned delta logits. */
    xp.keep = 0.01;
    CHECK_MSG(ds_delta_extract(m, t, &xp, out_k1, &st, &err) == 0, "extract: %s", err.msg);
    snprintf(p1, sizeof p1, "%s/keep1", ddir);
    snprintf(p2, sizeof p2, "%s/keep1/reference.json", ddir);
    snprintf(label, sizeof label, "%s keep1", model);
    if (open_ent(&e[0], "extract-1%", out_k1, p2, m) && open_ent(&e[1], "keep1", p1, p2, m)) {
        same_modules(e[0].a, e[1].a, label);
        CHECK_EQ_INT(st.nnz, cJSON_GetObjectItem(e[1].ref, "nnz")->valueint);
        CHECK(strcmp(e[0].a->peft_type, "DELTA") == 0);
        run_all_cases(L, m, &e[0], label);
    }
    close_ent(&e[0]);
    close_ent(&e[1]);

    /* Threshold mode keeps exactly the entries above it. */
    xp.keep = 0, xp.threshold = 0.05;
    CHECK_MSG(ds_delta_extract(m, t, &xp, out_k1, &st, &err) == 0, "extract: %s", err.msg);
    ds_adapter *th = ds_adapter_load(out_k1, m, NULL, &err);
    CHECK_MSG(th != NULL, "%s", err.msg);
    for (size_t i = 0; th && th->delta && i < (size_t)th->n_layer * DS_PROJ_COUNT; i++)
        for (int64_t k = 0; th->delta[i] && k < th->delta[i]->nnz; k++) CHECK(fabsf(th->delta[i]->val[k]) > 0.05f);
    CHECK(st.nnz > 0 && st.nnz < st.params);
    ds_adapter_free(th);

    /* (c) bias deltas alone. */
    snprintf(p1, sizeof p1, "%s/bitfit", ddir);
    snprintf(p2, sizeof p2, "%s/bitfit/reference.json", ddir);
    snprintf(label, sizeof label, "%s bitfit", model);
    if (open_ent(&e[0], "bitfit", p1, p2, m)) {
        CHECK(e[0].a->dbias && !e[0].a->delta);
        run_all_cases(L, m, &e[0], label);
    }
    close_ent(&e[0]);

    /* (d) mixed batch: deltas beside LoRA, prefix, prompt tuning and the base. */
    static const struct {
        const char *name, *dir; /* dir relative to the data dir, NULL = base */
        int case_idx;
    } mix[] = {{"keep1", "delta/%s/keep1", 0},          {"lora-qv", "adapters/%s/lora-qv", 1},
               {"bitfit", "delta/%s/bitfit", 1},        {"base", NULL, 2},
               {"prefix", "adapters/%s/prefix", 0},     {"keep1", "delta/%s/keep1", 2},
               {"prompt-tuning", "adapters/%s/prompt-tuning", 1}};
    const int nm = (int)(sizeof mix / sizeof *mix);
    bool ok = true;
    for (int i = 0; i < nm; i++) {
        char d[600], rel[200];
        if (mix[i].dir) {
            snprintf(rel, sizeof rel, mix[i].dir, model);
            snprintf(d, sizeof d, "%s/%s", data, rel);
            snprintf(p2, sizeof p2, "%s/reference.json", d);
        } else {
            snprintf(p2, sizeof p2, "%s/reference.json", mpath);
        }
        ok &= open_ent(&e[i], mix[i].name, mix[i].dir ? d : NULL, p2, m);
        e[i].case_idx = mix[i].case_idx;
    }
    snprintf(label, sizeof label, "%s mixed", model);
    if (ok) {
        run_group(L, m, e, nm, label);
        printf("%s: %d sequences (delta, bias delta, LoRA, prefix, prompt, base) checked in one batch\n", label, nm);
    }
    for (int i = 0; i < nm; i++) close_ent(&e[i]);

    golden_rm_saved(out_full);
    golden_rm_saved(out_k1);
    rmdir(tmp);
    ds_llama_free(L);
    ds_model_free(t);
    ds_model_free(m);
}

/* tests/data/delta/bad: every directory refused, with the manifest's words in the message. */
static void run_bad(void) {
    char dir[512], man[600], mpath[512];
    snprintf(dir, sizeof dir, "%s/delta/bad", parity_data_dir());
    snprintf(man, sizeof man, "%s/manifest.json", dir);
    snprintf(mpath, sizeof mpath, "%s/models/tiny-llama", parity_data_dir());
    cJSON *j = golden_load_json(man);
    CHECK_MSG(j != NULL, "%s missing", man);
    ds_err err = {{0}};
    ds_model_params mp = ds_model_default_params();
    mp.verbose = false;
    ds_model *m = ds_model_load(mpath, &mp, &err);
    CHECK(m != NULL);
    int n = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, cJSON_GetObjectItem(j, "cases")) {
        char p[1024];
        snprintf(p, sizeof p, "%s/%s", dir, it->string);
        memset(&err, 0, sizeof err);
        ds_adapter *a = m ? ds_adapter_load(p, m, NULL, &err) : NULL;
        CHECK_MSG(a == NULL, "%s: loaded", it->string);
        CHECK_MSG(strstr(err.msg, it->valuestring) != NULL, "%s: message '%s' lacks '%s'", it->string, err.msg,
                  it->valuestring);
        ds_adapter_free(a);
        n++;
    }
    CHECK(n >= 20);
    printf("bad: %d malformed delta adapters refused\n", n);
    ds_model_free(m);
    cJSON_Delete(j);
}

int main(void) {
    char probe[600];
    snprintf(probe, sizeof probe, "%s/delta/tiny-llama/tuned/config.json", parity_data_dir());
    if (access(probe, R_OK)) SKIP("no delta golden data (run tests/golden/gen_delta.py)");
    ds_err err = {{0}};
    B = ds_backend_cpu_create(NULL, &err);
    run_bad();
    run_model("tiny-llama");
    run_model("tiny-qwen2");
    ds_backend_free(B);
    return ds_test_result();
}
