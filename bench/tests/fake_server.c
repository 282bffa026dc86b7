#include "fake_server.h"

#include <cjson/cJSON.h>
#include <llhttp.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <uv.h>

enum { M_OK, M_500, M_CUT, M_ERREVENT, M_NOUSAGE, M_GARBAGE, M_HANG, M_CLOSEAFTER };

struct fake_server {
    uv_loop_t loop;
    uv_tcp_t listener;
    uv_async_t stop;
    uv_thread_t thread;
    uv_mutex_t mu;
    fake_server_params p;
    llhttp_settings_t settings;
    fake_record *records; /* [FAKE_MAX_RECORDS] */
    size_t n_records;
    int connections;
};

typedef struct fconn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    llhttp_t parser;
    fake_server *srv;
    char url[128];
    size_t url_len;
    char hfield[32], auth[64];
    size_t hfield_len;
    bool in_auth; /* the last header callback was a value */
    char *body;
    size_t body_len, body_cap;
    bool request_ready, closing;
    int pending_closes;
    /* Response in progress. */
    int mode, n_tokens, next_tok, chat;
    uint64_t t0;
    size_t rec;
} fconn;

typedef struct wreq {
    uv_write_t req;
    char data[];
} wreq;

static void on_written(uv_write_t *r, int status) { free(r); }

static void send_raw(fconn *c, const char *data, size_t len) {
    if (c->closing) return;
    wreq *w = malloc(sizeof(wreq) + len);
    if (!w) return;
    memcpy(w->data, data, len);
    uv_buf_t b = uv_buf_init(w->data, (unsigned)len);
    if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_written) != 0) free(w);
}

/* One HTTP chunk (chunked transfer encoding). */
static void send_chunk(fconn *c, const char *data, size_t len) {
    char *buf = malloc(len + 32);
    if (!buf) return;
    int h = snprintf(buf, 32, "%zx\r\n", len);
    memcpy(buf + h, data, len);
    memcpy(buf + h + len, "\r\n", 2);
    send_raw(c, buf, (size_t)h + len + 2);
    free(buf);
}

static void on_closed(uv_handle_t *h) {
    fconn *c = h->data;
    if (--c->pending_closes == 0) {
        free(c->body);
        free(c);
    }
}

static void close_conn(fconn *c) {
    if (c->closing) return;
    c->closing = true;
    c->pending_closes = 2;
    uv_close((uv_handle_t *)&c->tcp, on_closed);
    uv_close((uv_handle_t *)&c->timer, on_closed);
}

/* ---- Streaming ----------------------------------------------------------------------------- */

static void token_event(fconn *c, int i, char *buf, size_t cap) {
    if (c->chat)
        snprintf(buf, cap, "data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,"
                           "\"delta\":{\"content\":\" tok%d\"},\"finish_reason\":null}]}", i);
    else
        snprintf(buf, cap, "data: {\"id\":\"x\",\"object\":\"text_completion\",\"choices\":[{\"index\":0,"
                           "\"text\":\" tok%d\",\"finish_reason\":null}]}", i);
}

static void send_token(fconn *c, int i) {
    char ev[512];
    token_event(c, i, ev, sizeof(ev) - 8);
    size_t n = strlen(ev);
    if (i == 1) { /* split one event across two HTTP chunks (and so, often, two client reads) */
        send_chunk(c, ev, n / 2);
        memcpy(ev + n, "\n\n", 2);
        send_chunk(c, ev + n / 2, n - n / 2 + 2);
    } else {
        memcpy(ev + n, i == 2 ? "\r\n\r\n" : "\n\n", i == 2 ? 4 : 2);
        send_chunk(c, ev, n + (i == 2 ? 4 : 2));
    }
    uint64_t t = uv_hrtime();
    uv_mutex_lock(&c->srv->mu);
    fake_record *r = &c->srv->records[c->rec];
    if (r->n_tok < FAKE_MAX_TOKENS) r->t_tok_ns[r->n_tok++] = t;
    uv_mutex_unlock(&c->srv->mu);
}

static void finish_stream(fconn *c) {
    char ev[256];
    if (c->mode != M_NOUSAGE) {
        int n = snprintf(ev, sizeof(ev), "data: {\"id\":\"x\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,"
                                         "\"completion_tokens\":%d,\"total_tokens\":%d}}\n\n", c->n_tokens,
                         c->n_tokens + 7);
        send_chunk(c, ev, (size_t)n);
    }
    send_chunk(c, "data: [DONE]\n\n", 14);
    send_raw(c, "0\r\n\r\n", 5);
    llhttp_resume(&c->parser); /* ready for the next request on this connection */
    if (c->mode == M_CLOSEAFTER) close_conn(c); /* drop the idle keep-alive connection at once */
}

