/* Resident adapters: the backend copies of a host ds_adapter (ds_adapter_dev) that the per-step
 * plan (src/adapter/plan.c) points its segments at, and the check that the backend has every op
 * an adapter needs before it becomes resident. */
#include "ds/adapter.h"
#include "util/status.h"

#include <stdlib.h>
#include <string.h>

static void *dev_copy_bytes(ds_backend *b, ds_adapter_dev *d, const void *host, size_t bytes) {
    if (d->n_allocs == d->cap_allocs) {
        size_t cap = d->cap_allocs ? d->cap_allocs * 2 : 32;
        void **na = realloc(d->allocs, cap * sizeof *na);
        if (!na) return NULL;
        d->allocs = na;
        d->cap_allocs = cap;
    }
    void *p = b->iface->alloc(b->ctx, bytes ? bytes : 1);
    if (!p) return NULL;
    d->allocs[d->n_allocs++] = p;
    d->dev_bytes += bytes;
    if (bytes && b->iface->upload(b->ctx, p, host, bytes) != DS_OK) return NULL;
    return p;
}

static float *dev_copy(ds_backend *b, ds_adapter_dev *d, const float *host, size_t n) {
    return dev_copy_bytes(b, d, host, n * sizeof(float));
}

/* Sparse and bias deltas: the CSR arrays as they are (their real size), bias vectors per projection. */
static int upload_delta(ds_backend *b, const ds_adapter *a, ds_adapter_dev *d) {
    const size_t n = (size_t)a->n_layer * DS_PROJ_COUNT;
    if (a->delta && !(d->delta = calloc(n, sizeof *d->delta))) return DS_ENOMEM;
    if (a->dbias && !(d->dbias = calloc(n, sizeof *d->dbias))) return DS_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        const ds_delta_module *m = a->delta ? a->delta[i] : NULL;
        if (m) {
            ds_sparse_seg *g = &d->delta[i];
            *g = (ds_sparse_seg){.rows = m->rows, .cols = m->cols, .nnz = m->nnz};
            g->row_ptr = dev_copy_bytes(b, d, m->row_ptr, ((size_t)m->rows + 1) * sizeof(int32_t));
            g->col = dev_copy_bytes(b, d, m->col, (size_t)m->nnz * sizeof(int32_t));
            g->val = dev_copy(b, d, m->val, (size_t)m->nnz);
            if (!g->row_ptr || !g->col || !g->val) return DS_EDEVICE;
        }
        if (a->dbias && a->dbias[i] && !(d->dbias[i] = dev_copy(b, d, a->dbias[i], (size_t)a->proj_out[i % DS_PROJ_COUNT])))
            return DS_EDEVICE;
    }
    return DS_OK;
}

static int upload_lora(ds_backend *b, ds_adapter_dev *d, const ds_lora_module *m, ds_lora_dev *out) {
    out->rank = m->rank;
    out->scale = m->scale;
    out->A = dev_copy(b, d, m->A, (size_t)m->rank * m->in);
    out->B = dev_copy(b, d, m->B, (size_t)m->out * m->rank);
    if (!out->A || !out->B) return DS_EDEVICE;
    if (m->bias_B && !(out->bias_B = dev_copy(b, d, m->bias_B, (size_t)m->out))) return DS_EDEVICE;
    if (m->dora_scale && !(out->dora_scale = dev_copy(b, d, m->dora_scale, (size_t)m->out))) return DS_EDEVICE;
    return DS_OK;
}

static int upload_bn(ds_backend *b, const ds_adapter *a, ds_adapter_dev *d) {
    const size_t n = (size_t)a->n_layer * DS_BN_SITES;
    if (!(d->bn = calloc(n, sizeof *d->bn))) return DS_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        const ds_bn_module *m = a->bn[i];
        if (!m) continue;
        const size_t D = (size_t)m->d, S = (size_t)m->size;
        ds_bn_seg *g = &d->bn[i];
        *g = (ds_bn_seg){.size = m->size, .act = m->act, .flags = m->flags, .scale = m->scale};
        g->down = dev_copy(b, d, m->down, S * D);
        g->down_b = dev_copy(b, d, m->down_b, S);
        g->up = dev_copy(b, d, m->up, D * S);
        g->up_b = dev_copy(b, d, m->up_b, D);
        if (!g->down || !g->down_b || !g->up || !g->up_b) return DS_EDEVICE;
        const float *const src[] = {m->scale_vec, m->ln_b_w, m->ln_b_b, m->ln_a_w, m->ln_a_b};
        const float **dst[] = {&g->scale_vec, &g->ln_b_w, &g->ln_b_b, &g->ln_a_w, &g->ln_a_b};
        for (size_t j = 0; j < sizeof src / sizeof *src; j++)
            if (src[j] && !(*dst[j] = dev_copy(b, d, src[j], D))) return DS_EDEVICE;
    }
    return DS_OK;
}

