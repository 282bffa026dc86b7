/* adapter_config.json: parsing, type checks, and refusal of the PEFT features whose adapters would
 * not reproduce PEFT's outputs on an unmodified base. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapter/loader.h"

/* Bounds that keep a hostile config cheap: key counts bound the duplicate-key scan (quadratic) and
 * pattern compilation; match limits bound regex backtracking. */
#define MAX_KEYS 1024
#define MAX_PATTERN_LEN 1024
#define MATCH_LIMIT 100000

typedef struct pctx {
    const char *src;
    ds_err *err;
} pctx;

/* Absent and JSON null mean the same thing in PEFT configs (None). */
static const cJSON *field(const cJSON *o, const char *name) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, name);
    return cJSON_IsNull(j) ? NULL : j;
}

static int get_int(pctx *p, const cJSON *o, const char *name, int32_t dflt, int32_t lo, int32_t hi, int32_t *out) {
    const cJSON *j = field(o, name);
    *out = dflt;
    if (!j) return 0;
    double v = j->valuedouble;
    if (!cJSON_IsNumber(j) || !isfinite(v) || v != floor(v))
        return ds_err_set(p->err, DS_EFORMAT, "%s: \"%s\" must be an integer", p->src, name);
    if (v < lo || v > hi)
        return ds_err_set(p->err, DS_ERANGE, "%s: \"%s\" = %.0f is out of range [%d, %d]", p->src, name, v, lo, hi);
    *out = (int32_t)v;
    return 0;
}

static int get_num(pctx *p, const cJSON *o, const char *name, double dflt, double *out) {
    const cJSON *j = field(o, name);
    *out = dflt;
    if (!j) return 0;
    if (!cJSON_IsNumber(j) || !isfinite(j->valuedouble))
        return ds_err_set(p->err, DS_EFORMAT, "%s: \"%s\" must be a finite number", p->src, name);
    *out = j->valuedouble;
    return 0;
}

static int get_bool(pctx *p, const cJSON *o, const char *name, bool dflt, bool *out) {
    const cJSON *j = field(o, name);
    *out = dflt;
    if (!j) return 0;
    if (!cJSON_IsBool(j)) return ds_err_set(p->err, DS_EFORMAT, "%s: \"%s\" must be true or false", p->src, name);
    *out = cJSON_IsTrue(j);
    return 0;
}

static int get_str(pctx *p, const cJSON *o, const char *name, const char **out) {
    const cJSON *j = field(o, name);
    *out = NULL;
    if (!j) return 0;
    if (!cJSON_IsString(j)) return ds_err_set(p->err, DS_EFORMAT, "%s: \"%s\" must be a string", p->src, name);
    *out = j->valuestring;
    return 0;
}

/* Python's json keeps the LAST duplicate and cJSON the first: refuse duplicates so that PEFT and
 * deltaserve can never read different values from one file. */
static int check_keys(pctx *p, const cJSON *o, const char *what) {
    size_t n = 0;
    for (const cJSON *a = o->child; a; a = a->next, n++) {
        if (n >= MAX_KEYS) return ds_err_set(p->err, DS_ERANGE, "%s: %s has more than %d keys", p->src, what, MAX_KEYS);
        for (const cJSON *b = o->child; b != a; b = b->next)
            if (!strcmp(a->string, b->string))
                return ds_err_set(p->err, DS_EFORMAT, "%s: %s: key \"%s\" appears twice", p->src, what, a->string);
    }
    return 0;
}

/* A field PEFT treats as "on" when truthy: non-null, not false, not an empty list/dict. */
static bool is_set(const cJSON *o, const char *name) {
    const cJSON *j = field(o, name);
    if (!j || cJSON_IsFalse(j)) return false;
    if ((cJSON_IsArray(j) || cJSON_IsObject(j)) && !j->child) return false;
    return true;
}

/* ---- patterns ---- */

static pcre2_code *compile_re(const char *re_text, size_t len, uint32_t opts, int *ecode, PCRE2_SIZE *eoff) {
    return pcre2_compile((PCRE2_SPTR)re_text, len, opts | PCRE2_UTF, ecode, eoff, NULL);
}

