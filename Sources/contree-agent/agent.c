// contree-agent: pid 1 of every contree VM (exec'd by the initramfs's /init once /proc is mounted:
// the Swift runtime it links statically reads /proc before main).
//
// It mounts /dev, /proc and /sys, loads the kernel modules the initramfs carries (in the order
// of /lib/modules/order), and talks to the host over the first virtio-serial port
// (/dev/vport0p1) in frames whose types, and the spec's fields, are defined once in
// agent_protocol.h (shared with the host's Swift). Without an upper disk the upper is a
// tmpfs; the command's program is looked up on PATH. The agent mounts the layers (erofs) under an
// overlay, chroots into it, runs the command with stdin/stdout/stderr on pipes it relays,
// reports, unmounts (so the upper disk is clean for the host) and powers the guest off.
#define _GNU_SOURCE
#include "agent_protocol.h"
#include "agent.h"
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <grp.h>
#include <linux/fs.h>
#include <linux/random.h>
#include <dirent.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <time.h>
#include <unistd.h>

int port = -1;

// SwiftPM links every executable with swiftrt.o, whose constructor hands the program's Swift
// metadata to the Swift runtime. This program has none: these two stand in for what swiftrt.o
// asks of the runtime, so the runtime is not linked at all and the agent stays a small static
// C program (under 1 MB: the initramfs is a third of what it was, and a 128 MiB guest boots).
void swift_addNewDSOImage(const void *image) { (void)image; }
int _swift_backtrace_isThunkFunction(const char *name) {
    (void)name;
    return 0;
}

// Waits until `fd` is ready for `events`; -1 when the host went away (a port whose host is not
// connected polls as hung up).
static int wait_ready(int fd, short events) {
    struct pollfd poller = {fd, events, 0};
    while (poll(&poller, 1, -1) < 0) {
        if (errno != EINTR) return -1;
    }
    return (poller.revents & events) != 0 ? 0 : -1;
}

int write_all(int fd, const void *data, size_t size) {
    const char *p = data;
    while (size > 0) {
        ssize_t n = write(fd, p, size);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) {
            if (wait_ready(fd, POLLOUT) != 0) return -1;
            continue;
        }
        if (n <= 0) return -1;
        p += n;
        size -= (size_t)n;
    }
    return 0;
}

int send_frame(char type, const void *data, uint32_t size) {
    unsigned char header[5] = {(unsigned char)type, size & 0xff, (size >> 8) & 0xff, (size >> 16) & 0xff, size >> 24};
    if (write_all(port, header, 5) != 0) return -1;
    return size > 0 ? write_all(port, data, size) : 0;
}

static void power_off(void) {
    sync();
    reboot(RB_POWER_OFF);
    for (;;) pause();
}

// A failure of the agent itself: said on the port (and the console), then the guest stops.
void fail(const char *what) {
    char line[512];
    int n = snprintf(line, sizeof line, "contree-agent: %s: %s", what, strerror(errno));
    if (port >= 0) send_frame(AGENT_FRAME_LOG, line, (uint32_t)n);
    fprintf(stderr, "%s\n", line);
    power_off();
}

static int read_full(int fd, void *data, size_t size) {
    char *p = data;
    while (size > 0) {
        ssize_t n = read(fd, p, size);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) {
            if (wait_ready(fd, POLLIN) != 0) return -1;
            continue;
        }
        if (n <= 0) return -1;
        p += n;
        size -= (size_t)n;
    }
    return 0;
}

int read_frame(char **data, uint32_t *size) {
    unsigned char header[5];
    if (read_full(port, header, 5) != 0) return -1;
    *size = header[1] | header[2] << 8 | header[3] << 16 | (uint32_t)header[4] << 24;
    *data = malloc(*size + 1);
    if (*data == NULL) return -1;
    if (read_full(port, *data, *size) != 0) {
        free(*data);
        *data = NULL;
        return -1;
    }
    (*data)[*size] = 0;
    return header[0];
}

