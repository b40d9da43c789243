#!/usr/bin/env bash
# Acceptance test: drive `contree-pipeline serve` with contree-cli 0.9.4 (the `contree` command).
#
# Environment (set by acceptance/clients/run):
#   CONTREE_TEST_URL, CONTREE_TEST_TOKEN (alice), CONTREE_TEST_TOKEN_B (bob), CONTREE_TEST_SCRATCH
#   CONTREE_CLI              the contree binary (default: `contree` on PATH)
#   CONTREE_TEST_KEEP_GOING=1  report failed checks and carry on (exit status is still 1)
set -euo pipefail

: "${CONTREE_TEST_URL:?}" "${CONTREE_TEST_TOKEN:?}" "${CONTREE_TEST_SCRATCH:?}"
SCRATCH="$CONTREE_TEST_SCRATCH"
CONTREE="${CONTREE_CLI:-contree}"
# The CLI keeps its profile and session DB here; a fixed session key makes runs reproducible.
export CONTREE_HOME="$SCRATCH/cli" CONTREE_PROFILE=local CONTREE_SESSION=accept CONTREE_NO_UPDATE_CHECK=1
mkdir -p "$CONTREE_HOME"
OUT="$SCRATCH/cli.out"
ERR="$SCRATCH/cli.err"
FAILURES=0
STEP=start

step() { STEP="$*"; echo "--- cli: $STEP"; }

# ct ARGS...: run contree (stdin </dev/null, at most 120 s); sets RC, stdout in $OUT, stderr in $ERR.
ct() {
    RC=0
    timeout 120 "$CONTREE" "$@" </dev/null >"$OUT" 2>"$ERR" || RC=$?
}

fail() {
    echo "cli: FAILED at step '$STEP': $*" >&2
    echo "  command stdout: $(head -c 2000 "$OUT")" >&2
    echo "  command stderr (tail): $(tail -n 15 "$ERR")" >&2
    FAILURES=$((FAILURES + 1))
    [ "${CONTREE_TEST_KEEP_GOING:-}" = 1 ] || exit 1
}

expect_rc() { # expect_rc WANT WHAT
    local note=""
    [ "$RC" -eq 124 ] && note=" (stopped by the 120 s timeout)"
    [ "$RC" -eq "$1" ] || fail "$2: expected exit code $1, got $RC$note"
}

expect_out() { # expect_out WANT WHAT  (exact stdout, trailing newlines ignored)
    local got
    got="$(cat "$OUT")"
    [ "$got" = "$1" ] || fail "$2: expected stdout $(printf '%q' "$1"), got $(printf '%q' "$got")"
}

# py <<'PY' ... PY: a check in Python (code on stdin) over the last stdout (path in argv[1]);
# it prints what is wrong and exits non-zero when the check fails.
py() { python3 - "$OUT"; }

step "auth (jwt profile 'local')"
ct auth --type jwt --url "$CONTREE_TEST_URL" --token "$CONTREE_TEST_TOKEN" -p local -f
expect_rc 0 "contree auth"
grep -q '^\[profile:local\]' "$CONTREE_HOME/auth.ini" ||
    fail "contree auth: expected [profile:local] in $CONTREE_HOME/auth.ini, got: $(cat "$CONTREE_HOME/auth.ini" 2>&1)"

step "use busybox"
ct use busybox
expect_rc 0 "contree use busybox"
grep -q 'export CONTREE_SESSION=accept' "$OUT" || fail "contree use busybox: expected 'export CONTREE_SESSION=accept' in stdout"

step "run -- echo hello"
ct run -- echo hello
expect_rc 0 "contree run -- echo hello"
expect_out "hello" "contree run -- echo hello"

step "-o json run -- echo hello (operation record)"
ct -o json run -- echo hello
expect_rc 0 "contree -o json run -- echo hello"
if ! OP_UUID="$(py 2>&1 <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except ValueError as exc:
    sys.exit(f"stdout is not JSON ({exc})")
problems = []
if d.get("stdout") != "hello\n": problems.append(f"stdout {d.get('stdout')!r} (expected 'hello\\n')")
if d.get("exit_code") != 0: problems.append(f"exit_code {d.get('exit_code')!r} (expected 0)")
if d.get("status") != "SUCCESS": problems.append(f"status {d.get('status')!r} (expected SUCCESS)")
if not d.get("uuid"): problems.append("no operation uuid")
if problems: sys.exit("; ".join(problems))
print(d["uuid"])
PY
)"; then
    fail "contree -o json run -- echo hello: $OP_UUID"
    OP_UUID=""
fi

step "run -s -- 'exit 7'"
ct run -s -- 'exit 7'
expect_rc 7 "contree run -s -- 'exit 7'"

