/* A training step: validate the examples, pack them into micro-batches, accumulate gradients of
 * the masked mean cross-entropy, then clip and apply AdamW. */
#include "train/train_internal.h"

#include <string.h>

/* HF labels of example e at real position i (labels == NULL: the tokens themselves). */
static int32_t label_at(const ds_train_example *e, int32_t i) { return e->labels ? e->labels[i] : e->tokens[i]; }

/* Labels that count. Row r of the sequence (P virtual rows first) predicts extended label r+1,
 * where the P virtual positions carry -100 (PEFT pads labels that way before HF's shift): real
 * position i counts when i + P >= 1 and its label is not ignored. */
static int64_t count_labels(const ds_train_example *e, int32_t P) {
    int64_t n = 0;
    for (int32_t i = P > 0 ? 0 : 1; i < e->n_tokens; i++) n += label_at(e, i) >= 0;
    return n;
}

static int check_example(const ds_trainer *t, const ds_train_example *e, int32_t k, ds_err *err) {
    const int32_t V = t->dim.V, rows = e->n_tokens + t->n_virtual;
    if (!e->tokens || e->n_tokens < 1) return ds_err_set(err, DS_EINVAL, "example %d: no tokens", k);
    if (rows > t->max_rows)
        return ds_err_set(err, DS_ERANGE, "example %d: %d tokens + %d virtual exceed micro_batch_tokens %d", k,
                          e->n_tokens, t->n_virtual, t->max_rows);
    if (t->n_prefix + rows > t->m->cfg.max_ctx)
        return ds_err_set(err, DS_ERANGE, "example %d: %d positions exceed the model context %d", k,
                          t->n_prefix + rows, t->m->cfg.max_ctx);
    for (int32_t i = 0; i < e->n_tokens; i++) {
        if (e->tokens[i] < 0 || e->tokens[i] >= V)
            return ds_err_set(err, DS_EINVAL, "example %d: token %d at position %d is outside the vocabulary (%d)", k,
                              e->tokens[i], i, V);
        const int32_t y = label_at(e, i);
        if ((y < 0 && y != DS_TRAIN_IGNORE_INDEX) || y >= V)
            return ds_err_set(err, DS_EINVAL, "example %d: label %d at position %d is neither -100 nor a token id", k,
                              y, i);
    }
    return 0;
}

int tr_check_batch(const ds_trainer *t, const ds_train_example *ex, int32_t n, int64_t *n_labels, ds_err *err) {
    if (!ex || n < 1) return ds_err_set(err, DS_EINVAL, "no training examples");
    *n_labels = 0;
    for (int32_t k = 0; k < n; k++) {
        int rc = check_example(t, &ex[k], k, err);
        if (rc) return rc;
        *n_labels += count_labels(&ex[k], t->n_virtual);
    }
    return *n_labels ? 0 : ds_err_set(err, DS_EINVAL, "the batch has no label token (every label is -100)");
}

/* Host staging (tr_batch.h_idx) of src, pos, lrow, ltgt. */
static int32_t *staged(ds_trainer *t, int i) { return t->b.h_idx + (size_t)i * (size_t)t->max_rows; }

static void add_seq(ds_trainer *t, const ds_train_example *e) {
    tr_batch *b = &t->b;
    int32_t *src = staged(t, 0), *pos = staged(t, 1), *lrow = staged(t, 2), *ltgt = staged(t, 3);
    const int32_t P = t->n_virtual, row0 = b->n_rows, len = P + e->n_tokens;
    b->seqs[b->n_seqs++] = (tr_attn_seq){.row0 = row0, .len = len};
    for (int32_t r = 0; r < len; r++) {
        src[row0 + r] = r < P ? -(r + 1) : e->tokens[r - P];
        pos[row0 + r] = t->n_prefix + r; /* prompt rows at 0..P-1; prefix: real tokens from P */
        if (r + 1 >= len || r + 1 < P) continue;
        const int32_t y = label_at(e, r + 1 - P);
        if (y < 0) continue;
        lrow[b->n_lrows] = row0 + r;
        ltgt[b->n_lrows++] = y;
    }
    b->n_rows += len;
}

/* Packs on the host, then uploads the four index arrays once for the micro-batch (a failure is
 * kept in t->op_rc like an op's). */
int32_t tr_pack(ds_trainer *t, const ds_train_example *ex, int32_t n, int32_t k) {
    tr_batch *b = &t->b;
    b->n_rows = b->n_seqs = b->n_lrows = 0;
    for (; k < n && b->n_seqs < t->max_seqs; k++) {
        if (b->n_seqs && b->n_rows + ex[k].n_tokens + t->n_virtual > t->max_rows) break;
        add_seq(t, &ex[k]);
    }
    int32_t *dev[4] = {b->src, b->pos, b->lrow, b->ltgt};
    const int32_t len[4] = {b->n_rows, b->n_rows, b->n_lrows, b->n_lrows};
    for (int i = 0; i < 4; i++)
        if (len[i])
            tr_op_note(t, t->be->iface->upload(t->be->ctx, dev[i], staged(t, i), (size_t)len[i] * sizeof(int32_t)));
    return k;
}

