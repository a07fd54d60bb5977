# Shared by up.sh and down.sh (sourced, not run).
#
# State dir layout ($CONDUCTOR_EMULATORS_DIR, default <repo>/target/emulators):
#   venvs/moto, venvs/openstack   kept across up/down; rebuilt when the pins change
#                                 (moto and moto-auth share venvs/moto)
#   run/                          configs, databases, keys, image store; removed by down.sh
#   pids/<service>.pid            one per service; the pid is also its process group id
#   logs/<service>.log            kept after down.sh for post-mortems; reset by up.sh
#   env                           export lines for the tests; removed by down.sh

EMU_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$EMU_SRC/../.." && pwd)
STATE=${CONDUCTOR_EMULATORS_DIR:-$REPO_ROOT/target/emulators}
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)
VENVS=$STATE/venvs
RUN=$STATE/run
PIDS=$STATE/pids
LOGS=$STATE/logs
ENV_FILE=$STATE/env
SERVICES=(moto moto-auth keystone glance)

# Everything here talks to 127.0.0.1; never send that through an HTTP proxy that CI
# may have configured (Python's urllib and requests, used by the services and by
# Glance's token checks against Keystone, would otherwise honour it).
export no_proxy="127.0.0.1,localhost${no_proxy:+,$no_proxy}"
export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}"

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'emulators: error: %s\n' "$*" >&2; exit 1; }

# One up.sh or down.sh at a time per state dir.
lock_state() {
  exec 9>"$STATE/.lock"
  flock -w 900 9 || die "another up.sh/down.sh holds $STATE/.lock"
}

# True if PID is alive (not a zombie) and is one of ours, so that a recycled pid is
# never signalled. Ours = working directory inside the state dir (up.sh starts each
# service in $RUN/<service>). The command line can't tell: gunicorn renames its
# processes ("gunicorn: master [...]") when setproctitle is installed, as it is here.
is_ours() {
  local pid=$1 stat cwd
  { read -r stat <"/proc/$pid/stat"; } 2>/dev/null || return 1
  stat=${stat##*) }
  [[ ${stat:0:1} != Z ]] || return 1
  cwd=$(readlink "/proc/$pid/cwd" 2>/dev/null) || return 1
  [[ $cwd == "$STATE"/* ]]
}

# Pids of our processes in process group PGID (a gunicorn master and its workers).
group_members() {
  local pgid=$1 f stat pid pgrp
  for f in /proc/[0-9]*/stat; do
    { read -r stat <"$f"; } 2>/dev/null || continue
    stat=${stat##*) }          # drop "pid (comm) ", comm may hold spaces
    read -r _ _ pgrp _ <<<"$stat"
    pid=${f#/proc/}; pid=${pid%/stat}
    if [[ $pgrp == "$pgid" ]] && is_ours "$pid"; then echo "$pid"; fi
  done
}

# Stop one service: SIGTERM to its leader (gunicorn's master then stops its workers),
# wait for the whole process group to exit, SIGKILL what is left after a grace period.
stop_service() {
  local name=$1 pidfile=$PIDS/$1.pid pid members i
  [[ -f $pidfile ]] || return 0
  pid=$(<"$pidfile")
  [[ $pid =~ ^[0-9]+$ ]] || { rm -f "$pidfile"; return 0; }
  members=$(group_members "$pid")
  if [[ -n $members ]]; then
    log "stopping $name (pid $pid)"
    if is_ours "$pid"; then
      kill -TERM "$pid" 2>/dev/null || true
    else
      # The leader is gone but left workers behind: signal them one by one.
      for i in $members; do kill -TERM "$i" 2>/dev/null || true; done
    fi
    for ((i = 0; i < 150; i++)); do
      members=$(group_members "$pid")
      [[ -z $members ]] && break
      sleep 0.1
    done
    if [[ -n $members ]]; then
      log "$name did not exit after SIGTERM; sending SIGKILL to $(echo $members)"
      for i in $members; do kill -KILL "$i" 2>/dev/null || true; done
      for ((i = 0; i < 50; i++)); do
        [[ -z $(group_members "$pid") ]] && break
        sleep 0.1
      done
      [[ -z $(group_members "$pid") ]] || die "could not stop $name: $(group_members "$pid")"
    fi
  fi
  rm -f "$pidfile"
}

stop_all() {
  local name
  # Glance first: it is Keystone's client.
  for name in glance keystone moto-auth moto; do stop_service "$name"; done
}

clear_runtime() {
  rm -rf "$RUN" "$PIDS" "$ENV_FILE"
}
