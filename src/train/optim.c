/* AdamW (torch.optim.AdamW, single-tensor path), HF learning-rate schedules, clipping by global
 * L2 norm (torch.nn.utils.clip_grad_norm_). Optimizer state exists for adapter tensors only. */
#include "train/train_internal.h"

#include <math.h>

/* transformers.optimization: get_{constant,linear,cosine}_schedule_with_warmup as LambdaLR
 * multipliers of optimizer step k (the first step is k = 0, so warm-up starts at lr 0). */
float ds_train_lr_at(const ds_train_params *p, int64_t k) {
    const double w = p->warmup_steps > 0 ? p->warmup_steps : 0;
    double f;
    if (k < w) {
        f = (double)k / (w > 1 ? w : 1.0);
    } else if (p->schedule == DS_LR_CONSTANT || p->total_steps <= 0) {
        f = 1.0;
    } else {
        const double span = p->total_steps - w > 1 ? p->total_steps - w : 1.0;
        if (p->schedule == DS_LR_LINEAR) {
            f = (p->total_steps - (double)k) / span;
        } else { /* cosine, num_cycles = 0.5: 0.5·(1 + cos(π·progress)) */
            const double progress = ((double)k - w) / span;
            f = 0.5 * (1.0 + cos(3.141592653589793 * 2.0 * 0.5 * progress));
        }
        if (f < 0) f = 0;
    }
    return (float)(p->lr * f);
}

double tr_grad_norm(ds_trainer *t) {
    double ss = 0.0;
    for (int32_t i = 0; i < t->n_params; i++) TR_OP(t, sumsq, t->params[i].grad, t->params[i].pub.n, &ss);
    return sqrt(ss);
}

/* clip_coef = max_norm / (norm + 1e-6), applied when < 1. */
void tr_clip(ds_trainer *t, double norm, float max_norm) {
    if (!(max_norm > 0)) return;
    const double coef = max_norm / (norm + 1e-6);
    if (coef >= 1.0) return;
    for (int32_t i = 0; i < t->n_params; i++) TR_OP(t, scale, t->params[i].grad, t->params[i].pub.n, coef);
}

/* AdamW on every adapter tensor (the update itself: the backend's adamw op), then step + 1. */
void tr_adamw(ds_trainer *t, float lr) {
    const ds_train_params *o = &t->p;
    const ds_adamw_args a = {.lr = lr, .beta1 = o->beta1, .beta2 = o->beta2, .eps = o->eps,
                             .weight_decay = o->weight_decay, .step = t->step + 1};
    for (int32_t i = 0; i < t->n_params; i++) {
        tr_param *p = &t->params[i];
        TR_OP(t, adamw, p->pub.value, p->grad, p->m, p->v, p->pub.n, &a);
    }
    t->step++;
}
