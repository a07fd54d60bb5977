#!/usr/bin/env bash
# The project's run command (README: "The two commands"): installs the Debian packages
# OS builds and boot checks need where they are missing (tools/os-packages.sh), then
# builds and runs the server with the bundled plugins: `cargo run --release -- serve`,
# with any arguments passed on (`./serve.sh --listen 0.0.0.0:3000`).
set -euo pipefail
cd "$(dirname "$0")"
bash tools/os-packages.sh --boot
exec cargo run --release -- serve "$@"
