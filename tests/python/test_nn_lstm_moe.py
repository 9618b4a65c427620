"""LSTMGatedMoE against the seed's LSTM-gated mixture (nn.LSTM gate, a Python loop over expert modules)."""
import copy

import pytest
import torch
import torch.nn as nn

import torchmoe  # noqa: F401  (registers the ops)
from torchmoe.nn.lstm_moe import LSTMGatedMoE, _lstm_steps


class SeedLSTMMoE(nn.Module):
    """Seed 004's LSTMMoE with Linear-act-Linear experts: softmax(fc(LSTM(x))) weighting a loop of experts."""

    def __init__(self, d_model, d_hidden, d_ff, d_out, num_experts, activation, bias):
        super().__init__()
        self.lstm = nn.LSTM(d_model, d_hidden, batch_first=True)
        self.fc = nn.Linear(d_hidden, num_experts)
        act = nn.ReLU if activation == "relu" else nn.GELU
        self.experts = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(d_model, d_ff, bias=bias), act(), nn.Linear(d_ff, d_out, bias=bias))
                for _ in range(num_experts)
            ]
        )

    def forward(self, x):
        gates = torch.softmax(self.fc(self.lstm(x)[0]), dim=-1)
        outs = torch.stack([expert(x) for expert in self.experts], dim=-1)
        return (outs * gates.unsqueeze(-2)).sum(-1), gates


def seed_from(m: LSTMGatedMoE) -> SeedLSTMMoE:
    bias = m.up_bias is not None
    ref = SeedLSTMMoE(m.d_model, m.d_hidden, m.d_ff, m.d_out, m.num_experts, m.activation, bias)
    ref = ref.to(m.up_proj.dtype)
    with torch.no_grad():
        ref.lstm.weight_ih_l0.copy_(m.lstm_weight_ih)
        ref.lstm.weight_hh_l0.copy_(m.lstm_weight_hh)
        ref.lstm.bias_ih_l0.copy_(m.lstm_bias_ih)
        ref.lstm.bias_hh_l0.copy_(m.lstm_bias_hh)
        ref.fc.weight.copy_(m.gate_weight)
        ref.fc.bias.copy_(m.gate_bias)
        for i, expert in enumerate(ref.experts):
            expert[0].weight.copy_(m.up_proj[i].t())
            expert[2].weight.copy_(m.down_proj[i].t())
            if bias:
                expert[0].bias.copy_(m.up_bias[i])
                expert[2].bias.copy_(m.down_bias[i])
    return ref


def run_seed(ref, x):
    """The seed works on [B, S, d]; fold leading dims, and a 2-D input is one sequence."""
    seqs = x.reshape(-1, x.shape[-2], x.shape[-1])
    y, g = ref(seqs)
    return y.reshape(*x.shape[:-1], -1), g.reshape(*x.shape[:-1], -1)


