/* Publishing: writes a ds_adapter as a PEFT directory that HF PEFT (PeftModel.from_pretrained) and
 * ds_adapter_load read back: adapter_config.json + adapter_model.safetensors, F32, PEFT keys
 * (the key names PEFT's save_pretrained writes; src/adapter/peft*.c reads the same). */
#include "train/train_internal.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors data is little-endian");

ds_peft_save_params ds_peft_save_default_params(void) {
    return (ds_peft_save_params){.base_model_name_or_path = "", .use_rslora = false, .lora_alpha = 0.0f};
}

/* ---- tensors ---- */

typedef struct st_out {
    char name[160];
    int64_t shape[2];
    const float *data;
    float *owned; /* a transposed copy (embedding A), freed with the list */
} st_out;

#define N_MODULES(a) ((size_t)(a)->n_layer * DS_PROJ_COUNT + 2)

/* LoRA module i in save order — layers (l·DS_PROJ_COUNT + p), lm_head, embed_tokens — or NULL;
 * path gets its HF module path. */
static const ds_lora_module *module_at(const ds_adapter *a, size_t i, char *path, size_t cap) {
    const size_t slots = (size_t)a->n_layer * DS_PROJ_COUNT;
    const ds_lora_module *m = i < slots ? (a->lora ? a->lora[i] : NULL) : i == slots ? a->lm_head : a->embed;
    const int proj = i < slots ? (int)(i % DS_PROJ_COUNT) : i == slots ? DS_PROJ_COUNT : TR_PROJ_EMBED;
    if (m && path) tr_module_path((int32_t)(i / DS_PROJ_COUNT), proj, path, cap);
    return m;
}

static void free_list(st_out *v, size_t n) {
    for (size_t i = 0; v && i < n; i++) free(v[i].owned);
    free(v);
}

/* PEFT lora_embedding_A [r][V] from the stored [V][r]. */
static float *transpose(const float *a, int32_t rows, int32_t cols) {
    float *t = malloc((size_t)rows * cols * sizeof(float));
    for (int32_t i = 0; t && i < rows; i++)
        for (int32_t j = 0; j < cols; j++) t[(size_t)j * rows + i] = a[(size_t)i * cols + j];
    return t;
}

static size_t st_bytes(const st_out *t) { return (size_t)t->shape[0] * (size_t)t->shape[1] * sizeof(float); }

/* The tensors of `a` with their PEFT keys; *n set. Free with free_list (NULL on OOM). */
static st_out *collect(const ds_adapter *a, size_t *n) {
    st_out *v = calloc(2 * N_MODULES(a) + 1, sizeof *v);
    if (!v) return NULL;
    *n = 0;
    for (size_t i = 0; i < N_MODULES(a); i++) {
        char path[96];
        const ds_lora_module *m = module_at(a, i, path, sizeof path);
        if (!m) continue;
        const bool emb = m == a->embed;
        st_out *A = &v[(*n)++], *B = &v[(*n)++];
        *A = (st_out){.shape = {m->rank, m->in}, .data = m->A};
        *B = (st_out){.shape = {m->out, m->rank}, .data = m->B};
        snprintf(A->name, sizeof A->name, "base_model.model.%s.%s", path, emb ? "lora_embedding_A" : "lora_A.weight");
        snprintf(B->name, sizeof B->name, "base_model.model.%s.%s", path, emb ? "lora_embedding_B" : "lora_B.weight");
        if (emb && !(A->data = A->owned = transpose(m->A, m->in, m->rank))) {
            free_list(v, *n);
            return NULL;
        }
    }
    if (a->prompt) v[(*n)++] = (st_out){"prompt_embeddings", {a->n_virtual, a->d_model}, a->prompt, NULL};
    if (a->prefix)
        v[(*n)++] =
            (st_out){"prompt_embeddings", {a->n_virtual, (int64_t)a->n_layer * 2 * a->prefix_row}, a->prefix, NULL};
    return v;
}

