// The seccomp deny list, compiled once per process with libseccomp and exported as raw BPF so
// that the child only has to hand it to the kernel (libseccomp allocates; the child must not).
#define _GNU_SOURCE
#include "CSandbox.h"

#include <errno.h>
#include <linux/sched.h>
#include <pthread.h>
#include <seccomp.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

// Function-like macros of libseccomp wrapped as functions (STYLE: keep macros out of Swift).
static inline struct scmp_arg_cmp csb_arg_masked_eq(unsigned arg, uint64_t mask, uint64_t value) {
    struct scmp_arg_cmp c = {arg, SCMP_CMP_MASKED_EQ, mask, value};
    return c;
}

/// System calls that a sandbox never needs and that widen the kernel's attack surface or touch
/// host-wide state. Most already fail for lack of capabilities; the filter makes it certain.
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
    "iopl", "ioperm", "uselib", "_sysctl", "sysfs", "ustat", "vhangup",
    "settimeofday", "clock_settime", "clock_adjtime", "stime",
    "sethostname", "setdomainname",
};

static const uint64_t csb_namespace_flags[] = {
    CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWCGROUP,
#ifdef CLONE_NEWTIME
    CLONE_NEWTIME,
#endif
};

static pthread_once_t csb_once = PTHREAD_ONCE_INIT;
static void *csb_program;
static size_t csb_program_length;
static int csb_program_error;

static int csb_build(void **out, size_t *out_len) {
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
    if (!ctx) return -ENOMEM;
    int rc = 0;
    for (size_t i = 0; i < sizeof csb_denied / sizeof csb_denied[0] && rc == 0; i++) {
        int nr = seccomp_syscall_resolve_name(csb_denied[i]);
        if (nr == __NR_SCMP_ERROR) continue;  // unknown to this libseccomp or this arch
        rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), nr, 0);
    }
    // clone creating a namespace: one rule per flag ((flags & F) == F).
    for (size_t i = 0; i < sizeof csb_namespace_flags / sizeof csb_namespace_flags[0] && rc == 0; i++) {
        struct scmp_arg_cmp c = csb_arg_masked_eq(0, csb_namespace_flags[i], csb_namespace_flags[i]);
        rc = seccomp_rule_add_array(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(clone), 1, &c);
    }
    // clone3 passes its flags in memory, out of the filter's reach: make libc fall back to clone.
    if (rc == 0) {
        int nr = seccomp_syscall_resolve_name("clone3");
        if (nr != __NR_SCMP_ERROR) rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), nr, 0);
    }
    // Injecting input into a terminal the sandbox shares with its host.
    if (rc == 0) {
        struct scmp_arg_cmp c = csb_arg_masked_eq(1, 0xffffffffu, TIOCSTI);
        rc = seccomp_rule_add_array(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(ioctl), 1, &c);
    }
    if (rc == 0) {
        struct scmp_arg_cmp c = csb_arg_masked_eq(1, 0xffffffffu, TIOCLINUX);
        rc = seccomp_rule_add_array(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(ioctl), 1, &c);
    }
    // We set no_new_privs ourselves, right before installing the filter.
    if (rc == 0) rc = seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0);
    int fd = -1;
    if (rc == 0) {
        fd = memfd_create("contree-seccomp", MFD_CLOEXEC);
        if (fd < 0) rc = -errno;
    }
    if (rc == 0) rc = seccomp_export_bpf(ctx, fd);
    if (rc == 0) {
        off_t size = lseek(fd, 0, SEEK_END);
        void *buf = size > 0 ? malloc((size_t)size) : NULL;
        if (!buf) {
            rc = -ENOMEM;
        } else if (pread(fd, buf, (size_t)size, 0) != size) {
            rc = -EIO;
            free(buf);
        } else {
            *out = buf;
            *out_len = (size_t)size;
        }
    }
    if (fd >= 0) close(fd);
    seccomp_release(ctx);
    return rc < 0 ? rc : (rc > 0 ? -rc : 0);
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
