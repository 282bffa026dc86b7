/* AdapterHub adapters (`adapters` package) — bottleneck, prefix tuning, and their union MAM — against
 * the package's own logits (fp32, CPU),
 * from tests/data/adapters/bottleneck/ (tests/golden/gen_bottleneck.py):
 *  - every adapter alone: prefill logits at every prompt position and 4 decode steps within
 *    1e-4 · max(1, max|logit|);
 *  - the mixed manifest: bottleneck adapters of every kind beside PEFT LoRA, IA³, prompt-tuning and
 *    prefix adapters and base-only sequences, in ONE forward per step;
 *  - malformed and unsupported directories refused with a message naming the problem;
 *  - on SmolLM2-135M-Instruct (when models/ has it), greedy continuations equal to the package's for
 *    a sequential, a Houlsby, a scaled parallel and a MAM adapter, all in one batch;
 *  - every non_linearity name the package accepts, loaded from a config and run through the CPU op,
 *    against the package's own activation values;
 *  - a backend without the bottleneck op refuses the resident copy. */
#include "adapter_group.h"

#include <dirent.h>
#include <stdlib.h>
#include <strings.h>

#define REL_TOL 1e-4
#define MAX_ADAPTERS 24

typedef struct loaded {
    char name[64];
    ds_adapter *a;
    ds_adapter_dev dev;
    cJSON *ref;
} loaded;

static double worst_rel; /* max over all rows of max|Δ| / max(1, max|logit|) */

static void check_row(const char *what, const float *logits, const cJSON *ref, int n_vocab) {
    double scale = fmax(1.0, golden_max_abs(ref)), d = golden_max_diff(logits, ref, n_vocab);
    if (d / scale > worst_rel) worst_rel = d / scale;
    CHECK_MSG(d <= REL_TOL * scale, "%s: max|diff| %.3g > tol %.3g", what, d, REL_TOL * scale);
}

/* One prefill step for every (adapter, case), then the decode steps, all sequences in each step. */
static void run_group(ds_llama *L, const ds_model *m, loaded **ads, const int *case_idx, int n, const char *label) {
    ag_member mem[AR_MAX_SEQS];
    for (int i = 0; i < n; i++)
        mem[i] = (ag_member){ads[i]->name, ads[i]->a ? &ads[i]->dev : NULL,
                             cJSON_GetArrayItem(cJSON_GetObjectItem(ads[i]->ref, "cases"), case_idx[i]), case_idx[i]};
    CHECK(ag_run(L, m, mem, n, label, check_row) == 0);
}

static bool load_one(const char *dir, const char *name, const ds_model *m, ds_backend *b, loaded *l) {
    char path[700], ref[760];
    memset(l, 0, sizeof *l);
    snprintf(l->name, sizeof l->name, "%s", name);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    snprintf(ref, sizeof ref, "%s/reference.json", path);
    ds_err err = {{0}};
    ds_adapter_load_params lp = ds_adapter_default_load_params();
    lp.name = l->name;
    l->a = ds_adapter_load(path, m, &lp, &err);
    CHECK_MSG(l->a != NULL, "load %s: %s", path, err.msg);
    l->ref = golden_load_json(ref);
    CHECK_MSG(l->ref != NULL, "%s", ref);
    if (!l->a || !l->ref) return false;
    int st = ds_adapter_dev_upload(b, l->a, &l->dev, &err);
    CHECK_MSG(st == 0, "upload %s: %s", path, err.msg);
    return st == 0;
}

static void unload(ds_backend *b, loaded *l) {
    if (l->a) ds_adapter_dev_release(b, &l->dev);
    ds_adapter_free(l->a);
    cJSON_Delete(l->ref);
}

