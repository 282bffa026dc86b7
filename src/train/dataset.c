/* Fine-tuning datasets (dataset.h): JSONL lines, chat ({"messages":[...]} with per-message
 * "weight") or {"prompt","completion"}, checked line by line and tokenised into (tokens, labels)
 * examples; only the assistant turns / the completion are labelled. */
#include "train/dataset.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ds/tokenizer.h"
#include "util/json.h"

#define MAX_LINE_ERRORS 5

/* One parsed line, borrowed from its cJSON. */
typedef struct ft_line {
    bool chat;
    const cJSON *messages;          /* chat */
    const char *prompt, *completion; /* prompt/completion */
} ft_line;

/* Checks one line's structure; false with the reason in why. */
static bool parse_line(const cJSON *o, ft_line *out, char *why, size_t cap) {
    memset(out, 0, sizeof *out);
    if (!cJSON_IsObject(o)) return snprintf(why, cap, "not a JSON object"), false;
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(o, "messages");
    if (msgs) {
        if (!cJSON_IsArray(msgs)) return snprintf(why, cap, "'messages' must be an array"), false;
        int n = cJSON_GetArraySize(msgs), n_train = 0;
        if (n == 0) return snprintf(why, cap, "'messages' is empty"), false;
        for (int i = 0; i < n; i++) {
            const cJSON *mm = cJSON_GetArrayItem(msgs, i);
            if (!cJSON_IsObject(mm)) return snprintf(why, cap, "messages[%d] is not an object", i), false;
            const cJSON *role = cJSON_GetObjectItemCaseSensitive(mm, "role");
            const cJSON *content = cJSON_GetObjectItemCaseSensitive(mm, "content");
            const cJSON *weight = cJSON_GetObjectItemCaseSensitive(mm, "weight");
            if (!cJSON_IsString(role) || !role->valuestring[0])
                return snprintf(why, cap, "messages[%d].role must be a non-empty string", i), false;
            if (strcmp(role->valuestring, "system") && strcmp(role->valuestring, "user") &&
                strcmp(role->valuestring, "assistant"))
                return snprintf(why, cap, "messages[%d].role '%.40s' is not system, user or assistant", i,
                                role->valuestring), false;
            if (!cJSON_IsString(content))
                return snprintf(why, cap, "messages[%d].content must be a string", i), false;
            if (weight && !cJSON_IsNull(weight) &&
                !(cJSON_IsNumber(weight) && (weight->valuedouble == 0 || weight->valuedouble == 1)))
                return snprintf(why, cap, "messages[%d].weight must be 0 or 1", i), false;
            bool w = !weight || cJSON_IsNull(weight) || weight->valuedouble != 0;
            if (!strcmp(role->valuestring, "assistant") && w) n_train++;
        }
        if (!n_train) return snprintf(why, cap, "no assistant message to train on"), false;
        out->chat = true, out->messages = msgs;
        return true;
    }
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(o, "prompt");
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(o, "completion");
    if (!p && !c) return snprintf(why, cap, "expected 'messages' or 'prompt' and 'completion'"), false;
    if (!cJSON_IsString(p)) return snprintf(why, cap, "'prompt' must be a string"), false;
    if (!cJSON_IsString(c) || !c->valuestring[0])
        return snprintf(why, cap, "'completion' must be a non-empty string"), false;
    out->prompt = p->valuestring, out->completion = c->valuestring;
    return true;
}

typedef void (*line_fn)(void *ud, int64_t line_no, const ft_line *l);

/* Walks the JSONL text; calls fn for each valid line. Returns the number of examples or DS_EINVAL
 * with the first problems in err. */
static int walk_lines(const char *text, size_t len, line_fn fn, void *ud, ds_err *err) {
    char msg[sizeof err->msg] = "";
    size_t used = 0;
    int n_bad = 0, n_ok = 0;
    int64_t line_no = 0;
    for (size_t pos = 0; pos < len;) {
        const char *nl = memchr(text + pos, '\n', len - pos);
        size_t end = nl ? (size_t)(nl - text) : len;
        line_no++;
        size_t a = pos, b = end;
        while (a < b && (text[a] == ' ' || text[a] == '\t' || text[a] == '\r')) a++;
        while (b > a && (text[b - 1] == ' ' || text[b - 1] == '\t' || text[b - 1] == '\r')) b--;
        pos = end + 1;
        if (a == b) continue;
        char why[200] = "";
        char jwhy[96];
        cJSON *o = ds_json_parse_strict(text + a, b - a, jwhy, sizeof jwhy);
        ft_line l;
        if (!o) snprintf(why, sizeof why, "the line %s", jwhy);
        if (o && parse_line(o, &l, why, sizeof why)) {
            n_ok++;
            if (fn && !n_bad) fn(ud, line_no, &l);
        } else {
            if (n_bad < MAX_LINE_ERRORS && used < sizeof msg)
                used += (size_t)snprintf(msg + used, sizeof msg - used, "%sline %lld: %s", n_bad ? "; " : "",
                                         (long long)line_no, why);
            n_bad++;
        }
        cJSON_Delete(o);
    }
    if (n_bad)
        return ds_err_set(err, DS_EINVAL, "invalid training data: %s%s", msg,
                          n_bad > MAX_LINE_ERRORS ? " (and more)" : "");
    if (!n_ok) return ds_err_set(err, DS_EINVAL, "invalid training data: the file has no examples");
    return n_ok;
}

