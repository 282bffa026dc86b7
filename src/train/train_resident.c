/* The live adapter resident in the trainer's backend (issue 11: parameters, gradients and optimiser
 * moments live in the backend, downloaded only for a checkpoint, a save, a state save or a
 * publication).
 *
 * t->ad is the HOST adapter the registry and the savers expect (peft_save.c, ah_save.c, delta.c);
 * t->res has the same structure with every trainable float array in backend memory. The ops read
 * t->res; the parameter table's values (ds_train_tensor.value, the optimizer's w) are t->res's
 * arrays. t->ad's arrays are a host mirror: filled from t->res by tr_resident_sync before anything
 * reads them, and written back to t->res once, at creation. Diff pruning's dense δ has no mirror in
 * t->ad (train_dp.c downloads it to build the sparse delta). */
#include "adapter/loader.h"
#include "train/train_internal.h"

#include <stdlib.h>
#include <string.h>

/* One trainable host array and its resident twin. */
typedef int (*pair_fn)(ds_trainer *t, float *host, float **dev, size_t n);

static int lora_pair(ds_trainer *t, ds_lora_module *h, ds_lora_module *r, pair_fn f) {
    if (!h) return 0;
    int rc = f(t, h->A, &r->A, (size_t)h->rank * (size_t)h->in);
    return rc ? rc : f(t, h->B, &r->B, (size_t)h->out * (size_t)h->rank);
}

/* Calls f on every trainable array of h and its slot in r (same structure). */
static int walk(ds_trainer *t, ds_adapter *h, ds_adapter *r, pair_fn f) {
    const size_t n = (size_t)h->n_layer * DS_PROJ_COUNT, nb = (size_t)h->n_layer * DS_BN_SITES;
    int rc = 0;
    for (size_t i = 0; !rc && h->lora && i < n; i++) rc = lora_pair(t, h->lora[i], r->lora[i], f);
    if (!rc) rc = lora_pair(t, h->lm_head, r->lm_head, f);
    if (!rc) rc = lora_pair(t, h->embed, r->embed, f);
    if (!rc && h->prompt) rc = f(t, h->prompt, &r->prompt, (size_t)h->n_virtual * (size_t)h->d_model);
    if (!rc && h->prefix)
        rc = f(t, h->prefix, &r->prefix, (size_t)h->n_virtual * (size_t)h->n_layer * 2 * (size_t)h->prefix_row);
    for (size_t i = 0; !rc && h->dbias && i < n; i++)
        if (h->dbias[i]) rc = f(t, h->dbias[i], &r->dbias[i], (size_t)h->proj_out[i % DS_PROJ_COUNT]);
    for (size_t i = 0; !rc && h->bn && i < nb; i++) {
        const ds_bn_module *b = h->bn[i];
        ds_bn_module *c = r->bn[i];
        if (!b) continue;
        rc = f(t, b->down, &c->down, (size_t)b->size * (size_t)b->d);
        if (!rc) rc = f(t, b->down_b, &c->down_b, (size_t)b->size);
        if (!rc) rc = f(t, b->up, &c->up, (size_t)b->d * (size_t)b->size);
        if (!rc) rc = f(t, b->up_b, &c->up_b, (size_t)b->d);
    }
    return rc;
}

static ds_lora_module *shell_lora(const ds_lora_module *s) {
    if (!s) return NULL;
    ds_lora_module *m = malloc(sizeof *m);
    if (m) *m = (ds_lora_module){.rank = s->rank, .in = s->in, .out = s->out, .scale = s->scale};
    return m;
}

/* r: h's structure (shapes, scales, tables) without any float array. */
static int shell(ds_adapter *r, const ds_adapter *h) {
    const size_t n = (size_t)h->n_layer * DS_PROJ_COUNT, nb = (size_t)h->n_layer * DS_BN_SITES;
    r->kind = h->kind;
    r->n_layer = h->n_layer, r->d_model = h->d_model;
    memcpy(r->proj_in, h->proj_in, sizeof r->proj_in);
    memcpy(r->proj_out, h->proj_out, sizeof r->proj_out);
    r->n_virtual = h->n_virtual, r->prefix_row = h->prefix_row;
    if (h->lora && !(r->lora = calloc(n, sizeof *r->lora))) return DS_ENOMEM;
    for (size_t i = 0; h->lora && i < n; i++)
        if (h->lora[i] && !(r->lora[i] = shell_lora(h->lora[i]))) return DS_ENOMEM;
    if ((h->lm_head && !(r->lm_head = shell_lora(h->lm_head))) || (h->embed && !(r->embed = shell_lora(h->embed))))
        return DS_ENOMEM;
    if (h->dbias && !(r->dbias = calloc(n, sizeof *r->dbias))) return DS_ENOMEM;
    if (h->bn && !(r->bn = calloc(nb, sizeof *r->bn))) return DS_ENOMEM;
    for (size_t i = 0; h->bn && i < nb; i++) {
        if (!h->bn[i]) continue;
        if (!(r->bn[i] = malloc(sizeof *r->bn[i]))) return DS_ENOMEM;
        const ds_bn_module *b = h->bn[i]; /* trainable: no LayerNorms, no channel scaling (tr_bn_check) */
        *r->bn[i] = (ds_bn_module){.size = b->size, .d = b->d, .act = b->act, .flags = b->flags, .scale = b->scale};
    }
    return 0;
}

static int upload_pair(ds_trainer *t, float *host, float **dev, size_t n) {
    if (!(*dev = tr_alloc(t, n))) return DS_ENOMEM;
    return t->be->iface->upload(t->be->ctx, *dev, host, n * sizeof(float));
}

static int download_pair(ds_trainer *t, float *host, float **dev, size_t n) {
    return t->be->iface->download(t->be->ctx, host, *dev, n * sizeof(float));
}

/* The parameter whose value is the host array `host` gets the resident twin as its value. */
static int remap_pair(ds_trainer *t, float *host, float **dev, size_t n) {
    for (int32_t i = 0; i < t->n_params; i++)
        if (t->params[i].pub.value == host && t->params[i].pub.n == n) {
            t->params[i].pub.value = *dev;
            return 0;
        }
    return DS_EINVAL; /* every trainable array is a parameter (tr_params_build) */
}

int tr_resident_build(ds_trainer *t) {
    if (!(t->res = calloc(1, sizeof *t->res))) return DS_ENOMEM;
    int rc = shell(t->res, t->ad);
    return rc ? rc : walk(t, t->ad, t->res, upload_pair);
}

int tr_resident_remap(ds_trainer *t) { return walk(t, t->ad, t->res, remap_pair); }

int tr_resident_sync(const ds_trainer *t) {
    ds_trainer *w = (ds_trainer *)t; /* fills the host mirror only: the trainer's state is unchanged */
    return w->res ? walk(w, w->ad, w->res, download_pair) : 0;
}

void tr_resident_free(ds_trainer *t) {
    ds_adapter *r = t->res;
    if (!r) return;
    const size_t n = (size_t)r->n_layer * DS_PROJ_COUNT, nb = (size_t)r->n_layer * DS_BN_SITES;
    for (size_t i = 0; r->lora && i < n; i++) free(r->lora[i]);
    for (size_t i = 0; r->bn && i < nb; i++) free(r->bn[i]);
    free(r->lora), free(r->lm_head), free(r->embed), free(r->dbias), free(r->bn);
    free(r); /* the float arrays are trainer buffers (t->allocs) */
    t->res = NULL;
}
