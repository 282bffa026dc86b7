/* The per-step adapter plan (include/ds/plan.h, src/adapter/plan.c): its tables hold, for every
 * (layer, projection) and lm_head, exactly the segments whose adapter adapts that projection, in
 * batch order; the forward uploads it once per step (not per layer) and each segmented op runs
 * one planned range; a base-only step never plans. Also the model's KV write that prefix tuning
 * goes through. The numbers the plan produces are checked by the adapter golden tests
 * (test_adapter_golden, test_bottleneck), which run through it. */
#include "ds/adapter.h"
#include "ds/model.h"
#include "ds_test.h"

#include <stdio.h>
#include <stdlib.h>

/* A CPU backend that counts plan uploads and segmented-op calls. */
static const struct ds_backend_iface *real;
static int n_plan, n_lora_calls, n_vec_calls;

static int count_plan(void *ctx, const ds_seg_tables *t) {
    n_plan++;
    return real->plan_upload(ctx, t);
}
static int count_lora(void *ctx, const float *x, int32_t in, float *y, int32_t out, ds_seg_range r) {
    n_lora_calls++;
    return real->lora(ctx, x, in, y, out, r);
}
static int count_scale(void *ctx, float *y, int32_t width, ds_seg_range r) {
    n_vec_calls++;
    return real->seg_scale(ctx, y, width, r);
}
static int count_add(void *ctx, float *y, int32_t width, ds_seg_range r) {
    n_vec_calls++;
    return real->seg_add(ctx, y, width, r);
}

static ds_adapter *load_adapter(const ds_model *m, const char *model, const char *name) {
    char path[512];
    snprintf(path, sizeof path, "%s/adapters/%s/%s", DS_TEST_DATA, model, name);
    ds_err err = {{0}};
    ds_adapter *a = ds_adapter_load(path, m, NULL, &err);
    CHECK_MSG(a != NULL, "%s: %s", path, err.msg);
    return a;
}

enum { N_AD = 4 };

/* Five sequences: adapter 0 (3 tokens), base (2), adapter 1 = DoRA (3), adapter 2 = IA³ (2),
 * adapter 3 (1); one output row per sequence (its last token). */
static const int32_t seg_start[5] = {0, 3, 5, 8, 10}, seg_len[5] = {3, 2, 3, 2, 1}, seg_ad[5] = {0, -1, 1, 2, 3};
#define N_TOK 11

/* Checks range r of the lora table against the segments whose adapter has a module `want` on
 * (layer, proj) (layer < 0: lm_head, rows = output rows). */
static void check_lora_range(const ds_plan *p, ds_seg_range r, const ds_adapter_dev *const *devs, int32_t layer,
                             ds_proj proj, const char *what) {
    int32_t k = 0;
    for (int s = 0; s < 5; s++) {
        if (seg_ad[s] < 0) continue;
        const ds_adapter_dev *d = devs[seg_ad[s]];
        const ds_lora_dev *m = layer < 0 ? &d->lm_head : d->lora ? &d->lora[layer * DS_PROJ_COUNT + proj] : NULL;
        if (!m || !m->rank) continue;
        CHECK_MSG(k < r.n, "%s: segment %d missing", what, s);
        if (k >= r.n) return;
        const ds_lora_seg *g = &p->tables.lora[r.first + k++];
        const int32_t start = layer < 0 ? s : seg_start[s], len = layer < 0 ? 1 : seg_len[s];
        CHECK_MSG(g->start == start && g->len == len && g->rank == m->rank && g->scale == m->scale && g->A == m->A &&
                      g->B == m->B,
                  "%s: entry %d is not segment %d", what, k - 1, s);
    }
    CHECK_MSG(k == r.n, "%s: %d entries, want %d", what, r.n, k);
}

