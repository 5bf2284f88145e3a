#!/usr/bin/env bash
# deploy/local-cluster.sh — a cluster on this machine for trying things out: one Redis and three
# gateway nodes on loopback ports, in the foreground. Ctrl-C (or SIGTERM) stops them all cleanly:
# the nodes drain (WebSockets closed with 1001), then Redis shuts down.
#
#   deploy/local-cluster.sh            # Redis on 127.0.0.1:6390, nodes on 127.0.0.1:8081-8083
#   REDIS_PORT=7000 FIRST_PORT=9001 deploy/local-cluster.sh
#   GATEWAY__AUTH__API_KEYS=k1 deploy/local-cluster.sh   # the API with a key (any GATEWAY__* works)
#
# The API (/api/publish, /api/history): without GATEWAY__AUTH__API_KEYS the nodes serve it to
# direct loopback callers only; a request that came through a proxy (deploy/nginx/nginx.conf sets
# X-Forwarded-For) gets 401, so putting nginx in front never publishes an open API. With keys,
# callers send `Authorization: apikey <key>` directly or through nginx.
set -euo pipefail
cd "$(dirname "$0")/.."

REDIS_PORT="${REDIS_PORT:-6390}"
FIRST_PORT="${FIRST_PORT:-8081}"
command -v redis-server >/dev/null || { echo "redis-server not found (apt-get install redis-server)" >&2; exit 1; }

# Where cargo puts the binary (CARGO_TARGET_DIR, a config's build.target-dir): cargo says it.
GATEWAY="$(cargo build --release --locked -p gateway --bin gateway --message-format=json-render-diagnostics \
  | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1)"
[ -x "$GATEWAY" ] || { echo "cargo build did not name the gateway binary" >&2; exit 1; }
DATA="$(mktemp -d)"
pids=()
stop() {
  trap - INT TERM EXIT
  echo "stopping nodes…"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  wait 2>/dev/null || true
  rm -rf "$DATA"
  echo "stopped"
}
trap stop INT TERM EXIT

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$DATA" --save '' --appendonly no \
  --logfile "$DATA/redis.log" &
until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do sleep 0.1; done
echo "redis      redis://127.0.0.1:$REDIS_PORT"

for i in 0 1 2; do
  port=$((FIRST_PORT + i))
  "$GATEWAY" --listen "127.0.0.1:$port" --redis-url "redis://127.0.0.1:$REDIS_PORT" \
    >"$DATA/node$i.log" 2>&1 &
  pids+=("$!")
  until curl -fs "127.0.0.1:$port/readyz" >/dev/null 2>&1; do sleep 0.1; done
  echo "node $i     http://127.0.0.1:$port   (ws://127.0.0.1:$port/ws, /sse, /api/publish)   pid $!"
done
if [ -n "${GATEWAY__AUTH__API_KEYS:-}" ]; then
  echo "API        keys from GATEWAY__AUTH__API_KEYS: send 'Authorization: apikey <key>'"
else
  echo "API        no key: direct loopback callers only (through a proxy: 401)"
fi
echo "logs in $DATA; Ctrl-C stops everything"
wait -n "${pids[@]}" || true
