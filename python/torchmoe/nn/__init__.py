"""Mixture-of-Experts modules built on torchmoe's fused ops.

All modules take inputs ``[..., d_model]``, are scriptable with ``torch.jit.script`` and compile with
``torch.compile(fullgraph=True)``.

- :class:`TopkRouter`, :class:`NoisyTopkRouter` — routers (linear scoring + top-k gating).
- :class:`MoE` — sparse MoE layer (capacity or dropless), :class:`SwitchMoE` — top-1 Switch layer.
"""
from .moe import MoE, SwitchMoE
from .router import NoisyTopkRouter, TopkRouter

__all__ = [
    "TopkRouter",
    "NoisyTopkRouter",
    "MoE",
    "SwitchMoE",
]
