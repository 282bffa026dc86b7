/* Sequence bookkeeping and the token → text → event path, incl. stop strings. */
#include "engine/seq.h"
#include "util/mem.h"

#include <stdlib.h>
#include <string.h>

static int copy_request(ds_seq *s, const ds_gen_request *r) {
    s->n_prompt = (int32_t)r->n_prompt;
    s->max_tokens = r->max_tokens;
    s->min_tokens = r->min_tokens;
    s->ignore_eos = r->ignore_eos;
    s->include_stop_str = r->include_stop_str;
    s->skip_special = r->skip_special;
    s->top_logprobs = r->top_logprobs > DS_MAX_TOP_LOGPROBS ? DS_MAX_TOP_LOGPROBS : r->top_logprobs;
    s->on_event = r->on_event;
    s->user = r->user;
    for (int i = 0; i < DS_MAX_STOP && r->stop[i]; i++) {
        if (!r->stop[i][0]) continue;
        if (!(s->stop[s->n_stop] = ds_strdup(r->stop[i]))) return DS_ENOMEM;
        size_t l = strlen(r->stop[i]);
        if (l > s->max_stop_len) s->max_stop_len = l;
        s->n_stop++;
    }
    if (r->n_stop_token_ids > 0) {
        s->stop_ids = malloc(sizeof(int32_t) * (size_t)r->n_stop_token_ids);
        if (!s->stop_ids) return DS_ENOMEM;
        memcpy(s->stop_ids, r->stop_token_ids, sizeof(int32_t) * (size_t)r->n_stop_token_ids);
        s->n_stop_ids = r->n_stop_token_ids;
    }
    s->cap_tokens = s->n_virt + s->n_prompt + s->max_tokens;
    s->tokens = calloc((size_t)s->cap_tokens, sizeof(int32_t));
    if (!s->tokens) return DS_ENOMEM;
    memcpy(s->tokens + s->n_virt, r->prompt, sizeof(int32_t) * r->n_prompt);
    s->n_tokens = s->n_virt + s->n_prompt;
    return DS_OK;
}

ds_seq *ds_seq_create(uint64_t id, const ds_gen_request *req, int32_t n_vocab, int32_t n_virt) {
    ds_seq *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->id = id;
    s->n_virt = n_virt;
    s->adapter_slot = -1;
    s->arrival_ns = ds_time_ns();
    if (copy_request(s, req) != DS_OK || ds_sampler_init(&s->sampler, &req->sampling, n_vocab, id * 7919u + ds_time_ns()) != DS_OK) {
        ds_seq_free(s);
        return NULL;
    }
    return s;
}

void ds_seq_free(ds_seq *s) {
    if (!s) return;
    for (int i = 0; i < s->n_stop; i++) free(s->stop[i]);
    free(s->stop_ids);
    free(s->tokens);
    free(s->blocks);
    free(s->held);
    ds_sampler_free(&s->sampler);
    free(s);
}

static void emit_token(ds_seq *s, int32_t token, const char *text, size_t len, const ds_gen_event *lp) {
    ds_gen_event ev;
    if (lp) {
        ev = *lp;
    } else {
        memset(&ev, 0, sizeof ev);
    }
    ev.type = DS_EV_TOKEN;
    ev.request_id = s->id;
    ev.user = s->user;
    ev.token = token;
    ev.text = text;
    ev.text_len = len;
    s->on_event(&ev);
}

static int held_append(ds_seq *s, const char *p, size_t n) {
    if (ds_grow(&s->held, &s->held_cap, s->held_len + n + 1, 1)) return DS_ENOMEM;
    memcpy(s->held + s->held_len, p, n);
    s->held_len += n;
    s->held[s->held_len] = 0;
    return DS_OK;
}

/* Length of the longest suffix of held that is a proper prefix of some stop string: that much
 * must wait for the next token before it can be emitted. */
static size_t stop_prefix_suffix(const ds_seq *s) {
    size_t best = 0;
    for (int i = 0; i < s->n_stop; i++) {
        size_t sl = strlen(s->stop[i]);
        size_t maxk = sl - 1 < s->held_len ? sl - 1 : s->held_len;
        for (size_t k = maxk; k > best; k--)
            if (!memcmp(s->held + s->held_len - k, s->stop[i], k)) {
                best = k;
                break;
            }
    }
    return best;
}

/* Looks for a stop string in the held text. Returns the cut position (text to emit) or -1. */
static long find_stop(const ds_seq *s) {
    long cut = -1;
    for (int i = 0; i < s->n_stop; i++) {
        const char *hit = memmem(s->held, s->held_len, s->stop[i], strlen(s->stop[i]));
        if (!hit) continue;
        long end = (long)(hit - s->held) + (s->include_stop_str ? (long)strlen(s->stop[i]) : 0);
        long start = (long)(hit - s->held);
        if (cut < 0 || start < cut) cut = s->include_stop_str ? end : start;
    }
    return cut;
}

