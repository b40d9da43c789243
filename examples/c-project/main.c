#include <stdio.h>
#include <stdlib.h>

#include "count.h"

int main(void) {
    size_t capacity = 4096, length = 0;
    char *buffer = malloc(capacity);
    size_t n;
    while (buffer && (n = fread(buffer + length, 1, capacity - length, stdin)) > 0) {
        length += n;
        if (length == capacity) buffer = realloc(buffer, capacity *= 2);
    }
    if (!buffer) return 1;
    struct counts c = count_text(buffer, length);
    printf("%zu %zu %zu\n", c.lines, c.words, c.bytes);
    free(buffer);
    return 0;
}
