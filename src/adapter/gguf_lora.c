/* llama.cpp GGUF LoRA adapters (llama.cpp convert_lora_to_gguf.py).
 *
 * Tensors `blk.N.<base>.weight.lora_a` (torch [r, in], GGUF ne = [in, r]) and `.lora_b` (torch
 * [out, r], ne = [r, out]); `output.weight.lora_*` is lm_head. scale = user_scale·α/r, or user_scale
 * when adapter.lora.alpha is missing or 0 (llama-adapter.cpp). The llama converter permutes the
 * ROWS of q/k lora_b exactly like the base Q/K weights; they are un-permuted here so every module is
 * in HF orientation, matching the base ds_model. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapter/loader.h"
#include "format/gguf.h"

typedef struct gctx {
    ds_gguf g;
    const char *path;
    const ds_model *base;
    ds_adapter *a;
    ds_err *err;
    float alpha, user_scale;
    bool permute;
    const ds_gguf_tensor *(*slots)[2]; /* [n_layer*DS_PROJ_COUNT + 1][lora_a, lora_b] */
    size_t n_slots;
} gctx;

static const char *const GGUF_NAMES[DS_PROJ_COUNT] = {"attn_q",   "attn_k", "attn_v",  "attn_output",
                                                      "ffn_gate", "ffn_up", "ffn_down"};

static int check_meta(gctx *c) {
    const char *type = NULL, *atype = NULL, *arch = NULL;
    int rc = ds_gguf_get_str(&c->g, "general.type", &type, c->err);
    if (rc == DS_ENOTFOUND)
        return ds_err_set(c->err, DS_EFORMAT, "%s: general.type is missing (not a GGUF LoRA adapter)", c->path);
    if (rc) return rc;
    if (strcmp(type, "adapter"))
        return ds_err_set(c->err, DS_EFORMAT, "%s: general.type = \"%.64s\", expected \"adapter\"", c->path, type);
    if ((rc = ds_gguf_get_str(&c->g, "adapter.type", &atype, c->err))) return rc;
    if (strcmp(atype, "lora"))
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: adapter.type = \"%.64s\" is not supported (lora)", c->path,
                          atype);
    if ((rc = ds_gguf_get_str(&c->g, "general.architecture", &arch, c->err))) return rc;
    const ds_model_config *m = &c->base->cfg;
    /* llama.cpp converts Mistral checkpoints as arch "llama"; the math is the same. */
    bool same = !strcmp(arch, m->arch_name) ||
                (!strcmp(arch, "llama") && (m->arch == DS_ARCH_LLAMA || m->arch == DS_ARCH_MISTRAL));
    if (!same)
        return ds_err_set(c->err, DS_EFORMAT, "%s: general.architecture = \"%.64s\" but the base model is \"%s\"",
                          c->path, arch, m->arch_name);
    if (m->fused_qkv) /* attn_qkv / ffn_up = gate_up: the split of peft_lora.c is not done here */
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: GGUF LoRA on a %s base (fused attn_qkv / ffn_up) is not "
                          "supported; load the PEFT directory instead", c->path, m->arch_name);
    /* as the base GGUF loader: only the llama converter (llama, mistral) permutes */
    c->permute = m->arch == DS_ARCH_LLAMA || m->arch == DS_ARCH_MISTRAL;
    if (ds_gguf_find_kv(&c->g, "adapter.alora.invocation_tokens"))
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: adapter.alora.invocation_tokens: aLoRA is not supported",
                          c->path);
    c->alpha = 0;
    rc = ds_gguf_get_f32(&c->g, "adapter.lora.alpha", &c->alpha, c->err);
    if (rc && rc != DS_ENOTFOUND) return rc;
    if (!isfinite(c->alpha))
        return ds_err_set(c->err, DS_EFORMAT, "%s: adapter.lora.alpha is not finite", c->path);
    return 0;
}

/* "blk.N.<name>.weight" → N (strict decimal: no sign, no leading zero) and "<name>.weight", or NULL. */
static const char *parse_blk(const char *s, int *layer) {
    if (strncmp(s, "blk.", 4)) return NULL;
    s += 4;
    if (*s < '0' || *s > '9' || (s[0] == '0' && s[1] != '.')) return NULL;
    long v = 0;
    for (int n = 0; *s >= '0' && *s <= '9'; s++, n++) {
        if (n == 9) return NULL;
        v = v * 10 + (*s - '0');
    }
    if (*s++ != '.') return NULL;
    size_t len = strlen(s);
    if (len <= 7 || strcmp(s + len - 7, ".weight")) return NULL;
    *layer = (int)v;
    return s;
}

/* "blk.N.<name>.weight.lora_a" / "output.weight.lora_b" → slot and which factor. */
static int place(gctx *c, const ds_gguf_tensor *t) {
    const char *n = t->name, *f = c->path;
    size_t len = strlen(n);
    int ab = len > 7 && !strcmp(n + len - 7, ".lora_a") ? 0 : len > 7 && !strcmp(n + len - 7, ".lora_b") ? 1 : -1;
    if (ab < 0) return ds_err_set(c->err, DS_EFORMAT, "%s: unknown tensor '%s'", f, n);
    char base[96];
    if (len - 7 >= sizeof base) return ds_err_set(c->err, DS_EFORMAT, "%s: unknown tensor '%.100s...'", f, n);
    memcpy(base, n, len - 7);
    base[len - 7] = 0;
    size_t slot = c->n_slots;
    if (!strcmp(base, "output.weight")) slot = c->n_slots - 1;
    if (!strcmp(base, "token_embd.weight"))
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: tensor '%s': LoRA on token_embd is not supported", f, n);
    int layer = -1;
    const char *name = parse_blk(base, &layer);
    if (slot == c->n_slots && name) {
        if (layer >= c->base->cfg.n_layer)
            return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s': layer %d, but the base model has %d layers", f, n,
                              layer, c->base->cfg.n_layer);
        size_t nl = strlen(name) - strlen(".weight");
        for (int p = 0; p < DS_PROJ_COUNT; p++)
            if (strlen(GGUF_NAMES[p]) == nl && !strncmp(name, GGUF_NAMES[p], nl))
                slot = (size_t)layer * DS_PROJ_COUNT + (size_t)p;
    }
    if (slot == c->n_slots)
        return ds_err_set(c->err, DS_EUNSUPPORTED, "%s: tensor '%s' targets a module deltaserve cannot adapt", f, n);
    if (c->slots[slot][ab]) return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' appears twice", f, n);
    c->slots[slot][ab] = t;
    return 0;
}

