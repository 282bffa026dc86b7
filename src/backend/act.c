/* The activations of ds_act on the host: the CPU backend's bottleneck op and the AdapterHub prefix
 * loader (src/adapter/ah_prefix.c) evaluate them
 * here (the CUDA backend has no bottleneck op yet). fp32, as torch. */
#include "ds/backend.h"

#include <math.h>

float ds_act_eval(ds_act a, float x) {
    switch (a) {
    case DS_ACT_IDENTITY: return x;
    case DS_ACT_RELU: return x > 0.0f ? x : 0.0f;
    case DS_ACT_RELU2: return x > 0.0f ? x * x : 0.0f;
    case DS_ACT_RELU6: return x < 0.0f ? 0.0f : x > 6.0f ? 6.0f : x;
    case DS_ACT_LEAKY_RELU: return x > 0.0f ? x : 0.01f * x;
    case DS_ACT_GELU: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case DS_ACT_GELU_10: {
        float g = 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
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
    }
    return x;
}
