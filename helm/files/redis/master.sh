# Sourced by redis-start.sh and sentinel-start.sh: the password, and which Redis is the master.
# Sets REDISCLI_AUTH, master_host and master_port: the master the first answering sentinel of
# SENTINELS names (skipping SKIP_SENTINEL, a sentinel's own address), or FIRST_MASTER when none
# answers (the set's first start).

# The password: REDIS_PASSWORD, or the file REDIS_PASSWORD_FILE names (a mounted Secret).
if [ -n "${REDIS_PASSWORD_FILE:-}" ]; then REDIS_PASSWORD=$(cat "$REDIS_PASSWORD_FILE"); fi
: "${REDIS_PASSWORD:?}" "${FIRST_MASTER:?}"
export REDISCLI_AUTH="$REDIS_PASSWORD"

master_host=${FIRST_MASTER%:*} master_port=${FIRST_MASTER##*:} master_named=""
for s in ${SENTINELS:-}; do
  [ "$s" = "${SKIP_SENTINEL:-}" ] && continue
  answer=$(timeout 3 redis-cli -h "${s%:*}" -p "${s##*:}" --raw \
    sentinel get-master-addr-by-name "${MASTER_NAME:-}" 2>/dev/null | tr '\n' ' ') || answer=""
  case "$answer" in
    *[!\ ]*\ [0-9]*)
      set -- $answer
      master_host=$1 master_port=$2 master_named=$s
      break
      ;;
  esac
done
