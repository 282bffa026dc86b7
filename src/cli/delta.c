/* deltaserve delta extract: a fully fine-tuned model minus its base, pruned to a sparse delta
 * adapter (src/adapter/delta_extract.c), and a report of how much of the tuned model's output the
 * delta preserves: on a few prompts, every position's next-token distribution of base + delta is
 * compared with the tuned model's (top-1 agreement, mean KL(tuned ‖ base + delta)), beside the
 * same figures for the base alone. */
#include "cli/cli.h"
#include "ds/adapter.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *DELTA_HELP =
    "usage: deltaserve delta extract --base BASE --tuned TUNED (--keep P% | --threshold T) --out DIR\n"
    "\n"
    "Writes a delta adapter (adapter_config.json + adapter_model.safetensors; README, \"Delta\n"
    "adapters\") holding, per projection of every layer, the largest-magnitude entries of\n"
    "TUNED - BASE, and the q/k/v bias differences. BASE and TUNED are Hugging Face directories or\n"
    "GGUF files of the same architecture and sizes. Then reports, on a few prompts, how closely\n"
    "base + delta follows the tuned model (top-1 agreement and KL at every position).\n"
    "\n"
    "  --base PATH        the base model\n"
    "  --tuned PATH       the fine-tuned model\n"
    "  --keep P%          keep this share of each projection's entries (e.g. 1%, 0.5%, 100%)\n"
    "  --threshold T      keep every entry with |tuned - base| > T instead\n"
    "  --out DIR          the adapter directory to write (created)\n"
    "  --no-eval          skip the comparison\n"
    "  -h, --help         this text\n";

#define EVAL_MAX_TOKENS 64

static const char *const EVAL_TEXTS[] = {
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Translate to German: The weather is nice today.",
    "Question: What is 17 times 3? Answer:",
};

typedef struct eval_acc {
    int64_t positions, agree_delta, agree_base;
    double kl_delta, kl_base;
} eval_acc;

/* log-softmax in place over n values (double accumulation). */
static void log_softmax(const float *x, double *out, int n) {
    double mx = -INFINITY, s = 0.0;
    for (int i = 0; i < n; i++) mx = fmax(mx, x[i]);
    for (int i = 0; i < n; i++) s += exp((double)x[i] - mx);
    const double lse = mx + log(s);
    for (int i = 0; i < n; i++) out[i] = (double)x[i] - lse;
}

