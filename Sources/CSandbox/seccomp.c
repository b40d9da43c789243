// The seccomp policy, compiled once per process with libseccomp and exported as raw BPF so
// that the child only has to hand it to the kernel (libseccomp allocates; the child must not).
//
// Default deny: a system call the allowlist below does not name fails with ENOSYS, so one this
// list (or this libseccomp) does not know, including any the kernel adds later, is refused and
// programs take their fallback. The list starts from the usual container profile (Docker's
// default), without what a sandbox never needs. Two programs are installed: the allowlist, and
// a small one that refines three allowed calls by their arguments (the kernel applies the most
// restrictive answer of all filters). Splitting them keeps every rule of one program free of
// overlaps, whose resolution libseccomp leaves unspecified.
#define _GNU_SOURCE
#include "CSandbox.h"

#include <errno.h>
#include <linux/sched.h>
#include <pthread.h>
#include <seccomp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

// Function-like macros of libseccomp wrapped as functions (STYLE: keep macros out of Swift).
static inline struct scmp_arg_cmp csb_arg_masked_eq(unsigned arg, uint64_t mask, uint64_t value) {
    struct scmp_arg_cmp c = {arg, SCMP_CMP_MASKED_EQ, mask, value};
    return c;
}

static inline struct scmp_arg_cmp csb_arg(unsigned arg, enum scmp_compare op, uint64_t value) {
    struct scmp_arg_cmp c = {arg, op, value, 0};
    return c;
}

/// What a sandbox may call. Names this libseccomp does not know are skipped (and so denied).
static const char *const csb_allowed[] = {
    // processes, threads, signals
    "arch_prctl", "brk", "capget", "capset", "clone", "execve", "execveat", "exit", "exit_group", "fork",
    "vfork", "wait4", "waitid", "getpid", "getppid", "gettid", "getpgid", "getpgrp", "getsid", "setpgid",
    "setsid", "kill", "tkill", "tgkill", "pidfd_open", "pidfd_send_signal", "rt_sigaction", "rt_sigpending",
    "rt_sigprocmask", "rt_sigqueueinfo", "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait",
    "rt_tgsigqueueinfo", "sigaltstack", "signalfd", "signalfd4", "pause", "restart_syscall", "prctl",
    "set_tid_address", "set_robust_list", "get_robust_list", "rseq", "futex", "futex_waitv", "seccomp",
    "ptrace", "process_vm_readv", "process_vm_writev", "personality", "chroot", "membarrier",
    "process_mrelease",
    // credentials and limits
    "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid", "getgroups", "setuid", "setgid",
    "setreuid", "setregid", "setresuid", "setresgid", "setfsuid", "setfsgid", "setgroups", "getrlimit",
    "setrlimit", "prlimit64", "getrusage", "getpriority", "setpriority", "times", "umask", "uname",
    "sysinfo", "getcpu", "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self",
    // scheduling
    "sched_yield", "sched_getaffinity", "sched_setaffinity", "sched_getattr", "sched_setattr",
    "sched_getparam", "sched_setparam", "sched_getscheduler", "sched_setscheduler",
    "sched_get_priority_max", "sched_get_priority_min", "sched_rr_get_interval", "ioprio_get",
    "ioprio_set",
    // memory
    "mmap", "munmap", "mprotect", "mremap", "madvise", "mincore", "msync", "mlock", "mlock2", "mlockall",
    "munlock", "munlockall", "memfd_create", "pkey_alloc", "pkey_free", "pkey_mprotect", "remap_file_pages",
    // time
    "clock_gettime", "clock_getres", "clock_nanosleep", "gettimeofday", "nanosleep", "time", "alarm",
    "getitimer", "setitimer", "timer_create", "timer_delete", "timer_getoverrun", "timer_gettime",
    "timer_settime", "timerfd_create", "timerfd_gettime", "timerfd_settime",
    // files
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "preadv2", "pwritev", "pwritev2",
    "lseek", "open", "openat", "openat2", "creat", "close", "close_range", "dup", "dup2", "dup3", "fcntl",
    "ioctl", "flock", "fsync", "fdatasync", "syncfs", "sync", "sync_file_range", "fallocate", "fadvise64",
    "readahead", "truncate", "ftruncate", "stat", "fstat", "lstat", "newfstatat", "statx", "statfs",
    "fstatfs", "access", "faccessat", "faccessat2", "chdir", "fchdir", "getcwd", "getdents", "getdents64",
    "mkdir", "mkdirat", "rmdir", "mknod", "mknodat", "link", "linkat", "symlink", "symlinkat", "unlink",
    "unlinkat", "rename", "renameat", "renameat2", "readlink", "readlinkat", "chmod", "fchmod",
    "fchmodat", "chown", "fchown", "lchown", "fchownat", "utime", "utimes", "utimensat", "futimesat",
    "getxattr", "lgetxattr", "fgetxattr", "setxattr", "lsetxattr", "fsetxattr", "listxattr", "llistxattr",
    "flistxattr", "removexattr", "lremovexattr", "fremovexattr", "copy_file_range", "sendfile", "splice",
    "tee", "vmsplice", "pipe", "pipe2", "inotify_init", "inotify_init1", "inotify_add_watch",
    "inotify_rm_watch",
    // waiting for events
    "select", "pselect6", "poll", "ppoll", "epoll_create", "epoll_create1", "epoll_ctl", "epoll_wait",
    "epoll_pwait", "epoll_pwait2", "eventfd", "eventfd2",
    // asynchronous I/O (not io_uring: its own attack surface, and it bypasses this filter)
    "io_setup", "io_destroy", "io_submit", "io_cancel", "io_getevents", "io_pgetevents",
    // System V and POSIX IPC (the sandbox has its own IPC namespace)
    "shmget", "shmat", "shmdt", "shmctl", "semget", "semop", "semtimedop", "semctl", "msgget", "msgsnd",
    "msgrcv", "msgctl", "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify",
    "mq_getsetattr",
    // sockets (socket itself is refined by address family)
    "socket", "socketpair", "bind", "listen", "accept", "accept4", "connect", "getsockname", "getpeername",
    "getsockopt", "setsockopt", "sendto", "recvfrom", "sendmsg", "recvmsg", "sendmmsg", "recvmmsg",
    "shutdown",
    // random numbers
    "getrandom",
};

