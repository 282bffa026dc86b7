/* Diff-pruning training (Guo et al. 2021, "Parameter-Efficient Transfer Learning with Diff
 * Pruning"), magnitude variant: the L0 / hard-concrete relaxation of the paper is not used.
 *
 *   1. Warm-up: a dense δ [out][in] on every target projection, zero at the start, trained for
 *      dp_warmup_steps optimizer steps: y = (W + δ)·x (+ b + b_δ when bias deltas train too).
 *   2. Then each module's mask is fixed once: its k = ceil(density·numel) largest |δ| (ties to the
 *      lower row-major index, zeros never kept: ds_delta_select_top, as extraction prunes). δ and
 *      its AdamW moments are zeroed outside the mask.
 *   3. Training goes on with the gradient zeroed outside the mask after every backward, so masked-
 *      out entries keep a zero gradient, zero moments and a zero value (AdamW moves nothing with
 *      g = m = v = 0, and decay of 0 is 0).
 *
 * The dense δ, its gradient and moments are parameters of the trainer's table (names
 * "<module>.weight_delta"), so the optimizer, clipping and the jobs' resumable state treat them like
 * any other tensor. A snapshot / save turns them into the sparse delta format (CSR, delta.c): the
 * mask's entries, or — before the mask is fixed — the top-k of the current δ.
 *
 * δ, its gradient and moments are backend buffers like every trainer buffer. The forward / backward
 * use the training table's dense GEMMs (mm_nt, mm_nn, mm_tn). The mask is chosen on the host from a
 * download of δ (once, when it is fixed, and for a snapshot / save); it is applied with backend ops:
 * the kept entries' indices are uploaded once, and "zero outside the mask" is gather the kept
 * entries, fill 0, scatter them back (gather_rows / fill / scatter_rows on rows of one float). */
#include "adapter/loader.h"
#include "train/train_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct dp_mod {
    int32_t out, in;
    size_t n;             /* out·in */
    float *w, *g, *m, *v; /* [out][in] δ, gradient, AdamW moments (trainer-owned) */
    unsigned char *mask;  /* [n] host: 1 = trained after the warm-up; NULL until the mask is fixed */
    int32_t *keep;        /* backend [nnz]: the indices where mask is 1, ascending */
    int32_t nnz;
} dp_mod;

struct tr_dp {
    float density;
    int32_t warmup;
    bool masked;
    dp_mod *mod; /* [L·DS_PROJ_COUNT]; n = 0 where a projection is not a target */
    float *kept; /* backend [max nnz]: the kept entries while the rest is cleared */
};

int tr_dp_check_spec(const ds_train_adapter_spec *s, ds_err *err) {
    if (!(s->density > 0 && s->density <= 1))
        return ds_err_set(err, DS_EINVAL, "diff pruning: density must be in (0, 1] (the fraction of entries kept)");
    if (s->dp_warmup_steps < 1)
        return ds_err_set(err, DS_EINVAL, "diff pruning: warmup_steps must be >= 1 (dense steps before the mask)");
    if (!s->targets || (s->targets & ~DS_TRAIN_TARGET_ALL_LINEAR))
        return ds_err_set(err, DS_EINVAL, "diff pruning targets: choose among q,k,v,o,gate,up,down_proj");
    return 0;
}

static int add_module(ds_trainer *t, dp_mod *d, int32_t l, int p) {
    d->out = t->ad->proj_out[p];
    d->in = t->ad->proj_in[p];
    d->n = (size_t)d->out * (size_t)d->in;
    d->w = tr_alloc(t, d->n), d->g = tr_alloc(t, d->n), d->m = tr_alloc(t, d->n), d->v = tr_alloc(t, d->n);
    if (!d->w || !d->g || !d->m || !d->v) return DS_ENOMEM;
    tr_param *q = &t->params[t->n_params++];
    memset(q, 0, sizeof *q);
    char path[96];
    tr_module_path(l, p, path, sizeof path);
    snprintf(q->name, sizeof q->name, "%s.weight_delta", path);
    q->grad = d->g, q->m = d->m, q->v = d->v;
    q->pub = (ds_train_tensor){.name = q->name, .n_dims = 2, .shape = {d->out, d->in}, .n = d->n, .value = d->w,
                               .grad = d->g};
    return 0;
}

