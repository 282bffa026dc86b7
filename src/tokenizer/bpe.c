/* Byte-level BPE on one pre-token, exactly as HF `tokenizers` (models/bpe/word.rs merge_all): a
 * doubly linked list of symbols and a min-heap of candidate merges ordered by (rank, position).
 * Stale heap entries are detected on pop by re-checking the pair, so each merge costs O(log n) and a
 * long piece (a CJK sentence, a run of spaces) is never quadratic. */
#include "tokenizer/tok_internal.h"
#include "util/mem.h"

#include <stdlib.h>
#include <string.h>

typedef struct bpe_sym {
    int32_t id;         /* -1 once merged into its left neighbour */
    int32_t prev, next; /* -1 at the ends */
} bpe_sym;

typedef struct bpe_item {
    int32_t rank, pos, result;
} bpe_item;

/* ---- merge map: (left, right) -> (rank, result), open addressing ---- */

static uint64_t mix64(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ull;
    k ^= k >> 33;
    return k;
}

static size_t merge_slot(const tok_merge_map *m, uint64_t key) {
    size_t mask = m->cap - 1, i = (size_t)mix64(key) & mask;
    while (m->keys[i] != UINT64_MAX && m->keys[i] != key) i = (i + 1) & mask;
    return i;
}

static bool merge_get(const tok_merge_map *m, int32_t a, int32_t b, int32_t *rank, int32_t *result) {
    if (!m->cap) return false;
    size_t i = merge_slot(m, ((uint64_t)(uint32_t)a << 32) | (uint32_t)b);
    if (m->keys[i] == UINT64_MAX) return false;
    *rank = m->rank[i];
    *result = m->result[i];
    return true;
}

void tok_merges_free(tok_merge_map *m) {
    free(m->keys);
    free(m->rank);
    free(m->result);
    memset(m, 0, sizeof *m);
}

static int merges_alloc(tok_merge_map *m, size_t n) {
    size_t cap = 16;
    while (cap < n * 2 + 2) cap *= 2;
    m->keys = malloc(cap * sizeof *m->keys);
    m->rank = malloc(cap * sizeof *m->rank);
    m->result = malloc(cap * sizeof *m->result);
    if (!m->keys || !m->rank || !m->result) return DS_ENOMEM;
    memset(m->keys, 0xFF, cap * sizeof *m->keys);
    m->cap = cap;
    return DS_OK;
}

/* Resolves "a b" to ids. Returns 0, or 1 when malformed / naming unknown tokens (*why says which). */
static int resolve_merge(const ds_strmap *vocab, const char *s, int32_t *a, int32_t *b, int32_t *r, const char **why) {
    const char *sp = strchr(s, ' ');
    if (!sp || strchr(sp + 1, ' ')) {
        *why = "is not two tokens separated by one space";
        return 1;
    }
    size_t la = (size_t)(sp - s), lb = strlen(sp + 1);
    char buf[512];
    if (!ds_strmap_get(vocab, s, la, a) || !ds_strmap_get(vocab, sp + 1, lb, b)) {
        *why = "names a token not in the vocab";
        return 1;
    }
    /* The merged token must exist too (HF: MergeTokenOutOfVocabulary). */
    char *cat = la + lb <= sizeof buf ? buf : malloc(la + lb);
    if (!cat) return -1;
    memcpy(cat, s, la);
    memcpy(cat + la, sp + 1, lb);
    bool ok = ds_strmap_get(vocab, cat, la + lb, r);
    if (cat != buf) free(cat);
    if (!ok) *why = "produces a token not in the vocab";
    return ok ? 0 : 1;
}

