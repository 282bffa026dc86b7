#include "cli.h"

#include <getopt.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "dist.h"

enum {
    O_URL = 256, O_ENDPOINT, O_MODEL, O_API_KEY, O_ADAPTER_FIELD, O_TIMEOUT, O_RATE, O_BURST, O_CONC, O_NUM,
    O_DURATION, O_SEED, O_ADAPTERS, O_ANAMES, O_APATTERN, O_ADIST, O_SPLIT, O_BASEFRAC, O_INLEN, O_OUTLEN,
    O_RANGE, O_AVALUE, O_PROMPTS, O_TRACE, O_SPEEDUP, O_IGNORE_EOS, O_TOKEN_IDS, O_VOCAB, O_TEMP, O_JSON, O_PCTS, O_SLO,
    O_SWEEP, O_NO_PROGRESS, O_AROWS, O_HELP, O_VERSION,
};

typedef enum { K_SPECIAL, K_STR, K_DBL, K_INT, K_FLAG } opt_kind;

/* One option: the table drives getopt, the help text and the plain field assignments. */
typedef struct opt_def {
    const char *name; /* NULL: a section heading in `help` */
    int id;
    const char *arg;  /* NULL: a flag without argument */
    opt_kind kind;    /* K_SPECIAL: handled by name in apply_special */
    size_t off;       /* field in dsb_params */
    double lo, hi;    /* accepted range of K_DBL / K_INT */
    const char *help;
} opt_def;

#define STR(f) K_STR, offsetof(dsb_params, f), 0, 0
#define DBL(f, l, h) K_DBL, offsetof(dsb_params, f), l, h
#define INT(f, l, h) K_INT, offsetof(dsb_params, f), l, h
#define FLAG(f) K_FLAG, offsetof(dsb_params, f), 0, 0
#define SPECIAL K_SPECIAL, 0, 0, 0

