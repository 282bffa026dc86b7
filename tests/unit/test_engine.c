/* The engine on tiny golden models: greedy results independent of batching and of preemption
 * (a KV cache too small for the load), cancellation, request validation, and adapters through the
 * registry — hot swap (running sequences keep the old version, new ones see the new one), unload
 * while running (drain; new requests get DS_ENOTFOUND), LRU eviction under a slot limit, and
 * memory back to its baseline afterwards; the policies submit owns (max_tokens 0, the adapter it
 * resolved and its version). */
#include "ds/adapter.h"
#include "ds/engine.h"
#include "ds_test.h"
#include "golden.h"

#include <pthread.h>
#include <time.h>

typedef struct run {
    int32_t toks[256];
    int n;
    ds_finish_reason finish;
    int status;
    bool done;
    uint64_t id;
} run;

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;

static void on_ev(const ds_gen_event *ev) {
    run *r = ev->user;
    pthread_mutex_lock(&g_mu);
    if (ev->type == DS_EV_TOKEN && ev->token >= 0 && r->n < 256) r->toks[r->n++] = ev->token;
    if (ev->type != DS_EV_TOKEN) {
        r->finish = ev->finish;
        r->status = ev->status;
        r->done = true;
        pthread_cond_broadcast(&g_cv);
    }
    pthread_mutex_unlock(&g_mu);
}

static uint64_t submit(ds_engine *e, const int32_t *prompt, int n, int max_tokens, const char *adapter, run *r,
                       int *status) {
    memset(r, 0, sizeof *r);
    ds_gen_request q = ds_gen_request_default();
    q.prompt = prompt;
    q.n_prompt = (size_t)n;
    q.max_tokens = max_tokens;
    q.adapter = adapter;
    q.sampling.temperature = 0;
    q.on_event = on_ev;
    q.user = r;
    ds_err err = {{0}};
    int st = 0;
    r->id = ds_engine_submit(e, &q, NULL, &st, &err);
    if (status) *status = st;
    return r->id;
}

static void wait_all(run *rs, int n) {
    pthread_mutex_lock(&g_mu);
    for (int i = 0; i < n; i++)
        while (!rs[i].done) pthread_cond_wait(&g_cv, &g_mu);
    pthread_mutex_unlock(&g_mu);
}

/* Stats are a per-step snapshot taken after the step's events: poll briefly for the engine to
 * publish the state that follows the last final event. */
