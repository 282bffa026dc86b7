/* libFuzzer: AdapterHub adapter_config.json parsing and validation (ds_bottleneck_config_check:
 * bottleneck, prefix tuning, config unions such as MAM)
 * against a Llama-shaped and a Qwen2-shaped base (the latter is "hooked": other refusals apply). */
#include <stdint.h>
#include <string.h>

#include "adapter/loader.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static ds_model m[2];
    m[0].cfg = (ds_model_config){.arch = DS_ARCH_LLAMA, .arch_name = "llama", .d_model = 64, .n_layer = 3,
                                 .n_head = 4, .n_kv_head = 2, .head_dim = 16};
    m[1].cfg = (ds_model_config){.arch = DS_ARCH_QWEN2, .arch_name = "qwen2", .d_model = 64, .n_layer = 2,
                                 .n_head = 4, .n_kv_head = 2, .head_dim = 16};
    for (int i = 0; i < 2; i++) {
        ds_err err = {{0}};
        int rc = ds_bottleneck_config_check((const char *)data, size, &m[i], &err);
        DS_ASSERT(rc <= 0 && (rc == 0 || err.msg[0]));
    }
    return 0;
}
