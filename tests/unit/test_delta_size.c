/* Memory of a 1% delta of SmolLM2-135M (issue 13): a "fine-tuned" copy (the model dequantised to
 * fp32, every projection weight perturbed by seeded noise) is extracted at 1% keep by
 * ds_delta_extract, loaded and made resident on the CPU backend; the resident bytes the registry
 * and the engine account (ds_adapter_dev.dev_bytes, = host_bytes) must be <= 3% of the model's fp32
 * bytes (4 bytes per weight element). Skips without models/SmolLM2-135M-Instruct.Q4_1.gguf. */
#include "ds/adapter.h"
#include "ds/model.h"
#include "ds_test.h"
#include "golden.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MODEL_NAME "SmolLM2-135M-Instruct.Q4_1.gguf"

static void perturb(ds_weight *w, uint64_t *s) {
    float *v = (float *)w->data; /* a model-owned fp32 copy (quantize = F32) */
    const size_t n = (size_t)w->rows * w->cols;
    for (size_t i = 0; i < n; i++) {
        *s ^= *s << 13, *s ^= *s >> 7, *s ^= *s << 17;
        v[i] += ((float)(*s >> 40) / (float)(1 << 24) - 0.5f) * 0.01f;
    }
}

int main(void) {
    char path[1024];
    const char *mdir = getenv("DS_MODELS_DIR");
    snprintf(path, sizeof path, "%s/%s", mdir && *mdir ? mdir : DS_MODELS_DIR, MODEL_NAME);
    if (access(path, R_OK)) SKIP("%s not found (scripts/fetch_model.sh fetches it)", path);
    ds_log_set_level(DS_LOG_WARN);
    ds_err err = {{0}};
    ds_model_params mp = ds_model_default_params();
    mp.verbose = false;
    mp.load_tokenizer = false;
    ds_model *base = ds_model_load(path, &mp, &err);
    mp.quantize = DS_DTYPE_F32;
    ds_model *tuned = base ? ds_model_load(path, &mp, &err) : NULL;
    CHECK_MSG(base && tuned, "%s", err.msg);
    if (!base || !tuned) return ds_model_free(base), ds_test_result();
    uint64_t s = 0x9E3779B97F4A7C15ull;
    int64_t want = 0;
    for (int32_t l = 0; l < tuned->cfg.n_layer; l++) {
        ds_layer_weights *w = &tuned->layers[l];
        ds_weight *ws[] = {&w->wq, &w->wk, &w->wv, &w->wo, &w->w_gate, &w->w_up, &w->w_down};
        for (int p = 0; p < DS_PROJ_COUNT; p++) {
            CHECK_EQ_INT(ws[p]->dtype, DS_DTYPE_F32);
            perturb(ws[p], &s);
            want += (int64_t)ceil(0.01 * (double)ws[p]->rows * ws[p]->cols - 1e-9);
        }
    }
    char tmp[] = "/tmp/ds_delta_size_XXXXXX";
    CHECK(mkdtemp(tmp) != NULL);
    ds_delta_extract_params xp = ds_delta_extract_default_params(); /* keep 1% */
    ds_delta_extract_stats st;
    CHECK_MSG(ds_delta_extract(base, tuned, &xp, tmp, &st, &err) == 0, "%s", err.msg);
    CHECK_EQ_INT(st.nnz, want);
    ds_adapter *a = ds_adapter_load(tmp, base, NULL, &err);
    CHECK_MSG(a != NULL, "%s", err.msg);
    ds_backend *b = ds_backend_create("cpu", NULL, &err);
    ds_adapter_dev dev;
    if (a && b) {
        CHECK_EQ_INT(ds_adapter_dev_upload(b, a, &dev, &err), 0);
        const double fp32 = 4.0 * (double)base->n_params, frac = (double)dev.dev_bytes / fp32;
        printf("SmolLM2 1%% delta: %lld of %lld projection entries; resident %.2f MiB (host %.2f MiB, file %.2f MiB) "
               "= %.2f%% of the model's fp32 bytes (%.1f MiB, %zu weights)\n",
               (long long)st.nnz, (long long)st.params, dev.dev_bytes / 1048576.0, a->host_bytes / 1048576.0,
               st.file_bytes / 1048576.0, 100.0 * frac, fp32 / 1048576.0, base->n_params);
        CHECK_EQ_INT(dev.dev_bytes, a->host_bytes);
        CHECK_MSG(frac <= 0.03, "a 1%% delta is %.2f%% of the model's fp32 bytes (> 3%%)", 100.0 * frac);
        ds_adapter_dev_release(b, &dev);
    }
    golden_rm_saved(tmp);
    ds_adapter_free(a);
    ds_backend_free(b);
    ds_model_free(tuned);
    ds_model_free(base);
    return ds_test_result();
}
