/* safetensors reader: round trip of F32/F16/BF16, malformed headers, sharded directories. */
#include "ds_test.h"
#include "format/safetensors.h"

#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct {
    uint8_t *p;
    size_t n;
} blob;

/* header JSON + data bytes → a safetensors image (u64 length prefix). */
static blob make(const char *header, const void *data, size_t n_data) {
    uint64_t h = strlen(header);
    blob b = {malloc(8 + h + n_data), 8 + h + n_data};
    memcpy(b.p, &h, 8);
    memcpy(b.p + 8, header, h);
    if (n_data) memcpy(b.p + 8 + h, data, n_data);
    return b;
}

/* Images are heap blocks of exactly their size, so ASan sees any over-read. */
static int open_blob(ds_st_file *f, const blob *b, ds_err *err) {
    return ds_st_open_mem(f, b->p, b->n, "test.safetensors", err);
}

static void expect_fail(const char *header, size_t n_data, const char *needle, const char *what) {
    static uint8_t zeros[4096];
    blob b = make(header, zeros, n_data);
    ds_st_file f;
    ds_err err = {{0}};
    int rc = open_blob(&f, &b, &err);
    CHECK_MSG(rc == DS_EFORMAT, "%s: rc %d", what, rc);
    CHECK_MSG(strstr(err.msg, needle) && strstr(err.msg, "test.safetensors"), "%s: message '%s' lacks '%s'", what,
              err.msg, needle);
    if (!rc) ds_st_close(&f);
    free(b.p);
}

static const char GOOD_HDR[] =
    "{\"__metadata__\":{\"format\":\"pt\"},"
    "\"w32\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
    "\"w16\":{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[24,30]},"
    "\"wbf\":{\"dtype\":\"BF16\",\"shape\":[1,1,1,3],\"data_offsets\":[30,36]},"
    "\"ids\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[36,44]},"
    "\"scalar\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[44,48]},"
    "\"empty\":{\"dtype\":\"F32\",\"shape\":[0,4],\"data_offsets\":[48,48]}}  ";

static blob good_file(void) {
    uint8_t d[48];
    const float f32[6] = {1.5f, -2.0f, 0.0f, 3.25f, 1e-3f, -7.0f};
    const float vals[3] = {0.5f, -1.25f, 65504.0f};
    memcpy(d, f32, 24);
    for (int i = 0; i < 3; i++) {
        uint16_t h = ds_f32_to_f16(vals[i]), b = ds_f32_to_bf16(vals[i]);
        memcpy(d + 24 + 2 * i, &h, 2);
        memcpy(d + 30 + 2 * i, &b, 2);
    }
    int64_t id = 42;
    memcpy(d + 36, &id, 8);
    float sc = 9.0f;
    memcpy(d + 44, &sc, 4);
    return make(GOOD_HDR, d, 48);
}

static void test_round_trip(void) {
    blob b = good_file();
    char path[] = "/tmp/ds_test_st_XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0 && write(fd, b.p, b.n) == (ssize_t)b.n);
    close(fd);
    ds_st_file f;
    ds_err err = {{0}};
    CHECK_MSG(ds_st_open(&f, path, &err) == 0, "%s", err.msg);
    CHECK_EQ_INT(f.n_tensors, 6); /* __metadata__ skipped */
    float out[6];
    const ds_st_tensor *t = ds_st_find(&f, "w32");
    CHECK(t && t->dtype == DS_ST_F32 && t->n_dims == 2 && t->shape[0] == 2 && t->shape[1] == 3 && t->n_elems == 6);
    CHECK(ds_st_read_f32(t, f.path, (int64_t[]){2, 3}, 2, out, 6, &err) == 0 && out[0] == 1.5f && out[5] == -7.0f);
    CHECK_EQ_INT(ds_st_read_f32(t, f.path, (int64_t[]){3, 2}, 2, out, 6, &err), DS_EFORMAT);
    CHECK(strstr(err.msg, "[2, 3]") && strstr(err.msg, "[3, 2]") && strstr(err.msg, "w32"));
    CHECK_EQ_INT(ds_st_read_f32(t, f.path, NULL, 0, out, 5, &err), DS_EINVAL);
    t = ds_st_find(&f, "w16");
    CHECK(t && ds_st_read_f32(t, NULL, (int64_t[]){3}, 1, out, 3, &err) == 0);
    CHECK(out[0] == 0.5f && out[1] == -1.25f && out[2] == 65504.0f);
    t = ds_st_find(&f, "wbf");
    CHECK(t && t->n_dims == 4 && ds_st_read_f32(t, NULL, (int64_t[]){1, 1, 1, 3}, 4, out, 3, &err) == 0);
    CHECK(out[0] == 0.5f && out[1] == -1.25f && out[2] == 65536.0f); /* bf16 rounds 65504 up */
    t = ds_st_find(&f, "ids");
    CHECK(t && t->dtype == DS_ST_UNSUPPORTED && !strcmp(t->dtype_name, "I64"));
    CHECK_EQ_INT(ds_st_read_f32(t, f.path, NULL, 0, out, 1, &err), DS_EUNSUPPORTED);
    CHECK(strstr(err.msg, "I64") && strstr(err.msg, "'ids'") && strstr(err.msg, path));
    t = ds_st_find(&f, "scalar");
    CHECK(t && t->n_dims == 0 && ds_st_read_f32(t, NULL, NULL, 0, out, 1, &err) == 0 && out[0] == 9.0f);
    t = ds_st_find(&f, "empty");
    CHECK(t && t->n_elems == 0 && ds_st_read_f32(t, NULL, (int64_t[]){0, 4}, 2, out, 0, &err) == 0);
    CHECK(ds_st_find(&f, "__metadata__") == NULL && ds_st_find(&f, "nope") == NULL);
    ds_st_close(&f);
    ds_st_close(&f);
    unlink(path);
    CHECK_EQ_INT(ds_st_open(&f, "/nonexistent.safetensors", &err), DS_EIO);
    free(b.p);
}

