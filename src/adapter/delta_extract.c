/* Delta extraction: a fully fine-tuned model minus its base, pruned per module to its largest
 * differences, written as a delta adapter (the format src/adapter/delta.c reads).
 *
 * Per projection weight: δ = tuned − base in fp32 (rows dequantised with ds_weight_row, so GGUF
 * quantised files of the same architecture work as well as HF directories); with --keep f,
 * k = min(ceil(f · numel − 1e-9), #nonzero) entries of largest |δ| are kept, ties broken by the
 * lower row-major index (tests/golden/gen_delta.py prunes the same way in numpy); with --threshold
 * T, every |δ| > T. Bias differences (q/k/v: the only projection biases a ds_model has) are kept
 * whole: they are O(rows). Tensors a delta adapter cannot carry (embeddings, norms, lm_head) are
 * compared and the largest difference reported, so a user sees what the delta leaves out. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapter/loader.h"
#include "util/durable.h"
#include "util/sb.h"
#include "util/status.h"

ds_delta_extract_params ds_delta_extract_default_params(void) {
    return (ds_delta_extract_params){.keep = 0.01, .threshold = 0.0, .base_name = NULL};
}

/* ---- the tensors to write ---- */

typedef struct out_tensor {
    char name[160];
    const char *dtype; /* "I32" or "F32" */
    int64_t n;         /* 1-D length */
    void *data;        /* owned */
} out_tensor;

typedef struct extract_ctx {
    out_tensor *t;
    size_t n, cap;
    ds_delta_extract_stats *st;
    ds_err *err;
} extract_ctx;

static int push(extract_ctx *c, const char *name, const char *dtype, int64_t n, void *data) {
    if (c->n == c->cap) {
        size_t cap = c->cap ? c->cap * 2 : 64;
        out_tensor *nt = realloc(c->t, cap * sizeof *nt);
        if (!nt) {
            free(data);
            return ds_err_set(c->err, DS_ENOMEM, "out of memory");
        }
        c->t = nt, c->cap = cap;
    }
    out_tensor *o = &c->t[c->n++];
    snprintf(o->name, sizeof o->name, "%s", name);
    o->dtype = dtype, o->n = n, o->data = data;
    return 0;
}

/* ---- selection ---- */

static void swapf(float *a, float *b) {
    float t = *a;
    *a = *b, *b = t;
}

/* The k-th largest value (k ≥ 1) of v[0..n), reordering v (Hoare quickselect, median of three). */
static float kth_largest(float *v, size_t n, size_t k) {
    size_t lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v[mid] > v[lo]) swapf(&v[mid], &v[lo]);
        if (v[hi] > v[lo]) swapf(&v[hi], &v[lo]);
        if (v[mid] > v[hi]) swapf(&v[mid], &v[hi]); /* v[hi] is now the median, descending order */
        const float p = v[hi];
        size_t i = lo;
        for (size_t j = lo; j < hi; j++)
            if (v[j] > p) swapf(&v[i++], &v[j]);
        swapf(&v[i], &v[hi]);
        if (i == want) return v[i];
        if (i < want) lo = i + 1;
        else hi = i - 1;
    }
    return v[lo];
}

/* Marks the kept entries of d[n] in keep[n]; returns how many. */
static int64_t select_entries(const float *d, size_t n, const ds_delta_extract_params *p, float *scratch,
                              unsigned char *keep) {
    size_t nz = 0;
    for (size_t i = 0; i < n; i++) nz += d[i] != 0.0f;
    memset(keep, 0, n);
    if (p->threshold > 0.0) {
        int64_t k = 0;
        for (size_t i = 0; i < n; i++) k += keep[i] = fabsf(d[i]) > p->threshold;
        return k;
    }
    double want = ceil(p->keep * (double)n - 1e-9);
    size_t k = want < 0 ? 0 : (size_t)want;
    if (k > nz) k = nz;
    if (k == 0) return 0;
    if (k == nz) {
        for (size_t i = 0; i < n; i++) keep[i] = d[i] != 0.0f;
        return (int64_t)k;
    }
    for (size_t i = 0; i < n; i++) scratch[i] = fabsf(d[i]);
    const float thr = kth_largest(scratch, n, k);
    size_t above = 0;
    for (size_t i = 0; i < n; i++) above += fabsf(d[i]) > thr;
    size_t ties = k - above; /* entries equal to thr, taken in row-major order */
    for (size_t i = 0; i < n; i++) {
        const float a = fabsf(d[i]);
        if (a > thr) keep[i] = 1;
        else if (a == thr && ties > 0) keep[i] = 1, ties--;
    }
    return (int64_t)k;
}

