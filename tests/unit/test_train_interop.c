/* Publishing trained adapters: train a few steps → ds_trainer_save (PEFT directory) →
 * ds_adapter_load: every tensor round-trips bit for bit and every LoRA scale within 1e-6; the
 * reloaded adapter run through the SERVING path (ds_llama + resident adapter) gives the loss
 * ds_trainer_eval reports (training forward == serving forward, 1e-5 relative); the config carries
 * the PEFT fields PEFT needs (GQA prefix: num_attention_heads = n_kv_head, token_dim = kv width).
 *
 * With DS_TRAIN_INTEROP_DIR=DIR the adapters stay in DIR/<case>/ with deltaserve_logits.json, for
 *   python3 tests/golden/gen_train.py --verify-interop DIR
 * (HF PEFT loads each adapter and must reproduce deltaserve's logits). */
#include "adapter_run.h"
#include "ds/train.h"
#include "ds_test.h"
#include "golden.h"
#include "train_golden.h"

#include <dirent.h>
#include <sys/stat.h>

#define N_TOK 12

typedef struct icase {
    const char *name, *model;
    ds_train_adapter_spec spec;
    const char *from;       /* continue from this test adapter instead of spec */
    bool from_rslora;
    float from_alpha;
} icase;

static const int32_t toks[2][N_TOK] = {{5, 77, 140, 3, 250, 19, 64, 311, 128, 42, 7, 199},
                                       {300, 12, 8, 91, 160, 33, 275, 4, 58, 222, 17, 90}};

static bool same_module(const ds_lora_module *a, const ds_lora_module *b) {
    if (!a || !b) return a == b;
    return a->rank == b->rank && a->in == b->in && a->out == b->out &&
           fabsf(a->scale - b->scale) <= 1e-6f * fabsf(a->scale) &&
           !memcmp(a->A, b->A, (size_t)a->rank * a->in * sizeof(float)) &&
           !memcmp(a->B, b->B, (size_t)a->out * a->rank * sizeof(float)) && !b->bias_B && !b->dora_scale;
}

static void check_roundtrip(const ds_adapter *a, const ds_adapter *b, const char *cs) {
    CHECK_MSG(a->kind == b->kind && a->n_virtual == b->n_virtual, "%s: kind / virtual tokens differ", cs);
    for (size_t i = 0; a->lora && i < (size_t)a->n_layer * DS_PROJ_COUNT; i++)
        CHECK_MSG(b->lora && same_module(a->lora[i], b->lora[i]), "%s: LoRA module %zu differs after reload", cs, i);
    CHECK_MSG(same_module(a->lm_head, b->lm_head), "%s: lm_head LoRA differs after reload", cs);
    CHECK_MSG(same_module(a->embed, b->embed), "%s: embed_tokens LoRA differs after reload", cs);
    if (a->prompt)
        CHECK_MSG(b->prompt && !memcmp(a->prompt, b->prompt, (size_t)a->n_virtual * a->d_model * sizeof(float)),
                  "%s: prompt rows differ after reload", cs);
    if (a->prefix)
        CHECK_MSG(b->prefix && b->prefix_row == a->prefix_row &&
                      !memcmp(a->prefix, b->prefix, (size_t)a->n_virtual * a->n_layer * 2 * a->prefix_row * 4),
                  "%s: prefix differs after reload", cs);
}

/* Mean CE of toks[0][1..] from the serving forward's logits of the reloaded adapter. */
static double serving_loss(const ds_model *m, const ds_adapter *a, float *logits) {
    ds_err err = {{0}};
    ds_backend *b = ds_backend_create("cpu", NULL, &err);
    ds_llama_params lp = ds_llama_default_params();
    lp.kv_bytes = (size_t)8 << 20;
    lp.max_blocks_per_seq = AR_BLOCKS_PER_SEQ + 4;
    ds_llama *L = ds_llama_create(m, b, &lp, &err);
    ds_adapter_dev dev;
    double loss = NAN;
    if (L && ds_adapter_dev_upload(b, a, &dev, &err) == 0) {
        ar_ctx c;
        ar_init(&c, L, m);
        ar_add(&c, &dev);
        int32_t *tp[1] = {(int32_t *)toks[0]};
        int n[1] = {N_TOK};
        if (ar_step(&c, tp, n, logits) == 0) {
            const int V = m->cfg.n_vocab;
            loss = 0;
            for (int i = 1; i < N_TOK; i++) {
                const float *z = logits + (size_t)(i - 1) * V;
                double mx = z[0], s = 0;
                for (int j = 1; j < V; j++) mx = fmax(mx, z[j]);
                for (int j = 0; j < V; j++) s += exp(z[j] - mx);
                loss += mx + log(s) - z[toks[0][i]];
            }
            loss /= N_TOK - 1;
        }
        ar_free(&c);
        ds_adapter_dev_release(b, &dev);
    }
    CHECK_MSG(L != NULL, "%s", err.msg);
    ds_llama_free(L);
    ds_backend_free(b);
    return loss;
}

