"""What torchmoe's compiled library in this checkout is built from, for scripts/setup_env.sh.

Prints shell assignments: ``fingerprint=`` a sha256 over every file under csrc/, setup.py and
pyproject.toml (names and contents), the installed torch version, the Python version and
TORCH_CUDA_ARCH_LIST; ``torch_version=``; ``torch_cuda=`` torch's CUDA version (empty for a CPU build of
torch); ``installed=1`` when torchmoe is installed into this Python and its library exists. It never imports
torch (it reads its installed metadata), so a check that finds nothing changed costs a fraction of a second.
The package's Python files are not part of the fingerprint: the editable install runs them from the tree.
"""
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_inputs():
    files = sorted(p for p in (ROOT / "csrc").rglob("*") if p.is_file())
    return files + [ROOT / "setup.py", ROOT / "pyproject.toml"]


def torch_info():
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "", ""
    spec = importlib.util.find_spec("torch")  # locates the package without running it
    version_py = Path(spec.origin).parent / "version.py"
    match = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", version_py.read_text(), re.M)
    return version, match.group(1) if match else ""


def fingerprint(torch_version: str) -> str:
    digest = hashlib.sha256()
    for path in build_inputs():
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    digest.update(f"torch {torch_version}\0python {sys.version}\0arch {arch}\0".encode())
    return digest.hexdigest()


def installed() -> bool:
    try:
        importlib.metadata.distribution("torchmoe")
    except importlib.metadata.PackageNotFoundError:
        return False
    return any((ROOT / "python" / "torchmoe").glob("_C*.so"))


if __name__ == "__main__":
    torch_version, torch_cuda = torch_info()
    print(f"fingerprint={fingerprint(torch_version)}")
    print(f"torch_version={torch_version}")
    print(f"torch_cuda={torch_cuda}")
    print(f"installed={int(installed())}")