int64_t ds_delta_select_top(const float *d, size_t n, double fraction, float *scratch, unsigned char *keep) {
    const ds_delta_extract_params p = {.keep = fraction, .threshold = 0.0};
    return select_entries(d, n, &p, scratch, keep);
}

/* ---- per module ---- */

static void module_path(int32_t layer, int proj, char *buf, size_t cap) {
    snprintf(buf, cap, "model.layers.%d.%s.%s", layer, proj <= DS_PROJ_O ? "self_attn" : "mlp",
             ds_proj_name((ds_proj)proj));
}

static int extract_weight(extract_ctx *c, const ds_weight *wb, const ds_weight *wt, const char *mod,
                          const ds_delta_extract_params *p, float *d, float *row, float *scratch, unsigned char *keep) {
    const int32_t rows = wb->rows, cols = wb->cols;
    const size_t n = (size_t)rows * cols;
    for (int32_t r = 0; r < rows; r++) {
        DS_TRY(ds_weight_row(wb, r, row));
        DS_TRY(ds_weight_row(wt, r, d + (size_t)r * cols));
        for (int32_t j = 0; j < cols; j++) d[(size_t)r * cols + j] -= row[j];
    }
    const int64_t k = select_entries(d, n, p, scratch, keep);
    c->st->params += (int64_t)n;
    c->st->nnz += k;
    if (k == 0) return 0;
    int32_t *ptr = malloc(((size_t)rows + 1) * sizeof *ptr), *col = malloc((size_t)k * sizeof *col);
    float *val = malloc((size_t)k * sizeof *val);
    if (!ptr || !col || !val) {
        free(ptr), free(col), free(val);
        return ds_err_set(c->err, DS_ENOMEM, "out of memory");
    }
    int32_t e = 0;
    ptr[0] = 0;
    for (int32_t r = 0; r < rows; r++) {
        for (int32_t j = 0; j < cols; j++)
            if (keep[(size_t)r * cols + j]) col[e] = j, val[e++] = d[(size_t)r * cols + j];
        ptr[r + 1] = e;
    }
    char name[160];
    c->st->n_modules++;
    c->st->adapter_bytes += ((size_t)rows + 1) * 4 + (size_t)k * 8;
    snprintf(name, sizeof name, "%s.delta_indptr", mod);
    int rc = push(c, name, "I32", rows + 1, ptr);
    snprintf(name, sizeof name, "%s.delta_indices", mod);
    if (rc) free(col);
    else rc = push(c, name, "I32", k, col);
    snprintf(name, sizeof name, "%s.delta_values", mod);
    if (rc) free(val);
    else rc = push(c, name, "F32", k, val);
    return rc;
}

static int extract_bias(extract_ctx *c, const float *bb, const float *bt, int32_t n, const char *mod) {
    if (!bb && !bt) return 0;
    float *v = malloc((size_t)n * sizeof *v);
    if (!v) return ds_err_set(c->err, DS_ENOMEM, "out of memory");
    bool any = false;
    for (int32_t i = 0; i < n; i++) {
        v[i] = (bt ? bt[i] : 0.0f) - (bb ? bb[i] : 0.0f);
        any |= v[i] != 0.0f;
    }
    if (!any) {
        free(v);
        return 0;
    }
    char name[160];
    snprintf(name, sizeof name, "%s.bias_delta", mod);
    c->st->n_bias++;
    c->st->adapter_bytes += (size_t)n * 4;
    return push(c, name, "F32", n, v);
}

