#!/usr/bin/env bash
# The project's test command (README: "Run the tests"), also what CI runs through
# .ci/run. It needs only what a new machine of this kind has: the Rust toolchain named
# in rust-toolchain.toml (rustup adds the wasm32-wasip2 target on first use).
set -euo pipefail
cd "$(dirname "$0")/.."

# The disk-image tests judge images with qemu-img, which machines of this kind carry;
# install it where it is missing rather than let those tests fail for want of a tool.
if ! command -v qemu-img >/dev/null; then
  echo "== installing qemu-utils"
  apt-get update -qq && apt-get install -y -qq qemu-utils
fi

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

echo "== tests"
cargo test --locked
# The plugin SDK's format writers, natively, judged by qemu-img.
cargo test --locked -p conductor-plugin-sdk
