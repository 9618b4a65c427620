"""MoE layers with weight-only quantized experts (int8 / int4) for serving: :func:`quantize_experts`.

``quantize_experts(model, bits)`` converts every :class:`~torchmoe.nn.MoE` / :class:`~torchmoe.nn.SwitchMoE` inside
``model`` in place: the router stays as it is (float, trainable), each expert weight ``W`` (``gate_proj``,
``up_proj``, ``down_proj``) is replaced by the packed tensors of :func:`torchmoe.quantize_weight` as buffers
(``<name>_qweight``, ``<name>_scales`` and, asymmetric int4 only, ``<name>_zeros``), and the experts run on
``torch.ops.torchmoe.grouped_mm_quantized``. The layer then computes what the float layer computes with each ``W``
replaced by its dequantized value, up to float32 rounding, in dropless and capacity mode, eagerly, scripted,
compiled and exported. The quantized experts are frozen; gradients still reach the input and the router.
"""
from typing import Optional

import torch
from torch import Tensor, nn

from ..quantization import QuantizedWeight, dequantize_weight, quantize_weight
from .moe import MoE, SwitchMoE, _computes_experts_with, _registered

__all__ = ["quantize_experts", "QuantizedMoE", "QuantizedSwitchMoE"]

_EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


class _QuantizedExperts:
    """The expert computations of a quantized MoE layer (mixed into the MoE classes below)."""

    bits: int
    gate_proj_group_size: int
    up_proj_group_size: int
    down_proj_group_size: int
    gate_proj_qweight: Optional[Tensor]
    gate_proj_scales: Optional[Tensor]
    gate_proj_zeros: Optional[Tensor]
    up_proj_qweight: Tensor
    up_proj_scales: Tensor
    up_proj_zeros: Optional[Tensor]
    down_proj_qweight: Tensor
    down_proj_scales: Tensor
    down_proj_zeros: Optional[Tensor]

    def _experts_grouped(self, rows: Tensor, counts: Tensor) -> Tensor:
        return self._quantized_mlp(rows, counts, self.gate_proj_qweight, self.gate_proj_scales, self.gate_proj_zeros,
                                   self.up_proj_qweight, self.up_proj_scales, self.up_proj_zeros,
                                   self.down_proj_qweight, self.down_proj_scales, self.down_proj_zeros)

    def _quantized_mlp(self, rows: Tensor, counts: Tensor, gate_qweight: Optional[Tensor],
                       gate_scales: Optional[Tensor], gate_zeros: Optional[Tensor], up_qweight: Tensor,
                       up_scales: Tensor, up_zeros: Optional[Tensor], down_qweight: Tensor, down_scales: Tensor,
                       down_zeros: Optional[Tensor]) -> Tensor:
        # rows [R, d_model] grouped by expert (counts [E]) -> [R, d_model], on the packed tensors given.
        mm = torch.ops.torchmoe.grouped_mm_quantized
        up = mm(rows, up_qweight, up_scales, up_zeros, counts, self.bits, self.up_proj_group_size)
        if gate_qweight is not None and gate_scales is not None:
            gate = mm(rows, gate_qweight, gate_scales, gate_zeros, counts, self.bits, self.gate_proj_group_size)
            h = torch.ops.torchmoe.swiglu(gate, up)
        else:
            h = self._act(up)
        return mm(h, down_qweight, down_scales, down_zeros, counts, self.bits, self.down_proj_group_size)

    @torch.jit.unused
    def _fused_experts(self):
        if not _computes_experts_with(self, _QuantizedExperts):
            return None
        qweights, scales, zeros = ([_registered(self, name + part) for name in _EXPERT_WEIGHTS]
                                   for part in ("_qweight", "_scales", "_zeros"))
        return (*qweights, self.bits, scales, zeros,
                [self.gate_proj_group_size, self.up_proj_group_size, self.down_proj_group_size])

    def _experts_batched(self, buf: Tensor) -> Tensor:
        # [E, capacity, d_model]: every expert has `capacity` rows.
        cap = buf.shape[1]
        counts = torch.ones(buf.shape[0], dtype=torch.long, device=buf.device) * cap
        out = self._experts_grouped(self._capacity_layout(buf, cap, split=False), counts)
        return self._capacity_layout(out, cap, split=True)

    def reset_parameters(self) -> None:
        # The quantized experts are frozen data; the router and a shared expert stay float.
        self.router.reset_parameters()
        if self.shared_expert is not None:
            self.shared_expert.reset_parameters()

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() / .bfloat16() cast floating buffers, but the scales are part of the packed format
        # (float32): they follow the device moves only.
        order = list(self._buffers)
        scales = {n: t for n, t in self._buffers.items() if n.endswith("_scales") and t is not None}
        for name in scales:
            del self._buffers[name]
        try:
            super()._apply(fn, recurse)
        finally:
            device = self.up_proj_qweight.device
            for name, t in scales.items():
                self._buffers[name] = t.to(device)
            for name in order:  # state_dict keeps its order
                self._buffers[name] = self._buffers.pop(name)
        return self

    @torch.jit.unused
    def quantized_weight(self, name: str) -> QuantizedWeight:
        """The :class:`~torchmoe.QuantizedWeight` of expert weight ``name`` (``"up_proj"``, ...)."""
        qweight = getattr(self, f"{name}_qweight")
        if qweight is None:
            raise ValueError(f"{type(self).__name__}: no expert weight {name!r}")
        return QuantizedWeight(qweight, getattr(self, f"{name}_scales"), getattr(self, f"{name}_zeros"), self.bits,
                               getattr(self, f"{name}_group_size"), self.expert_dtype)

    @torch.jit.unused
    def _forward_reference(self, x: Tensor) -> Tensor:
        # The float layer's reference path on the dequantized weights.
        saved = {}
        for name in _EXPERT_WEIGHTS:
            saved[name] = self._parameters[name]
            if getattr(self, f"{name}_qweight") is not None:
                self._parameters[name] = nn.Parameter(self.quantized_weight(name).dequantize(x.dtype),
                                                      requires_grad=False)
        try:
            return MoE._forward_reference(self, x)
        finally:
            self._parameters.update(saved)

    def extra_repr(self) -> str:
        form = "symmetric" if self.down_proj_zeros is None else "asymmetric"
        group = f", group_size={self.up_proj_group_size}" if self.bits == 4 else ""
        return MoE.extra_repr(self) + f", bits={self.bits}{group}, {form}"