static void check_config(const char *dir, const ds_model *m, const ds_adapter *a, const char *cs) {
    char path[800];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    cJSON *c = golden_load_json(path);
    CHECK_MSG(c != NULL, "%s: unreadable", path);
    if (!c) return;
    const char *pt = cJSON_GetStringValue(cJSON_GetObjectItem(c, "peft_type"));
    CHECK_MSG(pt && !strcmp(pt, a->kind == DS_ADAPTER_LORA     ? "LORA"
                                : a->kind == DS_ADAPTER_PREFIX ? "PREFIX_TUNING"
                                                               : "PROMPT_TUNING"),
              "%s: peft_type %s", cs, pt ? pt : "(none)");
    CHECK(!strcmp(cJSON_GetStringValue(cJSON_GetObjectItem(c, "task_type")), "CAUSAL_LM"));
    if (a->kind == DS_ADAPTER_PREFIX) {
        CHECK_EQ_INT(cJSON_GetObjectItem(c, "num_attention_heads")->valuedouble, m->cfg.n_kv_head);
        CHECK_EQ_INT(cJSON_GetObjectItem(c, "token_dim")->valuedouble, m->cfg.n_kv_head * m->cfg.head_dim);
        CHECK_EQ_INT(cJSON_GetObjectItem(c, "num_layers")->valuedouble, m->cfg.n_layer);
    } else if (a->kind == DS_ADAPTER_PROMPT) {
        CHECK_EQ_INT(cJSON_GetObjectItem(c, "token_dim")->valuedouble, m->cfg.d_model);
        CHECK_EQ_INT(cJSON_GetObjectItem(c, "num_virtual_tokens")->valuedouble, a->n_virtual);
    } else {
        CHECK(cJSON_IsArray(cJSON_GetObjectItem(c, "target_modules")));
        CHECK(cJSON_IsNumber(cJSON_GetObjectItem(c, "r")) && cJSON_IsNumber(cJSON_GetObjectItem(c, "lora_alpha")));
    }
    cJSON_Delete(c);
}

static void write_logits(const char *dir, const char *model, const float *logits, int V) {
    char path[800];
    snprintf(path, sizeof path, "%s/deltaserve_logits.json", dir);
    FILE *f = fopen(path, "w");
    CHECK_MSG(f != NULL, "%s", path);
    if (!f) return;
    fprintf(f, "{\"base\": \"%s/models/%s\",\n \"prompt\": [", DS_TEST_DATA, model);
    for (int i = 0; i < N_TOK; i++) fprintf(f, "%s%d", i ? "," : "", toks[0][i]);
    fprintf(f, "],\n \"logits\": [\n");
    for (int i = 0; i < N_TOK; i++) {
        fprintf(f, "  [");
        for (int j = 0; j < V; j++) fprintf(f, "%s%.9g", j ? "," : "", logits[(size_t)i * V + j]);
        fprintf(f, "]%s\n", i + 1 < N_TOK ? "," : "");
    }
    fprintf(f, " ]}\n");
    fclose(f);
}

