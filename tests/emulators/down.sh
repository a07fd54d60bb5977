#!/usr/bin/env bash
# Stop the emulators that up.sh started (by their recorded pids, gunicorn workers
# included, waiting until they have exited) and remove their runtime state:
# configs, databases, keys, image store, pid files and the env file. The venvs stay
# for the next up.sh, and the logs stay (in $STATE/logs) until then.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

lock_state
stop_all
clear_runtime
log "emulators stopped"
