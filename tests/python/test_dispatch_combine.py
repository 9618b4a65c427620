"""dispatch / combine and their backward ops against torchmoe.reference, on dest maps from real plans."""
import math

import pytest
import torch
import torch._dynamo.testing

import torchmoe
from torchmoe import reference as ref

from conftest import run_python

OPS = torch.ops.torchmoe
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
NUM_EXPERTS = 8

# Results are compared with the reference evaluated in float64 on the same (exactly upcast) inputs.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def make_plan(N, k, capacity_mode, seed=0):
    """dest [N, k] from route_plan on random top-k choices, and the expert buffer's row count.

    capacity_mode "dropless" keeps everything (N * k rows); "tight" gives each expert half its fair share,
    so slots get dropped (-1)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, NUM_EXPERTS, generator=g)
    indices = logits.topk(k, dim=-1).indices
    if capacity_mode == "dropless":
        dest, _ = ref.route_plan(indices, NUM_EXPERTS, -1)
        return dest, N * k
    capacity = math.ceil(0.5 * N * k / NUM_EXPERTS)
    dest, _ = ref.route_plan(indices, NUM_EXPERTS, capacity)
    return dest, NUM_EXPERTS * capacity


def randn(shape, dtype, noncontig, seed):
    """A random tensor, optionally a non-contiguous view (transposed, or a column slice of a wider one)."""
    g = torch.Generator().manual_seed(seed)
    if not noncontig:
        return torch.randn(shape, generator=g).to(dtype)
    rows, cols = shape
    if seed % 2:
        return torch.randn(cols, rows, generator=g).to(dtype).t()
    return torch.randn(rows, cols + 3, generator=g).to(dtype)[:, 1 : cols + 1]


def grads64(fn, inputs, cot_dtype):
    """Reference outputs and gradients (w.r.t. every input) in float64 against a random cotangent.

    The cotangent holds values exact in cot_dtype; it is returned in cot_dtype, for the op under test."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    out = fn(*leaves)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(123)).to(cot_dtype)
    return out.detach(), cot, torch.autograd.grad(out, leaves, cot.double(), allow_unused=True)


SHAPES = [(N, d, k) for N in (0, 1, 7, 1000) for d in (1, 3, 64, 257) for k in (1, 2, 4)]


@pytest.mark.parametrize("mode", ["dropless", "tight"])
@pytest.mark.parametrize("N,d,k", SHAPES)
def test_dispatch_matches_reference(N, d, k, mode):
    dest, R = make_plan(N, k, mode, seed=N + d + k)
    if mode == "tight" and N > 1:
        assert (dest < 0).any()
    for i, dtype in enumerate(DTYPES):
        x = randn((N, d), dtype, noncontig=bool(i % 2), seed=i).requires_grad_()
        out = torchmoe.dispatch(x, dest, R)
        assert out.dtype == dtype and out.shape == (R, d)
        torch.testing.assert_close(out, ref.dispatch(x.detach(), dest, R), rtol=0, atol=0)

        _, cot, (dx_ref,) = grads64(lambda t: ref.dispatch(t, dest, R), [x], dtype)
        (dx,) = torch.autograd.grad(out, x, cot)
        assert dx.dtype == dtype
        torch.testing.assert_close(dx, dx_ref.to(dtype), **TOL[dtype])


WEIGHT_DTYPES = [(dt, dt) for dt in DTYPES] + [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)]