static void test_malformed(void) {
    blob b = {(uint8_t[]){1, 2, 3}, 3};
    ds_st_file f;
    ds_err err = {{0}};
    CHECK_EQ_INT(open_blob(&f, &b, &err), DS_EFORMAT);
    uint8_t big[16] = {0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, '{', '}'};
    b = (blob){big, 16};
    CHECK_EQ_INT(open_blob(&f, &b, &err), DS_EFORMAT);
    CHECK(strstr(err.msg, "header length") != NULL);
    uint64_t huge = UINT64_MAX;
    memcpy(big, &huge, 8);
    CHECK_EQ_INT(open_blob(&f, &b, &err), DS_EFORMAT);

    expect_fail("{\"a\":", 0, "not a valid JSON", "bad JSON");
    expect_fail("[1,2]", 0, "not a valid JSON object", "not an object");
    expect_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,16]}}", 8, "out of range", "offset past end");
    expect_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8, "out of range", "end < begin");
    expect_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8, "need 12", "wrong byte size");
    expect_fail("{\"a\":{\"dtype\":\"BF16\",\"shape\":[1099511627776,1099511627776],\"data_offsets\":[0,8]}}", 8,
                "overflow", "shape overflow");
    expect_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                12, "overlaps", "overlapping");
    expect_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                8, "duplicate", "duplicate name");
    expect_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, "shape", "negative dim");
    expect_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4, "shape", "fractional dim");
    expect_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":\"x\",\"data_offsets\":[0,4]}}", 4, "shape", "shape string");
    expect_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", 8, "data_offsets", "3 offsets");
    expect_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, "data_offsets", "no offsets");
    expect_fail("{\"a\":{\"dtype\":7,\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "dtype", "dtype number");
    expect_fail("{\"a\":[1]}", 0, "not an object", "entry array");

    /* Unsupported dtype and rank: the file opens, reading refuses. */
    static uint8_t zeros[64];
    b = make("{\"a\":{\"dtype\":\"F8_E4M3\",\"shape\":[4],\"data_offsets\":[0,4]},"
             "\"b\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,2],\"data_offsets\":[4,12]},"
             "\"c\":{\"dtype\":\"F4\",\"shape\":[4],\"data_offsets\":[12,14]}}",
             zeros, 14);
    CHECK_MSG(open_blob(&f, &b, &err) == 0, "%s", err.msg);
    float out[4];
    CHECK_EQ_INT(ds_st_read_f32(ds_st_find(&f, "a"), f.path, NULL, 0, out, 4, &err), DS_EUNSUPPORTED);
    CHECK(strstr(err.msg, "F8_E4M3") != NULL);
    CHECK_EQ_INT(ds_st_read_f32(ds_st_find(&f, "b"), f.path, NULL, 0, out, 2, &err), DS_EUNSUPPORTED);
    CHECK(strstr(err.msg, "5 dimensions") != NULL);
    CHECK_EQ_INT(ds_st_read_f32(ds_st_find(&f, "c"), f.path, NULL, 0, out, 4, &err), DS_EUNSUPPORTED);
    ds_st_close(&f);
    free(b.p);
}

/* Every prefix and random corruption of a valid file: clean outcome, no over-read (ASan). */
static void test_truncation_and_fuzz(void) {
    blob good = good_file();
    int ok = 0;
    for (size_t n = 0; n < good.n; n++) {
        uint8_t *copy = malloc(n ? n : 1);
        memcpy(copy, good.p, n);
        ds_st_file f;
        ds_err err;
        if (ds_st_open_mem(&f, copy, n, "cut", &err) == 0) ok++, ds_st_close(&f);
        free(copy);
    }
    CHECK_EQ_INT(ok, 0);
    uint64_t s = 777;
    for (int it = 0; it < 3000; it++) {
        uint8_t *copy = malloc(good.n);
        memcpy(copy, good.p, good.n);
        for (int k = 0; k < 1 + it % 3; k++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            copy[(s >> 33) % good.n] = (uint8_t)(s >> 17);
        }
        ds_st_file f;
        ds_err err;
        if (ds_st_open_mem(&f, copy, good.n, "fuzz", &err) == 0) {
            float out[64];
            for (size_t i = 0; i < f.n_tensors; i++)
                if (f.tensors[i].n_elems <= 64) ds_st_read_f32(&f.tensors[i], "fuzz", NULL, 0, out, f.tensors[i].n_elems, &err);
            ds_st_close(&f);
        }
        free(copy);
    }
    free(good.p);
}

