"""grouped_mm: against torchmoe.reference.grouped_mm (a loop of per-expert matmuls), every dtype,
empty experts, edge-case counts, opcheck, gradcheck, TorchScript, torch.compile and bad inputs."""
import pytest
import torch

import torchmoe
from torchmoe import reference

from conftest import run_python

TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=5e-2, rtol=2e-2),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
}


def make(counts, d_in, d_out, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts, dtype=torch.long)
    n = int(counts.sum())
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
    w = torch.randn(len(counts), d_in, d_out, generator=g, dtype=torch.float64).to(dtype)
    w = w.requires_grad_(requires_grad)
    return x, w, counts


def ref_fp64(x, w, counts):
    return reference.grouped_mm(x.double(), w.double(), counts)


COUNTS = [
    [5],
    [0],
    [0, 0, 0],
    [3, 0, 4],
    [0, 7, 0, 0],
    [1, 1, 1, 1, 1, 1, 1, 1],
    [300, 0, 1, 257, 0, 64],
    [1000, 0],
    [0, 0, 513],
]


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("dims", [(4, 5), (16, 1), (33, 70)])
def test_matches_reference_float32(counts, dims):
    x, w, c = make(counts, *dims)
    out = torchmoe.grouped_mm(x, w, c)
    assert out.shape == (x.shape[0], dims[1]) and out.dtype == x.dtype
    torch.testing.assert_close(out, reference.grouped_mm(x, w, c), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    x, w, c = make([40, 0, 300, 7], 24, 40, dtype=dtype)
    out = torchmoe.grouped_mm(x, w, c)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref_fp64(x, w, c), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_backward_matches_reference(dtype):
    x, w, c = make([40, 0, 300, 7, 1], 24, 40, dtype=dtype, requires_grad=True)
    grad = torch.randn(x.shape[0], 40, dtype=torch.float64).to(dtype)
    gx, gw = torch.autograd.grad(torchmoe.grouped_mm(x, w, c), (x, w), grad)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rx, rw = torch.autograd.grad(reference.grouped_mm(xr, wr, c), (xr, wr), grad.double())
    tol = dict(TOL[dtype])
    if dtype == torch.bfloat16:
        tol = dict(atol=0.5, rtol=3e-2)  # grad_weight sums up to 300 bf16 products
    torch.testing.assert_close(gx.double(), rx, **tol)
    torch.testing.assert_close(gw.double(), rw, **tol)
    assert gx.dtype == dtype and gw.dtype == dtype
    assert torch.all(gw[1] == 0), "an expert without rows gets a zero gradient"


def test_empty_inputs():
    x, w, c = make([0, 0], 8, 3, requires_grad=True)
    out = torchmoe.grouped_mm(x, w, c)
    assert out.shape == (0, 3)
    gx, gw = torch.autograd.grad(out.sum(), (x, w))
    assert gx.shape == (0, 8) and torch.all(gw == 0)
    # no experts at all
    out = torchmoe.grouped_mm(torch.randn(0, 4), torch.randn(0, 4, 2), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, 2)


def test_zero_width():
    x, w, c = make([3, 2], 0, 4, requires_grad=True)
    out = torchmoe.grouped_mm(x, w, c)
    assert out.shape == (5, 4) and torch.all(out == 0)
    x, w, c = make([3, 2], 4, 0)
    assert torchmoe.grouped_mm(x, w, c).shape == (5, 0)


def test_non_contiguous_inputs():
    x, w, c = make([7, 0, 20, 5], 12, 9)
    x_nc = x.t().contiguous().t()  # same values, column-major
    w_nc = w.transpose(1, 2).contiguous().transpose(1, 2)
    assert not x_nc.is_contiguous() and not w_nc.is_contiguous()
    torch.testing.assert_close(torchmoe.grouped_mm(x_nc, w_nc, c), reference.grouped_mm(x, w, c))
    wide = torch.randn(x.shape[0], 24)[:, ::2]
    torch.testing.assert_close(torchmoe.grouped_mm(wide, w, c), reference.grouped_mm(wide, w, c))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_strided_weight_views_forward_backward(dtype):
    # Hugging Face stores expert weights as [E, d_out, d_in] and passes their transposed view; a column slice of
    # that view ([gate; up] halves) and a view with the expert dim permuted (copied inside) must give the same
    # results and gradients as contiguous weights.
    x, _, c = make([37, 0, 250, 9], 40, 33, dtype=dtype, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    param = torch.randn(4, 66, 40, generator=g, dtype=dtype, requires_grad=True)  # [E, 2 * d_out, d_in]
    permuted = torch.randn(40, 4, 33, generator=g, dtype=dtype, requires_grad=True)
    views = [param.transpose(1, 2), param.transpose(1, 2)[..., 33:], permuted.transpose(0, 1)]
    grad = torch.randn(x.shape[0], 66, generator=g, dtype=dtype)
    for w in views:
        out = torchmoe.grouped_mm(x, w, c)
        dense = w.detach().contiguous().requires_grad_(True)
        ref = reference.grouped_mm(x, dense, c)
        torch.testing.assert_close(out, ref, **TOL[dtype])
        gx, gw = torch.autograd.grad(out, (x, w), grad[:, : out.shape[1]])
        rx, rw = torch.autograd.grad(ref, (x, dense), grad[:, : out.shape[1]])
        torch.testing.assert_close(gx, rx, **TOL[dtype])
        torch.testing.assert_close(gw, rw, **TOL[dtype])
    param.grad = None
    torchmoe.grouped_mm(x, param.transpose(1, 2), c).backward(grad)
    ref_param = param.detach().clone().requires_grad_(True)
    reference.grouped_mm(x, ref_param.transpose(1, 2), c).backward(grad)
    torch.testing.assert_close(param.grad, ref_param.grad, **TOL[dtype])


def test_deterministic_across_thread_counts():
    x, w, c = make([700, 3, 0, 900], 64, 48, requires_grad=True)
    grad = torch.randn(x.shape[0], 48)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = torchmoe.grouped_mm(x, w, c)
            results.append((out, *torch.autograd.grad(out, (x, w), grad)))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# float32 on an AVX-512 CPU runs torchmoe's blocked GEMM: 256-deep reduction blocks, 240-row and 1024-column
# blocks, 12 x 32 tiles. These shapes cross every block and tile edge, in forward and in both backward products.
@pytest.mark.parametrize("counts,d_in,d_out", [
    ([245, 0, 13, 600], 300, 40),
    ([37, 250], 7, 1100),
    ([1, 12, 13, 31, 33], 513, 65),
])
def test_float32_block_edges_forward_backward(counts, d_in, d_out):
    x, w, c = make(counts, d_in, d_out, requires_grad=True)
    grad = torch.randn(x.shape[0], d_out, dtype=torch.float64)
    out = torchmoe.grouped_mm(x, w, c)
    gx, gw = torch.autograd.grad(out, (x, w), grad.float())
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = reference.grouped_mm(xr, wr, c)
    rx, rw = torch.autograd.grad(ref, (xr, wr), grad)
    tol = dict(atol=2e-3, rtol=1e-4)  # sums of up to 600 float32 products of N(0, 1) values
    torch.testing.assert_close(out.double(), ref, **tol)
    torch.testing.assert_close(gx.double(), rx, **tol)
    torch.testing.assert_close(gw.double(), rw, **tol)


def test_float32_results_do_not_depend_on_thread_count():
    # The work is cut into blocks sized to the thread count; every result bit must stay the same.
    x, w, c = make([500, 3, 0, 900, 77], 300, 200, requires_grad=True)
    grad = torch.randn(x.shape[0], 200)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(threads)
            out = torchmoe.grouped_mm(x, w, c)
            results.append((out, *torch.autograd.grad(out, (x, w), grad)))
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_float32_without_avx512_kernel():
    # TORCHMOE_DISABLE_AVX512=1 switches float32 to the BLAS path (as on CPUs without AVX-512).
    code = """
import torch, torchmoe
from torchmoe import reference
g = torch.Generator().manual_seed(0)
c = torch.tensor([300, 0, 41])
x = torch.randn(341, 70, generator=g, requires_grad=True)
w = torch.randn(3, 70, 90, generator=g, requires_grad=True)
grad = torch.randn(341, 90, generator=g)
out = torchmoe.grouped_mm(x, w, c)
gx, gw = torch.autograd.grad(out, (x, w), grad)
rx, rw = torch.autograd.grad(reference.grouped_mm(x, w, c), (x, w), grad)
torch.testing.assert_close(out, reference.grouped_mm(x, w, c), atol=1e-4, rtol=1e-4)
torch.testing.assert_close(gx, rx, atol=1e-3, rtol=1e-4)
torch.testing.assert_close(gw, rw, atol=1e-3, rtol=1e-4)
assert torch.all(gw[1] == 0)
print("ok")
"""
    assert run_python(code, TORCHMOE_DISABLE_AVX512="1").strip() == "ok"


def test_meta_shapes():
    x = torch.empty(10, 6, device="meta")
    w = torch.empty(3, 6, 4, device="meta")
    c = torch.empty(3, dtype=torch.long, device="meta")
    assert torchmoe.grouped_mm(x, w, c).shape == (10, 4)
    gx, gw = torch.ops.torchmoe._grouped_mm_backward(torch.empty(10, 4, device="meta"), x, w, c)
    assert gx.shape == (10, 6) and gw.shape == (3, 6, 4)


@pytest.mark.parametrize("counts", [[3, 0, 4], [0, 0], [6]])
def test_opcheck(counts):
    x, w, c = make(counts, 5, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.torchmoe.grouped_mm.default, (x, w, c))
    grad = torch.randn(x.shape[0], 3)
    torch.library.opcheck(torch.ops.torchmoe._grouped_mm_backward.default, (grad, x.detach(), w.detach(), c))


def test_gradcheck_float64():
    x, w, c = make([2, 0, 3, 1], 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: torchmoe.grouped_mm(a, b, c), (x, w))


def test_torchscript():
    @torch.jit.script
    def f(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torchmoe.grouped_mm(x, w, c) * 2.0

    x, w, c = make([4, 0, 9], 6, 5)
    torch.testing.assert_close(f(x, w, c), 2.0 * reference.grouped_mm(x, w, c))


def test_compile_fullgraph_matches_eager():
    def f(x, w1, w2, c):
        return torchmoe.grouped_mm(torch.relu(torchmoe.grouped_mm(x, w1, c)), w2, c)

    x, w1, c = make([9, 0, 14, 3], 8, 16, requires_grad=True)
    w2 = torch.randn(4, 16, 8, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for counts in ([9, 0, 14, 3], [1, 20, 0, 5]):  # same shapes, other counts: no recompile needed
        c = torch.tensor(counts)
        out_e = f(x, w1, w2, c)
        out_c = compiled(x, w1, w2, c)
        torch.testing.assert_close(out_c, out_e)
        ge = torch.autograd.grad(out_e.sum(), (x, w1, w2))
        gc = torch.autograd.grad(out_c.sum(), (x, w1, w2))
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b)


def test_compile_inductor():
    x, w, c = make([5, 2, 0, 8], 8, 6)
    compiled = torch.compile(lambda a, b, cc: torch.tanh(torchmoe.grouped_mm(a, b, cc)), fullgraph=True)
    torch.testing.assert_close(compiled(x, w, c), torch.tanh(reference.grouped_mm(x, w, c)))


# --- bad inputs: one test per check, each naming the argument ----------------------------------------


def good():
    return make([2, 3], 4, 5)


def test_bad_x_dim():
    x, w, c = good()
    with pytest.raises(RuntimeError, match="'x'.*2-D"):
        torchmoe.grouped_mm(x.reshape(-1), w, c)


def test_bad_x_dtype():
    x, w, c = good()
    with pytest.raises(RuntimeError, match="'x'.*float"):
        torchmoe.grouped_mm(x.long(), w.long(), c)


def test_bad_weight_dim():
    x, w, c = good()
    with pytest.raises(RuntimeError, match="'weight'.*3-D"):
        torchmoe.grouped_mm(x, w[0], c)


def test_bad_weight_dtype():
    x, w, c = good()
    with pytest.raises(RuntimeError, match="'weight'.*dtype"):
        torchmoe.grouped_mm(x, w.double(), c)


def test_bad_weight_d_in():
    x, w, c = good()
    with pytest.raises(RuntimeError, match="'weight'.*d_in"):
        torchmoe.grouped_mm(x, w[:, :3], c)


def test_bad_counts_dtype():
    x, w, c = good()
    with pytest.raises(RuntimeError, match="'counts'.*Long"):
        torchmoe.grouped_mm(x, w, c.int())


def test_bad_counts_dim():
    x, w, c = good()
    with pytest.raises(RuntimeError, match="'counts'.*1-D"):
        torchmoe.grouped_mm(x, w, c.view(1, 2))


def test_bad_counts_size():
    x, w, c = good()
    with pytest.raises(RuntimeError, match="'counts'.*one entry per expert"):
        torchmoe.grouped_mm(x, w, torch.tensor([2, 3, 0]))


def test_bad_counts_negative():
    x, w, _ = good()
    with pytest.raises(RuntimeError, match="'counts'.*non-negative"):
        torchmoe.grouped_mm(x, w, torch.tensor([-1, 6]))


@pytest.mark.parametrize("counts", [[2, 2], [5, 1], [0, 0]])
def test_bad_counts_sum(counts):
    x, w, _ = good()
    with pytest.raises(RuntimeError, match="'counts'.*sum to x.size"):
        torchmoe.grouped_mm(x, w, torch.tensor(counts))


@pytest.mark.parametrize("op", ["forward", "backward"])
def test_bad_counts_sum_overflow(op):
    # 5 + (2**63 - 1) + (2**63 - 1) + 7 wraps int64 to 10 = x.size(0): the running sum must be checked
    # before it can overflow, or huge counts pass and the kernel loops over ~2**55 row blocks.
    x, w = torch.randn(10, 4), torch.randn(4, 4, 3)
    counts = torch.tensor([5, 2**63 - 1, 2**63 - 1, 7])
    with pytest.raises(RuntimeError, match="'counts'.*sum to x.size"):
        if op == "forward":
            torchmoe.grouped_mm(x, w, counts)
        else:
            torch.ops.torchmoe._grouped_mm_backward(torch.randn(10, 3), x, w, counts)


def test_bad_counts_sum_backward():
    x, w, _ = good()
    with pytest.raises(RuntimeError, match="'counts'.*sum to x.size"):
        torch.ops.torchmoe._grouped_mm_backward(torch.randn(5, 5), x, w, torch.tensor([1, 1]))


def test_bad_counts_sum_meta_is_not_checked_but_shapes_are():
    # Meta kernels only see shapes: they reject the same shape errors as the CPU kernel.
    x = torch.empty(5, 4, device="meta")
    w = torch.empty(2, 4, 5, device="meta")
    with pytest.raises(RuntimeError, match="'counts'.*one entry per expert"):
        torchmoe.grouped_mm(x, w, torch.empty(3, dtype=torch.long, device="meta"))


def test_bad_grad_output_shape():
    x, w, c = good()
    with pytest.raises(RuntimeError, match="'grad_output'.*shape"):
        torch.ops.torchmoe._grouped_mm_backward(torch.randn(5, 4), x, w, c)


def test_bad_device():
    x, w, c = good()
    with pytest.raises(RuntimeError, match="'x' and 'weight'.*same device"):
        torchmoe.grouped_mm(x, w.to("meta"), c)
