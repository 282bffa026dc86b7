#include "prompt.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rng.h"

/* Common English words that are one token each (with the leading space) in Llama 2/3, Mistral,
 * Qwen and GPT-2/4 vocabularies; all lower case, so no word merges with its neighbour. */
static const char *const k_words[] = {
    "the", "of", "and", "to", "in", "is", "was", "for", "that", "with", "as", "on", "by", "he",
    "it", "at", "from", "his", "an", "were", "are", "which", "this", "be", "or", "has", "had",
    "not", "first", "one", "their", "its", "new", "after", "but", "who", "they", "have", "her",
    "she", "two", "been", "other", "when", "there", "all", "also", "into", "during", "time",
    "would", "more", "school", "over", "up", "only", "most", "may", "can", "three", "world",
    "city", "some", "where", "between", "later", "year", "years", "out", "made", "state", "about",
    "many", "used", "then", "under", "while", "no", "such", "known", "him", "them", "both",
    "through", "before", "part", "team", "well", "being", "since", "war", "game", "season",
    "family", "people", "house", "music", "life", "film", "work", "use", "day", "group", "number",
    "way", "same", "early", "long", "great", "town", "name", "water", "home", "line", "river",
    "end", "high", "back", "each", "against", "found", "four", "second", "five", "system",
    "until", "around", "last", "old", "small", "large", "best", "book", "road", "area", "church",
    "member", "power", "side", "local", "public", "north", "south", "east", "west", "place",
    "left", "right", "make", "take", "play", "show", "point", "form", "set", "head", "hand",
    "country", "week", "month", "night", "light", "story", "field", "party", "door",
    "word", "women", "men", "child", "king", "love", "land", "room", "sea", "star", "tree",
    "car", "air", "fire", "food", "money", "art", "law", "body", "mind", "eye", "face",
    "voice", "heart", "earth", "sun", "moon", "rain", "snow", "wind", "stone", "gold", "iron",
    "glass", "paper", "table", "chair", "bed", "window", "wall", "floor", "garden", "bridge",
    "island", "village", "market", "office", "bank", "station", "train", "ship", "plane",
    "horse", "dog", "bird", "fish", "song", "letter", "question", "answer", "reason",
    "idea", "plan", "order", "change", "report", "result", "study", "level", "rate", "value",
};
#define N_WORDS (sizeof(k_words) / sizeof(k_words[0]))

char *dsb_prompt_words(uint64_t seed, int n_tokens) {
    if (n_tokens < 1) n_tokens = 1;
    dsb_rng rng;
    dsb_rng_seed(&rng, seed, 0x70726f6d7074ull);
    size_t cap = (size_t)n_tokens * 9 + 1, len = 0;
    char *s = malloc(cap);
    if (!s) return NULL;
    for (int i = 0; i < n_tokens; i++) {
        const char *w = k_words[dsb_rng_below(&rng, N_WORDS)];
        size_t wl = strlen(w);
        if (len + wl + 2 > cap) { /* words are <= 8 bytes, so this never triggers; keep it safe */
            char *t = realloc(s, cap * 2);
            if (!t) {
                free(s);
                return NULL;
            }
            s = t;
            cap *= 2;
        }
        if (i > 0) s[len++] = ' ';
        memcpy(s + len, w, wl);
        len += wl;
    }
    s[len] = '\0';
    return s;
}

cJSON *dsb_prompt_token_ids(uint64_t seed, int n, int vocab_size) {
    if (n < 1) n = 1;
    if (vocab_size < 2) vocab_size = 2;
    int lo = vocab_size / 2 < 1000 ? vocab_size / 2 : 1000;
    dsb_rng rng;
    dsb_rng_seed(&rng, seed, 0x746f6b656e73ull);
    cJSON *arr = cJSON_CreateArray();
    if (!arr) return NULL;
    for (int i = 0; i < n; i++) {
        int id = lo + (int)dsb_rng_below(&rng, (uint64_t)(vocab_size - lo));
        cJSON *v = cJSON_CreateNumber(id);
        if (!v) {
            cJSON_Delete(arr);
            return NULL;
        }
        cJSON_AddItemToArray(arr, v);
    }
    return arr;
}

int dsb_count_words(const char *s) {
    int n = 0;
    bool in_word = false;
    for (; s && *s; s++) {
        bool space = isspace((unsigned char)*s) != 0;
        if (!space && !in_word) n++;
        in_word = !space;
    }
    return n;
}

