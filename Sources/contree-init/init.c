// contree-init: pid 1 of every container sandbox.
//
// Started by csb_launch_start in fresh mount, pid, net, uts and ipc namespaces, with the spec on
// fd 3 (see CSandbox.h for the wire format). It mounts the root (overlayfs over an idmapped
// clone of the store), /proc with sensitive entries masked and a minimal /dev, pivots into it,
// waits for the go byte (the parent moves it into its cgroups meanwhile), joins the sandbox's
// user namespace, copies files in and forks the command, which drops capabilities, sets
// no_new_privs, installs the seccomp filter and execs. Pid 1 then reaps, forwards signals,
// and when the command ends kills what is left and reports.
//
// A small static C program rather than a fork of the host process: starting it costs an exec
// instead of copying the page tables of a large Swift process (twice: pid 1 and the command),
// and nothing of the host process lives on inside the sandbox.
#define _GNU_SOURCE
#include "../CSandbox/include/CSandbox.h"
#include "../CSandbox/csb_text.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/mount.h>
#include <linux/openat2.h>
#include <linux/seccomp.h>
#include <net/if.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

/// Reports a failed setup step ("call(object)") to the parent and ends the child.
__attribute__((noreturn)) static void csb_fail(int report_fd, const char *call, const char *object,
                                               int err, const char *extra) {
    csb_report r;
    memset(&r, 0, sizeof r);
    r.kind = CSB_REPORT_SETUP_FAILED;
    r.err = err;
    size_t len = 0;
    csb_append(r.detail, sizeof r.detail, &len, call);
    if (object && object[0]) {
        csb_append(r.detail, sizeof r.detail, &len, " ");
        csb_append(r.detail, sizeof r.detail, &len, object);
    }
    if (extra && extra[0]) {
        csb_append(r.detail, sizeof r.detail, &len, ": ");
        csb_append(r.detail, sizeof r.detail, &len, extra);
    }
    csb_write_all(report_fd, &r, sizeof r);
    _exit(125);
}

static int sys_open_tree(int dfd, const char *path, unsigned flags) {
    return (int)syscall(SYS_open_tree, dfd, path, flags);
}
static int sys_mount_setattr(int dfd, const char *path, unsigned flags, struct mount_attr *attr) {
    return (int)syscall(SYS_mount_setattr, dfd, path, flags, attr, sizeof *attr);
}
static int sys_fsopen(const char *fs, unsigned flags) { return (int)syscall(SYS_fsopen, fs, flags); }
static int sys_fsconfig(int fd, unsigned cmd, const char *key, const void *value, int aux) {
    return (int)syscall(SYS_fsconfig, fd, cmd, key, value, aux);
}
static int sys_fsmount(int fd, unsigned flags, unsigned attrs) {
    return (int)syscall(SYS_fsmount, fd, flags, attrs);
}
static int sys_move_mount(int from_dfd, const char *from, int to_dfd, const char *to, unsigned flags) {
    return (int)syscall(SYS_move_mount, from_dfd, from, to_dfd, to, flags);
}
static int sys_pivot_root(const char *new_root, const char *put_old) {
    return (int)syscall(SYS_pivot_root, new_root, put_old);
}

/// Raises the effective capability set to the permitted one (setfsuid drops the file caps).
static int csb_raise_effective(void) {
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    if (syscall(SYS_capget, &hdr, data) != 0) return -1;
    data[0].effective = data[0].permitted;
    data[1].effective = data[1].permitted;
    return (int)syscall(SYS_capset, &hdr, data);
}

/// Overlay writes its kernel-side complaints to the fs context fd; fetch one line for the report.
static void csb_fs_log(int fs, char *buf, size_t cap) {
    buf[0] = 0;
    ssize_t n = read(fs, buf, cap - 1);
    if (n > 0) {
        if (buf[n - 1] == '\n') n--;
        buf[n] = 0;
    } else {
        buf[0] = 0;
    }
}

/// Stage timestamps of this sandbox (pid 1's copy; reported at the end).
static int64_t csb_stages[8];

static void csb_stage(int i) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    csb_stages[i] = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

// ---- the root filesystem -----------------------------------------------------------------

