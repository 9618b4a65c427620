"""CUDA kernels of every torchmoe op against torchmoe.reference (and the CPU kernels where they exist).

Every test needs a GPU and a CUDA build of torchmoe; without them the whole file is skipped.
"""
import math
import subprocess
import sys
import textwrap

import pytest
import torch

import torchmoe
from torchmoe import reference

from conftest import run_python

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and torchmoe.built_with_cuda()),
    reason="needs a GPU and torchmoe built with CUDA kernels",
)

DEV = "cuda"
OPS = torch.ops.torchmoe
FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"torchmoe::{op}", key)


def needs(op: str, key: str):
    return pytest.mark.skipif(not has_kernel(op, key), reason=f"torchmoe::{op} has no {key} kernel in this build")


def tol(dtype):
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-12),
        torch.float32: dict(rtol=2e-5, atol=1e-6),
        torch.float16: dict(rtol=2e-3, atol=1e-4),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1e-4),
    }[dtype]


# ------------------------------------------------------------------------------------------------ topk_gating

TOPK_SHAPES = [  # (E, k): warp rows (sorted lists, rescans), block rows, k = E, k > 32, k > block
    (1, 1), (2, 2), (8, 3), (33, 33), (64, 2), (64, 40), (160, 6), (256, 8), (500, 12), (1024, 7),
    (2048, 8), (2048, 300), (5000, 20),
]