/* A backend identical to the CPU one but without the bottleneck op. */
static void check_no_op_backend(ds_backend *cpu, const ds_adapter *a) {
    struct ds_backend_iface f = *cpu->iface;
    f.bottleneck = NULL;
    ds_backend nb = {.iface = &f, .ctx = cpu->ctx};
    ds_adapter_dev dev;
    ds_err err = {{0}};
    CHECK_EQ_INT(ds_adapter_dev_upload(&nb, a, &dev, &err), DS_EUNSUPPORTED);
    CHECK_MSG(strstr(err.msg, "bottleneck") != NULL, "message: %s", err.msg);
}

/* The engine's slot table has holes (evicted slots are NULL): the plan must not read slot 0. */
static void check_sparse_slots(ds_llama *L, const loaded *l, int32_t d) {
    enum { N = 3 };
    ds_backend *b = ds_llama_backend(L);
    float *x = malloc(sizeof(float) * N * d), *o1 = malloc(sizeof(float) * N * d), *o2 = malloc(sizeof(float) * N * d);
    for (int32_t i = 0; i < N * d; i++) x[i] = 0.01f * (float)(i % 97) - 0.4f, o1[i] = o2[i] = 0.02f * (float)(i % 31) - 0.3f;
    const ds_adapter_dev *sparse[2] = {NULL, &l->dev}, *dense[1] = {&l->dev};
    ds_adapter_seg s1 = {.start = 0, .len = N, .slot = 1}, s0 = {.start = 0, .len = N, .slot = 0};
    ds_adapter_batch a1 = {.slots = sparse, .segs = &s1, .n_segs = 1}, a0 = {.slots = dense, .segs = &s0, .n_segs = 1};
    ds_batch bt = {.n_tokens = N};
    ds_err err = {{0}};
    ds_plan *p = ds_adapter_plan_create(L, 2, N, &err);
    CHECK_MSG(p != NULL, "%s", err.msg);
    if (p) {
        CHECK(ds_adapter_plan_build(p, &a1, &bt) == 0 && ds_plan_upload(p, b) == 0);
        CHECK(ds_plan_bottleneck(p, b, 0, DS_BN_FFN, x, o1, d) == 0);
        CHECK(ds_adapter_plan_build(p, &a0, &bt) == 0 && ds_plan_upload(p, b) == 0);
        CHECK(ds_plan_bottleneck(p, b, 0, DS_BN_FFN, x, o2, d) == 0);
        CHECK(memcmp(o1, o2, sizeof(float) * N * d) == 0);
    }
    ds_adapter_plan_free(p);
    free(x), free(o1), free(o2);
}

static void run_mixed(ds_llama *L, const ds_model *m, ds_backend *b, const char *model, loaded *ads, int n) {
    char man[600], peft_dir[600], base_ref[600];
    snprintf(man, sizeof man, "%s/adapters/bottleneck/%s/mixed.json", DS_TEST_DATA, model);
    snprintf(peft_dir, sizeof peft_dir, "%s/adapters/%s", DS_TEST_DATA, model);
    snprintf(base_ref, sizeof base_ref, "%s/models/%s/reference.json", DS_TEST_DATA, model);
    cJSON *mix = golden_load_json(man);
    CHECK_MSG(mix != NULL, "%s", man);
    if (!mix) return;
    static loaded base, peft[AR_MAX_SEQS];
    memset(&base, 0, sizeof base);
    snprintf(base.name, sizeof base.name, "base");
    base.ref = golden_load_json(base_ref);
    loaded *group[AR_MAX_SEQS];
    int cidx[AR_MAX_SEQS], g = 0, n_peft = 0, n_bn = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, cJSON_GetObjectItem(mix, "entries")) {
        const cJSON *an = cJSON_GetObjectItem(it, "adapter");
        loaded *l = cJSON_IsString(an) ? NULL : &base;
        for (int i = 0; i < n && !l; i++)
            if (!strcmp(ads[i].name, an->valuestring)) l = &ads[i], n_bn++;
        for (int i = 0; i < n_peft && !l; i++)
            if (!strcmp(peft[i].name, an->valuestring)) l = &peft[i];
        if (!l && load_one(peft_dir, an->valuestring, m, b, &peft[n_peft])) l = &peft[n_peft++];
        if (!l || g == AR_MAX_SEQS) continue;
        group[g] = l;
        cidx[g++] = (int)cJSON_GetObjectItem(it, "case")->valuedouble;
    }
    CHECK(g >= 8 && n_bn >= 4 && n_peft >= 4);
    run_group(L, m, group, cidx, g, "mixed");
    printf("%s: mixed batch of %d sequences (%d bottleneck, %d PEFT) checked\n", model, g, n_bn, n_peft);
    for (int i = 0; i < n_peft; i++) unload(b, &peft[i]);
    cJSON_Delete(base.ref);
    cJSON_Delete(mix);
}

