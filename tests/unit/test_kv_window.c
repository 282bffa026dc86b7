/* KV blocks behind a sliding window (src/engine/scheduler.c free_behind_window): on tiny-mistral
 * (window 4 on every layer) with 2-token blocks and 5-token steps (so the 12-token prompt is chunked),
 * a 120-token greedy generation through the engine
 *   - gives transformers' tokens and top-5 log-probabilities at every step
 *     (tests/golden/gen_window_golden.py → tests/data/window/tiny-mistral-long.json),
 *   - never holds more than a window's and a chunk's worth of blocks, in a pool of 16 blocks where the
 *     132 slots would need 66 without freeing — no preemption,
 *   - and reports it: kv_blocks_used back to 0, the freed counter in the stats and in /metrics;
 * three copies at once (freed blocks reused by the others) give the same tokens. Gemma 3's interleaved
 * global layers read the whole context, so tiny-gemma3 frees nothing. */
#include "ds/engine.h"
#include "ds_test.h"
#include "golden.h"
#include "server/metrics.h"
#include "util/sb.h"

#include <pthread.h>
#include <time.h>

#define N_STEPS 120
#define TOP 5

typedef struct run {
    int32_t toks[N_STEPS];
    ds_top_logprob top[N_STEPS][TOP];
    int n;
    int32_t max_used; /* kv_blocks_used seen from the callbacks (the previous step's snapshot) */
    ds_finish_reason finish;
    bool done;
} run;

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;
static ds_engine *g_engine;

static void on_ev(const ds_gen_event *ev) {
    run *r = ev->user;
    ds_engine_stats st;
    ds_engine_stats_get(g_engine, &st);
    pthread_mutex_lock(&g_mu);
    if (st.kv_blocks_used > r->max_used) r->max_used = st.kv_blocks_used;
    if (ev->type == DS_EV_TOKEN && ev->token >= 0 && r->n < N_STEPS) {
        memcpy(r->top[r->n], ev->top, sizeof r->top[0]);
        r->toks[r->n++] = ev->token;
    }
    if (ev->type != DS_EV_TOKEN) {
        r->finish = ev->finish;
        r->done = true;
        pthread_cond_broadcast(&g_cv);
    }
    pthread_mutex_unlock(&g_mu);
}

static void submit(const int32_t *prompt, int n, int max_tokens, run *r) {
    memset(r, 0, sizeof *r);
    ds_gen_request q = ds_gen_request_default();
    q.prompt = prompt;
    q.n_prompt = (size_t)n;
    q.max_tokens = max_tokens;
    q.sampling.temperature = 0;
    q.top_logprobs = TOP;
    q.on_event = on_ev;
    q.user = r;
    ds_err err = {{0}};
    int st = 0;
    CHECK_MSG(ds_engine_submit(g_engine, &q, NULL, &st, &err) != 0, "submit: %s", err.msg);
}

static void wait_all(run *rs, int n) {
    pthread_mutex_lock(&g_mu);
    for (int i = 0; i < n; i++)
        while (!rs[i].done) pthread_cond_wait(&g_cv, &g_mu);
    pthread_mutex_unlock(&g_mu);
}

static void settled(ds_engine_stats *st) {
    for (int i = 0; i < 200; i++) {
        ds_engine_stats_get(g_engine, st);
        if (st->n_running == 0 && st->kv_blocks_used == 0) return;
        nanosleep(&(struct timespec){0, 10 * 1000 * 1000}, NULL);
    }
}

static ds_engine *make_engine(const ds_model *m, int32_t n_blocks) {
    ds_engine_params ep = ds_engine_default_params();
    ep.kv_block_size = 2;
    ep.max_batch_tokens = 5;
    /* per block: K and V of every layer (src/model/llama.c alloc_kv) */
    ep.kv_cache_bytes = (size_t)n_blocks * 2 * 2 * (size_t)m->cfg.n_layer * (size_t)m->cfg.n_kv_head * m->cfg.head_dim * 4;
    ds_err err = {{0}};
    ds_engine *e = ds_engine_create(m, &ep, &err);
    CHECK_MSG(e != NULL, "%s", err.msg);
    return e;
}

static ds_model *load(const char *name) {
    char dir[512];
    snprintf(dir, sizeof dir, DS_TEST_DATA "/models/%s", name);
    ds_model_params mp = ds_model_default_params();
    mp.verbose = false;
    ds_err err = {{0}};
    ds_model *m = ds_model_load(dir, &mp, &err);
    CHECK_MSG(m != NULL, "%s: %s", name, err.msg);
    return m;
}

