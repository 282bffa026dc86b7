/* libFuzzer target for fine-tuning datasets (src/train/dataset.c): the input is a JSONL file as a
 * client uploads it. ds_ft_data_check (run on upload) must accept or refuse it with a message; an
 * accepted one is then tokenised into examples with the committed Qwen2 tokenizer (what a job does)
 * under one of the four chat formats (src/tokenizer/chat_template.c; picked by the input's length),
 * with a small context so that the "too long" path is reached too.
 * Every example must have matching tokens and labels, ids in the vocabulary, and fit the context. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ds/model.h"
#include "ds/tokenizer.h"
#include "ds/train.h"
#include "train/dataset.h"

static ds_model g_model;

static void init(void) {
    ds_err e;
    g_model.tok = ds_tokenizer_load_json(DS_TEST_DATA "/tokenizer/qwen2_tokenizer.json",
                                         DS_TEST_DATA "/tokenizer/qwen2_tokenizer_config.json", &e);
    if (!g_model.tok) abort();
    g_model.cfg.max_ctx = 256;
}

/* What ds_chat_detect keys on: ChatML, Llama 3, Llama 2, Mistral. */
static char *const g_templates[4] = {"<|im_start|>", "<|start_header_id|>", "[INST] <<SYS>>", "[INST]"};

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    init();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 1 << 16) return 0;
    ds_err err = {0};
    int n = ds_ft_data_check((const char *)data, size, &err);
    if (n == 0 || (n < 0 && (n != DS_EINVAL || !err.msg[0]))) abort();
    if (n < 0) return 0;
    ds_ft_examples ex;
    g_model.chat_template = g_templates[size % 4];
    int st = ds_ft_examples_build(&g_model, (const char *)data, size, &ex, &err);
    if (st) {
        if (!err.msg[0] || ex.n || ex.ex) abort();
        return 0;
    }
    const int32_t nv = ds_tokenizer_n_vocab(g_model.tok);
    if (!ex.n || ex.n > (size_t)n) abort();
    for (size_t i = 0; i < ex.n; i++) {
        const ds_train_example *e = &ex.ex[i];
        if (e->n_tokens < 1 || e->n_tokens > g_model.cfg.max_ctx || e->n_tokens > ex.max_len) abort();
        for (int32_t k = 0; k < e->n_tokens; k++)
            if (e->tokens[k] < 0 || e->tokens[k] >= nv ||
                (e->labels[k] != DS_TRAIN_IGNORE_INDEX && e->labels[k] != e->tokens[k]))
                abort();
    }
    ds_ft_examples_free(&ex);
    return 0;
}
