"""Typed functional wrappers around torch.ops.torchmoe.*.

Every wrapper is a thin call into the compiled op (no Python work on the hot path) and is
TorchScript-compatible, so modules that use them can be scripted. Semantics: DESIGN.md.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor


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
    """Select the top-k experts of every token and compute their gate weights.

    Args:
        logits: router logits ``[..., E]`` (float16, bfloat16, float32 or float64). Arithmetic is done in
            float32 (float64 for float64 logits).
        k: experts per token, ``0 < k <= E``.
        score_func: ``"softmax"`` (over all E) or ``"sigmoid"``.
        renormalize: divide the k selected scores by their sum. For softmax this equals a softmax over
            the k selected logits (the scatter-softmax of the seed notebooks).
        expert_bias: optional float32 ``[E]`` added to the scores for *selection only* (aux-loss-free
            load balancing); it never enters the weights and gets no gradient.
        num_expert_groups / topk_expert_groups: group-limited routing (DeepSeek-V3): E is split into
            ``num_expert_groups`` equal groups, each scored by the sum of its two best selection scores, and
            only the best ``topk_expert_groups`` groups are eligible.
        scale: multiplies the final weights.

    Returns:
        ``(weights, indices)``: ``weights [..., k]`` in the dtype of ``logits`` and ``indices [..., k]``
        int64, ordered by descending selection score, ties to the lower expert index. Differentiable
        w.r.t. ``logits`` (once: a second differentiation raises).

    Raises:
        RuntimeError: with a message naming the argument (``torchmoe::topk_gating: argument 'k' ...``) for a
            non-floating ``logits``, ``k`` outside ``[1, E]`` (or above the experts of the eligible groups), an
            unknown ``score_func``, an ``expert_bias`` that is not float32 ``[E]`` on the logits' device,
            ``E`` not divisible by ``num_expert_groups`` or ``topk_expert_groups`` outside
            ``[1, num_expert_groups]``.

    Example::

        >>> weights, experts = torchmoe.topk_gating(torch.randn(16, 8), k=2)   # [16, 2] float32, [16, 2] int64
    """
    return torch.ops.torchmoe.topk_gating(
        logits, k, score_func, renormalize, expert_bias, num_expert_groups, topk_expert_groups, scale
    )


def router_logits(x: Tensor, weight: Tensor) -> Tensor:
    """The router's logits ``x @ weight.T`` in float32, with each operand read in its own dtype.

    Args:
        x: tokens ``[..., d_model]``, float16, bfloat16, float32 or float64.
        weight: the router weight ``[E, d_model]``, of any of those dtypes (a bfloat16 model keeps its bfloat16
            router weight: no float32 copy is made or kept).

    Returns:
        ``logits [..., E]``: float32 (float64 when an operand is float64). Each logit is the float32 sum of the exact
        products ``x[..., i] * weight[e, i]``, in a fixed order that depends on neither the number of tokens nor the
        thread count (a token's logits are the same alone or in a batch; a GEMM's are not). Equal to
        ``F.linear(x.float(), weight.float())`` up to float32 rounding. Differentiable w.r.t. both, twice.

    Raises:
        RuntimeError: naming the argument, for a non-floating operand, a ``weight`` that is not 2-D with
            ``d_model = x.shape[-1]`` columns, or operands on different devices.

    Example::

        >>> logits = torchmoe.router_logits(torch.randn(4, 64, dtype=torch.bfloat16), torch.randn(8, 64))  # [4, 8]
    """
    return torch.ops.torchmoe.router_logits(x, weight)


def route_plan(
    indices: Tensor, num_experts: int, capacity: int = -1, priority: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Give every (token, choice) a row in its expert's buffer.

    Args:
        indices: expert ids ``[T, k]`` or ``[G, T, k]`` (G independent token groups), integer, in ``[0, E)``.
        num_experts: E.
        capacity: rows per expert and group; ``-1`` for dropless routing.
        priority: optional ``[T]`` or ``[T, k]`` (with the group dim if any); higher goes first within a
            choice rank.

    Queue order inside an expert: choice rank first (all first choices before any second choice),
    then descending ``priority``, then token index.

    Returns:
        ``(dest, counts)``. With ``capacity >= 0``, ``dest = (e * G + g) * capacity + pos`` for kept slots
        and ``-1`` for dropped ones (expert buffer ``[E, G * capacity, d]``). Dropless: ``dest`` indexes
        rows ordered by expert, then group, then queue position. ``counts`` is int64 ``[E]`` (``[G, E]``
        with groups): tokens routed to each expert before dropping. ``dest`` is int64 with the shape of
        ``indices``. Deterministic: the same on every run, thread count and device. Not differentiable.

    Raises:
        RuntimeError: naming the argument, for ``indices`` that are not an integer ``[T, k]`` / ``[G, T, k]``
            tensor or hold ids outside ``[0, num_experts)``, ``num_experts <= 0``, ``capacity < -1``, or a
            ``priority`` of the wrong shape, dtype or device.
    """
    return torch.ops.torchmoe.route_plan(indices, num_experts, capacity, priority)


