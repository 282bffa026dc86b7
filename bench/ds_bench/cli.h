/* ds-bench — command-line options. */
#ifndef DSB_CLI_H
#define DSB_CLI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "stats.h"

typedef enum { DSB_EP_COMPLETIONS = 0, DSB_EP_CHAT } dsb_endpoint;

#define DSB_MAX_SWEEP 64

/* Every option of one benchmark. Strings are borrowed (from argv, or set by the caller) and must
 * outlive every use of the params. */
typedef struct dsb_params {
    /* Target. */
    const char *url;            /* base URL; "/v1/completions" etc. is appended */
    dsb_endpoint endpoint;
    const char *model;          /* base model name; NULL: ask GET /v1/models when needed */
    const char *api_key;        /* sent as "Authorization: Bearer KEY"; NULL: $OPENAI_API_KEY */
    const char *adapter_field;  /* NULL: adapter goes in "model"; else this body field */
    const char *adapter_value;  /* JSON template of that field's value ({i}, {id}); NULL: "id" */
    double timeout_s;           /* per request */

    /* Load shape. */
    double request_rate;        /* req/s; INFINITY = everything at t = 0 */
    double burstiness;          /* gamma shape; 1 = Poisson */
    int max_concurrency;        /* 0 = unlimited */
    long num_prompts;           /* requests per run (0 with duration_s: unlimited) */
    bool num_prompts_set;
    double duration_s;          /* 0 = no time limit; else stop sending after this long */
    uint64_t seed;

    /* Adapters. */
    int n_adapters;             /* 0 = none (base only unless a file names adapters) */
    const char *adapter_names;  /* comma-separated ids */
    const char *adapter_pattern;/* "{i}" is replaced with 0..n-1 */
    const char *adapter_dist;   /* uniform | round-robin | zipf:A | power:A */
    const char *traffic_split;  /* "W,W,..." ("WxK" repeats) or "NAME=W,..." */
    double base_fraction;       /* share of requests sent to the base model */

    /* Prompts. */
    int input_len, output_len;
    double range_ratio;
    const char *prompts_file;   /* JSONL prompts */
    const char *trace_file;     /* JSONL trace to replay */
    double trace_speedup;
    bool ignore_eos;
    bool prompt_token_ids;
    int vocab_size;
    double temperature;

    /* Reporting. */
    const char *json_path;
    double percentiles[DSB_MAX_PERCENTILES];
    int n_percentiles;
    double slo_ttft_ms, slo_tpot_ms, slo_e2el_ms; /* 0 = not part of the SLO */
    double sweep_rates[DSB_MAX_SWEEP];
    int n_sweep;
    bool progress;
    int max_adapter_rows;       /* per-adapter rows in the terminal table */
} dsb_params;

/* Defaults: http://127.0.0.1:8000, completions, rate inf, burstiness 1, 1000 prompts, input 1024,
 * output 128, uniform adapters with pattern "lora-{i}", percentiles {99}, progress on. */
void dsb_params_default(dsb_params *p);

/* True when any SLO bound is set. */
bool dsb_params_has_slo(const dsb_params *p);

/* Parses argv into p (which should hold the defaults). Returns 0 to run, 1 when --help or
 * --version was printed to stdout, -1 with a message in err for bad usage. */
int dsb_cli_parse(int argc, char **argv, dsb_params *p, char *err, size_t errlen);

/* Writes the help text. */
void dsb_cli_help(FILE *f);

/* NULL-terminated list of long option names (without "--"), for tests of the help text. */
const char *const *dsb_cli_option_names(void);

#endif