@pytest.mark.parametrize("E,k", TOPK_SHAPES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("score_func,renormalize", [("softmax", True), ("softmax", False), ("sigmoid", True),
                                                    ("sigmoid", False)])
def test_topk_gating_matches_reference(E, k, dtype, score_func, renormalize):
    T = 97 if E <= 1024 else 23
    logits = torch.randn(T, E, dtype=torch.float32).to(dtype)
    w, i = torchmoe.topk_gating(logits.to(DEV), k, score_func, renormalize, scale=1.5)
    rw, ri = reference.topk_gating(logits, k, score_func, renormalize, scale=1.5)
    assert i.dtype == torch.int64 and w.dtype == dtype
    assert torch.equal(i.cpu(), ri)
    torch.testing.assert_close(w.cpu(), rw, **tol(dtype))
    if has_kernel("topk_gating", "CPU"):
        cw, ci = torchmoe.topk_gating(logits, k, score_func, renormalize, scale=1.5)
        assert torch.equal(i.cpu(), ci)
        torch.testing.assert_close(w.cpu(), cw, **tol(dtype))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("E,k,G,topg", [(256, 8, 8, 4), (64, 6, 4, 2), (16, 4, 16, 4), (96, 5, 3, 1),
                                        (4096, 8, 16, 4)])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_topk_gating_bias_and_groups(dtype, E, k, G, topg, score_func, with_bias):
    T = 61
    logits = torch.randn(T, E).to(dtype)
    bias = torch.randn(E) * 0.1 if with_bias else None
    args = (k, score_func, True, bias, G, topg, 1.0)
    w, i = torchmoe.topk_gating(logits.to(DEV), k, score_func, True,
                                None if bias is None else bias.to(DEV), G, topg, 1.0)
    rw, ri = reference.topk_gating(logits, *args)
    assert torch.equal(i.cpu(), ri)
    torch.testing.assert_close(w.cpu(), rw, **tol(dtype))


def test_topk_gating_ties_nan_and_leading_dims():
    # Ties go to the lower expert; -0 equals +0; NaN ranks first (as torch.sort).
    logits = torch.tensor([[0.0, -0.0, 1.0, 1.0, -1.0, 0.0], [float("nan"), 2.0, 2.0, 0.0, -0.0, 1.0]])
    _, i = torchmoe.topk_gating(logits.to(DEV), 4)
    _, ri = reference.topk_gating(logits, 4)
    assert torch.equal(i.cpu(), ri)
    # Leading dims and a non-contiguous input.
    x = torch.randn(5, 64, 3).transpose(1, 2)  # [5, 3, 64], not contiguous
    w, i = torchmoe.topk_gating(x.to(DEV), 4)
    rw, ri = reference.topk_gating(x, 4)
    assert w.shape == (5, 3, 4) and torch.equal(i.cpu(), ri)
    torch.testing.assert_close(w.cpu(), rw)
    # Equal bf16 logits everywhere: the lowest experts, equal weights.
    w, i = torchmoe.topk_gating(torch.zeros(4, 256, dtype=torch.bfloat16, device=DEV), 8)
    assert torch.equal(i.cpu(), torch.arange(8).expand(4, 8))
    assert torch.all(w == 0.125)


def test_topk_gating_empty():
    w, i = torchmoe.topk_gating(torch.empty(0, 16, device=DEV), 2)
    assert w.shape == (0, 2) and i.shape == (0, 2)
    g = OPS._topk_gating_backward(torch.empty(0, 2, device=DEV), torch.empty(0, 16, device=DEV),
                                  torch.empty(0, 2, dtype=torch.long, device=DEV), "softmax", True, 1.0)
    assert g.shape == (0, 16)


@pytest.mark.parametrize("E,k", [(1, 1), (8, 8), (64, 2), (256, 8), (500, 40), (2048, 8), (2048, 300)])
@pytest.mark.parametrize("score_func,renormalize", [("softmax", True), ("softmax", False), ("sigmoid", True),
                                                    ("sigmoid", False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_topk_gating_backward_matches_reference(E, k, score_func, renormalize, dtype):
    T = 37
    logits = torch.randn(T, E, dtype=torch.float64)
    _, idx = reference.topk_gating(logits.to(dtype), k, score_func, renormalize)
    g = torch.randn(T, k, dtype=torch.float64)
    got = OPS._topk_gating_backward(g.to(DEV, dtype), logits.to(DEV, dtype), idx.to(DEV), score_func,
                                    renormalize, 0.7)
    # Reference gradient (float64) for the same logits (rounded to dtype) and the same selection.
    leaf = logits.to(dtype).double().clone().requires_grad_(True)
    w, ri = reference.topk_gating(leaf, k, score_func, renormalize, scale=0.7)
    assert torch.equal(ri, idx)
    (w * g.to(dtype).double()).sum().backward()
    assert got.dtype == dtype and got.shape == logits.shape
    torch.testing.assert_close(got.cpu().double(), leaf.grad, **tol(dtype))


def test_topk_gating_backward_repeated_experts():
    # Slots naming the same expert add up (in slot order), like the CPU kernel.
    logits = torch.randn(3, 10, dtype=torch.float64)
    idx = torch.tensor([[1, 1, 4], [0, 9, 0], [2, 3, 5]])
    g = torch.randn(3, 3, dtype=torch.float64)
    for score_func, renorm in [("softmax", False), ("sigmoid", True), ("sigmoid", False)]:
        got = OPS._topk_gating_backward(g.to(DEV), logits.to(DEV), idx.to(DEV), score_func, renorm, 1.0)
        if has_kernel("_topk_gating_backward", "CPU"):
            want = OPS._topk_gating_backward(g, logits, idx, score_func, renorm, 1.0)
            torch.testing.assert_close(got.cpu(), want)
        leaf = logits.clone().requires_grad_(True)
        s = torch.softmax(leaf, -1) if score_func == "softmax" else torch.sigmoid(leaf)
        w = s.gather(-1, idx)
        if renorm:
            w = w / w.sum(-1, keepdim=True)
        (w * g).sum().backward()
        torch.testing.assert_close(got.cpu(), leaf.grad)


@needs("topk_gating", "Autograd")
def test_topk_gating_autograd_on_cuda():
    logits = torch.randn(50, 64, dtype=torch.float64, device=DEV, requires_grad=True)
    torch.autograd.gradcheck(lambda x: torchmoe.topk_gating(x, 4, "softmax", True)[0], (logits,))
    torch.autograd.gradcheck(lambda x: torchmoe.topk_gating(x, 4, "sigmoid", False, scale=2.0)[0], (logits,))


# ------------------------------------------------------------------------------------------------ route_plan

def _priority(shape, ties=True):
    p = torch.randn(shape)
    return p.mul(2).round() if ties else p


@pytest.mark.parametrize("T", [0, 1, 7, 1000, 5000])
@pytest.mark.parametrize("E,k", [(1, 1), (8, 2), (64, 8), (256, 8)])
@pytest.mark.parametrize("capacity", [-1, 0, 1, 3, "cf", "big"])
def test_route_plan_bit_identical(T, E, k, capacity):
    idx = torch.randint(0, E, (T, k))
    cap = {"cf": max(1, int(1.25 * T * k / E)), "big": T + 1}.get(capacity, capacity)
    dest, counts = torchmoe.route_plan(idx.to(DEV), E, cap)
    rd, rc = reference.route_plan(idx, E, cap)
    assert dest.dtype == torch.int64 and counts.dtype == torch.int64
    assert torch.equal(dest.cpu(), rd) and torch.equal(counts.cpu(), rc)
    if has_kernel("route_plan", "CPU"):
        cd, cc = torchmoe.route_plan(idx, E, cap)
        assert torch.equal(dest.cpu(), cd) and torch.equal(counts.cpu(), cc)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("priority", [None, "token", "choice"])
@pytest.mark.parametrize("capacity", [-1, 2, 40])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_route_plan_groups_priority(grouped, priority, capacity, index_dtype):
    G, T, k, E = 3, 300, 4, 16
    shape = (G, T, k) if grouped else (T, k)
    idx = torch.randint(0, E, shape, dtype=index_dtype)
    prio = None
    if priority == "token":
        prio = _priority(shape[:-1])
    elif priority == "choice":
        prio = _priority(shape)
    dest, counts = torchmoe.route_plan(idx.to(DEV), E, capacity, None if prio is None else prio.to(DEV))
    rd, rc = reference.route_plan(idx, E, capacity, prio)
    assert torch.equal(dest.cpu(), rd) and torch.equal(counts.cpu(), rc)
    if has_kernel("route_plan", "CPU"):
        cd, cc = torchmoe.route_plan(idx, E, capacity, prio)
        assert torch.equal(dest.cpu(), cd) and torch.equal(counts.cpu(), cc)


@pytest.mark.parametrize("T,E,k,G", [(70000, 64, 2, 1), (3000, 2000, 3, 2), (20, 5000, 2, 4), (4096, 1, 1, 1)])
def test_route_plan_many_chunks_and_wide(T, E, k, G):
    # Several chunks per rank, and expert counts past the shared-memory histogram/counters.
    idx = torch.randint(0, E, (G, T, k))
    for cap in (-1, 3):
        dest, counts = torchmoe.route_plan(idx.to(DEV), E, cap)
        rd, rc = reference.route_plan(idx, E, cap)
        assert torch.equal(dest.cpu(), rd) and torch.equal(counts.cpu(), rc)


def test_route_plan_dropless_is_a_permutation():
    idx = torch.randint(0, 32, (4000, 4), device=DEV)
    dest, counts = torchmoe.route_plan(idx, 32)
    assert torch.equal(dest.flatten().sort().values, torch.arange(16000, device=DEV))
    assert torch.equal(counts, torch.bincount(idx.flatten(), minlength=32))


# ------------------------------------------------------------------------------------------------ dispatch / combine

def _plan(N, E, k, capacity, device=DEV):
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(N)]) if N else torch.empty(0, k, dtype=torch.long)
    dest, _ = reference.route_plan(idx, E, capacity)
    rows = N * k if capacity < 0 else E * capacity
    return dest.to(device), rows


DC_CASES = [  # (N, d, k, E, capacity): 16-byte rows, odd rows (scalar path), drops, one column, k = 1
    (1, 8, 1, 4, -1), (37, 64, 2, 8, -1), (200, 33, 3, 8, 40), (129, 1, 4, 8, 10), (300, 4096, 2, 16, 20),
    (64, 200, 8, 8, -1), (500, 96, 1, 4, 50), (0, 16, 2, 4, -1),
]


@pytest.mark.parametrize("N,d,k,E,capacity", DC_CASES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_dispatch_combine_match_reference(N, d, k, E, capacity, dtype):
    dest, rows = _plan(N, E, k, capacity)
    x = torch.randn(N, d).to(dtype)
    out = torchmoe.dispatch(x.to(DEV), dest, rows)
    assert torch.equal(out.cpu(), reference.dispatch(x, dest.cpu(), rows))
    eo = torch.randn(rows, d).to(dtype)
    for wdtype in {dtype, torch.float32}:
        w = torch.rand(N, k).to(wdtype)
        y = torchmoe.combine(eo.to(DEV), dest, w.to(DEV))
        assert y.dtype == dtype
        want = reference.combine(eo.double(), dest.cpu(), w.double()).to(dtype)
        torch.testing.assert_close(y.cpu(), want, **tol(dtype))
        if has_kernel("combine", "CPU"):
            torch.testing.assert_close(y.cpu(), torchmoe.combine(eo, dest.cpu(), w), **tol(dtype))


@pytest.mark.parametrize("N,d,k,E,capacity", DC_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_dispatch_combine_backward_match_reference(N, d, k, E, capacity, dtype):
    dest, rows = _plan(N, E, k, capacity)
    gout = torch.randn(rows, d).to(dtype)
    dx = OPS._dispatch_backward(gout.to(DEV), dest)
    xl = torch.zeros(N, d, dtype=torch.float64, requires_grad=True)
    reference.dispatch(xl, dest.cpu(), rows).backward(gout.double())
    torch.testing.assert_close(dx.cpu(), xl.grad.to(dtype), **tol(dtype))

    eo = torch.randn(rows, d).to(dtype)
    for wdtype in {dtype, torch.float32}:
        w = torch.rand(N, k).to(wdtype)
        gy = torch.randn(N, d).to(dtype)
        geo, gw = OPS._combine_backward(gy.to(DEV), eo.to(DEV), dest, w.to(DEV))
        assert geo.dtype == dtype and gw.dtype == wdtype
        eol = eo.double().clone().requires_grad_(True)
        wl = w.double().clone().requires_grad_(True)
        reference.combine(eol, dest.cpu(), wl).backward(gy.double())
        torch.testing.assert_close(geo.cpu(), eol.grad.to(dtype), **tol(dtype))
        # A dot product over d: float32 rounding grows like sqrt(d).
        t = {torch.bfloat16: dict(rtol=2e-2, atol=1e-2), torch.float32: dict(rtol=1e-4, atol=4e-6 * math.sqrt(d)),
             torch.float64: dict(rtol=1e-10, atol=1e-12)}[dtype]
        if wdtype == torch.float32 and dtype == torch.float64:  # computed in float64, returned in float32
            t = dict(rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gw.cpu().double(), wl.grad, **t)


def test_combine_backward_repeated_rows():
    # Slots naming the same row (never so in a plan) add up, in slot order.
    dest = torch.tensor([[0, 2], [2, -1], [0, 2]], device=DEV)
    eo = torch.randn(4, 24, dtype=torch.float64)
    w = torch.rand(3, 2, dtype=torch.float64)
    gy = torch.randn(3, 24, dtype=torch.float64)
    geo, gw = OPS._combine_backward(gy.to(DEV), eo.to(DEV), dest, w.to(DEV))
    eol, wl = eo.clone().requires_grad_(True), w.clone().requires_grad_(True)
    reference.combine(eol, dest.cpu(), wl).backward(gy)
    torch.testing.assert_close(geo.cpu(), eol.grad)
    torch.testing.assert_close(gw.cpu(), wl.grad)
    assert torch.all(geo[1] == 0) and torch.all(geo[3] == 0)


def test_dispatch_repeated_rows_deterministic():
    # A row named twice holds the later (token, choice), every run.
    dest = torch.tensor([[3, 0], [3, -1]], device=DEV)
    x = torch.arange(2 * 16, dtype=torch.float32, device=DEV).view(2, 16)
    out = torchmoe.dispatch(x, dest, 5)
    assert torch.equal(out[3], x[1]) and torch.equal(out[0], x[0])
    assert torch.all(out[[1, 2, 4]] == 0)


def test_dispatch_combine_noncontiguous():
    dest, rows = _plan(50, 8, 2, -1)
    x = torch.randn(24, 50, dtype=torch.float16).t()  # non-contiguous rows of 24 halves (scalar path)
    out = torchmoe.dispatch(x.to(DEV), dest, rows)
    assert torch.equal(out.cpu(), reference.dispatch(x, dest.cpu(), rows))
    eo = torch.randn(48, rows, dtype=torch.float16).t()
    w = torch.rand(2, 50).t()
    y = torchmoe.combine(eo.to(DEV), dest, w.to(DEV))
    torch.testing.assert_close(y.cpu(), reference.combine(eo.double(), dest.cpu(), w.double()).half(),
                               **tol(torch.float16))


# ------------------------------------------------------------------------------------------------ grouped_mm

def _counts(N, E, zeros=True):
    if E == 1:
        return torch.tensor([N])
    cuts = torch.sort(torch.randint(0, N + 1, (E - 1,))).values
    c = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([N])]))
    if zeros and E > 2:
        c[1] += c[0]
        c[0] = 0
    return c


GMM_CASES = [(64, 4, 16, 24), (300, 8, 64, 128), (513, 3, 40, 72), (7, 5, 8, 8), (0, 3, 16, 16), (100, 1, 33, 17)]


@pytest.mark.parametrize("N,E,d_in,d_out", GMM_CASES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_grouped_mm_matches_reference(N, E, d_in, d_out, dtype):
    counts = _counts(N, E)
    x = torch.randn(N, d_in, dtype=torch.float64)
    w = torch.randn(E, d_in, d_out, dtype=torch.float64) / math.sqrt(d_in)
    out = torchmoe.grouped_mm(x.to(DEV, dtype), w.to(DEV, dtype), counts.to(DEV))
    want = reference.grouped_mm(x.to(dtype).double(), w.to(dtype).double(), counts)
    assert out.dtype == dtype and out.shape == (N, d_out)
    t = dict(rtol=2e-2, atol=2e-2) if dtype in (torch.bfloat16, torch.float16) else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.cpu().double(), want, **t)

    gy = torch.randn(N, d_out, dtype=torch.float64)
    gx, gw = OPS._grouped_mm_backward(gy.to(DEV, dtype), x.to(DEV, dtype), w.to(DEV, dtype), counts.to(DEV))
    xl = x.to(dtype).double().clone().requires_grad_(True)
    wl = w.to(dtype).double().clone().requires_grad_(True)
    reference.grouped_mm(xl, wl, counts).backward(gy.to(dtype).double())
    tb = dict(rtol=3e-2, atol=5e-2) if dtype in (torch.bfloat16, torch.float16) else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx.cpu().double(), xl.grad, **tb)
    torch.testing.assert_close(gw.cpu().double(), wl.grad, **tb)
    if counts[0] == 0 and E > 2:
        assert torch.all(gw[0] == 0)


