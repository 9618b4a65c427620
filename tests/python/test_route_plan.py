"""torchmoe.route_plan against torchmoe.reference.route_plan (the seed's one-hot queue and cumsum)."""
import contextlib
import math
import random

import pytest
import torch
import torch.nn.functional as F

import torchmoe
from torchmoe import reference

OP = torch.ops.torchmoe.route_plan.default


def _gen(*key):
    return torch.Generator().manual_seed(hash(key) % (2**31))


def _indices(shape, E, gen, distinct=False):
    """Random expert ids; distinct=True gives per-token distinct ids, as top-k routing does."""
    if distinct:
        logits = torch.randn(*shape[:-1], E, generator=gen)
        return logits.topk(shape[-1], dim=-1).indices
    return torch.randint(0, E, shape, generator=gen)


def _priority(mode, shape, gen):
    if mode is None:
        return None
    if mode == "T":
        return torch.randn(shape[:-1], generator=gen)
    if mode == "Tk":
        return torch.randn(shape, generator=gen)
    if mode == "ties":  # few distinct values: ties broken by token index
        return torch.randint(0, 3, shape[:-1], generator=gen).float()
    if mode == "ties_k":
        return torch.randint(0, 2, shape, generator=gen).to(torch.float64)
    raise AssertionError(mode)


@contextlib.contextmanager
def _one_thread():
    # The checking code runs on one thread: ATen's parallel kernels crawl when this shared 2-core machine
    # is oversubscribed. The op under test keeps the default thread count.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _ref(*args):
    with _one_thread():
        return reference.route_plan(*args)


def _assert_same(got, want):
    assert got[0].dtype == torch.int64 and got[1].dtype == torch.int64
    assert got[0].shape == want[0].shape and got[1].shape == want[1].shape
    assert torch.equal(got[0], want[0]), "dest differs from the reference"
    assert torch.equal(got[1], want[1]), "counts differ from the reference"


def _capacities(T, E, k):
    return sorted({-1, 0, 1, 2, int(k * 1.25 * T / E), torchmoe.capacity(T, E, k, 1.0), T + 3})


def _check_layout(dest, counts, E, capacity):
    """Invariants that hold whatever the queue order is."""
    with _one_thread():
        _check_layout_impl(dest, counts, E, capacity)


def _check_layout_impl(dest, counts, E, capacity):
    G = counts.shape[0] if counts.dim() == 2 else 1
    flat = dest.reshape(-1)
    kept = flat[flat >= 0]
    assert kept.unique().numel() == kept.numel(), "two slots share a row"
    if capacity < 0:
        assert torch.equal(flat.sort().values, torch.arange(flat.numel())), "dropless rows are not a permutation"
    else:
        assert (kept < E * G * capacity).all()
        assert kept.numel() == counts.clamp(max=capacity).sum()


# T x E grid; k, groups, priorities and capacities vary inside each case.
@pytest.mark.parametrize("T", [0, 1, 7, 1000, 4096])
@pytest.mark.parametrize("E", [1, 2, 8, 64, 160, 256])
def test_matches_reference(T, E):
    rng = random.Random(T * 1000 + E)
    ks = sorted({1, min(2, E), E, rng.randint(1, E)})
    budget = 3_000_000  # elements of the reference's one-hot per call, to keep the suite fast
    for G in (None, 1, 3):
        groups = 1 if G is None else G
        for k in ks:
            if groups * T * k * E > budget:
                continue
            shape = (T, k) if G is None else (G, T, k)
            gen = _gen("ref", T, E, G, k)
            idx = _indices(shape, E, gen, distinct=rng.random() < 0.5)
            modes = [None, "T", "Tk", "ties", "ties_k"] if T * k * E <= 200_000 else [None, rng.choice(["T", "Tk", "ties"])]
            for mode in modes:
                prio = _priority(mode, shape, gen)
                for cap in _capacities(T, E, k):
                    got = torchmoe.route_plan(idx, E, cap, prio)
                    _assert_same(got, _ref(idx, E, cap, prio))
                    _check_layout(got[0], got[1], E, cap)


