/* deltaserve — adapters (PEFT LoRA family, IA³, prompt/prefix tuning, bottleneck): host copies as
 * loaded, resident (backend) copies, the per-step plan builder, prefix K/V, and the registry.
 * The forward pass never calls into this layer: it runs the plan (ds/plan.h) this layer builds. */
#ifndef DS_ADAPTER_H
#define DS_ADAPTER_H

#include "ds/backend.h"
#include "ds/batch.h"
#include "ds/common.h"
#include "ds/plan.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Host-side adapters as loaded from disk (src/adapter/peft.c, gguf_lora.c). ---- */

struct ds_model;

typedef enum {
    DS_ADAPTER_LORA = 0, /* LoRA, rsLoRA, DoRA, AdaLoRA (SVD form folded into A) */
    DS_ADAPTER_IA3,
    DS_ADAPTER_PROMPT,   /* prompt tuning and P-tuning (saved encoder output): soft-prompt rows */
    DS_ADAPTER_PREFIX,   /* prefix tuning (PEFT, or AdapterHub's: prefix_pos0): per-layer K/V prefixes */
    DS_ADAPTER_BOTTLENECK, /* AdapterHub bottleneck adapters: seq_bn, double_seq_bn, par_bn, scaled par_bn;
                            * with a prefix too for a union (MAM: prefix tuning + scaled parallel) */
    DS_ADAPTER_DELTA,      /* deltaserve delta adapters: sparse weight deltas and bias deltas
                            * (diff pruning, BitFit, full fine-tunes extracted as deltas; src/adapter/delta.c) */
} ds_adapter_kind;

/* One sparse weight delta on one projection, host: δ [rows][cols] (HF [out][in]) in CSR form, the
 * projection computing y = W x + δ x. Values are held in fp32 whatever the file stored. */
typedef struct ds_delta_module {
    int32_t rows, cols;
    int64_t nnz;
    int32_t *row_ptr; /* [rows + 1] */
    int32_t *col;     /* [nnz], strictly ascending within a row */
    float *val;       /* [nnz] */
} ds_delta_module;

/* One bottleneck adapter module (one site of one layer), host fp32; see ds_bn_seg for the math. */
typedef struct ds_bn_module {
    int32_t size, d;           /* bottleneck width, d_model */
    ds_act act;
    uint32_t flags;            /* DS_BN_* (ds/backend.h) */
    float scale;
    float *scale_vec;          /* [d] (scaling "channel") or NULL */
    float *down, *down_b;      /* [size][d], [size] */
    float *up, *up_b;          /* [d][size], [d] */
    float *ln_b_w, *ln_b_b;    /* [d] (ln_before) or NULL */
    float *ln_a_w, *ln_a_b;    /* [d] (ln_after) or NULL */
} ds_bn_module;

/* One LoRA-family module on one projection of one layer:
 *   y = base(x) + scale · B(A x) (+ scale · bias_B)
 *   DoRA: y = dora_scale ⊙ (W x + scale · B A x) + b, dora_scale = m / ||W + scale·B·A||_row (constant)
 * AdaLoRA: A already holds A ⊙ E (rank-wise), scale = alpha / (ranknum + 1e-5). */
typedef struct ds_lora_module {
    int32_t rank, in, out;
    float scale;
    float *A;          /* [rank][in] */
    float *B;          /* [out][rank] */
    float *bias_B;     /* [out] (lora_bias) or NULL */
    float *dora_scale; /* [out] or NULL (computed at load from the base weight) */
} ds_lora_module;

