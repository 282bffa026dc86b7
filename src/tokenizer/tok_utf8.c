/* UTF-8 decoding, lossy repair and the character classes HF `tokenizers` uses around added tokens. */
#include "tokenizer/tok_internal.h"
#include "util/mem.h"

#include <stdlib.h>
#include <utf8proc.h>

/* Allowed range of the second byte of a sequence led by b (Unicode Table 3-7), or 0 when b cannot
 * lead a multi-byte sequence. Encodes width in the high byte: (width << 16) | (lo << 8) | hi. */
static uint32_t lead_info(uint8_t b) {
    if (b >= 0xC2 && b <= 0xDF) return (2u << 16) | (0x80 << 8) | 0xBF;
    if (b == 0xE0) return (3u << 16) | (0xA0 << 8) | 0xBF;
    if (b == 0xED) return (3u << 16) | (0x80 << 8) | 0x9F; /* no surrogates */
    if (b >= 0xE1 && b <= 0xEF) return (3u << 16) | (0x80 << 8) | 0xBF;
    if (b == 0xF0) return (4u << 16) | (0x90 << 8) | 0xBF; /* no overlongs */
    if (b >= 0xF1 && b <= 0xF3) return (4u << 16) | (0x80 << 8) | 0xBF;
    if (b == 0xF4) return (4u << 16) | (0x80 << 8) | 0x8F; /* <= U+10FFFF */
    return 0;
}

/* Classifies the sequence at s: returns its width when complete and valid; otherwise returns 0 and
 * sets *bad to the length of the maximal invalid subpart, or to 0 when the available bytes are a
 * valid prefix cut short by the end of input. */
static size_t seq_check(const uint8_t *s, size_t n, size_t *bad) {
    *bad = 1;
    if (s[0] < 0x80) return 1;
    uint32_t info = lead_info(s[0]);
    if (!info) return 0;
    size_t width = info >> 16;
    for (size_t k = 1; k < width; k++) {
        if (k >= n) {
            *bad = 0;
            return 0;
        }
        uint8_t lo = k == 1 ? (uint8_t)(info >> 8) : 0x80, hi = k == 1 ? (uint8_t)info : 0xBF;
        if (s[k] < lo || s[k] > hi) {
            *bad = k;
            return 0;
        }
    }
    return width;
}

size_t tok_utf8_decode(const uint8_t *s, size_t n, uint32_t *cp) {
    if (n == 0) return 0;
    size_t bad, w = seq_check(s, n, &bad);
    if (!w) return 0;
    static const uint8_t mask[5] = {0, 0x7F, 0x1F, 0x0F, 0x07};
    uint32_t c = s[0] & mask[w];
    for (size_t k = 1; k < w; k++) c = (c << 6) | (s[k] & 0x3F);
    *cp = c;
    return w;
}

size_t tok_utf8_encode(uint32_t cp, uint8_t *out) {
    if (cp < 0x80) {
        out[0] = (uint8_t)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (uint8_t)(0xC0 | (cp >> 6));
        out[1] = (uint8_t)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (uint8_t)(0xE0 | (cp >> 12));
        out[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (uint8_t)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (uint8_t)(0xF0 | (cp >> 18));
    out[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (uint8_t)(0x80 | (cp & 0x3F));
    return 4;
}

bool tok_utf8_valid(const uint8_t *s, size_t n) {
    size_t i = 0, bad;
    while (i < n) {
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        size_t w = seq_check(s + i, n - i, &bad);
        if (!w) return false;
        i += w;
    }
    return true;
}

static void put(uint8_t *out, size_t cap, size_t at, const uint8_t *src, size_t len) {
    if (!out) return;
    for (size_t k = 0; k < len && at + k < cap; k++) out[at + k] = src[k];
}

size_t tok_utf8_lossy(const uint8_t *s, size_t n, bool final, uint8_t *out, size_t cap, size_t *consumed) {
    static const uint8_t fffd[3] = {0xEF, 0xBF, 0xBD};
    size_t i = 0, o = 0, bad;
    while (i < n) {
        size_t w = seq_check(s + i, n - i, &bad);
        if (w) {
            put(out, cap, o, s + i, w);
            o += w;
            i += w;
            continue;
        }
        if (bad == 0 && !final) break; /* a valid prefix: wait for the rest */
        put(out, cap, o, fffd, 3);
        o += 3;
        i += bad ? bad : n - i;
    }
    *consumed = i;
    return o;
}

/* Unicode White_Space (PropList.txt); what Rust's regex \s and char::is_whitespace match. */
bool tok_is_white_space(uint32_t c) {
    if (c == 0x20 || (c >= 0x09 && c <= 0x0D)) return true;
    if (c < 0x85) return false;
    return c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
           c == 0x202F || c == 0x205F || c == 0x3000;
}

/* Rust regex \w = Alphabetic + M + Nd + Pc + Join_Control. Alphabetic is L + Nl + Other_Alphabetic;
 * the Other_Alphabetic code points outside the mark categories are the circled / squared letters. */
bool tok_is_word(uint32_t c) {
    if (c < 0x80) return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    if (c == 0x200C || c == 0x200D) return true;
    if ((c >= 0x24B6 && c <= 0x24E9) || (c >= 0x1F130 && c <= 0x1F149) || (c >= 0x1F150 && c <= 0x1F169) ||
        (c >= 0x1F170 && c <= 0x1F189) || tok_unicode_extra_has(TOK_UNI_WORD, c))
        return true;
    switch (utf8proc_category((utf8proc_int32_t)c)) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC:
    case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_PC: return true;
    default: return false;
    }
}

bool tok_is_numeric(uint32_t c) {
    if (c < 0x80) return c >= '0' && c <= '9';
    utf8proc_category_t k = utf8proc_category((utf8proc_int32_t)c);
    return k == UTF8PROC_CATEGORY_ND || k == UTF8PROC_CATEGORY_NL || k == UTF8PROC_CATEGORY_NO ||
           tok_unicode_extra_has(TOK_UNI_NUMERIC, c);
}

/* GPT-2 bytes_to_unicode in closed form: the 68 unprintable bytes are 0-32, 127-160 and 173, numbered
 * in byte order from U+0100. */
uint32_t tok_byte_to_cp(uint8_t b) {
    if (b <= 32) return 256u + b;
    if (b >= 127 && b <= 160) return 256u + 33 + (b - 127u);
    if (b == 173) return 256u + 67;
    return b;
}

int tok_cp_to_byte(uint32_t cp) {
    if ((cp >= 33 && cp <= 126) || (cp >= 161 && cp <= 172) || (cp >= 174 && cp <= 255)) return (int)cp;
    if (cp >= 256 && cp <= 288) return (int)(cp - 256);
    if (cp >= 289 && cp <= 322) return (int)(cp - 289 + 127);
    if (cp == 323) return 173;
    return -1;
}

int tok_ids_push(tok_ids *ids, int32_t id) {
    if (DS_GROW(ids->v, ids->cap, ids->n + 1)) return DS_ENOMEM;
    ids->v[ids->n++] = id;
    return DS_OK;
}
