"""kvclient: a small Redis client (RESP over a socket), the example's one dependency.

It is served to the pipeline as a wheel by ../serve_packages.py, the way a company's package
index serves its internal libraries.
"""

import socket

__version__ = "1.0.0"


class KVError(Exception):
    pass


class Client:
    def __init__(self, host="127.0.0.1", port=6379, timeout=5.0):
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._file = self._sock.makefile("rb")

    def close(self):
        self._file.close()
        self._sock.close()

    def command(self, *args):
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self._sock.sendall(b"".join(parts))
        return self._reply()

    def _reply(self):
        line = self._file.readline()
        if not line:
            raise KVError("connection closed")
        kind, rest = line[:1], line[1:].rstrip(b"\r\n")
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise KVError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            length = int(rest)
            if length < 0:
                return None
            data = self._file.read(length + 2)[:-2]
            return data.decode()
        if kind == b"*":
            return [self._reply() for _ in range(int(rest))]
        raise KVError("unexpected reply %r" % line)

    def ping(self):
        return self.command("PING")

    def incr(self, key):
        return self.command("INCR", key)

    def get(self, key):
        return self.command("GET", key)