/* The whole-step calls: a step advanced unit by unit to its end (train_units.c). */
static int run_all(ds_trainer *t, ds_train_run what, const ds_train_example *ex, int32_t n, ds_train_stats *stats,
                   ds_err *err) {
    int rc = ds_trainer_begin(t, what, ex, n, err);
    if (rc) return rc;
    do rc = ds_trainer_advance(t, stats, err);
    while (rc == 1);
    return rc;
}

int ds_trainer_compute_grads(ds_trainer *t, const ds_train_example *ex, int32_t n, ds_train_stats *stats,
                             ds_err *err) {
    return run_all(t, DS_TRAIN_RUN_GRADS, ex, n, stats, err);
}

int ds_trainer_eval(ds_trainer *t, const ds_train_example *ex, int32_t n, ds_train_stats *stats, ds_err *err) {
    return run_all(t, DS_TRAIN_RUN_EVAL, ex, n, stats, err);
}

int tr_apply(ds_trainer *t, ds_train_stats *stats, ds_err *err) {
    t->op_rc = 0;
    const double norm = tr_grad_norm(t);
    int rc = tr_op_check(t, err);
    if (rc) return rc;
    if (norm != norm || norm > 1e30)
        return ds_err_set(err, DS_ERANGE, "gradient norm is not finite: update skipped");
    tr_clip(t, norm, t->p.max_grad_norm);
    const float lr = ds_train_lr_at(&t->p, t->step);
    tr_adamw(t, lr);
    if ((rc = tr_op_check(t, err))) return rc; /* the update may be partial */
    if (t->dp && (rc = tr_dp_sync(t))) return ds_err_set(err, rc, "out of memory fixing the diff-pruning mask");
    if (stats) {
        stats->grad_norm = norm;
        stats->lr = lr;
        stats->step = t->step;
    }
    return 0;
}

int ds_trainer_apply(ds_trainer *t, ds_train_stats *stats, ds_err *err) {
    if (t->run.phase) return ds_err_set(err, DS_EBUSY, "a training step is in progress");
    return tr_apply(t, stats, err);
}

int ds_trainer_step(ds_trainer *t, const ds_train_example *ex, int32_t n, ds_train_stats *stats, ds_err *err) {
    return run_all(t, DS_TRAIN_RUN_STEP, ex, n, stats, err);
}

/* ---- accessors ---- */

int32_t ds_trainer_n_tensors(const ds_trainer *t) { return t->n_params; }
const ds_train_tensor *ds_trainer_tensor(const ds_trainer *t, int32_t i) {
    return i >= 0 && i < t->n_params ? &t->params[i].pub : NULL;
}
const ds_adapter *ds_trainer_adapter(const ds_trainer *t) { return tr_resident_sync(t) ? NULL : t->ad; }
int64_t ds_trainer_steps_done(const ds_trainer *t) { return t->step; }

ds_adapter *ds_trainer_snapshot(const ds_trainer *t, const char *name, ds_err *err) {
    const int rc = tr_resident_sync(t); /* a publication: the host copy of the live parameters */
    if (rc) {
        ds_err_set(err, rc, "reading the adapter from backend '%s' failed", t->be->iface->name);
        return NULL;
    }
    if (t->dp) return tr_dp_snapshot(t, name, err); /* the dense δ as a sparse delta */
    return tr_adapter_clone(t->ad, name, err);
}

int ds_trainer_save(const ds_trainer *t, const char *dir, const char *base_model_name_or_path, ds_err *err) {
    const int rc = tr_resident_sync(t); /* a save: the host copy of the live parameters */
    if (rc) return ds_err_set(err, rc, "reading the adapter from backend '%s' failed", t->be->iface->name);
    if (t->dp) return tr_dp_save(t, dir, base_model_name_or_path, err); /* diff pruning: the sparse delta */
    if (t->ad->kind == DS_ADAPTER_DELTA) /* BitFit: deltaserve's delta format, not PEFT's */
        return ds_delta_save(t->ad, dir, base_model_name_or_path, "deltaserve training (BitFit)", err);
    if (t->ad->kind == DS_ADAPTER_BOTTLENECK) return ds_ah_save(t->ad, t->m, dir, base_model_name_or_path, err);
    ds_peft_save_params p = ds_peft_save_default_params();
    p.base_model_name_or_path = base_model_name_or_path;
    p.use_rslora = t->rslora;
    p.lora_alpha = t->alpha;
    return ds_peft_save(t->ad, t->m, dir, &p, err);
}
