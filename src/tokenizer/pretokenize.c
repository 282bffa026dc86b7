/* Pre-tokenisation, as HF tokenizers does it for byte-level BPE: NFC, HF Digits(individual_digits), and the family regex applied
 * as HF's Split(Isolated) does — every match and every gap between matches is a piece. */
#include "tokenizer/tok_internal.h"
#include "util/mem.h"
#include "util/sb.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

const char *const tok_regex_text[3] = {
    [TOK_RE_GPT2] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+",
    [TOK_RE_LLAMA3] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
                      "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    [TOK_RE_QWEN2] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
                     "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
};

/* Unicode White_Space, which Oniguruma's \s is; PCRE2's also takes U+180E. Spelled for use inside []. */
static const char k_white_space[] = "\\t\\n\\x{0B}\\f\\r \\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}"
                                    "\\x{202F}\\x{205F}\\x{3000}";

/* "\\p{L}" plus the ranges PCRE2's tables lack, for use inside []. */
static void pb_class(ds_sb *b, const char *prop, tok_uni_class extra) {
    size_t n;
    const tok_range *r = tok_unicode_extra(extra, &n);
    ds_sb_puts(b, prop);
    for (size_t i = 0; i < n; i++) ds_sb_printf(b, "\\x{%X}-\\x{%X}", (unsigned)r[i].lo, (unsigned)r[i].hi);
}

/* Rewrites the four class escapes; everything else is copied. Tracks [...] so an escape inside a class
 * is spliced in and one outside gets its own brackets. */
char *tok_regex_for_pcre2(const char *s) {
    ds_sb b = {0};
    bool in_class = false;
    for (; *s; s++) {
        char one[3] = {s[0], 0, 0};
        if (s[0] == '\\' && s[1]) {
            const char *open = in_class ? "" : "[", *close = in_class ? "" : "]";
            if (!strncmp(s, "\\p{L}", 5) || !strncmp(s, "\\p{N}", 5)) {
                ds_sb_puts(&b, open);
                pb_class(&b, s[3] == 'L' ? "\\p{L}" : "\\p{N}", s[3] == 'L' ? TOK_UNI_LETTER : TOK_UNI_NUMBER);
                ds_sb_puts(&b, close);
                s += 4;
                continue;
            }
            if ((s[1] == 's' || s[1] == 'S') && !(s[1] == 'S' && in_class)) {
                ds_sb_puts(&b, s[1] == 'S' ? "[^" : open);
                ds_sb_puts(&b, k_white_space);
                ds_sb_puts(&b, s[1] == 'S' ? "]" : close);
                s += 1;
                continue;
            }
            one[1] = s[1];
            s++;
        } else if (s[0] == '[' && !in_class) {
            in_class = true;
        } else if (s[0] == ']' && in_class) {
            in_class = false;
        }
        ds_sb_puts(&b, one);
    }
    if (b.oom) {
        ds_sb_free(&b);
        return NULL;
    }
    return b.data;
}

int tok_pre_init(tok_pre *p, ds_err *err) {
    if ((unsigned)p->regex > TOK_RE_QWEN2) return ds_err_set(err, DS_EINVAL, "tokenizer: bad regex kind");
    int ec;
    PCRE2_SIZE eoff;
    char *pattern = tok_regex_for_pcre2(tok_regex_text[p->regex]);
    if (!pattern) return ds_err_set(err, DS_ENOMEM, "tokenizer: out of memory");
    /* UCP: \p{..} and case folding are Unicode-aware, as in Oniguruma. MATCH_INVALID_UTF: invalid bytes
     * never match and simply become gap pieces, so arbitrary input is tokenised byte-wise, never an error. */
    uint32_t opts = PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF;
    p->code = pcre2_compile((PCRE2_SPTR)pattern, PCRE2_ZERO_TERMINATED, opts, &ec, &eoff, NULL);
    free(pattern);
    if (!p->code) {
        PCRE2_UCHAR msg[160];
        pcre2_get_error_message(ec, msg, sizeof msg);
        return ds_err_set(err, DS_EINVAL, "tokenizer: regex compile failed at %zu: %s", (size_t)eoff, (char *)msg);
    }
    /* JIT is an optimisation only: when unavailable pcre2_match interprets. */
    (void)pcre2_jit_compile(p->code, PCRE2_JIT_COMPLETE);
    return DS_OK;
}

void tok_pre_free(tok_pre *p) {
    if (p->code) pcre2_code_free(p->code);
    p->code = NULL;
}

/* One match from `start`; returns 1 with [*ms, *me), 0 when nothing matches, <0 on error. Falls back
 * to the interpreter when the JIT runs out of its (small, machine-stack) frame space. */