/* B rows, un-permuting q/k: GGUF row h·hd + 2i + j came from HF row h·hd + j·hd/2 + i (llama.cpp LlamaModel.permute). */
static int read_b(gctx *c, const ds_gguf_tensor *t, int proj, ds_lora_module *m) {
    int32_t hd = c->base->cfg.head_dim;
    bool perm = c->permute && (proj == DS_PROJ_Q || proj == DS_PROJ_K) && hd % 2 == 0;
    if (!perm) return ds_gguf_dequant(&c->g, t, m->B, (size_t)m->out * m->rank, c->err);
    for (int64_t r = 0; r < m->out; r++) {
        int64_t h = r / hd, w = r % hd, hf = h * hd + (w % 2) * (hd / 2) + w / 2;
        int rc = ds_gguf_dequant_rows(&c->g, t, (uint64_t)r, 1, m->B + (size_t)hf * m->rank, c->err);
        if (rc) return rc;
    }
    return 0;
}

static int check_finite(gctx *c, const ds_gguf_tensor *t, const float *v, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(v[i]))
            return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' holds a non-finite value", c->path, t->name);
    return 0;
}

static int load_slot(gctx *c, size_t slot) {
    const ds_gguf_tensor *ta = c->slots[slot][0], *tb = c->slots[slot][1];
    if (!ta || !tb)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' has no matching .lora_%c", c->path,
                          (ta ? ta : tb)->name, ta ? 'b' : 'a');
    bool lm = slot == c->n_slots - 1;
    int proj = lm ? DS_PROJ_COUNT : (int)(slot % DS_PROJ_COUNT);
    int32_t in, out;
    ds_adapter_base_dims(c->base, proj, &in, &out);
    uint64_t r = ta->ne[1], lim = (uint64_t)(in < out ? in : out);
    if (ta->n_dims > 2 || ta->ne[0] != (uint64_t)in || r < 1 || r > lim)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' must be torch [r, %d] with 1 <= r <= %llu", c->path,
                          ta->name, in, (unsigned long long)lim);
    if (tb->n_dims > 2 || tb->ne[0] != r || tb->ne[1] != (uint64_t)out)
        return ds_err_set(c->err, DS_EFORMAT, "%s: tensor '%s' must be torch [%d, %llu]", c->path, tb->name, out,
                          (unsigned long long)r);
    ds_lora_module *m = ds_lora_module_new((int32_t)r, in, out);
    if (!m) return ds_err_set(c->err, DS_ENOMEM, "%s: out of memory", c->path);
    m->scale = c->alpha != 0 ? c->user_scale * c->alpha / (float)r : c->user_scale;
    int rc = ds_gguf_dequant(&c->g, ta, m->A, (size_t)r * in, c->err);
    if (!rc) rc = read_b(c, tb, proj, m);
    if (!rc) rc = check_finite(c, ta, m->A, (size_t)r * in);
    if (!rc) rc = check_finite(c, tb, m->B, (size_t)r * out);
    if (rc) {
        ds_lora_module_free(m);
        return rc;
    }
    if (lm) c->a->lm_head = m;
    else c->a->lora[slot] = m;
    c->a->host_bytes += ds_lora_module_bytes(m);
    return 0;
}

static int load_all(gctx *c) {
    int rc = check_meta(c);
    if (!rc) rc = ds_adapter_alloc_lora_table(c->a, c->err);
    if (rc) return rc;
    c->n_slots = (size_t)c->base->cfg.n_layer * DS_PROJ_COUNT + 1;
    if (!(c->slots = calloc(c->n_slots, sizeof *c->slots))) return ds_err_set(c->err, DS_ENOMEM, "out of memory");
    for (size_t i = 0; i < c->g.n_tensors; i++)
        if ((rc = place(c, &c->g.tensors[i]))) return rc;
    size_t used = 0;
    for (size_t i = 0; i < c->n_slots; i++) {
        if (!c->slots[i][0] && !c->slots[i][1]) continue;
        if ((rc = load_slot(c, i))) return rc;
        used++;
    }
    if (!used) return ds_err_set(c->err, DS_EFORMAT, "%s: no LoRA tensors found", c->path);
    return 0;
}

int ds_gguf_lora_load(ds_adapter *a, const char *path, const ds_model *base, float user_scale, ds_err *err) {
    gctx c = {.path = path, .base = base, .a = a, .err = err, .user_scale = user_scale};
    int rc = ds_gguf_open(&c.g, path, err);
    if (rc) return rc;
    a->kind = DS_ADAPTER_LORA;
    snprintf(a->peft_type, sizeof a->peft_type, "GGUF_LORA");
    rc = load_all(&c);
    free(c.slots);
    ds_gguf_close(&c.g);
    return rc;
}