/* {"__metadata__": {"format": "pt"}, key: {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}} */
static char *st_header(const st_out *v, size_t n, size_t *len) {
    cJSON *h = cJSON_CreateObject(), *meta = cJSON_AddObjectToObject(h, "__metadata__");
    cJSON_AddStringToObject(meta, "format", "pt");
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        cJSON *t = cJSON_AddObjectToObject(h, v[i].name);
        cJSON_AddStringToObject(t, "dtype", "F32");
        const double shape[2] = {(double)v[i].shape[0], (double)v[i].shape[1]};
        const double offs[2] = {(double)off, (double)(off + st_bytes(&v[i]))};
        cJSON_AddItemToObject(t, "shape", cJSON_CreateDoubleArray(shape, 2));
        cJSON_AddItemToObject(t, "data_offsets", cJSON_CreateDoubleArray(offs, 2));
        off += st_bytes(&v[i]);
    }
    char *s = cJSON_PrintUnformatted(h);
    cJSON_Delete(h);
    if (!s) return NULL;
    size_t l = strlen(s), padded = (l + 7) / 8 * 8; /* data section 8-byte aligned, padded with spaces */
    char *out = realloc(s, padded + 1);
    if (!out) {
        free(s);
        return NULL;
    }
    memset(out + l, ' ', padded - l);
    out[padded] = 0;
    *len = padded;
    return out;
}

/* ---- files ---- */

typedef struct out_file {
    char tmp[4200], final[4200];
    FILE *f;
} out_file;

static int open_out(out_file *o, const char *dir, const char *name, ds_err *err) {
    snprintf(o->final, sizeof o->final, "%s/%s", dir, name);
    snprintf(o->tmp, sizeof o->tmp, "%s/.%s.tmp", dir, name);
    if (!(o->f = fopen(o->tmp, "wb"))) return ds_err_set(err, DS_EIO, "%s: %s", o->tmp, strerror(errno));
    return 0;
}

/* Flushed to disk before the rename (util/durable.h): after a crash the file is whole or absent. */
static int close_out(out_file *o, bool ok, ds_err *err) {
    ok = !ferror(o->f) && ok;
    if (ok && (fflush(o->f) != 0 || fsync(fileno(o->f)) != 0)) ok = false;
    if (fclose(o->f) != 0) ok = false;
    if (ok && rename(o->tmp, o->final) == 0) return 0;
    int e = errno;
    remove(o->tmp);
    return ds_err_set(err, DS_EIO, "%s: write failed (%s)", o->final, strerror(e));
}

static int write_safetensors(const ds_adapter *a, const char *dir, ds_err *err) {
    size_t n = 0, hlen = 0;
    st_out *v = collect(a, &n);
    char *hdr = v ? st_header(v, n, &hlen) : NULL;
    int rc = !hdr ? ds_err_set(err, DS_ENOMEM, "out of memory") : n == 0 ? ds_err_set(err, DS_EINVAL, "no tensors")
                                                                        : 0;
    out_file o;
    if (!rc) rc = open_out(&o, dir, "adapter_model.safetensors", err);
    if (!rc) {
        uint8_t len8[8];
        for (int i = 0; i < 8; i++) len8[i] = (uint8_t)((uint64_t)hlen >> (8 * i));
        bool ok = fwrite(len8, 1, 8, o.f) == 8 && fwrite(hdr, 1, hlen, o.f) == hlen;
        for (size_t i = 0; ok && i < n; i++) ok = fwrite(v[i].data, 1, st_bytes(&v[i]), o.f) == st_bytes(&v[i]);
        rc = close_out(&o, ok, err);
    }
    free(hdr);
    free_list(v, n);
    return rc;
}

static int write_config(cJSON *cfg, const char *dir, ds_err *err) {
    char *s = cJSON_Print(cfg);
    if (!s) return ds_err_set(err, DS_ENOMEM, "out of memory");
    out_file o;
    int rc = open_out(&o, dir, "adapter_config.json", err);
    if (!rc) rc = close_out(&o, fputs(s, o.f) >= 0 && fputc('\n', o.f) != EOF, err);
    free(s);
    return rc;
}