static int compile_pattern(pctx *p, const char *field_name, const char *key, pcre2_code **out) {
    size_t klen = strlen(key);
    if (klen == 0 || klen > MAX_PATTERN_LEN)
        return ds_err_set(p->err, DS_EFORMAT, "%s: \"%s\" key of length %zu (must be 1..%d)", p->src, field_name, klen,
                          MAX_PATTERN_LEN);
    char buf[MAX_PATTERN_LEN + 16];
    int n = snprintf(buf, sizeof buf, "(.*\\.)?(%s)$", key);
    int ecode;
    PCRE2_SIZE eoff;
    /* ANCHORED: PEFT uses re.match, which only matches at the start. */
    *out = compile_re(buf, (size_t)n, PCRE2_ANCHORED, &ecode, &eoff);
    if (!*out) {
        char msg[128];
        pcre2_get_error_message(ecode, (PCRE2_UCHAR *)msg, sizeof msg);
        return ds_err_set(p->err, DS_EFORMAT, "%s: \"%s\" key \"%s\" is not a valid regex: %s", p->src, field_name, key,
                          msg);
    }
    return 0;
}

static void patterns_free(peft_patterns *ps) {
    for (size_t i = 0; i < ps->n; i++) {
        free(ps->p[i].key);
        pcre2_code_free(ps->p[i].re);
    }
    free(ps->p);
    *ps = (peft_patterns){0};
}

/* rank_pattern (integers ≥ 1) or alpha_pattern (finite numbers): {key: value}. */
static int parse_patterns(pctx *p, const cJSON *root, const char *name, bool integer, peft_patterns *ps) {
    const cJSON *o = field(root, name);
    if (!o) return 0;
    if (!cJSON_IsObject(o)) return ds_err_set(p->err, DS_EFORMAT, "%s: \"%s\" must be an object", p->src, name);
    int rc = check_keys(p, o, name);
    if (rc) return rc;
    size_t n = (size_t)cJSON_GetArraySize(o);
    if (n == 0) return 0;
    if (!(ps->p = calloc(n, sizeof *ps->p))) return ds_err_set(p->err, DS_ENOMEM, "%s: out of memory", p->src);
    for (const cJSON *j = o->child; j; j = j->next) {
        double v = j->valuedouble;
        bool ok = cJSON_IsNumber(j) && isfinite(v) && (!integer || (v == floor(v) && v >= 1 && v <= INT32_MAX));
        if (!ok)
            return ds_err_set(p->err, DS_EFORMAT, "%s: \"%s\"[\"%s\"] must be %s", p->src, name, j->string,
                              integer ? "an integer >= 1" : "a finite number");
        peft_pattern *e = &ps->p[ps->n];
        if (!(e->key = strdup(j->string))) return ds_err_set(p->err, DS_ENOMEM, "%s: out of memory", p->src);
        ps->n++;
        e->value = v;
        if ((rc = compile_pattern(p, name, j->string, &e->re))) return rc;
    }
    return 0;
}

static int match_re(const pcre2_code *re, const char *s, bool *hit, const char *src, const char *what, ds_err *err) {
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
    pcre2_match_context *mc = pcre2_match_context_create(NULL);
    if (!md || !mc) {
        pcre2_match_data_free(md);
        pcre2_match_context_free(mc);
        return ds_err_set(err, DS_ENOMEM, "%s: out of memory", src);
    }
    pcre2_set_match_limit(mc, MATCH_LIMIT);
    int rc = pcre2_match(re, (PCRE2_SPTR)s, strlen(s), 0, 0, md, mc);
    pcre2_match_data_free(md);
    pcre2_match_context_free(mc);
    *hit = rc >= 0;
    if (rc >= 0 || rc == PCRE2_ERROR_NOMATCH) return 0;
    return ds_err_set(err, DS_EFORMAT, "%s: %s: regex failed on \"%s\" (pcre2 error %d)", src, what, s, rc);
}

int peft_pattern_lookup(const peft_patterns *ps, const char *path, double *value, bool *found, const char *src,
                        const char *field_name, ds_err *err) {
    *found = false;
    for (size_t i = 0; i < ps->n; i++) {
        bool hit;
        int rc = match_re(ps->p[i].re, path, &hit, src, field_name, err);
        if (rc) return rc;
        if (hit) {
            *value = ps->p[i].value;
            *found = true;
            return 0;
        }
    }
    return 0;
}

/* ---- per-type sections ---- */

