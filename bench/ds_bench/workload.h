/* ds-bench — the request stream of one run: when each request arrives, which adapter it targets,
 * its input/output lengths, and its JSON body. Deterministic for a given seed: arrivals, adapter
 * choice, lengths and prompt text come from separate RNG streams, so a sweep over request rates
 * sends the same requests at each rate. Single-threaded. */
#ifndef DSB_WORKLOAD_H
#define DSB_WORKLOAD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cli.h"
#include "dist.h"
#include "prompt.h"

#define DSB_BASE (-1) /* adapter index of a base-model request */

typedef struct dsb_spec {
    double arrival_s;   /* offset from the start of the run */
    int adapter;        /* index into the adapter list, or DSB_BASE */
    int input_len;      /* requested / estimated prompt tokens */
    int output_len;     /* max_tokens */
    long record;        /* index into the prompt file, or -1 for a synthetic prompt */
    uint64_t prompt_seed;
} dsb_spec;

typedef struct dsb_workload {
    const dsb_params *p;      /* borrowed */
    char *model;              /* base model name (NULL until known); owned */
    char **adapters;          /* adapter ids; owned */
    int n_adapters;
    dsb_popularity pop;       /* over adapters (valid when n_adapters > 0) */
    dsb_records prompts;      /* --prompts file */
    dsb_records trace;        /* --trace file */
    int *rec_adapter;         /* resolved adapter of each file record (DSB_BASE, index, or -2: sample) */
    /* Per-run state (dsb_workload_reset). */
    dsb_arrivals arrivals;
    dsb_rng rng_adapter, rng_len, rng_prompt;
    double t_next;
    long produced;
} dsb_workload;

/* Loads files and builds the adapter list and popularity from p. Returns 0, or -1 with a message
 * in err. Free with dsb_workload_free. */
int dsb_workload_init(dsb_workload *w, const dsb_params *p, char *err, size_t errlen);
void dsb_workload_free(dsb_workload *w);

/* Sets (copies) the base model name. Returns 0 or -1 when out of memory. */
int dsb_workload_set_model(dsb_workload *w, const char *model);

/* True when some request needs the base model's name (base traffic or --adapter-field). */
bool dsb_workload_needs_model(const dsb_workload *w);

/* Restarts the stream from the seed with the given request rate (trace replay ignores it). */
void dsb_workload_reset(dsb_workload *w, double rate);

/* Produces the next request. Returns false when the stream is exhausted (num_prompts reached or
 * the trace ended); the duration limit is the runner's business. */
bool dsb_workload_next(dsb_workload *w, dsb_spec *out);

/* Malloc'd JSON body for spec s; NULL when out of memory. */
char *dsb_workload_body(const dsb_workload *w, const dsb_spec *s, size_t *len);

/* Display name of an adapter index: its id, or the base model name ("base" when unknown). */
const char *dsb_workload_adapter_name(const dsb_workload *w, int adapter);

#endif
