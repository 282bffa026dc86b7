/* Golden test of every adapter type against HF PEFT (fp32, CPU): for each adapter under
 * tests/data/adapters/<model>/, prefill logits at every real prompt position and 4 decode steps
 * match to max|Δ| <= 1e-4 · max(1, max|logit|); then the mixed manifest runs >= 6 sequences with
 * different adapters (or none) in ONE forward per step, each matching its own reference.
 * Runs on every available backend: the CPU against PEFT, CUDA against the CPU's rows (parity.h
 * states the tolerance); an adapter whose ops a backend lacks (DS_EUNSUPPORTED) is reported and
 * left out of that backend's runs. */
#include "adapter_group.h"
#include "ds_test.h"
#include "golden.h"
#include "parity.h"

#include <dirent.h>

#define REL_TOL 1e-4
#define MAX_ADAPTERS 32

typedef struct loaded {
    char name[256];
    ds_adapter *a;
    ds_adapter_dev dev;
    cJSON *ref;
    bool unsupported; /* on the current backend */
} loaded;

static parity P; /* per model: the CPU run records, later backends compare */

static void check_row(const char *what, const float *logits, const cJSON *ref, int n_vocab) {
    parity_row(&P, what, logits, n_vocab);
    if (!P.record) return;
    double tol = REL_TOL * fmax(1.0, golden_max_abs(ref));
    double d = golden_max_diff(logits, ref, n_vocab);
    CHECK_MSG(d <= tol, "%s: max|diff| %.3g > tol %.3g", what, d, tol);
}

/* Runs the given (adapter, case) pairs together: one prefill step, then the decode steps. Returns
 * DS_EUNSUPPORTED when a non-reference backend lacks an op the group needs, else 0. */
static int run_group(ds_llama *L, const ds_model *m, loaded **ads, const int *case_idx, int n, const char *label) {
    ag_member mem[AR_MAX_SEQS];
    for (int i = 0; i < n; i++)
        mem[i] = (ag_member){ads[i]->name, ads[i]->a ? &ads[i]->dev : NULL,
                             cJSON_GetArrayItem(cJSON_GetObjectItem(ads[i]->ref, "cases"), case_idx[i]), case_idx[i]};
    const int st = ag_run(L, m, mem, n, label, check_row);
    if (st == DS_EUNSUPPORTED && !P.record) {
        printf("%s: %s: an op is unsupported on %s: skipped\n", label, n == 1 ? ads[0]->name : "group", P.backend);
        return DS_EUNSUPPORTED;
    }
    CHECK(st == 0);
    return 0;
}

static int load_all(const char *dir, const ds_model *m, ds_backend *b, loaded *out) {
    DIR *d = opendir(dir);
    if (!d) return 0;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < MAX_ADAPTERS) {
        char path[1024], ref[1100];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        snprintf(ref, sizeof ref, "%s/reference.json", path);
        if (e->d_name[0] == '.' || access(ref, R_OK) != 0) continue;
        loaded *l = &out[n];
        memset(l, 0, sizeof *l);
        snprintf(l->name, sizeof l->name, "%s", e->d_name);
        ds_err err = {{0}};
        ds_adapter_load_params lp = ds_adapter_default_load_params();
        lp.name = l->name;
        l->a = ds_adapter_load(path, m, &lp, &err);
        CHECK_MSG(l->a != NULL, "load %s: %s", path, err.msg);
        l->ref = golden_load_json(ref);
        if (!l->a || !l->ref) continue;
        int st = ds_adapter_dev_upload(b, l->a, &l->dev, &err);
        if (st == DS_EUNSUPPORTED && !P.record) { /* refused by this backend: said, left out of its runs */
            printf("%s: not on %s: %s\n", l->name, b->iface->name, err.msg);
            l->unsupported = true;
        } else {
            CHECK_MSG(st == 0, "upload %s: %s", path, err.msg);
        }
        n++;
    }
    closedir(d);
    return n;
}

