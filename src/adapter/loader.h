/* deltaserve — internal API shared by the adapter loaders (adapter.c, peft*.c, gguf_lora.c).
 *
 * Adapter files are untrusted: every size used for an allocation has been checked against the base
 * model's dimensions first, and every message names the file and the field or tensor at fault.
 * Nothing here keeps global state; all functions may run on any thread. */
#ifndef DS_ADAPTER_LOADER_H
#define DS_ADAPTER_LOADER_H

#include "ds/adapter.h"
#include "ds/model.h"
#include "format/safetensors.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

/* adapter_config.json larger than this is refused (real ones are a few KiB; an all-linear
 * target_modules list of a 100-layer model stays far below). */
#define DS_ADAPTER_CONFIG_MAX ((size_t)4 << 20)
/* Soft prompts / prefixes longer than this are refused before any allocation. */
#define DS_ADAPTER_MAX_VIRTUAL 65536

/* rank_pattern / alpha_pattern: key k applies to module path p when (.*\.)?(k)$ matches p
 * (anchored at the start, as PEFT's re.match); the first key in file order wins. */
typedef struct peft_pattern {
    char *key;
    pcre2_code *re;
    double value;
} peft_pattern;

typedef struct peft_patterns {
    peft_pattern *p;
    size_t n;
} peft_patterns;

typedef struct peft_config {
    char peft_type[24];
    ds_adapter_kind kind;
    bool adalora, p_tuning;
    /* LoRA family */
    int32_t r, init_r;
    double alpha;
    bool rslora, dora, lora_bias;
    char bias[12];                 /* "none", "all", "lora_only" */
    size_t n_modules_to_save;
    peft_patterns alpha_pattern;   /* LoRA only (AdaLoRA ignores it, as PEFT does) */
    peft_patterns rank_pattern;    /* LoRA only; informational: ranks come from tensor shapes */
    /* IA³ feedforward_modules: a list of name suffixes, or one full-match regex */
    bool has_ff;
    char **ff_list;
    size_t n_ff;
    pcre2_code *ff_re;
    /* prompt learning (0 = absent) */
    int32_t n_virtual, token_dim, num_layers, num_heads, n_submodules;
    bool prefix_projection;
} peft_config;

/* Parses and validates adapter_config.json text; `src` names it in messages. On failure *c needs
 * no peft_config_free. Returns 0, DS_EFORMAT (malformed / wrong type), DS_EUNSUPPORTED (a valid
 * feature deltaserve refuses), DS_ERANGE (too large) or DS_ENOMEM. */
int peft_config_parse(peft_config *c, const char *json, size_t len, const char *src, ds_err *err);
void peft_config_free(peft_config *c);
/* Value of the first pattern matching module path `path`; *found false when none does. Returns 0
 * or DS_EFORMAT when the regex engine gives up (match limit). */
int peft_pattern_lookup(const peft_patterns *ps, const char *path, double *value, bool *found, const char *src,
                        const char *field, ds_err *err);
/* Whether feedforward_modules names module `path` (PEFT _check_target_module_feedforward). */
int peft_is_feedforward(const peft_config *c, const char *path, bool *ff, const char *src, ds_err *err);

/* Tensor roles of one adapted module. */
enum { ROLE_A = 0, ROLE_B, ROLE_BIAS, ROLE_MAG, ROLE_E, ROLE_IA3, ROLE_COUNT };

/* Everything the PEFT loaders share while loading one directory. */
typedef struct peft_ctx {
    const char *st_path;           /* adapter_model.safetensors, for messages */
    const char *cfg_path;          /* adapter_config.json, for messages */
    const ds_model *base;
    const peft_config *cfg;
    ds_st_file st;
    ds_adapter *a;
    ds_err *err;
    /* [n_slots][ROLE_COUNT]; slot l*DS_PROJ_COUNT+p, the last one is lm_head */
    const ds_st_tensor *(*slots)[ROLE_COUNT];
    size_t n_slots;
    const ds_st_tensor *emb_A, *emb_B; /* LoRA on embed_tokens (lora_embedding_A / _B) */
} peft_ctx;

#define PEFT_LM_HEAD_SLOT(c) ((c)->n_slots - 1)

/* Sorts every tensor of the file into ctx->slots by module and role; any tensor that is not an
 * adapter tensor of the config's type on a supported module is refused by name. */
int peft_collect_slots(peft_ctx *c);
/* HF module path of a slot ("model.layers.3.self_attn.q_proj" or "lm_head"). */
void peft_slot_path(const peft_ctx *c, size_t slot, char *buf, size_t cap);
/* Base dimensions of projection p (DS_PROJ_COUNT = lm_head) and its weight (HF [out][in]). */
void ds_adapter_base_dims(const ds_model *m, int proj, int32_t *in, int32_t *out);
const ds_weight *ds_adapter_base_weight(const ds_model *m, int32_t layer, int proj);
/* The base projections one PEFT module covers: 1 (proj itself), or Phi-3's fused qkv_proj (proj Q →
 * Q, K, V) and gate_up_proj (proj GATE → GATE, UP), whose output rows are theirs in that order.
 * Fills parts[], rows[] (each part's output rows) and *out (their sum); returns the count. */