static void csb_mount_overlay(const csb_launch *l, const char *lowers_joined) {
    char log[200];
    // By path: an fd opened before the clone would name a mount of the parent's namespace.
    int tree = sys_open_tree(AT_FDCWD, l->store, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
    if (tree < 0) csb_fail(l->report_fd, "open_tree(store, OPEN_TREE_CLONE)", "", errno, NULL);
    struct mount_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.attr_set = MOUNT_ATTR_IDMAP;
    attr.userns_fd = (unsigned long long)l->userns_fd;
    if (sys_mount_setattr(tree, "", AT_EMPTY_PATH, &attr) != 0)
        csb_fail(l->report_fd, "mount_setattr(store, MOUNT_ATTR_IDMAP)", "", errno, NULL);
    // Layer paths are relative to the idmapped tree, so they stay short (see ARCHITECTURE.md on
    // the mount option size limit).
    if (fchdir(tree) != 0) csb_fail(l->report_fd, "fchdir(idmapped store)", "", errno, NULL);

    int fs = sys_fsopen("overlay", FSOPEN_CLOEXEC);
    if (fs < 0) csb_fail(l->report_fd, "fsopen(overlay)", "", errno, NULL);

    // The overlay's creator credentials are used for the work dir and copy-ups through the
    // idmapped layers; host uid 0 has no mapping there, the sandbox's root does.
    setfsgid(l->id_base);
    setfsuid(l->id_base);
    if (csb_raise_effective() != 0) csb_fail(l->report_fd, "capset(raise effective)", "", errno, NULL);

    int legacy = 0;
    for (size_t i = 0; i < l->lower_count; i++) {
        if (sys_fsconfig(fs, FSCONFIG_SET_STRING, "lowerdir+", l->lowers[i], 0) != 0) {
            if (i == 0 && errno == EINVAL) {
                legacy = 1;  // kernels before 6.8 take one colon-separated list
                break;
            }
            csb_fs_log(fs, log, sizeof log);
            csb_fail(l->report_fd, "fsconfig(overlay, lowerdir+)", l->lowers[i], errno, log);
        }
    }
    if (legacy && sys_fsconfig(fs, FSCONFIG_SET_STRING, "lowerdir", lowers_joined, 0) != 0) {
        csb_fs_log(fs, log, sizeof log);
        csb_fail(l->report_fd, "fsconfig(overlay, lowerdir)", "", errno, log);
    }
    if (sys_fsconfig(fs, FSCONFIG_SET_STRING, "upperdir", l->upper, 0) != 0) {
        csb_fs_log(fs, log, sizeof log);
        csb_fail(l->report_fd, "fsconfig(overlay, upperdir)", l->upper, errno, log);
    }
    if (sys_fsconfig(fs, FSCONFIG_SET_STRING, "workdir", l->work, 0) != 0) {
        csb_fs_log(fs, log, sizeof log);
        csb_fail(l->report_fd, "fsconfig(overlay, workdir)", l->work, errno, log);
    }
    // Layers must be self-contained: no redirects or metacopy files pointing into lower layers.
    static const char *const options[][2] = {{"redirect_dir", "nofollow"}, {"metacopy", "off"}, {"index", "off"}};
    for (size_t i = 0; i < sizeof options / sizeof options[0]; i++) {
        if (sys_fsconfig(fs, FSCONFIG_SET_STRING, options[i][0], options[i][1], 0) != 0) {
            csb_fs_log(fs, log, sizeof log);
            csb_fail(l->report_fd, "fsconfig(overlay)", options[i][0], errno, log);
        }
    }
    // The upper is synced by the commit itself; skipping overlay's own syncs makes copy-up cheap.
    sys_fsconfig(fs, FSCONFIG_SET_FLAG, "volatile", NULL, 0);
    if (sys_fsconfig(fs, FSCONFIG_CMD_CREATE, NULL, NULL, 0) != 0) {
        csb_fs_log(fs, log, sizeof log);
        csb_fail(l->report_fd, "fsconfig(overlay, create)", "", errno, log);
    }
    setfsuid(0);
    setfsgid(0);
    csb_raise_effective();

    int mnt = sys_fsmount(fs, FSMOUNT_CLOEXEC, MOUNT_ATTR_NODEV);
    if (mnt < 0) csb_fail(l->report_fd, "fsmount(overlay)", "", errno, NULL);
    if (sys_move_mount(mnt, "", AT_FDCWD, l->root, MOVE_MOUNT_F_EMPTY_PATH) != 0)
        csb_fail(l->report_fd, "move_mount(overlay) on", l->root, errno, NULL);
    close(mnt);
    close(fs);
    close(tree);
}

struct csb_node {
    const char *name;
    unsigned major, minor;
};

static void csb_require_directory(const csb_launch *l, const char *path) {
    struct stat st;
    if (lstat(path, &st) != 0) csb_fail(l->report_fd, "lstat(mount point)", path, errno, NULL);
    if (!S_ISDIR(st.st_mode)) csb_fail(l->report_fd, "mount point is not a directory:", path, ENOTDIR, NULL);
}

static void csb_mount_dev(const csb_launch *l) {
    if (mount("tmpfs", "dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=1m,nr_inodes=512") != 0)
        csb_fail(l->report_fd, "mount(tmpfs) on", "/dev", errno, NULL);
    static const struct csb_node nodes[] = {
        {"dev/null", 1, 3}, {"dev/zero", 1, 5},    {"dev/full", 1, 7},
        {"dev/random", 1, 8}, {"dev/urandom", 1, 9}, {"dev/tty", 5, 0},
    };
    for (size_t i = 0; i < sizeof nodes / sizeof nodes[0]; i++) {
        if (mknod(nodes[i].name, S_IFCHR | 0666, makedev(nodes[i].major, nodes[i].minor)) != 0)
            csb_fail(l->report_fd, "mknod", nodes[i].name, errno, NULL);
    }
    static const char *const links[][2] = {
        {"/proc/self/fd", "dev/fd"},
        {"/proc/self/fd/0", "dev/stdin"},
        {"/proc/self/fd/1", "dev/stdout"},
        {"/proc/self/fd/2", "dev/stderr"},
        {"pts/ptmx", "dev/ptmx"},
    };
    for (size_t i = 0; i < sizeof links / sizeof links[0]; i++) {
        if (symlink(links[i][0], links[i][1]) != 0) csb_fail(l->report_fd, "symlink", links[i][1], errno, NULL);
    }
    if (mkdir("dev/pts", 0755) != 0 || mkdir("dev/shm", 01777) != 0)
        csb_fail(l->report_fd, "mkdir", "/dev/pts or /dev/shm", errno, NULL);
    if (mount("devpts", "dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620") != 0)
        csb_fail(l->report_fd, "mount(devpts) on", "/dev/pts", errno, NULL);
    if (mount("shm", "dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=64m") != 0)
        csb_fail(l->report_fd, "mount(tmpfs) on", "/dev/shm", errno, NULL);
}

/// Hides /proc entries that leak host state or accept writes, as container runtimes do.
static void csb_mask_proc(const csb_launch *l) {
    static const char *const hidden_files[] = {
        "proc/kcore", "proc/keys", "proc/timer_list", "proc/sched_debug", "proc/latency_stats",
        "proc/kallsyms", "proc/config.gz", "proc/kpagecount", "proc/kpageflags", "proc/kpagecgroup",
    };
    static const char *const hidden_dirs[] = {"proc/acpi", "proc/scsi", "proc/driver"};
    static const char *const read_only[] = {
        "proc/sys", "proc/sysrq-trigger", "proc/irq", "proc/bus", "proc/fs", "proc/asound",
    };
    struct stat st;
    for (size_t i = 0; i < sizeof hidden_files / sizeof hidden_files[0]; i++) {
        if (lstat(hidden_files[i], &st) != 0) {
            if (errno == ENOENT) continue;
            csb_fail(l->report_fd, "lstat", hidden_files[i], errno, NULL);
        }
        if (mount("dev/null", hidden_files[i], NULL, MS_BIND, NULL) != 0)
            csb_fail(l->report_fd, "mount(bind /dev/null) on", hidden_files[i], errno, NULL);
    }
    for (size_t i = 0; i < sizeof hidden_dirs / sizeof hidden_dirs[0]; i++) {
        if (lstat(hidden_dirs[i], &st) != 0) {
            if (errno == ENOENT) continue;
            csb_fail(l->report_fd, "lstat", hidden_dirs[i], errno, NULL);
        }
        if (mount("tmpfs", hidden_dirs[i], "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=0") != 0)
            csb_fail(l->report_fd, "mount(tmpfs, ro) on", hidden_dirs[i], errno, NULL);
    }
    for (size_t i = 0; i < sizeof read_only / sizeof read_only[0]; i++) {
        if (lstat(read_only[i], &st) != 0) {
            if (errno == ENOENT) continue;
            csb_fail(l->report_fd, "lstat", read_only[i], errno, NULL);
        }
        if (mount(read_only[i], read_only[i], NULL, MS_BIND | MS_REC, NULL) != 0 ||
            mount(NULL, read_only[i], NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                  NULL) != 0)
            csb_fail(l->report_fd, "mount(bind, ro) on", read_only[i], errno, NULL);
    }
}

static void csb_loopback_up(const csb_launch *l) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) csb_fail(l->report_fd, "socket(AF_INET)", "", errno, NULL);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    memcpy(ifr.ifr_name, "lo", 3);
    if (ioctl(s, SIOCGIFFLAGS, &ifr) != 0) csb_fail(l->report_fd, "ioctl(SIOCGIFFLAGS)", "lo", errno, NULL);
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) != 0) csb_fail(l->report_fd, "ioctl(SIOCSIFFLAGS)", "lo", errno, NULL);
    close(s);
}