static void schedule_next(fconn *c);

static void on_tick(uv_timer_t *t) {
    fconn *c = t->data;
    if (c->closing) return;
    if (c->mode == M_CUT && c->next_tok == 2) { /* two tokens out: drop the connection */
        close_conn(c);
        return;
    }
    if (c->mode == M_ERREVENT && c->next_tok == 1) {
        const char *e = "data: {\"error\":{\"message\":\"boom\",\"type\":\"server_error\",\"param\":null,"
                        "\"code\":null}}\n\n";
        send_chunk(c, e, strlen(e));
        finish_stream(c);
        return;
    }
    send_token(c, c->next_tok++);
    if (c->next_tok == c->n_tokens) {
        finish_stream(c);
        return;
    }
    schedule_next(c);
}

static void schedule_next(fconn *c) {
    const fake_server_params *p = &c->srv->p;
    uint64_t due = c->t0 + (uint64_t)(p->ttft_ms + c->next_tok * p->itl_ms) * 1000000ull;
    uv_update_time(&c->srv->loop);
    uint64_t now = uv_hrtime();
    uint64_t ms = due > now ? (due - now + 999999ull) / 1000000ull : 0;
    uv_timer_start(&c->timer, on_tick, ms, 0);
}

/* ---- Requests ------------------------------------------------------------------------------ */

