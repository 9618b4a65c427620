"""torchmoe.nn routers, MoE and SwitchMoE against straightforward references written from the seeds and
papers (a Python loop over experts, the seed's top-k + -inf scatter + softmax router, the seed's
priority-wise capacity queue), with the same weights; gradients, TorchScript, torch.compile."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import torchmoe
from torchmoe import losses
from torchmoe.nn import MoE, NoisyTopkRouter, SwitchMoE, TopkRouter

from conftest import run_python



@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Every test compiles MoE.forward for new module instances: start each from an empty code cache so the
    # recompile limit counts one test's compilations only.
    torch._dynamo.reset()
    yield


# ------------------------------------------------------------------------------------------ references


def seed_router(logits, k, score_func="softmax", renormalize=True):
    """makeMoE's router: top-k of the logits, -inf scatter, softmax (or the Switch / sigmoid variants)."""
    top_logits, idx = logits.topk(k, dim=-1)
    if score_func == "softmax" and renormalize:
        sparse = torch.full_like(logits, float("-inf")).scatter(-1, idx, top_logits)
        return F.softmax(sparse, dim=-1).gather(-1, idx), idx
    scores = torch.softmax(logits, -1) if score_func == "softmax" else torch.sigmoid(logits)
    w = scores.gather(-1, idx)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w, idx


def capacity_keep(idx, num_experts, capacity):
    """The seed's priority-wise queue: all first choices (in token order) before any second choice."""
    T, k = idx.shape
    keep = torch.ones(T, k, dtype=torch.bool)
    if capacity is None:
        return keep
    fill = [0] * num_experts
    for j in range(k):
        for t in range(T):
            e = int(idx[t, j])
            keep[t, j] = fill[e] < capacity
            fill[e] += 1
    return keep


def expert_mlp(moe, e, h):
    if moe.activation == "swiglu":
        hid = F.silu(h @ moe.gate_proj[e]) * (h @ moe.up_proj[e])
    elif moe.activation == "relu":
        hid = F.relu(h @ moe.up_proj[e])
    else:
        hid = F.gelu(h @ moe.up_proj[e])
    return hid @ moe.down_proj[e]


def reference_moe(moe, x, renormalize=True):
    """Per-expert loop: select each expert's (kept) tokens, run it, index_add_ the weighted output back."""
    h = x.reshape(-1, moe.d_model)
    T = h.shape[0]
    logits = h.float() @ moe.router.weight.float().t()
    weights, idx = seed_router(logits, moe.k, getattr(moe.router, "score_func", "softmax"), renormalize)
    cap = None
    if moe.capacity_factor is not None:
        cap = max(moe.min_capacity, math.floor(moe.k * moe.capacity_factor * T / moe.num_experts))
        cap = min(cap, T)
    keep = capacity_keep(idx, moe.num_experts, cap)
    y = torch.zeros(T, moe.d_model, dtype=torch.float32)
    for e in range(moe.num_experts):
        tok, choice = torch.where((idx == e) & keep)
        if tok.numel() == 0:
            continue
        out = expert_mlp(moe, e, h[tok]).float() * weights[tok, choice].unsqueeze(1)
        y = y.index_add(0, tok, out)
    probs = torch.softmax(logits, -1)
    f = torch.stack([(idx == e).sum() for e in range(moe.num_experts)]).float() / max(T * moe.k, 1)
    lb = moe.num_experts * (f * probs.mean(0)).sum() if T else torch.zeros(())
    z = (torch.logsumexp(logits, -1) ** 2).mean() if T else torch.zeros(())
    aux = moe.aux_loss_weight * lb + moe.z_loss_weight * z
    counts = torch.stack([(idx == e).sum() for e in range(moe.num_experts)])
    dropped = (~keep).sum()
    return y.to(x.dtype).view(x.shape), aux, counts, dropped


