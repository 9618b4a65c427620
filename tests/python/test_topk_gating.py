"""torchmoe.topk_gating (CPU, Meta, Autograd) against torchmoe.reference.topk_gating."""
import itertools

import pytest
import torch

import torchmoe
from torchmoe import reference

OP = torch.ops.torchmoe.topk_gating.default
BACKWARD_OP = torch.ops.torchmoe._topk_gating_backward.default

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MODES = list(itertools.product(["softmax", "sigmoid"], [True, False]))  # (score_func, renormalize)

# Both sides compute in float32 (float64) and round once; half types may differ by one final rounding.
TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=8e-3, rtol=1.6e-2),
}
GRAD_TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=3e-2),
}


def make_logits(shape, dtype, seed, quantize=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    if quantize:
        # Selection on softmax/sigmoid scores (+ bias) compares rounded float scores: two implementations of
        # softmax may round two logits a few ulps apart differently. Logits on a 1/8 grid are either
        # equal (exact ties, equal scores on both sides) or far apart.
        x = (x * 8).round() / 8
    return x.to(dtype)


def make_bias(num_experts, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_experts, generator=g) * 0.05).float()


def assert_matches_reference(logits, k, score_func="softmax", renormalize=True, expert_bias=None,
                             num_expert_groups=1, topk_expert_groups=1, scale=1.0):
    args = (logits, k, score_func, renormalize, expert_bias, num_expert_groups, topk_expert_groups, scale)
    weights, indices = torchmoe.topk_gating(*args)
    ref_weights, ref_indices = reference.topk_gating(*args)
    out_shape = logits.shape[:-1] + (k,)
    assert weights.shape == out_shape and indices.shape == out_shape
    assert weights.dtype == logits.dtype and indices.dtype == torch.int64
    assert weights.is_contiguous() and indices.is_contiguous()
    torch.testing.assert_close(indices, ref_indices, rtol=0, atol=0)
    torch.testing.assert_close(weights, ref_weights, **TOL[logits.dtype])
    return weights, indices


