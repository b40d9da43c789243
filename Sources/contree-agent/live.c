// A live sandbox's agent: the root stays mounted, the main command (if any) runs in the
// background with its output in /scratch/main.log (on the upper disk, outside the changes), and
// hosts come and go on the port, one session at a time, each opened by a hello:
//   exec   one more command, its stdin, stdout and stderr relayed as a one-shot run's; what it
//          leaves running keeps running (its output read and dropped once it has exited);
//   freeze every process of the sandbox (a cgroup v2 freezer: invisible to them), sync, send
//          the upper as a layer tar: the files of a memory snapshot, taken while nothing runs;
//   thaw   with the host's time and fresh entropy (a restored child's clock and random state
//          must not be its parent's) and a hostname.
// A host that goes away mid-command takes that command with it (its process group is killed).
// The port's host side is watched with SIGIO: a port without a host polls as hung up, so it is
// left out of poll until a host connects again.
#define _GNU_SOURCE
#include "agent.h"
#include "agent_protocol.h"
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CGROUP "/sys/fs/cgroup/sandbox"
#define MAX_ORPHANS 64
#define MAX_EXEC_FIELDS 4096

static pid_t main_pid;
static int main_ended, main_status;
static int frozen, have_cgroup;
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
    char *pending;  // stdin not yet written
    size_t pending_size, pending_done;
    int stdin_closing, exited, status;
    int keep;  // survives its session: a run's own command, which a snapshot's children go on with
    struct rusage usage;
    long long processes_before, read_before, written_before;
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
static void handle(int type, char *data, uint32_t size);

static void send_or_lose(char type, const void *data, uint32_t size) {
    if (s->connected && send_frame(type, data, size) != 0) lost_host();
}

// The current command is over: what it wrote before exiting is sent, its report follows.
static void end_exec(void) {
    char buffer[65536];
    int *pipes[2] = {&s->out, &s->err};
    for (int i = 0; i < 2; i++) {
        while (*pipes[i] >= 0) {
            ssize_t n = read(*pipes[i], buffer, sizeof buffer);
            if (n > 0) {
                send_or_lose(i == 0 ? AGENT_FRAME_STDOUT : AGENT_FRAME_STDERR, buffer, (uint32_t)n);
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
    s->pending_size = s->pending_done = 0;
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
    s->pending_size = s->pending_done = 0;
    s->pid = 0;
}

static void lost_host(void) {
    s->connected = 0;
    abandon_exec();
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

// Serves session `s` (its port is `port`) after a poll: its command's output, its stdin, a frame.
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
        ssize_t put = write(s->in, s->pending + s->pending_done, s->pending_size - s->pending_done);
        if (put > 0) s->pending_done += (size_t)put;
        if (put < 0 && errno != EAGAIN && errno != EINTR) s->pending_done = s->pending_size;
    }
    if (s->pending != NULL && s->pending_done == s->pending_size) {
        free(s->pending);
        s->pending = NULL;
        s->pending_size = s->pending_done = 0;
    }
    if (s->stdin_closing && s->pending == NULL) close_fd(&s->in);
    if (s->pid != 0 && s->exited) end_exec();
    if (port_at >= 0 && s->connected && fds[port_at].revents != 0) {
        if ((fds[port_at].revents & POLLIN) == 0) {
            lost_host();
            return;
        }
        char *data = NULL;
        uint32_t length = 0;
        int type = read_frame(&data, &length);
        if (type < 0) {
            lost_host();
        } else {
            handle(type, data, length);
        }
        free(data);
    }
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
        send_or_lose(AGENT_FRAME_STDERR, refusal, (uint32_t)strlen(refusal));
        static const char report[] = "status=125 signal=0";
        send_or_lose(AGENT_FRAME_EXIT, report, sizeof report - 1);
        return;
    }
    int out[2], err[2], in[2];
    if (pipe2(out, O_CLOEXEC) != 0 || pipe2(err, O_CLOEXEC) != 0 || pipe2(in, O_CLOEXEC) != 0) fail("pipe");
    s->processes_before = processes_created();
    disk_bytes(&s->read_before, &s->written_before);
    memset(&s->usage, 0, sizeof s->usage);
    s->exited = s->status = s->stdin_closing = 0;
    s->keep = keep;
    s->pid = spawn_in_root(
        argv, envp, workdir, uid, gid, in[0], out[1], err[1], have_cgroup ? CGROUP "/cgroup.procs" : NULL, 1);
    if (s->pid < 0) fail("fork");
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

// A file or directory the host puts into the root, parents made as needed (owned by root).
static void put(char *data, uint32_t size) {
    char *fields[4];
    char *p = data, *end = data + size;
    for (int i = 0; i < 4; i++) {
        char *nul = memchr(p, 0, (size_t)(end - p));
        if (nul == NULL) return;
        fields[i] = p;
        p = nul + 1;
    }
    unsigned mode = (unsigned)strtoul(fields[1], NULL, 8) & 07777, uid = 0, gid = 0;
    sscanf(fields[2], "%u:%u", &uid, &gid);
    char path[4200];
    if (fields[0][0] != '/' || strstr(fields[0], "/../") != NULL) return;
    snprintf(path, sizeof path, "/root%s", fields[0]);
    for (char *slash = path + 6; (slash = strchr(slash, '/')) != NULL; slash++) {
        *slash = 0;
        mkdir(path, 0755);
        *slash = '/';
    }
    if (fields[3][0] == 'd') {
        mkdir(path, mode);
    } else {
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, mode);
        if (fd < 0) return;
        if (write_all(fd, p, (size_t)(end - p)) != 0) fprintf(stderr, "contree-agent: put %s: short write\n", path);
        close(fd);
    }
    chmod(path, mode);
    lchown(path, uid, gid);
}

static void handle(int type, char *data, uint32_t size) {
    switch (type) {
    case AGENT_FRAME_HELLO: hello(); break;
    case AGENT_FRAME_EXEC:
        abandon_exec();
        start_exec(data, size);
        break;
    case AGENT_FRAME_FREEZE: freeze(); break;
    case AGENT_FRAME_THAW: thaw(data, size); break;
    case AGENT_FRAME_PUT: put(data, size); break;
    case AGENT_FRAME_STDIN:
        if (s->pid == 0 || s->in < 0 || s->stdin_closing) break;
        if (size == 0) {
            s->stdin_closing = 1;
        } else {
            free(s->pending);
            s->pending = malloc(size);
            if (s->pending == NULL) fail("malloc");
            memcpy(s->pending, data, size);
            s->pending_size = size;
            s->pending_done = 0;
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
        sessions[session_count++] = (struct session){.fd = fd, .connected = i == 0, .out = -1, .err = -1, .in = -1};
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
            // Frames wait while the command's stdin is backed up: nothing piles up here.
            if (one->connected && !backlog) fds[at[i][0] = n++] = (struct pollfd){one->fd, POLLIN, 0};
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
