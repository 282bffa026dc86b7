/* Fine-tuning jobs: JSONL datasets → (tokens, labels) examples, a FIFO of jobs run one at a time by
 * a training thread, PEFT checkpoints under the adapter directory, and publication in the registry
 * (include/ds/train.h, "Fine-tuning jobs").
 *
 * The training thread drives a job (datasets, epochs, checkpoints, events); each trainer step and
 * evaluation is handed to the engine thread when an engine is attached (ds_engine_set_background:
 * training takes at most --train-budget of the engine's time while requests run), and computed on
 * the training thread itself when none is (tests, tools).
 *
 * Locking: m->mu guards the job list and every job's info / events / checkpoints; the training
 * thread holds it only to publish progress, never while computing. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "ds/adapter.h"
#include "ds/engine.h"
#include "ds/model.h"
#include "ds/tokenizer.h"
#include "ds/train.h"
#include "util/mem.h"
#include "util/rng.h"

#define MAX_JOBS 256
#define MAX_LINE_ERRORS 5

const char *ds_ft_status_name(ds_ft_status s) {
    static const char *names[] = {"queued", "running", "succeeded", "failed", "cancelled"};
    return (unsigned)s < 5 ? names[s] : "unknown";
}

/* ---- datasets ------------------------------------------------------------------------------ */

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
        cJSON *o = cJSON_ParseWithLength(text + a, b - a);
        ft_line l;
        if (!o) snprintf(why, sizeof why, "invalid JSON");
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

typedef struct ex_set {
    ds_train_example *ex;
    int32_t **toks, **labs;
    size_t n, cap;
    int64_t n_tokens;
    int32_t max_len;
} ex_set;

static void ex_set_free(ex_set *s) {
    for (size_t i = 0; i < s->n; i++) free(s->toks[i]), free(s->labs[i]);
    free(s->ex), free(s->toks), free(s->labs);
    memset(s, 0, sizeof *s);
}

