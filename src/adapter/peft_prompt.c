/* PEFT IA³, prompt tuning, P-tuning and prefix tuning (PEFT tuners/prompt_tuning, p_tuning, prefix_tuning). */
#include <stdlib.h>
#include <string.h>

#include "adapter/loader.h"

/* ---- IA³ ---- */

/* PEFT saves ia3_l as [out, 1] on attention-side modules (scales the output, bias included) and as
 * [1, in] on feed-forward ones (scales the input). The shape tells; feedforward_modules must agree. */
static int ia3_side(peft_ctx *c, const ds_st_tensor *t, const char *path, int32_t in, int32_t out, bool *is_input) {
    bool col = t->n_dims == 2 && t->shape[0] == out && t->shape[1] == 1;
    bool row = t->n_dims == 2 && t->shape[0] == 1 && t->shape[1] == in;
    if (!col && !row)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' must have shape [%d, 1] or [1, %d] for %s", c->st_path,
                          t->name, out, in, path);
    bool ff = row && !col;
    if (c->cfg->has_ff) {
        bool cfg_ff;
        int rc = peft_is_feedforward(c->cfg, path, &cfg_ff, c->cfg_path, c->err);
        if (rc) return rc;
        if (col && row) ff = cfg_ff; /* in == out == 1: only the config can tell */
        if (cfg_ff != ff)
            return ds_err_set(c->err, DS_EFORMAT,
                              "%s: tensor '%s' has the %s shape but feedforward_modules in %s says %s", c->st_path,
                              t->name, ff ? "feed-forward" : "attention-side", c->cfg_path,
                              cfg_ff ? "feed-forward" : "not feed-forward");
    }
    *is_input = ff;
    return 0;
}

static int ia3_slot(peft_ctx *c, size_t slot, bool seen[DS_PROJ_COUNT]) {
    const ds_st_tensor *t = c->slots[slot][ROLE_IA3];
    char path[96];
    peft_slot_path(c, slot, path, sizeof path);
    if (slot == PEFT_LM_HEAD_SLOT(c))
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: tensor '%s': IA³ on lm_head is not supported", c->st_path,
                          t->name);
    int p = (int)(slot % DS_PROJ_COUNT);
    int32_t in, out, rows[3];
    int parts[3];
    ds_adapter_base_dims(c->base, p, &in, &out);
    /* Phi-3's fused qkv_proj / gate_up_proj: an output scale splits by rows, an input scale (the
     * shared input of the fused module) applies to every part. */
    const int n = ds_adapter_module_parts(c->base, p, parts, rows, &out);
    bool is_input = false;
    int rc = ia3_side(c, t, path, in, out, &is_input);
    if (rc) return rc;
    /* The forward pass keeps one side per projection kind, so every layer must agree. */
    if (seen[p] && c->a->ia3_is_input[p] != is_input)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s': %s is feed-forward in some layers but not in others",
                          c->st_path, t->name, ds_proj_name((ds_proj)p));
    seen[p] = true;
    int64_t shape[2] = {is_input ? 1 : out, is_input ? in : 1};
    float *v;
    if ((rc = peft_read(c, t, shape, 2, &v))) return rc;
    const size_t layer0 = slot - (size_t)p;
    for (int k = 0, r0 = 0; k < n; r0 += rows[k], k++) {
        const size_t len = (size_t)(is_input ? in : rows[k]);
        float *part = n == 1 ? v : malloc(len * sizeof(float));
        if (!part) {
            free(v);
            return ds_err_set(c->err, DS_ENOMEM, "%s: out of memory", c->st_path);
        }
        if (n > 1) memcpy(part, v + (is_input ? 0 : r0), len * sizeof(float));
        c->a->ia3[layer0 + (size_t)parts[k]] = part;
        c->a->ia3_is_input[parts[k]] = is_input;
        c->a->host_bytes += len * sizeof(float);
    }
    if (n > 1) free(v);
    return 0;
}

int peft_load_ia3(peft_ctx *c) {
    bool seen[DS_PROJ_COUNT] = {0};
    int rc = ds_adapter_alloc_ia3_table(c->a, c->err);
    if (!rc) rc = peft_collect_slots(c);
    size_t used = 0;
    for (size_t i = 0; !rc && i < c->n_slots; i++)
        if (c->slots[i][ROLE_IA3] && !(rc = ia3_slot(c, i, seen))) used++;
    if (!rc && used == 0) rc = ds_err_set(c->err, DS_EFORMAT, "%s: no ia3_l tensors found", c->st_path);
    return rc;
}

/* ---- prompt learning ---- */

/* The single tensor prompt learning saves; any other key means something we would ignore (e.g. a
 * prefix encoder's MLP saved next to its pre-projection embedding). */
static int prompt_tensor(peft_ctx *c, const ds_st_tensor **out) {
    const ds_st_tensor *t = ds_st_find(&c->st, "prompt_embeddings");
    for (size_t i = 0; i < c->st.n_tensors; i++) {
        const ds_st_tensor *u = &c->st.tensors[i];
        if (u == t) continue;
        if (c->cfg->prefix_projection)
            return ds_err_set(c->err, DS_EUNSUPPORTED,
                              "%s: tensor '%s': prefix_projection encoder weights are not supported; save the adapter "
                              "with PEFT so prompt_embeddings holds the post-MLP prefix",
                              c->st_path, u->name);
        return ds_err_set(c->err, DS_EFORMAT, "%s: unknown tensor '%s' (%s saves only prompt_embeddings)", c->st_path,
                          u->name, c->cfg->peft_type);
    }
    if (!t) return ds_err_set(c->err, DS_EFORMAT, "%s: tensor 'prompt_embeddings' is missing", c->st_path);
    if (t->n_dims != 2)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensor 'prompt_embeddings' must be 2-D", c->st_path);
    if (t->shape[0] != c->cfg->n_virtual)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensor 'prompt_embeddings' has %lld rows but num_virtual_tokens = %d",
                          c->st_path, (long long)t->shape[0], c->cfg->n_virtual);
    *out = t;
    return 0;
}

