// A live sandbox's agent: the root stays mounted, the main command (if any) runs in the
// background with its output in /scratch/main.log (on the upper disk, outside the changes), and
// hosts come and go on its ports, a session on each, each opened by a hello:
//   exec   one more command, its stdin, stdout and stderr relayed as a one-shot run's; what it
//          leaves running keeps running (its output read and dropped once it has exited);
//   freeze every process of the sandbox (a cgroup v2 freezer: invisible to them), sync, send
//          the upper as a layer tar: the files of a memory snapshot, taken while nothing runs;
//   thaw   with the host's time and fresh entropy (a restored child's clock and random state
//          must not be its parent's) and a hostname;
//   put    a file or directory into the root (a resumed run's inputs), resolved inside it.
// A failure that concerns one command (no pipes, no fork, no memory for its stdin) is said on
// its session; only the agent's own setup failing stops the guest.
// A host that goes away mid-command takes that command with it (its process group is killed).
// The port's host side is watched with SIGIO: a port without a host polls as hung up, so it is
// left out of poll until a host connects again.
#define _GNU_SOURCE
#include "agent.h"
#include "agent_protocol.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CGROUP "/sys/fs/cgroup/sandbox"
#define MAX_ORPHANS 64
#define MAX_EXEC_FIELDS 4096
// The stdin a host may have sent and not had acknowledged (AGENT_FRAME_STDIN_ACK): what a
// command has not read yet waits here, and the port is always read, so a kill, a new hello or
// a host hanging up is heard whatever the command does. Beyond twice that, a host ignored it.
#define STDIN_LIMIT (2 * AGENT_STDIN_WINDOW)

static pid_t main_pid;
static int main_ended, main_status;
static int frozen, have_cgroup;
static int root_fd = -1;  // the sandbox's root (/root), where puts resolve
// Output pipes of commands that exited while something they started still holds them: read
// and dropped, so that the writer never blocks or dies of SIGPIPE.
static int orphans[MAX_ORPHANS], orphan_count;

// One per port: the host side of each is a session of its own, so commands run side by side
// (a server's subprocess calls). `s` is the session being served; `port` its descriptor.
#define MAX_SESSIONS 5
static struct session {
    int fd, connected;
    pid_t pid;  // 0: none
    int out, err, in;
    char *pending;  // stdin not yet written: bytes pending_done..pending_size
    size_t pending_size, pending_done, unacknowledged;
    int stdin_closing, exited, status;
    int keep;  // survives its session: a run's own command, which a snapshot's children go on with
    struct rusage usage;
    long long processes_before, read_before, written_before;
    int putting, put_fd;   // a file being put: its bytes arrive in AGENT_FRAME_PUT_DATA frames
    char put_error[320];   // why the put failed ("" while it goes well)
    // What the host sent and the agent has not handled yet: frames are taken whole from here,
    // so a host that stops mid-frame holds up nobody else.
    unsigned char received[5 + AGENT_MAX_FRAME + 1];
    size_t received_length;
} sessions[MAX_SESSIONS], *s;
static int session_count;

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

static void orphan(int *fd) {
    if (*fd < 0) return;
    if (orphan_count < MAX_ORPHANS) {
        orphans[orphan_count++] = *fd;
        *fd = -1;
    } else {
        close_fd(fd);
    }
}