def test_large_k_and_experts_sampled():
    # k up to E with bigger E where the reference stays affordable.
    for E, T, k in [(160, 50, 160), (256, 30, 256), (256, 200, 97), (64, 500, 64)]:
        gen = _gen("bigk", E, T, k)
        idx = _indices((T, k), E, gen, distinct=True)
        prio = torch.randn(T, generator=gen)
        for cap in (-1, 0, 1, T // 2, T + 1):
            _assert_same(torchmoe.route_plan(idx, E, cap, prio), _ref(idx, E, cap, prio))
            _assert_same(torchmoe.route_plan(idx, E, cap), _ref(idx, E, cap))


@pytest.mark.parametrize("grouped", [False, True])
def test_int32_and_noncontiguous(grouped):
    gen = _gen("nc", grouped)
    T, E, k = 777, 12, 3
    base = torch.randint(0, E, (2, k, T, 2) if grouped else (k, T, 2), generator=gen)
    # [.., T, k] views with strides in every dim.
    idx = base[..., 0].transpose(-1, -2)
    assert not idx.is_contiguous()
    prio_base = torch.randn((2, T, 2 * k) if grouped else (T, 2 * k), generator=gen)
    prio_k = prio_base[..., ::2]
    prio_t = prio_base[..., 1]
    assert not prio_k.is_contiguous() and not prio_t.is_contiguous()
    for cap in (-1, 0, 5, 300):
        for prio in (None, prio_k, prio_t):
            want = _ref(idx.contiguous(), E, cap, None if prio is None else prio.contiguous())
            _assert_same(torchmoe.route_plan(idx, E, cap, prio), want)
            _assert_same(torchmoe.route_plan(idx.to(torch.int32), E, cap, prio), want)


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool]
)
def test_priority_dtypes(dtype):
    gen = _gen("pd", str(dtype))
    T, E, k = 600, 6, 2
    idx = _indices((T, k), E, gen)
    if dtype.is_floating_point:
        raw = torch.randn(T, k, generator=gen) * 3
        prio = raw.to(dtype)  # rounding to half/bf16 creates ties
    elif dtype == torch.bool:
        prio = torch.randint(0, 2, (T, k), generator=gen).bool()
    else:
        lo = 0 if dtype == torch.uint8 else -5
        prio = torch.randint(lo, 6, (T, k), generator=gen).to(dtype)
    for p in (prio, prio[:, 0]):
        for cap in (-1, 50, 120):
            _assert_same(torchmoe.route_plan(idx, E, cap, p), _ref(idx, E, cap, p))


def test_priority_special_floats():
    # torch.sort puts NaN above +inf and treats -0.0 as equal to 0.0; the queue must do the same.
    gen = _gen("special")
    T, E, k = 400, 4, 2
    idx = _indices((2, T, k), E, gen)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-300, -1e-300, 5e-324])
    pick = torch.randint(0, len(specials) + 1, (2, T, k), generator=gen)
    prio = torch.where(pick < len(specials), specials[pick.clamp(max=len(specials) - 1)],
                       torch.randn(2, T, k, generator=gen, dtype=torch.float64))
    for p in (prio, prio.float(), prio.half(), prio[..., 1]):
        for cap in (-1, 100):
            _assert_same(torchmoe.route_plan(idx, E, cap, p), _ref(idx, E, cap, p))


def _seed_mask(top_k_mapping, num_experts, capacity):
    """The seed notebook's steps, verbatim in spirit: one-hot, rank-major queue, cumsum <= capacity."""
    batch_size, sequence_length, top_k = top_k_mapping.shape
    sel = F.one_hot(top_k_mapping, num_classes=num_experts).permute(0, 2, 1, 3)
    queue = sel.reshape(batch_size, top_k * sequence_length, num_experts)
    mask = torch.cumsum(queue, dim=1) <= capacity
    mask = mask.reshape(batch_size, top_k, sequence_length, num_experts)
    return (mask * sel).sum(-1).permute(0, 2, 1).bool()  # [B, T, k]: slot kept