typedef struct build_ctx {
    const ds_model *m;
    ex_set *set;
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
    ex_set *s = c->set;
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

static int build_examples(const ds_model *m, const char *text, size_t len, ex_set *out, ds_err *err) {
    memset(out, 0, sizeof *out);
    if (!m->tok) return ds_err_set(err, DS_EUNSUPPORTED, "the model has no tokenizer");
    build_ctx c = {.m = m, .set = out, .max_ctx = m->cfg.max_ctx > 0 ? m->cfg.max_ctx : 2048, .err = err};
    err->msg[0] = '\0';
    int st = walk_lines(text, len, build_line, &c, err);
    free(c.t), free(c.l);
    if (st < 0) return ex_set_free(out), st;
    if (c.status) return ex_set_free(out), c.status;
    if (!out->n) return ds_err_set(err, DS_EINVAL, "invalid training data: no example has a token to train on");
    return 0;
}

/* ---- jobs ---------------------------------------------------------------------------------- */

typedef struct ft_job {
    ds_ft_job_info info;
    ds_ft_event *ev;
    size_t n_ev, cap_ev;
    ds_ft_checkpoint *ck;
    size_t n_ck, cap_ck;
    char *train, *valid;
    size_t train_len, valid_len;
    bool from_adapter;
    ds_adapter_kind kind;
    int cancel; /* atomic */
    struct ft_job *next;
} ft_job;

struct ds_ft_manager {
    const ds_model *base;
    ds_adapter_registry *reg;
    pthread_t thread;
    bool thread_started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool stop;
    ft_job *head, *tail; /* creation order */
    size_t n_jobs;
    uint64_t counter;
    /* co-serving: trainer calls handed to the engine thread (under mu) */
    ds_engine *engine;
    pthread_cond_t ho_cv;
    struct {
        ds_trainer *t;
        const ds_train_example *ex;
        int32_t n;
        bool eval, pending, done;
        ds_train_stats *stats;
        ds_err *err;
        int status;
    } ho;
};

/* Engine thread: runs the pending trainer call, if any. */
static bool ft_background(void *ud) {
    ds_ft_manager *m = ud;
    pthread_mutex_lock(&m->mu);
    if (!m->ho.pending) {
        pthread_mutex_unlock(&m->mu);
        return false;
    }
    m->ho.pending = false;
    pthread_mutex_unlock(&m->mu);
    int st = m->ho.eval ? ds_trainer_eval(m->ho.t, m->ho.ex, m->ho.n, m->ho.stats, m->ho.err)
                        : ds_trainer_step(m->ho.t, m->ho.ex, m->ho.n, m->ho.stats, m->ho.err);
    pthread_mutex_lock(&m->mu);
    m->ho.status = st;
    m->ho.done = true;
    pthread_cond_broadcast(&m->ho_cv);
    pthread_mutex_unlock(&m->mu);
    return false;
}

/* One trainer call: on the engine thread when attached (co-serving), else right here. */
static int trainer_call(ds_ft_manager *m, ds_trainer *t, const ds_train_example *ex, int32_t n, bool eval,
                        ds_train_stats *stats, ds_err *err) {
    if (!m->engine) return eval ? ds_trainer_eval(t, ex, n, stats, err) : ds_trainer_step(t, ex, n, stats, err);
    pthread_mutex_lock(&m->mu);
    m->ho.t = t, m->ho.ex = ex, m->ho.n = n, m->ho.eval = eval, m->ho.stats = stats, m->ho.err = err;
    m->ho.done = false;
    m->ho.pending = true;
    pthread_mutex_unlock(&m->mu);
    ds_engine_wake_background(m->engine);
    pthread_mutex_lock(&m->mu);
    while (!m->ho.done) pthread_cond_wait(&m->ho_cv, &m->mu);
    int st = m->ho.status;
    pthread_mutex_unlock(&m->mu);
    return st;
}

void ds_ft_manager_attach_engine(ds_ft_manager *m, ds_engine *e, float budget) {
    m->engine = e;
    ds_engine_set_background(e, ft_background, m, budget);
}

static void job_free(ft_job *j) {
    if (!j) return;
    free(j->ev), free(j->ck), free(j->train), free(j->valid), free(j);
}

/* Under m->mu. */
static void add_event_locked(ft_job *j, const ds_ft_event *e) {
    if (DS_GROW(j->ev, j->cap_ev, j->n_ev + 1)) return;
    j->ev[j->n_ev] = *e;
    j->ev[j->n_ev].seq = (int64_t)j->n_ev + 1;
    j->ev[j->n_ev].created_at = (int64_t)time(NULL);
    j->n_ev++;
}

static void job_log(ds_ft_manager *m, ft_job *j, const char *level, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void job_log(ds_ft_manager *m, ft_job *j, const char *level, const char *fmt, ...) {
    ds_ft_event e = {.valid_loss = NAN};
    snprintf(e.level, sizeof e.level, "%s", level);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e.message, sizeof e.message, fmt, ap);
    va_end(ap);
    DS_LOGI("fine-tune %s: %s", j->info.id, e.message);
    pthread_mutex_lock(&m->mu);
    add_event_locked(j, &e);
    pthread_mutex_unlock(&m->mu);
}

static bool cancelled(ds_ft_manager *m, ft_job *j) {
    return __atomic_load_n(&j->cancel, __ATOMIC_ACQUIRE) || __atomic_load_n(&m->stop, __ATOMIC_ACQUIRE);
}

static int mkdir_p1(const char *dir, ds_err *err) {
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return ds_err_set(err, DS_EIO, "cannot create %s: %s", dir, strerror(errno));
    return 0;
}

/* The whole job on the training thread. Returns 0, DS_ECANCELED or an error (message in err). */
static int run_job(ds_ft_manager *m, ft_job *j, ds_err *err) {
    ds_ft_job_info *I = &j->info; /* fields only this thread writes after queueing (under mu when read) */
    ex_set tr = {0}, va = {0};
    ds_trainer *t = NULL;
    int st = build_examples(m->base, j->train, j->train_len, &tr, err);
    if (!st && j->valid) {
        st = build_examples(m->base, j->valid, j->valid_len, &va, err);
        if (st) {
            char tmp[sizeof err->msg];
            memcpy(tmp, err->msg, sizeof tmp);
            snprintf(err->msg, sizeof err->msg, "validation file: %.480s", tmp);
        }
    }
    if (st) goto done;
    int32_t n_ex = (int32_t)tr.n;
    int32_t bs = I->batch_size > 0 ? I->batch_size : (n_ex < 4 ? n_ex : 4);
    if (bs > n_ex) bs = n_ex;
    int32_t n_epochs = I->n_epochs > 0 ? I->n_epochs : 3;
    int64_t per_epoch = (n_ex + bs - 1) / bs, total = per_epoch * n_epochs;

    ds_train_params tp = ds_train_default_params();
    tp.lr = I->learning_rate;
    tp.schedule = DS_LR_LINEAR;
    tp.warmup_steps = 0;
    tp.total_steps = (int32_t)total;
    int32_t mb = tr.max_len > va.max_len ? tr.max_len : va.max_len;
    if (j->kind == DS_ADAPTER_PROMPT) mb += I->n_virtual;
    tp.micro_batch_tokens = mb > 512 ? mb : 512;

    if (j->from_adapter) {
        ds_adapter_entry *e = ds_registry_acquire(m->reg, I->model);
        if (!e) {
            st = ds_err_set(err, DS_ENOTFOUND, "the adapter '%s' is no longer loaded", I->model);
            goto done;
        }
        t = ds_trainer_create_from(m->base, e->adapter, false, 0, &tp, err);
        ds_registry_release(m->reg, e);
    } else {
        ds_train_adapter_spec sp = ds_train_default_spec(j->kind);
        sp.name = I->fine_tuned_model;
        sp.seed = I->seed;
        if (j->kind == DS_ADAPTER_LORA) {
            sp.r = I->rank;
            sp.lora_alpha = I->alpha;
            sp.targets = I->targets;
            sp.use_rslora = I->use_rslora;
        } else {
            sp.n_virtual = I->n_virtual;
        }
        t = ds_trainer_create(m->base, &sp, &tp, err);
    }
    if (!t) {
        st = DS_EINVAL;
        goto done;
    }
    pthread_mutex_lock(&m->mu);
    I->total_steps = total;
    I->batch_size = bs;
    I->n_epochs = n_epochs;
    pthread_mutex_unlock(&m->mu);
    job_log(m, j, "info", "Training started: %d examples (%lld tokens), %d epochs of %lld steps, batch size %d",
            (int)n_ex, (long long)tr.n_tokens, (int)n_epochs, (long long)per_epoch, (int)bs);

    const char *root = ds_registry_root(m->reg);
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/%s", root, I->fine_tuned_model);
    if ((st = mkdir_p1(dir, err))) goto done;

    int32_t *order = malloc((size_t)n_ex * sizeof *order);
    ds_train_example *batch = malloc((size_t)bs * sizeof *batch);
    if (!order || !batch) {
        free(order), free(batch);
        st = ds_err_set(err, DS_ENOMEM, "out of memory");
        goto done;
    }
    for (int32_t i = 0; i < n_ex; i++) order[i] = i;
    uint64_t rng = I->seed ^ 0x5eedull;
    double t_train = 0, last_loss = NAN;
    int64_t step = 0, tokens = 0;
    for (int32_t ep = 0; ep < n_epochs && !st; ep++) {
        for (int32_t i = n_ex - 1; i > 0; i--) { /* Fisher-Yates */
            int32_t k = (int32_t)(ds_splitmix64(&rng) % (uint64_t)(i + 1)), x = order[i];
            order[i] = order[k], order[k] = x;
        }
        for (int64_t b = 0; b < per_epoch && !st; b++) {
            if (cancelled(m, j)) {
                st = DS_ECANCELED;
                break;
            }
            int32_t nb = 0;
            int64_t btok = 0;
            for (int64_t i = b * bs; i < n_ex && nb < bs; i++) {
                batch[nb] = tr.ex[order[i]];
                btok += batch[nb++].n_tokens;
            }
            ds_train_stats s;
            double t0 = ds_time_s();
            st = trainer_call(m, t, batch, nb, false, &s, err);
            t_train += ds_time_s() - t0;
            if (st) break;
            step++, tokens += btok;
            last_loss = s.loss;
            ds_ft_event e = {.metrics = true, .step = step, .train_loss = s.loss, .valid_loss = NAN, .lr = s.lr};
            snprintf(e.level, sizeof e.level, "info");
            snprintf(e.message, sizeof e.message, "Step %lld/%lld: training loss=%.4f", (long long)step,
                     (long long)total, s.loss);
            pthread_mutex_lock(&m->mu);
            add_event_locked(j, &e);
            I->step = step;
            I->trained_tokens = tokens;
            I->tokens_per_s = t_train > 0 ? (double)tokens / t_train : 0;
            pthread_mutex_unlock(&m->mu);
            DS_LOGD("fine-tune %s: %s (%.0f tok/s)", I->id, e.message, t_train > 0 ? tokens / t_train : 0.0);
        }
        if (st) break;
        /* end of epoch: validation loss and a checkpoint */
        ds_ft_checkpoint ck = {.step = step, .created_at = (int64_t)time(NULL), .train_loss = last_loss,
                               .valid_loss = NAN};
        if (va.n) {
            ds_train_stats vs;
            if (trainer_call(m, t, va.ex, (int32_t)va.n, true, &vs, err) == 0) ck.valid_loss = vs.loss;
        }
        snprintf(ck.path, sizeof ck.path, "%s/checkpoint-%lld", I->fine_tuned_model, (long long)step);
        char cdir[1400];
        snprintf(cdir, sizeof cdir, "%s/%s", root, ck.path);
        if ((st = ds_trainer_save(t, cdir, m->base->cfg.name, err))) break;
        pthread_mutex_lock(&m->mu);
        if (!DS_GROW(j->ck, j->cap_ck, j->n_ck + 1)) j->ck[j->n_ck++] = ck;
        pthread_mutex_unlock(&m->mu);
        if (va.n)
            job_log(m, j, "info", "Epoch %d/%d done: training loss=%.4f, validation loss=%.4f", (int)ep + 1,
                    (int)n_epochs, last_loss, ck.valid_loss);
        else job_log(m, j, "info", "Epoch %d/%d done: training loss=%.4f", (int)ep + 1, (int)n_epochs, last_loss);
    }
    free(order), free(batch);
    if (st) goto done;
    if (cancelled(m, j)) {
        st = DS_ECANCELED;
        goto done;
    }
    if ((st = ds_trainer_save(t, dir, m->base->cfg.name, err))) goto done;
    if ((st = ds_registry_load(m->reg, I->fine_tuned_model, I->fine_tuned_model, true, err))) goto done;
    job_log(m, j, "info", "Published adapter '%s' (%lld tokens trained, %.0f tokens/s)", I->fine_tuned_model,
            (long long)tokens, t_train > 0 ? tokens / t_train : 0.0);
done:
    ds_trainer_free(t);
    ex_set_free(&tr), ex_set_free(&va);
    return st;
}

/* Training yields the CPU to serving: this thread (and the OpenMP/BLAS workers it creates, which
 * inherit the nice value on Linux) runs at the lowest priority, so what runs here — tokenising
 * datasets, saving checkpoints, and the steps themselves when no engine is attached — uses the
 * cycles the engine leaves idle. */
static void lower_priority(void) {
    if (setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 19) != 0)
        DS_LOGW("fine-tuning: cannot lower the training thread's priority; serving may slow down while jobs run");
}