static bool is_stop_token(const ds_seq *s, const ds_tokenizer *tok, int32_t t) {
    for (int32_t i = 0; i < s->n_stop_ids; i++)
        if (s->stop_ids[i] == t) return true;
    return !s->ignore_eos && tok && ds_tokenizer_is_eog(tok, t);
}

/* Token → complete UTF-8 text appended to held. The output of one push is at most 3 × the token's
 * bytes + 12 (U+FFFD for invalid bytes), so a token too long for the stack buffer gets a heap one
 * rather than losing text. */
static int detok_append(ds_seq *s, const ds_tokenizer *tok, int32_t token) {
    char stack[512];
    size_t len = 0;
    if (!ds_tokenizer_token_bytes(tok, token, &len)) len = 0;
    const size_t cap = 3 * len + 16;
    char *buf = cap <= sizeof stack ? stack : malloc(cap);
    if (!buf) return DS_ENOMEM;
    int n = ds_detok_push(tok, &s->detok, token, s->skip_special, buf, cap <= sizeof stack ? sizeof stack : cap);
    int st = n > 0 ? held_append(s, buf, (size_t)n) : n < 0 ? n : DS_OK;
    if (buf != stack) free(buf);
    return st;
}

ds_finish_reason ds_seq_accept(ds_seq *s, const ds_tokenizer *tok, int32_t token, const float *raw_logits,
                               int32_t n_vocab, int32_t max_ctx) {
    ds_gen_event lp;
    memset(&lp, 0, sizeof lp);
    if (s->top_logprobs >= 0 && raw_logits) {
        lp.logprob = ds_logprobs(raw_logits, n_vocab, token, lp.top, s->top_logprobs);
        lp.n_top = s->top_logprobs;
    }
    s->tokens[s->n_tokens++] = token;
    s->n_gen++;
    if (!s->first_token_ns) {
        s->first_token_ns = ds_time_ns();
        lp.queue_s = s->sched_ns > s->arrival_ns ? (float)((double)(s->sched_ns - s->arrival_ns) * 1e-9) : 0.0f;
    }
    const bool may_stop = s->n_gen > s->min_tokens;
    if (may_stop && is_stop_token(s, tok, token)) {
        emit_token(s, token, "", 0, &lp);
        return DS_FINISH_STOP;
    }
    if (tok && detok_append(s, tok, token) != DS_OK) return DS_FINISH_ERROR;
    long cut = (may_stop && s->n_stop) ? find_stop(s) : -1;
    if (cut >= 0) {
        emit_token(s, token, s->held ? s->held : "", (size_t)cut, &lp);
        s->held_len = 0;
        return DS_FINISH_STOP;
    }
    size_t keep = s->n_stop ? stop_prefix_suffix(s) : 0;
    size_t out = s->held_len - keep;
    emit_token(s, token, s->held ? s->held : "", out, &lp);
    if (keep) memmove(s->held, s->held + out, keep);
    s->held_len = keep;
    if (s->n_gen >= s->max_tokens || s->n_prefix + s->n_tokens >= max_ctx) return DS_FINISH_LENGTH;
    return DS_FINISH_NONE;
}

void ds_seq_finish(ds_seq *s, ds_finish_reason why) {
    char tail[16];
    int n = ds_detok_flush(&s->detok, tail, sizeof tail);
    if (why != DS_FINISH_STOP && why != DS_FINISH_CANCEL) {
        if (n > 0) held_append(s, tail, (size_t)n);
        if (s->held_len) emit_token(s, -1, s->held, s->held_len, NULL);
    }
    s->held_len = 0;
    ds_gen_event ev;
    memset(&ev, 0, sizeof ev);
    ev.type = DS_EV_DONE;
    ev.request_id = s->id;
    ev.user = s->user;
    ev.finish = why;
    ev.prompt_tokens = s->n_prompt;
    ev.completion_tokens = s->n_gen;
    s->state = SEQ_FINISHED;
    s->on_event(&ev);
}

void ds_seq_fail(ds_seq *s, int status, const char *msg) {
    ds_gen_event ev;
    memset(&ev, 0, sizeof ev);
    ev.type = DS_EV_ERROR;
    ev.request_id = s->id;
    ev.user = s->user;
    ev.finish = DS_FINISH_ERROR;
    ev.status = status;
    ev.message = msg;
    ev.prompt_tokens = s->n_prompt;
    ev.completion_tokens = s->n_gen;
    s->state = SEQ_FINISHED;
    s->on_event(&ev);
}
