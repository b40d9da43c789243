// Tries system calls a sandbox must not make and prints one line per call: its name and the
// errno it failed with ("ok" when it succeeded). Built static by SyscallPolicyTests and run
// inside a busybox sandbox.
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static void report(const char *name, long rc) {
    if (rc >= 0) printf("%s ok\n", name);
    else printf("%s %s\n", name, strerrorname_np(errno));
}

int main(void) {
    report("socket-vsock", syscall(SYS_socket, 40, SOCK_STREAM, 0));
    report("socket-vsock-high-bits", syscall(SYS_socket, 0x100000000L | 40, SOCK_STREAM, 0));
    report("socket-packet", syscall(SYS_socket, 17, SOCK_RAW, 0));
    report("socket-unix", syscall(SYS_socket, AF_UNIX, SOCK_STREAM, 0));
    report("socket-inet6", syscall(SYS_socket, AF_INET6, SOCK_DGRAM, 0));
    char ldt[16] = {0};
    report("modify_ldt", syscall(SYS_modify_ldt, 0, ldt, sizeof ldt));
    report("memfd_secret", syscall(447, 0));
    report("open_tree_attr", syscall(467, -100, "/", 0, NULL, 0));
    report("unknown-1000", syscall(1000, 0));
    report("io_uring_setup", syscall(SYS_io_uring_setup, 1, NULL));
    report("ioctl-tiocsti-high-bits", syscall(SYS_ioctl, 0, 0x100000000L | TIOCSTI, "x"));
    report("unshare-user", syscall(SYS_unshare, 0x10000000));
    report("getpid", syscall(SYS_getpid));
    return 0;
}