/* ---- directories ---- */

static void write_file(const char *dir, const char *name, const void *p, size_t n) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *fp = fopen(path, "wb");
    CHECK(fp && fwrite(p, 1, n, fp) == n);
    if (fp) fclose(fp);
}

static void write_st(const char *dir, const char *name, const char *tensor, float v) {
    char hdr[160];
    snprintf(hdr, sizeof hdr, "{\"%s\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", tensor);
    blob b = make(hdr, &v, 4);
    write_file(dir, name, b.p, b.n);
    free(b.p);
}

static void rm_dir(const char *dir) {
    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0);
}

static void write_index(const char *dir, const char *map) {
    char text[512];
    snprintf(text, sizeof text, "{\"metadata\":{\"total_size\":8},\"weight_map\":{%s}}", map);
    write_file(dir, "model.safetensors.index.json", text, strlen(text));
}

static int open_dir(const char *dir, ds_st_set *s, ds_err *err) {
    int rc = ds_st_set_open_dir(s, dir, err);
    if (!rc) ds_st_set_close(s);
    return rc;
}

static void test_dirs(void) {
    char dir[] = "/tmp/ds_test_stdir_XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    ds_st_set s;
    ds_err err = {{0}};
    CHECK_EQ_INT(ds_st_set_open_dir(&s, dir, &err), DS_ENOTFOUND);
    CHECK(strstr(err.msg, dir) != NULL);
    write_st(dir, "model.safetensors", "x", 1.0f);
    CHECK_EQ_INT(ds_st_set_open_dir(&s, dir, &err), 0);
    CHECK(s.n_files == 1 && ds_st_set_find(&s, "x", NULL) != NULL);
    ds_st_set_close(&s);

    write_st(dir, "model-00001-of-00002.safetensors", "a", 1.0f);
    write_st(dir, "model-00002-of-00002.safetensors", "b", 2.0f);
    write_index(dir, "\"a\":\"model-00001-of-00002.safetensors\",\"b\":\"model-00002-of-00002.safetensors\"");
    CHECK_MSG(ds_st_set_open_dir(&s, dir, &err) == 0, "%s", err.msg);
    const ds_st_file *f = NULL;
    const ds_st_tensor *t = ds_st_set_find(&s, "b", &f);
    float v = 0;
    CHECK(s.n_files == 2 && t && f && strstr(f->path, "00002"));
    CHECK(t && ds_st_read_f32(t, f->path, (int64_t[]){1}, 1, &v, 1, &err) == 0 && v == 2.0f);
    CHECK(ds_st_set_find(&s, "x", NULL) == NULL); /* the index wins over model.safetensors */
    ds_st_set_close(&s);

    write_index(dir, "\"a\":\"model-00001-of-00002.safetensors\",\"b\":\"model-00001-of-00002.safetensors\"");
    CHECK_EQ_INT(open_dir(dir, &s, &err), DS_EFORMAT);
    CHECK(strstr(err.msg, "'b' is not in shard") != NULL);
    write_index(dir, "\"a\":\"missing.safetensors\"");
    CHECK_EQ_INT(open_dir(dir, &s, &err), DS_EIO);
    CHECK(strstr(err.msg, "missing.safetensors") != NULL);
    write_index(dir, "\"a\":\"../etc/passwd\"");
    CHECK_EQ_INT(open_dir(dir, &s, &err), DS_EPERM);
    write_index(dir, "\"a\":7");
    CHECK_EQ_INT(open_dir(dir, &s, &err), DS_EFORMAT);
    write_file(dir, "model.safetensors.index.json", "{\"weight_map\":", 14);
    CHECK_EQ_INT(open_dir(dir, &s, &err), DS_EFORMAT);
    CHECK(strstr(err.msg, "weight_map") != NULL);
    write_st(dir, "model-00002-of-00002.safetensors", "a", 2.0f); /* same name in two shards */
    write_index(dir, "\"a\":\"model-00001-of-00002.safetensors\",\"b\":\"model-00002-of-00002.safetensors\"");
    CHECK_EQ_INT(open_dir(dir, &s, &err), DS_EFORMAT);
    CHECK(strstr(err.msg, "appears in both") != NULL);
    rm_dir(dir);
}

int main(void) {
    test_round_trip();
    test_malformed();
    test_truncation_and_fuzz();
    test_dirs();
    return ds_test_result();
}
