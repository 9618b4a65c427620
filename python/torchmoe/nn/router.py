"""Routers: a linear scoring of every token against every expert, then top-k selection with
:func:`torchmoe.topk_gating`.

Both routers take tokens ``[..., d_model]`` and return ``(weights [..., k], indices [..., k], logits [..., E])``
with float32 ``weights`` and ``logits`` (router math is done in float32 whatever the input dtype, as Switch
Transformer recommends; float64 for a float64 model) and int64 ``indices``.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses, ops
from .. import reference as _reference

__all__ = ["TopkRouter", "NoisyTopkRouter"]


def _switch_init_(weight: Tensor, fan_in: int) -> None:
    # Switch Transformer: truncated normal (at two standard deviations), std = sqrt(0.1 / fan_in).
    std = math.sqrt(0.1 / max(fan_in, 1))
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


class TopkRouter(nn.Module):
    """Linear top-k router: ``logits = x @ weight.T`` by :func:`torchmoe.router_logits` (float32 sums, the weight
    read in its own dtype; float64 for a float64 model), then :func:`torchmoe.topk_gating`.

    Args:
        d_model: token width.
        num_experts: E.
        k: experts per token.
        score_func: ``"softmax"`` or ``"sigmoid"`` (see :func:`torchmoe.topk_gating`).
        renormalize: divide the k selected scores by their sum. With softmax this is the softmax over the k
            selected logits (the makeMoE router); ``False`` keeps the router probability itself (Switch).
        use_expert_bias: add :attr:`expert_bias` to the scores for selection only (DeepSeek-V3's
            auxiliary-loss-free load balancing). Update it with :meth:`update_expert_bias` after each step.
        bias_update_rate: the step ``gamma`` of the bias update.
        num_expert_groups / topk_expert_groups: group-limited routing (only the best ``topk_expert_groups``
            of ``num_expert_groups`` equal expert groups are eligible).
        scale: multiplies the routing weights.

    Attributes:
        weight: ``[num_experts, d_model]``, no bias, initialised with Switch's scaled truncated normal
            (std ``sqrt(0.1 / d_model)``).
        expert_bias: float32 buffer ``[num_experts]`` (zeros), used only when ``use_expert_bias``.

    Shape:
        ``x [..., d_model]`` -> ``(weights [..., k], indices [..., k] int64, logits [..., E])``, weights and
        logits float32 (float64 when ``x`` or the weight is float64).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int,
        score_func: str = "softmax",
        renormalize: bool = True,
        use_expert_bias: bool = False,
        bias_update_rate: float = 1e-3,
        num_expert_groups: int = 1,
        topk_expert_groups: int = 1,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0 < k <= num_experts:
            raise ValueError(f"TopkRouter: k must be in [1, num_experts={num_experts}], got {k}")
        if score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"TopkRouter: score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
        self.d_model = d_model
        self.num_experts = num_experts
        self.k = k
        self.score_func = score_func
        self.renormalize = renormalize
        self.use_expert_bias = use_expert_bias
        self.bias_update_rate = bias_update_rate
        self.num_expert_groups = num_expert_groups
        self.topk_expert_groups = topk_expert_groups
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _switch_init_(self.weight, self.d_model)
        self.expert_bias.zero_()

    def _bias(self) -> Optional[Tensor]:
        if self.use_expert_bias:
            return self.expert_bias.float()  # stays float32 even after module.to(torch.bfloat16)
        return None

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        # the weight as stored: a bfloat16 router weight is read as bfloat16, with float32 sums
        logits = ops.router_logits(x, self.weight)
        weights, indices = ops.topk_gating(
            logits,
            self.k,
            self.score_func,
            self.renormalize,
            self._bias(),
            self.num_expert_groups,
            self.topk_expert_groups,
            self.scale,
        )
        return weights, indices, logits

    @torch.jit.unused
    def forward_reference(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """:meth:`forward` through :func:`torchmoe.reference.topk_gating` (eager only)."""
        logits = _reference.router_logits(x, self.weight)
        weights, indices = _reference.topk_gating(
            logits,
            self.k,
            self.score_func,
            self.renormalize,
            self._bias(),
            self.num_expert_groups,
            self.topk_expert_groups,
            self.scale,
        )
        return weights, indices, logits

    @torch.jit.export
    def update_expert_bias(self, counts: Tensor) -> None:
        """Auxiliary-loss-free balancing step: ``expert_bias += rate * sign(mean_load - load)``.

        ``counts``: tokens routed to each expert in the last step (``[E]``, or ``[..., E]`` summed over the
        leading dims), e.g. :attr:`torchmoe.nn.MoE.expert_counts`. Overloaded experts get a lower bias,
        underloaded ones a higher bias.
        """
        with torch.no_grad():
            load = counts.reshape(-1, self.num_experts).sum(0).to(torch.float32)
            load = load.to(self.expert_bias.device)
            self.expert_bias.add_(torch.sign(load.mean() - load) * self.bias_update_rate)

    def extra_repr(self) -> str:
        s = f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, score_func={self.score_func!r}"
        s += f", renormalize={self.renormalize}"
        if self.use_expert_bias:
            s += f", use_expert_bias=True, bias_update_rate={self.bias_update_rate}"
        if self.num_expert_groups > 1:
            s += f", num_expert_groups={self.num_expert_groups}, topk_expert_groups={self.topk_expert_groups}"
        if self.scale != 1.0:
            s += f", scale={self.scale}"
        return s


class NoisyTopkRouter(nn.Module):
    """Shazeer et al. (2017) noisy top-k gating.

    ``H = x @ weight.T + N(0, 1) * (softplus(x @ noise_weight.T) + noise_eps)`` in training mode and
    ``H = x @ weight.T`` in eval mode (no noise at inference); the k largest entries of ``H`` are selected and
    their weights are the softmax over those k values (``Softmax(KeepTopK(H, k))``).

    In training mode each forward also stores :attr:`load_loss`, Shazeer's load loss (``cv_squared`` of the
    smooth, differentiable estimate of the number of tokens per expert, see :func:`torchmoe.losses.load_loss`);
    in eval mode it is zero. Multiply it by your ``w_load``.

    Args:
        d_model: token width.
        num_experts: E.
        k: experts per token.
        noise_eps: added to the softplus so the noise never vanishes (keeps the load estimator finite).

    Attributes:
        weight: ``[E, d_model]``, Switch's scaled truncated-normal initialisation.
        noise_weight: ``[E, d_model]``, initialised to zero as in the paper (noise std ``softplus(0) + eps``).

    Shape:
        ``x [..., d_model]`` -> ``(weights [..., k] float32, indices [..., k] int64, logits [..., E] float32)``,
        ``logits`` being ``H``, the (noisy in training) values the selection used.
    """

    def __init__(self, d_model: int, num_experts: int, k: int, noise_eps: float = 1e-2) -> None:
        super().__init__()
        if not 0 < k <= num_experts:
            raise ValueError(f"NoisyTopkRouter: k must be in [1, num_experts={num_experts}], got {k}")
        self.d_model = d_model
        self.num_experts = num_experts
        self.k = k
        self.noise_eps = noise_eps
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.noise_weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.load_loss = torch.zeros(())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _switch_init_(self.weight, self.d_model)
        nn.init.zeros_(self.noise_weight)

    def noisy_logits(self, x: Tensor) -> Tensor:
        """``H`` for tokens ``x`` (noise in training only); updates :attr:`load_loss`."""
        xf = x.float()
        clean = F.linear(xf, self.weight.float())
        if not self.training:
            self.load_loss = torch.zeros((), dtype=torch.float32, device=x.device)
            return clean
        std = F.softplus(F.linear(xf, self.noise_weight.float())) + self.noise_eps
        noisy = clean + torch.randn_like(clean) * std
        self.load_loss = losses.load_loss(clean, noisy, std, self.k)
        return noisy

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        logits = self.noisy_logits(x)
        weights, indices = ops.topk_gating(logits, self.k, "softmax", True)
        return weights, indices, logits

    @torch.jit.unused
    def forward_reference(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """:meth:`forward` through :func:`torchmoe.reference.topk_gating` (eager only)."""
        logits = self.noisy_logits(x)
        weights, indices = _reference.topk_gating(logits, self.k, "softmax", True)
        return weights, indices, logits

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, noise_eps={self.noise_eps}"


def make_router(
    router: str,
    d_model: int,
    num_experts: int,
    k: int,
    score_func: str = "softmax",
    renormalize: bool = True,
    use_expert_bias: bool = False,
    num_expert_groups: int = 1,
    topk_expert_groups: int = 1,
    owner: str = "MoE",
) -> nn.Module:
    """The router a layer asks for by name: ``"topk"`` (:class:`TopkRouter`) or ``"noisy"`` (:class:`NoisyTopkRouter`)."""
    if router == "topk":
        return TopkRouter(
            d_model,
            num_experts,
            k,
            score_func=score_func,
            renormalize=renormalize,
            use_expert_bias=use_expert_bias,
            num_expert_groups=num_expert_groups,
            topk_expert_groups=topk_expert_groups,
        )
    if router == "noisy":
        return NoisyTopkRouter(d_model, num_experts, k)
    raise ValueError(f"{owner}: router must be 'topk' or 'noisy', got {router!r}")


def _router_probs(logits: Tensor, score_func: str) -> Tensor:
    """Router probabilities for load balancing: the softmax, or sigmoid scores normalised per token."""
    if score_func == "sigmoid":
        s = torch.sigmoid(logits)
        return s / s.sum(-1, keepdim=True).clamp_min(1e-20)
    return torch.softmax(logits, dim=-1)


def router_aux_loss(
    logits: Tensor,
    indices: Tensor,
    score_func: str,
    aux_loss_weight: float,
    z_loss_weight: float,
    load_loss: Optional[Tensor] = None,
    counts: Optional[Tensor] = None,
) -> Tensor:
    """A sparse layer's weighted auxiliary loss: Switch load balancing on the router probabilities (sigmoid
    scores normalised per token, or the softmax), plus the router z-loss, plus the noisy router's load loss
    (given only in training) under the load-balancing weight.

    ``counts``: assignments per expert, when already counted (route_plan's counts). Then the same sums are
    taken in a third of the small ops (what a decode step of a few tokens pays for the aux loss): the softmax
    as ``exp(logits - lse)`` with the z-loss's logsumexp (``torch.softmax`` on CPU splits even a few rows over
    threads, milliseconds on a busy machine), then ``E / (T k T) * counts . sum_t probs`` and ``lse . lse / T``
    as dot products. Without it, through :mod:`torchmoe.losses`."""
    aux = torch.zeros((), dtype=torch.float32, device=logits.device)
    if counts is None:
        if aux_loss_weight != 0.0:
            aux = aux + aux_loss_weight * losses.switch_load_balancing_loss(_router_probs(logits, score_func), indices)
        if z_loss_weight != 0.0:
            aux = aux + z_loss_weight * losses.router_z_loss(logits)
    elif aux_loss_weight != 0.0 or z_loss_weight != 0.0:
        num_experts = logits.shape[-1]
        flat = logits.reshape(-1, num_experts)
        num_tokens = max(flat.shape[0], 1)
        lse = torch.logsumexp(flat, dim=-1)
        if aux_loss_weight != 0.0:
            probs = _router_probs(flat, score_func) if score_func == "sigmoid" else torch.exp(flat - lse.unsqueeze(-1))
            scale = aux_loss_weight * num_experts / max(indices.numel(), 1) / num_tokens
            aux = aux + torch.dot(probs.sum(0), counts.to(probs.dtype)) * scale
        if z_loss_weight != 0.0:
            aux = aux + torch.dot(lse, lse) * (z_loss_weight / num_tokens)
    if load_loss is not None and aux_loss_weight != 0.0:
        aux = aux + aux_loss_weight * load_loss
    return aux
