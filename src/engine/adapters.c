/* Adapter residency on the engine thread: slots, LRU eviction of idle adapters under a budget,
 * and prefix-tuning blocks pinned per resident version (docs/ARCHITECTURE.md, "Adapter life
 * cycle", step 3). */
#include "engine/engine_internal.h"

#include <stdlib.h>
#include <string.h>

static void slot_free(ds_engine *e, engine_slot *sl) {
    for (int32_t i = 0; i < sl->n_prefix_blocks; i++) ds_kv_block_unref(&e->kv, sl->prefix_blocks[i]);
    free(sl->prefix_blocks);
    e->slot_bytes -= sl->dev.dev_bytes;
    ds_adapter_dev_release(e->backend, &sl->dev);
    sl->entry->slot = -1;
    ds_registry_release(e->reg, sl->entry);
    memset(sl, 0, sizeof *sl);
}

static void count_active(ds_engine *e) {
    for (int32_t i = 0; i < e->p.max_adapters; i++) e->slots[i].active = 0;
    for (ds_seq *s = e->running; s; s = s->next)
        if (s->adapter_slot >= 0) e->slots[s->adapter_slot].active++;
}

void ds_engine_slots_gc(ds_engine *e) {
    if (!e->slots) return;
    count_active(e);
    for (int32_t i = 0; i < e->p.max_adapters; i++) {
        engine_slot *sl = &e->slots[i];
        if (sl->entry && !sl->active && ds_registry_is_retired(e->reg, sl->entry)) slot_free(e, sl);
    }
}

void ds_engine_slots_free(ds_engine *e) {
    if (!e->slots) return;
    for (int32_t i = 0; i < e->p.max_adapters; i++)
        if (e->slots[i].entry) slot_free(e, &e->slots[i]);
    free(e->slots);
    e->slots = NULL;
}

/* Evicts the least recently used idle slot; returns its index or -1. */
static int32_t evict_lru(ds_engine *e) {
    int32_t best = -1;
    for (int32_t i = 0; i < e->p.max_adapters; i++) {
        engine_slot *sl = &e->slots[i];
        if (!sl->entry || sl->active) continue;
        if (best < 0 || sl->last_used < e->slots[best].last_used) best = i;
    }
    if (best >= 0) {
        DS_LOGD("engine: evicting adapter '%s' v%u", e->slots[best].entry->name, e->slots[best].entry->version);
        slot_free(e, &e->slots[best]);
        e->stats.adapter_evictions++;
    }
    return best;
}

static int32_t free_slot(ds_engine *e) {
    for (int32_t i = 0; i < e->p.max_adapters; i++)
        if (!e->slots[i].entry) return i;
    return -1;
}

static size_t adapter_dev_estimate(const ds_adapter *a) { return a->host_bytes; }

int ds_engine_adapter_fits(const ds_engine *e, const ds_adapter_entry *entry, ds_err *err) {
    const size_t need = adapter_dev_estimate(entry->adapter);
    if (need <= e->p.adapter_budget_bytes) return DS_OK;
    return ds_err_set(err, DS_EUNSUPPORTED,
                      "adapter '%s' needs %.1f MiB of adapter memory, more than the whole adapter budget "
                      "(--adapter-budget-mb %.0f MiB): it can never be scheduled", entry->name,
                      (double)need / (1 << 20), (double)e->p.adapter_budget_bytes / (1 << 20));
}

static int pin_prefix(ds_engine *e, engine_slot *sl, ds_err *err) {
    const ds_adapter *a = sl->entry->adapter;
    const int32_t bs = e->p.kv_block_size, nb = (a->n_virtual + bs - 1) / bs;
    if (nb > e->kv.n_free) return DS_EBUSY;
    sl->prefix_blocks = malloc(sizeof(int32_t) * (size_t)nb);
    if (!sl->prefix_blocks) return ds_err_set(err, DS_ENOMEM, "out of memory");
    for (int32_t i = 0; i < nb; i++) sl->prefix_blocks[i] = ds_kv_block_take(&e->kv);
    sl->n_prefix_blocks = nb;
    return ds_adapter_write_prefix(e->llama, a, sl->prefix_blocks, nb, err);
}

/* Uploads entry into a free (or freshly evicted) slot. */
static int make_resident(ds_engine *e, ds_adapter_entry *entry, ds_err *err) {
    const size_t need = adapter_dev_estimate(entry->adapter);
    int fits = ds_engine_adapter_fits(e, entry, err); /* else evicting everything would not help: fail */
    if (fits) return fits;
    while (e->slot_bytes + need > e->p.adapter_budget_bytes)
        if (evict_lru(e) < 0) return DS_EBUSY;
    int32_t i = free_slot(e);
    if (i < 0 && (i = evict_lru(e)) < 0) return DS_EBUSY;
    engine_slot *sl = &e->slots[i];
    double t0 = ds_time_s();
    int st = ds_adapter_dev_upload(e->backend, entry->adapter, &sl->dev, err);
    if (st) return st;
    sl->entry = entry;
    ds_registry_ref(e->reg, entry);
    entry->slot = i;
    e->slot_bytes += sl->dev.dev_bytes;
    if (entry->adapter->prefix && (st = pin_prefix(e, sl, err)) != DS_OK) {
        slot_free(e, sl);
        return st;
    }
    e->stats.adapter_uploads++;
    DS_LOGD("engine: adapter '%s' v%u resident in slot %d (%.1f KiB, %.2f ms)", entry->name, entry->version, i,
            (double)sl->dev.dev_bytes / 1024.0, (ds_time_s() - t0) * 1e3);
    return DS_OK;
}

int ds_engine_slot_attach(ds_engine *e, ds_seq *s, ds_err *err) {
    if (!s->entry) {
        s->adapter_slot = -1;
        return DS_OK;
    }
    if (s->entry->slot < 0) {
        count_active(e);
        int st = make_resident(e, s->entry, err);
        if (st) return st;
    }
    engine_slot *sl = &e->slots[s->entry->slot];
    sl->last_used = e->step_no;
    s->adapter_slot = s->entry->slot;
    if (sl->n_prefix_blocks && s->n_blocks == 0) { /* the table starts with the shared prefix blocks */
        if (s->cap_blocks < sl->n_prefix_blocks) {
            int32_t *nb = realloc(s->blocks, sizeof(int32_t) * (size_t)(sl->n_prefix_blocks + 8));
            if (!nb) return ds_err_set(err, DS_ENOMEM, "out of memory");
            s->blocks = nb;
            s->cap_blocks = sl->n_prefix_blocks + 8;
        }
        for (int32_t i = 0; i < sl->n_prefix_blocks; i++) {
            ds_kv_block_ref(&e->kv, sl->prefix_blocks[i]);
            s->blocks[i] = sl->prefix_blocks[i];
        }
        s->n_blocks = s->n_prefix_blocks = sl->n_prefix_blocks;
    }
    return DS_OK;
}

void ds_engine_slot_detach(ds_engine *e, ds_seq *s) {
    (void)e;
    s->adapter_slot = -1;
}

void ds_engine_seq_release(ds_engine *e, ds_seq *s) {
    if (s->entry && e->reg) ds_registry_release(e->reg, s->entry);
    s->entry = NULL;
}