/* ---- what the delta cannot carry ---- */

static void note_vec(ds_delta_extract_stats *st, const char *what, const float *a, const float *b, int32_t n) {
    double mx = 0.0;
    for (int32_t i = 0; a && b && i < n; i++) mx = fmax(mx, fabs((double)a[i] - b[i]));
    if (mx > st->max_uncarried) {
        st->max_uncarried = mx;
        snprintf(st->uncarried, sizeof st->uncarried, "%s", what);
    }
}

static int note_mat(ds_delta_extract_stats *st, const char *what, const ds_weight *a, const ds_weight *b, float *ra,
                    float *rb) {
    double mx = 0.0;
    for (int32_t r = 0; r < a->rows; r++) {
        DS_TRY(ds_weight_row(a, r, ra));
        DS_TRY(ds_weight_row(b, r, rb));
        for (int32_t j = 0; j < a->cols; j++) mx = fmax(mx, fabs((double)ra[j] - rb[j]));
    }
    if (mx > st->max_uncarried) {
        st->max_uncarried = mx;
        snprintf(st->uncarried, sizeof st->uncarried, "%s", what);
    }
    return 0;
}

static int uncarried(const ds_model *b, const ds_model *t, ds_delta_extract_stats *st, float *ra, float *rb) {
    const ds_model_config *c = &b->cfg;
    DS_TRY(note_mat(st, "embed_tokens", &b->tok_embd, &t->tok_embd, ra, rb));
    if (!c->tied_embeddings) DS_TRY(note_mat(st, "lm_head", &b->output, &t->output, ra, rb));
    note_vec(st, "norm", b->output_norm, t->output_norm, c->d_model);
    for (int32_t l = 0; l < c->n_layer; l++) {
        const ds_layer_weights *x = &b->layers[l], *y = &t->layers[l];
        note_vec(st, "input_layernorm", x->attn_norm, y->attn_norm, c->d_model);
        note_vec(st, "post_attention_layernorm", x->ffn_norm, y->ffn_norm, c->d_model);
        note_vec(st, "q_norm", x->q_norm, y->q_norm, c->head_dim);
        note_vec(st, "k_norm", x->k_norm, y->k_norm, c->head_dim);
    }
    return 0;
}

/* ---- writing ---- */

/* adapter_model.safetensors from c's tensors, then adapter_config.json (base name, source text,
 * density; density < 0: none). */
static int write_files(extract_ctx *c, const char *base_name, const char *source, double density, const char *dir) {
    ds_err *err = c->err;
    DS_TRY(ds_durable_mkdir(dir, NULL, err));
    ds_sb h;
    ds_sb_init(&h);
    ds_sb_puts(&h, "{");
    size_t off = 0;
    for (size_t i = 0; i < c->n; i++) {
        const size_t bytes = (size_t)c->t[i].n * 4;
        ds_sb_printf(&h, "\"%s\":{\"dtype\":\"%s\",\"shape\":[%lld],\"data_offsets\":[%zu,%zu]},", c->t[i].name,
                     c->t[i].dtype, (long long)c->t[i].n, off, off + bytes);
        off += bytes;
    }
    ds_sb_puts(&h, "\"__metadata__\":{\"format\":\"pt\"}}");
    while (h.len % 8) ds_sb_puts(&h, " ");
    if (h.oom) {
        ds_sb_free(&h);
        return ds_err_set(err, DS_ENOMEM, "out of memory");
    }
    const uint64_t hlen = h.len;
    ds_iovec *parts = malloc((c->n + 2) * sizeof *parts);
    if (!parts) {
        ds_sb_free(&h);
        return ds_err_set(err, DS_ENOMEM, "out of memory");
    }
    parts[0] = (ds_iovec){&hlen, 8};
    parts[1] = (ds_iovec){h.data, h.len};
    for (size_t i = 0; i < c->n; i++) parts[i + 2] = (ds_iovec){c->t[i].data, (size_t)c->t[i].n * 4};
    int rc = ds_durable_write(dir, "adapter_model.safetensors", parts, (int)c->n + 2, err);
    c->st->file_bytes = 8 + h.len + off;
    free(parts);
    ds_sb_free(&h);
    if (rc) return rc;
    ds_sb j;
    ds_sb_init(&j);
    ds_sb_puts(&j, "{\n \"adapter_type\": \"delta\",\n \"version\": 1,\n \"base_model_name_or_path\": ");
    ds_sb_json_str(&j, base_name, strlen(base_name));
    ds_sb_puts(&j, ",\n \"target_modules\": [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", "
                   "\"up_proj\", \"down_proj\"],\n");
    if (density >= 0) ds_sb_printf(&j, " \"density\": %.9g,\n", density);
    ds_sb_puts(&j, " \"source\": ");
    ds_sb_json_str(&j, source, strlen(source));
    ds_sb_puts(&j, "\n}\n");
    if (j.oom) rc = ds_err_set(err, DS_ENOMEM, "out of memory");
    else rc = ds_durable_write(dir, "adapter_config.json", &(ds_iovec){j.data, j.len}, 1, err);
    ds_sb_free(&j);
    return rc;
}