/* The run against the golden: tokens equal, top-5 log-probabilities within 1e-4 * max(1, |lp|). */
static void check_golden(const run *r, const cJSON *steps, const char *what) {
    CHECK_MSG(r->n == N_STEPS && r->finish == DS_FINISH_LENGTH, "%s: %d tokens, finish %d", what, r->n, r->finish);
    double worst = 0;
    int i = 0, bad_tok = -1;
    for (const cJSON *s = steps->child; s && i < r->n; s = s->next, i++) {
        if (r->toks[i] != (int32_t)cJSON_GetObjectItem(s, "token")->valuedouble && bad_tok < 0) bad_tok = i;
        int k = 0;
        for (const cJSON *t = cJSON_GetObjectItem(s, "top")->child; t && k < TOP; t = t->next, k++) {
            const double want = cJSON_GetArrayItem(t, 1)->valuedouble;
            const double d = r->top[i][k].token == (int32_t)cJSON_GetArrayItem(t, 0)->valuedouble
                                 ? fabs(r->top[i][k].logprob - want) / fmax(1.0, fabs(want))
                                 : INFINITY;
            if (!(d <= worst)) worst = d;
        }
    }
    CHECK_MSG(bad_tok < 0, "%s: token %d differs from transformers", what, bad_tok);
    CHECK_MSG(worst <= 1e-4, "%s: top-5 log-probabilities off by %.3g (relative)", what, worst);
    printf("%s: %d tokens equal to transformers, top-5 logprobs within %.2g (rel.)\n", what, r->n, worst);
}

static void test_mistral(const cJSON *g) {
    ds_model *m = load("tiny-mistral");
    if (!m) return;
    int np;
    int32_t *prompt = golden_ids(cJSON_GetObjectItem(g, "prompt"), &np);
    const cJSON *steps = cJSON_GetObjectItem(g, "steps");
    CHECK_EQ_INT(cJSON_GetArraySize(steps), N_STEPS);
    g_engine = make_engine(m, 16);
    static run alone, copies[3];
    submit(prompt, np, N_STEPS, &alone);
    wait_all(&alone, 1);
    check_golden(&alone, steps, "tiny-mistral alone");
    ds_engine_stats st;
    settled(&st);
    const int32_t slots = np + N_STEPS, full = (slots + 1) / 2;
    /* live own slots: the window (4) behind the next token plus a 5-token chunk: ceil(8/2) + 1 blocks */
    printf("tiny-mistral: at most %d KV blocks held (of a 16-block pool) for %d slots (%d blocks without freeing), "
           "%llu freed, %llu preemptions\n",
           alone.max_used, slots, full, (unsigned long long)st.kv_blocks_window_freed,
           (unsigned long long)st.n_preemptions);
    CHECK(alone.max_used >= 2 && alone.max_used <= 5);
    CHECK(st.n_preemptions == 0 && st.kv_blocks_used == 0);
    CHECK(st.kv_blocks_window_freed >= (uint64_t)(full - 5));
    const uint64_t freed_alone = st.kv_blocks_window_freed;

    for (int k = 0; k < 3; k++) submit(prompt, np, N_STEPS, &copies[k]);
    wait_all(copies, 3);
    for (int k = 0; k < 3; k++) check_golden(&copies[k], steps, "tiny-mistral, 3 at once");
    settled(&st);
    CHECK(st.kv_blocks_used == 0 && st.kv_blocks_window_freed >= freed_alone + 3 * (uint64_t)(full - 5));

    /* /metrics reports it */
    ds_metrics *mx = ds_metrics_create("tiny-mistral");
    ds_sb b;
    ds_sb_init(&b);
    ds_metrics_render(mx, &(ds_metrics_sources){.engine = g_engine, .max_lora = 1}, &b);
    char want[128];
    snprintf(want, sizeof want, "deltaserve_kv_blocks_window_freed_total %llu\n",
             (unsigned long long)st.kv_blocks_window_freed);
    CHECK_MSG(b.data && strstr(b.data, want), "/metrics lacks '%s'", want);
    CHECK(b.data && strstr(b.data, "deltaserve_kv_blocks_used 0\n"));
    ds_sb_free(&b);
    ds_metrics_free(mx);

    /* a request longer than the pool could hold without freeing is accepted (validate_request) */
    ds_engine_free(g_engine);
    free(prompt);
    ds_model_free(m);
}

/* Gemma 3: local layers slide, global ones do not — nothing may be freed. */
static void test_gemma3(void) {
    ds_model *m = load("tiny-gemma3");
    if (!m) return;
    g_engine = make_engine(m, 64);
    int32_t prompt[12];
    for (int i = 0; i < 12; i++) prompt[i] = (17 * i + 3) % m->cfg.n_vocab;
    static run r;
    submit(prompt, 12, 40, &r);
    wait_all(&r, 1);
    ds_engine_stats st;
    settled(&st);
    CHECK(r.n == 40 && st.kv_blocks_window_freed == 0);
    CHECK_MSG(r.max_used >= (12 + 38) / 2, "tiny-gemma3 held %d blocks for 51 slots", r.max_used);
    ds_engine_free(g_engine);
    ds_model_free(m);
}

int main(void) {
    cJSON *g = golden_load_json(DS_TEST_DATA "/window/tiny-mistral-long.json");
    if (!g) SKIP("no golden (tests/golden/gen_window_golden.py)");
    test_mistral(g);
    test_gemma3();
    cJSON_Delete(g);
    return ds_test_result();
}
