#!/usr/bin/env bash
# CI's packaging and lower-bound check, as a new user installs torchmoe: builds the sdist of this checkout, has
# pip build a wheel from it and installs that into a fresh venv holding only the lowest supported torch
# (TORCHMOE_LOWEST_TORCH, default torch==2.13.0: a CPU build, so the CPU kernels are built) and the [test]
# extra; imports it and runs an op from outside any source tree; then runs the pytest suite from the unpacked
# sdist against that install. Everything goes to build/sdist-check (TORCHMOE_SDIST_WORK), made afresh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${TORCHMOE_SDIST_WORK:-$ROOT/build/sdist-check}"
TORCH_SPEC="${TORCHMOE_LOWEST_TORCH:-torch==2.13.0}"
PY="$WORK/venv/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

rm -rf "$WORK" && mkdir -p "$WORK"
echo "== sdist check: a fresh venv with $TORCH_SPEC in $WORK"
python3 -m venv "$WORK/venv"
"${PIP[@]}" --upgrade pip setuptools wheel
"${PIP[@]}" "$TORCH_SPEC" numpy ninja build==1.6.1

echo "== sdist check: building the sdist"
"$PY" -m build --sdist --no-isolation --outdir "$WORK/dist" "$ROOT" >/dev/null
sdist="$(ls "$WORK"/dist/torchmoe-*.tar.gz)"

start=$(date +%s)
echo "== sdist check: pip wheel --no-build-isolation $(basename "$sdist") (a CPU build: about 4 min on 2 cores)"
"$PY" -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps -w "$WORK/wheels" "$sdist"
wheel="$(ls "$WORK"/wheels/torchmoe-*.whl)"
"${PIP[@]}" "$wheel[test]"
echo "   (took $(( $(date +%s) - start )) s)"

echo "== sdist check: import and run an op outside the source tree"
(cd "$WORK" && "$PY" - <<'PYEOF'
import sys
import sysconfig
import torch
import torchmoe

site = sysconfig.get_paths()["platlib"]
assert torchmoe.__file__.startswith(site + "/"), f"not imported from the install in {site}: {torchmoe.__file__}"
assert torchmoe.library_path().startswith(site + "/"), torchmoe.library_path()
weights, experts = torchmoe.topk_gating(torch.tensor([[0.5, 2.0, -1.0, 1.0]]), 2)
assert experts.tolist() == [[1, 3]], experts
print(f"torchmoe {torchmoe.__version__} from {torchmoe.__file__}, torch {torch.__version__}: topk_gating ok")
PYEOF
)

echo "== sdist check: pytest from the unpacked sdist against the install ($TORCH_SPEC)"
tar xzf "$sdist" -C "$WORK"
src="$(ls -d "$WORK"/torchmoe-*/)"
# The unpacked tree has no torchmoe/ on the import path (the package sits under python/): tests import the install.
(cd "$src" && TORCHMOE_TEST_WHEEL="$wheel" "$PY" -m pytest -q -ra -p no:cacheprovider tests/python "$@")
