"""Plain-PyTorch versions of every torchmoe op.

Written after the seed notebooks' steps (top-k, -inf scatter, softmax; one-hot queue, cumsum, capacity
mask) and used by the tests as the definition of the ops and by the benchmarks as the composite to beat.
They are differentiable through ordinary autograd. Semantics: DESIGN.md.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stable_topk(values: Tensor, k: int) -> Tensor:
    # torch.topk does not promise an order among ties; a stable descending sort puts the lower index first.
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def router_logits(x: Tensor, weight: Tensor) -> Tensor:
    """Reference for :func:`torchmoe.router_logits`."""
    acc = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    return F.linear(x.to(acc), weight.to(acc))


def topk_gating(
    logits: Tensor,
    k: int,
    score_func: str = "softmax",
    renormalize: bool = True,
    expert_bias: Optional[Tensor] = None,
    num_expert_groups: int = 1,
    topk_expert_groups: int = 1,
    scale: float = 1.0,
) -> Tuple[Tensor, Tensor]:
    """Reference for :func:`torchmoe.topk_gating`.

    Selection compares the logits themselves when there is neither an expert bias nor group limiting
    (softmax and sigmoid are increasing, so this is the selection on the scores, without the ties that
    float rounding of the scores would create); otherwise it compares ``score + expert_bias``.
    """
    num_experts = logits.shape[-1]
    acc = logits.to(_acc_dtype(logits.dtype))
    if score_func == "softmax":
        scores = torch.softmax(acc, dim=-1)
    elif score_func == "sigmoid":
        scores = torch.sigmoid(acc)
    else:
        raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")

    if expert_bias is None and num_expert_groups == 1:
        selection = acc
    else:
        selection = scores
        if expert_bias is not None:
            selection = scores + expert_bias.to(acc.dtype)
    selection = selection.detach()

    if num_expert_groups > 1:
        group_size = num_experts // num_expert_groups
        grouped = selection.unflatten(-1, (num_expert_groups, group_size))
        group_score = grouped.topk(min(2, group_size), dim=-1).values.sum(-1)
        best_groups = _stable_topk(group_score, topk_expert_groups)
        eligible = torch.zeros_like(group_score, dtype=torch.bool).scatter(-1, best_groups, True)
        eligible = eligible.repeat_interleave(group_size, dim=-1)
        selection = selection.masked_fill(~eligible, float("-inf"))

    indices = _stable_topk(selection, k)

    if score_func == "softmax" and renormalize:
        # The seed's scatter-softmax: -inf everywhere but the chosen logits, then softmax.
        masked = torch.full_like(acc, float("-inf")).scatter(-1, indices, acc.gather(-1, indices))
        weights = torch.softmax(masked, dim=-1).gather(-1, indices)
    else:
        weights = scores.gather(-1, indices)
        if renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
    weights = weights * scale
    return weights.to(logits.dtype), indices


def route_plan(
    indices: Tensor, num_experts: int, capacity: int = -1, priority: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Reference for :func:`torchmoe.route_plan`: the seed's one-hot queue and cumsum."""
    ungrouped = indices.dim() == 2
    idx = indices.long().unsqueeze(0) if ungrouped else indices.long()
    G, T, k = idx.shape
    device = idx.device

    # Queue order within each choice rank: descending priority, ties by token index.
    if priority is not None:
        p = priority.unsqueeze(0) if ungrouped else priority
        if p.dim() == 2:
            p = p.unsqueeze(-1)
        p = p.expand(G, T, k)
        order = torch.sort(p, dim=1, descending=True, stable=True).indices
    else:
        order = torch.arange(T, device=device).view(1, T, 1).expand(G, T, k)
    queued = idx.gather(1, order)  # [G, T, k]: queued[g, r, j] = expert of the r-th token in rank j's queue

    # One-hot, rank-major queue ("priority-wise top-k": all first choices before second choices).
    one_hot = F.one_hot(queued, num_experts).permute(0, 2, 1, 3).reshape(G, k * T, num_experts)
    position = ((torch.cumsum(one_hot, dim=1) - 1) * one_hot).sum(-1)  # [G, k*T]
    counts = one_hot.sum(1)  # [G, E]

    position = position.view(G, k, T).permute(0, 2, 1)  # [G, r, j]
    position = torch.empty_like(position).scatter(1, order, position)  # back to token order

    if capacity >= 0:
        group = torch.arange(G, device=device).view(G, 1, 1)
        dest = torch.where(position < capacity, (idx * G + group) * capacity + position, -1)
    else:
        per_expert = counts.sum(0)
        expert_start = torch.cumsum(per_expert, 0) - per_expert
        group_start = torch.cumsum(counts, 0) - counts
        row_offset = expert_start.unsqueeze(0) + group_start  # [G, E]
        dest = row_offset.gather(1, idx.reshape(G, T * k)).view(G, T, k) + position

    if ungrouped:
        return dest[0], counts[0]
    return dest, counts


def dispatch(x: Tensor, dest: Tensor, num_rows: int) -> Tensor:
    """Reference for :func:`torchmoe.dispatch`."""
    k = dest.shape[1]
    token = torch.arange(x.shape[0], device=x.device).repeat_interleave(k)
    flat = dest.reshape(-1)
    kept = flat >= 0
    out = x.new_zeros((num_rows, x.shape[1]))
    return out.index_put((flat[kept],), x[token[kept]])


def combine(expert_out: Tensor, dest: Tensor, weights: Tensor) -> Tensor:
    """Reference for :func:`torchmoe.combine`."""
    acc = _acc_dtype(expert_out.dtype)
    N, k = dest.shape
    flat = dest.reshape(-1)
    kept = flat >= 0  # dropped slots read nothing (not even a NaN row times weight 0)
    token = torch.arange(N, device=dest.device).repeat_interleave(k)[kept]
    rows = expert_out.to(acc)[flat[kept]] * weights.to(acc).reshape(-1)[kept].unsqueeze(-1)
    out = torch.zeros((N, expert_out.shape[1]), dtype=acc, device=expert_out.device)
    return out.index_add(0, token, rows).to(expert_out.dtype)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """Reference for :func:`torchmoe.swiglu`."""
    return F.silu(gate) * up


def grouped_mm(x: Tensor, weight: Tensor, counts: Tensor) -> Tensor:
    """Reference for :func:`torchmoe.grouped_mm`: a loop over experts (host-side counts)."""
    pieces = torch.split(x, counts.tolist())
    outs = [piece @ weight[e] for e, piece in enumerate(pieces)]
    if not outs:
        return x.new_zeros((0, weight.shape[-1]))
    return torch.cat(outs, 0)


def grouped_mm_quantized(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], counts: Tensor,
                         bits: int, group_size: int) -> Tensor:
    """Reference for ``torch.ops.torchmoe.grouped_mm_quantized``: dequantize, then :func:`grouped_mm`."""
    from .quantization import dequantize_weight

    return grouped_mm(x, dequantize_weight(qweight, scales, zeros, bits, group_size, x.dtype), counts)
