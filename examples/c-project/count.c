#include "count.h"

#include <ctype.h>

struct counts count_text(const char *text, size_t length) {
    struct counts c = {0, 0, length};
    int in_word = 0;
    for (size_t i = 0; i < length; i++) {
        unsigned char ch = (unsigned char)text[i];
        if (ch == '\n') c.lines++;
        if (isspace(ch)) {
            in_word = 0;
        } else if (!in_word) {
            in_word = 1;
            c.words++;
        }
    }
    return c;
}
