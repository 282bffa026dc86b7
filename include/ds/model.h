/* deltaserve — the in-memory base model (Llama family) and its loaders.
 *
 * Both loaders (Hugging Face directory, GGUF file) produce the same ds_model: typed host weights
 * (ds/weight.h) in Hugging Face layout and orientation ([out][in], row-major), with the GGUF Q/K
 * row permutation undone. Backends upload from here. A loaded ds_model is immutable: const access is thread-safe. */
#ifndef DS_MODEL_H
#define DS_MODEL_H

#include "ds/common.h"
#include "ds/tokenizer.h"
#include "ds/weight.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    DS_ARCH_LLAMA = 0, /* Llama 2/3.x, SmolLM2, TinyLlama */
    DS_ARCH_MISTRAL,   /* same math as llama */
    DS_ARCH_QWEN2,     /* q/k/v bias */
    DS_ARCH_QWEN3,     /* per-head RMSNorm of q and k before RoPE (q_norm / k_norm), no biases */
    DS_ARCH_PHI3,      /* llama math; fused qkv_proj and gate_up_proj in the files (split at load) */
    DS_ARCH_GEMMA3,    /* Gemma 3 text: scaled embeddings, (1 + w) norms (folded at load), post-attention and
                        * post-FFN norms, GeGLU, q/k norms, local/global layers with their own RoPE */
} ds_arch;

/* LINEAR: inv_freq / factor (transformers' "linear"; Gemma 3 applies it to its global layers only). */
typedef enum { DS_ROPE_SCALING_NONE = 0, DS_ROPE_SCALING_LLAMA3 = 1, DS_ROPE_SCALING_LINEAR = 2 } ds_rope_scaling;

/* The feed-forward gate activation: silu(gate)·up (Llama) or gelu_tanh(gate)·up (Gemma's GeGLU). */
typedef enum { DS_FFN_SILU = 0, DS_FFN_GELU_TANH = 1 } ds_ffn_act;

#define DS_MODEL_MAX_LAYER 1024

typedef struct ds_model_config {
    ds_arch arch;
    char arch_name[32];      /* "llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3_text" / "gemma3" */
    char name[128];          /* general.name / _name_or_path, informational */
    int32_t n_vocab;
    int32_t d_model;         /* hidden_size */
    int32_t n_layer;
    int32_t n_head;
    int32_t n_kv_head;
    int32_t head_dim;        /* config.head_dim or d_model / n_head */
    int32_t d_ff;            /* intermediate_size */
    int32_t max_ctx;         /* max_position_embeddings / context_length */
    float rms_eps;
    float rope_theta;
    ds_rope_scaling rope_scaling;
    float rope_factor, rope_low_freq_factor, rope_high_freq_factor;
    int32_t rope_orig_ctx;   /* original_max_position_embeddings */
    int32_t n_rot;           /* partial rotary (Phi-3 family: partial_rotary_factor · head_dim, GGUF
                              * rope.dimension_count): RoPE on each head's first n_rot values, the rest
                              * pass through; 0 = the whole head */
    bool qkv_bias;
    bool qk_norm;            /* Qwen3: q_norm / k_norm over each head's head_dim values */
    /* Phi-3: the files hold q/k/v as one qkv_proj [q|k|v rows] and gate/up as one gate_up_proj
     * [gate|up rows]; the loaders split them into wq/wk/wv and w_gate/w_up, and adapters name the
     * fused modules (PEFT's qkv_proj / gate_up_proj), whose output rows split the same way. */
    bool fused_qkv;
    bool fused_gate_up;
    /* Sliding-window attention: the layers marked in layer_sliding (ds_model_set_sliding) attend to
     * their last sliding_window positions (ds_model_layer_window); sliding_window 0 = none (or a window
     * no shorter than the context). A marked layer keeps its mark — and its RoPE table, rope_theta_swa
     * — even when its window never bites. */
    int32_t sliding_window;
    uint8_t layer_sliding[DS_MODEL_MAX_LAYER / 8];
    float rope_theta_swa;    /* > 0: the marked layers use this RoPE base, unscaled (Gemma 3's local layers) */
    bool tied_embeddings;
    /* Gemma 3 (all 0 / false / SILU elsewhere) */
    ds_ffn_act ffn_act;
    bool post_norms;         /* post-attention and post-feed-forward RMSNorm before each residual add */
    float embed_scale;       /* > 0: token embeddings × this (sqrt(hidden_size), rounded to fp32) */
    float attn_scale;        /* > 0: attention scores × this (query_pre_attn_scalar^-0.5), else head_dim^-0.5 */
    float final_softcap;     /* > 0: logits = softcap · tanh(logits / softcap) */
} ds_model_config;

/* Matrices are typed (ds/weight.h) and stay in their file format: views into the GGUF mapping, or
 * model-owned copies (safetensors, un-permuted Q/K rows, --quantize). Vectors are fp32. */
