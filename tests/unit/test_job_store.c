/* What the server keeps across restarts: crash-safe writes (src/util/durable.c), the uploaded-file
 * store (src/server/file_store.c), fine-tuning job records and training state
 * (src/train/job_store.c). tests/unit/test_jobs.c resumes a real job. */
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ds/train.h"
#include "ds_test.h"
#include "server/file_store.h"
#include "train/jobs_internal.h"
#include "util/durable.h"

static char g_root[256];

static void mk_root(void) {
    snprintf(g_root, sizeof g_root, "/tmp/ds-test-job-store-XXXXXX");
    CHECK(mkdtemp(g_root) != NULL);
}

static void rm_rf(const char *path) {
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", path);
    CHECK(system(cmd) == 0);
}

static int count_tmp(const char *dir) {
    DIR *d = opendir(dir);
    int n = 0;
    for (struct dirent *de; d && (de = readdir(d));) n += strstr(de->d_name, ".tmp") != NULL;
    if (d) closedir(d);
    return n;
}

static void write_raw(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    if (f) fputs(text, f), fclose(f);
}

static void test_durable(void) {
    char dir[400], path[500];
    snprintf(dir, sizeof dir, "%s/durable", g_root);
    ds_err err = {{0}};
    CHECK(ds_durable_mkdir(dir, "a/b", &err) == 0);
    const ds_iovec parts[2] = {{"hello ", 6}, {"world", 5}};
    CHECK(ds_durable_write(dir, "a/b/x.txt", parts, 2, &err) == 0);
    char *buf = NULL;
    size_t len = 0;
    snprintf(path, sizeof path, "%s/a/b/x.txt", dir);
    CHECK(ds_file_read_all(path, 100, &buf, &len, &err) == 0 && len == 11 && !memcmp(buf, "hello world", 11));
    free(buf);
    snprintf(path, sizeof path, "%s/a/b", dir);
    CHECK_EQ_INT(count_tmp(path), 0);
    /* a leftover temporary is swept, other files stay */
    snprintf(path, sizeof path, "%s/a/b/.y.txt.tmp", dir);
    write_raw(path, "half");
    snprintf(path, sizeof path, "%s/a/b", dir);
    CHECK_EQ_INT(ds_durable_sweep(path), 1);
    CHECK_EQ_INT(count_tmp(path), 0);
    /* failures name the relative file, never the directory */
    snprintf(path, sizeof path, "%s/a/b/x.txt", dir); /* a regular file where a directory should be */
    CHECK(ds_durable_write(path, "z.txt", parts, 1, &err) == DS_EIO);
    CHECK_MSG(strstr(err.msg, "z.txt: ") == err.msg && !strstr(err.msg, g_root), "%s", err.msg);
    CHECK(ds_durable_mkdir(path, "sub", &err) == DS_EIO);
    CHECK_MSG(!strstr(err.msg, g_root) && strstr(err.msg, "sub"), "%s", err.msg);
    /* scrubbing */
    char msg[256];
    snprintf(msg, sizeof msg, "/data/dir/ft-x/adapter.safetensors: failed in /data/dir; /data/dirty stays");
    ds_scrub_path(msg, "/data/dir/");
    CHECK_MSG(!strcmp(msg, "ft-x/adapter.safetensors: failed in .; /data/dirty stays"), "%s", msg);
}