static void run_model(const char *model) {
    char mpath[512], adir[512];
    snprintf(mpath, sizeof mpath, "%s/models/%s", DS_TEST_DATA, model);
    snprintf(adir, sizeof adir, "%s/adapters/bottleneck/%s", DS_TEST_DATA, model);
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
    ds_backend *b = ds_backend_create("cpu", NULL, &err);
    ds_llama_params lp = ds_llama_default_params();
    lp.kv_bytes = (size_t)32 << 20;
    lp.max_blocks_per_seq = AR_BLOCKS_PER_SEQ + 4;
    ds_llama *L = ds_llama_create(m, b, &lp, &err);
    CHECK_MSG(L != NULL, "%s", err.msg);
    static loaded ads[MAX_ADAPTERS];
    int n = 0;
    DIR *d = opendir(adir);
    struct dirent *e;
    while (d && (e = readdir(d)) && n < MAX_ADAPTERS)
        if ((!strncmp(e->d_name, "bn-", 3) || !strncmp(e->d_name, "ah-", 3)) && load_one(adir, e->d_name, m, b, &ads[n]))
            n++;
    if (d) closedir(d);
    CHECK(n >= 5);
    for (int i = 0; i < n; i++) {
        const bool ah_prefix = !strncmp(ads[i].name, "ah-", 3);
        CHECK_EQ_INT(ads[i].a->kind, ah_prefix ? DS_ADAPTER_PREFIX : DS_ADAPTER_BOTTLENECK);
        CHECK(ads[i].a->prefix_pos0 == (ads[i].a->prefix != NULL));
        const cJSON *pt = cJSON_GetObjectItem(ads[i].ref, "peft_type");
        CHECK_MSG(cJSON_IsString(pt) && !strcmp(pt->valuestring, ads[i].a->peft_type), "%s: peft_type %s", ads[i].name,
                  ads[i].a->peft_type);
        const double before = worst_rel;
        worst_rel = 0;
        int nc = cJSON_GetArraySize(cJSON_GetObjectItem(ads[i].ref, "cases"));
        for (int k = 0; k < nc; k++) {
            loaded *one[1] = {&ads[i]};
            run_group(L, m, one, &k, 1, model);
        }
        printf("%s/%s: %d cases, max|diff|/max(1,|logit|) %.3g\n", model, ads[i].name, nc, worst_rel);
        worst_rel = fmax(worst_rel, before);
    }
    for (int i = 0; i < n; i++)
        if (ads[i].a->bn) {
            check_no_op_backend(b, ads[i].a);
            break;
        }
    for (int i = 0; i < n; i++)
        if (!strcmp(ads[i].name, "bn-seq")) check_sparse_slots(L, &ads[i], m->cfg.d_model);
    run_mixed(L, m, b, model, ads, n);
    for (int i = 0; i < n; i++) unload(b, &ads[i]);
    ds_llama_free(L);
    ds_backend_free(b);
    ds_model_free(m);
}

static int argmax(const float *v, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[best]) best = i;
    return best;
}

/* Every (adapter, prompt) of tests/data/adapters/bottleneck/smollm2 as one sequence of one batch,
 * fed its reference tokens; at each step the argmax must be the package's greedy token. */
