/* A recording shim backend for tests (tests/unit/test_train_shim.c): every entry of the backend
 * interface and of its training table wraps the CPU backend, and the memory `alloc` hands out is
 * PROT_NONE whenever control is outside the backend. Allocations are page-aligned pieces of one
 * reserved mmap region (never reused: fresh pages are zero, as alloc promises); each call makes the
 * used part of the region readable and writable, runs the CPU op, and protects it again. So any
 * host dereference of backend memory by the caller is a SIGSEGV, and the calls are counted per
 * entry (with the bytes of upload / download). One thread. */
#ifndef DS_TEST_SHIM_BACKEND_H
#define DS_TEST_SHIM_BACKEND_H

#include "ds/backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define SHIM_REGION ((size_t)1 << 32) /* reserved address space, not memory */
#define SHIM_MAX_NAMES 64

typedef struct shim {
    ds_backend *inner;
    const struct ds_backend_iface *in;
    const struct ds_backend_train_iface *itr;
    char *base;
    size_t used, page;
    int depth;
    const char *names[SHIM_MAX_NAMES];
    long counts[SHIM_MAX_NAMES];
    size_t up_bytes, down_bytes;
} shim;

static shim *shim_enter(void *ctx, const char *name) {
    shim *s = ctx;
    int i = 0;
    while (i < SHIM_MAX_NAMES && s->names[i] && strcmp(s->names[i], name)) i++;
    if (i < SHIM_MAX_NAMES) {
        s->names[i] = name;
        s->counts[i]++;
    }
    if (s->depth++ == 0 && s->used && mprotect(s->base, s->used, PROT_READ | PROT_WRITE)) abort();
    return s;
}

static void shim_leave(shim *s) {
    if (--s->depth == 0 && s->used && mprotect(s->base, s->used, PROT_NONE)) abort();
}

/* Calls of entry `name` so far (0 if never). */
static long shim_count(const shim *s, const char *name) {
    for (int i = 0; i < SHIM_MAX_NAMES && s->names[i]; i++)
        if (!strcmp(s->names[i], name)) return s->counts[i];
    return 0;
}

static void shim_reset_counts(shim *s) {
    memset(s->counts, 0, sizeof s->counts);
    s->up_bytes = s->down_bytes = 0;
}

static bool shim_owns(const shim *s, const void *p) {
    return (const char *)p >= s->base && (const char *)p < s->base + s->used;
}

/* ---- memory ---- */

static void *sh_alloc(void *ctx, size_t bytes) {
    shim *s = shim_enter(ctx, "alloc");
    const size_t n = (bytes + s->page - 1) / s->page * s->page;
    void *p = NULL;
    if (n && n <= SHIM_REGION - s->used) { /* protected with the rest at leave */
        p = s->base + s->used;
        s->used += n;
        if (mprotect(p, n, PROT_READ | PROT_WRITE)) abort();
    }
    shim_leave(s);
    return p;
}

static void sh_release(void *ctx, void *ptr) {
    shim *s = shim_enter(ctx, "release");
    if (ptr && !shim_owns(s, ptr)) {
        fprintf(stderr, "shim: release of %p, not backend memory\n", ptr);
        abort();
    }
    shim_leave(s); /* pages are not reused: a use after release still faults or reads stale data */
}

#define SH_WRAP(ret, table, name, P, A)                                                                           \
    static ret sh_##name P {                                                                                       \
        shim *s = shim_enter(ctx, #name);                                                                          \
        const ret rc = s->table->name A;                                                                           \
        shim_leave(s);                                                                                             \
        return rc;                                                                                                 \
    }
#define SH_VOID(table, name, P, A)                                                                                 \
    static void sh_##name P {                                                                                      \
        shim *s = shim_enter(ctx, #name);                                                                          \
        s->table->name A;                                                                                          \
        shim_leave(s);                                                                                             \
    }

static int sh_upload(void *ctx, void *dst, const void *src, size_t bytes) {
    shim *s = shim_enter(ctx, "upload");
    s->up_bytes += bytes;
    const int rc = s->in->upload(s->inner->ctx, dst, src, bytes);
    shim_leave(s);
    return rc;
}
static int sh_download(void *ctx, void *dst, const void *src, size_t bytes) {
    shim *s = shim_enter(ctx, "download");
    s->down_bytes += bytes;
    const int rc = s->in->download(s->inner->ctx, dst, src, bytes);
    shim_leave(s);
    return rc;
}
SH_WRAP(int, in, synchronize, (void *ctx), (s->inner->ctx))
SH_WRAP(int, in, mat_upload, (void *ctx, const ds_weight *h, ds_mat *o), (s->inner->ctx, h, o))
SH_VOID(in, mat_free, (void *ctx, ds_mat *m), (s->inner->ctx, m))
SH_WRAP(int, in, matmul, (void *ctx, const float *x, const ds_mat *w, const float *b, float *y, int32_t n, bool acc),
        (s->inner->ctx, x, w, b, y, n, acc))
