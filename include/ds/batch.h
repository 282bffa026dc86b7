/* deltaserve — the batch layout shared by the engine, the forward pass and the backends.
 *
 * A step's batch is a flat list of tokens from many sequences. Each sequence's tokens are
 * contiguous and in order; sequences are grouped by adapter so that every LoRA-family delta is one
 * segmented op per projection (SGMV, Punica / S-LoRA; docs/ARCHITECTURE.md, "A step: the batch and
 * the adapter plan").
 * All arrays are host memory, borrowed for the duration of ds_llama_forward. */
#ifndef DS_BATCH_H
#define DS_BATCH_H

#include "ds/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ds_batch {
    int32_t n_tokens;
    const int32_t *tokens;       /* [n_tokens] token ids */
    const int32_t *pos;          /* [n_tokens] RoPE positions */
    const int32_t *tok_seq;      /* [n_tokens] index of the token's sequence in this batch */
    const int32_t *tok_kv;       /* [n_tokens] logical KV slot the token's K/V go to; it attends to 0..tok_kv */
    int32_t n_seqs;
    const int32_t *block_tables; /* [n_seqs][max_blocks] physical KV block ids */
    int32_t max_blocks;
    const int32_t *seq_prefix;   /* [n_seqs] prefix-tuning slots at the head of the table, or NULL */
    int32_t n_out;
    const int32_t *out_rows;     /* [n_out] token rows whose logits are wanted (ascending) */
    const int32_t *seq_adapter;  /* [n_seqs] resident adapter slot per sequence (-1 = none), or NULL */
} ds_batch;

#ifdef __cplusplus
}
#endif
#endif