static int argmax(const float *x, int n) {
    int b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

/* One sequence's prefill with every position's logits; blocks 0.. of the pool are reused. */
static int prefill(ds_llama *L, ds_plan *plan, const ds_adapter_dev *dev, const int32_t *ids, int n, float *logits) {
    int32_t pos[EVAL_MAX_TOKENS], seq[EVAL_MAX_TOKENS], table[EVAL_MAX_TOKENS];
    for (int i = 0; i < n; i++) pos[i] = i, seq[i] = 0;
    for (int i = 0; i < EVAL_MAX_TOKENS; i++) table[i] = i;
    const ds_batch b = {.n_tokens = n, .tokens = ids, .pos = pos, .tok_seq = seq, .tok_kv = pos, .n_seqs = 1,
                        .block_tables = table, .max_blocks = EVAL_MAX_TOKENS, .n_out = n, .out_rows = pos};
    const ds_adapter_dev *slots[1] = {dev};
    const ds_adapter_seg seg = {.start = 0, .len = n, .slot = 0};
    const ds_adapter_batch ad = {.slots = slots, .segs = &seg, .n_segs = dev ? 1 : 0};
    int st = ds_adapter_plan_build(plan, &ad, &b);
    ds_err err = {{0}};
    if (!st && (st = ds_llama_forward(L, &b, dev ? plan : NULL, logits, &err)))
        fprintf(stderr, "deltaserve: forward: %s\n", err.msg);
    return st;
}

static ds_llama *make_llama(const ds_model *m, ds_backend *b) {
    ds_llama_params lp = ds_llama_default_params();
    lp.max_tokens = EVAL_MAX_TOKENS;
    lp.max_seqs = 1;
    lp.kv_bytes = (size_t)4 << 20;
    lp.max_blocks_per_seq = EVAL_MAX_TOKENS;
    ds_err err = {{0}};
    ds_llama *L = ds_llama_create(m, b, &lp, &err);
    if (!L) fprintf(stderr, "deltaserve: %s\n", err.msg);
    return L;
}

/* The prompts: the base's tokenizer on EVAL_TEXTS, or (no tokenizer) seeded token ids. */
static int prompt_ids(const ds_model *m, int k, int32_t *ids) {
    if (m->tok) {
        int32_t *v = NULL;
        size_t n = 0;
        if (ds_tokenizer_encode(m->tok, EVAL_TEXTS[k], strlen(EVAL_TEXTS[k]), true, false, &v, &n)) return 0;
        if (n > EVAL_MAX_TOKENS) n = EVAL_MAX_TOKENS;
        memcpy(ids, v, n * sizeof *ids);
        free(v);
        return (int)n;
    }
    uint32_t s = 12345u + (uint32_t)k * 7919u;
    const int n = 8 + 4 * k;
    for (int i = 0; i < n; i++) {
        s = s * 1664525u + 1013904223u;
        ids[i] = (int32_t)((s >> 8) % (uint32_t)m->cfg.n_vocab);
    }
    return n;
}

static int evaluate(const ds_model *base, const ds_model *tuned, const char *dir, eval_acc *acc) {
    ds_err err = {{0}};
    ds_backend *b = ds_backend_create("cpu", NULL, &err);
    ds_adapter *a = b ? ds_adapter_load(dir, base, NULL, &err) : NULL;
    if (!a) return fprintf(stderr, "deltaserve: %s\n", err.msg), ds_backend_free(b), 1;
    ds_adapter_dev dev;
    ds_llama *Lb = NULL, *Lt = NULL;
    ds_plan *plan = NULL;
    const int V = base->cfg.n_vocab;
    float *lt = malloc(sizeof(float) * EVAL_MAX_TOKENS * V), *ld = malloc(sizeof(float) * EVAL_MAX_TOKENS * V);
    float *lb = malloc(sizeof(float) * EVAL_MAX_TOKENS * V);
    double *pt = malloc(sizeof(double) * V), *pq = malloc(sizeof(double) * V);
    int rc = 1;
    if (ds_adapter_dev_upload(b, a, &dev, &err)) {
        fprintf(stderr, "deltaserve: %s\n", err.msg);
        goto out_noup;
    }
    if (!(Lb = make_llama(base, b)) || !(Lt = make_llama(tuned, b)) || !lt || !ld || !lb || !pt || !pq) goto out;
    if (!(plan = ds_adapter_plan_create(Lb, 1, EVAL_MAX_TOKENS, &err))) goto out;
    for (int k = 0; k < (int)(sizeof EVAL_TEXTS / sizeof *EVAL_TEXTS); k++) {
        int32_t ids[EVAL_MAX_TOKENS];
        const int n = prompt_ids(base, k, ids);
        if (n <= 0) continue;
        if (prefill(Lt, plan, NULL, ids, n, lt) || prefill(Lb, plan, &dev, ids, n, ld) ||
            prefill(Lb, plan, NULL, ids, n, lb))
            goto out;
        for (int i = 0; i < n; i++) {
            const float *t = lt + (size_t)i * V, *q[2] = {ld + (size_t)i * V, lb + (size_t)i * V};
            log_softmax(t, pt, V);
            const int top = argmax(t, V);
            for (int w = 0; w < 2; w++) {
                log_softmax(q[w], pq, V);
                double kl = 0.0;
                for (int j = 0; j < V; j++) kl += exp(pt[j]) * (pt[j] - pq[j]);
                *(w ? &acc->kl_base : &acc->kl_delta) += kl;
                *(w ? &acc->agree_base : &acc->agree_delta) += argmax(q[w], V) == top;
            }
            acc->positions++;
        }
    }
    rc = 0;
out:
    ds_adapter_dev_release(b, &dev);
out_noup:
    ds_adapter_plan_free(plan);
    ds_llama_free(Lt);
    ds_llama_free(Lb);
    ds_adapter_free(a);
    ds_backend_free(b);
    free(lt), free(ld), free(lb), free(pt), free(pq);
    return rc;
}

static bool parse_percent(const char *v, double *out) {
    char *end;
    double x = v ? strtod(v, &end) : NAN;
    if (!v || end == v || (strcmp(end, "%") && *end) || !(x > 0.0 && x <= 100.0)) return false;
    *out = x / 100.0;
    return true;
}

static int extract(int argc, char **argv) {
    const char *base_path = NULL, *tuned_path = NULL, *out = NULL;
    ds_delta_extract_params p = ds_delta_extract_default_params();
    bool have_keep = false, eval = true;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) return fputs(DELTA_HELP, stdout), 0;
        if (!strcmp(a, "--no-eval")) {
            eval = false;
            continue;
        }
        if (!v) return fprintf(stderr, "deltaserve delta extract: %s needs a value (see --help)\n", a), 2;
        i++;
        if (!strcmp(a, "--base")) base_path = v;
        else if (!strcmp(a, "--tuned")) tuned_path = v;
        else if (!strcmp(a, "--out")) out = v;
        else if (!strcmp(a, "--keep")) {
            if (!parse_percent(v, &p.keep))
                return fprintf(stderr, "deltaserve delta extract: --keep: '%s' is not a percentage in (0, 100]\n", v), 2;
            have_keep = true;
        } else if (!strcmp(a, "--threshold")) {
            if (!ds_cli_float(a, v, 0.0, 1e30, &p.threshold) || !(p.threshold > 0.0))
                return fprintf(stderr, "deltaserve delta extract: --threshold must be positive\n"), 2;
        } else {
            return fprintf(stderr, "deltaserve delta extract: unknown option '%s' (see --help)\n", a), 2;
        }
    }
    if (!base_path || !tuned_path || !out)
        return fprintf(stderr, "deltaserve delta extract: --base, --tuned and --out are required (see --help)\n"), 2;
    if (have_keep && p.threshold > 0.0)
        return fprintf(stderr, "deltaserve delta extract: give --keep or --threshold, not both\n"), 2;
    ds_log_set_level(DS_LOG_WARN);
    ds_model *base = ds_cli_load_model(base_path, NULL), *tuned = base ? ds_cli_load_model(tuned_path, NULL) : NULL;
    if (!base || !tuned) return ds_model_free(base), 1;
    p.base_name = base_path;
    ds_delta_extract_stats st;
    ds_err err = {{0}};
    int rc = ds_delta_extract(base, tuned, &p, out, &st, &err);
    if (rc) {
        fprintf(stderr, "deltaserve: delta extract: %s\n", err.msg);
    } else {
        const double model_bytes = 4.0 * (double)base->n_params;
        printf("delta: %lld of %lld projection entries kept (%.4g%%) in %d modules, %d bias deltas\n",
               (long long)st.nnz, (long long)st.params, 100.0 * (double)st.nnz / (double)st.params, st.n_modules,
               st.n_bias);
        printf("size: %.3f MiB loaded (%.3g%% of the base's %.1f MiB in fp32), %.3f MiB on disk\n",
               st.adapter_bytes / 1048576.0, 100.0 * (double)st.adapter_bytes / model_bytes, model_bytes / 1048576.0,
               st.file_bytes / 1048576.0);
        if (st.max_uncarried > 0.0)
            printf("not carried: the models also differ in %s (max |diff| %.3g); a delta adapter holds projection "
                   "weights and biases only\n",
                   st.uncarried, st.max_uncarried);
        printf("wrote %s\n", out);
        eval_acc acc = {0};
        if (eval && !(rc = evaluate(base, tuned, out, &acc)) && acc.positions > 0)
            printf("preserved on %lld positions: top-1 agreement with the tuned model %.1f%% (base alone %.1f%%), "
                   "mean KL(tuned || base+delta) %.4g nats (base alone %.4g)\n",
                   (long long)acc.positions, 100.0 * acc.agree_delta / acc.positions,
                   100.0 * acc.agree_base / acc.positions, acc.kl_delta / acc.positions, acc.kl_base / acc.positions);
    }
    ds_model_free(tuned);
    ds_model_free(base);
    return rc ? 1 : 0;
}

int ds_cli_delta(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))
        return fputs(DELTA_HELP, argc < 2 ? stderr : stdout), argc < 2 ? 2 : 0;
    if (!strcmp(argv[1], "extract")) return extract(argc - 1, argv + 1);
    fprintf(stderr, "deltaserve delta: unknown subcommand '%s' (extract; see --help)\n", argv[1]);
    return 2;
}
