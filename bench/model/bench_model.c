/* bench_model: prefill and decode throughput of the forward pass, and decode throughput of a batch
 * of sequences with 0 (base only) and N distinct LoRA adapters on q,k,v,o and/or on all seven
 * projections, N distinct bottleneck adapters (Houlsby: both sites, swish, width
 * d_model / --bn-rf) and N distinct sparse delta adapters (--delta-keep % of every projection's
 * entries, CSR) — all measured in one run, side by side. Batch-1 decode is printed beside its
 * memory floor: the bytes of every weight matrix in the backend's storage (bf16 on CUDA) plus the
 * KV cache read, at the bandwidth of the backend's own measured copy. Prints a table and (with
 * --json FILE) raw results.
 *
 *   build/bench_model [-m MODEL | --shape llama3-8b|tiny] [--backend cpu|cuda] [--threads N]
 *                     [--batch N] [--adapters 1,4,16] [--targets qkvo|all|both] [--rank R]
 *                     [--steps N] [--bn-rf RF] [--delta-keep P] [--f32] [--copy-mb N] [--json FILE]
 *
 * --shape builds a model with random weights in memory (bf16 unless --f32; bench/model/random_model.c)
 * instead of loading one; defaults then become --batch 128 --adapters 1,10,100 --targets both.
 * --bn-rf 0 skips the bottleneck rows (default 16; skipped too on a backend without the op);
 * --delta-keep 0 the delta rows (default 1 %: a 1% delta of each projection; same rule).
 * Adapters are synthetic (random rank-R LoRA, random bottlenecks, random sparse deltas): only their shapes matter for speed. Their host
 * arrays are shared, their backend copies are not. */
#include "../bench_bw.h"
#include "ds/adapter.h"
#include "ds/model.h"
#include "random_model.h"
#include "backend/cpu/cpu_env.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_LIST 8
#define PREFILL_LEN 128 /* tokens per sequence in the prefill measurements */
#define DECODE_PROMPT 16

typedef struct bench {
    ds_llama *L;
    const ds_model *m;
    ds_backend *b;
    float *logits;
    int32_t *tables, *n_past, *tok; /* tok: 5 arrays of max_tokens */
    ds_adapter_seg *segs;
    ds_plan *plan; /* built once per step, as the engine does */
    int max_seqs, blocks, max_tokens;
} bench;

typedef struct opts {
    const char *model, *shape, *backend, *json, *targets;
    int threads, rank, steps, batch, copy_mb, bn_rf;
    double delta_keep; /* percent */
    int adapters[MAX_LIST], n_adapters;
    bool f32;
} opts;

/* Host LoRA arrays shared by every synthetic adapter: one A and B per projection at rank r. */
typedef struct lora_pool {
    float *A[DS_PROJ_COUNT], *B[DS_PROJ_COUNT];
} lora_pool;

static uint64_t g_rng = 88172645463325252ull;
static float frand(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return ((float)(g_rng >> 40) / (float)(1 << 24) - 0.5f) * 0.02f;
}

static float *rand_vec(size_t n) {
    float *v = malloc(n * sizeof(float));
    for (size_t i = 0; v && i < n; i++) v[i] = frand();
    return v;
}

static void proj_dims(const ds_model_config *c, int p, int32_t *in, int32_t *out) {
    const int32_t qd = c->n_head * c->head_dim, kvd = c->n_kv_head * c->head_dim;
    const int32_t outs[DS_PROJ_COUNT] = {qd, kvd, kvd, c->d_model, c->d_ff, c->d_ff, c->d_model};
    const int32_t ins[DS_PROJ_COUNT] = {c->d_model, c->d_model, c->d_model, qd, c->d_model, c->d_model, c->d_ff};
    *in = ins[p];
    *out = outs[p];
}

static int pool_init(lora_pool *pl, const ds_model_config *c, int32_t r) {
    for (int p = 0; p < DS_PROJ_COUNT; p++) {
        int32_t in, out;
        proj_dims(c, p, &in, &out);
        pl->A[p] = rand_vec((size_t)r * in);
        pl->B[p] = rand_vec((size_t)out * r);
        if (!pl->A[p] || !pl->B[p]) return DS_ENOMEM;
    }
    return 0;
}

