#!/usr/bin/env bash
# Runs the demo: environment and build (scripts/setup_env.sh: on a machine without a GPU the CPU kernels only;
# skipped when nothing changed), then `python -m torchmoe demo` (extra arguments are passed on, e.g.
# `scripts/demo.sh --steps 200 --router switch`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TORCHMOE_PURPOSE=demo
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT" && exec "$PY" -m torchmoe demo "$@"