int tr_dp_init(ds_trainer *t, const ds_train_adapter_spec *s, ds_err *err) {
    if (!(s->kind == DS_ADAPTER_DELTA && s->density > 0)) return 0;
    const int32_t L = t->dim.L;
    int32_t n_mod = 0;
    for (int p = 0; p < DS_PROJ_COUNT; p++) n_mod += (s->targets & DS_TRAIN_TARGET(p)) ? L : 0;
    struct tr_dp *dp = calloc(1, sizeof *dp);
    if (!dp || !(dp->mod = calloc((size_t)L * DS_PROJ_COUNT, sizeof *dp->mod)) || tr_params_grow(t, n_mod)) {
        if (dp) free(dp->mod);
        free(dp);
        return ds_err_set(err, DS_ENOMEM, "out of memory for the diff-pruning delta");
    }
    dp->density = s->density;
    dp->warmup = s->dp_warmup_steps;
    t->dp = dp;
    for (int32_t l = 0; l < L; l++)
        for (int p = 0; p < DS_PROJ_COUNT; p++)
            if ((s->targets & DS_TRAIN_TARGET(p)) && add_module(t, &dp->mod[(size_t)l * DS_PROJ_COUNT + p], l, p))
                return ds_err_set(err, DS_ENOMEM, "out of memory for the dense diff-pruning delta (%zu bytes each "
                                  "for values, gradients and two moments)",
                                  (size_t)t->ad->proj_out[p] * (size_t)t->ad->proj_in[p] * sizeof(float));
    return 0;
}

void tr_dp_free(ds_trainer *t) {
    if (!t->dp) return;
    for (size_t i = 0; i < (size_t)t->dim.L * DS_PROJ_COUNT; i++) free(t->dp->mod[i].mask);
    free(t->dp->mod);
    free(t->dp);
    t->dp = NULL;
}

static size_t max_module(const ds_trainer *t) {
    size_t max_n = 1;
    for (size_t i = 0; i < (size_t)t->dim.L * DS_PROJ_COUNT; i++)
        max_n = t->dp->mod[i].n > max_n ? t->dp->mod[i].n : max_n;
    return max_n;
}

/* x[k] = 0 where d's mask is 0, with backend ops (gather the kept entries, clear, scatter back). */
static void clear_outside(ds_trainer *t, const dp_mod *d, float *x) {
    if (d->nnz) TR_OP(t, gather_rows, x, d->keep, t->dp->kept, d->nnz, 1);
    TR_OP(t, fill, x, d->n, 0.0f);
    if (d->nnz) TR_OP(t, scatter_rows, t->dp->kept, d->keep, x, d->nnz, 1);
}

/* Module d's mask from δ downloaded into host (n floats; scratch n floats), its kept indices
 * uploaded (idx: n int32 of host staging). */
static int module_mask(ds_trainer *t, dp_mod *d, float *host, float *scratch, int32_t *idx) {
    int rc = t->be->iface->download(t->be->ctx, host, d->w, d->n * sizeof(float));
    if (rc || !(d->mask = malloc(d->n))) return rc ? rc : DS_ENOMEM;
    ds_delta_select_top(host, d->n, t->dp->density, scratch, d->mask);
    d->nnz = 0;
    for (size_t k = 0; k < d->n; k++)
        if (d->mask[k]) idx[d->nnz++] = (int32_t)k;
    if (!d->nnz) return 0;
    if (!(d->keep = tr_alloc_bytes(t, (size_t)d->nnz * sizeof(int32_t)))) return DS_ENOMEM;
    return t->be->iface->upload(t->be->ctx, d->keep, idx, (size_t)d->nnz * sizeof(int32_t));
}

/* Fixes every module's mask from the current δ (once, when the warm-up is over) and zeroes δ, its
 * moments and gradient outside it. */
static int fix_mask(ds_trainer *t) {
    struct tr_dp *dp = t->dp;
    const size_t max_n = max_module(t);
    float *host = malloc(max_n * sizeof *host), *scratch = malloc(max_n * sizeof *scratch);
    int32_t *idx = malloc(max_n * sizeof *idx);
    int rc = host && scratch && idx ? 0 : DS_ENOMEM;
    int32_t max_nnz = 1;
    for (size_t i = 0; !rc && i < (size_t)t->dim.L * DS_PROJ_COUNT; i++) {
        dp_mod *d = &dp->mod[i];
        if (d->n && !(rc = module_mask(t, d, host, scratch, idx))) max_nnz = d->nnz > max_nnz ? d->nnz : max_nnz;
    }
    free(host), free(scratch), free(idx);
    if (!rc && !(dp->kept = tr_alloc(t, (size_t)max_nnz))) rc = DS_ENOMEM;
    for (size_t i = 0; !rc && i < (size_t)t->dim.L * DS_PROJ_COUNT; i++) {
        const dp_mod *d = &dp->mod[i];
        if (!d->n) continue;
        float *x[4] = {d->w, d->m, d->v, d->g};
        for (int k = 0; k < 4; k++) clear_outside(t, d, x[k]);
    }
    if (!rc) dp->masked = true;
    return rc;
}

int tr_dp_sync(ds_trainer *t) {
    if (!t->dp || t->dp->masked || t->step < t->dp->warmup) return 0;
    return fix_mask(t);
}

bool tr_dp_masked(const ds_trainer *t) { return t->dp && t->dp->masked; }

