/* Model configuration checks and RoPE inverse frequencies (shared by both loaders). */
#include "ds/model.h"

#include <math.h>

/* Upper bounds far above any supported model; they keep every size product well inside size_t and
 * stop a corrupt config from driving a huge allocation before the tensor shapes are checked. */
#define MAX_VOCAB (1 << 22)
#define MAX_DMODEL (1 << 16)
#define MAX_LAYER DS_MODEL_MAX_LAYER
#define MAX_HEAD 1024
#define MAX_HEAD_DIM 1024
#define MAX_DFF (1 << 20)
#define MAX_CTX (1 << 24)

static int check_int(const char *source, const char *field, int32_t v, int32_t hi, ds_err *err) {
    if (v <= 0 || v > hi)
        return ds_err_set(err, DS_EFORMAT, "%s: config %s = %d is out of range (1..%d)", source, field, v, hi);
    return 0;
}

static int check_pos_float(const char *source, const char *field, float v, ds_err *err) {
    if (!(isfinite(v) && v > 0))
        return ds_err_set(err, DS_EFORMAT, "%s: config %s = %g must be a positive finite number", source, field, v);
    return 0;
}

static int check_sizes(const ds_model_config *c, const char *src, ds_err *err) {
    int rc;
    if ((rc = check_int(src, "vocab size", c->n_vocab, MAX_VOCAB, err))) return rc;
    if ((rc = check_int(src, "hidden_size", c->d_model, MAX_DMODEL, err))) return rc;
    if ((rc = check_int(src, "num_hidden_layers", c->n_layer, MAX_LAYER, err))) return rc;
    if ((rc = check_int(src, "num_attention_heads", c->n_head, MAX_HEAD, err))) return rc;
    if ((rc = check_int(src, "num_key_value_heads", c->n_kv_head, MAX_HEAD, err))) return rc;
    if ((rc = check_int(src, "intermediate_size", c->d_ff, MAX_DFF, err))) return rc;
    if ((rc = check_int(src, "max_position_embeddings", c->max_ctx, MAX_CTX, err))) return rc;
    return check_int(src, "head_dim", c->head_dim, MAX_HEAD_DIM, err);
}

static int check_rope(const ds_model_config *c, const char *src, ds_err *err) {
    int rc = check_pos_float(src, "rope_theta", c->rope_theta, err);
    if (!rc && c->rope_theta_swa != 0) rc = check_pos_float(src, "rope_local_base_freq", c->rope_theta_swa, err);
    if (rc || c->rope_scaling == DS_ROPE_SCALING_NONE) return rc;
    if (c->rope_scaling == DS_ROPE_SCALING_LINEAR) return check_pos_float(src, "rope_scaling.factor", c->rope_factor, err);
    if (c->rope_scaling != DS_ROPE_SCALING_LLAMA3)
        return ds_err_set(err, DS_EUNSUPPORTED, "%s: unknown rope scaling %d", src, (int)c->rope_scaling);
    if ((rc = check_pos_float(src, "rope_scaling.factor", c->rope_factor, err))) return rc;
    if ((rc = check_pos_float(src, "rope_scaling.low_freq_factor", c->rope_low_freq_factor, err))) return rc;
    if ((rc = check_pos_float(src, "rope_scaling.high_freq_factor", c->rope_high_freq_factor, err))) return rc;
    if (!(c->rope_high_freq_factor > c->rope_low_freq_factor))
        return ds_err_set(err, DS_EFORMAT, "%s: rope_scaling.high_freq_factor (%g) must exceed low_freq_factor (%g)", src,
                          c->rope_high_freq_factor, c->rope_low_freq_factor);
    return check_int(src, "rope_scaling.original_max_position_embeddings", c->rope_orig_ctx, MAX_CTX, err);
}

