"""Mixture of Latent Experts (Liu et al., 2025, arXiv:2503.23100; seed 001)."""
import copy
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import capacity, combine, dispatch, grouped_mm, route_plan
from .router import TopkRouter


class MoLE(nn.Module):
    r"""Sparse SwiGLU mixture of experts whose up and gate operators share a latent basis per group.

    The E experts form ``G = E / group_size`` groups of consecutive experts. Expert ``i`` of group ``g``
    has up and gate weights factored through the group's basis:

    .. math::
        W^{up}_i = U^{up}_g C^{up}_i,\quad W^{gate}_i = U^{gate}_g C^{gate}_i,\qquad
        E_i(x) = \big(\mathrm{silu}(x W^{gate}_i) \odot x W^{up}_i\big) W^{down}_i

    with bases ``U [d_model, r]`` shared by the group, coefficients ``C_i [r, d_ff]`` per expert and the
    down operator ``W^{down}_i [d_ff, d_model]`` kept whole. The forward projects every token into each
    group's latent space once (``x @ U``, ``[N, G, r]`` for up and for gate, one GEMM each), then routes the
    latent vectors, not the ``d_model``-sized inputs, to the experts: a top-k router, ``route_plan``,
    ``dispatch`` of the latent rows, per-expert ``C_i`` (``grouped_mm`` dropless, or a batched matmul on the
    capacity layout), SwiGLU, ``W^{down}_i``, and ``combine`` back to the tokens.

    Args:
        d_model, d_ff, num_experts: as in :class:`~torchmoe.nn.MoE`.
        group_size: experts per shared basis; must divide ``num_experts``.
        rank: r, the latent size of each basis.
        k: experts per token.
        capacity_factor: ``None`` for dropless routing, else each expert takes at most
            ``torchmoe.capacity(N, E, k, capacity_factor, min_capacity)`` tokens; dropped (token, choice)
            pairs contribute zero.
        min_capacity: lower bound of the capacity.
        score_func, renormalize: passed to the :class:`~torchmoe.nn.TopkRouter`.
        aux_loss_coef: weight of the Switch load-balancing loss in :attr:`aux_loss`.
        z_loss_coef: weight of the router z-loss in :attr:`aux_loss`.

    Parameters: ``router`` (a :class:`~torchmoe.nn.TopkRouter`), ``up_basis``, ``gate_basis``
    ``[G, d_model, r]``, ``up_coef``, ``gate_coef`` ``[E, r, d_ff]``, ``down_proj [E, d_ff, d_model]``, all
    used as ``x @ W``. A fresh MoLE has orthonormal basis columns and coefficients scaled so that its
    outputs have the scale of a dense ``N(0, 1/d_model)`` init; usually one builds it from a trained MoE
    with :meth:`from_moe`.

    Shape: input ``[..., d_model]``, output ``[..., d_model]``. After each forward: :attr:`aux_loss`,
    :attr:`expert_counts` (tokens routed to each expert, int64 ``[E]``) and :attr:`dropped_tokens`
    (dropped (token, choice) pairs, int64 scalar).
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
        score_func: str = "softmax",
        renormalize: bool = True,
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.0,
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
            raise ValueError(f"MoLE: capacity_factor must be >= 0 or None, got {capacity_factor}")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_ff = d_ff
        self.num_experts = num_experts
        self.group_size = group_size
        self.num_groups = num_experts // group_size
        self.rank = rank
        self.k = k
        self.capacity_factor = capacity_factor
        self.min_capacity = min_capacity
        self.activation = "swiglu"
        self.aux_loss_coef = float(aux_loss_coef)
        self.z_loss_coef = float(z_loss_coef)

        self.router = TopkRouter(d_model, num_experts, k, score_func=score_func, renormalize=renormalize)
        if device is not None or dtype is not None:
            self.router.to(device=device)
        G, E = self.num_groups, num_experts
        self.up_basis = nn.Parameter(torch.empty(G, d_model, rank, **factory))
        self.gate_basis = nn.Parameter(torch.empty(G, d_model, rank, **factory))
        self.up_coef = nn.Parameter(torch.empty(E, rank, d_ff, **factory))
        self.gate_coef = nn.Parameter(torch.empty(E, rank, d_ff, **factory))
        self.down_proj = nn.Parameter(torch.empty(E, d_ff, d_model, **factory))
        self.reset_parameters()

        self.aux_loss = torch.zeros(())
        self.expert_counts = torch.zeros(num_experts, dtype=torch.long)
        self.dropped_tokens = torch.zeros((), dtype=torch.long)

    def reset_parameters(self) -> None:
        """Orthonormal basis columns and coefficients N(0, 1/rank), so that ``x @ U @ C`` has the output
        scale of a dense ``N(0, 1/d_model)`` weight; ``down_proj`` N(0, 1/d_ff)."""
        with torch.no_grad():
            for basis in (self.up_basis, self.gate_basis):
                tmp = torch.empty(basis.shape, dtype=torch.float32, device=basis.device).normal_()
                q = torch.linalg.qr(tmp).Q if self.rank <= self.d_model else tmp / math.sqrt(self.d_model)
                basis.copy_(q)
            self.up_coef.normal_(0.0, 1.0 / math.sqrt(self.rank))
            self.gate_coef.normal_(0.0, 1.0 / math.sqrt(self.rank))
            self.down_proj.normal_(0.0, 1.0 / math.sqrt(self.d_ff))

    # ----------------------------------------------------------------------------------------------
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
        cf = self.capacity_factor
        if cf is not None:
            cap = capacity(n, E, k, cf, self.min_capacity)
        dest, counts = route_plan(indices, E, cap)
        rows = n * k if cap < 0 else E * cap

        # Latent row (n, g) feeds the choices of token n whose expert lies in group g; other slots -1.
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
            h = F.silu(grouped_mm(gate_in, self.gate_coef, counts)) * grouped_mm(up_in, self.up_coef, counts)
            expert_out = grouped_mm(h, self.down_proj, counts)
        else:
            up = torch.bmm(up_in.view(E, cap, self.rank), self.up_coef)
            gate = torch.bmm(gate_in.view(E, cap, self.rank), self.gate_coef)
            expert_out = torch.bmm(F.silu(gate) * up, self.down_proj).view(rows, self.d_model)
        y = combine(expert_out, dest, weights)

        self._set_aux(logits, counts, dest, n)
        return y.reshape(x.shape)

    def _set_aux(self, logits: Tensor, counts: Tensor, dest: Tensor, n: int) -> None:
        self.expert_counts = counts
        self.dropped_tokens = (dest < 0).sum()
        aux = logits.new_zeros(())
        if n > 0:
            if self.aux_loss_coef != 0.0:
                probs = torch.softmax(logits.float(), dim=-1)
                frac = counts.to(probs.dtype) / float(n * self.k)
                aux = aux + self.aux_loss_coef * self.num_experts * (frac * probs.mean(0)).sum()
            if self.z_loss_coef != 0.0:
                aux = aux + self.z_loss_coef * torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
        self.aux_loss = aux

    # ----------------------------------------------------------------------------------------------
    def expert_weights(self) -> Tuple[Tensor, Tensor]:
        """The dense expert operators this MoLE computes: ``(gate, up)``, each ``[E, d_model, d_ff]``,
        ``W_i = basis_{group(i)} @ coef_i``."""
        group = torch.arange(self.num_experts, device=self.up_coef.device) // self.group_size
        gate = torch.matmul(self.gate_basis[group], self.gate_coef)
        up = torch.matmul(self.up_basis[group], self.up_coef)
        return gate, up

    def conversion_error(self, moe: nn.Module) -> Dict[str, Tensor]:
        """Relative Frobenius error of this MoLE's operators against ``moe``'s, per operator:
        ``{"up": ||W_up - U C||_F / ||W_up||_F, "gate": ...}`` over all experts (float64 scalars)."""
        with torch.no_grad():
            gate, up = self.expert_weights()
            out: Dict[str, Tensor] = {}
            for name, approx, exact in (("gate", gate, moe.gate_proj), ("up", up, moe.up_proj)):
                exact64 = exact.detach().double()
                out[name] = torch.linalg.norm(approx.double() - exact64) / torch.linalg.norm(exact64)
            return out

    @staticmethod
    def _factor(weight: Tensor, group_size: int, rank: int) -> Tuple[Tensor, Tensor]:
        """Optimal rank-``rank`` factorisation of each group's horizontally stacked weights.

        ``weight [E, d, F]`` -> per group ``M_g = [W_1 .. W_gs] [d, gs*F] = U S V^T``; keeps the top ``rank``
        singular triplets (Eckart-Young: least Frobenius error) and splits S evenly,
        ``basis = U_r S_r^{1/2}``, ``coef = S_r^{1/2} V_r^T`` cut back into the group's experts.
        """
        E, d, f = weight.shape
        G = E // group_size
        stacked = weight.detach().double().reshape(G, group_size, d, f).permute(0, 2, 1, 3)
        stacked = stacked.reshape(G, d, group_size * f)
        U, S, Vh = torch.linalg.svd(stacked, full_matrices=False)
        root = S[:, :rank].sqrt()
        basis = U[:, :, :rank] * root.unsqueeze(1)  # [G, d, r]
        coef = root.unsqueeze(-1) * Vh[:, :rank, :]  # [G, r, gs*F]
        coef = coef.reshape(G, rank, group_size, f).permute(0, 2, 1, 3).reshape(E, rank, f)
        return basis.to(weight.dtype), coef.to(weight.dtype)

    @classmethod
    def from_moe(cls, moe: nn.Module, group_size: int, rank: Optional[int] = None) -> "MoLE":
        """Convert a trained SwiGLU :class:`~torchmoe.nn.MoE` into a MoLE.

        For each group of ``group_size`` consecutive experts and for the up and the gate operator, the
        group's weights are stacked horizontally (``[d_model, group_size * d_ff]``) and factored by a
        truncated SVD (see :meth:`_factor`): the result is exact when
        ``rank >= min(d_model, group_size * d_ff)`` and otherwise has the least Frobenius error of any
        rank-``rank`` factorisation. ``rank=None`` means that full rank; a larger rank is capped to it.
        The router (a copy, same configuration) and ``down_proj`` are taken over unchanged, as are ``k``,
        the capacity factor and the aux-loss coefficients where ``moe`` has them.
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
            aux_loss_coef=float(getattr(moe, "aux_loss_coef", 0.01)),
            z_loss_coef=float(getattr(moe, "z_loss_coef", 0.0)),
            device=moe.up_proj.device,
            dtype=moe.up_proj.dtype,
        )
        mole.router = copy.deepcopy(moe.router)
        with torch.no_grad():
            up_basis, up_coef = cls._factor(moe.up_proj, group_size, r)
            gate_basis, gate_coef = cls._factor(moe.gate_proj, group_size, r)
            mole.up_basis.copy_(up_basis)
            mole.up_coef.copy_(up_coef)
            mole.gate_basis.copy_(gate_basis)
            mole.gate_coef.copy_(gate_coef)
            mole.down_proj.copy_(moe.down_proj.detach())
        mole.train(moe.training)
        return mole

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, "
            f"group_size={self.group_size}, rank={self.rank}, k={self.k}, "
            f"capacity_factor={self.capacity_factor}"
        )
