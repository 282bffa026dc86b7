/* Encoding: added-token splitting (HF AddedVocabulary semantics), normalisation, pre-tokenisation and
 * BPE, wired together. Everything here only reads the tokenizer, so encode is thread-safe; per-call
 * state (match data, BPE scratch) lives in enc_ctx. */
#include "tokenizer/tok_internal.h"
#include "util/mem.h"

#include <stdlib.h>
#include <string.h>

/* ---- trie over added-token contents (leftmost-longest matching, like HF's Aho-Corasick) ---- */

static int32_t trie_new_node(tok_trie *tr, uint8_t byte) {
    if (DS_GROW(tr->nodes, tr->cap, tr->n_nodes + 1)) return -1;
    tr->nodes[tr->n_nodes] = (tok_trie_node){-1, -1, -1, byte};
    return (int32_t)tr->n_nodes++;
}

static int32_t trie_child(tok_trie *tr, int32_t node, uint8_t byte, bool create) {
    int32_t c = tr->nodes[node].child;
    while (c >= 0 && tr->nodes[c].byte != byte) c = tr->nodes[c].sibling;
    if (c >= 0 || !create) return c;
    c = trie_new_node(tr, byte);
    if (c < 0) return -1;
    tr->nodes[c].sibling = tr->nodes[node].child;
    tr->nodes[node].child = c;
    return c;
}

int tok_trie_insert(tok_trie *tr, const uint8_t *s, size_t n, int32_t idx) {
    int32_t node = tr->root[s[0]];
    if (node < 0) {
        node = trie_new_node(tr, s[0]);
        if (node < 0) return DS_ENOMEM;
        tr->root[s[0]] = node;
    }
    for (size_t i = 1; i < n; i++) {
        node = trie_child(tr, node, s[i], true);
        if (node < 0) return DS_ENOMEM;
    }
    if (tr->nodes[node].added < 0) tr->nodes[node].added = idx; /* first of duplicate contents wins */
    tr->empty = false;
    return DS_OK;
}

void tok_trie_init(tok_trie *tr) {
    memset(tr, 0, sizeof *tr);
    for (int i = 0; i < 256; i++) tr->root[i] = -1;
    tr->empty = true;
}

int tok_trie_build(tok_trie *tr, const tok_added *added, size_t n_added, bool normalized) {
    tok_trie_init(tr);
    for (size_t i = 0; i < n_added; i++) {
        if (added[i].normalized != normalized || added[i].len == 0) continue;
        int rc = tok_trie_insert(tr, (const uint8_t *)added[i].content, added[i].len, (int32_t)i);
        if (rc) return rc;
        tr->empty = false;
    }
    return DS_OK;
}

void tok_trie_free(tok_trie *tr) {
    free(tr->nodes);
    tr->nodes = NULL;
    tr->n_nodes = tr->cap = 0;
}

/* Length of the longest added token starting at s[pos], 0 if none; *which = its index. */
static size_t trie_longest(const tok_trie *tr, const uint8_t *s, size_t n, size_t pos, int32_t *which) {
    int32_t node = tr->root[s[pos]];
    size_t best = 0;
    for (size_t i = pos; node >= 0;) {
        if (tr->nodes[node].added >= 0) {
            best = i - pos + 1;
            *which = tr->nodes[node].added;
        }
        if (++i >= n) break;
        int32_t c = tr->nodes[node].child;
        while (c >= 0 && tr->nodes[c].byte != s[i]) c = tr->nodes[c].sibling;
        node = c;
    }
    return best;
}

/* ---- the \w / \s checks HF applies around a match ---- */

/* The code point ending at s[end), or -1 when there is none or it is not valid UTF-8. */
static int64_t cp_before(const uint8_t *s, size_t end, size_t *start) {
    for (size_t k = 1; k <= 4 && k <= end; k++) {
        if ((s[end - k] & 0xC0) == 0x80) continue;
        uint32_t cp;
        if (tok_utf8_decode(s + end - k, k, &cp) != k) return -1;
        *start = end - k;
        return cp;
    }
    return -1;
}

