// What agent.c (boot, one command) and live.c (a sandbox that keeps running) share.
#ifndef CONTREE_AGENT_H
#define CONTREE_AGENT_H
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/// The host's port (the first virtio-serial port).
extern int port;

/// 0 when all was written; -1 when the host went away (a live sandbox's port is non-blocking).
int write_all(int fd, const void *data, size_t size);
int send_frame(char type, const void *data, uint32_t size);
/// Reads one frame; returns its type, with the payload in *data (malloc'd, NUL-terminated);
/// -1 when the host went away.
int read_frame(char **data, uint32_t *size);
/// A failure of the agent itself: said on the port (and the console), then the guest stops.
void fail(const char *what);
void set_clock(const char *text);
void add_entropy(const char *hex);
/// Sends the tree under `base` as an OCI layer tar in AGENT_FRAME_CHANGES frames (no end).
void tar_tree(const char *base, const char *relative);
void tar_out(const void *data, size_t size);
void tar_flush(void);
long long processes_created(void);
void disk_bytes(long long *read_bytes, long long *written_bytes);

/// A command started in the root (/root): its working directory made if missing, its user
/// taken, PATH defaulted. `cgroup`: a cgroup.procs file it joins first (or NULL); `group`:
/// whether it leads a process group of its own.
pid_t spawn_in_root(char **argv, char **envp, const char *workdir, unsigned uid, unsigned gid, int in, int out,
    int err, const char *cgroup, int group);

/// A live sandbox: the root is set up; `argv` (may be empty) starts as its main process, then
/// the agent serves host sessions until the guest is stopped. Never returns.
void live_main(char **argv, char **envp, const char *workdir, unsigned uid, unsigned gid);
#endif
