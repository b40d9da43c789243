// The launcher: serializes a csb_launch, starts contree-init as the sandbox's pid 1 in fresh
// namespaces, and a few system-call helpers for Swift.
//
// The start works like posix_spawn: clone with CLONE_VM|CLONE_VFORK on a small stack of its own,
// so the parent (a multi-threaded Swift process) is suspended and nothing is copied; the child
// only moves file descriptors into place and execs. Between that clone and the exec, only raw
// system calls run: no malloc, no locks, no stdio.
#define _GNU_SOURCE
#include "CSandbox.h"
#include "csb_text.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <net/if.h>
#include <pthread.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif

/// Appends a NUL-terminated string to the spec buffer.
static void csb_put_string(char *buf, size_t *offset, const char *s) {
    size_t n = csb_strlen(s) + 1;
    memcpy(buf + *offset, s ? s : "", n);
    *offset += n;
}

/// Serializes the launch into a sealed memfd (see csb_wire in CSandbox.h).
static int csb_write_spec(const csb_launch *l, const void *filter, size_t filter_len) {
    const char *fixed[] = {l->store, l->upper, l->work, l->root, l->hostname ? l->hostname : "", l->cwd ? l->cwd : "/"};
    size_t argc = 0, envc = 0;
    while (l->argv[argc]) argc++;
    while (l->envp[envc]) envc++;
    size_t length = sizeof(csb_wire) + l->file_count * sizeof(csb_wire_file) + filter_len;
    for (size_t i = 0; i < 6; i++) length += csb_strlen(fixed[i]) + 1;
    for (size_t i = 0; i < l->lower_count; i++) length += csb_strlen(l->lowers[i]) + 1;
    for (size_t i = 0; i < argc; i++) length += csb_strlen(l->argv[i]) + 1;
    for (size_t i = 0; i < envc; i++) length += csb_strlen(l->envp[i]) + 1;
    for (size_t i = 0; i < l->file_count; i++) length += csb_strlen(l->files[i].path) + 1;
    length += l->bind_count * sizeof(uint32_t);
    for (size_t i = 0; i < l->bind_count; i++)
        length += csb_strlen(l->binds[i].source) + 1 + csb_strlen(l->binds[i].target) + 1;
    if (length > UINT32_MAX || l->bind_count > 256) return -E2BIG;
    char *buf = calloc(length, 1);
    if (!buf) return -ENOMEM;
    csb_wire *w = (csb_wire *)buf;
    w->magic = CSB_WIRE_MAGIC;
    w->length = (uint32_t)length;
    w->lower_count = (uint32_t)l->lower_count;
    w->argc = (uint32_t)argc;
    w->envc = (uint32_t)envc;
    w->file_count = (uint32_t)l->file_count;
    w->id_base = l->id_base;
    w->uid = l->uid;
    w->gid = l->gid;
    w->loopback_up = l->loopback_up;
    w->filter_length = (uint32_t)filter_len;
    w->terminal = l->terminal ? 1 : 0;
    w->file_size_limit = l->file_size_limit;
    w->bind_count = (uint32_t)l->bind_count;
    size_t offset = sizeof *w;
    for (size_t i = 0; i < l->file_count; i++) {
        csb_wire_file *f = (csb_wire_file *)(buf + offset);
        f->mode = l->files[i].mode;
        f->uid = l->files[i].uid;
        f->gid = l->files[i].gid;
        offset += sizeof *f;
    }
    for (size_t i = 0; i < l->bind_count; i++) {
        memcpy(buf + offset, &l->binds[i].flags, sizeof(uint32_t));
        offset += sizeof(uint32_t);
    }
    memcpy(buf + offset, filter, filter_len);
    offset += filter_len;
    for (size_t i = 0; i < 6; i++) csb_put_string(buf, &offset, fixed[i]);
    for (size_t i = 0; i < l->lower_count; i++) csb_put_string(buf, &offset, l->lowers[i]);
    for (size_t i = 0; i < argc; i++) csb_put_string(buf, &offset, l->argv[i]);
    for (size_t i = 0; i < envc; i++) csb_put_string(buf, &offset, l->envp[i]);
    for (size_t i = 0; i < l->file_count; i++) csb_put_string(buf, &offset, l->files[i].path);
    for (size_t i = 0; i < l->bind_count; i++) {
        csb_put_string(buf, &offset, l->binds[i].source);
        csb_put_string(buf, &offset, l->binds[i].target);
    }
    int fd = memfd_create("contree-spec", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    int rc = fd < 0 ? -errno : 0;
    if (rc == 0 && csb_write_all(fd, buf, length) < 0) rc = -errno;
    if (rc == 0 && fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) != 0) rc = -errno;
    free(buf);
    if (rc != 0) {
        if (fd >= 0) close(fd);
        return rc;
    }
    return fd;
}