// ---- bind mounts (caches, resolv.conf) ---------------------------------------------------

/// Clones each bind's source while the host's tree is still visible, idmapped like the store
/// (what the sandbox's root writes is the host root's) and read-only where asked. The detached
/// trees are attached after the pivot, where the targets resolve inside the sandbox's root.
static int *csb_open_binds(const csb_launch *l) {
    int *trees = calloc(l->bind_count + 1, sizeof(int));
    if (!trees) csb_fail(l->report_fd, "calloc(binds)", "", ENOMEM, NULL);
    for (size_t i = 0; i < l->bind_count; i++) {
        const csb_bind *b = &l->binds[i];
        trees[i] = sys_open_tree(AT_FDCWD, b->source, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
        if (trees[i] < 0) csb_fail(l->report_fd, "open_tree(bind source)", b->source, errno, NULL);
        struct mount_attr attr;
        memset(&attr, 0, sizeof attr);
        attr.attr_set = MOUNT_ATTR_IDMAP | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOSUID;
        if (b->flags & CSB_BIND_READ_ONLY) attr.attr_set |= MOUNT_ATTR_RDONLY;
        attr.userns_fd = (unsigned long long)l->userns_fd;
        if (sys_mount_setattr(trees[i], "", AT_EMPTY_PATH, &attr) != 0)
            csb_fail(l->report_fd, "mount_setattr(bind, MOUNT_ATTR_IDMAP)", b->source, errno, NULL);
    }
    return trees;
}

static int csb_make_parents(char *path, int include_last);

/// openat2 inside the (pivoted) root: symlinks resolve within it, magic links not at all.
static int csb_open_in_root(const char *path, int flags, mode_t mode) {
    struct open_how how;
    memset(&how, 0, sizeof how);
    how.flags = (uint64_t)(flags | O_CLOEXEC);
    how.mode = mode;
    how.resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS;
    return (int)syscall(SYS_openat2, AT_FDCWD, path, &how, sizeof how);
}

/// Attaches the trees csb_open_binds cloned at their targets (after the pivot), creating a
/// missing mount point as the sandbox's root would (it stays in the run's change, empty).
static void csb_attach_binds(const csb_launch *l, const int *trees) {
    for (size_t i = 0; i < l->bind_count; i++) {
        const csb_bind *b = &l->binds[i];
        int is_file = (b->flags & CSB_BIND_FILE) != 0;
        int point = csb_open_in_root(b->target, O_PATH, 0);
        if (point < 0 && errno == ENOENT) {
            char target[4096];
            size_t len = 0;
            csb_append(target, sizeof target, &len, b->target);
            setfsgid(l->id_base);
            setfsuid(l->id_base);
            csb_raise_effective();
            if (csb_make_parents(target, !is_file) == 0)
                point = is_file ? csb_open_in_root(b->target, O_WRONLY | O_CREAT, 0644)
                                : csb_open_in_root(b->target, O_PATH | O_DIRECTORY, 0);
            int saved = errno;
            setfsuid(0);
            setfsgid(0);
            csb_raise_effective();
            errno = saved;
        }
        if (point < 0) csb_fail(l->report_fd, "open(mount point)", b->target, errno, NULL);
        struct stat st;
        if (fstat(point, &st) != 0 || (is_file ? !S_ISREG(st.st_mode) : !S_ISDIR(st.st_mode)))
            csb_fail(l->report_fd, is_file ? "mount point is not a file:" : "mount point is not a directory:",
                     b->target, is_file ? EISDIR : ENOTDIR, NULL);
        if (sys_move_mount(trees[i], "", point, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH) != 0)
            csb_fail(l->report_fd, "move_mount(bind) on", b->target, errno, NULL);
        close(point);
        close(trees[i]);
    }
}

// ---- inside the sandbox ------------------------------------------------------------------

/// Marks every descriptor from `first` up close-on-exec (close_range, or a loop where a
/// seccomp profile above us refuses it).
static void csb_cloexec_from(const csb_launch *l, int first) {
    if (syscall(SYS_close_range, (unsigned)first, ~0U, CLOSE_RANGE_CLOEXEC) == 0) return;
    struct rlimit limit;
    int top = getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < 65536 ? (int)limit.rlim_cur : 65536;
    for (int fd = first; fd < top; fd++) {
        int flags = fcntl(fd, F_GETFD);
        if (flags >= 0 && fcntl(fd, F_SETFD, flags | FD_CLOEXEC) != 0)
            csb_fail(l->report_fd, "fcntl(FD_CLOEXEC)", "", errno, NULL);
    }
}

/// Closes every descriptor from `first` up.
static void csb_close_from(int first) {
    if (syscall(SYS_close_range, (unsigned)first, ~0U, 0) == 0) return;
    struct rlimit limit;
    int top = getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < 65536 ? (int)limit.rlim_cur : 65536;
    for (int fd = first; fd < top; fd++) close(fd);
}

/// mkdir -p of every parent of path (an absolute path inside the sandbox).
static int csb_make_parents(char *path, int include_last) {
    size_t n = csb_strlen(path);
    for (size_t i = 1; i <= n; i++) {
        if (path[i] == '/' || (include_last && path[i] == 0)) {
            char saved = path[i];
            path[i] = 0;
            if (mkdir(path, 0755) != 0 && errno != EEXIST) {
                path[i] = saved;
                return -1;
            }
            path[i] = saved;
        }
    }
    return 0;
}

static void csb_copy_files(const csb_launch *l) {
    char path[4096];
    char buf[16384];
    for (size_t i = 0; i < l->file_count; i++) {
        const csb_file_copy *f = &l->files[i];
        size_t len = 0;
        csb_append(path, sizeof path, &len, f->path);
        if (csb_make_parents(path, 0) != 0) csb_fail(l->report_fd, "mkdir(parents of)", f->path, errno, NULL);
        // O_NONBLOCK: a FIFO planted at the path must not block pid 1; only files are written.
        int out = open(f->path, O_WRONLY | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0600);
        if (out < 0) csb_fail(l->report_fd, "open(file mapping)", f->path, errno, NULL);
        struct stat st;
        if (fstat(out, &st) != 0 || !S_ISREG(st.st_mode))
            csb_fail(l->report_fd, "file mapping target is not a regular file:", f->path, EEXIST, NULL);
        if (fcntl(out, F_SETFL, 0) != 0 || ftruncate(out, 0) != 0)
            csb_fail(l->report_fd, "ftruncate(file mapping)", f->path, errno, NULL);
        if (lseek(f->source_fd, 0, SEEK_SET) < 0) csb_fail(l->report_fd, "lseek(host file for)", f->path, errno, NULL);
        for (;;) {
            ssize_t n = read(f->source_fd, buf, sizeof buf);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) csb_fail(l->report_fd, "read(host file for)", f->path, errno, NULL);
            if (n == 0) break;
            if (csb_write_all(out, buf, (size_t)n) < 0) csb_fail(l->report_fd, "write", f->path, errno, NULL);
        }
        if (fchown(out, f->uid, f->gid) != 0) csb_fail(l->report_fd, "fchown", f->path, errno, NULL);
        if (fchmod(out, f->mode & 07777) != 0) csb_fail(l->report_fd, "fchmod", f->path, errno, NULL);
        close(out);
    }
}