static void check_tables(const ds_llama *L, const ds_plan *p, const ds_adapter_dev *const *devs, const ds_model *m) {
    CHECK(p->active);
    int32_t n_lora = 0, n_bias = 0;
    char what[64];
    for (int32_t l = 0; l < m->cfg.n_layer; l++)
        for (int pr = 0; pr < DS_PROJ_COUNT; pr++) {
            const ds_proj_plan *pp = &p->proj[l * DS_PROJ_COUNT + pr];
            snprintf(what, sizeof what, "layer %d %s", l, ds_proj_name((ds_proj)pr));
            check_lora_range(p, pp->lora, devs, l, (ds_proj)pr, what);
            n_lora += pp->lora.n;
            /* DoRA: the dora adapter's segment wherever it has a module; IA³: by side */
            const ds_lora_dev *dm = devs[1]->lora ? &devs[1]->lora[l * DS_PROJ_COUNT + pr] : NULL;
            const int want_dora = dm && dm->rank && dm->dora_scale;
            CHECK_MSG(pp->dora.n == want_dora, "%s: %d DoRA entries, want %d", what, pp->dora.n, want_dora);
            if (pp->dora.n) CHECK(p->tables.vec[pp->dora.first].start == 5 && p->tables.vec[pp->dora.first].v == dm->dora_scale);
            const float *iv = devs[2]->ia3 ? devs[2]->ia3[l * DS_PROJ_COUNT + pr] : NULL;
            const bool in = devs[2]->host->ia3_is_input[pr];
            CHECK_MSG(pp->ia3_in.n == (iv && in) && pp->ia3_out.n == (iv && !in), "%s: IA3 ranges", what);
            const ds_seg_range ir = in ? pp->ia3_in : pp->ia3_out;
            if (iv) CHECK(p->tables.vec[ir.first].start == 8 && p->tables.vec[ir.first].len == 2 && p->tables.vec[ir.first].v == iv);
            const float *bias = ds_llama_proj_bias(L, l, (ds_proj)pr); /* re-added after DoRA, on every row */
            CHECK_MSG(pp->bias.n == (pp->dora.n && bias), "%s: %d bias entries", what, pp->bias.n);
            if (pp->bias.n) {
                const ds_vec_seg *g = &p->tables.vec[pp->bias.first];
                CHECK(g->start == 0 && g->len == N_TOK && g->v == bias && g->alpha == 1.0f);
                n_bias++;
            }
        }
    check_lora_range(p, p->lm_head.lora, devs, -1, DS_PROJ_Q, "lm_head");
    CHECK(n_lora > 0);
    printf("plan: %d LoRA entries (%d on lm_head), %d vec entries (%d biases after DoRA)\n", p->tables.n_lora,
           p->lm_head.lora.n, p->tables.n_vec, n_bias);
    CHECK_EQ_INT(p->tables.n_lora, n_lora + p->lm_head.lora.n);
}

/* One step: every sequence feeds its tokens, plan built once, forward. */
static int step(ds_llama *L, ds_plan *p, const ds_adapter_dev *const *devs, bool with_adapters, float *logits) {
    int32_t tok[N_TOK], pos[N_TOK], seq[N_TOK], kv[N_TOK], out[5], tables[5 * 4], prefix[5] = {0};
    ds_adapter_seg segs[5];
    int n_segs = 0;
    for (int s = 0; s < 5; s++) {
        for (int j = 0; j < seg_len[s]; j++) {
            const int t = seg_start[s] + j;
            tok[t] = 3 + 7 * t, pos[t] = kv[t] = j, seq[t] = s;
        }
        out[s] = seg_start[s] + seg_len[s] - 1;
        for (int b = 0; b < 4; b++) tables[s * 4 + b] = s * 4 + b;
        if (with_adapters && seg_ad[s] >= 0)
            segs[n_segs++] = (ds_adapter_seg){.start = seg_start[s], .len = seg_len[s], .slot = seg_ad[s]};
    }
    ds_adapter_batch ad = {.slots = devs, .segs = segs, .n_segs = n_segs};
    ds_batch b = {.n_tokens = N_TOK, .tokens = tok, .pos = pos, .tok_seq = seq, .tok_kv = kv, .n_seqs = 5,
                  .block_tables = tables, .max_blocks = 4, .seq_prefix = prefix, .n_out = 5, .out_rows = out};
    int st = ds_adapter_plan_build(p, &ad, &b);
    CHECK_MSG(st == 0 && p->active == with_adapters, "plan build: %d", st);
    ds_err err = {{0}};
    if (!st) st = ds_llama_forward(L, &b, with_adapters ? p : NULL, logits, &err);
    CHECK_MSG(st == 0, "forward: %s", err.msg);
    return st;
}

/* Prefix tuning writes its K/V through the model (ds_llama_kv_write), which checks the slot. */
static void check_kv_write(ds_llama *L, const ds_model *m) {
    const int32_t row = m->cfg.n_kv_head * m->cfg.head_dim;
    const int64_t n_slots = (int64_t)ds_llama_n_kv_blocks(L) * ds_llama_kv_block_size(L);
    float *k = calloc((size_t)row, sizeof(float)), *v = calloc((size_t)row, sizeof(float));
    if (!k || !v) return free(k), free(v);
    CHECK_EQ_INT(ds_llama_kv_write(L, 0, 0, k, v), 0);
    CHECK_EQ_INT(ds_llama_kv_write(L, m->cfg.n_layer - 1, n_slots - 1, k, v), 0);
    CHECK_EQ_INT(ds_llama_kv_write(L, 0, n_slots, k, v), DS_EINVAL);
    CHECK_EQ_INT(ds_llama_kv_write(L, 0, -1, k, v), DS_EINVAL);
    CHECK_EQ_INT(ds_llama_kv_write(L, m->cfg.n_layer, 0, k, v), DS_EINVAL);
    free(k), free(v);
}

