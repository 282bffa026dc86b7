/* deltaserve — the string builder: a growable, NUL-terminated byte buffer with printf and JSON
 * string escaping. Used wherever text is assembled piecewise (HTTP responses, OpenAI bodies,
 * metrics, chat templates, tokenizer patterns). No globals: any thread may use its own ds_sb. */
#ifndef DS_UTIL_SB_H
#define DS_UTIL_SB_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A NUL-terminated growable buffer. On allocation failure `oom` latches, further appends are
 * no-ops, and the caller checks `oom` once at the end (ds_sb_ok). Zero-initialise or ds_sb_init. */
typedef struct ds_sb {
    char *data; /* malloc'd, NUL-terminated when non-NULL; owned, freed by ds_sb_free */
    size_t len;
    size_t cap;
    bool oom;
} ds_sb;

void ds_sb_init(ds_sb *b);
void ds_sb_free(ds_sb *b);
void ds_sb_reset(ds_sb *b); /* len = 0, keeps the allocation, clears oom */
static inline bool ds_sb_ok(const ds_sb *b) { return !b->oom; }
void ds_sb_append(ds_sb *b, const char *s, size_t n);
void ds_sb_puts(ds_sb *b, const char *s);
void ds_sb_printf(ds_sb *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void ds_sb_vprintf(ds_sb *b, const char *fmt, va_list ap);
/* True when s[0..n) is well-formed UTF-8 (RFC 3629: no overlongs, surrogates or code points past
 * U+10FFFF), i.e. what ds_sb_json_str writes unchanged. */
bool ds_utf8_valid(const char *s, size_t n);
/* Appends `s` (n bytes, may contain NUL) as a quoted JSON string. Invalid UTF-8 bytes become
 * U+FFFD so the output is always valid JSON, whatever a tokenizer hands us. */
void ds_sb_json_str(ds_sb *b, const char *s, size_t n);
/* Appends a JSON number; non-finite values become -9999.0 (vLLM's clamp for -inf logprobs). */
void ds_sb_json_num(ds_sb *b, double v);

#ifdef __cplusplus
}
#endif
#endif