/// Egress: the first interface that is not `lo` (virtio-net, behind passt on the host) gets the
/// address and route pasta gives containers: 10.0.2.100/24 via 10.0.2.2, MTU 65520.
static void configure_uplink(void) {
    char name[IFNAMSIZ] = "";
    DIR *dir = opendir("/sys/class/net");
    struct dirent *entry;
    while (dir && (entry = readdir(dir)) != NULL) {
        if (entry->d_name[0] != '.' && strcmp(entry->d_name, "lo") != 0) {
            strncpy(name, entry->d_name, IFNAMSIZ - 1);
            break;
        }
    }
    if (dir) closedir(dir);
    if (name[0] == 0) fail("egress: the guest has no network device");
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0) fail("egress: socket");
    struct ifreq request;
    memset(&request, 0, sizeof request);
    strncpy(request.ifr_name, name, IFNAMSIZ - 1);
    struct sockaddr_in *address = (struct sockaddr_in *)&request.ifr_addr;
    address->sin_family = AF_INET;
    inet_pton(AF_INET, "10.0.2.100", &address->sin_addr);
    if (ioctl(sock, SIOCSIFADDR, &request) != 0) fail("egress: set the address");
    inet_pton(AF_INET, "255.255.255.0", &address->sin_addr);
    if (ioctl(sock, SIOCSIFNETMASK, &request) != 0) fail("egress: set the netmask");
    request.ifr_mtu = 65520;
    ioctl(sock, SIOCSIFMTU, &request);
    if (ioctl(sock, SIOCGIFFLAGS, &request) != 0) fail("egress: read the flags");
    request.ifr_flags |= IFF_UP | IFF_RUNNING;
    if (ioctl(sock, SIOCSIFFLAGS, &request) != 0) fail("egress: bring the interface up");
    struct rtentry route;
    memset(&route, 0, sizeof route);
    struct sockaddr_in *gateway = (struct sockaddr_in *)&route.rt_gateway;
    gateway->sin_family = AF_INET;
    inet_pton(AF_INET, "10.0.2.2", &gateway->sin_addr);
    ((struct sockaddr_in *)&route.rt_dst)->sin_family = AF_INET;
    ((struct sockaddr_in *)&route.rt_genmask)->sin_family = AF_INET;
    route.rt_flags = RTF_UP | RTF_GATEWAY;
    route.rt_dev = name;
    if (ioctl(sock, SIOCADDRT, &route) != 0) fail("egress: add the default route");
    close(sock);
}

static void load_modules(void) {
    FILE *order = fopen("/lib/modules/order", "r");
    if (order == NULL) return;
    char name[128];
    while (fgets(name, sizeof name, order) != NULL) {
        name[strcspn(name, "\n")] = 0;
        if (name[0] == 0) continue;
        char path[256];
        snprintf(path, sizeof path, "/lib/modules/%s.ko", name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || (syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST)) {
            fprintf(stderr, "contree-agent: loading %s: %s\n", name, strerror(errno));
        }
        if (fd >= 0) close(fd);
    }
    fclose(order);
}

// The first virtio-serial port appears once its driver has probed the device.
static void open_port(void) {
    for (int i = 0; i < 500; i++) {
        port = open("/dev/vport0p1", O_RDWR | O_CLOEXEC);
        if (port >= 0) return;
        usleep(10000);
    }
    fail("no virtio-serial port (/dev/vport0p1)");
}

// The disk whose virtio serial is `serial` (QEMU's `serial=` option): its /dev path.
static int find_disk(const char *serial, char *device, size_t size) {
    for (int attempt = 0; attempt < 300; attempt++) {
        for (char letter = 'a'; letter <= 'z'; letter++) {
            char path[64], text[64] = "";
            snprintf(path, sizeof path, "/sys/block/vd%c/serial", letter);
            int fd = open(path, O_RDONLY | O_CLOEXEC);
            if (fd < 0) continue;
            ssize_t n = read(fd, text, sizeof text - 1);
            close(fd);
            if (n > 0) text[strcspn(text, "\n")] = 0;
            if (n > 0 && strcmp(text, serial) == 0) {
                snprintf(device, size, "/dev/vd%c", letter);
                // A restored guest probed the template's disks: drop what it cached of them.
                int disk = open(device, O_RDONLY | O_CLOEXEC);
                if (disk >= 0) {
                    ioctl(disk, BLKFLSBUF, 0);
                    close(disk);
                }
                return 0;
            }
        }
        usleep(10000);  // the disk may still be probing
    }
    errno = ENODEV;
    return -1;
}

// The host's time ("SECONDS.NANOSECONDS"): a restored guest wakes with the template's clock.
void set_clock(const char *text) {
    long long seconds = 0, nanoseconds = 0;
    if (sscanf(text, "%lld.%lld", &seconds, &nanoseconds) < 1) return;
    struct timespec now = {.tv_sec = seconds, .tv_nsec = nanoseconds};
    clock_settime(CLOCK_REALTIME, &now);
}

