#include "workload.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static cJSON *adapter_value(const dsb_workload *w, int a);

#define SAMPLE_ADAPTER (-2) /* file record without an adapter: draw one from the popularity */
#define MAX_ADAPTERS 1000000

/* ---- Adapter list -------------------------------------------------------------------------- */

static int add_adapter(dsb_workload *w, const char *name, size_t len) {
    if (w->n_adapters >= MAX_ADAPTERS) return -1;
    char **a = realloc(w->adapters, sizeof(char *) * (size_t)(w->n_adapters + 1));
    if (!a) return -1;
    w->adapters = a;
    char *s = malloc(len + 1);
    if (!s) return -1;
    memcpy(s, name, len);
    s[len] = '\0';
    w->adapters[w->n_adapters] = s;
    return w->n_adapters++;
}

static int find_adapter(const dsb_workload *w, const char *name) {
    for (int i = 0; i < w->n_adapters; i++)
        if (strcmp(w->adapters[i], name) == 0) return i;
    return -1;
}

/* Pattern id for index i: every "{i}" replaced by the number; appended when absent. */
static int add_pattern_adapter(dsb_workload *w, int i) {
    const char *pat = w->p->adapter_pattern ? w->p->adapter_pattern : "lora-{i}";
    char buf[512], num[16];
    snprintf(num, sizeof(num), "%d", i);
    size_t len = 0;
    bool used = false;
    for (const char *s = pat; *s && len + 16 < sizeof(buf);) {
        if (strncmp(s, "{i}", 3) == 0) {
            len += (size_t)snprintf(buf + len, sizeof(buf) - len, "%s", num);
            s += 3;
            used = true;
        } else {
            buf[len++] = *s++;
        }
    }
    if (!used) len += (size_t)snprintf(buf + len, sizeof(buf) - len, "%s", num);
    return add_adapter(w, buf, len);
}

/* Calls fn on each comma-separated item (trimmed of spaces); stops at the first failure. */
static int for_each_item(const char *csv, int (*fn)(void *, const char *, size_t), void *ud) {
    const char *s = csv;
    while (*s) {
        const char *e = strchr(s, ',');
        size_t n = e ? (size_t)(e - s) : strlen(s);
        const char *a = s;
        while (n > 0 && *a == ' ') a++, n--;
        while (n > 0 && a[n - 1] == ' ') n--;
        if (n > 0 && fn(ud, a, n) != 0) return -1;
        s = e ? e + 1 : s + strlen(s);
    }
    return 0;
}

static int name_item(void *ud, const char *s, size_t n) { return add_adapter(ud, s, n) < 0 ? -1 : 0; }

typedef struct split_ctx {
    dsb_workload *w;
    double *weights;
    int n, cap;
    bool named;
    char *err;
    size_t errlen;
} split_ctx;

static int push_weight(split_ctx *c, double wt) {
    if (c->n == c->cap) {
        int cap = c->cap ? c->cap * 2 : 16;
        double *v = realloc(c->weights, sizeof(double) * (size_t)cap);
        if (!v) return -1;
        c->weights = v;
        c->cap = cap;
    }
    c->weights[c->n++] = wt;
    return 0;
}

/* One traffic-split item: "W", "WxK" (K adapters of weight W) or "NAME=W". */
static int split_item(void *ud, const char *s, size_t n) {
    split_ctx *c = ud;
    char item[512];
    if (n >= sizeof(item)) return snprintf(c->err, c->errlen, "traffic-split item too long"), -1;
    memcpy(item, s, n);
    item[n] = '\0';
    char *eq = strchr(item, '='), *num = eq ? eq + 1 : item, *end = NULL;
    double wt = strtod(num, &end);
    long reps = 1;
    if (!eq && end != num && (*end == 'x' || *end == '*')) reps = strtol(end + 1, &end, 10);
    if (end == num || *end != '\0' || !(wt >= 0.0) || !isfinite(wt) || reps < 1 || reps > MAX_ADAPTERS) {
        snprintf(c->err, c->errlen, "bad traffic-split item '%s' (want W, WxK or NAME=W)", item);
        return -1;
    }
    if ((eq != NULL) != c->named && c->n > 0) {
        snprintf(c->err, c->errlen, "traffic-split: use either NAME=W for every item or for none");
        return -1;
    }
    c->named = eq != NULL;
    if (eq && add_adapter(c->w, item, (size_t)(eq - item)) < 0) return -1;
    for (long r = 0; r < reps; r++)
        if (push_weight(c, wt) != 0) return -1;
    return 0;
}