static void *train_thread(void *arg) {
    ds_ft_manager *m = arg;
    lower_priority();
    pthread_mutex_lock(&m->mu);
    for (;;) {
        ft_job *j = NULL;
        for (ft_job *x = m->head; x; x = x->next)
            if (x->info.status == DS_FT_QUEUED) {
                j = x;
                break;
            }
        if (m->stop) break;
        if (!j) {
            pthread_cond_wait(&m->cv, &m->mu);
            continue;
        }
        j->info.status = DS_FT_RUNNING;
        pthread_mutex_unlock(&m->mu);
        job_log(m, j, "info", "Fine-tuning job started");
        ds_err err = {{0}};
        int st = run_job(m, j, &err);
        if (st && st != DS_ECANCELED) job_log(m, j, "error", "Fine-tuning job failed: %s", err.msg);
        else if (!st) job_log(m, j, "info", "The job has successfully completed");
        else job_log(m, j, "info", "Fine-tuning job cancelled");
        pthread_mutex_lock(&m->mu);
        /* a cancel may already have marked the job (cancelled wins unless the job had finished) */
        if (j->info.status == DS_FT_RUNNING) {
            if (!st) j->info.status = DS_FT_SUCCEEDED;
            else if (st == DS_ECANCELED) j->info.status = DS_FT_CANCELLED;
            else {
                j->info.status = DS_FT_FAILED;
                snprintf(j->info.error, sizeof j->info.error, "%s", err.msg);
                snprintf(j->info.error_code, sizeof j->info.error_code, "%s",
                         st == DS_EINVAL || st == DS_ERANGE ? "invalid_training_file" : "training_error");
            }
            j->info.finished_at = (int64_t)time(NULL);
        }
        free(j->train), free(j->valid); /* the data is not needed any more */
        j->train = j->valid = NULL;
    }
    pthread_mutex_unlock(&m->mu);
    return NULL;
}

