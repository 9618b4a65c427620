"""router_logits (the router's float32 logits, operands read in their own dtypes): against the float64 product
with a rounding bound, batch and thread-count invariance, gradients, gradcheck, opcheck, TorchScript in a fresh
process, torch.compile, torch.export with a dynamic batch and bad inputs, on every available device."""
import pytest
import torch
import torch.nn.functional as F

import torchmoe
from torchmoe import reference

from conftest import DEVICES, run_python

STORAGE = [torch.float32, torch.bfloat16, torch.float16]
U32 = 2.0 ** -24  # float32 unit roundoff


def check_rounding(got, x, weight):
    """|got - x @ w^T| within the rounding of a float32 sum of d exact products: d / 16 additions in each vector
    lane and a 4-level lane tree (a GEMM's order has a bound of the same form), times sum |x_i w_i|."""
    x64, w64 = x.double().reshape(-1, x.shape[-1]), weight.double()
    exact = x64 @ w64.t()
    magnitude = x64.abs() @ w64.abs().t()
    d = x.shape[-1]
    bound = (d / 16 + 8) * U32 * magnitude * 1.01 + 1e-30
    err = (got.double().reshape(exact.shape) - exact).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype", STORAGE)
@pytest.mark.parametrize("w_dtype", STORAGE)
@pytest.mark.parametrize("T,E,d", [(1, 8, 64), (1, 128, 2048), (3, 7, 1), (5, 33, 15), (17, 16, 17), (40, 60, 300),
                                   (2, 1, 16), (0, 8, 32), (4, 0, 32)])
def test_against_the_float64_product(device, x_dtype, w_dtype, T, E, d):
    x = torch.randn(T, d).to(x_dtype).to(device)
    weight = torch.randn(E, d).to(w_dtype).to(device)
    got = torchmoe.router_logits(x, weight)
    assert got.shape == (T, E) and got.dtype == torch.float32 and got.device == x.device
    check_rounding(got.cpu(), x.cpu(), weight.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_empty_reduction_and_leading_dims(device):
    assert torch.equal(torchmoe.router_logits(torch.randn(3, 0, device=device), torch.randn(5, 0, device=device)),
                       torch.zeros(3, 5, device=device))
    x = torch.randn(2, 3, 24, device=device, dtype=torch.bfloat16)
    weight = torch.randn(6, 24, device=device)
    got = torchmoe.router_logits(x, weight)
    assert got.shape == (2, 3, 6)
    assert torch.equal(got, torchmoe.router_logits(x.reshape(6, 24), weight).reshape(2, 3, 6))
    check_rounding(got.cpu(), x.cpu(), weight.cpu())


def test_non_contiguous_operands():
    x = torch.randn(40, 9)[:, ::3].t()  # [3, 40], strided both ways
    weight = torch.randn(40, 12).t()[:5]  # [5, 40], column-major rows
    assert not x.is_contiguous() and not weight.is_contiguous()
    assert torch.equal(torchmoe.router_logits(x, weight), torchmoe.router_logits(x.contiguous(), weight.contiguous()))


def test_float64_is_the_float64_linear():
    x, weight = torch.randn(7, 30, dtype=torch.float64), torch.randn(9, 30)
    got = torchmoe.router_logits(x, weight)
    assert got.dtype == torch.float64
    assert torch.equal(got, F.linear(x, weight.double()))
    assert torch.equal(got, reference.router_logits(x, weight))


@pytest.mark.parametrize("w_dtype", STORAGE)
def test_a_token_has_the_same_logits_alone_and_in_any_batch(w_dtype):
    # The kernel's order does not depend on the number of rows (a GEMM's changes with the batch).
    x = torch.randn(70, 2048, dtype=torch.bfloat16)
    weight = torch.randn(128, 2048).to(w_dtype)
    batched = torchmoe.router_logits(x, weight)
    for t in (0, 15, 16, 33, 69):
        assert torch.equal(torchmoe.router_logits(x[t:t + 1], weight), batched[t:t + 1])
    assert torch.equal(torchmoe.router_logits(x[5:38], weight), batched[5:38])


@pytest.mark.parametrize("T,E,d", [(1, 128, 2048), (3, 7, 33), (16, 16, 64), (17, 60, 100), (70, 9, 1), (200, 128, 512)])
def test_bfloat16_x_gives_the_bits_of_its_float32_copy(T, E, d):
    # With a bfloat16 weight, bfloat16 x takes its pairs' products by vdpbf16ps where the CPU has AVX-512 BF16 and
    # float32 x by two multiply-adds: the same products added in the same order, so the same bits (subnormals
    # aside, which vdpbf16ps reads as zero; randn has none in bfloat16). The chunks of d a large batch takes
    # (200 x 512) change nothing either.
    g = torch.Generator().manual_seed(T * 1000 + d)
    x = torch.randn(T, d, generator=g).bfloat16()
    weight = torch.randn(E, d, generator=g).bfloat16()
    got = torchmoe.router_logits(x, weight)
    assert torch.equal(got, torchmoe.router_logits(x.float(), weight))
    check_rounding(got, x, weight)


def test_results_do_not_depend_on_thread_count():
    x, weight = torch.randn(37, 500), torch.randn(70, 500, dtype=torch.bfloat16)
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(torchmoe.router_logits(x, weight))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_without_avx512_it_is_the_float32_linear():
    code = """
import torch, torchmoe
import torch.nn.functional as F
x, w = torch.randn(5, 70, dtype=torch.bfloat16), torch.randn(9, 70, dtype=torch.bfloat16)
assert torch.equal(torchmoe.router_logits(x, w), F.linear(x.float(), w.float()))
print("ok")
"""
    assert run_python(code, TORCHMOE_DISABLE_AVX512="1").strip() == "ok"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_gradients_against_the_reference(device, x_dtype, w_dtype):
    x = torch.randn(6, 20).to(x_dtype).to(device).requires_grad_()
    weight = torch.randn(7, 20).to(w_dtype).to(device).requires_grad_()
    grad = torch.randn(6, 7, device=device)
    got = torch.autograd.grad(torchmoe.router_logits(x, weight), (x, weight), grad)
    want = torch.autograd.grad(reference.router_logits(x, weight), (x, weight), grad)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)
    # one operand frozen (a frozen router weight, or tokens without grad)
    (gx,) = torch.autograd.grad(torchmoe.router_logits(x, weight.detach()), x, grad)
    torch.testing.assert_close(gx, want[0])


