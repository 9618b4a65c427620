"""Builds torchmoe's operator library (torchmoe/_C.so) against the installed torch.

CUDA sources are compiled when the installed torch is a CUDA build and nvcc is found, or when
FORCE_CUDA=1; TORCHMOE_CPU_ONLY=1 forces a CPU-only build. Build with
`pip install --no-build-isolation .` so the extension links the torch you run with.
"""
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent

# torch finds nvcc through CUDA_HOME or PATH; prefer the toolkit's own folder where it exists.
if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
# Ampere and Hopper by default; override with TORCH_CUDA_ARCH_LIST.
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def read_sources():
    lines = (ROOT / "csrc" / "SOURCES").read_text().splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def want_cuda():
    if os.environ.get("TORCHMOE_CPU_ONLY", "0") == "1":
        return False, "TORCHMOE_CPU_ONLY=1"
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True, "FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None or not Path(CUDA_HOME, "bin", "nvcc").exists():
        return False, "nvcc was not found (set CUDA_HOME)"
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}, nvcc in {CUDA_HOME}"


def make_extension():
    sources = read_sources()
    with_cuda, why = want_cuda()
    print(f"torchmoe: {'CUDA' if with_cuda else 'CPU-only'} build ({why})")
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


setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
