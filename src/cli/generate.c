/* deltaserve generate: run prompts through the engine (one batch) and print the continuations. */
#include "cli/cli.h"
#include "ds/adapter.h"
#include "ds/engine.h"
#include "util/mem.h"
#include "util/sb.h"

#include <limits.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_PROMPTS 64

static const char *GEN_HELP =
    "usage: deltaserve generate [-m MODEL] -p PROMPT [-p PROMPT ...] [options] [--] [PROMPT ...]\n"
    "\n"
    "Runs the prompts through the engine in one continuous batch and prints each continuation.\n"
    "With one prompt the text streams as it is generated. A bare argument is a prompt too, like\n"
    "-p; it may start with '-' unless it looks like an option, and after \"--\" it always is one.\n"
    "\n"
    "  -m, --model PATH        GGUF file or Hugging Face directory (default: $DS_MODEL, else\n"
    "                          models/SmolLM2-135M-Instruct.Q4_1.gguf from scripts/fetch_model.sh)\n"
    "  -p, --prompt TEXT       prompt text; repeat for several sequences in one batch\n"
    "  -a, --adapter PATH      PEFT adapter directory or GGUF LoRA file for the prompts that\n"
    "                          follow (until the next -a; '-a base' = no adapter). Prompts with\n"
    "                          different adapters run in the same batch.\n"
    "  -n, --max-tokens N      tokens to generate per prompt (default 64)\n"
    "      --chat              wrap each prompt as a user message in the model's chat template\n"
    "      --system TEXT       system message for --chat (default: the template's own)\n"
    "      --temp T            sampling temperature, 0 = greedy (default 0)\n"
    "      --top-k K           keep the K most likely tokens (default 0 = off)\n"
    "      --top-p P           nucleus sampling mass (default 1 = off)\n"
    "      --min-p P           drop tokens below P x the top probability (default 0 = off)\n"
    "      --repeat-penalty R  HF repetition penalty over prompt and output (default 1 = off)\n"
    "      --presence-penalty X, --frequency-penalty X   OpenAI penalties (default 0)\n"
    "      --seed S            RNG seed for sampling (default: random)\n"
    "      --stop TEXT         stop string (repeatable, up to 8)\n"
    "      --ignore-eos        keep generating past end-of-sequence tokens\n"
    "      --show-ids          also print the generated token ids\n"
    "  -t, --threads N         CPU threads (default: all cores)\n"
    "      --backend NAME      compute backend: cpu (default) or cuda\n"
    "      --quantize TYPE     q8_0 | q4_k: quantise 16/32-bit weight matrices at load\n"
    "      --int8-activations  CPU: int8-quantised activations for quantised weights, as llama.cpp\n"
    "                          (faster; not the exact fp32 numerics of the default)\n"
    "      --ctx N             context length limit (default: the model's)\n"
    "  -h, --help              this text\n";

typedef struct gen_out {
    ds_sb text;
    int32_t *ids;
    size_t n_ids, cap_ids;
    ds_finish_reason finish;
    int prompt_tokens, completion_tokens;
    bool done, stream;
    char err[256];
} gen_out;

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;

static void on_event(const ds_gen_event *ev) {
    gen_out *o = ev->user;
    pthread_mutex_lock(&g_mu);
    if (ev->type == DS_EV_TOKEN) {
        ds_sb_append(&o->text, ev->text, ev->text_len);
        if (ev->token >= 0) {
            if (!DS_GROW(o->ids, o->cap_ids, o->n_ids + 1)) o->ids[o->n_ids++] = ev->token;
        }
        if (o->stream) {
            fwrite(ev->text, 1, ev->text_len, stdout);
            fflush(stdout);
        }
    } else {
        o->finish = ev->finish;
        o->prompt_tokens = ev->prompt_tokens;
        o->completion_tokens = ev->completion_tokens;
        if (ev->type == DS_EV_ERROR) snprintf(o->err, sizeof o->err, "%s", ev->message ? ev->message : "error");
        o->done = true;
        pthread_cond_broadcast(&g_cv);
    }
    pthread_mutex_unlock(&g_mu);
}