/// The capabilities the sandbox's root keeps (the usual container default set).
static const int csb_kept_caps[] = {
    CAP_CHOWN,  CAP_DAC_OVERRIDE, CAP_FSETID,   CAP_FOWNER,           CAP_MKNOD,
    CAP_NET_RAW, CAP_SETGID,      CAP_SETUID,   CAP_SETFCAP,          CAP_SETPCAP,
    CAP_NET_BIND_SERVICE, CAP_SYS_CHROOT, CAP_KILL, CAP_AUDIT_WRITE,
};

static void csb_drop_caps(const csb_launch *l) {
    uint32_t keep[2] = {0, 0};
    for (size_t i = 0; i < sizeof csb_kept_caps / sizeof csb_kept_caps[0]; i++) {
        int c = csb_kept_caps[i];
        keep[c / 32] |= 1u << (c % 32);
    }
    for (int c = 0; c <= 63; c++) {
        if (keep[c / 32] & (1u << (c % 32))) continue;
        if (prctl(PR_CAPBSET_DROP, c, 0, 0, 0) != 0 && errno != EINVAL)
            csb_fail(l->report_fd, "prctl(PR_CAPBSET_DROP)", "", errno, NULL);
    }
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    for (int i = 0; i < 2; i++) {
        data[i].effective = keep[i];
        data[i].permitted = keep[i];
        data[i].inheritable = 0;
    }
    if (syscall(SYS_capset, &hdr, data) != 0) csb_fail(l->report_fd, "capset", "", errno, NULL);
}

static void csb_reset_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    for (int s = 1; s < 65; s++) {
        if (s == SIGKILL || s == SIGSTOP) continue;
        sigaction(s, &sa, NULL);
    }
}

static const char *csb_env_lookup(const char *const *envp, const char *name) {
    size_t n = csb_strlen(name);
    for (size_t i = 0; envp && envp[i]; i++) {
        if (strncmp(envp[i], name, n) == 0 && envp[i][n] == '=') return envp[i] + n + 1;
    }
    return NULL;
}