static void settled_stats(ds_engine *e, ds_engine_stats *st) {
    for (int i = 0; i < 200; i++) {
        ds_engine_stats_get(e, st);
        if (st->n_running == 0 && st->n_waiting == 0 && st->kv_blocks_used == 0) return;
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

static ds_engine *make_engine(const ds_model *m, size_t kv_bytes, int max_adapters, ds_adapter_registry *reg) {
    ds_engine_params ep = ds_engine_default_params();
    ep.kv_cache_bytes = kv_bytes;
    ep.max_batch_tokens = 64; /* forces chunked prefill of longer prompts too */
    ep.max_adapters = max_adapters;
    ep.registry = reg;
    ds_err err = {{0}};
    ds_engine *e = ds_engine_create(m, &ep, &err);
    CHECK_MSG(e != NULL, "%s", err.msg);
    return e;
}

/* Golden greedy tokens of a reference case (the 4 decode tokens). */
static int golden_tokens(const cJSON *c, int32_t *out) {
    int n = 0;
    const cJSON *st;
    cJSON_ArrayForEach(st, cJSON_GetObjectItem(c, "decode")) out[n++] = (int32_t)cJSON_GetObjectItem(st, "token")->valuedouble;
    return n;
}

static void test_batching(const ds_model *m, const cJSON *ref) {
    ds_engine *e = make_engine(m, (size_t)4 << 20, 4, NULL);
    const cJSON *cases = cJSON_GetObjectItem(ref, "cases");
    int nc = cJSON_GetArraySize(cases);
    run rs[3][4];
    int32_t *prompts[3];
    int np[3];
    for (int c = 0; c < nc && c < 3; c++) prompts[c] = golden_ids(cJSON_GetObjectItem(cJSON_GetArrayItem(cases, c), "prompt"), &np[c]);
    for (int k = 0; k < 4; k++) /* 4 copies of every case at once */
        for (int c = 0; c < nc && c < 3; c++) submit(e, prompts[c], np[c], 4, NULL, &rs[c][k], NULL);
    for (int c = 0; c < nc && c < 3; c++) {
        wait_all(rs[c], 4);
        int32_t want[8];
        int nw = golden_tokens(cJSON_GetArrayItem(cases, c), want);
        for (int k = 0; k < 4; k++) {
            CHECK_EQ_INT(rs[c][k].n, nw);
            CHECK(rs[c][k].finish == DS_FINISH_LENGTH);
            CHECK_MSG(!memcmp(rs[c][k].toks, want, sizeof(int32_t) * (size_t)nw), "case %d copy %d: tokens differ", c, k);
        }
        free(prompts[c]);
    }
    ds_engine_free(e);
}

/* Long generations in a cache that cannot hold them all: preemption must not change results. */
static void test_preemption(const ds_model *m) {
    int32_t prompt[6][12];
    for (int i = 0; i < 6; i++)
        for (int j = 0; j < 12; j++) prompt[i][j] = (7 * i + 13 * j + 1) % m->cfg.n_vocab;
    run alone[6], crowded[6];
    ds_engine *big = make_engine(m, (size_t)8 << 20, 4, NULL);
    for (int i = 0; i < 6; i++) {
        submit(big, prompt[i], 12, 100, NULL, &alone[i], NULL);
        wait_all(&alone[i], 1);
    }
    ds_engine_free(big);
    /* 16 tokens/block × 2 kv heads × 16 dims × 4 B × (K+V) × 2 layers = 8 KiB per block: 14 blocks */
    ds_engine *small = make_engine(m, (size_t)14 * 8192, 4, NULL);
    for (int i = 0; i < 6; i++) submit(small, prompt[i], 12, 100, NULL, &crowded[i], NULL);
    wait_all(crowded, 6);
    ds_engine_stats st;
    settled_stats(small, &st);
    CHECK_MSG(st.n_preemptions > 0, "expected preemptions with %d blocks", st.kv_blocks_total);
    for (int i = 0; i < 6; i++) {
        CHECK_EQ_INT(crowded[i].n, 100);
        CHECK_MSG(!memcmp(alone[i].toks, crowded[i].toks, 100 * sizeof(int32_t)), "request %d changed under preemption", i);
    }
    CHECK_EQ_INT(st.kv_blocks_used, 0);
    printf("preemption: %llu preemptions over %d blocks, results unchanged\n", (unsigned long long)st.n_preemptions,
           st.kv_blocks_total);
    ds_engine_free(small);
}

static void test_validation_and_cancel(const ds_model *m) {
    ds_engine *e = make_engine(m, (size_t)4 << 20, 4, NULL);
    int32_t p[4] = {1, 2, 3, 4}, bad[2] = {1, 1 << 20};
    run r;
    int st;
    CHECK(submit(e, p, 4, m->cfg.max_ctx, NULL, &r, &st) == 0 && st == DS_ERANGE);
    CHECK(submit(e, bad, 2, 4, NULL, &r, &st) == 0 && st == DS_EINVAL);
    CHECK(submit(e, p, 4, 4, "no-such-adapter", &r, &st) == 0 && st == DS_ENOTFOUND);
    CHECK(submit(e, p, 0, 4, NULL, &r, &st) == 0 && st == DS_EINVAL);
    uint64_t id = submit(e, p, 4, 200, NULL, &r, &st);
    CHECK(id > 0);
    ds_engine_cancel(e, id);
    wait_all(&r, 1);
    CHECK(r.finish == DS_FINISH_CANCEL || (r.finish == DS_FINISH_LENGTH && r.n == 200));
    CHECK_EQ_INT(ds_engine_in_flight(e), 0);
    ds_engine_free(e);
}

/* Adapter life cycle through the registry. */
static const cJSON *adapter_case(cJSON **keep, const char *root, const char *name, int idx) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s/reference.json", root, name);
    *keep = golden_load_json(path);
    return *keep ? cJSON_GetArrayItem(cJSON_GetObjectItem(*keep, "cases"), idx) : NULL;
}

static void expect_tokens(const run *r, const cJSON *c, const char *what) {
    int32_t want[8];
    int nw = golden_tokens(c, want);
    CHECK_MSG(r->n >= nw && !memcmp(r->toks, want, sizeof(int32_t) * (size_t)nw), "%s: tokens differ from the reference", what);
}

static void test_adapters(const ds_model *m, const char *root) {
    ds_err err = {{0}};
    ds_adapter_registry *reg = ds_registry_create(m, root, &err);
    CHECK_MSG(reg != NULL, "%s", err.msg);
    if (!reg) return;
    ds_engine *e = make_engine(m, (size_t)4 << 20, 2, reg);
    const char *names[] = {"lora-qv", "dora", "ia3", "prompt-tuning", "prefix", "adalora"};
    cJSON *refs[6] = {0};
    const cJSON *cs[6];
    for (int i = 0; i < 6; i++) {
        CHECK_MSG(ds_registry_load(reg, names[i], names[i], false, &err) == 0, "%s: %s", names[i], err.msg);
        cs[i] = adapter_case(&refs[i], root, names[i], 0);
    }
    CHECK(ds_registry_load(reg, "lora-qv", "lora-qv", false, &err) == DS_EBUSY);
    CHECK(ds_registry_load(reg, "evil", "../../models/tiny-llama", false, &err) == DS_EPERM);
    /* all six types at once with only 2 resident slots: LRU eviction, every result right */
    run r[6];
    int32_t *prompt[6];
    int np[6];
    for (int i = 0; i < 6; i++) {
        prompt[i] = golden_ids(cJSON_GetObjectItem(cs[i], "prompt"), &np[i]);
        submit(e, prompt[i], np[i], 4, names[i], &r[i], NULL);
    }
    wait_all(r, 6);
    for (int i = 0; i < 6; i++) expect_tokens(&r[i], cs[i], names[i]);
    ds_engine_stats st;
    ds_engine_stats_get(e, &st);
    CHECK_MSG(st.adapter_evictions > 0, "expected evictions with 2 slots");
    /* unload while running: the running one finishes on its weights, new ones are refused */
    run longr, after;
    int s2;
    submit(e, prompt[0], np[0], 150, "lora-qv", &longr, NULL);
    CHECK(ds_registry_unload(reg, "lora-qv", &err) == 0);
    CHECK(submit(e, prompt[0], np[0], 4, "lora-qv", &after, &s2) == 0 && s2 == DS_ENOTFOUND);
    wait_all(&longr, 1);
    CHECK_EQ_INT(longr.n, 150);
    expect_tokens(&longr, cs[0], "lora-qv after unload");
    /* hot swap: the name now points at other weights (lora-all); new requests see them */
    cJSON *ref_all = NULL;
    const cJSON *c_all = adapter_case(&ref_all, root, "lora-all", 0);
    CHECK(ds_registry_load(reg, "lora-qv", "lora-all", true, &err) == 0);
    ds_adapter_info info;
    CHECK(ds_registry_info(reg, "lora-qv", &info) == 0 && info.version == 1);
    CHECK(ds_registry_load(reg, "lora-qv", "lora-qv", true, &err) == 0);
    CHECK(ds_registry_info(reg, "lora-qv", &info) == 0 && info.version == 2);
    CHECK(ds_registry_load(reg, "lora-qv", "lora-all", true, &err) == 0);
    int32_t *pa;
    int npa;
    pa = golden_ids(cJSON_GetObjectItem(c_all, "prompt"), &npa);
    submit(e, pa, npa, 4, "lora-qv", &after, NULL);
    wait_all(&after, 1);
    expect_tokens(&after, c_all, "hot-swapped lora-qv → lora-all weights");
    /* unload everything: registry and backend memory back to zero */
    for (int i = 0; i < 6; i++) ds_registry_unload(reg, names[i], &err);
    submit(e, prompt[0], np[0], 1, NULL, &after, NULL); /* one more step lets the engine collect slots */
    wait_all(&after, 1);
    submit(e, prompt[0], np[0], 1, NULL, &after, NULL);
    wait_all(&after, 1);
    settled_stats(e, &st);
    CHECK_EQ_INT(ds_registry_host_bytes(reg), 0);
    CHECK_EQ_INT(st.adapter_dev_bytes, 0);
    CHECK_EQ_INT(st.n_adapters_resident, 0);
    CHECK_EQ_INT(st.kv_blocks_used, 0);
    printf("adapters: %llu uploads, %llu evictions; memory back to baseline\n", (unsigned long long)st.adapter_uploads,
           (unsigned long long)st.adapter_evictions);
    ds_engine_free(e);
    ds_registry_free(reg);
    for (int i = 0; i < 6; i++) {
        free(prompt[i]);
        cJSON_Delete(refs[i]);
    }
    free(pa);
    cJSON_Delete(ref_all);
}

/* Submit owns the request's policies: it resolves the adapter once (a fallback name for SGLang's
 * "base:adapter") and reports the id and version it runs with, and max_tokens 0 becomes the rest
 * of the context — by the context length, or by the KV cache when that holds less, less the
 * prompt and an adapter's virtual tokens. */
static uint64_t submit_info(ds_engine *e, const char *adapter, const char *fallback, int max_tokens, run *r,
                            ds_submit_info *info, int *st) {
    static const int32_t p[4] = {1, 2, 3, 4};
    memset(r, 0, sizeof *r);
    memset(info, 0x5a, sizeof *info);
    ds_gen_request q = ds_gen_request_default();
    q.prompt = p, q.n_prompt = 4, q.max_tokens = max_tokens, q.ignore_eos = true;
    q.adapter = adapter, q.adapter_fallback = fallback;
    q.sampling.temperature = 0, q.on_event = on_ev, q.user = r;
    ds_err err = {{0}};
    return r->id = ds_engine_submit(e, &q, info, st, &err);
}

static void test_submit_policies(const ds_model *m, const char *root) {
    ds_err err = {{0}};
    ds_adapter_registry *reg = ds_registry_create(m, root, &err);
    CHECK_MSG(reg != NULL, "%s", err.msg);
    if (!reg) return;
    CHECK(ds_registry_load(reg, "lora-qv", "lora-qv", false, &err) == 0 && ds_registry_load(reg, "prefix", "prefix", false, &err) == 0);
    ds_engine_params ep = ds_engine_default_params();
    ep.max_ctx = 40;
    ep.kv_cache_bytes = (size_t)4 << 20;
    ep.registry = reg;
    ds_engine *e = ds_engine_create(m, &ep, &err);
    CHECK_MSG(e != NULL, "%s", err.msg);
    run r;
    ds_submit_info info;
    int st;
    if (e) {
        CHECK(submit_info(e, NULL, NULL, 0, &r, &info, &st) > 0); /* the rest of a 40-token context */
        CHECK(info.max_tokens == 36 && info.adapter[0] == 0 && info.adapter_version == 0);
        wait_all(&r, 1);
        CHECK_MSG(r.n == 36 && r.finish == DS_FINISH_LENGTH, "generated %d tokens", r.n);
        CHECK(submit_info(e, "lora-qv", NULL, 3, &r, &info, &st) > 0 && info.max_tokens == 3);
        CHECK(!strcmp(info.adapter, "lora-qv") && info.adapter_version == 1);
        wait_all(&r, 1);
        CHECK(ds_registry_load(reg, "lora-qv", "lora-qv", true, &err) == 0); /* version 2 */
        CHECK(submit_info(e, "base:lora-qv", "lora-qv", 2, &r, &info, &st) > 0); /* resolved by the fallback */
        CHECK(!strcmp(info.adapter, "lora-qv") && info.adapter_version == 2);
        wait_all(&r, 1);
        CHECK(submit_info(e, "base:", "", 2, &r, &info, &st) > 0 && info.adapter[0] == 0); /* "" falls back to base */
        wait_all(&r, 1);
        CHECK(submit_info(e, "base:nope", "nope", 2, &r, &info, &st) == 0 && st == DS_ENOTFOUND);
        ds_adapter_entry *pe = ds_registry_acquire(reg, "prefix");
        const int32_t n_virt = pe ? pe->adapter->n_virtual : -1;
        ds_registry_release(reg, pe);
        CHECK(submit_info(e, "prefix", NULL, 0, &r, &info, &st) > 0); /* its virtual tokens take context too */
        CHECK_MSG(info.max_tokens == 36 - n_virt, "prefix: max_tokens %d, want %d", info.max_tokens, 36 - n_virt);
        wait_all(&r, 1);
        CHECK(submit_info(e, NULL, NULL, -1, &r, &info, &st) == 0 && st == DS_EINVAL);
        ds_engine_free(e);
    }
    /* a KV cache smaller than the context: 6 blocks of 16 tokens bound "the rest" (one block spare) */
    ep.max_ctx = 0;
    ep.kv_block_size = 16;
    ep.kv_cache_bytes = (size_t)2 * 16 * m->cfg.n_layer * m->cfg.n_kv_head * m->cfg.head_dim * sizeof(float) * 6;
    if ((e = ds_engine_create(m, &ep, &err))) {
        CHECK(submit_info(e, NULL, NULL, 0, &r, &info, &st) > 0);
        CHECK_MSG(info.max_tokens == 5 * 16 - 4 && info.max_tokens < m->cfg.max_ctx - 4, "KV-bound max_tokens %d",
                  info.max_tokens);
        wait_all(&r, 1);
        CHECK_EQ_INT(r.n, info.max_tokens);
        ds_engine_free(e);
    } else {
        CHECK_MSG(0, "%s", err.msg);
    }
    ds_registry_free(reg);
}

/* AdapterHub adapters through the engine: MAM and prefix tuning pin prefix blocks whose positions
 * are AdapterHub's (the sequence starts at RoPE position 0), beside PEFT's prefix (positions from
 * P) and a plain bottleneck adapter, with 2 resident slots (eviction unpins the blocks). */
static void test_adapterhub(const ds_model *m) {
    const char *roots[] = {DS_TEST_DATA "/adapters/bottleneck/tiny-llama", DS_TEST_DATA "/adapters/tiny-llama"};
    const char *names[] = {"bn-mam", "ah-prefix", "bn-union-seq", "bn-seq", "prefix"};
    enum { N = sizeof names / sizeof *names };
    ds_err err = {{0}};
    ds_adapter_registry *reg = ds_registry_create(m, DS_TEST_DATA "/adapters", &err);
    CHECK_MSG(reg != NULL, "%s", err.msg);
    if (!reg) return;
    ds_engine *e = make_engine(m, (size_t)4 << 20, 2, reg);
    cJSON *refs[2 * N] = {0};
    run r[2 * N];
    int32_t *prompt[2 * N];
    int np[2 * N];
    for (int i = 0; i < N; i++) {
        const char *root = i < N - 1 ? roots[0] : roots[1];
        char rel[128];
        snprintf(rel, sizeof rel, "%s/%s", i < N - 1 ? "bottleneck/tiny-llama" : "tiny-llama", names[i]);
        CHECK_MSG(ds_registry_load(reg, names[i], rel, false, &err) == 0, "%s: %s", names[i], err.msg);
        for (int k = 0; k < 2; k++) { /* both cases of each: prompt lengths 7 and 1 */
            const cJSON *c = adapter_case(&refs[2 * i + k], root, names[i], k);
            prompt[2 * i + k] = golden_ids(cJSON_GetObjectItem(c, "prompt"), &np[2 * i + k]);
            submit(e, prompt[2 * i + k], np[2 * i + k], 4, names[i], &r[2 * i + k], NULL);
        }
    }
    wait_all(r, 2 * N);
    for (int i = 0; i < 2 * N; i++) {
        char what[64];
        snprintf(what, sizeof what, "engine %s case %d", names[i / 2], i % 2);
        expect_tokens(&r[i], cJSON_GetArrayItem(cJSON_GetObjectItem(refs[i], "cases"), i % 2), what);
    }
    for (int i = 0; i < N; i++) ds_registry_unload(reg, names[i], &err);
    run after;
    for (int k = 0; k < 2; k++) { /* steps that let the engine collect the retired slots */
        submit(e, prompt[0], np[0], 1, NULL, &after, NULL);
        wait_all(&after, 1);
    }
    ds_engine_stats st;
    settled_stats(e, &st);
    CHECK_EQ_INT(st.kv_blocks_used, 0);
    CHECK_EQ_INT(st.n_adapters_resident, 0);
    printf("adapterhub: MAM, prefix tuning, prefix+seq_bn, seq_bn and PEFT prefix through the engine, "
           "%llu uploads, %llu evictions\n", (unsigned long long)st.adapter_uploads,
           (unsigned long long)st.adapter_evictions);
    ds_engine_free(e);
    ds_registry_free(reg);
    for (int i = 0; i < 2 * N; i++) {
        free(prompt[i]);
        cJSON_Delete(refs[i]);
    }
}

/* Background work (training micro-steps) runs on the engine thread when woken, and detaching
 * waits for a call in progress. */
static int g_bg_calls;
static bool bg_hook(void *ud) {
    (void)ud;
    __atomic_add_fetch(&g_bg_calls, 1, __ATOMIC_SEQ_CST);
    return __atomic_load_n(&g_bg_calls, __ATOMIC_SEQ_CST) < 3; /* three units of work, then idle */
}

static void test_background(const ds_model *m) {
    ds_engine *e = make_engine(m, (size_t)4 << 20, 4, NULL);
    ds_engine_set_background(e, bg_hook, NULL, 0.25f);
    ds_engine_wake_background(e);
    for (int i = 0; i < 200 && __atomic_load_n(&g_bg_calls, __ATOMIC_SEQ_CST) < 3; i++) {
        struct timespec ts = {0, 5 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    CHECK_EQ_INT(__atomic_load_n(&g_bg_calls, __ATOMIC_SEQ_CST), 3);
    int32_t p[3] = {1, 2, 3};
    run r;
    submit(e, p, 3, 4, NULL, &r, NULL); /* serving still works beside it */
    wait_all(&r, 1);
    CHECK_EQ_INT(r.n, 4);
    ds_engine_set_background(e, NULL, NULL, 0);
    ds_engine_free(e);
}

int main(void) {
    const char *dir = DS_TEST_DATA "/models/tiny-llama";
    cJSON *ref = golden_load_json(DS_TEST_DATA "/models/tiny-llama/reference.json");
    if (!ref) SKIP("no golden tiny-llama (tests/golden/gen_models.py)");
    ds_err err = {{0}};
    ds_model_params mp = ds_model_default_params();
    mp.verbose = false;
    ds_model *m = ds_model_load(dir, &mp, &err);
    CHECK_MSG(m != NULL, "%s", err.msg);
    if (!m) return ds_test_result();
    test_batching(m, ref);
    test_preemption(m);
    test_validation_and_cancel(m);
    test_submit_policies(m, DS_TEST_DATA "/adapters/tiny-llama");
    test_adapters(m, DS_TEST_DATA "/adapters/tiny-llama");
    test_adapterhub(m);
    test_background(m);
    cJSON_Delete(ref);
    ds_model_free(m);
    return ds_test_result();
}