static int set_freezer(int on) {
    int fd = open(CGROUP "/cgroup.freeze", O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    int written = write(fd, on ? "1" : "0", 1) == 1;
    close(fd);
    if (!written) return -1;
    if (!on) return 0;
    for (int i = 0; i < 10000; i++) {  // cgroup.events says "frozen 1" once every task stopped
        char events[256] = "";
        fd = open(CGROUP "/cgroup.events", O_RDONLY | O_CLOEXEC);
        if (fd < 0) return -1;
        ssize_t n = read(fd, events, sizeof events - 1);
        close(fd);
        if (n > 0 && strstr(events, "frozen 1") != NULL) return 0;
        usleep(1000);
    }
    errno = ETIMEDOUT;
    return -1;
}

static void lost_host(void);

static void send_or_lose(char type, const void *data, uint32_t size) {
    if (s->connected && send_frame(type, data, size) != 0) lost_host();
}

// The current command is over: what it wrote before exiting is sent, its report follows.
static void end_exec(void) {
    char buffer[65536];
    int *pipes[2] = {&s->out, &s->err};
    for (int i = 0; i < 2; i++) {
        // What the pipe holds now (all the command wrote), then one more read for its end:
        // something the command started may go on writing, and must not hold the report back.
        int held = 0;
        if (*pipes[i] >= 0 && ioctl(*pipes[i], FIONREAD, &held) != 0) held = 0;
        for (long left = held; *pipes[i] >= 0;) {
            ssize_t n = read(*pipes[i], buffer, sizeof buffer);
            if (n > 0) {
                send_or_lose(i == 0 ? AGENT_FRAME_STDOUT : AGENT_FRAME_STDERR, buffer, (uint32_t)n);
                left -= n;
                if (left < 0) orphan(pipes[i]);  // a background writer: read and dropped from here
            } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
                close_fd(pipes[i]);
            } else if (errno == EAGAIN) {
                orphan(pipes[i]);  // still held by something the command started
            }
        }
    }
    close_fd(&s->in);
    free(s->pending);
    s->pending = NULL;
    s->pending_size = s->pending_done = s->unacknowledged = 0;
    long long read_after, written_after;
    disk_bytes(&read_after, &written_after);
    char report[384];
    int status = s->status;
    int n = snprintf(
        report, sizeof report,
        "status=%d signal=%d utime_us=%lld stime_us=%lld maxrss_kb=%ld processes=%lld read_bytes=%lld write_bytes=%lld",
        WIFEXITED(status) ? WEXITSTATUS(status) : -1, WIFSIGNALED(status) ? WTERMSIG(status) : 0,
        (long long)s->usage.ru_utime.tv_sec * 1000000 + s->usage.ru_utime.tv_usec,
        (long long)s->usage.ru_stime.tv_sec * 1000000 + s->usage.ru_stime.tv_usec, s->usage.ru_maxrss,
        processes_created() - s->processes_before, read_after - s->read_before,
        written_after - s->written_before);
    s->pid = 0;
    send_or_lose(AGENT_FRAME_EXIT, report, (uint32_t)n);
}

// The host went away (or a new session began) while a command ran: it goes, with its group.
static void abandon_exec(void) {
    if (s->pid == 0) return;
    if (!s->exited && !s->keep) {
        kill(-s->pid, SIGKILL);
        kill(s->pid, SIGKILL);
    }
    if (s->keep) {  // it goes on, its output read and dropped
        orphan(&s->out);
        orphan(&s->err);
    }
    close_fd(&s->out);
    close_fd(&s->err);
    close_fd(&s->in);
    free(s->pending);
    s->pending = NULL;
    s->pending_size = s->pending_done = s->unacknowledged = 0;
    s->pid = 0;
}

static void end_put(void) {
    close_fd(&s->put_fd);
    s->putting = 0;
}

static void lost_host(void) {
    s->connected = 0;
    s->received_length = 0;  // a frame it did not finish is not the next host's
    abandon_exec();
    end_put();
}

static void reap(void) {
    int status;
    struct rusage usage;
    pid_t pid;
    while ((pid = wait4(-1, &status, WNOHANG, &usage)) > 0) {
        if (pid == main_pid && !main_ended) {
            main_ended = 1;
            main_status = status;
        }
        for (int i = 0; i < session_count; i++) {
            struct session *other = &sessions[i];
            if (pid == other->pid && !other->exited) {
                other->exited = 1;
                other->status = status;
                other->usage = usage;
            }
        }
    }
}

static void handle(int type, char *data, uint32_t size);

