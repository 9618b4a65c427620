"""MoLE against a loop over its dense experts, and MoLE.from_moe against the SVD optimum and the MoE itself."""
import copy

import pytest
import torch
import torch.nn.functional as F

import torchmoe
from torchmoe import reference
from torchmoe.nn import MoE
from torchmoe.nn.mole import MoLE
import torchmoe.nn.mole as mole_module


def dense_experts(m: MoLE):
    """W_i = basis_{group(i)} @ coef_i written out expert by expert (seed 001's A_i B, transposed)."""
    gate = torch.stack([m.gate_basis[i // m.group_size] @ m.gate_coef[i] for i in range(m.num_experts)])
    up = torch.stack([m.up_basis[i // m.group_size] @ m.up_coef[i] for i in range(m.num_experts)])
    return gate, up


def reference_forward(m: MoLE, x: torch.Tensor):
    """Router, then for every expert: its tokens (kept by the reference plan) through the dense SwiGLU
    expert, weighted and summed. Returns (y, dest, counts)."""
    tokens = x.reshape(-1, m.d_model)
    n = tokens.shape[0]
    weights, indices, _ = m.router(tokens)
    cap = -1 if m.capacity_factor is None else torchmoe.capacity(n, m.num_experts, m.k, m.capacity_factor,
                                                                   m.min_capacity)
    dest, counts = reference.route_plan(indices.contiguous(), m.num_experts, cap)
    gate, up = dense_experts(m)
    y = torch.zeros_like(tokens)
    for e in range(m.num_experts):
        sel = ((indices == e) & (dest >= 0)).to(weights.dtype)
        w = (weights * sel).sum(-1, keepdim=True)
        out = (F.silu(tokens @ gate[e]) * (tokens @ up[e])) @ m.down_proj[e]
        y = y + w.to(out.dtype) * out
    return y.reshape(x.shape), dest, counts


CONFIGS = [
    # (d_model, d_ff, E, group_size, rank, k, capacity_factor, input shape)
    (8, 12, 4, 2, 3, 2, None, (10, 8)),
    (8, 12, 4, 4, 5, 1, None, (3, 5, 8)),
    (6, 8, 6, 1, 2, 3, None, (2, 2, 3, 6)),
    (8, 12, 4, 2, 3, 2, 1.0, (16, 8)),
    (8, 6, 8, 4, 8, 2, 0.5, (4, 6, 8)),  # many drops
    (6, 8, 6, 3, 4, 2, 2.0, (9, 6)),
    (4, 4, 1, 1, 2, 1, None, (5, 4)),
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(cfg, dtype):
    d_model, d_ff, E, gs, r, k, cf, shape = cfg
    torch.manual_seed(0)
    m = MoLE(d_model, d_ff, E, gs, r, k=k, capacity_factor=cf, dtype=dtype)
    x = torch.randn(shape, dtype=dtype)
    y = m(x)
    y_ref, dest, counts = reference_forward(m, x)
    assert y.shape == x.shape and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    assert torch.equal(m.expert_counts, counts)
    assert m.dropped_tokens.item() == int((dest < 0).sum())
    if cf is None:
        assert m.dropped_tokens.item() == 0


def test_dispatches_latent_vectors(monkeypatch):
    widths = []
    real = mole_module.dispatch

    def recording(x, dest, num_rows):
        widths.append(x.shape[1])
        return real(x, dest, num_rows)

    monkeypatch.setattr(mole_module, "dispatch", recording)
    for cf in (None, 1.0):
        m = MoLE(16, 8, 4, 2, 3, k=2, capacity_factor=cf)
        m(torch.randn(6, 16))
    assert widths and all(w == 3 for w in widths)


@pytest.mark.parametrize("cf", [None, 1.0])
def test_gradients_match_reference_and_reach_every_parameter(cf):
    torch.manual_seed(1)
    m = MoLE(6, 8, 4, 2, 3, k=2, capacity_factor=cf, dtype=torch.float64)
    x = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(12, 6, dtype=torch.float64)
    (m(x) * probe).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    x_ref = x.detach().clone().requires_grad_(True)
    (reference_forward(m, x_ref)[0] * probe).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert {"router.weight", "up_basis", "gate_basis", "up_coef", "gate_coef", "down_proj"} <= set(grads)
    for n, p in m.named_parameters():
        assert grads[n].abs().sum() > 0, n
        torch.testing.assert_close(grads[n], p.grad.to(grads[n].dtype), msg=n)


def test_aux_loss():
    torch.manual_seed(2)
    m = MoLE(6, 8, 4, 2, 3, k=2, aux_loss_weight=0.1, z_loss_weight=0.01)
    x = torch.randn(20, 6)
    m(x)
    logits = x @ m.router.weight.t()
    probs = torch.softmax(logits, -1)
    indices = m.router(x)[1]
    frac = torch.bincount(indices.reshape(-1), minlength=4).float() / (20 * 2)
    expected = 0.1 * 4 * (frac * probs.mean(0)).sum() + 0.01 * torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(m.aux_loss, expected)
    m.aux_loss.backward()
    assert m.router.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------- conversion
def make_moe(d_model, d_ff, E, k=2, cf=None, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return MoE(d_model, d_ff, E, k=k, capacity_factor=cf, activation="swiglu").to(dtype)


@pytest.mark.parametrize("group_size, rank", [(1, 2), (2, 3), (2, 7), (4, 1), (4, 5), (4, 6)])
def test_conversion_error_is_svd_optimum(group_size, rank):
    d_model, d_ff, E = 6, 4, 4
    moe = make_moe(d_model, d_ff, E)
    mole = MoLE.from_moe(moe, group_size, rank=rank)
    full = min(d_model, group_size * d_ff)
    assert mole.rank == min(rank, full)
    gate, up = mole.expert_weights()
    G = E // group_size
    total_err, total_norm = {}, {}
    for name, exact, approx in (("gate", moe.gate_proj, gate), ("up", moe.up_proj, up)):
        err2 = norm2 = 0.0
        for g in range(G):
            experts = range(g * group_size, (g + 1) * group_size)
            stacked = torch.cat([exact[i].detach() for i in experts], dim=1)  # [d_model, gs * d_ff]
            stacked_hat = torch.cat([approx[i].detach() for i in experts], dim=1)
            sigma = torch.linalg.svdvals(stacked)
            optimum = sigma[mole.rank:].square().sum()
            got = (stacked - stacked_hat).square().sum()
            torch.testing.assert_close(got, optimum, atol=1e-10, rtol=1e-8)
            err2 += got.item()
            norm2 += stacked.square().sum().item()
        total_err[name], total_norm[name] = err2, norm2
    errors = mole.conversion_error(moe)
    for name in ("gate", "up"):
        assert errors[name].item() == pytest.approx((total_err[name] / total_norm[name]) ** 0.5, abs=1e-9)
        if mole.rank == full:
            assert errors[name].item() < 1e-12
        else:
            assert errors[name].item() > 1e-3


def test_conversion_basis_is_balanced():
    moe = make_moe(8, 4, 4)
    mole = MoLE.from_moe(moe, 2, rank=3)
    # basis = U_r S^1/2, coef = S^1/2 V_r^T: U^T U = S = C C^T over the group's stacked coefficients.
    for g in range(2):
        basis = mole.up_basis[g]
        coef = torch.cat([mole.up_coef[2 * g], mole.up_coef[2 * g + 1]], dim=1)
        torch.testing.assert_close(basis.t() @ basis, coef @ coef.t())
        gram = basis.t() @ basis
        torch.testing.assert_close(gram, torch.diag(gram.diagonal()))


def train_a_few_steps(moe, steps=5):
    torch.manual_seed(3)
    opt = torch.optim.SGD(moe.parameters(), lr=0.05)
    x = torch.randn(64, moe.up_proj.shape[1], dtype=moe.up_proj.dtype)
    target = torch.randn_like(x)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(moe(x), target).backward()
        opt.step()
    return moe


@pytest.mark.parametrize("cf, group_size", [(None, 2), (None, 4), (1.25, 2), (0.5, 1)])
def test_trained_moe_converted_at_full_rank_gives_same_outputs(cf, group_size):
    moe = train_a_few_steps(make_moe(8, 6, 4, k=2, cf=cf, dtype=torch.float32, seed=4))
    mole = MoLE.from_moe(moe, group_size)
    assert mole.rank == min(8, group_size * 6)
    assert mole.capacity_factor == cf and mole.k == 2
    x = torch.randn(3, 7, 8)
    y = mole(x)
    torch.testing.assert_close(y, moe(x), atol=2e-5, rtol=2e-5)
    assert torch.equal(mole.expert_counts, moe.expert_counts)
    assert int(mole.dropped_tokens) == int(moe.dropped_tokens)
    torch.testing.assert_close(mole.aux_loss, moe.aux_loss)
    torch.testing.assert_close(mole.down_proj, moe.down_proj)
    torch.testing.assert_close(mole.router.weight, moe.router.weight)
    assert mole.router is not moe.router


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(router="noisy"),
        dict(score_func="sigmoid", renormalize=False, use_expert_bias=True),
        dict(capacity_factor=0.75, min_capacity=3, aux_loss_weight=0.5, z_loss_weight=0.0),
        dict(num_expert_groups=2, topk_expert_groups=1),
    ],
)
def test_from_moe_keeps_router_configuration(kwargs):
    torch.manual_seed(7)
    moe = MoE(8, 6, 4, k=2, **kwargs).eval()
    if kwargs.get("use_expert_bias"):
        with torch.no_grad():
            moe.router.expert_bias.normal_()  # selection-only bias, must carry over
    mole = MoLE.from_moe(moe, 2)
    assert type(mole.router) is type(moe.router) and not mole.training
    assert mole.min_capacity == moe.min_capacity and mole.score_func == moe.score_func
    x = torch.randn(20, 8)
    torch.testing.assert_close(mole(x), moe(x), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(mole.aux_loss, moe.aux_loss)
    assert torch.equal(mole.expert_counts, moe.expert_counts)
    assert int(mole.dropped_tokens) == int(moe.dropped_tokens)


def test_from_moe_rejects():
    moe = make_moe(6, 4, 4)
    with pytest.raises(ValueError, match="group_size"):
        MoLE.from_moe(moe, 3)
    relu = MoE(6, 4, 4, k=2, activation="relu")
    with pytest.raises(ValueError, match="SwiGLU"):
        MoLE.from_moe(relu, 2)


# ------------------------------------------------------------------------------------------- plumbing
@pytest.mark.parametrize("cf", [None, 1.0])
def test_empty(cf):
    m = MoLE(6, 8, 4, 2, 3, k=2, capacity_factor=cf)
    x = torch.randn(0, 6, requires_grad=True)
    y = m(x)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("cf", [None, 1.0])
def test_script_save_load(tmp_path, cf):
    torch.manual_seed(5)
    m = MoLE(6, 8, 4, 2, 3, k=2, capacity_factor=cf)
    x = torch.randn(2, 5, 6)
    path = tmp_path / "mole.pt"
    torch.jit.save(torch.jit.script(m), str(path))
    loaded = torch.jit.load(str(path))
    y = loaded(x)
    torch.testing.assert_close(y, m(x))
    torch.testing.assert_close(loaded.aux_loss, m.aux_loss)
    assert torch.equal(loaded.expert_counts, m.expert_counts)
    y.sum().backward()
    assert all(p.grad is not None for p in loaded.parameters())


@pytest.mark.parametrize("cf, backend", [(None, "inductor"), (1.0, "aot_eager")])
def test_compile_fullgraph(cf, backend):
    torch.manual_seed(6)
    m = MoLE(6, 8, 4, 2, 3, k=2, capacity_factor=cf)
    x = torch.randn(10, 6)
    y_eager = m(x)
    y_eager.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    compiled = torch.compile(m, fullgraph=True, backend=backend)
    y = compiled(x)
    torch.testing.assert_close(y, y_eager, atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-5, msg=n)
    # Another token count (Dynamo recompiles with a dynamic token dimension).
    x2 = torch.randn(3, 7, 6)
    y2 = compiled(x2)
    aux2, counts2 = m.aux_loss.detach().clone(), m.expert_counts.clone()
    torch.testing.assert_close(y2, m(x2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux2, m.aux_loss.detach())
    assert torch.equal(counts2, m.expert_counts)


def test_bad_arguments():
    with pytest.raises(ValueError, match="group_size"):
        MoLE(6, 8, 4, 3, 2)
    with pytest.raises(ValueError, match="k must"):
        MoLE(6, 8, 4, 2, 2, k=5)
    with pytest.raises(ValueError, match="rank"):
        MoLE(6, 8, 4, 2, 0)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoLE(6, 8, 4, 2, 2, capacity_factor=-1.0)
    with pytest.raises(ValueError, match="x must be"):
        MoLE(6, 8, 4, 2, 2)(torch.randn(3, 5))


def test_extra_repr():
    text = repr(MoLE(6, 8, 4, 2, 3, k=1, capacity_factor=1.5))
    for part in ("d_model=6", "d_ff=8", "num_experts=4", "group_size=2", "rank=3", "k=1", "capacity_factor=1.5"):
        assert part in text


@pytest.mark.skipif(
    not (torch.cuda.is_available() and torchmoe.built_with_cuda()), reason="needs a GPU and torchmoe's CUDA kernels"
)
@pytest.mark.parametrize("cf", [None, 1.0])
def test_cuda_matches_cpu(cf):
    torch.manual_seed(11)
    m = MoLE(16, 24, 8, 2, 6, k=2, capacity_factor=cf)
    x = torch.randn(4, 33, 16)
    y = m(x)
    (y.square().sum() + m.aux_loss).backward()
    mc = copy.deepcopy(m).cuda()
    mc.zero_grad()
    yc = mc(x.cuda())
    (yc.square().sum() + mc.aux_loss).backward()
    assert torch.equal(mc.expert_counts.cpu(), m.expert_counts)
    assert int(mc.dropped_tokens) == int(m.dropped_tokens)
    torch.testing.assert_close(yc.cpu(), y, atol=1e-4, rtol=1e-4)
    for (n, p), pc in zip(m.named_parameters(), mc.parameters()):
        torch.testing.assert_close(pc.grad.cpu(), p.grad, atol=1e-3, rtol=1e-3, msg=n)
    torch.testing.assert_close(torch.compile(mc, fullgraph=True)(x.cuda()).cpu(), y, atol=1e-4, rtol=1e-4)