def params_and_grads(module, x, fn, extra_loss=True):
    module.zero_grad()
    x = x.clone().requires_grad_(True)
    out = fn(x)
    y, aux = (out[0], out[1]) if isinstance(out, tuple) else (out, module.aux_loss)
    loss = (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum()
    if extra_loss:
        loss = loss + aux
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return y.detach(), x.grad.clone(), grads


# ------------------------------------------------------------------------------------------ routers


def test_topk_router_matches_seed_router():
    router = TopkRouter(16, 6, 2)
    x = torch.randn(3, 5, 16)
    w, idx, logits = router(x)
    assert w.shape == (3, 5, 2) and idx.shape == (3, 5, 2) and logits.shape == (3, 5, 6)
    assert w.dtype == torch.float32 and logits.dtype == torch.float32 and idx.dtype == torch.long
    ref_logits = x @ router.weight.t()
    ref_w, ref_idx = seed_router(ref_logits, 2)
    torch.testing.assert_close(logits, ref_logits)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w, ref_w)


@pytest.mark.parametrize("score_func,renormalize", [("softmax", False), ("sigmoid", True), ("sigmoid", False)])
def test_topk_router_score_functions(score_func, renormalize):
    router = TopkRouter(8, 5, 3, score_func=score_func, renormalize=renormalize, scale=2.0)
    x = torch.randn(20, 8)
    w, idx, logits = router(x)
    ref_w, ref_idx = seed_router(logits, 3, score_func, renormalize)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w, 2.0 * ref_w)


def test_topk_router_math_in_float32_for_bf16_inputs():
    router = TopkRouter(8, 4, 1)
    x = torch.randn(10, 8).bfloat16()
    w, idx, logits = router(x)
    assert logits.dtype == torch.float32 and w.dtype == torch.float32
    torch.testing.assert_close(logits, x.float() @ router.weight.t())


def test_bf16_router_reads_its_weight_as_stored():
    # no float32 copy of the weight is made or kept: in-place updates, load_state_dict and .to() are seen at once
    torch.manual_seed(0)
    router = TopkRouter(16, 8, 2).bfloat16()
    x = torch.randn(5, 16, dtype=torch.bfloat16)

    def expected():
        return torchmoe.router_logits(x, router.weight.detach())

    with torch.no_grad():
        assert torch.equal(router(x)[2], expected())
        torch.testing.assert_close(router(x)[2], F.linear(x.float(), router.weight.float()), rtol=1e-5, atol=1e-5)
        router.weight.copy_(torch.randn(8, 16))  # load_state_dict / an optimizer step: in place
        assert torch.equal(router(x)[2], expected())
    assert not any(isinstance(v, torch.Tensor) and v.shape == (8, 16) and v.dtype == torch.float32
                   for v in router.__dict__.values())
    router.load_state_dict({"weight": torch.randn(8, 16), "expert_bias": torch.zeros(8)})
    with torch.no_grad():
        assert torch.equal(router(x)[2], expected())
    router.half()  # .to(dtype) swaps the parameter's data
    with torch.no_grad():
        assert torch.equal(router(x.half())[2], torchmoe.router_logits(x.half(), router.weight))
    # training: the gradient reaches the 16-bit weight
    router.bfloat16()
    logits = router(x)[2]
    assert logits.requires_grad
    logits.sum().backward()
    torch.testing.assert_close(router.weight.grad.float(), x.float().sum(0).expand(8, 16), rtol=1e-2, atol=1e-2)
    with torch.inference_mode():
        inference_router = TopkRouter(16, 8, 2).bfloat16()
        assert torch.equal(inference_router(x)[2], torchmoe.router_logits(x, inference_router.weight))


def test_topk_router_init_and_params():
    d = 512
    router = TopkRouter(d, 64, 2)
    assert [n for n, _ in router.named_parameters()] == ["weight"]
    assert router.weight.shape == (64, d)
    std = math.sqrt(0.1 / d)
    assert router.weight.abs().max() <= 2 * std + 1e-7
    # a normal truncated at two standard deviations has std ~0.88 of the untruncated one
    assert 0.8 * std < router.weight.std().item() < 0.95 * std
    assert router.expert_bias.dtype == torch.float32 and torch.all(router.expert_bias == 0)
    assert "expert_bias" in router.state_dict()