def dispatch(x: Tensor, dest: Tensor, num_rows: int) -> Tensor:
    """Copy token rows into expert buffer rows: ``out[dest[n, j]] = x[n]``, unfilled rows zero.

    Args:
        x: token rows ``[N, d]``, float16, bfloat16, float32 or float64.
        dest: int64 ``[N, k]`` on ``x``'s device (a plan's ``dest`` reshaped to ``[N, k]``; ``-1`` = dropped),
            values in ``[-1, num_rows)``.
        num_rows: rows of the output buffer (``E * capacity``, or ``N * k`` dropless).

    Returns:
        ``[num_rows, d]`` in ``x``'s dtype. Backward: ``dx[n] = sum_j dout[dest[n, j]]`` (float32 accumulation).

    Raises:
        RuntimeError: naming the argument, for a non-2-D or non-floating ``x``, a ``dest`` that is not int64
            ``[N, k]`` on ``x``'s device or holds a value outside ``[-1, num_rows)`` (on CUDA a device
            assertion), or ``num_rows < 0``.
    """
    return torch.ops.torchmoe.dispatch(x, dest, num_rows)


def combine(expert_out: Tensor, dest: Tensor, weights: Tensor) -> Tensor:
    """Weighted gather back to tokens: ``y[n] = sum_j weights[n, j] * expert_out[dest[n, j]]``.

    Args:
        expert_out: ``[R, d]``, float16, bfloat16, float32 or float64.
        dest: int64 ``[N, k]``, values in ``[-1, R)``; dropped slots (``-1``) contribute nothing.
        weights: floating ``[N, k]`` (may be float32 with a bf16/fp16 ``expert_out``).

    Returns:
        ``y [N, d]`` in ``expert_out``'s dtype, accumulated in float32 (float64 for float64). Differentiable
        w.r.t. ``expert_out`` and ``weights``.

    Raises:
        RuntimeError: naming the argument, for wrong ranks or dtypes, ``weights`` not ``[N, k]`` like ``dest``,
            tensors on different devices, or a ``dest`` value outside ``[-1, R)``.
    """
    return torch.ops.torchmoe.combine(expert_out, dest, weights)


def grouped_mm(x: Tensor, weight: Tensor, counts: Tensor) -> Tensor:
    """One matmul per expert over rows grouped by expert: ``out[rows of e] = x[rows of e] @ weight[e]``.

    Args:
        x: ``[N, d_in]``, floating, rows of expert 0 first, then expert 1, ... (a dropless plan's layout).
        weight: ``[E, d_in, d_out]`` with ``x``'s dtype and device. On the CPU a view with one unit-stride
            matrix dim (e.g. ``w.transpose(1, 2)``) is read in place, without a copy.
        counts: int64 ``[E]``, non-negative, summing to N (on CPU read on the host; on CUDA never synced).

    Returns:
        ``[N, d_out]`` in ``x``'s dtype. Differentiable w.r.t. ``x`` and ``weight`` (a transposed weight view's
        gradient comes back in the layout of the tensor it views).

    Raises:
        RuntimeError: naming the argument, for wrong ranks, a ``weight`` whose dtype, device or ``d_in`` differ
            from ``x``'s, ``counts`` that is not int64 ``[E]``, has a negative entry or does not sum to N
            (on CUDA: a device assertion).
    """
    return torch.ops.torchmoe.grouped_mm(x, weight, counts)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` elementwise, the SwiGLU expert's activation, in one pass over memory.

    ``gate`` and ``up`` have the same shape and floating dtype. The same operations and rounding steps as
    ``F.silu(gate) * up`` and its autograd (16-bit dtypes round ``silu(gate)`` before the product, as the
    composite does), with fewer passes over memory and no intermediate tensor; results do not depend on
    the thread count. Differentiable w.r.t. both. Returns a tensor of the inputs' shape and dtype.

    Raises:
        RuntimeError: naming the argument, when ``gate`` and ``up`` differ in shape, dtype or device, or are
            not floating.
    """
    return torch.ops.torchmoe.swiglu(gate, up)


def capacity(
    num_tokens: int, num_experts: int, k: int, capacity_factor: float, min_capacity: int = 0
) -> int:
    """Expert capacity: ``max(min_capacity, floor(k * capacity_factor * num_tokens / num_experts))``,
    at most ``num_tokens`` (an expert never holds more than every token once).

    Returns:
        The rows per expert buffer, a Python int (``route_plan``'s ``capacity`` argument).

    Raises:
        ValueError: if ``num_experts <= 0`` or ``capacity_factor < 0``.

    Example::

        >>> torchmoe.capacity(4096, 64, k=2, capacity_factor=1.25)
        160
    """
    if num_experts <= 0:
        raise ValueError(f"capacity: num_experts must be positive, got {num_experts}")
    if capacity_factor < 0:
        raise ValueError(f"capacity: capacity_factor must be >= 0, got {capacity_factor}")
    cap = int(math.floor(k * capacity_factor * num_tokens / num_experts))
    cap = max(min_capacity, cap)
    return min(cap, num_tokens)


def cpu_cache_bytes() -> int:
    """Bytes held by the CPU kernels' cache of large freed outputs.

    On CPU, torchmoe's op outputs of 1 MiB or more come from blocks kept after earlier outputs were freed:
    glibc hands out large blocks as fresh pages and unmaps them on free, so without the cache every
    training step would pay a page fault per 4 KiB of every large output. At most
    ``TORCHMOE_CPU_CACHE_MB`` MiB (environment variable, read once; default 4096, 0 disables) of free
    blocks are kept.
    """
    return torch.ops.torchmoe._cpu_cache_bytes()


def empty_cpu_cache() -> int:
    """Frees the blocks held by the CPU output cache (see :func:`cpu_cache_bytes`); returns the bytes freed.
    Outputs still alive are unaffected and return to the cache when freed."""
    return torch.ops.torchmoe._cpu_cache_release()