static void run_smollm2(void) {
    char model_file[600], adir[512];
    const char *mdir = getenv("DS_MODELS_DIR");
    snprintf(model_file, sizeof model_file, "%s/SmolLM2-135M-Instruct.Q4_1.gguf", mdir && *mdir ? mdir : DS_MODELS_DIR);
    snprintf(adir, sizeof adir, "%s/adapters/bottleneck/smollm2", DS_TEST_DATA);
    if (access(model_file, R_OK) || access(adir, R_OK)) {
        printf("skip smollm2: %s or %s missing\n", model_file, adir);
        return;
    }
    ds_err err = {{0}};
    ds_model_params mp = ds_model_default_params();
    mp.verbose = false;
    ds_model *m = ds_model_load(model_file, &mp, &err);
    CHECK_MSG(m != NULL, "%s", err.msg);
    if (!m) return;
    ds_backend *b = ds_backend_create("cpu", NULL, &err);
    ds_llama_params lp = ds_llama_default_params();
    lp.kv_bytes = (size_t)192 << 20; /* ar_ctx gives every sequence its own 36 blocks */
    lp.max_blocks_per_seq = AR_BLOCKS_PER_SEQ + 4;
    ds_llama *L = ds_llama_create(m, b, &lp, &err);
    CHECK_MSG(L != NULL, "%s", err.msg);
    static const char *const names[] = {"bn-seq", "bn-double-seq", "bn-par-scaled", "bn-mam"};
    enum { N_SMOL = sizeof names / sizeof *names };
    static loaded ads[N_SMOL];
    int n = 0;
    for (int i = 0; i < N_SMOL; i++)
        if (load_one(adir, names[i], m, b, &ads[n])) n++;
    ar_ctx c;
    ar_init(&c, L, m);
    const cJSON *cases[AR_MAX_SEQS];
    const char *who[AR_MAX_SEQS];
    int32_t *toks[AR_MAX_SEQS];
    int nt[AR_MAX_SEQS], ns = 0, total = 0, steps = 0;
    for (int i = 0; i < n; i++) {
        const cJSON *it;
        cJSON_ArrayForEach(it, cJSON_GetObjectItem(ads[i].ref, "cases")) {
            ar_add(&c, &ads[i].dev);
            cases[ns] = it;
            who[ns] = ads[i].name;
            toks[ns] = golden_ids(cJSON_GetObjectItem(it, "prompt"), &nt[ns]);
            total += nt[ns];
            int g = cJSON_GetArraySize(cJSON_GetObjectItem(cJSON_GetObjectItem(it, "greedy"), "tokens"));
            if (g > steps) steps = g;
            ns++;
        }
    }
    const int V = m->cfg.n_vocab;
    float *logits = malloc(sizeof(float) * (size_t)total * V);
    CHECK(ar_step(&c, toks, nt, logits) == 0);
    int32_t last_row[AR_MAX_SEQS], off = 0, matched = 0, want_total = 0;
    for (int i = 0; i < ns; i++) last_row[i] = (off += nt[i]) - 1;
    bool live[AR_MAX_SEQS];
    for (int k = 0; k < steps; k++) {
        int32_t dt[AR_MAX_SEQS], *dp[AR_MAX_SEQS];
        int ones[AR_MAX_SEQS];
        for (int i = 0; i < ns; i++) {
            const cJSON *g = cJSON_GetObjectItem(cJSON_GetObjectItem(cases[i], "greedy"), "tokens");
            live[i] = k < cJSON_GetArraySize(g);
            ones[i] = live[i] && k + 1 < cJSON_GetArraySize(g);
            dt[i] = live[i] ? (int32_t)cJSON_GetArrayItem(g, k)->valuedouble : 0;
            dp[i] = &dt[i];
            if (!live[i]) continue;
            want_total++;
            const int got = argmax(logits + (size_t)last_row[i] * V, V);
            CHECK_MSG(got == dt[i], "smollm2 %s %s step %d: token %d, the package's %d", who[i],
                      cJSON_GetObjectItem(cases[i], "kind")->valuestring, k, got, dt[i]);
            matched += got == dt[i];
        }
        bool any = false;
        for (int i = 0, row = 0; i < ns; i++) {
            last_row[i] = ones[i] ? row++ : -1;
            any |= ones[i];
        }
        if (any) CHECK(ar_step(&c, dp, ones, logits) == 0);
    }
    printf("smollm2: %d/%d greedy tokens equal to the package's (%d adapters x %d prompts, one batch)\n", matched,
           want_total, n, n ? ns / n : 0);
    CHECK(n == N_SMOL && matched == want_total && want_total >= 2 * N_SMOL * 8);
    for (int i = 0; i < ns; i++) free(toks[i]);
    free(logits);
    ar_free(&c);
    for (int i = 0; i < n; i++) unload(b, &ads[i]);
    ds_llama_free(L);
    ds_backend_free(b);
    ds_model_free(m);
}

