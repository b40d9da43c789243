#!/usr/bin/env python3
"""The example's package server: builds packages/kvclient into a wheel and serves it as a PEP
503 "simple" index on the host's loopback, where the pipeline's `deps` step reaches it through
egress with host-loopback ($CONTREE_HOST). Stands in for a company's internal index or a PyPI
mirror; nothing leaves the machine.

    python3 serve_packages.py [PORT]    # default 18631; prints "serving PORT" when ready
"""

import base64
import hashlib
import http.server
import os
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
NAME, VERSION = "kvclient", "1.0.0"


def build_wheel(directory):
    """A py3-none-any wheel of packages/kvclient (the format is a zip with dist-info)."""
    wheel = "%s-%s-py3-none-any.whl" % (NAME, VERSION)
    info = "%s-%s.dist-info" % (NAME, VERSION)
    files = {}
    source = os.path.join(HERE, "packages", NAME, NAME)
    for name in sorted(os.listdir(source)):
        if name.endswith(".py"):
            with open(os.path.join(source, name), "rb") as f:
                files["%s/%s" % (NAME, name)] = f.read()
    files[info + "/METADATA"] = (
        "Metadata-Version: 2.1\nName: %s\nVersion: %s\nSummary: A small Redis client\n" % (NAME, VERSION)
    ).encode()
    files[info + "/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: serve_packages.py\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append("%s,sha256=%s,%d" % (path, digest, len(data)))
    record.append(info + "/RECORD,,")
    files[info + "/RECORD"] = ("\n".join(record) + "\n").encode()
    path = os.path.join(directory, "packages", wheel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            entry = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            entry.external_attr = 0o644 << 16
            z.writestr(entry, data)
    with open(path, "rb") as f:
        return wheel, hashlib.sha256(f.read()).hexdigest()


class Handler(http.server.SimpleHTTPRequestHandler):
    """Files as PyPI serves them: wheels are immutable (pip keeps them in its HTTP cache, which
    the pipeline's `pip` cache carries between runs), index pages fresh for ten minutes."""

    def end_headers(self):
        immutable = self.path.startswith("/packages/")
        self.send_header("Cache-Control", "max-age=365000000, immutable, public" if immutable else "max-age=600, public")
        super().end_headers()

    def log_message(self, format, *args):
        pass


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 18631
    root = tempfile.mkdtemp(prefix="web-service-index-")
    wheel, sha = build_wheel(root)
    os.makedirs(os.path.join(root, "simple", NAME))
    with open(os.path.join(root, "simple", "index.html"), "w") as f:
        f.write('<html><body><a href="%s/">%s</a></body></html>\n' % (NAME, NAME))
    with open(os.path.join(root, "simple", NAME, "index.html"), "w") as f:
        f.write('<html><body><a href="../../packages/%s#sha256=%s">%s</a></body></html>\n' % (wheel, sha, wheel))
    os.chdir(root)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print("serving %d" % server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