static void pool_free(lora_pool *pl) {
    for (int p = 0; p < DS_PROJ_COUNT; p++) free(pl->A[p]), free(pl->B[p]);
}

/* A synthetic LoRA adapter: rank r on the first n_proj projections (4: q,k,v,o; 7: all) of every layer. */
static ds_adapter *make_lora(const ds_model *m, const lora_pool *pl, int32_t r, int n_proj, int idx) {
    const ds_model_config *c = &m->cfg;
    ds_adapter *a = calloc(1, sizeof *a);
    if (!a) return NULL;
    char name[32];
    snprintf(name, sizeof name, "bench-%d", idx);
    a->name = strdup(name);
    a->kind = DS_ADAPTER_LORA;
    a->n_layer = c->n_layer;
    a->d_model = c->d_model;
    a->lora = calloc((size_t)c->n_layer * DS_PROJ_COUNT, sizeof *a->lora);
    ds_lora_module *mods = calloc((size_t)c->n_layer * n_proj, sizeof *mods);
    if (!a->name || !a->lora || !mods) return free(a->name), free(a->lora), free(mods), free(a), NULL;
    for (int p = 0; p < DS_PROJ_COUNT; p++) proj_dims(c, p, &a->proj_in[p], &a->proj_out[p]);
    for (int32_t l = 0; l < c->n_layer; l++)
        for (int p = 0; p < n_proj; p++) {
            ds_lora_module *mod = &mods[(size_t)l * n_proj + p];
            *mod = (ds_lora_module){.rank = r, .in = a->proj_in[p], .out = a->proj_out[p], .scale = 2.0f,
                                    .A = pl->A[p], .B = pl->B[p]};
            a->lora[(size_t)l * DS_PROJ_COUNT + p] = mod;
        }
    return a;
}

/* Host arrays shared by every synthetic bottleneck adapter, width `size`. */
typedef struct bn_pool {
    float *down, *down_b, *up, *up_b; /* [size][d], [size], [d][size], [d] */
    int32_t size;
} bn_pool;

static int bn_pool_init(bn_pool *bp, const ds_model_config *c, int32_t size) {
    const size_t d = (size_t)c->d_model, s = (size_t)size;
    *bp = (bn_pool){.down = rand_vec(s * d), .down_b = rand_vec(s), .up = rand_vec(d * s), .up_b = rand_vec(d),
                    .size = size};
    return bp->down && bp->down_b && bp->up && bp->up_b ? 0 : DS_ENOMEM;
}

static void bn_pool_free(bn_pool *bp) { free(bp->down), free(bp->down_b), free(bp->up), free(bp->up_b); }

/* A synthetic Houlsby adapter (double_seq_bn: after attention and after the MLP of every layer,
 * swish, the residual added after it: DS_BN_ADD_X). */
static ds_adapter *make_bn(const ds_model *m, const bn_pool *bp, int idx) {
    const ds_model_config *c = &m->cfg;
    const size_t n = (size_t)c->n_layer * DS_BN_SITES;
    ds_adapter *a = calloc(1, sizeof *a);
    if (!a) return NULL;
    char name[32];
    snprintf(name, sizeof name, "bench-bn-%d", idx);
    a->name = strdup(name);
    a->kind = DS_ADAPTER_BOTTLENECK;
    a->n_layer = c->n_layer;
    a->d_model = c->d_model;
    a->bn = calloc(n, sizeof *a->bn);
    ds_bn_module *mods = calloc(n, sizeof *mods);
    if (!a->name || !a->bn || !mods) return free(a->name), free(a->bn), free(mods), free(a), NULL;
    for (size_t i = 0; i < n; i++) {
        mods[i] = (ds_bn_module){.size = bp->size, .d = c->d_model, .act = DS_ACT_SILU, .flags = DS_BN_ADD_X,
                                 .scale = 1.0f, .down = bp->down, .down_b = bp->down_b, .up = bp->up,
                                 .up_b = bp->up_b};
        a->bn[i] = &mods[i];
    }
    return a;
}

static void free_bn(ds_adapter *a) {
    if (!a) return;
    free(a->bn[0]); /* the module block */
    free(a->bn);
    free(a->name);
    free(a);
}

