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

echo "# machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r)"
# One cargo invocation builds all three benchmarks and the server binary together.
cargo bench --locked --bench plugins --bench disk --bench api 2>&1 \
  | grep -v -E '^\s*(Compiling|Finished|Running|Downloaded|Downloading)'
# The ec2 push budget needs the ec2 plugin and the EBS emulator; until that plugin
# exists there is nothing to measure, and the line says so rather than staying silent.
printf '%-46s %12s %16s %7s %9s  %s\n' "ec2 push of 1 GiB, half zero blocks" "-" "coldsnap" "-" "≥1.0x" "not measured: no ec2 plugin yet"
