/* The ds-bench program end to end against the fake server (in this process, 127.0.0.1, ephemeral
 * port): --help lists every option, bad usage exits 1, a multi-adapter run writes the
 * vLLM-compatible JSON, chat + JSONL prompts + --adapter-field, llama.cpp-style --adapter-value
 * and --api-key, trace replay, token-id prompts,
 * --sweep, model discovery through /v1/models, and SIGINT printing the summary so far.
 * Every child is waited for with a deadline and killed when it overstays. */
#include <cjson/cJSON.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "ds_test.h"
#include "fake_server.h"

extern char **environ;

static char g_dir[64];
static char g_url[64];
static fake_server *g_srv;
static fake_record g_recs[512];

static char *path_in(const char *name) {
    static char buf[8][160];
    static int k;
    k = (k + 1) % 8;
    snprintf(buf[k], sizeof(buf[k]), "%s/%s", g_dir, name);
    return buf[k];
}

static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = malloc((size_t)n + 1);
    if (s && fread(s, 1, (size_t)n, f) != (size_t)n) n = 0;
    if (s) s[n] = '\0';
    fclose(f);
    return s;
}

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (!f) return;
    fputs(text, f);
    fclose(f);
}

static pid_t spawn(char **argv) {
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, path_in("stdout"), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&fa, 2, path_in("stderr"), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    pid_t pid = -1;
    if (posix_spawn(&pid, DSB_BIN, &fa, NULL, argv, environ) != 0) pid = -1;
    posix_spawn_file_actions_destroy(&fa);
    return pid;
}

/* Exit status, 128+signal, or -1 after killing a child that overstayed `limit_s`. */
static int wait_exit(pid_t pid, double limit_s) {
    struct timespec nap = {0, 20 * 1000 * 1000};
    for (int i = 0; i < (int)(limit_s * 50); i++) {
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        nanosleep(&nap, NULL);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    return -1;
}

/* Runs ds-bench with the given arguments (NULL-terminated, without argv[0]). */
static int run_bench(const char *const *args, double limit_s) {
    char *argv[64];
    int n = 0;
    argv[n++] = "ds-bench";
    for (; args[n - 1] && n < 63; n++) argv[n] = (char *)args[n - 1];
    argv[n] = NULL;
    pid_t pid = spawn(argv);
    CHECK(pid > 0);
    return pid > 0 ? wait_exit(pid, limit_s) : -1;
}

static cJSON *load_json(const char *path) {
    char *s = slurp(path);
    cJSON *j = s ? cJSON_Parse(s) : NULL;
    free(s);
    CHECK_MSG(j != NULL, "no JSON in %s", path);
    return j;
}

static double num(const cJSON *o, const char *k) {
    const cJSON *v = cJSON_GetObjectItem(o, k);
    CHECK_MSG(cJSON_IsNumber(v), "key %s missing or not a number", k);
    return cJSON_IsNumber(v) ? v->valuedouble : -1;
}

static void test_help_and_usage(void) {
    const char *help[] = {"--help", NULL};
    CHECK_EQ_INT(run_bench(help, 10), 0);
    char *out = slurp(path_in("stdout"));
    CHECK(out != NULL);
    for (const char *const *o = dsb_cli_option_names(); out && *o; o++) {
        char flag[64];
        snprintf(flag, sizeof(flag), "--%s ", *o);
        char flag_nl[64];
        snprintf(flag_nl, sizeof(flag_nl), "--%s\n", *o);
        CHECK_MSG(strstr(out, flag) || strstr(out, flag_nl), "--help does not explain %s", *o);
    }
    free(out);
    const char *bad[] = {"--request-rate", "fast", NULL};
    CHECK_EQ_INT(run_bench(bad, 10), 1);
    char *err = slurp(path_in("stderr"));
    CHECK(err && strstr(err, "--request-rate"));
    free(err);
    const char *bad2[] = {"--duration", "5", NULL}; /* rate inf + duration, nothing to bound it */
    CHECK_EQ_INT(run_bench(bad2, 10), 1);
}

static void check_vllm_keys(const cJSON *j) {
    const char *keys[] = {"duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
                          "request_throughput", "output_throughput", "total_token_throughput"};
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) (void)num(j, keys[i]);
    const char *stat[] = {"mean", "median", "std", "p99"}, *metric[] = {"ttft", "tpot", "itl", "e2el"};
    for (int a = 0; a < 4; a++)
        for (int b = 0; b < 4; b++) {
            char k[64];
            snprintf(k, sizeof(k), "%s_%s_ms", stat[a], metric[b]);
            (void)num(j, k);
        }
    const char *arrays[] = {"input_lens", "output_lens", "ttfts", "itls", "latencies", "errors", "adapters"};
    int n = (int)num(j, "completed") + (int)num(j, "failed");
    for (size_t i = 0; i < sizeof(arrays) / sizeof(arrays[0]); i++)
        CHECK_MSG(cJSON_GetArraySize(cJSON_GetObjectItem(j, arrays[i])) == n, "array %s", arrays[i]);
    CHECK(cJSON_IsObject(cJSON_GetObjectItem(j, "per_adapter")));
}

