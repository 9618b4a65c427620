"""Loads the compiled operator library so that torch.ops.torchmoe.* exist."""
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent


def library_path() -> str:
    """Path of the compiled library (`torchmoe/_C*.so`), for `torch.ops.load_library` or a C++ link."""
    candidates = sorted(_HERE.glob("_C*.so")) + sorted(_HERE.glob("_C*.pyd"))
    if not candidates:
        raise ImportError(
            "torchmoe's compiled library (_C*.so) was not found next to the package. Build it with "
            "`pip install --no-build-isolation .` (or `python setup.py build_ext --inplace`)."
        )
    return str(candidates[0])


def load() -> None:
    if not hasattr(torch.ops.torchmoe, "topk_gating"):
        torch.ops.load_library(library_path())


def built_with_cuda() -> bool:
    """True when the library holds CUDA kernels (the op has a CUDA kernel registered)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("torchmoe::topk_gating", "CUDA")
