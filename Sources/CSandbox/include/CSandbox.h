// The C side of the container backend: the code that runs between fork and exec, plus the
// seccomp policy. Swift prepares a csb_launch, calls csb_launch_start, and supervises the child
// through the pidfd and the report pipe. Nothing here allocates after the clone.
#ifndef CONTREE_CSANDBOX_H
#define CONTREE_CSANDBOX_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/xattr.h>

#ifdef __cplusplus
extern "C" {
#endif

/// A host file copied into the sandbox before the command starts.
typedef struct csb_file_copy {
    int source_fd;     ///< open host file, read from offset 0
    const char *path;  ///< absolute path inside the sandbox
    uint32_t mode;     ///< permission bits
    uint32_t uid;      ///< owner inside the sandbox
    uint32_t gid;
} csb_file_copy;

/// Everything the child needs. Pointers must stay valid until csb_launch_start returns (the
/// child gets a copy-on-write image of them).
typedef struct csb_launch {
    const char *store;            ///< absolute path of the store root, cloned as an idmapped mount
    const char *const *lowers;    ///< layer paths relative to the store root, top-most first
    size_t lower_count;
    const char *upper;            ///< upper dir, relative to the store root
    const char *work;             ///< overlay work dir, relative to the store root
    const char *root;             ///< absolute host path of an empty dir the root is mounted on
    int userns_fd;                ///< user namespace the command joins (0 -> id_base)
    uint32_t id_base;             ///< host uid/gid that the sandbox's root maps to
    const char *hostname;
    int loopback_up;              ///< 1: bring lo up; 0: no interface up at all
    const char *const *argv;      ///< NULL-terminated; argv[0] is looked up in PATH from envp
    const char *const *envp;      ///< NULL-terminated
    const char *cwd;
    uint32_t uid;                 ///< user inside the sandbox
    uint32_t gid;
    int stdin_fd;
    int stdout_fd;
    int stderr_fd;
    const csb_file_copy *files;
    size_t file_count;
    int go_fd;       ///< read end: the child waits for one byte (cgroups are joined by then)
    int report_fd;   ///< write end: the child reports a setup failure or the final status
} csb_launch;

enum {
    CSB_REPORT_SETUP_FAILED = 1,
    CSB_REPORT_EXITED = 2,
};

/// What the child writes to report_fd. A setup failure may be followed by an exit report.
typedef struct csb_report {
    int32_t kind;
    int32_t err;        ///< errno of the failed call
    int32_t status;     ///< wait status of the command (CSB_REPORT_EXITED)
    int32_t reserved;
    int64_t tasks;      ///< tasks created in the sandbox's pid namespace, pid 1 excluded
    char detail[384];   ///< the failed call and its object, e.g. "mount(proc) on /proc"
} csb_report;

/// Clones the sandbox's pid 1. On success returns 0 and sets *pidfd and *pid; the child blocks
/// until a byte arrives on go_fd. On failure returns -errno.
int csb_launch_start(const csb_launch *launch, int *pidfd, pid_t *pid);

/// Creates a user namespace mapping 0..count-1 to id_base..id_base+count-1 and returns an fd
/// for it (O_CLOEXEC), or -errno. The helper process that created it is gone on return.
int csb_userns_create(uint32_t id_base, uint32_t count);

/// The seccomp deny list compiled to a BPF program (built once per process, then cached).
/// Returns 0 and the program's bytes, or -errno.
int csb_seccomp_program(const void **bytes, size_t *length);

/// Send a signal through a pidfd. Returns 0 or -errno.
int csb_pidfd_kill(int pidfd, int sig);

/// rusage-carrying wait for one child. Returns 0 or -errno.
int csb_wait(pid_t pid, int *status, int64_t usage[6]);

// GNU extensions that Swift's Glibc module does not expose.
int csb_pipe_cloexec(int fds[2]);
int csb_eventfd_cloexec(void);
int csb_open_path_dir(const char *path);
int csb_syncfs(int fd);
ssize_t csb_copy_file_range(int in, int out, size_t length);

#ifdef __cplusplus
}
#endif
#endif