ds_ft_manager *ds_ft_manager_create(const ds_model *base, ds_adapter_registry *reg, ds_err *err) {
    ds_ft_manager *m = calloc(1, sizeof *m);
    if (!m) return ds_err_set(err, DS_ENOMEM, "out of memory"), NULL;
    m->base = base, m->reg = reg;
    m->counter = (uint64_t)time(NULL) ^ ((uint64_t)(uintptr_t)m << 16);
    pthread_mutex_init(&m->mu, NULL);
    pthread_cond_init(&m->cv, NULL);
    pthread_cond_init(&m->ho_cv, NULL);
    if (pthread_create(&m->thread, NULL, train_thread, m) != 0) {
        pthread_mutex_destroy(&m->mu), pthread_cond_destroy(&m->cv), free(m);
        return ds_err_set(err, DS_ENOMEM, "cannot start the training thread"), NULL;
    }
    m->thread_started = true;
    return m;
}

void ds_ft_manager_free(ds_ft_manager *m) {
    if (!m) return;
    pthread_mutex_lock(&m->mu);
    __atomic_store_n(&m->stop, true, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&m->cv);
    pthread_mutex_unlock(&m->mu);
    if (m->thread_started) pthread_join(m->thread, NULL);
    if (m->engine) ds_engine_set_background(m->engine, NULL, NULL, 0); /* waits out a call in progress */
    for (ft_job *j = m->head, *n; j; j = n) n = j->next, job_free(j);
    pthread_mutex_destroy(&m->mu), pthread_cond_destroy(&m->cv), pthread_cond_destroy(&m->ho_cv);
    free(m);
}

