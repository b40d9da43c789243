"""Acceptance test: drive `contree-pipeline serve` with contree-sdk 0.3.6 (ContreeSync).

Environment (set by tests/clients/run):
  CONTREE_TEST_URL      server base URL, without /v1
  CONTREE_TEST_TOKEN    token of user alice
  CONTREE_TEST_TOKEN_B  token of user bob
  CONTREE_TEST_SCRATCH  a scratch directory for local files
  CONTREE_TEST_KEEP_GOING=1  report failed checks and carry on (exit status is still 1)
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from uuid import UUID

from contree_sdk import ContreeSync
from contree_sdk._internals.utils.wrapper import coro_sync
from contree_sdk.sdk.exceptions import (
    ApiStatusCodeError,
    FailedOperationError,
    NotFoundError,
    OperationTimedOutError,
)
from contree_sdk.utils.models.file import UploadFileSpec

URL = os.environ["CONTREE_TEST_URL"]
TOKEN = os.environ["CONTREE_TEST_TOKEN"]
TOKEN_B = os.environ["CONTREE_TEST_TOKEN_B"]
SCRATCH = Path(os.environ["CONTREE_TEST_SCRATCH"])

STEP = "start"


class CheckFailed(Exception):
    pass


def step(name: str) -> None:
    global STEP
    STEP = name
    print(f"--- sdk: {name}", flush=True)


# CONTREE_TEST_KEEP_GOING=1 reports failed checks and carries on (for debugging the script
# against a mock); the exit status is still 1.
KEEP_GOING = os.environ.get("CONTREE_TEST_KEEP_GOING") == "1"
SOFT_FAILURES: list[str] = []


def check(cond: bool, message: str) -> None:
    if not cond:
        if KEEP_GOING:
            SOFT_FAILURES.append(f"{STEP}: {message}")
            print(f"sdk: CHECK FAILED (continuing) at '{STEP}': {message}", file=sys.stderr, flush=True)
            return
        raise CheckFailed(message)


def eq(actual, expected, what: str) -> None:
    check(actual == expected, f"{what}: expected {expected!r}, got {actual!r}")


def raw_status(path: str, token: str) -> int:
    """HTTP status of a plain GET (for what the SDK does not expose)."""
    req = urllib.request.Request(URL + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_terminal(c: ContreeSync, op_uuid, seconds: float = 10.0):
    """The operation record (SDK model) once terminal, or the last one seen after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        op = coro_sync(c._api.get_operation_status(op_uuid))  # GET /v1/operations/{id}
        status = str(getattr(op.status, "value", op.status))
        if status in ("SUCCESS", "FAILED", "CANCELLED") or time.monotonic() > deadline:
            return op
        time.sleep(0.1)


