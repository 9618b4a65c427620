"""Mixture of LoRA experts around a frozen linear layer (seed 000), a helper that injects it into a model, and
adapter-only save / load (safetensors), the PEFT way."""
import json
import math
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import topk_gating


class MoLoRA(nn.Module):
    r"""A frozen ``nn.Linear`` plus a gated mixture of LoRA experts.

    .. math::
        y = \mathrm{base}(x) + \sum_{i=1}^{N} g_i(x)\, \frac{\alpha}{r}\, (x A_i) B_i,\qquad
        g(x) = \mathrm{softmax}\!\left(\frac{x\, e^\top}{\tau}\right)

    with ``base(x) = x W^T + b`` the frozen linear, ``A_i [in, r]``, ``B_i [r, out]`` and one trainable
    embedding ``e_i [in]`` per expert (the seed's
    gate ``softmax(h . e_i)``). With ``top_k`` set, only the ``top_k`` largest gates are kept and
    renormalised (a softmax over the selected logits). The experts are evaluated as two GEMMs over their
    concatenation, ``x @ [A_1 .. A_N]`` (``[in, N*r]``), each ``r``-block scaled by its gate, then
    ``@ [B_1; ..; B_N]`` (``[N*r, out]``), never a loop over experts.

    The base layer's parameters are held under their own names, ``weight`` and ``bias`` (the very
    ``nn.Parameter`` objects of ``base``, not copies), so a model with MoLoRA injected keeps its checkpoint's
    parameter names (``q_proj.weight`` stays ``q_proj.weight``): its ``state_dict`` is the base model's plus the
    adapters' ``lora_A``, ``lora_B`` and ``expert_embed``.

    A gated mixture cannot be merged into the base weight: the update ``sum_i g_i(x) (alpha/r) B_i A_i`` depends
    on the input through the gates ``g(x)``, so no fixed matrix equals it (unlike plain LoRA's ``W + BA``). Keep
    the adapter at inference, or :func:`unload_molora` to drop it.

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
        self.weight = base.weight
        if base.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = base.bias
        for p in base.parameters():
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
        y = F.linear(x, self.weight, self.bias)
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

    def to_linear(self) -> nn.Linear:
        """The frozen base layer as an ``nn.Linear`` holding the same parameters (no copy)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta", dtype=self.weight.dtype)
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def molora_config(self) -> Dict[str, Optional[float]]:
        """The arguments that rebuild this adapter around a base layer (saved by :func:`save_molora`)."""
        return {"num_experts": self.num_experts, "rank": self.rank, "alpha": self.alpha, "top_k": self.top_k,
                "temperature": self.temperature}

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
    ``expert_embed``. Layers already adapted (a :class:`MoLoRA` is not an ``nn.Linear``) are left alone. The
    adapted layers keep their parameter names (``q_proj.weight``), so the model still loads and saves the
    base checkpoint.

    Returns:
        The qualified names of the replaced layers, in ``named_modules`` order.

    Raises:
        ValueError: if no ``nn.Linear`` matches.
    """
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    chosen: List[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and _matches(name, targets):
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


_ADAPTER_PARAMETERS = ("lora_A", "lora_B", "expert_embed")
_METADATA_KEY = "torchmoe.molora"


def _molora_modules(model: nn.Module) -> Dict[str, MoLoRA]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoLoRA)}


def molora_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """The adapter weights alone: ``{"<layer>.lora_A": ..., "<layer>.lora_B": ..., "<layer>.expert_embed": ...}``
    for every :class:`MoLoRA` in ``model`` (names as in ``model.state_dict()``; the base weights are not
    included). Raises ``ValueError`` when the model holds no MoLoRA."""
    layers = _molora_modules(model)
    if not layers:
        raise ValueError("molora_state_dict: the model holds no MoLoRA layer (inject_molora first)")
    out: Dict[str, Tensor] = {}
    for name, m in layers.items():
        prefix = f"{name}." if name else ""
        for p in _ADAPTER_PARAMETERS:
            out[prefix + p] = getattr(m, p).detach()
    return out


def save_molora(model: nn.Module, path: str) -> None:
    """Saves the adapters of ``model`` (:func:`molora_state_dict`) to a safetensors file at ``path``, with each
    layer's configuration (``num_experts``, ``rank``, ``alpha``, ``top_k``, ``temperature``) in its metadata,
    so :func:`load_molora` can rebuild them around a fresh base model. Needs the ``safetensors`` package."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous().cpu() for k, v in molora_state_dict(model).items()}
    config = {name: m.molora_config() for name, m in _molora_modules(model).items()}
    save_file(tensors, str(path), metadata={_METADATA_KEY: json.dumps(config, sort_keys=True)})


def load_molora(model: nn.Module, path: str) -> List[str]:
    """Loads adapters saved by :func:`save_molora` into ``model`` (in place) and returns the adapted layers' names.

    Layers of ``model`` that are plain ``nn.Linear`` get a :class:`MoLoRA` with the saved configuration first
    (as :func:`inject_molora` would, freezing everything but the adapters); layers that already are MoLoRA must
    have the saved configuration. The adapter tensors are copied in with the model's device and dtype. Raises
    ``ValueError`` if a saved layer is missing from the model, has another shape or configuration, or the file
    holds no torchmoe MoLoRA metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if _METADATA_KEY not in metadata:
            raise ValueError(f"load_molora: {path} holds no torchmoe MoLoRA adapters (metadata key "
                             f"'{_METADATA_KEY}' missing)")
        config = json.loads(metadata[_METADATA_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    injected = False
    for name, cfg in config.items():
        try:
            module = model.get_submodule(name) if name else model
        except AttributeError:
            raise ValueError(f"load_molora: the model has no layer '{name}' saved in {path}") from None
        if isinstance(module, MoLoRA):
            if module.molora_config() != cfg:
                raise ValueError(f"load_molora: layer '{name}' is a MoLoRA with {module.molora_config()}, the file "
                                 f"has {cfg}")
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"load_molora: layer '{name}' is a {type(module).__name__}, not an nn.Linear")
        adapter = MoLoRA(module, cfg["num_experts"], cfg["rank"], alpha=cfg["alpha"], top_k=cfg["top_k"],
                         temperature=cfg["temperature"])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, adapter)
        injected = True
    if injected:
        for p in model.parameters():
            p.requires_grad_(False)
        for m in _molora_modules(model).values():
            for p in _ADAPTER_PARAMETERS:
                getattr(m, p).requires_grad_(True)

    with torch.no_grad():
        for name in config:
            module = model.get_submodule(name) if name else model
            prefix = f"{name}." if name else ""
            for p in _ADAPTER_PARAMETERS:
                target = getattr(module, p)
                value = tensors.get(prefix + p)
                if value is None or value.shape != target.shape:
                    raise ValueError(
                        f"load_molora: '{prefix + p}' in {path} is "
                        f"{'missing' if value is None else list(value.shape)}, the model needs {list(target.shape)}")
                target.copy_(value)
    return list(config)


def unload_molora(model: nn.Module) -> List[str]:
    """Replaces every :class:`MoLoRA` of ``model`` by its base ``nn.Linear`` (same parameters, in place; the
    adapters are dropped, not merged: a gated mixture has no merged form). Returns the layers' names."""
    names = list(_molora_modules(model))
    for name in names:
        module = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.to_linear())
    return names