/* Builds the list from --traffic-split / --adapter-names / --adapters + --adapter-pattern and
 * the popularity over it. */
static int build_adapters(dsb_workload *w, double **weights, char *err, size_t errlen) {
    const dsb_params *p = w->p;
    *weights = NULL;
    if (p->traffic_split) {
        split_ctx c = {.w = w, .err = err, .errlen = errlen};
        err[0] = '\0';
        if (for_each_item(p->traffic_split, split_item, &c) != 0) {
            free(c.weights);
            if (!err[0]) snprintf(err, errlen, "out of memory");
            return -1;
        }
        *weights = c.weights;
        if (c.named) return 0;
        if (p->adapter_names && for_each_item(p->adapter_names, name_item, w) != 0) return -1;
        if (p->adapter_names && w->n_adapters != c.n) {
            snprintf(err, errlen, "--traffic-split has %d weights but --adapter-names has %d ids", c.n, w->n_adapters);
            return -1;
        }
        if (p->n_adapters > 0 && p->n_adapters != c.n) {
            snprintf(err, errlen, "--traffic-split has %d weights but --adapters is %d", c.n, p->n_adapters);
            return -1;
        }
        for (int i = w->n_adapters; i < c.n; i++)
            if (add_pattern_adapter(w, i) < 0) return -1;
        return 0;
    }
    if (p->adapter_names) {
        if (for_each_item(p->adapter_names, name_item, w) != 0) return -1;
        if (p->n_adapters > 0 && p->n_adapters != w->n_adapters) {
            snprintf(err, errlen, "--adapters %d but --adapter-names lists %d ids", p->n_adapters, w->n_adapters);
            return -1;
        }
        return 0;
    }
    for (int i = 0; i < p->n_adapters; i++)
        if (add_pattern_adapter(w, i) < 0) return -1;
    return 0;
}

/* Maps a file's adapter reference to an index; names not in the list are added. */
static int resolve_aref(dsb_workload *w, const dsb_aref *a, int *out, char *err, size_t errlen) {
    switch (a->kind) {
    case DSB_AREF_NONE: *out = SAMPLE_ADAPTER; return 0;
    case DSB_AREF_BASE: *out = DSB_BASE; return 0;
    case DSB_AREF_NAME:
        *out = find_adapter(w, a->name);
        if (*out < 0) *out = add_adapter(w, a->name, strlen(a->name));
        break;
    case DSB_AREF_INDEX:
        /* Indices past the list grow it with pattern ids, unless ids were given explicitly. */
        while (a->index >= w->n_adapters && !w->p->adapter_names && !w->p->traffic_split)
            if (add_pattern_adapter(w, w->n_adapters) < 0) break;
        *out = a->index < w->n_adapters ? a->index : -3;
        if (*out == -3) return snprintf(err, errlen, "adapter index %d out of range", a->index), -1;
        break;
    }
    return *out < 0 ? (snprintf(err, errlen, "out of memory"), -1) : 0;
}

static int resolve_records(dsb_workload *w, char *err, size_t errlen) {
    const dsb_records *r = w->p->trace_file ? &w->trace : &w->prompts;
    if (r->n == 0) return 0;
    w->rec_adapter = malloc(sizeof(int) * r->n);
    if (!w->rec_adapter) return snprintf(err, errlen, "out of memory"), -1;
    for (size_t i = 0; i < r->n; i++) {
        const dsb_aref *a = r->trace ? &r->trace[i].adapter : &r->prompts[i].adapter;
        if (resolve_aref(w, a, &w->rec_adapter[i], err, errlen) != 0) return -1;
    }
    return 0;
}

