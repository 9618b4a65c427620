"""torchmoe.distributed on DTensors and DeviceMeshes, with real processes (gloo on loopback): meshes and their
errors, checkpoints saved at W=4 and loaded at W=2 and W=1, clip_grad_norm_ parity, FSDP2 on a 2 x 2
("dp", "ep") mesh, shared experts under expert parallelism, torch.compile(fullgraph=True).

As in test_distributed.py, each world size is spawned once and every rank runs every case of that world size in
order, writing each outcome to a file as soon as it is known; one pytest test per case reads them. Collectives
time out after COLLECTIVE_TIMEOUT_S, a whole spawn is killed after SPAWN_TIMEOUT_S. The W=4 spawn writes a
checkpoint that the W=2 spawn and the single-process test load.
"""
import copy
import datetime
import json
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from torchmoe.distributed import (
    ExpertParallelMoE, allreduce_gradients, clip_grad_norm_, fully_shard_expert_parallel, shard_experts,
)
from torchmoe.nn import MoE, SwitchMoE

COLLECTIVE_TIMEOUT_S = 30
SPAWN_TIMEOUT_S = 150
SKIPPED = "skipped: "
GLOBAL_TOKENS = 48  # per training step, split evenly over the ranks (W = 1, 2, 4)
STEPS_BEFORE_CHECKPOINT = 2
STEPS_AFTER_CHECKPOINT = 2

CASES = {4: {}, 2: {}}


def case(*worlds):
    def register(fn):
        for world in worlds:
            CASES[world][fn.__name__] = fn
        return fn
    return register