SH_WRAP(int, in, matmul_t, (void *ctx, const float *dy, const ds_mat *w, float *dx, int32_t n, bool acc),
        (s->inner->ctx, dy, w, dx, n, acc))
SH_WRAP(int, in, embed, (void *ctx, const ds_mat *e, const int32_t *ids, float *out, int32_t n),
        (s->inner->ctx, e, ids, out, n))
SH_WRAP(int, in, rmsnorm, (void *ctx, const float *x, const float *w, float *y, int32_t n, int32_t d, float eps),
        (s->inner->ctx, x, w, y, n, d, eps))
SH_WRAP(int, in, rope, (void *ctx, float *x, const int32_t *pos, const float *f, int32_t n, int32_t h, int32_t hd),
        (s->inner->ctx, x, pos, f, n, h, hd))
SH_WRAP(int, in, silu_mul, (void *ctx, const float *g, const float *u, float *o, size_t n), (s->inner->ctx, g, u, o, n))
SH_WRAP(int, in, add, (void *ctx, float *y, const float *x, size_t n), (s->inner->ctx, y, x, n))
SH_WRAP(int, in, get_rows, (void *ctx, const float *src, const int32_t *idx, float *dst, int32_t n, int32_t d),
        (s->inner->ctx, src, idx, dst, n, d))
SH_WRAP(int, in, kv_store,
        (void *ctx, float *kc, float *vc, const float *k, const float *v, const int64_t *slot, int32_t n, int32_t row),
        (s->inner->ctx, kc, vc, k, v, slot, n, row))
SH_WRAP(int, in, attention, (void *ctx, const ds_attn_args *a), (s->inner->ctx, a))
SH_WRAP(int, in, plan_upload, (void *ctx, const ds_seg_tables *t), (s->inner->ctx, t))
SH_WRAP(int, in, lora, (void *ctx, const float *x, int32_t in, float *y, int32_t out, ds_seg_range r),
        (s->inner->ctx, x, in, y, out, r))
SH_WRAP(int, in, seg_scale, (void *ctx, float *y, int32_t w, ds_seg_range r), (s->inner->ctx, y, w, r))
SH_WRAP(int, in, seg_add, (void *ctx, float *y, int32_t w, ds_seg_range r), (s->inner->ctx, y, w, r))
SH_WRAP(int, in, set_rows, (void *ctx, float *dst, int32_t w, const int32_t *rows, const float *const *src, int32_t n),
        (s->inner->ctx, dst, w, rows, src, n))
SH_WRAP(int, in, copy, (void *ctx, void *dst, const void *src, size_t bytes), (s->inner->ctx, dst, src, bytes))
SH_WRAP(int, in, lora_expand,
        (void *ctx, const float *t, int32_t r, const float *B, float *y, int32_t out, int32_t n, float sc),
        (s->inner->ctx, t, r, B, y, out, n, sc))
SH_WRAP(int, in, bottleneck, (void *ctx, const float *x, float *o, int32_t d, ds_seg_range r), (s->inner->ctx, x, o, d, r))
SH_WRAP(int, in, scale, (void *ctx, float *x, float f, size_t n), (s->inner->ctx, x, f, n))
SH_WRAP(int, in, gelu_tanh_mul, (void *ctx, const float *g, const float *u, float *o, size_t n), (s->inner->ctx, g, u, o, n))
SH_WRAP(int, in, sparse, (void *ctx, const float *x, int32_t in, float *y, int32_t out, ds_seg_range r),
        (s->inner->ctx, x, in, y, out, r))

/* ---- the training table (names prefixed t_ where they clash with the inference ops) ---- */
#define SH_T(name, P, A) SH_WRAP(int, itr, name, P, A)
SH_T(mm_nt, (void *ctx, const float *x, const float *w, float *y, int32_t n, int32_t m, int32_t k, float a, float b),
     (s->inner->ctx, x, w, y, n, m, k, a, b))
SH_T(mm_nn, (void *ctx, const float *dy, const float *w, float *dx, int32_t n, int32_t m, int32_t k, float a, float b),
     (s->inner->ctx, dy, w, dx, n, m, k, a, b))
