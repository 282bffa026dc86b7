/* The real default model, SmolLM2-135M-Instruct (Q4_1 GGUF), against transformers loading the same
 * GGUF (dequantised, fp32): exact prompt token ids (incl. the chat template), logits at every
 * prompt position (top-20 and 64 probe ids) within 1e-3 · max(1, max|logit|), and the greedy
 * continuation through the ENGINE equal to HF's generate() up to the first near-tie (margin below
 * the tolerance). PEFT LoRA adapters made on this model give PEFT's greedy continuation too.
 * Skips (printing why) when models/ lacks the GGUF — scripts/fetch_model.sh fetches it.
 * Runs on every available backend: the CPU against HF, CUDA against the CPU (parity.h: logits
 * within 2e-2 · max(1, max|logit|); greedy continuations through the engine token for token up to
 * the first step whose HF top-2 margin is below GREEDY_MARGIN_CUDA). $DS_MODELS_DIR and
 * $DS_TEST_DATA override the paths compiled in. */
#include "adapter_run.h"
#include "ds/engine.h"
#include "ds_test.h"
#include "golden.h"
#include "parity.h"

#include <pthread.h>

#define MODEL_NAME "SmolLM2-135M-Instruct.Q4_1.gguf"
#define REL_TOL 1e-3
/* bf16 weights move SmolLM2's logits (range ~±25) by ~0.1: closer calls are not compared. */
#define GREEDY_MARGIN_CUDA 0.25

static parity P; /* the CPU run records, later backends compare */

static void check_prompt_ids(const ds_model *m, const cJSON *c) {
    const char *kind = cJSON_GetObjectItem(c, "kind")->valuestring, *text = cJSON_GetObjectItem(c, "text")->valuestring;
    const bool chat = !strcmp(kind, "chat");
    int n_ref;
    int32_t *ref = golden_ids(cJSON_GetObjectItem(c, "prompt"), &n_ref);
    int32_t *ids = NULL;
    size_t n = 0;
    CHECK(ds_tokenizer_encode(m->tok, text, strlen(text), !chat, chat, &ids, &n) == 0);
    bool same = (int)n == n_ref && !memcmp(ids, ref, n * sizeof *ids);
    CHECK_MSG(same, "%s: prompt ids differ from HF (%zu vs %d tokens)", kind, n, n_ref);
    if (chat) { /* the chat text itself must be what our template renders */
        ds_chat_msg msg = {"user", "What is 2+2?"};
        char *def = ds_chat_default_system(m->chat_template), *out = NULL;
        CHECK(ds_chat_render(ds_chat_detect(m->chat_template), &msg, 1, true, def, &out) == 0);
        CHECK_MSG(out && !strcmp(out, text), "chat template renders differently:\n%s", out ? out : "(null)");
        free(def);
        free(out);
    }
    free(ids);
    free(ref);
}

/* Prefill logits at every position: top-20 ids/values and the probe ids. */
static void check_logits(ds_llama *L, const ds_model *m, const cJSON *probe, const cJSON *c) {
    const int V = m->cfg.n_vocab;
    int n;
    int32_t *prompt = golden_ids(cJSON_GetObjectItem(c, "prompt"), &n);
    float *logits = malloc(sizeof(float) * (size_t)n * V);
    ar_ctx ctx;
    ar_init(&ctx, L, m);
    ar_add(&ctx, NULL);
    CHECK(ar_step(&ctx, &prompt, &n, logits) == 0);
    double worst = 0;
    int p = 0;
    const cJSON *pos;
    cJSON_ArrayForEach(pos, cJSON_GetObjectItem(c, "positions")) {
        const float *row = logits + (size_t)p++ * V;
        char key[128];
        snprintf(key, sizeof key, "%s pos %d", cJSON_GetObjectItem(c, "kind")->valuestring, p - 1);
        parity_row(&P, key, row, V);
        if (!P.record) continue;
        const double tol = REL_TOL * fmax(1.0, cJSON_GetObjectItem(pos, "max_abs_logit")->valuedouble);
        const cJSON *pair, *val;
        cJSON_ArrayForEach(pair, cJSON_GetObjectItem(pos, "top20")) {
            int id = (int)cJSON_GetArrayItem(pair, 0)->valuedouble;
            double d = fabs(row[id] - cJSON_GetArrayItem(pair, 1)->valuedouble);
            worst = fmax(worst, d / tol);
            CHECK_MSG(d <= tol, "%s pos %d top id %d: %.5f vs %.5f", cJSON_GetObjectItem(c, "kind")->valuestring,
                      p - 1, id, row[id], cJSON_GetArrayItem(pair, 1)->valuedouble);
        }
        int k = 0;
        cJSON_ArrayForEach(val, cJSON_GetObjectItem(pos, "probe_logits")) {
            int id = (int)cJSON_GetArrayItem(probe, k++)->valuedouble;
            double d = fabs(row[id] - val->valuedouble);
            worst = fmax(worst, d / tol);
            CHECK_MSG(d <= tol, "probe id %d: %.5f vs %.5f", id, row[id], val->valuedouble);
        }
    }
    if (P.record)
        printf("%-8s %3d positions: worst |diff| = %.3f of the tolerance\n", cJSON_GetObjectItem(c, "kind")->valuestring,
               n, worst);
    ar_free(&ctx);
    free(logits);
    free(prompt);
}