def _rand(seed, *shape, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _assert_close(actual, expected, what, tol=1e-9):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _gather_objects(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class _Net(nn.Module):
    """Two MoE layers (one with a gated shared expert) between dense layers."""

    def __init__(self, num_experts=4, aux=0.0, capacity_factor=None):
        super().__init__()
        d = 8
        self.inp = nn.Linear(d, d)
        self.moe1 = MoE(d, 12, num_experts, k=2, capacity_factor=capacity_factor, aux_loss_weight=aux,
                        z_loss_weight=aux, shared_expert_d_ff=6, shared_expert_gate=True)
        self.moe2 = SwitchMoE(d, 10, num_experts, capacity_factor=capacity_factor, aux_loss_weight=aux)
        self.out = nn.Linear(d, 1)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.moe1(h)
        h = h + self.moe2(h)
        return self.out(h).squeeze(-1)

    def aux_loss(self):
        return self.moe1.aux_loss + self.moe2.aux_loss


def _make_net(seed=9, frozen_routers=False, **kwargs):
    torch.manual_seed(seed)
    net = _Net(**kwargs).double()
    if frozen_routers:
        # The router's math is float32, so its gradient rounds differently when the tokens are split over
        # another number of ranks (~1e-7 relative); frozen, every step at any W agrees to float64 rounding.
        net.moe1.router.requires_grad_(False)
        net.moe2.router.requires_grad_(False)
    return net


# ---------------------------------------------------------------- training on one global batch per step

def _global_step(model, opt, step, rank, world):
    """One AdamW step on the step's GLOBAL_TOKENS tokens, this rank's share of them: the loss is the sum over all
    tokens / GLOBAL_TOKENS, so any W gives the same step (dropless, no aux loss)."""
    n = GLOBAL_TOKENS // world
    x = _rand(5000 + step, GLOBAL_TOKENS, 8)[rank * n : (rank + 1) * n]
    target = _rand(6000 + step, GLOBAL_TOKENS)[rank * n : (rank + 1) * n]
    opt.zero_grad()
    loss = (model(x) - target).square().sum() / GLOBAL_TOKENS
    loss.backward()
    allreduce_gradients(model, op="sum")
    opt.step()


def _adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)


def _full_model_state(model):
    return {name: _full(t).detach().clone() for name, t in model.state_dict().items()}


def _full_optim_state(model, opt):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    return {f"{name}.{key}": _full(value).detach().clone() for name, state in osd["state"].items()
            for key, value in state.items()}


def _compare_states(actual, expected, what, tol):
    assert sorted(actual) == sorted(expected), (what, sorted(actual), sorted(expected))
    for name in expected:
        _assert_close(actual[name].double(), expected[name].double(), f"{what} {name}", tol)


# ---------------------------------------------------------------- meshes and their errors

@case(4)
def mesh_1d_2d_and_group_give_the_same_layer(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(1)
    full = MoE(8, 12, 4, k=2, capacity_factor=None).double()
    x = _rand(10 + rank, 9, 8)
    with torch.no_grad():  # (a module holding a forward's graph cannot be deep-copied)
        expected = full(x)
    mesh1 = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    ep_group = mesh2["ep"].get_group()
    for how, kwargs, local in (("1-D mesh", dict(mesh=mesh1), 1), ("mesh['ep']", dict(mesh=mesh2["ep"]), 2),
                               ("group", dict(group=ep_group), 2), ("default group", {}, 1)):
        model = shard_experts(copy.deepcopy(full), **kwargs)
        assert isinstance(model, ExpertParallelMoE), how
        for name, param in model.named_parameters(recurse=False):
            assert isinstance(param, DTensor) and param.placements == (Shard(0),), (how, name)
            assert param.shape == getattr(full, name).shape, (how, name)
            assert _local(param).shape[0] == local, (how, name)
            assert torch.equal(param.full_tensor(), getattr(full, name)), (how, name)
        _assert_close(model(x), expected, how)
    with pytest.raises(ValueError, match="mesh must be 1-D"):
        shard_experts(copy.deepcopy(full), mesh2)
    with pytest.raises(ValueError, match="mesh or group, not both"):
        shard_experts(copy.deepcopy(full), mesh1, group=ep_group)


@case(4)
def mesh_errors_raise_on_every_rank(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh1 = init_device_mesh("cpu", (world,))
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by the group's world size 4"):
        shard_experts(MoE(8, 12, 6, k=2), mesh1)
    mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    mine = mesh2["ep"] if rank == 0 else mesh2["dp"]  # rank 0 disagrees with the others
    with pytest.raises(ValueError, match="the ranks disagree on the expert-parallel mesh/group"):
        shard_experts(MoE(8, 12, 4, k=2), mine)
    with pytest.raises(ValueError, match="disagree on shared_expert_d_ff"):
        shard_experts(MoE(8, 12, 4, k=2, shared_expert_d_ff=4 + (rank == 3)), mesh1)
    dist.barrier()  # still in step


# ---------------------------------------------------------------- checkpoints: save at W=4, load at W=2 and W=1

def _checkpoint_dir():
    return os.environ["TORCHMOE_TEST_CHECKPOINT_DIR"]


@case(4)
def checkpoint_save_at_4(rank, world):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = _make_net(frozen_routers=True)
    unsharded_shapes = {n: t.shape for n, t in model.state_dict().items()}
    shard_experts(model)
    assert {n: t.shape for n, t in model.state_dict().items()} == unsharded_shapes  # same keys, global shapes
    opt = _adamw(model)
    for step in range(STEPS_BEFORE_CHECKPOINT):
        _global_step(model, opt, step, rank, world)
    root = _checkpoint_dir()
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=os.path.join(root, "dcp"))
    at_checkpoint = {"model": _full_model_state(model), "optim": _full_optim_state(model, opt)}
    for step in range(STEPS_BEFORE_CHECKPOINT, STEPS_BEFORE_CHECKPOINT + STEPS_AFTER_CHECKPOINT):
        _global_step(model, opt, step, rank, world)
    straight = _full_model_state(model)
    if rank == 0:
        torch.save({"at_checkpoint": at_checkpoint, "straight": straight}, os.path.join(root, "expected.pt"))
    dist.barrier()


@case(2)
def checkpoint_load_at_2_resume_equals_straight_through(rank, world):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
    )

    root = _checkpoint_dir()
    expected = torch.load(os.path.join(root, "expected.pt"))
    model = shard_experts(_make_net(seed=123, frozen_routers=True))  # other weights: everything must come from the checkpoint
    opt = _adamw(model)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=os.path.join(root, "dcp"))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    assert _local(model.moe1.up_proj).shape[0] == 2
    _compare_states(_full_model_state(model), expected["at_checkpoint"]["model"], "weights", 0)
    _compare_states(_full_optim_state(model, opt), expected["at_checkpoint"]["optim"], "AdamW state", 0)
    for step in range(STEPS_BEFORE_CHECKPOINT, STEPS_BEFORE_CHECKPOINT + STEPS_AFTER_CHECKPOINT):
        _global_step(model, opt, step, rank, world)
    _compare_states(_full_model_state(model), expected["straight"], "resumed at W=2 vs straight through", 1e-12)