def test_grouped_mm_own_kernel_in_bf16():
    # The own tiled kernel, forced where torch's grouped GEMM would run (a fresh process reads the switch).
    code = textwrap.dedent("""
        import math, torch, torchmoe
        from torchmoe import reference
        torch.manual_seed(0)
        counts = torch.tensor([0, 100, 37, 127])
        x = torch.randn(264, 64).bfloat16()
        w = (torch.randn(4, 64, 48) / 8).bfloat16()
        out = torchmoe.grouped_mm(x.cuda(), w.cuda(), counts.cuda())
        torch.testing.assert_close(out.cpu().double(), reference.grouped_mm(x.double(), w.double(), counts),
                                   rtol=2e-2, atol=2e-2)
        gx, gw = torch.ops.torchmoe._grouped_mm_backward(out, x.cuda(), w.cuda(), counts.cuda())
        xl, wl = x.double().requires_grad_(True), w.double().requires_grad_(True)
        reference.grouped_mm(xl, wl, counts).backward(out.cpu().double())
        torch.testing.assert_close(gx.cpu().double(), xl.grad, rtol=3e-2, atol=5e-2)
        torch.testing.assert_close(gw.cpu().double(), wl.grad, rtol=3e-2, atol=5e-2)
        print("ok")
    """)
    assert "ok" in run_python(code, TORCHMOE_GROUPED_MM_FALLBACK="1")