static ft_job *find_locked(ds_ft_manager *m, const char *id) {
    for (ft_job *j = m->head; j; j = j->next)
        if (!strcmp(j->info.id, id)) return j;
    return NULL;
}

int ds_ft_submit(ds_ft_manager *m, const ds_ft_job_spec *sp, char id_out[48], ds_err *err) {
    if (!m->reg || !ds_registry_root(m->reg))
        return ds_err_set(err, DS_EINVAL, "fine-tuning needs an adapter directory: start the server with --adapter-dir DIR");
    if (!sp->fine_tuned_model || !sp->fine_tuned_model[0] || strlen(sp->fine_tuned_model) >= 128 ||
        strchr(sp->fine_tuned_model, '/') || sp->fine_tuned_model[0] == '.')
        return ds_err_set(err, DS_EINVAL, "invalid fine-tuned model name");
    if (!sp->train_data || !sp->train_len) return ds_err_set(err, DS_EINVAL, "the training file is empty");
    ft_job *j = calloc(1, sizeof *j);
    if (!j) return ds_err_set(err, DS_ENOMEM, "out of memory");
    j->train = malloc(sp->train_len + 1);
    j->valid = sp->valid_data ? malloc(sp->valid_len + 1) : NULL;
    if (!j->train || (sp->valid_data && !j->valid)) return job_free(j), ds_err_set(err, DS_ENOMEM, "out of memory");
    memcpy(j->train, sp->train_data, sp->train_len), j->train[sp->train_len] = '\0', j->train_len = sp->train_len;
    if (j->valid)
        memcpy(j->valid, sp->valid_data, sp->valid_len), j->valid[sp->valid_len] = '\0', j->valid_len = sp->valid_len;
    j->from_adapter = sp->from_adapter;
    j->kind = sp->kind;
    ds_ft_job_info *I = &j->info;
    I->status = DS_FT_QUEUED;
    snprintf(I->model, sizeof I->model, "%s", sp->model ? sp->model : "");
    snprintf(I->fine_tuned_model, sizeof I->fine_tuned_model, "%s", sp->fine_tuned_model);
    snprintf(I->training_file, sizeof I->training_file, "%s", sp->training_file ? sp->training_file : "");
    snprintf(I->validation_file, sizeof I->validation_file, "%s", sp->validation_file ? sp->validation_file : "");
    snprintf(I->method, sizeof I->method, "%s", sp->method ? sp->method : "supervised");
    I->created_at = (int64_t)time(NULL);
    I->n_epochs = sp->n_epochs;
    I->batch_size = sp->batch_size;
    I->rank = sp->rank > 0 ? sp->rank : 8;
    I->alpha = sp->alpha > 0 ? sp->alpha : 2.0f * (float)I->rank;
    I->use_rslora = sp->use_rslora;
    I->targets = sp->targets ? sp->targets : DS_TRAIN_TARGET(DS_PROJ_Q) | DS_TRAIN_TARGET(DS_PROJ_V);
    I->n_virtual = sp->n_virtual > 0 ? sp->n_virtual : 20;
    I->lr_multiplier = sp->lr_multiplier > 0 ? sp->lr_multiplier : 1.0f;
    float base_lr = j->kind == DS_ADAPTER_LORA ? 2e-4f : 3e-2f;
    I->learning_rate = sp->learning_rate > 0 ? sp->learning_rate : base_lr * I->lr_multiplier;
    I->seed = sp->seed;
    pthread_mutex_lock(&m->mu);
    if (m->n_jobs >= MAX_JOBS) { /* forget the oldest finished job */
        ft_job **pp = &m->head;
        while (*pp && ((*pp)->info.status == DS_FT_QUEUED || (*pp)->info.status == DS_FT_RUNNING)) pp = &(*pp)->next;
        if (!*pp) {
            pthread_mutex_unlock(&m->mu);
            job_free(j);
            return ds_err_set(err, DS_EBUSY, "too many fine-tuning jobs queued");
        }
        ft_job *old = *pp;
        *pp = old->next;
        m->tail = NULL;
        for (ft_job *x = m->head; x; x = x->next) m->tail = x;
        job_free(old);
        m->n_jobs--;
    }
    uint64_t r = ds_splitmix64(&m->counter);
    snprintf(I->id, sizeof I->id, "ftjob-%016llx%08llx", (unsigned long long)r,
             (unsigned long long)(ds_splitmix64(&m->counter) & 0xffffffffu));
    if (m->tail) m->tail->next = j;
    else m->head = j;
    m->tail = j;
    m->n_jobs++;
    ds_ft_event e = {.valid_loss = NAN};
    snprintf(e.level, sizeof e.level, "info");
    snprintf(e.message, sizeof e.message, "Created fine-tuning job: %s", I->id);
    add_event_locked(j, &e);
    snprintf(id_out, 48, "%s", I->id);
    pthread_cond_signal(&m->cv);
    pthread_mutex_unlock(&m->mu);
    return 0;
}

