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
 * The forward / backward use the training table's dense GEMMs (mm_nt, mm_nn, mm_tn); the mask is
 * applied by host loops over the trainer's buffers, which are host memory (ds_train_params.backend:
 * host-memory backends only). */
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
    unsigned char *mask;  /* [n] 1 = trained after the warm-up; NULL until the mask is fixed */
} dp_mod;

struct tr_dp {
    float density;
    int32_t warmup;
    bool masked;
    dp_mod *mod; /* [L·DS_PROJ_COUNT]; n = 0 where a projection is not a target */
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

/* Fixes every module's mask from the current δ (once, when the warm-up is over). */
static int fix_mask(ds_trainer *t) {
    struct tr_dp *dp = t->dp;
    size_t max_n = 0;
    for (size_t i = 0; i < (size_t)t->dim.L * DS_PROJ_COUNT; i++) max_n = dp->mod[i].n > max_n ? dp->mod[i].n : max_n;
    float *scratch = malloc((max_n ? max_n : 1) * sizeof *scratch);
    if (!scratch) return DS_ENOMEM;
    int rc = 0;
    for (size_t i = 0; !rc && i < (size_t)t->dim.L * DS_PROJ_COUNT; i++) {
        dp_mod *d = &dp->mod[i];
        if (!d->n) continue;
        if (!(d->mask = malloc(d->n))) {
            rc = DS_ENOMEM;
            break;
        }
        ds_delta_select_top(d->w, d->n, dp->density, scratch, d->mask);
        for (size_t k = 0; k < d->n; k++)
            if (!d->mask[k]) d->w[k] = d->m[k] = d->v[k] = d->g[k] = 0.0f;
    }
    free(scratch);
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
    if (d->mask)
        for (size_t k = 0; k < d->n; k++)
            if (!d->mask[k]) d->g[k] = 0.0f;
}

/* ---- publishing: the sparse delta ---- */

static ds_delta_module *to_csr(const dp_mod *d, const unsigned char *keep) {
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
            c->val[e++] = d->w[k];
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
    size_t max_n = 0;
    for (size_t i = 0; i < n_slots; i++) max_n = dp->mod[i].n > max_n ? dp->mod[i].n : max_n;
    unsigned char *keep = dp->masked ? NULL : malloc(max_n ? max_n : 1);
    float *scratch = dp->masked ? NULL : malloc((max_n ? max_n : 1) * sizeof *scratch);
    int rc = (!dp->masked && (!keep || !scratch)) || !(a->delta = calloc(n_slots, sizeof *a->delta)) ? DS_ENOMEM : 0;
    for (size_t i = 0; !rc && i < n_slots; i++) {
        const dp_mod *d = &dp->mod[i];
        if (!d->n) continue;
        if (!dp->masked) ds_delta_select_top(d->w, d->n, dp->density, scratch, keep); /* still in the warm-up */
        const unsigned char *kept = dp->masked ? d->mask : keep;
        size_t nnz = 0;
        for (size_t k = 0; k < d->n; k++) nnz += kept[k] != 0;
        if (nnz && !(a->delta[i] = to_csr(d, kept))) rc = DS_ENOMEM;
        else if (nnz) a->host_bytes += ds_delta_module_bytes(a->delta[i]);
    }
    free(keep), free(scratch);
    if (rc) {
        ds_adapter_free(a);
        ds_err_set(err, DS_ENOMEM, "out of memory building the sparse delta");
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