def test_topk_router_expert_bias_affects_selection_only():
    router = TopkRouter(8, 4, 1, use_expert_bias=True, renormalize=False)
    x = torch.randn(30, 8)
    w0, idx0, _ = router(x)
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    w1, idx1, logits = router(x)
    assert torch.all(idx1 == 2)
    torch.testing.assert_close(w1, torch.softmax(logits, -1)[:, 2:3])  # weight: the unbiased probability
    # without use_expert_bias the buffer is ignored
    plain = TopkRouter(8, 4, 1, renormalize=False)
    plain.load_state_dict(router.state_dict())
    assert torch.equal(plain(x)[1], idx0)


def test_update_expert_bias_rule():
    router = TopkRouter(8, 4, 2, use_expert_bias=True, bias_update_rate=0.1)
    router.update_expert_bias(torch.tensor([10, 2, 4, 4]))  # mean 5
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    router.update_expert_bias(torch.tensor([[1, 1, 1, 1], [4, 4, 4, 0]]))  # summed: [5, 5, 5, 1], mean 4
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.2, 0.0, 0.0, 0.2]))
    scripted = torch.jit.script(router)
    scripted.update_expert_bias(torch.tensor([0, 0, 0, 8]))
    torch.testing.assert_close(scripted.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))


def test_expert_bias_balances_a_skewed_router():
    torch.manual_seed(1)
    moe = MoE(16, 8, 4, k=1, activation="relu", use_expert_bias=True)
    moe.router.bias_update_rate = 0.05
    with torch.no_grad():
        moe.router.weight[0] += 0.5  # expert 0 attracts most tokens
    x = torch.randn(400, 16) + 0.5
    moe(x)
    first = moe.expert_counts.clone()
    for _ in range(60):
        moe(x)
        moe.router.update_expert_bias(moe.expert_counts)
    assert moe.expert_counts.max() < first.max()
    assert moe.router.expert_bias[0] < 0


def test_noisy_router_eval_is_clean_topk():
    router = NoisyTopkRouter(12, 6, 2).eval()
    with torch.no_grad():
        router.noise_weight.normal_()
    x = torch.randn(7, 12)
    w, idx, logits = router(x)
    torch.testing.assert_close(logits, x @ router.weight.t())
    ref_w, ref_idx = seed_router(logits, 2)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w, ref_w)
    assert router.load_loss.item() == 0.0
    w2, idx2, _ = router(x)
    assert torch.equal(w, w2) and torch.equal(idx, idx2)


def test_noisy_router_training_noise_and_load_loss():
    router = NoisyTopkRouter(12, 6, 2, noise_eps=1e-2).train()
    with torch.no_grad():
        router.noise_weight.normal_(std=0.3)
    x = torch.randn(50, 12)
    torch.manual_seed(123)
    w, idx, logits = router(x)
    # the same draw by hand: H = x W_g + N(0, 1) * (softplus(x W_noise) + eps)
    torch.manual_seed(123)
    clean = x @ router.weight.t()
    std = F.softplus(x @ router.noise_weight.t()) + 1e-2
    noisy = clean + torch.randn_like(clean) * std
    torch.testing.assert_close(logits, noisy)
    ref_w, ref_idx = seed_router(noisy, 2)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(router.load_loss, losses.load_loss(clean, noisy, std, 2))
    assert not torch.equal(router(x)[2], logits), "fresh noise on every training call"
    gw, gn = torch.autograd.grad(router.load_loss, (router.weight, router.noise_weight))
    assert gw.abs().sum() > 0 and gn.abs().sum() > 0


def test_noisy_router_init():
    router = NoisyTopkRouter(32, 4, 1)
    assert torch.all(router.noise_weight == 0)
    assert router.weight.abs().max() <= 2 * math.sqrt(0.1 / 32) + 1e-7
    assert {n for n, _ in router.named_parameters()} == {"weight", "noise_weight"}


