"""torchmoe inside Hugging Face transformers models (transformers 5.x, an optional dependency).

Importing this module registers the experts backend ``"torchmoe"`` with
``transformers.integrations.moe.ExpertsInterface``, so any model whose experts class is decorated with
``@use_experts_implementation`` can run its experts on torchmoe's ops::

    import torchmoe.integrations.transformers  # registers "torchmoe"
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="torchmoe")
    # or, on a built model: model.set_experts_implementation("torchmoe")

and :func:`apply_torchmoe` patches a model (or, without a model, the transformers classes) Liger-style: the
experts run on the ops and the supported routers are scored by :func:`torchmoe.topk_gating`.

The experts backend runs ``route_plan -> dispatch -> grouped_mm -> swiglu (or the model's activation / gate)
-> grouped_mm -> combine`` on the model's own parameters, read as views (``gate_up_proj [E, 2I, H]`` is used
as its transpose, ``is_transposed`` layouts as they are), so gradients land in the model's parameters and
the checkpoint never changes. Biases (``has_bias``), a model's own ``_apply_gate`` (e.g. GPT-OSS's
interleaved, clamped SwiGLU), non-gated experts (``has_gate=False``) and ``post_expert_norm`` are served.
``apply_torchmoe(model, quantize="int8" | "int4" | "int4_asym")`` quantizes the experts' weights in place and serves
them on ``grouped_mm_quantized``. Expert-parallel experts (``_is_expert_parallel``), weights quantized by other
libraries (non-floating parameters) and devices torchmoe was
not built for fall back to transformers' eager experts with a one-time warning.
"""
import ast
import inspect
import os
import textwrap
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import transformers
from transformers import modeling_utils as _hf_modeling_utils
from transformers.activations import SiLUActivation
from transformers.integrations import moe as _hf_moe

from .. import _library
from .. import ops
from ..quantization import QuantizedWeight, grouped_mm_quantized, quantize_weight

__all__ = [
    "BACKEND_NAME",
    "torchmoe_experts_forward",
    "apply_torchmoe",
    "revert_torchmoe",
    "supported_router_classes",
]

BACKEND_NAME = "torchmoe"

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------------
# Experts backend
# ----------------------------------------------------------------------------------------------------------

_warned: set = set()


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _eager_forward(experts: nn.Module) -> Callable:
    # `use_experts_implementation` wraps the class's own (eager) forward with functools.wraps.
    original = getattr(type(experts).forward, "__wrapped__", None)
    return original if original is not None else _hf_moe.grouped_mm_experts_forward


def _unsupported_reason(experts: nn.Module, hidden_states: Tensor) -> Optional[str]:
    if getattr(experts, "_is_expert_parallel", False):
        return "expert-parallel experts (sentinel expert ids) are not supported"
    names = ("gate_up_proj" if experts.has_gate else "up_proj", "down_proj")
    for name in names if _quantized_weights(experts) is None else ():
        weight = getattr(experts, name, None)
        if not isinstance(weight, Tensor) or weight.dim() != 3:
            return f"'{name}' is not a 3-D tensor"
        if weight.dtype not in _FLOATING:
            return f"'{name}' has dtype {weight.dtype} (torchmoe's grouped_mm takes floating weights)"
    device = hidden_states.device.type
    if device not in ("cpu", "cuda") or (device == "cuda" and not _library.built_with_cuda()):
        return f"torchmoe has no kernels for device '{hidden_states.device}' in this build"
    return None


_QUANTIZE_FORMATS = {"int8": (8, True), "int4": (4, True), "int4_asym": (4, False)}


def _quantized_weights(experts: nn.Module) -> Optional[Dict[str, QuantizedWeight]]:
    """The experts' quantized weights (name -> QuantizedWeight) when apply_torchmoe(quantize=...) converted them."""
    meta = getattr(experts, "_torchmoe_quantized", None)
    if meta is None:
        return None
    return {name: QuantizedWeight(getattr(experts, f"{name}_qweight"), getattr(experts, f"{name}_scales"),
                                  getattr(experts, f"{name}_zeros"), bits, group_size, dtype)
            for name, (bits, group_size, dtype) in meta.items()}