static int check_same(const ds_model *b, const ds_model *t, ds_err *err) {
    const ds_model_config *x = &b->cfg, *y = &t->cfg;
    if (x->arch != y->arch || x->n_vocab != y->n_vocab || x->d_model != y->d_model || x->n_layer != y->n_layer ||
        x->n_head != y->n_head || x->n_kv_head != y->n_kv_head || x->head_dim != y->head_dim || x->d_ff != y->d_ff)
        return ds_err_set(err, DS_EINVAL,
                          "the tuned model is not the base's architecture (base %s: %d layers, d_model %d, d_ff %d, "
                          "vocab %d; tuned %s: %d layers, d_model %d, d_ff %d, vocab %d)",
                          x->arch_name, x->n_layer, x->d_model, x->d_ff, x->n_vocab, y->arch_name, y->n_layer,
                          y->d_model, y->d_ff, y->n_vocab);
    if (!b->weights_loaded || !t->weights_loaded) return ds_err_set(err, DS_EINVAL, "models loaded without weights");
    return 0;
}

int ds_delta_extract(const ds_model *base, const ds_model *tuned, const ds_delta_extract_params *params,
                     const char *out_dir, ds_delta_extract_stats *stats, ds_err *err) {
    ds_delta_extract_params p = params ? *params : ds_delta_extract_default_params();
    ds_delta_extract_stats local;
    ds_delta_extract_stats *st = stats ? stats : &local;
    memset(st, 0, sizeof *st);
    if (!(p.threshold > 0.0) && !(p.keep > 0.0 && p.keep <= 1.0))
        return ds_err_set(err, DS_EINVAL, "keep must be in (0, 100%%] or a positive threshold given");
    DS_TRY(check_same(base, tuned, err));
    const ds_model_config *cfg = &base->cfg;
    size_t max_n = 0, max_c = (size_t)cfg->d_model;
    for (int p2 = 0; p2 < DS_PROJ_COUNT; p2++) {
        const ds_weight *w = ds_adapter_base_weight(base, 0, p2);
        if ((size_t)w->rows * w->cols > max_n) max_n = (size_t)w->rows * w->cols;
        if ((size_t)w->cols > max_c) max_c = (size_t)w->cols;
    }
    extract_ctx c = {.st = st, .err = err};
    float *d = malloc(max_n * sizeof *d), *scratch = malloc(max_n * sizeof *scratch);
    float *ra = malloc(max_c * sizeof *ra), *rb = malloc(max_c * sizeof *rb);
    unsigned char *keep = malloc(max_n);
    int rc = d && scratch && ra && rb && keep ? 0 : ds_err_set(err, DS_ENOMEM, "out of memory");
    for (int32_t l = 0; !rc && l < cfg->n_layer; l++) {
        const ds_layer_weights *lb = &base->layers[l], *lt = &tuned->layers[l];
        const float *bb[DS_PROJ_COUNT] = {lb->bq, lb->bk, lb->bv}, *bt[DS_PROJ_COUNT] = {lt->bq, lt->bk, lt->bv};
        for (int pr = 0; !rc && pr < DS_PROJ_COUNT; pr++) {
            char mod[96];
            module_path(l, pr, mod, sizeof mod);
            const ds_weight *wb = ds_adapter_base_weight(base, l, pr), *wt = ds_adapter_base_weight(tuned, l, pr);
            rc = extract_weight(&c, wb, wt, mod, &p, d, ra, scratch, keep);
            if (!rc) rc = extract_bias(&c, bb[pr], bt[pr], wb->rows, mod);
        }
    }
    if (!rc) rc = uncarried(base, tuned, st, ra, rb);
    if (!rc && c.n == 0) rc = ds_err_set(err, DS_EINVAL, "the tuned model's projections equal the base's: no delta");
    char how[96];
    if (p.threshold > 0) snprintf(how, sizeof how, "deltaserve delta extract (threshold %g)", p.threshold);
    else snprintf(how, sizeof how, "deltaserve delta extract (keep %g%%)", p.keep * 100.0);
    if (!rc)
        rc = write_files(&c, p.base_name ? p.base_name : base->cfg.name, how,
                         st->params ? (double)st->nnz / (double)st->params : 0.0, out_dir);
    for (size_t i = 0; i < c.n; i++) free(c.t[i].data);
    free(c.t), free(d), free(scratch), free(ra), free(rb), free(keep);
    return rc;
}

