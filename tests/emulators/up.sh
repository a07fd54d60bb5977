#!/usr/bin/env bash
# Start the cloud emulators the tests run against, all on 127.0.0.1:
#   moto 5.2.5     EC2 / S3 / EBS direct APIs (one port; moto routes by SigV4 scope)
#   moto-auth      a second moto that checks SigV4 signatures against an IAM user
#   Keystone 30    identity, with a `ci` user in project `demo`
#   Glance 33      image service, authenticating against that Keystone
# and the venv of spdx-tools, whose validator the SBOM tests run (no service),
# then write $STATE/env with the CONDUCTOR_TEST_* variables (`. "$STATE/env"`).
#
# Idempotent: if everything from a previous run still answers, nothing is done.
# Otherwise leftovers are stopped and everything starts from empty databases.
# Venvs are built from the pinned requirements-*.txt on first use and rebuilt only
# when those files (or the Python) change.
#
# Environment:
#   CONDUCTOR_EMULATORS_DIR     state dir (default <repo>/target/emulators)
#   CONDUCTOR_EMULATORS_PYTHON  Python >= 3.11 to build the venvs with (default python3)
#   CONDUCTOR_EMULATORS_{MOTO,MOTO_AUTH,KEYSTONE,GLANCE}_PORT  fixed ports (default: free ones)
#   CONDUCTOR_EMULATORS_TIMEOUT seconds to wait for each service (default 120)
# Stop with down.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PY=${CONDUCTOR_EMULATORS_PYTHON:-python3}
TIMEOUT=${CONDUCTOR_EMULATORS_TIMEOUT:-120}
CI_USER=ci
CI_PASSWORD=ci-secret
CI_PROJECT=demo
CI_DOMAIN=Default
# gunicorn takes extra settings from this; the ones written below must be all.
unset GUNICORN_CMD_ARGS

lock_state

# --- helpers --------------------------------------------------------------------

# wait_http NAME URL: wait until URL gives any HTTP answer below 500 while the
# service's process is alive; on failure show the end of its log and fail.
wait_http() {
  local name=$1 url=$2 pid rc=0
  pid=$(<"$PIDS/$name.pid")
  "$PY" - "$url" "$pid" "$TIMEOUT" <<'EOF' || rc=$?
import os, sys, time, urllib.error, urllib.request
url, pid, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
deadline = time.monotonic() + timeout
while True:
    try:
        with open(f"/proc/{pid}/stat") as f:
            alive = f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        alive = False
    if not alive:
        sys.exit(2)
    try:
        with opener.open(url, timeout=5):
            sys.exit(0)
    except urllib.error.HTTPError as err:
        if err.code < 500:
            sys.exit(0)
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit(3)
    time.sleep(0.2)
EOF
  case $rc in
    0) return 0 ;;
    2) printf 'emulators: error: %s exited before answering on %s\n' "$name" "$url" >&2 ;;
    3) printf 'emulators: error: %s did not answer on %s within %ss\n' "$name" "$url" "$TIMEOUT" >&2 ;;
    *) printf 'emulators: error: waiting for %s failed (%s)\n' "$name" "$rc" >&2 ;;
  esac
  printf -- '--- last lines of %s\n' "$LOGS/$name.log" >&2
  tail -n 40 "$LOGS/$name.log" >&2 || true
  exit 1
}

# run_logged LOGNAME CMD...: run a setup command, appending its output to a log that
# is shown if it fails.
run_logged() {
  local logfile=$LOGS/$1.log
  shift
  if ! "$@" >>"$logfile" 2>&1; then
    printf 'emulators: error: failed: %s\n--- last lines of %s\n' "$*" "$logfile" >&2
    tail -n 40 "$logfile" >&2 || true
    exit 1
  fi
}