/// What the vfork-style child needs; it shares the parent's memory, so `err` comes back.
struct csb_spawn {
    const char *path;
    const char *const *argv;  ///< contree-init's: {"contree-init", mode, ...}
    const int *sources;       ///< fds to install as 3, 4, 5, ...
    int count;
    int netns_fd;             ///< >= 0: join this network namespace before the exec
    int output_fd;            ///< >= 0: becomes stdout and stderr
    int death_signal;         ///< a parent-death signal (of the calling thread), or 0
    const int *cgroup_fds;    ///< cgroup v1 `tasks` files the child moves itself into ("0")
    int cgroup_fd_count;
    volatile int err;
};

/// Runs in the child until exec: moves the fds into place (dup2 clears close-on-exec) and
/// execs contree-init. Raw system calls only.
static int csb_spawn_child(void *arg) {
    struct csb_spawn *s = arg;
    // The child moves itself into its cgroups: writing "0" (this task) to a v1 `tasks` file
    // moves one thread without the global lock a migration by pid takes, whose first writer
    // after an idle spell waits for an RCU grace period (5-17 ms on an untuned host). The child
    // is single-threaded, so the thread is the process, and what it forks inherits the cgroups.
    for (int i = 0; i < s->cgroup_fd_count; i++) {
        if (syscall(SYS_write, s->cgroup_fds[i], "0", 1) != 1) {
            s->err = errno;
            syscall(SYS_exit, 127);
        }
    }
    // Set before the exec, while the parent is suspended: it cannot have died yet.
    if (s->death_signal && syscall(SYS_prctl, PR_SET_PDEATHSIG, s->death_signal, 0, 0, 0) != 0) {
        s->err = errno;
        syscall(SYS_exit, 127);
    }
    if (s->netns_fd >= 0 && syscall(SYS_setns, s->netns_fd, CLONE_NEWNET) != 0) {
        s->err = errno;
        syscall(SYS_exit, 127);
    }
    if (s->output_fd >= 0 && (syscall(SYS_dup2, s->output_fd, 1) < 0 || syscall(SYS_dup2, s->output_fd, 2) < 0)) {
        s->err = errno;
        syscall(SYS_exit, 127);
    }
    // Park every source above the target range first, so that no dup2 clobbers a source. The
    // parked copies are close-on-exec; dup2 clears it on the targets.
    int parked[4096];
    for (int i = 0; i < s->count; i++) {
        parked[i] = (int)syscall(SYS_fcntl, s->sources[i], F_DUPFD_CLOEXEC, 3 + s->count);
        if (parked[i] < 0) {
            s->err = errno;
            syscall(SYS_exit, 127);
        }
    }
    for (int i = 0; i < s->count; i++) {
        if (syscall(SYS_dup2, parked[i], 3 + i) < 0) {
            s->err = errno;
            syscall(SYS_exit, 127);
        }
    }
    // Close the rest; where close_range is refused (an outer seccomp profile), everything the
    // host process opens is close-on-exec anyway.
    syscall(SYS_close_range, (unsigned)(3 + s->count), ~0U, 0);
    char *envp[] = {NULL};
    syscall(SYS_execve, s->path, s->argv, envp);
    s->err = errno;
    syscall(SYS_exit, 127);
    return 0;
}

/// Clones (with `namespaces` added to the posix_spawn-like flags) and execs as `s` says.
/// Returns 0 with the child's pidfd and pid, or -errno.
static int csb_clone_exec(struct csb_spawn *s, int namespaces, int *pidfd_out, pid_t *pid_out) {
    const size_t stack_size = 64 * 1024;
    char *stack = mmap(NULL, stack_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED) return -errno;
    // Every signal blocked across the clone: no handler of the host process may run in the
    // child, and contree-init starts with all of them blocked (it waits for them explicitly).
    uint64_t all = ~0ULL, old = 0;  // raw: glibc's sigfillset leaves its internal signals out
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, &all, &old, sizeof all);
    int pidfd = -1;
    int flags = CLONE_VM | CLONE_VFORK | CLONE_PIDFD | SIGCHLD | namespaces;
    pid_t pid = clone(csb_spawn_child, stack + stack_size, flags, s, &pidfd);
    int saved = errno;
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, &old, NULL, sizeof old);
    munmap(stack, stack_size);
    if (pid < 0) return -saved;
    if (s->err != 0) {
        // The exec failed: reap the child and say why.
        while (waitpid(pid, NULL, __WALL) < 0 && errno == EINTR) {
        }
        close(pidfd);
        return -s->err;
    }
    *pidfd_out = pidfd;
    *pid_out = pid;
    return 0;
}