int ds_model_config_validate(ds_model_config *cfg, const char *source, ds_err *err) {
    if (!source) source = "model";
    if (cfg->n_kv_head == 0) cfg->n_kv_head = cfg->n_head; /* HF: num_key_value_heads defaults to heads */
    if (cfg->head_dim == 0 && cfg->n_head > 0) {
        if (cfg->d_model % cfg->n_head)
            return ds_err_set(err, DS_EFORMAT, "%s: hidden_size %d is not divisible by num_attention_heads %d", source,
                              cfg->d_model, cfg->n_head);
        cfg->head_dim = cfg->d_model / cfg->n_head;
    }
    int rc = check_sizes(cfg, source, err);
    if (rc) return rc;
    if (cfg->n_head % cfg->n_kv_head)
        return ds_err_set(err, DS_EFORMAT, "%s: num_attention_heads %d is not a multiple of num_key_value_heads %d",
                          source, cfg->n_head, cfg->n_kv_head);
    if (cfg->head_dim % 2)
        return ds_err_set(err, DS_EFORMAT, "%s: head_dim %d must be even for RoPE", source, cfg->head_dim);
    if (cfg->n_rot == cfg->head_dim) cfg->n_rot = 0;
    if (cfg->n_rot && (cfg->n_rot < 2 || cfg->n_rot > cfg->head_dim || cfg->n_rot % 2))
        return ds_err_set(err, DS_EFORMAT, "%s: rotary dimensions %d must be even and within head_dim %d", source,
                          cfg->n_rot, cfg->head_dim);
    if ((int64_t)cfg->n_head * cfg->head_dim > MAX_DMODEL)
        return ds_err_set(err, DS_EFORMAT, "%s: num_attention_heads * head_dim = %lld is too large", source,
                          (long long)cfg->n_head * cfg->head_dim);
    if ((rc = check_pos_float(source, "rms_norm_eps", cfg->rms_eps, err))) return rc;
    if (!(isfinite(cfg->attn_scale) && cfg->attn_scale >= 0) || !(isfinite(cfg->final_softcap) && cfg->final_softcap >= 0) ||
        !(isfinite(cfg->embed_scale) && cfg->embed_scale >= 0))
        return ds_err_set(err, DS_EFORMAT, "%s: attention scale, logit soft-cap and embedding scale must be finite and "
                          "not negative", source);
    return check_rope(cfg, source, err);
}

/* fp32 exactly as transformers computes it (torch float32 ops, evaluated in the same order):
 *   default:  inv_freq[i] = 1 / theta^(2i/d)           (_compute_default_rope_parameters)
 *   llama3:   wavelen = 2π / inv_freq;  wavelen > orig/low → inv_freq/factor;  wavelen < orig/high →
 *             unchanged;  else s = (orig/wavelen − low)/(high − low),
 *             inv_freq·(1−s)/factor + s·inv_freq      (_compute_llama3_parameters)
 * torch evaluates `scalar / tensor` as reciprocal(tensor) * scalar and rounds Python scalars to
 * float; theta^e is taken in double and rounded, i.e. correctly rounded like torch's pow. */
void ds_rope_inv_freq(const ds_model_config *cfg, float *inv_freq) {
    const int d = cfg->n_rot ? cfg->n_rot : cfg->head_dim; /* partial rotary: dim = n_rot, as HF */
    for (int i = 0; i < d / 2; i++) {
        const float e = (float)(2 * i) / (float)d;
        const float p = (float)pow((double)cfg->rope_theta, (double)e);
        inv_freq[i] = 1.0f / p;
    }
    if (cfg->rope_scaling == DS_ROPE_SCALING_LINEAR) { /* _compute_linear_scaling_rope_parameters */
        for (int i = 0; i < d / 2; i++) inv_freq[i] /= cfg->rope_factor;
        return;
    }
    if (cfg->rope_scaling != DS_ROPE_SCALING_LLAMA3) return;
    const double orig = cfg->rope_orig_ctx, low = cfg->rope_low_freq_factor, high = cfg->rope_high_freq_factor;
    const float factor = cfg->rope_factor;
    const float low_wl = (float)(orig / low), high_wl = (float)(orig / high);
    const float two_pi = (float)(2.0 * M_PI);
    for (int i = 0; i < d / 2; i++) {
        const float f = inv_freq[i];
        const float wavelen = (1.0f / f) * two_pi;
        if (wavelen > low_wl) {
            inv_freq[i] = f / factor;
        } else if (!(wavelen < high_wl)) {
            const float s = ((1.0f / wavelen) * (float)orig - (float)low) / (float)(high - low);
            inv_freq[i] = (1.0f - s) * f / factor + s * f;
        }
    }
}

void ds_rope_inv_freq_swa(const ds_model_config *cfg, float *inv_freq) {
    ds_model_config local = *cfg;
    local.rope_theta = cfg->rope_theta_swa;
    local.rope_scaling = DS_ROPE_SCALING_NONE;
    ds_rope_inv_freq(&local, inv_freq);
}