static void csb_say(const char *a, const char *b, const char *c) {
    char msg[600];
    size_t len = 0;
    csb_append(msg, sizeof msg, &len, "contree: ");
    csb_append(msg, sizeof msg, &len, a);
    csb_append(msg, sizeof msg, &len, b);
    csb_append(msg, sizeof msg, &len, c);
    csb_append(msg, sizeof msg, &len, "\n");
    csb_write_all(2, msg, len);
}

/// execvpe with the PATH of the sandbox's environment, not the host's.
__attribute__((noreturn)) static void csb_exec(const csb_launch *l) {
    const char *file = l->argv[0];
    char *const *argv = (char *const *)l->argv;
    char *const *envp = (char *const *)l->envp;
    int err = ENOENT;
    if (strchr(file, '/')) {
        execve(file, argv, envp);
        err = errno;
    } else {
        const char *path = csb_env_lookup(l->envp, "PATH");
        if (!path) path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
        int saw_eacces = 0;
        char candidate[4096];
        const char *p = path;
        while (*p || p == path) {
            const char *end = strchr(p, ':');
            size_t dlen = end ? (size_t)(end - p) : csb_strlen(p);
            size_t len = 0;
            candidate[0] = 0;
            if (dlen == 0) {
                csb_append(candidate, sizeof candidate, &len, ".");
            } else {
                for (size_t i = 0; i < dlen && len + 1 < sizeof candidate; i++) candidate[len++] = p[i];
                candidate[len] = 0;
            }
            csb_append(candidate, sizeof candidate, &len, "/");
            csb_append(candidate, sizeof candidate, &len, file);
            execve(candidate, argv, envp);
            if (errno == EACCES) saw_eacces = 1;
            else if (errno != ENOENT && errno != ENOTDIR) {
                err = errno;
                break;
            }
            if (!end) break;
            p = end + 1;
        }
        if (err == ENOENT && saw_eacces) err = EACCES;
    }
    if (err == ENOENT) {
        csb_say(file, ": command not found", "");
        _exit(127);
    }
    csb_say(file, ": ", err == EACCES ? "permission denied" : err == ENOEXEC ? "exec format error" : "cannot execute");
    _exit(126);
}

/// The command's process: runs with the sandbox's credentials, then execs.
__attribute__((noreturn)) static void csb_command(const csb_launch *l, const void *filter, size_t filter_len) {
    setsid();
    // An interactive session: the pty becomes the session's controlling terminal.
    if (l->terminal && ioctl(l->stdin_fd, TIOCSCTTY, 0) != 0)
        csb_fail(l->report_fd, "ioctl(TIOCSCTTY)", "", errno, NULL);
    int in = fcntl(l->stdin_fd, F_DUPFD_CLOEXEC, 10);
    int out = fcntl(l->stdout_fd, F_DUPFD_CLOEXEC, 10);
    int err = fcntl(l->stderr_fd, F_DUPFD_CLOEXEC, 10);
    if (in < 0 || out < 0 || err < 0) csb_fail(l->report_fd, "dup(stdio)", "", errno, NULL);
    if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0) csb_fail(l->report_fd, "dup2(stdio)", "", errno, NULL);
    // Nothing but stdio crosses the exec: the report pipe stays usable for csb_fail until then.
    csb_cloexec_from(l, 3);
    if (chdir(l->cwd) != 0) csb_fail(l->report_fd, "chdir", l->cwd, errno, NULL);
    if (l->gid != 0 && syscall(SYS_setresgid, l->gid, l->gid, l->gid) != 0)
        csb_fail(l->report_fd, "setresgid", "", errno, NULL);
    if (l->uid != 0) {
        if (syscall(SYS_setgroups, 0, NULL) != 0) csb_fail(l->report_fd, "setgroups", "", errno, NULL);
        if (syscall(SYS_setresuid, l->uid, l->uid, l->uid) != 0) csb_fail(l->report_fd, "setresuid", "", errno, NULL);
    } else {
        csb_drop_caps(l);
    }
    umask(022);
    // No file may grow past the change the run may keep (a sparse `truncate -s 200G` included):
    // writes beyond it fail (SIGXFSZ, or EFBIG where ignored). Hard and soft: no raising it.
    if (l->file_size_limit > 0) {
        struct rlimit fsize = {(rlim_t)l->file_size_limit, (rlim_t)l->file_size_limit};
        if (setrlimit(RLIMIT_FSIZE, &fsize) != 0) csb_fail(l->report_fd, "setrlimit(RLIMIT_FSIZE)", "", errno, NULL);
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) csb_fail(l->report_fd, "prctl(PR_SET_NO_NEW_PRIVS)", "", errno, NULL);
    // Two programs (see seccomp.c): a count of the first one's instructions, the allowlist,
    // then the refinements. The refinements go first: the allowlist then need not allow seccomp.
    uint64_t first = 0;
    memcpy(&first, filter, sizeof first);
    struct sock_filter *programs = (struct sock_filter *)((const char *)filter + sizeof first);
    size_t total = (filter_len - sizeof first) / sizeof(struct sock_filter);
    if (filter_len < sizeof first || first == 0 || first >= total || total - first > BPF_MAXINSNS)
        csb_fail(l->report_fd, "seccomp programs", "malformed", EINVAL, NULL);
    struct sock_fprog allowlist = {(unsigned short)first, programs};
    struct sock_fprog refinements = {(unsigned short)(total - first), programs + first};
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &refinements) != 0)
        csb_fail(l->report_fd, "seccomp(SECCOMP_SET_MODE_FILTER, refinements)", "", errno, NULL);
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &allowlist) != 0)
        csb_fail(l->report_fd, "seccomp(SECCOMP_SET_MODE_FILTER, allowlist)", "", errno, NULL);
    csb_reset_signals();
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    csb_exec(l);
}

