"""Acceptance test: drive `contree-pipeline serve` through contree-mcp 0.5.0 over stdio.

Environment (set by tests/clients/run):
  CONTREE_TEST_URL, CONTREE_TEST_TOKEN (alice), CONTREE_TEST_SCRATCH
  CONTREE_MCP               the contree-mcp binary (default: `contree-mcp` on PATH)
  CONTREE_TEST_KEEP_GOING=1 report failed checks and carry on (exit status is still 1)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import sys
import traceback
from pathlib import Path

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

URL = os.environ["CONTREE_TEST_URL"]
TOKEN = os.environ["CONTREE_TEST_TOKEN"]
SCRATCH = Path(os.environ["CONTREE_TEST_SCRATCH"])
MCP_BIN = os.environ.get("CONTREE_MCP") or shutil.which("contree-mcp") or "contree-mcp"
CALL_TIMEOUT = 120  # seconds per tool call
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
KEEP_GOING = os.environ.get("CONTREE_TEST_KEEP_GOING") == "1"

STEP = "start"
FAILURES: list[str] = []


class CheckFailed(Exception):
    pass


def step(name: str) -> None:
    global STEP
    STEP = name
    print(f"--- mcp: {name}", flush=True)


def check(cond: bool, message: str) -> None:
    if not cond:
        if KEEP_GOING:
            FAILURES.append(f"{STEP}: {message}")
            print(f"mcp: CHECK FAILED (continuing) at '{STEP}': {message}", file=sys.stderr, flush=True)
            return
        raise CheckFailed(message)


def eq(actual, expected, what: str) -> None:
    check(actual == expected, f"{what}: expected {expected!r}, got {actual!r}")


def is_uuid(value) -> bool:
    return isinstance(value, str) and bool(UUID_RE.match(value))


class Tools:
    """Calls MCP tools and returns their structured output."""

    def __init__(self, session: ClientSession):
        self.session = session

    async def raw(self, name: str, args: dict):
        return await asyncio.wait_for(self.session.call_tool(name, args), CALL_TIMEOUT)

    async def __call__(self, name: str, args: dict) -> dict:
        r = await self.raw(name, args)
        text = " ".join(getattr(c, "text", "") for c in r.content)
        if r.isError:
            raise CheckFailed(f"tool {name}({args}): expected success, got an error: {text}")
        data = r.structuredContent
        if data is None:  # fall back to the JSON text content
            data = json.loads(text)
        return data


async def scenario(call: Tools) -> None:
    step("run: disposable echo on tag:busybox")
    out = (await call("run", {"command": "echo hello", "image": "tag:busybox"}))["result"]
    eq(out.get("status"), "SUCCESS", "run echo: status")
    eq(out.get("stdout"), "hello\n", "run echo: stdout")
    eq(out.get("stderr"), "", "run echo: stderr")
    eq(out.get("exit_code"), 0, "run echo: exit_code")
    eq(out.get("timed_out"), False, "run echo: timed_out")
    eq(out.get("result_image_uuid"), None, "run echo: result_image_uuid of a disposable run")
    base = out.get("image_uuid")

    step("run: non-zero exit")
    out = (await call("run", {"command": "echo oops >&2; exit 5", "image": "busybox"}))["result"]
    eq(out.get("status"), "SUCCESS", "run exit 5: status (a non-zero exit is still SUCCESS)")
    eq(out.get("exit_code"), 5, "run exit 5: exit_code")
    eq(out.get("stderr"), "oops\n", "run exit 5: stderr")

    step("run: non-disposable write (bare tag busybox)")
    out = (await call("run", {
        "command": "mkdir -p /data && echo mcp-data > /data/f.txt",
        "image": "busybox",
        "disposable": False,
    }))["result"]
    eq(out.get("status"), "SUCCESS", "run write: status")
    eq(out.get("exit_code"), 0, f"run write: exit_code (stderr {out.get('stderr')!r})")
    image = out.get("result_image_uuid")
    check(is_uuid(image), f"run write: expected a result_image_uuid, got {image!r}")
    check(image != base, f"run write: expected a new image, got the base image {base!r}")
    eq((out.get("result") or {}).get("image"), image, "run write: result.image")

    step("list_files of the result image")
    listing = await call("list_files", {"image": image, "path": "/data"})
    files = {f.get("name"): f for f in listing.get("files", [])}
    check("f.txt" in files, f"list_files /data: expected 'f.txt', got {sorted(map(str, files))}")
    entry = files.get("f.txt") or {}
    eq(entry.get("type"), "file", "list_files /data: type of f.txt")
    eq(entry.get("size"), 9, "list_files /data: size of f.txt")
    root = {f.get("name"): f for f in (await call("list_files", {"image": image}))["files"]}
    for name in ("bin", "etc", "data"):
        check(name in root, f"list_files /: expected {name!r}, got {sorted(map(str, root))}")
    eq((root.get("data") or {}).get("type"), "directory", "list_files /: type of data")

    step("read_file of the written file")
    got = await call("read_file", {"image": image, "path": "/data/f.txt"})
    eq(got.get("content"), "mcp-data\n", "read_file /data/f.txt: content")
    eq(got.get("encoding"), "utf-8", "read_file /data/f.txt: encoding")

    step("upload content, then run with files=")
    content = "uploaded via mcp\n"
    up = await call("upload", {"content": content})
    check(is_uuid(up.get("uuid")), f"upload: expected a file uuid, got {up!r}")
    eq(up.get("sha256"), hashlib.sha256(content.encode()).hexdigest(), "upload: sha256")
    eq(up.get("size"), len(content), "upload: size")
    out = (await call("run", {"command": "cat /up.txt; stat -c %a /up.txt", "image": image,
                               "files": {"/up.txt": up.get("uuid")}}))["result"]
    eq(out.get("stdout"), content + "644\n", "run with files={'/up.txt': uuid}: stdout")

    step("set_tag, then use the tag")
    tag = "mcp/test:1"
    tagged = await call("set_tag", {"image_uuid": image, "tag": tag})
    eq(tagged.get("tag"), tag, "set_tag: tag")
    eq(tagged.get("uuid"), image, "set_tag: uuid")
    listing = await call("list_files", {"image": f"tag:{tag}", "path": "/data"})
    names = [f.get("name") for f in listing.get("files", [])]
    check("f.txt" in names, f"list_files tag:{tag} /data: expected 'f.txt', got {names}")
    got = await call("get_image", {"image": f"tag:{tag}"})
    eq(got.get("uuid"), image, f"get_image tag:{tag}: uuid")

    step("run wait=false twice, then wait_operations")
    a = (await call("run", {"command": "sleep 1; echo first", "image": f"tag:{tag}", "wait": False}))["result"]
    b = (await call("run", {"command": "cat /data/f.txt", "image": image, "wait": False}))["result"]
    op_a, op_b = a.get("operation_id"), b.get("operation_id")
    check(is_uuid(op_a) and is_uuid(op_b) and op_a != op_b,
          f"run wait=false: expected two operation ids, got {a!r} and {b!r}")
    waited = await call("wait_operations", {"operation_ids": [op_a, op_b], "timeout": 120})
    eq(waited.get("timed_out"), False, "wait_operations: timed_out")
    eq(sorted(waited.get("completed") or []), sorted([op_a, op_b]), "wait_operations: completed")
    results = waited.get("results") or {}
    ra, rb = results.get(op_a) or {}, results.get(op_b) or {}
    eq(ra.get("status"), "SUCCESS", f"wait_operations: status of {op_a} (error {ra.get('error')!r})")
    eq(rb.get("status"), "SUCCESS", f"wait_operations: status of {op_b} (error {rb.get('error')!r})")
    eq(ra.get("stdout"), "first\n", "wait_operations: stdout of `sleep 1; echo first`")
    eq(rb.get("stdout"), "mcp-data\n", "wait_operations: stdout of `cat /data/f.txt`")
    op = await call("get_operation", {"operation_id": op_b})
    eq(op.get("status"), "SUCCESS", "get_operation: status")
    eq(op.get("stdout"), "mcp-data\n", "get_operation: stdout")

    step("errors: read_file of a missing path")
    r = await call.raw("read_file", {"image": image, "path": "/nope/missing.txt"})
    text = " ".join(getattr(c, "text", "") for c in r.content)
    check(r.isError is True, f"read_file of a missing path: expected isError True, got {r.isError!r}: {text}")
    print(f"mcp: missing-path error text: {text}", flush=True)

    step("set_tag without a tag removes it")
    untagged = await call("set_tag", {"image_uuid": image})
    eq(untagged.get("tag"), None, "set_tag (no tag): tag")
    r = await call.raw("list_files", {"image": f"tag:{tag}"})
    check(r.isError is True, f"list_files tag:{tag} after removing the tag: expected isError True, got {r.isError!r}")


async def main() -> None:
    home = SCRATCH / "mcp"
    home.mkdir(parents=True, exist_ok=True)
    params = StdioServerParameters(
        command=MCP_BIN,
        args=["--auth-type", "jwt", "--url", URL, "--token", TOKEN],
        # stdio_client passes only what is given here: the CONTREE_* settings must be explicit.
        env={
            "PATH": os.environ["PATH"],
            "HOME": os.environ.get("HOME", "/root"),
            "CONTREE_HOME": str(home),  # clean: no stray iam profile overriding --auth-type
            "CONTREE_NO_UPDATE_CHECK": "1",
        },
    )
    server_log = SCRATCH / "contree-mcp.log"
    failed: CheckFailed | None = None
    with open(server_log, "w") as errlog:
        try:
            async with stdio_client(params, errlog=errlog) as (read, write):
                async with ClientSession(read, write) as session:
                    step("initialize")
                    await asyncio.wait_for(session.initialize(), 60)
                    tools = {t.name for t in (await session.list_tools()).tools}
                    wanted = {"run", "list_files", "read_file", "upload", "set_tag", "wait_operations"}
                    try:
                        check(wanted <= tools, f"list_tools: expected {sorted(wanted)}, missing {sorted(wanted - tools)}")
                        await scenario(Tools(session))
                    except CheckFailed as exc:  # raised again outside the MCP task groups
                        failed = exc
        except BaseException:
            errlog.flush()
            tail = server_log.read_text(errors="replace").splitlines()[-30:]
            print("mcp: contree-mcp stderr (tail):\n  " + "\n  ".join(tail), file=sys.stderr, flush=True)
            raise
    if failed is not None:
        raise failed


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except CheckFailed as exc:
        print(f"mcp: FAILED at step '{STEP}': {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    except BaseException:
        print(f"mcp: FAILED at step '{STEP}' with an unexpected exception:", file=sys.stderr, flush=True)
        traceback.print_exc()
        sys.exit(1)
    if FAILURES:
        print(f"mcp: FAILED: {len(FAILURES)} check(s) failed", file=sys.stderr, flush=True)
        sys.exit(1)
    print("mcp: all checks passed", flush=True)