static void test_multi_adapter_run(void) {
    const char *args[] = {"--url", g_url, "--model", "fake-base", "--adapters", "3", "--adapter-dist", "zipf:1.1",
                          "--base-fraction", "0.2", "--num-prompts", "30", "--request-rate", "100", "--burstiness",
                          "0.5", "--output-len", "3", "--input-len", "8", "--ignore-eos", "--slo",
                          "ttft:1000,tpot:200", "--json", path_in("run.json"), "--no-progress", NULL};
    CHECK_EQ_INT(run_bench(args, 30), 0);
    char *out = slurp(path_in("stdout"));
    CHECK(out && strstr(out, "Serving Benchmark Result") && strstr(out, "Per adapter") && strstr(out, "lora-0"));
    free(out);
    cJSON *j = load_json(path_in("run.json"));
    check_vllm_keys(j);
    CHECK_EQ_INT(num(j, "completed"), 30);
    CHECK_EQ_INT(num(j, "failed"), 0);
    CHECK_EQ_INT(num(j, "total_output_tokens"), 90);
    CHECK_EQ_INT(num(j, "request_goodput") > 0, 1);
    const cJSON *pa = cJSON_GetObjectItem(j, "per_adapter");
    CHECK(cJSON_GetObjectItem(pa, "lora-0") && cJSON_GetObjectItem(pa, "fake-base"));
    double ttft = num(j, "mean_ttft_ms");
    CHECK_MSG(ttft >= 95 && ttft < 1000, "mean ttft %g ms (fake server: 100)", ttft); /* units: ms */
    cJSON_Delete(j);
}

static void test_chat_prompts_field(void) {
    write_file(path_in("prompts.jsonl"),
               "# comment\n"
               "{\"prompt\": \"one two three four\", \"output_len\": 2}\n"
               "{\"messages\": [{\"role\": \"system\", \"content\": \"be brief\"},"
               " {\"role\": \"user\", \"content\": \"a b c d e f\"}], \"adapter\": \"lora-x\"}\n"
               "\n{\"prompt\": \"base only\", \"adapter\": null}\n");
    const char *args[] = {"--url", g_url, "--model", "fake-base", "--endpoint", "chat", "--prompts",
                          path_in("prompts.jsonl"), "--adapters", "2", "--adapter-field", "adapter_id",
                          "--num-prompts", "6", "--max-concurrency", "2", "--output-len", "3", "--json",
                          path_in("chat.json"), "--no-progress", NULL};
    size_t before = fake_server_records(g_srv, g_recs, 512);
    CHECK_EQ_INT(run_bench(args, 30), 0);
    size_t after = fake_server_records(g_srv, g_recs, 512);
    CHECK_EQ_INT(after - before, 6);
    int with_field = 0, words6 = 0;
    for (size_t i = before; i < after && i < 512; i++) {
        CHECK(strcmp(g_recs[i].model, "fake-base") == 0); /* adapter went in the field */
        CHECK(strstr(g_recs[i].path, "/v1/chat/completions") != NULL);
        with_field += g_recs[i].adapter_field[0] != 0;
        words6 += g_recs[i].prompt_words == 6 && strcmp(g_recs[i].adapter_field, "lora-x") == 0;
    }
    CHECK_EQ_INT(words6, 2); /* the messages record, used twice, always to lora-x */
    CHECK_EQ_INT(with_field, 4); /* the "base only" record never carries one */
    cJSON *j = load_json(path_in("chat.json"));
    CHECK_EQ_INT(num(j, "completed"), 6);
    CHECK(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "per_adapter"), "lora-x") != NULL);
    cJSON_Delete(j);
}