/* ---- JSONL files --------------------------------------------------------------------------- */

typedef int (*line_fn)(const cJSON *obj, dsb_records *out, char *err, size_t errlen);

static int aref_parse(const cJSON *a, dsb_aref *out, char *err, size_t errlen) {
    memset(out, 0, sizeof(*out));
    if (!a) return 0;
    if (cJSON_IsNull(a) || (cJSON_IsString(a) && (a->valuestring[0] == '\0' ||
                                                  strcmp(a->valuestring, "base") == 0))) {
        out->kind = DSB_AREF_BASE;
    } else if (cJSON_IsString(a)) {
        out->kind = DSB_AREF_NAME;
        out->name = strdup(a->valuestring);
        if (!out->name) return snprintf(err, errlen, "out of memory"), -1;
    } else if (cJSON_IsNumber(a) && a->valuedouble >= 0 && a->valuedouble < 1e6 &&
               a->valuedouble == floor(a->valuedouble)) {
        out->kind = DSB_AREF_INDEX;
        out->index = (int)a->valuedouble;
    } else {
        snprintf(err, errlen, "\"adapter\" must be a name, a non-negative index or null");
        return -1;
    }
    return 0;
}

/* Reads a positive integer field (first of two names present); 0 when absent. */
static int int_field(const cJSON *o, const char *k1, const char *k2, int *out, char *err, size_t errlen) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k1);
    if (!v && k2) v = cJSON_GetObjectItemCaseSensitive(o, k2);
    *out = 0;
    if (!v) return 0;
    if (!cJSON_IsNumber(v) || v->valuedouble < 1 || v->valuedouble > 1e7) {
        snprintf(err, errlen, "\"%s\" must be an integer in [1, 1e7]", k1);
        return -1;
    }
    *out = (int)v->valuedouble;
    return 0;
}

static char *join_messages(const cJSON *msgs) {
    size_t len = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, msgs) {
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(m, "content");
        if (cJSON_IsString(c)) len += strlen(c->valuestring) + 1;
    }
    char *s = malloc(len + 1), *p = s;
    if (!s) return NULL;
    cJSON_ArrayForEach(m, msgs) {
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(m, "content");
        if (!cJSON_IsString(c)) continue;
        if (p != s) *p++ = '\n';
        size_t l = strlen(c->valuestring);
        memcpy(p, c->valuestring, l);
        p += l;
    }
    *p = '\0';
    return s;
}

static int prompt_line(const cJSON *o, dsb_records *out, char *err, size_t errlen) {
    dsb_prompt_rec *r = &out->prompts[out->n];
    memset(r, 0, sizeof(*r));
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(o, "prompt");
    if (!t) t = cJSON_GetObjectItemCaseSensitive(o, "text");
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(o, "messages");
    if (cJSON_IsString(t)) {
        r->text = strdup(t->valuestring);
    } else if (cJSON_IsArray(msgs) && cJSON_GetArraySize(msgs) > 0) {
        r->messages = cJSON_Duplicate(msgs, 1);
        r->text = join_messages(msgs);
    } else {
        snprintf(err, errlen, "need a \"prompt\" string or a non-empty \"messages\" array");
        return -1;
    }
    if (!r->text) return snprintf(err, errlen, "out of memory"), -1;
    r->est_tokens = dsb_count_words(r->text);
    if (int_field(o, "output_len", "max_tokens", &r->output_len, err, errlen) != 0) return -1;
    if (aref_parse(cJSON_GetObjectItemCaseSensitive(o, "adapter"), &r->adapter, err, errlen) != 0) return -1;
    out->n++;
    return 0;
}

