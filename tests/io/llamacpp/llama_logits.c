/* Independent client for lowbit's GGUF export tests: loads a GGUF with llama.cpp, evaluates token ids given on
 * the command line in one batch, writes every position's logits (float32, n_tokens x n_vocab) to a file, and
 * tokenizes an optional text with llama.cpp's own tokenizer (ids printed to stdout).
 * usage: llama_logits MODEL.gguf OUT.bin "t0,t1,..." ["text to tokenize"]
 * Built by tests/io/test_llamacpp_slow.py against a libllama compiled from llama.cpp source. */
#include "llama.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char ** argv) {
    if (argc < 4) { fprintf(stderr, "usage: %s model out ids [text]\n", argv[0]); return 2; }
    int cap = 1, n = 0;
    for (const char * p = argv[3]; *p; ++p) cap += *p == ',';
    llama_token * ids = malloc(sizeof(llama_token) * cap);
    for (char * tok = strtok(argv[3], ","); tok; tok = strtok(NULL, ",")) ids[n++] = atoi(tok);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "LOAD FAILED\n"); return 3; }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n < 64 ? 64 : n; cp.n_batch = cp.n_ctx; cp.n_ubatch = cp.n_ctx; cp.n_threads = 2; cp.n_threads_batch = 2;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "CONTEXT FAILED\n"); return 4; }
    const struct llama_vocab * vocab = llama_model_get_vocab(model);
    int n_vocab = llama_vocab_n_tokens(vocab);
    struct llama_batch b = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; ++i) {
        b.token[i] = ids[i]; b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = 1;
    }
    b.n_tokens = n;
    if (llama_decode(ctx, b) != 0) { fprintf(stderr, "DECODE FAILED\n"); return 5; }
    FILE * f = fopen(argv[2], "wb");
    for (int i = 0; i < n; ++i) fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, f);
    fclose(f);
    if (argc > 4) {
        int len = (int) strlen(argv[4]);
        llama_token * out = malloc(sizeof(llama_token) * (len + 8));
        int m = llama_tokenize(vocab, argv[4], len, out, len + 8, false, true);
        for (int i = 0; i < m; ++i) printf(i ? ",%d" : "%d", out[i]);
        printf("\n");
    }
    printf("n_vocab=%d\n", n_vocab);
    llama_batch_free(b);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