/* ---- greedy through the engine ---- */
typedef struct run {
    int32_t toks[64];
    int n;
    char text[1024];
    size_t len;
    bool done;
    pthread_mutex_t mu;
    pthread_cond_t cv;
} run;

static void on_ev(const ds_gen_event *ev) {
    run *r = ev->user;
    pthread_mutex_lock(&r->mu);
    if (ev->type == DS_EV_TOKEN) {
        if (ev->token >= 0 && r->n < 64) r->toks[r->n++] = ev->token;
        if (r->len + ev->text_len < sizeof r->text) {
            memcpy(r->text + r->len, ev->text, ev->text_len);
            r->len += ev->text_len;
        }
    } else {
        r->done = true;
        pthread_cond_signal(&r->cv);
    }
    pthread_mutex_unlock(&r->mu);
}

static void engine_greedy(ds_engine *e, const int32_t *prompt, int n, const char *adapter, int max_new, run *r) {
    memset(r, 0, sizeof *r);
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    ds_gen_request q = ds_gen_request_default();
    q.prompt = prompt;
    q.n_prompt = (size_t)n;
    q.max_tokens = max_new;
    q.adapter = adapter;
    q.sampling.temperature = 0;
    q.on_event = on_ev;
    q.user = r;
    ds_err err = {{0}};
    int st;
    if (!ds_engine_submit(e, &q, NULL, &st, &err)) {
        CHECK_MSG(0, "submit: %s", err.msg);
        return;
    }
    pthread_mutex_lock(&r->mu);
    while (!r->done) pthread_cond_wait(&r->cv, &r->mu);
    pthread_mutex_unlock(&r->mu);
}

/* Our greedy tokens must equal HF's up to the first step whose top-2 margin is below tolerance
 * (CPU), or the CPU's up to the first step whose margin is below GREEDY_MARGIN_CUDA (others). */
static void compare_greedy(const char *what, const run *r, const cJSON *greedy) {
    const cJSON *toks = cJSON_GetObjectItem(greedy, "tokens"), *margins = cJSON_GetObjectItem(greedy, "margins");
    int n = cJSON_GetArraySize(toks), checked = 0;
    if (!P.record) {
        int upto = 0;
        while (upto < n && !(margins && cJSON_GetArrayItem(margins, upto)->valuedouble < GREEDY_MARGIN_CUDA)) upto++;
        parity_tokens(&P, what, r->toks, r->n, upto);
        printf("%s on %s: %d greedy tokens compared with the cpu: \"%.*s\"\n", what, P.backend, upto, (int)r->len, r->text);
        return;
    }
    parity_tokens(&P, what, r->toks, r->n, n);
    for (int i = 0; i < n; i++) {
        if (margins && cJSON_GetArrayItem(margins, i)->valuedouble < 0.05) break; /* near-tie: order is noise */
        int want = (int)cJSON_GetArrayItem(toks, i)->valuedouble;
        CHECK_MSG(i < r->n && r->toks[i] == want, "%s: greedy token %d is %d, HF %d", what, i, i < r->n ? r->toks[i] : -1, want);
        checked++;
    }
    printf("%s: %d greedy tokens match HF: \"%.*s\"\n", what, checked, (int)r->len, r->text);
}

static void run_engine_cases(const ds_model *m, const cJSON *cases, ds_adapter_registry *reg) {
    ds_engine_params ep = ds_engine_default_params();
    ep.backend = P.backend;
    ep.max_ctx = 512;
    ep.kv_cache_bytes = (size_t)64 << 20;
    ep.registry = reg;
    ds_err err = {{0}};
    ds_engine *e = ds_engine_create(m, &ep, &err);
    CHECK_MSG(e != NULL, "%s", err.msg);
    if (!e) return;
    const cJSON *c;
    cJSON_ArrayForEach(c, cases) {
        int n;
        int32_t *prompt = golden_ids(cJSON_GetObjectItem(c, "prompt"), &n);
        const cJSON *g = cJSON_GetObjectItem(c, "greedy");
        run r;
        engine_greedy(e, prompt, n, NULL, cJSON_GetArraySize(cJSON_GetObjectItem(g, "tokens")), &r);
        compare_greedy(cJSON_GetObjectItem(c, "kind")->valuestring, &r, g);
        if (!strcmp(cJSON_GetObjectItem(c, "kind")->valuestring, "plain"))
            CHECK_MSG(!strncmp(r.text, " Paris", 6), "\"The capital of France is\" continued with \"%.*s\"", (int)r.len, r.text);
        free(prompt);
    }
    ds_engine_free(e);
}

