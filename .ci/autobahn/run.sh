#!/usr/bin/env bash
# .ci/autobahn/run.sh — owns running Autobahn|Testsuite (fuzzingclient) against a live
# WebSocket server and turning its report into a CI verdict.
#
# Usage: .ci/autobahn/run.sh URL [CASES]
#   URL    e.g. ws://127.0.0.1:9001/ws/echo (the server must echo every message back)
#   CASES  comma-separated case patterns, default: all of sections 1-10
#          ("1.*,2.*,3.*,4.*,5.*,6.*,7.*,9.*,10.*"; autobahn has no section 8)
#
# Env: AUTOBAHN_VENV        wstest virtualenv (default /tmp/autobahn-venv; built by setup.sh)
#      AUTOBAHN_REPORT_DIR  where the HTML/JSON report is copied (default <repo>/target/autobahn)
#      AUTOBAHN_AGENT       agent name in the report (default gateway)
#      AUTOBAHN_TIMEOUT     seconds before wstest is killed (default 1800)
#      AUTOBAHN_WAIT        seconds to wait for the server's TCP port to open (default 30)
#      AUTOBAHN_VERBOSE=1   stream wstest output instead of only logging it to wstest.log
# Exit: 0 all cases pass, 1 some case failed (see check.py), 2 harness/server problem.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/../.." && pwd)"

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: $0 URL [CASES]" >&2
  exit 2
fi
URL="$1"
CASES="${2:-1.*,2.*,3.*,4.*,5.*,6.*,7.*,9.*,10.*}"
VENV="${AUTOBAHN_VENV:-/tmp/autobahn-venv}"
export AUTOBAHN_VENV="$VENV"
REPORT_DEST="${AUTOBAHN_REPORT_DIR:-$REPO_ROOT/target/autobahn}"
AGENT="${AUTOBAHN_AGENT:-gateway}"
TIMEOUT="${AUTOBAHN_TIMEOUT:-1800}"
WAIT="${AUTOBAHN_WAIT:-30}"

# Toolchain (no-op when wstest already works).
bash "$HERE/setup.sh"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/autobahn.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
OUTDIR="$WORK/reports"
mkdir -p "$OUTDIR"

# Wait for the server's port so a just-started gateway has time to bind.
python3 - "$URL" "$WAIT" <<'PY'
import socket, sys, time
from urllib.parse import urlsplit
u = urlsplit(sys.argv[1])
def fail(msg):
    print("autobahn: " + msg, file=sys.stderr)
    sys.exit(2)
if u.scheme not in ("ws", "wss") or not u.hostname:
    fail("URL must be ws:// or wss://, got %r" % sys.argv[1])
port = u.port or (443 if u.scheme == "wss" else 80)
deadline = time.time() + float(sys.argv[2])
while True:
    try:
        socket.create_connection((u.hostname, port), timeout=2).close()
        break
    except OSError as e:
        if time.time() >= deadline:
            fail("%s:%d not reachable after %ss: %s" % (u.hostname, port, sys.argv[2], e))
        time.sleep(0.5)
PY

python3 - "$WORK/spec.json" "$URL" "$CASES" "$OUTDIR" "$AGENT" <<'PY'
import json, sys
spec_path, url, cases, outdir, agent = sys.argv[1:]
spec = {
    "outdir": outdir,
    "servers": [{"agent": agent, "url": url}],
    "cases": [c.strip() for c in cases.split(",") if c.strip()],
    "exclude-cases": [],
    "exclude-agent-cases": {},
}
with open(spec_path, "w") as f:
    json.dump(spec, f, indent=2)
PY

echo "autobahn: fuzzingclient -> $URL cases=$CASES (log: $REPORT_DEST/wstest.log)"
start=$(date +%s)
wstest_rc=0
if [ "${AUTOBAHN_VERBOSE:-0}" = "1" ]; then
  (cd "$WORK" && timeout "$TIMEOUT" "$VENV/bin/wstest" -m fuzzingclient -s spec.json) 2>&1 \
    | tee "$OUTDIR/wstest.log" || wstest_rc=$?
else
  (cd "$WORK" && timeout "$TIMEOUT" "$VENV/bin/wstest" -m fuzzingclient -s spec.json) \
    >"$OUTDIR/wstest.log" 2>&1 || wstest_rc=$?
fi
elapsed=$(( $(date +%s) - start ))
echo "autobahn: wstest finished in ${elapsed}s (exit $wstest_rc)"

# Keep the report (HTML + JSON + wstest.log) whatever happened.
mkdir -p "$(dirname "$REPORT_DEST")"
rm -rf "$REPORT_DEST"
cp -R "$OUTDIR" "$REPORT_DEST"

if [ "$wstest_rc" -ne 0 ]; then
  [ "$wstest_rc" -eq 124 ] && echo "autobahn: wstest timed out after ${TIMEOUT}s" >&2
  echo "autobahn: wstest exited $wstest_rc; last lines of wstest.log:" >&2
  tail -n 30 "$OUTDIR/wstest.log" >&2 || true
  if [ ! -f "$OUTDIR/index.json" ]; then
    exit 2
  fi
fi

check_rc=0
python3 "$HERE/check.py" "$OUTDIR" || check_rc=$?
if [ "$check_rc" -eq 0 ] && [ "$wstest_rc" -ne 0 ]; then
  exit 2
fi
exit "$check_rc"