int ds_adapter_module_parts(const ds_model *m, int proj, int parts[3], int32_t rows[3], int32_t *out);
/* Row `row` of the module's base weight (the fused one for Phi-3), dequantised to fp32 [in]. */
void ds_adapter_base_row(const ds_model *m, int32_t layer, int proj, int32_t row, float *dst);

/* Per-type loaders over a collected context (peft_lora.c, peft_prompt.c). */
int peft_load_lora(peft_ctx *c);
int peft_load_ia3(peft_ctx *c);
int peft_load_prompt(peft_ctx *c);
int peft_load_prefix(peft_ctx *c);
/* Reads a whole tensor to fp32, refusing non-finite values; *out malloc'd. */
int peft_read(peft_ctx *c, const ds_st_tensor *t, const int64_t *shape, int ndims, float **out);

/* Loaders behind ds_adapter_load; `a` is allocated with name/path set, kind and tables empty. */
int ds_peft_load(ds_adapter *a, const char *dir, const ds_model *base, ds_err *err);
int ds_gguf_lora_load(ds_adapter *a, const char *path, const ds_model *base, float user_scale, ds_err *err);

/* AdapterHub bottleneck adapters (bottleneck.c): a directory with adapter.safetensors or
 * pytorch_adapter.bin (the `adapters` package's save_adapter) rather than PEFT's files. */
bool ds_bottleneck_is_dir(const char *dir);
int ds_bottleneck_load(ds_adapter *a, const char *dir, const ds_model *base, ds_err *err);
void ds_bn_module_free(ds_bn_module *m);
/* adapter_config.json of an AdapterHub adapter alone, against `base` (fuzz target entry point). */
int ds_bottleneck_config_check(const char *json, size_t len, const ds_model *base, ds_err *err);

/* AdapterHub prefix tuning (ah_prefix.c), alone or in a config union (MAM). */
struct cJSON;
typedef struct ds_ah_prefix_cfg {
    int32_t length;     /* prefix_length */
    int32_t bottleneck; /* bottleneck_size of the reparametrisation MLP (flat false) */
    bool flat;
    ds_act act;         /* its non_linearity */
} ds_ah_prefix_cfg;
/* Checks one PrefixTuningConfig object against the base; refuses gating, leave_out and non-Llama
 * bases by name. Returns 0, DS_EFORMAT or DS_EUNSUPPORTED with a message naming `src`. */
int ds_ah_prefix_config(const struct cJSON *cfg, const ds_model *base, const char *src, ds_ah_prefix_cfg *out,
                        ds_err *err);
/* Whether a tensor name belongs to prefix tuning (the bottleneck loader leaves those to ds_ah_prefix_load). */
bool ds_ah_prefix_tensor(const char *tensor_name);
/* Computes the prefix K/V into a->prefix (PEFT's layout) and sets n_virtual, prefix_row, prefix_pos0. */
int ds_ah_prefix_load(ds_adapter *a, const ds_ah_prefix_cfg *cfg, const ds_st_file *st, const char *st_path,
                      const ds_model *base, ds_err *err);
/* An AdapterHub non_linearity name (bottleneck.c; `legacy`: a config without "version"). */
int ds_ah_parse_act(const struct cJSON *j, bool legacy, const char *src, ds_act *out, ds_err *err);

/* deltaserve delta adapters (delta.c): sparse weight deltas (CSR) and bias deltas. is_dir: the
 * directory's adapter_config.json has an "adapter_type" key (PEFT's and AdapterHub's never do). */
bool ds_delta_is_dir(const char *dir);
int ds_delta_load(ds_adapter *a, const char *dir, const ds_model *base, ds_err *err);
void ds_delta_module_free(ds_delta_module *m);
size_t ds_delta_module_bytes(const ds_delta_module *m);
/* Magnitude pruning as extraction does it (delta_extract.c): marks in keep[n] the
 * k = min(ceil(fraction·n − 1e-9), #nonzero) entries of d[n] of largest |d|, ties to the lower index
 * (zeros never kept); scratch: n floats. Returns k. Pure (diff-pruning training uses it too). */
int64_t ds_delta_select_top(const float *d, size_t n, double fraction, float *scratch, unsigned char *keep);
/* A config and a safetensors image in memory, validated against `base` as ds_delta_load does
 * (fuzz target entry point). Returns 0 or a negative status with a message. */
int ds_delta_check_mem(const char *json, size_t json_len, const void *st_data, size_t st_len, const ds_model *base,
                       ds_err *err);

/* Allocation helpers (adapter.c): zeroed [n_layer][DS_PROJ_COUNT] tables and one module. */
int ds_adapter_alloc_lora_table(ds_adapter *a, ds_err *err);
int ds_adapter_alloc_ia3_table(ds_adapter *a, ds_err *err);
ds_lora_module *ds_lora_module_new(int32_t rank, int32_t in, int32_t out);
void ds_lora_module_free(ds_lora_module *m);
size_t ds_lora_module_bytes(const ds_lora_module *m);

#endif