@pytest.mark.parametrize("mode", ["dropless", "tight"])
@pytest.mark.parametrize("N,d,k", SHAPES)
def test_combine_matches_reference(N, d, k, mode):
    dest, R = make_plan(N, k, mode, seed=N * 3 + d + k)
    for i, (dtype, wdtype) in enumerate(WEIGHT_DTYPES):
        noncontig = bool(i % 2)
        e = randn((R, d), dtype, noncontig, seed=i).requires_grad_()
        w = randn((N, k), wdtype, noncontig, seed=i + 10).requires_grad_()
        y = torchmoe.combine(e, dest, w)
        assert y.dtype == dtype and y.shape == (N, d)

        y_ref, cot, (ge_ref, gw_ref) = grads64(lambda a, b: ref.combine(a, dest, b), [e, w], dtype)
        torch.testing.assert_close(y, y_ref.to(dtype), **TOL[dtype])
        ge, gw = torch.autograd.grad(y, (e, w), cot)
        assert ge.dtype == dtype and gw.dtype == wdtype
        torch.testing.assert_close(ge, ge_ref.to(dtype), **TOL[dtype])
        # grad_weights is a dot product over d: allow for the float32 sum's rounding over d terms.
        tol = TOL[wdtype] if wdtype != torch.float32 else dict(rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(gw, gw_ref.to(wdtype), **tol)


def test_combine_after_dispatch_is_weighted_identity():
    N, d, k = 300, 40, 2
    dest, R = make_plan(N, k, "dropless")
    x = torch.randn(N, d)
    w = torch.rand(N, k)
    torch.testing.assert_close(torchmoe.combine(torchmoe.dispatch(x, dest, R), dest, w), x * w.sum(1, keepdim=True))


def test_unfilled_rows_are_zero_and_dropped_slots_read_nothing():
    dest = torch.tensor([[2, -1], [-1, -1], [0, 5]])
    x = torch.arange(12.0).view(3, 4) + 1
    out = torchmoe.dispatch(x, dest, 7)
    expect = torch.zeros(7, 4)
    expect[2], expect[0], expect[5] = x[0], x[2], x[2]
    assert torch.equal(out, expect)
    # Rows no slot reads may hold anything, even inf/nan: combine never touches them.
    e = out.clone()
    e[[1, 3, 4, 6]] = float("nan")
    w = torch.tensor([[0.5, 7.0], [3.0, 4.0], [2.0, 1.0]])
    y = torchmoe.combine(e, dest, w)
    assert torch.equal(y, torch.stack([0.5 * x[0], torch.zeros(4), 3 * x[2]]))


def test_combine_with_repeated_rows():
    # Not a plan's dest (several slots read one row): combine is still a weighted gather, and its
    # backward sums the contributions of every slot into the row.
    dest = torch.tensor([[0, 0], [1, 0], [-1, 1], [2, 0]])
    for dtype in DTYPES:
        e = torch.randn(3, 5).to(dtype).requires_grad_()
        w = torch.rand(4, 2).to(dtype).requires_grad_()
        y = torchmoe.combine(e, dest, w)
        y_ref, cot, (ge_ref, gw_ref) = grads64(lambda a, b: ref.combine(a, dest, b), [e, w], dtype)
        torch.testing.assert_close(y, y_ref.to(dtype), **TOL[dtype])
        ge, gw = torch.autograd.grad(y, (e, w), cot)
        torch.testing.assert_close(ge, ge_ref.to(dtype), **TOL[dtype])
        torch.testing.assert_close(gw, gw_ref.to(dtype), **TOL[dtype])


def test_dispatch_backward_with_repeated_rows():
    # _dispatch_backward is a plain gather-sum; repeated rows are fine there.
    dest = torch.tensor([[1, 1], [0, -1], [2, 1]])
    g = torch.randn(3, 6)
    expect = torch.stack([2 * g[1], g[0], g[2] + g[1]])
    torch.testing.assert_close(OPS._dispatch_backward(g, dest), expect)


@pytest.mark.parametrize("N,d,k,R", [(0, 4, 2, 0), (0, 4, 2, 5), (3, 0, 2, 6), (3, 4, 0, 5), (3, 4, 2, 0)])
def test_empty(N, d, k, R):
    dest = torch.full((N, k), -1, dtype=torch.long)
    if R >= N * k:
        dest = torch.randperm(R)[: N * k].view(N, k)
    x = torch.randn(N, d, requires_grad=True)
    out = torchmoe.dispatch(x, dest, R)
    assert out.shape == (R, d)
    torch.testing.assert_close(out, ref.dispatch(x.detach(), dest, R))
    w = torch.rand(N, k, requires_grad=True)
    y = torchmoe.combine(out, dest, w)
    assert y.shape == (N, d)
    # dest has no repeated row, so combine(dispatch(x)) = x * (sum of kept weights).
    kept = (dest >= 0).float()
    wsum = (w.detach() * kept).sum(1, keepdim=True)
    torch.testing.assert_close(y, x.detach() * wsum)
    cot = torch.randn(N, d)
    dx, dw = torch.autograd.grad(y, (x, w), cot)
    torch.testing.assert_close(dx, cot * wsum)
    torch.testing.assert_close(dw, (cot * x.detach()).sum(1, keepdim=True) * kept)


def test_deterministic_across_thread_counts():
    N, d, k = 1000, 257, 4
    dest, R = make_plan(N, k, "tight")
    x = torch.randn(N, d, dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(N, k, requires_grad=True)

    def run():
        y = torchmoe.combine(torchmoe.dispatch(x, dest, R) * 1.5, dest, w)
        return (y, *torch.autograd.grad(y, (x, w), torch.ones_like(y)))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        many = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


# ---- opcheck, gradcheck, torch.compile ----


def _opcheck_inputs():
    dest, R = make_plan(20, 2, "tight", seed=5)
    x = torch.randn(20, 6, dtype=torch.float64)
    e = torch.randn(R, 6, dtype=torch.float64)
    w = torch.rand(20, 2, dtype=torch.float64)
    g = torch.randn(20, 6, dtype=torch.float64)
    return dest, R, x, e, w, g


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    dest, R, x, e, w, g = _opcheck_inputs()
    x, e, w, g = (t.requires_grad_(requires_grad) for t in (x, e, w, g))
    gout = torch.randn(R, 6, dtype=torch.float64, requires_grad=requires_grad)
    torch.library.opcheck(OPS.dispatch.default, (x, dest, R))
    torch.library.opcheck(OPS._dispatch_backward.default, (gout, dest))
    torch.library.opcheck(OPS.combine.default, (e, dest, w))
    torch.library.opcheck(OPS._combine_backward.default, (g, e, dest, w))


def test_opcheck_mixed_precision_combine():
    dest, R, _, e, w, g = _opcheck_inputs()
    e, g = e.to(torch.bfloat16).requires_grad_(), g.to(torch.bfloat16)
    w = w.float().requires_grad_()
    torch.library.opcheck(OPS.combine.default, (e, dest, w))
    torch.library.opcheck(OPS._combine_backward.default, (g, e.detach(), dest, w.detach()))


def test_gradcheck_float64():
    dest, R, x, e, w, _ = _opcheck_inputs()
    x, e, w = (t.requires_grad_() for t in (x, e, w))
    assert torch.autograd.gradcheck(lambda t: torchmoe.dispatch(t, dest, R), (x,))
    assert torch.autograd.gradcheck(lambda a, b: torchmoe.combine(a, dest, b), (e, w))
    # Double backward (the backward ops are differentiable too).
    assert torch.autograd.gradgradcheck(lambda t: torchmoe.dispatch(t, dest, R), (x,))
    assert torch.autograd.gradgradcheck(lambda a, b: torchmoe.combine(a, dest, b), (e, w))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_matches_eager(dynamic):
    torch._dynamo.reset()

    def layer(x, dest, w, num_rows: int):
        h = torchmoe.dispatch(x, dest, num_rows)
        h = torch.nn.functional.silu(h) * 2.0
        return torchmoe.combine(h, dest, w)

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=dynamic)
    # Two sizes under dynamic shapes: one graph with symbolic N and num_rows serves both.
    for N in (64, 96) if dynamic else (64,):
        dest, R = make_plan(N, 2, "tight", seed=N)
        x = torch.randn(N, 16, requires_grad=True)
        w = torch.rand(N, 2, requires_grad=True)
        y = compiled(x, dest, w, R)
        y_eager = layer(x, dest, w, R)
        torch.testing.assert_close(y, y_eager)
        cot = torch.randn_like(y)
        for a, b in zip(torch.autograd.grad(y, (x, w), cot), torch.autograd.grad(y_eager, (x, w), cot)):
            torch.testing.assert_close(a, b)
    assert counter.frame_count == 1


# ---- bad input: each raises a RuntimeError naming the argument ----


def _good(device="cpu"):
    dest = torch.tensor([[0, 3], [1, -1], [2, 4]], device=device)
    x = torch.randn(3, 4, device=device)
    e = torch.randn(5, 4, device=device)
    w = torch.rand(3, 2, device=device)
    return x, dest, e, w


def test_dispatch_dest_out_of_range():
    x, dest, _, _ = _good()
    with pytest.raises(RuntimeError, match="dest"):
        torchmoe.dispatch(x, dest, 4)
    with pytest.raises(RuntimeError, match="dest"):
        torchmoe.dispatch(x, torch.tensor([[0, -2], [1, 2], [3, 4]]), 6)


@pytest.mark.parametrize("bad", [-2, 10000, 2**62, -(2**62)])
def test_bad_dest_many_threads_first_reported(bad):
    # Bad rows in several parallel chunks, the last one in memory order placed first: every op raises
    # naming the first bad entry in memory order, whatever the thread count (no worker thread decides).
    N, k, R, d = 4000, 2, 10000, 16
    dest = torch.randperm(R)[: N * k].view(N, k)
    dest[::7, 1] = -1
    where = [(3999, 1), (3000, 0), (2001, 1), (1500, 0), (37, 1)]
    for i, (n, j) in enumerate(where):
        dest[n, j] = bad if (n, j) == (37, 1) else R + 100 + i
    pattern = rf"'dest'.*got dest\[37, 1\] = {bad}"
    x, e, w = torch.randn(N, d), torch.randn(R, d), torch.rand(N, k)
    old = torch.get_num_threads()
    try:
        for threads in (1, 4, 16):
            torch.set_num_threads(threads)
            with pytest.raises(RuntimeError, match=pattern):
                torchmoe.dispatch(x, dest, R)
            with pytest.raises(RuntimeError, match=pattern):
                torchmoe.combine(e, dest, w)
            with pytest.raises(RuntimeError, match=pattern):
                OPS._dispatch_backward(e, dest)
            with pytest.raises(RuntimeError, match=pattern):
                OPS._combine_backward(torch.randn(N, d), e, dest, w)
    finally:
        torch.set_num_threads(old)


def test_dispatch_duplicate_dest():
    x, _, _, _ = _good()
    with pytest.raises(RuntimeError, match="dest.*duplicate"):
        torchmoe.dispatch(x, torch.tensor([[0, 3], [1, -1], [3, 4]]), 5)


def test_combine_dest_out_of_range():
    _, dest, e, w = _good()
    with pytest.raises(RuntimeError, match="dest"):
        torchmoe.combine(e[:4], dest, w)
    with pytest.raises(RuntimeError, match="dest"):
        torchmoe.combine(e, dest - 2, w)


def test_backward_ops_dest_out_of_range():
    _, dest, e, w = _good()
    with pytest.raises(RuntimeError, match="dest"):
        OPS._dispatch_backward(e[:4], dest)
    with pytest.raises(RuntimeError, match="dest"):
        OPS._combine_backward(torch.randn(3, 4), e[:4], dest, w)


# Shape/dtype checks run the same on CPU and on Meta (what torch.compile traces with).
DEVICES = ["cpu", "meta"]


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch_x_not_floating(device):
    x, dest, _, _ = _good(device)
    with pytest.raises(RuntimeError, match="'x'"):
        torchmoe.dispatch(x.long(), dest, 5)


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch_x_not_2d(device):
    x, dest, _, _ = _good(device)
    with pytest.raises(RuntimeError, match="'x'"):
        torchmoe.dispatch(x.view(3, 2, 2), dest, 5)


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch_dest_wrong_dtype(device):
    x, dest, _, _ = _good(device)
    with pytest.raises(RuntimeError, match="'dest'"):
        torchmoe.dispatch(x, dest.int(), 5)


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch_dest_not_2d(device):
    x, dest, _, _ = _good(device)
    with pytest.raises(RuntimeError, match="'dest'"):
        torchmoe.dispatch(x, dest.view(-1), 5)


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch_dest_rows_mismatch(device):
    x, dest, _, _ = _good(device)
    with pytest.raises(RuntimeError, match="'dest'"):
        torchmoe.dispatch(x[:2], dest, 5)


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch_negative_num_rows(device):
    x, dest, _, _ = _good(device)
    with pytest.raises(RuntimeError, match="num_rows"):
        torchmoe.dispatch(x, dest.clamp(max=-1), -1)


@pytest.mark.parametrize("device", DEVICES)
def test_combine_weights_shape_mismatch(device):
    _, dest, e, w = _good(device)
    with pytest.raises(RuntimeError, match="'weights'"):
        torchmoe.combine(e, dest, w[:, :1])
    with pytest.raises(RuntimeError, match="'weights'"):
        torchmoe.combine(e, dest, w.reshape(-1))


@pytest.mark.parametrize("device", DEVICES)
def test_combine_weights_not_floating(device):
    _, dest, e, w = _good(device)
    with pytest.raises(RuntimeError, match="'weights'"):
        torchmoe.combine(e, dest, (w * 10).long())


@pytest.mark.parametrize("device", DEVICES)
def test_combine_expert_out_not_2d(device):
    _, dest, e, w = _good(device)
    with pytest.raises(RuntimeError, match="'expert_out'"):
        torchmoe.combine(e.view(5, 2, 2), dest, w)


@pytest.mark.parametrize("device", DEVICES)
def test_combine_expert_out_not_floating(device):
    _, dest, e, w = _good(device)
    with pytest.raises(RuntimeError, match="'expert_out'"):
        torchmoe.combine(e.int(), dest, w)


@pytest.mark.parametrize("device", DEVICES)
def test_combine_dest_wrong_dtype(device):
    _, dest, e, w = _good(device)
    with pytest.raises(RuntimeError, match="'dest'"):
        torchmoe.combine(e, dest.float(), w)


@pytest.mark.parametrize("device", DEVICES)
def test_combine_backward_grad_output_shape(device):
    _, dest, e, w = _good(device)
    with pytest.raises(RuntimeError, match="'grad_output'"):
        OPS._combine_backward(torch.randn(3, 5, device=device), e, dest, w)


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch_backward_grad_out_not_2d(device):
    _, dest, e, _ = _good(device)
    with pytest.raises(RuntimeError, match="'grad_out'"):
        OPS._dispatch_backward(e.view(-1), dest)


def test_avx512_rows_equal_the_portable_loops(tmp_path):
    # combine and the backward ops on its row loops with the AVX-512 conversions and weighted sums, and with
    # TORCHMOE_DISABLE_AVX512=1 (the baseline loops): the same bits, NaN, inf and tails included.
    code = """
import os, torch, torchmoe
torch.manual_seed(0)
ops = torch.ops.torchmoe
outs = []
for dtype in (torch.bfloat16, torch.float32, torch.float16):
    for d in (1, 15, 16, 33, 1024, 1100):
        e = (torch.randn(24, d) * 3).to(dtype)
        e[0, 0] = float("nan")
        e[1, -1] = float("inf")
        dest = torch.randperm(24)[:20].view(10, 2)
        w = torch.randn(10, 2)
        w[0] = 0.5
        y = ops.combine(e, dest, w)
        g = torch.randn(10, d).to(dtype)
        outs += [y, *ops._combine_backward(g, e, dest, w), ops._dispatch_backward(e, dest)]
torch.save(outs, os.environ["OUT"])
print("ok")
"""
    results = []
    for disable in ("1", "0"):
        path = tmp_path / f"rows{disable}.pt"
        assert run_python(code, TORCHMOE_DISABLE_AVX512=disable, OUT=str(path)).strip() == "ok"
        results.append(torch.load(path))
    assert len(results[0]) == len(results[1]) == 72
    for a, b in zip(*results):
        assert a.dtype == b.dtype
        assert torch.equal(a.view(torch.uint8) if a.dtype != torch.float64 else a,
                           b.view(torch.uint8) if b.dtype != torch.float64 else b)
