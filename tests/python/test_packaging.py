"""The sdist holds everything a build needs, and the wheel holds the compiled library and the whole package.

Run from a checkout or from an unpacked sdist (CI's lower-bound check runs the suite from one): the source
tree is this file's grandparent either way.
"""
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import torchmoe

ROOT = Path(__file__).resolve().parents[2]
# Build outputs and caches that a source tree may hold and a package must not.
_NOT_SOURCE = re.compile(r"(^|/)(build|dist|\.venv|venv|__pycache__|[^/]*\.egg-info|\.pytest_cache)(/|$)|\.(so|o|pyc)$")


def _source_files(*patterns):
    files = set()
    for pattern in patterns:
        for path in ROOT.glob(pattern):
            rel = path.relative_to(ROOT).as_posix()
            if path.is_file() and not _NOT_SOURCE.search(rel):
                files.add(rel)
    return files


def _variant_env():
    """Build environment for the variant the running library was built as (so ninja reuses its objects)."""
    env = dict(os.environ)
    env.pop("TORCHMOE_CPU_ONLY", None)
    env.pop("FORCE_CUDA", None)
    env["FORCE_CUDA" if torchmoe.built_with_cuda() else "TORCHMOE_CPU_ONLY"] = "1"
    return env


def _run(cmd, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, **kwargs)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    pytest.importorskip("build", reason="the `build` package (in the [test] extra) makes the sdist")
    out = tmp_path_factory.mktemp("sdist")
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(ROOT)])
    (path,) = out.glob("torchmoe-*.tar.gz")
    return path


def test_sdist_holds_every_source_header_test_and_build_file(sdist):
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    expected = _source_files("csrc/**/*", "python/torchmoe/**/*.py", "tests/**/*.py", "tests/cpp/**/*",
                             "scripts/*", "benchmarks/*", "examples/*", "docs/*")
    expected |= {"README.md", "CMakeLists.txt", "setup.py", "pyproject.toml", "MANIFEST.in", "csrc/SOURCES"}
    assert any(n.endswith(".cu") for n in expected) and any(n.endswith(".h") for n in expected)
    missing = sorted(expected - names)
    assert not missing, f"the sdist lacks {missing}"
    assert not [n for n in names if _NOT_SOURCE.search(n) and "egg-info" not in n], "build outputs in the sdist"

    # Every source the build lists, and every header the sources include by a quoted path, is in it.
    listed = [s.strip() for s in (ROOT / "csrc" / "SOURCES").read_text().splitlines()
              if s.strip() and not s.startswith("#")]
    assert listed and set(listed) <= names
    for rel in sorted(n for n in names if n.startswith(("csrc/", "tests/cpp/")) and n.endswith((".h", ".cuh", ".cpp", ".cu"))):
        for header in re.findall(r'^\s*#\s*include\s+"([^"]+)"', (ROOT / rel).read_text(), re.M):
            candidates = {f"csrc/{header}", (Path(rel).parent / header).as_posix()}
            assert candidates & names, f"{rel} includes {header!r}, which is not in the sdist"


def test_wheel_holds_compiled_library_and_package(tmp_path):
    if os.environ.get("TORCHMOE_TEST_WHEEL"):
        # CI's sdist check: the wheel pip built from the sdist, which this environment runs.
        wheel = Path(os.environ["TORCHMOE_TEST_WHEEL"])
    else:
        # pip builds in the source tree, with setup.py's persistent object folder: after the build that produced
        # the running library only the link and the packing are left.
        out = tmp_path / "wheel"
        _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
              "--disable-pip-version-check", "-q", "-w", str(out), str(ROOT)], env=_variant_env())
        (wheel,) = out.glob("torchmoe-*.whl")
    assert re.search(r"-cp3\d+-cp3\d+-linux_x86_64\.whl$", wheel.name), wheel.name  # a platform wheel
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = zf.read(metadata).decode()
        site = tmp_path / "site"
        zf.extractall(site)
    libraries = [n for n in names if re.fullmatch(r"torchmoe/_C\.[^/]*\.so", n)]
    assert len(libraries) == 1, sorted(names)
    package = {p.relative_to(ROOT / "python").as_posix() for p in (ROOT / "python" / "torchmoe").rglob("*.py")}
    assert package <= names, f"the wheel lacks {sorted(package - names)}"
    assert not [n for n in names if n.startswith(("csrc/", "tests/", "build/"))]
    assert "Requires-Dist: torch>=2.13" in meta and "Requires-Python: >=3.10" in meta
    assert re.search(r"^Provides-Extra: test$", meta, re.M)

    # The unpacked wheel alone, imported from elsewhere, loads its library and runs the ops.
    code = (
        "import torch, torchmoe, sys\n"
        f"assert torchmoe.__file__.startswith({str(site)!r}), torchmoe.__file__\n"
        f"assert torchmoe.library_path().startswith({str(site)!r})\n"
        "w, i = torchmoe.topk_gating(torch.tensor([[0.0, 2.0, 1.0]]), 2)\n"
        "assert i.tolist() == [[1, 2]], i\n"
        "print(int(torchmoe.built_with_cuda()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    result = _run([sys.executable, "-c", code], cwd=str(tmp_path), env=env)
    assert result.stdout.strip() == str(int(torchmoe.built_with_cuda()))