static const char *const KNOWN_TYPES[] = {"LORA", "ADALORA", "IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"};

static int parse_type(pctx *p, const cJSON *root, peft_config *c) {
    const char *t, *task;
    int rc = get_str(p, root, "peft_type", &t);
    if (!rc) rc = get_str(p, root, "task_type", &task);
    if (rc) return rc;
    if (!t) return ds_err_set(p->err, DS_EFORMAT, "%s: \"peft_type\" is missing", p->src);
    size_t k = 0;
    while (k < sizeof KNOWN_TYPES / sizeof KNOWN_TYPES[0] && strcmp(t, KNOWN_TYPES[k])) k++;
    if (k == sizeof KNOWN_TYPES / sizeof KNOWN_TYPES[0])
        return ds_err_set(p->err, DS_EUNSUPPORTED,
                          "%s: peft_type \"%.64s\" is not supported (LORA, ADALORA, IA3, PROMPT_TUNING, P_TUNING, "
                          "PREFIX_TUNING)",
                          p->src, t);
    if (task && strcmp(task, "CAUSAL_LM"))
        return ds_err_set(p->err, DS_EUNSUPPORTED, "%s: task_type \"%.64s\" is not supported (CAUSAL_LM)", p->src, task);
    snprintf(c->peft_type, sizeof c->peft_type, "%s", t);
    static const ds_adapter_kind kinds[] = {DS_ADAPTER_LORA,   DS_ADAPTER_LORA,   DS_ADAPTER_IA3,
                                            DS_ADAPTER_PROMPT, DS_ADAPTER_PROMPT, DS_ADAPTER_PREFIX};
    c->kind = kinds[k];
    c->adalora = k == 1;
    c->p_tuning = k == 4;
    return 0;
}

/* init_lora_weights variants that rewrite the base weights at init (W_res = W − s·B·A): their
 * adapters only reproduce PEFT on that mutated base. */
static int check_init(pctx *p, const cJSON *root) {
    const cJSON *j = field(root, "init_lora_weights");
    if (!j || cJSON_IsBool(j)) return 0;
    if (!cJSON_IsString(j))
        return ds_err_set(p->err, DS_EFORMAT, "%s: \"init_lora_weights\" must be a boolean or a string", p->src);
    const char *s = j->valuestring;
    if (!strncmp(s, "pissa", 5) || !strcmp(s, "olora") || !strcmp(s, "corda") || !strcmp(s, "loftq") ||
        !strcmp(s, "lora_ga"))
        return ds_err_set(p->err, DS_EUNSUPPORTED,
                          "%s: init_lora_weights = \"%.64s\" adapters need the base weights it modified; convert the "
                          "adapter to plain LoRA first (PEFT save_pretrained(path_initial_model_for_weight_conversion=...))",
                          p->src, s);
    return 0;
}

/* LoRA features that change the forward pass in ways deltaserve does not implement. */
static int check_refused(pctx *p, const cJSON *root) {
    static const struct {
        const char *name, *why;
    } refused[] = {
        {"layer_replication", "it duplicates base layers"},
        {"alora_invocation_tokens", "activated LoRA (aLoRA) applies the adapter only after the invocation tokens"},
        {"target_parameters", "LoRA on nn.Parameter targets is not supported"},
        {"use_qalora", "QALoRA pools the input of quantised layers"},
        {"trainable_token_indices", "trainable tokens REPLACE rows of the base embedding"},
        {"arrow_config", "Arrow routing is not supported"},
        {"kasa_config", "KaSA truncates the base weights"},
        {"use_bdlora", "block-diagonal LoRA is not supported"},
        {"monteclora_config", "MonteCLoRA is not supported"},
    };
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
        /* aLoRA is on for any non-null list, even an empty one (PEFT tests `is not None`). */
        bool on = i == 1 ? field(root, refused[i].name) != NULL : is_set(root, refused[i].name);
        if (on)
            return ds_err_set(p->err, DS_EUNSUPPORTED, "%s: \"%s\" is set: %s", p->src, refused[i].name,
                              refused[i].why);
    }
    return check_init(p, root);
}