static int build_popularity(dsb_workload *w, double *weights, int n_weights, int n_flag, char *err,
                            size_t errlen) {
    if (w->n_adapters == 0) return 0;
    dsb_pop_kind kind = DSB_POP_SPLIT;
    double alpha = 1.0;
    if (weights) {
        /* Ids added later by a file get weight 0: the file names them explicitly. */
        double *wt = realloc(weights, sizeof(double) * (size_t)w->n_adapters);
        if (!wt) return snprintf(err, errlen, "out of memory"), -1;
        for (int i = n_weights; i < w->n_adapters; i++) wt[i] = 0.0;
        int rc = dsb_popularity_init(&w->pop, kind, w->n_adapters, alpha, wt);
        free(wt);
        if (rc != 0) return snprintf(err, errlen, "--traffic-split weights must be >= 0 with a positive sum"), -1;
        return 0;
    }
    const char *dist = w->p->adapter_dist ? w->p->adapter_dist : "uniform";
    if (dsb_popularity_parse(dist, &kind, &alpha, err, errlen) != 0) return -1;
    /* Sampled traffic spreads over the adapters given by flags; ids that only a file names get
     * only that file's requests (if no flag gave any adapter, sample over the file's ids). */
    int n = n_flag > 0 ? n_flag : w->n_adapters;
    if (dsb_popularity_init(&w->pop, kind, n, alpha, NULL) != 0)
        return snprintf(err, errlen, "out of memory"), -1;
    return 0;
}

int dsb_workload_init(dsb_workload *w, const dsb_params *p, char *err, size_t errlen) {
    memset(w, 0, sizeof(*w));
    w->p = p;
    double *weights = NULL;
    int rc = -1;
    if (p->prompts_file && dsb_prompts_load(p->prompts_file, &w->prompts, err, errlen) != 0) goto out;
    if (p->trace_file && dsb_trace_load(p->trace_file, &w->trace, err, errlen) != 0) goto out;
    if (p->model && dsb_workload_set_model(w, p->model) != 0) goto oom;
    err[0] = '\0';
    if (build_adapters(w, &weights, err, errlen) != 0) {
        if (!err[0]) goto oom;
        goto out;
    }
    int n_flag = w->n_adapters, n_weights = weights ? n_flag : 0;
    if (resolve_records(w, err, errlen) != 0) goto out;
    rc = build_popularity(w, weights, n_weights, n_flag, err, errlen);
    weights = NULL; /* consumed */
    if (rc == 0 && p->adapter_value && w->n_adapters > 0) {
        cJSON *v = adapter_value(w, 0);
        if (!v) rc = (snprintf(err, errlen, "--adapter-value '%s' does not give valid JSON", p->adapter_value), -1);
        cJSON_Delete(v);
    }
    if (rc == 0) dsb_workload_reset(w, p->request_rate);
    goto out;
oom:
    snprintf(err, errlen, "out of memory");
out:
    free(weights);
    if (rc != 0) dsb_workload_free(w);
    return rc;
}

void dsb_workload_free(dsb_workload *w) {
    for (int i = 0; i < w->n_adapters; i++) free(w->adapters[i]);
    free(w->adapters);
    free(w->model);
    free(w->rec_adapter);
    dsb_popularity_free(&w->pop);
    dsb_records_free(&w->prompts);
    dsb_records_free(&w->trace);
    memset(w, 0, sizeof(*w));
}

int dsb_workload_set_model(dsb_workload *w, const char *model) {
    char *m = strdup(model);
    if (!m) return -1;
    free(w->model);
    w->model = m;
    return 0;
}

bool dsb_workload_needs_model(const dsb_workload *w) {
    if (w->p->adapter_field || w->n_adapters == 0 || w->p->base_fraction > 0.0) return true;
    const dsb_records *r = w->p->trace_file ? &w->trace : &w->prompts;
    for (size_t i = 0; w->rec_adapter && i < r->n; i++)
        if (w->rec_adapter[i] == DSB_BASE) return true;
    return false;
}

