/* bench_model: prefill and decode throughput of the forward pass on a real model, and decode
 * throughput of a 16-sequence batch with 0 (base only), 1, 4 and 16 distinct LoRA adapters —
 * all measured in one run, side by side. Prints a table and (with --json FILE) raw results.
 *
 *   build/bench_model [-m MODEL] [--backend cpu|cuda] [--threads N] [--rank R] [--steps N] [--json FILE]
 *
 * Adapters are synthetic (random rank-R LoRA on q,k,v,o of every layer): only their shapes matter
 * for speed. */
#include "ds/adapter.h"
#include "ds/model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SEQS 16
#define BLOCKS 40

typedef struct bench {
    ds_llama *L;
    const ds_model *m;
    ds_backend *b;
    float *logits, *scratch;
    int32_t tables[MAX_SEQS * BLOCKS];
    int32_t n_past[MAX_SEQS];
} bench;

static double now(void) { return ds_time_s(); }

static uint64_t g_rng = 88172645463325252ull;
static float frand(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return ((float)(g_rng >> 40) / (float)(1 << 24) - 0.5f) * 0.02f;
}

static float *rand_vec(size_t n) {
    float *v = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) v[i] = frand();
    return v;
}

/* A synthetic LoRA adapter: rank r on q,k,v,o of every layer. */
static ds_adapter *make_lora(const ds_model *m, int32_t r, int idx) {
    const ds_model_config *c = &m->cfg;
    ds_adapter *a = calloc(1, sizeof *a);
    char name[32];
    snprintf(name, sizeof name, "bench-%d", idx);
    a->name = strdup(name);
    a->kind = DS_ADAPTER_LORA;
    a->n_layer = c->n_layer;
    a->d_model = c->d_model;
    a->lora = calloc((size_t)c->n_layer * DS_PROJ_COUNT, sizeof *a->lora);
    const int32_t qd = c->n_head * c->head_dim, kvd = c->n_kv_head * c->head_dim;
    const int32_t outs[4] = {qd, kvd, kvd, c->d_model}, ins[4] = {c->d_model, c->d_model, c->d_model, qd};
    for (int32_t l = 0; l < c->n_layer; l++)
        for (int p = 0; p < 4; p++) {
            ds_lora_module *mod = calloc(1, sizeof *mod);
            mod->rank = r;
            mod->in = ins[p];
            mod->out = outs[p];
            mod->scale = 2.0f;
            mod->A = rand_vec((size_t)r * ins[p]);
            mod->B = rand_vec((size_t)outs[p] * r);
            a->lora[(size_t)l * DS_PROJ_COUNT + p] = mod;
        }
    return a;
}

static void free_lora(ds_adapter *a, int32_t n_layer) {
    for (size_t i = 0; i < (size_t)n_layer * DS_PROJ_COUNT; i++)
        if (a->lora[i]) {
            free(a->lora[i]->A);
            free(a->lora[i]->B);
            free(a->lora[i]);
        }
    free(a->lora);
    free(a->name);
    free(a);
}

/* One step: n_seqs sequences each feeding n_tok tokens; seq i uses devs[i] (NULL = base). */
static int step(bench *B, int n_seqs, int n_tok, const ds_adapter_dev **devs) {
    static int32_t tokens[4096], pos[4096], seq[4096], kv[4096], out[MAX_SEQS];
    ds_adapter_seg segs[MAX_SEQS];
    ds_lora_seg lt[MAX_SEQS];
    ds_vec_seg vt[MAX_SEQS + 1];
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
        ds_adapter_seg *prev = n_segs ? &segs[n_segs - 1] : NULL;
        if (prev && devs[prev->slot] == devs[s] && prev->start + prev->len == start) prev->len += t - start;
        else segs[n_segs++] = (ds_adapter_seg){start, t - start, s};
    }
    ds_adapter_batch ad = {.slots = devs, .segs = segs, .n_segs = n_segs, .scratch = B->scratch, .lora_tmp = lt,
                           .vec_tmp = vt};
    ds_batch b = {.n_tokens = t, .tokens = tokens, .pos = pos, .tok_seq = seq, .tok_kv = kv, .n_seqs = n_seqs,
                  .block_tables = B->tables, .max_blocks = BLOCKS, .n_out = n_seqs, .out_rows = out};
    ds_err err = {{0}};
    int st = ds_llama_forward(B->L, &b, devs ? &ad : NULL, B->logits, &err);
    if (st) fprintf(stderr, "forward failed: %s\n", err.msg);
    return st;
}

static void reset(bench *B) { memset(B->n_past, 0, sizeof B->n_past); }

/* Decode tokens/s for n_seqs sequences after a short prefill (16 tokens each). */
static double decode_tps(bench *B, int n_seqs, int steps, const ds_adapter_dev **devs) {
    reset(B);
    step(B, n_seqs, 16, devs);
    step(B, n_seqs, 1, devs); /* warm-up */
    double t0 = now();
    for (int i = 0; i < steps; i++)
        if (step(B, n_seqs, 1, devs)) return 0;
    return (double)steps * n_seqs / (now() - t0);
}

static double prefill_tps(bench *B, int n_seqs, int n_tok, int reps) {
    double best = 0;
    for (int r = 0; r < reps; r++) {
        reset(B);
        double t0 = now();
        if (step(B, n_seqs, n_tok, NULL)) return 0;
        double tps = (double)n_seqs * n_tok / (now() - t0);
        if (tps > best) best = tps;
    }
    return best;
}