def test_seed_example():
    batch_size, sequence_length, num_experts, top_k, capacity_factor = 1, 4, 5, 3, 1.1
    capacity = math.floor((top_k * capacity_factor * sequence_length) / num_experts)
    assert capacity == 2 == torchmoe.capacity(sequence_length, num_experts, top_k, capacity_factor)
    # The notebook's top_k_mapping and its printed final_selection (slot kept or not).
    mapping = torch.tensor([[[2, 1, 4], [1, 2, 3], [1, 2, 3], [4, 3, 0]]])
    notebook_kept = torch.tensor([[[1, 0, 1], [1, 1, 1], [1, 0, 0], [1, 1, 1]]], dtype=torch.bool)
    assert torch.equal(_seed_mask(mapping, num_experts, capacity), notebook_kept)

    dest, counts = torchmoe.route_plan(mapping, num_experts, capacity)  # batch as groups
    assert torch.equal(dest >= 0, notebook_kept)
    assert torch.equal(counts, F.one_hot(mapping, num_experts).sum((1, 2)))
    dest1, _ = torchmoe.route_plan(mapping[0], num_experts, capacity)
    assert torch.equal(dest1, dest[0])
    _assert_same((dest, counts), _ref(mapping, num_experts, capacity))

    # Fresh tokens through the notebook's router shapes: the kept mask is the seed's.
    torch.manual_seed(0)
    for _ in range(20):
        tokens = torch.rand(batch_size, sequence_length, 10)
        router = torch.nn.Linear(10, num_experts)
        _, top_k_mapping = router(tokens).topk(k=top_k, dim=2)
        dest, _ = torchmoe.route_plan(top_k_mapping, num_experts, capacity)
        assert torch.equal(dest >= 0, _seed_mask(top_k_mapping, num_experts, capacity))


def test_empty():
    for shape in [(0, 2), (3, 0, 2), (0, 0, 2), (5, 0), (2, 4, 0)]:
        idx = torch.zeros(shape, dtype=torch.int64)
        prio = torch.zeros(shape[:-1])
        for cap in (-1, 0, 4):
            for p in (None, prio):
                got = torchmoe.route_plan(idx, 7, cap, p)
                assert got[0].shape == shape and got[0].dtype == torch.int64
                assert torch.equal(got[1], torch.zeros(((shape[0],) if len(shape) == 3 else ()) + (7,), dtype=torch.int64))
                _assert_same(got, _ref(idx, 7, cap, p))


def test_many_small_groups():
    # Parallel over groups: G large, T small.
    gen = _gen("groups")
    G, T, E, k = 257, 9, 16, 2
    idx = _indices((G, T, k), E, gen, distinct=True)
    prio = torch.randn(G, T, generator=gen)
    for cap in (-1, 0, 1, 2):
        for p in (None, prio):
            _assert_same(torchmoe.route_plan(idx, E, cap, p), _ref(idx, E, cap, p))


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_thread_count_invariance(restore_threads):
    # Several chunks per group, chunk edges inside choice ranks; the chunking follows the thread count.
    gen = _gen("threads")
    cases = [
        (_indices((20011, 4), 64, gen), 64, None),
        (_indices((20011, 4), 64, gen), 64, torch.randn(20011, 4, generator=gen)),
        (_indices((3, 9001, 3), 7, gen), 7, torch.randint(0, 4, (3, 9001), generator=gen).float()),
        (_indices((40, 300, 2), 5, gen), 5, None),
        (_indices((50000, 1), 1, gen), 1, None),
    ]
    for idx, E, prio in cases:
        T, k = idx.shape[-2:]
        for cap in (-1, int(k * 1.25 * T / E), 3):
            outs = []
            for n in (1, 2, 3, 4):
                torch.set_num_threads(n)
                outs.append(torchmoe.route_plan(idx, E, cap, prio))
            for o in outs[1:]:
                _assert_same(o, outs[0])
            _assert_same(outs[0], _ref(idx, E, cap, prio))


