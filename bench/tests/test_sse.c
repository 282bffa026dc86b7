/* SSE parser: events split at every possible byte boundary, CRLF/CR line ends, comments,
 * multi-line data, and the oversize limit. */
#include <string.h>

#include "ds_test.h"
#include "sse.h"

typedef struct got {
    char ev[16][128];
    int n;
} got;

static void on_event(void *ud, const char *data, size_t len) {
    got *g = ud;
    if (g->n < 16) snprintf(g->ev[g->n++], sizeof(g->ev[0]), "%.*s", (int)len, data);
}

static const char *k_stream =
    ": keep-alive\n\n"
    "data: {\"a\":1}\n\n"
    "data:{\"b\":2}\r\n\r\n"
    "event: ignored\nid: 7\ndata: line1\ndata: line2\n\n"
    "data: cr\r\r"
    "data: [DONE]\n\n";

static void check_events(const got *g, const char *how) {
    CHECK_MSG(g->n == 5, "%s: %d events", how, g->n);
    if (g->n != 5) return;
    CHECK(strcmp(g->ev[0], "{\"a\":1}") == 0);
    CHECK(strcmp(g->ev[1], "{\"b\":2}") == 0);
    CHECK(strcmp(g->ev[2], "line1\nline2") == 0);
    CHECK(strcmp(g->ev[3], "cr") == 0);
    CHECK(strcmp(g->ev[4], "[DONE]") == 0);
}

static void test_whole_and_split(void) {
    size_t n = strlen(k_stream);
    for (size_t cut = 0; cut <= n; cut++) { /* two reads, split at every byte */
        got g = {0};
        dsb_sse p;
        dsb_sse_init(&p, on_event, &g);
        CHECK(dsb_sse_feed(&p, k_stream, cut) == 0);
        CHECK(dsb_sse_feed(&p, k_stream + cut, n - cut) == 0);
        char how[32];
        snprintf(how, sizeof(how), "cut at %zu", cut);
        check_events(&g, how);
        dsb_sse_free(&p);
    }
    got g = {0}; /* one byte at a time */
    dsb_sse p;
    dsb_sse_init(&p, on_event, &g);
    int fails = 0;
    for (size_t i = 0; i < n; i++) fails += dsb_sse_feed(&p, k_stream + i, 1) != 0;
    CHECK_EQ_INT(fails, 0);
    check_events(&g, "bytewise");
    dsb_sse_free(&p);
}

static void test_finish_and_reset(void) {
    got g = {0};
    dsb_sse p;
    dsb_sse_init(&p, on_event, &g);
    dsb_sse_feed(&p, "data: last", 10); /* no line end before EOF */
    CHECK_EQ_INT(g.n, 0);
    dsb_sse_finish(&p);
    CHECK_EQ_INT(g.n, 1);
    CHECK(strcmp(g.ev[0], "last") == 0);
    dsb_sse_feed(&p, "data: half", 10);
    dsb_sse_reset(&p);
    dsb_sse_feed(&p, "data: new\n\n", 11);
    CHECK_EQ_INT(g.n, 2);
    CHECK(strcmp(g.ev[1], "new") == 0);
    dsb_sse_free(&p);
}

static void test_limit(void) {
    got g = {0};
    dsb_sse p;
    dsb_sse_init(&p, on_event, &g);
    p.max_bytes = 16;
    CHECK(dsb_sse_feed(&p, "data: 0123456789abcdef0123", 26) != 0);
    CHECK(p.failed);
    CHECK(dsb_sse_feed(&p, "\n\n", 2) != 0); /* stays failed until reset */
    CHECK_EQ_INT(g.n, 0);
    dsb_sse_free(&p);
}

int main(void) {
    test_whole_and_split();
    test_finish_and_reset();
    test_limit();
    return ds_test_result();
}
