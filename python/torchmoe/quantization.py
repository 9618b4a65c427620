"""Weight-only quantized experts: :func:`quantize_weight`, :class:`QuantizedWeight` and :func:`dequantize_weight`.

Formats (activations stay float32/bfloat16/float16, products accumulate in float32):

- int8: symmetric, one scale per expert and output column: ``w = scale[e, 0, j] * q`` with ``q`` in -127..127.
- int4: one scale per group of ``group_size`` reduction rows and output column, two codes per byte. Symmetric:
  ``w = scale * (q - 8)``, ``q - 8`` in -8..7; asymmetric (the AWQ/GPTQ form): ``w = scale * (q - zero)`` with an
  unsigned zero point per group and column, ``q`` and ``zero`` in 0..15.

Packed layout (what the kernels read; csrc/ops/common/grouped_mm_quantized_checks.h), for ``w [E, d_in, d_out]``:

- ``qweight``: int8 ``[E, d_in, d_out]`` (8 bits), or uint8 ``[E, d_in / 2, d_out]`` (4 bits) whose byte
  ``(e, i, j)`` holds row ``2i`` in its low nibble and row ``2i + 1`` in its high nibble.
- ``scales``: float32 ``[E, d_in / group_size, d_out]`` (8 bits: ``group_size = d_in``, one group).
- ``zeros``: uint8 of the shape of ``scales`` (asymmetric 4 bits), else ``None``.

Dequantized values are ``scale * (q - zero)`` computed in float32, then cast to the target dtype, by the kernels
and by :meth:`QuantizedWeight.dequantize` alike.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["QuantizedWeight", "quantize_weight", "dequantize_weight", "grouped_mm_quantized"]


def dequantize_weight(qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int, group_size: int,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """The float weight ``[E, d_in, d_out]`` of packed tensors (plain PyTorch; the reference of the kernels)."""
    if bits not in (4, 8):
        raise ValueError(f"dequantize_weight: bits must be 4 or 8, got {bits}")
    E, rows, d_out = qweight.shape
    if bits == 8:
        codes = qweight.to(torch.float32)
        d_in = rows
    else:
        d_in = 2 * rows
        codes = torch.stack((qweight & 15, qweight >> 4), dim=2).reshape(E, d_in, d_out).to(torch.float32)
    grouped = codes.view(E, d_in // group_size, group_size, d_out)
    if bits == 4:
        grouped = grouped - (zeros.to(torch.float32).unsqueeze(2) if zeros is not None else 8.0)
    return (grouped * scales.unsqueeze(2)).reshape(E, d_in, d_out).to(dtype)


class QuantizedWeight:
    """A quantized expert weight ``[E, d_in, d_out]`` as packed tensors (see the module docstring for the layout).

    Attributes:
        qweight, scales, zeros: the packed tensors (``zeros`` is ``None`` unless asymmetric 4 bits).
        bits: 4 or 8. group_size: reduction rows per scale (``d_in`` for 8 bits).
        shape: ``(E, d_in, d_out)`` of the float weight. dtype: the float weight's dtype (what
        :meth:`dequantize` returns by default). symmetric: whether there are no zero points.
    """

    def __init__(self, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int, group_size: int,
                 dtype: torch.dtype = torch.float32) -> None:
        self.qweight = qweight
        self.scales = scales
        self.zeros = zeros
        self.bits = int(bits)
        self.group_size = int(group_size)
        self.dtype = dtype
        E, rows, d_out = qweight.shape
        self.shape: Tuple[int, int, int] = (E, rows * 2 if self.bits == 4 else rows, d_out)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def nbytes(self) -> int:
        """Bytes of the packed tensors (what a product reads), scales and zero points included."""
        total = self.qweight.numel() * self.qweight.element_size() + self.scales.numel() * self.scales.element_size()
        if self.zeros is not None:
            total += self.zeros.numel() * self.zeros.element_size()
        return total

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The float weight ``[E, d_in, d_out]`` (in ``dtype``, default the quantized weight's original dtype)."""
        return dequantize_weight(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                 self.dtype if dtype is None else dtype)

    def to(self, device) -> "QuantizedWeight":
        """The same weight on ``device``."""
        zeros = self.zeros.to(device) if self.zeros is not None else None
        return QuantizedWeight(self.qweight.to(device), self.scales.to(device), zeros, self.bits, self.group_size,
                               self.dtype)

    def __repr__(self) -> str:
        form = "symmetric" if self.symmetric else "asymmetric"
        return (f"QuantizedWeight(shape={self.shape}, bits={self.bits}, group_size={self.group_size}, {form}, "
                f"dtype={self.dtype}, device={self.qweight.device})")


