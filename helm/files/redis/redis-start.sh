#!/bin/sh
# Starts one Redis of the chart's in-chart Redis. redis.mode=standalone: the only one, a master.
# redis.mode=sentinel: a replica of the master the sentinels name; when no sentinel answers (the
# set's first start), the first pod is the master and the others replicate it. Every Redis
# persists with AOF (appendfsync always) on its volume, announces its stable DNS name (pod IPs
# change on restart), and requires the password.
#
# Environment (set by the chart; a local test sets the same for 127.0.0.1 and other ports):
#   REDIS_PASSWORD  the password of every Redis and Sentinel of the set
#   SELF_HOST SELF_PORT        how the others reach this Redis
#   FIRST_MASTER    host:port of the master on the set's first start
#   SENTINELS       "host:port host:port …" of every Sentinel (empty: a single Redis, no Sentinel)
#   MASTER_NAME     the name the sentinels monitor the master under
#   DATA_DIR        the persistent directory (AOF);  CONF  the file to write the configuration to
set -eu
: "${SELF_HOST:?}" "${SELF_PORT:?}" "${DATA_DIR:?}" "${CONF:?}"
. "$(dirname "$0")/master.sh"
if [ -n "$master_named" ]; then
  echo "sentinel $master_named names $master_host:$master_port as the master"
else
  echo "no sentinel answers: first start, $master_host:$master_port is the master"
fi

umask 077
cat > "$CONF" <<CONF
port $SELF_PORT
dir $DATA_DIR
appendonly yes
appendfsync always
save ""
protected-mode no
requirepass "$REDIS_PASSWORD"
masterauth "$REDIS_PASSWORD"
replica-announce-ip $SELF_HOST
replica-announce-port $SELF_PORT
CONF
if [ "$master_host" != "$SELF_HOST" ] || [ "$master_port" != "$SELF_PORT" ]; then
  echo "replicaof $master_host $master_port" >> "$CONF"
fi
exec redis-server "$CONF"