/* Loads tiny-llama/bn-par with its non_linearity replaced by each name of activations.json, then
 * runs the CPU op as a 1-wide identity parallel adapter (o' = act(x)) over the grid. */
static void run_activations(void) {
    char act_file[600], src[600], model_dir[600], cfg_in[700];
    snprintf(act_file, sizeof act_file, "%s/adapters/bottleneck/activations.json", DS_TEST_DATA);
    snprintf(src, sizeof src, "%s/adapters/bottleneck/tiny-llama/bn-par", DS_TEST_DATA);
    snprintf(model_dir, sizeof model_dir, "%s/models/tiny-llama", DS_TEST_DATA);
    snprintf(cfg_in, sizeof cfg_in, "%s/adapter_config.json", src);
    cJSON *acts = golden_load_json(act_file), *cfg = golden_load_json(cfg_in);
    CHECK_MSG(acts && cfg, "%s / %s", act_file, cfg_in);
    ds_err err = {{0}};
    ds_model_params mp = ds_model_default_params();
    mp.verbose = false;
    ds_model *m = acts && cfg ? ds_model_load(model_dir, &mp, &err) : NULL;
    ds_backend *b = m ? ds_backend_create("cpu", NULL, &err) : NULL;
    char dir[] = "/tmp/ds-bn-act-XXXXXX", st_link[64], st_src[700], cfg_out[64];
    if (!b || !mkdtemp(dir)) goto out;
    snprintf(st_link, sizeof st_link, "%s/adapter.safetensors", dir);
    snprintf(cfg_out, sizeof cfg_out, "%s/adapter_config.json", dir);
    snprintf(st_src, sizeof st_src, "%s/adapter.safetensors", src);
    CHECK(symlink(st_src, st_link) == 0);
    const cJSON *xs = cJSON_GetObjectItem(acts, "x"), *it;
    const int n = cJSON_GetArraySize(xs);
    float x[64], o[64], one = 1.0f, zero = 0.0f;
    for (int i = 0; i < n && i < 64; i++) x[i] = (float)cJSON_GetArrayItem(xs, i)->valuedouble;
    int n_names = 0;
    cJSON_ArrayForEach(it, cJSON_GetObjectItem(acts, "y")) {
        cJSON *c = cJSON_GetObjectItem(cfg, "config");
        cJSON_ReplaceItemInObject(c, "non_linearity",
                                  strcmp(it->string, "null") ? cJSON_CreateString(it->string) : cJSON_CreateNull());
        char *txt = cJSON_Print(cfg);
        FILE *f = fopen(cfg_out, "w");
        if (f) fputs(txt, f), fclose(f);
        free(txt);
        ds_adapter *a = ds_adapter_load(dir, m, NULL, &err);
        CHECK_MSG(a != NULL, "non_linearity %s: %s", it->string, err.msg);
        if (!a) continue;
        ds_bn_seg g = {.start = 0, .len = n, .size = 1, .act = a->bn[DS_BN_FFN]->act,
                       .flags = DS_BN_PARALLEL | DS_BN_ADD_X, .scale = 1.0f, .down = &one, .down_b = &zero,
                       .up = &one, .up_b = &zero};
        memset(o, 0, sizeof o);
        const ds_seg_tables tab = {.bn = &g, .n_bn = 1};
        CHECK(b->iface->plan_upload(b->ctx, &tab) == 0);
        CHECK(b->iface->bottleneck(b->ctx, x, o, 1, (ds_seg_range){0, 1}) == 0);
        double worst = 0;
        for (int i = 0; i < n; i++) {
            const double want = cJSON_GetArrayItem(it, i)->valuedouble;
            worst = fmax(worst, fabs(o[i] - want) / fmax(1.0, fabs(want)));
        }
        CHECK_MSG(worst <= 2e-6, "non_linearity %s: max relative error %.3g", it->string, worst);
        ds_adapter_free(a);
        n_names++;
    }
    printf("activations: %d non_linearity names equal to the package's (grid of %d inputs)\n", n_names, n);
    CHECK(n_names >= 20);
    unlink(st_link);
    unlink(cfg_out);
    rmdir(dir);
out:
    ds_backend_free(b);
    ds_model_free(m);
    cJSON_Delete(acts);
    cJSON_Delete(cfg);
}

