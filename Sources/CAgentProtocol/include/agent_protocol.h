// The wire protocol between the host (VirtualMachine's AgentChannel) and contree-agent, pid 1
// of every VM guest: the one definition of its frame and spec-field types, included by the
// agent's C and imported by Swift.
//
// The channel is the guest's first virtio-serial port. A frame is one type byte, a 4-byte
// little-endian payload length, then the payload (the agent sends at most 64 KiB a frame, a
// host at most AGENT_MAX_FRAME). A live sandbox's agent skips zero bytes between frames.
#ifndef CONTREE_AGENT_PROTOCOL_H
#define CONTREE_AGENT_PROTOCOL_H

// Constants of an anonymous enum: case labels in C, `Int` constants in Swift.
enum {
    AGENT_MAX_FRAME = 1 << 20,
    // A live sandbox's stdin flow control: a host keeps at most this much of a command's stdin
    // sent and not acknowledged by AGENT_FRAME_STDIN_ACK.
    AGENT_STDIN_WINDOW = 1 << 20,

    // Guest -> host.
    AGENT_FRAME_READY = 'R',    // empty: the agent waits for a spec
    AGENT_FRAME_STDOUT = 'O',   // the command's stdout bytes
    AGENT_FRAME_STDERR = 'E',   // the command's stderr bytes
    AGENT_FRAME_LOG = 'L',      // a line about a failure of the agent itself
    AGENT_FRAME_CHANGES = 'T',  // a piece of the run's changes (an OCI layer tar)
    AGENT_FRAME_CACHE = 'C',    // a piece of cache disk N's content as a tar: N as one byte, then the bytes
    // "status=N signal=N utime_us=N stime_us=N maxrss_kb=N processes=N read_bytes=N write_bytes=N"
    AGENT_FRAME_EXIT = 'X',
    // A live sandbox's answers: 'V' "pid=N" once its main process started (0: none); 'H' to a
    // hello, "main=running" or "main=exited status=N signal=N", then " frozen" when frozen;
    // 'F' (empty) once frozen, after its changes; 'W' (empty) once thawed.
    AGENT_FRAME_LIVE = 'V',
    AGENT_FRAME_STDIN_ACK = 'A',  // a live sandbox's: how many more stdin bytes the command took (text)

    // Host -> guest.
    AGENT_FRAME_SPEC = 'S',     // what to run: NUL-terminated spec fields
    AGENT_FRAME_STDIN = 'I',    // stdin bytes; empty: the end of stdin
    AGENT_FRAME_KILL = 'K',     // a signal number (text) for the command
    // A live sandbox's sessions (see live.c): each host connection starts with a hello.
    AGENT_FRAME_HELLO = 'H',    // empty: a new session; what the last one ran is killed
    AGENT_FRAME_EXEC = 'Q',     // spec fields (workdir, user, env, arguments): one more command
    AGENT_FRAME_FREEZE = 'F',   // empty: freeze every process, send the changes, answer 'F'
    AGENT_FRAME_THAW = 'W',     // spec fields (time, entropy, hostname): set them, thaw, answer 'W'
    // A file or directory put into the root before a command (a resumed step's inputs), every
    // path component resolved inside the root: "PATH\0MODE(octal)\0UID:GID\0KIND\0" (KIND 'd'
    // or 'f'). A file's bytes follow in AGENT_FRAME_PUT_DATA frames, an empty one ending them.
    // The agent answers 'P' once a directory is made or a file's bytes ended: empty, or why
    // the put failed.
    AGENT_FRAME_PUT = 'P',
    AGENT_FRAME_PUT_DATA = 'B',

    // Spec fields: each a kind byte then its text, NUL-terminated.
    AGENT_SPEC_LAYER = 'D',     // a read-only layer disk by its serial, bottom first
    AGENT_SPEC_UPPER = 'P',     // the upper disk (ext4 with upper/ and work/)
    AGENT_SPEC_WORKDIR = 'W',
    AGENT_SPEC_USER = 'U',      // uid:gid
    AGENT_SPEC_HOSTNAME = 'H',
    AGENT_SPEC_NETWORK = 'N',   // "none", "loopback" (lo up), "egress", "egress+host-loopback"
    AGENT_SPEC_CACHE = 'C',     // "SERIAL\tPATH": an ext4 cache disk mounted read-write at PATH
    AGENT_SPEC_TIME = 'T',      // the host's CLOCK_REALTIME, seconds.nanoseconds
    AGENT_SPEC_ENTROPY = 'Z',   // host entropy, hex
    AGENT_SPEC_ENV = 'E',       // KEY=VALUE
    AGENT_SPEC_ARGUMENT = 'A',  // the command's arguments, the program first
    AGENT_SPEC_LIVE = 'V',      // empty: keep running after the command (a live sandbox)
    AGENT_SPEC_KEEP = 'K',      // empty, in an exec: the command outlives its session (a run's own)
};

#endif
