/* deltaserve serve: placeholder until the HTTP server lands (see src/server). */
#include "cli/cli.h"

#include <stdio.h>

int ds_cli_serve(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "deltaserve serve: the HTTP server is not built yet in this revision\n");
    return 1;
}