typedef struct gen_opts {
    const char *model, *system, *backend, *quantize;
    const char *prompts[MAX_PROMPTS];
    const char *adapters[MAX_PROMPTS]; /* per prompt: path or NULL */
    const char *cur_adapter;
    int n_prompts;
    long max_tokens, threads, ctx;
    bool chat, show_ids, int8_act;
    ds_gen_request req;
} gen_opts;

static const char *reason_name(ds_finish_reason r) {
    switch (r) {
    case DS_FINISH_STOP: return "stop";
    case DS_FINISH_LENGTH: return "length";
    case DS_FINISH_CANCEL: return "cancelled";
    case DS_FINISH_ERROR: return "error";
    default: return "none";
    }
}

/* Queues a prompt for the adapter selected so far; -1 (with a message) when there are too many. */
static int add_prompt(gen_opts *o, const char *text) {
    if (o->n_prompts == MAX_PROMPTS) return fprintf(stderr, "deltaserve: at most %d prompts\n", MAX_PROMPTS), -1;
    o->adapters[o->n_prompts] = o->cur_adapter;
    o->prompts[o->n_prompts++] = text;
    return 0;
}

/* Parses one option at argv[*i]; returns 0 ok, 1 help shown, -1 error. */
static int parse_opt(gen_opts *o, int argc, char **argv, int *i) {
    const char *a = argv[*i];
    const char *v = *i + 1 < argc ? argv[*i + 1] : NULL;
    double d;
    long l;
    ds_sampling_params *sp = &o->req.sampling;
#define TAKE (++*i, v)
    if (!strcmp(a, "-h") || !strcmp(a, "--help")) return fputs(GEN_HELP, stdout), 1;
    if (!strcmp(a, "-m") || !strcmp(a, "--model")) o->model = TAKE;
    else if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) {
        if (add_prompt(o, TAKE)) return -1;
    } else if (!strcmp(a, "-a") || !strcmp(a, "--adapter")) {
        if (!v) return fprintf(stderr, "deltaserve: %s needs a value\n", a), -1;
        o->cur_adapter = strcmp(TAKE, "base") ? v : NULL;
    } else if (!strcmp(a, "-n") || !strcmp(a, "--max-tokens")) { if (!ds_cli_int(a, TAKE, 1, 1 << 20, &o->max_tokens)) return -1; }
    else if (!strcmp(a, "--chat")) o->chat = true;
    else if (!strcmp(a, "--system")) o->system = TAKE;
    else if (!strcmp(a, "--backend")) o->backend = TAKE;
    else if (!strcmp(a, "--temp")) { if (!ds_cli_float(a, TAKE, 0, 100, &d)) return -1; sp->temperature = (float)d; }
    else if (!strcmp(a, "--top-k")) { if (!ds_cli_int(a, TAKE, 0, 1 << 30, &l)) return -1; sp->top_k = (int32_t)l; }
    else if (!strcmp(a, "--top-p")) { if (!ds_cli_float(a, TAKE, 0, 1, &d)) return -1; sp->top_p = (float)d; }
    else if (!strcmp(a, "--min-p")) { if (!ds_cli_float(a, TAKE, 0, 1, &d)) return -1; sp->min_p = (float)d; }
    else if (!strcmp(a, "--repeat-penalty")) { if (!ds_cli_float(a, TAKE, 0.01, 100, &d)) return -1; sp->repetition_penalty = (float)d; }
    else if (!strcmp(a, "--presence-penalty")) { if (!ds_cli_float(a, TAKE, -2, 2, &d)) return -1; sp->presence_penalty = (float)d; }
    else if (!strcmp(a, "--frequency-penalty")) { if (!ds_cli_float(a, TAKE, -2, 2, &d)) return -1; sp->frequency_penalty = (float)d; }
    else if (!strcmp(a, "--seed")) { if (!ds_cli_int(a, TAKE, 0, __LONG_MAX__, &l)) return -1; sp->seed = (uint64_t)l; sp->has_seed = true; }
    else if (!strcmp(a, "--stop")) {
        int k = 0;
        while (k < DS_MAX_STOP - 1 && o->req.stop[k]) k++;
        if (k == DS_MAX_STOP - 1 || !v) return fprintf(stderr, "deltaserve: --stop: too many or missing\n"), -1;
        o->req.stop[k] = TAKE;
    } else if (!strcmp(a, "--ignore-eos")) o->req.ignore_eos = true;
    else if (!strcmp(a, "--show-ids")) o->show_ids = true;
    else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) { if (!ds_cli_int(a, TAKE, 0, 1024, &o->threads)) return -1; }
    else if (!strcmp(a, "--quantize")) o->quantize = TAKE;
    else if (!strcmp(a, "--int8-activations")) o->int8_act = true;
    else if (!strcmp(a, "--ctx")) { if (!ds_cli_int(a, TAKE, 16, 1 << 24, &o->ctx)) return -1; }
    else return fprintf(stderr, "deltaserve generate: unknown option '%s' (see --help)\n", a), -1;