static size_t ws_start_before(const uint8_t *s, size_t end) {
    size_t st;
    int64_t cp;
    while (end > 0 && (cp = cp_before(s, end, &st)) >= 0 && tok_is_white_space((uint32_t)cp)) end = st;
    return end;
}

static size_t ws_len_after(const uint8_t *s, size_t n) {
    size_t i = 0, w;
    uint32_t cp;
    while (i < n && (w = tok_utf8_decode(s + i, n - i, &cp)) && tok_is_white_space(cp)) i += w;
    return i;
}

static bool single_word_ok(const uint8_t *s, size_t n, size_t start, size_t stop) {
    size_t st;
    uint32_t cp;
    int64_t before = start ? cp_before(s, start, &st) : -1;
    if (before >= 0 && tok_is_word((uint32_t)before)) return false;
    return stop == n || !tok_utf8_decode(s + stop, n - stop, &cp) || !tok_is_word(cp);
}

/* ---- the pipeline ---- */

typedef struct enc_ctx {
    const ds_tokenizer *t;
    bool parse_special;
    /* ranges of the original text where special tokens stay text (ds_tokenizer_encode_plain) */
    const ds_text_span *plain;
    size_t n_plain;
    const uint8_t *text;   /* the original text, to place a match in it */
    int copy;              /* matching in a normalised copy (positions are not the text's): 0 no,
                            * 1 of a gap clear of plain ranges, 2 of a gap touching one */
    bool prev_special;     /* SentencePiece: the next fragment starts the text or follows an added token */
    bool at_start;         /* nothing of the text has been encoded yet (Metaspace prepend_scheme "first") */
    tok_ids ids;
    bpe_scratch sc;
    pcre2_match_data *md;
} enc_ctx;

typedef int (*gap_fn)(enc_ctx *c, const uint8_t *s, size_t n);

/* Whether special tokens are plain text at s[start, stop): inside a plain range of the original text,
 * or anywhere in a normalised copy of a gap that touches one (its positions no longer map). */
static bool plain_at(const enc_ctx *c, const uint8_t *s, size_t start, size_t stop) {
    if (!c->n_plain) return false;
    if (c->copy) return c->copy == 2;
    const size_t a = (size_t)(s - c->text) + start, b = (size_t)(s - c->text) + stop;
    for (size_t i = 0; i < c->n_plain; i++)
        if (c->plain[i].start < b && a < c->plain[i].end) return true;
    return false;
}

/* HF AddedVocabulary::find_matches: non-overlapping leftmost-longest matches; a match that fails its
 * single_word test or is a special token while special parsing is off stays plain text (and still
 * hides any shorter token inside it, as the automaton has moved past it). lstrip / rstrip swallow
 * adjacent whitespace into the token. */
static int split_added(enc_ctx *c, const tok_trie *tr, const uint8_t *s, size_t n, gap_fn on_gap) {
    if (tr->empty) return on_gap(c, s, n);
    size_t done = 0, pos = 0;
    int rc = DS_OK;
    while (pos < n && !rc) {
        int32_t which = -1;
        size_t len = trie_longest(tr, s, n, pos, &which);
        if (!len) {
            pos++;
            continue;
        }
        size_t start = pos, stop = pos + len;
        pos = stop;
        const tok_added *a = &c->t->added[which];
        if (stop <= done || (a->special && (!c->parse_special || plain_at(c, s, start, stop)))) continue;
        if (a->single_word && !single_word_ok(s, n, start, stop)) continue;
        if (a->lstrip) start = ws_start_before(s, start);
        if (start < done) start = done;
        if (a->rstrip) stop += ws_len_after(s + stop, n - stop);
        if (start > done) rc = on_gap(c, s + done, start - done);
        if (!rc) rc = tok_ids_push(&c->ids, a->id);
        c->prev_special = true;
        c->at_start = false;
        done = stop;
    }
    if (!rc && done < n) rc = on_gap(c, s + done, n - done);
    return rc;
}

static int on_piece(void *ctx, const uint8_t *piece, size_t len) {
    enc_ctx *c = ctx;
    return bpe_encode_piece(c->t, piece, len, &c->sc, &c->ids);
}

