/* ds_model life cycle and the loader dispatch (HF directory vs GGUF file). */
#include "ds/model.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

ds_model_params ds_model_default_params(void) {
    return (ds_model_params){.load_tokenizer = true, .verbose = true};
}

ds_model *ds_model_new(void) { return calloc(1, sizeof(ds_model)); }

float *ds_model_alloc_floats(ds_model *m, size_t n) {
    size_t bytes;
    if (!ds_mul_ok(n, sizeof(float), &bytes)) return NULL;
    if (m->n_blobs == m->cap_blobs) {
        size_t cap = m->cap_blobs ? m->cap_blobs * 2 : 64;
        void **b = realloc(m->blobs, cap * sizeof *b);
        if (!b) return NULL;
        m->blobs = b;
        m->cap_blobs = cap;
    }
    float *p = calloc(1, bytes ? bytes : 1);
    if (!p) return NULL;
    m->blobs[m->n_blobs++] = p;
    return p;
}

void ds_model_free(ds_model *m) {
    if (!m) return;
    for (size_t i = 0; i < m->n_blobs; i++) free(m->blobs[i]);
    free(m->blobs);
    free(m->layers);
    if (m->tok) ds_tokenizer_free(m->tok);
    free(m->chat_template);
    free(m->source_path);
    free(m);
}

#define NEED(ptr, ...)                                                                                           \
    do {                                                                                                         \
        if (!(ptr)) return ds_err_set(err, DS_EFORMAT, __VA_ARGS__);                                             \
    } while (0)

static int check_layer(const ds_model *m, int i, ds_err *err) {
    const ds_layer_weights *l = &m->layers[i];
    const char *src = m->source_path ? m->source_path : "model";
    NEED(l->attn_norm, "%s: layer %d: attention norm weight missing", src, i);
    NEED(l->wq, "%s: layer %d: q_proj weight missing", src, i);
    NEED(l->wk, "%s: layer %d: k_proj weight missing", src, i);
    NEED(l->wv, "%s: layer %d: v_proj weight missing", src, i);
    NEED(l->wo, "%s: layer %d: o_proj weight missing", src, i);
    NEED(l->ffn_norm, "%s: layer %d: post-attention norm weight missing", src, i);
    NEED(l->w_gate, "%s: layer %d: gate_proj weight missing", src, i);
    NEED(l->w_up, "%s: layer %d: up_proj weight missing", src, i);
    NEED(l->w_down, "%s: layer %d: down_proj weight missing", src, i);
    if (m->cfg.qkv_bias) {
        NEED(l->bq, "%s: layer %d: q_proj bias missing", src, i);
        NEED(l->bk, "%s: layer %d: k_proj bias missing", src, i);
        NEED(l->bv, "%s: layer %d: v_proj bias missing", src, i);
    }
    return 0;
}

int ds_model_check_complete(const ds_model *m, ds_err *err) {
    const char *src = m->source_path ? m->source_path : "model";
    NEED(m->tok_embd, "%s: token embeddings missing", src);
    NEED(m->output_norm, "%s: final norm weight missing", src);
    NEED(m->output, "%s: output (lm_head) weight missing", src);
    NEED(m->inv_freq, "%s: RoPE frequencies missing", src);
    NEED(m->layers, "%s: layers missing", src);
    if (m->cfg.tied_embeddings && m->output != m->tok_embd)
        return ds_err_set(err, DS_EFORMAT, "%s: tied embeddings but output != token embeddings", src);
    for (int i = 0; i < m->cfg.n_layer; i++) {
        int rc = check_layer(m, i, err);
        if (rc) return rc;
    }
    return 0;
}

/* A directory is a Hugging Face model; a file starting with "GGUF" is GGUF. */
ds_model *ds_model_load(const char *path, const ds_model_params *params, ds_err *err) {
    struct stat st;
    if (!path || stat(path, &st) != 0) {
        ds_err_set(err, DS_EIO, "%s: cannot open: %s", path ? path : "(null)", path ? strerror(errno) : "no path");
        return NULL;
    }
    if (S_ISDIR(st.st_mode)) return ds_model_load_hf_dir(path, params, err);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    char magic[4] = {0};
    ssize_t got = fd >= 0 ? read(fd, magic, 4) : -1;
    if (fd >= 0) close(fd);
    if (got == 4 && !memcmp(magic, "GGUF", 4)) return ds_model_load_gguf(path, params, err);
    if (fd < 0) {
        ds_err_set(err, DS_EIO, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    ds_err_set(err, DS_EFORMAT, "%s: neither a GGUF file nor a Hugging Face model directory", path);
    return NULL;
}