// Handles the whole frames received, in order.
// Zero bytes between frames are padding: a host that finds the port's last session was cut
// mid-frame sends more of them than a frame holds, which completes that frame and realigns.
static void take_frames(void) {
    for (;;) {
        size_t skip = 0;
        while (skip < s->received_length && s->received[skip] == 0) skip++;
        size_t length = s->received_length - skip;
        if (skip > 0) memmove(s->received, s->received + skip, length);
        s->received_length = length;
        if (length < 5) return;
        unsigned char *frame = s->received;
        uint32_t size = frame[1] | frame[2] << 8 | frame[3] << 16 | (uint32_t)frame[4] << 24;
        if (size > AGENT_MAX_FRAME) {  // not a frame: dropped, until a host realigns the port
            s->received_length = 0;
            return;
        }
        if (length < 5 + size) return;
        unsigned char after = frame[5 + size];
        frame[5 + size] = 0;  // payloads are handled as NUL-terminated
        handle(frame[0], (char *)frame + 5, size);
        frame[5 + size] = after;
        if (s->received_length == 0) return;  // the host was lost while handling it
        memmove(s->received, s->received + 5 + size, length - 5 - size);
        s->received_length = length - 5 - size;
    }
}

// Serves session `s` (its port is `port`) after a poll: its command's output, its stdin, frames.
static void serve(struct pollfd *fds, int port_at, int out_at, int err_at, int in_at, char *buffer, size_t size) {
    if (!s->connected) {  // a host connected (SIGIO), or the next check
        struct pollfd check = {port, POLLIN, 0};
        if (poll(&check, 1, 0) >= 0 && (check.revents & POLLHUP) == 0) s->connected = 1;
    }
    int at[2] = {out_at, err_at};
    int *pipes[2] = {&s->out, &s->err};
    for (int i = 0; i < 2; i++) {
        if (at[i] < 0 || fds[at[i]].revents == 0 || *pipes[i] < 0) continue;
        ssize_t got = read(*pipes[i], buffer, size);
        if (got > 0) {
            send_or_lose(i == 0 ? AGENT_FRAME_STDOUT : AGENT_FRAME_STDERR, buffer, (uint32_t)got);
        } else if (got == 0 || (errno != EINTR && errno != EAGAIN)) {
            close_fd(pipes[i]);
        }
    }
    if (in_at >= 0 && s->in >= 0 && fds[in_at].revents != 0) {
        size_t before = s->pending_done;
        ssize_t put = write(s->in, s->pending + s->pending_done, s->pending_size - s->pending_done);
        if (put > 0) s->pending_done += (size_t)put;
        if (put < 0 && errno != EAGAIN && errno != EINTR) s->pending_done = s->pending_size;  // the reader is gone
        s->unacknowledged += s->pending_done - before;
    }
    if (s->pending != NULL && s->pending_done == s->pending_size) {
        free(s->pending);
        s->pending = NULL;
        s->pending_size = s->pending_done = 0;
    }
    // The host may send as much again as the command took.
    if (s->unacknowledged >= 65536 || (s->unacknowledged > 0 && s->pending == NULL)) {
        char taken[24];
        int length = snprintf(taken, sizeof taken, "%zu", s->unacknowledged);
        s->unacknowledged = 0;
        send_or_lose(AGENT_FRAME_STDIN_ACK, taken, (uint32_t)length);
    }
    if (s->stdin_closing && s->pending == NULL) close_fd(&s->in);
    if (s->pid != 0 && s->exited) end_exec();
    if (port_at >= 0 && s->connected && fds[port_at].revents != 0) {
        if ((fds[port_at].revents & POLLIN) == 0) {  // hung up (also while stdin is backed up)
            lost_host();
            return;
        }
        size_t room = sizeof s->received - 1 - s->received_length;
        ssize_t got = read(port, s->received + s->received_length, room < 65536 ? room : 65536);
        if (got > 0) {
            s->received_length += (size_t)got;
        } else if (got == 0 || (errno != EAGAIN && errno != EINTR)) {
            lost_host();
            return;
        }
    }
    if (s->connected) take_frames();
}

