/* A fake OpenAI-compatible streaming server for ds-bench tests.
 *
 * Runs its own libuv loop on a thread, listening on 127.0.0.1 with an ephemeral port. For every
 * POST /v1/completions or /v1/chat/completions it streams (chunked transfer encoding, keep-alive)
 * max_tokens tokens (at most FAKE_MAX_TOKENS): the first `ttft_ms` after the request arrived,
 * then one every `itl_ms`, then a usage chunk and `data: [DONE]`. On the chat endpoint a
 * role-only chunk goes out at once (it must not count as the first token). Some events are split
 * across two HTTP chunks, one uses CRLF line ends, and a ": keep-alive" comment precedes the
 * tokens, to exercise the client's parsers. The request's "model" picks a behaviour:
 *   "fail500"   HTTP 500 with an OpenAI error body (the connection stays usable);
 *   "cut"       two tokens, then the connection is closed mid-stream;
 *   "errevent"  one token, then data: {"error": ...};
 *   "nousage"   no usage chunk;
 *   "garbage"   a non-HTTP answer;
 *   "hang"      no answer at all (for client timeouts);
 *   "closeafter" the normal stream, then the server closes the keep-alive connection;
 *   anything else: the normal stream.
 * GET /v1/models lists "fake-base" (parent null) and "lora-0" (parent fake-base).
 * Each streamed token's send time is recorded, so tests compare what the client measured with
 * what the server did. */
#ifndef DSB_FAKE_SERVER_H
#define DSB_FAKE_SERVER_H

#include <stddef.h>
#include <stdint.h>

#define FAKE_MAX_TOKENS 64
#define FAKE_MAX_RECORDS 4096

typedef struct fake_server_params {
    int ttft_ms; /* request complete -> first token */
    int itl_ms;  /* between tokens */
} fake_server_params;

typedef struct fake_record {
    char model[64];
    char path[64];
    int max_tokens;
    uint64_t t_recv_ns;                  /* uv_hrtime() when the request was fully read */
    uint64_t t_tok_ns[FAKE_MAX_TOKENS];  /* uv_hrtime() when each token was written */
    int n_tok;
    int ignore_eos, stream_usage;        /* flags seen in the body */
    int prompt_ids;                      /* "prompt" was an array of token ids: its length */
    int prompt_words;                    /* "prompt" string or the last message: word count */
    char adapter_field[64];              /* value of "adapter_id", if any */
    char lora[64];                       /* the "lora" field (llama.cpp style), printed as JSON */
    char authorization[64];              /* the Authorization header, if any */
} fake_record;

typedef struct fake_server fake_server;

/* Starts the server; *port receives the port. NULL on failure (message on stderr). */
fake_server *fake_server_start(const fake_server_params *p, int *port);

/* Stops the thread, closes everything and frees the server. */
void fake_server_stop(fake_server *s);

/* Copies up to max records (in arrival order); returns how many there are in total. */
size_t fake_server_records(fake_server *s, fake_record *out, size_t max);

/* TCP connections accepted so far. */
int fake_server_connections(fake_server *s);

/* A loopback port with nothing listening (bound, then closed), for refused connections. */
int fake_closed_port(void);

#endif
