"""The ops together: a routed layer in eager, TorchScript (saved and loaded in a fresh process) and
torch.compile, against the plain-PyTorch reference."""
import textwrap

import pytest
import torch

import torchmoe
from torchmoe import reference

from conftest import run_python


class RoutedLayer(torch.nn.Module):
    """Router -> top-k -> plan -> dispatch -> one linear per expert -> combine, all through torchmoe ops."""

    def __init__(self, d: int, num_experts: int, k: int, capacity: int):
        super().__init__()
        self.k = k
        self.num_experts = num_experts
        self.capacity = capacity
        self.router = torch.nn.Parameter(torch.randn(d, num_experts) * 0.3)
        self.experts = torch.nn.Parameter(torch.randn(num_experts, d, d) / d**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, indices = torchmoe.topk_gating(x @ self.router, self.k)
        dest, counts = torchmoe.route_plan(indices, self.num_experts, self.capacity)
        buf = torchmoe.dispatch(x, dest, self.num_experts * self.capacity)
        out = torch.bmm(buf.view(self.num_experts, self.capacity, x.shape[-1]), self.experts)
        return torchmoe.combine(out.reshape(self.num_experts * self.capacity, x.shape[-1]), dest, weights)


def reference_layer(layer: RoutedLayer, x: torch.Tensor) -> torch.Tensor:
    weights, indices = reference.topk_gating(x @ layer.router, layer.k)
    dest, _ = reference.route_plan(indices, layer.num_experts, layer.capacity)
    buf = reference.dispatch(x, dest, layer.num_experts * layer.capacity)
    out = torch.bmm(buf.view(layer.num_experts, layer.capacity, x.shape[-1]), layer.experts)
    return reference.combine(out.reshape(layer.num_experts * layer.capacity, x.shape[-1]), dest, weights)


def _grads(layer, x, fn):
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    y = fn(x)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad, layer.router.grad.clone(), layer.experts.grad.clone()


@pytest.mark.parametrize("capacity", [0, 3, 12, 64])
def test_layer_matches_reference(capacity):
    layer = RoutedLayer(16, 4, 2, capacity)
    x = torch.randn(32, 16)
    ours = _grads(layer, x, layer)
    ref = _grads(layer, x, lambda t: reference_layer(layer, t))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_matches_eager():
    layer = RoutedLayer(16, 4, 2, 10)
    x = torch.randn(40, 16)
    eager = _grads(layer, x, layer)
    compiled = torch.compile(layer, fullgraph=True)
    got = _grads(layer, x, compiled)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_torchscript_saved_module_runs_in_fresh_process(tmp_path):
    layer = RoutedLayer(16, 4, 2, 10)
    x = torch.randn(40, 16)
    y, dx, drouter, dexperts = _grads(layer, x, layer)
    scripted = torch.jit.script(layer)
    path = tmp_path / "routed.pt"
    scripted.save(str(path))
    torch.save({"x": x, "y": y, "dx": dx, "drouter": drouter, "dexperts": dexperts}, tmp_path / "expected.pt")

    # The fresh process imports only torchmoe (for the ops), never this test's module.
    script = textwrap.dedent(
        f"""
        import torch, torchmoe
        m = torch.jit.load({str(path)!r})
        e = torch.load({str(tmp_path / "expected.pt")!r})
        x = e["x"].clone().requires_grad_(True)
        y = m(x)
        y.backward(torch.ones_like(y))
        torch.testing.assert_close(y, e["y"])
        torch.testing.assert_close(x.grad, e["dx"])
        params = dict(m.named_parameters())
        torch.testing.assert_close(params["router"].grad, e["drouter"])
        torch.testing.assert_close(params["experts"].grad, e["dexperts"])
        print("fresh-process-ok")
        """
    )
    assert "fresh-process-ok" in run_python(script)


def test_torchscript_graph_calls_the_ops():
    scripted = torch.jit.script(RoutedLayer(8, 2, 1, 4))
    graph = str(scripted.inlined_graph)
    for op in ("topk_gating", "route_plan", "dispatch", "combine"):
        assert f"torchmoe::{op}" in graph


def test_capacity_helper():
    # The seed: k=3, capacity factor 1.1, seq 4, E 5 -> floor(3 * 1.1 * 4 / 5) = 2.
    assert torchmoe.capacity(4, 5, 3, 1.1) == 2
    assert torchmoe.capacity(65536, 64, 2, 1.25) == 2560
    assert torchmoe.capacity(10, 2, 2, 100.0) == 10  # never more than the number of tokens
    assert torchmoe.capacity(10, 64, 1, 1.0, min_capacity=4) == 4
    assert torchmoe.capacity(0, 4, 2, 1.0) == 0
    with pytest.raises(ValueError, match="num_experts"):
        torchmoe.capacity(10, 0, 1, 1.0)
    with pytest.raises(ValueError, match="capacity_factor"):
        torchmoe.capacity(10, 2, 1, -1.0)