static void test_trace_and_token_ids(void) {
    write_file(path_in("trace.jsonl"),
               "{\"timestamp\": 100.0, \"adapter\": \"hot\", \"input_len\": 12, \"output_len\": 2}\n"
               "{\"timestamp\": 100.1, \"adapter\": 1, \"input_len\": 30, \"output_len\": 3}\n"
               "{\"timestamp\": 100.05, \"adapter\": null, \"input_len\": 5, \"output_len\": 4}\n");
    const char *args[] = {"--url", g_url, "--model", "fake-base", "--trace", path_in("trace.jsonl"),
                          "--adapter-names", "cold,warm", "--prompt-token-ids", "--json", path_in("trace.json"),
                          "--no-progress", NULL};
    size_t before = fake_server_records(g_srv, g_recs, 512);
    CHECK_EQ_INT(run_bench(args, 30), 0);
    size_t after = fake_server_records(g_srv, g_recs, 512);
    CHECK_EQ_INT(after - before, 3);
    if (after - before == 3 && after <= 512) {
        /* Sorted by timestamp: hot (12 ids), base (5), warm = index 1 (30). */
        CHECK(strcmp(g_recs[before].model, "hot") == 0 && g_recs[before].prompt_ids == 12);
        CHECK(strcmp(g_recs[before + 1].model, "fake-base") == 0 && g_recs[before + 1].prompt_ids == 5);
        CHECK(strcmp(g_recs[before + 2].model, "warm") == 0 && g_recs[before + 2].prompt_ids == 30);
    }
    cJSON *j = load_json(path_in("trace.json"));
    const cJSON *st = cJSON_GetObjectItem(j, "start_times");
    if (cJSON_GetArraySize(st) == 3) { /* sent 0, 50, 100 ms after the start (never early) */
        double t1 = cJSON_GetArrayItem(st, 1)->valuedouble, t2 = cJSON_GetArrayItem(st, 2)->valuedouble;
        CHECK_MSG(t1 >= 0.049 && t1 < 0.5 && t2 >= 0.099 && t2 < 0.6, "trace replay sent at %.3f, %.3f s", t1, t2);
    }
    CHECK_EQ_INT(num(j, "total_output_tokens"), 9);
    cJSON_Delete(j);
}

/* llama.cpp selects adapters with "lora": [{"id": N, "scale": S}]; and the API key header. */
static void test_adapter_value_and_key(void) {
    const char *args[] = {"--url", g_url, "--model", "fake-base", "--adapters", "3", "--adapter-dist",
                          "round-robin", "--adapter-field", "lora", "--adapter-value",
                          "[{\"id\":{i},\"scale\":0.5}]", "--api-key", "sekrit", "--num-prompts", "3",
                          "--output-len", "2", "--no-progress", NULL};
    size_t before = fake_server_records(g_srv, g_recs, 512);
    CHECK_EQ_INT(run_bench(args, 30), 0);
    size_t after = fake_server_records(g_srv, g_recs, 512);
    CHECK_EQ_INT(after - before, 3);
    for (size_t i = before; i < after && i < 512; i++) {
        char want[64];
        snprintf(want, sizeof(want), "[{\"id\":%zu,\"scale\":0.5}]", i - before);
        CHECK_MSG(strcmp(g_recs[i].lora, want) == 0, "lora %s, want %s", g_recs[i].lora, want);
        CHECK(strcmp(g_recs[i].authorization, "Bearer sekrit") == 0);
        CHECK(strcmp(g_recs[i].model, "fake-base") == 0);
    }
    const char *bad[] = {"--url", g_url, "--model", "m", "--adapters", "2", "--adapter-field", "lora",
                         "--adapter-value", "[{i", NULL};
    CHECK_EQ_INT(run_bench(bad, 10), 1);
}

