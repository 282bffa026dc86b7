/* Chat templates for the families deltaserve serves, rendered natively instead of through a Jinja
 * engine: each renderer reproduces transformers' apply_chat_template output for the family's
 * canonical template byte for byte (tests/data/tokenizer/chat_golden.json), including its whitespace
 * filters (Jinja `trim` / Python str.strip) and the exceptions it raises. */
#include "ds/tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tokenizer/tok_internal.h"
#include "util/mem.h"
#include "util/sb.h"


/* Python str.isspace(), which Jinja's `trim` and str.strip() use: White_Space plus U+001C..U+001F. */
static bool py_space(uint32_t c) { return (c >= 0x1C && c <= 0x1F) || tok_is_white_space(c); }

/* Appends s stripped of leading and trailing Python whitespace; *lo_out / *hi_out (may be NULL):
 * the byte range of s that was kept. */
static void sb_strip_range(ds_sb *b, const char *s, size_t *lo_out, size_t *hi_out) {
    const uint8_t *u = (const uint8_t *)s;
    size_t n = strlen(s), lo = 0, hi = n, w;
    uint32_t cp;
    while (lo < n && (w = tok_utf8_decode(u + lo, n - lo, &cp)) && py_space(cp)) lo += w;
    while (hi > lo) {
        size_t k = 1;
        while (k < 4 && k < hi - lo && (u[hi - k] & 0xC0) == 0x80) k++;
        if (tok_utf8_decode(u + hi - k, k, &cp) != k || !py_space(cp)) break;
        hi -= k;
    }
    ds_sb_append(b, s + lo, hi - lo);
    if (lo_out) *lo_out = lo;
    if (hi_out) *hi_out = hi;
}

static void sb_strip(ds_sb *b, const char *s) { sb_strip_range(b, s, NULL, NULL); }

/* Where the client's message contents landed in the rendered text (for encoding them with
 * special-token parsing off): a growable list, or NULL when the caller does not ask. */
typedef struct spans {
    ds_text_span *v;
    size_t n, cap;
    bool oom;
} spans;

static void span_add(spans *sv, size_t start, size_t end) {
    if (!sv || start >= end) return;
    if (DS_GROW(sv->v, sv->cap, sv->n + 1)) {
        sv->oom = true;
        return;
    }
    sv->v[sv->n++] = (ds_text_span){start, end};
}

/* Appends a message's content (client text unless it is the template's default system prompt). */
static void put_content(ds_sb *b, const char *s, bool client, spans *sv) {
    const size_t a = b->len;
    ds_sb_puts(b, s);
    if (client) span_add(sv, a, b->len);
}

static bool role_ok(const char *r) {
    if (!r || !*r) return false;
    for (; *r; r++)
        if (!((*r >= 'a' && *r <= 'z') || (*r >= 'A' && *r <= 'Z') || (*r >= '0' && *r <= '9') || *r == '_' ||
              *r == '-'))
            return false;
    return true;
}

static bool is_role(const ds_chat_msg *m, const char *role) { return !strcmp(m->role, role); }

/* The conversation as the template sees it: an optional default system message, then msgs. */
typedef struct conv {
    const ds_chat_msg *msgs;
    size_t n;
    ds_chat_msg sys; /* used when has_sys */
    bool has_sys;
} conv;

static const ds_chat_msg *conv_at(const conv *c, size_t i) {
    if (c->has_sys) return i == 0 ? &c->sys : &c->msgs[i - 1];
    return &c->msgs[i];
}

static bool from_client(const conv *c, size_t i) { return !(c->has_sys && i == 0); }

static size_t conv_len(const conv *c) { return c->n + (c->has_sys ? 1 : 0); }

