"""Mixture of Latent Experts (Liu et al., 2025, arXiv:2503.23100; seed 001)."""
import copy
import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..ops import capacity, combine, dispatch, grouped_mm, route_plan, swiglu
from .router import make_router, router_aux_loss


class MoLE(nn.Module):
    r"""Sparse SwiGLU mixture of experts whose up and gate operators share a latent basis per group.

    The E experts form ``G = E / group_size`` groups of consecutive experts. Expert ``i`` of group ``g``
    has its up and gate weights factored through the group's bases:

    .. math::
        W^{up}_i = U^{up}_g C^{up}_i,\quad W^{gate}_i = U^{gate}_g C^{gate}_i,\qquad
        E_i(x) = \big(\mathrm{silu}(x W^{gate}_i) \odot x W^{up}_i\big) W^{down}_i

    with bases ``U [d_model, r]`` shared by the group, coefficients ``C_i [r, d_ff]`` per expert and the
    down operator ``W^{down}_i [d_ff, d_model]`` kept whole (the seed's ``W_i = A_i B``, transposed to the
    ``x @ W`` convention). The forward projects every token into each group's latent spaces once
    (``x @ U``: ``[N, G, r]`` for up and for gate, one GEMM each) and routes those latent vectors, not the
    ``d_model``-wide inputs: router, ``route_plan``, ``dispatch`` of the latent rows, the experts'
    ``C_i`` (``grouped_mm`` when dropless, batched matmuls on the capacity layout), SwiGLU, ``W^{down}_i``,
    and ``combine`` back to the tokens. No Python loop over experts.

    Args:
        d_model, d_ff, num_experts: as in :class:`~torchmoe.nn.MoE`.
        group_size: experts per shared basis (consecutive experts); must divide ``num_experts``.
        rank: r, the latent width of each basis.
        k: experts per token.
        capacity_factor: ``None`` for dropless routing, else each expert takes at most
            ``torchmoe.capacity(N, E, k, capacity_factor, min_capacity)`` (token, choice) slots; dropped slots
            contribute zero.
        min_capacity: lower bound of the capacity.
        router, score_func, renormalize, use_expert_bias, num_expert_groups, topk_expert_groups: the router,
            as in :class:`~torchmoe.nn.MoE` (``"topk"``: :class:`~torchmoe.nn.TopkRouter`, ``"noisy"``:
            :class:`~torchmoe.nn.NoisyTopkRouter`).
        aux_loss_weight: weight of the Switch load-balancing loss (and of the noisy router's load loss).
        z_loss_weight: weight of the router z-loss.
        device, dtype: where and in which dtype to create the expert parameters (the router weight stays
            float32: router math is float32 anyway).

    Parameters: ``router.weight``, ``up_basis``, ``gate_basis`` ``[G, d_model, r]``, ``up_coef``,
    ``gate_coef`` ``[E, r, d_ff]``, ``down_proj [E, d_ff, d_model]``, all used as ``x @ W``. A fresh MoLE
    has orthonormal basis columns and coefficients scaled so that its outputs have the scale of a dense
    ``N(0, 1/d_model)`` init; usually one builds it from a trained MoE with :meth:`from_moe`.

    Shape: input ``[..., d_model]``, output ``[..., d_model]``. After each forward, as in
    :class:`~torchmoe.nn.MoE`: :attr:`aux_loss` (``aux_loss_weight * switch_load_balancing_loss +
    z_loss_weight * router_z_loss``), :attr:`expert_counts` ((token, choice) assignments per expert before
    dropping, int64 ``[E]``) and :attr:`dropped_tokens` (dropped (token, choice) slots, int64 0-d).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        group_size: int,
        rank: int,
        k: int = 2,
        capacity_factor: Optional[float] = None,
        min_capacity: int = 0,
        router: str = "topk",
        score_func: str = "softmax",
        renormalize: bool = True,
        use_expert_bias: bool = False,
        num_expert_groups: int = 1,
        topk_expert_groups: int = 1,
        aux_loss_weight: float = 1e-2,
        z_loss_weight: float = 1e-3,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if d_model <= 0 or d_ff <= 0 or num_experts <= 0 or rank <= 0:
            raise ValueError(
                "MoLE: d_model, d_ff, num_experts and rank must be positive, got "
                f"{d_model}, {d_ff}, {num_experts}, {rank}"
            )
        if group_size <= 0 or num_experts % group_size != 0:
            raise ValueError(f"MoLE: group_size must divide num_experts={num_experts}, got {group_size}")
        if not 0 < k <= num_experts:
            raise ValueError(f"MoLE: k must be in [1, num_experts={num_experts}], got {k}")
        if capacity_factor is not None and capacity_factor < 0:
            raise ValueError(f"MoLE: capacity_factor must be None or >= 0, got {capacity_factor}")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_ff = d_ff
        self.num_experts = num_experts
        self.group_size = group_size
        self.num_groups = num_experts // group_size
        self.rank = rank
        self.k = k
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.min_capacity = min_capacity
        self.activation = "swiglu"
        self.aux_loss_weight = float(aux_loss_weight)
        self.z_loss_weight = float(z_loss_weight)
        self.score_func = score_func if router == "topk" else "softmax"

        self.router = make_router(
            router, d_model, num_experts, k, score_func, renormalize, use_expert_bias,
            num_expert_groups, topk_expert_groups, owner="MoLE",
        )
        self.router.to(device=device)  # router math is float32 whatever the experts' dtype

        G, E = self.num_groups, num_experts
        self.up_basis = nn.Parameter(torch.empty(G, d_model, rank, **factory))
        self.gate_basis = nn.Parameter(torch.empty(G, d_model, rank, **factory))
        self.up_coef = nn.Parameter(torch.empty(E, rank, d_ff, **factory))
        self.gate_coef = nn.Parameter(torch.empty(E, rank, d_ff, **factory))
        self.down_proj = nn.Parameter(torch.empty(E, d_ff, d_model, **factory))

        self.aux_loss = torch.zeros(())
        self.expert_counts = torch.zeros(num_experts, dtype=torch.long)
        self.dropped_tokens = torch.zeros((), dtype=torch.long)
        self._init_experts()

    def _init_experts(self) -> None:
        with torch.no_grad():
            for basis in (self.up_basis, self.gate_basis):
                tmp = torch.randn(basis.shape, dtype=torch.float32, device=basis.device)
                if self.rank <= self.d_model:
                    basis.copy_(torch.linalg.qr(tmp).Q)  # orthonormal columns
                else:
                    basis.copy_(tmp / math.sqrt(self.d_model))  # unit-norm columns on average
            self.up_coef.normal_(0.0, 1.0 / math.sqrt(self.rank))
            self.gate_coef.normal_(0.0, 1.0 / math.sqrt(self.rank))
            self.down_proj.normal_(0.0, 1.0 / math.sqrt(self.d_ff))

    def reset_parameters(self) -> None:
        """Router as in MoE; orthonormal basis columns and coefficients N(0, 1/rank), so that
        ``x @ U @ C`` has the output scale of a dense ``N(0, 1/d_model)`` weight; ``down_proj`` N(0, 1/d_ff)."""
        self.router.reset_parameters()
        self._init_experts()

    # ------------------------------------------------------------------------------------------
    def _latent(self, tokens: Tensor, basis: Tensor) -> Tensor:
        """``tokens [N, d] -> [N * G, r]``: row ``n * G + g`` is token n in group g's latent space."""
        G, r = self.num_groups, self.rank
        lat = tokens @ basis.permute(1, 0, 2).reshape(self.d_model, G * r)  # one GEMM for all groups
        return lat.reshape(tokens.shape[0] * G, r)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"MoLE: x must be [..., {self.d_model}], got {list(x.shape)}")
        tokens = x.reshape(-1, self.d_model)
        n = tokens.shape[0]
        E, G, k = self.num_experts, self.num_groups, self.k

        weights, indices, logits = self.router(tokens)
        cap = -1
        capacity_factor = self.capacity_factor
        if capacity_factor is not None:
            cap = capacity(n, E, k, capacity_factor, self.min_capacity)
        dest, counts = route_plan(indices, E, cap)
        rows = n * k if cap < 0 else E * cap

        # Latent row (n, g) fills the slots of token n's choices that lie in group g; its other slots are -1.
        if G == 1:
            dest_latent = dest
        else:
            group_of_choice = torch.div(indices, self.group_size, rounding_mode="floor")  # [N, k]
            groups = torch.arange(G, device=indices.device).view(1, G, 1)
            dest_latent = torch.where(
                group_of_choice.unsqueeze(1) == groups, dest.unsqueeze(1), torch.full_like(dest.unsqueeze(1), -1)
            ).reshape(n * G, k)

        up_in = dispatch(self._latent(tokens, self.up_basis), dest_latent, rows)  # [rows, r]
        gate_in = dispatch(self._latent(tokens, self.gate_basis), dest_latent, rows)
        if cap < 0:
            h = swiglu(grouped_mm(gate_in, self.gate_coef, counts), grouped_mm(up_in, self.up_coef, counts))
            expert_out = grouped_mm(h, self.down_proj, counts)
            dropped = torch.zeros((), dtype=torch.long, device=x.device)
        else:
            up = torch.bmm(up_in.view(E, cap, self.rank), self.up_coef)
            gate = torch.bmm(gate_in.view(E, cap, self.rank), self.gate_coef)
            expert_out = torch.bmm(swiglu(gate, up), self.down_proj).view(rows, self.d_model)
            dropped = (dest < 0).sum()
        y = combine(expert_out, dest, weights)

        self.aux_loss = self._aux_losses(logits, indices)
        self.expert_counts = counts
        self.dropped_tokens = dropped
        return y.view(x.shape)

    def _aux_losses(self, logits: Tensor, indices: Tensor) -> Tensor:
        # The same objective as MoE's, so a converted layer keeps training the way it was trained.
        load_loss: Optional[Tensor] = None
        if hasattr(self.router, "load_loss"):
            if self.training:
                load_loss = self.router.load_loss
        return router_aux_loss(logits, indices, self.score_func, self.aux_loss_weight, self.z_loss_weight, load_loss)

    # ------------------------------------------------------------------------------------------
    def expert_weights(self) -> Tuple[Tensor, Tensor]:
        """The dense operators this MoLE computes, ``(gate, up)``, each ``[E, d_model, d_ff]`` with
        ``W_i = basis_{group(i)} @ coef_i``."""
        group = torch.arange(self.num_experts, device=self.up_coef.device) // self.group_size
        gate = torch.matmul(self.gate_basis[group], self.gate_coef)
        up = torch.matmul(self.up_basis[group], self.up_coef)
        return gate, up

    def conversion_error(self, moe: nn.Module) -> Dict[str, Tensor]:
        """Relative Frobenius error against ``moe``'s operators, per operator, over all experts:
        ``{"gate": ||W_gate - U C||_F / ||W_gate||_F, "up": ...}`` (float64 0-d tensors). After
        :meth:`from_moe` each is ``sqrt(sum of the discarded sigma^2 / sum of all sigma^2)`` over the groups."""
        with torch.no_grad():
            gate, up = self.expert_weights()
            out: Dict[str, Tensor] = {}
            for name, approx, exact in (("gate", gate, moe.gate_proj), ("up", up, moe.up_proj)):
                exact64 = exact.detach().double()
                out[name] = torch.linalg.norm(approx.double() - exact64) / torch.linalg.norm(exact64)
            return out

    @staticmethod
    def factorize(weight: Tensor, group_size: int, rank: int) -> Tuple[Tensor, Tensor]:
        """Optimal rank-``rank`` factorisation of each group's horizontally stacked weights.

        ``weight [E, d, F]``; per group ``M_g = [W_1 .. W_gs]`` (``[d, gs*F]``) ``= U S V^T`` (float64 SVD).
        Keeps the ``rank`` largest singular triplets (Eckart-Young: least Frobenius error of any rank-``rank``
        approximation; exact when ``rank >= min(d, gs*F)``) and splits S evenly between the factors:
        ``basis = U_r S_r^{1/2}`` ``[G, d, rank]``, ``coef = S_r^{1/2} V_r^T`` cut back into the group's
        experts, ``[E, rank, F]``. Both in ``weight``'s dtype.
        """
        E, d, f = weight.shape
        G = E // group_size
        stacked = weight.detach().double().reshape(G, group_size, d, f).permute(0, 2, 1, 3)
        stacked = stacked.reshape(G, d, group_size * f)
        U, S, Vh = torch.linalg.svd(stacked, full_matrices=False)
        root = S[:, :rank].sqrt()
        basis = U[:, :, :rank] * root.unsqueeze(1)
        coef = root.unsqueeze(-1) * Vh[:, :rank, :]  # [G, rank, gs*F]
        coef = coef.reshape(G, rank, group_size, f).permute(0, 2, 1, 3).reshape(E, rank, f)
        return basis.to(weight.dtype), coef.to(weight.dtype)

    @classmethod
    def from_moe(cls, moe: nn.Module, group_size: int, rank: Optional[int] = None) -> "MoLE":
        """Convert a trained SwiGLU :class:`~torchmoe.nn.MoE` into a MoLE.

        For each group of ``group_size`` consecutive experts and for the up and the gate operator, the
        group's weights are stacked horizontally (``[d_model, group_size * d_ff]``) and factored by a
        truncated SVD (:meth:`factorize`): exact when ``rank >= min(d_model, group_size * d_ff)``, otherwise
        the least Frobenius error of any rank-``rank`` factorisation. ``rank=None`` means that full rank; a
        larger rank is capped to it (extra latent dimensions could only be zero). The router (a deep copy:
        same type, configuration, weights and expert bias) and ``down_proj`` are taken over unchanged, as
        are ``k``, the capacity factor, ``min_capacity`` and the aux-loss weights.
        """
        if getattr(moe, "activation", "swiglu") != "swiglu" or getattr(moe, "gate_proj", None) is None:
            raise ValueError("MoLE.from_moe: needs a SwiGLU MoE (with gate_proj, up_proj, down_proj)")
        E, d_model, d_ff = moe.up_proj.shape
        if group_size <= 0 or E % group_size != 0:
            raise ValueError(f"MoLE.from_moe: group_size must divide num_experts={E}, got {group_size}")
        full = min(d_model, group_size * d_ff)
        r = full if rank is None else min(int(rank), full)
        if r <= 0:
            raise ValueError(f"MoLE.from_moe: rank must be positive, got {rank}")

        mole = cls(
            d_model,
            d_ff,
            E,
            group_size,
            r,
            k=moe.k,
            capacity_factor=moe.capacity_factor,
            min_capacity=int(getattr(moe, "min_capacity", 0)),
            score_func=str(getattr(moe, "score_func", "softmax")),
            aux_loss_weight=float(getattr(moe, "aux_loss_weight", 1e-2)),
            z_loss_weight=float(getattr(moe, "z_loss_weight", 1e-3)),
            device=moe.up_proj.device,
            dtype=moe.up_proj.dtype,
        )
        mole.router = copy.deepcopy(moe.router)
        with torch.no_grad():
            up_basis, up_coef = cls.factorize(moe.up_proj, group_size, r)
            gate_basis, gate_coef = cls.factorize(moe.gate_proj, group_size, r)
            mole.up_basis.copy_(up_basis)
            mole.up_coef.copy_(up_coef)
            mole.gate_basis.copy_(gate_basis)
            mole.gate_coef.copy_(gate_coef)
            mole.down_proj.copy_(moe.down_proj.detach())
        mole.train(moe.training)
        return mole

    def extra_repr(self) -> str:
        s = (
            f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, "
            f"group_size={self.group_size}, rank={self.rank}, k={self.k}, capacity_factor={self.capacity_factor}"
        )
        if self.min_capacity:
            s += f", min_capacity={self.min_capacity}"
        s += f", aux_loss_weight={self.aux_loss_weight}, z_loss_weight={self.z_loss_weight}"
        return s