static int gap_pretokenize(enc_ctx *c, const uint8_t *s, size_t n) {
    if (c->t->meta.on) {
        const bool first = c->at_start;
        c->at_start = false;
        return tok_meta_encode(c->t, s, n, first, &c->sc, &c->ids);
    }
    if (c->t->spm) { /* SentencePiece: the whole fragment at once, no pre-tokeniser */
        const bool prefix = c->t->space_prefix && c->prev_special;
        c->prev_special = false;
        return tok_spm_encode(c->t, s, n, prefix, &c->ids);
    }
    return tok_pre_split(&c->t->pre, c->md, s, n, on_piece, c);
}

/* Each gap left by the raw added tokens is normalised on its own (HF normalises per split), then the
 * normalized added tokens are matched in it. */
static int gap_normalize(enc_ctx *c, const uint8_t *s, size_t n) {
    const bool meta = c->t->meta.on && (c->t->meta.norm_prepend || c->t->meta.norm_replace);
    if (!c->t->pre.nfc && !meta) return split_added(c, &c->t->trie_norm, s, n, gap_pretokenize);
    uint8_t *buf = NULL;
    size_t len = 0;
    int rc = meta ? tok_meta_normalize(c->t, s, n, &buf, &len) : tok_nfc(s, n, &buf, &len);
    /* In the copy, special tokens stay text if the gap touches a plain range at all. */
    bool touches = false;
    for (size_t i = 0; i < c->n_plain && c->text; i++)
        touches |= c->plain[i].start < (size_t)(s - c->text) + n && (size_t)(s - c->text) < c->plain[i].end;
    c->copy = touches ? 2 : 1;
    if (!rc) rc = split_added(c, &c->t->trie_norm, buf, len, gap_pretokenize);
    c->copy = 0;
    free(buf);
    return rc;
}

static int encode(const ds_tokenizer *t, const char *text, size_t len, bool add_special, bool parse_special,
                  const ds_text_span *plain, size_t n_plain, int32_t **ids, size_t *n_ids) {
    if (!t || !ids || !n_ids || (!text && len) || (n_plain && !plain)) return DS_EINVAL;
    *ids = NULL;
    *n_ids = 0;
    enc_ctx c = {.t = t, .parse_special = parse_special, .plain = plain, .n_plain = n_plain,
                 .text = (const uint8_t *)text, .prev_special = true, .at_start = true};
    c.md = pcre2_match_data_create(1, NULL);
    /* Allocated up front so success never hands back NULL, even for no ids. */
    c.ids.cap = 16 + (len < ((size_t)1 << 22) ? len / 2 : ((size_t)1 << 21));
    c.ids.v = malloc(c.ids.cap * sizeof *c.ids.v);
    if (!c.md || !c.ids.v) {
        pcre2_match_data_free(c.md);
        free(c.ids.v);
        return DS_ENOMEM;
    }
    int rc = DS_OK;
    if (add_special && t->add_bos && t->bos >= 0) rc = tok_ids_push(&c.ids, t->bos);
    if (!rc && len) rc = split_added(&c, &t->trie_raw, (const uint8_t *)text, len, gap_normalize);
    if (!rc && add_special && t->add_eos && t->eos >= 0) rc = tok_ids_push(&c.ids, t->eos);
    pcre2_match_data_free(c.md);
    bpe_scratch_free(&c.sc);
    if (rc) {
        free(c.ids.v);
        return rc;
    }
    *ids = c.ids.v;
    *n_ids = c.ids.n;
    return DS_OK;
}

int ds_tokenizer_encode(const ds_tokenizer *t, const char *text, size_t len, bool add_special, bool parse_special,
                        int32_t **ids, size_t *n_ids) {
    return encode(t, text, len, add_special, parse_special, NULL, 0, ids, n_ids);
}

int ds_tokenizer_encode_plain(const ds_tokenizer *t, const char *text, size_t len, bool add_special,
                              const ds_text_span *plain, size_t n_plain, int32_t **ids, size_t *n_ids) {
    return encode(t, text, len, add_special, true, plain, n_plain, ids, n_ids);
}
