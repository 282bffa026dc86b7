/* The adapter registry: name → current version, with refcounted versions so hot swaps never
 * disturb running sequences (docs/ARCHITECTURE.md "Adapter life cycle"). */
#include "ds/adapter.h"
#include "util/mem.h"
#include "ds/model.h"

#include <dirent.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <utf8proc.h>

struct ds_adapter_registry {
    const ds_model *base;
    char *root;
    pthread_mutex_t mu;
    ds_adapter_entry *current; /* one entry per live name */
    ds_adapter_entry *draining; /* retired versions still referenced */
    size_t bytes;               /* host bytes of every live version */
};

ds_adapter_registry *ds_registry_create(const ds_model *base, const char *root, ds_err *err) {
    ds_adapter_registry *r = calloc(1, sizeof *r);
    if (!r) return ds_err_set(err, DS_ENOMEM, "out of memory"), NULL;
    r->base = base;
    if (root) {
        struct stat st;
        if (stat(root, &st) != 0 || !S_ISDIR(st.st_mode)) {
            ds_err_set(err, DS_ENOTFOUND, "adapter directory '%s' does not exist", root);
            free(r);
            return NULL;
        }
        r->root = ds_strdup(root);
    }
    pthread_mutex_init(&r->mu, NULL);
    return r;
}

/* An entry that was never published (its bytes were never counted). */
static void entry_discard(ds_adapter_entry *e) {
    ds_adapter_free(e->adapter);
    free(e->name);
    free(e);
}

static void entry_free(ds_adapter_registry *r, ds_adapter_entry *e) {
    if (e->adapter) r->bytes -= e->adapter->host_bytes;
    ds_adapter_free(e->adapter);
    free(e->name);
    free(e);
}

void ds_registry_free(ds_adapter_registry *r) {
    if (!r) return;
    ds_adapter_entry *lists[2] = {r->current, r->draining};
    for (int i = 0; i < 2; i++)
        for (ds_adapter_entry *e = lists[i], *n; e; e = n) {
            n = e->next;
            entry_free(r, e);
        }
    pthread_mutex_destroy(&r->mu);
    free(r->root);
    free(r);
}

const char *ds_registry_root(const ds_adapter_registry *r) { return r->root; }

static ds_adapter_entry **find_current(ds_adapter_registry *r, const char *name) {
    for (ds_adapter_entry **pp = &r->current; *pp; pp = &(*pp)->next)
        if (!strcmp((*pp)->name, name)) return pp;
    return NULL;
}

/* Moves *pp to the draining list (or frees it when unreferenced). Lock held. */
static void retire(ds_adapter_registry *r, ds_adapter_entry **pp) {
    ds_adapter_entry *e = *pp;
    *pp = e->next;
    e->retired = true;
    e->refs--; /* the registry's own reference as "current" */
    if (e->refs <= 0) {
        entry_free(r, e);
        return;
    }
    e->next = r->draining;
    r->draining = e;
}

/* 1-120 bytes of valid UTF-8 (names reach JSON, logs and the /metrics exposition, which must be
 * UTF-8) without control characters, spaces, quotes, backslashes or commas. */
static bool valid_name(const char *name) {
    const size_t n = strlen(name);
    if (n == 0 || n > 120) return false;
    for (size_t i = 0; i < n;) {
        utf8proc_int32_t cp;
        const utf8proc_ssize_t w = utf8proc_iterate((const utf8proc_uint8_t *)name + i, (utf8proc_ssize_t)(n - i), &cp);
        if (w <= 0 || cp < 0x20 || (cp >= 0x7f && cp < 0xa0) || cp == '"' || cp == '\\' || cp == ',' || cp == ' ')
            return false;
        i += (size_t)w;
    }
    return true;
}