// Fresh host entropy (hex), credited and made the kernel's random state at once: clones of
// one template must never share random numbers.
void add_entropy(const char *hex) {
    struct {
        int entropy_count;
        int buf_size;
        unsigned char buf[256];
    } pool = {0, 0, {0}};
    size_t n = strlen(hex) / 2;
    if (n > sizeof pool.buf) n = sizeof pool.buf;
    for (size_t i = 0; i < n; i++) sscanf(hex + 2 * i, "%2hhx", &pool.buf[i]);
    pool.buf_size = (int)n;
    pool.entropy_count = (int)n * 8;
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0) return;
    ioctl(fd, RNDADDENTROPY, &pool);
    ioctl(fd, RNDRESEEDCRNG, 0);
    close(fd);
}

// The run's changes go to the host as an OCI layer tar in AGENT_FRAME_CHANGES frames: the host unpacks it with
// the same extractor it uses for registry layers (refusing paths that escape), so it never
// mounts a file system the guest wrote. Overlay whiteouts become `.wh.` entries, opaque
// directories `.wh..wh..opq`.
static char tar_buffer[65536];
static size_t tar_length;
/// >= 0 while a cache disk's content is sent (AGENT_FRAME_CACHE frames, that index first).
static int tar_cache = -1;

void tar_flush(void) {
    static char frame[sizeof tar_buffer + 1];
    if (tar_length > 0 && tar_cache < 0) send_frame(AGENT_FRAME_CHANGES, tar_buffer, (uint32_t)tar_length);
    if (tar_length > 0 && tar_cache >= 0) {
        frame[0] = (char)tar_cache;
        memcpy(frame + 1, tar_buffer, tar_length);
        send_frame(AGENT_FRAME_CACHE, frame, (uint32_t)tar_length + 1);
    }
    tar_length = 0;
}

void tar_out(const void *data, size_t size) {
    const char *p = data;
    while (size > 0) {
        size_t room = sizeof tar_buffer - tar_length, n = size < room ? size : room;
        memcpy(tar_buffer + tar_length, p, n);
        tar_length += n;
        p += n;
        size -= n;
        if (tar_length == sizeof tar_buffer) tar_flush();
    }
}

static void tar_pad(unsigned long long size) {
    static const char zeros[512];
    if (size % 512 != 0) tar_out(zeros, 512 - size % 512);
}

static void octal(char *field, int width, unsigned long long value) {
    char text[32];
    snprintf(text, sizeof text, "%0*llo", width - 1, value);
    memcpy(field, text, (size_t)width - 1);
}

// One PAX record, "LENGTH KEY=VALUE\n", whose length counts its own digits.
static size_t pax_record(char *out, size_t room, const char *key, const char *value) {
    size_t body = strlen(key) + strlen(value) + 3, total = body + 1;
    while (snprintf(NULL, 0, "%zu", total) + body != total) total++;
    return (size_t)snprintf(out, room, "%zu %s=%s\n", total, key, value);
}

static void tar_header(
    const char *name, char type, const struct stat *st, unsigned long long size, const char *link) {
    // ustar's fields hold 11 octal digits of size (8 GiB) and 7 of ids: PAX carries the rest.
    int large = size >= 077777777777ULL || st->st_uid > 07777777 || st->st_gid > 07777777;
    if (strlen(name) > 99 || (link != NULL && strlen(link) > 99) || large) {
        char records[9000], number[32];
        size_t length = pax_record(records, sizeof records, "path", name);
        if (link != NULL) length += pax_record(records + length, sizeof records - length, "linkpath", link);
        snprintf(number, sizeof number, "%llu", size);
        length += pax_record(records + length, sizeof records - length, "size", number);
        snprintf(number, sizeof number, "%u", (unsigned)st->st_uid);
        length += pax_record(records + length, sizeof records - length, "uid", number);
        snprintf(number, sizeof number, "%u", (unsigned)st->st_gid);
        length += pax_record(records + length, sizeof records - length, "gid", number);
        struct stat plain = {0};
        tar_header("PaxHeader", 'x', &plain, length, NULL);
        tar_out(records, length);
        tar_pad(length);
    }
    char h[512];
    memset(h, 0, sizeof h);
    strncpy(h, name, 99);
    octal(h + 100, 8, st->st_mode & 07777);
    octal(h + 108, 8, st->st_uid > 07777777 ? 0 : st->st_uid);
    octal(h + 116, 8, st->st_gid > 07777777 ? 0 : st->st_gid);
    octal(h + 124, 12, size >= 077777777777ULL ? 0 : size);
    octal(h + 136, 12, st->st_mtime > 0 ? (unsigned long long)st->st_mtime : 0);
    h[156] = type;
    if (link != NULL) strncpy(h + 157, link, 99);
    memcpy(h + 257, "ustar", 6);
    memcpy(h + 263, "00", 2);
    if (type == '3' || type == '4') {
        octal(h + 329, 8, major(st->st_rdev));
        octal(h + 337, 8, minor(st->st_rdev));
    }
    memset(h + 148, ' ', 8);
    unsigned sum = 0;
    for (int i = 0; i < 512; i++) sum += (unsigned char)h[i];
    snprintf(h + 148, 8, "%06o", sum);
    h[155] = ' ';
    tar_out(h, 512);
}