def test_router_bad_arguments():
    with pytest.raises(ValueError, match="k"):
        TopkRouter(4, 3, 4)
    with pytest.raises(ValueError, match="score_func"):
        TopkRouter(4, 3, 1, score_func="relu")
    with pytest.raises(ValueError, match="k"):
        NoisyTopkRouter(4, 3, 0)


# ------------------------------------------------------------------------------------------ MoE

MOE_CASES = [
    # activation, k, capacity_factor, T
    ("swiglu", 2, None, 40),
    ("relu", 2, None, 33),
    ("gelu", 1, None, 17),
    ("swiglu", 2, 1.0, 40),
    ("relu", 2, 0.5, 40),  # heavy dropping
    ("gelu", 3, 1.25, 31),
    ("swiglu", 1, 2.0, 8),
    ("relu", 2, 4.0, 24),  # capacity capped at T: nothing dropped
]


@pytest.mark.parametrize("activation,k,capacity_factor,T", MOE_CASES)
def test_moe_matches_per_expert_loop(activation, k, capacity_factor, T):
    torch.manual_seed(T + k)
    moe = MoE(16, 24, 5, k=k, capacity_factor=capacity_factor, activation=activation)
    x = torch.randn(T, 16)
    ours = params_and_grads(moe, x, moe)
    ref_out = {}

    def ref(t):
        y, aux, counts, dropped = reference_moe(moe, t)
        ref_out.update(counts=counts, dropped=dropped, aux=aux)
        return y, aux

    theirs = params_and_grads(moe, x, ref)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-4, atol=1e-5)
    assert ours[2].keys() == theirs[2].keys()
    for name in ours[2]:
        torch.testing.assert_close(ours[2][name], theirs[2][name], rtol=1e-4, atol=1e-5, msg=name)
    assert torch.equal(moe.expert_counts, ref_out["counts"])
    assert moe.dropped_tokens.item() == ref_out["dropped"].item()
    if capacity_factor == 0.5:
        assert moe.dropped_tokens.item() > 0
    if capacity_factor is None:
        assert moe.dropped_tokens.item() == 0