static int upload_all(ds_backend *b, const ds_adapter *a, ds_adapter_dev *d) {
    const size_t n_mod = (size_t)a->n_layer * DS_PROJ_COUNT;
    if (a->lora) {
        if (!(d->lora = calloc(n_mod, sizeof *d->lora))) return DS_ENOMEM;
        for (size_t i = 0; i < n_mod; i++)
            if (a->lora[i]) DS_TRY(upload_lora(b, d, a->lora[i], &d->lora[i]));
    }
    if (a->bn) DS_TRY(upload_bn(b, a, d));
    if (a->delta || a->dbias) DS_TRY(upload_delta(b, a, d));
    if (a->lm_head) DS_TRY(upload_lora(b, d, a->lm_head, &d->lm_head));
    if (a->embed) DS_TRY(upload_lora(b, d, a->embed, &d->embed)); /* A is [in=n_vocab][rank]: same count */
    if (a->ia3) {
        if (!(d->ia3 = calloc(n_mod, sizeof *d->ia3))) return DS_ENOMEM;
        for (size_t i = 0; i < n_mod; i++) {
            if (!a->ia3[i]) continue;
            const ds_proj p = (ds_proj)(i % DS_PROJ_COUNT);
            const size_t len = (size_t)(a->ia3_is_input[p] ? a->proj_in[p] : a->proj_out[p]);
            if (!(d->ia3[i] = dev_copy(b, d, a->ia3[i], len))) return DS_EDEVICE;
        }
    }
    if (a->n_virtual > 0 && a->prompt) {
        if (!(d->prompt_rows = calloc((size_t)a->n_virtual, sizeof *d->prompt_rows))) return DS_ENOMEM;
        float *rows = dev_copy(b, d, a->prompt, (size_t)a->n_virtual * a->d_model);
        if (!rows) return DS_EDEVICE;
        for (int32_t i = 0; i < a->n_virtual; i++) d->prompt_rows[i] = rows + (size_t)i * a->d_model;
    }
    return DS_OK;
}

/* The optional backend op an adapter needs and the backend lacks, or NULL: checked before the
 * adapter becomes resident, so a backend without an op refuses the adapter's requests with a clear
 * error instead of failing a forward pass shared with other requests. */
static const char *missing_op(const struct ds_backend_iface *f, const ds_adapter *a) {
    bool lora = a->lm_head != NULL, dora = false, bias = false, ia3 = a->ia3 != NULL;
    for (size_t i = 0; a->lora && i < (size_t)a->n_layer * DS_PROJ_COUNT; i++)
        if (a->lora[i]) {
            lora = true;
            dora |= a->lora[i]->dora_scale != NULL;
            bias |= a->lora[i]->bias_B != NULL;
        }
    if (lora && !f->lora) return "lora (segmented LoRA)";
    if (a->embed && !f->lora_expand) return "lora_expand (LoRA on embed_tokens)";
    if ((dora || ia3) && !f->seg_scale) return "seg_scale (DoRA / IA3)";
    if (bias && !f->seg_add) return "seg_add (lora_bias)";
    if (a->prompt && !f->set_rows) return "set_rows (prompt tuning)";
    if (a->bn && !f->bottleneck) return "bottleneck (bottleneck adapters)";
    if (a->delta && !f->sparse) return "sparse (sparse delta adapters)";
    if (a->dbias && !f->seg_add) return "seg_add (bias deltas)";
    return NULL;
}

int ds_adapter_dev_upload(ds_backend *b, const ds_adapter *a, ds_adapter_dev *out, ds_err *err) {
    memset(out, 0, sizeof *out);
    out->host = a;
    const char *op = missing_op(b->iface, a);
    if (op)
        return ds_err_set(err, DS_EUNSUPPORTED, "adapter '%s' needs the %s op, which the %s backend does not have yet",
                          a->name ? a->name : "?", op, b->iface->name);
    int st = upload_all(b, a, out);
    if (st) {
        ds_adapter_dev_release(b, out);
        return ds_err_set(err, st, "adapter '%s': upload to the %s backend failed (%s)", a->name ? a->name : "?",
                          b->iface->name, ds_strerror(st));
    }
    return DS_OK;
}

void ds_adapter_dev_release(ds_backend *b, ds_adapter_dev *d) {
    for (size_t i = 0; i < d->n_allocs; i++) b->iface->release(b->ctx, d->allocs[i]);
    free(d->allocs);
    free(d->lora);
    free(d->ia3);
    free(d->prompt_rows);
    free(d->bn);
    free(d->delta);
    free(d->dbias);
    memset(d, 0, sizeof *d);
}
