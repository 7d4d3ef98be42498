/* llama.cpp's own reference quantizers (ggml-quants.c quantize_row_<type>_ref) on float32 values from
 * stdin, the blocks to stdout: `ggml-quantize-ref Q4_K 1024 < values.f32 > blocks.bin`. Built against
 * the llama.cpp source by tests/runtimes/build_ggml_quants.sh for tests/quant/test_gguf_quants.py. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-quants.h"

typedef void (*quantize_fn)(const float *, void *, int64_t);

static const struct {
    const char *name;
    quantize_fn fn;
    int values, bytes;  /* per block */
} TYPES[] = {
    {"Q4_0", (quantize_fn)quantize_row_q4_0_ref, 32, 18}, {"Q4_1", (quantize_fn)quantize_row_q4_1_ref, 32, 20},
    {"Q5_0", (quantize_fn)quantize_row_q5_0_ref, 32, 22}, {"Q5_1", (quantize_fn)quantize_row_q5_1_ref, 32, 24},
    {"Q8_0", (quantize_fn)quantize_row_q8_0_ref, 32, 34}, {"Q2_K", (quantize_fn)quantize_row_q2_K_ref, 256, 84},
    {"Q3_K", (quantize_fn)quantize_row_q3_K_ref, 256, 110}, {"Q4_K", (quantize_fn)quantize_row_q4_K_ref, 256, 144},
    {"Q5_K", (quantize_fn)quantize_row_q5_K_ref, 256, 176}, {"Q6_K", (quantize_fn)quantize_row_q6_K_ref, 256, 210},
};

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s TYPE N < float32 values > blocks\n", argv[0]);
        return 2;
    }
    long n = atol(argv[2]);
    for (size_t i = 0; i < sizeof TYPES / sizeof TYPES[0]; i++) {
        if (strcmp(argv[1], TYPES[i].name) != 0) continue;
        if (n <= 0 || n % TYPES[i].values) return 2;
        float *x = malloc(n * sizeof(float));
        size_t out = (size_t)(n / TYPES[i].values) * TYPES[i].bytes;
        void *y = malloc(out);
        if (!x || !y || fread(x, sizeof(float), n, stdin) != (size_t)n) return 2;
        TYPES[i].fn(x, y, n);
        return fwrite(y, 1, out, stdout) == out ? 0 : 1;
    }
    fprintf(stderr, "unknown type %s\n", argv[1]);
    return 2;
}

/* ggml-quants.c refers to these from code paths never taken here (row validation, importance tables) */
void ggml_abort(const char *file, int line, const char *fmt, ...) { (void)file; (void)line; (void)fmt; abort(); }
size_t ggml_row_size(enum ggml_type type, int64_t ne) { (void)type; (void)ne; abort(); }
const char *ggml_type_name(enum ggml_type type) { (void)type; abort(); }
size_t ggml_type_size(enum ggml_type type) { (void)type; abort(); }