@pytest.mark.parametrize("capacity_factor,T", [(0.5, 40), (1.25, 33), (4.0, 24)])
def test_moe_capacity_packed_rows_match_padded_buffer(capacity_factor, T):
    # On CPU the capacity layout skips empty slots (kept rows packed, grouped matmuls); the padded
    # [E, capacity, d] buffer with batched matmuls (the GPU / torch.compile path) must agree with it.
    torch.manual_seed(T)
    moe = MoE(16, 24, 5, k=2, capacity_factor=capacity_factor)
    x = torch.randn(T, 16)
    assert moe._skip_padding(x)
    packed = params_and_grads(moe, x, moe)
    packed_counts, packed_dropped = moe.expert_counts.clone(), moe.dropped_tokens.clone()
    moe._skip_padding = lambda t: False
    padded = params_and_grads(moe, x, moe)
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed[1], padded[1], rtol=1e-5, atol=1e-6)
    for name in packed[2]:
        torch.testing.assert_close(packed[2][name], padded[2][name], rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(packed_counts, moe.expert_counts)
    assert torch.equal(packed_dropped, moe.dropped_tokens)
    if capacity_factor < 1:
        assert packed_dropped.item() > 0


def test_moe_capacity_traced_keeps_padded_layout():
    # torch.jit.trace would freeze the packed layout's data-dependent row count; traced layers use the padded
    # buffer and stay right for inputs routed differently from the example.
    torch.manual_seed(1)
    moe = MoE(8, 16, 4, k=2, capacity_factor=1.0).eval()
    traced = torch.jit.trace(moe, torch.randn(24, 8), check_trace=False)
    for seed in range(3):
        x = torch.randn(24, 8, generator=torch.Generator().manual_seed(seed)) * (seed + 1)
        torch.testing.assert_close(traced(x), moe(x), rtol=1e-5, atol=1e-6)


def test_moe_reference_impl_matches_fused():
    for cf in (None, 1.0):
        torch.manual_seed(3)
        fused = MoE(16, 32, 6, k=2, capacity_factor=cf)
        ref = MoE(16, 32, 6, k=2, capacity_factor=cf, impl="reference")
        ref.load_state_dict(fused.state_dict())
        x = torch.randn(2, 20, 16)
        a = params_and_grads(fused, x, fused)
        b = params_and_grads(ref, x, ref)
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-6)
        for n in a[2]:
            torch.testing.assert_close(a[2][n], b[2][n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused.aux_loss, ref.aux_loss)
        assert torch.equal(fused.expert_counts, ref.expert_counts)
        assert torch.equal(fused.dropped_tokens, ref.dropped_tokens)


def test_moe_dropped_tokens_contribute_zero():
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, k=1, capacity_factor=0.25, activation="relu")  # capacity = floor(0.25 * 32 / 4) = 2
    x = torch.randn(32, 8)
    y = moe(x)
    _, idx, _ = moe.router(x)
    keep = capacity_keep(idx, 4, 2)
    assert moe.dropped_tokens.item() == (~keep).sum().item() > 0
    assert torch.all(y[~keep[:, 0]] == 0)
    assert torch.all(y[keep[:, 0]].abs().sum(-1) > 0)
    # capacity 0: every slot dropped, the layer outputs zeros and still back-propagates
    moe0 = MoE(8, 16, 4, k=2, capacity_factor=0.0)
    x = torch.randn(10, 8, requires_grad=True)
    y0 = moe0(x)
    assert torch.all(y0 == 0) and moe0.dropped_tokens.item() == 20
    y0.sum().backward(retain_graph=True)
    assert torch.all(x.grad == 0)  # no kept slot, no gradient from the output
    moe0.aux_loss.backward()  # the router still learns from the aux losses
    assert moe0.router.weight.grad.abs().sum() > 0


def test_moe_aux_loss_value():
    torch.manual_seed(5)
    moe = MoE(8, 16, 4, k=2, aux_loss_weight=0.5, z_loss_weight=0.25)
    x = torch.randn(3, 9, 8)
    moe(x)
    logits = x.reshape(-1, 8) @ moe.router.weight.t()
    idx = logits.topk(2, -1).indices
    expected = 0.5 * losses.switch_load_balancing_loss(torch.softmax(logits, -1), idx)
    expected = expected + 0.25 * losses.router_z_loss(logits)
    torch.testing.assert_close(moe.aux_loss, expected)
    assert torch.equal(moe.expert_counts, torch.bincount(idx.reshape(-1), minlength=4))


def test_moe_gradients_reach_every_parameter():
    for kwargs in (
        dict(activation="swiglu", capacity_factor=None),
        dict(activation="relu", capacity_factor=1.5),
        dict(activation="gelu", capacity_factor=None, router="noisy"),
    ):
        torch.manual_seed(0)
        moe = MoE(16, 32, 4, k=2, **kwargs).train()
        x = torch.randn(64, 16, requires_grad=True)
        (moe(x).pow(2).sum() + moe.aux_loss).backward()
        assert x.grad.abs().sum() > 0
        for name, p in moe.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (kwargs, name)
    assert moe.gate_proj is None
    names = {n for n, _ in MoE(8, 16, 4).named_parameters()}
    assert names == {"router.weight", "gate_proj", "up_proj", "down_proj"}