#undef TAKE
    if ((!strcmp(a, "-m") || !strcmp(a, "--model") || !strcmp(a, "-p") || !strcmp(a, "--prompt") ||
         !strcmp(a, "--system") || !strcmp(a, "--backend")) && !v)
        return fprintf(stderr, "deltaserve: %s needs a value\n", a), -1;
    return 0;
}

/* Prompt text → ids (chat template when asked). Caller frees *ids. */
static int encode_prompt(const ds_model *m, const gen_opts *o, const char *prompt, int32_t **ids, size_t *n) {
    if (!m->tok) return fprintf(stderr, "deltaserve: the model has no tokenizer\n"), -1;
    char *text = NULL;
    const char *src = prompt;
    if (o->chat) {
        ds_chat_msg msgs[2];
        size_t nm = 0;
        if (o->system) msgs[nm++] = (ds_chat_msg){"system", o->system};
        msgs[nm++] = (ds_chat_msg){"user", prompt};
        char *def = ds_chat_default_system(m->chat_template);
        int rs = ds_chat_render(ds_chat_detect(m->chat_template), msgs, nm, true, def, &text);
        free(def);
        if (rs != DS_OK) return fprintf(stderr, "deltaserve: cannot render the chat template\n"), -1;
        src = text;
    }
    /* chat text already spells BOS etc. as the template wants: no add_special, parse specials */
    int st = ds_tokenizer_encode(m->tok, src, strlen(src), !o->chat, o->chat, ids, n);
    free(text);
    return st;
}

/* The CLI trusts its own arguments: adapters load from any path (root "/"), each registered under
 * its absolute path. Returns the registry (NULL when no prompt uses an adapter) or exits. */
static ds_adapter_registry *load_adapters(const ds_model *m, gen_opts *o, char abs[][PATH_MAX], bool *ok) {
    *ok = true;
    bool any = false;
    for (int i = 0; i < o->n_prompts; i++) any |= o->adapters[i] != NULL;
    if (!any) return NULL;
    ds_err err = {{0}};
    ds_adapter_registry *reg = ds_registry_create(m, "/", &err);
    for (int i = 0; reg && i < o->n_prompts; i++) {
        if (!o->adapters[i]) continue;
        if (!realpath(o->adapters[i], abs[i])) {
            fprintf(stderr, "deltaserve: adapter '%s' not found\n", o->adapters[i]);
            *ok = false;
            break;
        }
        ds_adapter_info info;
        if (ds_registry_info(reg, abs[i], &info) == DS_OK) continue; /* same adapter, earlier prompt */
        if (ds_registry_load(reg, abs[i], abs[i], false, &err) != DS_OK) {
            fprintf(stderr, "deltaserve: adapter '%s': %s\n", o->adapters[i], err.msg);
            *ok = false;
            break;
        }
    }
    if (!reg) fprintf(stderr, "deltaserve: %s\n", err.msg), *ok = false;
    return reg;
}

