/* Fine-tuning limits (include/ds/train.h, "ds_ft_limits"): what a job would make the server hold —
 * the adapter it produces, the memory to train it, the disk its checkpoints and resumable state
 * take — computed from its hyperparameters before it is queued, so that a small request cannot
 * cost gigabytes (a 259-byte job asking for rank 512 on every module would). */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "adapter/loader.h"
#include "ds/adapter.h"
#include "ds/model.h"
#include "ds/train.h"
#include "train/jobs_internal.h"

ds_ft_limits ds_ft_default_limits(void) {
    return (ds_ft_limits){.max_adapter_bytes = (size_t)512 << 20,
                          .disk_quota_bytes = (uint64_t)4096 << 20,
                          .keep_checkpoints = 2,
                          .max_epochs = 50};
}

static double mib(uint64_t b) { return (double)b / (1 << 20); }

/* The trainer keeps f32 values, gradients and AdamW's two moments; peft_save.c writes F32. */
size_t ds_ft_adapter_bytes(const ds_model *m, ds_adapter_kind kind, int32_t rank, uint32_t targets,
                           int32_t n_virtual) {
    const ds_model_config *c = &m->cfg;
    if (kind == DS_ADAPTER_PROMPT) return (size_t)n_virtual * (size_t)c->d_model * sizeof(float);
    if (kind == DS_ADAPTER_PREFIX)
        return (size_t)n_virtual * (size_t)c->n_layer * 2u * (size_t)c->n_kv_head * (size_t)c->head_dim *
               sizeof(float);
    size_t n = 0;
    for (int p = 0; p < DS_PROJ_COUNT; p++) {
        if (!(targets & DS_TRAIN_TARGET(p))) continue;
        int32_t in = 0, out = 0;
        ds_adapter_base_dims(m, p, &in, &out);
        n += (size_t)c->n_layer * (size_t)rank * ((size_t)in + (size_t)out);
    }
    if (targets & DS_TRAIN_TARGET_LM_HEAD) n += (size_t)rank * ((size_t)c->d_model + (size_t)c->n_vocab);
    if (targets & DS_TRAIN_TARGET_EMBED) n += (size_t)rank * ((size_t)c->d_model + (size_t)c->n_vocab);
    return n * sizeof(float);
}

void ds_ft_dp_bytes(const ds_model *m, uint32_t targets, float density, bool bias, size_t *dense, size_t *sparse) {
    size_t d = 0, sp = 0;
    for (int p = 0; p < DS_PROJ_COUNT; p++) {
        if (!(targets & DS_TRAIN_TARGET(p))) continue;
        int32_t in = 0, out = 0;
        ds_adapter_base_dims(m, p, &in, &out);
        const size_t n = (size_t)in * (size_t)out, L = (size_t)m->cfg.n_layer;
        const double k = ceil((double)density * (double)n - 1e-9); /* train_dp.c keeps at most this many */
        d += L * (n + (bias ? (size_t)out : 0)) * sizeof(float);
        sp += L * (((size_t)out + 1) * sizeof(int32_t) + (size_t)k * (sizeof(int32_t) + sizeof(float)) +
                   (bias ? (size_t)out * sizeof(float) : 0));
    }
    *dense = d, *sparse = sp;
}

/* Diff pruning: the dense warm-up δ must fit the adapter budget; disk holds the sparse delta as
 * published and checkpointed, and the dense resumable state (values + two moments) twice. */
