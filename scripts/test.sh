#!/usr/bin/env bash
# The README's test command: installs what the tests need, then runs every test
# of the workspace (KVM and FUSE tests run for real; none skips itself).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --workspace --locked --no-fail-fast 2>&1
