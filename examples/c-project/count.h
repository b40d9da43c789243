#ifndef COUNT_H
#define COUNT_H
#include <stddef.h>

/* Lines, words and bytes of a buffer, the way wc counts them. */
struct counts {
    size_t lines;
    size_t words;
    size_t bytes;
};

struct counts count_text(const char *text, size_t length);

#endif