int main(int argc, char **argv) {
    const char *model = "models/SmolLM2-135M-Instruct.Q4_1.gguf", *backend = "cpu", *json = NULL;
    int threads = 0, rank = 16, steps = 32;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-m") && i + 1 < argc) model = argv[++i];
        else if (!strcmp(argv[i], "--backend") && i + 1 < argc) backend = argv[++i];
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--rank") && i + 1 < argc) rank = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--json") && i + 1 < argc) json = argv[++i];
        else {
            printf("usage: bench_model [-m MODEL] [--backend cpu|cuda] [--threads N] [--rank R] [--steps N] [--json FILE]\n");
            return !strcmp(argv[i], "--help") ? 0 : 2;
        }
    }
    ds_err err = {{0}};
    ds_model_params mp = ds_model_default_params();
    ds_model *m = ds_model_load(model, &mp, &err);
    if (!m) return fprintf(stderr, "bench_model: %s\n", err.msg), 1;
    ds_backend_params bp = ds_backend_default_params();
    bp.n_threads = threads;
    ds_backend *be = ds_backend_create(backend, &bp, &err);
    if (!be) return fprintf(stderr, "bench_model: %s\n", err.msg), 1;
    ds_llama_params lp = ds_llama_default_params();
    lp.max_tokens = 1024;
    lp.max_seqs = MAX_SEQS;
    lp.n_kv_blocks = MAX_SEQS * BLOCKS;
    lp.max_blocks_per_seq = BLOCKS;
    bench B = {.m = m, .b = be};
    B.L = ds_llama_create(m, be, &lp, &err);
    if (!B.L) return fprintf(stderr, "bench_model: %s\n", err.msg), 1;
    for (int i = 0; i < MAX_SEQS * BLOCKS; i++) B.tables[i] = i;
    B.logits = malloc(sizeof(float) * MAX_SEQS * (size_t)m->cfg.n_vocab);
    const size_t w = (size_t)(m->cfg.d_ff > m->cfg.d_model ? m->cfg.d_ff : m->cfg.d_model);
    B.scratch = be->iface->alloc(be->ctx, sizeof(float) * 1024 * w);

    double pf1 = prefill_tps(&B, 1, 128, 3), pf4 = prefill_tps(&B, 4, 128, 2);
    double dec1 = decode_tps(&B, 1, steps, NULL);
    ds_adapter *ads[MAX_SEQS];
    ds_adapter_dev devs[MAX_SEQS];
    for (int i = 0; i < MAX_SEQS; i++) {
        ads[i] = make_lora(m, rank, i);
        if (ds_adapter_dev_upload(be, ads[i], &devs[i], &err)) return fprintf(stderr, "%s\n", err.msg), 1;
    }
    const int n_distinct[] = {0, 1, 4, 16};
    double dec16[4];
    for (int k = 0; k < 4; k++) {
        const ds_adapter_dev *per_seq[MAX_SEQS];
        for (int s = 0; s < MAX_SEQS; s++) per_seq[s] = n_distinct[k] ? &devs[s * n_distinct[k] / MAX_SEQS] : NULL;
        /* slot index == sequence index in step(); sequences sharing an adapter are adjacent and
         * form one segment, as the engine's batch does */
        dec16[k] = decode_tps(&B, MAX_SEQS, steps, n_distinct[k] ? per_seq : NULL);
    }
    printf("model: %s (%s backend)\n", model, backend);
    printf("prefill  batch 1 x 128 tokens : %8.1f tokens/s\n", pf1);
    printf("prefill  batch 4 x 128 tokens : %8.1f tokens/s\n", pf4);
    printf("decode   batch 1              : %8.1f tokens/s\n", dec1);
    printf("decode   batch 16, base only  : %8.1f tokens/s\n", dec16[0]);
    for (int k = 1; k < 4; k++)
        printf("decode   batch 16, %2d LoRA r%-2d: %8.1f tokens/s (%.2fx base)\n", n_distinct[k], rank, dec16[k],
               dec16[k] / dec16[0]);
    if (json) {
        FILE *f = fopen(json, "w");
        if (f) {
            fprintf(f, "{\"model\":\"%s\",\"backend\":\"%s\",\"rank\":%d,\"steps\":%d,\"prefill_b1_tps\":%.2f,"
                       "\"prefill_b4_tps\":%.2f,\"decode_b1_tps\":%.2f,\"decode_b16_base_tps\":%.2f,"
                       "\"decode_b16_lora1_tps\":%.2f,\"decode_b16_lora4_tps\":%.2f,\"decode_b16_lora16_tps\":%.2f}\n",
                    model, backend, rank, steps, pf1, pf4, dec1, dec16[0], dec16[1], dec16[2], dec16[3]);
            fclose(f);
        }
    }
    for (int i = 0; i < MAX_SEQS; i++) {
        ds_adapter_dev_release(be, &devs[i]);
        free_lora(ads[i], m->cfg.n_layer);
    }
    be->iface->release(be->ctx, B.scratch);
    free(B.logits);
    ds_llama_free(B.L);
    ds_backend_free(be);
    ds_model_free(m);
    return 0;
}
