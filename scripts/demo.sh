#!/usr/bin/env bash
# Runs the demo on a fresh machine: environment, build, then `python -m torchmoe demo` (extra arguments
# are passed on, e.g. `scripts/demo.sh --steps 200 --router switch`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT" && exec "$PY" -m torchmoe demo "$@"