static void free_lora(ds_adapter *a) {
    if (!a) return;
    free(a->lora[0]); /* the module block (layer 0, q_proj comes first) */
    free(a->lora);
    free(a->name);
    free(a);
}

/* Host CSR arrays shared by every synthetic delta adapter: per projection, ceil(keep · rows · cols)
 * entries spread evenly over the rows, one random column in each stride of a row (ascending). */
typedef struct delta_pool {
    ds_delta_module mod[DS_PROJ_COUNT];
} delta_pool;

static int delta_pool_init(delta_pool *dp, const ds_model_config *c, double keep) {
    for (int p = 0; p < DS_PROJ_COUNT; p++) {
        int32_t in, out;
        proj_dims(c, p, &in, &out);
        const int64_t k = (int64_t)ceil(keep * (double)in * out - 1e-9);
        ds_delta_module *m = &dp->mod[p];
        *m = (ds_delta_module){.rows = out, .cols = in, .nnz = k};
        m->row_ptr = malloc(sizeof(int32_t) * ((size_t)out + 1));
        m->col = malloc(sizeof(int32_t) * (size_t)(k ? k : 1));
        m->val = rand_vec((size_t)(k ? k : 1));
        if (!m->row_ptr || !m->col || !m->val) return DS_ENOMEM;
        int32_t e = 0;
        m->row_ptr[0] = 0;
        for (int32_t r = 0; r < out; r++) {
            const int32_t nr = (int32_t)(k / out + (r < k % out)), stride = nr ? in / nr : 0;
            for (int32_t j = 0; j < nr; j++) {
                g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
                m->col[e++] = j * stride + (int32_t)((g_rng >> 33) % (uint64_t)stride);
            }
            m->row_ptr[r + 1] = e;
        }
    }
    return 0;
}

static void delta_pool_free(delta_pool *dp) {
    for (int p = 0; p < DS_PROJ_COUNT; p++) free(dp->mod[p].row_ptr), free(dp->mod[p].col), free(dp->mod[p].val);
}

/* A synthetic delta adapter on every projection of every layer (the pool's modules, shared). */
static ds_adapter *make_delta(const ds_model *m, delta_pool *dp, int idx) {
    const ds_model_config *c = &m->cfg;
    ds_adapter *a = calloc(1, sizeof *a);
    if (!a) return NULL;
    char name[32];
    snprintf(name, sizeof name, "bench-delta-%d", idx);
    a->name = strdup(name);
    a->kind = DS_ADAPTER_DELTA;
    a->n_layer = c->n_layer;
    a->d_model = c->d_model;
    a->delta = calloc((size_t)c->n_layer * DS_PROJ_COUNT, sizeof *a->delta);
    if (!a->name || !a->delta) return free(a->name), free(a->delta), free(a), NULL;
    for (int p = 0; p < DS_PROJ_COUNT; p++) proj_dims(c, p, &a->proj_in[p], &a->proj_out[p]);
    for (size_t i = 0; i < (size_t)c->n_layer * DS_PROJ_COUNT; i++) a->delta[i] = &dp->mod[i % DS_PROJ_COUNT];
    return a;
}

static void free_any(ds_adapter *a, int n_proj) {
    if (n_proj > 0) free_lora(a);
    else if (n_proj == 0) free_bn(a);
    else if (a) free(a->delta), free(a->name), free(a); /* modules belong to the pool */
}