static int trace_line(const cJSON *o, dsb_records *out, char *err, size_t errlen) {
    dsb_trace_rec *r = &out->trace[out->n];
    memset(r, 0, sizeof(*r));
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(o, "timestamp");
    if (!t) t = cJSON_GetObjectItemCaseSensitive(o, "time");
    if (!t) t = cJSON_GetObjectItemCaseSensitive(o, "t");
    if (!cJSON_IsNumber(t) || !isfinite(t->valuedouble) || t->valuedouble < 0) {
        snprintf(err, errlen, "need a non-negative \"timestamp\" in seconds");
        return -1;
    }
    r->t = t->valuedouble;
    if (int_field(o, "input_len", NULL, &r->input_len, err, errlen) != 0) return -1;
    if (int_field(o, "output_len", NULL, &r->output_len, err, errlen) != 0) return -1;
    if (r->input_len == 0 || r->output_len == 0) {
        snprintf(err, errlen, "need \"input_len\" and \"output_len\"");
        return -1;
    }
    if (aref_parse(cJSON_GetObjectItemCaseSensitive(o, "adapter"), &r->adapter, err, errlen) != 0) return -1;
    out->n++;
    return 0;
}

static int grow(dsb_records *out, size_t *cap, bool trace) {
    if (out->n < *cap) return 0;
    size_t c = *cap ? *cap * 2 : 64;
    void *p = trace ? realloc(out->trace, c * sizeof(dsb_trace_rec)) : realloc(out->prompts, c * sizeof(dsb_prompt_rec));
    if (!p) return -1;
    if (trace) out->trace = p;
    else out->prompts = p;
    *cap = c;
    return 0;
}

/* A line function that failed may have filled part of record out->n (not yet counted). */
static void free_partial(dsb_records *out, bool trace) {
    if (trace) {
        free(out->trace[out->n].adapter.name);
        return;
    }
    dsb_prompt_rec *r = &out->prompts[out->n];
    free(r->text);
    cJSON_Delete(r->messages);
    free(r->adapter.name);
}

static bool blank_or_comment(const char *s) {
    while (isspace((unsigned char)*s)) s++;
    return *s == '\0' || *s == '#';
}

static int load_jsonl(const char *path, dsb_records *out, bool trace, char *err, size_t errlen) {
    memset(out, 0, sizeof(*out));
    FILE *f = fopen(path, "r");
    if (!f) return snprintf(err, errlen, "%s: %s", path, strerror(errno)), -1;
    char *line = NULL, msg[200];
    size_t line_cap = 0, cap = 0;
    long lineno = 0;
    int rc = 0;
    while (rc == 0 && getline(&line, &line_cap, f) >= 0) {
        lineno++;
        if (blank_or_comment(line)) continue;
        cJSON *o = cJSON_Parse(line);
        if (!cJSON_IsObject(o)) {
            snprintf(msg, sizeof(msg), "not a JSON object");
            rc = -1;
        } else if (grow(out, &cap, trace) != 0) {
            snprintf(msg, sizeof(msg), "out of memory");
            rc = -1;
        } else {
            rc = (trace ? trace_line : prompt_line)(o, out, msg, sizeof(msg));
            if (rc != 0) free_partial(out, trace);
        }
        cJSON_Delete(o);
        if (rc != 0) snprintf(err, errlen, "%s:%ld: %s", path, lineno, msg);
    }
    free(line);
    fclose(f);
    if (rc == 0 && out->n == 0) rc = (snprintf(err, errlen, "%s: no records", path), -1);
    if (rc != 0) dsb_records_free(out);
    return rc;
}

int dsb_prompts_load(const char *path, dsb_records *out, char *err, size_t errlen) {
    return load_jsonl(path, out, false, err, errlen);
}

static int cmp_trace(const void *a, const void *b) {
    double x = ((const dsb_trace_rec *)a)->t, y = ((const dsb_trace_rec *)b)->t;
    return (x > y) - (x < y);
}

int dsb_trace_load(const char *path, dsb_records *out, char *err, size_t errlen) {
    if (load_jsonl(path, out, true, err, errlen) != 0) return -1;
    /* Traces may be recorded out of order; qsort is not stable, ties are fine either way. */
    qsort(out->trace, out->n, sizeof(dsb_trace_rec), cmp_trace);
    double t0 = out->trace[0].t;
    for (size_t i = 0; i < out->n; i++) out->trace[i].t -= t0;
    return 0;
}

void dsb_records_free(dsb_records *r) {
    for (size_t i = 0; r->prompts && i < r->n; i++) {
        free(r->prompts[i].text);
        cJSON_Delete(r->prompts[i].messages);
        free(r->prompts[i].adapter.name);
    }
    for (size_t i = 0; r->trace && i < r->n; i++) free(r->trace[i].adapter.name);
    free(r->prompts);
    free(r->trace);
    memset(r, 0, sizeof(*r));
}