/* Every adapter alone, case by case, then the mixed manifest in one batch, on backend b. */
static void run_backend(ds_backend *b, const ds_model *m, const char *model, const char *mpath, const char *adir) {
    ds_err err = {{0}};
    parity_begin(&P, b);
    ds_llama_params lp = ds_llama_default_params();
    lp.kv_bytes = (size_t)32 << 20;
    lp.max_blocks_per_seq = AR_BLOCKS_PER_SEQ + 4;
    ds_llama *L = ds_llama_create(m, b, &lp, &err);
    CHECK_MSG(L != NULL, "%s: llama_create: %s", b->iface->name, err.msg);
    if (!L) return;
    static loaded ads[MAX_ADAPTERS];
    int n = load_all(adir, m, b, ads);
    for (int i = 0; i < n; i++) { /* each adapter alone, case by case */
        int nc = cJSON_GetArraySize(cJSON_GetObjectItem(ads[i].ref, "cases"));
        for (int k = 0; k < nc && !ads[i].unsupported; k++) {
            loaded *one[1] = {&ads[i]};
            ads[i].unsupported = run_group(L, m, one, &k, 1, model) == DS_EUNSUPPORTED;
        }
        if (!ads[i].unsupported) printf("%s/%s: checked %d cases on %s\n", model, ads[i].name, nc, b->iface->name);
    }
    char man[600];
    snprintf(man, sizeof man, "%s/mixed.json", adir);
    cJSON *mix = golden_load_json(man);
    if (mix && n > 0) {
        static loaded base;
        loaded *group[AR_MAX_SEQS];
        int cidx[AR_MAX_SEQS], g = 0;
        char basepath[600];
        snprintf(basepath, sizeof basepath, "%s/reference.json", mpath);
        base.ref = golden_load_json(basepath);
        snprintf(base.name, sizeof base.name, "base");
        const cJSON *it;
        cJSON_ArrayForEach(it, cJSON_GetObjectItem(mix, "entries")) {
            const cJSON *an = cJSON_GetObjectItem(it, "adapter");
            loaded *l = cJSON_IsString(an) ? NULL : &base;
            for (int i = 0; i < n && !l; i++)
                if (!strcmp(ads[i].name, an->valuestring)) l = &ads[i];
            if (!l || l->unsupported) {
                printf("mixed: skipping '%s' (%s)\n", an->valuestring, l ? "unsupported on this backend" : "not loaded");
                continue;
            }
            if (g == AR_MAX_SEQS) continue;
            group[g] = l;
            cidx[g++] = (int)cJSON_GetObjectItem(it, "case")->valuedouble;
        }
        CHECK(g >= 6);
        run_group(L, m, group, cidx, g, "mixed");
        printf("%s: mixed batch of %d sequences checked on %s\n", model, g, b->iface->name);
        cJSON_Delete(base.ref);
    }
    cJSON_Delete(mix);
    parity_report(&P, model);
    for (int i = 0; i < n; i++) {
        ds_adapter_dev_release(b, &ads[i].dev);
        ds_adapter_free(ads[i].a);
        cJSON_Delete(ads[i].ref);
    }
    ds_llama_free(L);
}

static void run_model(ds_backend **backends, int n_backends, const char *model) {
    char mpath[512], adir[512];
    snprintf(mpath, sizeof mpath, "%s/models/%s", parity_data_dir(), model);
    snprintf(adir, sizeof adir, "%s/adapters/%s", parity_data_dir(), model);
    if (access(mpath, R_OK) || access(adir, R_OK)) {
        printf("skip %s: golden model or adapters missing\n", model);
        return;
    }
    ds_err err = {{0}};
    ds_model_params mp = ds_model_default_params();
    mp.verbose = false;
    ds_model *m = ds_model_load(mpath, &mp, &err);
    CHECK_MSG(m != NULL, "%s", err.msg);
    if (!m) return;
    for (int i = 0; i < n_backends; i++) run_backend(backends[i], m, model, mpath, adir);
    parity_free(&P);
    ds_model_free(m);
}

/* PEFT module names follow the base's layout: Phi-3's fused qkv_proj / gate_up_proj on a Llama-layout
 * base, and q_proj & co. on Phi-3, are refused by name; so is a GGUF LoRA on Phi-3. */