int ds_ft_data_check(const char *text, size_t len, ds_err *err) { return walk_lines(text, len, NULL, NULL, err); }

void ds_ft_examples_free(ds_ft_examples *s) {
    for (size_t i = 0; i < s->n; i++) free(s->toks[i]), free(s->labs[i]);
    free(s->ex), free(s->toks), free(s->labs);
    memset(s, 0, sizeof *s);
}

typedef struct build_ctx {
    const ds_model *m;
    ds_ft_examples *set;
    int32_t max_ctx;
    int status;
    ds_err *err;
    /* the example being built */
    int32_t *t, *l;
    size_t n, cap;
} build_ctx;

static int append_piece(build_ctx *c, const char *text, size_t len, bool labelled) {
    if (!len) return 0;
    int32_t *ids = NULL;
    size_t n = 0;
    int st = ds_tokenizer_encode(c->m->tok, text, len, false, true, &ids, &n);
    if (st != DS_OK) return st;
    if (c->n + n > c->cap) {
        size_t cap = (c->n + n) * 2 + 64;
        int32_t *t = realloc(c->t, cap * sizeof *t), *l = t ? realloc(c->l, cap * sizeof *l) : NULL;
        if (t) c->t = t;
        if (l) c->l = l;
        if (!t || !l) return free(ids), DS_ENOMEM;
        c->cap = cap;
    }
    for (size_t i = 0; i < n; i++) {
        c->t[c->n] = ids[i];
        c->l[c->n++] = labelled ? ids[i] : DS_TRAIN_IGNORE_INDEX;
    }
    free(ids);
    return 0;
}

static int append_token(build_ctx *c, int32_t id, bool labelled) {
    if (id < 0) return 0;
    if (c->n + 1 > c->cap) {
        size_t cap = c->cap * 2 + 64;
        int32_t *t = realloc(c->t, cap * sizeof *t), *l = t ? realloc(c->l, cap * sizeof *l) : NULL;
        if (t) c->t = t;
        if (l) c->l = l;
        if (!t || !l) return DS_ENOMEM;
        c->cap = cap;
    }
    c->t[c->n] = id;
    c->l[c->n++] = labelled ? id : DS_TRAIN_IGNORE_INDEX;
    return 0;
}

/* Renders msgs[0..k) (k may be 0: ""). */
static int render_prefix(const ds_model *m, const ds_chat_msg *msgs, size_t k, bool gen, const char *def_sys,
                         char **out) {
    if (k == 0) return (*out = strdup("")) ? 0 : DS_ENOMEM;
    return ds_chat_render(ds_chat_detect(m->chat_template), msgs, k, gen, def_sys, out);
}

static int build_chat(build_ctx *c, const cJSON *jm) {
    size_t n = (size_t)cJSON_GetArraySize(jm);
    ds_chat_msg *msgs = calloc(n, sizeof *msgs);
    bool *train = calloc(n, sizeof *train);
    char *def_sys = ds_chat_default_system(c->m->chat_template);
    int st = msgs && train ? 0 : DS_ENOMEM;
    for (size_t i = 0; !st && i < n; i++) {
        const cJSON *mm = cJSON_GetArrayItem(jm, (int)i);
        const cJSON *w = cJSON_GetObjectItemCaseSensitive(mm, "weight");
        msgs[i].role = cJSON_GetObjectItemCaseSensitive(mm, "role")->valuestring;
        msgs[i].content = cJSON_GetObjectItemCaseSensitive(mm, "content")->valuestring;
        train[i] = !strcmp(msgs[i].role, "assistant") && (!w || cJSON_IsNull(w) || w->valuedouble != 0);
    }
    char *prev = NULL;
    if (!st) st = render_prefix(c->m, msgs, 0, false, def_sys, &prev);
    for (size_t k = 1; !st && k <= n; k++) {
        char *cur = NULL, *head = NULL;
        st = render_prefix(c->m, msgs, k, false, def_sys, &cur);
        if (st) break;
        size_t pl = strlen(prev), cl = strlen(cur);
        if (cl < pl || memcmp(cur, prev, pl) != 0) { /* the template is not prefix-stable: label nothing */
            st = append_piece(c, cur + (cl >= pl ? pl : cl), 0, false);
        } else if (train[k - 1]) {
            /* header (unlabelled) = render(k-1, generation prompt) beyond prev; the rest is labelled */
            size_t hl = pl;
            if (k > 1 && render_prefix(c->m, msgs, k - 1, true, def_sys, &head) == 0) {
                size_t h = strlen(head);
                if (h >= pl && h <= cl && !memcmp(head, cur, h)) hl = h;
            }
            st = append_piece(c, cur + pl, hl - pl, false);
            if (!st) st = append_piece(c, cur + hl, cl - hl, true);
        } else {
            st = append_piece(c, cur + pl, cl - pl, false);
        }
        free(head);
        free(prev);
        prev = cur;
    }
    if (st == DS_EINVAL) ds_err_set(c->err, DS_EINVAL, "the messages cannot be rendered with this model's chat template");
    free(prev), free(def_sys), free(msgs), free(train);
    return st;
}

