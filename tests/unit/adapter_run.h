/* Test harness: runs sequences, each with its own adapter (or none), through ds_llama in shared
 * batches — soft prompts, prefix blocks and LoRA-family segments included — building the step's
 * adapter plan once per step as the engine does (src/engine/scheduler.c). */
#ifndef DS_TEST_ADAPTER_RUN_H
#define DS_TEST_ADAPTER_RUN_H

#include "ds/adapter.h"
#include "ds/model.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define AR_MAX_SEQS 20
#define AR_BLOCKS_PER_SEQ 32

typedef struct ar_seq {
    const ds_adapter_dev *dev; /* NULL = base */
    int32_t n_prefix;          /* prefix-tuning slots (shared blocks at the head of the table) */
    int32_t pos_base;          /* RoPE position of the first own token: n_prefix, or 0 (prefix_pos0) */
    int32_t table[AR_BLOCKS_PER_SEQ + 4];
    int32_t n_past;            /* own tokens (incl. virtual) already in the cache */
    int32_t n_virtual;         /* soft-prompt rows still to feed (prompt tuning) */
} ar_seq;

typedef struct ar_ctx {
    ds_llama *L;
    const ds_model *m;
    ar_seq seqs[AR_MAX_SEQS];
    int n_seqs;
    int32_t next_block;
    ds_plan *plan;
} ar_ctx;

static void ar_init(ar_ctx *c, ds_llama *L, const ds_model *m) {
    memset(c, 0, sizeof *c);
    c->L = L;
    c->m = m;
    ds_err err = {{0}};
    if (!(c->plan = ds_adapter_plan_create(L, AR_MAX_SEQS, 512, &err))) fprintf(stderr, "plan: %s\n", err.msg);
}

static void ar_free(ar_ctx *c) { ds_adapter_plan_free(c->plan); }

/* Adds a sequence; prefix adapters get their K/V written into fresh blocks. Returns its index. */
static int ar_add(ar_ctx *c, const ds_adapter_dev *dev) {
    ar_seq *s = &c->seqs[c->n_seqs];
    memset(s, 0, sizeof *s);
    s->dev = dev;
    int pb = 0;
    if (dev && dev->host->prefix) { /* prefix tuning, alone or in a MAM union */
        int32_t bs = ds_llama_kv_block_size(c->L);
        s->n_prefix = dev->host->n_virtual;
        pb = (s->n_prefix + bs - 1) / bs;
        for (int i = 0; i < pb; i++) s->table[i] = c->next_block++;
        ds_err err = {{0}};
        if (ds_adapter_write_prefix(c->L, dev->host, s->table, pb, &err)) fprintf(stderr, "prefix: %s\n", err.msg);
        s->pos_base = dev->host->prefix_pos0 ? 0 : s->n_prefix;
    }
    for (int i = pb; i < AR_BLOCKS_PER_SEQ + 4; i++) s->table[i] = c->next_block++;
    if (dev && dev->host->kind == DS_ADAPTER_PROMPT) s->n_virtual = dev->host->n_virtual;
    return c->n_seqs++;
}

/* One step: sequence i feeds n_tok[i] tokens toks[i] (plus its pending soft-prompt rows first).
 * Logits of every REAL token row go to `logits` in batch order. Returns the forward's status. */
static int ar_step(ar_ctx *c, int32_t *const *toks, const int *n_tok, float *logits) {
    int32_t tokens[512], pos[512], seq[512], kv[512], out[512], soft_rows[512], slots_of[AR_MAX_SEQS];
    const float *soft_src[512];
    const ds_adapter_dev *slots[AR_MAX_SEQS];
    ds_adapter_seg segs[AR_MAX_SEQS];
    int32_t tables[AR_MAX_SEQS * (AR_BLOCKS_PER_SEQ + 4)], prefix[AR_MAX_SEQS];
    int t = 0, n_out = 0, n_soft = 0, n_segs = 0, n_slots = 0;
    for (int i = 0; i < c->n_seqs; i++) {
        ar_seq *s = &c->seqs[i];
        int start = t, nv = n_tok[i] > 0 ? s->n_virtual : 0;
        for (int j = 0; j < nv + n_tok[i]; j++, t++) {
            tokens[t] = j < nv ? 0 : toks[i][j - nv];
            pos[t] = s->pos_base + s->n_past + j;
            kv[t] = s->n_prefix + s->n_past + j;
            seq[t] = i;
            if (j < nv) {
                soft_rows[n_soft] = t;
                soft_src[n_soft++] = s->dev->prompt_rows[j];
            } else {
                out[n_out++] = t;
            }
        }
        s->n_past += nv + n_tok[i];
        s->n_virtual -= nv;
        memcpy(tables + i * (AR_BLOCKS_PER_SEQ + 4), s->table, sizeof s->table);
        prefix[i] = s->n_prefix;
        if (s->dev && t > start) {
            slots[n_slots] = s->dev;
            slots_of[i] = n_slots;
            segs[n_segs++] = (ds_adapter_seg){.start = start, .len = t - start, .slot = n_slots++};
        }
    }
    (void)slots_of;
    ds_adapter_batch ad = {.slots = slots, .segs = segs, .n_segs = n_segs, .soft_rows = soft_rows,
                           .soft_src = soft_src, .n_soft = n_soft};
    ds_batch b = {.n_tokens = t, .tokens = tokens, .pos = pos, .tok_seq = seq, .tok_kv = kv, .n_seqs = c->n_seqs,
                  .block_tables = tables, .max_blocks = AR_BLOCKS_PER_SEQ + 4, .seq_prefix = prefix,
                  .n_out = n_out, .out_rows = out, .seq_adapter = NULL};
    ds_err err = {{0}};
    int st = c->plan ? ds_adapter_plan_build(c->plan, &ad, &b) : DS_ENOMEM;
    if (st) fprintf(stderr, "plan: %s\n", ds_strerror(st));
    else if ((st = ds_llama_forward(c->L, &b, c->plan, logits, &err))) fprintf(stderr, "forward: %s\n", err.msg);
    return st;
}
#endif