// An exec that does not start: why, on its stderr, then the status a failed start has.
static void refuse_exec(const char *why) {
    send_or_lose(AGENT_FRAME_STDERR, why, (uint32_t)strlen(why));
    static const char report[] = "status=125 signal=0";
    send_or_lose(AGENT_FRAME_EXIT, report, sizeof report - 1);
}

static void start_exec(char *spec, uint32_t size) {
    static char *argv[MAX_EXEC_FIELDS + 1], *envp[MAX_EXEC_FIELDS + 1];
    int argc = 0, envc = 0, keep = 0;
    const char *workdir = "/";
    unsigned uid = 0, gid = 0;
    for (char *field = spec; field < spec + size; field += strlen(field) + 1) {
        switch (field[0]) {
        case AGENT_SPEC_WORKDIR: workdir = field + 1; break;
        case AGENT_SPEC_USER: sscanf(field + 1, "%u:%u", &uid, &gid); break;
        case AGENT_SPEC_ENV: if (envc < MAX_EXEC_FIELDS) envp[envc++] = field + 1; break;
        case AGENT_SPEC_ARGUMENT: if (argc < MAX_EXEC_FIELDS) argv[argc++] = field + 1; break;
        case AGENT_SPEC_KEEP: keep = 1; break;
        }
    }
    argv[argc] = NULL;
    envp[envc] = NULL;
    const char *refusal = argc == 0 ? "the exec names no command" : frozen ? "the sandbox is frozen" : NULL;
    if (refusal != NULL) {
        refuse_exec(refusal);
        return;
    }
    int pipes[6] = {-1, -1, -1, -1, -1, -1}, *out = pipes, *err = pipes + 2, *in = pipes + 4;
    if (pipe2(out, O_CLOEXEC) != 0 || pipe2(err, O_CLOEXEC) != 0 || pipe2(in, O_CLOEXEC) != 0) {
        // Only this command fails: the sandbox and its other sessions go on.
        refuse_exec("contree-agent: no pipes for the command (too many open files in the agent?)");
        for (int i = 0; i < 6; i++) close_fd(&pipes[i]);
        return;
    }
    s->processes_before = processes_created();
    disk_bytes(&s->read_before, &s->written_before);
    memset(&s->usage, 0, sizeof s->usage);
    s->exited = s->status = s->stdin_closing = 0;
    s->keep = keep;
    s->pid = spawn_in_root(
        argv, envp, workdir, uid, gid, in[0], out[1], err[1], have_cgroup ? CGROUP "/cgroup.procs" : NULL, 1);
    if (s->pid < 0) {
        s->pid = 0;
        refuse_exec("contree-agent: cannot start the command (fork failed: is the guest out of memory?)");
        for (int i = 0; i < 6; i++) close_fd(&pipes[i]);
        return;
    }
    close(out[1]);
    close(err[1]);
    close(in[0]);
    s->out = out[0];
    s->err = err[0];
    s->in = in[1];
    for (int i = 0; i < 3; i++) {
        int fd = i == 0 ? s->out : i == 1 ? s->err : s->in;
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    }
}

static void hello(void) {
    abandon_exec();
    char text[128];
    int n = !main_pid    ? snprintf(text, sizeof text, "main=none")
            : !main_ended ? snprintf(text, sizeof text, "main=running")
                          : snprintf(
                                text, sizeof text, "main=exited status=%d signal=%d",
                                WIFEXITED(main_status) ? WEXITSTATUS(main_status) : -1,
                                WIFSIGNALED(main_status) ? WTERMSIG(main_status) : 0);
    if (frozen) n += snprintf(text + n, sizeof text - (size_t)n, " frozen");
    send_or_lose(AGENT_FRAME_HELLO, text, (uint32_t)n);
}