static int match_at(const pcre2_code *code, pcre2_match_data *md, const uint8_t *s, size_t n, size_t start, size_t *ms,
                    size_t *me) {
    int rc = pcre2_match(code, (PCRE2_SPTR)s, n, start, 0, md, NULL);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT) rc = pcre2_match(code, (PCRE2_SPTR)s, n, start, PCRE2_NO_JIT, md, NULL);
    if (rc == PCRE2_ERROR_NOMATCH) return 0;
    if (rc < 0) return -1;
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
    *ms = ov[0];
    *me = ov[1];
    return 1;
}

static int regex_split(const tok_pre *p, pcre2_match_data *md, const uint8_t *s, size_t n, tok_piece_fn fn, void *ctx) {
    size_t pos = 0;
    while (pos < n) {
        size_t ms, me;
        int m = match_at(p->code, md, s, n, pos, &ms, &me);
        if (m <= 0 || me <= ms) {
            /* No (or an empty) match, or a matcher error (resource limits on hostile input): the
             * rest is one piece. BPE still encodes it exactly byte-wise. */
            return fn(ctx, s + pos, n - pos);
        }
        int rc = DS_OK;
        if (ms > pos) rc = fn(ctx, s + pos, ms - pos);
        if (!rc) rc = fn(ctx, s + ms, me - ms);
        if (rc) return rc;
        pos = me;
    }
    return DS_OK;
}

/* HF Digits(individual_digits=true): every numeric character is its own piece; the runs between
 * them go on to the regex separately (so " 1" never becomes one piece). */
static int digit_split(const tok_pre *p, pcre2_match_data *md, const uint8_t *s, size_t n, tok_piece_fn fn, void *ctx) {
    size_t run = 0, i = 0;
    while (i < n) {
        uint32_t cp;
        size_t w = tok_utf8_decode(s + i, n - i, &cp);
        if (!w || !tok_is_numeric(cp)) {
            i += w ? w : 1;
            continue;
        }
        int rc = DS_OK;
        if (i > run) rc = regex_split(p, md, s + run, i - run, fn, ctx);
        if (!rc) rc = fn(ctx, s + i, w);
        if (rc) return rc;
        i += w;
        run = i;
    }
    return run < n ? regex_split(p, md, s + run, n - run, fn, ctx) : DS_OK;
}

int tok_pre_split(const tok_pre *p, pcre2_match_data *md, const uint8_t *s, size_t n, tok_piece_fn fn, void *ctx) {
    if (n == 0) return DS_OK;
    return p->split_digits ? digit_split(p, md, s, n, fn, ctx) : regex_split(p, md, s, n, fn, ctx);
}

static int buf_append(uint8_t **buf, size_t *len, size_t *cap, const uint8_t *src, size_t n) {
    if (ds_grow(buf, cap, *len + n, 1)) return DS_ENOMEM;
    if (n) memcpy(*buf + *len, src, n);
    *len += n;
    return DS_OK;
}

/* NFC of one valid UTF-8 run. ASCII is already NFC, which keeps the common case allocation-light. */
static int nfc_run(const uint8_t *s, size_t n, uint8_t **buf, size_t *len, size_t *cap) {
    bool ascii = true;
    for (size_t i = 0; i < n && ascii; i++) ascii = s[i] < 0x80;
    if (ascii) return buf_append(buf, len, cap, s, n);
    utf8proc_uint8_t *dst = NULL;
    utf8proc_ssize_t r = utf8proc_map(s, (utf8proc_ssize_t)n, &dst, UTF8PROC_STABLE | UTF8PROC_COMPOSE);
    if (r < 0) {
        free(dst);
        return r == UTF8PROC_ERROR_NOMEM ? DS_ENOMEM : buf_append(buf, len, cap, s, n);
    }
    int rc = buf_append(buf, len, cap, dst, (size_t)r);
    free(dst);
    return rc;
}

int tok_nfc(const uint8_t *s, size_t n, uint8_t **out, size_t *out_n) {
    uint8_t *buf = NULL;
    size_t len = 0, cap = 0, i = 0, run = 0;
    int rc = DS_OK;
    /* Normalise maximal valid runs; invalid bytes (which NFC cannot see) are copied through. */
    while (i < n && !rc) {
        uint32_t cp;
        size_t w = tok_utf8_decode(s + i, n - i, &cp);
        if (w) {
            i += w;
            continue;
        }
        if (i > run) rc = nfc_run(s + run, i - run, &buf, &len, &cap);
        if (!rc) rc = buf_append(&buf, &len, &cap, s + i, 1);
        run = ++i;
    }
    if (!rc && n > run) rc = nfc_run(s + run, n - run, &buf, &len, &cap);
    if (rc) {
        free(buf);
        return rc;
    }
    *out = buf;
    *out_n = len;
    return DS_OK;
}
