/* libFuzzer: deltaserve delta adapters (src/adapter/delta.c) — adapter_config.json and
 * adapter_model.safetensors parsed and validated against a tiny Llama-shaped base (CSR invariants,
 * shapes, dtypes, names). Input: a little-endian u16 config length, the config, then the
 * safetensors image. Seeds: tests/fuzz/corpus/fuzz_delta (made from tests/data/delta by
 * tests/fuzz/make_delta_seeds.py). */
#include <stdint.h>
#include <string.h>

#include "adapter/loader.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static ds_model m;
    m.cfg = (ds_model_config){.arch = DS_ARCH_LLAMA, .arch_name = "llama", .d_model = 64, .n_layer = 2, .n_head = 4,
                              .n_kv_head = 2, .head_dim = 16, .d_ff = 128, .n_vocab = 320};
    if (size < 2) return 0;
    const size_t n = (size_t)data[0] | (size_t)data[1] << 8;
    if (n > size - 2) return 0;
    ds_err err = {{0}};
    int rc = ds_delta_check_mem((const char *)data + 2, n, data + 2 + n, size - 2 - n, &m, &err);
    DS_ASSERT(rc <= 0 && (rc == 0 || err.msg[0]));
    return 0;
}