def quantize_weight(weight: Tensor, bits: int, group_size: int = 128, symmetric: bool = True) -> QuantizedWeight:
    """Quantize an expert weight ``[E, d_in, d_out]`` (used as ``x @ weight[e]``) for
    :func:`grouped_mm_quantized`.

    Round to nearest, so every dequantized element is within half a step (its group's scale) of the input.
    int8: symmetric, ``scale = max|w| / 127`` per expert and output column (``group_size`` is ignored and reported
    as ``d_in``). int4: per group of ``group_size`` rows along ``d_in`` and output column; symmetric:
    ``scale = max(max(w) / 7, -min(w) / 8)`` (codes -8..7); asymmetric: the range ``[min(w, 0), max(w, 0)]`` in 15
    steps with an integer zero point (zero is exact). All-zero groups get scale 1. Deterministic.

    Args:
        weight: float tensor ``[E, d_in, d_out]`` (float32, bfloat16, float16 or float64; quantized in float32).
        bits: 8 or 4.
        group_size: 32, 64, 128 (default) or any even divisor of ``d_in`` (4 bits only).
        symmetric: ``False`` for int4 with zero points; int8 is symmetric only.

    Raises:
        ValueError: ``bits`` not 4 or 8, ``group_size`` not dividing ``d_in`` (or odd), ``symmetric=False`` with 8
        bits, or ``weight`` not a 3-D floating tensor.
    """
    if bits not in (4, 8):
        raise ValueError(f"quantize_weight: bits must be 4 or 8, got {bits!r}")
    if not isinstance(weight, Tensor) or weight.dim() != 3 or not weight.is_floating_point():
        raise ValueError("quantize_weight: weight must be a floating tensor [E, d_in, d_out], got "
                         f"{getattr(weight, 'shape', type(weight))} {getattr(weight, 'dtype', '')}")
    E, d_in, d_out = weight.shape
    w = weight.detach().to(torch.float32)
    if bits == 8:
        if not symmetric:
            raise ValueError("quantize_weight: symmetric must be True for bits=8 (int8 has no zero points)")
        scales = w.abs().amax(dim=1, keepdim=True) / 127.0
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(w / scales).clamp_(-127, 127).to(torch.int8)
        return QuantizedWeight(q.contiguous(), scales.contiguous(), None, 8, d_in, weight.dtype)
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 2 or d_in % group_size:
        raise ValueError(f"quantize_weight: group_size must be an even divisor of d_in = {d_in} for 4 bits, "
                         f"got {group_size!r}")
    groups = d_in // group_size
    wg = w.view(E, groups, group_size, d_out)
    wmax = wg.amax(dim=2).clamp(min=0)
    wmin = wg.amin(dim=2).clamp(max=0)
    if symmetric:
        scales = torch.maximum(wmax / 7.0, -wmin / 8.0)
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        codes = torch.round(wg / scales.unsqueeze(2)).clamp_(-8, 7) + 8
        zeros = None
    else:
        scales = (wmax - wmin) / 15.0
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        zero_f = torch.round(-wmin / scales).clamp_(0, 15)
        codes = (torch.round(wg / scales.unsqueeze(2)) + zero_f.unsqueeze(2)).clamp_(0, 15)
        zeros = zero_f.to(torch.uint8).contiguous()
    codes = codes.to(torch.uint8).view(E, d_in // 2, 2, d_out)
    packed = (codes[:, :, 0] | (codes[:, :, 1] << 4)).contiguous()
    return QuantizedWeight(packed, scales.contiguous(), zeros, 4, group_size, weight.dtype)


def grouped_mm_quantized(x: Tensor, qweight: QuantizedWeight, counts: Tensor) -> Tensor:
    """:func:`torchmoe.grouped_mm` on a quantized weight: ``out[rows of e] = x[rows of e] @ qweight.dequantize()[e]``.

    ``x [N, d_in]`` float32/bfloat16/float16/float64 with rows grouped by expert, ``counts [E]`` int64 summing to
    N. Returns ``[N, d_out]`` in ``x``'s dtype (float32 accumulation). Differentiable w.r.t. ``x`` only (the
    quantized weight is frozen). Raises ``RuntimeError`` naming the argument on bad shapes, dtypes or counts.
    """
    return torch.ops.torchmoe.grouped_mm_quantized(x, qweight.qweight, qweight.scales, qweight.zeros, counts,
                                                   qweight.bits, qweight.group_size)