def test_moe_noisy_router_aux_loss_and_eval():
    torch.manual_seed(0)
    moe = MoE(16, 32, 4, k=2, router="noisy", aux_loss_weight=0.1, z_loss_weight=0.0)
    x = torch.randn(40, 16)
    moe.train()
    torch.manual_seed(7)
    y1 = moe(x)
    probs_loss = moe.aux_loss - 0.1 * moe.router.load_loss
    assert moe.router.load_loss.item() > 0
    torch.manual_seed(7)
    _, idx, h = moe.router(x)
    torch.testing.assert_close(probs_loss, 0.1 * losses.switch_load_balancing_loss(torch.softmax(h, -1), idx))
    y2 = moe(x)
    assert not torch.equal(y1, y2), "training adds noise"
    moe.eval()
    e1, e2 = moe(x), moe(x)
    assert torch.equal(e1, e2), "no noise in eval mode"
    y_ref, _, _, _ = reference_moe(moe, x)
    torch.testing.assert_close(e1, y_ref, rtol=1e-4, atol=1e-5)


def test_moe_input_shapes_and_empty_batch():
    moe = MoE(8, 16, 4, k=2, capacity_factor=1.0)
    y = moe(torch.randn(2, 3, 5, 8))
    assert y.shape == (2, 3, 5, 8)
    for cf in (None, 1.0):
        moe = MoE(8, 16, 4, k=2, capacity_factor=cf)
        x = torch.randn(0, 8, requires_grad=True)
        y = moe(x)
        assert y.shape == (0, 8)
        (y.sum() + moe.aux_loss).backward()
        assert moe.aux_loss.item() == 0.0 and torch.all(moe.expert_counts == 0)


def test_moe_bfloat16():
    torch.manual_seed(0)
    moe_bf = MoE(16, 32, 4, k=2, capacity_factor=None).to(torch.bfloat16)
    x = torch.randn(30, 16).bfloat16()
    y = moe_bf(x)
    assert y.dtype == torch.bfloat16 and moe_bf.router.weight.dtype == torch.bfloat16
    # the same (bf16-representable) weights and inputs in float32: same routing, bf16-close outputs
    moe = MoE(16, 32, 4, k=2, capacity_factor=None)
    moe.load_state_dict({n: t.float() for n, t in moe_bf.state_dict().items()})
    y32 = moe(x.float())
    assert torch.equal(moe.expert_counts, moe_bf.expert_counts)
    torch.testing.assert_close(y.float(), y32, rtol=2e-2, atol=2e-2)


def test_moe_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        MoE(8, 16, 4, activation="tanh")
    with pytest.raises(ValueError, match="router"):
        MoE(8, 16, 4, router="hash")
    with pytest.raises(ValueError, match="impl"):
        MoE(8, 16, 4, impl="cuda")
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(8, 16, 4, capacity_factor=-1.0)
    with pytest.raises(ValueError, match="k"):
        MoE(8, 16, 4, k=5)


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_moe_input_of_the_wrong_width_names_the_argument(impl):
    moe = MoE(8, 16, 4, k=2, impl=impl)
    for bad in (torch.randn(3, 7), torch.randn(2, 3, 16), torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r"argument 'x' must have a last dim of d_model = 8"):
            moe(bad)
    scripted = torch.jit.script(MoE(8, 16, 4, k=2))
    with pytest.raises(Exception, match="argument 'x' must have a last dim of d_model = 8"):
        scripted(torch.randn(3, 7))


def test_extra_repr():
    r = repr(MoE(8, 16, 4, k=2, capacity_factor=1.25, activation="relu"))
    assert "d_model=8, d_ff=16, num_experts=4, k=2, capacity_factor=1.25, activation='relu'" in r
    assert "TopkRouter(d_model=8, num_experts=4, k=2" in r
    assert "noise_eps" in repr(NoisyTopkRouter(8, 4, 2))
    assert "capacity_factor=1.25" in repr(SwitchMoE(8, 16, 4))


# ------------------------------------------------------------------------------------------ SwitchMoE


