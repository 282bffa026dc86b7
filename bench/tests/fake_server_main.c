/* ds-bench-fake-server: the test fake server as a program, to try ds-bench by hand.
 *   ds-bench-fake-server [TTFT_MS [ITL_MS]]   prints its port, serves until stdin closes. */
#include <stdio.h>
#include <stdlib.h>

#include "fake_server.h"

int main(int argc, char **argv) {
    fake_server_params p = {.ttft_ms = argc > 1 ? atoi(argv[1]) : 100, .itl_ms = argc > 2 ? atoi(argv[2]) : 20};
    int port = 0;
    fake_server *s = fake_server_start(&p, &port);
    if (!s) return 1;
    printf("http://127.0.0.1:%d\n", port);
    fflush(stdout);
    while (getchar() != EOF) {
    }
    fake_server_stop(s);
    return 0;
}
