/* A training step in bounded units (include/ds/train.h, "A step in bounded units"): the state
 * machine that co-serving advances one unit between two inference steps, and that the whole-step
 * calls (train_step.c) run to the end. Every unit calls the same pieces the whole step is made of
 * (tr_forward_pieces, tr_head_rows, tr_backward_piece: the per-layer functions of train_forward.c
 * and train_backward.c, half a layer at a time), in the same order, so a step's results do not
 * depend on how it was cut. */
#include "train/train_internal.h"

#include <math.h>

/* Exponential average of a measured per-row time (first sample taken as is). */
static void ema(double *avg, double sample) { *avg = *avg > 0 ? 0.7 * *avg + 0.3 * sample : sample; }

/* How many pieces costing `each` seconds fit the unit target: at least 1, at most `left`. Before
 * anything was measured (each 0) a unit takes one piece. */
static int32_t fit(const ds_trainer *t, double each, int32_t left) {
    if (left <= 1 || !(each > 0) || !(t->unit_seconds > 0)) return left < 1 ? left : 1;
    const double k = floor(t->unit_seconds / each);
    return k < 1 ? 1 : k >= left ? left : (int32_t)k;
}

int ds_trainer_begin(ds_trainer *t, ds_train_run what, const ds_train_example *ex, int32_t n, ds_err *err) {
    if (t->run.phase) return ds_err_set(err, DS_EBUSY, "a training step is already in progress");
    if ((unsigned)what > DS_TRAIN_RUN_EVAL) return ds_err_set(err, DS_EINVAL, "unknown step kind %d", (int)what);
    int64_t n_labels;
    int rc = tr_check_batch(t, ex, n, &n_labels, err);
    if (rc) return rc;
    tr_run *r = &t->run;
    const double s_fwd = r->s_fwd, s_bwd = r->s_bwd, s_head = r->s_head; /* measurements carry over */
    *r = (tr_run){.phase = TR_PH_FWD, .what = what, .ex = ex, .n = n, .n_labels = n_labels,
                  .scale = (float)(1.0 / (double)n_labels), .t0 = ds_time_s(), .s_fwd = s_fwd, .s_bwd = s_bwd,
                  .s_head = s_head};
    t->op_rc = 0;
    if (what != DS_TRAIN_RUN_EVAL) tr_params_zero_grad(t); /* a failure shows at the first advance */
    return 0;
}

void ds_trainer_abort(ds_trainer *t) {
    t->run.phase = TR_PH_IDLE;
    t->run.ex = NULL;
}

bool ds_trainer_busy(const ds_trainer *t) { return t->run.phase != TR_PH_IDLE; }

void ds_trainer_set_unit_target(ds_trainer *t, double seconds) { t->unit_seconds = seconds; }

/* Forward unit: pack the next micro-batch and embed it when starting one, then some half layers. */
static void unit_fwd(ds_trainer *t, bool grad) {
    tr_run *r = &t->run;
    if (r->piece == 0) {
        r->next_ex = tr_pack(t, r->ex, r->n, r->next_ex);
        tr_forward_embed(t);
    }
    const int32_t rows = t->b.n_rows;
    const int32_t n_pieces = 2 * t->dim.L, k = fit(t, r->s_fwd * rows, n_pieces - r->piece);
    const double t0 = ds_time_s();
    tr_forward_pieces(t, r->piece, r->piece + k, grad);
    if (k > 0) ema(&r->s_fwd, (ds_time_s() - t0) / ((double)k * rows));
    r->piece += k;
    if (r->piece < n_pieces) return;
    r->phase = TR_PH_HEAD;
    r->head_row = 0;
    r->mb_loss = 0.0;
    tr_head_begin(t, grad);
}

