"""grouped_mm: against torchmoe.reference.grouped_mm (a loop of per-expert matmuls), every dtype,
empty experts, edge-case counts, opcheck, gradcheck, TorchScript, torch.compile and bad inputs."""
import os
import sys

import pytest
import torch

import torchmoe
from torchmoe import reference

from conftest import outputs_of_both_walks, run_python

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


def assert_same_on_thread_counts(x, w, c, grad, thread_counts):
    """out, grad_x and grad_weight are bitwise the same on every thread count."""
    results = []
    old = torch.get_num_threads()
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            out = torchmoe.grouped_mm(x, w, c)
            results.append((out, *torch.autograd.grad(out, (x, w), grad)))
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_deterministic_across_thread_counts():
    x, w, c = make([700, 3, 0, 900], 64, 48, requires_grad=True)
    assert_same_on_thread_counts(x, w, c, torch.randn(x.shape[0], 48), (1, 2))


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
    assert_same_on_thread_counts(x, w, c, grad, (1, 2, 3, 5))


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


# Experts with 1..16 rows (float32, bfloat16, float16) run the skinny kernels for their output and grad_x (one
# pass over the weight, column blocks sized to the thread count); the others run the GEMM, in the same call.
SKINNY_COUNTS = [[1], [2, 0, 3], list(range(17)), [16, 17, 1, 0, 8, 9], [5, 300, 1, 12]]
SKINNY_DIMS = [(1, 1), (7, 5), (33, 70), (64, 129), (130, 1024), (0, 16), (19, 0)]
SKINNY_TOL = {  # out and grad_x: float32 sums of the exact products, rounded once to the dtype
    torch.float32: dict(atol=1e-3, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-3, rtol=2 ** -8),
    torch.float16: dict(atol=1e-3, rtol=2 ** -11),
}
GRAD_WEIGHT_TOL = {torch.float32: dict(atol=2e-3, rtol=1e-4), torch.bfloat16: dict(atol=0.5, rtol=3e-2),
                   torch.float16: dict(atol=5e-2, rtol=1e-2)}