/* ---- adapter_config.json ---- */

static cJSON *common_config(const ds_adapter *a, const char *peft_type, const ds_peft_save_params *p) {
    cJSON *c = cJSON_CreateObject();
    cJSON_AddNullToObject(c, "auto_mapping");
    cJSON_AddStringToObject(c, "base_model_name_or_path", p->base_model_name_or_path ? p->base_model_name_or_path : "");
    cJSON_AddBoolToObject(c, "inference_mode", true);
    cJSON_AddStringToObject(c, "peft_type", peft_type);
    cJSON_AddNullToObject(c, "revision");
    cJSON_AddStringToObject(c, "task_type", "CAUSAL_LM");
    return c;
}

/* α that reproduces the module's scale under PEFT's formula (s = α/r, rsLoRA α/√r): the caller's
 * lora_alpha when it does, else derived from the scale. */
static double module_alpha(const ds_lora_module *m, const ds_peft_save_params *p) {
    const double root = p->use_rslora ? sqrt((double)m->rank) : (double)m->rank;
    if (p->lora_alpha > 0 && (float)(p->lora_alpha / root) == m->scale) return p->lora_alpha;
    return (double)m->scale * root;
}

/* target_modules: a projection's short name when every layer has it, else each module's path. */
static void add_targets(cJSON *list, const ds_adapter *a) {
    for (int p = 0; a->lora && p < DS_PROJ_COUNT; p++) {
        int32_t count = 0;
        for (int32_t l = 0; l < a->n_layer; l++) count += a->lora[(size_t)l * DS_PROJ_COUNT + p] != NULL;
        if (count == a->n_layer) {
            cJSON_AddItemToArray(list, cJSON_CreateString(ds_proj_name((ds_proj)p)));
            continue;
        }
        for (int32_t l = 0; count && l < a->n_layer; l++) {
            char path[96];
            tr_module_path(l, p, path, sizeof path);
            if (a->lora[(size_t)l * DS_PROJ_COUNT + p]) cJSON_AddItemToArray(list, cJSON_CreateString(path));
        }
    }
    if (a->lm_head) cJSON_AddItemToArray(list, cJSON_CreateString("lm_head"));
    if (a->embed) cJSON_AddItemToArray(list, cJSON_CreateString("embed_tokens"));
}

/* r / lora_alpha of the first module; rank_pattern / alpha_pattern (exact module paths) for the
 * modules that differ. */
static void add_ranks(cJSON *c, const ds_adapter *a, const ds_peft_save_params *p) {
    cJSON *rp = cJSON_CreateObject(), *ap = cJSON_CreateObject();
    const ds_lora_module *first = NULL;
    for (size_t i = 0; i < N_MODULES(a); i++) {
        char path[96];
        const ds_lora_module *m = module_at(a, i, path, sizeof path);
        if (!m) continue;
        if (!first) first = m;
        if (m->rank != first->rank) cJSON_AddNumberToObject(rp, path, m->rank);
        if (module_alpha(m, p) != module_alpha(first, p)) cJSON_AddNumberToObject(ap, path, module_alpha(m, p));
    }
    cJSON_AddItemToObject(c, "alpha_pattern", ap);
    cJSON_AddNumberToObject(c, "lora_alpha", first ? module_alpha(first, p) : 8);
    cJSON_AddNumberToObject(c, "r", first ? first->rank : 8);
    cJSON_AddItemToObject(c, "rank_pattern", rp);
}

static cJSON *lora_config(const ds_adapter *a, const ds_peft_save_params *p) {
    cJSON *c = common_config(a, "LORA", p);
    add_ranks(c, a, p);
    cJSON_AddStringToObject(c, "bias", "none");
    cJSON_AddBoolToObject(c, "fan_in_fan_out", false);
    cJSON_AddBoolToObject(c, "init_lora_weights", true);
    cJSON_AddNullToObject(c, "layers_pattern");
    cJSON_AddNullToObject(c, "layers_to_transform");
    cJSON_AddBoolToObject(c, "lora_bias", false);
    cJSON_AddNumberToObject(c, "lora_dropout", 0.0);
    cJSON_AddNullToObject(c, "modules_to_save");
    add_targets(cJSON_AddArrayToObject(c, "target_modules"), a);
    cJSON_AddBoolToObject(c, "use_dora", false);
    cJSON_AddBoolToObject(c, "use_rslora", p->use_rslora);
    return c;
}

