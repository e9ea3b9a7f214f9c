#!/usr/bin/env bash
# The README's main command: builds everything and runs the demo (a VM
# checkpointed, mounted and restored, with its numbers printed).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --workspace --locked
exec target/release/bench demo "$@"