def test_priority_requires_grad_passes_through():
    idx = torch.randint(0, 4, (10, 2))
    prio = torch.randn(10, requires_grad=True)
    dest, counts = torchmoe.route_plan(idx, 4, 3, prio)
    assert not dest.requires_grad and not counts.requires_grad
    _assert_same((dest, counts), _ref(idx, 4, 3, prio.detach()))


def _opcheck_samples():
    gen = _gen("opcheck")
    return [
        (_indices((33, 2), 8, gen), 8, -1, None),
        (_indices((33, 2), 8, gen), 8, 5, torch.randn(33, generator=gen)),
        (_indices((2, 17, 3), 5, gen).to(torch.int32), 5, 4, torch.randn(2, 17, 3, generator=gen)),
        (_indices((2, 17, 3), 5, gen), 5, -1, torch.randn(2, 17, generator=gen, requires_grad=True)),
        (_indices((0, 2), 3, gen), 3, 2, None),
    ]


@pytest.mark.parametrize("sample", range(5))
def test_opcheck(sample):
    torch.library.opcheck(OP, _opcheck_samples()[sample])


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()

    def f(idx, prio, cap: int):
        dest, counts = torchmoe.route_plan(idx, 8, cap, prio)
        return dest + 1, counts * 2

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    gen = _gen("compile")
    for G, T, k in [(None, 50, 2), (None, 91, 2), (3, 40, 3)]:
        shape = (T, k) if G is None else (G, T, k)
        idx = _indices(shape, 8, gen)
        prio = torch.randn(shape[:-1], generator=gen)
        for cap in (-1, 7):
            want = f(idx, prio, cap)
            got = compiled(idx, prio, cap)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---- bad input: one RuntimeError per argument, naming it ----

def test_bad_indices_out_of_range():
    idx = torch.randint(0, 4, (100, 2))
    idx[37, 1] = 4
    with pytest.raises(RuntimeError, match=r"'indices'.*\[0, num_experts = 4\).*got 4 at \[37, 1\]"):
        torchmoe.route_plan(idx, 4)


def test_bad_indices_out_of_range_parallel(restore_threads):
    # Several chunks on several threads: the first bad id in memory order is reported.
    torch.set_num_threads(2)
    idx = torch.randint(0, 8, (3, 30000, 2), dtype=torch.int32)
    idx[2, 29000, 0] = 9
    idx[1, 5, 1] = 8
    for cap in (-1, 10):
        with pytest.raises(RuntimeError, match=r"'indices'.*got 8 at \[1, 5, 1\]"):
            torchmoe.route_plan(idx, 8, cap, torch.randn(3, 30000))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(40000, 2), (3, 30000, 2), (16, 3000, 4)])
