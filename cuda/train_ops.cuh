/* The CUDA backend's training table (include/ds/backend_train.h): train_ops.cu holds the table
 * and most ops, train_attn.cu the attention pair declared here. */
#ifndef DS_CUDA_TRAIN_OPS_CUH
#define DS_CUDA_TRAIN_OPS_CUH

#include "ds/backend_train.h"

size_t ds_cuda_t_attn_work_floats(void *ctx, int32_t max_len, int32_t n_prefix, int32_t hd);
int ds_cuda_t_attention_fwd(void *ctx, const ds_train_attn_args *a);
int ds_cuda_t_attention_bwd(void *ctx, const ds_train_attn_args *a, const float *dout, float *dq, float *dk,
                            float *dv, float *dpk, float *dpv);

extern const struct ds_backend_train_iface ds_cuda_train_iface;
int ds_cuda_matmul_t(void *ctx, const float *dy, const ds_mat *w, float *dx, int32_t n, bool accumulate);

#endif
