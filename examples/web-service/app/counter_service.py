"""A visit counter over HTTP: GET /anything counts the visit in Redis and says how many."""

import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import kvclient

from counter import normalize, render


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        path = normalize(self.path)
        client = kvclient.Client(os.environ.get("REDIS_HOST", "127.0.0.1"), int(os.environ.get("REDIS_PORT", "6379")))
        try:
            count = client.incr("visits:" + path)
        finally:
            client.close()
        body = render(path, count).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print("counting visits on http://127.0.0.1:%d" % server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