typedef struct ds_adapter {
    char *name;              /* id it is registered under (owned) */
    char *path;              /* resolved source path (owned) */
    char peft_type[24];      /* as in adapter_config.json ("LORA", "ADALORA", "IA3", ...), "GGUF_LORA", "BOTTLENECK" */
    ds_adapter_kind kind;
    int32_t n_layer, d_model;
    int32_t proj_in[DS_PROJ_COUNT], proj_out[DS_PROJ_COUNT]; /* base widths per projection (from the base cfg) */
    /* LoRA family: [n_layer][DS_PROJ_COUNT], NULL where the projection is not adapted */
    ds_lora_module **lora;
    ds_lora_module *lm_head;         /* LoRA on lm_head, or NULL */
    /* LoRA on embed_tokens (PEFT lora_embedding_A/B): Δ[tok] = scale · B · A[:, tok]. Stored with A
     * TRANSPOSED, [n_vocab][rank] (a row per token; in = n_vocab), B [d_model][rank]. Or NULL. */
    ds_lora_module *embed;
    /* IA³: [n_layer][DS_PROJ_COUNT] vectors or NULL. ia3_is_input[p]: feed-forward style (scales
     * the projection's INPUT, [in]); otherwise scales its output (incl. bias), [out]. */
    float **ia3;
    bool ia3_is_input[DS_PROJ_COUNT];
    /* Prompt tuning / P-tuning: [n_virtual][d_model] */
    int32_t n_virtual;
    float *prompt;
    /* Prefix tuning (kind PREFIX, or BOTTLENECK for a MAM union; n_virtual = prefix length):
     * [n_virtual][n_layer][2][n_kv_head*head_dim] (PEFT's layout, K then V per layer), or NULL */
    float *prefix;
    int32_t prefix_row;      /* n_kv_head*head_dim */
    /* Where the sequence's own RoPE positions start: false, at n_virtual (PEFT feeds its prefix as
     * past_key_values); true, at 0 (AdapterHub concatenates its prefix after RoPE, outside the
     * cache; src/adapter/ah_prefix.c). The prefix K/V are unrotated either way. */
    bool prefix_pos0;
    /* Bottleneck adapters: [n_layer][DS_BN_SITES], NULL where a site has none (leave_out, config) */
    ds_bn_module **bn;
    /* Delta adapters: [n_layer][DS_PROJ_COUNT] sparse weight deltas and bias deltas ([out] fp32),
     * NULL where a projection has none. */
    ds_delta_module **delta;
    float **dbias;
    size_t host_bytes;       /* parameter bytes held (for budgets) */
} ds_adapter;

typedef struct ds_adapter_load_params {
    const char *name;        /* id to register under (default: the directory's base name) */
    float user_scale;        /* GGUF LoRA: user scale (default 1) */
} ds_adapter_load_params;

ds_adapter_load_params ds_adapter_default_load_params(void);

/* Loads a PEFT directory (adapter_config.json + adapter_model.safetensors), an AdapterHub bottleneck
 * adapter directory (adapter_config.json + adapter.safetensors, as `adapters`' save_adapter writes
 * with use_safetensors=True; pytorch_adapter.bin is refused, never unpickled) or a llama.cpp GGUF
 * LoRA file and validates it against the base model (architecture, sizes, layer count, shapes,
 * target names). Adapter files are untrusted: any problem → NULL with a message naming the field
 * or tensor. The model is borrowed (DoRA norms are computed from its weights). Any thread. */
ds_adapter *ds_adapter_load(const char *path, const struct ds_model *base, const ds_adapter_load_params *params,
                            ds_err *err);
void ds_adapter_free(ds_adapter *a);

/* Parses and validates adapter_config.json text only (fuzz target entry point). Returns 0 or a
 * negative status with a message naming the field. */
int ds_adapter_config_check(const char *json, size_t len, ds_err *err);

/* Resolves `rel` inside the directory `root` (realpath both; the result must stay inside root,
 * symlinks included). When it is a directory, every link directly inside it must lead inside root
 * too (the loaders open its files by name). Absolute paths are accepted only when inside root.
 * *out is malloc'd. Returns 0, DS_EPERM (outside), DS_ENOTFOUND. */
int ds_adapter_resolve_path(const char *root, const char *rel, char **out, ds_err *err);

/* ---- Delta extraction (src/adapter/delta_extract.c): a fine-tuned model minus its base. ---- */

typedef struct ds_delta_extract_params {
    double keep;           /* fraction of each projection's entries kept, (0, 1] (used when threshold <= 0) */
    double threshold;      /* > 0: keep every |tuned − base| > threshold instead */
    const char *base_name; /* written as base_model_name_or_path (NULL: the base's config name) */
} ds_delta_extract_params;

ds_delta_extract_params ds_delta_extract_default_params(void); /* keep 1% */

typedef struct ds_delta_extract_stats {
    int64_t params;        /* projection weight entries compared */
    int64_t nnz;           /* entries kept */
    int32_t n_modules;     /* projections with a sparse delta */
    int32_t n_bias;        /* projections with a bias delta */
    size_t adapter_bytes;  /* what the adapter holds once loaded (CSR + bias vectors, fp32 values) */
    size_t file_bytes;     /* adapter_model.safetensors */
    double max_uncarried;  /* largest |tuned − base| among tensors a delta cannot carry */
    char uncarried[48];    /* which ("embed_tokens", "norm", ...) or "" */
} ds_delta_extract_stats;