static void test_sweep_and_discovery(void) {
    const char *args[] = {"--url", g_url, "--sweep", "20,40", "--num-prompts", "8", "--output-len", "2",
                          "--base-fraction", "0.5", "--adapters", "2", "--slo", "ttft:1000",
                          "--json", path_in("sweep.json"), "--no-progress", NULL};
    CHECK_EQ_INT(run_bench(args, 30), 0);
    char *out = slurp(path_in("stdout"));
    CHECK(out && strstr(out, "Sweep") && strstr(out, "Knee:"));
    free(out);
    cJSON *j = load_json(path_in("sweep.json"));
    const cJSON *sw = cJSON_GetObjectItem(j, "sweep");
    CHECK_EQ_INT(cJSON_GetArraySize(sw), 2);
    CHECK(cJSON_GetObjectItem(j, "knee_request_rate") != NULL);
    const cJSON *m = cJSON_GetObjectItem(cJSON_GetArrayItem(sw, 0), "model_id");
    CHECK(cJSON_IsString(m) && strcmp(m->valuestring, "fake-base") == 0); /* from GET /v1/models */
    cJSON_Delete(j);
}

static void test_sigint(void) {
    const char *args[] = {"--url", g_url, "--model", "fake-base", "--duration", "60", "--request-rate", "20",
                          "--output-len", "40", "--json", path_in("int.json"), NULL};
    char *argv[32];
    int n = 0;
    argv[n++] = "ds-bench";
    for (; args[n - 1]; n++) argv[n] = (char *)args[n - 1];
    argv[n] = NULL;
    pid_t pid = spawn(argv);
    CHECK(pid > 0);
    if (pid <= 0) return;
    /* Interrupt once one request has finished and others are in flight (each takes 100 + 39*20 ms;
     * they start every 50 ms): poll the server's records, for at most 20 s. */
    size_t base = fake_server_records(g_srv, g_recs, 512);
    struct timespec nap = {0, 20 * 1000 * 1000};
    for (int i = 0; i < 1000; i++) {
        size_t n = fake_server_records(g_srv, g_recs, 512);
        if (n > base + 2 && n <= 512 && g_recs[base].n_tok == 40) break;
        nanosleep(&nap, NULL);
    }
    kill(pid, SIGINT);
    CHECK_EQ_INT(wait_exit(pid, 15), 130);
    char *out = slurp(path_in("stdout"));
    CHECK(out && strstr(out, "Serving Benchmark Result") && strstr(out, "Cancelled (interrupted) requests"));
    free(out);
    char *err = slurp(path_in("stderr"));
    CHECK(err && strstr(err, "interrupted"));
    free(err);
    cJSON *j = load_json(path_in("int.json"));
    CHECK(cJSON_IsTrue(cJSON_GetObjectItem(j, "interrupted")));
    CHECK(num(j, "completed") >= 1);
    CHECK(num(j, "cancelled") >= 1);
    CHECK_EQ_INT(num(j, "failed"), 0); /* cancelled requests are not failures */
    cJSON_Delete(j);
}

int main(void) {
    snprintf(g_dir, sizeof(g_dir), "/tmp/dsb-e2e-XXXXXX");
    if (!mkdtemp(g_dir)) return 1;
    fake_server_params fp = {.ttft_ms = 100, .itl_ms = 20};
    int port = 0;
    g_srv = fake_server_start(&fp, &port);
    if (!g_srv) return 1;
    snprintf(g_url, sizeof(g_url), "http://127.0.0.1:%d", port);
    test_help_and_usage();
    test_multi_adapter_run();
    test_chat_prompts_field();
    test_trace_and_token_ids();
    test_adapter_value_and_key();
    test_sweep_and_discovery();
    test_sigint();
    fake_server_stop(g_srv);
    const char *files[] = {"stdout", "stderr", "run.json", "prompts.jsonl", "chat.json", "trace.jsonl",
                           "trace.json", "sweep.json", "int.json"};
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) unlink(path_in(files[i]));
    rmdir(g_dir);
    return ds_test_result();
}
