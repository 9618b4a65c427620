"""torch.export with a dynamic batch dimension and AOTInductor: the exported layers equal eager at batch sizes
the export never saw, and a capacity-mode layer's capacity follows the token count exactly."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import torchmoe
from torchmoe.nn import MoE, MoLE, MoLoRA, SwitchMoE

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("make_artifacts", ROOT / "tests" / "cpp" / "deploy" / "make_artifacts.py")
make_artifacts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_artifacts)

SEQ, D = 5, 16
BATCHES = (1, 2, 3, 7, 16)  # exported at 4


def _layers():
    torch.manual_seed(0)
    swiglu = MoE(D, 24, num_experts=4, k=2, capacity_factor=None)
    base = nn.Linear(D, 12)
    molora = MoLoRA(base, num_experts=3, rank=4, top_k=2)
    with torch.no_grad():
        molora.lora_B.normal_(0.0, 0.5)  # B starts at zero: make the experts count
    return {
        "moe_capacity": MoE(D, 24, num_experts=4, k=2, capacity_factor=1.25),
        "moe_capacity_relu_tight": MoE(D, 24, num_experts=4, k=2, capacity_factor=0.5, activation="relu"),
        "moe_capacity_min": MoE(D, 24, num_experts=8, k=2, capacity_factor=0.3, min_capacity=3, router="noisy"),
        "moe_dropless": swiglu,
        "switch": SwitchMoE(D, 24, num_experts=4, capacity_factor=1.25),
        "switch_dropless": SwitchMoE(D, 24, num_experts=4, capacity_factor=None),
        "mole": MoLE.from_moe(swiglu, group_size=2, rank=6),
        "molora_topk": molora,
        "molora_dense": MoLoRA(nn.Linear(D, 12), num_experts=3, rank=4),
    }


LAYERS = list(_layers())


@pytest.mark.parametrize("name", LAYERS)
def test_export_with_dynamic_batch_equals_eager(name):
    layer = _layers()[name].eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(layer, (torch.randn(4, SEQ, D),), dynamic_shapes=({0: batch},))
    exported = ep.module()
    dropped = 0
    for b in BATCHES:
        x = torch.randn(b, SEQ, D)
        with torch.no_grad():
            expected = layer(x)
            got = exported(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"batch {b}: {m}")
        dropped += int(getattr(layer, "dropped_tokens", 0))
    if getattr(layer, "capacity_factor", None) is not None:
        assert dropped > 0  # the capacity limit bites, so a capacity other than torchmoe.capacity's would show


def test_exported_capacity_layer_saves_and_loads(tmp_path):
    layer = _layers()["moe_capacity"].eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(layer, (torch.randn(4, SEQ, D),), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(tmp_path / "moe.pt2"))
    loaded = torch.export.load(str(tmp_path / "moe.pt2")).module()
    for b in (1, 9):
        x = torch.randn(b, SEQ, D)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capacity_factor,k,experts,min_capacity", [
    (0.7, 2, 2, 0), (1.25, 2, 4, 0), (1.1, 3, 6, 0), (0.3, 2, 8, 5), (0.0, 1, 4, 2), (0.35, 2, 2, 0),
])
def test_exported_capacity_follows_the_token_count_exactly(capacity_factor, k, experts, min_capacity):
    # The capacity is exported as an expression of the token count, in torchmoe.capacity's floating-point
    # arithmetic (0.7 * 10 gives 7.0, 0.7 * 70 gives 48.99999999999999). With k = E = 2 and a zero router
    # (ties go to the lower expert) every token is first choice of expert 0 and second of expert 1, at its own
    # position in both queues, so exactly the first torchmoe.capacity(...) tokens have an output.
    # From a single token on, the capacity takes the values 0 and 1, on which tensor metadata would guard:
    # backed_size_oblivious lets the export cover them (the README's recipe for token-level dynamic shapes).
    torch.manual_seed(0)
    layer = MoE(D, 8, num_experts=experts, k=k, capacity_factor=capacity_factor, min_capacity=min_capacity).eval()
    if k == experts:
        with torch.no_grad():
            layer.router.weight.zero_()
    tokens = torch.export.Dim("tokens", min=1, max=4096)
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        exported = torch.export.export(layer, (torch.randn(8, D),), dynamic_shapes=({0: tokens},)).module()
    for n in list(range(1, 41)) + [70, 99, 500]:
        x = torch.randn(n, D)
        with torch.no_grad():
            got, expected = exported(x), layer(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n} tokens: {m}")
        if k == experts:
            kept = torchmoe.capacity(n, experts, k, capacity_factor, min_capacity)
            assert int((got.abs().sum(-1) > 0).sum()) == kept, n


@pytest.fixture(scope="module")
def deploy_artifacts(tmp_path_factory):
    # test.sh shares the directory with the C++ deployment tests (one AOTInductor compile for both).
    out = os.environ.get("TORCHMOE_DEPLOY_ARTIFACTS")
    return make_artifacts.make(Path(out) if out else tmp_path_factory.mktemp("deploy"))


def test_aoti_package_of_dropless_moe_loads_back_and_equals_eager(deploy_artifacts):
    runner = torch._inductor.aoti_load_package(str(deploy_artifacts / make_artifacts.PACKAGE))
    model = make_artifacts.dropless_moe()
    xs = list(make_artifacts.inputs().values()) + [torch.randn(1, make_artifacts.SEQ, make_artifacts.D_MODEL)]
    for x in xs:
        with torch.no_grad():
            torch.testing.assert_close(runner(x), model(x), rtol=1e-4, atol=1e-5)


def test_deploy_data_holds_the_eager_outputs(deploy_artifacts):
    # What the C++ tests compare against is what the models compute here.
    data = torch.jit.load(str(deploy_artifacts / make_artifacts.DATA))
    scripted = torch.jit.load(str(deploy_artifacts / make_artifacts.SCRIPTED))
    dropless, capacity = make_artifacts.dropless_moe(), make_artifacts.capacity_moe()
    with torch.no_grad():
        for size in ("small", "large"):
            x = getattr(data, f"x_{size}")
            torch.testing.assert_close(getattr(data, f"y_dropless_{size}"), dropless(x), rtol=0, atol=0)
            torch.testing.assert_close(getattr(data, f"y_capacity_{size}"), capacity(x), rtol=0, atol=0)
            torch.testing.assert_close(scripted(x), capacity(x), rtol=1e-6, atol=1e-6)
        assert int(capacity.dropped_tokens) > 0  # the capacity limit bites at that size