int tok_merges_build(tok_merge_map *m, const ds_strmap *vocab, const char *const *merges, int32_t n_merges, bool strict,
                     int32_t *n_skipped, ds_err *err) {
    *n_skipped = 0;
    if (merges_alloc(m, (size_t)n_merges)) return ds_err_set(err, DS_ENOMEM, "tokenizer: out of memory");
    for (int32_t i = 0; i < n_merges; i++) {
        int32_t a, b, r;
        const char *why = "is NULL";
        int rc = merges[i] ? resolve_merge(vocab, merges[i], &a, &b, &r, &why) : 1;
        if (rc < 0) return ds_err_set(err, DS_ENOMEM, "tokenizer: out of memory");
        if (rc) {
            if (strict)
                return ds_err_set(err, DS_EFORMAT, "merges[%d] \"%.60s\" %s", (int)i, merges[i] ? merges[i] : "", why);
            (*n_skipped)++;
            continue;
        }
        /* A repeated pair keeps its last rank, as HF's HashMap collect does. */
        uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
        size_t slot = merge_slot(m, key);
        if (m->keys[slot] == UINT64_MAX) m->count++;
        m->keys[slot] = key;
        m->rank[slot] = i;
        m->result[slot] = r;
    }
    return DS_OK;
}

void bpe_scratch_free(bpe_scratch *sc) {
    free(sc->sym);
    free(sc->heap);
    free(sc->text);
    memset(sc, 0, sizeof *sc);
}

/* ---- min-heap on (rank, pos): HF's Merge ordering ---- */

static bool item_less(const bpe_item *x, const bpe_item *y) {
    return x->rank != y->rank ? x->rank < y->rank : x->pos < y->pos;
}

static void heap_push(bpe_item *h, size_t *n, bpe_item it) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!item_less(&it, &h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = it;
}

static bpe_item heap_pop(bpe_item *h, size_t *n) {
    bpe_item top = h[0], last = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && item_less(&h[c + 1], &h[c])) c++;
        if (!item_less(&h[c], &last)) break;
        h[i] = h[c];
        i = c;
    }
    if (*n) h[i] = last;
    return top;
}

static void push_pair(const ds_tokenizer *t, bpe_sym *sym, int32_t pos, bpe_item *heap, size_t *nh) {
    int32_t nx = sym[pos].next, rank, result;
    if (nx < 0) return;
    if (merge_get(&t->merges, sym[pos].id, sym[nx].id, &rank, &result))
        heap_push(heap, nh, (bpe_item){rank, pos, result});
}

/* Builds the initial symbols: one per byte, via the byte's one-character token. A byte without one is
 * dropped (HF with no unk_token) or becomes unk. */
static size_t init_symbols(const ds_tokenizer *t, const uint8_t *s, size_t n, bpe_sym *sym) {
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = t->byte_tok[s[i]];
        if (id < 0) id = t->unk_id;
        if (id < 0) continue;
        sym[k] = (bpe_sym){id, (int32_t)k - 1, (int32_t)k + 1};
        k++;
    }
    if (k) sym[k - 1].next = -1;
    return k;
}

static void merge_all(const ds_tokenizer *t, bpe_sym *sym, size_t k, bpe_item *heap) {
    size_t nh = 0;
    for (size_t i = 0; i + 1 < k; i++) push_pair(t, sym, (int32_t)i, heap, &nh);
    while (nh) {
        bpe_item top = heap_pop(heap, &nh);
        bpe_sym *cur = &sym[top.pos];
        if (cur->id < 0 || cur->next < 0) continue;
        bpe_sym *right = &sym[cur->next];
        int32_t rank, result;
        /* Stale entry: the pair at pos changed since it was queued. */
        if (!merge_get(&t->merges, cur->id, right->id, &rank, &result) || result != top.result) continue;
        cur->id = top.result;
        right->id = -1;
        cur->next = right->next;
        if (right->next >= 0) sym[right->next].prev = top.pos;
        if (cur->prev >= 0) push_pair(t, sym, cur->prev, heap, &nh);
        push_pair(t, sym, top.pos, heap, &nh);
    }
}

/* ignore_merges (Llama-3): a piece whose byte-level spelling is a vocab token is emitted whole. */
static int whole_piece(const ds_tokenizer *t, const uint8_t *s, size_t n, bpe_scratch *sc, int32_t *id) {
    if (ds_grow(&sc->text, &sc->text_cap, n * 2, 1)) return DS_ENOMEM;
    size_t len = 0;
    for (size_t i = 0; i < n; i++) len += tok_utf8_encode(tok_byte_to_cp(s[i]), (uint8_t *)sc->text + len);
    return ds_strmap_get(t->vocab, sc->text, len, id) ? 1 : 0;
}