# start NAME DIR CMD...: run CMD in DIR in the background as the leader of a new
# session and process group, so down.sh can find and stop all of it (gunicorn's
# workers included) by one pid, and so it outlives this script and its terminal.
# A background job of a non-interactive shell is not a group leader, so setsid
# execs in place and $! is the service's own pid. fd 9 (the state lock) is closed,
# or the service would hold the lock for as long as it runs.
start() {
  local name=$1 dir=$2
  shift 2
  (cd "$dir" && exec setsid "$@") </dev/null >>"$LOGS/$name.log" 2>&1 9>&- &
  echo $! >"$PIDS/$name.pid"
}

# ensure_venv NAME REQUIREMENTS...: (re)build $VENVS/NAME unless it was built from
# exactly these requirement files with this Python. The stamp is written last, so
# an interrupted install is redone.
ensure_venv() {
  local name=$1 dir=$VENVS/$1 want args=() req
  shift
  want=$({ "$PY" -c 'import os, sys; print(os.path.realpath(sys.executable), sys.version)'
           cat "$@"; } | sha256sum | cut -d' ' -f1)
  if [[ -x $dir/bin/python && -f $dir/.requirements.sha256 &&
        $(<"$dir/.requirements.sha256") == "$want" ]] && "$dir/bin/python" -c '' 2>/dev/null; then
    return 0
  fi
  log "building venv $name (log: $LOGS/pip-$name.log)"
  rm -rf "$dir"
  : >"$LOGS/pip-$name.log"
  run_logged "pip-$name" "$PY" -m venv "$dir"
  for req in "$@"; do args+=(-r "$req"); done
  run_logged "pip-$name" "$dir/bin/python" -m pip install --no-input --disable-pip-version-check "${args[@]}"
  run_logged "pip-$name" "$dir/bin/python" -m pip check
  echo "$want" >"$dir/.requirements.sha256"
}

# all_up: the services of a previous up.sh are all alive and answering.
all_up() {
  local name
  [[ -f $ENV_FILE ]] || return 1
  for name in "${SERVICES[@]}"; do
    [[ -f $PIDS/$name.pid ]] && is_ours "$(<"$PIDS/$name.pid")" || return 1
  done
  (
    set +u
    . "$ENV_FILE"
    "$PY" - "$CONDUCTOR_TEST_MOTO/moto-api/" "$CONDUCTOR_TEST_MOTO_AUTH/moto-api/" \
      "$CONDUCTOR_TEST_KEYSTONE" \
      "$CONDUCTOR_TEST_GLANCE/healthcheck" <<'EOF'
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
for url in sys.argv[1:]:
    with opener.open(url, timeout=5) as r:
        pass
EOF
  ) >/dev/null 2>&1
}

# Ports: fixed ones if given, else random free ones outside the kernel's ephemeral
# range. A port from bind(0) would come from that range, where an outgoing
# connection made before the service binds could take it.
pick_ports() {
  "$PY" - "${CONDUCTOR_EMULATORS_MOTO_PORT:-0}" "${CONDUCTOR_EMULATORS_MOTO_AUTH_PORT:-0}" \
    "${CONDUCTOR_EMULATORS_KEYSTONE_PORT:-0}" \
    "${CONDUCTOR_EMULATORS_GLANCE_PORT:-0}" <<'EOF'
import random, socket, sys
try:
    lo, hi = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
except OSError:
    lo, hi = 32768, 60999
pool = [p for p in range(10000, 65536) if not lo <= p <= hi]
def free(port):
    # SO_REUSEADDR, as the servers bind: connections of an earlier run lingering in
    # TIME_WAIT don't keep a port from being listened on, only a listener does.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
chosen = []
for want in map(int, sys.argv[1:]):
    if want:
        if not free(want):
            sys.exit(f"port {want} on 127.0.0.1 is in use")
        chosen.append(want)
        continue
    while True:
        port = random.choice(pool)
        if port not in chosen and free(port):
            chosen.append(port)
            break
print(*chosen)
EOF
}

# --- start ----------------------------------------------------------------------