/* Writes out_dir/adapter_config.json + adapter_model.safetensors: per projection of every layer the
 * kept entries of tuned − base (largest |δ| per module, ties to the lower row-major index; zeros
 * never kept) in CSR, fp32, and the q/k/v bias differences whole. The models must share the
 * architecture and sizes (any storage types). Returns 0 or DS_EINVAL (mismatch, bad keep, no
 * difference), DS_EIO, DS_ENOMEM with a message. Any thread. */
int ds_delta_extract(const struct ds_model *base, const struct ds_model *tuned, const ds_delta_extract_params *p,
                     const char *out_dir, ds_delta_extract_stats *stats, ds_err *err);

/* Writes a delta adapter (sparse deltas and/or bias deltas, e.g. one BitFit trained) as out_dir/
 * adapter_config.json + adapter_model.safetensors in the format ds_adapter_load reads (F32 values).
 * Returns 0, DS_EINVAL (not a delta adapter), DS_EIO, DS_ENOMEM. Any thread. */
int ds_delta_save(const ds_adapter *a, const char *out_dir, const char *base_name, const char *source, ds_err *err);

/* ---- Resident adapters: backend copies of a ds_adapter (src/adapter/resident.c). ---- */

typedef struct ds_lora_dev {
    int32_t rank; /* 0 = projection not adapted */
    float scale;
    float *A, *B, *bias_B, *dora_scale; /* backend pointers (see ds_lora_module) */
} ds_lora_dev;

typedef struct ds_adapter_dev {
    const ds_adapter *host;    /* borrowed: must outlive the resident copy */
    ds_lora_dev *lora;         /* [n_layer * DS_PROJ_COUNT] */
    ds_lora_dev lm_head;
    ds_lora_dev embed;         /* A transposed: [n_vocab][rank] */
    float **ia3;               /* [n_layer * DS_PROJ_COUNT] backend vectors or NULL */
    const float **prompt_rows; /* [n_virtual] backend row pointers (prompt tuning / P-tuning) */
    ds_bn_seg *bn;             /* [n_layer * DS_BN_SITES] bottleneck modules with backend pointers
                                * (start/len unset); size 0 where a site has none. NULL if no bottleneck */
    ds_sparse_seg *delta;      /* [n_layer * DS_PROJ_COUNT] sparse deltas with backend pointers (start/len
                                * unset); rows 0 where a projection has none. NULL if no sparse delta */
    float **dbias;             /* [n_layer * DS_PROJ_COUNT] backend bias-delta vectors or NULL */
    size_t dev_bytes;
    void **allocs;
    size_t n_allocs, cap_allocs;
} ds_adapter_dev;

/* Copies an adapter's tensors to the backend. Returns 0 or DS_EDEVICE/DS_ENOMEM, or DS_EUNSUPPORTED
 * for an adapter that needs an optional op the backend lacks (bottleneck, sparse, ...; out is then
 * released). dev_bytes counts what was allocated (a sparse delta at its CSR size). Engine thread. */
int ds_adapter_dev_upload(ds_backend *b, const ds_adapter *a, ds_adapter_dev *out, ds_err *err);
void ds_adapter_dev_release(ds_backend *b, ds_adapter_dev *d);

/* Tokens [start, start+len) of the step use resident slot `slot`. */
typedef struct ds_adapter_seg {
    int32_t start, len, slot;
} ds_adapter_seg;

/* The step's adapters as the engine (or a test) groups them: what a plan is built from. All arrays
 * are host memory, read only during ds_adapter_plan_build. */
typedef struct ds_adapter_batch {
    const ds_adapter_dev *const *slots; /* slot → resident adapter */
    const ds_adapter_seg *segs;         /* ascending, non-overlapping; only tokens with an adapter */
    int32_t n_segs;
    const int32_t *soft_rows;           /* [n_soft] batch rows whose embedding is a soft-prompt row */
    const float *const *soft_src;       /* [n_soft] backend row pointers */
    int32_t n_soft;
} ds_adapter_batch;

/* ---- The per-step plan (src/adapter/plan.c): built here, run by the forward (ds/plan.h). ---- */

struct ds_llama;

/* A plan with room for steps of up to max_segs adapter segments and max_tokens tokens over the
 * model L runs (its layer count, projection widths and base biases); its tables and the backend
 * scratch the ops need are allocated here, once. L is borrowed and must outlive the plan.
 * Returns NULL with a message. Engine thread. */
ds_plan *ds_adapter_plan_create(const struct ds_llama *L, int32_t max_segs, int32_t max_tokens, ds_err *err);
void ds_adapter_plan_free(ds_plan *p);

