/* libFuzzer: the safetensors reader on arbitrary bytes — header JSON, offsets, shapes — and a
 * conversion of every tensor it accepts (small ones) to fp32. */
#include "format/safetensors.h"

#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    ds_st_file f;
    ds_err err;
    if (ds_st_open_mem(&f, data, size, "fuzz.safetensors", &err) != 0) return 0;
    for (size_t i = 0; i < f.n_tensors; i++) {
        const ds_st_tensor *t = &f.tensors[i];
        if (t->n_elems == 0 || t->n_elems > (1u << 20)) continue;
        float *out = malloc(sizeof(float) * t->n_elems);
        if (out) ds_st_read_f32(t, "fuzz", NULL, 0, out, t->n_elems, &err);
        free(out);
    }
    ds_st_close(&f);
    return 0;
}
