/* Backend capabilities: an adapter that needs an optional backend op the active backend lacks is
 * refused when it would become resident (ds_adapter_dev_upload), with an error naming the op —
 * never inside a forward pass, where it would fail every request batched with it. A CPU backend
 * whose table lacks lora_expand stands in for a backend without embedding LoRA (CUDA today):
 * the embedding-LoRA adapter is refused, a q/v LoRA adapter is resident and its sequence runs in
 * a batch beside a base-model sequence. A sparse delta adapter is refused by a backend without the
 * sparse op. */
#include "adapter_run.h"
#include "ds_test.h"

static ds_model *load_model(void) {
    ds_model_params mp = ds_model_default_params();
    mp.verbose = false;
    mp.load_tokenizer = false;
    ds_err err = {{0}};
    ds_model *m = ds_model_load(DS_TEST_DATA "/models/tiny-llama", &mp, &err);
    CHECK_MSG(m != NULL, "%s", err.msg);
    return m;
}

static ds_adapter *load_adapter(const ds_model *m, const char *name) {
    char path[512];
    snprintf(path, sizeof path, "%s/adapters/tiny-llama/%s", DS_TEST_DATA, name);
    ds_err err = {{0}};
    ds_adapter *a = ds_adapter_load(path, m, NULL, &err);
    CHECK_MSG(a != NULL, "%s: %s", path, err.msg);
    return a;
}

int main(void) {
    ds_log_set_level(DS_LOG_WARN);
    ds_model *m = load_model();
    if (!m) return ds_test_result();
    ds_err err = {{0}};
    ds_backend *cpu = ds_backend_create("cpu", NULL, &err);
    CHECK_MSG(cpu != NULL, "%s", err.msg);
    struct ds_backend_iface lacking = *cpu->iface; /* the CPU backend without one optional op */
    lacking.lora_expand = NULL;
    lacking.name = "cpu-without-lora_expand";
    ds_backend b = {.iface = &lacking, .ctx = cpu->ctx};

    ds_adapter *embed = load_adapter(m, "lora-embed-head"), *qv = load_adapter(m, "lora-qv");
    ds_adapter_dev dev_embed, dev_qv;
    if (embed) {
        CHECK_EQ_INT(ds_adapter_dev_upload(&b, embed, &dev_embed, &err), DS_EUNSUPPORTED);
        CHECK_MSG(strstr(err.msg, "lora_expand") && strstr(err.msg, "cpu-without-lora_expand"), "message: %s", err.msg);
        printf("refused: %s\n", err.msg);
        CHECK_EQ_INT(ds_adapter_dev_upload(cpu, embed, &dev_embed, &err), 0); /* the full backend takes it */
        ds_adapter_dev_release(cpu, &dev_embed);
    }
    if (qv) {
        CHECK_EQ_INT(ds_adapter_dev_upload(&b, qv, &dev_qv, &err), 0);
        ds_llama_params lp = ds_llama_default_params();
        lp.kv_bytes = (size_t)8 << 20;
        lp.max_blocks_per_seq = AR_BLOCKS_PER_SEQ + 4;
        ds_llama *L = ds_llama_create(m, &b, &lp, &err);
        CHECK_MSG(L != NULL, "%s", err.msg);
        if (L) {
            ar_ctx c;
            ar_init(&c, L, m);
            ar_add(&c, &dev_qv);
            ar_add(&c, NULL);
            int32_t t0[4] = {5, 77, 140, 3}, t1[3] = {300, 12, 8};
            int32_t *toks[2] = {t0, t1};
            int nt[2] = {4, 3};
            float *logits = malloc(sizeof(float) * 7 * (size_t)m->cfg.n_vocab); /* every real token row */
            CHECK_EQ_INT(ar_step(&c, toks, nt, logits), 0);
            bool finite = true;
            for (size_t i = 0; i < 7 * (size_t)m->cfg.n_vocab; i++) finite &= isfinite(logits[i]);
            CHECK(finite);
            free(logits);
            ar_free(&c);
            ds_llama_free(L);
        }
        ds_adapter_dev_release(&b, &dev_qv);
    }
    /* A sparse delta adapter on a backend without the sparse op (tests/data/delta, gen_delta.py). */
    ds_adapter *delta = ds_adapter_load(DS_TEST_DATA "/delta/tiny-llama/keep1", m, NULL, &err);
    CHECK_MSG(delta != NULL, "%s", err.msg);
    if (delta) {
        struct ds_backend_iface no_sparse = *cpu->iface;
        no_sparse.sparse = NULL;
        no_sparse.name = "cpu-without-sparse";
        ds_backend bs = {.iface = &no_sparse, .ctx = cpu->ctx};
        ds_adapter_dev dev;
        CHECK_EQ_INT(ds_adapter_dev_upload(&bs, delta, &dev, &err), DS_EUNSUPPORTED);
        CHECK_MSG(strstr(err.msg, "sparse") && strstr(err.msg, "cpu-without-sparse"), "message: %s", err.msg);
        printf("refused: %s\n", err.msg);
        CHECK_EQ_INT(ds_adapter_dev_upload(cpu, delta, &dev, &err), 0);
        ds_adapter_dev_release(cpu, &dev);
    }
    ds_adapter_free(delta);
    ds_adapter_free(embed);
    ds_adapter_free(qv);
    ds_backend_free(cpu);
    ds_model_free(m);
    return ds_test_result();
}