static const opt_def k_opts[] = {
    {NULL, 0, NULL, SPECIAL, "Target"},
    {"url", O_URL, "URL", STR(url), "Server base URL (default http://127.0.0.1:8000; plain http). /v1/completions or "
                          "/v1/chat/completions is appended unless the path already ends in /v1 or /completions."},
    {"endpoint", O_ENDPOINT, "completions|chat", SPECIAL, "API to call (default completions)."},
    {"model", O_MODEL, "NAME", STR(model), "Base model name: used for base-model requests and, with --adapter-field, in "
                               "\"model\" of every request. Default: the first base model of GET /v1/models "
                               "(asked only when needed)."},
    {"api-key", O_API_KEY, "KEY", STR(api_key), "Send \"Authorization: Bearer KEY\" (default: $OPENAI_API_KEY if set)."},
    {"adapter-field", O_ADAPTER_FIELD, "FIELD", STR(adapter_field), "Put the adapter id in this body field (e.g. adapter_id) and the "
                                                "base model in \"model\". Default: the adapter id is the \"model\" "
                                                "(OpenAI/vLLM/deltaserve convention)."},
    {"adapter-value", O_AVALUE, "JSON", STR(adapter_value), "With --adapter-field: the field's value as a JSON "
                                                       "template, {i} = adapter index, {id} = adapter id. E.g. "
                                                       "llama.cpp: --adapter-field lora --adapter-value "
                                                       "'[{\"id\":{i},\"scale\":1.0}]'. Default: \"{id}\"."},
    {"timeout", O_TIMEOUT, "S", DBL(timeout_s, 0, 1e7), "Per-request timeout in seconds, connect to last byte (default 600; 0 = none)."},
    {NULL, 0, NULL, SPECIAL, "Load"},
    {"request-rate", O_RATE, "R", SPECIAL, "Open-loop arrival rate in requests/s, or inf (default): send everything at "
                                  "t=0 (closed loop when --max-concurrency is set)."},
    {"burstiness", O_BURST, "B", DBL(burstiness, 1e-6, 1e6), "Gamma shape of the inter-arrival gaps (default 1 = Poisson). Gaps have mean "
                                 "1/R and coefficient of variation 1/sqrt(B); S-LoRA's cv is B = 1/cv^2."},
    {"max-concurrency", O_CONC, "C", INT(max_concurrency, 0, 1000000), "At most C requests in flight; later arrivals wait (default: unlimited)."},
    {"num-prompts", O_NUM, "N", SPECIAL, "Requests per run (default 1000; unlimited with --duration; a trace's length)."},
    {"duration", O_DURATION, "S", DBL(duration_s, 0, 1e9), "Stop sending after S seconds; requests in flight still finish."},
    {"seed", O_SEED, "N", SPECIAL, "Seed for arrivals, adapter choice, lengths and prompt text (default 0)."},
    {NULL, 0, NULL, SPECIAL, "Adapters"},
    {"adapters", O_ADAPTERS, "N", INT(n_adapters, 0, 1000000), "Number of adapters to spread traffic over (ids from --adapter-names or "
                                  "--adapter-pattern). Default 0: base model only."},
    {"adapter-names", O_ANAMES, "LIST", STR(adapter_names), "Comma-separated adapter ids (sets N)."},
    {"adapter-pattern", O_APATTERN, "PAT", STR(adapter_pattern), "Adapter id pattern; {i} becomes 0..N-1 (default lora-{i})."},
    {"adapter-dist", O_ADIST, "D", STR(adapter_dist), "Adapter popularity: uniform (default), round-robin, zipf:A (P(k) ~ "
                                   "(k+1)^-A), or power:A (S-LoRA: index = floor(X*N), X ~ power(A); A=1 is "
                                   "uniform, smaller A favours low ids)."},
    {"traffic-split", O_SPLIT, "LIST", STR(traffic_split), "Explicit split instead of --adapter-dist: weights in adapter order "
                                       "(\"0.12x5,0.06x5,0.02x5\": WxK repeats), or NAME=W pairs. Normalised."},
    {"base-fraction", O_BASEFRAC, "F", DBL(base_fraction, 0, 1), "Fraction of requests sent to the base model instead of an adapter "
                                       "(default 0)."},
    {NULL, 0, NULL, SPECIAL, "Prompts"},
    {"input-len", O_INLEN, "N", INT(input_len, 1, 10000000), "Prompt length in tokens for synthetic prompts (default 1024). Text prompts are "
                                "N common words, about one token each (see README); the reported length is the "
                                "server's usage.prompt_tokens."},
    {"output-len", O_OUTLEN, "N", INT(output_len, 1, 10000000), "max_tokens per request (default 128)."},
    {"range-ratio", O_RANGE, "R", DBL(range_ratio, 0, 1), "Draw lengths uniformly from [L*(1-R), L*(1+R)] (default 0: fixed)."},
    {"prompts", O_PROMPTS, "FILE", STR(prompts_file), "JSONL prompts, used in order and cycled: {\"prompt\": ...} or "
                                   "{\"messages\": [...]}, optional \"output_len\", \"adapter\"."},
    {"trace", O_TRACE, "FILE", STR(trace_file), "JSONL trace to replay: {\"timestamp\": s, \"adapter\": id|index|null, "
                               "\"input_len\": n, \"output_len\": m} per line. Replaces the arrival process."},
    {"trace-speedup", O_SPEEDUP, "X", DBL(trace_speedup, 1e-6, 1e9), "Replay the trace X times faster (default 1)."},
    {"ignore-eos", O_IGNORE_EOS, NULL, FLAG(ignore_eos), "Send ignore_eos=true so every request generates exactly max_tokens."},
    {"prompt-token-ids", O_TOKEN_IDS, NULL, FLAG(prompt_token_ids), "Send synthetic prompts as token-id arrays (completions only) for "
                                            "exact input lengths."},
    {"vocab-size", O_VOCAB, "V", INT(vocab_size, 2, 100000000), "Token ids are drawn from [min(1000, V/2), V) (default 32000; use the count of "
                                 "ordinary tokens, e.g. 128000 for Llama 3)."},
    {"temperature", O_TEMP, "T", DBL(temperature, 0, 2), "Sampling temperature sent with every request (default 0)."},
    {NULL, 0, NULL, SPECIAL, "Report"},
    {"json", O_JSON, "FILE", STR(json_path), "Write the result as JSON (vLLM bench serve keys + per-adapter breakdown)."},
    {"percentiles", O_PCTS, "LIST", SPECIAL, "Percentiles to report, comma-separated (default 99; at most 8)."},
    {"slo", O_SLO, "SPEC", SPECIAL, "Goodput SLO, e.g. ttft:500,tpot:50 (ms; keys ttft, tpot, e2el): a request is good "
                           "when it meets every bound."},
    {"sweep", O_SWEEP, "RATES", SPECIAL, "Run once per request rate and report the knee: \"1,2,4,8\" or LO:HI:N (N rates "
                                "spaced geometrically). Overrides --request-rate."},
    {"no-progress", O_NO_PROGRESS, NULL, SPECIAL, "Do not print the progress line on stderr."},
    {"adapter-rows", O_AROWS, "N", INT(max_adapter_rows, 0, 1000000), "Adapters shown in the terminal table, busiest first (default 20)."},
    {"help", O_HELP, NULL, SPECIAL, "Show this help and exit."},
    {"version", O_VERSION, NULL, SPECIAL, "Show the version and exit."},
};
#define N_OPTS (sizeof(k_opts) / sizeof(k_opts[0]))

