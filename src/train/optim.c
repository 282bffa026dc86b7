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

double tr_grad_norm(const ds_trainer *t) {
    double ss = 0.0;
    for (int32_t i = 0; i < t->n_params; i++) {
        const tr_param *p = &t->params[i];
        for (size_t j = 0; j < p->pub.n; j++) ss += (double)p->grad[j] * p->grad[j];
    }
    return sqrt(ss);
}

/* clip_coef = max_norm / (norm + 1e-6), applied when < 1. */
void tr_clip(ds_trainer *t, double norm, float max_norm) {
    if (!(max_norm > 0)) return;
    const double coef = max_norm / (norm + 1e-6);
    if (coef >= 1.0) return;
    for (int32_t i = 0; i < t->n_params; i++) {
        tr_param *p = &t->params[i];
        for (size_t j = 0; j < p->pub.n; j++) p->grad[j] = (float)(p->grad[j] * coef);
    }
}

/* Loshchilov & Hutter, decoupled weight decay, in torch's order:
 *   θ ← θ·(1 − lr·λ);  m ← m + (1−β₁)(g − m);  v ← β₂v + (1−β₂)g²
 *   θ ← θ − (lr / (1−β₁ᵗ)) · m / (sqrt(v)/sqrt(1−β₂ᵗ) + ε)                       (t = step, 1-based) */
void tr_adamw(ds_trainer *t, float lr) {
    const ds_train_params *o = &t->p;
    const double step = (double)(t->step + 1);
    const double bc1 = 1.0 - pow(o->beta1, step), bc2_sqrt = sqrt(1.0 - pow(o->beta2, step));
    const float step_size = (float)(lr / bc1), decay = (float)(1.0 - (double)lr * o->weight_decay);
    const float b1c = 1.0f - o->beta1, b2 = o->beta2, b2c = 1.0f - o->beta2, bc2s = (float)bc2_sqrt;
    for (int32_t i = 0; i < t->n_params; i++) {
        tr_param *p = &t->params[i];
        float *w = p->pub.value;
        for (size_t j = 0; j < p->pub.n; j++) {
            const float g = p->grad[j];
            if (o->weight_decay != 0) w[j] *= decay;
            p->m[j] += b1c * (g - p->m[j]);
            p->v[j] = p->v[j] * b2 + b2c * g * g;
            const float denom = sqrtf(p->v[j]) / bc2s + o->eps;
            w[j] -= step_size * (p->m[j] / denom);
        }
    }
    t->step++;
}
