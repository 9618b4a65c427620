"""Mixture-of-Experts modules built on torchmoe's fused ops.

All modules take inputs ``[..., d_model]``, are scriptable with ``torch.jit.script`` and compile with
``torch.compile(fullgraph=True)``.

- :class:`TopkRouter`, :class:`NoisyTopkRouter` — routers (linear scoring + top-k gating).
- :class:`MoE` — sparse MoE layer (capacity or dropless), :class:`SwitchMoE` — top-1 Switch layer.
- :class:`LSTMGatedMoE` — dense mixture of expert MLPs gated by an LSTM over the sequence.
- :class:`MoLE` — Mixture of Latent Experts (shared per-group bases); ``MoLE.from_moe`` converts a MoE.
- :class:`MoLoRA`, :func:`inject_molora` — mixture of LoRA experts around frozen ``nn.Linear`` layers;
  :func:`save_molora` / :func:`load_molora` / :func:`molora_state_dict` / :func:`unload_molora` for the adapters.
- :func:`quantize_experts` — int8/int4 weight-only experts for serving (:class:`QuantizedMoE`).
"""
from .lstm_moe import LSTMGatedMoE
from .moe import MoE, SwitchMoE
from .mole import MoLE
from .molora import MoLoRA, inject_molora, load_molora, molora_state_dict, save_molora, unload_molora
from .quantized import QuantizedMoE, QuantizedSwitchMoE, quantize_experts
from .router import NoisyTopkRouter, TopkRouter

__all__ = [
    "TopkRouter",
    "NoisyTopkRouter",
    "MoE",
    "SwitchMoE",
    "LSTMGatedMoE",
    "MoLE",
    "MoLoRA",
    "inject_molora",
    "molora_state_dict",
    "save_molora",
    "load_molora",
    "unload_molora",
    "quantize_experts",
    "QuantizedMoE",
    "QuantizedSwitchMoE",
]
