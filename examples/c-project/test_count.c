#include <assert.h>
#include <stdio.h>
#include <string.h>

#include "count.h"

static void check(const char *text, size_t lines, size_t words) {
    struct counts c = count_text(text, strlen(text));
    if (c.lines != lines || c.words != words || c.bytes != strlen(text)) {
        printf("FAIL: \"%s\": %zu lines %zu words, expected %zu %zu\n", text, c.lines, c.words, lines, words);
        assert(0);
    }
}

int main(void) {
    check("", 0, 0);
    check("one\n", 1, 1);
    check("  two  words \n", 1, 2);
    check("a\nb\nc", 2, 3);
    check("\t tabs\tand\nnewlines\n\n", 3, 3);
    printf("all tests passed\n");
    return 0;
}