def sample_ks(num_experts):
    return sorted({1, min(2, num_experts), num_experts // 2 + 1, max(1, num_experts - 1), num_experts})


# ---------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("num_experts", [1, 2, 8, 64, 160, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, num_experts):
    seed = 0
    for num_tokens in [0, 1, 7]:
        for k in sample_ks(num_experts):
            for score_func, renormalize in MODES:
                seed += 1
                logits = make_logits((num_tokens, num_experts), dtype, seed)
                assert_matches_reference(logits, k, score_func, renormalize, scale=1.0 if seed % 2 else 2.5)
    # Many rows: every mode at the common small k, the largest k in one mode each (rotating).
    logits = make_logits((1000, num_experts), dtype, seed)
    for score_func, renormalize in MODES:
        assert_matches_reference(logits, min(2, num_experts), score_func, renormalize, scale=0.9)
    score_func, renormalize = MODES[num_experts % len(MODES)]
    assert_matches_reference(logits, num_experts, score_func, renormalize)


GROUP_CASES = [  # (E, G, topk_groups, k)
    (8, 2, 1, 2),
    (8, 4, 2, 3),
    (8, 8, 3, 3),  # one expert per group: group score is the single score
    (64, 8, 4, 8),
    (64, 8, 4, 32),  # k equals the eligible experts
    (160, 5, 2, 17),
    (256, 8, 4, 8),  # DeepSeek-V3's routing shape
    (256, 16, 16, 20),  # every group eligible
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GROUP_CASES, ids=str)
def test_groups_and_bias_match_reference(dtype, case):
    num_experts, groups, topk_groups, k = case
    for i, ((score_func, renormalize), with_bias) in enumerate(itertools.product(MODES, [False, True])):
        logits = make_logits((100, num_experts), dtype, seed=100 + i, quantize=True)
        bias = make_bias(num_experts, seed=200 + i) if with_bias else None
        _, indices = assert_matches_reference(logits, k, score_func, renormalize, bias, groups, topk_groups, 1.7)
        # Every chosen expert lies in one of the topk_groups eligible groups.
        group_of = indices // (num_experts // groups)
        assert all(len(set(row)) <= topk_groups for row in group_of.tolist())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_experts,k", [(8, 2), (64, 6), (160, 40), (256, 1)])
def test_bias_without_groups_matches_reference(dtype, num_experts, k):
    for i, (score_func, renormalize) in enumerate(MODES):
        logits = make_logits((200, num_experts), dtype, seed=300 + i, quantize=True)
        bias = make_bias(num_experts, seed=400 + i) * 20  # large enough to change the selection
        assert_matches_reference(logits, k, score_func, renormalize, bias, scale=0.5)


def test_bias_changes_selection_but_not_weights():
    logits = make_logits((200, 16), torch.float32, seed=7)
    bias = torch.zeros(16)
    bias[3] = 10.0  # expert 3 always selected first, weight still from its unbiased score
    for score_func in ["softmax", "sigmoid"]:
        w, idx = torchmoe.topk_gating(logits, 2, score_func, False, bias)
        assert (idx[:, 0] == 3).all()
        scores = torch.softmax(logits, -1) if score_func == "softmax" else torch.sigmoid(logits)
        torch.testing.assert_close(w, scores.gather(-1, idx))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_leading_dims(dtype):
    for shape, k in [((3, 5, 16), 4), ((2, 3, 4, 8), 3), ((16,), 5), ((1, 1, 1), 1)]:
        for score_func, renormalize in MODES:
            logits = make_logits(shape, dtype, seed=len(shape) * 10 + k)
            assert_matches_reference(logits, k, score_func, renormalize)
            assert_matches_reference(logits, k, score_func, renormalize, make_bias(shape[-1], 1))
    logits = make_logits((4, 6, 64), dtype, seed=5, quantize=True)
    assert_matches_reference(logits, 4, "sigmoid", True, make_bias(64, 2), 8, 2, 2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_non_contiguous_logits(dtype):
    base = make_logits((64, 50), dtype, seed=11, quantize=True)
    views = {
        "transposed": base.t(),  # [50, 64], E strided
        "column slice": base.t()[:, ::2],  # [50, 32]
        "row slice": base[::3],  # [22, 50]
        "expanded": base[:1].expand(9, 50),  # stride 0 rows
        "3-D permuted": base.view(8, 8, 50).permute(1, 0, 2),
    }
    for name, logits in views.items():
        assert not logits.is_contiguous(), name
        num_experts = logits.shape[-1]
        for score_func, renormalize in MODES:
            assert_matches_reference(logits, 3, score_func, renormalize)
            if num_experts % 2 == 0:
                assert_matches_reference(logits, 3, score_func, renormalize, make_bias(num_experts, 3), 2, 1)
    bias = make_bias(128, 4)[::2]
    assert not bias.is_contiguous()
    assert_matches_reference(base.t(), 5, "sigmoid", True, bias)


def test_k_beyond_running_topk_threshold():
    # k above the kernel's running-top-k limit takes the partial-selection path; both must agree with the reference.
    for k in [15, 16, 17, 33, 100, 128]:
        logits = make_logits((100, 128), torch.float32, seed=k, quantize=True)  # many exact ties
        for score_func, renormalize in MODES:
            assert_matches_reference(logits, k, score_func, renormalize)
            assert_matches_reference(logits, k, score_func, renormalize, make_bias(128, k), 4, 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_ties_go_to_lower_index(dtype):
    for num_experts in [4, 33]:
        for k in [1, 3, num_experts]:
            logits = torch.full((5, num_experts), 0.25, dtype=dtype)
            for score_func, renormalize in MODES:
                weights, indices = assert_matches_reference(logits, k, score_func, renormalize)
                assert torch.equal(indices, torch.arange(k).expand(5, k))
                assert torch.equal(weights, weights[:, :1].expand(5, k))
                _, indices = assert_matches_reference(logits, k, score_func, renormalize, torch.zeros(num_experts))
                assert torch.equal(indices, torch.arange(k).expand(5, k))

    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 2.0]], dtype=dtype)
    _, indices = assert_matches_reference(logits, 5)
    assert indices.tolist() == [[1, 2, 4, 3, 5]]
    # -0.0 equals +0.0; -inf ranks last.
    logits = torch.tensor([[float("-inf"), -0.0, -1.0, 0.0, -0.0, -2.0]], dtype=dtype)
    for k in [1, 2, 3, 4, 6]:
        _, indices = assert_matches_reference(logits, k, "sigmoid", False)
        assert indices.tolist() == [[1, 3, 4, 2, 5, 0][:k]]
    # Equal groups: groups 1 and 2 tie on their top-2 sum; the lower group wins.
    logits = torch.tensor([[0.0, 0.0, 1.0, 2.0, 2.0, 1.0]], dtype=dtype)
    _, indices = assert_matches_reference(logits, 2, "sigmoid", True, None, 3, 1)
    assert indices.tolist() == [[3, 2]]


def test_nan_logits_rank_first():
    # torch.sort/topk rank NaN above every number; the kernel does the same (and never reads out of bounds).
    logits = make_logits((6, 10), torch.float32, seed=3)
    logits[0, 7] = float("nan")
    logits[1, 2] = logits[1, 5] = float("nan")
    logits[2] = float("nan")
    for score_func, renormalize in MODES:
        for k in [1, 3, 10]:
            w, idx = torchmoe.topk_gating(logits, k, score_func, renormalize)
            ref_w, ref_idx = reference.topk_gating(logits, k, score_func, renormalize)
            assert torch.equal(idx, ref_idx)
            torch.testing.assert_close(w, ref_w, equal_nan=True)
            _, idx = torchmoe.topk_gating(logits, k, score_func, renormalize, torch.zeros(10))
            ref_w, ref_idx = reference.topk_gating(logits, k, score_func, renormalize, torch.zeros(10))
            assert torch.equal(idx, ref_idx)


def test_empty_inputs():
    for shape in [(0, 8), (2, 0, 8), (0, 3, 8)]:
        logits = torch.randn(shape, requires_grad=True)
        for score_func, renormalize in MODES:
            weights, indices = torchmoe.topk_gating(logits, 3, score_func, renormalize, torch.zeros(8), 2, 2)
            assert weights.shape == shape[:-1] + (3,) and indices.shape == shape[:-1] + (3,)
            (grad,) = torch.autograd.grad(weights.sum(), logits)
            assert grad.shape == shape


def test_result_does_not_depend_on_thread_count():
    logits = make_logits((4000, 64), torch.float32, seed=9)
    bias = make_bias(64, 9)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in [1, max(2, threads)]:
            torch.set_num_threads(n)
            outs.append(torchmoe.topk_gating(logits, 6, "sigmoid", True, bias, 8, 3))
            outs.append(torchmoe.topk_gating(logits, 2))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(outs[:2], outs[2:]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_scale_multiplies_weights():
    logits = make_logits((50, 16), torch.float32, seed=4)
    for score_func, renormalize in MODES:
        w1, i1 = torchmoe.topk_gating(logits, 4, score_func, renormalize)
        w3, i3 = torchmoe.topk_gating(logits, 4, score_func, renormalize, scale=-3.0)
        assert torch.equal(i1, i3)
        torch.testing.assert_close(w3, -3.0 * w1)
        if renormalize:
            torch.testing.assert_close(w1.sum(-1), torch.ones(50))


# --------------------------------------------------------------------------------------------- backward


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_matches_reference(dtype):
    cases = [  # (shape, k, bias, groups, topk_groups)
        ((40, 16), 4, False, 1, 1),
        ((3, 7, 64), 8, False, 1, 1),
        ((40, 64), 20, True, 1, 1),
        ((40, 64), 6, True, 8, 3),
        ((40, 8), 8, False, 1, 1),
    ]
    for i, (shape, k, with_bias, groups, topk_groups) in enumerate(cases):
        for score_func, renormalize in MODES:
            logits = make_logits(shape, dtype, seed=50 + i, quantize=with_bias or groups > 1)
            bias = make_bias(shape[-1], i) if with_bias else None
            grad_w = make_logits(shape[:-1] + (k,), dtype, seed=60 + i)
            grads = []
            for fn in (torchmoe.topk_gating, reference.topk_gating):
                x = logits.clone().requires_grad_()
                w, idx = fn(x, k, score_func, renormalize, bias, groups, topk_groups, 1.3)
                assert not idx.requires_grad
                grads.append(torch.autograd.grad(w, x, grad_w)[0])
            assert grads[0].dtype == dtype
            torch.testing.assert_close(grads[0], grads[1], **GRAD_TOL[dtype])


def composite_weights(logits, indices, score_func, renormalize, scale):
    """Weights as a function of the logits for a given selection (repeated experts allowed)."""
    x = logits.double()
    if score_func == "softmax" and renormalize:
        w = torch.softmax(x.gather(-1, indices), -1)
    else:
        s = torch.softmax(x, -1) if score_func == "softmax" else torch.sigmoid(x)
        w = s.gather(-1, indices)
        if renormalize:
            w = w / w.sum(-1, keepdim=True)
    return w * scale


@pytest.mark.parametrize("score_func,renormalize", MODES)
def test_backward_op_matches_composite_for_any_indices(score_func, renormalize):
    # Called directly, the backward op takes any selection, including a repeated expert in one row.
    logits = make_logits((2, 6, 12), torch.float64, seed=21)
    g = torch.Generator().manual_seed(22)
    indices = torch.randint(0, 12, (2, 6, 5), generator=g)
    indices[0, 0] = torch.tensor([3, 3, 3, 1, 0])
    grad_w = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    got = BACKWARD_OP(grad_w, logits, indices, score_func, renormalize, 0.7)
    x = logits.clone().requires_grad_()
    (expected,) = torch.autograd.grad(composite_weights(x, indices, score_func, renormalize, 0.7), x, grad_w)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
    # Non-contiguous and float32 grad_weights for float64 logits.
    got = BACKWARD_OP(grad_w.float().transpose(0, 1).contiguous().transpose(0, 1), logits.transpose(0, 1)
                      .contiguous().transpose(0, 1), indices, score_func, renormalize, 0.7)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("score_func,renormalize", MODES)
def test_gradcheck(score_func, renormalize):
    logits = make_logits((3, 4, 12), torch.float64, seed=31).requires_grad_()
    bias = make_bias(12, 31)

    def plain(x):
        return torchmoe.topk_gating(x, 3, score_func, renormalize, None, 1, 1, 1.5)[0]

    def biased_grouped(x):
        return torchmoe.topk_gating(x, 4, score_func, renormalize, bias, 3, 2, 0.5)[0]

    def biased(x):
        return torchmoe.topk_gating(x, 12, score_func, renormalize, bias)[0]

    for fn in (plain, biased_grouped, biased):
        assert torch.autograd.gradcheck(fn, (logits,))


def test_no_gradient_for_expert_bias():
    logits = make_logits((10, 8), torch.float32, seed=1).requires_grad_()
    bias = torch.zeros(8, requires_grad=True)
    w, _ = torchmoe.topk_gating(logits, 2, "sigmoid", True, bias)
    grad_logits, grad_bias = torch.autograd.grad((w * w).sum(), (logits, bias), allow_unused=True)
    assert grad_bias is None or torch.count_nonzero(grad_bias) == 0
    assert grad_logits.abs().sum() > 0
    # Only the bias requires grad: the graph exists, the gradient is None.
    w, _ = torchmoe.topk_gating(logits.detach(), 2, "sigmoid", True, bias)
    assert w.requires_grad
    (grad_bias,) = torch.autograd.grad(w.sum(), bias, allow_unused=True)
    assert grad_bias is None


def test_double_backward_is_refused():
    logits = make_logits((4, 8), torch.float64, seed=2).requires_grad_()
    w, _ = torchmoe.topk_gating(logits, 2)
    (grad,) = torch.autograd.grad((w * w).sum(), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


# ------------------------------------------------------------------------------ opcheck, compile, script


OPCHECK_CASES = [  # (shape, dtype, k, score_func, renormalize, bias, groups, topk_groups, scale)
    ((16, 8), torch.float32, 2, "softmax", True, False, 1, 1, 1.0),
    ((2, 5, 32), torch.float32, 20, "softmax", False, False, 1, 1, 2.0),
    ((16, 8), torch.float64, 3, "sigmoid", True, True, 1, 1, 1.0),
    ((16, 64), torch.bfloat16, 8, "sigmoid", True, True, 8, 4, 2.5),
    ((16, 12), torch.float16, 4, "softmax", False, False, 3, 2, 1.0),
    ((0, 8), torch.float32, 2, "softmax", True, False, 1, 1, 1.0),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck_forward(case):
    shape, dtype, k, score_func, renormalize, with_bias, groups, topk_groups, scale = case
    logits = make_logits(shape, dtype, seed=41, quantize=True).requires_grad_()
    bias = make_bias(shape[-1], 41) if with_bias else None
    torch.library.opcheck(OP, (logits, k, score_func, renormalize, bias, groups, topk_groups, scale))


@pytest.mark.parametrize("score_func,renormalize", MODES)
def test_opcheck_backward(score_func, renormalize):
    logits = make_logits((3, 6, 16), torch.float32, seed=43)
    _, indices = torchmoe.topk_gating(logits, 4)
    grad_w = make_logits((3, 6, 4), torch.float32, seed=44)
    torch.library.opcheck(BACKWARD_OP, (grad_w, logits, indices, score_func, renormalize, 1.5))


def route(x, bias):
    w1, i1 = torchmoe.topk_gating(x, 2)
    w2, i2 = torchmoe.topk_gating(x, 3, "sigmoid", True, bias, 4, 2, 2.5)
    w3, _ = torchmoe.topk_gating(x, 2, "softmax", False)
    return (w1 * w1).sum() + (w2 * i2).sum() + w3.sum() * 0.3, i1, i2


def test_torch_compile_fullgraph_matches_eager():
    compiled = torch.compile(route, fullgraph=True, dynamic=True)
    bias = make_bias(16, 5)
    for rows in [32, 9]:
        x = make_logits((rows, 16), torch.float32, seed=rows, quantize=True)
        outs = []
        for fn in (route, compiled):
            xr = x.clone().requires_grad_()
            loss, i1, i2 = fn(xr, bias)
            (grad,) = torch.autograd.grad(loss, xr)
            outs.append((loss, i1, i2, grad))
        (loss, i1, i2, grad), (c_loss, c_i1, c_i2, c_grad) = outs
        assert torch.equal(i1, c_i1) and torch.equal(i2, c_i2)
        # The compiled graph may fuse the surrounding sums in another order: float tolerance there.
        torch.testing.assert_close(c_loss, loss)
        torch.testing.assert_close(c_grad, grad)


def test_torchscript_matches_eager():
    scripted = torch.jit.script(torchmoe.ops.topk_gating)
    logits = make_logits((20, 16), torch.float32, seed=8)
    bias = make_bias(16, 8)
    for a, b in zip(scripted(logits, 4, "sigmoid", True, bias, 4, 2, 1.5),
                    torchmoe.topk_gating(logits, 4, "sigmoid", True, bias, 4, 2, 1.5)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------- bad input

DEVICES = ["cpu", "meta"]  # the Meta kernel runs the same checks (torch.compile rejects the same calls)


def call(device, shape=(4, 8), dtype=torch.float32, k=2, score_func="softmax", renormalize=True, bias=None,
         groups=1, topk_groups=1, scale=1.0):
    logits = torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
    return OP(logits.to(device), k, score_func, renormalize, None if bias is None else bias.to(device), groups,
              topk_groups, scale)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_logits_dtype(device):
    with pytest.raises(RuntimeError, match="argument 'logits'"):
        call(device, dtype=torch.int64)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_logits_0d(device):
    with pytest.raises(RuntimeError, match="argument 'logits'"):
        call(device, shape=())


@pytest.mark.parametrize("device", DEVICES)
def test_bad_logits_no_experts(device):
    with pytest.raises(RuntimeError, match="argument 'logits'"):
        call(device, shape=(4, 0), k=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [0, -1, 9])
def test_bad_k(device, k):
    with pytest.raises(RuntimeError, match="argument 'k'"):
        call(device, k=k)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_k_more_than_eligible_experts(device):
    with pytest.raises(RuntimeError, match="argument 'k'"):
        call(device, k=5, groups=4, topk_groups=2)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_score_func(device):
    with pytest.raises(RuntimeError, match="argument 'score_func'"):
        call(device, score_func="relu")


@pytest.mark.parametrize("device", DEVICES)
def test_bad_expert_bias_dtype(device):
    with pytest.raises(RuntimeError, match="argument 'expert_bias'"):
        call(device, bias=torch.zeros(8, dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_expert_bias_size(device):
    with pytest.raises(RuntimeError, match="argument 'expert_bias'"):
        call(device, bias=torch.zeros(7))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_expert_bias_dim(device):
    with pytest.raises(RuntimeError, match="argument 'expert_bias'"):
        call(device, bias=torch.zeros(1, 8))


def test_bad_expert_bias_device():
    with pytest.raises(RuntimeError, match="expert_bias"):
        OP(torch.randn(4, 8), 2, "softmax", True, torch.zeros(8, device="meta"), 1, 1, 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("groups", [0, -2, 3])
def test_bad_num_expert_groups(device, groups):
    with pytest.raises(RuntimeError, match="argument 'num_expert_groups'"):
        call(device, groups=groups)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("topk_groups", [0, 5])
def test_bad_topk_expert_groups(device, topk_groups):
    with pytest.raises(RuntimeError, match="argument 'topk_expert_groups'"):
        call(device, groups=4, topk_groups=topk_groups)


def backward_args(device="cpu"):
    logits = torch.randn(4, 8, device=device)
    indices = torch.zeros(4, 2, dtype=torch.long, device=device)
    return torch.randn(4, 2, device=device), logits, indices


def test_bad_backward_indices_out_of_range():
    grad_w, logits, indices = backward_args()
    for bad in [8, -1]:
        indices[2, 1] = bad
        with pytest.raises(RuntimeError, match="argument 'indices'"):
            BACKWARD_OP(grad_w, logits, indices, "softmax", True, 1.0)


def test_bad_backward_indices_first_reported_many_threads():
    # Bad ids in several parallel chunks: the first in memory order is named, whatever the thread count.
    T, E, k = 20000, 8, 2
    logits = torch.randn(T, E)
    indices = torch.randint(0, E, (T, k))
    for i, (r, j) in enumerate([(19999, 1), (15000, 0), (9000, 1), (123, 1)]):
        indices[r, j] = -1 if (r, j) == (123, 1) else E + i
    old = torch.get_num_threads()
    try:
        for threads in (1, 4, 16):
            torch.set_num_threads(threads)
            with pytest.raises(RuntimeError, match=r"argument 'indices'.*got -1 at row 123, choice 1"):
                BACKWARD_OP(torch.randn(T, k), logits, indices, "softmax", True, 1.0)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_backward_indices_dtype(device):
    grad_w, logits, indices = backward_args(device)
    with pytest.raises(RuntimeError, match="argument 'indices'"):
        BACKWARD_OP(grad_w, logits, indices.int(), "softmax", True, 1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_backward_indices_shape(device):
    grad_w, logits, indices = backward_args(device)
    with pytest.raises(RuntimeError, match="argument 'indices'"):
        BACKWARD_OP(grad_w[:3], logits, indices[:3], "softmax", True, 1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_backward_grad_weights_shape(device):
    grad_w, logits, indices = backward_args(device)
    with pytest.raises(RuntimeError, match="argument 'grad_weights'"):
        BACKWARD_OP(grad_w[:, :1], logits, indices, "sigmoid", False, 1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_backward_score_func(device):
    grad_w, logits, indices = backward_args(device)
    with pytest.raises(RuntimeError, match="argument 'score_func'"):
        BACKWARD_OP(grad_w, logits, indices, "tanh", True, 1.0)