void tar_tree(const char *base, const char *relative) {
    char path[4096];
    snprintf(path, sizeof path, "%s%s%s", base, relative[0] ? "/" : "", relative);
    DIR *directory = opendir(path);
    if (directory == NULL) return;
    struct dirent *entry;
    while ((entry = readdir(directory)) != NULL) {
        if (strcmp(entry->d_name, ".") == 0 || strcmp(entry->d_name, "..") == 0) continue;
        char name[4096], full[4096];
        snprintf(name, sizeof name, "%s%s%s", relative, relative[0] ? "/" : "", entry->d_name);
        snprintf(full, sizeof full, "%s/%s", base, name);
        struct stat st;
        if (lstat(full, &st) != 0) continue;
        if (S_ISCHR(st.st_mode) && st.st_rdev == 0) {  // an overlay whiteout
            char whiteout[4200];
            snprintf(whiteout, sizeof whiteout, "%s%s.wh.%s", relative, relative[0] ? "/" : "", entry->d_name);
            struct stat plain = st;
            plain.st_mode = S_IFREG | 0644;
            tar_header(whiteout, '0', &plain, 0, NULL);
        } else if (S_ISDIR(st.st_mode)) {
            tar_header(name, '5', &st, 0, NULL);
            char value[8];
            ssize_t n = lgetxattr(full, "trusted.overlay.opaque", value, sizeof value);
            if (n == 1 && value[0] == 'y') {
                char opaque[4200];
                snprintf(opaque, sizeof opaque, "%s/.wh..wh..opq", name);
                struct stat plain = st;
                plain.st_mode = S_IFREG | 0644;
                tar_header(opaque, '0', &plain, 0, NULL);
            }
            tar_tree(base, name);
        } else if (S_ISREG(st.st_mode)) {
            int fd = open(full, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
            if (fd < 0) continue;
            tar_header(name, '0', &st, (unsigned long long)st.st_size, NULL);
            unsigned long long left = (unsigned long long)st.st_size;
            char chunk[65536];
            while (left > 0) {
                ssize_t n = read(fd, chunk, left < sizeof chunk ? left : sizeof chunk);
                if (n <= 0) {  // shorter than it said: pad with zeros so the stream stays whole
                    memset(chunk, 0, sizeof chunk);
                    n = (ssize_t)(left < sizeof chunk ? left : sizeof chunk);
                }
                tar_out(chunk, (size_t)n);
                left -= (unsigned long long)n;
            }
            close(fd);
            tar_pad((unsigned long long)st.st_size);
        } else if (S_ISLNK(st.st_mode)) {
            char target[4096];
            ssize_t n = readlink(full, target, sizeof target - 1);
            if (n < 0) continue;
            target[n] = 0;
            tar_header(name, '2', &st, 0, target);
        } else if (S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode) || S_ISFIFO(st.st_mode)) {
            tar_header(name, S_ISCHR(st.st_mode) ? '3' : S_ISBLK(st.st_mode) ? '4' : '6', &st, 0, NULL);
        }
    }
    closedir(directory);
}

// Processes created since boot (/proc/stat's "processes").
long long processes_created(void) {
    FILE *stat = fopen("/proc/stat", "r");
    if (stat == NULL) return 0;
    char line[256];
    long long count = 0;
    while (fgets(line, sizeof line, stat) != NULL) {
        if (sscanf(line, "processes %lld", &count) == 1) break;
    }
    fclose(stat);
    return count;
}