def _quantize_hf_experts(experts: nn.Module, bits: int, group_size: int, symmetric: bool) -> None:
    """Replaces the experts' weights by packed buffers (``<name>_qweight``, ``<name>_scales``, ``<name>_zeros``),
    quantized as ``[E, d_in, d_out]`` (HF's ``[E, d_out, d_in]`` read transposed); biases stay float."""
    if _quantized_weights(experts) is not None:
        return
    meta = {}
    for name in ("gate_up_proj" if experts.has_gate else "up_proj", "down_proj"):
        weight = getattr(experts, name)
        in_out = _in_out(weight.detach(), experts.is_transposed)
        if bits == 4 and in_out.shape[1] % group_size:
            raise ValueError(f"apply_torchmoe: group_size={group_size} does not divide {type(experts).__name__}."
                             f"{name}'s reduction width {in_out.shape[1]}; pick a group_size that divides it")
        qw = quantize_weight(in_out, bits, group_size, symmetric)
        del experts._parameters[name]
        experts.register_buffer(f"{name}_qweight", qw.qweight)
        experts.register_buffer(f"{name}_scales", qw.scales)
        experts.register_buffer(f"{name}_zeros", qw.zeros)
        meta[name] = (qw.bits, qw.group_size, weight.dtype)
    experts._torchmoe_quantized = meta


def _in_out(weight: Tensor, is_transposed: bool) -> Tensor:
    """An expert weight as grouped_mm's ``[E, d_in, d_out]``: HF's default layout ``[E, d_out, d_in]`` is read
    through a transposed view (no copy made here, gradients flow into the parameter)."""
    return weight if is_transposed else weight.transpose(1, 2)


def _is_silu(act_fn) -> bool:
    return isinstance(act_fn, (nn.SiLU, SiLUActivation)) or act_fn is F.silu


