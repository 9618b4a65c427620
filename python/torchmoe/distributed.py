"""Expert parallelism on torch.distributed: experts sharded over the ranks of a process group, tokens exchanged
with all-to-all.

- :func:`all_to_all` — differentiable ``torch.distributed.all_to_all_single`` with uneven splits.
- :class:`ExpertParallelMoE` — the expert-parallel form of :class:`torchmoe.nn.MoE` / :class:`torchmoe.nn.SwitchMoE`:
  rank ``r`` of ``W`` holds experts ``[r*E/W, (r+1)*E/W)``, the router is replicated.
- :func:`shard_experts` — converts every MoE layer of a model in place.
- :func:`expert_parameters`, :func:`allreduce_gradients` — the data-parallel side of training.

Transport is torch.distributed's (gloo on CPU, NCCL on GPUs); nothing here talks to the network itself. Without an
initialised process group (and ``group=None``) everything runs as a group of one.
"""
import atexit
import copy
import math
import operator
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from . import ops
from .nn.moe import _ACTIVATIONS, MoE, SharedExpert, pack_kept_rows
from .nn.quantized import _QUANTIZED_CLASS, _QuantizedExperts
from .quantization import QuantizedWeight

__all__ = ["all_to_all", "ExpertParallelMoE", "QuantizedExpertParallelMoE", "shard_experts", "expert_parameters", "allreduce_gradients",
           "clip_grad_norm_", "fully_shard_expert_parallel"]

# dtype codes for the per-forward agreement check (ranks must exchange rows of one dtype)
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# A finished collective's tensors are released by the backend's worker thread (gloo's runLoop), and releasing a
# tensor that Python has seen takes the GIL. A script that exits within milliseconds of its last collective can
# reach interpreter finalization while a worker still waits for the GIL; CPython then ends that thread inside a
# destructor and the process aborts ("terminate called without an active exception", seen in about 1 of 4 runs
# of a short script on 2 cores). Giving the GIL away for a moment at exit lets the workers finish first.
_EXIT_GRACE_S = 0.2
_used_process_group = False


def _note_process_group_use() -> None:
    global _used_process_group
    _used_process_group = True


def _let_collective_workers_finish() -> None:
    if _used_process_group:
        time.sleep(_EXIT_GRACE_S)


atexit.register(_let_collective_workers_finish)


def _world(group) -> Tuple[int, int]:
    """(world size, rank) of ``group``; (1, 0) when torch.distributed is not initialised and no group is given."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError("torchmoe.distributed: group was given but torch.distributed is not initialized")
        return 1, 0
    _note_process_group_use()
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("torchmoe.distributed: this process is not a member of group")
    return dist.get_world_size(group), rank


def _host_collective_device(group) -> torch.device:
    # Small host-side metadata goes through the group's CPU backend when it has one (gloo, or a mixed
    # "cpu:gloo,cuda:nccl" group): no device-to-host copy. An NCCL-only group needs a CUDA tensor.
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _all_gather_values(values: Sequence[float], group) -> List[List[float]]:
    """Every rank's ``values`` (float64, so ints up to 2**53 are exact), in group rank order."""
    world, _ = _world(group)
    if world == 1:
        return [list(values)]
    mine = torch.tensor(list(values), dtype=torch.float64, device=_host_collective_device(group))
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    return torch.stack(gathered).tolist()


_MESHES: Dict[Tuple[int, str], DeviceMesh] = {}  # (id of a process group, device type) -> its 1-D mesh


def _resolve_mesh(mesh, group, device_type: str, owner: str) -> Tuple[Optional[DeviceMesh], object]:
    """(1-D mesh, its process group) from ``mesh=`` or ``group=``; (None, None) without torch.distributed."""
    if isinstance(mesh, dist.ProcessGroup) and group is None:  # the former positional ``group``
        mesh, group = None, mesh
    if isinstance(group, DeviceMesh) and mesh is None:
        mesh, group = group, None
    if mesh is not None and group is not None:
        raise ValueError(f"{owner}: pass mesh or group, not both")
    if mesh is not None:
        if not isinstance(mesh, DeviceMesh):
            raise TypeError(f"{owner}: mesh must be a torch.distributed.device_mesh.DeviceMesh, got "
                            f"{type(mesh).__name__}")
        if mesh.ndim != 1:
            raise ValueError(f"{owner}: mesh must be 1-D (the expert-parallel dim), got a {mesh.ndim}-D mesh with "
                             f"dims {mesh.mesh_dim_names}; pass e.g. mesh['ep']")
        if mesh.device_type != device_type:
            raise ValueError(f"{owner}: mesh is a {mesh.device_type!r} mesh, the expert weights are on "
                             f"{device_type!r}")
        return mesh, mesh.get_group()
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError(f"{owner}: group was given but torch.distributed is not initialized")
        return None, None
    if group is None:
        group = dist.group.WORLD
    if dist.get_rank(group) < 0:
        raise ValueError(f"{owner}: this process is not a member of group")
    key = (id(group), device_type)
    if key not in _MESHES:
        _MESHES[key] = DeviceMesh.from_group(group, device_type)
    return _MESHES[key], group


def _check_same_groups(group, owner: str) -> None:
    """Every process says which global ranks its expert-parallel group holds (an all-gather over the default
    group); a rank that a peer counts in its group but that names another group raises on every rank, before
    anything is sent over the (disagreeing) groups themselves, which would hang."""
    world = dist.get_world_size()
    if world == 1:
        return
    members = dist.get_process_group_ranks(group)
    gathered = _all_gather_values([len(members)] + members + [-1] * (world - len(members)), None)
    groups = [[int(v) for v in row[1 : 1 + int(row[0])]] for row in gathered]
    for rank, ranks in enumerate(groups):
        for peer in ranks:
            if not 0 <= peer < world or groups[peer] != ranks or rank not in ranks:
                raise ValueError(f"{owner}: the ranks disagree on the expert-parallel mesh/group: rank {rank} shards "
                                 f"its experts over ranks {ranks}, rank {peer} over "
                                 f"{groups[peer] if 0 <= peer < world else '?'}; every rank must pass the same mesh "
                                 f"dim (e.g. mesh['ep'] on every rank)")