static int64_t csb_read_last_pid(void) {
    int fd = open("/proc/sys/kernel/ns_last_pid", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    char buf[32];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    int64_t v = 0;
    for (ssize_t i = 0; i < n && buf[i] >= '0' && buf[i] <= '9'; i++) v = v * 10 + (buf[i] - '0');
    return v;
}

/// The signals pid 1 and the exec helper wait for: children, the ones they forward, and the stop.
static void csb_wait_signals(sigset_t *set) {
    sigemptyset(set);
    int waited[] = {SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH, CSB_SIGNAL_STOP};
    for (size_t i = 0; i < sizeof waited / sizeof waited[0]; i++) sigaddset(set, waited[i]);
}

/// Pid 1 of the sandbox: reaps orphans, forwards signals to the command's process group, and
/// when the command ends (or the parent asks with CSB_SIGNAL_STOP) kills whatever is left and
/// reports. Reaping everything itself, rather than dying, keeps the tree's CPU time in pid 1's
/// rusage: the kernel auto-reaps the children of a pid 1 that is killed.
__attribute__((noreturn)) static void csb_init(const csb_launch *l, pid_t command) {
    sigset_t waitset;
    csb_wait_signals(&waitset);
    int status = 0;
    int done = 0;
    while (!done) {
        siginfo_t info;
        int sig = sigwaitinfo(&waitset, &info);
        if (sig < 0) continue;
        if (sig == CSB_SIGNAL_STOP) break;
        if (sig != SIGCHLD) {
            // The command makes itself a session (and group) leader first thing; a signal that
            // arrives before that goes to the process itself.
            if (kill(-command, sig) != 0) kill(command, sig);
            continue;
        }
        for (;;) {
            int st;
            pid_t p = waitpid(-1, &st, WNOHANG);
            if (p <= 0) break;
            if (p == command) {
                status = st;
                done = 1;
            }
        }
    }
    csb_stage(5);
    kill(-1, SIGKILL);
    for (;;) {
        int st;
        pid_t p = waitpid(-1, &st, 0);
        if (p < 0 && errno == EINTR) continue;
        if (p <= 0) break;
        if (p == command && !done) {
            status = st;
            done = 1;
        }
    }
    csb_stage(6);
    csb_report r;
    memset(&r, 0, sizeof r);
    memcpy(r.stages, csb_stages, sizeof r.stages);
    r.kind = CSB_REPORT_EXITED;
    r.status = status;
    int64_t last = csb_read_last_pid();
    r.tasks = last > 1 ? last - 1 : 0;
    csb_write_all(l->report_fd, &r, sizeof r);
    _exit(0);
}

/// Reads the spec from CSB_FD_SPEC into a csb_launch whose strings point into the mapping.
static void csb_read_spec(csb_launch *l, const void **filter, size_t *filter_len) {
    struct stat st;
    if (fstat(CSB_FD_SPEC, &st) != 0 || st.st_size < (off_t)sizeof(csb_wire))
        csb_fail(CSB_FD_REPORT, "contree-init: read the spec", "", errno ? errno : EINVAL, NULL);
    const char *base = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, CSB_FD_SPEC, 0);
    if (base == MAP_FAILED) csb_fail(CSB_FD_REPORT, "mmap(spec)", "", errno, NULL);
    const csb_wire *w = (const csb_wire *)base;
    const char *end = base + st.st_size;
    if (w->magic != CSB_WIRE_MAGIC || w->length != (uint32_t)st.st_size)
        csb_fail(CSB_FD_REPORT, "contree-init: the spec is malformed (a different contree-pipeline build?)", "",
                 EINVAL, NULL);
    // Sizes first, so that no pointer below leaves the mapping.
    uint64_t fixed = sizeof *w + (uint64_t)w->file_count * sizeof(csb_wire_file) +
                     (uint64_t)w->bind_count * sizeof(uint32_t) + w->filter_length;
    if (fixed > (uint64_t)st.st_size || w->argc == 0 || w->filter_length % sizeof(struct sock_filter) != 0 ||
        w->filter_length / sizeof(struct sock_filter) > BPF_MAXINSNS || w->file_count > 4000 || w->bind_count > 256)
        csb_fail(CSB_FD_REPORT, "contree-init: the spec is inconsistent", "", EINVAL, NULL);
    const csb_wire_file *records = (const csb_wire_file *)(base + sizeof *w);
    const char *bind_flags = (const char *)(records + w->file_count);
    *filter = bind_flags + w->bind_count * sizeof(uint32_t);
    *filter_len = w->filter_length;
    const char *p = (const char *)*filter + w->filter_length;
    size_t count = 6 + (size_t)w->lower_count + w->argc + w->envc + w->file_count + 2 * (size_t)w->bind_count;
    const char **strings = calloc(count, sizeof(char *));
    if (!strings) csb_fail(CSB_FD_REPORT, "calloc(spec)", "", ENOMEM, NULL);
    for (size_t i = 0; i < count; i++) {
        const char *nul = p < end ? memchr(p, 0, (size_t)(end - p)) : NULL;
        if (!nul) csb_fail(CSB_FD_REPORT, "contree-init: the spec is truncated", "", EINVAL, NULL);
        strings[i] = p;
        p = nul + 1;
    }
    memset(l, 0, sizeof *l);
    l->store = strings[0];
    l->upper = strings[1];
    l->work = strings[2];
    l->root = strings[3];
    l->hostname = strings[4];
    l->cwd = strings[5];
    const char **lowers = strings + 6;
    const char **argv = calloc(w->argc + 1, sizeof(char *));
    const char **envp = calloc(w->envc + 1, sizeof(char *));
    csb_file_copy *files = calloc(w->file_count + 1, sizeof(csb_file_copy));
    csb_bind *binds = calloc(w->bind_count + 1, sizeof(csb_bind));
    if (!argv || !envp || !files || !binds) csb_fail(CSB_FD_REPORT, "calloc(spec)", "", ENOMEM, NULL);
    memcpy(argv, lowers + w->lower_count, w->argc * sizeof(char *));
    memcpy(envp, lowers + w->lower_count + w->argc, w->envc * sizeof(char *));
    const char **paths = lowers + w->lower_count + w->argc + w->envc;
    for (uint32_t i = 0; i < w->file_count; i++) {
        files[i].source_fd = CSB_FD_FILES + (int)i;
        files[i].path = paths[i];
        files[i].mode = records[i].mode;
        files[i].uid = records[i].uid;
        files[i].gid = records[i].gid;
    }
    const char **bind_paths = paths + w->file_count;
    for (uint32_t i = 0; i < w->bind_count; i++) {
        memcpy(&binds[i].flags, bind_flags + i * sizeof(uint32_t), sizeof(uint32_t));
        binds[i].source = bind_paths[2 * i];
        binds[i].target = bind_paths[2 * i + 1];
    }
    l->binds = binds;
    l->bind_count = w->bind_count;
    l->lowers = lowers;
    l->lower_count = w->lower_count;
    l->argv = argv;
    l->envp = envp;
    l->files = files;
    l->file_count = w->file_count;
    l->id_base = w->id_base;
    l->uid = w->uid;
    l->gid = w->gid;
    l->loopback_up = w->loopback_up;
    l->terminal = (int)w->terminal;
    l->file_size_limit = w->file_size_limit;
    l->userns_fd = CSB_FD_USERNS;
    l->stdin_fd = CSB_FD_STDIN;
    l->stdout_fd = CSB_FD_STDOUT;
    l->stderr_fd = CSB_FD_STDERR;
    l->go_fd = CSB_FD_GO;
    l->report_fd = CSB_FD_REPORT;
}