static void send_json(fconn *c, int status, const char *reason, const char *json) {
    char head[256];
    size_t n = strlen(json);
    int h = snprintf(head, sizeof(head), "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                                         "Content-Length: %zu\r\n\r\n", status, reason, n);
    send_raw(c, head, (size_t)h);
    send_raw(c, json, n);
    llhttp_resume(&c->parser);
}

static int mode_of(const char *model) {
    if (strcmp(model, "fail500") == 0) return M_500;
    if (strcmp(model, "cut") == 0) return M_CUT;
    if (strcmp(model, "errevent") == 0) return M_ERREVENT;
    if (strcmp(model, "nousage") == 0) return M_NOUSAGE;
    if (strcmp(model, "garbage") == 0) return M_GARBAGE;
    if (strcmp(model, "hang") == 0) return M_HANG;
    if (strcmp(model, "closeafter") == 0) return M_CLOSEAFTER;
    return M_OK;
}

static int words(const char *s) {
    int n = 0;
    for (const char *p = s; *p; p++)
        if (*p != ' ' && (p == s || p[-1] == ' ')) n++;
    return n;
}

static void describe_prompt(const cJSON *j, fake_record *r) {
    const cJSON *prompt = cJSON_GetObjectItem(j, "prompt"), *msgs = cJSON_GetObjectItem(j, "messages");
    const cJSON *last = cJSON_IsArray(msgs) ? cJSON_GetArrayItem(msgs, cJSON_GetArraySize(msgs) - 1) : NULL;
    const cJSON *content = cJSON_GetObjectItem(last, "content"), *aid = cJSON_GetObjectItem(j, "adapter_id");
    if (cJSON_IsArray(prompt)) r->prompt_ids = cJSON_GetArraySize(prompt);
    if (cJSON_IsString(prompt)) r->prompt_words = words(prompt->valuestring);
    if (cJSON_IsString(content)) r->prompt_words = words(content->valuestring);
    if (cJSON_IsString(aid)) snprintf(r->adapter_field, sizeof(r->adapter_field), "%.63s", aid->valuestring);
    char *lora = cJSON_PrintUnformatted(cJSON_GetObjectItem(j, "lora"));
    if (lora) snprintf(r->lora, sizeof(r->lora), "%.63s", lora);
    free(lora);
}

static size_t new_record(fconn *c, const cJSON *j) {
    fake_server *s = c->srv;
    const cJSON *model = cJSON_GetObjectItem(j, "model"), *mt = cJSON_GetObjectItem(j, "max_tokens");
    const cJSON *so = cJSON_GetObjectItem(j, "stream_options");
    uv_mutex_lock(&s->mu);
    size_t i = s->n_records < FAKE_MAX_RECORDS ? s->n_records++ : FAKE_MAX_RECORDS - 1;
    fake_record *r = &s->records[i];
    memset(r, 0, sizeof(*r));
    snprintf(r->model, sizeof(r->model), "%s", cJSON_IsString(model) ? model->valuestring : "");
    snprintf(r->path, sizeof(r->path), "%.63s", c->url);
    r->max_tokens = cJSON_IsNumber(mt) ? mt->valueint : 16;
    r->t_recv_ns = c->t0;
    snprintf(r->authorization, sizeof(r->authorization), "%s", c->auth);
    r->ignore_eos = cJSON_IsTrue(cJSON_GetObjectItem(j, "ignore_eos"));
    r->stream_usage = cJSON_IsTrue(cJSON_GetObjectItem(so, "include_usage"));
    describe_prompt(j, r);
    uv_mutex_unlock(&s->mu);
    return i;
}

static void handle_request(fconn *c) {
    c->t0 = uv_hrtime();
    if (strcmp(c->url, "/v1/models") == 0) {
        send_json(c, 200, "OK", "{\"object\":\"list\",\"data\":[{\"id\":\"lora-0\",\"object\":\"model\",\"parent\":"
                                "\"fake-base\"},{\"id\":\"fake-base\",\"object\":\"model\",\"parent\":null}]}");
        return;
    }
    cJSON *j = cJSON_ParseWithLength(c->body ? c->body : "", c->body_len);
    c->rec = new_record(c, j);
    const cJSON *model = cJSON_GetObjectItem(j, "model");
    c->mode = mode_of(cJSON_IsString(model) ? model->valuestring : "");
    c->chat = strstr(c->url, "/chat/") != NULL;
    c->n_tokens = c->srv->records[c->rec].max_tokens;
    if (c->n_tokens < 1) c->n_tokens = 1;
    if (c->n_tokens > FAKE_MAX_TOKENS) c->n_tokens = FAKE_MAX_TOKENS;
    c->next_tok = 0;
    cJSON_Delete(j);
    if (c->mode == M_GARBAGE) {
        send_raw(c, "SSH-2.0-nonsense\r\n\r\n", 20);
        return;
    }
    if (c->mode == M_HANG) return; /* never answers: the client's timeout must fire */
    if (c->mode == M_500) {
        send_json(c, 500, "Internal Server Error", "{\"error\":{\"message\":\"fake failure\",\"type\":"
                                                   "\"server_error\",\"param\":null,\"code\":null}}");
        return;
    }
    const char *head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
    send_raw(c, head, strlen(head));
    send_chunk(c, ": keep-alive\n\n", 14);
    if (c->chat) {
        const char *role = "data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,"
                           "\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n";
        send_chunk(c, role, strlen(role));
    }
    schedule_next(c);
}

static int on_url(llhttp_t *p, const char *at, size_t len) {
    fconn *c = p->data;
    size_t n = len < sizeof(c->url) - 1 - c->url_len ? len : sizeof(c->url) - 1 - c->url_len;
    memcpy(c->url + c->url_len, at, n);
    c->url_len += n;
    c->url[c->url_len] = '\0';
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len) {
    fconn *c = p->data;
    if (c->body_len + len + 1 > c->body_cap) {
        size_t cap = (c->body_len + len + 1) * 2;
        char *b = realloc(c->body, cap);
        if (!b) return -1;
        c->body = b;
        c->body_cap = cap;
    }
    memcpy(c->body + c->body_len, at, len);
    c->body_len += len;
    c->body[c->body_len] = '\0';
    return 0;
}

/* Header names and values may arrive in pieces: a name piece after a value starts a new name. */
static int on_header_field(llhttp_t *p, const char *at, size_t len) {
    fconn *c = p->data;
    if (c->in_auth) c->hfield_len = 0; /* in_auth: "the last callback was a value" */
    c->in_auth = false;
    size_t n = len < sizeof(c->hfield) - 1 - c->hfield_len ? len : sizeof(c->hfield) - 1 - c->hfield_len;
    memcpy(c->hfield + c->hfield_len, at, n);
    c->hfield_len += n;
    c->hfield[c->hfield_len] = '\0';
    return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len) {
    fconn *c = p->data;
    c->in_auth = true;
    if (strcasecmp(c->hfield, "authorization") != 0) return 0;
    size_t have = strlen(c->auth), n = len < sizeof(c->auth) - 1 - have ? len : sizeof(c->auth) - 1 - have;
    memcpy(c->auth + have, at, n);
    c->auth[have + n] = '\0';
    return 0;
}

static int on_message_begin(llhttp_t *p) {
    fconn *c = p->data;
    c->auth[0] = '\0';
    c->hfield_len = 0;
    c->in_auth = false;
    c->url_len = 0;
    c->url[0] = '\0';
    c->body_len = 0;
    return 0;
}

static int on_message_complete(llhttp_t *p) {
    ((fconn *)p->data)->request_ready = true;
    return HPE_PAUSED; /* one request at a time: resumed when its response is finished */
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b) {
    b->base = malloc(suggested);
    b->len = b->base ? suggested : 0;
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *b) {
    fconn *c = st->data;
    if (nread < 0) {
        close_conn(c);
    } else if (nread > 0 && !c->closing) {
        llhttp_errno_t e = llhttp_execute(&c->parser, b->base, (size_t)nread);
        if (e == HPE_PAUSED && c->request_ready) {
            c->request_ready = false;
            handle_request(c);
        } else if (e != HPE_OK) {
            close_conn(c);
        }
    }
    free(b->base);
}

static void on_connection(uv_stream_t *server, int status) {
    fake_server *s = server->data;
    if (status < 0) return;
    fconn *c = calloc(1, sizeof(*c));
    if (!c) return;
    c->srv = s;
    uv_tcp_init(&s->loop, &c->tcp);
    uv_timer_init(&s->loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
        close_conn(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    llhttp_init(&c->parser, HTTP_REQUEST, &s->settings);
    c->parser.data = c;
    uv_mutex_lock(&s->mu);
    s->connections++;
    uv_mutex_unlock(&s->mu);
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

/* ---- Thread and life cycle ----------------------------------------------------------------- */

static void close_any(uv_handle_t *h, void *arg) {
    if (uv_is_closing(h)) return;
    if (h->type == UV_TCP && h->data && h != (uv_handle_t *)&((fake_server *)arg)->listener) {
        close_conn(h->data); /* closes the connection's timer too */
        return;
    }
    if (h->type == UV_TIMER) return; /* owned by a connection */
    uv_close(h, NULL);
}

static void on_stop(uv_async_t *a) { uv_walk(a->loop, close_any, a->data); }

static void thread_main(void *arg) {
    fake_server *s = arg;
    uv_run(&s->loop, UV_RUN_DEFAULT);
}

fake_server *fake_server_start(const fake_server_params *p, int *port) {
    fake_server *s = calloc(1, sizeof(*s));
    if (!s || !(s->records = calloc(FAKE_MAX_RECORDS, sizeof(fake_record)))) {
        free(s);
        return NULL;
    }
    s->p = *p;
    llhttp_settings_init(&s->settings);
    s->settings.on_message_begin = on_message_begin;
    s->settings.on_url = on_url;
    s->settings.on_header_field = on_header_field;
    s->settings.on_header_value = on_header_value;
    s->settings.on_body = on_body;
    s->settings.on_message_complete = on_message_complete;
    uv_mutex_init(&s->mu);
    uv_loop_init(&s->loop);
    uv_tcp_init(&s->loop, &s->listener);
    uv_async_init(&s->loop, &s->stop, on_stop);
    s->listener.data = s;
    s->stop.data = s;
    struct sockaddr_in addr;
    uv_ip4_addr("127.0.0.1", 0, &addr);
    struct sockaddr_storage bound;
    int len = sizeof(bound);
    if (uv_tcp_bind(&s->listener, (const struct sockaddr *)&addr, 0) != 0 ||
        uv_listen((uv_stream_t *)&s->listener, 128, on_connection) != 0 ||
        uv_tcp_getsockname(&s->listener, (struct sockaddr *)&bound, &len) != 0) {
        fprintf(stderr, "fake_server: cannot listen on 127.0.0.1\n");
        return NULL; /* leaks on purpose: the test fails right after */
    }
    *port = ntohs(((struct sockaddr_in *)&bound)->sin_port);
    uv_thread_create(&s->thread, thread_main, s);
    return s;
}

void fake_server_stop(fake_server *s) {
    if (!s) return;
    uv_async_send(&s->stop);
    uv_thread_join(&s->thread);
    uv_loop_close(&s->loop);
    uv_mutex_destroy(&s->mu);
    free(s->records);
    free(s);
}

size_t fake_server_records(fake_server *s, fake_record *out, size_t max) {
    uv_mutex_lock(&s->mu);
    size_t n = s->n_records;
    memcpy(out, s->records, (n < max ? n : max) * sizeof(fake_record));
    uv_mutex_unlock(&s->mu);
    return n;
}

int fake_server_connections(fake_server *s) {
    uv_mutex_lock(&s->mu);
    int n = s->connections;
    uv_mutex_unlock(&s->mu);
    return n;
}

int fake_closed_port(void) {
    uv_loop_t loop;
    uv_tcp_t t;
    uv_loop_init(&loop);
    uv_tcp_init(&loop, &t);
    struct sockaddr_in addr;
    uv_ip4_addr("127.0.0.1", 0, &addr);
    struct sockaddr_storage bound;
    int len = sizeof(bound), port = -1;
    if (uv_tcp_bind(&t, (const struct sockaddr *)&addr, 0) == 0 &&
        uv_tcp_getsockname(&t, (struct sockaddr *)&bound, &len) == 0)
        port = ntohs(((struct sockaddr_in *)&bound)->sin_port);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    return port; /* bound but never listening, now closed: connects are refused */
}