def main() -> None:
    c = ContreeSync(base_url=URL, token=TOKEN)

    step("whoami for both tokens; a bad token is refused")
    info_a = c.get_token_info()
    check(bool(info_a.token_uuid), f"whoami (alice): expected a token_uuid, got {info_a!r}")
    info_b = ContreeSync(base_url=URL, token=TOKEN_B).get_token_info()
    check(bool(info_b.token_uuid), f"whoami (bob): expected a token_uuid, got {info_b!r}")
    check(
        info_a.token_uuid != info_b.token_uuid,
        f"whoami: expected different token_uuid for alice and bob, both got {info_a.token_uuid!r}",
    )
    try:
        bad = ContreeSync(base_url=URL, token="0" * 40).get_token_info()
    except ApiStatusCodeError as exc:
        # The SDK copies `status` only when the JSON error body carries it (it is optional).
        check(type(exc) is ApiStatusCodeError and exc.status in (None, 401),
              f"whoami with an unknown token: expected a plain ApiStatusCodeError (401), got {exc!r}")
    else:
        check(False, f"whoami with an unknown token: expected HTTP 401, got a result {bad!r}")
    eq(raw_status("/v1/whoami", "0" * 40), 401, "HTTP status of GET /v1/whoami with an unknown token")

    step("images.use('busybox') (lazy and strict)")
    lazy = c.images.use("busybox")
    eq(lazy.tag, "busybox", "images.use('busybox').tag")
    eq(lazy.uuid, None, "images.use('busybox').uuid (lazy: no request yet)")
    base = c.images.use("busybox", strict=True)
    check(isinstance(base.uuid, UUID), f"images.use('busybox', strict=True): expected a uuid, got {base.uuid!r}")
    eq(base.tag, "busybox", "images.use('busybox', strict=True).tag")

    step("disposable echo (by tag and by uuid)")
    r = lazy.run(shell="echo hello").wait()  # spawned with image "tag:busybox"
    eq(r.stdout, "hello\n", "stdout of `echo hello` on tag:busybox")
    eq(r.stderr, "", "stderr of `echo hello`")
    eq(r.exit_code, 0, "exit code of `echo hello`")
    eq(r.uuid, None, "result image of a disposable run")
    r = base.run("echo", args=["hello", "world"]).wait()  # non-shell: bare command name, PATH lookup
    eq(r.stdout, "hello world\n", "stdout of command='echo' args=['hello','world']")
    eq(r.exit_code, 0, "exit code of command='echo'")

    step("non-zero exit is not an exception")
    r = base.run(shell="echo out; echo err >&2; exit 3").wait()
    eq(r.exit_code, 3, "exit code of `exit 3`")
    eq(r.stdout, "out\n", "stdout of the `exit 3` run")
    eq(r.stderr, "err\n", "stderr of the `exit 3` run")

    step("non-disposable run, then a chained run")
    first = base.run(shell="echo one > /a.txt", disposable=False).wait()
    eq(first.exit_code, 0, "exit code of `echo one > /a.txt`")
    check(isinstance(first.uuid, UUID), f"non-disposable run: expected a result image uuid, got {first.uuid!r}")
    check(first.uuid != base.uuid, f"a run that wrote /a.txt returned the base image uuid {first.uuid}")
    second = first.run(shell="cat /a.txt; echo two >> /a.txt", disposable=False).wait()
    eq(second.stdout, "one\n", "stdout of `cat /a.txt` in the chained run")
    check(isinstance(second.uuid, UUID) and second.uuid != first.uuid,
          f"chained run: expected a new image uuid (not {first.uuid}), got {second.uuid!r}")
    eq(second.read("/a.txt"), b"one\ntwo\n", "/a.txt in the chained result image")
    eq(first.read("/a.txt"), b"one\n", "/a.txt in the first image after the chained run (images are immutable)")

    step("branching from the first result image")
    left = first.run(shell="echo left > /b.txt", disposable=False).wait()
    right = first.run(shell="echo right > /b.txt", disposable=False).wait()
    check(left.uuid is not None and right.uuid is not None and left.uuid != right.uuid,
          f"branches: expected two distinct image uuids, got {left.uuid!r} and {right.uuid!r}")
    left_b, right_b = left.read("/b.txt"), right.read("/b.txt")
    eq(left_b, b"left\n", "/b.txt in the left branch")
    eq(right_b, b"right\n", "/b.txt in the right branch")
    check(left_b != right_b, f"branches: /b.txt should differ, both are {left_b!r}")
    eq(left.read("/a.txt"), b"one\n", "/a.txt in the left branch")
    try:
        got = first.read("/b.txt")
    except NotFoundError:
        pass
    else:
        check(False, f"/b.txt in the branch point image: expected NotFoundError, got {got!r}")

    step("files= upload from a local path, from bytes, and with a mode")
    local = SCRATCH / "local.txt"
    local.write_text("from a local path\n")
    files = {
        "/up/local.txt": str(local),
        "/up/bytes.bin": b"from bytes\n",
        "/up/tool.sh": UploadFileSpec(source=b"#!/bin/sh\necho tool ran\n", mode=0o755),
    }
    up = base.run(
        shell="cat /up/local.txt /up/bytes.bin; stat -c '%a %n' /up/local.txt /up/tool.sh; /up/tool.sh",
        files=files,
        disposable=False,
    ).wait()
    eq(up.exit_code, 0, f"exit code of the upload run (stderr {up.stderr!r})")
    eq(
        up.stdout,
        "from a local path\nfrom bytes\n644 /up/local.txt\n755 /up/tool.sh\ntool ran\n",
        "stdout of cat/stat over the uploaded files",
    )
    eq(up.read("/up/bytes.bin"), b"from bytes\n", "/up/bytes.bin read back from the result image")
    # The same content again: the SDK finds it by sha256 and does not upload it twice.
    again = base.run(shell="cat /again.txt", files={"/again.txt": str(local)}).wait()
    eq(again.stdout, "from a local path\n", "stdout of cat over a re-used (deduplicated) upload")

    step("ls and read of a result image")
    names = {f.name: f for f in first.ls("/")}
    for want in ("bin", "etc", "tmp", "a.txt"):
        check(want in names, f"ls('/') of the first image: expected an entry {want!r}, got {sorted(names)}")
    bin_entry, a_entry = names.get("bin"), names.get("a.txt")
    check(bin_entry is not None and bin_entry.is_dir, f"ls('/'): expected 'bin' to be a directory, got {bin_entry!r}")
    check(a_entry is not None and not a_entry.is_dir and a_entry.size == 4,
          f"ls('/'): expected 'a.txt' to be a 4-byte file, got {a_entry!r}")
    etc = {f.name for f in first.ls("/etc")}
    check("passwd" in etc, f"ls('/etc'): expected 'passwd', got {sorted(etc)}")
    passwd = first.read("/etc/passwd")
    check(passwd.startswith(b"root:"), f"read('/etc/passwd'): expected it to start with b'root:', got {passwd[:80]!r}")

    step("tag_as, resolve the tag, list images")
    tag = "sdk/test:1"
    tagged = first.tag_as(tag)
    eq(tagged.tag, tag, "tag_as(...).tag")
    resolved = c.images.use(tag, strict=True)
    eq(resolved.uuid, first.uuid, f"images.use({tag!r}, strict=True).uuid")
    listed = {(img.uuid, img.tag) for img in c.images(number=None)}
    check((first.uuid, tag) in listed, f"images(): expected ({first.uuid}, {tag!r}) in {sorted(map(str, listed))}")
    listed_tagged = {img.tag for img in c.images(number=None, tagged=True)}
    check(tag in listed_tagged and "busybox" in listed_tagged,
          f"images(tagged=True): expected {tag!r} and 'busybox' among tags, got {sorted(map(str, listed_tagged))}")

    step("another token (bob) does not see alice's images or tags")
    bob = ContreeSync(base_url=URL, token=TOKEN_B)
    for ref in (tag, str(first.uuid)):
        try:
            seen = bob.images.use(ref, strict=True)
        except NotFoundError:
            pass
        else:
            check(False, f"bob: images.use({ref!r}, strict=True): expected NotFoundError, got {seen!r}")
    r = bob.images.use("busybox").run(shell="echo bob").wait()
    eq(r.stdout, "bob\n", "bob: stdout of `echo bob` on busybox")

    step("untag")
    untagged = tagged.untag()
    eq(untagged.tag, None, "untag().tag")
    try:
        gone = c.images.use(tag, strict=True)
    except NotFoundError:
        pass
    else:
        check(False, f"images.use({tag!r}, strict=True) after untag: expected NotFoundError, got {gone!r}")

    step("a pipeline's failing step, published with run --publish, is a branch point")
    published = os.environ.get("CONTREE_TEST_PUBLISHED_RUN", "")
    check(published != "", "CONTREE_TEST_PUBLISHED_RUN is not set (acceptance/clients/run publishes a run)")
    failing = c.images.use(f"run/{published}/check", strict=True)
    eq(failing.read("/workspace/state.txt"), b"half done\nchecked\n", "state.txt in the failing step's snapshot")
    fixed = failing.run(shell="cd /workspace && sed -i s/checked/fixed/ state.txt && cat state.txt",
                        disposable=False).wait()
    eq(fixed.stdout, "half done\nfixed\n", "stdout of a fix run in a branch of the failing state")
    eq(failing.read("/workspace/state.txt"), b"half done\nchecked\n", "the published snapshot after the branch")
    prepared = c.images.use(f"run/{published}/prepare", strict=True)
    eq(prepared.read("/workspace/state.txt"), b"half done\n", "state.txt in the step before the failure")
    try:
        seen = bob.images.use(f"run/{published}/check", strict=True)
    except NotFoundError:
        pass
    else:
        check(False, f"bob: the tag published into alice's namespace: expected NotFoundError, got {seen!r}")

    step("env, cwd and stdin reach the command")
    r = base.run(shell="echo $A; pwd; cat", env={"A": "1"}, cwd="/tmp", stdin="in").wait()
    eq(r.stdout, "1\n/tmp\nin", "stdout of `echo $A; pwd; cat` with env A=1, cwd /tmp, stdin 'in'")
    eq(r.exit_code, 0, "exit code of the env/cwd/stdin run")

    step("a command longer than its timeout")
    # Three outcomes count as "timed out", depending on who notices first:
    #  - the server stops the command: the operation is FAILED (SDK: FailedOperationError) or
    #    SUCCESS, and its metadata.result.state.timed_out is true;
    #  - the SDK's own deadline (= the run timeout, counted from its first poll) passes first:
    #    it sends DELETE /v1/operations/{id} and raises OperationTimedOutError; the server must
    #    then end the operation promptly instead of letting `sleep 30` finish.
    started = time.monotonic()
    try:
        r = base.run(shell="sleep 30", timeout=2).wait()
    except (FailedOperationError, OperationTimedOutError) as exc:
        op = wait_terminal(c, exc.operation_uuid)
        status = str(getattr(op.status, "value", op.status))
        print(f"sdk: timeout surfaced as {type(exc).__name__}: {exc}; server status {status}", flush=True)
        check(status in ("SUCCESS", "FAILED", "CANCELLED"),
              f"timed-out operation {exc.operation_uuid}: expected a terminal status within 10 s, got {status!r}")
        state = op.metadata.result.state if op.metadata is not None and op.metadata.result is not None else None
        if isinstance(exc, FailedOperationError) or status == "SUCCESS":
            check(state is not None and state.timed_out,
                  f"timed-out operation {exc.operation_uuid} ({status}): expected metadata.result.state.timed_out "
                  f"True, got {state!r}")
    else:
        state = r.result._raw.result.state
        print(f"sdk: timeout surfaced as a result: timed_out={state.timed_out}, exit {r.exit_code}", flush=True)
        check(state.timed_out, f"`sleep 30` with timeout=2: expected state.timed_out True, got {state!r}")
    elapsed = time.monotonic() - started
    check(elapsed < 25, f"`sleep 30` with timeout=2: expected to end well before 30 s, took {elapsed:.1f} s")

    step("done")


if __name__ == "__main__":
    try:
        main()
    except CheckFailed as exc:
        print(f"sdk: FAILED at step '{STEP}': {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Exception:
        print(f"sdk: FAILED at step '{STEP}' with an unexpected exception:", file=sys.stderr, flush=True)
        traceback.print_exc()
        sys.exit(1)
    if SOFT_FAILURES:
        print(f"sdk: FAILED: {len(SOFT_FAILURES)} check(s) failed", file=sys.stderr, flush=True)
        sys.exit(1)
    print("sdk: all checks passed", flush=True)
