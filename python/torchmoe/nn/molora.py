"""Mixture of LoRA experts around a frozen linear layer (seed 000), and a helper that injects it."""
import math
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import topk_gating


class MoLoRA(nn.Module):
    r"""A frozen ``nn.Linear`` plus a gated mixture of LoRA experts.

    .. math::
        y = \mathrm{base}(x) + \sum_{i=1}^{N} g_i(x)\, \frac{\alpha}{r}\, (x A_i) B_i,\qquad
        g(x) = \mathrm{softmax}\!\left(\frac{x\, e^\top}{\tau}\right)

    with ``A_i [in, r]``, ``B_i [r, out]`` and one trainable embedding ``e_i [in]`` per expert (the seed's
    gate ``softmax(h . e_i)``). With ``top_k`` set, only the ``top_k`` largest gates are kept and
    renormalised (a softmax over the selected logits). The experts are evaluated as two GEMMs over their
    concatenation, ``x @ [A_1 .. A_N]`` (``[in, N*r]``), each ``r``-block scaled by its gate, then
    ``@ [B_1; ..; B_N]`` (``[N*r, out]``), never a loop over experts.

    Args:
        base: the ``nn.Linear`` to adapt; its parameters are frozen (``requires_grad=False``).
        num_experts: N.
        rank: r, the LoRA rank of each expert.
        alpha: LoRA scaling numerator; the update is scaled by ``alpha / rank`` (default ``alpha = rank``,
            a scaling of 1).
        top_k: ``None`` for the dense gate, else keep the ``top_k`` largest gates (``1 <= top_k <= N``).
        temperature: tau, divides the gate logits.

    Parameters: ``lora_A [N, in, r]`` (uniform in +-1/sqrt(in), the kaiming-uniform of LoRA),
    ``lora_B [N, r, out]`` (zeros, so the layer starts equal to ``base``), ``expert_embed [N, in]``
    (normal with std 1/sqrt(in)). They take ``base``'s device and dtype.

    Shape: input ``[..., in]``, output ``[..., out]``. After each forward, :attr:`gates` holds the gate
    values ``[..., N]``.
    """

    def __init__(
        self,
        base: nn.Linear,
        num_experts: int,
        rank: int,
        alpha: Optional[float] = None,
        top_k: Optional[int] = None,
        temperature: float = 1.0,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MoLoRA: base must be an nn.Linear, got {type(base).__name__}")
        if num_experts <= 0 or rank <= 0:
            raise ValueError(f"MoLoRA: num_experts and rank must be positive, got {num_experts}, {rank}")
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise ValueError(f"MoLoRA: top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if not temperature > 0:
            raise ValueError(f"MoLoRA: temperature must be positive, got {temperature}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.num_experts = num_experts
        self.rank = rank
        self.alpha = float(rank) if alpha is None else float(alpha)
        self.scaling = self.alpha / rank
        self.top_k = top_k
        self.temperature = float(temperature)

        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(num_experts, self.in_features, rank, **factory))
        self.lora_B = nn.Parameter(torch.empty(num_experts, rank, self.out_features, **factory))
        self.expert_embed = nn.Parameter(torch.empty(num_experts, self.in_features, **factory))
        self.reset_parameters()
        self.gates = torch.zeros(0)

    def reset_parameters(self) -> None:
        """A uniform in +-1/sqrt(in), B zero (the layer then equals ``base``), embeddings N(0, 1/in)."""
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.in_features)
            self.lora_A.uniform_(-bound, bound)
            self.lora_B.zero_()
            self.expert_embed.normal_(0.0, bound)

    def gate(self, x: Tensor) -> Tensor:
        """Gate values ``[T, N]`` (float32 for half inputs, else x's dtype) for tokens ``x [T, in]``."""
        logits = x @ self.expert_embed.t()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        top_k = self.top_k
        if top_k is None:
            acc = logits.double() if logits.dtype == torch.float64 else logits.float()
            return torch.softmax(acc, dim=-1)
        weights, indices = topk_gating(logits, top_k, "softmax", True)
        dense = torch.zeros(logits.shape, dtype=weights.dtype, device=weights.device)
        return dense.scatter(1, indices, weights)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"MoLoRA: x must be [..., {self.in_features}], got {list(x.shape)}")
        y = self.base(x)
        tokens = x.reshape(-1, self.in_features)
        n = tokens.shape[0]
        N, r = self.num_experts, self.rank
        gates = self.gate(tokens)  # [T, N]
        a_cat = self.lora_A.permute(1, 0, 2).reshape(self.in_features, N * r)
        z = tokens @ a_cat  # [T, N*r]: every expert's down-projection
        scale = (gates * self.scaling).to(z.dtype)
        z = (z.view(n, N, r) * scale.unsqueeze(-1)).reshape(n, N * r)
        delta = z @ self.lora_B.reshape(N * r, self.out_features)  # sums the gated experts
        lead = list(x.shape[:-1])
        self.gates = gates.reshape(lead + [N])
        return y + delta.reshape(lead + [self.out_features]).to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
            f"rank={self.rank}, alpha={self.alpha}, top_k={self.top_k}, temperature={self.temperature}"
        )


def _matches(name: str, targets: List[str]) -> bool:
    for t in targets:
        if name == t or name.endswith("." + t):
            return True
    return False


def inject_molora(
    model: nn.Module,
    target_modules: Union[str, Sequence[str]],
    num_experts: int,
    rank: int,
    alpha: Optional[float] = None,
    top_k: Optional[int] = None,
    temperature: float = 1.0,
) -> List[str]:
    """Replace chosen ``nn.Linear`` layers of ``model`` (in place) with :class:`MoLoRA` wrappers.

    Args:
        model: any module.
        target_modules: a name or list of names; a ``nn.Linear`` whose qualified name (as in
            ``model.named_modules()``) equals one of them or ends with ``"." + name`` is replaced, e.g.
            ``"q_proj"`` matches ``layers.0.attn.q_proj`` and ``layers.1.attn.q_proj``.
        num_experts, rank, alpha, top_k, temperature: passed to every :class:`MoLoRA`.

    Afterwards every parameter of ``model`` is frozen except the adapters' ``lora_A``, ``lora_B`` and
    ``expert_embed``. Linear layers already inside a MoLoRA (its ``base``) are left alone.

    Returns:
        The qualified names of the replaced layers, in ``named_modules`` order.

    Raises:
        ValueError: if no ``nn.Linear`` matches.
    """
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    chosen: List[str] = []
    inside_molora: List[str] = []
    for name, module in model.named_modules():
        if isinstance(module, MoLoRA):
            inside_molora.append(name + ".base" if name else "base")
        elif isinstance(module, nn.Linear) and name not in inside_molora and _matches(name, targets):
            chosen.append(name)
    if not chosen:
        raise ValueError(f"inject_molora: no nn.Linear in the model matches target_modules={targets}")

    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        setattr(parent, child, MoLoRA(linear, num_experts, rank, alpha=alpha, top_k=top_k, temperature=temperature))

    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, MoLoRA):
            for p in (module.lora_A, module.lora_B, module.expert_embed):
                p.requires_grad_(True)
    return chosen
