"""swiglu (silu(gate) * up): bit-identical to the eager composite and its autograd for every dtype and shape,
opcheck, gradcheck, TorchScript, torch.compile and bad inputs, on every available device."""
import pytest
import torch
import torch.nn.functional as F

import torchmoe
from torchmoe import reference

from conftest import DEVICES

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# 0 elements, odd sizes, and sizes crossing the CPU kernel's 256 KiB chunks
SHAPES = [(0,), (0, 7), (1,), (5, 3), (2, 3, 17), (70001,), (3, 65537)]


def composite_and_grads(gate, up, grad):
    gate = gate.detach().requires_grad_()
    up = up.detach().requires_grad_()
    out = F.silu(gate) * up
    grads = torch.autograd.grad(out, (gate, up), grad) if out.numel() else (torch.zeros_like(gate),) * 2
    return out.detach(), grads


@pytest.fixture
def one_thread():
    # ATen's own silu splits work at thread boundaries that are not multiples of its vector width, and the
    # elements around a split take its scalar path (a different exp, 1 ulp apart): the composite is bit-stable
    # only on one thread, so compare there. swiglu itself does not depend on the thread count (test below).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bit_identical_to_composite(device, dtype, shape, one_thread):
    gate = (torch.randn(shape, dtype=torch.float64) * 4).to(dtype).to(device).requires_grad_()
    up = torch.randn(shape, dtype=torch.float64).to(dtype).to(device).requires_grad_()
    grad = torch.randn(shape, dtype=torch.float64).to(dtype).to(device)
    out = torchmoe.swiglu(gate, up)
    assert out.shape == gate.shape and out.dtype == dtype and out.is_contiguous()
    expected, (egate, eup) = composite_and_grads(gate, up, grad)
    assert torch.equal(out, expected)
    if out.numel():
        dgate, dup = torch.autograd.grad(out, (gate, up), grad)
        assert torch.equal(dgate, egate)
        assert torch.equal(dup, eup)


def test_results_do_not_depend_on_thread_count():
    gate, up, grad = torch.randn(3, 200001), torch.randn(3, 200001), torch.randn(3, 200001)
    gate.requires_grad_()
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = torchmoe.swiglu(gate, up)
            results.append((out, *torch.autograd.grad(out, gate, grad)))
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    base = torch.randn(64, 40, device=device)
    gate = base[:, ::2]
    up = torch.randn(40, 64, device=device).t()[:, :20]
    assert not gate.is_contiguous() and not up.is_contiguous()
    # (the composite runs ATen's strided scalar path on these, so equal to within rounding)
    torch.testing.assert_close(torchmoe.swiglu(gate, up), reference.swiglu(gate, up), rtol=2e-7, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_extremes(device):
    gate = torch.tensor([-1e4, -100.0, -1.0, 0.0, 1.0, 100.0, 1e4, float("inf"), float("-inf")], device=device)
    up = torch.full_like(gate, 2.0)
    torch.testing.assert_close(torchmoe.swiglu(gate, up), reference.swiglu(gate, up), equal_nan=True)


def test_only_one_input_requires_grad():
    gate = torch.randn(4, 5, requires_grad=True)
    up = torch.randn(4, 5)
    (dgate,) = torch.autograd.grad(torchmoe.swiglu(gate, up).sum(), gate)
    (egate,) = torch.autograd.grad(reference.swiglu(gate, up).sum(), gate)
    assert torch.equal(dgate, egate)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for shape in [(3, 4), (0, 2), (7,)]:
        gate = torch.randn(shape, device=device, requires_grad=True)
        up = torch.randn(shape, device=device, requires_grad=True)
        torch.library.opcheck(torch.ops.torchmoe.swiglu.default, (gate, up))
        grad = torch.randn(shape, device=device)
        torch.library.opcheck(torch.ops.torchmoe._swiglu_backward.default, (grad, gate.detach(), up.detach()))


def test_gradcheck_float64():
    gate = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(torchmoe.swiglu, (gate, up))


def test_torchscript():
    fn = torch.jit.script(torchmoe.swiglu)
    gate, up = torch.randn(6, 8), torch.randn(6, 8)
    assert torch.equal(fn(gate, up), reference.swiglu(gate, up))


def test_compile_fullgraph_forward_backward():
    def f(gate, up):
        return (torchmoe.swiglu(gate * 2, up) + 1).sum()

    gate = torch.randn(5, 9, requires_grad=True)
    up = torch.randn(5, 9, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(gate, up), f(gate, up))
    got = torch.autograd.grad(compiled(gate, up), (gate, up))
    want = torch.autograd.grad(f(gate, up), (gate, up))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES + ["meta"])
def test_bad_inputs(device):
    gate = torch.randn(4, 3, device=device)
    with pytest.raises(RuntimeError, match=r"torchmoe::swiglu: argument 'gate' must be float16, bfloat16"):
        torchmoe.swiglu(gate.long(), gate.long())
    with pytest.raises(RuntimeError, match=r"argument 'up' must have the dtype of 'gate'"):
        torchmoe.swiglu(gate, gate.double())
    with pytest.raises(RuntimeError, match=r"argument 'up' must have the shape of 'gate'"):
        torchmoe.swiglu(gate, torch.randn(3, 4, device=device))
    with pytest.raises(RuntimeError, match=r"argument 'grad_out' must have the shape of 'gate'"):
        torch.ops.torchmoe._swiglu_backward(torch.randn(4, 4, device=device), gate, gate)


def test_bad_device():
    with pytest.raises(RuntimeError, match=r"'gate' and 'up' must be on the same device"):
        torchmoe.swiglu(torch.randn(2, 2), torch.randn(2, 2, device="meta"))
