"""Sparse Mixture-of-Experts layers on torchmoe's fused ops: :class:`MoE` and :class:`SwitchMoE`."""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .. import reference as _reference
from .router import TopkRouter, make_router, router_aux_loss

__all__ = ["MoE", "SwitchMoE", "SharedExpert"]

_ACTIVATIONS = ("swiglu", "relu", "gelu")


def pack_kept_rows(dest: Tensor, counts: Tensor, capacity: int) -> Tuple[Tensor, Tensor]:
    """A capacity plan's ``dest = e * capacity + pos`` -> the kept rows packed expert after expert
    (``start(e) + pos``); returns (rows kept per expert, dest into the packed rows)."""
    kept = counts.clamp(max=capacity)
    if capacity == 0:
        return kept, dest
    starts = torch.cumsum(kept, 0) - kept
    return kept, torch.where(dest >= 0, starts[dest.clamp(min=0) // capacity] + dest % capacity, dest)


def _router_hooked(router: nn.Module) -> bool:
    # A hook on the router (routing statistics, say) must see its call, which the one-op forward has not.
    hooks = nn.modules.module
    return bool(router._forward_hooks or router._forward_pre_hooks or hooks._global_forward_hooks
                or hooks._global_forward_pre_hooks)


def _registered(module: nn.Module, name: str):
    """``getattr(module, name)`` for a parameter, buffer or submodule, read from nn.Module's dicts: plain lookup
    misses those, so each read goes through ``__getattr__`` (about a microsecond through MoE's and nn.Module's),
    and a decode step reads up to a dozen."""
    state = module.__dict__
    for store in ("_parameters", "_buffers", "_modules"):
        registry = state[store]
        if name in registry:
            return registry[name]
    return getattr(module, name)


def _computes_experts_with(module: nn.Module, owner: type) -> bool:
    """Whether ``module`` computes its experts with ``owner._experts_grouped``: not a subclass's override nor a
    patch on the instance (which the one-op inference path, computing the experts itself, would bypass)."""
    return type(module)._experts_grouped is owner._experts_grouped and "_experts_grouped" not in module.__dict__


class MoE(nn.Module):
    """Sparse Mixture-of-Experts feed-forward layer.

    Every token is scored by a router, sent to its ``k`` best experts, and the experts' outputs are summed
    with the routing weights: ``y = sum_j w_j * expert_{e_j}(x)``. An expert is a two-layer MLP,
    ``act(x @ up_proj[e]) @ down_proj[e]``, or SwiGLU, ``(silu(x @ gate_proj[e]) * (x @ up_proj[e])) @
    down_proj[e]``, with no biases.

    Two execution layouts (both run on the torchmoe ops, with no Python loop over experts):

    - ``capacity_factor`` a float: every expert gets a buffer of ``capacity = torchmoe.capacity(T, E, k,
      capacity_factor, min_capacity)`` rows; (token, choice) slots beyond an expert's capacity are dropped
      (all first choices are queued before any second choice) and contribute zero to the output, so a token
      whose every choice is dropped outputs zero (the caller's residual connection carries it).
      route_plan -> dispatch into ``[E, capacity, d_model]`` -> batched matmuls -> combine. On CPU (eager or
      TorchScript) the padding is skipped: the kept rows are packed expert after expert and run as grouped
      matmuls, so the experts do no work for empty capacity slots.
    - ``capacity_factor=None`` (dropless): nothing is dropped; routed rows are grouped by expert and the
      experts run as grouped matmuls: route_plan -> dispatch -> :func:`torchmoe.grouped_mm` -> combine.

    Args:
        d_model: token width.
        d_ff: expert hidden width.
        num_experts: E.
        k: experts per token.
        capacity_factor: ``None`` for dropless routing, else the capacity factor.
        activation: ``"swiglu"`` (has ``gate_proj``), ``"relu"`` or ``"gelu"`` (exact GELU).
        router: ``"topk"`` (:class:`TopkRouter`) or ``"noisy"`` (:class:`NoisyTopkRouter`, softmax over the k
            selected noisy logits; ``score_func``, ``renormalize``, ``use_expert_bias`` and the group options
            do not apply to it).
        score_func, renormalize, use_expert_bias, num_expert_groups, topk_expert_groups: passed to
            :class:`TopkRouter`.
        min_capacity: lower bound of the capacity.
        aux_loss_weight: weight of the Switch load-balancing loss (and of the noisy router's load loss).
        z_loss_weight: weight of the router z-loss.
        impl: ``"fused"`` (the torchmoe ops) or ``"reference"`` (the same math through
            :mod:`torchmoe.reference`; eager mode only, for comparisons and tests).
        shared_expert_d_ff: width of an always-on shared expert (:class:`SharedExpert`, same activation as the
            routed experts) added to every token's output (DeepSeek-V2/V3, Qwen2-MoE, Llama 4); ``None``: none.
        shared_expert_gate: scale the shared expert's output by ``sigmoid(x @ gate)`` per token (Qwen2-MoE).

    Attributes (after each forward):
        aux_loss: 0-d float32 tensor, ``aux_loss_weight * switch_load_balancing_loss + z_loss_weight *
            router_z_loss`` (``+ aux_loss_weight * router.load_loss`` with the noisy router). Add it to the
            training loss. After a forward under ``torch.no_grad()`` it is computed when first read (same value).
        expert_counts: int64 ``[E]``, (token, choice) assignments per expert before dropping. Feed it to
            ``router.update_expert_bias`` when ``use_expert_bias=True``.
        dropped_tokens: int64 0-d tensor, number of dropped (token, choice) slots (0 when dropless).

    Parameters: ``router.weight``, ``gate_proj`` (SwiGLU only) and ``up_proj`` ``[E, d_model, d_ff]``,
    ``down_proj`` ``[E, d_ff, d_model]``, all used as ``x @ W`` and initialised like ``nn.Linear``
    (uniform with bound ``1/sqrt(fan_in)``).

    Shape: ``x [..., d_model]`` -> ``y [..., d_model]``. ``x`` must have the expert weights' dtype and device
    (float32 by default; ``moe.to(torch.bfloat16)`` for bfloat16); the router computes in float32 whatever the
    dtype. Any number of leading dims, zero tokens included.

    Raises:
        ValueError: at construction, for an unknown ``activation``, ``router`` or ``impl``, ``k`` outside
            ``[1, num_experts]``, a negative ``capacity_factor`` or an unknown ``score_func`` (group options
            that do not divide ``num_experts`` raise a RuntimeError at the first forward).
        RuntimeError: in forward, from the ops, with a message naming the op and argument, e.g. for an ``x``
            whose dtype or device differs from the weights'. ``x.reshape(-1, d_model)`` must be possible: the
            last dim is not checked separately.

    Example::

        >>> moe = MoE(d_model=512, d_ff=1024, num_experts=8, k=2, capacity_factor=1.25)
        >>> y = moe(torch.randn(4, 128, 512))               # [4, 128, 512]
        >>> loss = y.square().mean() + moe.aux_loss          # add the aux loss to the task loss
        >>> loss.backward()
        >>> moe.expert_counts, moe.dropped_tokens            # int64 [8], int64 0-d

    More in docs/modules.md (routing options, MoLE, MoLoRA) and docs/distributed.md (sharding the experts).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        k: int = 2,
        capacity_factor: Optional[float] = None,
        activation: str = "swiglu",
        router: str = "topk",
        score_func: str = "softmax",
        renormalize: bool = True,
        min_capacity: int = 0,
        aux_loss_weight: float = 1e-2,
        z_loss_weight: float = 1e-3,
        use_expert_bias: bool = False,
        impl: str = "fused",
        num_expert_groups: int = 1,
        topk_expert_groups: int = 1,
        shared_expert_d_ff: Optional[int] = None,
        shared_expert_gate: bool = False,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"MoE: activation must be one of {_ACTIVATIONS}, got {activation!r}")
        if impl not in ("fused", "reference"):
            raise ValueError(f"MoE: impl must be 'fused' or 'reference', got {impl!r}")
        if capacity_factor is not None and capacity_factor < 0:
            raise ValueError(f"MoE: capacity_factor must be None or >= 0, got {capacity_factor}")
        if not 0 < k <= num_experts:
            raise ValueError(f"MoE: k must be in [1, num_experts={num_experts}], got {k}")
        self.d_model = d_model
        self.d_ff = d_ff
        self.num_experts = num_experts
        self.k = k
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.activation = activation
        self.min_capacity = min_capacity
        self.aux_loss_weight = aux_loss_weight
        self.z_loss_weight = z_loss_weight
        self.impl = impl
        self.score_func = score_func if router == "topk" else "softmax"

        self.router = make_router(
            router, d_model, num_experts, k, score_func, renormalize, use_expert_bias,
            num_expert_groups, topk_expert_groups, owner="MoE",
        )

        if activation == "swiglu":
            self.gate_proj = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        else:
            self.register_parameter("gate_proj", None)
        self.up_proj = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.shared_expert_d_ff = shared_expert_d_ff
        self.shared_expert_gate = bool(shared_expert_gate)
        if shared_expert_d_ff is not None:
            self.shared_expert = SharedExpert(d_model, shared_expert_d_ff, activation, gate=shared_expert_gate)
        else:
            if shared_expert_gate:
                raise ValueError("MoE: shared_expert_gate=True needs a shared_expert_d_ff")
            self.shared_expert = None

        self.aux_loss = torch.zeros(())
        self.expert_counts = torch.zeros(num_experts, dtype=torch.long)
        self.dropped_tokens = torch.zeros((), dtype=torch.long)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise the router and the expert weights (uniform in ``+-1/sqrt(fan_in)``, as ``nn.Linear``)."""
        self.router.reset_parameters()
        for w, fan_in in ((self.gate_proj, self.d_model), (self.up_proj, self.d_model), (self.down_proj, self.d_ff)):
            if w is not None:
                bound = 1.0 / math.sqrt(max(fan_in, 1))
                nn.init.uniform_(w, -bound, bound)
        if self.shared_expert is not None:
            self.shared_expert.reset_parameters()

    def _act(self, h: Tensor) -> Tensor:
        # h is a fresh matmul output that nothing saves for backward: ReLU can overwrite it (one whole-batch
        # tensor fewer per step). GELU has no in-place form.
        if self.activation == "relu":
            return F.relu(h, inplace=True)
        return F.gelu(h)

    def _experts_batched(self, buf: Tensor) -> Tensor:
        # buf [E, capacity, d_model] -> [E, capacity, d_model]
        gate_proj = self.gate_proj
        if gate_proj is not None:
            h = ops.swiglu(torch.bmm(buf, gate_proj), torch.bmm(buf, self.up_proj))
        else:
            h = self._act(torch.bmm(buf, self.up_proj))
        return torch.bmm(h, self.down_proj)

    def _experts_grouped(self, rows: Tensor, counts: Tensor) -> Tensor:
        # rows [R, d_model] grouped by expert (counts [E]) -> [R, d_model]
        gate_proj = self.gate_proj
        if gate_proj is not None:
            h = ops.swiglu(ops.grouped_mm(rows, gate_proj, counts), ops.grouped_mm(rows, self.up_proj, counts))
        else:
            h = self._act(ops.grouped_mm(rows, self.up_proj, counts))
        return ops.grouped_mm(h, self.down_proj, counts)

    def _skip_padding(self, x: Tensor) -> bool:
        # Capacity mode on CPU computes only the kept rows: the row count is known on the host for free there.
        # On GPUs it would cost a device-to-host sync, under torch.compile / export a data-dependent shape, and
        # torch.jit.trace would freeze it as a constant, so those run the padded [E, capacity, d_model] buffer.
        if torch.jit.is_scripting():
            return x.device.type == "cpu"
        return x.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.jit.is_tracing()

    # Capacity mode with a symbolic token count (torch.export / torch.compile with a dynamic batch): the capacity
    # stays an expression of the token count, so an exported capacity-mode layer takes any batch size.
    def _capacity_plan(self, indices: Tensor, num_tokens: int, capacity_factor: float) -> Tuple[int, Tensor, Tensor]:
        if torch.jit.is_scripting():
            cap = ops.capacity(num_tokens, self.num_experts, self.k, capacity_factor, self.min_capacity)
            dest, counts = ops.route_plan(indices, self.num_experts, cap)
            return cap, dest, counts
        return self._capacity_plan_traced(indices, num_tokens, capacity_factor)

    @torch.jit.unused
    def _capacity_plan_traced(
        self, indices: Tensor, num_tokens: int, capacity_factor: float
    ) -> Tuple[int, Tensor, Tensor]:
        if not isinstance(num_tokens, torch.SymInt):
            cap = ops.capacity(num_tokens, self.num_experts, self.k, capacity_factor, self.min_capacity)
            dest, counts = ops.route_plan(indices, self.num_experts, cap)
            return cap, dest, counts
        # torchmoe.capacity's arithmetic in the same order (so equal for every token count), without its int()
        # and max/min, which would specialize the token count; sym_int truncates, which is floor here (the value
        # is >= 0), and unlike math.floor torch.export.save can write it.
        cap = torch.sym_int(self.k * capacity_factor * num_tokens / self.num_experts)
        if self.min_capacity > 0:
            cap = torch.sym_max(self.min_capacity, cap)
        cap = torch.sym_min(cap, num_tokens)
        # route_plan's kernels take the capacity as a plain int, which would specialize a symbolic one. The
        # dropless plan has the same queues in the same order (dest = start(e) + pos): keep pos < capacity.
        dropless, counts = ops.route_plan(indices, self.num_experts, -1)
        pos = dropless - (torch.cumsum(counts, 0) - counts)[indices]
        return cap, torch.where(pos < cap, indices * cap + pos, -1), counts

    def _capacity_layout(self, t: Tensor, cap: int, split: bool) -> Tensor:
        # [E * capacity, d_model] -> [E, capacity, d_model] (split) or back, for dispatch's and bmm's outputs.
        E, d = self.num_experts, self.d_model
        if torch.jit.is_scripting() or not isinstance(cap, torch.SymInt):
            return t.view(E, cap, d) if split else t.view(E * cap, d)
        # view's checks guard on the capacity being 0 or 1, which a symbolic capacity leaves open (small batches
        # give such capacities); both tensors are contiguous, so their strides give the same views.
        return t.as_strided((E, cap, d), (cap * d, d, 1)) if split else t.as_strided((E * cap, d), (d, 1))

    def _defer_aux_loss(self) -> bool:
        if torch.jit.is_scripting():
            return False
        return self._defer_aux_loss_eager()

    @torch.jit.unused
    def _defer_aux_loss_eager(self) -> bool:
        return not torch.is_grad_enabled() and not torch.compiler.is_compiling() and not torch.jit.is_tracing()

    @torch.jit.unused
    def _defer_aux_loss_to_first_read(self, logits: Tensor, indices: Tensor, counts: Tensor) -> None:
        # Inference: nothing can backpropagate through the aux loss, so it is computed from the routing only when
        # read (a dozen small ops, a third of a decode step's time outside the experts); the same value.
        # Plain attributes written straight into __dict__: nn.Module.__setattr__ costs about 2 us a call here.
        state = self.__dict__
        state.pop("aux_loss", None)
        state["_pending_aux_loss"] = (logits, indices, counts, self._load_loss())

    @torch.jit.unused
    def __prepare_scriptable__(self):
        self.aux_loss  # a deferred aux loss becomes the attribute TorchScript types
        self.dropped_tokens  # as does a dropless forward's zero
        return self

    @torch.jit.unused
    def __getattr__(self, name: str):
        # Only reached when normal lookup misses: `aux_loss` after a deferred forward, `dropped_tokens` after a
        # one-op forward (see _forward_fused).
        if name == "aux_loss":
            pending = self.__dict__.pop("_pending_aux_loss", None)
            if pending is not None:
                logits, indices, counts, load_loss = pending
                with torch.no_grad():
                    value = router_aux_loss(logits, indices, self.score_func, self.aux_loss_weight,
                                            self.z_loss_weight, load_loss, counts)
                self.__dict__["aux_loss"] = value
                return value
        elif name == "dropped_tokens" and "expert_counts" in self.__dict__:
            # after a one-op forward, which drops nothing (a 0-d tensor costs 2 us a step to make unread)
            value = torch.zeros((), dtype=torch.long, device=self.__dict__["expert_counts"].device)
            self.__dict__["dropped_tokens"] = value
            return value
        return nn.Module.__getattr__(self, name)

    def _load_loss(self) -> Optional[Tensor]:
        # the noisy router's load loss, counted in training only
        load_loss: Optional[Tensor] = None
        if self.training and hasattr(self.router, "load_loss"):  # hasattr's miss costs an exception: eval skips it
            load_loss = self.router.load_loss
        return load_loss

    def _aux_losses(self, logits: Tensor, indices: Tensor, counts: Optional[Tensor] = None) -> Tensor:
        load_loss = self._load_loss()
        return router_aux_loss(logits, indices, self.score_func, self.aux_loss_weight, self.z_loss_weight, load_loss,
                               counts)

    @torch.jit.unused
    def _fused_experts(self) -> Optional[Tuple[Optional[Tensor], Tensor, Tensor, int, list, list, list]]:
        # _moe_forward's expert arguments (gate_proj, up_proj, down_proj, bits, scales, zeros, group_sizes), or
        # None where a subclass (or a patch on this instance) computes its experts otherwise.
        if not _computes_experts_with(self, MoE):
            return None
        return (_registered(self, "gate_proj"), _registered(self, "up_proj"), _registered(self, "down_proj"), 0, [],
                [], [])

    @torch.jit.unused
    def _forward_fused(self, x: Tensor, h: Tensor) -> Optional[Tensor]:
        # Eager inference of a dropless layer on CPU with the plain router: the whole forward is one call of
        # torchmoe::_moe_forward (the same ops in the same order, composed in C++), which saves a decode step
        # the dozen crossings from Python into the library. Training, autograd, capacity mode, torch.compile,
        # export and tracing keep the op-by-op path (the op decomposes into it anyway): None there.
        if (self.capacity_factor is not None or torch.is_grad_enabled() or not h.is_cpu
                or torch.compiler.is_compiling() or torch.jit.is_tracing()):
            return None
        router = _registered(self, "router")
        if type(router) is not TopkRouter or _router_hooked(router):
            return None
        experts = self._fused_experts()
        if experts is None:
            return None
        gate_proj, up_proj, down_proj, bits, scales, zeros, group_sizes = experts
        y, weights, indices, logits, counts = torch.ops.torchmoe._moe_forward(
            h, _registered(router, "weight"), router._bias(), router.k, router.score_func, router.renormalize,
            router.num_expert_groups, router.topk_expert_groups, router.scale, self.activation, gate_proj, up_proj,
            down_proj, bits, scales, zeros, group_sizes)
        shared_expert = _registered(self, "shared_expert")
        if shared_expert is not None:
            y = y + shared_expert(h)
        self._defer_aux_loss_to_first_read(logits, indices, counts)
        state = self.__dict__  # as there: plain attributes, without nn.Module.__setattr__
        state["expert_counts"] = counts
        state.pop("dropped_tokens", None)  # dropless: a zero, made when read (see __getattr__)
        return y if x.dim() == 2 else y.view(x.shape)  # (a view costs a few us at a decode step)

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., d_model]`` -> ``y [..., d_model]``; sets :attr:`aux_loss`, :attr:`expert_counts` and
        :attr:`dropped_tokens`."""
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError("MoE: argument 'x' must have a last dim of d_model = " + str(self.d_model)
                             + ", got shape " + str(list(x.shape)))
        if self.impl == "reference":
            return self._forward_reference(x)
        h = x if x.dim() == 2 else x.reshape(-1, self.d_model)  # (a reshape costs about a us at a decode step)
        if not torch.jit.is_scripting():
            y = self._forward_fused(x, h)
            if y is not None:
                return y
        num_tokens = h.shape[0]
        weights, indices, logits = self.router(h)
        capacity_factor = self.capacity_factor
        if capacity_factor is not None:
            cap, dest, counts = self._capacity_plan(indices, num_tokens, capacity_factor)
            dropped = (dest < 0).sum()
            if self._skip_padding(x) and cap > 0:
                # Only the kept rows, packed expert after expert.
                kept, dest = pack_kept_rows(dest, counts, cap)
                rows = ops.dispatch(h, dest, int(kept.sum()))
                out = self._experts_grouped(rows, kept)
            else:
                buf = self._capacity_layout(ops.dispatch(h, dest, self.num_experts * cap), cap, split=True)
                out = self._capacity_layout(self._experts_batched(buf), cap, split=False)
        else:
            dest, counts = ops.route_plan(indices, self.num_experts, -1)
            rows = ops.dispatch(h, dest, num_tokens * self.k)
            out = self._experts_grouped(rows, counts)
            dropped = torch.zeros((), dtype=torch.long, device=x.device)
        y = ops.combine(out, dest, weights)
        if self.shared_expert is not None:
            y = y + self.shared_expert(h)
        if self._defer_aux_loss():
            self._defer_aux_loss_to_first_read(logits, indices, counts)
        else:
            self.aux_loss = self._aux_losses(logits, indices, counts)
        self.expert_counts = counts
        self.dropped_tokens = dropped
        return y.view_as(x)

    @torch.jit.unused
    def _forward_reference(self, x: Tensor) -> Tensor:
        R = _reference
        h = x.reshape(-1, self.d_model)
        num_tokens = h.shape[0]
        weights, indices, logits = self.router.forward_reference(h)
        if self.capacity_factor is not None:
            cap = ops.capacity(num_tokens, self.num_experts, self.k, self.capacity_factor, self.min_capacity)
            dest, counts = R.route_plan(indices, self.num_experts, cap)
            buf = R.dispatch(h, dest, self.num_experts * cap).view(self.num_experts, cap, self.d_model)
            out = self._experts_batched(buf).view(self.num_experts * cap, self.d_model)
            dropped = (dest < 0).sum()
        else:
            dest, counts = R.route_plan(indices, self.num_experts, -1)
            rows = R.dispatch(h, dest, num_tokens * self.k)
            if self.gate_proj is not None:
                hid = F.silu(R.grouped_mm(rows, self.gate_proj, counts)) * R.grouped_mm(rows, self.up_proj, counts)
            else:
                hid = self._act(R.grouped_mm(rows, self.up_proj, counts))
            out = R.grouped_mm(hid, self.down_proj, counts)
            dropped = torch.zeros((), dtype=torch.long, device=x.device)
        y = R.combine(out, dest, weights)
        if self.shared_expert is not None:
            y = y + self.shared_expert(h)
        self.aux_loss = self._aux_losses(logits, indices)
        self.expert_counts = counts
        self.dropped_tokens = dropped
        return y.view(x.shape)

    def extra_repr(self) -> str:
        s = f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, k={self.k}"
        s += f", capacity_factor={self.capacity_factor}, activation={self.activation!r}"
        if self.min_capacity:
            s += f", min_capacity={self.min_capacity}"
        s += f", aux_loss_weight={self.aux_loss_weight}, z_loss_weight={self.z_loss_weight}"
        if self.impl != "fused":
            s += f", impl={self.impl!r}"
        if self.shared_expert_d_ff is not None:
            s += f", shared_expert_d_ff={self.shared_expert_d_ff}"
            if self.shared_expert_gate:
                s += ", shared_expert_gate=True"
        return s


class SwitchMoE(MoE):
    """Switch Transformer layer (Fedus et al. 2021): top-1 routing with a capacity factor.

    The chosen expert's output is scaled by its router probability (softmax over all experts, no
    renormalisation), which is what lets the router learn; a token whose slot is dropped for capacity outputs
    zero (the caller's residual connection carries it). The auxiliary loss is the Switch load-balancing loss
    times ``aux_loss_weight`` (``alpha``; 1e-2 in the paper) plus an optional router z-loss (off by default:
    it came later, with ST-MoE). ``aux_loss``, ``expert_counts`` and ``dropped_tokens`` as in :class:`MoE`.

    Args:
        d_model, d_ff, num_experts: as in :class:`MoE`.
        capacity_factor: 1.25 by default; ``None`` for dropless routing.
        activation: ``"relu"`` (the paper's FFN), ``"gelu"`` or ``"swiglu"``.
        aux_loss_weight: ``alpha``.
        z_loss_weight: router z-loss weight (0 by default).
        min_capacity, use_expert_bias, impl: as in :class:`MoE`.

    Shape: ``x [..., d_model]`` -> ``y [..., d_model]``.

    Raises:
        ValueError: as :class:`MoE`, for an unknown ``activation`` or ``impl`` or a negative
            ``capacity_factor``.

    Example::

        >>> switch = SwitchMoE(512, 2048, num_experts=16)      # top-1, capacity factor 1.25, ReLU experts
        >>> y = switch(torch.randn(8, 64, 512))
        >>> loss = y.square().mean() + switch.aux_loss
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        capacity_factor: Optional[float] = 1.25,
        activation: str = "relu",
        aux_loss_weight: float = 1e-2,
        z_loss_weight: float = 0.0,
        min_capacity: int = 0,
        use_expert_bias: bool = False,
        impl: str = "fused",
    ) -> None:
        super().__init__(
            d_model,
            d_ff,
            num_experts,
            k=1,
            capacity_factor=capacity_factor,
            activation=activation,
            router="topk",
            score_func="softmax",
            renormalize=False,
            min_capacity=min_capacity,
            aux_loss_weight=aux_loss_weight,
            z_loss_weight=z_loss_weight,
            use_expert_bias=use_expert_bias,
            impl=impl,
        )


class SharedExpert(nn.Module):
    """The always-on expert of :class:`MoE` (``shared_expert_d_ff``): one dense MLP every token goes through,
    ``act(x @ up_proj) @ down_proj`` or SwiGLU ``(silu(x @ gate_proj) * (x @ up_proj)) @ down_proj``, no biases,
    optionally scaled per token by ``sigmoid(x @ output_gate)`` (Qwen2-MoE's ``shared_expert_gate``).

    Parameters: ``gate_proj`` (SwiGLU only) and ``up_proj`` ``[d_model, d_ff]``, ``down_proj [d_ff, d_model]``,
    ``output_gate [d_model, 1]`` (with ``gate=True``), initialised like ``nn.Linear``. Split in :meth:`hidden` and
    :meth:`output` so that the expert-parallel layer runs each half while a token exchange is in flight.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "swiglu", gate: bool = False) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"SharedExpert: activation must be one of {_ACTIVATIONS}, got {activation!r}")
        if d_ff <= 0:
            raise ValueError(f"shared_expert_d_ff must be a positive int, got {d_ff}")
        self.d_model = d_model
        self.d_ff = d_ff
        self.activation = activation
        if activation == "swiglu":
            self.gate_proj = nn.Parameter(torch.empty(d_model, d_ff))
        else:
            self.register_parameter("gate_proj", None)
        self.up_proj = nn.Parameter(torch.empty(d_model, d_ff))
        self.down_proj = nn.Parameter(torch.empty(d_ff, d_model))
        if gate:
            self.output_gate = nn.Parameter(torch.empty(d_model, 1))
        else:
            self.register_parameter("output_gate", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w, fan_in in ((self.gate_proj, self.d_model), (self.up_proj, self.d_model), (self.down_proj, self.d_ff),
                          (self.output_gate, self.d_model)):
            if w is not None:
                bound = 1.0 / math.sqrt(max(fan_in, 1))
                nn.init.uniform_(w, -bound, bound)

    def hidden(self, x: Tensor) -> Tensor:
        """``[T, d_model]`` -> the activated hidden rows ``[T, d_ff]``."""
        if self.gate_proj is not None:
            return ops.swiglu(x @ self.gate_proj, x @ self.up_proj)
        h = x @ self.up_proj
        return F.relu(h) if self.activation == "relu" else F.gelu(h)

    def output(self, x: Tensor, hidden: Tensor) -> Tensor:
        """The expert's output ``[T, d_model]`` from its input ``x`` and :meth:`hidden` of it."""
        y = hidden @ self.down_proj
        if self.output_gate is not None:
            y = y * torch.sigmoid(x @ self.output_gate)
        return y

    def forward(self, x: Tensor) -> Tensor:
        return self.output(x, self.hidden(x))

    def extra_repr(self) -> str:
        s = f"d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation!r}"
        return s + (", gate=True" if self.output_gate is not None else "")