step "env and cwd (-e, -C), disposable run"
ct run -D -e A=1 -C /tmp -s -- 'echo "$A"; pwd'
expect_rc 0 "contree run -D -e A=1 -C /tmp"
expect_out $'1\n/tmp' "contree run -D -e A=1 -C /tmp -s -- 'echo \"\$A\"; pwd'"

step "run --file (upload with mode)"
printf '#!/bin/sh\necho uploaded\n' >"$SCRATCH/up.sh"
ct run -D --file "$SCRATCH/up.sh:/up/up.sh:m0755" -s -- '/up/up.sh; stat -c %a /up/up.sh'
expect_rc 0 "contree run --file up.sh:/up/up.sh:m0755"
expect_out $'uploaded\n755' "contree run --file up.sh:/up/up.sh:m0755 -- '/up/up.sh; stat -c %a /up/up.sh'"

step "non-disposable write on main"
ct run -s -- 'echo v1 > /state'
expect_rc 0 "contree run -s -- 'echo v1 > /state'"
expect_out "" "contree run -s -- 'echo v1 > /state'"
ct cat /state
expect_rc 0 "contree cat /state on main"
expect_out "v1" "contree cat /state on main"

step "session branch exp + checkout exp"
ct session branch exp
expect_rc 0 "contree session branch exp"
ct session checkout exp
expect_rc 0 "contree session checkout exp"

step "write on branch exp"
ct run -s -- 'echo v2 > /state'
expect_rc 0 "contree run -s -- 'echo v2 > /state' on exp"
ct cat /state
expect_rc 0 "contree cat /state on exp"
expect_out "v2" "contree cat /state on exp"

step "checkout main sees its own state"
ct session checkout main
expect_rc 0 "contree session checkout main"
ct cat /state
expect_rc 0 "contree cat /state on main after checkout"
expect_out "v1" "contree cat /state on main after checkout"

step "session rollback (undo the write of v1 on main)"
ct session rollback
expect_rc 0 "contree session rollback"
ct cat /state
[ "$RC" -ne 0 ] || fail "contree cat /state after rollback: expected a failure (file absent), got exit 0"
ct run -D -s -- 'if test -e /state; then echo present; else echo absent; fi'
expect_rc 0 "contree run after rollback"
expect_out "absent" "contree run after rollback: /state in the session image"
ct session checkout exp
expect_rc 0 "contree session checkout exp (again)"
ct cat /state
expect_out "v2" "contree cat /state on exp after main's rollback"

step "ls / (text)"
ct ls /
expect_rc 0 "contree ls /"
for name in bin etc state; do
    grep -Eq "(^|[[:space:]/])$name(/|[[:space:]]|\$)" "$OUT" || fail "contree ls /: expected an entry '$name' in the text listing"
done

step "-o json ls / (one JSON object per line)"
ct -o json ls /
expect_rc 0 "contree -o json ls /"
if ! problem="$(py 2>&1 <<'PY'
import json, sys
items = []
for n, line in enumerate(open(sys.argv[1]), 1):
    if line.strip():
        try:
            items.append(json.loads(line))
        except ValueError as exc:
            sys.exit(f"line {n} is not JSON ({exc}): {line[:200]!r}")
names = {i.get("path"): i for i in items}
missing = [n for n in ("bin", "etc", "state") if n not in names]
if missing:
    sys.exit(f"expected entries {missing}, got {sorted(map(str, names))}")
if names["bin"].get("is_dir") is not True:
    sys.exit(f"expected bin to be a directory, got {names['bin']}")
if names["state"].get("size") != 3:
    sys.exit(f"expected state to be 3 bytes, got {names['state']}")
PY
)"; then
    fail "contree -o json ls /: $problem"
fi

step "images (tagged)"
ct images
expect_rc 0 "contree images"
grep -qw busybox "$OUT" || fail "contree images: expected the tag 'busybox' in the listing"

step "ps -a -q"
ct ps -a -q
expect_rc 0 "contree ps -a -q"
if [ -n "${OP_UUID:-}" ]; then
    grep -qx "$OP_UUID" "$OUT" || fail "contree ps -a -q: expected the operation $OP_UUID (from the json run) in the list"
fi
bad="$(grep -Evx '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}' "$OUT" || true)"
[ -z "$bad" ] || fail "contree ps -a -q: expected only UUIDs, got lines: $bad"

step "piped stdin: echo piped | contree run -- cat"
RC=0
printf 'piped\n' | timeout 120 "$CONTREE" run -- cat >"$OUT" 2>"$ERR" || RC=$?
expect_rc 0 "echo piped | contree run -- cat"
expect_out "piped" "echo piped | contree run -- cat"

if [ "$FAILURES" -ne 0 ]; then
    echo "cli: FAILED: $FAILURES check(s) failed" >&2
    exit 1
fi
echo "cli: all checks passed"
