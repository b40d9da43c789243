"""Acceptance test: contree-sdk 0.3.6 against `contree-pipeline serve --isolation vm`.

Runs in VMs through the SDK; a long-lived instance takes the spec's subprocess calls; the
memory-snapshot extension (docs/serve.md: POST /x-contree/instances/{id}/snapshot and
/x-contree/images/{uuid}/resume) is driven through the SDK's own authenticated transport.

Environment (set by acceptance/clients/run): CONTREE_TEST_VM_URL, CONTREE_TEST_TOKEN.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

from contree_sdk import ContreeSync
from contree_sdk._internals.utils.wrapper import coro_sync

URL = os.environ["CONTREE_TEST_VM_URL"]
TOKEN = os.environ["CONTREE_TEST_TOKEN"]
STEP = "start"
ASK = "for t in $(seq 50); do nc 127.0.0.1 7000 </dev/null && exit 0; sleep 0.1; done; exit 1"


class CheckFailed(Exception):
    pass


def step(name: str) -> None:
    global STEP
    STEP = name
    print(f"--- sdk-vm: {name}", flush=True)


def check(cond: bool, message: str) -> None:
    if not cond:
        raise CheckFailed(message)


async def _send(c: ContreeSync, method: str, path: str, body: dict | None):
    return await c._api._client.request(method, path, json=body, timeout=300)


def call(c: ContreeSync, method: str, path: str, body: dict | None = None):
    """A request through the SDK's transport (its base URL and bearer token, its event loop)."""
    response = coro_sync(_send(c, method, path, body))
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, None


def wait(c: ContreeSync, operation: str, seconds: float = 120.0) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        status, record = call(c, "GET", f"/v1/operations/{operation}")
        check(status == 200, f"GET operation {operation}: {status} {record}")
        if record["status"] in ("SUCCESS", "FAILED", "CANCELLED") or time.monotonic() > deadline:
            return record
        time.sleep(0.2)


def subprocess_output(c: ContreeSync, operation: str, command: str, seconds: float = 60.0) -> str:
    status, body = call(c, "POST", f"/v1/operations/{operation}/subprocesses", {"command": command, "shell": True})
    check(status == 201, f"subprocess {command!r}: {status} {body}")
    spid = body["spid"]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status, result = call(c, "GET", f"/v1/operations/{operation}/subprocesses/{spid}")
        state = (result or {}).get("state") or {}
        # While it runs the result says exit_code -1 and signal -1.
        code, signal = state.get("exit_code"), state.get("signal")
        if status == 200 and ((code is not None and code >= 0) or (signal is not None and signal > 0)):
            check(state["exit_code"] == 0, f"subprocess {command!r} exited {state}: {result}")
            return result["stdout"]["value"]
        time.sleep(0.2)
    raise CheckFailed(f"subprocess {command!r} of {operation} did not end in {seconds} s")


def main() -> None:
    c = ContreeSync(base_url=URL, token=TOKEN)

    step("a run in a VM through the SDK")
    base = c.images.use("busybox", strict=True)
    r = base.run(shell="uname -r; echo vm > /mark", disposable=False, timeout=120).wait()
    check(r.exit_code == 0, f"run in a VM: exit {r.exit_code}, stderr {r.stderr!r}")
    check(str(r.stdout).strip().endswith("-amd64"), f"run in a VM: expected Debian's kernel, got {r.stdout!r}")

    step("a long-lived instance takes subprocess calls")
    status, spawned = call(c, "POST", "/v1/instances", {
        "command": "i=0; while true; do i=$((i+1)); echo $i | nc -l -p 7000; done",
        "image": str(r.uuid), "shell": True, "timeout": 300,
    })
    check(status == 201, f"spawn: {status} {spawned}")
    counter = spawned["uuid"]
    for _ in range(300):
        if call(c, "GET", f"/v1/operations/{counter}")[1]["status"] == "EXECUTING":
            break
        time.sleep(0.1)
    check(subprocess_output(c, counter, ASK) == "1\n", "the first subprocess reads 1")

    step("the extension saves the running instance with its memory")
    status, saved = call(c, "POST", f"/x-contree/instances/{counter}/snapshot", {"tag": "warm"})
    check(status == 201 and saved.get("memory") is True, f"snapshot: {status} {saved}")
    image = saved["uuid"]
    listed = {str(img.uuid) for img in c.images(number=None)}
    check(image in listed, f"the snapshot {image} is an image of the namespace (images(): {sorted(listed)})")

    step("instances resumed from it go on from the same count; the instance is unaffected")
    for _ in range(2):
        status, resumed = call(c, "POST", f"/x-contree/images/{image}/resume",
                               {"command": ASK, "shell": True, "timeout": 120})
        check(status == 201, f"resume: {status} {resumed}")
        record = wait(c, resumed["uuid"])
        out = record["metadata"]["result"]["stdout"]["value"]
        check(record["status"] == "SUCCESS" and out == "2\n", f"resumed: {record['status']} {out!r}")
    check(subprocess_output(c, counter, ASK) == "2\n", "the instance itself reads 2")

    step("the snapshot's files through the SDK")
    files = c.images.use(image, strict=True).run(shell="cat /mark; nc 127.0.0.1 7000 || echo none",
                                                 timeout=120).wait()
    check(str(files.stdout) == "vm\nnone\n", f"a plain run of the snapshot starts from its files: {files.stdout!r}")

    step("bad cases")
    status, body = call(c, "POST", f"/x-contree/images/{r.uuid}/resume", {"command": "true", "timeout": 60})
    check(status == 400 and "holds files only" in str(body), f"resume of an image without memory: {status} {body}")
    call(c, "DELETE", f"/v1/operations/{counter}")
    wait(c, counter)
    status, body = call(c, "POST", f"/x-contree/instances/{counter}/snapshot", {})
    check(status in (409, 410), f"snapshot of an ended instance: {status} {body}")
    step("done")


if __name__ == "__main__":
    try:
        main()
    except CheckFailed as exc:
        print(f"sdk-vm: FAILED at step '{STEP}': {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Exception:
        print(f"sdk-vm: FAILED at step '{STEP}' with an unexpected exception:", file=sys.stderr, flush=True)
        traceback.print_exc()
        sys.exit(1)
    print("sdk-vm: all checks passed", flush=True)
