/* deltaserve — online adapter training on a frozen base (src/train/).
 *
 * A ds_trainer owns one trainable adapter — LoRA / rsLoRA on any of q,k,v,o,gate,up,down_proj, lm_head
 * and embed_tokens, prompt tuning, prefix tuning without projection, BitFit bias deltas, or an AdapterHub
 * bottleneck adapter (sequential, Houlsby, parallel; train_bn.c) — over a borrowed, immutable
 * ds_model. A step runs the forward pass saving what backward needs (or only per-layer checkpoints,
 * recomputing the rest: activation recomputation), back-propagates through every frozen layer to the adapter's
 * parameters only — the base gets no gradient buffers and no optimizer state — and applies AdamW
 * (decoupled weight decay, HF warm-up + linear/cosine schedules, clipping by global L2 norm).
 *
 * The loss is HF's causal-LM loss: labels use the HF convention (labels[i] is the target of the
 * logits at position i-1, -100 = ignored) and the loss is the mean cross-entropy over every label
 * token of the batch, so splitting a batch into micro-batches (gradient accumulation) gives the
 * same gradient as the full batch. Prompt tuning prepends P virtual rows whose labels are -100
 * (the last virtual row predicts real token 0 when labels[0] counts), prefix tuning prepends P
 * K/V slots per layer and real tokens take positions P.., exactly as PEFT does.
 *
 * Every op runs through a backend's training table (ds/backend_train.h): the params' backend, else
 * a CPU backend of the trainer's own; fp32 activations and gradients over the model's weights in
 * their stored type. All the trainer's memory is that backend's (alloc / upload / download): the
 * activations, the batch's index arrays (uploaded once per micro-batch), and the adapter's
 * parameters, gradients and AdamW moments, which stay resident and are downloaded only for a save,
 * a snapshot, ds_trainer_adapter or the jobs' state save (tests/unit/test_train_shim.c checks it
 * with a backend whose memory faults on any host access). Threading: a trainer is used by one
 * thread at a time; several trainers may share one ds_model. */
#ifndef DS_TRAIN_H
#define DS_TRAIN_H

#include "ds/adapter.h"
#include "ds/common.h"
#include "ds/model.h"

