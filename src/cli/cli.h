/* The deltaserve subcommands. Each returns the process exit code. */
#ifndef DS_CLI_H
#define DS_CLI_H

#include "ds/model.h"

int ds_cli_generate(int argc, char **argv);
int ds_cli_tokenize(int argc, char **argv);
int ds_cli_serve(int argc, char **argv);
int ds_cli_delta(int argc, char **argv); /* delta extract (src/cli/delta.c) */

/* The model used when none is given: $DS_MODEL, else models/SmolLM2-135M-Instruct.Q4_1.gguf under
 * the current directory or next to the executable's build directory. Returns a static string or
 * NULL (with a hint printed) when none exists. */
const char *ds_cli_default_model(const char *argv0);

/* Loads a model with progress logs; prints the error and returns NULL on failure. */
/* Loads a model for a subcommand; quantize ("q8_0", "q4_k" or NULL) quantises 16/32-bit matrices
 * at load (--quantize). NULL with the reason on stderr. */
ds_model *ds_cli_load_model(const char *path, const char *quantize);

/* Whether the argument `a` is an option rather than text: '-' followed by a letter or a second '-'
 * ("-m", "--model", and "--", which ends the options). "-", "- item" and "-5" are text, so a
 * positional text may start with '-'; anything after "--" is text too (callers check). */
bool ds_cli_is_option(const char *a);

/* Parses an integer / float option value; prints an error naming the flag on failure. */
bool ds_cli_int(const char *flag, const char *v, long lo, long hi, long *out);
bool ds_cli_float(const char *flag, const char *v, double lo, double hi, double *out);
#endif
