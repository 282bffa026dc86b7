/* bench_pp_tg: deltaserve's answer to llama-bench's pp/tg test on one GGUF (or HF directory), so
 * the two can be compared on the same file (bench/peer/quant_bench.sh, issue 15).
 *
 *   build/bench_pp_tg [-m MODEL] [-p 512] [-n 128] [-d 0] [-t THREADS] [-r REPS] [--backend cpu|cuda]
 *
 * Same definitions as llama-bench: ppN is one batch of N prompt tokens into an empty KV cache
 * (tokens/s = N / time); tgN is N single-token decode steps starting from an empty cache
 * (tokens/s = N / time). -d D (llama-bench's depth): both start after D tokens already in the
 * cache (filled once, in prompt-sized steps, before the runs), so attention over D keys is part of
 * every step. One warm-up run of each first, then REPS runs; the mean and standard
 * deviation of the per-run tokens/s are reported (llama-bench's avg_ts / stddev_ts). Memory: VmRSS
 * and VmHWM from /proc/self/status after loading (ds_llama with its KV pool and activations, and the
 * pages of the mapped GGUF touched so far) and at the end (every weight page touched). One JSON
 * object on stdout; progress on stderr. Uses the public API only. */
#include "ds/model.h"
#include "backend/cpu/cpu_env.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct run {
    ds_llama *L;
    int32_t n_vocab, n_blocks;
    int32_t *tokens, *pos, *seq, *kv, *table;
    float *logits;
} run;

/* VmRSS and VmHWM in kB (0 when /proc is not there). */
static void mem_kb(long *rss, long *hwm) {
    *rss = *hwm = 0;
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return;
    char line[256];
    while (fgets(line, sizeof line, f)) {
        if (!strncmp(line, "VmRSS:", 6)) *rss = atol(line + 6);
        else if (!strncmp(line, "VmHWM:", 6)) *hwm = atol(line + 6);
    }
    fclose(f);
}

/* One forward step of n tokens of sequence 0 at positions start..start+n-1; logits of the last. */
static int step(run *R, int32_t start, int32_t n) {
    for (int32_t i = 0; i < n; i++) {
        /* any valid ids do: speed does not depend on them (llama-bench uses random ones) */
        R->tokens[i] = (int32_t)((1000u + 7919u * (uint32_t)(start + i)) % (uint32_t)R->n_vocab);
        R->pos[i] = R->kv[i] = start + i;
        R->seq[i] = 0;
    }
    const int32_t out = n - 1;
    ds_batch b = {.n_tokens = n, .tokens = R->tokens, .pos = R->pos, .tok_seq = R->seq, .tok_kv = R->kv,
                  .n_seqs = 1, .block_tables = R->table, .max_blocks = R->n_blocks, .n_out = 1, .out_rows = &out};
    ds_err err = {{0}};
    int st = ds_llama_forward(R->L, &b, NULL, R->logits, &err);
    if (st) fprintf(stderr, "bench_pp_tg: forward failed: %s\n", err.msg);
    return st;
}

/* Tokens/s of one prompt of n tokens after `depth` cached ones (the rest of the cache is simply
 * overwritten). */
static double pp_once(run *R, int32_t depth, int32_t n) {
    double t0 = ds_time_s();
    if (step(R, depth, n)) return -1;
    return n / (ds_time_s() - t0);
}

static double tg_once(run *R, int32_t depth, int32_t n) {
    double t0 = ds_time_s();
    for (int32_t i = 0; i < n; i++)
        if (step(R, depth + i, 1)) return -1;
    return n / (ds_time_s() - t0);
}

static void stats(const double *v, int n, double *mean, double *sd) {
    double s = 0, q = 0;
    for (int i = 0; i < n; i++) s += v[i];
    *mean = n ? s / n : 0;
    for (int i = 0; i < n; i++) q += (v[i] - *mean) * (v[i] - *mean);
    *sd = n > 1 ? sqrt(q / (n - 1)) : 0; /* llama-bench: sample standard deviation */
}

