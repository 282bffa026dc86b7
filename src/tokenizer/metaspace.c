/* SentencePiece vocabularies in HF tokenizer.json: the steps transformers' converters write
 * (transformers/convert_slow_tokenizer.py LlamaConverter, GemmaConverter, SpmConverter), as
 * tokenizers 0.2x runs them:
 *   normalizer Prepend("▁"): "▁" before every non-empty split (Llama legacy, sentencepiece's dummy
 *     prefix after each special token too); Replace(" ", "▁"): every space;
 *   pre_tokenizer Metaspace: spaces to "▁", then "▁" in front unless the split already starts with
 *     one — always, or (prepend_scheme "first") only for the split that starts the text; with split,
 *     a piece starts at every "▁" (MergedWithNext);
 *   model BPE over characters (bpe.c) or Unigram (unigram.c). */
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tok_internal.h"

static const uint8_t k_meta[3] = {0xE2, 0x96, 0x81}; /* U+2581 */

static bool is_meta(const uint8_t *s, size_t n) { return n >= 3 && !memcmp(s, k_meta, 3); }

/* Writes s[0..n) with every space as "▁" (and one "▁" in front when pre) into out (3 + 3n bytes). */
static size_t escape(const uint8_t *s, size_t n, bool pre, bool spaces, uint8_t *out) {
    size_t len = 0;
    if (pre) memcpy(out, k_meta, 3), len = 3;
    for (size_t i = 0; i < n; i++) {
        if (spaces && s[i] == ' ') memcpy(out + len, k_meta, 3), len += 3;
        else out[len++] = s[i];
    }
    return len;
}

int tok_meta_normalize(const ds_tokenizer *t, const uint8_t *s, size_t n, uint8_t **out, size_t *out_n) {
    if (n > (SIZE_MAX - 3) / 3) return DS_ERANGE;
    uint8_t *buf = malloc(3 + 3 * n);
    if (!buf) return DS_ENOMEM;
    *out_n = escape(s, n, t->meta.norm_prepend && n, t->meta.norm_replace, buf);
    *out = buf;
    return DS_OK;
}

static int model(const ds_tokenizer *t, const uint8_t *s, size_t n, bpe_scratch *sc, tok_ids *out) {
    if (!n) return DS_OK;
    return t->meta.unigram ? tok_unigram_encode(t, s, n, out) : bpe_encode_chars(t, s, n, sc, out);
}

int tok_meta_encode(const ds_tokenizer *t, const uint8_t *s, size_t n, bool first, bpe_scratch *sc, tok_ids *out) {
    const tok_meta *m = &t->meta;
    if (!m->pre_metaspace) return model(t, s, n, sc, out); /* the normaliser did the spaces */
    if (n > (SIZE_MAX - 3) / 3) return DS_ERANGE;
    uint8_t *buf = malloc(3 + 3 * n);
    if (!buf) return DS_ENOMEM;
    const bool starts = (n && s[0] == ' ') || is_meta(s, n);
    const bool pre = !starts && (m->prepend == TOK_PREPEND_ALWAYS || (m->prepend == TOK_PREPEND_FIRST && first));
    const size_t len = escape(s, n, pre, true, buf);
    int rc = DS_OK;
    if (!m->split) {
        rc = model(t, buf, len, sc, out);
    } else { /* a piece ends before each "▁" (except one at its start) */
        size_t start = 0;
        for (size_t i = 1; i <= len && !rc; i++) {
            if (i < len && !is_meta(buf + i, len - i)) continue;
            rc = model(t, buf + start, i - start, sc, out);
            start = i;
        }
    }
    free(buf);
    return rc;
}