/* Prompt tuning and P-tuning: [P, d_model] rows prepended to the input embeddings. P-tuning's file
 * already holds the prompt encoder's output (PEFT get_prompt_embedding_to_save). */
int peft_load_prompt(peft_ctx *c) {
    const ds_st_tensor *t;
    int rc = prompt_tensor(c, &t);
    if (rc) return rc;
    int32_t d = c->base->cfg.d_model;
    if (c->cfg->token_dim && c->cfg->token_dim != d)
        return ds_err_set(c->err, DS_EFORMAT, "%s: token_dim = %d but the base model's hidden size is %d", c->cfg_path,
                          c->cfg->token_dim, d);
    if (t->shape[1] != d)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensor 'prompt_embeddings' is [%lld, %lld], expected [%d, %d]",
                          c->st_path, (long long)t->shape[0], (long long)t->shape[1], c->cfg->n_virtual, d);
    int64_t shape[2] = {c->cfg->n_virtual, d};
    if ((rc = peft_read(c, t, shape, 2, &c->a->prompt))) return rc;
    c->a->n_virtual = c->cfg->n_virtual;
    c->a->host_bytes += (size_t)c->cfg->n_virtual * (size_t)d * sizeof(float);
    return 0;
}

/* Config fields of a prefix adapter against the base geometry (PEFT ≥ 0.12 on GQA saves
 * token_dim = head_dim·n_kv_head and num_attention_heads = n_kv_head). */
static int prefix_config(peft_ctx *c, int32_t row) {
    const ds_model_config *m = &c->base->cfg;
    const peft_config *p = c->cfg;
    if (p->num_layers && p->num_layers != m->n_layer)
        return ds_err_set(c->err, DS_EFORMAT, "%s: num_layers = %d but the base model has %d layers", c->cfg_path,
                          p->num_layers, m->n_layer);
    if (p->token_dim && p->token_dim != row && m->n_kv_head != m->n_head && p->token_dim == m->d_model)
        return ds_err_set(c->err, DS_EFORMAT,
                          "%s: token_dim = %d is the hidden size, but this GQA model caches K/V of width "
                          "head_dim*num_key_value_heads = %d: the prefix was saved by PEFT < 0.12 and cannot be used",
                          c->cfg_path, p->token_dim, row);
    if (p->token_dim && p->token_dim != row)
        return ds_err_set(c->err, DS_EFORMAT, "%s: token_dim = %d, expected head_dim*num_key_value_heads = %d",
                          c->cfg_path, p->token_dim, row);
    if (p->num_heads && p->num_heads != m->n_kv_head)
        return ds_err_set(c->err, DS_EFORMAT, "%s: num_attention_heads = %d, expected num_key_value_heads = %d",
                          c->cfg_path, p->num_heads, m->n_kv_head);
    return 0;
}

/* Prefix tuning: prompt_embeddings [P, n_layer·2·token_dim] viewed as [P][2L][H_kv][D], K of layer l
 * at 2l and V at 2l+1 (PEFT get_prompt) — the same bytes as ds_adapter.prefix
 * [P][n_layer][2][H_kv·D], so it is copied as is. */
int peft_load_prefix(peft_ctx *c) {
    const ds_model_config *m = &c->base->cfg;
    const int32_t row = m->head_dim * m->n_kv_head;
    int rc = prefix_config(c, row);
    const ds_st_tensor *t;
    if (!rc) rc = prompt_tensor(c, &t);
    if (rc) return rc;
    int64_t width = (int64_t)m->n_layer * 2 * row;
    if (t->shape[1] != width && c->cfg->prefix_projection && t->shape[1] == (c->cfg->token_dim ? c->cfg->token_dim : row))
        return ds_err_set(c->err, DS_EUNSUPPORTED,
                          "%s: tensor 'prompt_embeddings' is the pre-projection embedding [%lld, %lld] "
                          "(prefix_projection); only the post-MLP prefix PEFT saves is supported",
                          c->st_path, (long long)t->shape[0], (long long)t->shape[1]);
    if (t->shape[1] != width && m->n_kv_head != m->n_head && t->shape[1] == (int64_t)m->n_layer * 2 * m->d_model)
        return ds_err_set(c->err, DS_EFORMAT,
                          "%s: tensor 'prompt_embeddings' has width n_layer*2*hidden_size = %lld, but this GQA model "
                          "needs n_layer*2*head_dim*num_key_value_heads = %lld (saved by PEFT < 0.12)",
                          c->st_path, (long long)t->shape[1], (long long)width);
    if (t->shape[1] != width)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensor 'prompt_embeddings' is [%lld, %lld], expected [%d, %lld]",
                          c->st_path, (long long)t->shape[0], (long long)t->shape[1], c->cfg->n_virtual,
                          (long long)width);
    int64_t shape[2] = {c->cfg->n_virtual, width};
    if ((rc = peft_read(c, t, shape, 2, &c->a->prefix))) return rc;
    c->a->n_virtual = c->cfg->n_virtual;
    c->a->prefix_row = row;
    c->a->host_bytes += (size_t)c->cfg->n_virtual * (size_t)width * sizeof(float);
    return 0;
}
