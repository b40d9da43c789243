// The C side of the container backend. Swift prepares a csb_launch and calls csb_launch_start,
// which serializes it (the wire format below), clones a child in new namespaces the way
// posix_spawn does (shared memory, parent suspended) and execs `contree-init` in it. That small
// static program is the sandbox's pid 1: it mounts the root, pivots, joins the user namespace
// and forks the command. Swift supervises through the pidfd and the report pipe.
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

/// A host directory or file mounted into the sandbox (a dependency cache, the generated
/// resolv.conf), idmapped like the store so that the sandbox's root owns what it writes as the
/// host's root. The mount point is created when the image lacks it.
typedef struct csb_bind {
    const char *source;  ///< absolute host path
    const char *target;  ///< absolute path inside the sandbox
    uint32_t flags;      ///< CSB_BIND_*
} csb_bind;

enum {
    CSB_BIND_READ_ONLY = 1,
    CSB_BIND_FILE = 2,  ///< the source is a file: the mount point is a file
};

/// Everything the sandbox needs. Pointers must stay valid until csb_launch_start returns.
typedef struct csb_launch {
    const char *init_path;        ///< the contree-init program
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
    int netns_fd;                 ///< > 0: join this network namespace instead of a new one
    const csb_bind *binds;
    size_t bind_count;
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
    int terminal;    ///< 1: stdin is a pty slave the command makes its controlling terminal
    uint64_t file_size_limit;  ///< RLIMIT_FSIZE of the command in bytes; 0 for none
    const int *cgroup_fds;  ///< cgroup v1 `tasks` files (open for writing) the child joins itself
    size_t cgroup_fd_count;
    int go_fd;       ///< read end: the child waits for one byte (cgroups are joined by then)
    int report_fd;   ///< write end: the child reports a setup failure or the final status
} csb_launch;

/// Asks the sandbox's pid 1 to kill everything, reap it and report (a real-time signal pid 1
/// waits for; the parent falls back to SIGKILL if pid 1 does not end).
#define CSB_SIGNAL_STOP 40

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
    int64_t stages[8];  ///< CLOCK_MONOTONIC ns: go, root mounted, proc/dev, pivoted, command forked,
                        ///< command exited, namespace emptied (for CONTREE_TRACE)
} csb_report;

/// Starts the sandbox's pid 1 (contree-init). On success returns 0 and sets *pidfd and *pid;
/// pid 1 prepares the root and then blocks until a byte arrives on go_fd. On failure returns
/// -errno.
int csb_launch_start(const csb_launch *launch, int *pidfd, pid_t *pid);

/// Starts contree-init in exec mode: after a byte on go_fd (the parent has moved it into the
/// sandbox's cgroup by then) it joins the namespaces of the running sandbox whose pid 1 is
/// `target_pidfd`, forks the command into them with the same credentials, capabilities and
/// seccomp filter as a sandbox's command, forwards signals to it, and reports its exit like
/// pid 1 does. `launch` needs argv, envp, cwd, uid, gid, stdio, userns_fd, go_fd, report_fd
/// and no files. Returns 0 or -errno.
int csb_exec_start(const csb_launch *launch, int target_pidfd, int *pidfd, pid_t *pid);

/// Creates a network namespace with `lo` up and returns an fd for it (O_CLOEXEC), or -errno.
/// Sandboxes join it with csb_launch.netns_fd; it lives while an fd or a member does.
int csb_netns_create(void);

/// Starts a helper that must not outlive this process (a NAT helper such as pasta):
/// contree-init in guard mode, as pid 1 of a new pid namespace with a parent-death signal (set
/// by a thread that lives as long as the process), forks and execs `argv` (argv[0] an absolute
/// path) with `fds` as 3, 4, ... and stdout and stderr on `output_fd`. When the guard dies, the
/// kernel kills everything in its namespace, whatever the helper did to its own credentials.
/// Returns 0 or -errno.
int csb_guard_start(const char *init_path, const char *const *argv, const int *fds, int fd_count, int output_fd,
                    int *pidfd, pid_t *pid);

/// Creates a user namespace mapping 0..count-1 to id_base..id_base+count-1 and returns an fd
/// for it (O_CLOEXEC), or -errno. The helper process that created it is gone on return.
int csb_userns_create(uint32_t id_base, uint32_t count);

