/* Independent client for lowbit's GGUF export tests: loads a GGUF with llama.cpp, evaluates token ids given on
 * the command line in one batch, writes every position's logits (float32, n_tokens x n_vocab) to a file, and
 * tokenizes an optional text with llama.cpp's own tokenizer (ids printed to stdout).
 * usage: llama_logits MODEL.gguf OUT.bin "t0,t1,..." ["text to tokenize"]
 * environment: LLAMA_LOGITS_NO_REPACK=1 loads weights without CPU repacking (use_extra_bufts = false), so that a
 * BLAS backend (if this libggml has one) receives the quantized matmuls; LLAMA_LOGITS_FLASH_ATTN=-1|0|1 sets
 * flash_attn_type (auto|off|on; default auto); LLAMA_LOGITS_DUMP=FILE with
 * LLAMA_LOGITS_DUMP_NAMES="a,b" writes those F32 graph tensors (first occurrence of each name) to FILE as
 * records [int32 name length][name][int64 ne[4]][float32 data]. The backend devices are printed as "device=NAME".
 * Built by tests/io/test_llamacpp_slow.py against a libllama compiled from llama.cpp source. */
#include "ggml-backend.h"
#include "llama.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static FILE * g_dump;
static char g_names[4096];

static int wanted(const char * name) {
    size_t n = strlen(name);
    for (const char * p = g_names; (p = strstr(p, name)) != NULL; p += n) {
        if ((p == g_names || p[-1] == ',') && (p[n] == ',' || p[n] == 0)) return 1;
    }
    return 0;
}

static bool dump_cb(struct ggml_tensor * t, bool ask, void * user_data) {
    (void) user_data;
    if (ask) return t->type == GGML_TYPE_F32 && wanted(t->name);
    if (t->type != GGML_TYPE_F32 || !ggml_is_contiguous(t) || !wanted(t->name)) return true;
    int64_t n = ggml_nelements(t);
    float * buf = malloc(n * sizeof(float));
    ggml_backend_tensor_get(t, buf, 0, n * sizeof(float));
    int32_t len = (int32_t) strlen(t->name);
    fwrite(&len, 4, 1, g_dump); fwrite(t->name, 1, len, g_dump); fwrite(t->ne, 8, 4, g_dump); fwrite(buf, 4, n, g_dump);
    free(buf);
    /* later tensors of the same name (e.g. Qcur after RoPE) are not wanted */
    char * p = strstr(g_names, t->name);
    if (p) memset(p, '#', strlen(t->name));
    return true;
}

int main(int argc, char ** argv) {
    if (argc < 4) { fprintf(stderr, "usage: %s model out ids [text]\n", argv[0]); return 2; }
    int cap = 1, n = 0;
    for (const char * p = argv[3]; *p; ++p) cap += *p == ',';
    llama_token * ids = malloc(sizeof(llama_token) * cap);
    for (char * tok = strtok(argv[3], ","); tok; tok = strtok(NULL, ",")) ids[n++] = atoi(tok);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    if (getenv("LLAMA_LOGITS_NO_REPACK")) mp.use_extra_bufts = false;
    struct llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "LOAD FAILED\n"); return 3; }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n < 64 ? 64 : n; cp.n_batch = cp.n_ctx; cp.n_ubatch = cp.n_ctx; cp.n_threads = 2; cp.n_threads_batch = 2;
    if (getenv("LLAMA_LOGITS_FLASH_ATTN")) cp.flash_attn_type = (enum llama_flash_attn_type) atoi(getenv("LLAMA_LOGITS_FLASH_ATTN"));
    if (getenv("LLAMA_LOGITS_DUMP")) {
        g_dump = fopen(getenv("LLAMA_LOGITS_DUMP"), "wb");
        snprintf(g_names, sizeof g_names, "%s", getenv("LLAMA_LOGITS_DUMP_NAMES") ? getenv("LLAMA_LOGITS_DUMP_NAMES") : "");
        cp.cb_eval = dump_cb; cp.cb_eval_user_data = NULL;
    }
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
    if (g_dump) fclose(g_dump);
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) printf("device=%s\n", ggml_backend_dev_name(ggml_backend_dev_get(i)));
    printf("n_vocab=%d\n", n_vocab);
    llama_batch_free(b);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
