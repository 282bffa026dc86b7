/* tr_param_io (train/train_internal.h): one parameter tensor between the trainer's backend and host
 * memory, for the jobs' resumable state. On its own so that job_store.c, which the record fuzzer
 * (tests/fuzz/fuzz_records.c) links without the trainer, links with just this. */
#include "train/train_internal.h"

int tr_param_io(const ds_trainer *t, int32_t i, int which, void *host, bool write) {
    const tr_param *p = &t->params[i];
    float *dev = which == TR_VALUE ? p->pub.value : which == TR_M ? p->m : which == TR_V ? p->v : p->grad;
    const size_t bytes = p->pub.n * sizeof(float);
    void *c = t->be->ctx;
    return write ? t->be->iface->upload(c, dev, host, bytes) : t->be->iface->download(c, host, dev, bytes);
}
