// One HTTP request through libcurl, loaded with dlopen on first use.
//
// Linking libcurl would load it and the ~30 libraries it needs (TLS, Kerberos, LDAP, IDN) into
// every process of this program, about 3 ms of dynamic linking at each start, for the few
// commands that talk to a registry or a trace collector. Loaded on demand, only they pay it.
#ifndef CCURL_H
#define CCURL_H

#include <stddef.h>
#include <stdint.h>

typedef struct ccurl_request {
    const char *method;          // GET, HEAD, PUT, POST, PATCH, DELETE
    const char *url;
    const char *const *headers;  // "Name: value"
    size_t header_count;
    const void *body;            // sent when not NULL (a PUT or POST without one sends none)
    size_t body_length;
    long connect_timeout_ms;     // 0: libcurl's default
    long idle_timeout_s;         // fail when no byte moves for this long; 0: never
    long total_timeout_ms;       // 0: no limit
    int cancel_fd;               // readable (an eventfd written to): stop now; -1: none
    void *context;
    // Each header line of each response (the status line first, CRLF stripped; a blank line
    // ends a response's headers). Returns 0 to go on.
    int (*on_header)(void *context, const char *line, size_t length);
    // Body bytes of the final response. Returns 0 to go on, anything else to stop.
    int (*on_data)(void *context, const void *data, size_t length);
} ccurl_request;

enum {
    CCURL_OK = 0,
    CCURL_UNAVAILABLE = -1,  // libcurl could not be loaded (message in error)
    CCURL_FAILED = -2,       // the transfer failed (message in error)
    CCURL_CANCELLED = -3,    // cancel_fd became readable
    CCURL_STOPPED = -4,      // on_data asked to stop
};

// A descriptor for ccurl_request.cancel_fd (an eventfd, close-on-exec), and what makes it
// readable: every transfer watching it stops.
int ccurl_cancel_fd(void);
void ccurl_cancel(int fd);

// Performs the request. Returns CCURL_OK with *status set to the final response's status, or
// one of the negative codes with a message in error (NUL-terminated, truncated to error_size).
int ccurl_perform(const ccurl_request *request, long *status, char *error, size_t error_size);

#endif