/* ---- The request stream -------------------------------------------------------------------- */

void dsb_workload_reset(dsb_workload *w, double rate) {
    const dsb_params *p = w->p;
    dsb_rng arr;
    dsb_rng_seed(&arr, p->seed, 1);
    dsb_arrivals_init(&w->arrivals, rate, p->burstiness, arr);
    dsb_rng_seed(&w->rng_adapter, p->seed, 2);
    dsb_rng_seed(&w->rng_len, p->seed, 3);
    dsb_rng_seed(&w->rng_prompt, p->seed, 4);
    w->pop.next = 0;
    w->t_next = 0.0;
    w->produced = 0;
}

static int pick_adapter(dsb_workload *w) {
    if (w->n_adapters == 0) return DSB_BASE;
    /* Always draw the base/adapter coin so the adapter sequence does not depend on the fraction's
     * being zero. */
    double u = dsb_rng_uniform(&w->rng_adapter);
    if (u < w->p->base_fraction) return DSB_BASE;
    return dsb_popularity_sample(&w->pop, &w->rng_adapter);
}

static void next_from_trace(dsb_workload *w, dsb_spec *s) {
    const dsb_trace_rec *r = &w->trace.trace[w->produced];
    double speed = w->p->trace_speedup > 0 ? w->p->trace_speedup : 1.0;
    s->arrival_s = r->t / speed;
    s->adapter = w->rec_adapter[w->produced];
    if (s->adapter == SAMPLE_ADAPTER) s->adapter = pick_adapter(w);
    s->input_len = r->input_len;
    s->output_len = r->output_len;
    s->record = -1;
}

bool dsb_workload_next(dsb_workload *w, dsb_spec *s) {
    const dsb_params *p = w->p;
    if (p->num_prompts > 0 && w->produced >= p->num_prompts) return false;
    if (p->trace_file && (size_t)w->produced >= w->trace.n) return false;
    memset(s, 0, sizeof(*s));
    s->prompt_seed = dsb_rng_next(&w->rng_prompt);
    if (p->trace_file) {
        next_from_trace(w, s);
    } else {
        s->arrival_s = w->t_next;
        w->t_next += dsb_arrivals_next_gap(&w->arrivals);
        s->adapter = pick_adapter(w);
        s->input_len = dsb_len_sample(&w->rng_len, p->input_len, p->range_ratio);
        s->output_len = dsb_len_sample(&w->rng_len, p->output_len, p->range_ratio);
        s->record = -1;
        if (w->prompts.n > 0) {
            s->record = (long)((size_t)w->produced % w->prompts.n);
            const dsb_prompt_rec *r = &w->prompts.prompts[s->record];
            s->input_len = r->est_tokens;
            if (r->output_len > 0) s->output_len = r->output_len;
            if (w->rec_adapter[s->record] != SAMPLE_ADAPTER) s->adapter = w->rec_adapter[s->record];
        }
    }
    w->produced++;
    return true;
}

const char *dsb_workload_adapter_name(const dsb_workload *w, int adapter) {
    if (adapter >= 0 && adapter < w->n_adapters) return w->adapters[adapter];
    return w->model ? w->model : "base";
}