# spdx-tools' validator, which the SBOM tests run (no service: only its venv).
SPDX_VALIDATOR=$VENVS/spdx/bin/pyspdxtools

if all_up; then
  mkdir -p "$VENVS" "$LOGS"
  ensure_venv spdx "$EMU_SRC/requirements-spdx.txt"
  grep -q CONDUCTOR_TEST_SPDX "$ENV_FILE" ||
    echo "export CONDUCTOR_TEST_SPDX=$SPDX_VALIDATOR" >>"$ENV_FILE"
  log "emulators already running; env: $ENV_FILE"
  cat "$ENV_FILE"
  exit 0
fi

# Leftovers of an earlier run (crashed, half-started, or stopped without down.sh).
stop_all
clear_runtime
mkdir -p "$VENVS" "$RUN" "$PIDS" "$LOGS"
for f in moto moto-auth keystone glance setup; do : >"$LOGS/$f.log"; done

# From here on, a failure stops whatever was started (logs stay in $LOGS).
trap 'rc=$?; if ((rc)); then
        stop_all >/dev/null 2>&1 || true; clear_runtime
        printf "emulators: up.sh failed; stopped what it had started. Logs: %s\n" "$LOGS" >&2
      fi' EXIT

"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  die "$PY is $("$PY" --version 2>&1); Glance 33 needs Python >= 3.11 (set CONDUCTOR_EMULATORS_PYTHON)"

# The two venvs are independent: build them side by side (mostly network time).
# Keystone and Glance pin the same versions of everything they share, so they
# share one venv.
ensure_venv moto "$EMU_SRC/requirements-moto.txt" &
moto_venv_job=$!
ensure_venv openstack "$EMU_SRC/requirements-keystone.txt" "$EMU_SRC/requirements-glance.txt" &
os_venv_job=$!
ensure_venv spdx "$EMU_SRC/requirements-spdx.txt" &
spdx_venv_job=$!
wait "$moto_venv_job" || exit 1
wait "$os_venv_job" || exit 1
wait "$spdx_venv_job" || exit 1
OS_BIN=$VENVS/openstack/bin

read -r MOTO_PORT MOTO_AUTH_PORT KEYSTONE_PORT GLANCE_PORT < <(pick_ports)
[[ -n ${GLANCE_PORT:-} ]] || die "could not pick ports"
MOTO_URL=http://127.0.0.1:$MOTO_PORT
MOTO_AUTH_URL=http://127.0.0.1:$MOTO_AUTH_PORT
KEYSTONE_URL=http://127.0.0.1:$KEYSTONE_PORT/v3
GLANCE_URL=http://127.0.0.1:$GLANCE_PORT

secret() { "$PY" -c 'import secrets; print(secrets.token_hex(16))'; }
KEYSTONE_ADMIN_PASSWORD=$(secret)
GLANCE_SERVICE_PASSWORD=$(secret)

# --- moto -------------------------------------------------------------------------
# Without MOTO_EC2_LOAD_DEFAULT_AMIS=false moto preloads ~1300 public AMIs and every
# unfiltered DescribeImages takes seconds. moto_server.py fixes the EBS block size.
log "starting moto on $MOTO_URL"
mkdir -p "$RUN/moto"
MOTO_EC2_LOAD_DEFAULT_AMIS=false \
  start moto "$RUN/moto" "$VENVS/moto/bin/python" "$EMU_SRC/moto_server.py" \
  -H 127.0.0.1 -p "$MOTO_PORT"

# --- moto with signature checks ---------------------------------------------------
# moto checks no signature by default. With INITIAL_NO_AUTH_ACTION_COUNT it lets that
# many requests through unchecked (used below to make an IAM user with a key) and
# then checks every request's SigV4 signature against IAM: how the tests tell right
# keys from wrong ones. (Its CompleteSnapshot fails signature checks even when right,
# so uploads are tested against the first moto.)
log "starting moto with signature checks on $MOTO_AUTH_URL"
mkdir -p "$RUN/moto-auth"
MOTO_EC2_LOAD_DEFAULT_AMIS=false INITIAL_NO_AUTH_ACTION_COUNT=3 \
  start moto-auth "$RUN/moto-auth" "$VENVS/moto/bin/python" "$EMU_SRC/moto_server.py" \
  -H 127.0.0.1 -p "$MOTO_AUTH_PORT"

