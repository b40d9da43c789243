"""The same counter from a shell: counter-cli PATH counts one visit and prints the total."""

import os
import sys

import kvclient

from counter import normalize, render


def main():
    path = normalize(sys.argv[1] if len(sys.argv) > 1 else "/")
    client = kvclient.Client(os.environ.get("REDIS_HOST", "127.0.0.1"), int(os.environ.get("REDIS_PORT", "6379")))
    try:
        sys.stdout.write(render(path, client.incr("visits:" + path)))
    finally:
        client.close()


if __name__ == "__main__":
    main()