SH_T(mm_tn, (void *ctx, const float *dy, const float *x, float *dw, int32_t n, int32_t m, int32_t k, float a, float b),
     (s->inner->ctx, dy, x, dw, n, m, k, a, b))
SH_T(add_bias, (void *ctx, float *y, const float *b, int32_t n, int32_t m), (s->inner->ctx, y, b, n, m))
SH_T(rmsnorm_fwd, (void *ctx, const float *x, const float *w, float *y, float *r, int32_t n, int32_t d, float eps),
     (s->inner->ctx, x, w, y, r, n, d, eps))
SH_T(rmsnorm_bwd, (void *ctx, const float *x, const float *w, const float *r, const float *dy, float *dx, int32_t n, int32_t d),
     (s->inner->ctx, x, w, r, dy, dx, n, d))
static int sh_train_rope(void *ctx, float *x, const int32_t *pos, const float *f, int32_t n, int32_t h, int32_t hd,
                         int sign) {
    shim *s = shim_enter(ctx, "train.rope");
    const int rc = s->itr->rope(s->inner->ctx, x, pos, f, n, h, hd, sign);
    shim_leave(s);
    return rc;
}
SH_T(silu_mul_fwd, (void *ctx, const float *g, const float *u, float *o, size_t n), (s->inner->ctx, g, u, o, n))
SH_T(silu_mul_bwd, (void *ctx, const float *g, const float *u, const float *d, float *dg, float *du, size_t n),
     (s->inner->ctx, g, u, d, dg, du, n))
SH_T(lora_fwd, (void *ctx, const float *x, const float *A, const float *B, float sc, float *u, float *y, int32_t n,
                int32_t in, int32_t out, int32_t r),
     (s->inner->ctx, x, A, B, sc, u, y, n, in, out, r))
SH_T(lora_bwd, (void *ctx, const float *x, const float *u, const float *A, const float *B, float sc, const float *dy,
                float *dx, float *dA, float *dB, float *tmp, int32_t n, int32_t in, int32_t out, int32_t r),
     (s->inner->ctx, x, u, A, B, sc, dy, dx, dA, dB, tmp, n, in, out, r))
static int sh_train_embed(void *ctx, const ds_mat *e, const float *soft, const int32_t *src, float *out, int32_t n,
                          int32_t d) {
    shim *s = shim_enter(ctx, "train.embed");
    const int rc = s->itr->embed(s->inner->ctx, e, soft, src, out, n, d);
    shim_leave(s);
    return rc;
}
SH_T(embed_bwd_soft, (void *ctx, const int32_t *src, const float *dx, float *ds, int32_t n, int32_t d),
     (s->inner->ctx, src, dx, ds, n, d))
SH_T(embed_lora_fwd, (void *ctx, const float *A_T, const float *B, float sc, const int32_t *src, float *u, float *y,
                      int32_t n, int32_t d, int32_t r),
     (s->inner->ctx, A_T, B, sc, src, u, y, n, d, r))
SH_T(embed_lora_bwd, (void *ctx, const float *B, float sc, const int32_t *src, const float *u, const float *dy,
                      float *dA_T, float *dB, float *tmp, int32_t n, int32_t d, int32_t r),
     (s->inner->ctx, B, sc, src, u, dy, dA_T, dB, tmp, n, d, r))
SH_T(cross_entropy, (void *ctx, float *lg, const int32_t *tg, int32_t n, int32_t V, float sc, bool g, double *loss),
     (s->inner->ctx, lg, tg, n, V, sc, g, loss))
SH_WRAP(size_t, itr, attn_work_floats, (void *ctx, int32_t max_len, int32_t np, int32_t hd), (s->inner->ctx, max_len, np, hd))
SH_T(attention_fwd, (void *ctx, const ds_train_attn_args *a), (s->inner->ctx, a))
SH_T(attention_bwd, (void *ctx, const ds_train_attn_args *a, const float *dout, float *dq, float *dk, float *dv,
                     float *dpk, float *dpv),
     (s->inner->ctx, a, dout, dq, dk, dv, dpk, dpv))
SH_T(sumsq, (void *ctx, const float *x, size_t n, double *out), (s->inner->ctx, x, n, out))
static int sh_train_scale(void *ctx, float *x, size_t n, double f) {
    shim *s = shim_enter(ctx, "train.scale");
    const int rc = s->itr->scale(s->inner->ctx, x, n, f);
    shim_leave(s);
    return rc;
}
SH_T(adamw, (void *ctx, float *w, const float *g, float *m, float *v, size_t n, const ds_adamw_args *a),
     (s->inner->ctx, w, g, m, v, n, a))