static void freeze(void) {
    if (!have_cgroup || (!frozen && set_freezer(1) != 0)) {
        char text[256];
        int n = snprintf(
            text, sizeof text, "the guest could not freeze its processes: %s",
            have_cgroup ? strerror(errno) : "no cgroup v2 in the guest");
        if (have_cgroup) set_freezer(0);  // half frozen is worse than not
        send_or_lose(AGENT_FRAME_FREEZE, text, (uint32_t)n);
        return;
    }
    frozen = 1;
    sync();
    tar_tree("/scratch/upper", "");
    static const char end[1024];
    tar_out(end, sizeof end);
    tar_flush();
    send_or_lose(AGENT_FRAME_FREEZE, NULL, 0);
}

static void thaw(char *spec, uint32_t size) {
    for (char *field = spec; field < spec + size; field += strlen(field) + 1) {
        switch (field[0]) {
        case AGENT_SPEC_TIME: set_clock(field + 1); break;
        case AGENT_SPEC_ENTROPY: add_entropy(field + 1); break;
        case AGENT_SPEC_HOSTNAME: sethostname(field + 1, strlen(field + 1)); break;
        }
    }
    if (have_cgroup) set_freezer(0);
    frozen = 0;
    send_or_lose(AGENT_FRAME_THAW, NULL, 0);
}

// Opens `path` (in the sandbox's view) with every component resolved inside its root: an
// image's symlinks and ".." cannot lead out of it (the agent itself is not chrooted).
static int in_root(const char *path, int flags) {
    struct open_how how = {
        .flags = (unsigned long long)(flags | O_CLOEXEC), .resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS};
    while (*path == '/') path++;
    return (int)syscall(SYS_openat2, root_fd, *path != 0 ? path : ".", &how, sizeof how);
}

// The directory holding `path`'s last component (made where missing, with its parents, owned by
// root), resolved inside the root; -1 with the reason in the session's put_error.
static int parent_in_root(char *path, char *last) {
    int parent = fcntl(root_fd, F_DUPFD_CLOEXEC, 0);
    char *component = path + 1;
    for (char *slash = strchr(component, '/'); parent >= 0 && slash != NULL && slash <= last;
         slash = strchr(component, '/')) {
        *slash = 0;
        if (*component != 0) {
            int next = in_root(path, O_PATH | O_DIRECTORY);
            if (next < 0 && errno == ENOENT && (mkdirat(parent, component, 0755) == 0 || errno == EEXIST))
                next = in_root(path, O_PATH | O_DIRECTORY);
            if (next < 0)
                snprintf(s->put_error, sizeof s->put_error, "%s is not a directory in the sandbox: %s", path,
                    strerror(errno));
            close(parent);
            parent = next;
        }
        *slash = '/';
        component = slash + 1;
    }
    return parent;
}

// A put's header: "PATH\0MODE\0UID:GID\0KIND\0". A directory is made at once and answered; a
// file is opened (an existing link or device there is replaced, never written through) and its
// bytes follow, answered at their end.
static void put(char *data, uint32_t size) {
    end_put();
    s->putting = 1;
    s->put_error[0] = 0;
    char *fields[4];
    char *p = data, *end = data + size;
    for (int i = 0; i < 4; i++) {
        char *nul = memchr(p, 0, (size_t)(end - p));
        if (nul == NULL) {  // answered at once: the host waits for it whatever it sends next
            static const char malformed[] = "a malformed put header";
            send_or_lose(AGENT_FRAME_PUT, malformed, sizeof malformed - 1);
            end_put();
            return;
        }
        fields[i] = p;
        p = nul + 1;
    }
    char *path = fields[0], *last = strrchr(path, '/');
    int directory = fields[3][0] == 'd';
    if (path[0] != '/' || last[1] == 0 || strcmp(last, "/.") == 0 || strcmp(last, "/..") == 0)
        snprintf(s->put_error, sizeof s->put_error, "%.256s is not an absolute path to a file", path);
    int parent = s->put_error[0] == 0 ? parent_in_root(path, last) : -1;
    if (parent >= 0) {
        unsigned mode = (unsigned)strtoul(fields[1], NULL, 8) & 07777, uid = 0, gid = 0;
        sscanf(fields[2], "%u:%u", &uid, &gid);
        const char *name = last + 1;
        struct stat st;
        int fd = -1;
        if (directory) {
            if (mkdirat(parent, name, 0700) == 0 || errno == EEXIST) fd = in_root(path, O_RDONLY | O_DIRECTORY);
        } else {
            if (fstatat(parent, name, &st, AT_SYMLINK_NOFOLLOW) == 0 && !S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode))
                unlinkat(parent, name, 0);
            fd = openat(parent, name, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
        }
        if (fd < 0 || fchown(fd, uid, gid) != 0 || fchmod(fd, mode) != 0)
            snprintf(s->put_error, sizeof s->put_error, "%.256s: %s", path, strerror(errno));
        if (fd >= 0 && (directory || s->put_error[0] != 0)) close(fd);
        if (!directory && s->put_error[0] == 0) s->put_fd = fd;
        close(parent);
    }
    if (directory) {
        send_or_lose(AGENT_FRAME_PUT, s->put_error, (uint32_t)strlen(s->put_error));
        end_put();
    }
}