int ds_ft_cancel(ds_ft_manager *m, const char *id, ds_err *err) {
    pthread_mutex_lock(&m->mu);
    ft_job *j = find_locked(m, id);
    int st = 0;
    if (!j) st = ds_err_set(err, DS_ENOTFOUND, "fine-tuning job '%s' not found", id);
    else if (j->info.status != DS_FT_QUEUED && j->info.status != DS_FT_RUNNING)
        st = ds_err_set(err, DS_EINVAL, "the job has already %s", ds_ft_status_name(j->info.status));
    else {
        __atomic_store_n(&j->cancel, 1, __ATOMIC_RELEASE);
        j->info.status = DS_FT_CANCELLED;
        j->info.finished_at = (int64_t)time(NULL);
    }
    pthread_mutex_unlock(&m->mu);
    return st;
}

int ds_ft_list(ds_ft_manager *m, ds_ft_job_info **out, size_t *n) {
    pthread_mutex_lock(&m->mu);
    *n = 0;
    *out = malloc((m->n_jobs + 1) * sizeof **out);
    if (!*out) return pthread_mutex_unlock(&m->mu), DS_ENOMEM;
    for (ft_job *j = m->head; j; j = j->next) (*out)[(*n)++] = j->info;
    pthread_mutex_unlock(&m->mu);
    for (size_t i = 0; i < *n / 2; i++) { /* newest first */
        ds_ft_job_info x = (*out)[i];
        (*out)[i] = (*out)[*n - 1 - i], (*out)[*n - 1 - i] = x;
    }
    return 0;
}