/* Prompt tuning: token_dim = hidden size. Prefix tuning on GQA (PEFT >= 0.12): token_dim =
 * head_dim·n_kv_head and num_attention_heads = n_kv_head (PEFT's own GQA handling). */
static cJSON *prompt_config(const ds_adapter *a, const ds_model *m, const ds_peft_save_params *p) {
    const bool prefix = a->kind == DS_ADAPTER_PREFIX;
    cJSON *c = common_config(a, prefix ? "PREFIX_TUNING" : "PROMPT_TUNING", p);
    cJSON_AddNumberToObject(c, "num_attention_heads", prefix ? m->cfg.n_kv_head : m->cfg.n_head);
    cJSON_AddNumberToObject(c, "num_layers", a->n_layer);
    cJSON_AddNumberToObject(c, "num_transformer_submodules", 1);
    cJSON_AddNumberToObject(c, "num_virtual_tokens", a->n_virtual);
    cJSON_AddNumberToObject(c, "token_dim", prefix ? a->prefix_row : a->d_model);
    cJSON_AddNullToObject(c, "modules_to_save");
    if (prefix) {
        cJSON_AddNumberToObject(c, "encoder_hidden_size", a->prefix_row);
        cJSON_AddBoolToObject(c, "prefix_projection", false);
    } else {
        cJSON_AddStringToObject(c, "prompt_tuning_init", "RANDOM");
        cJSON_AddNullToObject(c, "prompt_tuning_init_text");
        cJSON_AddNullToObject(c, "tokenizer_name_or_path");
        cJSON_AddNullToObject(c, "tokenizer_kwargs");
    }
    return c;
}

static int check_savable(const ds_adapter *a, ds_err *err) {
    if (a->kind == DS_ADAPTER_LORA && strcmp(a->peft_type, "ADALORA")) {
        for (size_t i = 0; i < N_MODULES(a); i++) {
            const ds_lora_module *m = module_at(a, i, NULL, 0);
            if (m && (m->dora_scale || m->bias_B))
                return ds_err_set(err, DS_EUNSUPPORTED, "%s: saving DoRA / lora_bias adapters is not supported", a->name);
        }
        return 0;
    }
    if (a->kind == DS_ADAPTER_PREFIX && a->prefix) return 0;
    if (a->kind == DS_ADAPTER_PROMPT && a->prompt && strcmp(a->peft_type, "P_TUNING")) return 0;
    return ds_err_set(err, DS_EUNSUPPORTED, "%s: saving %s adapters is not supported (LoRA, prompt and prefix tuning)",
                      a->name, a->peft_type);
}

int ds_peft_save(const ds_adapter *a, const ds_model *base, const char *dir, const ds_peft_save_params *params,
                 ds_err *err) {
    ds_peft_save_params p = params ? *params : ds_peft_save_default_params();
    if (!a || !base || !dir || !*dir) return ds_err_set(err, DS_EINVAL, "ds_peft_save: missing argument");
    if (strlen(dir) > 4000) return ds_err_set(err, DS_EINVAL, "%.64s...: path too long", dir);
    int rc = check_savable(a, err);
    if (rc) return rc;
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) return ds_err_set(err, DS_EIO, "%s: %s", dir, strerror(errno));
    cJSON *cfg = a->kind == DS_ADAPTER_LORA ? lora_config(a, &p) : prompt_config(a, base, &p);
    if (!cfg) return ds_err_set(err, DS_ENOMEM, "out of memory");
    rc = write_safetensors(a, dir, err); /* weights first: a reader that sees the config finds them */
    if (!rc) rc = write_config(cfg, dir, err);
    cJSON_Delete(cfg);
    return rc;
}
