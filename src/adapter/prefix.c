/* Prefix tuning K/V into shared KV-cache blocks (docs/ARCHITECTURE.md, "A step: the batch and the
 * adapter plan"), written through the model's ds_llama_kv_write: the model owns its KV pools. */
#include "ds/adapter.h"
#include "ds/model.h"

int ds_adapter_write_prefix(ds_llama *L, const ds_adapter *a, const int32_t *blocks, int32_t n_blocks, ds_err *err) {
    const ds_model_config *c = &ds_llama_model(L)->cfg;
    const int32_t bs = ds_llama_kv_block_size(L), row = c->n_kv_head * c->head_dim;
    if (!a->prefix)
        return ds_err_set(err, DS_EINVAL, "adapter '%s' has no prefix-tuning K/V", a->name ? a->name : "?");
    if (a->prefix_row != row || a->n_layer != c->n_layer || n_blocks * bs < a->n_virtual)
        return ds_err_set(err, DS_EINVAL, "adapter '%s': prefix shape does not fit the KV cache", a->name ? a->name : "?");
    for (int32_t l = 0; l < c->n_layer; l++) {
        for (int32_t p = 0; p < a->n_virtual; p++) {
            const int64_t slot = (int64_t)blocks[p / bs] * bs + p % bs;
            /* PEFT layout: row p holds [2L][row]; K of layer l at 2l, V at 2l+1 */
            const float *src = a->prefix + ((size_t)p * c->n_layer * 2 + (size_t)l * 2) * row;
            int st = ds_llama_kv_write(L, l, slot, src, src + row);
            if (st) return ds_err_set(err, st, "adapter '%s': prefix upload failed (%s)", a->name ? a->name : "?",
                                      ds_strerror(st));
        }
    }
    return DS_OK;
}
