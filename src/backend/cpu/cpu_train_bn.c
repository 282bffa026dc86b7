/* The CPU backend's training ops for bottleneck adapters (ds/backend_train.h bn_fwd / bn_bwd):
 * U(z) = s·(up·act(down·z + down_b) + up_b) as AdapterHub's Adapter computes it without its
 * LayerNorms (src/adapter/bottleneck.c has the full forward). Two OpenBLAS GEMMs each way; the
 * activation derivatives are torch's autograd formulas, evaluated in double (src/backend/act_math.h). */
#include "backend/act_math.h"
#include "backend/cpu/cpu_train.h"

#include <cblas.h>
#include <math.h>

static bool args_ok(const ds_train_bn_args *a) {
    return a && a->down && a->down_b && a->up && a->up_b && a->n >= 0 && a->d > 0 && a->size > 0 && ds_act_trainable(a->act);
}

int ds_cpu_train_bn_fwd(void *ctx, const ds_train_bn_args *a, const float *z, float *hpre, float *tmp, float *y) {
    (void)ctx;
    if (!args_ok(a)) return a && !ds_act_trainable(a->act) ? DS_EUNSUPPORTED : DS_EINVAL;
    const int32_t n = a->n, d = a->d, r = a->size;
    if (n == 0) return DS_OK;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, r, d, 1.0f, z, d, a->down, d, 0.0f, hpre, r);
    for (int32_t t = 0; t < n; t++)
        for (int32_t j = 0; j < r; j++) {
            float *h = &hpre[(size_t)t * r + j];
            *h += a->down_b[j];
            tmp[(size_t)t * r + j] = ds_act_eval((ds_act)a->act, *h);
        }
    /* y += s·act(h)·upᵀ + s·up_b */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, d, r, a->scale, tmp, r, a->up, r, 1.0f, y, d);
    for (int32_t t = 0; t < n; t++)
        for (int32_t i = 0; i < d; i++) y[(size_t)t * d + i] += a->scale * a->up_b[i];
    return DS_OK;
}

int ds_cpu_train_bn_bwd(void *ctx, const ds_train_bn_args *a, const float *z, const float *hpre, const float *dy,
                        float *dz, float *ddown, float *ddown_b, float *dup, float *dup_b, float *tmp) {
    (void)ctx;
    if (!args_ok(a)) return a && !ds_act_trainable(a->act) ? DS_EUNSUPPORTED : DS_EINVAL;
    const int32_t n = a->n, d = a->d, r = a->size;
    if (n == 0) return DS_OK;
    float *act = tmp, *dh = tmp + (size_t)n * r;
    for (size_t i = 0; i < (size_t)n * r; i++) act[i] = ds_act_eval((ds_act)a->act, hpre[i]);
    for (int32_t i = 0; i < d; i++) { /* Σₜ in double: the bias gradients are sums over every row */
        double s = 0.0;
        for (int32_t t = 0; t < n; t++) s += dy[(size_t)t * d + i];
        dup_b[i] += (float)(a->scale * s);
    }
    /* dup[d][r] += s·dyᵀ·act */
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d, r, n, a->scale, dy, d, act, r, 1.0f, dup, r);
    /* dh[n][r] = s·dy·up, then ⊙ act'(hpre) */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, r, d, a->scale, dy, d, a->up, r, 0.0f, dh, r);
    for (size_t i = 0; i < (size_t)n * r; i++) dh[i] *= ds_act_grad(a->act, hpre[i]);
    for (int32_t j = 0; j < r; j++) {
        double s = 0.0;
        for (int32_t t = 0; t < n; t++) s += dh[(size_t)t * r + j];
        ddown_b[j] += (float)s;
    }
    /* ddown[r][d] += dhᵀ·z; dz[n][d] = dh·down */
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r, d, n, 1.0f, dh, r, z, d, 1.0f, ddown, d);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, d, r, 1.0f, dh, r, a->down, d, 0.0f, dz, d);
    return DS_OK;
}