typedef struct ds_layer_weights {
    float *attn_norm;  /* [d_model] */
    ds_weight wq;      /* [n_head*head_dim][d_model] */
    ds_weight wk;      /* [n_kv_head*head_dim][d_model] */
    ds_weight wv;      /* [n_kv_head*head_dim][d_model] */
    float *bq;         /* [n_head*head_dim] or NULL */
    float *bk;         /* [n_kv_head*head_dim] or NULL */
    float *bv;         /* [n_kv_head*head_dim] or NULL */
    float *q_norm;     /* [head_dim] or NULL (cfg.qk_norm) */
    float *k_norm;     /* [head_dim] or NULL */
    ds_weight wo;      /* [d_model][n_head*head_dim] */
    float *ffn_norm;   /* [d_model] (Gemma: pre_feedforward_layernorm) */
    float *attn_post_norm; /* [d_model] or NULL (cfg.post_norms): Gemma's post_attention_layernorm */
    float *ffn_post_norm;  /* [d_model] or NULL: post_feedforward_layernorm */
    ds_weight w_gate;  /* [d_ff][d_model] */
    ds_weight w_up;    /* [d_ff][d_model] */
    ds_weight w_down;  /* [d_model][d_ff] */
} ds_layer_weights;

typedef struct ds_model {
    ds_model_config cfg;
    ds_weight tok_embd;       /* [n_vocab][d_model] */
    float *output_norm;       /* [d_model] */
    ds_weight output;         /* [n_vocab][d_model]; same data as tok_embd when tied */
    float *inv_freq;          /* [head_dim/2] final RoPE inverse frequencies (scaling applied) */
    float *inv_freq_swa;      /* [head_dim/2] those of the sliding layers (cfg.rope_theta_swa > 0), or NULL */
    ds_layer_weights *layers; /* [n_layer] */
    ds_tokenizer *tok;        /* owned; NULL only if the source had no tokenizer */
    char *chat_template;      /* owned Jinja text, or NULL */
    char *source_path;        /* owned */
    /* Ownership: every pointer above points into `blobs` (owned heap buffers) or `maps` (file
     * mappings kept open for the model's lifetime). */
    void **blobs;
    size_t n_blobs, cap_blobs;
    ds_file_map *maps;
    size_t n_maps;
    size_t n_params;          /* number of weight elements (informational) */
    size_t weight_bytes[DS_DTYPE_COUNT]; /* bytes of matrix and vector weights per storage dtype */
    bool weights_loaded;      /* false when loaded with load_weights = false (tokenizer only) */
} ds_model;

/* Whether layer il is a sliding-window layer (its kind, whatever the window's length). */
static inline bool ds_model_layer_sliding(const ds_model_config *c, int32_t il) {
    return il >= 0 && il < DS_MODEL_MAX_LAYER && (c->layer_sliding[il >> 3] >> (il & 7) & 1);
}
static inline void ds_model_set_sliding(ds_model_config *c, int32_t il) {
    if (il >= 0 && il < DS_MODEL_MAX_LAYER) c->layer_sliding[il >> 3] |= (uint8_t)(1u << (il & 7));
}
/* Positions layer il attends to (sliding-window attention), or 0 for all of them. */
static inline int32_t ds_model_layer_window(const ds_model_config *c, int32_t il) {
    return c->sliding_window > 0 && ds_model_layer_sliding(c, il) ? c->sliding_window : 0;
}

typedef struct ds_model_params {
    bool load_tokenizer;        /* default true */
    bool load_weights;          /* default true; false: config + tokenizer only (deltaserve tokenize) */
    bool verbose;               /* progress log lines while loading (default true) */
    ds_dtype quantize;          /* DS_DTYPE_NONE (default): keep the file's formats. DS_DTYPE_Q8_0 or
                                 * DS_DTYPE_Q4_K: quantise 16/32-bit matrices at load (Q4_K falls back
                                 * to Q8_0 for rows that are not a multiple of 256). DS_DTYPE_F32:
                                 * dequantise every matrix to fp32 (a reference copy for tests) */
} ds_model_params;

ds_model_params ds_model_default_params(void);

/* Loads a model from a Hugging Face directory (config.json, *.safetensors, tokenizer.json) or
 * a GGUF file; picks by what `path` is. Returns NULL with a message naming the file and what is
 * wrong. Any thread; the returned model is owned by the caller (ds_model_free). */
ds_model *ds_model_load(const char *path, const ds_model_params *params, ds_err *err);
ds_model *ds_model_load_hf_dir(const char *dir, const ds_model_params *params, ds_err *err);
ds_model *ds_model_load_gguf(const char *path, const ds_model_params *params, ds_err *err);
void ds_model_free(ds_model *m);