static void *dup_bytes(const void *p, size_t n) {
    void *d = malloc(n ? n : 1);
    if (d) memcpy(d, p, n);
    return d;
}

int ds_delta_save(const ds_adapter *a, const char *dir, const char *base_name, const char *source, ds_err *err) {
    ds_delta_extract_stats st = {0};
    extract_ctx c = {.st = &st, .err = err};
    int rc = a->kind == DS_ADAPTER_DELTA && (a->delta || a->dbias)
                 ? 0
                 : ds_err_set(err, DS_EINVAL, "%s: not a delta adapter", a->name ? a->name : "?");
    for (size_t i = 0; !rc && i < (size_t)a->n_layer * DS_PROJ_COUNT; i++) {
        char mod[96], name[160];
        module_path((int32_t)(i / DS_PROJ_COUNT), (int)(i % DS_PROJ_COUNT), mod, sizeof mod);
        const ds_delta_module *m = a->delta ? a->delta[i] : NULL;
        if (m) {
            struct {
                const char *suffix, *dtype;
                int64_t n;
                const void *src;
            } parts[] = {{"delta_indptr", "I32", m->rows + 1, m->row_ptr},
                         {"delta_indices", "I32", m->nnz, m->col},
                         {"delta_values", "F32", m->nnz, m->val}};
            for (int k = 0; !rc && k < 3; k++) {
                void *copy = dup_bytes(parts[k].src, (size_t)parts[k].n * 4);
                snprintf(name, sizeof name, "%s.%s", mod, parts[k].suffix);
                rc = copy ? push(&c, name, parts[k].dtype, parts[k].n, copy) : ds_err_set(err, DS_ENOMEM, "out of memory");
            }
        }
        const int32_t out = a->proj_out[i % DS_PROJ_COUNT];
        if (!rc && a->dbias && a->dbias[i]) {
            void *copy = dup_bytes(a->dbias[i], (size_t)out * 4);
            snprintf(name, sizeof name, "%s.bias_delta", mod);
            rc = copy ? push(&c, name, "F32", out, copy) : ds_err_set(err, DS_ENOMEM, "out of memory");
        }
    }
    if (!rc) rc = write_files(&c, base_name ? base_name : "", source ? source : "deltaserve", -1.0, dir);
    for (size_t i = 0; i < c.n; i++) free(c.t[i].data);
    free(c.t);
    return rc;
}
