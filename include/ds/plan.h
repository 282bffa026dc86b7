/* deltaserve — the per-step adapter plan: what the forward pass runs for adapters in one step.
 *
 * Plan/run (FlashInfer): once per step, with the batch, the adapter layer (src/adapter/plan.c)
 * turns the step's adapter segments into segment tables — per (layer, projection) the ranges of
 * LoRA, IA³, DoRA and lora_bias segments, per (layer, site) the bottleneck segments — and the
 * forward uploads those tables to the backend once (ds_backend_iface.plan_upload). Every op of
 * every layer then only names a range of them: nothing is re-derived, packed or uploaded per
 * projection.
 *
 * This header is the model-level half: the plan as data and the functions the forward pass calls
 * to run it (src/model/plan_run.c). The model never calls up into src/adapter/; with a NULL or
 * inactive plan every function is exactly the base computation, so a base-only step pays nothing
 * for adapters. Engine thread, like the forward pass. */
#ifndef DS_PLAN_H
#define DS_PLAN_H

#include "ds/backend.h"
#include "ds/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    DS_PROJ_Q = 0,
    DS_PROJ_K,
    DS_PROJ_V,
    DS_PROJ_O,
    DS_PROJ_GATE,
    DS_PROJ_UP,
    DS_PROJ_DOWN,
    DS_PROJ_COUNT
} ds_proj;

/* Sites of bottleneck adapters in a layer: after attention (o_proj output; AdapterHub mh_adapter)
 * and after the MLP (down_proj output; output_adapter). */
typedef enum { DS_BN_ATTN = 0, DS_BN_FFN, DS_BN_SITES } ds_bn_site;

/* Returns "q_proj", "k_proj", ... for a projection. */
const char *ds_proj_name(ds_proj p);

/* What one projection runs, as ranges of the plan's tables, in PEFT's order:
 *   x' = x ⊙ l (ia3_in, vec table: IA³ feed-forward side); y = W x'; y += s·B(A x') (lora);
 *   y += s·b_B (lora_bias, vec); DoRA: y = (m/‖W + sBA‖) ⊙ y (dora, vec), then + b (bias, vec: the
 *   base bias over every row, which the matmul leaves out when dora is not empty);
 *   y = y ⊙ l (ia3_out, vec: IA³ attention side). Empty ranges are skipped.
 * Delta adapters (sparse table, vec): y += x'·δᵀ (sparse), y += b_δ (delta_bias), after the LoRA
 * terms; one segment has one adapter, so their place among the other kinds' steps is immaterial. */
typedef struct ds_proj_plan {
    ds_seg_range ia3_in, lora, lora_bias, sparse, delta_bias, dora, bias, ia3_out;
} ds_proj_plan;

typedef struct ds_plan {
    bool active;             /* false: no token of the step has an adapter */
    int32_t n_layer;
    const ds_proj_plan *proj; /* [n_layer][DS_PROJ_COUNT] */
    ds_proj_plan lm_head;    /* LoRA on lm_head; its segments are rows of the step's output rows */
    const ds_seg_range *bn;  /* [n_layer][DS_BN_SITES] ranges of the bn table */
    /* LoRA on embed_tokens, per segment (run once per step, not per layer, so not uploaded):
     * A holds Aᵀ [n_vocab][rank] — the shrink is a row gather (get_rows), then lora_expand. */
    const ds_lora_seg *embed;
    int32_t n_embed;
    /* Soft-prompt rows (prompt tuning / P-tuning): batch rows and backend source rows (set_rows). */
    const int32_t *soft_rows;
    const float *const *soft_src;
    int32_t n_soft;
    ds_seg_tables tables;    /* what the ranges index; host arrays valid for the step */
    float *scratch;          /* backend buffer >= n_tokens * max(d_model, d_ff) floats */
} ds_plan;

/* Hands the plan's tables to the backend (plan_upload); the forward calls it once per step before
 * the first layer. No-op for a NULL or inactive plan. Returns 0 or the backend's status. */
int ds_plan_upload(const ds_plan *p, ds_backend *b);

/* y[n][w.rows] = x·Wᵀ + bias plus every adapter delta the plan has for (layer, proj). Returns 0,
 * DS_EUNSUPPORTED (an op the backend lacks) or the ops' status. */
int ds_plan_linear(const ds_plan *p, ds_backend *b, int32_t layer, ds_proj proj, const ds_mat *w, const float *bias,
                   const float *x, float *y, int32_t n);
/* Bottleneck adapters at `site` of `layer`: rewrites o[n][d] (the sub-block's output) in place for
 * the tokens of every segment whose adapter has a module there, so that the caller's x += o yields
 * the adapted residual stream (ds_bn_seg); x is the stream entering the sub-block. */
int ds_plan_bottleneck(const ds_plan *p, ds_backend *b, int32_t layer, ds_bn_site site, const float *x, float *o,
                       int32_t d);
/* Input embeddings of the step's n tokens (ids: backend pointer) with embedding LoRA and soft-prompt rows.
 * embed_scale > 0 multiplies the token embeddings (Gemma 3), not the soft-prompt rows (PEFT's order). */
int ds_plan_embed(const ds_plan *p, ds_backend *b, const ds_mat *tok_embd, const int32_t *ids, float *out, int32_t n,
                  float embed_scale);
/* logits[n][vocab] = x · outputᵀ (+ lm_head LoRA) for the n output rows. */
int ds_plan_lm_head(const ds_plan *p, ds_backend *b, const ds_mat *output, const float *x, float *logits, int32_t n);

#ifdef __cplusplus
}
#endif
#endif
