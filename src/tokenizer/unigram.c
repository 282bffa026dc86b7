/* Unigram language-model tokenisation as HF tokenizers does it (models/unigram/model.rs
 * encode_optimized, after sentencepiece's unigram_model.cc): Viterbi over the byte positions of the
 * piece, where every vocab piece that starts at a character boundary is an edge scored by its log
 * probability, and a character no single-character piece covers is an unk edge scored
 * min_score - 10. Ties keep the first path found (shorter pieces are found first). On the way back,
 * consecutive unks are fused; a string that is not a piece becomes its <0xXX> tokens when
 * byte_fallback has them all, else unk. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tok_internal.h"

#define UNK_PENALTY 10.0

typedef struct node {
    double score;    /* best path ending here */
    int32_t start;   /* where its last piece starts; -1: no path yet */
    int32_t id;
} node;

int tok_unigram_build(ds_tokenizer *t, const tok_spec *s) {
    tok_trie_init(&t->upieces);
    t->uscore = malloc(sizeof *t->uscore * (size_t)s->n_vocab);
    if (!t->uscore) return DS_ENOMEM;
    t->umin = INFINITY;
    for (int32_t i = 0; i < s->n_vocab; i++) {
        t->uscore[i] = s->uscores[i];
        if (!s->tokens[i]) continue;
        if (s->uscores[i] < t->umin) t->umin = s->uscores[i];
        const size_t len = strlen(s->tokens[i]);
        if (len && tok_trie_insert(&t->upieces, (const uint8_t *)s->tokens[i], len, i)) return DS_ENOMEM;
    }
    if (!isfinite(t->umin)) t->umin = 0;
    return DS_OK;
}

static void relax(node *nd, size_t at, double score, int32_t start, int32_t id) {
    if (nd[at].start < 0 || score > nd[at].score) nd[at] = (node){score, start, id};
}

/* The string s[a, b) as tokens: its piece, else its bytes' tokens, else unk. */
static int emit(const ds_tokenizer *t, const uint8_t *s, size_t a, size_t b, tok_ids *out) {
    int32_t id;
    if (ds_strmap_get(t->vocab, (const char *)s + a, b - a, &id)) return tok_ids_push(out, id);
    bool all = t->meta.byte_fallback;
    for (size_t k = a; all && k < b; k++) all = t->byte_tok[s[k]] >= 0;
    if (!all) return t->unk_id >= 0 ? tok_ids_push(out, t->unk_id) : DS_OK;
    for (size_t k = a; k < b; k++) {
        int rc = tok_ids_push(out, t->byte_tok[s[k]]);
        if (rc) return rc;
    }
    return DS_OK;
}

/* Walks the path back from n, fusing unks, and emits it in order. */
static int backtrack(const ds_tokenizer *t, const uint8_t *s, size_t n, const node *nd, tok_ids *out) {
    size_t *cut = malloc(sizeof *cut * (n + 1)), nc = 0; /* string boundaries, from the end */
    if (!cut) return DS_ENOMEM;
    cut[nc++] = n;
    bool in_unk = false;
    for (size_t end = n; end > 0;) {
        const node *x = &nd[end];
        const bool unk = t->meta.fuse_unk && x->id == t->unk_id;
        if (in_unk && unk) nc--; /* extend the fused unk leftwards */
        cut[nc++] = (size_t)x->start;
        in_unk = unk;
        end = (size_t)x->start;
    }
    int rc = DS_OK;
    for (size_t i = nc - 1; i > 0 && !rc; i--) rc = emit(t, s, cut[i], cut[i - 1], out);
    free(cut);
    return rc;
}

int tok_unigram_encode(const ds_tokenizer *t, const uint8_t *s, size_t n, tok_ids *out) {
    if (!n) return DS_OK;
    if (n > INT32_MAX / 2) return DS_ERANGE;
    node *nd = malloc(sizeof *nd * (n + 1));
    uint8_t *boundary = calloc(n + 1, 1);
    if (!nd || !boundary) {
        free(nd), free(boundary);
        return DS_ENOMEM;
    }
    for (size_t i = 0; i <= n; i++) nd[i] = (node){0, -1, -1};
    for (size_t i = 0; i < n;) { /* character boundaries; an invalid byte is a character of its own */
        uint32_t cp;
        size_t w = tok_utf8_decode(s + i, n - i, &cp);
        boundary[i] = 1;
        i += w ? w : 1;
    }
    boundary[n] = 1;
    const double unk_score = t->umin - UNK_PENALTY;
    for (size_t at = 0; at < n;) {
        const double base = nd[at].score;
        uint32_t cp;
        size_t mblen = tok_utf8_decode(s + at, n - at, &cp);
        if (!mblen) mblen = 1;
        bool single = false;
        int32_t node_i = t->upieces.root[s[at]];
        for (size_t k = at; node_i >= 0;) { /* every piece that is a prefix of s[at..] */
            const int32_t id = t->upieces.nodes[node_i].added;
            const size_t end = k + 1;
            if (id >= 0 && boundary[end]) {
                relax(nd, end, t->uscore[id] + base, (int32_t)at, id);
                single |= end - at == mblen;
            }
            if (end >= n) break;
            int32_t c = t->upieces.nodes[node_i].child;
            while (c >= 0 && t->upieces.nodes[c].byte != s[end]) c = t->upieces.nodes[c].sibling;
            node_i = c;
            k = end;
        }
        if (!single) relax(nd, at + mblen, unk_score + base, (int32_t)at, t->unk_id);
        at += mblen;
    }
    int rc = backtrack(t, s, n, nd, out);
    free(nd), free(boundary);
    return rc;
}