/// Starts contree-init with the spec and fds in place: as a sandbox's pid 1 in new namespaces,
/// or (exec mode) in the host's namespaces with the target sandbox's pid 1 as one more fd.
static int csb_start(const csb_launch *l, int target_pidfd, int *pidfd_out, pid_t *pid_out) {
    const void *filter = NULL;
    size_t filter_len = 0;
    int rc = csb_seccomp_program(&filter, &filter_len);
    if (rc != 0) return rc;
    if (l->file_count > 4000) return -E2BIG;
    int spec = csb_write_spec(l, filter, filter_len);
    if (spec < 0) return spec;

    int sources[4096];
    int count = 0;
    sources[count++] = spec;          // CSB_FD_SPEC
    sources[count++] = l->go_fd;      // CSB_FD_GO
    sources[count++] = l->report_fd;  // CSB_FD_REPORT
    sources[count++] = l->stdin_fd;
    sources[count++] = l->stdout_fd;
    sources[count++] = l->stderr_fd;
    sources[count++] = l->userns_fd;
    for (size_t i = 0; i < l->file_count; i++) sources[count++] = l->files[i].source_fd;
    int exec_mode = target_pidfd >= 0;
    if (exec_mode) {
        if (l->file_count != 0) return -EINVAL;
        sources[count++] = target_pidfd;  // CSB_FD_TARGET
    }

    const char *argv[] = {"contree-init", exec_mode ? "exec" : NULL, NULL};
    struct csb_spawn s = {
        l->init_path, argv, sources, count, exec_mode || l->netns_fd <= 0 ? -1 : l->netns_fd, -1, 0,
        l->cgroup_fds, (int)l->cgroup_fd_count, 0};
    int flags = 0;
    if (!exec_mode) flags |= CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC;
    if (!exec_mode && l->netns_fd <= 0) flags |= CLONE_NEWNET;
    rc = csb_clone_exec(&s, flags, pidfd_out, pid_out);
    close(spec);
    return rc;
}

int csb_launch_start(const csb_launch *l, int *pidfd_out, pid_t *pid_out) {
    return csb_start(l, -1, pidfd_out, pid_out);
}

int csb_exec_start(const csb_launch *l, int target_pidfd, int *pidfd_out, pid_t *pid_out) {
    if (target_pidfd < 0) return -EBADF;
    return csb_start(l, target_pidfd, pidfd_out, pid_out);
}

/// Guards are started by one thread that lives as long as the process: a parent-death signal
/// follows the thread that cloned, and the caller's thread (a pool's) may end before the run.
struct csb_guard_job {
    struct csb_spawn *spawn;
    int pidfd;
    pid_t pid;
    int rc;
    int done;
};
static pthread_mutex_t csb_guard_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t csb_guard_changed = PTHREAD_COND_INITIALIZER;
static struct csb_guard_job *csb_guard_pending;
static int csb_guard_thread_started;

static void *csb_guard_spawner(void *unused) {
    (void)unused;
    pthread_mutex_lock(&csb_guard_lock);
    for (;;) {
        while (!csb_guard_pending) pthread_cond_wait(&csb_guard_changed, &csb_guard_lock);
        struct csb_guard_job *job = csb_guard_pending;
        csb_guard_pending = NULL;
        pthread_mutex_unlock(&csb_guard_lock);
        job->rc = csb_clone_exec(job->spawn, CLONE_NEWPID, &job->pidfd, &job->pid);
        pthread_mutex_lock(&csb_guard_lock);
        job->done = 1;
        pthread_cond_broadcast(&csb_guard_changed);
    }
    return NULL;
}

