/* SentencePiece BPE encoding (GGUF tokenizer.ggml.model = "llama": Llama-2, Mistral v0.1,
 * TinyLlama), as sentencepiece and llama.cpp do it: spaces become U+2581 "▁" (with one in front of
 * a fragment that starts the text or follows a special token), the text is split into UTF-8
 * characters, and the adjacent pair whose concatenation is the highest-scoring vocabulary piece is
 * merged until no pair is in the vocabulary (ties: the leftmost). A final symbol that is not a piece
 * is one character the vocabulary lacks: it is written as its bytes' <0xXX> tokens (byte fallback),
 * or <unk> when those are missing. */
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tok_internal.h"

typedef struct sym {
    int32_t prev, next; /* -1 at the ends */
    uint32_t off, len;  /* bytes of the escaped text */
} sym;

typedef struct bigram {
    float score;
    int32_t left;
    uint32_t len; /* of the merged piece: a stale entry no longer matches */
} bigram;

/* max-heap on (score, then smaller left) */
static bool before(const bigram *a, const bigram *b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static void heap_push(bigram *h, size_t *n, bigram v) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!before(&v, &h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = v;
}

static bigram heap_pop(bigram *h, size_t *n) {
    bigram top = h[0], last = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && before(&h[c + 1], &h[c])) c++;
        if (!before(&h[c], &last)) break;
        h[i] = h[c];
        i = c;
    }
    if (*n) h[i] = last;
    return top;
}

/* Queues the pair (left, left.next) when its concatenation is a piece. */
static void try_pair(const ds_tokenizer *t, const char *txt, const sym *s, int32_t left, bigram *h, size_t *nh) {
    if (left < 0) return;
    const int32_t right = s[left].next;
    if (right < 0) return;
    int32_t id;
    const uint32_t len = s[left].len + s[right].len;
    if (!ds_strmap_get(t->vocab, txt + s[left].off, len, &id)) return;
    heap_push(h, nh, (bigram){.score = t->scores[id], .left = left, .len = len});
}

static int emit(const ds_tokenizer *t, const char *txt, const sym *s, tok_ids *out) {
    int32_t id;
    if (ds_strmap_get(t->vocab, txt + s->off, s->len, &id)) return tok_ids_push(out, id);
    for (uint32_t k = 0; k < s->len; k++) { /* byte fallback */
        const int32_t b = t->byte_tok[(uint8_t)txt[s->off + k]];
        const int32_t use = b >= 0 ? b : t->unk_id;
        if (use < 0) continue; /* neither: the byte is dropped */
        int rc = tok_ids_push(out, use);
        if (rc) return rc;
        if (b < 0) break; /* one <unk> for the character */
    }
    return DS_OK;
}

int tok_spm_encode(const ds_tokenizer *t, const uint8_t *text, size_t n, bool prefix, tok_ids *out) {
    static const char sp[3] = {(char)0xE2, (char)0x96, (char)0x81}; /* U+2581 */
    const size_t cap = (prefix ? 3 : 0) + 3 * n; /* escaped bytes; symbols ≤ bytes; pushes ≤ 3 per symbol */
    char *txt = malloc(cap ? cap : 1);
    sym *s = malloc(sizeof *s * (cap + 1));
    bigram *h = malloc(sizeof *h * (3 * cap + 3));
    if (!txt || !s || !h) {
        free(txt), free(s), free(h);
        return DS_ENOMEM;
    }
    size_t len = 0;
    if (prefix) memcpy(txt, sp, 3), len = 3;
    for (size_t i = 0; i < n; i++) {
        if (text[i] == ' ') memcpy(txt + len, sp, 3), len += 3;
        else txt[len++] = (char)text[i];
    }
    int32_t ns = 0;
    for (size_t i = 0; i < len;) { /* one symbol per UTF-8 character (an invalid byte alone) */
        uint32_t cp;
        size_t w = tok_utf8_decode((const uint8_t *)txt + i, len - i, &cp);
        if (!w) w = 1;
        s[ns] = (sym){.prev = ns - 1, .next = i + w < len ? ns + 1 : -1, .off = (uint32_t)i, .len = (uint32_t)w};
        ns++;
        i += w;
    }
    size_t nh = 0;
    for (int32_t i = 0; i + 1 < ns; i++) try_pair(t, txt, s, i, h, &nh);
    while (nh) {
        const bigram b = heap_pop(h, &nh);
        sym *l = &s[b.left];
        if (l->len == 0 || l->next < 0) continue;
        sym *r = &s[l->next];
        if (l->len + r->len != b.len) continue; /* one side changed since it was queued */
        l->len += r->len;
        l->next = r->next;
        if (r->next >= 0) s[r->next].prev = b.left;
        r->len = 0;
        try_pair(t, txt, s, l->prev, h, &nh);
        try_pair(t, txt, s, b.left, h, &nh);
    }
    int rc = DS_OK;
    for (int32_t i = ns ? 0 : -1; i >= 0 && !rc; i = s[i].next) rc = emit(t, txt, &s[i], out);
    free(txt), free(s), free(h);
    return rc;
}