static void remove_dir(const char *dir) {
    DIR *d = opendir(dir);
    struct dirent *e;
    char path[1200];
    while (d && (e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            remove(path);
        }
    if (d) closedir(d);
    rmdir(dir);
}

static ds_trainer *make_trainer(const ds_model *m, const icase *ic) {
    ds_err err = {{0}};
    ds_train_params p = ds_train_default_params();
    p.lr = 1e-2f;
    p.micro_batch_tokens = 32;
    p.micro_batch_seqs = 1;
    p.warmup_steps = 1;
    p.total_steps = 4;
    p.schedule = DS_LR_COSINE;
    p.weight_decay = 0.01f;
    if (!ic->from) {
        ds_trainer *t = ds_trainer_create(m, &ic->spec, &p, &err);
        CHECK_MSG(t != NULL, "%s: %s", ic->name, err.msg);
        return t;
    }
    char path[600];
    snprintf(path, sizeof path, "%s/adapters/%s/%s", DS_TEST_DATA, ic->model, ic->from);
    ds_adapter *a = ds_adapter_load(path, m, NULL, &err);
    ds_trainer *t = a ? ds_trainer_create_from(m, a, ic->from_rslora, ic->from_alpha, &p, &err) : NULL;
    CHECK_MSG(t != NULL, "%s: %s", ic->name, err.msg);
    ds_adapter_free(a);
    return t;
}

static void run_case(const icase *ic, const char *keep_dir) {
    ds_model *m = tg_load_model(ic->model);
    ds_trainer *t = m ? make_trainer(m, ic) : NULL;
    if (!t) {
        ds_model_free(m);
        return;
    }
    ds_err err = {{0}};
    ds_train_example ex[2] = {{toks[0], NULL, N_TOK}, {toks[1], NULL, N_TOK}};
    ds_train_stats s;
    for (int k = 0; k < 4; k++) CHECK_MSG(ds_trainer_step(t, ex, 2, &s, &err) == 0, "%s: %s", ic->name, err.msg);
    char dir[700];
    if (keep_dir) {
        mkdir(keep_dir, 0755);
        snprintf(dir, sizeof dir, "%s/%s", keep_dir, ic->name);
    } else {
        snprintf(dir, sizeof dir, "%s/train-interop-XXXXXX", DS_BUILD_DIR);
        CHECK(mkdtemp(dir) != NULL);
    }
    char base[600];
    snprintf(base, sizeof base, "%s/models/%s", DS_TEST_DATA, ic->model);
    CHECK_MSG(ds_trainer_save(t, dir, base, &err) == 0, "%s: save: %s", ic->name, err.msg);
    ds_adapter *back = ds_adapter_load(dir, m, NULL, &err);
    CHECK_MSG(back != NULL, "%s: reload: %s", ic->name, err.msg);
    if (back) {
        check_roundtrip(ds_trainer_adapter(t), back, ic->name);
        check_config(dir, m, back, ic->name);
        /* the serving forward of the reloaded adapter vs the training forward */
        int32_t labels[N_TOK];
        memcpy(labels, toks[0], sizeof labels);
        labels[0] = DS_TRAIN_IGNORE_INDEX; /* prompt tuning: no loss on the last virtual row */
        ds_train_example one = {toks[0], labels, N_TOK};
        CHECK(ds_trainer_eval(t, &one, 1, &s, &err) == 0);
        float *logits = malloc(sizeof(float) * N_TOK * (size_t)m->cfg.n_vocab);
        const double served = serving_loss(m, back, logits);
        CHECK_MSG(fabs(served - s.loss) <= 1e-5 * fabs(s.loss), "%s: serving loss %.9g vs training loss %.9g",
                  ic->name, served, s.loss);
        printf("%s: 4 steps, loss %.6f; reloaded adapter served loss %.6f (|Δ| %.2g)\n", ic->name, s.loss, served,
               fabs(served - s.loss));
        if (keep_dir) write_logits(dir, ic->model, logits, m->cfg.n_vocab);
        free(logits);
    }
    ds_adapter *snap = ds_trainer_snapshot(t, "snap", &err);
    if (snap) check_roundtrip(ds_trainer_adapter(t), snap, "snapshot");
    ds_adapter_free(snap);
    ds_adapter_free(back);
    if (!keep_dir) remove_dir(dir);
    ds_trainer_free(t);
    ds_model_free(m);
}

static void test_refused_save(void) {
    ds_model *m = tg_load_model("tiny-llama");
    char path[600];
    snprintf(path, sizeof path, "%s/adapters/tiny-llama/ia3", DS_TEST_DATA);
    ds_err err = {{0}};
    ds_adapter *a = m ? ds_adapter_load(path, m, NULL, &err) : NULL;
    if (a) CHECK(ds_peft_save(a, m, DS_BUILD_DIR "/never-written", NULL, &err) == DS_EUNSUPPORTED);
    ds_adapter_free(a);
    ds_model_free(m);
}

int main(void) {
    const char *keep = getenv("DS_TRAIN_INTEROP_DIR");
    ds_train_adapter_spec lora = ds_train_default_spec(DS_ADAPTER_LORA);
    lora.r = 4;
    lora.lora_alpha = 8;
    lora.use_rslora = true;
    lora.targets = DS_TRAIN_TARGET_ALL_LINEAR | DS_TRAIN_TARGET_LM_HEAD | DS_TRAIN_TARGET_EMBED;
    lora.seed = 1;
    ds_train_adapter_spec qkv = ds_train_default_spec(DS_ADAPTER_LORA);
    qkv.r = 2;
    qkv.lora_alpha = 4;
    qkv.targets = DS_TRAIN_TARGET(DS_PROJ_Q) | DS_TRAIN_TARGET(DS_PROJ_K) | DS_TRAIN_TARGET(DS_PROJ_V);
    ds_train_adapter_spec prompt = ds_train_default_spec(DS_ADAPTER_PROMPT);
    prompt.n_virtual = 4;
    ds_train_adapter_spec prefix = ds_train_default_spec(DS_ADAPTER_PREFIX);
    prefix.n_virtual = 3;
    const icase cases[] = {
        {"lora-rslora-all-head-embed", "tiny-llama", lora, NULL, false, 0},
        {"lora-qkv-qwen2", "tiny-qwen2", qkv, NULL, false, 0},
        {"prompt-tuning", "tiny-llama", prompt, NULL, false, 0},
        {"prefix-tuning", "tiny-llama", prefix, NULL, false, 0},
        /* rank_pattern / alpha_pattern / rsLoRA from the PEFT test adapter */
        {"continue-lora-all", "tiny-llama", lora, "lora-all", true, 8.0f},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_case(&cases[i], keep);
    test_refused_save();
    return ds_test_result();
}
