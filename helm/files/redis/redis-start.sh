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
# The password: REDIS_PASSWORD, or the file REDIS_PASSWORD_FILE names (a mounted Secret).
if [ -n "${REDIS_PASSWORD_FILE:-}" ]; then REDIS_PASSWORD=$(cat "$REDIS_PASSWORD_FILE"); fi
: "${REDIS_PASSWORD:?}" "${SELF_HOST:?}" "${SELF_PORT:?}" "${FIRST_MASTER:?}" "${DATA_DIR:?}" "${CONF:?}"
SENTINELS=${SENTINELS:-}
MASTER_NAME=${MASTER_NAME:-}
export REDISCLI_AUTH="$REDIS_PASSWORD"

# "host port" of the master the first answering sentinel names, or nothing.
named_master() {
  for s in $SENTINELS; do
    answer=$(timeout 3 redis-cli -h "${s%:*}" -p "${s##*:}" --raw \
      sentinel get-master-addr-by-name "$MASTER_NAME" 2>/dev/null | tr '\n' ' ') || answer=""
    case "$answer" in
      *[!\ ]*\ [0-9]*) echo "$answer"; return 0 ;;
    esac
  done
  return 1
}

if master=$(named_master); then
  set -- $master
  master_host=$1 master_port=$2
  echo "sentinels name $master_host:$master_port as the master"
else
  master_host=${FIRST_MASTER%:*} master_port=${FIRST_MASTER##*:}
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