/* SmolLM2 / Qwen2: '<|im_start|>' + role + '\n' + content + '<|im_end|>' + '\n'. */
static int render_chatml(const conv *c, bool gen, ds_sb *b, spans *sv) {
    for (size_t i = 0; i < conv_len(c); i++) {
        const ds_chat_msg *m = conv_at(c, i);
        ds_sb_puts(b, "<|im_start|>");
        ds_sb_puts(b, m->role);
        ds_sb_puts(b, "\n");
        put_content(b, m->content, from_client(c, i), sv);
        ds_sb_puts(b, "<|im_end|>\n");
    }
    if (gen) ds_sb_puts(b, "<|im_start|>assistant\n");
    return DS_OK;
}

/* Meta-Llama-3-Instruct: bos before the first message, content | trim. */
static int render_llama3(const conv *c, bool gen, ds_sb *b, spans *sv) {
    for (size_t i = 0; i < conv_len(c); i++) {
        const ds_chat_msg *m = conv_at(c, i);
        if (i == 0) ds_sb_puts(b, "<|begin_of_text|>");
        ds_sb_puts(b, "<|start_header_id|>");
        ds_sb_puts(b, m->role);
        ds_sb_puts(b, "<|end_header_id|>\n\n");
        const size_t a = b->len;
        sb_strip(b, m->content);
        if (from_client(c, i)) span_add(sv, a, b->len);
        ds_sb_puts(b, "<|eot_id|>");
    }
    if (gen) ds_sb_puts(b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
    return DS_OK;
}

/* Llama-2-chat: a leading system message folds into the first turn as <<SYS>>; every user turn opens
 * with bos; the whole turn text (system block included) is str.strip()'d. */
static int render_llama2(const conv *c, ds_sb *b, spans *sv) {
    size_t first = 0;
    const char *sys = NULL;
    if (conv_len(c) && is_role(conv_at(c, 0), "system")) {
        sys = conv_at(c, 0)->content;
        first = 1;
    }
    for (size_t i = first; i < conv_len(c); i++) {
        const ds_chat_msg *m = conv_at(c, i);
        bool user = is_role(m, "user");
        if (user != ((i - first) % 2 == 0)) return DS_EINVAL; /* roles must alternate */
        ds_sb turn = {0};
        size_t cs[2][2] = {{0, 0}, {0, 0}}; /* client text in the turn: system, then message */
        if (i == first && sys) {
            ds_sb_puts(&turn, "<<SYS>>\n");
            cs[0][0] = turn.len;
            ds_sb_puts(&turn, sys);
            cs[0][1] = from_client(c, 0) ? turn.len : cs[0][0];
            ds_sb_puts(&turn, "\n<</SYS>>\n\n");
        }
        cs[1][0] = turn.len;
        ds_sb_puts(&turn, m->content);
        cs[1][1] = turn.len;
        if (turn.oom) {
            ds_sb_free(&turn);
            return DS_ENOMEM;
        }
        if (user || is_role(m, "assistant")) {
            ds_sb_puts(b, user ? "<s>[INST] " : " ");
            const size_t a = b->len;
            size_t lo, hi;
            sb_strip_range(b, turn.data, &lo, &hi);
            for (int k = 0; k < 2; k++) { /* the kept part [lo, hi) of the turn starts at a */
                const size_t s0 = cs[k][0] > lo ? cs[k][0] : lo, s1 = cs[k][1] < hi ? cs[k][1] : hi;
                if (s1 > s0) span_add(sv, a + s0 - lo, a + s1 - lo);
            }
            ds_sb_puts(b, user ? " [/INST]" : " </s>");
        }
        ds_sb_free(&turn);
    }
    return DS_OK;
}

/* Mistral / Mixtral instruct: one bos, no stripping, only alternating user / assistant. */
static int render_mistral(const conv *c, ds_sb *b, spans *sv) {
    ds_sb_puts(b, "<s>");
    for (size_t i = 0; i < conv_len(c); i++) {
        const ds_chat_msg *m = conv_at(c, i);
        bool user = is_role(m, "user");
        if (user != (i % 2 == 0)) return DS_EINVAL;
        if (user) {
            ds_sb_puts(b, "[INST] ");
            put_content(b, m->content, true, sv);
            ds_sb_puts(b, " [/INST]");
        } else if (is_role(m, "assistant")) {
            put_content(b, m->content, true, sv);
            ds_sb_puts(b, "</s>");
        } else {
            return DS_EINVAL;
        }
    }
    return DS_OK;
}

/* Llama 3.1 / 3.3 (meta-llama/Llama-3.1-8B-Instruct, without tools): bos, a system block that always
 * states the knowledge cutoff and the template's default date, the system message | trim after it;
 * every other turn as Llama-3 (content | trim), "tool" / "ipython" turns as ipython with the content
 * | tojson (a string is iterable to Jinja), i.e. json.dumps(ensure_ascii=False). */
static void put_json_string(ds_sb *b, const char *s) {
    ds_sb_puts(b, "\"");
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        const char *esc = *p == '"' ? "\\\"" : *p == '\\' ? "\\\\" : *p == '\n' ? "\\n" : *p == '\r' ? "\\r"
                          : *p == '\t' ? "\\t" : *p == '\b' ? "\\b" : *p == '\f' ? "\\f" : NULL;
        char u[8];
        if (!esc && *p < 0x20) snprintf(u, sizeof u, "\\u%04x", *p), esc = u;
        if (esc) ds_sb_puts(b, esc);
        else ds_sb_append(b, (const char *)p, 1);
    }
    ds_sb_puts(b, "\"");
}