/// The seccomp policy compiled to BPF (built once per process, then cached): a uint64 count of
/// the allowlist's instructions, the allowlist, then the argument refinements (seccomp.c).
/// Returns 0 and the bytes, or -errno.
int csb_seccomp_program(const void **bytes, size_t *length);

/// Send a signal through a pidfd. Returns 0 or -errno.
int csb_pidfd_kill(int pidfd, int sig);

/// A pidfd (close-on-exec) for `pid`, which need not be a child. Returns it or -errno.
int csb_pidfd_open(pid_t pid);

/// What a waited-for child used (its rusage).
struct csb_usage {
    int64_t user_us;
    int64_t system_us;
    int64_t max_rss_kb;
    int64_t in_blocks;   // 512-byte blocks read
    int64_t out_blocks;  // 512-byte blocks written
    int64_t faults;      // minor and major page faults
};

/// rusage-carrying wait for one child. Returns 0 or -errno.
int csb_wait(pid_t pid, int *status, struct csb_usage *usage);

// ---- the wire format between csb_launch_start and contree-init ----------------------------

/// File descriptors as contree-init receives them.
enum {
    CSB_FD_SPEC = 3,     ///< memfd holding a csb_wire and what follows it
    CSB_FD_GO = 4,
    CSB_FD_REPORT = 5,
    CSB_FD_STDIN = 6,
    CSB_FD_STDOUT = 7,
    CSB_FD_STDERR = 8,
    CSB_FD_USERNS = 9,
    CSB_FD_FILES = 10,   ///< the file copies' sources, in order
    CSB_FD_TARGET = 10,  ///< exec mode (no files): a pidfd of the target sandbox's pid 1
};

#define CSB_WIRE_MAGIC 0x32425343u  // "CSB2"

/// The fixed part of the spec. It is followed by file_count csb_wire_file records, bind_count
/// uint32 bind flags, then the seccomp program (filter_length bytes), then NUL-terminated
/// strings: store, upper, work, root, hostname, cwd, the lowers, argv, envp, the file paths,
/// then each bind's source and target.
typedef struct csb_wire {
    uint32_t magic;
    uint32_t length;          ///< of the whole spec
    uint32_t lower_count;
    uint32_t argc;
    uint32_t envc;
    uint32_t file_count;
    uint32_t id_base;
    uint32_t uid;
    uint32_t gid;
    int32_t loopback_up;
    uint32_t filter_length;
    uint32_t terminal;        ///< 1: stdio is a terminal the command takes as its controlling tty
    uint32_t bind_count;
    uint64_t file_size_limit; ///< RLIMIT_FSIZE of the command; 0 for none
} csb_wire;

typedef struct csb_wire_file {
    uint32_t mode;
    uint32_t uid;
    uint32_t gid;
    uint32_t reserved;
} csb_wire_file;

// GNU extensions that Swift's Glibc module does not expose.
int csb_pipe_cloexec(int fds[2]);
/// posix_spawn_file_actions_addchdir_np: the child starts in `path`. `actions` is a
/// posix_spawn_file_actions_t.
int csb_spawn_add_chdir(void *actions, const char *path);
int csb_eventfd_cloexec(void);
int csb_memfd_cloexec(const char *name);
int csb_open_path_dir(const char *path);
int csb_syncfs(int fd);
/// openat2 with RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS (and O_CLOEXEC | O_NOCTTY): `path`
/// must not leave `dirfd` by `..`, an absolute path or symlink, or a magic link. -1 with
/// errno (ENOSYS before Linux 5.6; EXDEV or ELOOP when the path would leave).
int csb_open_beneath(int dirfd, const char *path, int flags);
/// fstatfs's f_type, or -1.
long csb_fs_type(int fd);
ssize_t csb_copy_file_range(int in, int out, size_t length);
/// A new pseudo-terminal pair (both close-on-exec), sized like `like_fd` if it is a terminal.
int csb_openpty(int *primary, int *secondary, int like_fd);
/// Puts a terminal in raw mode, saving its settings in `saved` (sizeof(struct termios) bytes).
int csb_terminal_raw(int fd, void *saved, size_t saved_size);
int csb_terminal_restore(int fd, const void *saved);

#ifdef __cplusplus
}
#endif
#endif
