/* String → int32 hash map: open addressing keeps lookups to one or two cache lines, and keys live in
 * one arena so a 150k-entry vocab costs three allocations, not 150k. */
#include "util/strmap.h"

#include <stdlib.h>
#include <string.h>

typedef struct slot {
    uint64_t hash; /* 0 marks an empty slot (real hashes are forced non-zero) */
    uint32_t off, len;
    int32_t val;
} slot;

struct ds_strmap {
    slot *slots;
    size_t cap, count; /* cap is a power of two, kept at least twice count */
    char *arena;
    size_t arena_len, arena_cap;
};

/* FNV-1a finished with a murmur-style mix, so short, similar tokens spread over the table. */
static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    return h ? h : 1;
}

ds_strmap *ds_strmap_create(size_t expected) {
    ds_strmap *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    size_t cap = 16;
    while (cap < expected * 2 + 2) cap *= 2;
    m->slots = calloc(cap, sizeof *m->slots);
    if (!m->slots) {
        free(m);
        return NULL;
    }
    m->cap = cap;
    return m;
}

void ds_strmap_free(ds_strmap *m) {
    if (!m) return;
    free(m->slots);
    free(m->arena);
    free(m);
}

size_t ds_strmap_count(const ds_strmap *m) { return m->count; }

static size_t find_slot(const ds_strmap *m, uint64_t h, const char *key, size_t len) {
    size_t mask = m->cap - 1;
    for (size_t i = (size_t)h & mask;; i = (i + 1) & mask) {
        const slot *s = &m->slots[i];
        if (s->hash == 0) return i;
        if (s->hash == h && s->len == len && (len == 0 || memcmp(m->arena + s->off, key, len) == 0)) return i;
    }
}

static int grow(ds_strmap *m) {
    size_t ncap = m->cap * 2;
    slot *ns = calloc(ncap, sizeof *ns);
    if (!ns) return DS_ENOMEM;
    for (size_t i = 0; i < m->cap; i++) {
        slot s = m->slots[i];
        if (!s.hash) continue;
        size_t j = (size_t)s.hash & (ncap - 1);
        while (ns[j].hash) j = (j + 1) & (ncap - 1);
        ns[j] = s;
    }
    free(m->slots);
    m->slots = ns;
    m->cap = ncap;
    return DS_OK;
}

static int arena_append(ds_strmap *m, const char *key, size_t len, uint32_t *off) {
    if (len > UINT32_MAX || m->arena_len + len > UINT32_MAX) return DS_ERANGE;
    if (m->arena_len + len > m->arena_cap) {
        size_t ncap = m->arena_cap ? m->arena_cap * 2 : 4096;
        while (ncap < m->arena_len + len) ncap *= 2;
        char *na = realloc(m->arena, ncap);
        if (!na) return DS_ENOMEM;
        m->arena = na;
        m->arena_cap = ncap;
    }
    if (len) memcpy(m->arena + m->arena_len, key, len);
    *off = (uint32_t)m->arena_len;
    m->arena_len += len;
    return DS_OK;
}

int ds_strmap_put(ds_strmap *m, const char *key, size_t len, int32_t val) {
    uint64_t h = hash_bytes(key, len);
    size_t i = find_slot(m, h, key, len);
    if (m->slots[i].hash) {
        m->slots[i].val = val;
        return DS_OK;
    }
    if ((m->count + 1) * 2 > m->cap) {
        int rc = grow(m);
        if (rc) return rc;
        i = find_slot(m, h, key, len);
    }
    uint32_t off;
    int rc = arena_append(m, key, len, &off);
    if (rc) return rc;
    m->slots[i] = (slot){.hash = h, .off = off, .len = (uint32_t)len, .val = val};
    m->count++;
    return DS_OK;
}

bool ds_strmap_get(const ds_strmap *m, const char *key, size_t len, int32_t *val) {
    size_t i = find_slot(m, hash_bytes(key, len), key, len);
    if (!m->slots[i].hash) return false;
    if (val) *val = m->slots[i].val;
    return true;
}
