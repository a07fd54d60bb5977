#!/usr/bin/env bash
# The project's test command (README: "Run the tests"), also what CI runs through
# .ci/run. It needs only what a new machine of this kind has: the Rust toolchain named
# in rust-toolchain.toml and Python 3.11 with pip, for the cloud emulators.
set -euo pipefail
cd "$(dirname "$0")/.."

# The disk-image tests judge images with qemu-img, which machines of this kind carry;
# install it where it is missing rather than let those tests fail for want of a tool.
if ! command -v qemu-img >/dev/null; then
  echo "== installing qemu-utils"
  apt-get update -qq && apt-get install -y -qq qemu-utils
fi

# The OS builds' tests install Debian and boot it: mmdebstrap, the disk tools, qemu and
# OVMF (tools/os-packages.sh installs what is missing).
bash tools/os-packages.sh --boot

# The plugins are built for wasm32-wasip2. rust-toolchain.toml names the target, but a
# rustup told not to install on its own leaves it out.
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
  echo "== adding the wasm32-wasip2 target"
  rustup target add wasm32-wasip2
fi

echo "== formatting"
cargo fmt --all --check

echo "== lints (host and plugins)"
cargo clippy --workspace --all-targets --locked -- -D warnings

# The plugins are tested against real cloud services on 127.0.0.1: moto (EC2/EBS), and
# Keystone and Glance (OpenStack), installed from PyPI into virtualenvs under
# target/emulators and stopped when this script ends, however it ends.
echo "== starting the cloud emulators"
trap 'bash tests/emulators/down.sh' EXIT
bash tests/emulators/up.sh
# shellcheck disable=SC1091
source target/emulators/env

echo "== tests"
cargo test --locked
# The plugin SDK natively: the format writers judged by qemu-img, and the HTTP client's
# URL handling.
cargo test --locked -p conductor-plugin-sdk --features http