def test_bad_indices_many_threads_many_chunks(restore_threads, dtype, shape):
    # Many threads, so the counting pass cuts each group into several chunks (and tasks run on several
    # threads): bad ids sit in different chunks and groups, the last one in memory order placed first.
    # Every combination must raise (never crash, read or write out of bounds) naming the first bad id in
    # memory order, and the op must keep working afterwards.
    E = 8
    gen = _gen("bad_chunks", shape, str(dtype))
    good = torch.randint(0, E, shape, generator=gen, dtype=dtype)
    n = good.numel()
    where = sorted({n - 1, 7 * n // 8, n // 2, n // 3, n // 17})
    prios = {None: None, "T": torch.randn(shape[:-1], generator=gen), "Tk": torch.randn(shape, generator=gen)}
    for bad in (E, E + 1, -1, 2**31 - 1, -(2**31)):
        idx = good.clone()
        for i, p in enumerate(reversed(where)):
            idx.view(-1)[p] = bad if i == len(where) - 1 else E + 5 + i
        first = [int(c) for c in torch.unravel_index(torch.tensor(where[0]), shape)]
        pattern = rf"'indices'.*\[0, num_experts = {E}\).*got {bad} at \[{', '.join(map(str, first))}\]"
        for threads in (1, 3, 16):
            torch.set_num_threads(threads)
            for cap in (-1, 0, 7):
                for prio in prios.values():
                    with pytest.raises(RuntimeError, match=pattern):
                        torchmoe.route_plan(idx, E, cap, prio)
    torch.set_num_threads(16)
    for cap in (-1, 7):
        _assert_same(torchmoe.route_plan(good, E, cap, prios["T"]), _ref(good, E, cap, prios["T"]))


def test_bad_indices_negative():
    idx = torch.randint(0, 4, (5, 3))
    idx[2, 0] = -1
    with pytest.raises(RuntimeError, match="'indices'.*got -1"):
        torchmoe.route_plan(idx, 4, 2)


@pytest.mark.parametrize("shape", [(6,), (1, 2, 3, 2)])
def test_bad_indices_dim(shape):
    with pytest.raises(RuntimeError, match="'indices'.*2-D"):
        torchmoe.route_plan(torch.zeros(shape, dtype=torch.int64), 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int16, torch.bool])
def test_bad_indices_dtype(dtype):
    with pytest.raises(RuntimeError, match="'indices'.*int64 or int32"):
        torchmoe.route_plan(torch.zeros(4, 2, dtype=dtype), 4)


@pytest.mark.parametrize("capacity", [-2, -100])
def test_bad_capacity(capacity):
    with pytest.raises(RuntimeError, match="'capacity'"):
        torchmoe.route_plan(torch.zeros(4, 2, dtype=torch.int64), 4, capacity)


def test_bad_capacity_overflow():
    with pytest.raises(RuntimeError, match="'capacity'.*overflows"):
        torchmoe.route_plan(torch.zeros(4, 2, dtype=torch.int64), 4, 2**62)


@pytest.mark.parametrize("num_experts", [0, -3])
def test_bad_num_experts(num_experts):
    with pytest.raises(RuntimeError, match="'num_experts'"):
        torchmoe.route_plan(torch.zeros(4, 2, dtype=torch.int64), num_experts)


@pytest.mark.parametrize(
    "idx_shape,prio_shape",
    [((6, 2), (5,)), ((6, 2), (6, 3)), ((6, 2), (2,)), ((6, 2), (6, 2, 1)), ((6, 2), ()),
     ((3, 6, 2), (6,)), ((3, 6, 2), (3, 6, 1)), ((3, 6, 2), (2, 6)), ((3, 6, 2), (6, 2))],
)
def test_bad_priority_shape(idx_shape, prio_shape):
    with pytest.raises(RuntimeError, match="'priority'.*shape"):
        torchmoe.route_plan(torch.zeros(idx_shape, dtype=torch.int64), 4, -1, torch.zeros(prio_shape))


def test_bad_priority_dtype():
    with pytest.raises(RuntimeError, match="'priority'.*floating point or integer"):
        torchmoe.route_plan(torch.zeros(6, 2, dtype=torch.int64), 4, -1, torch.zeros(6, dtype=torch.complex64))


def test_bad_priority_device():
    with pytest.raises(RuntimeError, match="'priority'.*same device"):
        torchmoe.route_plan(torch.zeros(6, 2, dtype=torch.int64), 4, -1, torch.zeros(6, device="meta"))


def test_meta_shapes_and_checks():
    idx = torch.empty(3, 10, 2, dtype=torch.int32, device="meta")
    dest, counts = torchmoe.route_plan(idx, 6, 4, torch.empty(3, 10, device="meta"))
    assert dest.shape == (3, 10, 2) and dest.dtype == torch.int64 and dest.device.type == "meta"
    assert counts.shape == (3, 6) and counts.dtype == torch.int64
    dest, counts = torchmoe.route_plan(idx[0], 6)
    assert dest.shape == (10, 2) and counts.shape == (6,)
    with pytest.raises(RuntimeError, match="'capacity'"):
        torchmoe.route_plan(idx, 6, -5)
    with pytest.raises(RuntimeError, match="'priority'"):
        torchmoe.route_plan(idx, 6, -1, torch.empty(3, 11, device="meta"))
