/* deltaserve command line: serve, generate, tokenize, delta. */
#include "cli/cli.h"
#include "backend/cpu/cpu_env.h"

#include <stdio.h>
#include <string.h>

static const char *HELP =
    "deltaserve — serve many parameter-efficient adapters on one frozen base model\n"
    "\n"
    "usage: deltaserve <command> [options]   (deltaserve <command> --help for each)\n"
    "\n"
    "commands:\n"
    "  serve      OpenAI-compatible HTTP server (completions, chat, adapters, metrics)\n"
    "  generate   run prompts through the engine from the command line\n"
    "  tokenize   print the token ids of a text\n"
    "  delta      delta adapters: `delta extract` makes one from a fine-tuned model and its base\n"
    "  version    print the version\n"
    "\n"
    "The default model is SmolLM2-135M-Instruct (Q4_1 GGUF), fetched by scripts/fetch_model.sh.\n";

int main(int argc, char **argv) {
    ds_cpu_env_reexec(argv); /* short OpenMP spins: returns only once they are set (or cannot be) */
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        fputs(HELP, stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "generate")) return ds_cli_generate(argc - 1, argv + 1);
    if (!strcmp(cmd, "tokenize")) return ds_cli_tokenize(argc - 1, argv + 1);
    if (!strcmp(cmd, "serve")) return ds_cli_serve(argc - 1, argv + 1);
    if (!strcmp(cmd, "delta")) return ds_cli_delta(argc - 1, argv + 1);
    if (!strcmp(cmd, "version") || !strcmp(cmd, "--version")) return puts("deltaserve 0.1.0"), 0;
    fprintf(stderr, "deltaserve: unknown command '%s' (see deltaserve --help)\n", cmd);
    return 2;
}
