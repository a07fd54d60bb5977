#!/usr/bin/env bash
# Measures every budget of DESIGN.md §8 on this machine, each against its comparison in
# the same run, and prints one line per budget: figure, comparison, ratio, budget,
# met or MISSED. BENCHMARKS.md records a run and how to read it.
#
#   bench/run.sh
#
# Needs wrk (Debian package; installed here if missing) and qemu-img. Builds the
# release profile once (the first time takes several minutes for wasmtime).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null || ! command -v qemu-img >/dev/null; then
  apt-get update -qq && apt-get install -y -qq wrk qemu-utils
fi

# The ec2 push is measured against coldsnap (crates.io), the EBS-direct uploader, on the
# EBS emulator the tests use. coldsnap is installed once into target/tools (about ten
# minutes to build on two cores); the emulator is started here and stopped on exit.
COLDSNAP="$PWD/target/tools/bin/coldsnap"
if [ ! -x "$COLDSNAP" ]; then
  cargo install --locked coldsnap --version 0.12.0 --root "$PWD/target/tools"
fi
export CONDUCTOR_COLDSNAP="$COLDSNAP"
bash tests/emulators/up.sh
trap 'bash tests/emulators/down.sh' EXIT
# shellcheck disable=SC1091
source target/emulators/env

echo "# machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r)"
# One cargo invocation builds all four benchmarks and the server binary together.
cargo bench --locked --bench plugins --bench disk --bench api --bench ec2 2>&1 \
  | grep -v -E '^\s*(Compiling|Finished|Running|Downloaded|Downloading)'

# OS builds (needs root): cold and warm Debian builds against mmdebstrap run directly,
# and a boot to a marker.
bash bench/os.sh
