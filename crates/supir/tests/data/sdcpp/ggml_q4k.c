/* Quantises a file of little-endian f32 to Q4_K as stable-diffusion.cpp's converter does
 * (ggml_quantize_chunk with an importance of 1 for every column), see README.md:
 *
 *   ggml_q4k IN.f32 OUT.bin
 *
 * Build against the ggml of the stable-diffusion.cpp build (its static ggml-base library). */
#include <stdio.h>
#include <stdlib.h>

#include "ggml.h"

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s IN.f32 OUT.bin\n", argv[0]);
        return 2;
    }
    FILE *in = fopen(argv[1], "rb");
    if (!in) return 1;
    fseek(in, 0, SEEK_END);
    long bytes = ftell(in);
    fseek(in, 0, SEEK_SET);
    const int64_t row = 256, rows = bytes / 4 / row;
    float *x = malloc(bytes), *ones = malloc(row * sizeof(float));
    if (fread(x, 1, bytes, in) != (size_t)bytes) return 1;
    fclose(in);
    for (int64_t i = 0; i < row; i++) ones[i] = 1.0f;
    size_t size = ggml_row_size(GGML_TYPE_Q4_K, row) * rows;
    void *out = malloc(size);
    if (ggml_quantize_chunk(GGML_TYPE_Q4_K, x, out, 0, rows, row, ones) != size) return 1;
    FILE *o = fopen(argv[2], "wb");
    if (!o || fwrite(out, 1, size, o) != size) return 1;
    fclose(o);
    return 0;
}