static void print_samples(const char *key, const double *v, int n) {
    printf("  \"%s\": [", key);
    for (int i = 0; i < n; i++) printf("%s%.3f", i ? ", " : "", v[i]);
    printf("],\n");
}

static void json_str(const char *key, const char *s) {
    printf("  \"%s\": \"", key);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') putchar('\\');
        if ((unsigned char)*s >= 0x20) putchar(*s);
    }
    printf("\",\n");
}

static int usage(int rc) {
    fprintf(rc ? stderr : stdout,
            "usage: bench_pp_tg [-m MODEL] [-p N_PROMPT] [-n N_GEN] [-d DEPTH] [-t THREADS] [-r REPS]\n"
            "                   [--backend cpu|cuda] [--int8-activations]\n"
            "  -d DEPTH  tokens already in the KV cache before each test (llama-bench -d; default 0)\n");
    return rc;
}

int main(int argc, char **argv) {
    ds_cpu_env_reexec(argv); /* the server's OpenMP wait policy (src/main.c) */
    const char *model = "models/SmolLM2-135M-Instruct.Q4_1.gguf", *backend = "cpu";
    int n_prompt = 512, n_gen = 128, depth = 0, threads = 0, reps = 5;
    bool int8_act = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) return usage(0);
        if (!strcmp(a, "--int8-activations")) {
            int8_act = true;
            continue;
        }
        if (!v) return usage(2);
        if (!strcmp(a, "-m")) model = v;
        else if (!strcmp(a, "-p")) n_prompt = atoi(v);
        else if (!strcmp(a, "-n")) n_gen = atoi(v);
        else if (!strcmp(a, "-d")) depth = atoi(v);
        else if (!strcmp(a, "-t")) threads = atoi(v);
        else if (!strcmp(a, "-r")) reps = atoi(v);
        else if (!strcmp(a, "--backend")) backend = v;
        else return usage(2);
        i++;
    }
    if (n_prompt < 0 || n_gen < 0 || depth < 0 || depth > (1 << 20) || reps < 1 || reps > 100 || n_prompt + n_gen == 0) return usage(2);

    long rss0, hwm0, rss_load, hwm_load, rss_end, hwm_end;
    mem_kb(&rss0, &hwm0);
    ds_err err = {{0}};
    double t0 = ds_time_s();
    ds_model_params mp = ds_model_default_params();
    mp.verbose = false;
    ds_model *m = ds_model_load(model, &mp, &err);
    if (!m) return fprintf(stderr, "bench_pp_tg: %s\n", err.msg), 1;
    ds_backend_params bp = ds_backend_default_params();
    bp.n_threads = threads;
    bp.int8_activations = int8_act;
    ds_backend *be = ds_backend_create(backend, &bp, &err);
    if (!be) return fprintf(stderr, "bench_pp_tg: %s\n", err.msg), 1;

    /* One sequence, a KV pool just big enough for the longer test: memory stays what the model needs. */
    ds_llama_params lp = ds_llama_default_params();
    const int32_t longest = depth + (n_prompt > n_gen ? n_prompt : n_gen);
    lp.max_tokens = n_prompt > 1 ? n_prompt : depth > 0 ? (depth < 512 ? depth : 512) : 1;
    lp.max_seqs = 1;
    lp.max_out = 1; /* one logits row per step: the logits buffer is one vocabulary row */
    lp.max_blocks_per_seq = (longest + lp.kv_block_size - 1) / lp.kv_block_size + 1; /* + 1: the pool's minimum is 2 */
    lp.n_kv_blocks = lp.max_blocks_per_seq;
    run R = {.n_vocab = m->cfg.n_vocab, .n_blocks = lp.max_blocks_per_seq};
    R.L = ds_llama_create(m, be, &lp, &err);
    if (!R.L) return fprintf(stderr, "bench_pp_tg: %s\n", err.msg), 1;
    const double load_s = ds_time_s() - t0;
    mem_kb(&rss_load, &hwm_load);

    const size_t nt = (size_t)lp.max_tokens;
    R.tokens = malloc(nt * sizeof(int32_t));
    R.pos = malloc(nt * sizeof(int32_t));
    R.seq = malloc(nt * sizeof(int32_t));
    R.kv = malloc(nt * sizeof(int32_t));
    R.table = malloc((size_t)R.n_blocks * sizeof(int32_t));
    R.logits = malloc((size_t)m->cfg.n_vocab * sizeof(float));
    if (!R.tokens || !R.pos || !R.seq || !R.kv || !R.table || !R.logits) return fprintf(stderr, "out of memory\n"), 1;
    for (int32_t i = 0; i < R.n_blocks; i++) R.table[i] = i;

    double *pp = calloc((size_t)reps, sizeof(double)), *tg = calloc((size_t)reps, sizeof(double));
    int failed = 0;
    if (depth > 0) fprintf(stderr, "bench_pp_tg: filling %d tokens of context\n", depth);
    for (int32_t d = 0; d < depth && !failed; d += lp.max_tokens)
        failed |= step(&R, d, depth - d < lp.max_tokens ? depth - d : lp.max_tokens) != 0;
    if (n_prompt > 0) {
        fprintf(stderr, "bench_pp_tg: pp%d warm-up + %d runs\n", n_prompt, reps);
        failed |= pp_once(&R, depth, n_prompt) < 0;
        for (int r = 0; r < reps && !failed; r++) failed |= (pp[r] = pp_once(&R, depth, n_prompt)) < 0;
    }
    if (n_gen > 0 && !failed) {
        fprintf(stderr, "bench_pp_tg: tg%d warm-up + %d runs\n", n_gen, reps);
        failed |= step(&R, depth, 1) != 0; /* llama-bench warms tg up with one token */
        for (int r = 0; r < reps && !failed; r++) failed |= (tg[r] = tg_once(&R, depth, n_gen)) < 0;
    }
    mem_kb(&rss_end, &hwm_end);
    if (failed) return 1;

    double pp_mean, pp_sd, tg_mean, tg_sd;
    stats(pp, n_prompt > 0 ? reps : 0, &pp_mean, &pp_sd);
    stats(tg, n_gen > 0 ? reps : 0, &tg_mean, &tg_sd);
    const ds_model_config *c = &m->cfg;
    printf("{\n");
    json_str("model", model);
    json_str("backend", backend);
    printf("  \"n_vocab\": %d, \"d_model\": %d, \"n_layer\": %d, \"n_head\": %d, \"n_kv_head\": %d, \"d_ff\": %d,\n",
           c->n_vocab, c->d_model, c->n_layer, c->n_head, c->n_kv_head, c->d_ff);
    printf("  \"n_params\": %zu,\n", m->n_params);
    printf("  \"threads\": %d, \"n_prompt\": %d, \"n_gen\": %d, \"depth\": %d, \"reps\": %d,\n", threads, n_prompt,
           n_gen, depth, reps);
    printf("  \"load_s\": %.3f,\n", load_s);
    printf("  \"pp_tps\": %.3f, \"pp_tps_sd\": %.3f,\n", pp_mean, pp_sd);
    printf("  \"tg_tps\": %.3f, \"tg_tps_sd\": %.3f,\n", tg_mean, tg_sd);
    print_samples("pp_samples", pp, n_prompt > 0 ? reps : 0);
    print_samples("tg_samples", tg, n_gen > 0 ? reps : 0);
    printf("  \"rss_start_kb\": %ld, \"rss_load_kb\": %ld, \"hwm_load_kb\": %ld,\n", rss0, rss_load, hwm_load);
    printf("  \"rss_end_kb\": %ld, \"hwm_end_kb\": %ld\n", rss_end, hwm_end);
    printf("}\n");

    free(pp);
    free(tg);
    free(R.tokens);
    free(R.pos);
    free(R.seq);
    free(R.kv);
    free(R.table);
    free(R.logits);
    ds_llama_free(R.L);
    ds_backend_free(be);
    ds_model_free(m);
    return 0;
}