static void run(const ds_model *m, ds_backend *b, const ds_adapter_dev *const *devs) {
    ds_llama_params lp = ds_llama_default_params();
    lp.kv_bytes = (size_t)8 << 20;
    ds_err err = {{0}};
    ds_llama *L = ds_llama_create(m, b, &lp, &err);
    CHECK_MSG(L != NULL, "%s", err.msg);
    ds_plan *p = L ? ds_adapter_plan_create(L, 5, N_TOK, &err) : NULL;
    CHECK_MSG(!L || p != NULL, "%s", err.msg);
    float *logits = malloc(sizeof(float) * 5 * (size_t)m->cfg.n_vocab);
    if (p && logits && step(L, p, devs, true, logits) == 0) {
        check_tables(L, p, devs, m);
        CHECK_MSG(n_plan == 1, "one forward uploaded the plan %d times", n_plan);
        int32_t want_lora = p->lm_head.lora.n > 0, want_vec = 0; /* one call per non-empty range */
        for (int32_t i = 0; i < m->cfg.n_layer * DS_PROJ_COUNT; i++) {
            const ds_proj_plan *pp = &p->proj[i];
            want_lora += pp->lora.n > 0;
            want_vec += (pp->ia3_in.n > 0) + (pp->lora_bias.n > 0) + (pp->dora.n > 0) + (pp->bias.n > 0) + (pp->ia3_out.n > 0);
        }
        CHECK_EQ_INT(n_lora_calls, want_lora);
        CHECK_EQ_INT(n_vec_calls, want_vec);
        CHECK(step(L, p, devs, true, logits) == 0);
        CHECK_MSG(n_plan == 2, "two forwards uploaded the plan %d times", n_plan);
        const int plans = n_plan, loras = n_lora_calls;
        CHECK(step(L, p, devs, false, logits) == 0); /* base only: no plan, no adapter op */
        CHECK(n_plan == plans && n_lora_calls == loras);
        /* the plan refuses a step larger than it was made for, or a segment on an empty slot */
        ds_adapter_seg too_many[6] = {{0}};
        ds_adapter_batch big = {.slots = devs, .segs = too_many, .n_segs = 6};
        ds_batch bt = {.n_tokens = 1};
        CHECK_EQ_INT(ds_adapter_plan_build(p, &big, &bt), DS_EINVAL);
        const ds_adapter_dev *holes[2] = {NULL, devs[0]};
        ds_adapter_seg on_hole = {.start = 0, .len = 1, .slot = 0};
        ds_adapter_batch hole = {.slots = holes, .segs = &on_hole, .n_segs = 1};
        CHECK_EQ_INT(ds_adapter_plan_build(p, &hole, &bt), DS_EINVAL);
    }
    if (L) check_kv_write(L, m);
    free(logits);
    ds_adapter_plan_free(p);
    ds_llama_free(L);
}

/* One model with four adapters: 0 LoRA, 1 DoRA, 2 IA³, 3 a LoRA (with lm_head where the data has one). */
static void run_model(const char *model, const char *const names[N_AD]) {
    ds_model_params mp = ds_model_default_params();
    mp.verbose = false;
    mp.load_tokenizer = false;
    ds_err err = {{0}};
    char dir[512];
    snprintf(dir, sizeof dir, "%s/models/%s", DS_TEST_DATA, model);
    ds_model *m = ds_model_load(dir, &mp, &err);
    CHECK_MSG(m != NULL, "%s", err.msg);
    ds_backend *cpu = m ? ds_backend_create("cpu", NULL, &err) : NULL;
    if (!cpu) {
        ds_model_free(m);
        return;
    }
    real = cpu->iface;
    n_plan = n_lora_calls = n_vec_calls = 0;
    struct ds_backend_iface counting = *cpu->iface;
    counting.plan_upload = count_plan;
    counting.lora = count_lora;
    counting.seg_scale = count_scale;
    counting.seg_add = count_add;
    ds_backend b = {.iface = &counting, .ctx = cpu->ctx};
    ds_adapter *ads[N_AD] = {0};
    ds_adapter_dev devs[N_AD];
    const ds_adapter_dev *slots[N_AD];
    int n_up = 0;
    for (; n_up < N_AD; n_up++) {
        if (!(ads[n_up] = load_adapter(m, model, names[n_up]))) break;
        if (ds_adapter_dev_upload(&b, ads[n_up], &devs[n_up], &err)) {
            CHECK_MSG(0, "%s: %s", names[n_up], err.msg);
            break;
        }
        slots[n_up] = &devs[n_up];
    }
    if (n_up == N_AD) run(m, &b, slots);
    for (int i = 0; i < n_up; i++) ds_adapter_dev_release(&b, &devs[i]);
    for (int i = 0; i < N_AD; i++) ds_adapter_free(ads[i]);
    ds_backend_free(cpu);
    ds_model_free(m);
}

int main(void) {
    ds_log_set_level(DS_LOG_WARN);
    static const char *const llama[N_AD] = {"lora-qv", "dora", "ia3", "lora-head"};
    static const char *const qwen2[N_AD] = {"lora-qv", "dora", "ia3", "lora-bias"}; /* q/k/v biases: DoRA re-adds them */
    run_model("tiny-llama", llama);
    run_model("tiny-qwen2", qwen2);
    return ds_test_result();
}