/* Adds "prompt" or "messages" to the body. Returns 0 or -1 when out of memory. */
static int add_prompt(const dsb_workload *w, const dsb_spec *s, cJSON *o) {
    const dsb_params *p = w->p;
    const dsb_prompt_rec *rec = s->record >= 0 ? &w->prompts.prompts[s->record] : NULL;
    if (p->endpoint == DSB_EP_CHAT && rec && rec->messages)
        return cJSON_AddItemReferenceToObject(o, "messages", rec->messages) ? 0 : -1;
    if (p->endpoint == DSB_EP_COMPLETIONS && !rec && p->prompt_token_ids) {
        cJSON *ids = dsb_prompt_token_ids(s->prompt_seed, s->input_len, p->vocab_size);
        return ids && cJSON_AddItemToObject(o, "prompt", ids) ? 0 : (cJSON_Delete(ids), -1);
    }
    char *owned = rec ? NULL : dsb_prompt_words(s->prompt_seed, s->input_len);
    const char *text = rec ? rec->text : owned;
    int rc = -1;
    if (text && p->endpoint == DSB_EP_COMPLETIONS) {
        rc = cJSON_AddStringToObject(o, "prompt", text) ? 0 : -1;
    } else if (text) {
        cJSON *msgs = cJSON_AddArrayToObject(o, "messages");
        cJSON *m = cJSON_CreateObject();
        if (msgs && m && cJSON_AddStringToObject(m, "role", "user") && cJSON_AddStringToObject(m, "content", text)) {
            cJSON_AddItemToArray(msgs, m);
            rc = 0;
        } else {
            cJSON_Delete(m);
        }
    }
    free(owned);
    return rc;
}

/* The --adapter-field value for adapter a: the id as a string, or the --adapter-value template
 * with {i} and {id} substituted, parsed as JSON. NULL when out of memory or not valid JSON. */
static cJSON *adapter_value(const dsb_workload *w, int a) {
    const char *t = w->p->adapter_value;
    if (!t) return cJSON_CreateString(w->adapters[a]);
    size_t cap = strlen(t) + 64, len = 0;
    char *buf = malloc(cap), num[16];
    snprintf(num, sizeof(num), "%d", a);
    for (; buf && *t; t++) {
        const char *rep = strncmp(t, "{i}", 3) == 0 ? num : strncmp(t, "{id}", 4) == 0 ? w->adapters[a] : NULL;
        size_t rl = rep ? strlen(rep) : 1;
        if (len + rl + 1 > cap) {
            char *b = realloc(buf, (cap = (len + rl + 1) * 2));
            if (!b) break;
            buf = b;
        }
        memcpy(buf + len, rep ? rep : t, rl);
        len += rl;
        if (rep) t += rep == num ? 2 : 3;
    }
    cJSON *v = NULL;
    if (buf && !*t) {
        buf[len] = '\0';
        v = cJSON_Parse(buf);
    }
    free(buf);
    return v;
}

static int add_fields(const dsb_workload *w, const dsb_spec *s, cJSON *o) {
    const dsb_params *p = w->p;
    const char *base = w->model ? w->model : "";
    const char *adapter = s->adapter >= 0 ? w->adapters[s->adapter] : NULL;
    bool ok = cJSON_AddStringToObject(o, "model", (adapter && !p->adapter_field) ? adapter : base) != NULL;
    if (ok && adapter && p->adapter_field) {
        cJSON *v = adapter_value(w, s->adapter);
        ok = v && cJSON_AddItemToObject(o, p->adapter_field, v);
        if (!ok) cJSON_Delete(v);
    }
    if (!ok || add_prompt(w, s, o) != 0) return -1;
    ok = cJSON_AddNumberToObject(o, "max_tokens", s->output_len) != NULL;
    if (ok && p->endpoint == DSB_EP_CHAT) ok = cJSON_AddNumberToObject(o, "max_completion_tokens", s->output_len) != NULL;
    if (ok) ok = cJSON_AddNumberToObject(o, "temperature", p->temperature) != NULL;
    if (ok) ok = cJSON_AddTrueToObject(o, "stream") != NULL;
    cJSON *so = ok ? cJSON_AddObjectToObject(o, "stream_options") : NULL;
    ok = so && cJSON_AddTrueToObject(so, "include_usage");
    if (ok && p->ignore_eos) ok = cJSON_AddTrueToObject(o, "ignore_eos") != NULL;
    return ok ? 0 : -1;
}

char *dsb_workload_body(const dsb_workload *w, const dsb_spec *s, size_t *len) {
    cJSON *o = cJSON_CreateObject();
    char *body = NULL;
    if (o && add_fields(w, s, o) == 0) body = cJSON_PrintUnformatted(o);
    cJSON_Delete(o); /* a referenced messages array is not freed with it */
    if (body) *len = strlen(body);
    return body;
}
