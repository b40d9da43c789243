#define _GNU_SOURCE
#include "CCurl.h"

#include <curl/curl.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

// The entry points used, resolved from libcurl.so.4 (Debian's libcurl4).
static struct {
    CURLcode (*global_init)(long);
    CURL *(*easy_init)(void);
    CURLcode (*easy_setopt)(CURL *, CURLoption, ...);
    CURLcode (*easy_getinfo)(CURL *, CURLINFO, ...);
    void (*easy_cleanup)(CURL *);
    const char *(*easy_strerror)(CURLcode);
    CURLM *(*multi_init)(void);
    CURLMcode (*multi_add_handle)(CURLM *, CURL *);
    CURLMcode (*multi_remove_handle)(CURLM *, CURL *);
    CURLMcode (*multi_perform)(CURLM *, int *);
    CURLMcode (*multi_poll)(CURLM *, struct curl_waitfd *, unsigned int, int, int *);
    CURLMsg *(*multi_info_read)(CURLM *, int *);
    CURLMcode (*multi_cleanup)(CURLM *);
    const char *(*multi_strerror)(CURLMcode);
    struct curl_slist *(*slist_append)(struct curl_slist *, const char *);
    void (*slist_free_all)(struct curl_slist *);
    CURLSH *(*share_init)(void);
    CURLSHcode (*share_setopt)(CURLSH *, CURLSHoption, ...);
} api;

// Connections, DNS answers and TLS sessions shared by every transfer of the process (as a
// URLSession's were): an import's or a push's requests to one registry reuse one connection
// instead of a TCP and TLS handshake each. libcurl calls these to lock what it shares.
static CURLSH *share;
static pthread_mutex_t share_locks[CURL_LOCK_DATA_LAST];

static void share_lock(CURL *handle, curl_lock_data data, curl_lock_access access, void *user) {
    (void)handle, (void)access, (void)user;
    pthread_mutex_lock(&share_locks[data]);
}

static void share_unlock(CURL *handle, curl_lock_data data, void *user) {
    (void)handle, (void)user;
    pthread_mutex_unlock(&share_locks[data]);
}

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static char load_error[512];

static void load(void) {
    void *lib = dlopen("libcurl.so.4", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        snprintf(load_error, sizeof load_error,
                 "libcurl is not installed (%s); install it: apt-get install libcurl4", dlerror());
        return;
    }
#define RESOLVE(field, name)                                                                    \
    do {                                                                                        \
        *(void **)&api.field = dlsym(lib, name);                                                \
        if (!api.field) {                                                                       \
            snprintf(load_error, sizeof load_error, "libcurl.so.4 has no %s; install libcurl4", name); \
            return;                                                                             \
        }                                                                                       \
    } while (0)
    RESOLVE(global_init, "curl_global_init");
    RESOLVE(easy_init, "curl_easy_init");
    RESOLVE(easy_setopt, "curl_easy_setopt");
    RESOLVE(easy_getinfo, "curl_easy_getinfo");
    RESOLVE(easy_cleanup, "curl_easy_cleanup");
    RESOLVE(easy_strerror, "curl_easy_strerror");
    RESOLVE(multi_init, "curl_multi_init");
    RESOLVE(multi_add_handle, "curl_multi_add_handle");
    RESOLVE(multi_remove_handle, "curl_multi_remove_handle");
    RESOLVE(multi_perform, "curl_multi_perform");
    RESOLVE(multi_poll, "curl_multi_poll");
    RESOLVE(multi_info_read, "curl_multi_info_read");
    RESOLVE(multi_cleanup, "curl_multi_cleanup");
    RESOLVE(multi_strerror, "curl_multi_strerror");
    RESOLVE(slist_append, "curl_slist_append");
    RESOLVE(slist_free_all, "curl_slist_free_all");
    RESOLVE(share_init, "curl_share_init");
    RESOLVE(share_setopt, "curl_share_setopt");
#undef RESOLVE
    CURLcode rc = api.global_init(CURL_GLOBAL_DEFAULT);
    if (rc != CURLE_OK) {
        snprintf(load_error, sizeof load_error, "libcurl did not initialise: %s", api.easy_strerror(rc));
        return;
    }
    for (int i = 0; i < CURL_LOCK_DATA_LAST; i++) pthread_mutex_init(&share_locks[i], NULL);
    share = api.share_init();
    if (share && (api.share_setopt(share, CURLSHOPT_LOCKFUNC, share_lock) != CURLSHE_OK ||
                  api.share_setopt(share, CURLSHOPT_UNLOCKFUNC, share_unlock) != CURLSHE_OK ||
                  api.share_setopt(share, CURLSHOPT_SHARE, CURL_LOCK_DATA_CONNECT) != CURLSHE_OK ||
                  api.share_setopt(share, CURLSHOPT_SHARE, CURL_LOCK_DATA_DNS) != CURLSHE_OK ||
                  api.share_setopt(share, CURLSHOPT_SHARE, CURL_LOCK_DATA_SSL_SESSION) != CURLSHE_OK)) {
        share = NULL;  // every transfer on its own connection: slower, still correct
    }
    load_error[0] = 0;
}

