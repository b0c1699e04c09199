#!/usr/bin/env bash
# Soak test of atomicity: many `kill -9`s of `scap-bridge prep` at random moments, on a
# bigger tree than the test suite uses (see scap-bridge/tests/kill.rs for what is checked).
# usage: scripts/kill-soak.sh [ITERATIONS=200] [SIZE=small]   (SIZE: tiny|small|medium)
set -euo pipefail
cd "$(dirname "$0")/.."
iterations=${1:-200}
size=${2:-small}
SCAP_BRIDGE_KILL_ITERATIONS="$iterations" SCAP_BRIDGE_KILL_SIZE="$size" \
    cargo test --release -p scap-bridge --test kill -- --nocapture
