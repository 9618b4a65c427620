"""torchmoe.losses on hand-computed cases, plus TorchScript / compile / gradient checks."""
import math

import pytest
import torch

from torchmoe import losses


def test_switch_balanced_is_one():
    # 4 tokens, 4 experts, each token to a different expert, uniform probabilities.
    probs = torch.full((4, 4), 0.25)
    indices = torch.tensor([[0], [1], [2], [3]])
    assert losses.switch_load_balancing_loss(probs, indices).item() == pytest.approx(1.0)


def test_switch_collapsed_is_num_experts():
    probs = torch.zeros(6, 3)
    probs[:, 1] = 1.0
    indices = torch.ones(6, 1, dtype=torch.long)
    assert losses.switch_load_balancing_loss(probs, indices).item() == pytest.approx(3.0)


def test_switch_hand_computed_top2():
    # T=2, E=3, k=2. Assignments: token0 -> {0, 1}, token1 -> {0, 2}: f = [2/4, 1/4, 1/4].
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3]])
    indices = torch.tensor([[0, 1], [0, 2]])
    # P = [0.55, 0.2, 0.25]; loss = 3 * (0.5*0.55 + 0.25*0.2 + 0.25*0.25) = 3 * 0.3875
    assert losses.switch_load_balancing_loss(probs, indices).item() == pytest.approx(1.1625)


def test_switch_leading_dims_and_gradient():
    probs = torch.tensor([[[0.5, 0.3, 0.2]], [[0.6, 0.1, 0.3]]], requires_grad=True)
    indices = torch.tensor([[[0, 1]], [[0, 2]]])
    loss = losses.switch_load_balancing_loss(probs, indices)
    assert loss.item() == pytest.approx(1.1625)
    (g,) = torch.autograd.grad(loss, probs)
    # d/dP_i = E * f_i / T
    expected = torch.tensor([0.5, 0.25, 0.25]) * 3 / 2
    torch.testing.assert_close(g, expected.expand(2, 1, 3))


def test_switch_empty_batch_is_zero():
    loss = losses.switch_load_balancing_loss(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.long))
    assert loss.item() == 0.0


def test_router_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2, log 4 -> mean of squares
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert losses.router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    assert losses.router_z_loss(logits.to(torch.bfloat16)).dtype == torch.float32
    assert losses.router_z_loss(torch.zeros(0, 5)).item() == 0.0


def test_cv_squared_hand_computed():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    # mean 3, population variance (4 + 1 + 0 + 9) / 4 = 3.5 -> 3.5 / 9
    assert losses.cv_squared(x).item() == pytest.approx(3.5 / 9, rel=1e-6)
    assert losses.cv_squared(torch.tensor([5.0, 5.0, 5.0])).item() == 0.0
    assert losses.cv_squared(torch.tensor([7.0])).item() == 0.0
    assert losses.cv_squared(torch.zeros(0)).item() == 0.0


def test_importance_loss_hand_computed():
    gates = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.6, 0.4], [0.5, 0.0, 0.5]])
    # importance = [1.2, 0.9, 0.9], mean 1.0, variance (0.04 + 0.01 + 0.01) / 3 = 0.02
    assert losses.importance_loss(gates).item() == pytest.approx(0.02, rel=1e-5)


def _phi(z):
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def test_load_loss_hand_computed():
    # One token, E=3, k=1. noisy = [2, 1, 0]: expert 0 is in the top 1; thresholds: if in -> 1, if out -> 2.
    clean = torch.tensor([[1.5, 0.5, 0.2]])
    noisy = torch.tensor([[2.0, 1.0, 0.0]])
    std = torch.tensor([[1.0, 0.5, 2.0]])
    p = [_phi((1.5 - 1.0) / 1.0), _phi((0.5 - 2.0) / 0.5), _phi((0.2 - 2.0) / 2.0)]
    mean = sum(p) / 3
    var = sum((v - mean) ** 2 for v in p) / 3
    expected = var / mean**2
    assert losses.load_loss(clean, noisy, std, 1).item() == pytest.approx(expected, rel=1e-5)


def test_load_loss_top2_two_tokens_and_scalar_std():
    clean = torch.tensor([[0.0, 1.0, 2.0, -1.0], [1.0, 0.0, 0.5, 0.2]])
    noisy = torch.tensor([[0.1, 1.2, 1.9, -0.5], [0.8, 0.3, 0.6, 0.1]])
    std = torch.tensor(0.7)
    k = 2
    load = [0.0] * 4
    for t in range(2):
        vals = sorted(noisy[t].tolist(), reverse=True)
        for i in range(4):
            in_top = noisy[t, i].item() > vals[k]
            thr = vals[k] if in_top else vals[k - 1]
            load[i] += _phi((clean[t, i].item() - thr) / 0.7)
    mean = sum(load) / 4
    expected = (sum((v - mean) ** 2 for v in load) / 4) / mean**2
    assert losses.load_loss(clean, noisy, std, k).item() == pytest.approx(expected, rel=1e-5)


def test_load_loss_k_equals_num_experts_is_zero():
    c = torch.randn(5, 3, requires_grad=True)
    loss = losses.load_loss(c, c + 1, torch.ones(5, 3), 3)
    assert loss.item() == 0.0
    loss.backward()


def test_load_loss_gradient_reaches_clean_logits_and_std():
    clean = torch.randn(16, 6, requires_grad=True)
    std = (torch.rand(16, 6) + 0.5).requires_grad_()
    noisy = clean + torch.randn(16, 6) * std
    gc, gs = torch.autograd.grad(losses.load_loss(clean, noisy, std, 2), (clean, std))
    assert gc.abs().sum() > 0 and gs.abs().sum() > 0


@pytest.mark.parametrize(
    "name", ["switch_load_balancing_loss", "router_z_loss", "cv_squared", "importance_loss", "load_loss"]
)
def test_scriptable_and_compilable(name):
    fn = getattr(losses, name)
    clean = torch.randn(12, 5)
    args = {
        "switch_load_balancing_loss": (torch.softmax(clean, -1), clean.topk(2, -1).indices),
        "router_z_loss": (clean,),
        "cv_squared": (clean[0],),
        "importance_loss": (torch.softmax(clean, -1),),
        "load_loss": (clean, clean + torch.randn(12, 5), torch.full((12, 5), 0.5), 2),
    }[name]
    expected = fn(*args)
    torch.testing.assert_close(torch.jit.script(fn)(*args), expected)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(*args), expected)
