#!/usr/bin/env bash
# Builds (release) and runs possync with the given arguments, e.g. `./scripts/run.sh run`.
# It shares its build directory with scripts/test.sh (and so with `.ci/run`): one build
# serves both, and a fresh clone reuses what an earlier clone compiled.
set -euo pipefail
cd "$(dirname "$0")/.."
# Keep in step with scripts/test.sh.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/possync-target}"
exec cargo run --release --locked -- "$@"