static int parse_modules_to_save(pctx *p, const cJSON *root, peft_config *c) {
    const cJSON *j = field(root, "modules_to_save");
    if (!j) return 0;
    if (!cJSON_IsArray(j)) return ds_err_set(p->err, DS_EFORMAT, "%s: \"modules_to_save\" must be a list", p->src);
    for (const cJSON *e = j->child; e; e = e->next, c->n_modules_to_save++)
        if (!cJSON_IsString(e))
            return ds_err_set(p->err, DS_EFORMAT, "%s: \"modules_to_save\" entries must be strings", p->src);
    return 0;
}

static int parse_lora(pctx *p, const cJSON *root, peft_config *c) {
    const char *bias;
    int rc = get_int(p, root, "r", 8, 1, INT32_MAX, &c->r);
    if (!rc) rc = get_int(p, root, "init_r", 12, 1, INT32_MAX, &c->init_r);
    if (!rc) rc = get_num(p, root, "lora_alpha", 8.0, &c->alpha);
    if (!rc) rc = get_bool(p, root, "use_rslora", false, &c->rslora);
    if (!rc) rc = get_bool(p, root, "use_dora", false, &c->dora);
    if (!rc) rc = get_bool(p, root, "lora_bias", false, &c->lora_bias);
    if (!rc) rc = get_str(p, root, "bias", &bias);
    if (!rc) rc = check_refused(p, root);
    if (!rc) rc = parse_modules_to_save(p, root, c);
    if (rc) return rc;
    if (!bias) bias = "none";
    if (strcmp(bias, "none") && strcmp(bias, "all") && strcmp(bias, "lora_only"))
        return ds_err_set(p->err, DS_EFORMAT, "%s: \"bias\" = \"%.32s\" (expected none, all or lora_only)", p->src, bias);
    snprintf(c->bias, sizeof c->bias, "%s", bias);
    if (c->dora && c->lora_bias)
        return ds_err_set(p->err, DS_EUNSUPPORTED, "%s: use_dora together with lora_bias is not supported", p->src);
    if (c->adalora) {
        /* AdaLoRA's rank_pattern is {module: [kept-rank bools]}; the saved tensors are already cut to
         * the kept ranks, so it only needs to be well-formed. */
        const cJSON *rp = field(root, "rank_pattern");
        if (rp && !cJSON_IsObject(rp))
            return ds_err_set(p->err, DS_EFORMAT, "%s: \"rank_pattern\" must be an object", p->src);
        if (c->dora) return ds_err_set(p->err, DS_EUNSUPPORTED, "%s: use_dora is not supported with ADALORA", p->src);
        return 0;
    }
    rc = parse_patterns(p, root, "rank_pattern", true, &c->rank_pattern);
    if (!rc) rc = parse_patterns(p, root, "alpha_pattern", false, &c->alpha_pattern);
    return rc;
}

static int parse_ia3(pctx *p, const cJSON *root, peft_config *c) {
    int rc = parse_modules_to_save(p, root, c);
    if (rc) return rc;
    const cJSON *j = field(root, "feedforward_modules");
    if (!j) return 0;
    c->has_ff = true;
    if (cJSON_IsString(j)) {
        int ecode;
        PCRE2_SIZE eoff;
        size_t len = strlen(j->valuestring);
        if (len > MAX_PATTERN_LEN)
            return ds_err_set(p->err, DS_ERANGE, "%s: \"feedforward_modules\" regex longer than %d", p->src,
                              MAX_PATTERN_LEN);
        /* PEFT: re.fullmatch(feedforward_modules, key) */
        c->ff_re = compile_re(j->valuestring, len, PCRE2_ANCHORED | PCRE2_ENDANCHORED, &ecode, &eoff);
        if (!c->ff_re) return ds_err_set(p->err, DS_EFORMAT, "%s: \"feedforward_modules\" is not a valid regex", p->src);
        return 0;
    }
    if (!cJSON_IsArray(j))
        return ds_err_set(p->err, DS_EFORMAT, "%s: \"feedforward_modules\" must be a list or a string", p->src);
    size_t n = (size_t)cJSON_GetArraySize(j);
    if (n > MAX_KEYS) return ds_err_set(p->err, DS_ERANGE, "%s: \"feedforward_modules\" is too long", p->src);
    if (n && !(c->ff_list = calloc(n, sizeof *c->ff_list))) return ds_err_set(p->err, DS_ENOMEM, "out of memory");
    for (const cJSON *e = j->child; e; e = e->next) {
        if (!cJSON_IsString(e))
            return ds_err_set(p->err, DS_EFORMAT, "%s: \"feedforward_modules\" entries must be strings", p->src);
        if (!(c->ff_list[c->n_ff++] = strdup(e->valuestring))) return ds_err_set(p->err, DS_ENOMEM, "out of memory");
    }
    return 0;
}

