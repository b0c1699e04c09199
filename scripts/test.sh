#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: install what the tests need, then test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-deps.sh
cargo test --workspace --all-targets "$@"
