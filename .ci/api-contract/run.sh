#!/usr/bin/env bash
# .ci/api-contract/run.sh: Schemathesis (PyPI) against a live gateway node, driven by the node's
# own contract at /api/openapi.json (gateway/src/http/openapi.json with the node's limits):
# every check, every phase (schemathesis.toml says which operations are left out and why). A
# failure is a request the node answered against its contract: a 5xx, an undocumented status or
# body, a schema-valid request refused, a schema-violating one accepted, an API call without the
# key accepted. The node has an API key (so auth is checked) and a 1 s poll timeout (so waiting
# polls stay short).
#
#   bash .ci/api-contract/run.sh            (GATEWAY_BIN=… to test another build;
#                                            API_CONTRACT_SEED=… for other inputs)
#
# Schemathesis goes into a cached virtualenv ($API_CONTRACT_TOOLS, default
# /tmp/gateway-api-contract-tools), reinstalled only when the pin changes.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
TOOLS="${API_CONTRACT_TOOLS:-/tmp/gateway-api-contract-tools}"
PIN="schemathesis==4.32.5"
# Fixed inputs by default: CI must not fail by chance. Any seed's failure is a real bug.
SEED="${API_CONTRACT_SEED:-20261126}"
KEY="api-contract-key"

if [ "$(cat "$TOOLS/venv.stamp" 2>/dev/null)" != "$PIN" ]; then
  echo "installing $PIN into $TOOLS/venv"
  rm -rf "$TOOLS/venv"
  mkdir -p "$TOOLS"
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check "$PIN"
  echo "$PIN" >"$TOOLS/venv.stamp"
fi

BIN="${GATEWAY_BIN:-}"
if [ -z "$BIN" ]; then
  cargo build --locked -p gateway --bin gateway
  BIN="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/gateway"
fi

WORK="$(mktemp -d)"
NODE_PID=""
cleanup() {
  [ -n "$NODE_PID" ] && kill "$NODE_PID" 2>/dev/null && wait "$NODE_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
cat >"$WORK/gateway.toml" <<TOML
[auth]
api_keys = ["$KEY"]
[poll]
max_timeout = "1s"
TOML
"$BIN" --listen 127.0.0.1:0 --config "$WORK/gateway.toml" >"$WORK/node.log" 2>&1 &
NODE_PID=$!
ADDR=""
for _ in $(seq 300); do
  ADDR="$(sed -n 's/.*listening on \([0-9.]*:[0-9]*\).*/\1/p' "$WORK/node.log" | head -n1)"
  [ -n "$ADDR" ] && break
  kill -0 "$NODE_PID" 2>/dev/null || { cat "$WORK/node.log"; exit 1; }
  sleep 0.1
done
[ -n "$ADDR" ] || { echo "the node did not start"; cat "$WORK/node.log"; exit 1; }
echo "node on $ADDR; schemathesis seed $SEED"

status=0
# From the scratch directory: Schemathesis keeps a cache (.schemathesis/) where it runs.
cd "$WORK"
"$TOOLS/venv/bin/schemathesis" --config-file "$ROOT/.ci/api-contract/schemathesis.toml" \
  run "http://$ADDR/api/openapi.json" \
  --header "Authorization: apikey $KEY" \
  --exclude-path /sse --exclude-path /ws \
  --max-examples 100 --request-timeout 10 --seed "$SEED" \
  --no-color || status=$?
if ! kill -0 "$NODE_PID" 2>/dev/null; then
  echo "the node died during the run:"; tail -50 "$WORK/node.log"; exit 1
fi
exit "$status"
