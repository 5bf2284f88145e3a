#!/bin/sh
# Starts one Sentinel of the chart's Sentinel set (redis.mode=sentinel). A Sentinel that ran
# before keeps its state (the file it rewrites lives on the volume); a new one monitors the master
# the other sentinels name, or on the set's first start FIRST_MASTER, once that answers.
#
# Environment: as redis-start.sh, plus SENTINEL_HOST SENTINEL_PORT (how others reach this
# Sentinel), QUORUM, DOWN_AFTER_MS, FAILOVER_TIMEOUT_MS, and SENTINEL_CONF (on the volume).
set -eu
: "${SENTINEL_HOST:?}" "${SENTINEL_PORT:?}" "${SENTINELS:?}" "${MASTER_NAME:?}" "${QUORUM:?}"
: "${DOWN_AFTER_MS:?}" "${FAILOVER_TIMEOUT_MS:?}" "${SENTINEL_CONF:?}"

if [ -s "$SENTINEL_CONF" ]; then
  echo "restarting with the state in $SENTINEL_CONF"
  exec redis-sentinel "$SENTINEL_CONF"
fi

SKIP_SENTINEL="$SENTINEL_HOST:$SENTINEL_PORT"
. "$(dirname "$0")/master.sh"
# A hostname must resolve before `sentinel monitor` accepts it; wait for the master to answer.
until [ "$(timeout 3 redis-cli -h "$master_host" -p "$master_port" ping 2>/dev/null)" = "PONG" ]; do
  echo "waiting for the master $master_host:$master_port"
  sleep 1
done
echo "monitoring $master_host:$master_port as $MASTER_NAME"

umask 077
tmp="$SENTINEL_CONF.new"
cat > "$tmp" <<CONF
port $SENTINEL_PORT
protected-mode no
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip $SENTINEL_HOST
sentinel announce-port $SENTINEL_PORT
requirepass "$REDIS_PASSWORD"
sentinel sentinel-pass "$REDIS_PASSWORD"
sentinel monitor $MASTER_NAME $master_host $master_port $QUORUM
sentinel auth-pass $MASTER_NAME "$REDIS_PASSWORD"
sentinel down-after-milliseconds $MASTER_NAME $DOWN_AFTER_MS
sentinel failover-timeout $MASTER_NAME $FAILOVER_TIMEOUT_MS
sentinel parallel-syncs $MASTER_NAME 1
CONF
mv "$tmp" "$SENTINEL_CONF"
exec redis-sentinel "$SENTINEL_CONF"