void dsb_params_default(dsb_params *p) {
    memset(p, 0, sizeof(*p));
    p->url = "http://127.0.0.1:8000";
    p->endpoint = DSB_EP_COMPLETIONS;
    p->timeout_s = 600;
    p->request_rate = INFINITY;
    p->burstiness = 1.0;
    p->num_prompts = 1000;
    p->adapter_pattern = "lora-{i}";
    p->adapter_dist = "uniform";
    p->input_len = 1024;
    p->output_len = 128;
    p->trace_speedup = 1.0;
    p->vocab_size = 32000;
    p->percentiles[0] = 99.0;
    p->n_percentiles = 1;
    p->progress = true;
    p->max_adapter_rows = 20;
}

bool dsb_params_has_slo(const dsb_params *p) {
    return p->slo_ttft_ms > 0 || p->slo_tpot_ms > 0 || p->slo_e2el_ms > 0;
}

const char *const *dsb_cli_option_names(void) {
    static const char *names[N_OPTS + 1];
    size_t k = 0;
    for (size_t i = 0; i < N_OPTS; i++)
        if (k_opts[i].name) names[k++] = k_opts[i].name;
    names[k] = NULL;
    return names;
}

/* Prints `text` wrapped at 100 columns, every line indented by `indent`. */
static void wrap(FILE *f, const char *text, int indent, int first_col) {
    int col = first_col;
    const char *s = text;
    while (*s) {
        const char *e = s;
        while (*e && *e != ' ') e++;
        int wl = (int)(e - s);
        if (col > indent && col + 1 + wl > 100) {
            fprintf(f, "\n%*s", indent, "");
            col = indent;
        } else if (col > indent) {
            fputc(' ', f);
            col++;
        }
        fwrite(s, 1, (size_t)wl, f);
        col += wl;
        s = *e ? e + 1 : e;
    }
    fputc('\n', f);
}

void dsb_cli_help(FILE *f) {
    fprintf(f, "Usage: ds-bench [OPTIONS]\n"
               "Multi-adapter load generator for OpenAI-compatible LLM servers (deltaserve, vLLM, llama.cpp).\n"
               "Streams every request (stream_options.include_usage) and reports TTFT, TPOT, ITL and E2E\n"
               "latency overall and per adapter. Ctrl-C prints the summary so far.\n");
    for (size_t i = 0; i < N_OPTS; i++) {
        const opt_def *o = &k_opts[i];
        if (!o->name) {
            fprintf(f, "\n%s:\n", o->help);
            continue;
        }
        char lhs[80];
        int n = snprintf(lhs, sizeof(lhs), "  --%s%s%s", o->name, o->arg ? " " : "", o->arg ? o->arg : "");
        fputs(lhs, f);
        if (n >= 30) {
            fprintf(f, "\n%30s", "");
            n = 30;
        } else {
            fprintf(f, "%*s", 30 - n, "");
            n = 30;
        }
        wrap(f, o->help, 30, n);
    }
    fprintf(f, "\nExit status: 0 when the run completed (request failures are reported, not fatal),\n"
               "1 on bad usage or setup errors, 130 when interrupted by SIGINT.\n");
}

