/* deltaserve — typed weight matrices: the storage formats a model keeps its weights in.
 *
 * A weight stays in its file format from load to matmul (the GGUF mapping, or 16-bit copies of
 * safetensors): F32, F16, BF16 and llama.cpp's block formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K,
 * Q5_K, Q6_K. Blocks run along a row (the input dimension), so a row is self-contained and rows
 * can be permuted or sliced without touching their bytes. The numbering is ggml's type ids, so a
 * GGUF tensor's type is its ds_dtype.
 *
 * Dequantisation follows ggml-quants.c dequantize_row_* operation for operation, so the fp32
 * values are bit-identical to ggml's and gguf-py's (tests/golden/gen_quant_golden.py checks it).
 * Everything here is a pure function: any thread. Implemented in src/quant/quant.c. */
#ifndef DS_WEIGHT_H
#define DS_WEIGHT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    DS_DTYPE_NONE = -1,
    DS_DTYPE_F32 = 0,
    DS_DTYPE_F16 = 1,
    DS_DTYPE_Q4_0 = 2,
    DS_DTYPE_Q4_1 = 3,
    DS_DTYPE_Q5_0 = 6,
    DS_DTYPE_Q5_1 = 7,
    DS_DTYPE_Q8_0 = 8,
    DS_DTYPE_Q4_K = 12,
    DS_DTYPE_Q5_K = 13,
    DS_DTYPE_Q6_K = 14,
    DS_DTYPE_BF16 = 30,
    DS_DTYPE_COUNT = 31 /* bound for per-dtype tables */
} ds_dtype;

/* A host weight matrix, logical shape [rows][cols] (torch [out][in]); row r starts at
 * data + r·row_bytes. data == NULL means "absent". Who owns data is said where a ds_weight is
 * handed out (ds_model: the model, valid until ds_model_free). */
typedef struct ds_weight {
    const void *data;
    ds_dtype dtype;
    int32_t rows, cols;
    size_t row_bytes;
    bool file_view; /* data lies in a read-only mapping of the model file (a GGUF view): its pages can
                     * be dropped and are read back from the file on the next access */
} ds_weight;

/* Whether deltaserve stores and computes with this dtype. */
bool ds_dtype_supported(int dtype);
/* "Q4_K", "F32", ...; "?" for an unsupported id. Static string. */
const char *ds_dtype_name(ds_dtype t);
/* Parses "q8_0", "Q4_K", "f16", ... (case-insensitive). Returns DS_DTYPE_NONE when unknown. */
ds_dtype ds_dtype_parse(const char *s);
/* Elements per block (1 for F32/F16/BF16, 32 or 256) and bytes per block. */
int32_t ds_dtype_block(ds_dtype t);
size_t ds_dtype_block_bytes(ds_dtype t);
/* Bytes of one row of `cols` elements; 0 when cols is not a multiple of the block size or the
 * dtype is unsupported. */
size_t ds_dtype_row_bytes(ds_dtype t, int64_t cols);

/* Fills *w for rows×cols of dtype t at data. Returns 0, or DS_EINVAL when cols is not a whole
 * number of blocks or the dtype is unsupported. */
int ds_weight_init(ds_weight *w, const void *data, ds_dtype t, int32_t rows, int32_t cols);
/* Dequantises n elements (a multiple of the block size) from src to dst. Returns 0 or DS_EINVAL. */
int ds_dequant_row(ds_dtype t, const void *src, float *dst, int64_t n);
/* Row r of w as fp32 (cols floats). Returns 0 or DS_EINVAL (r out of range). */
int ds_weight_row(const ds_weight *w, int32_t r, float *dst);

/* Quantises n fp32 values into dst (ds_dtype_row_bytes(t, n) bytes). Supported targets: F32,
 * F16, BF16, Q8_0 (ggml's quantize_row_q8_0_ref), Q4_K (per-sub-block min/max scales; not
 * llama.cpp's search, so its error is somewhat larger than llama-quantize's). Returns 0 or
 * DS_EUNSUPPORTED / DS_EINVAL. */
int ds_quantize_row(ds_dtype t, const float *src, void *dst, int64_t n);
bool ds_dtype_can_quantize(ds_dtype t);

/* The 12 scale bytes of Q4_K/Q5_K hold 8 six-bit scales and 8 six-bit mins: sub-block j's (ggml's
 * get_scale_min_k4). */
static inline void ds_k4_scale_min(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

#ifdef __cplusplus
}
#endif
#endif
