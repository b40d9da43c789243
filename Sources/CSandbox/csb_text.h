// Small async-signal-safe string and I/O helpers shared by the launcher and contree-init
// (no allocation, no stdio, no locale).
#ifndef CONTREE_CSB_TEXT_H
#define CONTREE_CSB_TEXT_H

#include <errno.h>
#include <stddef.h>
#include <unistd.h>

static inline size_t csb_strlen(const char *s) {
    size_t n = 0;
    while (s && s[n]) n++;
    return n;
}

/// Appends s to dst (capacity cap, current length *len), always NUL-terminating.
static inline void csb_append(char *dst, size_t cap, size_t *len, const char *s) {
    for (size_t i = 0; s && s[i] && *len + 1 < cap; i++) dst[(*len)++] = s[i];
    dst[*len] = 0;
}

static inline void csb_append_uint(char *dst, size_t cap, size_t *len, unsigned long v) {
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v && n < 23);
    char out[24];
    for (int i = 0; i < n; i++) out[i] = tmp[n - 1 - i];
    out[n] = 0;
    csb_append(dst, cap, len, out);
}

static inline ssize_t csb_write_all(int fd, const void *buf, size_t n) {
    const char *p = (const char *)buf;
    size_t done = 0;
    while (done < n) {
        ssize_t w = write(fd, p + done, n - done);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        done += (size_t)w;
    }
    return (ssize_t)done;
}

#endif