/* ---- Parsing ------------------------------------------------------------------------------- */

static int parse_num(const char *s, double lo, double hi, double *out) {
    char *end = NULL;
    double v = strtod(s, &end);
    if (end == s || *end != '\0' || !isfinite(v) || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

static int parse_rate(const char *s, double *out) {
    if (strcmp(s, "inf") == 0 || strcmp(s, "Inf") == 0) {
        *out = INFINITY;
        return 0;
    }
    return parse_num(s, 1e-9, 1e9, out) == 0 && *out > 0 ? 0 : -1;
}

/* Comma-separated numbers in [lo, hi] (or "inf" when allow_inf). Returns the count or -1. */
static int parse_list(const char *s, double lo, double hi, bool allow_inf, double *out, int max) {
    int n = 0;
    char buf[64];
    while (*s) {
        const char *e = strchr(s, ',');
        size_t len = e ? (size_t)(e - s) : strlen(s);
        if (len == 0 || len >= sizeof(buf) || n == max) return -1;
        memcpy(buf, s, len);
        buf[len] = '\0';
        if (allow_inf && strcmp(buf, "inf") == 0) out[n] = INFINITY;
        else if (parse_num(buf, lo, hi, &out[n]) != 0) return -1;
        n++;
        s = e ? e + 1 : s + len;
    }
    return n;
}

/* "ttft:500,tpot:50,e2el:10000" in milliseconds. */
static int parse_slo(const char *s, dsb_params *p) {
    char buf[256];
    snprintf(buf, sizeof(buf), "%s", s);
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *colon = strchr(tok, ':');
        double v;
        if (!colon || parse_num(colon + 1, 1e-9, 1e12, &v) != 0) return -1;
        *colon = '\0';
        if (strcmp(tok, "ttft") == 0) p->slo_ttft_ms = v;
        else if (strcmp(tok, "tpot") == 0) p->slo_tpot_ms = v;
        else if (strcmp(tok, "e2el") == 0) p->slo_e2el_ms = v;
        else return -1;
    }
    return dsb_params_has_slo(p) ? 0 : -1;
}

/* "1,2,4" or "LO:HI:N" (N rates from LO to HI, geometric). */
static int parse_sweep(const char *s, dsb_params *p) {
    double lo, hi, n;
    if (sscanf(s, "%lf:%lf:%lf", &lo, &hi, &n) == 3) {
        if (!(lo > 0) || !(hi >= lo) || n < 1 || n > DSB_MAX_SWEEP || n != floor(n)) return -1;
        p->n_sweep = (int)n;
        for (int i = 0; i < p->n_sweep; i++)
            p->sweep_rates[i] = p->n_sweep == 1 ? lo : lo * pow(hi / lo, (double)i / (p->n_sweep - 1));
        return 0;
    }
    p->n_sweep = parse_list(s, 1e-9, 1e9, true, p->sweep_rates, DSB_MAX_SWEEP);
    for (int i = 1; i < p->n_sweep; i++)
        if (!(p->sweep_rates[i] > p->sweep_rates[i - 1])) return -1; /* must increase */
    return p->n_sweep > 0 ? 0 : -1;
}

static int apply_special(dsb_params *p, int id, const char *a) {
    double v;
    switch (id) {
    case O_ENDPOINT:
        if (strcmp(a, "completions") == 0) p->endpoint = DSB_EP_COMPLETIONS;
        else if (strcmp(a, "chat") == 0) p->endpoint = DSB_EP_CHAT;
        else return -1;
        return 0;
    case O_RATE: return parse_rate(a, &p->request_rate);
    case O_NUM:
        if (parse_num(a, 1, 1e12, &v) != 0 || v != floor(v)) return -1;
        p->num_prompts = (long)v;
        p->num_prompts_set = true;
        return 0;
    case O_SEED: {
        char *end = NULL;
        p->seed = strtoull(a, &end, 0);
        return end == a || *end ? -1 : 0;
    }
    case O_PCTS:
        p->n_percentiles = parse_list(a, 0, 100, false, p->percentiles, DSB_MAX_PERCENTILES);
        return p->n_percentiles > 0 ? 0 : -1;
    case O_SLO: return parse_slo(a, p);
    case O_SWEEP: return parse_sweep(a, p);
    case O_NO_PROGRESS: p->progress = false; return 0;
    }
    return -1;
}

static int apply(dsb_params *p, const opt_def *o, const char *a) {
    char *field = (char *)p + o->off;
    double v;
    switch (o->kind) {
    case K_STR: *(const char **)field = a; return 0;
    case K_FLAG: *(bool *)field = true; return 0;
    case K_DBL:
        if (parse_num(a, o->lo, o->hi, &v) != 0) return -1;
        *(double *)field = v;
        return 0;
    case K_INT:
        if (parse_num(a, o->lo, o->hi, &v) != 0 || v != floor(v)) return -1;
        *(int *)field = (int)v;
        return 0;
    case K_SPECIAL: return apply_special(p, o->id, a);
    }
    return -1;
}

/* Cross-option checks and derived defaults. */
static int validate(dsb_params *p, char *err, size_t errlen) {
    if (!p->num_prompts_set && (p->duration_s > 0 || p->trace_file)) p->num_prompts = 0;
    bool closed = isinf(p->request_rate) && p->n_sweep == 0;
    if (closed && p->max_concurrency == 0 && p->num_prompts == 0 && !p->trace_file)
        return snprintf(err, errlen, "--duration with an infinite --request-rate needs --max-concurrency or "
                                     "--num-prompts"), -1;
    if (p->adapter_value && !p->adapter_field)
        return snprintf(err, errlen, "--adapter-value needs --adapter-field"), -1;
    if (p->prompts_file && p->trace_file) return snprintf(err, errlen, "--prompts and --trace exclude each other"), -1;
    if (p->n_sweep && p->trace_file) return snprintf(err, errlen, "--sweep cannot be used with --trace"), -1;
    if (p->prompt_token_ids && p->endpoint != DSB_EP_COMPLETIONS)
        return snprintf(err, errlen, "--prompt-token-ids needs --endpoint completions"), -1;
    if (p->n_sweep) {
        for (int i = 0; i < p->n_sweep; i++)
            if (isinf(p->sweep_rates[i]) && p->max_concurrency == 0 && p->num_prompts == 0)
                return snprintf(err, errlen, "--sweep with inf and --duration needs --max-concurrency"), -1;
    }
    dsb_pop_kind kind;
    double alpha;
    if (dsb_popularity_parse(p->adapter_dist, &kind, &alpha, err, errlen) != 0) return -1;
    return 0;
}

int dsb_cli_parse(int argc, char **argv, dsb_params *p, char *err, size_t errlen) {
    struct option longs[N_OPTS + 1];
    size_t k = 0;
    for (size_t i = 0; i < N_OPTS; i++) {
        if (!k_opts[i].name) continue;
        longs[k++] = (struct option){k_opts[i].name, k_opts[i].arg ? required_argument : no_argument, NULL,
                                     k_opts[i].id};
    }
    longs[k] = (struct option){0, 0, 0, 0};
    optind = 1;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, "h", longs, NULL)) != -1) {
        if (c == 'h' || c == O_HELP) return dsb_cli_help(stdout), 1;
        if (c == O_VERSION) return printf("ds-bench 0.1.0\n"), 1;
        const opt_def *o = NULL;
        for (size_t i = 0; i < N_OPTS && !o; i++)
            if (k_opts[i].name && k_opts[i].id == c) o = &k_opts[i];
        if (!o) {
            const char *bad = argv[optind - 1];
            return snprintf(err, errlen, "unknown option or missing argument: %s (see --help)", bad), -1;
        }
        if (apply(p, o, optarg) != 0)
            return snprintf(err, errlen, "bad value for --%s: '%s' (see --help)", o->name, optarg ? optarg : ""), -1;
    }
    if (optind < argc) return snprintf(err, errlen, "unexpected argument '%s'", argv[optind]), -1;
    return validate(p, err, errlen);
}