// A piece of the file being put; empty: its end, answered with "" or why it failed.
static void put_data(char *data, uint32_t size) {
    if (!s->putting) return;
    if (size > 0) {
        if (s->put_fd >= 0 && write_all(s->put_fd, data, size) != 0) {
            snprintf(s->put_error, sizeof s->put_error, "writing the file: %s", strerror(errno));
            close_fd(&s->put_fd);
        }
        return;
    }
    send_or_lose(AGENT_FRAME_PUT, s->put_error, (uint32_t)strlen(s->put_error));
    end_put();
}

// Stdin for the command, after what it has not read yet; -1 when there is no memory for it.
static int queue_stdin(const char *data, uint32_t size) {
    size_t left = s->pending_size - s->pending_done;
    if (s->pending_done > 0) {
        memmove(s->pending, s->pending + s->pending_done, left);
        s->pending_size = left;
        s->pending_done = 0;
    }
    char *grown = realloc(s->pending, left + size);
    if (grown == NULL) return -1;
    memcpy(grown + left, data, size);
    s->pending = grown;
    s->pending_size = left + size;
    return 0;
}

static void handle(int type, char *data, uint32_t size) {
    switch (type) {
    case AGENT_FRAME_HELLO:
        end_put();
        hello();
        break;
    case AGENT_FRAME_EXEC:
        abandon_exec();
        start_exec(data, size);
        break;
    case AGENT_FRAME_FREEZE: freeze(); break;
    case AGENT_FRAME_THAW: thaw(data, size); break;
    case AGENT_FRAME_PUT: put(data, size); break;
    case AGENT_FRAME_PUT_DATA: put_data(data, size); break;
    case AGENT_FRAME_STDIN:
        if (s->pid == 0 || s->in < 0 || s->stdin_closing) break;
        if (size == 0) {
            s->stdin_closing = 1;
        } else if (s->pending_size - s->pending_done + size > STDIN_LIMIT) {
            static const char why[] =
                "contree-agent: the host sent more stdin than it was granted; its stdin is closed\n";
            send_or_lose(AGENT_FRAME_STDERR, why, sizeof why - 1);
            s->stdin_closing = 1;
        } else if (queue_stdin(data, size) != 0) {
            static const char why[] = "contree-agent: no memory to hold the command's stdin; its stdin is closed\n";
            send_or_lose(AGENT_FRAME_STDERR, why, sizeof why - 1);
            s->stdin_closing = 1;
        }
        break;
    case AGENT_FRAME_KILL:
        if (s->pid != 0 && !s->exited && size > 0) {
            int signal_number = atoi(data);
            if (signal_number > 0 && signal_number < 65) kill(s->pid, signal_number);
        }
        break;
    }
}