# --- Keystone ---------------------------------------------------------------------
KS=$RUN/keystone
mkdir -p "$KS/etc"
cat >"$KS/etc/keystone.conf" <<EOF
[DEFAULT]
# Log to stderr, which up.sh sends to files in $LOGS.
use_stderr = true
[database]
connection = sqlite:///$KS/keystone.sqlite
[token]
provider = fernet
[fernet_tokens]
key_repository = $KS/fernet-keys
[fernet_receipts]
key_repository = $KS/fernet-keys
[credential]
key_repository = $KS/credential-keys
EOF

# Keystone parses sys.argv with oslo.config when its WSGI app loads, so gunicorn
# must get no command-line arguments at all (`gunicorn --bind ... app` makes every
# worker die with "unrecognized arguments"). Everything goes in ./gunicorn.conf.py,
# which gunicorn reads from its working directory.
cat >"$KS/gunicorn.conf.py" <<EOF
wsgi_app = "keystone.wsgi.api:application"
proc_name = "keystone"
bind = ["127.0.0.1:$KEYSTONE_PORT"]
workers = 1
threads = 4
timeout = 120
graceful_timeout = 10
accesslog = "-"
# gunicorn 27 would otherwise create a control socket under ~/.gunicorn.
control_socket_disable = True
raw_env = ["OS_KEYSTONE_CONFIG_DIR=$KS/etc"]
EOF

KM=("$OS_BIN/keystone-manage" --config-file "$KS/etc/keystone.conf")
# As root, keystone-manage insists on being told whom the key files belong to.
KEY_OWNER=(--keystone-user "$(id -un)" --keystone-group "$(id -gn)")

# Glance's database does not depend on Keystone: migrate it meanwhile.
GL=$RUN/glance
mkdir -p "$GL/etc" "$GL/images" "$GL/staging" "$GL/tasks" "$GL/locks"
cp "$VENVS/openstack/etc/glance/glance-api-paste.ini" "$GL/etc/"
cat >"$GL/etc/glance-api.conf" <<EOF
[DEFAULT]
use_stderr = true
enabled_backends = fs:file
# Where other Glance workers would reach this one (for image import); one here.
worker_self_reference_url = $GLANCE_URL
[database]
connection = sqlite:///$GL/glance.sqlite
[paste_deploy]
config_file = $GL/etc/glance-api-paste.ini
# The paste "keystone" pipeline: tokens are checked against Keystone by
# keystonemiddleware (the default pipeline would trust anyone, with no owner).
flavor = keystone
[keystone_authtoken]
www_authenticate_uri = $KEYSTONE_URL
auth_url = $KEYSTONE_URL
auth_type = password
username = glance
password = $GLANCE_SERVICE_PASSWORD
project_name = service
user_domain_name = Default
project_domain_name = Default
[glance_store]
default_backend = fs
[fs]
filesystem_store_datadir = $GL/images
[os_glance_staging_store]
filesystem_store_datadir = $GL/staging
[os_glance_tasks_store]
filesystem_store_datadir = $GL/tasks
[oslo_concurrency]
lock_path = $GL/locks
EOF
run_logged glance "$OS_BIN/glance-manage" --config-file "$GL/etc/glance-api.conf" db_sync &
glance_db_job=$!