/// System calls refused with EPERM ("not permitted") rather than ENOSYS, so that a program that
/// tries them says why: they touch host-wide state or widen the kernel's attack surface.
static const char *const csb_denied[] = {
    "mount", "umount", "umount2", "pivot_root", "unshare", "setns",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "keyctl", "add_key", "request_key",
    "bpf", "perf_event_open", "userfaultfd", "fanotify_init",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "reboot",
    "init_module", "finit_module", "delete_module", "create_module", "query_module", "get_kernel_syms",
    "open_by_handle_at", "name_to_handle_at",
    "swapon", "swapoff", "acct", "syslog", "quotactl", "quotactl_fd", "lookup_dcookie", "nfsservctl",
    "iopl", "ioperm", "uselib", "_sysctl", "sysfs", "ustat", "vhangup", "modify_ldt", "memfd_secret",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "stime",
    "sethostname", "setdomainname", "kcmp", "pidfd_getfd",
};

static const uint64_t csb_namespace_flags[] = {
    CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWCGROUP,
#ifdef CLONE_NEWTIME
    CLONE_NEWTIME,
#endif
};

/// personality(2) values programs use (the usual container set): Linux, 32-bit Linux, the
/// UNAME26 flag with either, and the query 0xffffffff.
static const uint64_t csb_personalities[] = {0x0, 0x8, 0x20000, 0x20008, 0xffffffff};

/// The address families a sandbox may open: UNIX, INET, INET6, NETLINK. Every other one (AF_VSOCK
/// reaches the host VM's vsock even from an empty network namespace) fails with EAFNOSUPPORT.
static const uint64_t csb_families[] = {AF_UNIX, AF_INET, AF_INET6, AF_NETLINK};

static int csb_add(scmp_filter_ctx ctx, uint32_t action, const char *name, unsigned count,
                   const struct scmp_arg_cmp *args) {
    int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR) return 0;  // unknown to this libseccomp or this arch: denied
    return seccomp_rule_add_array(ctx, action, nr, count, args);
}

/// The allowlist: default ENOSYS, the calls above allowed (personality for its known values
/// only), the dangerous ones EPERM, clone3 ENOSYS (its flags are out of a filter's reach, so
/// libc falls back to clone, whose flags the second program checks).
static scmp_filter_ctx csb_allowlist(int *rc) {
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ERRNO(ENOSYS));
    if (!ctx) {
        *rc = -ENOMEM;
        return NULL;
    }
    for (size_t i = 0; i < sizeof csb_allowed / sizeof csb_allowed[0] && *rc == 0; i++) {
        if (strcmp(csb_allowed[i], "personality") == 0) continue;
        *rc = csb_add(ctx, SCMP_ACT_ALLOW, csb_allowed[i], 0, NULL);
    }
    for (size_t i = 0; i < sizeof csb_personalities / sizeof csb_personalities[0] && *rc == 0; i++) {
        struct scmp_arg_cmp c = csb_arg_masked_eq(0, 0xffffffffu, csb_personalities[i]);
        *rc = csb_add(ctx, SCMP_ACT_ALLOW, "personality", 1, &c);
    }
    for (size_t i = 0; i < sizeof csb_denied / sizeof csb_denied[0] && *rc == 0; i++) {
        *rc = csb_add(ctx, SCMP_ACT_ERRNO(EPERM), csb_denied[i], 0, NULL);
    }
    return ctx;
}