int ds_registry_load_claim(ds_adapter_registry *r, const char *name, const char *path, bool replace, int *claim,
                           ds_err *err) {
    if (!r->root) return ds_err_set(err, DS_EPERM, "adapters are disabled: the server was started without --adapter-dir");
    if (!name || !valid_name(name))
        return ds_err_set(err, DS_EINVAL, "invalid adapter name (1-120 bytes of printable UTF-8, no spaces, quotes, backslashes or commas)");
    if (r->base && !strcmp(name, r->base->cfg.name))
        return ds_err_set(err, DS_EINVAL, "adapter name '%s' is the base model's name", name);
    pthread_mutex_lock(&r->mu);
    bool exists = find_current(r, name) != NULL;
    pthread_mutex_unlock(&r->mu);
    if (exists && !replace) return ds_err_set(err, DS_EBUSY, "The lora adapter '%s' has already been loaded.", name);
    char *resolved = NULL;
    int st = ds_adapter_resolve_path(r->root, path, &resolved, err);
    if (st) return st;
    double t0 = ds_time_s();
    ds_adapter_load_params lp = ds_adapter_default_load_params();
    lp.name = name;
    ds_adapter *a = ds_adapter_load(resolved, r->base, &lp, err);
    free(resolved);
    if (!a) return DS_EFORMAT;
    ds_adapter_entry *e = calloc(1, sizeof *e);
    if (!e || !(e->name = ds_strdup(name))) {
        free(e);
        ds_adapter_free(a);
        return ds_err_set(err, DS_ENOMEM, "out of memory");
    }
    e->adapter = a;
    e->refs = 1;
    e->slot = -1;
    e->created = (double)time(NULL);
    e->load_ms = (ds_time_s() - t0) * 1e3;
    pthread_mutex_lock(&r->mu);
    int expect = 0;
    if (claim && !__atomic_compare_exchange_n(claim, &expect, 1, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        pthread_mutex_unlock(&r->mu); /* the caller gave up on this load (a timeout): publish nothing */
        entry_discard(e);
        return ds_err_set(err, DS_ECANCELED, "the load of adapter '%s' was abandoned", name);
    }
    ds_adapter_entry **pp = find_current(r, name);
    if (pp && !replace) { /* raced with another load of the same name */
        pthread_mutex_unlock(&r->mu);
        entry_discard(e); /* never counted in r->bytes */
        return ds_err_set(err, DS_EBUSY, "The lora adapter '%s' has already been loaded.", name);
    }
    e->version = pp ? (*pp)->version + 1 : 1;
    if (pp) retire(r, pp);
    r->bytes += a->host_bytes;
    e->next = r->current;
    r->current = e;
    pthread_mutex_unlock(&r->mu);
    DS_LOGI("adapter '%s' v%u loaded (%s, %.1f KiB, %.1f ms)", name, e->version, a->peft_type,
            (double)a->host_bytes / 1024.0, e->load_ms);
    return DS_OK;
}

int ds_registry_load(ds_adapter_registry *r, const char *name, const char *path, bool replace, ds_err *err) {
    return ds_registry_load_claim(r, name, path, replace, NULL, err);
}

int ds_registry_unload(ds_adapter_registry *r, const char *name, ds_err *err) {
    pthread_mutex_lock(&r->mu);
    ds_adapter_entry **pp = name ? find_current(r, name) : NULL;
    if (!pp) {
        pthread_mutex_unlock(&r->mu);
        return ds_err_set(err, DS_ENOTFOUND, "The lora adapter '%s' cannot be found.", name ? name : "");
    }
    retire(r, pp);
    pthread_mutex_unlock(&r->mu);
    DS_LOGI("adapter '%s' unloaded (running requests drain)", name);
    return DS_OK;
}

static bool is_adapter_candidate(const char *root, const char *name) {
    char p[4096];
    struct stat st;
    snprintf(p, sizeof p, "%s/%s/adapter_config.json", root, name);
    if (stat(p, &st) == 0) return true;
    size_t n = strlen(name);
    return n > 5 && !strcmp(name + n - 5, ".gguf");
}

int ds_registry_scan(ds_adapter_registry *r) {
    if (!r->root) return 0;
    DIR *d = opendir(r->root);
    if (!d) return 0;
    int n = 0, seen = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.' || !is_adapter_candidate(r->root, de->d_name)) continue;
        char name[256];
        snprintf(name, sizeof name, "%s", de->d_name);
        size_t l = strlen(name);
        if (l > 5 && !strcmp(name + l - 5, ".gguf")) name[l - 5] = 0;
        ds_err err = {{0}};
        seen++;
        if (ds_registry_load(r, name, de->d_name, false, &err) == DS_OK) n++;
        else DS_LOGW("adapter '%s' skipped: %s", name, err.msg);
    }
    closedir(d);
    DS_LOGI("adapter scan of %s: %d of %d loaded", r->root, n, seen);
    return n;
}

