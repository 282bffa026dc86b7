/* libFuzzer: the records a server reads back from its data directory at start
 * (src/server/file_store.c, src/train/job_store.c): an uploaded file's record, a fine-tuning job's
 * record (re-encoded and parsed again: what the parser accepts must survive a round trip) and a
 * job's training state. The first byte picks the parser. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "server/file_store.h"
#include "train/jobs_internal.h"

static void job_record(const char *buf, size_t len) {
    ft_job j;
    memset(&j, 0, sizeof j);
    ds_err err = {{0}};
    if (ft_record_parse(buf, len, &j, &err) == 0) {
        size_t n = 0;
        char *text = ft_record_encode(&j, &n);
        DS_ASSERT(text && strlen(text) == n);
        ft_job k;
        memset(&k, 0, sizeof k);
        DS_ASSERT(ft_record_parse(text, n, &k, &err) == 0);
        DS_ASSERT(!strcmp(k.info.id, j.info.id) && k.n_ev == j.n_ev && k.n_ck == j.n_ck &&
                  k.info.status == j.info.status && k.info.seed == j.info.seed);
        free(text), free(k.ev), free(k.ck);
    }
    free(j.ev), free(j.ck);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const uint8_t which = data[0] % 3;
    char *buf = malloc(size); /* an exact-size copy: reads past the end are caught */
    if (!buf) return 0;
    memcpy(buf, data + 1, size - 1);
    const size_t len = size - 1;
    ds_err err = {{0}};
    if (which == 0) {
        ds_file meta;
        size_t off = 0;
        if (ds_file_record_parse(buf, len, &meta, &off, &err) == 0) DS_ASSERT(off + meta.bytes == len);
    } else if (which == 1) {
        job_record(buf, len);
    } else {
        ft_state_view v;
        if (ft_state_parse((const unsigned char *)buf, len, &v, &err) == 0) {
            for (uint32_t i = 0; i < v.n_tensors; i++) /* every view lies inside the buffer */
                DS_ASSERT((const char *)v.t[i].v + v.t[i].n * sizeof(float) <= buf + len);
            free(v.t);
        }
    }
    free(buf);
    return 0;
}