static int dp_check(const ds_ft_limits *L, const ds_model *m, const ds_ft_job_spec *sp, int32_t keep, ds_err *err) {
    size_t dense, sparse;
    ds_ft_dp_bytes(m, sp->targets, sp->density, sp->bias, &dense, &sparse);
    if (L->max_adapter_bytes && dense > L->max_adapter_bytes)
        return ds_err_set(err, DS_EINVAL,
                          "diff pruning's dense warm-up trains a full-size delta of every target module: %.1f MiB, "
                          "more than the adapter budget (--adapter-budget-mb %.0f MiB); train fewer target modules",
                          mib(dense), mib(L->max_adapter_bytes));
    const uint64_t disk = (uint64_t)sparse * (1u + (uint64_t)keep) + 6u * (uint64_t)dense;
    if (L->disk_quota_bytes && disk > L->disk_quota_bytes)
        return ds_err_set(err, DS_EINVAL,
                          "this job's checkpoints and dense training state would take up to %.1f MiB of disk, more "
                          "than the quota (--ft-disk-quota-mb %.0f MiB)",
                          mib(disk), mib(L->disk_quota_bytes));
    return 0;
}

/* Disk one job may use at its peak: the published adapter, `keep` epoch checkpoints, and the
 * resumable state (values + two moments, job_store.c) twice while a new one replaces the old. */
static uint64_t job_disk_bytes(size_t adapter, int32_t keep) {
    return (uint64_t)adapter * (1u + (uint64_t)keep + 6u);
}


int ft_limits_check(const ds_ft_limits *L, const ds_model *m, ds_adapter_registry *reg, const ds_ft_job_spec *sp,
                    ds_err *err) {
    size_t continue_bytes = 0;
    if (sp->from_adapter) { /* the job's adapter is as large as the one it continues */
        ds_adapter_entry *e = sp->model && reg ? ds_registry_acquire(reg, sp->model) : NULL;
        if (!e) return ds_err_set(err, DS_EINVAL, "the adapter to continue is not loaded");
        continue_bytes = e->adapter->host_bytes;
        ds_registry_release(reg, e);
    }
    const int32_t epochs = sp->n_epochs > 0 ? sp->n_epochs : 3;
    if (L->max_epochs > 0 && epochs > L->max_epochs)
        return ds_err_set(err, DS_EINVAL, "n_epochs %d is more than this server allows (--ft-max-epochs %d)",
                          (int)epochs, (int)L->max_epochs);
    if (sp->kind == DS_ADAPTER_DELTA && sp->density > 0 && !sp->from_adapter) /* diff pruning */
        return dp_check(L, m, sp, L->keep_checkpoints > 0 && L->keep_checkpoints < epochs ? L->keep_checkpoints : epochs,
                        err);
    size_t bytes = continue_bytes;
    if (!sp->from_adapter) {
        const int32_t rank = sp->rank > 0 ? sp->rank : 8;
        const uint32_t tg = sp->targets ? sp->targets : DS_TRAIN_TARGET(DS_PROJ_Q) | DS_TRAIN_TARGET(DS_PROJ_V);
        bytes = ds_ft_adapter_bytes(m, sp->kind, rank, tg, sp->n_virtual > 0 ? sp->n_virtual : 20);
        if (sp->kind == DS_ADAPTER_BOTTLENECK) bytes = ds_train_bn_bytes(m, &sp->bn); /* train_bn.c */
    }
    if (L->max_adapter_bytes && bytes > L->max_adapter_bytes)
        return ds_err_set(err, DS_EINVAL,
                          "the adapter this job would produce takes %.1f MiB, more than the adapter budget "
                          "(--adapter-budget-mb %.0f MiB): it could never be served; lower the rank or train "
                          "fewer target modules",
                          mib(bytes), mib(L->max_adapter_bytes));
    const int32_t keep = L->keep_checkpoints > 0 && L->keep_checkpoints < epochs ? L->keep_checkpoints : epochs;
    const uint64_t disk = job_disk_bytes(bytes, keep);
    if (L->disk_quota_bytes && disk > L->disk_quota_bytes)
        return ds_err_set(err, DS_EINVAL,
                          "this job's checkpoints and state would take up to %.1f MiB of disk (an adapter of "
                          "%.1f MiB, %d checkpoints kept), more than the quota (--ft-disk-quota-mb %.0f MiB)",
                          mib(disk), mib(bytes), (int)keep, mib(L->disk_quota_bytes));
    return 0;
}
