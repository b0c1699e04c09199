#!/usr/bin/env bash
# Soak test of atomicity under kill -9: many kills at random moments of a prep of a larger
# tree. Usage: scap-bridge/scripts/kill-soak.sh [ITERATIONS] [SIZE]   (default 200 small)
set -euo pipefail
cd "$(dirname "$0")/../.."
SCAP_BRIDGE_KILL_ITERATIONS="${1:-200}" SCAP_BRIDGE_KILL_SIZE="${2:-small}" \
  cargo test --release -p scap-bridge --test kill -- --nocapture