/* Helpers shared by the loaders (src/model/config.c). */
/* Allocates a zeroed model; weights are added with ds_model_alloc_floats / ds_model_alloc_bytes. */
ds_model *ds_model_new(void);
/* Allocates n floats / bytes owned by the model (zeroed). Returns NULL on overflow/OOM. */
float *ds_model_alloc_floats(ds_model *m, size_t n);
void *ds_model_alloc_bytes(ds_model *m, size_t bytes);
/* The model takes *map over (closed by ds_model_free); *map is zeroed. Returns 0 or DS_ENOMEM. */
int ds_model_keep_map(ds_model *m, ds_file_map *map);
/* Makes *dst a weight of the model from rows×cols typed source rows (src row r at src + r·src_row_bytes,
 * dtype st), in the model's storage: the source bytes themselves when `borrow` (they must live as long
 * as the model, e.g. a kept mapping) and nothing is converted; otherwise a model-owned copy, converted
 * to `quantize` when that is not DS_DTYPE_NONE and the source is 16/32-bit. perm (may be NULL) gives
 * the source row of each destination row. Counts bytes in weight_bytes. Returns 0 or DS_E*. */
int ds_model_set_weight(ds_model *m, ds_weight *dst, const void *src, ds_dtype st, size_t src_row_bytes, int32_t rows,
                        int32_t cols, const int64_t *perm, bool borrow, ds_dtype quantize);
/* "92.0 MiB (Q4_1 63.3, Q8_0 28.7)": total weight bytes and the share per dtype. */
void ds_model_weight_summary(const ds_model *m, char *buf, size_t cap);
/* Validates cfg (positive sizes, divisibility, GQA grouping) and fills derived fields (head_dim
 * when 0). Returns 0 or DS_EFORMAT/DS_EUNSUPPORTED with a message naming the field. */
int ds_model_config_validate(ds_model_config *cfg, const char *source, ds_err *err);
/* Computes inv_freq[head_dim/2] from theta and rope scaling (HF _compute_llama3_parameters). */
void ds_rope_inv_freq(const ds_model_config *cfg, float *inv_freq);
/* The sliding layers' table: rope_theta_swa, no scaling (transformers' Gemma 3 "sliding_attention"). */
void ds_rope_inv_freq_swa(const ds_model_config *cfg, float *inv_freq);
/* Checks that every weight pointer the config needs is set; names the first missing tensor. */
int ds_model_check_complete(const ds_model *m, ds_err *err);


/* ---- The forward pass (src/model/llama.c), written once over ds_backend ops. ---- */
#include "ds/backend.h"
#include "ds/batch.h"
#include "ds/plan.h"

typedef struct ds_llama ds_llama;

typedef struct ds_llama_params {
    int32_t max_tokens;     /* largest batch (tokens per step); default 512 */
    int32_t max_seqs;       /* largest number of sequences per step; default 64 */
    int32_t max_out;        /* most logits rows one step returns (sizes the logits buffer);
                             * 0 (default) → max_tokens. The engine uses max_seqs. */
    int32_t kv_block_size;  /* default 16 */
    int32_t n_kv_blocks;    /* KV pool size in blocks (all layers); default: from kv_bytes */
    size_t kv_bytes;        /* used when n_kv_blocks == 0; default 256 MiB */
    int32_t max_blocks_per_seq; /* default: ceil(max_ctx / block) + prefix room */
} ds_llama_params;

ds_llama_params ds_llama_default_params(void);

/* Uploads the model's weights to the backend and allocates the KV pool and every activation
 * buffer for max_tokens (the steady-state forward allocates nothing). model and backend are
 * borrowed and must outlive the ds_llama. Returns NULL with a message (DS_EDEVICE on device OOM). */
ds_llama *ds_llama_create(const ds_model *model, ds_backend *backend, const ds_llama_params *params,
                          ds_err *err);
void ds_llama_free(ds_llama *L);

/* Runs one step: embeds the batch's tokens, writes their K/V into the paged pool, and writes the
 * logits of batch->out_rows into logits_out (host, [n_out][n_vocab]). plan is the step's adapter
 * plan (ds/plan.h; built for this batch), uploaded here once before the first layer; NULL for a
 * base-only step. Returns 0 or DS_EINVAL (batch inconsistent with the limits) / DS_EDEVICE /
 * DS_EUNSUPPORTED (an adapter op the backend lacks). Engine thread only. */
int ds_llama_forward(ds_llama *L, const ds_batch *batch, const ds_plan *plan, float *logits_out, ds_err *err);

int32_t ds_llama_n_kv_blocks(const ds_llama *L);
int32_t ds_llama_kv_block_size(const ds_llama *L);
int32_t ds_llama_max_blocks_per_seq(const ds_llama *L);
ds_backend *ds_llama_backend(const ds_llama *L);
const ds_model *ds_llama_model(const ds_llama *L);
/* The base bias of projection `proj` of `layer` (backend pointer, [rows]), or NULL when it has none
 * (only q, k, v may: Qwen2). The adapter plan adds it after a DoRA scaling. */
const float *ds_llama_proj_bias(const ds_llama *L, int32_t layer, ds_proj proj);
/* Writes one KV slot of layer `layer` from host rows k and v ([n_kv_head*head_dim] each), e.g. an
 * adapter's prefix-tuning K/V; slot is physical (block * kv_block_size + offset). Returns 0,
 * DS_EINVAL (layer or slot out of range) or the backend's upload status. Engine thread only. */
int ds_llama_kv_write(ds_llama *L, int32_t layer, int64_t slot, const float *k, const float *v);

#ifdef __cplusplus
}
#endif
#endif
