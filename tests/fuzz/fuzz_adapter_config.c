/* libFuzzer: adapter_config.json parsing and validation (ds_adapter_config_check), then the
 * rank/alpha pattern and feedforward_modules regexes of whatever config survived, matched against
 * the module paths a real load would ask about. */
#include <stdint.h>
#include <string.h>

#include "adapter/loader.h"

static const char *const PATHS[] = {"model.layers.0.self_attn.q_proj", "model.layers.31.mlp.down_proj",
                                    "lm_head", ""};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    ds_err err;
    int rc = ds_adapter_config_check((const char *)data, size, &err);
    DS_ASSERT(rc <= 0 && (rc == 0 || err.msg[0]));
    peft_config c;
    if (peft_config_parse(&c, (const char *)data, size, "fuzz", &err)) return 0;
    for (size_t i = 0; i < sizeof PATHS / sizeof PATHS[0]; i++) {
        double v;
        bool found, ff;
        (void)peft_pattern_lookup(&c.alpha_pattern, PATHS[i], &v, &found, "fuzz", "alpha_pattern", &err);
        (void)peft_pattern_lookup(&c.rank_pattern, PATHS[i], &v, &found, "fuzz", "rank_pattern", &err);
        (void)peft_is_feedforward(&c, PATHS[i], &ff, "fuzz", &err);
    }
    peft_config_free(&c);
    return 0;
}