/* Any of the '|'-separated words of `expect` in msg, case-insensitively. */
static bool msg_matches(const char *msg, const char *expect) {
    char buf[256];
    snprintf(buf, sizeof buf, "%s", expect);
    for (char *save = NULL, *w = strtok_r(buf, "|", &save); w; w = strtok_r(NULL, "|", &save))
        if (strcasestr(msg, w)) return true;
    return false;
}

static void run_bad(void) {
    char root[512], man[600];
    snprintf(root, sizeof root, "%s/adapters/bottleneck/bad", DS_TEST_DATA);
    snprintf(man, sizeof man, "%s/manifest.json", root);
    cJSON *doc = golden_load_json(man);
    CHECK_MSG(doc != NULL, "%s", man);
    if (!doc) return;
    ds_model *models[2] = {0};
    const char *names[2] = {"tiny-llama", "tiny-qwen2"};
    int n = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, cJSON_GetObjectItem(doc, "cases")) {
        const char *cs = cJSON_GetObjectItem(it, "case")->valuestring;
        const char *bs = cJSON_GetObjectItem(it, "base")->valuestring;
        const char *ex = cJSON_GetObjectItem(it, "expect")->valuestring;
        int mi = strcmp(bs, names[0]) ? 1 : 0;
        if (!models[mi]) {
            char mp[600];
            snprintf(mp, sizeof mp, "%s/models/%s", DS_TEST_DATA, names[mi]);
            ds_model_params p = ds_model_default_params();
            p.verbose = false;
            ds_err err = {{0}};
            models[mi] = ds_model_load(mp, &p, &err);
            CHECK_MSG(models[mi] != NULL, "%s", err.msg);
            if (!models[mi]) continue;
        }
        char path[700];
        snprintf(path, sizeof path, "%s/%s", root, cs);
        ds_err err = {{0}};
        ds_adapter *a = ds_adapter_load(path, models[mi], NULL, &err);
        CHECK_MSG(a == NULL, "bad/%s loaded", cs);
        CHECK_MSG(msg_matches(err.msg, ex), "bad/%s: message '%s' does not match '%s'", cs, err.msg, ex);
        ds_adapter_free(a);
        n++;
    }
    printf("bad: %d malformed or unsupported directories refused\n", n);
    CHECK(n >= 15);
    for (int i = 0; i < 2; i++) ds_model_free(models[i]);
    cJSON_Delete(doc);
}

int main(void) {
    run_model("tiny-llama");
    run_model("tiny-qwen2");
    run_bad();
    run_activations();
    run_smollm2();
    if (ds_test_checks == 0) SKIP("no golden data under %s/adapters/bottleneck (tests/golden/gen_bottleneck.py)", DS_TEST_DATA);
    printf("worst max|diff|/max(1,|logit|) over every bottleneck row: %.3g\n", worst_rel);
    return ds_test_result();
}