/// The lowers joined with ':' for kernels without `lowerdir+` (before 6.8).
static char *csb_join_lowers(const csb_launch *l) {
    size_t length = 1;
    for (size_t i = 0; i < l->lower_count; i++) length += csb_strlen(l->lowers[i]) + 1;
    char *joined = calloc(length, 1);
    if (!joined) csb_fail(l->report_fd, "calloc(lowers)", "", ENOMEM, NULL);
    size_t len = 0;
    for (size_t i = 0; i < l->lower_count; i++) {
        if (i) csb_append(joined, length, &len, ":");
        csb_append(joined, length, &len, l->lowers[i]);
    }
    return joined;
}

/// Exec mode, the parent: forwards signals to the command's group, and when it ends (or the
/// supervisor asks with CSB_SIGNAL_STOP, after which the group is killed) reports its status.
/// Only the command is its child; what the command leaves behind belongs to the sandbox's pid 1.
__attribute__((noreturn)) static void csb_exec_wait(const csb_launch *l, pid_t command) {
    sigset_t waitset;
    csb_wait_signals(&waitset);
    int status = 0;
    for (;;) {
        siginfo_t info;
        int sig = sigwaitinfo(&waitset, &info);
        if (sig < 0) continue;
        if (sig == CSB_SIGNAL_STOP) {
            kill(-command, SIGKILL);
            kill(command, SIGKILL);
            continue;
        }
        if (sig != SIGCHLD) {
            if (kill(-command, sig) != 0) kill(command, sig);
            continue;
        }
        int st;
        pid_t p = waitpid(command, &st, WNOHANG);
        if (p == command) {
            status = st;
            break;
        }
    }
    csb_report r;
    memset(&r, 0, sizeof r);
    r.kind = CSB_REPORT_EXITED;
    r.status = status;
    csb_write_all(l->report_fd, &r, sizeof r);
    _exit(0);
}

/// Exec mode (`contree-init exec`, see csb_exec_start): joins a running sandbox and runs one
/// more command in it, set up exactly like the sandbox's own command.
__attribute__((noreturn)) static void csb_exec_main(void) {
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    csb_reset_signals();
    csb_launch spec;
    const void *filter;
    size_t filter_len;
    csb_read_spec(&spec, &filter, &filter_len);
    const csb_launch *l = &spec;
    csb_close_from(CSB_FD_TARGET + 1);
    close(CSB_FD_SPEC);

    char byte;
    ssize_t n;
    while ((n = read(l->go_fd, &byte, 1)) < 0 && errno == EINTR) {
    }
    if (n != 1) _exit(125);
    // Still the host's root: enter the sandbox's namespaces (mount first among them, which
    // also moves root and working directory to the sandbox's root).
    if (setns(CSB_FD_TARGET, CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWCGROUP) != 0)
        csb_fail(l->report_fd, "setns(the running sandbox)", "", errno, "has the instance ended?");
    close(CSB_FD_TARGET);
    if (chdir("/") != 0) csb_fail(l->report_fd, "chdir", "/", errno, NULL);

    pid_t command = fork();  // the first process of this exec inside the sandbox's pid namespace
    if (command < 0) csb_fail(l->report_fd, "fork(command)", "", errno, NULL);
    if (command == 0) {
        if (syscall(SYS_setgroups, 0, NULL) != 0) csb_fail(l->report_fd, "setgroups", "", errno, NULL);
        if (setns(l->userns_fd, CLONE_NEWUSER) != 0) csb_fail(l->report_fd, "setns(CLONE_NEWUSER)", "", errno, NULL);
        if (syscall(SYS_setresgid, 0, 0, 0) != 0) csb_fail(l->report_fd, "setresgid(0)", "", errno, NULL);
        if (syscall(SYS_setresuid, 0, 0, 0) != 0) csb_fail(l->report_fd, "setresuid(0)", "", errno, NULL);
        close(l->userns_fd);
        prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
        struct rlimit nofile;
        if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur > 1024) {
            nofile.rlim_cur = 1024;
            setrlimit(RLIMIT_NOFILE, &nofile);
        }
        csb_command(l, filter, filter_len);
    }
    for (int fd = 0; fd < 3; fd++) close(fd);
    close(l->stdin_fd);
    close(l->stdout_fd);
    close(l->stderr_fd);
    close(l->userns_fd);
    csb_exec_wait(l, command);
}