void live_main(char **argv, char **envp, const char *workdir, unsigned uid, unsigned gid) {
    // A cgroup of its own for everything the sandbox runs: what a freeze stops.
    mkdir("/sys/fs/cgroup", 0755);
    have_cgroup = (mount("cgroup2", "/sys/fs/cgroup", "cgroup2", 0, NULL) == 0 || errno == EBUSY)
        && (mkdir(CGROUP, 0755) == 0 || errno == EEXIST);
    root_fd = open("/root", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root_fd < 0) fail("open the sandbox's root");
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigaddset(&mask, SIGIO);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int signals = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
    if (signals < 0) fail("signalfd");
    // The first port is the one the host that started the sandbox holds; the others (as many
    // as the VM has) wait for hosts.
    for (int i = 0; i < MAX_SESSIONS; i++) {
        char path[32];
        snprintf(path, sizeof path, "/dev/vport0p%d", i + 1);
        int fd = i == 0 ? port : open(path, O_RDWR | O_CLOEXEC);
        if (fd < 0) break;
        fcntl(fd, F_SETOWN, getpid());
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_ASYNC | O_NONBLOCK);
        sessions[session_count++] =
            (struct session){.fd = fd, .connected = i == 0, .out = -1, .err = -1, .in = -1, .put_fd = -1};
    }
    s = &sessions[0];
    if (argv[0] != NULL) {
        int in = open("/dev/null", O_RDONLY | O_CLOEXEC);
        int log = open("/scratch/main.log", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
        if (in < 0 || log < 0) fail("open the main command's log");
        main_pid = spawn_in_root(
            argv, envp, workdir, uid, gid, in, log, log, have_cgroup ? CGROUP "/cgroup.procs" : NULL, 1);
        if (main_pid < 0) fail("fork");
        close(in);
        close(log);
    }
    char started[32];
    int length = snprintf(started, sizeof started, "pid=%d", (int)main_pid);
    send_or_lose(AGENT_FRAME_LIVE, started, (uint32_t)length);

    static char buffer[65536];
    for (;;) {
        struct pollfd fds[1 + 4 * MAX_SESSIONS + MAX_ORPHANS];
        int at[MAX_SESSIONS][4];  // port, out, err, in: indexes in fds, or -1
        int n = 0, waiting = 0;
        fds[n++] = (struct pollfd){signals, POLLIN, 0};
        for (int i = 0; i < session_count; i++) {
            struct session *one = &sessions[i];
            int backlog = one->pending_size > one->pending_done;
            for (int k = 0; k < 4; k++) at[i][k] = -1;
            if (one->connected) fds[at[i][0] = n++] = (struct pollfd){one->fd, POLLIN, 0};
            if (one->pid != 0 && one->out >= 0) fds[at[i][1] = n++] = (struct pollfd){one->out, POLLIN, 0};
            if (one->pid != 0 && one->err >= 0) fds[at[i][2] = n++] = (struct pollfd){one->err, POLLIN, 0};
            if (one->pid != 0 && backlog) fds[at[i][3] = n++] = (struct pollfd){one->in, POLLOUT, 0};
            if (!one->connected) waiting = 1;
        }
        int first_orphan = n;
        for (int i = 0; i < orphan_count; i++) fds[n++] = (struct pollfd){orphans[i], POLLIN, 0};
        // A port without a host polls as hung up: SIGIO says when one connects (checked each
        // second too).
        if (poll(fds, (nfds_t)n, waiting ? 1000 : -1) < 0) {
            if (errno == EINTR) continue;
            fail("poll");
        }
        if (fds[0].revents != 0) {
            struct signalfd_siginfo info;
            while (read(signals, &info, sizeof info) == sizeof info) {}
            reap();
        }
        for (int i = orphan_count - 1; i >= 0; i--) {
            if (fds[first_orphan + i].revents == 0) continue;
            ssize_t got = read(orphans[i], buffer, sizeof buffer);
            if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR)) {
                close(orphans[i]);
                orphans[i] = orphans[--orphan_count];
            }
        }
        for (int i = 0; i < session_count; i++) {
            s = &sessions[i];
            port = s->fd;
            serve(fds, at[i][0], at[i][1], at[i][2], at[i][3], buffer, sizeof buffer);
        }
    }
}
