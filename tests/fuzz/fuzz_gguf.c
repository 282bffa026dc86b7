/* libFuzzer: the GGUF reader on arbitrary bytes — header, metadata, tensor infos and, for every
 * tensor it accepts, dequantisation of its first row (bounds checks on the data section). */
#include "format/gguf.h"

#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    ds_gguf g;
    ds_err err;
    if (ds_gguf_open_mem(&g, data, size, "fuzz.gguf", &err) != 0) return 0;
    const char *s;
    uint32_t u;
    ds_gguf_get_str(&g, "general.architecture", &s, &err);
    ds_gguf_get_u32(&g, "general.alignment", &u, &err);
    char **toks = NULL;
    size_t n = 0;
    if (ds_gguf_get_str_array(&g, "tokenizer.ggml.tokens", &toks, &n, &err) == 0) free(toks);
    for (size_t i = 0; i < g.n_tensors && i < 64; i++) {
        const ds_gguf_tensor *t = &g.tensors[i];
        if (!ds_ggml_can_dequant(t->type) || t->ne[0] <= 0 || t->ne[0] > (1 << 16)) continue;
        float *row = malloc(sizeof(float) * (size_t)t->ne[0]);
        if (row) ds_gguf_dequant_rows(&g, t, 0, 1, row, &err);
        free(row);
    }
    ds_gguf_close(&g);
    return 0;
}
