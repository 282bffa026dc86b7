/* Prefix tuning K/V into shared KV-cache blocks (DESIGN.md "The batch that carries adapters"). */
#include "ds/adapter.h"
#include "ds/model.h"

int ds_adapter_write_prefix(ds_llama *L, const ds_adapter *a, const int32_t *blocks, int32_t n_blocks, ds_err *err) {
    const ds_model_config *c = &ds_llama_model(L)->cfg;
    const int32_t bs = ds_llama_kv_block_size(L), row = c->n_kv_head * c->head_dim;
    if (!a->prefix)
        return ds_err_set(err, DS_EINVAL, "adapter '%s' has no prefix-tuning K/V", a->name ? a->name : "?");
    if (a->prefix_row != row || a->n_layer != c->n_layer || n_blocks * bs < a->n_virtual)
        return ds_err_set(err, DS_EINVAL, "adapter '%s': prefix shape does not fit the KV cache", a->name ? a->name : "?");
    ds_backend *b = ds_llama_backend(L);
    for (int32_t l = 0; l < c->n_layer; l++) {
        float *kp = ds_llama_k_pool(L, l), *vp = ds_llama_v_pool(L, l);
        for (int32_t p = 0; p < a->n_virtual; p++) {
            const size_t slot = (size_t)blocks[p / bs] * bs + (size_t)(p % bs);
            /* PEFT layout: row p holds [2L][row]; K of layer l at 2l, V at 2l+1 */
            const float *src = a->prefix + ((size_t)p * c->n_layer * 2 + (size_t)l * 2) * row;
            int st = b->iface->upload(b->ctx, kp + slot * row, src, sizeof(float) * (size_t)row);
            if (!st) st = b->iface->upload(b->ctx, vp + slot * row, src + row, sizeof(float) * (size_t)row);
            if (st) return ds_err_set(err, st, "adapter '%s': prefix upload failed", a->name ? a->name : "?");
        }
    }
    return DS_OK;
}