typedef struct transfer {
    const ccurl_request *request;
    int stopped;  // on_data asked to stop
} transfer;

static size_t header_callback(char *data, size_t size, size_t count, void *user) {
    transfer *t = user;
    size_t length = size * count;
    size_t n = length;
    while (n > 0 && (data[n - 1] == '\n' || data[n - 1] == '\r')) n--;
    if (t->request->on_header && t->request->on_header(t->request->context, data, n) != 0) return 0;
    return length;
}

static size_t write_callback(char *data, size_t size, size_t count, void *user) {
    transfer *t = user;
    size_t length = size * count;
    if (t->request->on_data && t->request->on_data(t->request->context, data, length) != 0) {
        t->stopped = 1;
        return 0;
    }
    return length;
}

#define SET(option, value)                                                                       \
    do {                                                                                         \
        CURLcode set_rc = api.easy_setopt(easy, option, value);                                  \
        if (set_rc != CURLE_OK) {                                                                \
            snprintf(error, error_size, "libcurl refused the option %s: %s", #option,            \
                     api.easy_strerror(set_rc));                                                 \
            result = CCURL_FAILED;                                                               \
            goto done;                                                                           \
        }                                                                                        \
    } while (0)

int ccurl_perform(const ccurl_request *request, long *status, char *error, size_t error_size) {
    pthread_once(&load_once, load);
    if (load_error[0] || !api.easy_init) {
        snprintf(error, error_size, "%s", load_error[0] ? load_error : "libcurl is not loaded");
        return CCURL_UNAVAILABLE;
    }
    int result = CCURL_OK;
    char curl_error[CURL_ERROR_SIZE] = {0};
    transfer t = {.request = request};
    struct curl_slist *headers = NULL;
    CURLM *multi = NULL;
    CURL *easy = api.easy_init();
    if (!easy) {
        snprintf(error, error_size, "libcurl could not start a transfer");
        return CCURL_FAILED;
    }
    for (size_t i = 0; i < request->header_count; i++) {
        struct curl_slist *next = api.slist_append(headers, request->headers[i]);
        if (!next) {
            snprintf(error, error_size, "out of memory for the request's headers");
            result = CCURL_FAILED;
            goto done;
        }
        headers = next;
    }
    // No "Expect: 100-continue" round trip, and no form content type curl would add to a body.
    headers = api.slist_append(headers, "Expect:");
    if (request->body) {
        int typed = 0;
        for (size_t i = 0; i < request->header_count; i++)
            if (strncasecmp(request->headers[i], "Content-Type:", 13) == 0) typed = 1;
        if (!typed) headers = api.slist_append(headers, "Content-Type:");
    }
    SET(CURLOPT_URL, request->url);
    SET(CURLOPT_NOSIGNAL, 1L);
    SET(CURLOPT_PROTOCOLS_STR, "http,https");
    SET(CURLOPT_FOLLOWLOCATION, 0L);  // the caller decides which redirects to follow
    SET(CURLOPT_ERRORBUFFER, curl_error);
    if (share) SET(CURLOPT_SHARE, share);
    SET(CURLOPT_HTTPHEADER, headers);
    SET(CURLOPT_HEADERFUNCTION, header_callback);
    SET(CURLOPT_HEADERDATA, &t);
    SET(CURLOPT_WRITEFUNCTION, write_callback);
    SET(CURLOPT_WRITEDATA, &t);
    if (request->connect_timeout_ms > 0) SET(CURLOPT_CONNECTTIMEOUT_MS, request->connect_timeout_ms);
    if (request->total_timeout_ms > 0) SET(CURLOPT_TIMEOUT_MS, request->total_timeout_ms);
    if (request->idle_timeout_s > 0) {
        SET(CURLOPT_LOW_SPEED_LIMIT, 1L);
        SET(CURLOPT_LOW_SPEED_TIME, request->idle_timeout_s);
    }
    if (strcmp(request->method, "HEAD") == 0) {
        SET(CURLOPT_NOBODY, 1L);
    } else if (request->body) {
        SET(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)request->body_length);
        SET(CURLOPT_POSTFIELDS, request->body);
        if (strcmp(request->method, "POST") != 0) SET(CURLOPT_CUSTOMREQUEST, request->method);
    } else if (strcmp(request->method, "GET") == 0) {
        SET(CURLOPT_HTTPGET, 1L);
    } else {
        // PUT or POST without a body still says Content-Length: 0.
        SET(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)0);
        SET(CURLOPT_POSTFIELDS, "");
        if (strcmp(request->method, "POST") != 0) SET(CURLOPT_CUSTOMREQUEST, request->method);
    }

    multi = api.multi_init();
    if (!multi || api.multi_add_handle(multi, easy) != CURLM_OK) {
        snprintf(error, error_size, "libcurl could not start a transfer");
        result = CCURL_FAILED;
        goto done;
    }
    for (;;) {
        int running = 0;
        CURLMcode mc = api.multi_perform(multi, &running);
        if (mc != CURLM_OK) {
            snprintf(error, error_size, "%s", api.multi_strerror(mc));
            result = CCURL_FAILED;
            break;
        }
        if (!running) break;
        struct curl_waitfd cancel = {.fd = request->cancel_fd, .events = CURL_WAIT_POLLIN};
        mc = api.multi_poll(multi, &cancel, request->cancel_fd >= 0 ? 1 : 0, 1000, NULL);
        if (mc != CURLM_OK) {
            snprintf(error, error_size, "%s", api.multi_strerror(mc));
            result = CCURL_FAILED;
            break;
        }
        if (request->cancel_fd >= 0 && cancel.revents) {
            snprintf(error, error_size, "cancelled");
            result = CCURL_CANCELLED;
            break;
        }
    }
    if (result == CCURL_OK) {
        int left = 0;
        CURLMsg *message;
        CURLcode code = CURLE_OK;
        while ((message = api.multi_info_read(multi, &left)))
            if (message->msg == CURLMSG_DONE) code = message->data.result;
        if (t.stopped) {
            snprintf(error, error_size, "stopped by the receiver");
            result = CCURL_STOPPED;
        } else if (code != CURLE_OK) {
            snprintf(error, error_size, "%s", curl_error[0] ? curl_error : api.easy_strerror(code));
            result = CCURL_FAILED;
        } else {
            long code_seen = 0;
            api.easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &code_seen);
            *status = code_seen;
        }
    }
done:
    if (multi) {
        api.multi_remove_handle(multi, easy);
        api.multi_cleanup(multi);
    }
    api.easy_cleanup(easy);
    if (headers) api.slist_free_all(headers);
    return result;
}

int ccurl_cancel_fd(void) { return eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); }

void ccurl_cancel(int fd) {
    uint64_t one = 1;
    (void)!write(fd, &one, sizeof one);
}