static int run(const ds_model *m, gen_opts *o) {
    static char abs[MAX_PROMPTS][PATH_MAX];
    bool ok;
    ds_adapter_registry *reg = load_adapters(m, o, abs, &ok);
    if (!ok) {
        ds_registry_free(reg);
        return 1;
    }
    ds_engine_params ep = ds_engine_default_params();
    ep.registry = reg;
    ep.n_threads = (int32_t)o->threads;
    ep.int8_activations = o->int8_act;
    ep.backend = o->backend;
    ep.max_ctx = (int32_t)o->ctx;
    if (ep.max_ctx == 0 && m->cfg.max_ctx > 4096) ep.max_ctx = 4096;
    ds_err err = {{0}};
    ds_engine *e = ds_engine_create(m, &ep, &err);
    if (!e) return fprintf(stderr, "deltaserve: %s\n", err.msg), ds_registry_free(reg), 1;
    gen_out *outs = calloc((size_t)o->n_prompts, sizeof *outs);
    int rc = 0;
    for (int i = 0; i < o->n_prompts; i++) {
        int32_t *ids = NULL;
        size_t n = 0;
        if (encode_prompt(m, o, o->prompts[i], &ids, &n) != 0) { rc = 1; outs[i].done = true; continue; }
        ds_gen_request r = o->req;
        r.prompt = ids;
        r.n_prompt = n;
        r.max_tokens = (int32_t)o->max_tokens;
        r.adapter = o->adapters[i] ? abs[i] : NULL;
        r.on_event = on_event;
        r.user = &outs[i];
        outs[i].stream = o->n_prompts == 1;
        int st;
        if (!ds_engine_submit(e, &r, NULL, &st, &err)) {
            fprintf(stderr, "deltaserve: prompt %d: %s\n", i, err.msg);
            outs[i].done = true;
            rc = 1;
        }
        free(ids);
    }
    double t0 = ds_time_s();
    pthread_mutex_lock(&g_mu);
    for (int i = 0; i < o->n_prompts; i++)
        while (!outs[i].done) pthread_cond_wait(&g_cv, &g_mu);
    pthread_mutex_unlock(&g_mu);
    double dt = ds_time_s() - t0;
    int total = 0;
    for (int i = 0; i < o->n_prompts; i++) {
        gen_out *g = &outs[i];
        if (o->n_prompts > 1)
            printf("--- [%d]%s%s %s\n%s", i, o->adapters[i] ? " adapter=" : "", o->adapters[i] ? o->adapters[i] : "",
                   o->prompts[i], g->text.data ? g->text.data : "");
        printf("\n");
        if (g->err[0]) { fprintf(stderr, "deltaserve: prompt %d failed: %s\n", i, g->err); rc = 1; }
        if (o->show_ids) {
            printf("ids:");
            for (size_t k = 0; k < g->n_ids; k++) printf(" %d", g->ids[k]);
            printf("\n");
        }
        fprintf(stderr, "[%d] prompt %d tokens, generated %d, finish: %s\n", i, g->prompt_tokens,
                g->completion_tokens, reason_name(g->finish));
        total += g->completion_tokens;
        ds_sb_free(&g->text);
        free(g->ids);
    }
    fprintf(stderr, "generated %d tokens in %.2f s (%.1f tokens/s)\n", total, dt, dt > 0 ? total / dt : 0.0);
    free(outs);
    ds_engine_free(e);
    ds_registry_free(reg);
    return rc;
}

int ds_cli_generate(int argc, char **argv) {
    gen_opts o;
    memset(&o, 0, sizeof o);
    o.max_tokens = 64;
    o.req = ds_gen_request_default();
    o.req.sampling.temperature = 0.0f;
    bool options_ended = false;
    for (int i = 1; i < argc; i++) {
        int r;
        if (options_ended || !ds_cli_is_option(argv[i])) r = add_prompt(&o, argv[i]); /* a bare PROMPT */
        else if (!strcmp(argv[i], "--")) r = 0, options_ended = true;
        else r = parse_opt(&o, argc, argv, &i);
        if (r) return r > 0 ? 0 : 2;
    }
    if (o.n_prompts == 0) return fprintf(stderr, "deltaserve generate: no prompt (-p TEXT); see --help\n"), 2;
    if (!o.model && !(o.model = ds_cli_default_model(argv[0]))) return 1;
    ds_model *m = ds_cli_load_model(o.model, o.quantize);
    if (!m) return 1;
    int rc = run(m, &o);
    ds_model_free(m);
    return rc;
}