int bpe_encode_piece(const ds_tokenizer *t, const uint8_t *s, size_t n, bpe_scratch *sc, tok_ids *out) {
    if (n == 0) return DS_OK;
    if (n > INT32_MAX / 2) return DS_ERANGE;
    if (t->ignore_merges) {
        int32_t id;
        int rc = whole_piece(t, s, n, sc, &id);
        if (rc < 0) return rc;
        if (rc == 1) return tok_ids_push(out, id);
    }
    if (DS_GROW(sc->sym, sc->sym_cap, n) ||
        DS_GROW(sc->heap, sc->heap_cap, 3 * n + 2))
        return DS_ENOMEM;
    size_t k = init_symbols(t, s, n, sc->sym);
    merge_all(t, sc->sym, k, sc->heap);
    /* Merges fold right into left, so symbol 0 always heads the list. */
    for (int32_t i = k ? 0 : -1; i >= 0; i = sc->sym[i].next) {
        int rc = tok_ids_push(out, sc->sym[i].id);
        if (rc) return rc;
    }
    return DS_OK;
}

/* ---- BPE over characters (SentencePiece vocabularies in tokenizer.json) ---- */

static void add_sym(bpe_sym *sym, size_t *k, int32_t id) {
    sym[*k] = (bpe_sym){id, (int32_t)*k - 1, (int32_t)*k + 1};
    (*k)++;
}

/* HF BPE::merge_word: a character in the vocab flushes a pending unk and is one symbol; one that is
 * not becomes its <0xXX> tokens when all exist (HF adds these without flushing a pending unk, so a
 * later unk lands after them: kept, to give the same ids), else an unk, fused with a pending one under
 * fuse_unk. */
static size_t init_chars(const ds_tokenizer *t, const uint8_t *s, size_t n, bpe_sym *sym) {
    size_t k = 0;
    int32_t unk = -1; /* pending unk id */
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t w = tok_utf8_decode(s + i, n - i, &cp);
        if (!w) w = 1;
        int32_t id;
        if (ds_strmap_get(t->vocab, (const char *)s + i, w, &id)) {
            if (unk >= 0) add_sym(sym, &k, unk), unk = -1;
            add_sym(sym, &k, id);
        } else {
            bool all = t->meta.byte_fallback;
            for (size_t b = 0; all && b < w; b++) all = t->byte_tok[s[i + b]] >= 0;
            if (all) {
                for (size_t b = 0; b < w; b++) add_sym(sym, &k, t->byte_tok[s[i + b]]);
            } else if (t->unk_id >= 0) {
                if (unk >= 0 && !t->meta.fuse_unk) add_sym(sym, &k, unk);
                unk = t->unk_id;
            }
        }
        i += w;
    }
    if (unk >= 0) add_sym(sym, &k, unk);
    if (k) sym[k - 1].next = -1;
    return k;
}

int bpe_encode_chars(const ds_tokenizer *t, const uint8_t *s, size_t n, bpe_scratch *sc, tok_ids *out) {
    if (n == 0) return DS_OK;
    if (n > INT32_MAX / 2) return DS_ERANGE;
    int32_t id;
    if (t->ignore_merges && ds_strmap_get(t->vocab, (const char *)s, n, &id)) return tok_ids_push(out, id);
    if (DS_GROW(sc->sym, sc->sym_cap, n) || DS_GROW(sc->heap, sc->heap_cap, 3 * n + 2)) return DS_ENOMEM;
    size_t k = init_chars(t, s, n, sc->sym);
    merge_all(t, sc->sym, k, sc->heap);
    for (int32_t i = k ? 0 : -1; i >= 0; i = sc->sym[i].next) {
        int rc = tok_ids_push(out, sc->sym[i].id);
        if (rc) return rc;
    }
    return DS_OK;
}