static int render_llama31(const conv *c, bool gen, bool today, ds_sb *b, spans *sv) {
    size_t first = 0;
    char date[32] = "26 Jul 2024";
    if (today) { /* Llama 3.2's strftime_now("%d %b %Y"): transformers' datetime.now(), local time */
        time_t now = time(NULL);
        struct tm tm;
        if (!localtime_r(&now, &tm) || !strftime(date, sizeof date, "%d %b %Y", &tm)) return DS_EINVAL;
    }
    ds_sb_puts(b, "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                  "Cutting Knowledge Date: December 2023\nToday Date: ");
    ds_sb_puts(b, date);
    ds_sb_puts(b, "\n\n");
    if (conv_len(c) && is_role(conv_at(c, 0), "system")) {
        const size_t a = b->len;
        sb_strip(b, conv_at(c, 0)->content);
        if (from_client(c, 0)) span_add(sv, a, b->len);
        first = 1;
    }
    ds_sb_puts(b, "<|eot_id|>");
    for (size_t i = first; i < conv_len(c); i++) {
        const ds_chat_msg *m = conv_at(c, i);
        const bool tool = is_role(m, "tool") || is_role(m, "ipython");
        ds_sb_puts(b, "<|start_header_id|>");
        ds_sb_puts(b, tool ? "ipython" : m->role);
        ds_sb_puts(b, "<|end_header_id|>\n\n");
        const size_t a = b->len;
        if (tool) put_json_string(b, m->content);
        else sb_strip(b, m->content);
        if (from_client(c, i)) span_add(sv, a, b->len);
        ds_sb_puts(b, "<|eot_id|>");
    }
    if (gen) ds_sb_puts(b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
    return DS_OK;
}

/* Phi-3 (microsoft/Phi-3-mini-4k-instruct): '<|' + role + '|>\n' + content + '<|end|>\n' for system,
 * user and assistant, any other role dropped, nothing stripped; then '<|assistant|>\n', or the eos
 * '<|endoftext|>' without a generation prompt. Phi-3.5 also drops a system message whose content is
 * empty ("message['role'] == 'system' and message['content']"). */
static int render_phi3(const conv *c, bool gen, bool skip_empty_system, ds_sb *b, spans *sv) {
    for (size_t i = 0; i < conv_len(c); i++) {
        const ds_chat_msg *m = conv_at(c, i);
        if (!is_role(m, "system") && !is_role(m, "user") && !is_role(m, "assistant")) continue;
        if (skip_empty_system && is_role(m, "system") && !*m->content) continue;
        ds_sb_puts(b, "<|");
        ds_sb_puts(b, m->role);
        ds_sb_puts(b, "|>\n");
        put_content(b, m->content, from_client(c, i), sv);
        ds_sb_puts(b, "<|end|>\n");
    }
    ds_sb_puts(b, gen ? "<|assistant|>\n" : "<|endoftext|>");
    return DS_OK;
}

/* Gemma 3 (google/gemma-3-*-it): bos; a leading system message becomes a prefix (content + "\n\n",
 * untrimmed) of the first turn; turns must alternate user / assistant from a user turn;
 * '<start_of_turn>' + ("model" for the assistant, else the role) + '\n' + content | trim +
 * '<end_of_turn>\n'; the generation prompt is '<start_of_turn>model\n'. */
static int render_gemma3(const conv *c, bool gen, ds_sb *b, spans *sv) {
    size_t first = 0;
    ds_sb_puts(b, "<bos>");
    if (conv_len(c) && is_role(conv_at(c, 0), "system")) first = 1;
    for (size_t i = first; i < conv_len(c); i++) {
        const ds_chat_msg *m = conv_at(c, i);
        if (is_role(m, "user") != ((i - first) % 2 == 0)) return DS_EINVAL;
        ds_sb_puts(b, "<start_of_turn>");
        ds_sb_puts(b, is_role(m, "assistant") ? "model" : m->role);
        ds_sb_puts(b, "\n");
        if (i == first && first) {
            put_content(b, conv_at(c, 0)->content, from_client(c, 0), sv);
            ds_sb_puts(b, "\n\n");
        }
        const size_t a = b->len;
        sb_strip(b, m->content);
        if (from_client(c, i)) span_add(sv, a, b->len);
        ds_sb_puts(b, "<end_of_turn>\n");
    }
    if (gen) ds_sb_puts(b, "<start_of_turn>model\n");
    return DS_OK;
}

ds_chat_format ds_chat_detect(const char *t) {
    if (!t) return DS_CHAT_CHATML;
    if (strstr(t, "<|im_start|>")) return DS_CHAT_CHATML;
    if (strstr(t, "<|start_header_id|>"))
        return !strstr(t, "Cutting Knowledge Date") ? DS_CHAT_LLAMA3
               : strstr(t, "strftime_now")          ? DS_CHAT_LLAMA32
                                                    : DS_CHAT_LLAMA31;
    if (strstr(t, "<start_of_turn>")) return DS_CHAT_GEMMA3;
    if (strstr(t, "<|user|>") && strstr(t, "<|end|>"))
        return strstr(t, "'system' and message['content']") ? DS_CHAT_PHI35 : DS_CHAT_PHI3;
    if (strstr(t, "[INST]")) return strstr(t, "<<SYS>>") ? DS_CHAT_LLAMA2 : DS_CHAT_MISTRAL;
    return DS_CHAT_CHATML;
}

int ds_chat_render(ds_chat_format fmt, const ds_chat_msg *msgs, size_t n_msgs, bool add_generation_prompt,
                   const char *default_system, char **out) {
    return ds_chat_render_spans(fmt, msgs, n_msgs, add_generation_prompt, default_system, out, NULL, NULL);
}

int ds_chat_render_spans(ds_chat_format fmt, const ds_chat_msg *msgs, size_t n_msgs, bool add_generation_prompt,
                         const char *default_system, char **out, ds_text_span **content, size_t *n_content) {
    if (!out) return DS_EINVAL;
    *out = NULL;
    if (content) *content = NULL;
    if (n_content) *n_content = 0;
    spans sv = {0}, *svp = content && n_content ? &sv : NULL;
    /* transformers refuses an empty conversation before the template runs. */
    if (!msgs || !n_msgs) return DS_EINVAL;
    for (size_t i = 0; i < n_msgs; i++)
        if (!role_ok(msgs[i].role) || !msgs[i].content) return DS_EINVAL;
    conv c = {.msgs = msgs, .n = n_msgs};
    if (default_system && fmt != DS_CHAT_MISTRAL && !is_role(&msgs[0], "system")) {
        c.sys = (ds_chat_msg){"system", default_system};
        c.has_sys = true;
    }
    ds_sb b = {0};
    int rc;
    switch (fmt) {
    case DS_CHAT_CHATML: rc = render_chatml(&c, add_generation_prompt, &b, svp); break;
    case DS_CHAT_LLAMA3: rc = render_llama3(&c, add_generation_prompt, &b, svp); break;
    case DS_CHAT_LLAMA2: rc = render_llama2(&c, &b, svp); break;
    case DS_CHAT_MISTRAL: rc = render_mistral(&c, &b, svp); break;
    case DS_CHAT_LLAMA31: rc = render_llama31(&c, add_generation_prompt, false, &b, svp); break;
    case DS_CHAT_LLAMA32: rc = render_llama31(&c, add_generation_prompt, true, &b, svp); break;
    case DS_CHAT_PHI3: rc = render_phi3(&c, add_generation_prompt, false, &b, svp); break;
    case DS_CHAT_PHI35: rc = render_phi3(&c, add_generation_prompt, true, &b, svp); break;
    case DS_CHAT_GEMMA3: rc = render_gemma3(&c, add_generation_prompt, &b, svp); break;
    default: rc = DS_EINVAL;
    }
    if (!rc && (b.oom || sv.oom)) rc = DS_ENOMEM;
    if (!rc && !b.data) ds_sb_append(&b, "", 0); /* a valid empty string, never NULL, on success */
    if (!rc && b.oom) rc = DS_ENOMEM;
    if (rc) {
        free(b.data);
        free(sv.v);
        return rc;
    }
    *out = b.data;
    if (svp) *content = sv.v, *n_content = sv.n;
    return DS_OK;
}

/* Reads one Jinja string-literal body starting at s, up to "<|im_end|>", undoing \-escapes. Fails
 * (NULL) when the literal ends first — then the text was an expression such as
 * '<|im_start|>system\n' + messages[0]['content'], not a fixed prompt. */
static char *literal_until_im_end(const char *s, char quote) {
    ds_sb b = {0};
    for (const char *p = s; *p; p++) {
        if (!strncmp(p, "<|im_end|>", 10)) {
            if (!b.data) ds_sb_append(&b, "", 0);
            if (b.oom) break;
            return b.data;
        }
        if (*p == quote) break;
        if (*p == '\\' && p[1]) {
            p++;
            char c = *p == 'n' ? '\n' : *p == 't' ? '\t' : *p == 'r' ? '\r' : *p;
            ds_sb_append(&b, &c, 1);
            continue;
        }
        ds_sb_append(&b, p, 1);
    }
    free(b.data);
    return NULL;
}

char *ds_chat_default_system(const char *t) {
    static const char mark[] = "<|im_start|>system";
    if (!t || !strstr(t, "messages[0]")) return NULL;
    for (const char *p = strstr(t, mark); p; p = strstr(p + 1, mark)) {
        /* The literal's delimiter: the nearest quote before the marker. */
        const char *q = p;
        while (q > t && q[-1] != '\'' && q[-1] != '"') q--;
        if (q == t) continue;
        const char *body = p + sizeof mark - 1;
        if (*body == '\n')
            body++;
        else if (body[0] == '\\' && body[1] == 'n')
            body += 2;
        else
            continue;
        char *sys = literal_until_im_end(body, q[-1]);
        if (sys) return sys;
    }
    return NULL;
}
