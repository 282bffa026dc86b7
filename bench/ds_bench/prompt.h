/* ds-bench — prompt sources: synthetic prompts without a tokenizer, and JSONL prompt/trace files.
 *
 * Synthetic text prompts are N words drawn from a fixed list of common, short English words.
 * Each of them is a single token (with its leading space) in the usual BPE vocabularies
 * (Llama 2/3, Mistral, Qwen, GPT-2/4), so an N-word prompt is about N tokens for a completion
 * request, plus the BOS token and, on the chat endpoint, the chat template's tokens. That is the
 * approximation; the reported input length is always the server's usage.prompt_tokens when the
 * server returns usage. For exact lengths use token-id prompts on /v1/completions.
 * All functions are pure or own their results; any thread. */
#ifndef DSB_PROMPT_H
#define DSB_PROMPT_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Malloc'd text of n_tokens words (n_tokens >= 1) chosen by a generator seeded with `seed`;
 * NULL when out of memory. */
char *dsb_prompt_words(uint64_t seed, int n_tokens);

/* cJSON array of n token ids, uniform in [min(1000, vocab/2), vocab_size) — clear of the special
 * and byte tokens at the bottom of common vocabularies. vocab_size must count ordinary tokens
 * only (e.g. 128000 for Llama 3, whose specials sit above). NULL when out of memory. */
cJSON *dsb_prompt_token_ids(uint64_t seed, int n, int vocab_size);

/* Number of whitespace-separated words in s (the token estimate for file prompts). */
int dsb_count_words(const char *s);

/* Adapter reference from a file: not given, explicitly the base model (JSON null or "" or
 * "base"), by name, or by index into the adapter list. */
typedef enum { DSB_AREF_NONE = 0, DSB_AREF_BASE, DSB_AREF_NAME, DSB_AREF_INDEX } dsb_aref_kind;
typedef struct dsb_aref {
    dsb_aref_kind kind;
    char *name; /* DSB_AREF_NAME; owned */
    int index;  /* DSB_AREF_INDEX */
} dsb_aref;

/* One line of a --prompts file:
 *   {"prompt": "..."} or {"text": "..."} or {"messages": [{"role": ..., "content": ...}, ...]}
 *   optional "output_len" (or "max_tokens") and "adapter" (name, index or null for the base). */
typedef struct dsb_prompt_rec {
    char *text;        /* prompt text (for messages: the contents joined with "\n"); owned */
    cJSON *messages;   /* the messages array when given, else NULL; owned */
    int output_len;    /* 0: use --output-len */
    int est_tokens;    /* word count of text */
    dsb_aref adapter;
} dsb_prompt_rec;

/* One line of a --trace file:
 *   {"timestamp": SECONDS, "adapter": NAME|INDEX|null, "input_len": N, "output_len": M}
 * ("time" or "t" are accepted for timestamp). */
typedef struct dsb_trace_rec {
    double t;
    int input_len, output_len;
    dsb_aref adapter;
} dsb_trace_rec;

typedef struct dsb_records {
    dsb_prompt_rec *prompts;
    dsb_trace_rec *trace; /* sorted by t, rebased so that the first is at 0 */
    size_t n;
} dsb_records;

/* Load a file; blank lines and lines starting with '#' are skipped. Returns 0, or -1 with
 * "PATH:LINE: reason" in err. Free with dsb_records_free. */
int dsb_prompts_load(const char *path, dsb_records *out, char *err, size_t errlen);
int dsb_trace_load(const char *path, dsb_records *out, char *err, size_t errlen);
void dsb_records_free(dsb_records *r);

#endif