static void build_line(void *ud, int64_t line_no, const ft_line *l) {
    build_ctx *c = ud;
    if (c->status) return;
    c->n = 0;
    int st;
    if (l->chat) {
        st = build_chat(c, l->messages);
    } else {
        st = append_piece(c, l->prompt, strlen(l->prompt), false);
        if (!st) st = append_piece(c, l->completion, strlen(l->completion), true);
        if (!st) st = append_token(c, ds_tokenizer_eos(c->m->tok), true);
    }
    if (st) {
        c->status = st == DS_ENOMEM ? ds_err_set(c->err, DS_ENOMEM, "out of memory building examples")
                                    : ds_err_set(c->err, st, "line %lld: %s", (long long)line_no,
                                                 c->err->msg[0] ? c->err->msg : "cannot tokenize");
        return;
    }
    bool any = false;
    for (size_t i = 1; i < c->n; i++) any |= c->l[i] != DS_TRAIN_IGNORE_INDEX;
    if (!any) return; /* nothing to learn (e.g. an empty assistant turn at position 0) */
    if ((int64_t)c->n > c->max_ctx) {
        c->status = ds_err_set(c->err, DS_ERANGE, "line %lld: the example has %zu tokens, more than the context (%d)",
                               (long long)line_no, c->n, (int)c->max_ctx);
        return;
    }
    ds_ft_examples *s = c->set;
    if (s->n == s->cap) {
        size_t cap = s->cap * 2 + 16;
        ds_train_example *e = realloc(s->ex, cap * sizeof *e);
        if (e) s->ex = e;
        int32_t **t = e ? realloc(s->toks, cap * sizeof *t) : NULL;
        if (t) s->toks = t;
        int32_t **lb = t ? realloc(s->labs, cap * sizeof *lb) : NULL;
        if (lb) s->labs = lb;
        if (!lb) {
            c->status = ds_err_set(c->err, DS_ENOMEM, "out of memory building examples");
            return;
        }
        s->cap = cap;
    }
    s->toks[s->n] = malloc(c->n * sizeof(int32_t));
    s->labs[s->n] = malloc(c->n * sizeof(int32_t));
    if (!s->toks[s->n] || !s->labs[s->n]) {
        free(s->toks[s->n]), free(s->labs[s->n]);
        c->status = ds_err_set(c->err, DS_ENOMEM, "out of memory building examples");
        return;
    }
    memcpy(s->toks[s->n], c->t, c->n * sizeof(int32_t));
    memcpy(s->labs[s->n], c->l, c->n * sizeof(int32_t));
    s->ex[s->n] = (ds_train_example){s->toks[s->n], s->labs[s->n], (int32_t)c->n};
    s->n_tokens += (int64_t)c->n;
    if ((int32_t)c->n > s->max_len) s->max_len = (int32_t)c->n;
    s->n++;
}

int ds_ft_examples_build(const ds_model *m, const char *text, size_t len, ds_ft_examples *out, ds_err *err) {
    memset(out, 0, sizeof *out);
    if (!m->tok) return ds_err_set(err, DS_EUNSUPPORTED, "the model has no tokenizer");
    build_ctx c = {.m = m, .set = out, .max_ctx = m->cfg.max_ctx > 0 ? m->cfg.max_ctx : 2048, .err = err};
    err->msg[0] = '\0';
    int st = walk_lines(text, len, build_line, &c, err);
    free(c.t), free(c.l);
    if (st < 0) return ds_ft_examples_free(out), st;
    if (c.status) return ds_ft_examples_free(out), c.status;
    if (!out->n) return ds_err_set(err, DS_EINVAL, "invalid training data: no example has a token to train on");
    return 0;
}