log "setting up Keystone"
# The key repositories don't touch the database: make them while it is migrated.
{
  run_logged setup "${KM[@]}" fernet_setup "${KEY_OWNER[@]}"
  run_logged setup "${KM[@]}" credential_setup "${KEY_OWNER[@]}"
} &
keystone_keys_job=$!
run_logged setup "${KM[@]}" db_sync
wait "$keystone_keys_job" || exit 1
run_logged setup "${KM[@]}" bootstrap \
  --bootstrap-password "$KEYSTONE_ADMIN_PASSWORD" \
  --bootstrap-username admin --bootstrap-project-name admin --bootstrap-role-name admin \
  --bootstrap-service-name keystone --bootstrap-region-id RegionOne \
  --bootstrap-admin-url "$KEYSTONE_URL/" \
  --bootstrap-internal-url "$KEYSTONE_URL/" \
  --bootstrap-public-url "$KEYSTONE_URL/"

log "starting Keystone on $KEYSTONE_URL"
start keystone "$KS" "$OS_BIN/gunicorn"
wait_http keystone "$KEYSTONE_URL"

log "creating projects, users and the image service in Keystone"
KEYSTONE_ADMIN_PASSWORD=$KEYSTONE_ADMIN_PASSWORD \
  GLANCE_SERVICE_PASSWORD=$GLANCE_SERVICE_PASSWORD \
  CI_PASSWORD=$CI_PASSWORD \
  run_logged setup "$OS_BIN/python" "$EMU_SRC/keystone_setup.py" "$KEYSTONE_URL" "$GLANCE_URL"

wait "$glance_db_job" || exit 1

# --- Glance -----------------------------------------------------------------------
# Glance 33 no longer runs standalone (glance-api refuses to); it is a WSGI app.
# Under WSGI its config comes from $OS_GLANCE_CONFIG_DIR and bind_host/bind_port
# are ignored: gunicorn's --bind decides. --no-control-socket: see Keystone above.
log "starting Glance on $GLANCE_URL"
OS_GLANCE_CONFIG_DIR=$GL/etc \
  start glance "$GL" "$OS_BIN/gunicorn" \
  --bind "127.0.0.1:$GLANCE_PORT" --workers 1 --threads 4 --timeout 300 \
  --graceful-timeout 10 --access-logfile - --no-control-socket --name glance \
  glance.wsgi.api:application
wait_http glance "$GLANCE_URL/healthcheck"
wait_http moto "$MOTO_URL/moto-api/"
wait_http moto-auth "$MOTO_AUTH_URL/moto-api/"
# The three unchecked requests: a user, a policy allowing everything, a key.
read -r MOTO_AUTH_KEY MOTO_AUTH_SECRET < <("$PY" "$EMU_SRC/moto_iam_key.py" "$MOTO_AUTH_URL")
[[ -n ${MOTO_AUTH_SECRET:-} ]] || die "could not make an IAM key on $MOTO_AUTH_URL"

cat >"$ENV_FILE.tmp" <<EOF
# Written by tests/emulators/up.sh; stop with tests/emulators/down.sh.
export CONDUCTOR_TEST_MOTO=$MOTO_URL
export CONDUCTOR_TEST_MOTO_AUTH=$MOTO_AUTH_URL
export CONDUCTOR_TEST_MOTO_AUTH_KEY=$MOTO_AUTH_KEY
export CONDUCTOR_TEST_MOTO_AUTH_SECRET=$MOTO_AUTH_SECRET
export CONDUCTOR_TEST_KEYSTONE=$KEYSTONE_URL
export CONDUCTOR_TEST_GLANCE=$GLANCE_URL
export CONDUCTOR_TEST_OS_USER=$CI_USER
export CONDUCTOR_TEST_OS_PASSWORD=$CI_PASSWORD
export CONDUCTOR_TEST_OS_PROJECT=$CI_PROJECT
export CONDUCTOR_TEST_OS_DOMAIN=$CI_DOMAIN
export CONDUCTOR_TEST_SPDX=$SPDX_VALIDATOR
EOF
mv "$ENV_FILE.tmp" "$ENV_FILE"
log "emulators up; for the tests: . $ENV_FILE"
cat "$ENV_FILE"