/* Head unit: the LM head and loss of some chunks of label rows. */
static void unit_head(ds_trainer *t, bool grad) {
    tr_run *r = &t->run;
    const int32_t left = t->b.n_lrows - r->head_row;
    const int32_t C = t->head_rows, chunks = fit(t, r->s_head * C, (left + C - 1) / C);
    const int32_t r1 = r->head_row + chunks * C < t->b.n_lrows ? r->head_row + chunks * C : t->b.n_lrows;
    const double t0 = ds_time_s();
    tr_head_rows(t, r->head_row, r1, r->scale, grad, &r->mb_loss);
    if (r1 > r->head_row) ema(&r->s_head, (ds_time_s() - t0) / (double)(r1 - r->head_row));
    r->head_row = r1;
    if (r->head_row < t->b.n_lrows) return;
    r->loss_sum += r->mb_loss; /* per micro-batch, as the whole step sums it */
    r->n_micro++;
    if (grad) {
        r->phase = TR_PH_BWD;
        r->low = tr_backward_low(t);
        r->piece = 0;
    } else {
        r->phase = r->next_ex < r->n ? TR_PH_FWD : TR_PH_IDLE;
        r->piece = 0;
    }
}

/* Backward unit: some pieces (tr_backward_piece) from the top layer down; the last one adds the
 * embedding gradients. */
static void unit_bwd(ds_trainer *t) {
    tr_run *r = &t->run;
    const int32_t rows = t->b.n_rows;
    const int32_t per = tr_backward_pieces_per_layer(t), n_pieces = per * (t->dim.L - r->low);
    const int32_t k = fit(t, r->s_bwd * rows, n_pieces - r->piece);
    const double t0 = ds_time_s();
    for (int32_t i = r->piece; i < r->piece + k; i++) tr_backward_piece(t, t->dim.L - 1 - i / per, r->low, i % per);
    if (k > 0) ema(&r->s_bwd, (ds_time_s() - t0) / ((double)k * rows));
    r->piece += k;
    if (r->piece < n_pieces) return;
    tr_backward_embed(t);
    r->piece = 0;
    r->phase = r->next_ex < r->n ? TR_PH_FWD : r->what == DS_TRAIN_RUN_STEP ? TR_PH_APPLY : TR_PH_IDLE;
}

static void finish_stats(ds_trainer *t, ds_train_stats *stats) {
    const tr_run *r = &t->run;
    if (!stats) return;
    const double lr = stats->lr, gn = stats->grad_norm;
    const int64_t step = stats->step;
    *stats = (ds_train_stats){.loss = r->loss_sum / (double)r->n_labels, .n_label_tokens = r->n_labels,
                              .n_micro_batches = r->n_micro, .step = t->step, .recompute = t->recompute,
                              .seconds = ds_time_s() - r->t0, .busy_seconds = r->busy, .n_units = r->n_units};
    if (r->what == DS_TRAIN_RUN_STEP) stats->lr = lr, stats->grad_norm = gn, stats->step = step;
}

int ds_trainer_advance(ds_trainer *t, ds_train_stats *stats, ds_err *err) {
    tr_run *r = &t->run;
    if (!r->phase) return ds_err_set(err, DS_EINVAL, "no training step in progress (ds_trainer_begin)");
    const double t0 = ds_time_s();
    const bool grad = r->what != DS_TRAIN_RUN_EVAL;
    int rc = 0;
    ds_train_stats upd = {0};
    switch (r->phase) {
    case TR_PH_FWD: unit_fwd(t, grad); break;
    case TR_PH_HEAD: unit_head(t, grad); break;
    case TR_PH_BWD: unit_bwd(t); break;
    case TR_PH_APPLY:
        rc = tr_apply(t, &upd, err);
        r->phase = TR_PH_IDLE;
        break;
    default: break;
    }
    r->n_units++;
    r->busy += ds_time_s() - t0;
    if (!rc) rc = tr_op_check(t, err);
    if (rc) {
        ds_trainer_abort(t);
        return rc;
    }
    if (r->phase) return 1;
    if (stats) {
        *stats = upd;
        finish_stats(t, stats);
    }
    r->ex = NULL;
    return 0;
}