def torchmoe_experts_forward(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """The ``"torchmoe"`` experts implementation (same signature as transformers' ``grouped_mm`` backend).

    ``hidden_states [T, H]``, ``top_k_index [T, k]`` and ``top_k_weights [T, k]`` as the model's router
    returns them; returns ``[T, H]`` in the dtype of ``hidden_states``. Reads the experts' flags set by
    ``use_experts_implementation`` (``has_gate``, ``has_bias``, ``is_transposed``,
    ``has_post_expert_norm``) and calls the class's own ``_apply_gate`` when it defines one.
    """
    reason = _unsupported_reason(self, hidden_states)
    if reason is not None:
        _warn_once(
            (type(self), reason),
            f"torchmoe experts backend: {type(self).__name__}: {reason}; running transformers' eager experts "
            "instead (this warning is shown once).",
        )
        return _eager_forward(self)(self, hidden_states, top_k_index, top_k_weights)

    num_tokens = hidden_states.shape[0]
    k = top_k_index.shape[-1]
    indices = top_k_index.reshape(num_tokens, k).long()
    dest, counts = ops.route_plan(indices, self.num_experts)
    is_transposed = self.is_transposed
    quantized = _quantized_weights(self)
    if quantized is None:
        dtype = (self.gate_up_proj if self.has_gate else self.up_proj).dtype
        down_dtype = self.down_proj.dtype
    else:
        dtype = down_dtype = hidden_states.dtype
    rows = ops.dispatch(hidden_states.to(dtype), dest, num_tokens * k)

    def product(inputs: Tensor, name: str) -> Tensor:
        if quantized is not None:
            return grouped_mm_quantized(inputs, quantized[name], counts)
        return ops.grouped_mm(inputs, _in_out(getattr(self, name), is_transposed), counts)

    row_expert = None
    if self.has_bias:
        # Dropless rows are a permutation of the (token, choice) slots, so each row's expert is one scatter away.
        row_expert = torch.empty(num_tokens * k, dtype=torch.long, device=indices.device)
        row_expert.scatter_(0, dest.reshape(-1), indices.reshape(-1))

    if self.has_gate:
        default_gate = getattr(type(self), "_apply_gate", None) is _hf_moe._default_apply_gate
        w1 = _in_out(self.gate_up_proj, is_transposed) if quantized is None else None  # [E, H, 2I]
        if (w1 is not None and default_gate and row_expert is None
                and not (torch.is_grad_enabled() and w1.requires_grad)):
            # Without a weight gradient, gate and up are two products on column views of the weight, whose
            # outputs feed the activation without copies.
            half = w1.shape[-1] // 2
            gate, up = ops.grouped_mm(rows, w1[..., :half], counts), ops.grouped_mm(rows, w1[..., half:], counts)
        else:
            # One product over [gate; up]: the weight's gradient comes back in the parameter's own layout.
            hidden = product(rows, "gate_up_proj")  # [T*k, 2I]
            if row_expert is not None:
                hidden = hidden + self.gate_up_proj_bias[row_expert]
            if not default_gate:
                hidden = self._apply_gate(hidden)  # the model's own gate (GPT-OSS: interleaved, clamped SwiGLU)
            else:
                gate, up = hidden.chunk(2, dim=-1)
        if default_gate:
            hidden = ops.swiglu(gate, up) if _is_silu(self.act_fn) else self.act_fn(gate) * up
    else:
        hidden = product(rows, "up_proj")
        if row_expert is not None:
            hidden = hidden + self.up_proj_bias[row_expert]
        hidden = self.act_fn(hidden)

    out = product(hidden.to(down_dtype), "down_proj")
    if row_expert is not None:
        out = out + self.down_proj_bias[row_expert]
    if self.has_post_expert_norm:
        out = self.post_expert_norm(out)

    weights = top_k_weights.reshape(num_tokens, k)
    if weights.dtype != out.dtype and not (weights.dtype == torch.float32 and out.element_size() == 2):
        weights = weights.to(out.dtype)  # 16-bit outputs keep float32 weights: combine accumulates in float32
    return ops.combine(out, dest, weights).to(hidden_states.dtype)


_hf_moe.ExpertsInterface.register(BACKEND_NAME, torchmoe_experts_forward)


# ----------------------------------------------------------------------------------------------------------
# Routers: topk_gating in place of HF's softmax/sigmoid + topk, returning what HF's router returns
# ----------------------------------------------------------------------------------------------------------


def _hf_router_forward(router: nn.Module) -> Callable:
    """The transformers forward a patched router replaces (class patching keeps it in ``_patched_classes``,
    instance patching in the base class)."""
    for cls in type(router).__mro__:
        if cls in _patched_classes:
            return _patched_classes[cls]
        forward = cls.__dict__.get("forward")
        if forward is not None and not getattr(forward, "_torchmoe_router", False):
            return forward
    raise TypeError(f"{type(router).__name__}: no transformers forward found")  # unreachable for HF routers


def _topk_served(router: nn.Module) -> bool:
    """``0 < k <= E``: topk_gating's range. HF's forward takes every other k (k = 0 returns empty selections,
    k > E raises its own error), so those configurations run HF's forward."""
    return 0 < router.top_k <= router.weight.shape[0]


def _mixtral_router_forward(self, hidden_states):
    """Mixtral: softmax over all experts in float32, top-k, renormalized; float32 weights."""
    if not _topk_served(self):
        return _hf_router_forward(self)(self, hidden_states)
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    weights, indices = ops.topk_gating(router_logits.float(), self.top_k, "softmax", True)
    return router_logits, weights, indices


def _softmax_router_forward(self, hidden_states):
    """Qwen2-MoE / Qwen3-MoE / OLMoE: float32 softmax, top-k, renormalized iff ``norm_topk_prob``; weights in
    the logits' dtype."""
    if not _topk_served(self):
        return _hf_router_forward(self)(self, hidden_states)
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    weights, indices = ops.topk_gating(router_logits.float(), self.top_k, "softmax", bool(self.norm_topk_prob))
    return router_logits, weights.to(router_logits.dtype), indices


def _topk_softmax_router_forward(self, hidden_states):
    """GraniteMoE: top-k of the float32 logits, softmax over the k (= renormalized softmax)."""
    if not _topk_served(self):
        return _hf_router_forward(self)(self, hidden_states)
    router_logits = F.linear(hidden_states, self.weight).float()
    weights, indices = ops.topk_gating(router_logits, self.top_k, "softmax", True)
    return router_logits, weights.type_as(hidden_states), indices


def _biased_topk_softmax_router_forward(self, hidden_states):
    """GPT-OSS: linear with bias, top-k of the logits, softmax over the k in the logits' dtype."""
    # HF's softmax runs over dim 1, which is the k selections only for [tokens, hidden] input.
    if hidden_states.dim() != 2 or not _topk_served(self):
        return _hf_router_forward(self)(self, hidden_states)
    router_logits = F.linear(hidden_states, self.weight, self.bias)
    weights, indices = ops.topk_gating(router_logits, self.top_k, "softmax", True)
    return router_logits, weights, indices


# Score-correction bias dtypes whose sum with the float32 scores HF computes in float32, as topk_gating does
# (a float64 bias makes HF select in float64).
_FLOAT32_SELECTION_BIAS = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_sigmoid_served(router: nn.Module) -> bool:
    """The DeepSeek-V3 configurations topk_gating selects exactly as HF does: ``n_group`` divides E into groups
    of at least two experts, ``1 <= topk_group <= n_group``, ``0 < k <=`` the experts of the ``topk_group``
    groups or ``k = E`` (every expert, whichever groups win), and a float32/16-bit bias. HF also accepts a k
    between the experts of the chosen groups and E (it then adds masked experts in an order of its own),
    ``topk_group = 0`` and a float64 bias."""
    num_experts = router.weight.shape[0]
    groups, topk_groups, k = router.num_group, router.topk_group, router.top_k
    if not (isinstance(groups, int) and isinstance(topk_groups, int) and isinstance(k, int)):
        return False
    if groups < 1 or num_experts % groups != 0 or num_experts // groups < 2 or not 1 <= topk_groups <= groups:
        return False
    if router.e_score_correction_bias.dtype not in _FLOAT32_SELECTION_BIAS:
        return False
    return 0 < k <= topk_groups * (num_experts // groups) or k == num_experts


def _deepseek_v3_router_forward(self, hidden_states):
    """DeepSeek-V3: float32 sigmoid scores, selection by score + ``e_score_correction_bias`` within the best
    ``topk_group`` of ``n_group`` groups, weights renormalized iff ``norm_topk_prob``, times
    ``routed_scaling_factor``."""
    if not _grouped_sigmoid_served(self):
        return _hf_router_forward(self)(self, hidden_states)
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
    # k = E selects every expert: the groups change only HF's order of the selections, not what is selected.
    every_expert = self.top_k == router_logits.shape[-1]
    weights, indices = ops.topk_gating(
        router_logits, self.top_k, "sigmoid", False, self.e_score_correction_bias.float(),
        1 if every_expert else self.num_group, 1 if every_expert else self.topk_group, 1.0,
    )
    # HF's normalization as written (its epsilon keeps rows whose scores all underflow to 0 at 0, not NaN).
    if self.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return router_logits, weights * self.routed_scaling_factor, indices


# (family, HF router class) whose forward defines a routing rule, and torchmoe's forward for it. Any router
# class in any family whose forward is the same code (modular copies) is served by the same function.
_ROUTER_REFERENCES: Tuple[Tuple[str, str, Callable], ...] = (
    ("mixtral", "MixtralTopKRouter", _mixtral_router_forward),
    ("qwen2_moe", "Qwen2MoeTopKRouter", _softmax_router_forward),
    ("qwen3_moe", "Qwen3MoeTopKRouter", _softmax_router_forward),
    ("olmoe", "OlmoeTopKRouter", _softmax_router_forward),
    ("granitemoe", "GraniteMoeTopKRouter", _topk_softmax_router_forward),
    ("gpt_oss", "GptOssTopKRouter", _biased_topk_softmax_router_forward),
    ("deepseek_v3", "DeepseekV3TopkRouter", _deepseek_v3_router_forward),
)
for _family, _cls, _fn in _ROUTER_REFERENCES:
    _fn._torchmoe_router = True


def _fingerprint(func_node: ast.AST) -> str:
    """The code of a forward, blind to its name, docstring, annotations, decorators, comments and layout."""
    node = func_node
    node.name = "forward"
    node.decorator_list = []
    node.returns = None
    for arg in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
        arg.annotation = None
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        node.body = body[1:]
    return ast.dump(node, annotate_fields=False, include_attributes=False)


def _forward_fingerprint(cls: type) -> Optional[str]:
    forward = cls.__dict__.get("forward")
    if forward is None or getattr(forward, "_torchmoe_router", False):
        return None
    try:
        source = textwrap.dedent(inspect.getsource(forward))
        node = ast.parse(source).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    if not isinstance(node, ast.FunctionDef):
        return None
    return _fingerprint(node)


_reference_fingerprints: Optional[Dict[str, Callable]] = None


def _references() -> Dict[str, Callable]:
    global _reference_fingerprints
    if _reference_fingerprints is None:
        import importlib

        found = {}
        for family, class_name, fn in _ROUTER_REFERENCES:
            try:
                module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
            except ImportError:
                continue
            cls = getattr(module, class_name, None)
            # A class already patched by apply_torchmoe() keeps its original forward here.
            original = _patched_classes.get(cls, cls.__dict__.get("forward")) if cls is not None else None
            if original is None:
                continue
            node = ast.parse(textwrap.dedent(inspect.getsource(original))).body[0]
            found.setdefault(_fingerprint(node), fn)
        _reference_fingerprints = found
    return _reference_fingerprints


_router_cache: Dict[type, Optional[Callable]] = {}


def _torchmoe_router_for(cls: type) -> Optional[Callable]:
    """torchmoe's forward for a router class, or None when its routing rule is not one torchmoe serves."""
    if cls not in _router_cache:
        fp = _forward_fingerprint(cls) if cls.__module__.startswith("transformers.") else None
        _router_cache[cls] = _references().get(fp) if fp is not None else None
    return _router_cache[cls]


def supported_router_classes() -> List[str]:
    """Names (``family.Class``) of the router classes of the installed transformers that
    :func:`apply_torchmoe` scores with ``topk_gating``: the reference routers and every router of another
    family whose forward is the same code. Scans the modeling sources (no model is built)."""
    return sorted(f"{family}.{name}" for family, name, _, _ in _scan_router_classes())


def _scan_router_classes():
    """(family, class name, module name, torchmoe forward) for every matching router class in the installed
    transformers, found by parsing the MoE modeling files (modules are not imported)."""
    refs = _references()
    models_dir = os.path.join(os.path.dirname(transformers.__file__), "models")
    found = []
    for family in sorted(os.listdir(models_dir)):
        path = os.path.join(models_dir, family, f"modeling_{family}.py")
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            source = f.read()
        if "Router" not in source:
            continue
        for node in ast.parse(source).body:
            if not isinstance(node, ast.ClassDef):
                continue
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "forward":
                    fn = refs.get(_fingerprint(item))
                    if fn is not None:
                        found.append((family, node.name, f"transformers.models.{family}.modeling_{family}", fn))
    return found


# ----------------------------------------------------------------------------------------------------------
# apply_torchmoe
# ----------------------------------------------------------------------------------------------------------

_patched_classes: Dict[type, Callable] = {}  # router class -> its original forward
_original_default_experts: Optional[Callable] = None
_instance_classes: Dict[Tuple[type, Callable], type] = {}


def _family(cls: type) -> str:
    parts = cls.__module__.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["transformers", "models"] else cls.__module__


def _is_hf_experts(module: nn.Module) -> bool:
    """An experts module decorated with ``use_experts_implementation``."""
    return all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "_is_expert_parallel"))