/* One step: n_seqs sequences each feeding n_tok tokens; seq i uses devs[i] (NULL = base). */
static int step(bench *B, int n_seqs, int n_tok, const ds_adapter_dev **devs) {
    if (n_seqs > B->max_seqs || n_seqs * n_tok > B->max_tokens) return DS_EINVAL;
    const int T = B->max_tokens;
    int32_t *tokens = B->tok, *pos = tokens + T, *seq = pos + T, *kv = seq + T, *out = kv + T;
    int t = 0, n_segs = 0;
    for (int s = 0; s < n_seqs; s++) {
        int start = t;
        for (int j = 0; j < n_tok; j++, t++) {
            tokens[t] = (int32_t)((7 + 13 * (B->n_past[s] + j) + s) % B->m->cfg.n_vocab);
            pos[t] = kv[t] = B->n_past[s] + j;
            seq[t] = s;
        }
        out[s] = t - 1;
        B->n_past[s] += n_tok;
        if (!devs || !devs[s]) continue;
        ds_adapter_seg *prev = n_segs ? &B->segs[n_segs - 1] : NULL;
        if (prev && devs[prev->slot] == devs[s] && prev->start + prev->len == start) prev->len += t - start;
        else B->segs[n_segs++] = (ds_adapter_seg){start, t - start, s};
    }
    ds_adapter_batch ad = {.slots = devs, .segs = B->segs, .n_segs = n_segs};
    ds_batch b = {.n_tokens = t, .tokens = tokens, .pos = pos, .tok_seq = seq, .tok_kv = kv, .n_seqs = n_seqs,
                  .block_tables = B->tables, .max_blocks = B->blocks, .n_out = n_seqs, .out_rows = out};
    ds_err err = {{0}};
    int st = devs ? ds_adapter_plan_build(B->plan, &ad, &b) : DS_OK;
    if (!st) st = ds_llama_forward(B->L, &b, devs ? B->plan : NULL, B->logits, &err);
    if (st) fprintf(stderr, "forward failed: %s\n", err.msg);
    return st;
}

static void reset(bench *B) { memset(B->n_past, 0, sizeof *B->n_past * (size_t)B->max_seqs); }

/* Decode tokens/s for n_seqs sequences after a short prefill (DECODE_PROMPT tokens each). */
static double decode_tps(bench *B, int n_seqs, int steps, const ds_adapter_dev **devs) {
    reset(B);
    if (step(B, n_seqs, DECODE_PROMPT, devs) || step(B, n_seqs, 1, devs)) return 0; /* prefill, warm-up */
    double t0 = ds_time_s();
    for (int i = 0; i < steps; i++)
        if (step(B, n_seqs, 1, devs)) return 0;
    return (double)steps * n_seqs / (ds_time_s() - t0);
}

static double prefill_tps(bench *B, int n_seqs, int n_tok, int reps) {
    double best = 0;
    for (int r = 0; r < reps; r++) {
        reset(B);
        double t0 = ds_time_s();
        if (step(B, n_seqs, n_tok, NULL)) return 0;
        double tps = (double)n_seqs * n_tok / (ds_time_s() - t0);
        if (tps > best) best = tps;
    }
    return best;
}

static int parse_list(const char *s, int *out) {
    int n = 0;
    while (*s && n < MAX_LIST) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < 0 || v > 100000 || (*end && *end != ',')) return -1;
        out[n++] = (int)v;
        s = *end ? end + 1 : end;
    }
    return n;
}

static void usage(FILE *f) {
    fprintf(f, "usage: bench_model [-m MODEL | --shape llama3-8b|tiny] [--backend cpu|cuda] [--threads N] [--batch N]\n"
               "                   [--adapters 1,4,16] [--targets qkvo|all|both] [--rank R] [--steps N] [--f32]\n"
               "                   [--bn-rf RF] [--delta-keep P] [--copy-mb N] [--json FILE]\n");
}

static int parse(int argc, char **argv, opts *o) {
    *o = (opts){.model = "models/SmolLM2-135M-Instruct.Q4_1.gguf", .backend = "cpu", .rank = 16, .steps = 32,
                .bn_rf = 16, .delta_keep = 1.0};
    const char *ads = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--f32")) {
            o->f32 = true;
            continue;
        }
        if (!strcmp(a, "--help")) return usage(stdout), 1;
        if (!v) return usage(stderr), 2;
        if (!strcmp(a, "-m")) o->model = v;
        else if (!strcmp(a, "--shape")) o->shape = v;
        else if (!strcmp(a, "--backend")) o->backend = v;
        else if (!strcmp(a, "--threads")) o->threads = atoi(v);
        else if (!strcmp(a, "--rank")) o->rank = atoi(v);
        else if (!strcmp(a, "--steps")) o->steps = atoi(v);
        else if (!strcmp(a, "--batch")) o->batch = atoi(v);
        else if (!strcmp(a, "--copy-mb")) o->copy_mb = atoi(v);
        else if (!strcmp(a, "--bn-rf")) o->bn_rf = atoi(v);
        else if (!strcmp(a, "--delta-keep")) o->delta_keep = atof(v);
        else if (!strcmp(a, "--adapters")) ads = v;
        else if (!strcmp(a, "--targets")) o->targets = v;
        else if (!strcmp(a, "--json")) o->json = v;
        else return fprintf(stderr, "bench_model: unknown option %s\n", a), usage(stderr), 2;
        i++;
    }
    if (!o->batch) o->batch = o->shape ? 128 : 16;
    if (!o->targets) o->targets = o->shape ? "both" : "qkvo";
    if (!ads) ads = o->shape ? "1,10,100" : "1,4,16";
    o->n_adapters = parse_list(ads, o->adapters);
    if (o->n_adapters <= 0 || o->batch <= 0 || o->rank <= 0 || o->steps <= 0 || o->bn_rf < 0 ||
        !(o->delta_keep >= 0 && o->delta_keep <= 100))
        return fprintf(stderr, "bench_model: bad --adapters/--batch/--rank/--steps/--bn-rf/--delta-keep\n"), 2;
    if (strcmp(o->targets, "qkvo") && strcmp(o->targets, "all") && strcmp(o->targets, "both"))
        return fprintf(stderr, "bench_model: --targets is qkvo, all or both\n"), 2;
    return 0;
}