// Bytes read from and written to the virtio disks since boot (/proc/diskstats sectors).
void disk_bytes(long long *read_bytes, long long *written_bytes) {
    *read_bytes = *written_bytes = 0;
    FILE *stats = fopen("/proc/diskstats", "r");
    if (stats == NULL) return;
    char line[512], name[64];
    unsigned long long v[11];
    while (fgets(line, sizeof line, stats) != NULL) {
        int fields = sscanf(
            line, "%*u %*u %63s %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu", name, &v[0], &v[1], &v[2],
            &v[3], &v[4], &v[5], &v[6], &v[7], &v[8], &v[9], &v[10]);
        if (fields < 8 || strncmp(name, "vd", 2) != 0 || strlen(name) != 3) continue;  // whole disks only
        *read_bytes += (long long)v[2] * 512;
        *written_bytes += (long long)v[6] * 512;
    }
    fclose(stats);
}

#define MAX_FIELDS 4096

pid_t spawn_in_root(char **argv, char **envp, const char *workdir, unsigned uid, unsigned gid, int in, int out,
    int err, const char *cgroup, int group) {
    pid_t child = fork();
    if (child != 0) return child;
    dup2(in, 0);
    dup2(out, 1);
    dup2(err, 2);
    if (group) setpgid(0, 0);
    if (cgroup != NULL) {  // joined before anything runs, so a freeze holds all it starts
        int fd = open(cgroup, O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, "0", 1) != 1) {
            dprintf(2, "contree-agent: cannot join the sandbox's cgroup: %s\n", strerror(errno));
            _exit(125);
        }
        close(fd);
    }
    // The working directory is made if missing, as the container backend does.
    char path[4096];
    snprintf(path, sizeof path, "%s", workdir);
    if (chroot("/root") != 0) {
        dprintf(2, "contree-agent: cannot enter the root: %s\n", strerror(errno));
        _exit(125);
    }
    if (path[0] == '/') {
        for (size_t i = 1; path[i - 1] != 0; i++) {
            if (path[i] != '/' && path[i] != 0) continue;
            char saved = path[i];
            path[i] = 0;
            mkdir(path, 0755);
            path[i] = saved;
        }
    }
    if (chdir(workdir) != 0) {
        dprintf(2, "contree-agent: cannot enter %s: %s\n", workdir, strerror(errno));
        _exit(125);
    }
    if ((gid != 0 && (setgroups(0, NULL) != 0 || setgid(gid) != 0)) || (uid != 0 && setuid(uid) != 0)) {
        dprintf(2, "contree-agent: cannot become %u:%u: %s\n", uid, gid, strerror(errno));
        _exit(125);
    }
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);  // a live agent blocks the signals it reads
    for (char **e = envp; *e != NULL; e++) putenv(*e);
    if (getenv("PATH") == NULL) putenv("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    execvp(argv[0], argv);
    dprintf(2, "contree-agent: %s: %s\n", argv[0], strerror(errno));
    _exit(errno == ENOENT ? 127 : 126);
}