int csb_guard_start(const char *init_path, const char *const *argv, const int *fds, int fd_count, int output_fd,
                    int *pidfd_out, pid_t *pid_out) {
    size_t argc = 0;
    while (argv[argc]) argc++;
    if (argc == 0 || argc > 120 || fd_count < 0 || fd_count > 8) return -E2BIG;
    const char *full[128] = {"contree-init", "guard"};
    for (size_t i = 0; i <= argc; i++) full[2 + i] = argv[i];
    struct csb_spawn s = {init_path, full, fds, fd_count, -1, output_fd, SIGKILL, NULL, 0, 0};
    struct csb_guard_job job = {&s, -1, 0, 0, 0};
    pthread_mutex_lock(&csb_guard_lock);
    if (!csb_guard_thread_started) {
        pthread_t thread;
        pthread_attr_t attributes;
        pthread_attr_init(&attributes);
        pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&thread, &attributes, csb_guard_spawner, NULL);
        pthread_attr_destroy(&attributes);
        if (rc != 0) {
            pthread_mutex_unlock(&csb_guard_lock);
            return -rc;
        }
        csb_guard_thread_started = 1;
    }
    while (csb_guard_pending) pthread_cond_wait(&csb_guard_changed, &csb_guard_lock);
    csb_guard_pending = &job;
    pthread_cond_broadcast(&csb_guard_changed);
    while (!job.done) pthread_cond_wait(&csb_guard_changed, &csb_guard_lock);
    pthread_mutex_unlock(&csb_guard_lock);
    if (job.rc == 0) {
        *pidfd_out = job.pidfd;
        *pid_out = job.pid;
    }
    return job.rc;
}

/// csb_netns_create's thread: a network namespace of its own, lo up, an fd for it; the
/// thread's membership ends with the thread.
static void *csb_netns_thread(void *arg) {
    int *result = arg;
    if (unshare(CLONE_NEWNET) != 0) {
        *result = -errno;
        return NULL;
    }
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    memcpy(ifr.ifr_name, "lo", 3);
    if (s < 0 || ioctl(s, SIOCGIFFLAGS, &ifr) != 0) {
        *result = -errno;
    } else {
        ifr.ifr_flags |= IFF_UP;
        if (ioctl(s, SIOCSIFFLAGS, &ifr) != 0) {
            *result = -errno;
        } else {
            int fd = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
            *result = fd < 0 ? -errno : fd;
        }
    }
    if (s >= 0) close(s);
    return NULL;
}

int csb_netns_create(void) {
    int result = -EINVAL;
    pthread_t thread;
    int rc = pthread_create(&thread, NULL, csb_netns_thread, &result);
    if (rc != 0) return -rc;
    pthread_join(thread, NULL);
    return result;
}

int csb_userns_create(uint32_t id_base, uint32_t count) {
    int up[2], down[2];
    if (pipe2(up, O_CLOEXEC) != 0) return -errno;
    if (pipe2(down, O_CLOEXEC) != 0) {
        int e = errno;
        close(up[0]);
        close(up[1]);
        return -e;
    }
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    long pid = syscall(SYS_clone, SIGCHLD, 0, NULL, NULL, 0);
    if (pid == 0) {
        // Hold nothing of the parent's (a lease lock, a pipe) and die with it.
        prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
        int lo = up[1] < down[0] ? up[1] : down[0];
        int hi = up[1] < down[0] ? down[0] : up[1];
        if (lo > 0) syscall(SYS_close_range, 0, (unsigned)lo - 1, 0);
        if (hi > lo + 1) syscall(SYS_close_range, (unsigned)lo + 1, (unsigned)hi - 1, 0);
        syscall(SYS_close_range, (unsigned)hi + 1, ~0U, 0);
        char b = unshare(CLONE_NEWUSER) == 0 ? 'u' : 'x';
        csb_write_all(up[1], &b, 1);
        while (read(down[0], &b, 1) < 0 && errno == EINTR) {
        }
        _exit(0);
    }
    int saved = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    close(up[1]);
    close(down[0]);
    int result = -saved;
    if (pid > 0) {
        char b = 0;
        ssize_t n;
        while ((n = read(up[0], &b, 1)) < 0 && errno == EINTR) {
        }
        result = -EPERM;
        if (n == 1 && b == 'u') {
            char path[64], map[64];
            size_t mlen = 0;
            csb_append(map, sizeof map, &mlen, "0 ");
            csb_append_uint(map, sizeof map, &mlen, id_base);
            csb_append(map, sizeof map, &mlen, " ");
            csb_append_uint(map, sizeof map, &mlen, count);
            csb_append(map, sizeof map, &mlen, "\n");
            const char *files[] = {"uid_map", "gid_map"};
            result = 0;
            for (int i = 0; i < 2 && result == 0; i++) {
                size_t plen = 0;
                csb_append(path, sizeof path, &plen, "/proc/");
                csb_append_uint(path, sizeof path, &plen, (unsigned long)pid);
                csb_append(path, sizeof path, &plen, "/");
                csb_append(path, sizeof path, &plen, files[i]);
                int fd = open(path, O_WRONLY | O_CLOEXEC);
                if (fd < 0 || csb_write_all(fd, map, mlen) < 0) result = -errno;
                if (fd >= 0) close(fd);
            }
            if (result == 0) {
                size_t plen = 0;
                csb_append(path, sizeof path, &plen, "/proc/");
                csb_append_uint(path, sizeof path, &plen, (unsigned long)pid);
                csb_append(path, sizeof path, &plen, "/ns/user");
                int fd = open(path, O_RDONLY | O_CLOEXEC);
                result = fd < 0 ? -errno : fd;
            }
        }
        csb_write_all(down[1], "x", 1);
        while (waitpid((pid_t)pid, NULL, __WALL) < 0 && errno == EINTR) {
        }
    }
    close(up[0]);
    close(down[1]);
    return result;
}