static int bench_init(bench *B, const ds_model *m, ds_backend *be, int batch, int steps, ds_err *err) {
    const ds_model_config *c = &m->cfg;
    memset(B, 0, sizeof *B);
    B->m = m;
    B->b = be;
    B->max_seqs = batch > 4 ? batch : 4;
    int per_seq = DECODE_PROMPT + steps + 2;
    if (per_seq < PREFILL_LEN) per_seq = PREFILL_LEN;
    B->max_tokens = batch * DECODE_PROMPT > 4 * PREFILL_LEN ? batch * DECODE_PROMPT : 4 * PREFILL_LEN;
    ds_llama_params lp = ds_llama_default_params();
    lp.max_tokens = B->max_tokens;
    lp.max_seqs = B->max_seqs;
    lp.max_out = B->max_seqs; /* one logits row per sequence: 128 × 128256 floats, not 2048 × */
    B->blocks = (per_seq + lp.kv_block_size - 1) / lp.kv_block_size + 1;
    lp.n_kv_blocks = B->max_seqs * B->blocks;
    lp.max_blocks_per_seq = B->blocks;
    B->L = ds_llama_create(m, be, &lp, err);
    if (!B->L) return -1;
    B->tables = malloc(sizeof(int32_t) * (size_t)lp.n_kv_blocks);
    B->n_past = calloc((size_t)B->max_seqs, sizeof(int32_t));
    B->tok = malloc(sizeof(int32_t) * 5 * (size_t)B->max_tokens);
    B->segs = calloc((size_t)B->max_seqs, sizeof *B->segs);
    B->logits = malloc(sizeof(float) * (size_t)B->max_seqs * (size_t)c->n_vocab);
    if (!(B->plan = ds_adapter_plan_create(B->L, B->max_seqs, B->max_tokens, err))) return -1;
    if (!B->tables || !B->n_past || !B->tok || !B->segs || !B->logits)
        return ds_err_set(err, DS_ENOMEM, "out of memory for the benchmark's buffers"), -1;
    for (int i = 0; i < lp.n_kv_blocks; i++) B->tables[i] = i;
    return 0;
}

static void bench_free(bench *B) {
    ds_adapter_plan_free(B->plan);
    free(B->tables), free(B->n_past), free(B->tok), free(B->segs);
    free(B->logits);
    ds_llama_free(B->L);
}

/* Decode tokens/s of the batch with each adapter count of o->adapters: LoRA adapters on n_proj
 * projections, or (n_proj 0) bottleneck adapters, or (n_proj < 0) sparse delta adapters; tps[k] per
 * count (0 where it failed). Adapters are uploaded for this run only; *dev_bytes (may be NULL) gets
 * one adapter's resident bytes. */