ds_adapter_entry *ds_registry_acquire(ds_adapter_registry *r, const char *name) {
    pthread_mutex_lock(&r->mu);
    ds_adapter_entry **pp = find_current(r, name);
    ds_adapter_entry *e = pp ? *pp : NULL;
    if (e) e->refs++;
    pthread_mutex_unlock(&r->mu);
    return e;
}

void ds_registry_ref(ds_adapter_registry *r, ds_adapter_entry *e) {
    pthread_mutex_lock(&r->mu);
    e->refs++;
    pthread_mutex_unlock(&r->mu);
}

void ds_registry_release(ds_adapter_registry *r, ds_adapter_entry *e) {
    if (!e) return;
    pthread_mutex_lock(&r->mu);
    if (--e->refs <= 0 && e->retired) {
        for (ds_adapter_entry **pp = &r->draining; *pp; pp = &(*pp)->next)
            if (*pp == e) {
                *pp = e->next;
                break;
            }
        entry_free(r, e);
    }
    pthread_mutex_unlock(&r->mu);
}

bool ds_registry_is_retired(ds_adapter_registry *r, const ds_adapter_entry *e) {
    pthread_mutex_lock(&r->mu);
    bool v = e->retired;
    pthread_mutex_unlock(&r->mu);
    return v;
}

static void fill_info(const ds_adapter_entry *e, ds_adapter_info *o) {
    memset(o, 0, sizeof *o);
    snprintf(o->name, sizeof o->name, "%s", e->name);
    snprintf(o->path, sizeof o->path, "%s", e->adapter->path ? e->adapter->path : "");
    snprintf(o->peft_type, sizeof o->peft_type, "%s", e->adapter->peft_type);
    o->version = e->version;
    o->refs = e->refs - 1;
    o->host_bytes = e->adapter->host_bytes;
    o->created = e->created;
    o->load_ms = e->load_ms;
}

static int cmp_info(const void *a, const void *b) {
    return strcmp(((const ds_adapter_info *)a)->name, ((const ds_adapter_info *)b)->name);
}

int ds_registry_list(ds_adapter_registry *r, ds_adapter_info **out, size_t *n) {
    pthread_mutex_lock(&r->mu);
    size_t cnt = 0;
    for (ds_adapter_entry *e = r->current; e; e = e->next) cnt++;
    *out = calloc(cnt ? cnt : 1, sizeof **out);
    if (!*out) {
        pthread_mutex_unlock(&r->mu);
        return DS_ENOMEM;
    }
    size_t i = 0;
    for (ds_adapter_entry *e = r->current; e; e = e->next) fill_info(e, &(*out)[i++]);
    pthread_mutex_unlock(&r->mu);
    qsort(*out, cnt, sizeof **out, cmp_info);
    *n = cnt;
    return DS_OK;
}

int ds_registry_info(ds_adapter_registry *r, const char *name, ds_adapter_info *out) {
    pthread_mutex_lock(&r->mu);
    ds_adapter_entry **pp = find_current(r, name);
    if (pp) fill_info(*pp, out);
    pthread_mutex_unlock(&r->mu);
    return pp ? DS_OK : DS_ENOTFOUND;
}

size_t ds_registry_host_bytes(ds_adapter_registry *r) {
    pthread_mutex_lock(&r->mu);
    size_t b = r->bytes;
    pthread_mutex_unlock(&r->mu);
    return b;
}