#ifdef __cplusplus
extern "C" {
#endif

#define DS_TRAIN_IGNORE_INDEX (-100) /* a label that does not count (HF ignore_index) */

/* LoRA targets: bit p for projection p (ds_proj), plus lm_head and embed_tokens. */
#define DS_TRAIN_TARGET(p) (1u << (unsigned)(p))
#define DS_TRAIN_TARGET_LM_HEAD (1u << DS_PROJ_COUNT)
#define DS_TRAIN_TARGET_EMBED (1u << (DS_PROJ_COUNT + 1)) /* embed_tokens (PEFT lora_embedding_A/B) */
#define DS_TRAIN_TARGET_ALL_LINEAR ((1u << DS_PROJ_COUNT) - 1u) /* PEFT "all-linear": every projection, not lm_head */

/* Bottleneck adapters (AdapterHub `adapters` configs; src/train/train_bn.c). */
typedef enum {
    DS_TRAIN_BN_SEQUENTIAL = 0, /* Pfeiffer, SeqBnConfig "seq_bn": after the FFN output, input o + x */
    DS_TRAIN_BN_HOULSBY,        /* DoubleSeqBnConfig "double_seq_bn": after attention and FFN outputs, input o */
    DS_TRAIN_BN_PARALLEL,       /* He et al., ParBnConfig "par_bn": beside the FFN, input x, scaled */
} ds_train_bn_placement;

typedef enum {
    DS_TRAIN_BN_INIT_DEFAULT = 0, /* the config's: bert (sequential, houlsby), mam_adapter (parallel) */
    DS_TRAIN_BN_INIT_BERT,        /* down, up ~ N(0, 0.02²), biases 0 (near, not exactly, the identity) */
    DS_TRAIN_BN_INIT_MAM,         /* down ~ U(±1/sqrt(d)) (kaiming_uniform a=√5), up = 0, biases 0: identity */
} ds_train_bn_init;

typedef struct ds_train_bn_opts {
    int32_t reduction_factor;      /* width = d_model / reduction_factor, floored, >= 1 (default 16) */
    ds_train_bn_placement placement;
    int32_t act;                   /* ds_act (relu, gelu, gelu_new, silu/swish, tanh); -1 (default): the
                                    * config's, relu (sequential, parallel) or swish (houlsby) */
    float scaling;                 /* output scale; 0 (default): the config's, 1 (parallel: 4) */
    ds_train_bn_init init;
} ds_train_bn_opts;

ds_train_bn_opts ds_train_bn_default_opts(void);
/* Parameter bytes of the adapter a spec with these options makes on m (fp32; reduction_factor
 * < 1 counts as 1): what the fine-tuning limits check (ft_limits.c). */
size_t ds_train_bn_bytes(const struct ds_model *m, const ds_train_bn_opts *o);
/* Replaces the "config's default" markers (act -1, scaling 0, init DEFAULT) by the values they
 * stand for under o->placement. */
void ds_train_bn_resolve(ds_train_bn_opts *o);
/* The names ds_train_bn_*_parse accept that ds_ah_save / the job API print: "sequential" | "houlsby"
 * | "parallel"; "relu", "gelu", "gelu_new", "swish", "tanh" (NULL: not trainable); "bert" |
 * "mam_adapter". */
const char *ds_train_bn_placement_name(ds_train_bn_placement p);
const char *ds_train_bn_act_name(int32_t act);
const char *ds_train_bn_init_name(ds_train_bn_init i);
/* "sequential" | "pfeiffer" | "seq_bn", "houlsby" | "double_seq_bn", "parallel" | "par_bn". DS_EINVAL
 * with a message listing them otherwise. */
int ds_train_bn_placement_parse(const char *s, ds_train_bn_placement *out, ds_err *err);
/* An AdapterHub non_linearity name the training ops support ("relu", "gelu", "gelu_new", "silu",
 * "swish", "tanh") → ds_act; another name the package accepts → DS_EUNSUPPORTED, anything else
 * DS_EINVAL, with a message naming it. */
int ds_train_bn_act_parse(const char *s, int32_t *out, ds_err *err);
/* "bert" | "mam_adapter" → ds_train_bn_init; DS_EINVAL otherwise. */
int ds_train_bn_init_parse(const char *s, ds_train_bn_init *out, ds_err *err);

/* What to train when starting from scratch. */
typedef struct ds_train_adapter_spec {
    ds_adapter_kind kind;  /* DS_ADAPTER_LORA, DS_ADAPTER_PROMPT (prompt tuning), DS_ADAPTER_PREFIX,
                            * DS_ADAPTER_DELTA (BitFit: zero bias deltas on `targets`, default all seven;
                            * diff pruning when density > 0, below) or DS_ADAPTER_BOTTLENECK (AdapterHub
                            * bottleneck adapters, `bn`) */
    const char *name;      /* adapter id (default "trained") */
    /* LoRA */
    int32_t r;             /* rank (default 8) */
    float lora_alpha;      /* default 16 */
    bool use_rslora;       /* scale = alpha/sqrt(r) (rsLoRA) instead of alpha/r */
    uint32_t targets;      /* DS_TRAIN_TARGET bits (default q_proj | v_proj) */
    /* prompt / prefix tuning */
    int32_t n_virtual;     /* virtual tokens (default 20) */
    float init_std;        /* > 0: rows ~ N(0, std²) (PEFT RANDOM init uses 1). 0 (default): prompt
                            * tuning copies the embeddings of random vocabulary tokens (PEFT
                            * SAMPLE_VOCAB), prefix tuning uses N(0, 1) as PEFT does */
    uint64_t seed;         /* initialisation as PEFT: LoRA A ~ U(±1/sqrt(in)) (kaiming_uniform(a=√5)), B = 0;
                            * embed_tokens A = 0, B ~ N(0, 1) */
    /* Diff pruning (kind DS_ADAPTER_DELTA with density > 0; src/train/train_dp.c): a dense weight
     * delta δ on every target projection (zero at the start) for dp_warmup_steps optimizer steps,
     * then a fixed mask of each module's ceil(density·numel) largest |δ| (magnitude pruning); only
     * masked entries train from then on. Saved as a sparse delta adapter (src/adapter/delta.c). */
    float density;         /* fraction of each module's entries kept, in (0, 1]; 0: BitFit (default) */
    int32_t dp_warmup_steps; /* dense optimizer steps before the mask is fixed (>= 1; default 1) */
    bool bias;             /* diff pruning: bias deltas on the targets train too (BitFit-style) */
    ds_train_bn_opts bn;   /* DS_ADAPTER_BOTTLENECK */
} ds_train_adapter_spec;

ds_train_adapter_spec ds_train_default_spec(ds_adapter_kind kind);

/* Parses a method name as the fine-tuning API spells it: "lora", "prompt_tuning", "prefix_tuning",
 * "bitfit", "diff_pruning", "bottleneck" (case-insensitive, '-' or '_'; bitfit and diff_pruning both
 * give DS_ADAPTER_DELTA: ds_train_method_is_diff_pruning tells them apart). Known but untrainable
 * types (dora, ia3, adalora, p_tuning, loha, lokr, …) give DS_EUNSUPPORTED with a message saying what
 * can be trained; anything else DS_EINVAL. */
int ds_train_kind_parse(const char *method, ds_adapter_kind *out, ds_err *err);
/* True for "diff_pruning" / "diff-pruning" (any case). Pure. */
bool ds_train_method_is_diff_pruning(const char *method);

typedef enum { DS_LR_CONSTANT = 0, DS_LR_LINEAR, DS_LR_COSINE } ds_lr_schedule;
typedef enum { DS_RECOMPUTE_AUTO = 0, DS_RECOMPUTE_OFF, DS_RECOMPUTE_ON } ds_recompute;

typedef struct ds_train_params {
    float lr;                  /* peak learning rate (default 1e-4) */
    float beta1, beta2, eps;   /* AdamW (0.9, 0.999, 1e-8) */
    float weight_decay;        /* decoupled, on every adapter tensor (default 0, as HF Trainer) */
    ds_lr_schedule schedule;   /* default DS_LR_LINEAR */
    int32_t warmup_steps;      /* HF: lr·k/warmup for optimizer step k < warmup (so step 0 has lr 0) */
    int32_t total_steps;       /* length of the linear/cosine decay; 0: constant after warm-up */
    float max_grad_norm;       /* clip by global L2 norm (torch clip_grad_norm_); <= 0: off (default 1) */
    int32_t micro_batch_tokens;/* rows per micro-batch, virtual rows included; also the longest
                                * example (default 512) */
    int32_t micro_batch_seqs;  /* sequences per micro-batch; 0 = as many as fit (default) */
    ds_recompute recompute;    /* AUTO: recompute when saved activations would exceed activation_budget */
    size_t activation_budget;  /* bytes (default 1 GiB) */
    int32_t head_rows;         /* label rows the LM head computes at once (bounds its [rows][n_vocab]
                                * logits and the smallest head unit; default 32) */
    double unit_seconds;       /* target duration of one unit of a step run by ds_trainer_advance
                                * (default 0.01); <= 0: the smallest units (one layer, one head
                                * chunk). Results do not depend on it. */
    struct ds_backend *backend;/* computes the training ops (its iface.train) and holds all the
                                * trainer's memory; borrowed. NULL (default): a CPU backend of the
                                * trainer's own. No training ops → create fails, DS_EUNSUPPORTED. */
} ds_train_params;

ds_train_params ds_train_default_params(void);

/* One training sequence. labels == NULL means labels = tokens (every next token counts). */
typedef struct ds_train_example {
    const int32_t *tokens;     /* [n_tokens] */
    const int32_t *labels;     /* [n_tokens], HF convention, or NULL */
    int32_t n_tokens;
} ds_train_example;

typedef struct ds_train_stats {
    double loss;               /* masked mean cross-entropy of the batch, before the update */
    int64_t n_label_tokens;
    int32_t n_micro_batches;
    double grad_norm;          /* global L2 norm before clipping (0 from ds_trainer_eval) */
    float lr;                  /* learning rate the update used (0 when no update) */
    int64_t step;              /* optimizer steps done so far */
    bool recompute;            /* activation recomputation was on */
    double seconds;            /* wall time from the start of the step to its end */
    double busy_seconds;       /* time spent computing it (the sum of its units' times) */
    int32_t n_units;           /* units it ran (ds_trainer_advance calls) */
} ds_train_stats;

typedef struct ds_trainer ds_trainer;

/* A fresh adapter of `spec` on `base`. base is borrowed (read-only) and must outlive the trainer.
 * Returns NULL with a message: DS_EUNSUPPORTED for untrainable kinds, DS_EINVAL for bad specs or
 * params, DS_ENOMEM. Any thread. */
ds_trainer *ds_trainer_create(const ds_model *base, const ds_train_adapter_spec *spec, const ds_train_params *params,
                              ds_err *err);
/* Continues training `init` (deep-copied: the registry's version stays immutable). LoRA (incl.
 * rsLoRA, lm_head, GGUF LoRA), prompt tuning, prefix tuning, BitFit and bottleneck adapters without
 * LayerNorms / channel scaling / MAM prefixes are trainable; DoRA, lora_bias,
 * AdaLoRA, IA³ and P-tuning give DS_EUNSUPPORTED naming the feature. use_rslora / lora_alpha say
 * how `init` was configured, for the saved adapter_config.json (lora_alpha <= 0: derived from each
 * module's scale). */
ds_trainer *ds_trainer_create_from(const ds_model *base, const ds_adapter *init, bool use_rslora, float lora_alpha,
                                   const ds_train_params *params, ds_err *err);
void ds_trainer_free(ds_trainer *t);

/* One optimizer step over `n` examples: micro-batches of at most micro_batch_tokens rows /
 * micro_batch_seqs sequences, gradients accumulated (each scaled by 1/total label tokens), then
 * clipping and AdamW. Returns 0 or DS_EINVAL (token/label out of range, no label token) /
 * DS_ERANGE (an example longer than micro_batch_tokens or the model context) / DS_ENOMEM; the
 * parameters are unchanged on failure. stats may be NULL. */
int ds_trainer_step(ds_trainer *t, const ds_train_example *ex, int32_t n, ds_train_stats *stats, ds_err *err);
/* The step's first half: loss and (unclipped) gradients into the tensors' grad arrays, no update. */
int ds_trainer_compute_grads(ds_trainer *t, const ds_train_example *ex, int32_t n, ds_train_stats *stats,
                             ds_err *err);
/* The step's second half: clip the current gradients (in place) and apply one AdamW update with
 * the schedule's lr for this step. Sets stats->grad_norm, lr and step (stats may be NULL).
 * DS_ERANGE when the gradient norm is not finite (nothing updated). */
int ds_trainer_apply(ds_trainer *t, ds_train_stats *stats, ds_err *err);
/* Loss only (validation): forward, no gradients, no update. */
int ds_trainer_eval(ds_trainer *t, const ds_train_example *ex, int32_t n, ds_train_stats *stats, ds_err *err);

/* ---- A step in bounded units (co-serving: src/train/train_units.c) ----
 *
 * ds_trainer_begin starts a step without computing; each ds_trainer_advance then runs ONE unit:
 * the forward of the next few half layers (attention or MLP block) of a micro-batch (the first also
 * embeds it), the LM head and loss of the next few label-row chunks, the backward of the next few
 * half layers (with recomputation, their forward again first; the last unit also the embedding
 * gradients), or the optimizer update. A unit takes as many half layers / chunks as the
 * measured per-row times of earlier units fit in the unit target (at least one), so its duration
 * tracks the target however big the model or the micro-batch. The ops and their order are those
 * of the whole-step calls, which are loops over units: results are bit-identical for any target. */
typedef enum {
    DS_TRAIN_RUN_STEP = 0,     /* as ds_trainer_step: gradients, then the update (last unit) */
    DS_TRAIN_RUN_GRADS,        /* as ds_trainer_compute_grads */
    DS_TRAIN_RUN_EVAL          /* as ds_trainer_eval */
} ds_train_run;

/* Validates the examples and starts a step; computes nothing. ex (and what it points to) is
 * borrowed until the step ends. Returns 0, the errors of ds_trainer_step (nothing started), or
 * DS_EBUSY when a step is already in progress. Grads / step modes zero the gradients. */
int ds_trainer_begin(ds_trainer *t, ds_train_run what, const ds_train_example *ex, int32_t n, ds_err *err);
/* Runs one unit of the step in progress. Returns 1 while units remain, 0 when this unit finished
 * the step (stats, which may be NULL, then get what the whole-step call would give), a negative
 * DS_E* when an op failed (the step is over; as ds_trainer_step, the parameters are unchanged
 * unless the update itself failed), DS_EINVAL when no step is in progress. */
int ds_trainer_advance(ds_trainer *t, ds_train_stats *stats, ds_err *err);
/* Drops the step in progress, if any (the parameters are unchanged; gradients are not). */
void ds_trainer_abort(ds_trainer *t);
bool ds_trainer_busy(const ds_trainer *t); /* a step is in progress */
/* Sets the unit target (ds_train_params.unit_seconds) from now on; the co-serving engine derives
 * it from its measured inference step time and budget. */
void ds_trainer_set_unit_target(ds_trainer *t, double seconds);

/* The trainable tensors, named by their PEFT safetensors keys
 * ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "prompt_embeddings").
 * Values have the adapter's layout: the same as the key except embed_tokens'
 * lora_embedding_A, stored transposed ([n_vocab][r] where PEFT has [r][n_vocab]; shape says so). */
typedef struct ds_train_tensor {
    const char *name;
    int32_t n_dims;
    int64_t shape[2];
    size_t n;
    float *value;              /* [n] live parameters, BACKEND memory of the trainer's backend (host
                                * memory on the CPU backend); writable between steps */
    const float *grad;         /* [n] gradient of the last compute_grads (clipped after a step), backend
                                * memory like value */
} ds_train_tensor;

int32_t ds_trainer_n_tensors(const ds_trainer *t);
/* Valid until ds_trainer_free. i in [0, ds_trainer_n_tensors). */
const ds_train_tensor *ds_trainer_tensor(const ds_trainer *t, int32_t i);
/* The live adapter as a host copy: the resident parameters are downloaded into it (NULL if that
 * fails); valid until the next step or free. Diff pruning: it holds only the bias
 * deltas; the trained δ is a trainer tensor, made a sparse delta by ds_trainer_snapshot / _save. */
const ds_adapter *ds_trainer_adapter(const ds_trainer *t);
/* A deep copy of the current adapter to publish as a new version (caller frees). NULL + message.
 * Diff pruning: the sparse delta of the mask's entries (during the warm-up: of each module's top
 * ceil(density·numel) |δ|). */
ds_adapter *ds_trainer_snapshot(const ds_trainer *t, const char *name, ds_err *err);
int64_t ds_trainer_steps_done(const ds_trainer *t);
/* Learning rate of optimizer step k (0-based) under params (HF LambdaLR schedules). */
float ds_train_lr_at(const ds_train_params *p, int64_t k);

/* ---- Publishing (src/train/peft_save.c) ---- */

typedef struct ds_peft_save_params {
    const char *base_model_name_or_path; /* written as is (default "") */
    bool use_rslora;                     /* LoRA: alpha = scale·sqrt(r) instead of scale·r */
    float lora_alpha;                    /* > 0: written when it reproduces every module's scale */
} ds_peft_save_params;

ds_peft_save_params ds_peft_save_default_params(void);

/* Writes `a` as a PEFT directory `dir` (created if missing; one level): adapter_config.json and
 * adapter_model.safetensors (F32, PEFT keys), each written to a temporary file and renamed. LoRA
 * (no DoRA / lora_bias), prompt tuning and prefix tuning; others DS_EUNSUPPORTED. Returns 0 or
 * DS_EIO / DS_ENOMEM with a message naming the file. Any thread. */
int ds_peft_save(const ds_adapter *a, const ds_model *base, const char *dir, const ds_peft_save_params *params,
                 ds_err *err);
/* Writes a bottleneck adapter (kind BOTTLENECK, no prefix, no LayerNorms, a scalar scaling, one
 * config over every module) as the AdapterHub `adapters` package's save_adapter(dir, name,
 * with_head=False, use_safetensors=True) does: adapter_config.json (the full bottleneck config:
 * seq_bn / double_seq_bn / par_bn with its non_linearity, reduction_factor, scaling) and
 * adapter.safetensors (F32, "model.layers.<i>.<attention|output>_adapters.adapters.<name>.…"), each
 * written to a temporary file and renamed (src/train/ah_save.c). dir is created if missing (one
 * level). model_name goes into "model_name". Returns 0, DS_EUNSUPPORTED naming what the format
 * cannot express, DS_EIO / DS_ENOMEM. Any thread. */
int ds_ah_save(const ds_adapter *a, const ds_model *base, const char *dir, const char *model_name, ds_err *err);
/* ds_peft_save of the trainer's current adapter with its own alpha / rsLoRA settings (BitFit: the
 * delta format; bottleneck: ds_ah_save). */
int ds_trainer_save(const ds_trainer *t, const char *dir, const char *base_model_name_or_path, ds_err *err);


/* ---- Fine-tuning jobs (src/train/jobs.c) ----
 *
 * The OpenAI fine-tuning API's back end: JSONL datasets and a queue of jobs that train an adapter,
 * save it as a PEFT directory under the adapter directory and publish it in the registry (a new
 * version: running requests keep the old one).
 *
 * Jobs run one at a time. A job thread prepares data, checkpoints and publishes; with an engine
 * attached (ds_ft_manager_attach_engine) every optimizer step and validation pass runs on the
 * engine thread one unit at a time (ds_trainer_advance) between inference steps, within
 * --train-budget of its busy time while requests run.
 *
 * Datasets are JSON Lines: chat {"messages":[{"role","content","weight"?}, ...]} (assistant turns
 * are trained, "weight": 0 skips one) or {"prompt","completion"} (the completion is trained). Chat
 * examples are rendered with the model's chat template; labels are the assistant tokens (content and
 * end-of-turn), -100 elsewhere. */

/* Checks a JSONL dataset's structure without a model. Returns the number of examples (> 0) or
 * DS_EINVAL with per-line messages ("line 3: 'messages' must be an array; line 7: ..." — the first
 * few problems) in err. Any thread. */
int ds_ft_data_check(const char *text, size_t len, ds_err *err);

typedef enum { DS_FT_QUEUED = 0, DS_FT_RUNNING, DS_FT_SUCCEEDED, DS_FT_FAILED, DS_FT_CANCELLED } ds_ft_status;
const char *ds_ft_status_name(ds_ft_status s); /* "queued", "running", ... */

typedef struct ds_ft_job_spec {
    const char *model;            /* base model name (as the client gave it), or an adapter to continue */
    bool from_adapter;            /* model names a registry adapter: continue training it */
    const char *fine_tuned_model; /* adapter id to publish (must be a valid adapter id) */
    const char *training_file, *validation_file; /* file ids (informational) */
    const char *train_data;       /* JSONL text (copied) */
    size_t train_len;
    const char *valid_data;       /* or NULL */
    size_t valid_len;
    const char *method;           /* "supervised" | "lora" | "prompt_tuning" | "prefix_tuning" */
    ds_adapter_kind kind;
    int32_t n_epochs, batch_size; /* <= 0: defaults (3, min(4, n examples)) */
    float learning_rate;          /* > 0: used as is; else 2e-4 * multiplier (prompt/prefix/BitFit: 3e-2 *,
                                   * bottleneck: 1e-3 *) */
    float lr_multiplier;          /* <= 0: 1 */
    int32_t rank;                 /* LoRA (default 8) */
    float alpha;                  /* LoRA (default 2 * rank) */
    bool use_rslora;              /* LoRA: scale alpha/sqrt(r) */
    uint32_t targets;             /* DS_TRAIN_TARGET bits (0: q,v) */
    int32_t n_virtual;            /* prompt/prefix tuning (default 20) */
    float density;                /* diff pruning (kind DELTA): fraction kept, (0, 1]; 0: BitFit */
    int32_t dp_warmup_steps;      /* diff pruning: dense steps (<= 0: a quarter of the job's steps, >= 1) */
    bool bias;                    /* diff pruning: bias deltas too */
    ds_train_bn_opts bn;          /* bottleneck (ds_train_bn_default_opts) */
    uint64_t seed;
} ds_ft_job_spec;

typedef struct ds_ft_job_info {
    char id[48];
    ds_ft_status status;
    char model[128], fine_tuned_model[128], training_file[64], validation_file[64], method[24];
    int64_t created_at, finished_at; /* unix seconds; finished 0 while not finished */
    int64_t trained_tokens;          /* tokens processed so far (all epochs) */
    int64_t step, total_steps;
    char error[512];                 /* failed: why */
    char error_code[48];
    int32_t n_epochs, batch_size, rank, n_virtual;
    float learning_rate, alpha, lr_multiplier;
    uint32_t targets;
    bool use_rslora;
    float density;                   /* diff pruning (0: not diff pruning) */
    int32_t dp_warmup_steps;         /* diff pruning: 0 = a quarter of the job's steps */
    bool bias;                       /* diff pruning: bias deltas too */
    uint64_t seed;
    ds_train_bn_opts bn;             /* bottleneck jobs */
    double tokens_per_s;             /* training throughput of the job (0 until a step ran) */
} ds_ft_job_info;

typedef struct ds_ft_event {
    int64_t seq;                     /* 1, 2, ... within the job */
    int64_t created_at;
    bool metrics;                    /* a training step (step, loss, lr valid) */
    int64_t step;
    double train_loss, valid_loss;   /* valid_loss NaN when not measured */
    float lr;
    char level[8];                   /* "info" | "warn" | "error" */
    char message[256];
} ds_ft_event;

typedef struct ds_ft_checkpoint {
    int64_t step, created_at;
    double train_loss, valid_loss;   /* NaN when not measured */
    char path[256];                  /* relative to the adapter directory */
} ds_ft_checkpoint;

/* What one fine-tuning job may make the server hold, checked by ds_ft_submit before it queues the
 * job (src/train/ft_limits.c). Zero fields: no limit. */
typedef struct ds_ft_limits {
    size_t max_adapter_bytes;  /* the adapter the job produces (f32 parameters, as ds_adapter's
                                  host_bytes counts them); the server passes --adapter-budget-mb,
                                  so a trained adapter can always be served. Training holds about
                                  4x this (values, gradients, AdamW moments) plus activations. */
    uint64_t disk_quota_bytes; /* one job's peak disk use: published adapter + kept checkpoints +
                                  resumable state (--ft-disk-quota-mb, default 4096 MiB) */
    int32_t keep_checkpoints;  /* only the newest k epoch checkpoints are kept; older ones are
                                  deleted as new ones are written (--ft-keep-checkpoints, default 2) */
    int32_t max_epochs;        /* n_epochs above this is refused (--ft-max-epochs, default 50) */
} ds_ft_limits;
ds_ft_limits ds_ft_default_limits(void);
/* Bytes of the adapter a new job would produce: LoRA of `rank` on `targets` (DS_TRAIN_TARGET bits,
 * already defaulted), or n_virtual prompt / prefix rows. Pure; any thread. */
size_t ds_ft_adapter_bytes(const ds_model *base, ds_adapter_kind kind, int32_t rank, uint32_t targets,
                           int32_t n_virtual);
/* Diff pruning on `targets` (projection bits): *dense = bytes of the dense δ the warm-up trains (one
 * f32 copy; training holds 4x: values, gradients, two moments), *sparse = bytes of the saved delta
 * at `density` (CSR: row pointers, int32 indices, f32 values), bias deltas included in both when
 * `bias`. Pure; any thread. */
void ds_ft_dp_bytes(const ds_model *base, uint32_t targets, float density, bool bias, size_t *dense, size_t *sparse);

typedef struct ds_ft_manager ds_ft_manager;

/* base and reg are borrowed and must outlive the manager; reg may be NULL (jobs then fail to
 * submit: no adapter directory). data_dir (copied; NULL: memory only) keeps every job under
 * data_dir/jobs/<id>/ (src/train/job_store.c): its record, its data until it ends and its
 * resumable state (saved every epoch, at least every five minutes, and on ds_ft_manager_stop). Jobs
 * stored there are loaded: finished ones are listed again, queued ones run, and one that was
 * running resumes from its state (or fails saying why it cannot); unreadable records are skipped
 * with a log line. Starts the training thread. */
ds_ft_manager *ds_ft_manager_create(const ds_model *base, ds_adapter_registry *reg, const char *data_dir,
                                    ds_err *err);
/* Co-serving: every training step and validation pass then runs on the engine's thread as
 * background work (ds_engine_set_background), one bounded unit (ds_trainer_advance) between two
 * inference steps, within `budget` of the engine's busy time while requests run, instead of
 * competing with it from the job thread. The engine must outlive the manager. */
struct ds_engine;
void ds_ft_manager_attach_engine(ds_ft_manager *m, struct ds_engine *e, float budget);
/* Replaces the limits jobs submitted from now on are checked against (a manager starts with
 * ds_ft_default_limits()). Call before submitting from other threads. */
void ds_ft_manager_set_limits(ds_ft_manager *m, const ds_ft_limits *l);
/* ANY THREAD, returns at once: a shutdown begins. The running job saves its state and stops
 * within one training step, staying 'running' on disk so that the next start resumes it; queued
 * jobs stay queued; no job starts any more. NULL is a no-op. */
void ds_ft_manager_stop(ds_ft_manager *m);
/* ds_ft_manager_stop, then joins the thread (within one training step), detaches from the engine.
 * NULL is a no-op. */
void ds_ft_manager_free(ds_ft_manager *m);
/* Queues a job; its id goes to id_out. DS_EINVAL (bad spec, or over the manager's ds_ft_limits), DS_ENOMEM, DS_EBUSY (too many),
 * DS_EIO when the job cannot be stored under the data directory (nothing is queued; the message
 * says why and names no server path). Any thread. */
int ds_ft_submit(ds_ft_manager *m, const ds_ft_job_spec *spec, char id_out[48], ds_err *err);
/* Cancels a queued or running job (a running one stops within one step). DS_ENOTFOUND; DS_EINVAL
 * when it already finished. */
int ds_ft_cancel(ds_ft_manager *m, const char *id, ds_err *err);
/* Snapshots (caller frees *out). DS_ENOTFOUND for an unknown id. jobs: newest first. */
int ds_ft_list(ds_ft_manager *m, ds_ft_job_info **out, size_t *n);
int ds_ft_get(ds_ft_manager *m, const char *id, ds_ft_job_info *out);
int ds_ft_events(ds_ft_manager *m, const char *id, ds_ft_event **out, size_t *n);
int ds_ft_checkpoints(ds_ft_manager *m, const char *id, ds_ft_checkpoint **out, size_t *n);

#ifdef __cplusplus
}
#endif
#endif