static int adapter_runs(bench *B, const opts *o, int n_proj, double *tps, size_t *dev_bytes) {
    int max_ad = 0;
    for (int k = 0; k < o->n_adapters; k++) max_ad = o->adapters[k] > max_ad ? o->adapters[k] : max_ad;
    if (max_ad > o->batch) max_ad = o->batch;
    lora_pool pl;
    bn_pool bp;
    delta_pool dp;
    memset(&pl, 0, sizeof pl);
    memset(&bp, 0, sizeof bp);
    memset(&dp, 0, sizeof dp);
    ds_adapter **ads = calloc((size_t)max_ad + 1, sizeof *ads);
    ds_adapter_dev *devs = calloc((size_t)max_ad + 1, sizeof *devs);
    const ds_adapter_dev **per_seq = calloc((size_t)o->batch, sizeof *per_seq);
    int32_t bn_size = o->bn_rf > 0 ? B->m->cfg.d_model / o->bn_rf : 0;
    int st = !ads || !devs || !per_seq ? DS_ENOMEM
             : n_proj > 0 ? pool_init(&pl, &B->m->cfg, o->rank)
             : n_proj < 0 ? delta_pool_init(&dp, &B->m->cfg, o->delta_keep / 100.0)
                          : bn_pool_init(&bp, &B->m->cfg, bn_size > 0 ? bn_size : 1);
    int n_up = 0;
    ds_err err = {{0}};
    for (; !st && n_up < max_ad; n_up++) {
        ads[n_up] = n_proj > 0 ? make_lora(B->m, &pl, o->rank, n_proj, n_up)
                    : n_proj < 0 ? make_delta(B->m, &dp, n_up)
                                 : make_bn(B->m, &bp, n_up);
        if (!ads[n_up]) st = DS_ENOMEM;
        else if ((st = ds_adapter_dev_upload(B->b, ads[n_up], &devs[n_up], &err))) fprintf(stderr, "%s\n", err.msg);
        if (st) {
            free_any(ads[n_up], n_proj);
            ads[n_up] = NULL;
        }
    }
    for (int k = 0; k < o->n_adapters && !st; k++) {
        const int n = o->adapters[k] < o->batch ? o->adapters[k] : o->batch;
        /* slot index == sequence index in step(); sequences sharing an adapter are adjacent and
         * form one segment, as the engine's batch does */
        for (int s = 0; s < o->batch; s++) per_seq[s] = n ? &devs[(int64_t)s * n / o->batch] : NULL;
        tps[k] = decode_tps(B, o->batch, o->steps, n ? per_seq : NULL);
    }
    if (dev_bytes && n_up > 0) *dev_bytes = devs[0].dev_bytes;
    for (int i = 0; i < n_up; i++) {
        ds_adapter_dev_release(B->b, &devs[i]);
        free_any(ads[i], n_proj);
    }
    pool_free(&pl);
    bn_pool_free(&bp);
    delta_pool_free(&dp);
    free(ads), free(devs), free(per_seq);
    return st;
}

typedef struct results {
    double bw, pf1, pf4, dec1, floor_bytes, floor_tps, base;
    double tq[MAX_LIST], ta[MAX_LIST]; /* per adapter count: on q,k,v,o / on all seven */
    double tb[MAX_LIST];               /* per adapter count: bottleneck adapters */
    double td[MAX_LIST];               /* per adapter count: sparse delta adapters */
    size_t delta_bytes;                /* one delta adapter's resident bytes */
    bool qkvo, all, bn, delta, failed;
} results;

static ds_model *load_model(opts *o, ds_err *err) {
    if (!o->shape) {
        ds_model_params mp = ds_model_default_params();
        return ds_model_load(o->model, &mp, err);
    }
    bench_random_params rp = {.shape = o->shape, .bf16 = !o->f32 && bench_random_bf16_supported(), .seed = 1};
    if (!o->f32 && !rp.bf16) printf("note: this build's model struct is fp32-only: fp32 weights\n");
    o->f32 = !rp.bf16;
    double t0 = ds_time_s();
    ds_model *m = bench_random_model(&rp, err);
    if (m) printf("random %s model (%s weights) built in %.1f s\n", o->shape, o->f32 ? "fp32" : "bf16", ds_time_s() - t0);
    return m;
}

