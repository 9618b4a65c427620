"""Builds torchmoe's operator library (torchmoe/_C.so) against the installed torch.

CUDA sources are compiled when the installed torch is a CUDA build and nvcc is found, or when
FORCE_CUDA=1; TORCHMOE_CPU_ONLY=1 forces a CPU-only build. Build with
`pip install --no-build-isolation .` (or `pip install --no-build-isolation torchmoe-<version>.tar.gz`) so the
extension links the torch you run with.

Object files go to build/<variant> next to this file and survive between builds: ninja then recompiles only
the sources (and headers) that changed, for editable, in-place and wheel builds alike.
"""
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent

# torch finds nvcc through CUDA_HOME or PATH; prefer the toolkit's own folder where it exists.
if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
# Ampere and Hopper by default; override with TORCH_CUDA_ARCH_LIST.
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

# Commands that compile the extension; the others (sdist, egg_info, dist_info) need no torch.
_BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "bdist", "install", "develop", "editable_wheel"}

try:
    import torch
except ImportError:
    if _BUILD_COMMANDS.intersection(sys.argv[1:]):
        raise SystemExit(
            "torchmoe compiles against the torch you will run it with, and torch is not installed in this "
            "environment. Install torch (>=2.13) first, then build without build isolation: "
            "`pip install --no-build-isolation torchmoe` (or `... .` from a checkout)."
        )
    torch = None


def read_sources():
    lines = (ROOT / "csrc" / "SOURCES").read_text().splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def want_cuda():
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("TORCHMOE_CPU_ONLY", "0") == "1":
        return False, "TORCHMOE_CPU_ONLY=1"
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True, "FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None or not Path(CUDA_HOME, "bin", "nvcc").exists():
        return False, "nvcc was not found (set CUDA_HOME)"
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}, nvcc in {CUDA_HOME}"


def make_extension(with_cuda):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = read_sources()
    cxx = ["-O3", "-fopenmp"]
    common = dict(
        name="torchmoe._C",
        include_dirs=[str(ROOT / "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return CUDAExtension(
            sources=sources,
            define_macros=[("TORCHMOE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            **common,
        )
    return CppExtension(
        sources=[s for s in sources if not s.endswith(".cu")],
        extra_compile_args={"cxx": cxx},
        **common,
    )


def make_build_ext(variant):
    from torch.utils.cpp_extension import BuildExtension

    class TorchmoeBuildExt(BuildExtension):
        """torch's ninja build with a persistent object folder per variant (cpu / cuda) and Python version."""

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("use_ninja", True)
            super().__init__(*args, **kwargs)

        def finalize_options(self):
            super().finalize_options()
            # setuptools puts editable builds' objects in a temporary folder (a full rebuild every time) and
            # skips an extension whose sources are older than the library even when a header changed: keep
            # the objects, and let ninja, which tracks every header, decide what to recompile.
            self.build_temp = str(ROOT / "build" / f"{variant}-py{sys.version_info[0]}{sys.version_info[1]}")
            self.force = True

    return TorchmoeBuildExt


build_options = {}
if torch is not None:
    with_cuda, why = want_cuda()
    variant = "cuda" if with_cuda else "cpu"
    print(f"torchmoe: {'CUDA' if with_cuda else 'CPU-only'} build ({why})")
    build_options = dict(ext_modules=[make_extension(with_cuda)], cmdclass={"build_ext": make_build_ext(variant)})

setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    **build_options,
)
