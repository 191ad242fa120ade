// The four libggml symbols ggml-quants.c references outside the row quantizers (validation and i-quant grid setup),
// stubbed so that ggml-quants.c links alone for scripts/check-ggml-reference.sh; none is reached by the comparison.
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>
void ggml_abort(const char* file, int line, const char* fmt, ...) { fprintf(stderr, "abort %s:%d\n", file, line); abort(); }
size_t ggml_row_size(int type, long long ne) { (void)type; (void)ne; abort(); }
const char* ggml_type_name(int type) { (void)type; return "?"; }
size_t ggml_type_size(int type) { (void)type; abort(); }