SH_T(bn_fwd, (void *ctx, const ds_train_bn_args *a, const float *z, float *h, float *tmp, float *y),
     (s->inner->ctx, a, z, h, tmp, y))
SH_T(bn_bwd, (void *ctx, const ds_train_bn_args *a, const float *z, const float *h, const float *dy, float *dz,
              float *dd, float *ddb, float *du, float *dub, float *tmp),
     (s->inner->ctx, a, z, h, dy, dz, dd, ddb, du, dub, tmp))
SH_T(fill, (void *ctx, float *x, size_t n, float v), (s->inner->ctx, x, n, v))
SH_T(gather_rows, (void *ctx, const float *src, const int32_t *idx, float *dst, int32_t n, int32_t d),
     (s->inner->ctx, src, idx, dst, n, d))
SH_T(scatter_rows, (void *ctx, const float *src, const int32_t *idx, float *dst, int32_t n, int32_t d),
     (s->inner->ctx, src, idx, dst, n, d))

static void sh_free(void *ctx) {
    shim *s = ctx;
    ds_backend_free(s->inner);
    munmap(s->base, SHIM_REGION);
    free(s);
}

static const struct ds_backend_train_iface SH_TRAIN = {
    .version = DS_BACKEND_TRAIN_IFACE_VERSION, .mm_nt = sh_mm_nt, .mm_nn = sh_mm_nn, .mm_tn = sh_mm_tn,
    .add_bias = sh_add_bias, .rmsnorm_fwd = sh_rmsnorm_fwd, .rmsnorm_bwd = sh_rmsnorm_bwd, .rope = sh_train_rope,
    .silu_mul_fwd = sh_silu_mul_fwd, .silu_mul_bwd = sh_silu_mul_bwd, .lora_fwd = sh_lora_fwd, .lora_bwd = sh_lora_bwd,
    .embed = sh_train_embed, .embed_bwd_soft = sh_embed_bwd_soft, .embed_lora_fwd = sh_embed_lora_fwd,
    .embed_lora_bwd = sh_embed_lora_bwd, .cross_entropy = sh_cross_entropy, .attn_work_floats = sh_attn_work_floats,
    .attention_fwd = sh_attention_fwd, .attention_bwd = sh_attention_bwd, .sumsq = sh_sumsq, .scale = sh_train_scale,
    .adamw = sh_adamw, .bn_fwd = sh_bn_fwd, .bn_bwd = sh_bn_bwd, .fill = sh_fill, .gather_rows = sh_gather_rows,
    .scatter_rows = sh_scatter_rows,
};

static const struct ds_backend_iface SH_IFACE = {
    .version = DS_BACKEND_IFACE_VERSION, .name = "shim", .free = sh_free, .alloc = sh_alloc, .release = sh_release,
    .upload = sh_upload, .download = sh_download, .synchronize = sh_synchronize, .mat_upload = sh_mat_upload,
    .mat_free = sh_mat_free, .matmul = sh_matmul, .matmul_t = sh_matmul_t, .embed = sh_embed, .rmsnorm = sh_rmsnorm,
    .rope = sh_rope, .silu_mul = sh_silu_mul, .add = sh_add, .get_rows = sh_get_rows, .kv_store = sh_kv_store,
    .attention = sh_attention, .plan_upload = sh_plan_upload, .lora = sh_lora, .seg_scale = sh_seg_scale,
    .seg_add = sh_seg_add, .set_rows = sh_set_rows, .copy = sh_copy, .lora_expand = sh_lora_expand, .train = &SH_TRAIN,
    .bottleneck = sh_bottleneck, .scale = sh_scale, .gelu_tanh_mul = sh_gelu_tanh_mul, .sparse = sh_sparse,
};

/* A shim over a CPU backend made with bp; NULL on failure. The returned backend's ctx is the shim. */
static ds_backend *shim_create(const ds_backend_params *bp, ds_err *err) {
    shim *s = calloc(1, sizeof *s);
    ds_backend *b = calloc(1, sizeof *b);
    if (!s || !b || !(s->inner = ds_backend_cpu_create(bp, err))) goto fail;
    s->in = s->inner->iface;
    s->itr = s->in->train;
    s->page = (size_t)sysconf(_SC_PAGESIZE);
    s->base = mmap(NULL, SHIM_REGION, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (s->base == MAP_FAILED) goto fail;
    b->iface = &SH_IFACE;
    b->ctx = s;
    return b;
fail:
    if (s && s->inner) ds_backend_free(s->inner);
    free(s), free(b);
    return NULL;
}

#endif
