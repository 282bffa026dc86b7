/* deltaserve tokenize: print the token ids (and pieces) of a text. */
#include "cli/cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *TOK_HELP =
    "usage: deltaserve tokenize [-m MODEL] [options] [--] TEXT\n"
    "\n"
    "Prints the token ids of TEXT, one line, space-separated. TEXT may start with '-' when it\n"
    "does not look like an option (\"- item\"); after \"--\" it is always TEXT (\"-- --help\").\n"
    "\n"
    "  -m, --model PATH   GGUF file or Hugging Face directory (default: the default model)\n"
    "      --no-special   do not add BOS/EOS as the model's config says\n"
    "      --parse-special  match special tokens written in the text (e.g. <|im_start|>)\n"
    "      --pieces       print id:piece pairs instead of bare ids\n"
    "  -h, --help         this text\n";

int ds_cli_tokenize(int argc, char **argv) {
    const char *model = NULL, *text = NULL;
    bool add_special = true, parse_special = false, pieces = false, options_ended = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (options_ended || !ds_cli_is_option(a)) {
            if (text) return fprintf(stderr, "deltaserve tokenize: more than one TEXT (quote it); see --help\n"), 2;
            text = a;
            continue;
        }
        if (!strcmp(a, "--")) options_ended = true;
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) return fputs(TOK_HELP, stdout), 0;
        else if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
            if (++i >= argc) return fprintf(stderr, "deltaserve: %s needs a value\n", a), 2;
            model = argv[i];
        } else if (!strcmp(a, "--no-special")) add_special = false;
        else if (!strcmp(a, "--parse-special")) parse_special = true;
        else if (!strcmp(a, "--pieces")) pieces = true;
        else return fprintf(stderr, "deltaserve tokenize: unknown option '%s' (see --help)\n", a), 2;
    }
    if (!text) return fprintf(stderr, "deltaserve tokenize: no TEXT; see --help\n"), 2;
    if (!model && !(model = ds_cli_default_model(argv[0]))) return 1;
    ds_log_set_level(DS_LOG_WARN);
    ds_model_params mp = ds_model_default_params();
    mp.verbose = false;
    mp.load_weights = false; /* the tokenizer only: no weight is mapped or read */
    ds_err err = {{0}};
    ds_model *m = ds_model_load(model, &mp, &err);
    if (!m) return fprintf(stderr, "deltaserve: %s\n", err.msg), 1;
    if (!m->tok) return fprintf(stderr, "deltaserve: the model has no tokenizer\n"), ds_model_free(m), 1;
    int32_t *ids = NULL;
    size_t n = 0;
    int st = ds_tokenizer_encode(m->tok, text, strlen(text), add_special, parse_special, &ids, &n);
    if (st) return fprintf(stderr, "deltaserve: encode failed: %s\n", ds_strerror(st)), ds_model_free(m), 1;
    for (size_t i = 0; i < n; i++) {
        if (pieces) {
            size_t len;
            const char *b = ds_tokenizer_token_bytes(m->tok, ids[i], &len);
            printf("%s%d:'%.*s'", i ? " " : "", ids[i], (int)len, b ? b : "");
        } else {
            printf("%s%d", i ? " " : "", ids[i]);
        }
    }
    printf("\n");
    free(ids);
    ds_model_free(m);
    return 0;
}