# ---------------------------------------------------------------- clip_grad_norm_

def _clip_parity(rank, world, group=None):
    """clip_grad_norm_ on the sharded model vs torch.nn.utils.clip_grad_norm_ on the unsharded one, for the
    2-norm, the inf-norm and the 1-norm, with and without the last rank's expert gradients (None there, zeros in
    the reference)."""
    group_of_one = group is not None
    world_eff = 1 if group_of_one else world
    rank_eff = 0 if group_of_one else rank
    token_counts = [13, 7, 0, 21][:world_eff]
    xs = [_rand(300 + s, token_counts[s], 8) for s in range(world_eff)]
    targets = [_rand(400 + s, token_counts[s]) for s in range(world_eff)]
    for norm_type in (2.0, float("inf"), 1.0):
        for drop_experts in (False, True):
            reference = _make_net(num_experts=4, aux=1e-2)
            model = shard_experts(copy.deepcopy(reference), group=group)
            reference.zero_grad()
            for x, t in zip(xs, targets):
                (((reference(x) - t).square().mean() + reference.aux_loss()) / world_eff).backward()
            loss = (model(xs[rank_eff]) - targets[rank_eff]).square().mean() + model.aux_loss()
            loss.backward()
            allreduce_gradients(model, group=group, op="mean")
            if drop_experts:  # the last rank's experts got no gradient
                last = world_eff - 1
                for layer, ref_layer in ((model.moe1, reference.moe1), (model.moe2, reference.moe2)):
                    per_rank = 4 // world_eff
                    for name, param in layer.named_parameters(recurse=False):
                        if rank_eff == last:
                            param.grad = None
                        getattr(ref_layer, name).grad[last * per_rank : (last + 1) * per_rank] = 0
            expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05, norm_type)
            norm = clip_grad_norm_(model, 0.05, norm_type)
            what = f"norm_type={norm_type}, drop_experts={drop_experts}"
            assert norm.dtype == expected_norm.dtype and norm.dim() == 0, what
            _assert_close(norm, expected_norm, what + ": total norm", 1e-12)
            assert float(expected_norm) > 0.05, what  # it did clip
            if not group_of_one:
                norms = _gather_objects(float(norm))
                assert all(v == norms[0] for v in norms), (what, norms)
            ref_params = dict(reference.named_parameters())
            lo = rank_eff * (4 // world_eff)
            for name, param in model.named_parameters():
                expected_grad = ref_params[name].grad
                if isinstance(param, DTensor):
                    expected_grad = expected_grad[lo : lo + 4 // world_eff]
                if param.grad is None:
                    assert drop_experts and not expected_grad.any(), (what, name)
                    continue
                _assert_close(_local(param.grad), expected_grad, f"{what}: clipped gradient of {name}", 1e-12)


@case(4, 2)
def clip_grad_norm_matches_unsharded(rank, world):
    _clip_parity(rank, world)


@case(2)
def clip_grad_norm_group_of_one(rank, world):
    groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group, in the same order
    _clip_parity(rank, world, group=groups[rank])
    with pytest.raises(ValueError, match="norm_type must be > 0"):
        clip_grad_norm_(nn.Linear(2, 2), 1.0, 0)


# ---------------------------------------------------------------- shared experts under expert parallelism

@case(4, 2)
def shared_expert_sharded_matches_unsharded(rank, world):
    token_counts = [11, 0, 17, 6]
    for cf, pad, activation, gate in ((None, False, "swiglu", True), (0.8, False, "relu", False),
                                      (0.8, True, "gelu", True)):
        torch.manual_seed(3)
        full = MoE(8, 12, 2 * world, k=2, capacity_factor=cf, activation=activation, shared_expert_d_ff=5,
                   shared_expert_gate=gate).double()
        xs = [_rand(500 + s, token_counts[s], 8) for s in range(world)]
        gys = [_rand(600 + s, token_counts[s], 8) for s in range(world)]
        full.zero_grad()
        for s in range(world):
            x = xs[s].clone().requires_grad_()
            y = full(x)
            (y * gys[s]).sum().backward()
            if s == rank:
                expected_y, expected_dx = y.detach(), x.grad
        results = []
        for overlap in (True, False):
            ep = ExpertParallelMoE.from_moe(full, pad_to_capacity=pad)
            ep.overlap_shared_expert = overlap
            x = xs[rank].clone().requires_grad_()
            y = ep(x)
            (y * gys[rank]).sum().backward()
            what = f"cf={cf}, pad={pad}, {activation}, gate={gate}, overlap={overlap}"
            _assert_close(y.detach(), expected_y, what + ": output")
            _assert_close(x.grad, expected_dx, what + ": input gradient")
            allreduce_gradients(ep, op="sum")
            for name, param in ep.shared_expert.named_parameters():
                _assert_close(param.grad, full.shared_expert.get_parameter(name).grad, f"{what}: shared {name}")
            results.append([y.detach(), x.grad] + [_local(p.grad) for p in ep.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*results)), "overlap changes nothing, bitwise"


# ---------------------------------------------------------------- FSDP2 + EP on a 2 x 2 mesh

@case(4)
def fsdp2_2x2_matches_single_process(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    with pytest.raises(ValueError, match=r"2-D DeviceMesh with dims \('dp', 'ep'\)"):
        fully_shard_expert_parallel(_make_net(), mesh["ep"])
    reference = _make_net(aux=1e-2)
    model = fully_shard_expert_parallel(copy.deepcopy(reference), mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.01)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.02, weight_decay=0.01)
    token_counts = [12, 5, 20, 9]
    for step in range(3):
        xs = [_rand(700 + 10 * step + s, token_counts[s], 8) for s in range(world)]
        targets = [_rand(800 + 10 * step + s, token_counts[s]) for s in range(world)]
        ref_opt.zero_grad()
        for x, t in zip(xs, targets):  # the mean of the ranks' losses, each rank's batch on its own
            (((reference(x) - t).square().mean() + reference.aux_loss()) / world).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
        ref_opt.step()
        opt.zero_grad()
        loss = (model(xs[rank]) - targets[rank]).square().mean() + model.aux_loss()
        loss.backward()
        norm = clip_grad_norm_(model, 0.1)
        opt.step()
        _assert_close(norm, ref_norm, f"step {step}: gradient norm", 1e-9)
        assert float(ref_norm) > 0.1  # clipped
    for name, param in model.named_parameters():
        _assert_close(_full(param.detach()), reference.get_parameter(name).detach(), f"{name} after 3 steps", 1e-9)


@case(4)
def fsdp2_2x2_float32_on_gloo(rank, world):
    """float32: FSDP2 would reduce the experts' gradients (custom divide factor) with PREMUL_SUM, which gloo lacks."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    reference = _make_net().float()
    model = fully_shard_expert_parallel(copy.deepcopy(reference), mesh)
    xs = [_rand(950 + s, 10 + s, 8, dtype=torch.float32) for s in range(world)]
    for x in xs:
        (reference(x).square().mean() / world).backward()
    model(xs[rank]).square().mean().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(_full(param.grad), reference.get_parameter(name).grad, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------- torch.compile(fullgraph=True)

@case(2)
def compile_fullgraph_matches_eager(rank, world):
    import torch._dynamo

    torch._dynamo.config.capture_scalar_outputs = True  # the split sizes come from the other ranks
    for cf, pad in ((None, False), (1.0, True)):
        torch.manual_seed(0)
        ep = ExpertParallelMoE.from_moe(MoE(8, 12, 4, k=2, capacity_factor=cf, shared_expert_d_ff=6).double(),
                                        pad_to_capacity=pad)
        x = _rand(900 + rank, 10 + 3 * rank, 8).requires_grad_()  # different token counts (and capacities)
        y = ep(x)
        y.square().sum().backward()
        expected = [y.detach(), x.grad.clone()] + [_local(p.grad).clone() for p in ep.parameters()]
        ep.zero_grad()
        x.grad = None
        torch._dynamo.reset()
        y = torch.compile(ep, fullgraph=True)(x)  # fullgraph: a graph break would raise
        y.square().sum().backward()
        got = [y.detach(), x.grad] + [_local(p.grad) for p in ep.parameters()]
        for a, b in zip(got, expected):
            _assert_close(a, b, f"compiled vs eager (capacity_factor={cf}, pad_to_capacity={pad})", 1e-12)


# ---------------------------------------------------------------- quantized experts under expert parallelism

QUANT_FORMATS = ((8, True), (4, True), (4, False))  # (bits, symmetric)


def _quantized_pair(cls, bits, symmetric, mesh, pad=False, capacity_factor=None, seed=0, **kwargs):
    """(the unsharded layer quantized, the same float layer sharded then quantized)."""
    from torchmoe.nn import quantize_experts

    torch.manual_seed(seed)
    full = cls(16, 32, 4, capacity_factor=capacity_factor, **kwargs)
    ref = quantize_experts(copy.deepcopy(full), bits, 8, symmetric)
    ep = quantize_experts(shard_experts(copy.deepcopy(full), mesh, pad_to_capacity=pad), bits, 8, symmetric)
    return ref, ep


@case(4)
def quantized_experts_sharded_match_the_unsharded_quantized_layer(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    from torchmoe.distributed import QuantizedExpertParallelMoE

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    for cls, kwargs in ((MoE, dict(k=2, shared_expert_d_ff=8, shared_expert_gate=True)), (SwitchMoE, {})):
        for cf, pad in ((None, False), (1.0, False), (1.0, True)):
            for bits, symmetric in QUANT_FORMATS:
                what = f"{cls.__name__} capacity_factor={cf} pad={pad} bits={bits} symmetric={symmetric}"
                ref, ep = _quantized_pair(cls, bits, symmetric, mesh, pad, cf, **kwargs)
                assert type(ep) is QuantizedExpertParallelMoE, what
                assert not list(ep.named_parameters(recurse=False)), what  # the experts are frozen buffers
                shapes = {n: tuple(t.shape) for n, t in ep.state_dict().items()}
                assert shapes == {n: tuple(t.shape) for n, t in ref.state_dict().items()}, what
                for name, buf in ep.named_buffers(recurse=False):
                    assert isinstance(buf, DTensor) and buf.placements == (Shard(0),), (what, name)
                    assert torch.equal(buf.full_tensor(), ref.get_buffer(name)), (what, name)
                for dtype in (torch.float32, torch.bfloat16):  # the router and shared expert follow .to(dtype)
                    ep.to(dtype)
                    ref.to(dtype)
                    x = _rand(40 + rank, 5 + 2 * rank, 16, dtype=dtype).requires_grad_()  # uneven token counts
                    y = ep(x)
                    y.float().square().sum().backward()
                    grad, x.grad = x.grad, None
                    expected = ref(x)
                    expected.float().square().sum().backward()
                    tol = 1e-5 if dtype == torch.float32 else 2e-2
                    _assert_close(y, expected, f"{what} {dtype} output", tol)
                    _assert_close(grad, x.grad, f"{what} {dtype} input gradient", tol)
                    assert torch.equal(ep.expert_counts, ref.expert_counts), what
    with pytest.raises(TypeError, match="shard the float layer first"):
        shard_experts(ref, mesh)
    x = _rand(3, 4, 16, dtype=torch.float64) if rank == 1 else _rand(3, 4, 16)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):  # on every rank, not only rank 1
        ep(x)


@case(4)
def quantized_checkpoint_save_at_4(rank, world):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    ref, ep = _quantized_pair(MoE, 4, False, None, k=2)
    dcp.save({"model": get_model_state_dict(ep)}, checkpoint_id=os.path.join(_checkpoint_dir(), "quantized"))
    if rank == 0:
        torch.save(ref.state_dict(), os.path.join(_checkpoint_dir(), "quantized_expected.pt"))
    dist.barrier()


@case(2)
def quantized_checkpoint_load_at_2(rank, world):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    expected = torch.load(os.path.join(_checkpoint_dir(), "quantized_expected.pt"))
    ref, ep = _quantized_pair(MoE, 4, False, None, seed=5, k=2)  # other weights: all must come from the checkpoint
    state = {"model": get_model_state_dict(ep)}
    dcp.load(state, checkpoint_id=os.path.join(_checkpoint_dir(), "quantized"))
    set_model_state_dict(ep, state["model"])
    _compare_states(_full_model_state(ep), expected, "quantized layer loaded at W=2", 0)
    ref.load_state_dict(expected)
    x = _rand(70 + rank, 6, 16, dtype=torch.float32)
    _assert_close(ep(x), ref(x), "quantized layer loaded at W=2 vs the saved layer", 1e-5)
    # An unsharded quantized state dict (plain tensors) loads into the shards too.
    _, ep2 = _quantized_pair(MoE, 4, False, None, seed=6, k=2)
    ep2.load_state_dict(expected)
    _assert_close(ep2(x), ref(x), "unsharded quantized state dict loaded into the shards", 1e-5)


# ---------------------------------------------------------------- the spawn

def _worker(rank, world, init_file, out_dir, checkpoint_dir):
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ["TORCHMOE_TEST_CHECKPOINT_DIR"] = checkpoint_dir
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    results = {}
    path = os.path.join(out_dir, f"rank{rank}.json")
    for name, fn in CASES[world].items():
        try:
            results[name] = fn(rank, world) or "ok"
        except Exception:  # noqa: BLE001  (reported by the parent's test for this case)
            results[name] = traceback.format_exc()
        with open(path + ".tmp", "w") as f:
            json.dump(results, f)
        os.replace(path + ".tmp", path)
    dist.barrier()
    dist.destroy_process_group()


def _spawn(world, tmp, checkpoint_dir):
    context = mp.start_processes(_worker, args=(world, str(tmp / "init"), str(tmp), str(checkpoint_dir)),
                                 nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    failure = None
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                failure = f"world size {world}: not finished after {SPAWN_TIMEOUT_S} s (hang?), killed"
                break
    except Exception as e:  # a worker died outside the cases
        failure = f"world size {world}: a worker failed: {e}"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    results = []
    for rank in range(world):
        path = tmp / f"rank{rank}.json"
        results.append(json.loads(path.read_text()) if path.exists() else {})
    return world, results, failure


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ep_checkpoint")


@pytest.fixture(scope="module")
def spawned4(tmp_path_factory, checkpoint_dir):
    return _spawn(4, tmp_path_factory.mktemp("dtensor_world4"), checkpoint_dir)


@pytest.fixture(scope="module")
def spawned2(tmp_path_factory, checkpoint_dir, spawned4):  # after the W=4 run: it loads its checkpoint
    return _spawn(2, tmp_path_factory.mktemp("dtensor_world2"), checkpoint_dir)


def _check(spawned, name):
    world, results, failure = spawned
    outcomes = [r.get(name) for r in results]
    missing = [rank for rank, o in enumerate(outcomes) if o is None]
    assert not missing, f"ranks {missing} did not finish {name!r}: {failure}"
    failed = {rank: o for rank, o in enumerate(outcomes) if o != "ok" and not o.startswith(SKIPPED)}
    assert not failed, "\n".join(f"--- rank {rank} of {world}:\n{o}" for rank, o in failed.items())


@pytest.mark.parametrize("name", list(CASES[4]))
def test_world4(spawned4, name):
    _check(spawned4, name)


@pytest.mark.parametrize("name", list(CASES[2]))
def test_world2(spawned2, name):
    _check(spawned2, name)


def test_checkpoint_load_at_1_in_a_plain_process(spawned4, checkpoint_dir, tmp_path):
    """The W=4 checkpoint into a plain single-process model (no process group): dcp_to_torch_save, then
    load_state_dict and set_optimizer_state_dict; weights and AdamW state equal, and two more steps equal the
    W=4 run straight through."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    _check(spawned4, "checkpoint_save_at_4")
    assert not dist.is_initialized()
    dcp_to_torch_save(str(checkpoint_dir / "dcp"), str(tmp_path / "full.pt"))
    state = torch.load(tmp_path / "full.pt")
    expected = torch.load(checkpoint_dir / "expected.pt")
    model = _make_net(seed=77, frozen_routers=True)
    model.load_state_dict(state["model"])
    opt = _adamw(model)
    set_optimizer_state_dict(model, opt, state["optim"])
    _compare_states(_full_model_state(model), expected["at_checkpoint"]["model"], "weights", 0)
    optim = {f"{name}.{key}": value for name, st in state["optim"]["state"].items() for key, value in st.items()}
    _compare_states(optim, expected["at_checkpoint"]["optim"], "AdamW state", 0)
    for step in range(STEPS_BEFORE_CHECKPOINT, STEPS_BEFORE_CHECKPOINT + STEPS_AFTER_CHECKPOINT):
        _global_step(model, opt, step, 0, 1)
    _compare_states(_full_model_state(model), expected["straight"], "resumed at W=1 vs straight through", 1e-12)