int csb_pidfd_kill(int pidfd, int sig) {
    return syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0) == 0 ? 0 : -errno;
}

int csb_pidfd_open(pid_t pid) {
    int fd = (int)syscall(SYS_pidfd_open, pid, 0);
    return fd >= 0 ? fd : -errno;
}

int csb_wait(pid_t pid, int *status, struct csb_usage *usage) {
    struct rusage ru;
    memset(&ru, 0, sizeof ru);
    pid_t r;
    while ((r = wait4(pid, status, __WALL, &ru)) < 0 && errno == EINTR) {
    }
    if (r < 0) return -errno;
    usage->user_us = (int64_t)ru.ru_utime.tv_sec * 1000000 + ru.ru_utime.tv_usec;
    usage->system_us = (int64_t)ru.ru_stime.tv_sec * 1000000 + ru.ru_stime.tv_usec;
    usage->max_rss_kb = ru.ru_maxrss;
    usage->in_blocks = ru.ru_inblock;
    usage->out_blocks = ru.ru_oublock;
    usage->faults = ru.ru_minflt + ru.ru_majflt;
    return 0;
}

// ---- GNU extensions for Swift ------------------------------------------------------------

#include <sys/eventfd.h>

int csb_pipe_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC); }

#include <spawn.h>
int csb_spawn_add_chdir(void *actions, const char *path) {
    return posix_spawn_file_actions_addchdir_np((posix_spawn_file_actions_t *)actions, path);
}

int csb_eventfd_cloexec(void) { return eventfd(0, EFD_CLOEXEC); }

int csb_memfd_cloexec(const char *name) { return memfd_create(name, MFD_CLOEXEC); }

int csb_open_path_dir(const char *path) { return open(path, O_PATH | O_DIRECTORY | O_CLOEXEC); }

int csb_syncfs(int fd) { return syncfs(fd); }

#include <linux/openat2.h>
#include <sys/statfs.h>

int csb_open_beneath(int dirfd, const char *path, int flags) {
    struct open_how how = {
        .flags = (uint64_t)(flags | O_CLOEXEC | O_NOCTTY),
        .mode = 0,
        .resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
    };
    return (int)syscall(SYS_openat2, dirfd, path, &how, sizeof how);
}

long csb_fs_type(int fd) {
    struct statfs fs;
    return fstatfs(fd, &fs) == 0 ? (long)fs.f_type : -1;
}

ssize_t csb_copy_file_range(int in, int out, size_t length) {
    return copy_file_range(in, NULL, out, NULL, length, 0);
}

#include <pty.h>
#include <sys/ioctl.h>
#include <termios.h>

int csb_openpty(int *primary, int *secondary, int like_fd) {
    struct winsize size;
    int sized = ioctl(like_fd, TIOCGWINSZ, &size) == 0;
    if (openpty(primary, secondary, NULL, NULL, sized ? &size : NULL) != 0) return -errno;
    fcntl(*primary, F_SETFD, FD_CLOEXEC);
    fcntl(*secondary, F_SETFD, FD_CLOEXEC);
    return 0;
}

int csb_terminal_raw(int fd, void *saved, size_t saved_size) {
    if (saved_size < sizeof(struct termios)) return -EINVAL;
    struct termios t;
    if (tcgetattr(fd, &t) != 0) return -errno;
    memcpy(saved, &t, sizeof t);
    cfmakeraw(&t);
    return tcsetattr(fd, TCSANOW, &t) == 0 ? 0 : -errno;
}

int csb_terminal_restore(int fd, const void *saved) {
    return tcsetattr(fd, TCSANOW, (const struct termios *)saved) == 0 ? 0 : -errno;
}