def reference_switch(moe, x):
    """Switch Transformer, eq. 1-2 and 4: top-1, expert output times the router probability, capacity."""
    h = x.reshape(-1, moe.d_model)
    T = h.shape[0]
    probs = torch.softmax(h @ moe.router.weight.t(), -1)
    p, e_idx = probs.max(-1)
    cap = min(T, max(moe.min_capacity, math.floor(moe.capacity_factor * T / moe.num_experts)))
    y = torch.zeros_like(h)
    fill = [0] * moe.num_experts
    for t in range(T):
        e = int(e_idx[t])
        if fill[e] < cap:
            y[t] = p[t] * expert_mlp(moe, e, h[t : t + 1])[0]
        fill[e] += 1
    f = torch.bincount(e_idx, minlength=moe.num_experts).float() / T
    aux = moe.aux_loss_weight * moe.num_experts * (f * probs.mean(0)).sum()
    return y.view(x.shape), aux


def test_switch_moe_matches_paper():
    torch.manual_seed(2)
    moe = SwitchMoE(16, 32, 4, capacity_factor=1.0)
    assert moe.k == 1 and moe.activation == "relu" and moe.capacity_factor == 1.0
    x = torch.randn(2, 12, 16)
    ours = params_and_grads(moe, x, moe)
    theirs = params_and_grads(moe, x, lambda t: reference_switch(moe, t))
    for a, b in zip(ours[:2], theirs[:2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for n in ours[2]:
        torch.testing.assert_close(ours[2][n], theirs[2][n], rtol=1e-4, atol=1e-5, msg=n)
    assert moe.dropped_tokens.item() > 0  # 24 tokens over 4 experts with capacity 6 in this draw


def test_switch_moe_dropless():
    torch.manual_seed(2)
    moe = SwitchMoE(16, 32, 4, capacity_factor=None, activation="gelu")
    x = torch.randn(20, 16)
    y = moe(x)
    probs = torch.softmax(x @ moe.router.weight.t(), -1)
    p, e = probs.max(-1)
    expected = torch.stack([p[t] * expert_mlp(moe, int(e[t]), x[t : t + 1])[0] for t in range(20)])
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    assert moe.dropped_tokens.item() == 0


# ------------------------------------------------------------------------------------------ TorchScript / compile

MODULES = [
    ("moe_dropless", lambda: MoE(16, 32, 4, k=2)),
    ("moe_capacity", lambda: MoE(16, 32, 4, k=2, capacity_factor=1.25, activation="gelu")),
    ("moe_noisy", lambda: MoE(16, 32, 4, k=2, router="noisy", activation="relu").eval()),
    ("switch", lambda: SwitchMoE(16, 32, 4)),
]


@pytest.mark.parametrize("name,make", MODULES, ids=[m[0] for m in MODULES])
def test_script_save_load(name, make, tmp_path):
    torch.manual_seed(0)
    moe = make()
    x = torch.randn(2, 10, 16)
    expected = params_and_grads(moe, x, moe)
    scripted = torch.jit.script(moe)
    path = tmp_path / f"{name}.pt"
    scripted.save(str(path))
    loaded = torch.jit.load(str(path))
    got = params_and_grads(loaded, x, loaded)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    for n in expected[2]:
        torch.testing.assert_close(got[2][n], expected[2][n], msg=n)
    torch.testing.assert_close(loaded.aux_loss, moe.aux_loss)
    assert torch.equal(loaded.expert_counts, moe.expert_counts)


def test_script_routers():
    router = TopkRouter(8, 6, 2, use_expert_bias=True, num_expert_groups=2, topk_expert_groups=1)
    x = torch.randn(9, 8)
    scripted = torch.jit.script(router)
    for a, b in zip(scripted(x), router(x)):
        torch.testing.assert_close(a, b)
    noisy = NoisyTopkRouter(8, 6, 2).eval()
    for a, b in zip(torch.jit.script(noisy)(x), noisy(x)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name,make", MODULES, ids=[m[0] for m in MODULES])
def test_compile_fullgraph_matches_eager(name, make):
    torch.manual_seed(0)
    moe = make()
    x = torch.randn(2, 10, 16)
    expected = params_and_grads(moe, x, moe)
    aux = moe.aux_loss.detach().clone()
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    got = params_and_grads(moe, x, compiled)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)
    for n in expected[2]:
        torch.testing.assert_close(got[2][n], expected[2][n], rtol=1e-5, atol=1e-6, msg=n)
    torch.testing.assert_close(moe.aux_loss.detach(), aux)


def test_compile_inductor_dropless():
    torch.manual_seed(0)
    moe = MoE(16, 32, 4, k=2)
    x = torch.randn(24, 16)
    expected = moe(x)
    torch.testing.assert_close(torch.compile(moe, fullgraph=True)(x), expected, rtol=1e-5, atol=1e-5)


def test_scripted_moe_runs_in_fresh_process(tmp_path):
    import textwrap

    torch.manual_seed(0)
    moe = MoE(16, 32, 4, k=2, capacity_factor=None)
    x = torch.randn(12, 16)
    y, dx, grads = params_and_grads(moe, x, moe)
    torch.jit.script(moe).save(str(tmp_path / "moe.pt"))
    torch.save({"x": x, "y": y, "dx": dx, "grads": grads, "aux": moe.aux_loss.detach()}, tmp_path / "expected.pt")
    # only torchmoe is imported (for the ops): torchmoe.nn is not needed to run the saved module
    script = textwrap.dedent(
        f"""
        import sys, torch, torchmoe
        m = torch.jit.load({str(tmp_path / "moe.pt")!r})
        e = torch.load({str(tmp_path / "expected.pt")!r})
        x = e["x"].clone().requires_grad_(True)
        y = m(x)
        (((y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum()) + m.aux_loss).backward()
        torch.testing.assert_close(y, e["y"])
        torch.testing.assert_close(x.grad, e["dx"])
        torch.testing.assert_close(m.aux_loss.detach(), e["aux"])
        for n, p in m.named_parameters():
            torch.testing.assert_close(p.grad, e["grads"][n])
        assert "torchmoe.nn" not in sys.modules
        print("fresh-process-ok")
        """
    )
    assert "fresh-process-ok" in run_python(script)


@pytest.mark.parametrize("capacity_factor", [None, 1.25])
def test_compile_dynamic_shapes(capacity_factor):
    torch.manual_seed(0)
    moe = MoE(16, 32, 4, k=2, capacity_factor=capacity_factor, activation="relu")
    compiled = torch.compile(moe, fullgraph=True, dynamic=True, backend="aot_eager")
    for T in (10, 23, 64):
        x = torch.randn(T, 16)
        expected = moe(x)
        counts, dropped = moe.expert_counts.clone(), moe.dropped_tokens.clone()
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(moe.expert_counts, counts) and torch.equal(moe.dropped_tokens, dropped)


@pytest.mark.parametrize("kwargs", [dict(router="noisy"), dict(z_loss_weight=0.1, capacity_factor=1.0), {}],
                         ids=["noisy", "z-loss-capacity", "plain"])
@pytest.mark.parametrize("training", [True, False])
def test_aux_loss_under_no_grad_is_computed_when_read_and_equal(kwargs, training):
    torch.manual_seed(0)
    moe = MoE(16, 32, 4, k=2, **kwargs).train(training)
    x = torch.randn(7, 16)
    torch.manual_seed(1)
    y = moe(x)
    expected = moe.aux_loss.detach().clone()
    torch.manual_seed(1)
    with torch.no_grad():
        y_no_grad = moe(x)
    assert "aux_loss" not in vars(moe)  # deferred: nothing has read it yet
    assert torch.equal(y_no_grad, y)
    assert torch.equal(moe.aux_loss, expected) and not moe.aux_loss.requires_grad
    assert torch.equal(vars(moe)["aux_loss"], expected)  # computed once, then a plain attribute
    torch.manual_seed(1)
    with torch.no_grad():
        moe(x)
    assert torch.equal(copy.deepcopy(moe).aux_loss, expected)
    scripted = torch.jit.script(moe)  # scripting a module with a deferred aux loss
    torch.manual_seed(1)
    scripted(x)
    torch.testing.assert_close(scripted.aux_loss.detach(), expected)
