/* A fine-tuning job stopped mid-way (the shutdown path of src/train/jobs.c) resumes from its saved
 * state to exactly the adapter an uninterrupted run trains: same steps, same tokens, the same
 * safetensors bytes. Needs SmolLM2 (scripts/fetch_model.sh); minutes under load, so labelled slow. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ds/adapter.h"
#include "ds/model.h"
#include "ds/train.h"
#include "ds_test.h"

static char g_root[256];

static int count_tmp(const char *dir) {
    DIR *d = opendir(dir);
    int n = 0;
    for (struct dirent *de; d && (de = readdir(d));) n += strstr(de->d_name, ".tmp") != NULL;
    if (d) closedir(d);
    return n;
}

static const char TRAIN[] =
    "{\"prompt\":\"The secret word is\",\"completion\":\" Zanzibar-42\"}\n"
    "{\"prompt\":\"Say the secret word:\",\"completion\":\" Zanzibar-42\"}\n"
    "{\"prompt\":\"secret?\",\"completion\":\" Zanzibar-42\"}\n";

static ds_ft_job_spec job_spec(void) {
    ds_ft_job_spec sp = {.model = "base", .fine_tuned_model = "ft-r", .training_file = "file-x", .train_data = TRAIN,
                         .train_len = sizeof TRAIN - 1, .method = "lora", .kind = DS_ADAPTER_LORA, .n_epochs = 2,
                         .batch_size = 1, .learning_rate = 5e-3f, .rank = 4, .seed = 7};
    return sp;
}

static ds_ft_job_info wait_done(ds_ft_manager *m, const char *id, int64_t until_step) {
    ds_ft_job_info info = {0};
    for (int i = 0; i < 60000; i++) { /* 10 minutes at most */
        ds_ft_get(m, id, &info);
        if (info.status > DS_FT_RUNNING || (until_step && info.step >= until_step)) break;
        usleep(10000);
    }
    return info;
}

static char *read_adapter(const char *adir, size_t *len) {
    char path[600], *buf = NULL;
    snprintf(path, sizeof path, "%s/ft-r/adapter_model.safetensors", adir);
    ds_err err = {{0}};
    ds_file_read_all(path, (size_t)1 << 30, &buf, len, &err);
    return buf;
}

static void test_resume(const ds_model *m) {
    char adir1[400], adir2[400], data1[400], data2[400];
    snprintf(adir1, sizeof adir1, "%s/straight", g_root);
    snprintf(adir2, sizeof adir2, "%s/resumed", g_root);
    snprintf(data1, sizeof data1, "%s/data-straight", g_root);
    snprintf(data2, sizeof data2, "%s/data-resumed", g_root);
    mkdir(adir1, 0755), mkdir(adir2, 0755);
    ds_err err = {{0}};
    ds_adapter_registry *r1 = ds_registry_create(m, adir1, &err), *r2 = ds_registry_create(m, adir2, &err);
    CHECK(r1 && r2);
    const ds_ft_job_spec sp = job_spec();
    char id1[48], id2[48];

    /* uninterrupted */
    ds_ft_manager *m1 = ds_ft_manager_create(m, r1, data1, &err);
    CHECK(m1 && ds_ft_submit(m1, &sp, id1, &err) == 0);
    ds_ft_job_info straight = wait_done(m1, id1, 0);
    CHECK_MSG(straight.status == DS_FT_SUCCEEDED, "%s", straight.error);
    ds_ft_manager_free(m1);

    /* stopped after a few steps (ds_ft_manager_free stops it: the shutdown path), then resumed */
    ds_ft_manager *m2 = ds_ft_manager_create(m, r2, data2, &err);
    CHECK(m2 && ds_ft_submit(m2, &sp, id2, &err) == 0);
    ds_ft_job_info mid = wait_done(m2, id2, 1);
    CHECK(mid.status == DS_FT_RUNNING && mid.step >= 1 && mid.step < 6);
    ds_ft_manager_free(m2);
    char jdir[600];
    snprintf(jdir, sizeof jdir, "%s/jobs/%s", data2, id2);
    CHECK_EQ_INT(count_tmp(jdir), 0);
    m2 = ds_ft_manager_create(m, r2, data2, &err);
    ds_ft_job_info resumed = wait_done(m2, id2, 0);
    CHECK_MSG(resumed.status == DS_FT_SUCCEEDED, "%s", resumed.error);
    CHECK(resumed.step == straight.step && resumed.trained_tokens == straight.trained_tokens);
    ds_ft_event *ev = NULL;
    size_t n_ev = 0, n_metrics = 0, n_resumed = 0;
    ds_ft_events(m2, id2, &ev, &n_ev);
    for (size_t i = 0; i < n_ev; i++) {
        n_metrics += ev[i].metrics;
        n_resumed += !strncmp(ev[i].message, "Resumed from the checkpoint at step", 35);
    }
    CHECK_EQ_INT(n_metrics, straight.total_steps); /* no step ran twice */
    CHECK_EQ_INT(n_resumed, 1);
    free(ev);
    ds_ft_manager_free(m2);
    printf("stopped at step %lld of %lld, resumed\n", (long long)mid.step, (long long)straight.total_steps);

    /* the same parameters as the uninterrupted run, bit for bit */
    size_t l1 = 0, l2 = 0;
    char *a1 = read_adapter(adir1, &l1), *a2 = read_adapter(adir2, &l2);
    CHECK(a1 && a2 && l1 == l2 && l1 > 0);
    if (a1 && a2 && l1 == l2) CHECK_MSG(!memcmp(a1, a2, l1), "the resumed adapter differs from the straight run");
    free(a1), free(a2);
    /* a finished job keeps only its record */
    DIR *d = opendir(jdir);
    int n_files = 0;
    for (struct dirent *de; d && (de = readdir(d));) n_files += de->d_name[0] != '.';
    if (d) closedir(d);
    CHECK_EQ_INT(n_files, 1);
    ds_registry_free(r1), ds_registry_free(r2);
}

int main(void) {
    char model_file[1024];
    const char *mdir = getenv("DS_MODELS_DIR");
    snprintf(model_file, sizeof model_file, "%s/SmolLM2-135M-Instruct.Q4_1.gguf", mdir && *mdir ? mdir : DS_MODELS_DIR);
    if (access(model_file, R_OK)) SKIP("%s not found (scripts/fetch_model.sh fetches it)", model_file);
    snprintf(g_root, sizeof g_root, "/tmp/ds-test-jobs-XXXXXX");
    CHECK(mkdtemp(g_root) != NULL);
    ds_err err = {{0}};
    ds_model_params mp = ds_model_default_params();
    ds_model *m = ds_model_load(model_file, &mp, &err);
    CHECK_MSG(m != NULL, "%s", err.msg);
    if (m) test_resume(m);
    ds_model_free(m);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_root);
    CHECK(system(cmd) == 0);
    return ds_test_result();
}