static void measure(bench *B, const opts *o, results *r) {
    const ds_model_config *c = &B->m->cfg;
    r->pf1 = prefill_tps(B, 1, PREFILL_LEN, 3);
    r->pf4 = prefill_tps(B, 4, PREFILL_LEN, 2);
    r->dec1 = decode_tps(B, 1, o->steps, NULL);
    /* Floor of one batch-1 decode step: every matrix (CUDA stores bf16; the CPU its own format,
     * known here only for random models) and the fp32 KV read at the mean context. */
    double elem = !strcmp(B->b->iface->name, "cuda") ? 2.0 : (o->shape ? (o->f32 ? 4.0 : 2.0) : 0.0);
    double kv = 2.0 * 4.0 * c->n_layer * (double)c->n_kv_head * c->head_dim * (DECODE_PROMPT + 1 + o->steps / 2.0);
    r->floor_bytes = elem > 0 ? bench_model_matrix_bytes(c, elem) + kv : 0;
    r->floor_tps = r->floor_bytes > 0 && r->bw > 0 ? r->bw / r->floor_bytes : 0;
    r->base = decode_tps(B, o->batch, o->steps, NULL);
    r->qkvo = strcmp(o->targets, "all") != 0;
    r->all = strcmp(o->targets, "qkvo") != 0;
    r->bn = o->bn_rf > 0 && B->b->iface->bottleneck; /* optional op: CUDA has none yet */
    if (r->qkvo && adapter_runs(B, o, 4, r->tq, NULL)) fprintf(stderr, "bench_model: adapters on q,k,v,o failed\n"), r->failed = true;
    if (r->all && adapter_runs(B, o, DS_PROJ_COUNT, r->ta, NULL))
        fprintf(stderr, "bench_model: adapters on all projections failed\n"), r->failed = true;
    if (r->bn && adapter_runs(B, o, 0, r->tb, NULL)) fprintf(stderr, "bench_model: bottleneck adapters failed\n"), r->failed = true;
    r->delta = o->delta_keep > 0 && B->b->iface->sparse;
    if (r->delta && adapter_runs(B, o, -1, r->td, &r->delta_bytes))
        fprintf(stderr, "bench_model: delta adapters failed\n"), r->failed = true;
    r->failed |= !(r->pf1 > 0 && r->pf4 > 0 && r->dec1 > 0 && r->base > 0);
}

static void print_report(const opts *o, const ds_model *m, const results *r) {
    printf("model: %s (%s backend)\n", o->shape ? m->cfg.name : o->model, o->backend);
    printf("copy bandwidth (read+write)       : %8.1f GB/s\n", r->bw / 1e9);
    printf("prefill  batch 1 x %d tokens     : %8.1f tokens/s\n", PREFILL_LEN, r->pf1);
    printf("prefill  batch 4 x %d tokens     : %8.1f tokens/s\n", PREFILL_LEN, r->pf4);
    if (r->floor_tps > 0)
        printf("decode   batch 1                  : %8.1f tokens/s (floor %.1f tokens/s: %.2f GB at %.0f GB/s; %.0f%% of it)\n",
               r->dec1, r->floor_tps, r->floor_bytes / 1e9, r->bw / 1e9, 100.0 * r->dec1 / r->floor_tps);
    else
        printf("decode   batch 1                  : %8.1f tokens/s\n", r->dec1);
    printf("decode   batch %3d, base only     : %8.1f tokens/s\n", o->batch, r->base);
    for (int t = 0; t < 2; t++)
        for (int k = 0; k < o->n_adapters && (t ? r->all : r->qkvo); k++) {
            double v = t ? r->ta[k] : r->tq[k];
            printf("decode   batch %3d, %3d LoRA r%-2d %-4s: %8.1f tokens/s (%.2fx base)\n", o->batch, o->adapters[k],
                   o->rank, t ? "all" : "qkvo", v, r->base > 0 ? v / r->base : 0);
        }
    if (o->bn_rf > 0 && !r->bn) printf("bottleneck adapters: the %s backend has no bottleneck op\n", o->backend);
    for (int k = 0; k < o->n_adapters && r->bn; k++)
        printf("decode   batch %3d, %3d Houlsby bn %-4d: %8.1f tokens/s (%.2fx base)\n", o->batch, o->adapters[k],
               m->cfg.d_model / o->bn_rf, r->tb[k], r->base > 0 ? r->tb[k] / r->base : 0);
    if (o->delta_keep > 0 && !r->delta) printf("delta adapters: the %s backend has no sparse op\n", o->backend);
    for (int k = 0; k < o->n_adapters && r->delta; k++)
        printf("decode   batch %3d, %3d delta %4.3g%%  : %8.1f tokens/s (%.2fx base)\n", o->batch, o->adapters[k],
               o->delta_keep, r->td[k], r->base > 0 ? r->td[k] / r->base : 0);
    if (r->delta)
        printf("delta %.3g%%: %.2f MiB resident per adapter (%.2f%% of the model's %zu weights in fp32)\n",
               o->delta_keep, r->delta_bytes / 1048576.0, 100.0 * (double)r->delta_bytes / (4.0 * (double)m->n_params),
               m->n_params);
}