def _looks_like_router(name: str, module: nn.Module) -> bool:
    return "router" in type(module).__name__.lower() or name.split(".")[-1] in ("gate", "router")


def _patched_instance_class(cls: type, forward: Callable) -> type:
    key = (cls, forward)
    if key not in _instance_classes:
        # A subclass, so isinstance checks (HF's output recorders) still match; parameters are untouched.
        _instance_classes[key] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    return _instance_classes[key]


def _patch_model(model: nn.Module, router: bool, experts: bool, quantize: Optional[str] = None,
                 group_size: int = 128) -> nn.Module:
    modules = list(model.named_modules())
    experts_modules = [(n, m) for n, m in modules if _is_hf_experts(m)]
    blocks = {n.rpartition(".")[0] for n, _ in experts_modules}
    routers = [(n, m) for n, m in modules if n.rpartition(".")[0] in blocks and _looks_like_router(n, m)]
    if not experts_modules:
        moe_like = sorted({_family(type(m)) for _, m in modules if any(
            s in type(m).__name__ for s in ("Expert", "MoE", "Moe", "Router", "Gate"))})
        warnings.warn(
            "apply_torchmoe: no transformers experts module (decorated with use_experts_implementation) found in "
            f"{type(model).__name__}" + (f" (families {moe_like})" if moe_like else "")
            + "; the model is left untouched.",
            stacklevel=3,
        )
        return model

    if router:
        unsupported = []
        for name, module in routers:
            cls = type(module)
            if getattr(cls.__dict__.get("forward"), "_torchmoe_router", False):
                continue  # already patched (this instance, or its class by apply_torchmoe())
            forward = _torchmoe_router_for(cls)
            if forward is None:
                unsupported.append(f"{_family(cls)}.{cls.__name__}")
                continue
            module.__class__ = _patched_instance_class(cls, forward)
        if unsupported:
            warnings.warn(
                f"apply_torchmoe: router(s) {sorted(set(unsupported))} are not a routing rule torchmoe serves; they "
                "keep transformers' scoring (the experts still run on torchmoe).",
                stacklevel=3,
            )

    if quantize is not None:
        bits, symmetric = _QUANTIZE_FORMATS[quantize]
        for _, module in experts_modules:
            _quantize_hf_experts(module, bits, group_size, symmetric)

    if experts:
        if isinstance(model, _hf_modeling_utils.PreTrainedModel):
            model.set_experts_implementation(BACKEND_NAME)
        for _, module in experts_modules:
            config = getattr(module, "config", None)
            if config is not None and config._experts_implementation != BACKEND_NAME:
                config._experts_implementation = BACKEND_NAME
    return model