/* Builds the plan of one step: for every (layer, projection), lm_head and bottleneck site, the
 * segment tables of the adapters of ad over the tokens of bt (out_rows for lm_head). Called once
 * per step, before ds_llama_forward; the plan is valid until the next build. Returns 0, or
 * DS_EINVAL (more segments or tokens than the plan was created for, a slot without an adapter). */
int ds_adapter_plan_build(ds_plan *p, const ds_adapter_batch *ad, const ds_batch *bt);

/* Prefix tuning: writes the adapter's per-layer K/V prefixes (no RoPE, no norm — PEFT feeds them
 * as past key/values) into the KV blocks `blocks` (ceil(n_virtual / block_size) of them) through
 * ds_llama_kv_write: prefix slot p goes to block blocks[p / bs], offset p % bs. Engine thread. */
int ds_adapter_write_prefix(struct ds_llama *L, const ds_adapter *a, const int32_t *blocks, int32_t n_blocks,
                            ds_err *err);


/* ---- The adapter registry (src/adapter/registry.c): ids, versions, refcounts. ----
 * Thread-safe. An entry is one VERSION of one adapter id; loading an id again (replace) publishes
 * a new version: new requests get it, running ones keep theirs (they hold a reference). Unload
 * retires the current version: new requests get "not found", running ones finish. An entry's host
 * memory is freed when its last reference goes. */

typedef struct ds_adapter_registry ds_adapter_registry;

typedef struct ds_adapter_entry {
    char *name;
    uint32_t version;
    ds_adapter *adapter;     /* host copy, immutable while referenced */
    double created;          /* unix time */
    double load_ms;          /* parse + validate time */
    /* internal (registry lock) */
    int32_t refs;
    bool retired;
    /* engine thread only: resident slot, or -1 */
    int32_t slot;
    struct ds_adapter_entry *next;
} ds_adapter_entry;

typedef struct ds_adapter_info {
    char name[128];
    char path[512];
    char peft_type[24];
    uint32_t version;
    int32_t refs;            /* running requests + residency */
    size_t host_bytes;
    double created, load_ms;
} ds_adapter_info;

/* root: the adapter directory every path is confined to (NULL: adapters disabled). base is
 * borrowed. Returns NULL with a message. */
ds_adapter_registry *ds_registry_create(const struct ds_model *base, const char *root, ds_err *err);
void ds_registry_free(ds_adapter_registry *r);
const char *ds_registry_root(const ds_adapter_registry *r);

/* Loads (parses, validates) the adapter at `path` (relative to the root, or absolute inside it)
 * and publishes it as `name`. replace=false and `name` exists → DS_EBUSY. Blocking (file I/O):
 * call from a worker thread, not the event loop. Returns 0 or a negative status with a message. */
int ds_registry_load(ds_adapter_registry *r, const char *name, const char *path, bool replace, ds_err *err);
/* ds_registry_load for a caller that may give up (a timeout): claim (an int, 0 at the start) is
 * set 0 -> 1 atomically, under the registry's lock, just before the adapter is published; a caller
 * that gives up sets it 0 -> 2 the same way, and when it finds 2 the load publishes nothing and
 * returns DS_ECANCELED. Whoever wins the exchange decides the outcome. */
int ds_registry_load_claim(ds_adapter_registry *r, const char *name, const char *path, bool replace, int *claim,
                           ds_err *err);
/* Retires `name` (DS_ENOTFOUND if unknown). */
int ds_registry_unload(ds_adapter_registry *r, const char *name, ds_err *err);
/* Loads every adapter found directly under the root (PEFT directories and GGUF LoRA files), named
 * after the directory / file stem. Failures are logged and skipped. Returns how many loaded. */
int ds_registry_scan(ds_adapter_registry *r);

/* Current version of `name` with a reference taken, or NULL. */
ds_adapter_entry *ds_registry_acquire(ds_adapter_registry *r, const char *name);
void ds_registry_ref(ds_adapter_registry *r, ds_adapter_entry *e);
void ds_registry_release(ds_adapter_registry *r, ds_adapter_entry *e);
bool ds_registry_is_retired(ds_adapter_registry *r, const ds_adapter_entry *e);

/* Snapshot of the current versions, sorted by name; *out malloc'd (caller frees). */
int ds_registry_list(ds_adapter_registry *r, ds_adapter_info **out, size_t *n);
/* One adapter's info; DS_ENOTFOUND if unknown. */
int ds_registry_info(ds_adapter_registry *r, const char *name, ds_adapter_info *out);
/* Total host bytes held by every live version (current and draining). */
size_t ds_registry_host_bytes(ds_adapter_registry *r);

#ifdef __cplusplus
}
#endif
#endif