int ds_ft_get(ds_ft_manager *m, const char *id, ds_ft_job_info *out) {
    pthread_mutex_lock(&m->mu);
    ft_job *j = find_locked(m, id);
    if (j) *out = j->info;
    pthread_mutex_unlock(&m->mu);
    return j ? 0 : DS_ENOTFOUND;
}

int ds_ft_events(ds_ft_manager *m, const char *id, ds_ft_event **out, size_t *n) {
    pthread_mutex_lock(&m->mu);
    ft_job *j = find_locked(m, id);
    int st = j ? 0 : DS_ENOTFOUND;
    if (j) {
        *out = malloc((j->n_ev + 1) * sizeof **out);
        if (!*out) st = DS_ENOMEM;
        else memcpy(*out, j->ev, j->n_ev * sizeof **out), *n = j->n_ev;
    }
    pthread_mutex_unlock(&m->mu);
    return st;
}

int ds_ft_checkpoints(ds_ft_manager *m, const char *id, ds_ft_checkpoint **out, size_t *n) {
    pthread_mutex_lock(&m->mu);
    ft_job *j = find_locked(m, id);
    int st = j ? 0 : DS_ENOTFOUND;
    if (j) {
        *out = malloc((j->n_ck + 1) * sizeof **out);
        if (!*out) st = DS_ENOMEM;
        else memcpy(*out, j->ck, j->n_ck * sizeof **out), *n = j->n_ck;
    }
    pthread_mutex_unlock(&m->mu);
    return st;
}