def check_against_reference(counts, d_in, d_out, dtype):
    x, w, c = make(counts, d_in, d_out, dtype=dtype, requires_grad=True)
    grad = torch.randn(x.shape[0], d_out, dtype=torch.float64).to(dtype)
    out = torchmoe.grouped_mm(x, w, c)
    gx, gw = torch.autograd.grad(out, (x, w), grad)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = reference.grouped_mm(xr, wr, c)
    rx, rw = torch.autograd.grad(ref, (xr, wr), grad.double())
    assert out.dtype == gx.dtype == gw.dtype == dtype
    torch.testing.assert_close(out.double(), ref, **SKINNY_TOL[dtype])
    torch.testing.assert_close(gx.double(), rx, **SKINNY_TOL[dtype])
    torch.testing.assert_close(gw.double(), rw, **GRAD_WEIGHT_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("counts", SKINNY_COUNTS)
def test_skinny_experts_match_reference(counts, dtype):
    for d_in, d_out in SKINNY_DIMS:
        check_against_reference(counts, d_in, d_out, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_skinny_results_do_not_depend_on_thread_count(dtype):
    # (bfloat16: the experts of 12 and 40 rows run on AMX where the CPU has it)
    x, w, c = make([1, 0, 2, 16, 5, 40, 3, 9, 12], 96, 200, dtype=dtype, requires_grad=True)
    grad = torch.randn(x.shape[0], 200).to(dtype)
    assert_same_on_thread_counts(x, w, c, grad, (1, 2, 3))


# A bfloat16 forward of 10 to 128 rows per expert runs on AMX where the CPU has it (d_in a multiple of 32, weight
# rows read along): rows around the boundaries, columns around the 64-column strips, a d_in AMX does not take (48),
# weights whose rows have a stride, and Hugging Face's transposed layout (not on AMX).
AMX_COUNTS = [[9, 10, 11, 0, 16, 17], [33, 0, 64, 1], [127, 128, 129, 2]]


def check_bfloat16_products(out, ref):
    # Products of bfloat16 values are exact in float32 on every path; only the float32 sums and the rounding differ.
    err = (out.double() - ref).abs()
    assert bool((err <= ref.abs() * 2.0 ** -8 + 1e-5 * ref.abs().max()).all()), float(err.max())


@pytest.mark.parametrize("d_in,d_out", [(64, 5), (256, 100), (96, 257), (48, 64)])
def test_bfloat16_row_range(d_in, d_out):
    for counts in AMX_COUNTS:
        x, w, c = make(counts, d_in, d_out, dtype=torch.bfloat16)
        check_bfloat16_products(torchmoe.grouped_mm(x, w, c), ref_fp64(x, w, c))
        strided_rows = torch.randn(len(counts), d_in, d_out + 9).bfloat16()[:, :, 4:4 + d_out]
        check_bfloat16_products(torchmoe.grouped_mm(x, strided_rows, c), ref_fp64(x, strided_rows, c))
        transposed = w.transpose(1, 2).contiguous().transpose(1, 2)
        check_bfloat16_products(torchmoe.grouped_mm(x, transposed, c), ref_fp64(x, transposed, c))


def test_bfloat16_row_range_without_amx():
    code = """
import torch, torchmoe
from test_grouped_mm import AMX_COUNTS, check_bfloat16_products, make, ref_fp64
for counts in AMX_COUNTS:
    x, w, c = make(counts, 128, 70, dtype=torch.bfloat16)
    check_bfloat16_products(torchmoe.grouped_mm(x, w, c), ref_fp64(x, w, c))
print("ok")
"""
    env = dict(TORCHMOE_DISABLE_AMX="1", PYTHONPATH=os.pathsep.join([os.path.dirname(__file__)] + sys.path))
    assert run_python(code, **env).strip() == "ok"


def test_bfloat16_dot_product_strips_equal_the_float32_strips():
    # bfloat16 experts of 3 to 16 rows take w's rows in pairs, one vdpbf16ps per row of x (CPUs with AVX-512 BF16;
    # elsewhere the multiply-adds); float32 x and w take the multiply-add strips: the same sums, so the bfloat16
    # result is the float32 one rounded. Odd d_in leaves a last row alone; 771 and 5 columns leave tails of the
    # strips; strided rows; 1 and 2 threads. Without AMX, which takes 10 to 128 bfloat16 rows where present.
    code = """
import torch, torchmoe
g = torch.Generator().manual_seed(0)
for d_in, d_out in [(256, 200), (33, 771), (64, 64), (17, 5), (2048, 96)]:
    for counts in ([3, 0, 5, 8, 16], [12, 1, 2, 7, 9], [4, 4, 4, 4, 4]):
        c = torch.tensor(counts)
        w = torch.randn(5, d_in, d_out + 3, generator=g).bfloat16()[:, :, 2:2 + d_out]
        x = torch.randn(int(c.sum()), d_in, generator=g).bfloat16()
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = torchmoe.grouped_mm(x, w, c)
            assert torch.equal(got, torchmoe.grouped_mm(x.float(), w.float(), c).bfloat16()), (d_in, d_out, counts)
print("ok")
"""
    assert run_python(code, TORCHMOE_DISABLE_AMX="1").strip() == "ok"


def test_skinny_row_walk_equals_the_strips(tmp_path):
    # TORCHMOE_SKINNY_ROW_WALK=1 / 0 forces the row walk of experts with one row (the default on AMD) or the
    # strips (elsewhere; larger experts take the strips either way): the same multiply-adds in the same order, so
    # the same bits, on either CPU.
    code = """
import os, torch, torchmoe
g = torch.Generator().manual_seed(0)
outs = []
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for d_in, d_out in [(7, 5), (64, 129), (300, 2100), (1, 16)]:
        w = torch.randn(6, d_in, d_out + 3, generator=g).to(dtype)[:, :, 2:2 + d_out]  # strided rows
        c = torch.tensor([1, 2, 0, 1, 2, 3])
        x = torch.randn(int(c.sum()), d_in, generator=g).to(dtype)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(torchmoe.grouped_mm(x, w, c))
            outs.append(torchmoe.grouped_mm(x, w.contiguous(), c))
torch.save(outs, os.environ["ROW_WALK_TEST_OUT"])
print("ok")
"""
    strips, walked = outputs_of_both_walks(code, tmp_path)
    assert len(strips) == len(walked) == 48
    for a, b in zip(strips, walked):
        assert torch.equal(a, b)
    x, w, c = make([1, 2, 0, 1], 300, 2100)
    torch.testing.assert_close(torchmoe.grouped_mm(x, w, c), ref_fp64(x, w, c).float(), rtol=1e-5, atol=1e-3)


def test_skinny_portable_kernels():
    # TORCHMOE_DISABLE_AVX512=1 runs the portable C++ versions of the skinny kernels (CPUs without AVX-512).
    code = """
import torch
from test_grouped_mm import SKINNY_COUNTS, check_against_reference
old = torch.get_num_threads()
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for counts in SKINNY_COUNTS:
        for d_in, d_out in [(7, 5), (64, 129), (0, 3)]:
            check_against_reference(counts, d_in, d_out, dtype)
    x = torch.randn(20, 70).to(dtype)
    w = torch.randn(3, 70, 90).to(dtype)
    c = torch.tensor([1, 16, 3])
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        outs.append(torch.ops.torchmoe._grouped_mm_backward(torch.ones(20, 90).to(dtype), x, w, c)[0])
    torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1])
print("ok")
"""
    env = dict(TORCHMOE_DISABLE_AVX512="1", PYTHONPATH=os.pathsep.join([os.path.dirname(__file__)] + sys.path))
    assert run_python(code, **env).strip() == "ok"


def test_skinny_only_calls_from_many_threads_and_forked_children():
    # Calls whose experts are all skinny or on AMX (each thread's kernels keep thread-local buffers) from concurrent
    # Python threads, and from a forked child of a process that already ran them. The child runs one thread,
    # as DataLoader workers do: libgomp's team does not survive fork, so any parallel torch op hangs there.
    code = """
import os, threading, torch, torchmoe
from torchmoe import reference
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
w = torch.randn(4, 96, 300, generator=g)
c = torch.tensor([1, 3, 0, 2])
x = torch.randn(6, 96, generator=g)
want = reference.grouped_mm(x.double(), w.double(), c)
# bfloat16 experts of 12 and 20 rows: AMX where the CPU has it (its tile state is per thread, granted per process)
cb = torch.tensor([12, 20])
xb = torch.randn(32, 96, generator=g).bfloat16()
wb = w[:2].bfloat16()
qb = torchmoe.quantize_weight(w[:2], 4, 32)
want_b = torchmoe.grouped_mm(xb, wb, cb)
want_q = torchmoe.grouped_mm_quantized(xb, qb, cb)
def good():
    return all(torch.allclose(torchmoe.grouped_mm(x, w, c).double(), want, atol=1e-3) and
               torch.equal(torchmoe.grouped_mm(xb, wb, cb), want_b) and
               torch.equal(torchmoe.grouped_mm_quantized(xb, qb, cb), want_q) for _ in range(20))
assert good()
results = []
threads = [threading.Thread(target=lambda: results.append(good())) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join(timeout=60)
assert results == [True] * 4, results
pid = os.fork()
if pid == 0:
    torch.set_num_threads(1)
    os._exit(0 if good() else 1)
assert os.waitpid(pid, 0)[1] == 0 and good()
print("ok")
"""
    assert run_python(code, timeout=120).strip() == "ok"


def test_skinny_inputs_with_strides():
    x, w, c = make([3, 0, 1, 2], 40, 72, dtype=torch.bfloat16)
    x_nc = x.t().contiguous().t()
    w_nc = w.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(torchmoe.grouped_mm(x_nc, w_nc, c).double(), ref_fp64(x, w, c),
                               **SKINNY_TOL[torch.bfloat16])


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


# Hugging Face stores expert weights as [E, d_out, d_in] and passes their transposed view; [gate; up] halves are
# column slices of it. Weights with a unit-stride matrix dim are read in place (GEMM, skinny kernels and BLAS
# paths), any other layout is copied; results and gradients equal those of the contiguous weight.
def strided_weight_views(d_in, d_out, num_experts, dtype, g):
    stored = torch.randn(num_experts, 2 * d_out, d_in, generator=g, dtype=torch.float64).to(dtype)
    rows = torch.randn(num_experts, d_in, 2 * d_out + 3, generator=g, dtype=torch.float64).to(dtype)
    permuted = torch.randn(d_in, num_experts, d_out, generator=g, dtype=torch.float64).to(dtype)
    return {
        "transposed": stored[:, :d_out].transpose(1, 2),
        "transposed column slice": stored.transpose(1, 2)[..., d_out:],
        "row-major column slice": rows[..., 2 : 2 + d_out],
        "expert dim permuted": permuted.transpose(0, 1),
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("counts", [[37, 0, 250, 9], [1, 2, 0, 16], [17, 3, 5, 64]])
def test_strided_weight_views_forward_backward(counts, dtype):
    g = torch.Generator().manual_seed(1)
    for d_in, d_out in [(40, 33), (96, 200), (7, 1), (600, 45)]:  # 600: several pieces of a weight row
        x, _, c = make(counts, d_in, d_out, dtype=dtype, requires_grad=True)
        grad = torch.randn(x.shape[0], d_out, generator=g, dtype=torch.float64).to(dtype)
        for name, view in strided_weight_views(d_in, d_out, len(counts), dtype, g).items():
            w = view.requires_grad_(True)
            out = torchmoe.grouped_mm(x, w, c)
            gx, gw = torch.autograd.grad(out, (x, w), grad)
            dense = w.detach().contiguous().requires_grad_(True)
            want = torchmoe.grouped_mm(x, dense, c)
            wx, ww = torch.autograd.grad(want, (x, dense), grad)
            xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
            ref = reference.grouped_mm(xr, wr, c)
            rx, rw = torch.autograd.grad(ref, (xr, wr), grad.double())
            tol = TOL[dtype] if dtype == torch.float64 else SKINNY_TOL[dtype] if max(counts) <= 16 else TOL[dtype]
            torch.testing.assert_close(out.double(), ref, **tol, msg=lambda m: f"{name}: {m}")
            torch.testing.assert_close(gx.double(), rx, **tol, msg=lambda m: f"{name}: {m}")
            gw_tol = TOL[dtype] if dtype == torch.float64 else GRAD_WEIGHT_TOL[dtype]
            torch.testing.assert_close(gw.double(), rw, **gw_tol, msg=lambda m: f"{name}: {m}")
            if dtype != torch.float64:  # same kernels as the contiguous weight: the same bits where skinny
                skinny_rows = [r for r, n in enumerate(counts) if 0 < n <= 16]
                for e in skinny_rows:
                    lo, hi = sum(counts[:e]), sum(counts[: e + 1])
                    if view.stride(2) == 1:
                        assert torch.equal(out[lo:hi], want[lo:hi]), name


def test_strided_weight_views_do_not_depend_on_thread_count():
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        x, _, c = make([1, 0, 2, 16, 5, 40, 3, 9], 96, 200, dtype=dtype, requires_grad=True)
        grad = torch.randn(x.shape[0], 200).to(dtype)
        for view in strided_weight_views(96, 200, 8, dtype, g).values():
            assert_same_on_thread_counts(x, view.requires_grad_(True), c, grad, (1, 2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_transposed_weight_view_gradient_layout(dtype):
    # The gradient of a transposed weight view comes back in the parameter's own layout (no strided copy into
    # param.grad), and the Meta kernel declares the same strides as the CPU kernel (opcheck compares them).
    x, _, c = make([3, 0, 40, 9], 24, 20, dtype=dtype)
    param = torch.randn(4, 20, 24, dtype=torch.float64).to(dtype).requires_grad_(True)  # [E, d_out, d_in]
    grad = torch.randn(x.shape[0], 20, dtype=torch.float64).to(dtype)
    _, gw = torch.ops.torchmoe._grouped_mm_backward(grad, x, param.detach().transpose(1, 2), c)
    assert gw.shape == (4, 24, 20) and gw.transpose(1, 2).is_contiguous()
    torch.library.opcheck(torch.ops.torchmoe._grouped_mm_backward, (grad, x, param.detach().transpose(1, 2), c))
    torch.library.opcheck(torch.ops.torchmoe.grouped_mm, (x, param.transpose(1, 2), c))
    torchmoe.grouped_mm(x, param.transpose(1, 2), c).backward(grad)
    assert param.grad.is_contiguous()
    want = reference.grouped_mm(x.double(), param.detach().double().transpose(1, 2), c)
    torch.testing.assert_close(torchmoe.grouped_mm(x, param.transpose(1, 2), c).double(), want, **TOL[dtype])