def _default_torchmoe_experts(self, requested_experts):
    return _original_default_experts(self, BACKEND_NAME if requested_experts is None else requested_experts)


def _patch_classes(router: bool, experts: bool) -> None:
    global _original_default_experts
    if router:
        import importlib

        for _family_name, class_name, module_name, forward in _scan_router_classes():
            cls = getattr(importlib.import_module(module_name), class_name)
            if cls not in _patched_classes:
                _patched_classes[cls] = cls.__dict__["forward"]
                cls.forward = forward
    if experts and _original_default_experts is None:
        # Models built afterwards that do not ask for an experts implementation get "torchmoe" instead of
        # transformers' default ("grouped_mm"); an explicit experts_implementation=... still wins.
        _original_default_experts = _hf_modeling_utils.PreTrainedModel.get_correct_experts_implementation
        _hf_modeling_utils.PreTrainedModel.get_correct_experts_implementation = _default_torchmoe_experts


def apply_torchmoe(model: Optional[nn.Module] = None, *, router: bool = True, experts: bool = True,
                   quantize: Optional[str] = None, group_size: int = 128):
    """Run a transformers MoE model on torchmoe, Liger-style.

    Args:
        model: a built model (or any module holding transformers MoE blocks): its MoE blocks are patched in
            place and it is returned. ``None``: the transformers classes are patched, so models built
            afterwards use torchmoe (routers of every supported class; experts of every model that does not
            ask for another ``experts_implementation``); returns ``None``. Undo with :func:`revert_torchmoe`.
        router: score the supported routers with :func:`torchmoe.topk_gating` (Mixtral, Qwen2-MoE, Qwen3-MoE
            and OLMoE softmax with or without ``norm_topk_prob``, GraniteMoE, GPT-OSS, DeepSeek-V3 sigmoid +
            ``e_score_correction_bias`` + ``n_group``/``topk_group`` + ``routed_scaling_factor``, and every
            other family's router with the same code, see :func:`supported_router_classes`). A patched router
            returns exactly what HF's returns, ``(router_logits, top_k_weights, top_k_index)``, so
            ``output_router_logits=True``, the aux loss and HF's output recording keep working. Configurations
            that ``topk_gating`` does not compute exactly as HF (``k`` outside ``0 < k <= E``; DeepSeek-V3 with
            ``k`` between the experts of the ``topk_group`` groups and E, ``topk_group = 0``, groups of one
            expert or a float64 ``e_score_correction_bias``; GPT-OSS's router called on non-2-D input) run
            HF's own router forward.
        experts: run the experts (every class decorated with ``use_experts_implementation``) on the
            ``"torchmoe"`` backend (``model.set_experts_implementation("torchmoe")``).

        quantize: ``"int8"``, ``"int4"`` (symmetric) or ``"int4_asym"`` (zero points): quantize every experts
            module's weights in place for serving (:func:`torchmoe.quantize_weight`, weight-only; activations keep
            the model's dtype) and run them on ``grouped_mm_quantized``. The weights become buffers
            ``<name>_qweight``, ``<name>_scales`` (and ``<name>_zeros``); the model then computes what it computes
            with each expert weight replaced by its dequantized value. Needs ``model`` and ``experts=True``; the
            experts then run on torchmoe only (no other ``experts_implementation``).
        group_size: int4 reduction rows per scale (must divide the hidden and intermediate sizes).

    Shared experts (Qwen2-MoE's sigmoid-gated one, DeepSeek-V3's) stay transformers' modules. Parameter
    names, shapes and ``state_dict`` are unchanged. A model without transformers experts is left untouched
    and a warning names it; a router torchmoe does not serve keeps HF's scoring, with a warning naming it.
    """
    if quantize is not None:
        if quantize not in _QUANTIZE_FORMATS:
            raise ValueError(f"apply_torchmoe: quantize must be one of {sorted(_QUANTIZE_FORMATS)} or None, got "
                             f"{quantize!r}")
        if model is None or not experts:
            raise ValueError("apply_torchmoe: quantize needs a model and experts=True (the quantized experts run on "
                             "torchmoe's ops)")
    if model is None:
        _patch_classes(router, experts)
        return None
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_torchmoe: model must be an nn.Module or None, got {type(model).__name__}")
    return _patch_model(model, router, experts, quantize, group_size)


def revert_torchmoe() -> None:
    """Undo the class patching of ``apply_torchmoe()`` (models patched with ``apply_torchmoe(model)`` keep
    their patch; set ``model.set_experts_implementation(...)`` to change their experts)."""
    global _original_default_experts
    for cls, forward in _patched_classes.items():
        cls.forward = forward
    _patched_classes.clear()
    if _original_default_experts is not None:
        _hf_modeling_utils.PreTrainedModel.get_correct_experts_implementation = _original_default_experts
        _original_default_experts = None