/// The refinements, default allow: clone creating a namespace EPERM; the terminal ioctls that
/// inject input (TIOCSTI, TIOCLINUX) EPERM; socket for any family but the four EAFNOSUPPORT.
static scmp_filter_ctx csb_refinements(int *rc) {
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
    if (!ctx) {
        *rc = -ENOMEM;
        return NULL;
    }
    for (size_t i = 0; i < sizeof csb_namespace_flags / sizeof csb_namespace_flags[0] && *rc == 0; i++) {
        struct scmp_arg_cmp c = csb_arg_masked_eq(0, csb_namespace_flags[i], csb_namespace_flags[i]);
        *rc = csb_add(ctx, SCMP_ACT_ERRNO(EPERM), "clone", 1, &c);
    }
    const uint64_t requests[] = {TIOCSTI, TIOCLINUX};
    for (size_t i = 0; i < 2 && *rc == 0; i++) {
        struct scmp_arg_cmp c = csb_arg_masked_eq(1, 0xffffffffu, requests[i]);
        *rc = csb_add(ctx, SCMP_ACT_ERRNO(EPERM), "ioctl", 1, &c);
    }
    // Families are ints, but the filter sees the whole register: anything above the largest
    // allowed value (upper bits included) is refused, and below it each value not allowed.
    for (uint64_t family = 0; family <= AF_NETLINK && *rc == 0; family++) {
        int allowed = 0;
        for (size_t i = 0; i < sizeof csb_families / sizeof csb_families[0]; i++) allowed |= csb_families[i] == family;
        if (allowed) continue;
        struct scmp_arg_cmp c = csb_arg(0, SCMP_CMP_EQ, family);
        *rc = csb_add(ctx, SCMP_ACT_ERRNO(EAFNOSUPPORT), "socket", 1, &c);
    }
    if (*rc == 0) {
        struct scmp_arg_cmp c = csb_arg(0, SCMP_CMP_GT, AF_NETLINK);
        *rc = csb_add(ctx, SCMP_ACT_ERRNO(EAFNOSUPPORT), "socket", 1, &c);
    }
    return ctx;
}

/// Appends a filter's BPF to `buf` (growing it).
static int csb_export(scmp_filter_ctx ctx, char **buf, size_t *len) {
    // We set no_new_privs ourselves, right before installing the filters.
    int rc = seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0);
    int fd = -1;
    if (rc == 0) {
        fd = memfd_create("contree-seccomp", MFD_CLOEXEC);
        if (fd < 0) rc = -errno;
    }
    if (rc == 0) rc = seccomp_export_bpf(ctx, fd);
    if (rc == 0) {
        off_t size = lseek(fd, 0, SEEK_END);
        char *grown = size > 0 ? realloc(*buf, *len + (size_t)size) : NULL;
        if (!grown) {
            rc = -ENOMEM;
        } else {
            *buf = grown;
            if (pread(fd, grown + *len, (size_t)size, 0) != size) rc = -EIO;
            else *len += (size_t)size;
        }
    }
    if (fd >= 0) close(fd);
    return rc;
}

static pthread_once_t csb_once = PTHREAD_ONCE_INIT;
static void *csb_program;
static size_t csb_program_length;
static int csb_program_error;

/// The blob: a uint64 count of the first program's instructions, the allowlist, then the
/// refinements (see csb_seccomp_install).
static int csb_build(void **out, size_t *out_len) {
    int rc = 0;
    char *buf = calloc(1, sizeof(uint64_t));
    size_t len = sizeof(uint64_t);
    if (!buf) return -ENOMEM;
    scmp_filter_ctx allowlist = csb_allowlist(&rc);
    if (rc == 0) rc = csb_export(allowlist, &buf, &len);
    uint64_t first = (len - sizeof(uint64_t)) / 8;  // struct sock_filter is 8 bytes
    memcpy(buf, &first, sizeof first);
    scmp_filter_ctx refinements = rc == 0 ? csb_refinements(&rc) : NULL;
    if (rc == 0) rc = csb_export(refinements, &buf, &len);
    if (allowlist) seccomp_release(allowlist);
    if (refinements) seccomp_release(refinements);
    if (rc != 0) {
        free(buf);
        return rc < 0 ? rc : -rc;
    }
    *out = buf;
    *out_len = len;
    return 0;
}

static void csb_build_once(void) {
    csb_program_error = csb_build(&csb_program, &csb_program_length);
}

int csb_seccomp_program(const void **bytes, size_t *length) {
    pthread_once(&csb_once, csb_build_once);
    if (csb_program_error != 0) return csb_program_error;
    *bytes = csb_program;
    *length = csb_program_length;
    return 0;
}
