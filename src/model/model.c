/* ds_model life cycle and the loader dispatch (HF directory vs GGUF file). */
#include "ds/model.h"

#include <errno.h>
#include <stdio.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

ds_model_params ds_model_default_params(void) {
    return (ds_model_params){.load_tokenizer = true, .load_weights = true, .verbose = true, .quantize = DS_DTYPE_NONE};
}

ds_model *ds_model_new(void) { return calloc(1, sizeof(ds_model)); }

float *ds_model_alloc_floats(ds_model *m, size_t n) {
    size_t bytes;
    if (!ds_mul_ok(n, sizeof(float), &bytes)) return NULL;
    return ds_model_alloc_bytes(m, bytes);
}

void *ds_model_alloc_bytes(ds_model *m, size_t bytes) {
    if (m->n_blobs == m->cap_blobs) {
        size_t cap = m->cap_blobs ? m->cap_blobs * 2 : 64;
        void **b = realloc(m->blobs, cap * sizeof *b);
        if (!b) return NULL;
        m->blobs = b;
        m->cap_blobs = cap;
    }
    void *p = calloc(1, bytes ? bytes : 1);
    if (!p) return NULL;
    m->blobs[m->n_blobs++] = p;
    return p;
}

int ds_model_keep_map(ds_model *m, ds_file_map *map) {
    ds_file_map *maps = realloc(m->maps, (m->n_maps + 1) * sizeof *maps);
    if (!maps) return DS_ENOMEM;
    m->maps = maps;
    m->maps[m->n_maps++] = *map;
    memset(map, 0, sizeof *map);
    map->fd = -1;
    return 0;
}

/* Where a converted row goes: Q4_K needs whole 256-blocks, else Q8_0 (32) does. */
static ds_dtype store_dtype(ds_dtype src, ds_dtype quantize, int32_t cols) {
    if (quantize == DS_DTYPE_F32) return DS_DTYPE_F32; /* dequantise everything (reference runs) */
    if (quantize == DS_DTYPE_NONE || (src != DS_DTYPE_F32 && src != DS_DTYPE_F16 && src != DS_DTYPE_BF16)) return src;
    if (quantize == DS_DTYPE_Q4_K && cols % 256) quantize = DS_DTYPE_Q8_0;
    return cols % ds_dtype_block(quantize) ? src : quantize;
}

int ds_model_set_weight(ds_model *m, ds_weight *dst, const void *src, ds_dtype st, size_t src_row_bytes, int32_t rows,
                        int32_t cols, const int64_t *perm, bool borrow, ds_dtype quantize) {
    const ds_dtype dt = store_dtype(st, quantize, cols);
    const size_t rb = ds_dtype_row_bytes(dt, cols);
    size_t bytes;
    if (!rb || rows <= 0 || !ds_mul_ok(rb, (size_t)rows, &bytes)) return DS_EINVAL;
    if (borrow && dt == st && !perm && src_row_bytes == rb) {
        ds_weight_init(dst, src, dt, rows, cols);
    } else {
        uint8_t *p = ds_model_alloc_bytes(m, bytes);
        float *tmp = dt != st ? malloc((size_t)cols * sizeof *tmp) : NULL;
        if (!p || (dt != st && !tmp)) {
            free(tmp);
            return DS_ENOMEM;
        }
        for (int32_t r = 0; r < rows; r++) {
            const uint8_t *row = (const uint8_t *)src + (size_t)(perm ? perm[r] : r) * src_row_bytes;
            if (dt == st) {
                memcpy(p + (size_t)r * rb, row, rb);
            } else {
                ds_dequant_row(st, row, tmp, cols);
                ds_quantize_row(dt, tmp, p + (size_t)r * rb, cols);
            }
        }
        free(tmp);
        ds_weight_init(dst, p, dt, rows, cols);
    }
    m->weight_bytes[dt] += bytes;
    m->n_params += (size_t)rows * (size_t)cols;
    return 0;
}

void ds_model_weight_summary(const ds_model *m, char *buf, size_t cap) {
    size_t total = 0, o = 0;
    for (int t = 0; t < DS_DTYPE_COUNT; t++) total += m->weight_bytes[t];
    o = (size_t)snprintf(buf, cap, "%.1f MiB (", (double)total / 1048576.0);
    bool first = true;
    for (int t = 0; t < DS_DTYPE_COUNT && o < cap; t++) {
        if (!m->weight_bytes[t]) continue;
        o += (size_t)snprintf(buf + o, cap - o, "%s%s %.1f", first ? "" : ", ", ds_dtype_name((ds_dtype)t),
                              (double)m->weight_bytes[t] / 1048576.0);
        first = false;
    }
    if (o < cap) snprintf(buf + o, cap - o, ")");
}

void ds_model_free(ds_model *m) {
    if (!m) return;
    for (size_t i = 0; i < m->n_blobs; i++) free(m->blobs[i]);
    free(m->blobs);
    for (size_t i = 0; i < m->n_maps; i++) ds_file_map_close(&m->maps[i]);
    free(m->maps);
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
    NEED(l->wq.data, "%s: layer %d: q_proj weight missing", src, i);
    NEED(l->wk.data, "%s: layer %d: k_proj weight missing", src, i);
    NEED(l->wv.data, "%s: layer %d: v_proj weight missing", src, i);
    NEED(l->wo.data, "%s: layer %d: o_proj weight missing", src, i);
    NEED(l->ffn_norm, "%s: layer %d: post-attention norm weight missing", src, i);
    NEED(l->w_gate.data, "%s: layer %d: gate_proj weight missing", src, i);
    NEED(l->w_up.data, "%s: layer %d: up_proj weight missing", src, i);
    NEED(l->w_down.data, "%s: layer %d: down_proj weight missing", src, i);
    if (m->cfg.qkv_bias) {
        NEED(l->bq, "%s: layer %d: q_proj bias missing", src, i);
        NEED(l->bk, "%s: layer %d: k_proj bias missing", src, i);
        NEED(l->bv, "%s: layer %d: v_proj bias missing", src, i);
    }
    if (m->cfg.qk_norm) {
        NEED(l->q_norm, "%s: layer %d: q_norm weight missing", src, i);
        NEED(l->k_norm, "%s: layer %d: k_norm weight missing", src, i);
    }
    if (m->cfg.post_norms) {
        NEED(l->attn_post_norm, "%s: layer %d: post-attention norm weight missing", src, i);
        NEED(l->ffn_post_norm, "%s: layer %d: post-feed-forward norm weight missing", src, i);
    }
    return 0;
}

int ds_model_check_complete(const ds_model *m, ds_err *err) {
    const char *src = m->source_path ? m->source_path : "model";
    NEED(m->tok_embd.data, "%s: token embeddings missing", src);
    NEED(m->output_norm, "%s: final norm weight missing", src);
    NEED(m->output.data, "%s: output (lm_head) weight missing", src);
    NEED(m->inv_freq, "%s: RoPE frequencies missing", src);
    if (m->cfg.rope_theta_swa > 0) NEED(m->inv_freq_swa, "%s: sliding layers' RoPE frequencies missing", src);
    NEED(m->layers, "%s: layers missing", src);
    if (m->cfg.tied_embeddings && m->output.data != m->tok_embd.data)
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