void tr_dp_fwd(ds_trainer *t, int32_t l, int p, const float *x, float *y) {
    if (l < 0 || p >= DS_PROJ_COUNT) return;
    if (!t->dp->masked && t->step >= t->dp->warmup) tr_op_note(t, tr_dp_sync(t)); /* e.g. after a resume */
    const dp_mod *d = &t->dp->mod[(size_t)l * DS_PROJ_COUNT + p];
    if (d->n) TR_OP(t, mm_nt, x, d->w, y, t->b.n_rows, d->out, d->in, 1.0f, 1.0f); /* y += x·δᵀ */
}

void tr_dp_bwd(ds_trainer *t, int32_t l, int p, const float *x, const float *dy, float *dx) {
    if (l < 0 || p >= DS_PROJ_COUNT) return;
    dp_mod *d = &t->dp->mod[(size_t)l * DS_PROJ_COUNT + p];
    if (!d->n) return;
    const int32_t n = t->b.n_rows;
    if (dx) TR_OP(t, mm_nn, dy, d->w, dx, n, d->out, d->in, 1.0f, 1.0f); /* dx += dy·δ */
    TR_OP(t, mm_tn, dy, x, d->g, n, d->out, d->in, 1.0f, 1.0f);          /* dδ += dyᵀ·x */
    if (d->mask) clear_outside(t, d, d->g);
}

/* ---- publishing: the sparse delta ---- */

/* w: d's δ downloaded to the host. */
static ds_delta_module *to_csr(const dp_mod *d, const float *w, const unsigned char *keep) {
    size_t nnz = 0;
    for (size_t k = 0; k < d->n; k++) nnz += keep[k] != 0;
    if (!nnz) return NULL; /* an all-zero δ (no step yet): no module */
    ds_delta_module *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->rows = d->out, c->cols = d->in, c->nnz = (int64_t)nnz;
    c->row_ptr = malloc(((size_t)d->out + 1) * sizeof *c->row_ptr);
    c->col = malloc(nnz * sizeof *c->col);
    c->val = malloc(nnz * sizeof *c->val);
    if (!c->row_ptr || !c->col || !c->val) {
        ds_delta_module_free(c);
        return NULL;
    }
    size_t e = 0;
    c->row_ptr[0] = 0;
    for (int32_t r = 0; r < d->out; r++) {
        for (int32_t j = 0; j < d->in; j++) {
            const size_t k = (size_t)r * (size_t)d->in + (size_t)j;
            if (!keep[k]) continue;
            c->col[e] = j;
            c->val[e++] = w[k];
        }
        c->row_ptr[r + 1] = (int32_t)e;
    }
    return c;
}

ds_adapter *tr_dp_snapshot(const ds_trainer *t, const char *name, ds_err *err) {
    ds_adapter *a = tr_adapter_clone(t->ad, name, err);
    if (!a) return NULL;
    const struct tr_dp *dp = t->dp;
    const size_t n_slots = (size_t)t->dim.L * DS_PROJ_COUNT;
    const size_t max_n = max_module(t);
    unsigned char *keep = dp->masked ? NULL : malloc(max_n);
    float *scratch = dp->masked ? NULL : malloc(max_n * sizeof *scratch), *w = malloc(max_n * sizeof *w);
    int rc = (!dp->masked && (!keep || !scratch)) || !w || !(a->delta = calloc(n_slots, sizeof *a->delta))
                 ? DS_ENOMEM
                 : 0;
    for (size_t i = 0; !rc && i < n_slots; i++) {
        const dp_mod *d = &dp->mod[i];
        if (!d->n) continue;
        if ((rc = t->be->iface->download(t->be->ctx, w, d->w, d->n * sizeof(float)))) break; /* publication */
        if (!dp->masked) ds_delta_select_top(w, d->n, dp->density, scratch, keep); /* still in the warm-up */
        const unsigned char *kept = dp->masked ? d->mask : keep;
        size_t nnz = 0;
        for (size_t k = 0; k < d->n; k++) nnz += kept[k] != 0;
        if (nnz && !(a->delta[i] = to_csr(d, w, kept))) rc = DS_ENOMEM;
        else if (nnz) a->host_bytes += ds_delta_module_bytes(a->delta[i]);
    }
    free(keep), free(scratch), free(w);
    if (rc) {
        ds_adapter_free(a);
        ds_err_set(err, rc, rc == DS_ENOMEM ? "out of memory building the sparse delta"
                                            : "diff pruning: reading the delta from the backend failed");
        return NULL;
    }
    snprintf(a->peft_type, sizeof a->peft_type, "DELTA");
    return a;
}

int tr_dp_save(const ds_trainer *t, const char *dir, const char *base_model_name_or_path, ds_err *err) {
    ds_adapter *a = tr_dp_snapshot(t, NULL, err);
    if (!a) return DS_ENOMEM;
    char src[96];
    snprintf(src, sizeof src, "deltaserve training (diff pruning, density %g)", (double)t->dp->density);
    const int rc = ds_delta_save(a, dir, base_model_name_or_path, src, err);
    ds_adapter_free(a);
    return rc;
}