static void test_file_store(void) {
    char dir[400], path[600];
    snprintf(dir, sizeof dir, "%s/fs", g_root);
    ds_err err = {{0}};
    ds_file_store *fs = ds_file_store_create(dir);
    CHECK(fs != NULL && ds_file_store_count(fs) == 0);
    const ds_file *a = NULL, *b = NULL;
    CHECK(ds_file_store_add(fs, "a.jsonl", "fine-tune", "{\"x\":1}\n", 8, &a, &err) == 0);
    char ida[40];
    snprintf(ida, sizeof ida, "%s", a->id);
    CHECK(ds_file_store_add(fs, "b\n\"name\".jsonl", "fine-tune", "bin\0ary\n", 8, &b, &err) == 0);
    char longname[400]; /* 2-byte characters cut at 255 bytes: stored as valid text */
    for (int i = 0; i < 199; i++) memcpy(longname + 2 * i, "\xc3\xa9", 2);
    longname[398] = '\0';
    const ds_file *c = NULL;
    CHECK(ds_file_store_add(fs, longname, "fine-tune", "{}\n", 3, &c, &err) == 0);
    CHECK(c && strlen(c->filename) == 254 && !memcmp(c->filename, longname, 254));
    CHECK(ds_file_store_delete(fs, c->id, &err) == 0);
    char idb[40];
    snprintf(idb, sizeof idb, "%s", b->id);
    const int64_t created = b->created_at;
    ds_file_store_free(fs);

    /* a corrupt record beside them is skipped; a temporary is swept */
    snprintf(path, sizeof path, "%s/files/file-0123456789abcdef", dir);
    write_raw(path, "{\"id\":\"file-0123456789abcdef\",\"bytes\":5}\nabc");
    snprintf(path, sizeof path, "%s/files/.file-00000000000000ff.tmp", dir);
    write_raw(path, "half");
    fs = ds_file_store_create(dir);
    CHECK_EQ_INT(ds_file_store_count(fs), 2);
    if (ds_file_store_count(fs) == 2) {
        const ds_file *x = ds_file_store_at(fs, 0), *y = ds_file_store_at(fs, 1);
        CHECK(!strcmp(x->id, ida) && !strcmp(y->id, idb)); /* upload order */
        CHECK(!strcmp(y->filename, "b\n\"name\".jsonl") && y->bytes == 8 && !memcmp(y->data, "bin\0ary\n", 8));
        CHECK(y->created_at == created && !strcmp(y->purpose, "fine-tune") && y->data[8] == '\0');
    }
    snprintf(path, sizeof path, "%s/files", dir);
    CHECK_EQ_INT(count_tmp(path), 0);
    CHECK(ds_file_store_delete(fs, ida, &err) == 0);
    CHECK(ds_file_store_delete(fs, ida, &err) == DS_ENOTFOUND);
    ds_file_store_free(fs);
    fs = ds_file_store_create(dir);
    CHECK(ds_file_store_count(fs) == 1 && ds_file_store_find(fs, idb) && !ds_file_store_find(fs, ida));
    ds_file_store_free(fs);

    /* a data directory that cannot be created: adds fail with DS_EIO, naming no path */
    snprintf(path, sizeof path, "%s/files/%s/below-a-file", dir, idb);
    fs = ds_file_store_create(path);
    CHECK(fs != NULL);
    CHECK(ds_file_store_add(fs, "c.jsonl", "fine-tune", "{}\n", 3, &a, &err) == DS_EIO);
    CHECK_MSG(!strstr(err.msg, g_root) && strstr(err.msg, "Not a directory"), "%s", err.msg);
    CHECK_EQ_INT(ds_file_store_count(fs), 0);
    ds_file_store_free(fs);

    /* the record parser */
    ds_file meta;
    size_t off = 0;
    const char ok[] = "{\"id\":\"file-00000000000000aa\",\"filename\":\"f\",\"purpose\":\"fine-tune\","
                      "\"created_at\":5,\"seq\":0,\"bytes\":3}\nabc";
    CHECK(ds_file_record_parse(ok, sizeof ok - 1, &meta, &off, &err) == 0 && meta.bytes == 3 &&
          !strcmp(ok + off, "abc"));
    CHECK(ds_file_record_parse(ok, sizeof ok - 2, &meta, &off, &err) == DS_EFORMAT); /* truncated */
    const char *bad[] = {"", "\n", "{}\n", "[1]\n", "{\"id\":\"file-zz\"}\n",
                         "{\"id\":\"file-00000000000000aa\",\"filename\":\"f\",\"purpose\":\"p\",\"created_at\":-1,"
                         "\"seq\":0,\"bytes\":0}\n",
                         "{\"id\":\"file-00000000000000aa\",\"filename\":\"f\",\"purpose\":\"p\",\"created_at\":1,"
                         "\"seq\":0,\"bytes\":1e300}\n"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        CHECK_MSG(ds_file_record_parse(bad[i], strlen(bad[i]), &meta, &off, &err) == DS_EFORMAT, "case %zu", i);
}

static void test_job_record(void) {
    ft_job j = {0};
    ds_ft_job_info *I = &j.info;
    snprintf(I->id, sizeof I->id, "ftjob-0123456789abcdef01234567");
    I->status = DS_FT_RUNNING;
    snprintf(I->model, sizeof I->model, "smollm2");
    snprintf(I->fine_tuned_model, sizeof I->fine_tuned_model, "ft-x");
    snprintf(I->training_file, sizeof I->training_file, "file-0123456789abcdef");
    snprintf(I->method, sizeof I->method, "lora");
    snprintf(I->error, sizeof I->error, "quote \" and\nnewline");
    I->created_at = 1700000000, I->step = 3, I->total_steps = 24, I->trained_tokens = 99;
    I->n_epochs = 3, I->batch_size = 1, I->rank = 8, I->n_virtual = 20, I->targets = 5, I->use_rslora = true;
    I->seed = 18446744073709551615ull, I->learning_rate = 0.005f, I->alpha = 16, I->lr_multiplier = 1;
    j.kind = DS_ADAPTER_LORA;
    ds_ft_event ev[2] = {{.seq = 1, .created_at = 1, .valid_loss = NAN, .level = "info", .message = "Created"},
                         {.seq = 2, .created_at = 2, .metrics = true, .step = 1, .train_loss = 2.5, .valid_loss = NAN,
                          .lr = 0.004f, .level = "info", .message = "Step 1/24"}};
    ds_ft_checkpoint ck = {.step = 8, .created_at = 3, .train_loss = 1.0, .valid_loss = 1.5,
                           .path = "ft-x/checkpoint-8"};
    j.ev = ev, j.n_ev = 2, j.ck = &ck, j.n_ck = 1;
    size_t len = 0;
    char *text = ft_record_encode(&j, &len);
    CHECK(text != NULL);
    ft_job k = {0};
    ds_err err = {{0}};
    CHECK_MSG(ft_record_parse(text, len, &k, &err) == 0, "%s", err.msg);
    CHECK(!strcmp(k.info.id, I->id) && k.info.status == DS_FT_RUNNING && k.info.seed == I->seed);
    CHECK(!strcmp(k.info.error, I->error) && k.info.learning_rate == I->learning_rate && k.info.use_rslora);
    CHECK(k.n_ev == 2 && k.ev[1].metrics && k.ev[1].train_loss == 2.5 && isnan(k.ev[1].valid_loss));
    CHECK(k.n_ck == 1 && !strcmp(k.ck[0].path, "ft-x/checkpoint-8") && k.ck[0].valid_loss == 1.5);
    free(k.ev), free(k.ck);
    /* fields are checked: each of these edits is refused */
    const char *edits[][2] = {{"\"status\":\"running\"", "\"status\":\"paused\""},
                              {"\"kind\":0", "\"kind\":1"},
                              {"\"fine_tuned_model\":\"ft-x\"", "\"fine_tuned_model\":\"../x\""},
                              {"\"path\":\"ft-x/checkpoint-8\"", "\"path\":\"/etc/x\""},
                              {"\"step\":3", "\"step\":-3"},
                              {"\"rank\":8", "\"rank\":\"8\""},
                              {"\"version\":1", "\"version\":2"},
                              {"\"seed\":\"18446744073709551615\"", "\"seed\":\"12x\""},
                              {"\"id\":\"ftjob-0123456789abcdef01234567\"", "\"id\":\"ftjob-../../x\""}};
    for (size_t i = 0; i < sizeof edits / sizeof edits[0]; i++) {
        const char *at = strstr(text, edits[i][0]);
        CHECK_MSG(at != NULL, "edit %zu", i);
        if (!at) continue;
        char buf[8192];
        snprintf(buf, sizeof buf, "%.*s%s%s", (int)(at - text), text, edits[i][1], at + strlen(edits[i][0]));
        ft_job x = {0};
        CHECK_MSG(ft_record_parse(buf, strlen(buf), &x, &err) == DS_EFORMAT, "edit %zu accepted", i);
        free(x.ev), free(x.ck);
    }
    for (size_t cut = 0; cut < len; cut += 7) { /* every truncation fails cleanly */
        ft_job x = {0};
        CHECK(ft_record_parse(text, cut, &x, &err) != 0);
        free(x.ev), free(x.ck);
    }
    free(text);
}

/* A diff-pruning job's settings survive the record; a density out of (0, 1] or on a non-delta job is
 * refused. */
static void test_dp_record(void) {
    ft_job j = {0};
    ds_ft_job_info *I = &j.info;
    snprintf(I->id, sizeof I->id, "ftjob-0123456789abcdef0123dddd");
    snprintf(I->model, sizeof I->model, "smollm2");
    snprintf(I->fine_tuned_model, sizeof I->fine_tuned_model, "ft-dp");
    snprintf(I->method, sizeof I->method, "diff_pruning");
    I->rank = 8, I->n_virtual = 20, I->targets = 0x7f, I->learning_rate = 2e-4f, I->alpha = 16, I->lr_multiplier = 1;
    I->density = 0.05f, I->dp_warmup_steps = 3, I->bias = true;
    j.kind = DS_ADAPTER_DELTA;
    size_t len = 0;
    char *text = ft_record_encode(&j, &len);
    ft_job k = {0};
    ds_err err = {{0}};
    CHECK_MSG(text && ft_record_parse(text, len, &k, &err) == 0, "%s", err.msg);
    CHECK(k.kind == DS_ADAPTER_DELTA && k.info.density == 0.05f && k.info.dp_warmup_steps == 3 && k.info.bias);
    free(k.ev), free(k.ck);
    const char *edits[][2] = {{"\"density\":0.05", "\"density\":0"}, {"\"density\":0.05", "\"density\":1.5"},
                              {"\"kind\":5", "\"kind\":0"}};
    for (size_t i = 0; text && i < sizeof edits / sizeof edits[0]; i++) {
        const char *at = strstr(text, edits[i][0]);
        CHECK_MSG(at != NULL, "dp edit %zu", i);
        if (!at) continue;
        char buf[8192];
        snprintf(buf, sizeof buf, "%.*s%s%s", (int)(at - text), text, edits[i][1], at + strlen(edits[i][0]));
        ft_job x = {0};
        CHECK_MSG(ft_record_parse(buf, strlen(buf), &x, &err) == DS_EFORMAT, "dp edit %zu accepted", i);
        free(x.ev), free(x.ck);
    }
    free(text);
}

/* ft_store_load: a stored job comes back; a corrupt record is skipped (and kept, for a person to
 * look at); a directory without a record (a submit cut short) is removed. */
static void test_store_load(void) {
    char dir[400], path[700];
    snprintf(dir, sizeof dir, "%s/jobs-load", g_root);
    ds_err err = {{0}};
    ft_job j = {0};
    snprintf(j.info.id, sizeof j.info.id, "ftjob-00000000000000000000000a");
    snprintf(j.info.fine_tuned_model, sizeof j.info.fine_tuned_model, "ft-a");
    j.info.status = DS_FT_QUEUED, j.info.rank = 8, j.info.n_virtual = 20, j.info.targets = 5;
    j.info.learning_rate = 1e-3f, j.info.alpha = 16, j.info.lr_multiplier = 1;
    j.train = "{\"prompt\":\"a\",\"completion\":\"b\"}\n", j.train_len = strlen(j.train);
    size_t len = 0;
    char *text = ft_record_encode(&j, &len);
    CHECK(ft_store_write_data(dir, &j, &err) == 0 && ft_store_write_record(dir, j.info.id, text, len, &err) == 0);
    free(text);
    snprintf(path, sizeof path, "%s/jobs/ftjob-00000000000000000000000b", dir); /* corrupt record */
    mkdir(path, 0755);
    snprintf(path, sizeof path, "%s/jobs/ftjob-00000000000000000000000b/job.json", dir);
    write_raw(path, "{\"version\":1}");
    snprintf(path, sizeof path, "%s/jobs/ftjob-00000000000000000000000c", dir); /* no record */
    mkdir(path, 0755);
    snprintf(path, sizeof path, "%s/jobs/ftjob-00000000000000000000000c/train.jsonl", dir);
    write_raw(path, "{}\n");
    ft_job *head = NULL;
    CHECK_EQ_INT(ft_store_load(dir, NULL, &head), 1);
    CHECK(head && !strcmp(head->info.id, j.info.id) && head->train_len == j.train_len && !head->next);
    CHECK(head && head->train && !strcmp(head->train, j.train));
    if (head) free(head->ev), free(head->ck), free(head->train), free(head);
    snprintf(path, sizeof path, "%s/jobs/ftjob-00000000000000000000000c", dir);
    CHECK(access(path, F_OK) != 0);
    snprintf(path, sizeof path, "%s/jobs/ftjob-00000000000000000000000b/job.json", dir);
    CHECK(access(path, F_OK) == 0);
}

static void test_state_parse(void) {
    ft_state_view v;
    ds_err err = {{0}};
    unsigned char junk[200] = "DSFTSTA1";
    CHECK(ft_state_parse(junk, sizeof junk, &v, &err) == DS_EFORMAT); /* checksum */
    CHECK(ft_state_parse(junk, 10, &v, &err) == DS_EFORMAT);
    CHECK(ft_state_parse((const unsigned char *)"", 0, &v, &err) == DS_EFORMAT);
}

int main(void) {
    mk_root();
    test_durable();
    test_file_store();
    test_job_record();
    test_dp_record();
    test_store_load();
    test_state_parse();
    rm_rf(g_root);
    return ds_test_result();
}
