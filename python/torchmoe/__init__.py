"""torchmoe: fused Mixture-of-Experts routing and dispatch ops for PyTorch.

`import torchmoe` registers the ops under `torch.ops.torchmoe` (usable from Python, TorchScript,
torch.compile and C++) and exposes typed functional wrappers:

- :func:`router_logits` — the router's float32 logits, each operand read in its own dtype
- :func:`topk_gating`  — top-k expert selection and gate weights
- :func:`route_plan`   — slot of each (token, choice) in its expert's buffer (capacity or dropless)
- :func:`dispatch` / :func:`combine` — move token rows into expert buffers and back
- :func:`grouped_mm`   — one matmul per expert over rows grouped by expert
- :func:`swiglu`       — ``silu(gate) * up``, the SwiGLU activation
- :func:`quantize_weight` / :func:`grouped_mm_quantized` — int8/int4 weight-only quantized experts
- :func:`capacity`     — the expert capacity for a capacity factor
- :func:`cpu_cache_bytes` / :func:`empty_cpu_cache` — the CPU kernels' cache of large freed outputs
- :func:`info` — versions, kernels, CPU paths and environment knobs for a bug report
  (also ``python -m torchmoe info``)

`torchmoe.reference` holds plain-PyTorch versions of every op, `torchmoe.losses` the auxiliary
losses and `torchmoe.nn` the modules.
"""
from . import _library

_library.load()

from .ops import (  # noqa: E402
    capacity, combine, cpu_cache_bytes, dispatch, empty_cpu_cache, grouped_mm, route_plan, router_logits, swiglu,
    topk_gating,
)
from .quantization import QuantizedWeight, dequantize_weight, grouped_mm_quantized, quantize_weight  # noqa: E402
from . import reference  # noqa: E402
from ._info import info  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "router_logits",
    "topk_gating",
    "route_plan",
    "dispatch",
    "combine",
    "grouped_mm",
    "swiglu",
    "grouped_mm_quantized",
    "quantize_weight",
    "dequantize_weight",
    "QuantizedWeight",
    "capacity",
    "cpu_cache_bytes",
    "empty_cpu_cache",
    "reference",
    "library_path",
    "built_with_cuda",
    "info",
]

library_path = _library.library_path
built_with_cuda = _library.built_with_cuda


def __getattr__(name):
    # Submodules that import torch.nn machinery load on first use.
    if name in ("nn", "losses", "distributed"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'torchmoe' has no attribute {name!r}")
