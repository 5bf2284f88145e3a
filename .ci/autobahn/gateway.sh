#!/usr/bin/env bash
# .ci/autobahn/gateway.sh — owns running Autobahn|Testsuite (cases 1-10) against the gateway's own
# /ws/echo endpoint: builds the gateway, starts it on a free loopback port with the echo endpoint on
# and a 16 MiB message limit (section 9 sends messages that large), runs run.sh, stops the gateway.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/../.." && pwd)"
cd "$REPO_ROOT"

cargo build --locked -p gateway --bin gateway
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
LOG="$REPO_ROOT/target/autobahn-gateway.log"
mkdir -p "$(dirname "$LOG")"

GATEWAY__WEBSOCKET__MAX_MESSAGE_SIZE=$((16 * 1024 * 1024)) \
  "$REPO_ROOT/target/debug/gateway" --listen "127.0.0.1:$PORT" --ws-echo >"$LOG" 2>&1 &
GATEWAY_PID=$!
trap 'kill "$GATEWAY_PID" 2>/dev/null || true; wait "$GATEWAY_PID" 2>/dev/null || true' EXIT

status=0
bash "$HERE/run.sh" "ws://127.0.0.1:$PORT/ws/echo" || status=$?
if ! kill -0 "$GATEWAY_PID" 2>/dev/null; then
  echo "autobahn: the gateway died during the run; its log:" >&2
  tail -n 50 "$LOG" >&2
  status=2
fi
exit "$status"
