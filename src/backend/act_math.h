/* The activations of ds_act and the derivatives the trainer needs, written once for the host and
 * the device: C includes it (src/backend/act.c, src/backend/cpu/cpu_train_bn.c), nvcc too
 * (cuda/bottleneck.cu, cuda/train_ops.cu), where each function is __host__ __device__.
 *
 * The values are torch's: fp32 forward formulas as torch evaluates them, and for the six
 * activations bottleneck adapters train with, autograd's derivative evaluated in double
 * (relu' = [x > 0]; gelu' = Φ(x) + x·φ(x); gelu_tanh' from the tanh form; silu' = σ(x)(1 + x(1 − σ(x)));
 * tanh' = 1 − tanh²). */
#ifndef DS_BACKEND_ACT_MATH_H
#define DS_BACKEND_ACT_MATH_H

#include "ds/backend.h"

#include <math.h>
#include <stdbool.h>
#include <stdint.h>

#ifdef __CUDACC__
#define DS_ACT_FN static inline __host__ __device__
#else
#define DS_ACT_FN static inline
#endif

DS_ACT_FN float ds_act_f(int32_t a, float x) {
    switch (a) {
    case DS_ACT_IDENTITY: return x;
    case DS_ACT_RELU: return x > 0.0f ? x : 0.0f;
    case DS_ACT_RELU2: return x > 0.0f ? x * x : 0.0f;
    case DS_ACT_RELU6: return x < 0.0f ? 0.0f : x > 6.0f ? 6.0f : x;
    case DS_ACT_LEAKY_RELU: return x > 0.0f ? x : 0.01f * x;
    case DS_ACT_GELU: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case DS_ACT_GELU_10: {
        const float g = 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
        return g < -10.0f ? -10.0f : g > 10.0f ? 10.0f : g;
    }
    case DS_ACT_GELU_TANH: return 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
    case DS_ACT_GELU_FAST: return 0.5f * x * (1.0f + tanhf(x * 0.7978845608f * (1.0f + 0.044715f * x * x)));
    case DS_ACT_QUICK_GELU: return x / (1.0f + expf(-1.702f * x));
    case DS_ACT_SILU: return x / (1.0f + expf(-x));
    case DS_ACT_SIGMOID: return 1.0f / (1.0f + expf(-x));
    case DS_ACT_TANH: return tanhf(x);
    case DS_ACT_MISH: return x * tanhf(x > 20.0f ? x : log1pf(expf(x))); /* softplus threshold 20, as torch */
    case DS_ACT_LAPLACE: return 0.5f * (1.0f + erff((x - 0.707107f) / (0.282095f * 1.41421356237309505f)));
    default: return x;
    }
}

/* The activations a bottleneck adapter trains with (ds_act_grad covers these). */
DS_ACT_FN bool ds_act_trainable(int32_t a) {
    return a == DS_ACT_IDENTITY || a == DS_ACT_RELU || a == DS_ACT_GELU || a == DS_ACT_GELU_TANH ||
           a == DS_ACT_SILU || a == DS_ACT_TANH;
}

/* d act / dx at x, in double, for ds_act_trainable activations (identity: 1). */
DS_ACT_FN float ds_act_grad(int32_t a, float xf) {
    const double x = xf;
    switch (a) {
    case DS_ACT_RELU: return x > 0 ? 1.0f : 0.0f;
    case DS_ACT_GELU: return (float)(0.5 * (1.0 + erf(x * 0.7071067811865476)) + x * exp(-0.5 * x * x) * 0.3989422804014327);
    case DS_ACT_GELU_TANH: {
        const double k = 0.7978845608028654, inner = k * (x + 0.044715 * x * x * x), th = tanh(inner);
        return (float)(0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * k * (1.0 + 3.0 * 0.044715 * x * x));
    }
    case DS_ACT_SILU: {
        const double s = 1.0 / (1.0 + exp(-x));
        return (float)(s * (1.0 + x * (1.0 - s)));
    }
    case DS_ACT_TANH: {
        const double th = tanh(x);
        return (float)(1.0 - th * th);
    }
    default: return 1.0f;
    }
}

#endif