# ------------------------------------------------------------------------------------------------ every op

def _all_ops_once(seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    T, E, k, d = 3000, 64, 4, 128
    logits = torch.randn(T, E, generator=g).to(DEV, torch.bfloat16)
    w, idx = torchmoe.topk_gating(logits, k)
    gl = OPS._topk_gating_backward(torch.randn(T, k, generator=g).to(DEV, torch.bfloat16), logits, idx,
                                   "softmax", False, 1.0)
    dest, counts = torchmoe.route_plan(idx, E, -1)
    dest_c, _ = torchmoe.route_plan(idx, E, 100, torch.randn(T, generator=g).to(DEV))
    x = torch.randn(T, d, generator=g).to(DEV, torch.bfloat16)
    buf = torchmoe.dispatch(x, dest, T * k)
    buf_c = torchmoe.dispatch(x, dest_c, E * 100)
    wt = torch.randn(E, d, d, generator=g).to(DEV, torch.bfloat16)
    h = torchmoe.grouped_mm(buf, wt, counts)
    gh, gwt = OPS._grouped_mm_backward(h, buf, wt, counts)
    y = torchmoe.combine(h, dest, w.float())
    geo, gw = OPS._combine_backward(y, h, dest, w.float())
    dx = OPS._dispatch_backward(buf_c, dest_c)
    return [w, idx, gl, dest, counts, dest_c, buf, buf_c, h, gh, gwt, y, geo, gw, dx]


def test_every_op_is_deterministic():
    a, b = _all_ops_once(1), _all_ops_once(1)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_device_mismatch_is_rejected():
    x = torch.randn(4, 8, device=DEV)
    with pytest.raises(RuntimeError, match="dest"):
        torchmoe.dispatch(x, torch.zeros(4, 1, dtype=torch.long), 4)
    with pytest.raises(RuntimeError, match="expert_bias"):
        torchmoe.topk_gating(torch.randn(4, 8, device=DEV), 2, expert_bias=torch.zeros(8))
    with pytest.raises(RuntimeError, match="counts"):
        torchmoe.grouped_mm(x, torch.randn(2, 8, 8, device=DEV), torch.tensor([2, 2]))


@pytest.mark.parametrize("call", [
    "torchmoe.route_plan(torch.tensor([[0, 9]], device='cuda'), 4)",
    "torchmoe.dispatch(torch.ones(2, 8, device='cuda'), torch.tensor([[0], [5]], device='cuda'), 3)",
    "torchmoe.grouped_mm(torch.ones(5, 8, device='cuda'), torch.ones(2, 8, 8, device='cuda'),"
    " torch.tensor([2, 2], device='cuda'))",
])
def test_values_out_of_range_stop_the_kernel(call):
    # Value errors are device assertions (no host sync): the call fails instead of writing out of bounds.
    code = f"import torch, torchmoe\n{call}\ntorch.cuda.synchronize()\nprint('no error')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "no error" not in r.stdout
    assert "assert" in r.stderr.lower()


OPCHECK_CASES = {
    "topk_gating": lambda: (torch.randn(40, 64, device=DEV), 4, "softmax", True, None, 1, 1, 1.0),
    "topk_gating_groups": lambda: (torch.randn(40, 64, device=DEV), 4, "sigmoid", True,
                                   torch.randn(64, device=DEV), 8, 2, 2.5),
    "route_plan": lambda: (torch.randint(0, 8, (50, 2), device=DEV), 8, 10, torch.randn(50, device=DEV)),
    "dispatch": lambda: (torch.randn(50, 32, device=DEV), _plan(50, 8, 2, -1)[0], 100),
    "combine": lambda: (torch.randn(100, 32, device=DEV), _plan(50, 8, 2, -1)[0], torch.rand(50, 2, device=DEV)),
    "grouped_mm": lambda: (torch.randn(60, 16, device=DEV), torch.randn(3, 16, 8, device=DEV),
                           torch.tensor([20, 0, 40], device=DEV)),
}


OPCHECK_GRAD_ARGS = {"topk_gating": (0,), "dispatch": (0,), "combine": (0, 2), "grouped_mm": (0, 1)}


@pytest.mark.parametrize("name", sorted(OPCHECK_CASES))
def test_opcheck_cuda(name):
    op = name.replace("_groups", "")
    if not has_kernel(op, "Meta"):
        pytest.skip(f"torchmoe::{op} has no Meta kernel in this build")
    args = list(OPCHECK_CASES[name]())
    if has_kernel(op, "Autograd"):
        for i in OPCHECK_GRAD_ARGS.get(op, ()):
            args[i] = args[i].requires_grad_(True)
    torch.library.opcheck(getattr(OPS, op).default, tuple(args))


def _routed_layer(logits, x, w1, k, E):
    weights, idx = torchmoe.topk_gating(logits, k)
    dest, counts = torchmoe.route_plan(idx, E)
    buf = torchmoe.dispatch(x, dest, x.shape[0] * k)
    h = torchmoe.grouped_mm(buf, w1, counts)
    return torchmoe.combine(h, dest, weights)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compile_reduce_overhead_routed_layer(dtype):
    for op in ("topk_gating", "route_plan", "dispatch", "grouped_mm", "combine"):
        if not has_kernel(op, "Meta"):
            pytest.skip(f"torchmoe::{op} has no Meta kernel in this build")
    torch._dynamo.reset()
    T, E, k, d = 512, 16, 2, 64
    logits = torch.randn(T, E, device=DEV, dtype=dtype)
    x = torch.randn(T, d, device=DEV, dtype=dtype)
    w1 = torch.randn(E, d, d, device=DEV, dtype=dtype) / 8
    compiled = torch.compile(_routed_layer, mode="reduce-overhead", fullgraph=True)
    eager = _routed_layer(logits, x, w1, k, E)
    for _ in range(3):  # warm-up, record, replay
        got = compiled(logits, x, w1, k, E)
    assert torch.equal(got, eager)
    logits2 = torch.randn(T, E, device=DEV, dtype=dtype)
    logits.copy_(logits2)  # replay on new values in the same buffers
    got = compiled(logits, x, w1, k, E)
    assert torch.equal(got, _routed_layer(logits, x, w1, k, E))


def test_dispatch_combine_buffer_past_int32():
    # T=65536, k=8, d=4096 bf16: the dispatched buffer holds 2^31 elements (4 GiB).
    T, k, d, E = 65536, 8, 4096, 256
    free, _ = torch.cuda.mem_get_info()
    if free < 14 * 2**30:
        pytest.skip("needs about 14 GiB of free GPU memory")
    idx = torch.randn(T, E, device=DEV).topk(k, dim=-1).indices
    dest, _ = torchmoe.route_plan(idx, E)
    x = torch.randn(T, d, device=DEV, dtype=torch.bfloat16)
    buf = torchmoe.dispatch(x, dest, T * k)
    assert buf.numel() == 2**31
    # Every row, the last ones (offsets past 2^31) included, holds its token.
    token_of_row = torch.empty(T * k, dtype=torch.long, device=DEV)
    token_of_row[dest.flatten()] = torch.arange(T, device=DEV).repeat_interleave(k)
    for start in range(0, T * k, 65536):
        rows = slice(start, start + 65536)
        assert torch.equal(buf[rows], x[token_of_row[rows]])
    # Weights 1/k: the combine gives each token back exactly.
    y = torchmoe.combine(buf, dest, torch.full((T, k), 1.0 / k, device=DEV))
    assert torch.equal(y, x)
    del buf
    dx = OPS._dispatch_backward(torchmoe.dispatch(x, dest, T * k), dest)
    assert torch.equal(dx, (x.float() * k).bfloat16())