/// Guard mode (`contree-init guard PROGRAM ARGS...`, see csb_guard_start): pid 1 of a pid
/// namespace of its own with the parent-death signal already set. Runs the program with fds 3
/// and up as given and ends with its status; when the guard is killed (the host process died,
/// or the run ended), the kernel kills the whole namespace, the program included.
__attribute__((noreturn)) static void csb_guard_main(char **argv) {
    csb_reset_signals();  // the host process ignores SIGPIPE; the program starts as from a shell
    pid_t child = fork();
    if (child < 0) _exit(126);
    if (child == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        execv(argv[0], argv);
        _exit(127);
    }
    csb_close_from(0);  // the program's pipes reach EOF when it ends, not when the guard does
    for (;;) {
        int status;
        pid_t p = waitpid(-1, &status, 0);
        if (p == child) _exit(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
        if (p < 0 && errno != EINTR) _exit(126);
    }
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "exec") == 0) csb_exec_main();
    if (argc > 2 && strcmp(argv[1], "guard") == 0) csb_guard_main(argv + 2);
    // Die with the supervising thread. If it died before this line, the go pipe reads EOF.
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    csb_reset_signals();  // the host process may have ignored some; every signal stays blocked
    csb_launch spec;
    const void *filter;
    size_t filter_len;
    csb_read_spec(&spec, &filter, &filter_len);
    const csb_launch *l = &spec;
    csb_close_from(CSB_FD_FILES + (int)l->file_count);
    close(CSB_FD_SPEC);

    // Everything up to the pivot runs before the go byte, overlapping the parent's cgroup
    // attach: none of it runs code from the image.
    umask(0);
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0)
        csb_fail(l->report_fd, "mount(/, MS_REC|MS_PRIVATE)", "", errno, NULL);
    if (l->hostname[0] && sethostname(l->hostname, csb_strlen(l->hostname)) != 0)
        csb_fail(l->report_fd, "sethostname", l->hostname, errno, NULL);
    if (l->loopback_up) csb_loopback_up(l);
    csb_mount_overlay(l, csb_join_lowers(l));
    int *bind_trees = csb_open_binds(l);
    csb_stage(1);
    if (chdir(l->root) != 0) csb_fail(l->report_fd, "chdir", l->root, errno, NULL);
    // Still the host's root here: mount points in the image must be plain directories, or a
    // symlink could aim a mount at a host path.
    csb_require_directory(l, "proc");
    csb_require_directory(l, "dev");
    if (mount("proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0)
        csb_fail(l->report_fd, "mount(proc) on", "/proc", errno, NULL);
    csb_mount_dev(l);
    csb_mask_proc(l);
    csb_stage(2);
    if (sys_pivot_root(".", ".") != 0) csb_fail(l->report_fd, "pivot_root", l->root, errno, NULL);
    if (umount2(".", MNT_DETACH) != 0) csb_fail(l->report_fd, "umount2(old root)", "", errno, NULL);
    if (chdir("/") != 0) csb_fail(l->report_fd, "chdir", "/", errno, NULL);
    csb_attach_binds(l, bind_trees);
    csb_stage(3);

    char byte;
    ssize_t n;
    while ((n = read(l->go_fd, &byte, 1)) < 0 && errno == EINTR) {
    }
    if (n != 1) _exit(125);  // the parent is gone or gave up
    csb_stage(0);
    // Now in the run's cgroups: make them the root of the sandbox's cgroup view.
    if (unshare(CLONE_NEWCGROUP) != 0) csb_fail(l->report_fd, "unshare(CLONE_NEWCGROUP)", "", errno, NULL);

    // Become the sandbox's root: from here on, no capability over the host or over the
    // namespaces above (they belong to the host's user namespace).
    if (syscall(SYS_setgroups, 0, NULL) != 0) csb_fail(l->report_fd, "setgroups", "", errno, NULL);
    if (setns(l->userns_fd, CLONE_NEWUSER) != 0) csb_fail(l->report_fd, "setns(CLONE_NEWUSER)", "", errno, NULL);
    if (syscall(SYS_setresgid, 0, 0, 0) != 0) csb_fail(l->report_fd, "setresgid(0)", "", errno, NULL);
    if (syscall(SYS_setresuid, 0, 0, 0) != 0) csb_fail(l->report_fd, "setresuid(0)", "", errno, NULL);
    close(l->userns_fd);
    // Credential changes clear the parent-death signal: set it again, then make sure the parent
    // did not die in between (it keeps the go pipe's write end open for the whole run).
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    struct pollfd parent = {l->go_fd, POLLIN, 0};
    if (poll(&parent, 1, 0) != 0) _exit(125);
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);

    // The engine raises its own descriptor limit; the sandbox gets the usual soft 1024.
    struct rlimit nofile;
    if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur > 1024) {
        nofile.rlim_cur = 1024;
        setrlimit(RLIMIT_NOFILE, &nofile);
    }
    umask(022);
    csb_copy_files(l);
    for (size_t i = 0; i < l->file_count; i++) close(l->files[i].source_fd);
    if (l->cwd[0] == '/') {
        char cwd[4096];
        size_t len = 0;
        csb_append(cwd, sizeof cwd, &len, l->cwd);
        if (csb_make_parents(cwd, 1) != 0) csb_fail(l->report_fd, "mkdir(working directory)", l->cwd, errno, NULL);
    }

    pid_t command = fork();
    if (command < 0) csb_fail(l->report_fd, "fork(command)", "", errno, NULL);
    if (command == 0) csb_command(l, filter, filter_len);
    csb_stage(4);

    // Pid 1 keeps only the report pipe.
    for (int fd = 0; fd < 3; fd++) close(fd);
    close(l->stdin_fd);
    close(l->stdout_fd);
    close(l->stderr_fd);
    csb_init(l, command);
}