class QuantizedMoE(_QuantizedExperts, MoE):
    """A :class:`~torchmoe.nn.MoE` whose experts were quantized by :func:`quantize_experts`."""


class QuantizedSwitchMoE(_QuantizedExperts, SwitchMoE):
    """A :class:`~torchmoe.nn.SwitchMoE` whose experts were quantized by :func:`quantize_experts`."""


# Float layer class -> its quantized class; torchmoe.distributed adds ExpertParallelMoE.
_QUANTIZED_CLASS = {MoE: QuantizedMoE, SwitchMoE: QuantizedSwitchMoE}


def _quantize_layer(layer: MoE, bits: int, group_size: int, symmetric: bool) -> None:
    if bits == 4:
        for name, d_in in (("up_proj", layer.d_model), ("down_proj", layer.d_ff)):
            if group_size <= 0 or group_size % 2 or d_in % group_size:
                raise ValueError(f"quantize_experts: group_size must be an even divisor of {name}'s d_in = {d_in}, "
                                 f"got {group_size}")
    dtype = layer.up_proj.dtype
    # An expert-parallel layer quantizes its own experts (the formats are per expert, so the shards are the slices
    # of the whole layer's packed tensors) and keeps them as DTensors of the global shape when its weights are.
    as_global = getattr(layer, "_as_global_expert_tensor", None)
    quantized = {}
    for name in _EXPERT_WEIGHTS:
        weight = getattr(layer, name)
        if weight is not None and hasattr(weight, "to_local"):
            weight = weight.to_local()
        quantized[name] = None if weight is None else quantize_weight(weight.detach(), bits, group_size, symmetric)
    for name, qw in quantized.items():
        del layer._parameters[name]
        layer.register_parameter(name, None)
        # Absent tensors are plain None attributes, not None buffers (torch.export mis-indexes those).
        for suffix, tensor in (("qweight", None if qw is None else qw.qweight),
                               ("scales", None if qw is None else qw.scales),
                               ("zeros", None if qw is None else qw.zeros)):
            if tensor is None:
                setattr(layer, f"{name}_{suffix}", None)
            else:
                layer.register_buffer(f"{name}_{suffix}", tensor if as_global is None else as_global(tensor))
    layer.bits = bits
    for name, qw in quantized.items():
        setattr(layer, f"{name}_group_size", 0 if qw is None else qw.group_size)
    layer.expert_dtype = dtype
    layer.__class__ = _QUANTIZED_CLASS[type(layer)]


def quantize_experts(module: nn.Module, bits: int = 8, group_size: int = 128, symmetric: bool = True) -> nn.Module:
    """Quantize the experts of every MoE layer in ``module``, in place, for serving.

    Every :class:`~torchmoe.nn.MoE`, :class:`~torchmoe.nn.SwitchMoE` (dropless or capacity mode) and
    :class:`~torchmoe.distributed.ExpertParallelMoE` (each rank quantizes its own experts; with a mesh the packed
    tensors are DTensors of the whole layer's shape, so checkpoints reshard) inside ``module`` (``module`` itself
    included) keeps its router and has each expert weight ``W`` replaced by
    :func:`torchmoe.quantize_weight(W, bits, group_size, symmetric) <torchmoe.quantize_weight>`, stored as buffers
    (``state_dict`` holds ``<name>_qweight``, ``<name>_scales`` and for asymmetric int4 ``<name>_zeros``; load such
    a state dict into a layer quantized the same way). Deterministic: the layer computes what the float layer
    computes with ``W`` replaced by its ``.dequantize()``, up to float32 rounding. Inputs may be float32, bfloat16
    or float16 (the output has the input's dtype). ``MoLE`` and ``MoLoRA`` stay float.

    Args:
        module: a model, or a single MoE layer.
        bits: 8 (int8, one scale per expert and output column; ``group_size`` is not used) or 4 (int4).
        group_size: int4 reduction rows per scale; must be an even divisor of ``d_model`` and ``d_ff``.
        symmetric: int4 only; ``False`` adds a zero point per group (the AWQ/GPTQ form).

    Returns:
        ``module`` (converted in place).

    Raises:
        ValueError: ``bits`` not 4 or 8, ``group_size`` not dividing the expert widths, ``symmetric=False`` with 8
        bits, or nothing to quantize.
    """
    if bits not in (4, 8):
        raise ValueError(f"quantize_experts: bits must be 4 or 8, got {bits!r}")
    if bits == 8 and not symmetric:
        raise ValueError("quantize_experts: symmetric must be True for bits=8 (int8 has no zero points)")
    layers = [m for m in module.modules() if type(m) in _QUANTIZED_CLASS]
    if not layers and not any(isinstance(m, _QuantizedExperts) for m in module.modules()):
        raise ValueError(f"quantize_experts: {type(module).__name__} holds no MoE or SwitchMoE layer to quantize")
    for layer in layers:
        _quantize_layer(layer, bits, group_size, symmetric)
    return module