CONFIGS = [
    # (d_model, d_ff, E, d_hidden, d_out, activation, bias, input shape)
    (8, 16, 4, None, None, "relu", True, (2, 5, 8)),
    (8, 12, 1, 6, 5, "gelu", True, (3, 4, 8)),
    (6, 10, 3, 9, None, "relu", False, (7, 6)),  # one unbatched sequence
    (5, 7, 6, 4, 3, "gelu", False, (2, 3, 4, 5)),  # two leading dims
    (4, 4, 2, None, None, "relu", True, (1, 1, 4)),
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_seed(cfg, dtype):
    d_model, d_ff, E, d_hidden, d_out, act, bias, shape = cfg
    torch.manual_seed(0)
    m = LSTMGatedMoE(d_model, d_ff, E, d_hidden=d_hidden, d_out=d_out, activation=act, bias=bias, dtype=dtype)
    ref = seed_from(m)
    x = torch.randn(shape, dtype=dtype)
    y = m(x)
    y_ref, g_ref = run_seed(ref, x)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert y.shape == (*shape[:-1], m.d_out)
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    assert m.gates.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(m.gates, g_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(m.gates.sum(-1), torch.ones(shape[:-1], dtype=dtype), atol=1e-6, rtol=0)


def test_gradients_match_seed_and_reach_every_parameter():
    torch.manual_seed(1)
    m = LSTMGatedMoE(6, 10, 3, d_hidden=5, dtype=torch.float64)
    ref = seed_from(m)
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    probe = torch.randn(2, 4, 6, dtype=torch.float64)
    (m(x) * probe).sum().backward()
    (run_seed(ref, x_ref)[0] * probe).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    pairs = {
        "lstm_weight_ih": ref.lstm.weight_ih_l0.grad,
        "lstm_weight_hh": ref.lstm.weight_hh_l0.grad,
        "lstm_bias_ih": ref.lstm.bias_ih_l0.grad,
        "lstm_bias_hh": ref.lstm.bias_hh_l0.grad,
        "gate_weight": ref.fc.weight.grad,
        "gate_bias": ref.fc.bias.grad,
        "up_proj": torch.stack([e[0].weight.grad.t() for e in ref.experts]),
        "up_bias": torch.stack([e[0].bias.grad for e in ref.experts]),
        "down_proj": torch.stack([e[2].weight.grad.t() for e in ref.experts]),
        "down_bias": torch.stack([e[2].bias.grad for e in ref.experts]),
    }
    names = {name for name, _ in m.named_parameters()}
    assert names == set(pairs)
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, pairs[name], msg=name)


def test_unrolled_recurrence_matches_nn_lstm():
    torch.manual_seed(2)
    lstm = nn.LSTM(5, 7, batch_first=True).double()
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    out = _lstm_steps(x, lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)
    torch.testing.assert_close(out, lstm(x)[0])


def test_importance_loss():
    torch.manual_seed(3)
    m = LSTMGatedMoE(6, 8, 4, importance_loss_weight=0.1, dtype=torch.float64)
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    m(x)
    _, gates = run_seed(seed_from(m), x)
    importance = gates.reshape(-1, 4).sum(0)
    expected = 0.1 * importance.var(unbiased=False) / importance.mean() ** 2  # Shazeer's CV^2
    torch.testing.assert_close(m.aux_loss.double(), expected, rtol=1e-5, atol=0)
    assert m.aux_loss.requires_grad
    m.aux_loss.backward()
    assert m.gate_weight.grad.abs().sum() > 0
    off = LSTMGatedMoE(6, 8, 4)
    off.aux_loss = torch.ones(())
    off(x.float())
    assert off.aux_loss.item() == 0


@pytest.mark.parametrize("shape", [(0, 5, 8), (2, 0, 8), (0, 8), (3, 0, 5, 8)])
def test_empty(shape):
    m = LSTMGatedMoE(8, 16, 4, d_out=3)
    x = torch.randn(shape, requires_grad=True)
    y = m(x)
    assert y.shape == (*shape[:-1], 3)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_script_save_load(tmp_path):
    torch.manual_seed(4)
    m = LSTMGatedMoE(6, 8, 3, d_hidden=5, d_out=4, importance_loss_weight=0.01)
    x = torch.randn(2, 5, 6)
    scripted = torch.jit.script(m)
    path = tmp_path / "lstm_moe.pt"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    y = loaded(x)
    torch.testing.assert_close(y, m(x))
    torch.testing.assert_close(loaded.aux_loss, m.aux_loss)
    y.sum().backward()
    assert all(p.grad is not None for p in loaded.parameters())
    no_bias = torch.jit.script(LSTMGatedMoE(6, 8, 3, bias=False, activation="gelu"))
    assert no_bias(x).shape == (2, 5, 6)


def test_compile_fullgraph():
    torch.manual_seed(5)
    m = LSTMGatedMoE(6, 8, 3, d_hidden=5)
    x = torch.randn(2, 4, 6)
    y_eager = m(x)
    y_eager.sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    # aot_eager: Dynamo's full graph and AOT autograd over fake tensors; Inductor's codegen of the unrolled
    # recurrence alone takes most of a minute on a 2-core machine (MoLoRA and MoLE tests cover Inductor).
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, y_eager, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-5, msg=n)


def test_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        LSTMGatedMoE(4, 4, 2, activation="tanh")
    with pytest.raises(ValueError, match="num_experts"):
        LSTMGatedMoE(4, 4, 0)
    with pytest.raises(ValueError, match="d_hidden"):
        LSTMGatedMoE(4, 4, 2, d_hidden=0)
    m = LSTMGatedMoE(4, 4, 2)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(4))


def test_extra_repr():
    text = repr(LSTMGatedMoE(4, 6, 3, d_hidden=5, activation="gelu", bias=False))
    for part in ("d_model=4", "d_ff=6", "num_experts=3", "d_hidden=5", "activation='gelu'", "bias=False"):
        assert part in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu():
    torch.manual_seed(9)
    m = LSTMGatedMoE(16, 32, 4, d_hidden=12, importance_loss_weight=0.1)
    x = torch.randn(3, 9, 16)
    y = m(x)
    (y.square().sum() + m.aux_loss).backward()
    mc = copy.deepcopy(m).cuda()
    mc.zero_grad()
    yc = mc(x.cuda())
    (yc.square().sum() + mc.aux_loss).backward()
    torch.testing.assert_close(yc.cpu(), y, atol=1e-4, rtol=1e-4)
    for (n, p), pc in zip(m.named_parameters(), mc.parameters()):
        torch.testing.assert_close(pc.grad.cpu(), p.grad, atol=1e-3, rtol=1e-3, msg=n)
    compiled = torch.compile(mc, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x.cuda()).cpu(), y, atol=1e-4, rtol=1e-4)