static void write_json(const opts *o, const results *r) {
    FILE *f = fopen(o->json, "w");
    if (!f) return (void)fprintf(stderr, "bench_model: cannot write %s\n", o->json);
    fprintf(f, "{\"model\":\"%s\",\"backend\":\"%s\",\"rank\":%d,\"steps\":%d,\"batch\":%d,\"copy_bytes_per_s\":%.6g,"
               "\"prefill_b1_tps\":%.2f,\"prefill_b4_tps\":%.2f,\"decode_b1_tps\":%.2f,\"decode_b1_floor_tps\":%.2f,"
               "\"decode_b1_floor_bytes\":%.6g,\"decode_base_tps\":%.2f,\"lora\":[",
            o->shape ? o->shape : o->model, o->backend, o->rank, o->steps, o->batch, r->bw, r->pf1, r->pf4, r->dec1,
            r->floor_tps, r->floor_bytes, r->base);
    int first = 1;
    for (int t = 0; t < 2; t++)
        for (int k = 0; k < o->n_adapters && (t ? r->all : r->qkvo); k++, first = 0)
            fprintf(f, "%s{\"targets\":\"%s\",\"adapters\":%d,\"tps\":%.2f}", first ? "" : ",", t ? "all" : "qkvo",
                    o->adapters[k], t ? r->ta[k] : r->tq[k]);
    fprintf(f, "],\"bottleneck_rf\":%d,\"bottleneck\":[", o->bn_rf);
    for (int k = 0; k < o->n_adapters && r->bn; k++)
        fprintf(f, "%s{\"kind\":\"double_seq_bn\",\"adapters\":%d,\"tps\":%.2f}", k ? "," : "", o->adapters[k], r->tb[k]);
    fprintf(f, "],\"delta_keep_percent\":%.6g,\"delta_bytes\":%zu,\"delta\":[", o->delta_keep, r->delta_bytes);
    for (int k = 0; k < o->n_adapters && r->delta; k++)
        fprintf(f, "%s{\"adapters\":%d,\"tps\":%.2f}", k ? "," : "", o->adapters[k], r->td[k]);
    fprintf(f, "]}\n");
    fclose(f);
}

int main(int argc, char **argv) {
    ds_cpu_env_reexec(argv); /* the server's OpenMP wait policy (src/main.c) */
    setvbuf(stdout, NULL, _IOLBF, 0); /* progress survives a timeout kill under a pipe */
    opts o;
    int rc = parse(argc, argv, &o);
    if (rc) return rc == 1 ? 0 : rc;
    ds_err err = {{0}};
    ds_backend_params bp = ds_backend_default_params();
    bp.n_threads = o.threads;
    ds_backend *be = ds_backend_create(o.backend, &bp, &err); /* first: no 16 GB model for nothing */
    if (!be) return fprintf(stderr, "bench_model: %s\n", err.msg), 1;
    ds_model *m = load_model(&o, &err);
    if (!m) return fprintf(stderr, "bench_model: %s\n", err.msg), ds_backend_free(be), 1;
    results r = {.bw = bench_copy_bandwidth(be, o.copy_mb ? o.copy_mb : bench_copy_mb_default(o.backend))};
    bench B;
    double t0 = ds_time_s();
    if (bench_init(&B, m, be, o.batch, o.steps, &err)) {
        fprintf(stderr, "bench_model: %s\n", err.msg);
        r.failed = true;
    } else {
        printf("weights on the %s backend in %.1f s\n", o.backend, ds_time_s() - t0);
        measure(&B, &o, &r);
        print_report(&o, m, &r);
        if (o.json) write_json(&o, &r);
    }
    bench_free(&B);
    ds_backend_free(be);
    ds_model_free(m);
    return r.failed ? 1 : 0;
}