int peft_is_feedforward(const peft_config *c, const char *path, bool *ff, const char *src, ds_err *err) {
    *ff = false;
    if (c->ff_re) return match_re(c->ff_re, path, ff, src, "feedforward_modules", err);
    /* PEFT: any(key.endswith(target_key) for target_key in feedforward_modules) */
    size_t pl = strlen(path);
    for (size_t i = 0; i < c->n_ff && !*ff; i++) {
        size_t kl = strlen(c->ff_list[i]);
        *ff = kl <= pl && !strcmp(path + pl - kl, c->ff_list[i]);
    }
    return 0;
}

static int parse_prompt(pctx *p, const cJSON *root, peft_config *c) {
    int rc = get_int(p, root, "num_virtual_tokens", 0, 1, DS_ADAPTER_MAX_VIRTUAL, &c->n_virtual);
    if (!rc) rc = get_int(p, root, "token_dim", 0, 1, INT32_MAX, &c->token_dim);
    if (!rc) rc = get_int(p, root, "num_layers", 0, 1, INT32_MAX, &c->num_layers);
    if (!rc) rc = get_int(p, root, "num_attention_heads", 0, 1, INT32_MAX, &c->num_heads);
    if (!rc) rc = get_int(p, root, "num_transformer_submodules", 1, 1, 2, &c->n_submodules);
    if (!rc) rc = get_bool(p, root, "prefix_projection", false, &c->prefix_projection);
    if (!rc) rc = parse_modules_to_save(p, root, c);
    if (rc) return rc;
    if (!c->n_virtual) return ds_err_set(p->err, DS_EFORMAT, "%s: \"num_virtual_tokens\" is missing", p->src);
    /* Encoder-decoder models use 2 (a prompt for each stack); a causal LM has one. */
    if (c->n_submodules != 1)
        return ds_err_set(p->err, DS_EUNSUPPORTED, "%s: num_transformer_submodules = %d (a causal LM uses 1)", p->src,
                          c->n_submodules);
    return 0;
}

void peft_config_free(peft_config *c) {
    if (!c) return;
    patterns_free(&c->rank_pattern);
    patterns_free(&c->alpha_pattern);
    for (size_t i = 0; i < c->n_ff; i++) free(c->ff_list[i]);
    free(c->ff_list);
    pcre2_code_free(c->ff_re);
    memset(c, 0, sizeof *c);
}

int peft_config_parse(peft_config *c, const char *json, size_t len, const char *src, ds_err *err) {
    memset(c, 0, sizeof *c);
    pctx p = {src ? src : "adapter_config.json", err};
    if (len > DS_ADAPTER_CONFIG_MAX)
        return ds_err_set(err, DS_ERANGE, "%s: %zu bytes, limit is %zu", p.src, len, DS_ADAPTER_CONFIG_MAX);
    cJSON *root = json ? cJSON_ParseWithLength(json, len) : NULL;
    if (!root) return ds_err_set(err, DS_EFORMAT, "%s: not valid JSON", p.src);
    int rc = 0;
    if (!cJSON_IsObject(root)) rc = ds_err_set(err, DS_EFORMAT, "%s: top level must be a JSON object", p.src);
    if (!rc) rc = check_keys(&p, root, "adapter_config");
    if (!rc) rc = parse_type(&p, root, c);
    if (!rc && c->kind == DS_ADAPTER_LORA) rc = parse_lora(&p, root, c);
    if (!rc && c->kind == DS_ADAPTER_IA3) rc = parse_ia3(&p, root, c);
    if (!rc && (c->kind == DS_ADAPTER_PROMPT || c->kind == DS_ADAPTER_PREFIX)) rc = parse_prompt(&p, root, c);
    cJSON_Delete(root);
    if (rc) peft_config_free(c);
    return rc;
}

int ds_adapter_config_check(const char *json, size_t len, ds_err *err) {
    peft_config c;
    int rc = peft_config_parse(&c, json, len, "adapter_config.json", err);
    if (!rc) peft_config_free(&c);
    return rc;
}
