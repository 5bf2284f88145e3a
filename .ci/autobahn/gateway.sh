#!/usr/bin/env bash
# .ci/autobahn/gateway.sh — owns running Autobahn|Testsuite against the gateway's own /ws/echo
# endpoint: sections 1-10 (RFC 6455) and 12-13 (permessage-deflate, which the echo endpoint
# negotiates and uses for what it echoes). Builds the gateway, starts it on a free loopback port
# with the echo endpoint on, a 16 MiB message limit (section 9 sends messages that large) and
# compression of every message (compression_min_size 0, so 12.*/13.* exercise small ones too),
# runs run.sh, stops the gateway. AUTOBAHN_CASES overrides the case list.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/../.." && pwd)"
cd "$REPO_ROOT"

cargo build --locked -p gateway --bin gateway
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
LOG="$REPO_ROOT/target/autobahn-gateway.log"
mkdir -p "$(dirname "$LOG")"

# Sections 12 and 13 (permessage-deflate) send 1000 messages per case of 16 B to 128 KiB; with
# wsaccel in wstest's virtualenv (setup.sh) all 216 cases take about 13 minutes on a busy 2-core
# machine (without it, about three hours). AUTOBAHN_CASES overrides the list.
CASES="1.*,2.*,3.*,4.*,5.*,6.*,7.*,9.*,10.*,12.*,13.*"
GATEWAY__WEBSOCKET__MAX_MESSAGE_SIZE=$((16 * 1024 * 1024)) GATEWAY__WEBSOCKET__COMPRESSION_MIN_SIZE=0 \
  "$REPO_ROOT/target/debug/gateway" --listen "127.0.0.1:$PORT" --ws-echo >"$LOG" 2>&1 &
GATEWAY_PID=$!
trap 'kill "$GATEWAY_PID" 2>/dev/null || true; wait "$GATEWAY_PID" 2>/dev/null || true' EXIT

status=0
bash "$HERE/run.sh" "ws://127.0.0.1:$PORT/ws/echo" "${AUTOBAHN_CASES:-$CASES}" || status=$?
if ! kill -0 "$GATEWAY_PID" 2>/dev/null; then
  echo "autobahn: the gateway died during the run; its log:" >&2
  tail -n 50 "$LOG" >&2
  status=2
fi
exit "$status"
