"""Auxiliary losses for Mixture-of-Experts routers.

All functions are TorchScript-compatible, work under ``torch.compile(fullgraph=True)`` (no value-dependent
shapes, no host syncs), accept any leading dimensions (``[..., E]`` is flattened to ``[T, E]``), compute in
float32 (float64 for float64 inputs) and return a 0-d tensor. None of them applies a loss weight: the
caller (e.g. :class:`torchmoe.nn.MoE`) multiplies by its own coefficient.

- :func:`switch_load_balancing_loss` — Switch Transformer (Fedus et al. 2021), eq. 4 without ``alpha``.
- :func:`router_z_loss` — ST-MoE (Zoph et al. 2022), eq. 5.
- :func:`cv_squared`, :func:`importance_loss`, :func:`load_loss` — Shazeer et al. 2017, appendix A.
"""
import math

import torch
from torch import Tensor

__all__ = [
    "switch_load_balancing_loss",
    "router_z_loss",
    "cv_squared",
    "importance_loss",
    "load_loss",
]


def _acc(t: Tensor) -> Tensor:
    if t.dtype == torch.float64:
        return t
    return t.float()


def switch_load_balancing_loss(probs: Tensor, indices: Tensor) -> Tensor:
    """Switch Transformer load-balancing loss ``E * sum_i f_i * P_i``.

    Args:
        probs: router probabilities ``[..., E]`` (e.g. the softmax of the router logits over all experts).
        indices: experts chosen for each token ``[..., k]`` (int64), with the same leading dims as ``probs``.

    ``f_i`` is the fraction of the ``T * k`` (token, choice) assignments that went to expert ``i`` and ``P_i``
    the mean router probability of expert ``i`` over the ``T`` tokens. The loss is 1.0 under perfectly
    uniform routing and probabilities, and ``E`` when everything goes to one expert with probability 1.
    Gradients flow through ``P`` only (``f`` is a count). An empty batch gives 0.
    """
    num_experts = probs.shape[-1]
    p = _acc(probs).reshape(-1, num_experts)
    idx = indices.reshape(-1)
    num_tokens = p.shape[0]
    num_assignments = idx.shape[0]
    counts = torch.zeros(num_experts, dtype=p.dtype, device=p.device)
    counts = counts.scatter_add(0, idx, torch.ones_like(idx, dtype=p.dtype))
    f = counts / max(num_assignments, 1)
    mean_prob = p.sum(0) / max(num_tokens, 1)
    return num_experts * (f * mean_prob).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """Router z-loss ``mean_t (logsumexp_i logits[t, i])^2`` (ST-MoE): keeps router logits small.

    Args:
        logits: router logits ``[..., E]``. An empty batch gives 0.
    """
    num_experts = logits.shape[-1]
    z = torch.logsumexp(_acc(logits).reshape(-1, num_experts), dim=-1)
    return (z * z).sum() / max(z.shape[0], 1)


def cv_squared(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation ``var(x) / (mean(x)^2 + eps)`` over all elements of ``x``.

    The variance is the population variance (divide by n), as in Shazeer et al.'s implementation. Zero
    for fewer than two elements or for equal elements.
    """
    v = _acc(x).reshape(-1)
    n = v.shape[0]
    if n < 2:
        return v.sum() * 0.0
    mean = v.mean()
    var = ((v - mean) ** 2).mean()
    return var / (mean * mean + eps)


def importance_loss(gates: Tensor) -> Tensor:
    """Shazeer's importance loss ``cv_squared(sum_t gates[t, :])``.

    Args:
        gates: the (sparse) gate values of every token over all experts ``[..., E]``: zero for experts a token
            was not routed to. Multiply by ``w_importance`` yourself.
    """
    num_experts = gates.shape[-1]
    return cv_squared(_acc(gates).reshape(-1, num_experts).sum(0))


def load_loss(clean_logits: Tensor, noisy_logits: Tensor, noise_std: Tensor, k: int) -> Tensor:
    """Shazeer's load loss: ``cv_squared`` of the smooth load estimator.

    ``load_i = sum_t P(t, i)``, where ``P(t, i) = Phi((clean[t, i] - kth_excluding(noisy[t], k, i)) /
    noise_std[t, i])`` is the probability that expert ``i`` stays in token ``t``'s top k when only its own
    noise is re-drawn, ``kth_excluding`` the k-th largest noisy logit among the other experts and ``Phi`` the
    standard normal CDF. That threshold is the (k+1)-th largest noisy logit when ``i`` is currently in the
    top k, and the k-th largest otherwise.

    Args:
        clean_logits: ``x @ W_g`` ``[..., E]``.
        noisy_logits: ``H = clean + N(0, 1) * noise_std`` ``[..., E]`` (what the router selected on).
        noise_std: the noise's standard deviation ``softplus(x @ W_noise)`` (plus any epsilon), broadcastable
            to ``[..., E]``; must be positive.
        k: experts per token. With ``k >= E`` every expert is always chosen and the loss is 0.
    """
    num_experts = clean_logits.shape[-1]
    clean = _acc(clean_logits).reshape(-1, num_experts)
    if k >= num_experts:
        return clean.sum() * 0.0
    noisy = _acc(noisy_logits).reshape(-1, num_experts)
    std = torch.broadcast_to(_acc(noise_std), noisy_logits.shape).reshape(-1, num_experts)
    top = torch.topk(noisy, k + 1, dim=-1).values
    threshold_if_in = top[:, k : k + 1]
    threshold_if_out = top[:, k - 1 : k]
    is_in = noisy > threshold_if_in
    inv_sqrt2 = 1.0 / math.sqrt(2.0)
    prob_if_in = 0.5 * torch.erfc((threshold_if_in - clean) / std * inv_sqrt2)
    prob_if_out = 0.5 * torch.erfc((threshold_if_out - clean) / std * inv_sqrt2)
    prob = torch.where(is_in, prob_if_in, prob_if_out)
    return cv_squared(prob.sum(0))