/* PEFT adapters trained on SmolLM2: same greedy continuation as PEFT, through the engine. */
static void run_adapters(const ds_model *m) {
    char root[512];
    snprintf(root, sizeof root, "%s/adapters/smollm2", parity_data_dir());
    if (access(root, R_OK)) return;
    ds_err err = {{0}};
    ds_adapter_registry *reg = ds_registry_create(m, root, &err);
    CHECK_MSG(reg != NULL, "%s", err.msg);
    if (!reg) return;
    int n_loaded = ds_registry_scan(reg);
    CHECK(n_loaded >= 1);
    ds_engine_params ep = ds_engine_default_params();
    ep.max_ctx = 512;
    ep.kv_cache_bytes = (size_t)64 << 20;
    ep.registry = reg;
    ep.backend = P.backend;
    ds_engine *e = ds_engine_create(m, &ep, &err);
    CHECK_MSG(e != NULL, "%s: engine: %s", P.backend, err.msg);
    ds_adapter_info *info = NULL;
    size_t n_info = 0;
    ds_registry_list(reg, &info, &n_info);
    for (size_t i = 0; i < n_info && e; i++) {
        char ref[1024];
        snprintf(ref, sizeof ref, "%s/%s/reference.json", root, info[i].name);
        cJSON *j = golden_load_json(ref);
        if (!j) continue;
        const cJSON *c;
        cJSON_ArrayForEach(c, cJSON_GetObjectItem(j, "cases")) {
            int n;
            int32_t *prompt = golden_ids(cJSON_GetObjectItem(c, "prompt"), &n);
            const cJSON *g = cJSON_GetObjectItem(c, "greedy");
            run r;
            engine_greedy(e, prompt, n, info[i].name, cJSON_GetArraySize(cJSON_GetObjectItem(g, "tokens")), &r);
            char what[300];
            snprintf(what, sizeof what, "adapter %s / %s", info[i].name, cJSON_GetObjectItem(c, "kind")->valuestring);
            compare_greedy(what, &r, g);
            free(prompt);
        }
        cJSON_Delete(j);
    }
    free(info);
    ds_engine_free(e);
    ds_registry_free(reg);
}

int main(void) {
    char model_file[1024], ref_file[1024];
    const char *mdir = getenv("DS_MODELS_DIR");
    snprintf(model_file, sizeof model_file, "%s/%s", mdir && *mdir ? mdir : DS_MODELS_DIR, MODEL_NAME);
    snprintf(ref_file, sizeof ref_file, "%s/models/smollm2/reference.json", parity_data_dir());
    if (access(model_file, R_OK)) SKIP("%s not found (scripts/fetch_model.sh fetches it)", model_file);
    cJSON *ref = golden_load_json(ref_file);
    if (!ref) SKIP("no SmolLM2 reference (tests/golden/gen_models.py)");
    ds_err err = {{0}};
    ds_model_params mp = ds_model_default_params();
    mp.verbose = false;
    ds_model *m = ds_model_load(model_file, &mp, &err);
    CHECK_MSG(m != NULL && m->tok != NULL, "%s", err.msg);
    if (!m) return ds_test_result();
    ds_backend *bs[2];
    const int nb = parity_backends(bs, 2);
    const cJSON *cases = cJSON_GetObjectItem(ref, "cases"), *c;
    for (int i = 0; i < nb; i++) {
        parity_begin(&P, bs[i]);
        ds_llama_params lp = ds_llama_default_params();
        lp.kv_bytes = (size_t)64 << 20;
        lp.max_blocks_per_seq = AR_BLOCKS_PER_SEQ + 4;
        ds_llama *L = ds_llama_create(m, bs[i], &lp, &err);
        CHECK_MSG(L != NULL, "%s: llama_create: %s", P.backend, err.msg);
        cJSON_ArrayForEach(c, cases) {
            if (P.record) check_prompt_ids(m, c);
            if (L) check_logits(L, m, cJSON_GetObjectItem(ref, "probe_ids"), c);
        }
        ds_llama_free(L);
        /* the engine makes its own backend of the same kind: free this one's memory first
         * (P.backend points into the iface table, which is static) */
        ds_backend_free(bs[i]);
        run_engine_cases(m, cases, NULL);
        run_adapters(m);
        parity_report(&P, "smollm2");
    }
    parity_free(&P);
    cJSON_Delete(ref);
    ds_model_free(m);
    return ds_test_result();
}