def _local(t):
    """The local shard of a DTensor; anything else as is."""
    return t.to_local() if isinstance(t, DTensor) else t


def _check_splits(name: str, splits, world: int) -> List[int]:
    given = splits.tolist() if isinstance(splits, Tensor) else splits
    try:
        splits = [operator.index(s) for s in given]  # ints, numpy ints, 0-d int tensors
    except TypeError:
        splits = None
    if splits is None or len(splits) != world or any(s < 0 for s in splits):
        raise ValueError(f"all_to_all: {name} must be {world} non-negative ints (one per rank), got {given!r}")
    return splits


def _exchange(x: Tensor, output_splits: List[int], input_splits: List[int], group) -> Tensor:
    x = x.contiguous()  # gloo sends a non-contiguous tensor's storage as is and the other ranks wait forever
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, output_splits: List[int], input_splits: List[int], group) -> Tensor:
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        return _exchange(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        output_splits, input_splits = ctx.splits
        return _exchange(grad, input_splits, output_splits, ctx.group), None, None, None


class _PendingExchange:
    """The handle of an exchange in flight: :meth:`wait` before reading its output."""

    def __init__(self) -> None:
        self.work = None

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None


class _AllToAllAsync(torch.autograd.Function):
    # Forward returns the output buffer while the exchange is still in flight (pending.wait() before reading
    # it); backward is the reverse exchange, synchronous.
    @staticmethod
    def forward(ctx, x: Tensor, output_splits: List[int], input_splits: List[int], group, pending) -> Tensor:
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        x = x.contiguous()
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        pending.work = dist.all_to_all_single(out, x, output_splits, input_splits, group=group, async_op=True)
        pending.keep_alive = x  # the send buffer must outlive the exchange
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        output_splits, input_splits = ctx.splits
        return _exchange(grad, input_splits, output_splits, ctx.group), None, None, None, None


def _start_all_to_all(x: Tensor, output_splits: List[int], input_splits: List[int], group):
    """The exchange of :func:`all_to_all` (splits already checked, world > 1) issued asynchronously:
    (output, pending); the output is valid after ``pending.wait()``."""
    pending = _PendingExchange()
    return _AllToAllAsync.apply(x, output_splits, input_splits, group, pending), pending


def all_to_all(x: Tensor, output_splits: Sequence[int], input_splits: Sequence[int], group=None) -> Tensor:
    """Differentiable all-to-all of rows: rank ``r`` sends rows ``x[sum(input_splits[:s]) :][: input_splits[s]]``
    to rank ``s`` and receives ``output_splits[s]`` rows from each rank ``s``, concatenated in rank order.

    Args:
        x: ``[N, ...]`` with ``N == sum(input_splits)``; any dtype torch.distributed's backend carries. It is made
            contiguous before sending.
        output_splits, input_splits: one non-negative int per rank of ``group`` (Python or numpy ints, or an int
            tensor, read on the host).
        group: process group, ``None`` for the default one.

    Returns ``[sum(output_splits), ...]`` on ``x.device``. The backward pass is the same exchange with the splits
    swapped. With a group of one, ``x`` is returned as is. The splits must agree between ranks (what rank ``r``
    sends to ``s`` is what ``s`` expects from ``r``): a mismatch is not detectable locally.
    """
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError("all_to_all: x must be a tensor with at least one dimension")
    world, _ = _world(group)
    output_splits = _check_splits("output_splits", output_splits, world)
    input_splits = _check_splits("input_splits", input_splits, world)
    if sum(input_splits) != x.shape[0]:
        raise ValueError(f"all_to_all: input_splits sum to {sum(input_splits)}, but x has {x.shape[0]} rows")
    if world == 1:
        if output_splits != input_splits:
            raise ValueError(f"all_to_all: with one rank output_splits must equal input_splits, got "
                             f"{output_splits} and {input_splits}")
        return x
    return _AllToAll.apply(x, output_splits, input_splits, group)


class ExpertParallelMoE(MoE):
    """:class:`torchmoe.nn.MoE` (or :class:`~torchmoe.nn.SwitchMoE`) with its experts sharded over a process group.

    Rank ``r`` of a group of ``W`` holds experts ``[r*E/W, (r+1)*E/W)`` under the same parameter names as
    :class:`MoE` (``gate_proj``, ``up_proj``, ``down_proj``: DTensors of the global shape ``[E, ...]``, placed
    ``Shard(0)`` on the mesh, ``E/W`` experts local; plain ``[E/W, ...]`` tensors without a process group); the
    router is replicated. Each
    rank routes its own tokens, sends every routed row to the rank that holds its expert
    (``torch.distributed.all_to_all_single``), runs its local experts on what it received, and sends the results
    back, where they are combined with the gate weights. ``E % W`` must be 0.

    Contract: on every rank, for that rank's tokens (any count, zero included), the output, the input gradient,
    the routing, :attr:`expert_counts`, :attr:`dropped_tokens` and :attr:`aux_loss` are those of the unsharded
    layer applied to the same tokens; the capacity comes from the local token count, as there. A local expert's
    weight gradient is the sum over ranks of the unsharded layer's gradients on each rank's tokens (the exchange's
    backward brings it); the router's gradient is local (all-reduce it: :func:`allreduce_gradients`).

    Construction is collective: the ranks check with a small all-gather that they agree on the layer's shape
    (E, d_model, d_ff, k, activation, capacity) and that ``W`` divides E, and raise the same error on every rank
    otherwise. Every forward is collective too: all ranks of the group must call it, and an input one rank
    rejects (wrong last dim, dtype or device) or an exception in one rank's routing raises on every rank instead
    of leaving the others waiting. Backward is collective as well: every rank must backpropagate through each
    forward it ran (a rank whose loss does not use the layer's output would leave the others waiting).

    Modes:

    - ``pad_to_capacity=False`` (default): only routed rows travel (dropless, or the rows kept under the
      capacity). The per-expert row counts are exchanged first (one small all-to-all, one host copy of the
      splits: free on CPU, one device-to-host sync per layer on CUDA).
    - ``pad_to_capacity=True`` (capacity mode only): every rank sends ``[E, C, d_model]`` with equal splits, ``C``
      the largest local capacity in the group (tokens are still dropped at the local capacity); no count
      exchange, so shapes depend only on shapes: the static form for CUDA graphs. ``C`` comes from an all-gather
      of host ints, free of device syncs on a group with a CPU backend (``backend="cpu:gloo,cuda:nccl"``).

    Args:
        *args, **kwargs: those of :class:`MoE`; the full layer is built (same initialisation as ``MoE`` under the
            same seed) and each rank keeps its slice.
        group: the process group the experts are sharded over (``None``: the default group).
        pad_to_capacity: see Modes.

    Expert-bias balancing (``use_expert_bias=True``): call :meth:`update_expert_bias`, which sums the counts over
    the group first, so every replica's bias stays the same (``router.update_expert_bias(expert_counts)`` would use
    the local counts only).

    ``impl="reference"`` does not apply: the sharded layer always runs the fused ops.
    """

    def __init__(self, *args, group=None, pad_to_capacity: bool = False, mesh: Optional[DeviceMesh] = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._shard_(mesh, group, pad_to_capacity)

    @classmethod
    def from_moe(cls, moe: MoE, group=None, pad_to_capacity: bool = False, *,
                 mesh: Optional[DeviceMesh] = None) -> "ExpertParallelMoE":
        """This rank's expert-parallel form of a full layer: the local slice of its experts and a copy of its
        router. ``moe`` is left unchanged. Collective (see the class docstring): every rank of the group calls it,
        with the same layer (e.g. built from the same seed)."""
        if not isinstance(moe, MoE) or isinstance(moe, ExpertParallelMoE):
            raise TypeError(f"ExpertParallelMoE.from_moe: moe must be a torchmoe.nn.MoE or SwitchMoE, got "
                            f"{type(moe).__name__}")
        if isinstance(moe, _QuantizedExperts):
            raise TypeError(f"ExpertParallelMoE.from_moe: {type(moe).__name__} has quantized experts; shard the float "
                            f"layer first, then quantize it (torchmoe.nn.quantize_experts on the sharded model)")
        moe.aux_loss  # a deferred aux loss (a forward under no_grad) becomes an attribute like the others
        ep = cls.__new__(cls)
        nn.Module.__init__(ep)
        for name, value in vars(moe).items():
            if not name.startswith("_"):  # configuration and the last forward's statistics
                ep.__dict__[name] = value
        for name, module in moe.named_children():
            ep.add_module(name, copy.deepcopy(module))
        for name, buf in moe.named_buffers(recurse=False):
            ep.register_buffer(name, buf.clone(), persistent=name not in moe._non_persistent_buffers_set)
        for name, param in moe._parameters.items():  # in MoE's order, None (no gate_proj) included
            ep.register_parameter(name, param)  # sliced (and copied) by _shard_
        ep._shard_(mesh, group, pad_to_capacity)
        return ep

    def _shard_(self, mesh, group, pad_to_capacity: bool) -> None:
        owner = "ExpertParallelMoE"
        mesh, group = _resolve_mesh(mesh, group, self.up_proj.device.type, owner)
        if group is not None:
            _check_same_groups(group, owner)
        world, rank = _world(group)
        self.mesh = mesh
        self.group = group
        self.overlap_shared_expert = True
        self.world_size = world
        self.rank = rank
        self.pad_to_capacity = bool(pad_to_capacity)
        E = self.num_experts
        config = {
            "num_experts": E,
            "d_model": self.d_model,
            "d_ff": self.d_ff,
            "k": self.k,
            "activation": _ACTIVATIONS.index(self.activation),
            "capacity_factor": -1.0 if self.capacity_factor is None else self.capacity_factor,
            "min_capacity": self.min_capacity,
            "pad_to_capacity": int(self.pad_to_capacity),
            "shared_expert_d_ff": getattr(self, "shared_expert_d_ff", None) or 0,
            "shared_expert_gate": int(bool(getattr(self, "shared_expert_gate", False))),
        }
        gathered = _all_gather_values(list(config.values()), group)
        for i, name in enumerate(config):
            values = [row[i] for row in gathered]
            if any(v != values[0] for v in values):
                raise ValueError(f"ExpertParallelMoE: the ranks of the group disagree on {name}: {values} "
                                 f"(ranks 0..{world - 1}); every rank must build the same layer")
        if E % world != 0:
            raise ValueError(f"ExpertParallelMoE: num_experts={E} is not divisible by the group's world size {world}")
        if self.pad_to_capacity and self.capacity_factor is None:
            raise ValueError("ExpertParallelMoE: pad_to_capacity=True needs a capacity_factor (it pads the "
                             "capacity buffers; dropless routing has none)")
        self.num_local_experts = E // world
        self.expert_offset = rank * self.num_local_experts
        lo, hi = self.expert_offset, self.expert_offset + self.num_local_experts
        for name, param in list(self._parameters.items()):
            if param is None:
                continue
            if param.dim() == 0 or param.shape[0] != E:
                raise ValueError(f"ExpertParallelMoE: parameter {name} has shape {tuple(param.shape)}, expected a "
                                 f"first dim of num_experts={E}")
            shard = self._as_global_expert_tensor(param.detach()[lo:hi].clone())
            self._parameters[name] = nn.Parameter(shard, requires_grad=param.requires_grad)

    def _as_global_expert_tensor(self, shard: Tensor) -> Tensor:
        """This rank's ``[E/W, ...]`` slice as the global ``[E, ...]`` DTensor, ``Shard(0)`` over the mesh (no
        communication); the slice itself without a mesh."""
        if self.mesh is None:
            return shard
        shape = (self.num_experts,) + tuple(shard.shape[1:])
        return DTensor.from_local(shard, self.mesh, [Shard(0)], run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())

    def _weight(self) -> Tensor:
        return _local(self.up_proj)

    def _local_expert_weights(self) -> Tuple[Optional[Tensor], Tensor, Tensor]:
        return _local(self.gate_proj), _local(self.up_proj), _local(self.down_proj)

    # MoE's expert math on this rank's shards (the parameters are DTensors of the global shape).
    def _experts_batched(self, buf: Tensor) -> Tensor:
        gate_proj, up_proj, down_proj = self._local_expert_weights()
        if gate_proj is not None:
            h = ops.swiglu(torch.bmm(buf, gate_proj), torch.bmm(buf, up_proj))
        else:
            h = self._act(torch.bmm(buf, up_proj))
        return torch.bmm(h, down_proj)

    def _experts_grouped(self, rows: Tensor, counts: Tensor) -> Tensor:
        gate_proj, up_proj, down_proj = self._local_expert_weights()
        if gate_proj is not None:
            h = ops.swiglu(ops.grouped_mm(rows, gate_proj, counts), ops.grouped_mm(rows, up_proj, counts))
        else:
            h = self._act(ops.grouped_mm(rows, up_proj, counts))
        return ops.grouped_mm(h, down_proj, counts)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # An unsharded checkpoint (plain tensors of the global shape) loads into the shards: each rank keeps its
        # slice. A tensor of any other shape is refused by the default check (the sizes differ).
        for name, param in list(self._parameters.items()) + list(self._buffers.items()):
            value = state_dict.get(prefix + name)
            if isinstance(param, DTensor) and isinstance(value, Tensor) and not isinstance(value, DTensor) \
                    and value.shape == param.shape:
                lo = self.expert_offset
                state_dict[prefix + name] = DTensor.from_local(
                    value[lo : lo + self.num_local_experts].to(param.device), param.device_mesh, param.placements,
                    run_check=False, shape=param.shape, stride=param.stride())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _input_problem(self, x) -> str:
        """Why this rank cannot run ``x`` ('' when it can)."""
        w = self._weight()
        if not isinstance(x, Tensor):
            return f"x must be a tensor, got {type(x).__name__}"
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            return f"x must have shape [..., d_model={self.d_model}], got {tuple(x.shape)}"
        if x.dtype != w.dtype:
            return f"x has dtype {x.dtype}, the expert weights {w.dtype}"
        if x.device != w.device:
            return f"x is on {x.device}, the expert weights on {w.device}"
        return ""

    def _raise_on_problems(self, metas: List[List[float]], problem: str, error: Optional[BaseException]) -> None:
        # metas[s] = [ok, last dim, dtype code, ...] from rank s; the same decision on every rank.
        bad = [s for s, m in enumerate(metas) if not m[0]]
        if bad:
            if error is not None:
                raise error
            if problem:
                raise ValueError(f"ExpertParallelMoE (rank {self.rank}): {problem}; every rank of the group raises")
            dims = [int(metas[s][1]) for s in bad]
            raise ValueError(f"ExpertParallelMoE: rank(s) {bad} could not run their input (wrong shape, dtype or "
                             f"device, or an error while routing; their x.shape[-1]: {dims}, d_model={self.d_model});"
                             f" every rank of the group raises")
        dtypes = [_DTYPES[int(m[2])] if 0 <= m[2] < len(_DTYPES) else None for m in metas]
        if any(dt != dtypes[0] for dt in dtypes):
            raise ValueError(f"ExpertParallelMoE: the ranks' inputs have different dtypes: {dtypes}")

    def _meta(self, x, problem: str) -> List[float]:
        ok = not problem
        dim = x.shape[-1] if isinstance(x, Tensor) and x.dim() > 0 else -1
        code = _DTYPES.index(x.dtype) if ok and x.dtype in _DTYPES else -1
        return [float(ok), float(dim), float(code)]

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling() and self.world_size > 1:
            return self._forward_traced(x)
        problem = self._input_problem(x)
        if self.pad_to_capacity:
            return self._forward_padded(x, problem)
        return self._forward_packed(x, problem)

    def _exchange_overlapped(self, rows: Tensor, output_splits: List[int], input_splits: List[int],
                             work=None) -> Tensor:
        """all_to_all of ``rows`` with ``work()`` (the shared expert's part) computed while it is in flight;
        returns the exchanged rows and ``work()``'s result."""
        if work is None or not self.overlap_shared_expert:
            received = all_to_all(rows, output_splits, input_splits, self.group)
            return received, (work() if work is not None else None)
        received, pending = _start_all_to_all(rows, output_splits, input_splits, self.group)
        try:
            result = work()
        finally:
            pending.wait()
        return received, result

    def _finish(self, x: Tensor, y: Tensor, logits: Tensor, indices: Tensor, counts: Tensor, dropped: Tensor) -> Tensor:
        self.aux_loss = self._aux_losses(logits, indices, counts)
        self.expert_counts = counts
        self.dropped_tokens = dropped
        return y.view(x.shape)

    def _forward_packed(self, x: Tensor, problem: str) -> Tensor:
        W, El, E = self.world_size, self.num_local_experts, self.num_experts
        device = self._weight().device
        error = None
        if not problem:
            try:
                h = x.reshape(-1, self.d_model)
                weights, indices, logits = self.router(h)
                if self.capacity_factor is None:
                    dest, counts = ops.route_plan(indices, E, -1)
                    send_counts = counts
                    dropped = torch.zeros((), dtype=torch.long, device=device)
                else:
                    cap = ops.capacity(h.shape[0], E, self.k, self.capacity_factor, self.min_capacity)
                    dest, counts = ops.route_plan(indices, E, cap)
                    dropped = (dest < 0).sum()
                    send_counts, dest = pack_kept_rows(dest, counts, cap)
            except Exception as e:  # raised after the count exchange, on every rank, not left to hang the others
                error, problem = e, f"routing failed: {type(e).__name__}: {e}"
        if problem:
            send_counts = torch.zeros(E, dtype=torch.long, device=device)
        if W == 1:
            self._raise_on_problems([self._meta(x, problem)], problem, error)
            rows = ops.dispatch(h, dest, int(send_counts.sum()))
            y = ops.combine(self._experts_grouped(rows, send_counts), dest, weights)
            if self.shared_expert is not None:
                y = y + self.shared_expert(h)
            return self._finish(x, y, logits, indices, counts, dropped)

        # Row counts per (rank, local expert), with this rank's input check riding along.
        meta = torch.tensor(self._meta(x, problem), device=device).to(torch.long)
        packet = torch.cat([send_counts.view(W, El), meta.expand(W, meta.numel())], 1).contiguous()
        received = torch.empty_like(packet)
        dist.all_to_all_single(received, packet, group=self.group)
        sent_host, received_host = torch.stack([packet, received]).tolist()  # the one host copy
        self._raise_on_problems([row[El:] for row in received_host], problem, error)
        send_splits = [sum(row[:El]) for row in sent_host]
        recv_splits = [sum(row[:El]) for row in received_host]

        rows = ops.dispatch(h, dest, sum(send_splits))  # grouped by expert, hence by destination rank
        shared_hidden, shared_out = self._shared_expert_parts(h)
        received_rows, hidden = self._exchange_overlapped(rows, recv_splits, send_splits, shared_hidden)
        out = self._local_experts(received_rows, received[:, :El])
        returned, shared = self._exchange_overlapped(out, send_splits, recv_splits,
                                                     shared_out and (lambda: shared_out(hidden)))
        y = ops.combine(returned, dest, weights)
        if shared is not None:
            y = y + shared
        return self._finish(x, y, logits, indices, counts, dropped)

    def _shared_expert_parts(self, h: Tensor):
        """The shared expert in two halves, each run while one of the exchanges is in flight: (hidden(),
        output(hidden)), or (None, None) without a shared expert."""
        shared = self.shared_expert
        if shared is None:
            return None, None
        if type(shared) is not SharedExpert or shared._forward_pre_hooks or shared._forward_hooks:
            # wrapped (FSDP2's fully_shard unshards in a forward hook): called whole, during the first exchange
            return (lambda: shared(h)), (lambda out: out)
        return (lambda: shared.hidden(h)), (lambda hidden: shared.output(h, hidden))

    def _local_experts(self, rows: Tensor, counts_by_source: Tensor) -> Tensor:
        """Rows ordered by source rank, then local expert (``counts_by_source [W, E/W]``) through the local
        experts, results in the same order."""
        W, El = counts_by_source.shape
        if W == 1 or El == 1:  # already expert-major
            return self._experts_grouped(rows, counts_by_source.sum(0))
        # Stable counting sort to expert-major: route_plan over the local expert id of every row.
        num_rows = rows.shape[0]
        expert_ids = torch.arange(El, device=rows.device).repeat(W)
        local_ids = torch.repeat_interleave(expert_ids, counts_by_source.reshape(-1), output_size=num_rows)
        perm, local_counts = ops.route_plan(local_ids.view(num_rows, 1), El, -1)
        out = self._experts_grouped(ops.dispatch(rows, perm, num_rows), local_counts)
        return out.index_select(0, perm.view(-1))

    def _forward_padded(self, x: Tensor, problem: str) -> Tensor:
        W, El, E, d = self.world_size, self.num_local_experts, self.num_experts, self.d_model
        cap, error = 0, None
        if not problem:
            try:
                h = x.reshape(-1, d)
                cap = ops.capacity(h.shape[0], E, self.k, self.capacity_factor, self.min_capacity)
                weights, indices, logits = self.router(h)
            except Exception as e:  # raised after the all-gather, on every rank
                error, problem, cap = e, f"routing failed: {type(e).__name__}: {e}", 0
        metas = _all_gather_values(self._meta(x, problem) + [float(cap)], self.group)
        self._raise_on_problems(metas, problem, error)
        C = int(max(m[-1] for m in metas))  # buffer rows per expert, the same on every rank

        dest, counts = ops.route_plan(indices, E, C)
        if cap < C:  # drop at the local capacity, as the unsharded layer does
            dest = torch.where((dest >= 0) & (dest % C < cap), dest, -1)
        dropped = (dest < 0).sum()
        splits = [El * C] * W
        buf = ops.dispatch(h, dest, E * C)
        shared_hidden, shared_out = self._shared_expert_parts(h)
        if W == 1:
            received, hidden = buf, shared_hidden and shared_hidden()
        else:
            received, hidden = self._exchange_overlapped(buf, splits, splits, shared_hidden)
        expert_in = received.view(W, El, C, d).transpose(0, 1).reshape(El, W * C, d)
        out = self._experts_batched(expert_in).view(El, W, C, d).transpose(0, 1).reshape(E * C, d)
        if W == 1:
            returned, shared = out, shared_out and shared_out(hidden)
        else:
            returned, shared = self._exchange_overlapped(out, splits, splits,
                                                         shared_out and (lambda: shared_out(hidden)))
        y = ops.combine(returned, dest, weights)
        if shared is not None:
            y = y + shared
        return self._finish(x, y, logits, indices, counts, dropped)

    def _forward_traced(self, x: Tensor) -> Tensor:
        """The forward under torch.compile: the same math on functional collectives (traceable, differentiable;
        the compiler places the waits). The input is checked locally, at trace time (shapes and dtypes are
        static there); the split sizes (and, padded, the group's capacity) are values from the other ranks:
        compile with ``torch._dynamo.config.capture_scalar_outputs = True``."""
        from torch.distributed import _functional_collectives as funcol

        problem = self._input_problem(x)
        if problem:
            raise ValueError(f"ExpertParallelMoE (rank {self.rank}): {problem}")
        W, El, E, d = self.world_size, self.num_local_experts, self.num_experts, self.d_model
        h = x.reshape(-1, d)
        weights, indices, logits = self.router(h)
        shared = self.shared_expert(h) if self.shared_expert is not None else None
        if self.pad_to_capacity:
            cap = ops.capacity(h.shape[0], E, self.k, self.capacity_factor, self.min_capacity)
            caps = funcol.all_gather_tensor(torch.tensor([cap], device=h.device), 0, self.group)
            C = int(caps.max().item())  # the largest local capacity in the group
            torch._check(C >= cap)
            # route_plan takes its capacity as a plain int: the dropless plan has the same queues in the same
            # order (dest = start(e) + pos); keep pos < the local capacity, placed in buffers of C rows.
            dropless, counts = ops.route_plan(indices, E, -1)
            pos = dropless - (torch.cumsum(counts, 0) - counts)[indices]
            dest = torch.where(pos < cap, indices * C + pos, -1)
            dropped = (dest < 0).sum()
            buf = ops.dispatch(h, dest, E * C)
            received = funcol.all_to_all_single_autograd(buf, None, None, self.group)
            expert_in = received.view(W, El, C, d).transpose(0, 1).reshape(El, W * C, d)
            out = self._experts_batched(expert_in).view(El, W, C, d).transpose(0, 1).reshape(E * C, d)
            returned = funcol.all_to_all_single_autograd(out, None, None, self.group)
        else:
            if self.capacity_factor is None:
                dest, counts = ops.route_plan(indices, E, -1)
                send_counts = counts
                dropped = torch.zeros((), dtype=torch.long, device=h.device)
            else:
                cap = ops.capacity(h.shape[0], E, self.k, self.capacity_factor, self.min_capacity)
                dest, counts = ops.route_plan(indices, E, cap)
                dropped = (dest < 0).sum()
                send_counts, dest = pack_kept_rows(dest, counts, cap)
            recv_counts = funcol.all_to_all_single(send_counts, None, None, self.group).view(W, El)
            send_splits = send_counts.view(W, El).sum(1).tolist()
            recv_splits = recv_counts.sum(1).tolist()
            for n in send_splits + recv_splits:
                torch._check_is_size(n)
            rows = ops.dispatch(h, dest, sum(send_splits))
            received_rows = funcol.all_to_all_single_autograd(rows, recv_splits, send_splits, self.group)
            out = self._local_experts(received_rows, recv_counts)
            returned = funcol.all_to_all_single_autograd(out, send_splits, recv_splits, self.group)
        y = ops.combine(returned, dest, weights)
        if shared is not None:
            y = y + shared
        return self._finish(x, y, logits, indices, counts, dropped)

    def global_expert_counts(self, counts: Optional[Tensor] = None) -> Tensor:
        """``counts`` (default: :attr:`expert_counts` of the last forward) summed over the group: ``[E]`` int64."""
        counts = self.expert_counts if counts is None else counts
        total = counts.reshape(-1, self.num_experts).sum(0).to(torch.long)
        if self.world_size > 1:
            dist.all_reduce(total, group=self.group)
        return total

    def update_expert_bias(self, counts: Optional[Tensor] = None) -> None:
        """``router.update_expert_bias`` on the counts of the whole group (:meth:`global_expert_counts`), so every
        replica's expert bias stays the same. Collective."""
        self.router.update_expert_bias(self.global_expert_counts(counts))

    def extra_repr(self) -> str:
        s = super().extra_repr()
        s += f", world_size={self.world_size}, rank={self.rank}, local_experts=[{self.expert_offset}, "
        s += f"{self.expert_offset + self.num_local_experts})"
        if self.pad_to_capacity:
            s += ", pad_to_capacity=True"
        return s


class QuantizedExpertParallelMoE(_QuantizedExperts, ExpertParallelMoE):
    """An :class:`ExpertParallelMoE` whose experts were quantized by :func:`torchmoe.nn.quantize_experts`: each
    rank serves its own experts on ``grouped_mm_quantized``. The packed tensors are buffers; with a mesh they are
    DTensors of the whole layer's shape (``Shard(0)``), so ``state_dict`` has the unsharded quantized layer's keys
    and shapes and ``torch.distributed.checkpoint`` reshards them across world sizes. Inputs may be float32,
    bfloat16 or float16; every rank of the group must use the same dtype."""

    def _weight(self) -> Tensor:
        return _local(self.up_proj_qweight)

    def _input_problem(self, x) -> str:
        if not isinstance(x, Tensor):
            return f"x must be a tensor, got {type(x).__name__}"
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            return f"x must have shape [..., d_model={self.d_model}], got {tuple(x.shape)}"
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"x must be float32, bfloat16 or float16 for quantized experts, got {x.dtype}"
        if x.device != self._weight().device:
            return f"x is on {x.device}, the expert weights on {self._weight().device}"
        return ""

    def _experts_grouped(self, rows: Tensor, counts: Tensor) -> Tensor:
        return self._quantized_mlp(rows, counts, _local(self.gate_proj_qweight), _local(self.gate_proj_scales),
                                   _local(self.gate_proj_zeros), _local(self.up_proj_qweight),
                                   _local(self.up_proj_scales), _local(self.up_proj_zeros),
                                   _local(self.down_proj_qweight), _local(self.down_proj_scales),
                                   _local(self.down_proj_zeros))

    def _experts_batched(self, buf: Tensor) -> Tensor:
        # [E/W, C, d_model]: every local expert has C rows.
        counts = torch.full((buf.shape[0],), buf.shape[1], dtype=torch.long, device=buf.device)
        return self._experts_grouped(buf.reshape(-1, buf.shape[-1]), counts).view(buf.shape)

    def quantized_weight(self, name: str) -> QuantizedWeight:
        """This rank's experts of weight ``name`` as a :class:`~torchmoe.QuantizedWeight` (``[E/W, ...]``)."""
        qweight = getattr(self, f"{name}_qweight")
        if qweight is None:
            raise ValueError(f"{type(self).__name__}: no expert weight {name!r}")
        return QuantizedWeight(_local(qweight), _local(getattr(self, f"{name}_scales")),
                               _local(getattr(self, f"{name}_zeros")), self.bits, getattr(self, f"{name}_group_size"),
                               self.expert_dtype)

    def extra_repr(self) -> str:
        form = "symmetric" if self.down_proj_zeros is None else "asymmetric"
        group = f", group_size={self.up_proj_group_size}" if self.bits == 4 else ""
        return ExpertParallelMoE.extra_repr(self) + f", bits={self.bits}{group}, {form}"


_QUANTIZED_CLASS[ExpertParallelMoE] = QuantizedExpertParallelMoE


def shard_experts(model: nn.Module, mesh: Optional[DeviceMesh] = None, *, group=None,
                  pad_to_capacity: bool = False) -> nn.Module:
    """Replaces every :class:`torchmoe.nn.MoE` / :class:`~torchmoe.nn.SwitchMoE` inside ``model`` by its
    :class:`ExpertParallelMoE` form (:meth:`ExpertParallelMoE.from_moe`), in place, and returns ``model``; a bare
    ``MoE`` is returned converted.

    Args:
        mesh: a 1-D ``DeviceMesh`` (or one dim of a larger one, ``mesh["ep"]``) the experts are sharded over;
            each expert weight becomes a DTensor of the global shape ``[E, ...]``, placed ``Shard(0)`` on it.
        group: a process group instead of ``mesh`` (a mesh is made from it); neither: the default group.
        pad_to_capacity: see :class:`ExpertParallelMoE`.

    Collective: every process of the default group calls it, on the same model (built from the same seed).
    Build the optimizer afterwards (the expert parameters are new tensors)."""
    if isinstance(model, ExpertParallelMoE):
        return model
    if isinstance(model, MoE):
        return ExpertParallelMoE.from_moe(model, group, pad_to_capacity, mesh=mesh)
    for name, child in list(model.named_children()):
        converted = shard_experts(child, mesh, group=group, pad_to_capacity=pad_to_capacity)
        if converted is not child:
            setattr(model, name, converted)
    return model


def fully_shard_expert_parallel(model: nn.Module, mesh: DeviceMesh, *, dp_dim: str = "dp", ep_dim: str = "ep",
                                wrap_root: bool = True, pad_to_capacity: bool = False, **fully_shard_kwargs) -> nn.Module:
    """Expert parallelism with FSDP2 on a 2-D ``(dp_dim, ep_dim)`` mesh, in place: the experts are sharded over
    ``mesh[ep_dim]`` (:func:`shard_experts`) and ``fully_shard``-ed over ``mesh[dp_dim]``; the routers, the
    shared experts and (``wrap_root=True``) the rest of the model are ``fully_shard``-ed over the flattened mesh
    (all ranks). Returns ``model``.

    Gradients then come out as those of single-process training on the mean of the ranks' losses: FSDP2
    averages the dense ones over all ranks; the exchange has already summed each expert's gradient over its
    ``ep_dim`` group, so the experts' reduction over ``dp_dim`` divides by the whole mesh size
    (``set_gradient_divide_factor``). Clip with :func:`clip_grad_norm_`; no :func:`allreduce_gradients`.

    To wrap blocks of your own (e.g. each transformer block over the flattened mesh), pass ``wrap_root=False``,
    then ``fully_shard`` the blocks and the root in the usual inner-to-outer order: the MoE layers are already
    wrapped. ``fully_shard_kwargs`` (``mp_policy``, ``reshard_after_forward``, ...) go to every call.
    Collective: every rank calls it on the same model."""
    from torch.distributed.fsdp import fully_shard

    if not isinstance(mesh, DeviceMesh) or mesh.ndim != 2 or tuple(mesh.mesh_dim_names or ()) != (dp_dim, ep_dim):
        names = getattr(mesh, "mesh_dim_names", None)
        raise ValueError(f"fully_shard_expert_parallel: mesh must be a 2-D DeviceMesh with dims ({dp_dim!r}, "
                         f"{ep_dim!r}), got {type(mesh).__name__} with dims {names}")
    flat = mesh._flatten(f"{dp_dim}_{ep_dim}")
    shard_experts(model, mesh[ep_dim], pad_to_capacity=pad_to_capacity)
    layers = [m for m in model.modules() if isinstance(m, ExpertParallelMoE)]
    for layer in layers:
        fully_shard(layer.router, mesh=flat, **fully_shard_kwargs)
        if layer.shared_expert is not None:
            fully_shard(layer.shared_expert, mesh=flat, **fully_shard_kwargs)
        fully_shard(layer, mesh=mesh[dp_dim], **fully_shard_kwargs)  # what is left in it: the experts
        layer.set_gradient_divide_factor(float(mesh.size()))
        if mesh.device_type == "cpu":  # FSDP2 reduces float32/bf16 with a custom factor by PREMUL_SUM, not in gloo
            layer.set_force_sum_reduction_for_comms(True)  # a sum, then the division
    if wrap_root and not isinstance(model, ExpertParallelMoE):
        fully_shard(model, mesh=flat, **fully_shard_kwargs)
    return model


def expert_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """The sharded parameters of ``model`` (those of its :class:`ExpertParallelMoE` layers, router excluded), as
    ``(name, parameter)`` with the names of ``model.named_parameters()``."""
    found = []
    for module_name, module in model.named_modules():
        if isinstance(module, ExpertParallelMoE):
            for name, param in module.named_parameters(recurse=False):
                found.append((f"{module_name}.{name}" if module_name else name, param))
    return found


def allreduce_gradients(model: nn.Module, group=None, op: str = "mean") -> None:
    """All-reduces the gradients of every replicated parameter of ``model`` (routers and everything outside the
    MoE layers) over ``group``; sharded expert parameters are left alone, their gradients already hold every
    rank's contribution. ``op="sum"``: replicated gradients summed. ``op="mean"``: replicated gradients averaged
    and expert gradients divided by the world size, so an optimizer step equals a single-process step on the mean
    of the ranks' losses. Replicated parameters without a gradient get zeros (every rank sends the same sizes).
    Collective: every rank of the group calls it, after backward."""
    if op not in ("mean", "sum"):
        raise ValueError(f"allreduce_gradients: op must be 'mean' or 'sum', got {op!r}")
    world, _ = _world(group)
    if world == 1:
        return
    experts = expert_parameters(model)
    expert_ids = {id(p) for _, p in experts}
    buckets = {}  # (device, dtype) -> grads, in parameter order (the same on every rank)
    for param in model.parameters():
        if not param.requires_grad or id(param) in expert_ids:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        buckets.setdefault((param.grad.device, param.grad.dtype), []).append(param.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        if op == "mean":
            flat.div_(world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
    if op == "mean":
        for _, param in experts:
            if param.grad is not None:
                param.grad.div_(world)


def _shard_dims(param: Tensor, name: str) -> Tuple[Optional[DeviceMesh], Tuple[int, ...]]:
    """(mesh, the mesh dims ``param`` is sharded over) of a DTensor; (None, ()) for a plain tensor."""
    if not isinstance(param, DTensor):
        return None, ()
    if any(p.is_partial() for p in param.placements):
        raise ValueError(f"clip_grad_norm_: parameter {name} has a Partial placement; reduce it first")
    # Shard, and FSDP2's _StridedShard (which is no Shard subclass): anything but Replicate
    return param.device_mesh, tuple(i for i, p in enumerate(param.placements) if not p.is_replicate())


def clip_grad_norm_(model: Union[nn.Module, Iterable[Tensor]], max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False) -> Tensor:
    """Clips the gradients of ``model`` in place by their total norm taken as if the model were unsharded, and
    returns that norm (0-d, float32 or the gradients' dtype, the same on every rank).

    Every plain-tensor gradient (replicated: the routers, everything outside the MoE layers, after
    :func:`allreduce_gradients` or DDP) counts once; a DTensor gradient (the experts of :func:`shard_experts`,
    anything ``fully_shard``-ed by FSDP2) counts its global tensor once: the sums of ``|g|^p`` (the maxima for
    ``norm_type=inf``) of the local shards are all-reduced over the mesh dims the parameter is sharded on. A
    parameter without a gradient counts zero, on any rank. The result equals
    ``torch.nn.utils.clip_grad_norm_`` of the unsharded model on the same gradients (same ``max_norm``,
    ``norm_type``, and the same ``1e-6`` in the clip coefficient ``max_norm / (norm + 1e-6)``, capped at 1).

    Collective: every rank calls it with the same model structure (one small all-reduce per group of
    parameters sharded the same way).

    Args:
        model: a module, or an iterable of its parameters (the same on every rank).
        max_norm: largest total norm kept.
        norm_type: ``p > 0`` or ``inf``.
        error_if_nonfinite: raise (on every rank) when the total norm is nan or inf.
    """
    params = list(model.parameters()) if isinstance(model, nn.Module) else list(model)
    norm_type = float(norm_type)
    if not norm_type > 0:
        raise ValueError(f"clip_grad_norm_: norm_type must be > 0 or inf, got {norm_type}")
    max_norm = float(max_norm)
    infinite = math.isinf(norm_type)
    # parameters sharded the same way share one reduction: key -> (mesh, dims, device, local grads)
    groups: Dict[tuple, list] = {}
    result_dtype = None
    for index, param in enumerate(params):
        mesh, dims = _shard_dims(param, f"#{index}")
        key = (id(mesh), dims, _local(param).device)
        entry = groups.setdefault(key, [mesh, dims, _local(param).device, []])
        if param.grad is not None:
            grad = _local(param.grad)
            entry[3].append(grad)
            result_dtype = result_dtype or grad.dtype
    total = None
    for mesh, dims, device, grads in groups.values():
        acc = torch.zeros((), dtype=torch.float64, device=device)
        if grads:
            norms = torch.stack([torch.linalg.vector_norm(g, norm_type).to(torch.float64) for g in grads])
            acc = norms.max() if infinite else norms.pow(norm_type).sum()
        for dim in dims:
            _note_process_group_use()
            dist.all_reduce(acc, op=dist.ReduceOp.MAX if infinite else dist.ReduceOp.SUM,
                            group=mesh.get_group(dim))
        if total is None:
            total = acc
        else:
            total = torch.maximum(total, acc.to(total.device)) if infinite else total + acc.to(total.device)
    if total is None:
        return torch.zeros(())
    total_norm = total if infinite else total.pow(1.0 / norm_type)
    if error_if_nonfinite and not bool(torch.isfinite(total_norm)):
        raise RuntimeError(f"clip_grad_norm_: the total norm of order {norm_type} of the gradients is "
                           f"{float(total_norm)} (non-finite)")
    clip_coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    by_device: Dict[Tuple[torch.device, torch.dtype], List[Tensor]] = {}
    for _, _, _, grads in groups.values():
        for g in grads:
            by_device.setdefault((g.device, g.dtype), []).append(g)
    for (device, dtype), grads in by_device.items():
        torch._foreach_mul_(grads, clip_coef.to(device=device, dtype=dtype))
    return total_norm.to(result_dtype or torch.float32)