int main(void) {
    mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
    mount("proc", "/proc", "proc", 0, NULL);
    mount("sysfs", "/sys", "sysfs", 0, NULL);
    load_modules();
    open_port();
    send_frame(AGENT_FRAME_READY, NULL, 0);

    char *spec;
    uint32_t spec_size;
    if (read_frame(&spec, &spec_size) != AGENT_FRAME_SPEC) fail("the host sent no spec");
    char *argv[MAX_FIELDS + 1], *envp[MAX_FIELDS + 1], *disks[24];
    int argc = 0, envc = 0, diskc = 0;
    const char *workdir = "/", *upper_disk = NULL, *hostname = NULL;
    unsigned uid = 0, gid = 0;
    int loopback = 0, egress = 0, live = 0;
    char *caches[8];
    int cachec = 0;
    for (char *field = spec; field < spec + spec_size; field += strlen(field) + 1) {
        switch (field[0]) {
        case AGENT_SPEC_LAYER: if (diskc < 24) disks[diskc++] = field + 1; break;
        case AGENT_SPEC_UPPER: upper_disk = field + 1; break;
        case AGENT_SPEC_WORKDIR: workdir = field + 1; break;
        case AGENT_SPEC_USER: sscanf(field + 1, "%u:%u", &uid, &gid); break;
        case AGENT_SPEC_HOSTNAME: hostname = field + 1; break;
        case AGENT_SPEC_NETWORK:
            egress = strncmp(field + 1, "egress", 6) == 0;
            loopback = egress || strcmp(field + 1, "loopback") == 0;
            break;
        case AGENT_SPEC_CACHE: if (cachec < 8) caches[cachec++] = field + 1; break;
        case AGENT_SPEC_TIME: set_clock(field + 1); break;
        case AGENT_SPEC_ENTROPY: add_entropy(field + 1); break;
        case AGENT_SPEC_ENV: if (envc < MAX_FIELDS) envp[envc++] = field + 1; break;
        case AGENT_SPEC_ARGUMENT: if (argc < MAX_FIELDS) argv[argc++] = field + 1; break;
        case AGENT_SPEC_LIVE: live = 1; break;
        }
    }
    argv[argc] = NULL;
    envp[envc] = NULL;
    if (argc == 0 && !live) fail("the spec names no command");
    if (live && cachec > 0) fail("a live sandbox takes no cache disks");

    // The root: the layers (erofs, read-only) under an overlay whose upper is a tmpfs.
    mkdir("/layers", 0755);
    mkdir("/scratch", 0755);
    mkdir("/root", 0755);
    if (upper_disk != NULL) {
        char device[64];
        if (find_disk(upper_disk, device, sizeof device) != 0) fail(upper_disk);
        if (mount(device, "/scratch", "ext4", 0, NULL) != 0) fail("mount the upper disk");
    } else if (mount("tmpfs", "/scratch", "tmpfs", 0, "mode=0755") != 0) {
        fail("mount tmpfs");
    }
    mkdir("/scratch/upper", 0755);
    mkdir("/scratch/work", 0755);
    if (hostname != NULL) sethostname(hostname, strlen(hostname));
    if (egress) configure_uplink();
    if (loopback) {  // `lo` up, as the container backend does
        int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        struct ifreq request;
        memset(&request, 0, sizeof request);
        strncpy(request.ifr_name, "lo", IFNAMSIZ - 1);
        if (sock >= 0 && ioctl(sock, SIOCGIFFLAGS, &request) == 0) {
            request.ifr_flags |= IFF_UP | IFF_RUNNING;
            ioctl(sock, SIOCSIFFLAGS, &request);
        }
        if (sock >= 0) close(sock);
    }
    char lower[4096] = "";
    for (int i = diskc - 1; i >= 0; i--) {  // overlay lists the top layer first
        char device[64], target[64];
        if (find_disk(disks[i], device, sizeof device) != 0) fail(disks[i]);
        snprintf(target, sizeof target, "/layers/%d", i);
        mkdir(target, 0755);
        if (mount(device, target, "erofs", MS_RDONLY, NULL) != 0) fail(device);
        if (lower[0] != 0) strncat(lower, ":", sizeof lower - strlen(lower) - 1);
        strncat(lower, target, sizeof lower - strlen(lower) - 1);
    }
    char options[4200];
    snprintf(options, sizeof options, "lowerdir=%s,upperdir=/scratch/upper,workdir=/scratch/work", lower);
    if (diskc == 0 || mount("overlay", "/root", "overlay", 0, options) != 0) fail("mount the root overlay");
    mkdir("/root/proc", 0555);
    mkdir("/root/dev", 0755);
    if (mkdir("/root/tmp", 01777) == 0) chmod("/root/tmp", 01777);  // not the umask's 01755
    mount("proc", "/root/proc", "proc", 0, NULL);
    // A /dev like the container backend's: the command sees no disk and not the agent's port.
    if (mount("tmpfs", "/root/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=1m") == 0) {
        static const struct { const char *name; unsigned major, minor; } nodes[] = {
            {"null", 1, 3}, {"zero", 1, 5}, {"full", 1, 7}, {"random", 1, 8}, {"urandom", 1, 9}, {"tty", 5, 0},
        };
        for (size_t i = 0; i < sizeof nodes / sizeof nodes[0]; i++) {
            char node[64];
            snprintf(node, sizeof node, "/root/dev/%s", nodes[i].name);
            mknod(node, S_IFCHR | 0666, makedev(nodes[i].major, nodes[i].minor));
            chmod(node, 0666);
        }
        symlink("/proc/self/fd", "/root/dev/fd");
        symlink("/proc/self/fd/0", "/root/dev/stdin");
        symlink("/proc/self/fd/1", "/root/dev/stdout");
        symlink("/proc/self/fd/2", "/root/dev/stderr");
        mkdir("/root/dev/pts", 0755);
        mount("devpts", "/root/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620");
        symlink("pts/ptmx", "/root/dev/ptmx");
        mkdir("/root/dev/shm", 01777);
        mount("shm", "/root/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    }

    // Cache disks, read-write at their paths. Mount points the image lacks are made here; the
    // host removes them from the change (as for a container).
    char cache_targets[8][512];
    for (int i = 0; i < cachec; i++) {
        char *tab = strchr(caches[i], '\t');
        if (tab == NULL) fail("a cache field without a path");
        *tab = 0;
        char device[64];
        if (find_disk(caches[i], device, sizeof device) != 0) fail(caches[i]);
        snprintf(cache_targets[i], sizeof cache_targets[i], "/root%s", tab + 1);
        char path[512];
        snprintf(path, sizeof path, "%s", cache_targets[i]);
        for (char *p = path + 6; *p; p++) {  // mkdir -p below /root
            if (*p != '/') continue;
            *p = 0;
            mkdir(path, 0755);
            *p = '/';
        }
        mkdir(path, 0755);
        if (mount(device, cache_targets[i], "ext4", MS_NOSUID | MS_NODEV, NULL) != 0) fail("mount a cache disk");
        char lost[600];
        snprintf(lost, sizeof lost, "%s/lost+found", cache_targets[i]);
        rmdir(lost);  // mke2fs made it; the cache never had it
    }

    // Egress: /etc/resolv.conf names the DNS forwarder, as a mount over the image's file (made
    // empty when missing; the host removes it from the change): never part of the change.
    if (egress) {
        int fd = open("/resolv.conf", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd >= 0) {
            const char text[] = "nameserver 10.0.2.3\noptions ndots:0\n";
            write_all(fd, text, sizeof text - 1);
            close(fd);
        }
        struct stat st;
        if (lstat("/root/etc/resolv.conf", &st) != 0) {
            mkdir("/root/etc", 0755);
            int created = open("/root/etc/resolv.conf", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
            if (created >= 0) close(created);
        }
        if (lstat("/root/etc/resolv.conf", &st) == 0 && S_ISREG(st.st_mode))
            mount("/resolv.conf", "/root/etc/resolv.conf", NULL, MS_BIND, NULL);
    }

    if (live) live_main(argv, envp, workdir, uid, gid);

    long long processes_before = processes_created(), read_before, written_before;
    disk_bytes(&read_before, &written_before);
    int out[2], err[2], in[2];
    if (pipe2(out, O_CLOEXEC) != 0 || pipe2(err, O_CLOEXEC) != 0 || pipe2(in, O_CLOEXEC) != 0) fail("pipe");
    pid_t child = spawn_in_root(argv, envp, workdir, uid, gid, in[0], out[1], err[1], NULL, 0);
    if (child < 0) fail("fork");
    close(out[1]);
    close(err[1]);
    close(in[0]);

    // Relay: the command's output to the host, the host's stdin frames to the command (never
    // blocking on the command's stdin: what it has not read yet waits here), AGENT_FRAME_KILL frames as
    // signals to it. When the command exits, what it left running is killed, so a background
    // child holding the pipes cannot keep the run alive.
    int exit_fd = (int)syscall(SYS_pidfd_open, child, 0);  // readable once the command exits
    struct pollfd fds[5] = {
        {out[0], POLLIN, 0}, {err[0], POLLIN, 0}, {port, POLLIN, 0}, {-1, POLLOUT, 0}, {exit_fd, POLLIN, 0}};
    int open_outputs = 2, stdin_fd = in[1], stdin_closing = 0, status = 0, exited = 0;
    struct rusage usage;
    memset(&usage, 0, sizeof usage);
    fcntl(stdin_fd, F_SETFL, fcntl(stdin_fd, F_GETFL) | O_NONBLOCK);
    char *pending = NULL;
    size_t pending_size = 0, pending_done = 0;
    char buffer[65536];
    while (open_outputs > 0) {
        fds[3].fd = pending_size > pending_done ? stdin_fd : -1;
        // Stop reading frames while stdin is backed up: the host waits, nothing piles up here.
        fds[2].events = pending_size > pending_done ? 0 : POLLIN;
        int ready = poll(fds, 5, exited || exit_fd >= 0 ? -1 : 100);
        if (ready < 0) {
            if (errno == EINTR) continue;
            fail("poll");
        }
        if (!exited && (exit_fd < 0 || fds[4].revents != 0)) {
            pid_t done = wait4(child, &status, WNOHANG, &usage);
            if (done == child) {
                exited = 1;
                fds[4].fd = -1;
                kill(-1, SIGKILL);  // everything but pid 1: the pipes close and the loop ends
            }
        }
        for (int i = 0; i < 2; i++) {
            if (fds[i].fd < 0 || fds[i].revents == 0) continue;
            ssize_t n = read(fds[i].fd, buffer, sizeof buffer);
            if (n > 0) {
                send_frame(i == 0 ? AGENT_FRAME_STDOUT : AGENT_FRAME_STDERR, buffer, (uint32_t)n);
            } else if (n == 0 || errno != EINTR) {
                close(fds[i].fd);
                fds[i].fd = -1;
                open_outputs--;
            }
        }
        if (fds[3].fd >= 0 && fds[3].revents != 0) {
            ssize_t n = write(stdin_fd, pending + pending_done, pending_size - pending_done);
            if (n > 0) pending_done += (size_t)n;
            if (n < 0 && errno != EAGAIN && errno != EINTR) pending_done = pending_size;  // the reader is gone
        }
        if (pending_size > 0 && pending_done == pending_size) {
            free(pending);
            pending = NULL;
            pending_size = pending_done = 0;
        }
        if (stdin_closing && pending_size == 0 && stdin_fd >= 0) {
            close(stdin_fd);
            stdin_fd = -1;
        }
        if (fds[2].fd >= 0 && pending_size > 0 && (fds[2].revents & (POLLHUP | POLLERR)) != 0) {
            // The host went away while stdin was backed up: no frame is read (the next stdin frame
            // would replace the pending one), the command goes with the host, as below.
            fds[2].fd = -1;
            if (!exited) kill(child, SIGKILL);
        } else if (fds[2].fd >= 0 && (fds[2].revents & (POLLIN | POLLHUP | POLLERR)) != 0) {
            char *data;
            uint32_t size;
            int type = read_frame(&data, &size);
            if (type < 0) {  // the host went away: so does its command
                fds[2].fd = -1;
                if (!exited) kill(child, SIGKILL);
            } else if (type == AGENT_FRAME_STDIN && stdin_fd >= 0 && !stdin_closing) {
                if (size == 0) {
                    stdin_closing = 1;
                    if (pending_size == 0) {
                        close(stdin_fd);
                        stdin_fd = -1;
                    }
                } else {
                    pending = data;  // taken over: freed once written
                    pending_size = size;
                    pending_done = 0;
                    data = NULL;
                }
            } else if (type == AGENT_FRAME_KILL && size > 0 && !exited) {
                int signal_number = atoi(data);
                if (signal_number > 0 && signal_number < 65) kill(child, signal_number);
            }
            free(data);
        }
    }
    free(pending);
    if (exit_fd >= 0) close(exit_fd);
    if (stdin_fd >= 0) close(stdin_fd);
    while (!exited && wait4(child, &status, 0, &usage) < 0 && errno == EINTR) {}
    long long processes = processes_created() - processes_before;
    // What the command left running dies; the upper disk is unmounted clean for the host.
    kill(-1, SIGKILL);
    while (wait(NULL) > 0 || errno == EINTR) {}
    umount2("/root/proc", MNT_DETACH);
    umount2("/root/dev/pts", MNT_DETACH);
    umount2("/root/dev/shm", MNT_DETACH);
    umount2("/root/dev", MNT_DETACH);
    if (egress) umount2("/root/etc/resolv.conf", MNT_DETACH);
    // Each cache's content goes back as a tar the host checks like the changes (it never
    // mounts or parses the disk the guest wrote); only a clean end of the command gets here.
    for (int i = 0; i < cachec; i++) {
        tar_cache = i;
        tar_tree(cache_targets[i], "");
        static const char end_of_cache[1024];
        tar_out(end_of_cache, sizeof end_of_cache);
        tar_flush();
        tar_cache = -1;
    }
    for (int i = cachec - 1; i >= 0; i--) umount2(cache_targets[i], 0);
    umount2("/root", 0);
    if (upper_disk != NULL) {  // the changes, then the end of the archive
        tar_tree("/scratch/upper", "");
        static const char end[1024];
        tar_out(end, sizeof end);
        tar_flush();
    }
    sync();
    umount2("/scratch", 0);
    // Block I/O counted once the command's writes reached the disk.
    long long read_after, written_after;
    disk_bytes(&read_after, &written_after);
    char report[384];
    int n = snprintf(
        report, sizeof report,
        "status=%d signal=%d utime_us=%lld stime_us=%lld maxrss_kb=%ld processes=%lld read_bytes=%lld write_bytes=%lld",
        WIFEXITED(status) ? WEXITSTATUS(status) : -1, WIFSIGNALED(status) ? WTERMSIG(status) : 0,
        (long long)usage.ru_utime.tv_sec * 1000000 + usage.ru_utime.tv_usec,
        (long long)usage.ru_stime.tv_sec * 1000000 + usage.ru_stime.tv_usec, usage.ru_maxrss, processes,
        read_after - read_before, written_after - written_before);
    send_frame(AGENT_FRAME_EXIT, report, (uint32_t)n);
    power_off();
}