static void check_fused_names(void) {
    char llama[512], phi3[512], a_llama[512], a_phi3[512], a_gguf[512];
    snprintf(llama, sizeof llama, "%s/models/tiny-llama", parity_data_dir());
    snprintf(phi3, sizeof phi3, "%s/models/tiny-phi3", parity_data_dir());
    snprintf(a_llama, sizeof a_llama, "%s/adapters/tiny-llama/lora-qv", parity_data_dir());
    snprintf(a_phi3, sizeof a_phi3, "%s/adapters/tiny-phi3/lora-all", parity_data_dir());
    snprintf(a_gguf, sizeof a_gguf, "%s/adapters/tiny-llama/lora-qv.gguf", parity_data_dir());
    if (access(llama, R_OK) || access(phi3, R_OK) || access(a_llama, R_OK) || access(a_phi3, R_OK)) return;
    ds_err err = {{0}};
    ds_model_params mp = ds_model_default_params();
    mp.verbose = false;
    ds_model *ml = ds_model_load(llama, &mp, &err), *mph = ds_model_load(phi3, &mp, &err);
    CHECK(ml && mph);
    ds_adapter_load_params lp = ds_adapter_default_load_params();
    ds_adapter *a = ml ? ds_adapter_load(a_phi3, ml, &lp, &err) : NULL;
    CHECK_MSG(!a && strstr(err.msg, "fused") && strstr(err.msg, "llama"), "phi3 adapter on llama: %s", a ? "loaded" : err.msg);
    ds_adapter_free(a);
    a = mph ? ds_adapter_load(a_llama, mph, &lp, &err) : NULL;
    CHECK_MSG(!a && strstr(err.msg, "fuses it into qkv_proj"), "llama adapter on phi3: %s", a ? "loaded" : err.msg);
    ds_adapter_free(a);
    a = mph && !access(a_gguf, R_OK) ? ds_adapter_load(a_gguf, mph, &lp, &err) : NULL;
    CHECK_MSG(!a && (access(a_gguf, R_OK) || strstr(err.msg, "phi3")), "GGUF LoRA on phi3: %s", a ? "loaded" : err.msg);
    ds_adapter_free(a);
    ds_model_free(ml);
    ds_model_free(mph);
    /* Gemma 3 scales its token embeddings: an embedding LoRA is refused by name, not applied unscaled. */
    char gemma[512], a_emb[600];
    snprintf(gemma, sizeof gemma, "%s/models/tiny-gemma3", parity_data_dir());
    snprintf(a_emb, sizeof a_emb, "%s/adapters/tiny-llama/lora-embed-head", parity_data_dir());
    if (access(gemma, R_OK) || access(a_emb, R_OK)) return;
    /* a copy of tiny-llama's embedding LoRA config with only the embedding factors (zeros) */
    char dir[] = "/tmp/ds_test_gemb_XXXXXX", path[700], *cfg = NULL;
    CHECK(mkdtemp(dir) != NULL);
    snprintf(path, sizeof path, "%s/adapter_config.json", a_emb);
    size_t cfg_len = 0;
    CHECK(ds_file_read_all(path, 1 << 20, &cfg, &cfg_len, &err) == 0);
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    FILE *f = fopen(path, "wb");
    if (f && cfg) fwrite(cfg, 1, cfg_len, f);
    if (f) fclose(f);
    free(cfg);
    const char *hdr = "{\"base_model.model.model.embed_tokens.lora_embedding_A\":{\"dtype\":\"F32\",\"shape\":[4,320],"
                      "\"data_offsets\":[0,5120]},\"base_model.model.model.embed_tokens.lora_embedding_B\":{\"dtype\":"
                      "\"F32\",\"shape\":[64,4],\"data_offsets\":[5120,6144]}}";
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    f = fopen(path, "wb");
    if (f) {
        uint64_t hn = strlen(hdr);
        static const float zeros[1536];
        fwrite(&hn, 8, 1, f), fwrite(hdr, 1, hn, f), fwrite(zeros, sizeof zeros, 1, f);
        fclose(f);
    }
    ds_model *mg = ds_model_load(gemma, &mp, &err);
    CHECK(mg);
    a = mg ? ds_adapter_load(dir, mg, &lp, &err) : NULL;
    CHECK_MSG(!a && strstr(err.msg, "scaled embeddings"), "embedding LoRA on gemma3: %s", a ? "loaded" : err.msg);
    ds_adapter_free(a);
    ds_model_free(mg);
    char cmd[64];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0);
}

int main(void) {
    ds_backend *bs[2];
    const int nb = parity_backends(bs, 2);
    run_model(bs, nb, "tiny-llama");
    run_model(bs, nb, "tiny-qwen2");
    run_model(bs, nb, "tiny-qwen3");
    run_model(bs, nb, "tiny-phi3");
    run_model(bs, nb, "tiny-gemma3");
    check_fused_names();
    for (int i = 0; i < nb; i++) ds_backend_free(bs[i]);
    if (ds_test_checks == 0) SKIP("no golden adapters under %s/adapters (run tests/golden/gen_adapters.py)", parity_data_dir());
    return ds_test_result();
}
