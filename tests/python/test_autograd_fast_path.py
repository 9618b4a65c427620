"""The autograd kernels skip torch::autograd::Function when there is no graph to record (grad mode off, or no
input requiring grad): same outputs, no grad_fn; with a graph, a node as before; a forward-mode tangent still
reaches the Function (which rejects it) instead of being dropped silently."""
import pytest
import torch
from torch.autograd.forward_ad import dual_level, make_dual

import torchmoe


def _calls():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g)
    logits = torch.randn(6, 4, generator=g)
    weights, indices = torchmoe.topk_gating(logits, 2)
    dest, counts = torchmoe.route_plan(indices, 4, -1)
    rows = torchmoe.dispatch(x, dest, 12)
    weight = torch.randn(4, 8, 5, generator=g)
    qw = torchmoe.quantize_weight(weight, 4, group_size=4)
    gate, up = torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g)
    return {
        "topk_gating": (lambda a: torchmoe.topk_gating(a, 2)[0], logits),
        "dispatch": (lambda a: torchmoe.dispatch(a, dest, 12), x),
        "combine": (lambda a: torchmoe.combine(a, dest, weights), rows),
        "grouped_mm": (lambda a: torchmoe.grouped_mm(a, weight, counts), rows),
        "grouped_mm_quantized": (lambda a: torchmoe.grouped_mm_quantized(a, qw, counts), rows),
        "swiglu": (lambda a: torchmoe.swiglu(a, up), gate),
    }


@pytest.mark.parametrize("op", list(_calls()))
def test_no_graph_no_node_same_values(op):
    fn, arg = _calls()[op]
    with_graph = fn(arg.clone().requires_grad_())
    assert with_graph.grad_fn is not None
    without = fn(arg)  # grad mode on, nothing requires grad
    assert without.grad_fn is None and not without.requires_grad
    with torch.no_grad():
        no_grad = fn(arg.clone().requires_grad_())
    assert no_grad.grad_fn is None and not no_grad.requires_grad
    with torch.inference_mode():
        inference = fn(arg)
    assert torch.equal(without, with_graph.detach()) and torch.equal(no_grad, without)
    assert torch.equal(inference, without)


@pytest.mark.parametrize("op", list(_calls()))
def test_forward_mode_tangent_is_not_dropped(op):
    fn, arg = _calls()[op]
    with dual_level():
        dual = make_dual(arg, torch.ones_like(arg))
        with pytest.raises(RuntimeError, match="jvp is not implemented"):
            fn(dual)