def test_gradcheck_and_gradgradcheck_float64():
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(torchmoe.router_logits, (x, weight))
    assert torch.autograd.gradgradcheck(torchmoe.router_logits, (x, weight))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for x_dtype, w_dtype, shape in [(torch.float32, torch.float32, (3, 8)), (torch.bfloat16, torch.float32, (2, 2, 8)),
                                    (torch.float64, torch.float64, (0, 8))]:
        x = torch.randn(shape, device=device).to(x_dtype).requires_grad_()
        weight = torch.randn(5, 8, device=device).to(w_dtype).requires_grad_()
        torch.library.opcheck(torch.ops.torchmoe.router_logits.default, (x, weight))


def test_torchscript_save_load_in_a_fresh_process(tmp_path):
    path = tmp_path / "router.pt"

    class Router(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(6, 16, dtype=torch.bfloat16))

        def forward(self, x):
            return torchmoe.router_logits(x, self.weight)

    torch.jit.save(torch.jit.script(Router()), str(path))
    code = f"""
import torch, torchmoe
m = torch.jit.load({str(path)!r})
x = torch.randn(3, 16)
assert torch.equal(m(x), torchmoe.router_logits(x, m.weight))
print("ok")
"""
    assert run_python(code).strip() == "ok"


def test_compile_fullgraph_forward_backward():
    def f(x, weight):
        return torchmoe.router_logits(x * 2, weight).softmax(-1).sum()

    x = torch.randn(5, 16, requires_grad=True)
    weight = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, weight), f(x, weight))
    got = torch.autograd.grad(compiled(x, weight), (x, weight))
    want = torch.autograd.grad(f(x, weight), (x, weight))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_export_with_a_dynamic_batch():
    class Router(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(6, 16))

        def forward(self, x):
            return torchmoe.router_logits(x, self.weight)

    model = Router()
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(model, (torch.randn(4, 16),), dynamic_shapes=({0: batch},))
    for T in (1, 9):
        x = torch.randn(T, 16)
        assert torch.equal(ep.module()(x), model(x))


@pytest.mark.parametrize("device", DEVICES + ["meta"])
def test_bad_inputs(device):
    x, weight = torch.randn(4, 8, device=device), torch.randn(3, 8, device=device)
    with pytest.raises(RuntimeError, match=r"torchmoe::router_logits: argument 'x' must be float16, bfloat16"):
        torchmoe.router_logits(x.long(), weight)
    with pytest.raises(RuntimeError, match=r"argument 'weight' must be float16, bfloat16"):
        torchmoe.router_logits(x, weight.int())
    with pytest.raises(RuntimeError, match=r"argument 'weight' must be a 2-D tensor"):
        torchmoe.router_logits(x, weight[0])
    with pytest.raises(RuntimeError, match=r"argument 'weight' must be \[num_experts, d_model\] with d_model = "):
        torchmoe.router_logits(x, weight[:, :5])
    with pytest.raises(RuntimeError, match=r"argument 'x' must have at least 1 dim"):
        torchmoe.router_logits(x[0, 0], weight)


def test_bad_device():
    with pytest.raises(RuntimeError, match=r"'x' and 'weight' must be on the same device"):
        torchmoe.router_logits(torch.randn(2, 2), torch.randn(2, 2, device="meta"))
