"""Dense mixture of expert MLPs gated by an LSTM over the sequence (Shazeer et al., 2017; seed 004)."""
import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses


def _lstm_steps(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """One LSTM layer, zero initial state, ``x [B, S, d] -> [B, S, H]``; gate order i, f, g, o as nn.LSTM.

    The recurrence written out step by step: used under torch.compile, where Dynamo refuses nn.LSTM and
    ``torch.lstm`` (its CPU path has no fake-tensor kernel). The input projection of every step is one GEMM.
    """
    batch = x.shape[0]
    hidden = w_hh.shape[1]
    xi = F.linear(x, w_ih, b_ih)  # [B, S, 4H]
    h = x.new_zeros(batch, hidden)
    c = x.new_zeros(batch, hidden)
    outs: List[Tensor] = []
    for t in range(x.shape[1]):
        z = xi[:, t] + F.linear(h, w_hh, b_hh)
        i, f, g, o = z.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    if len(outs) == 0:
        return x.new_zeros(batch, 0, hidden)
    return torch.stack(outs, dim=1)


class LSTMGatedMoE(nn.Module):
    r"""Dense mixture of experts whose gate is computed by an LSTM over the sequence.

    Shazeer et al. (2017) place a mixture of feed-forward experts between LSTM layers; the seed notebook
    004 gates such a mixture with an LSTM that reads the input sequence. For every token ``x_t``:

    .. math::
        h_t = \mathrm{LSTM}(x_{1..t}),\quad g_t = \mathrm{softmax}(W_g h_t + b_g),\quad
        y_t = \sum_{i=1}^{E} g_{t,i}\, E_i(x_t),\quad E_i(x) = \mathrm{act}(x W^{up}_i + b^{up}_i) W^{down}_i + b^{down}_i

    The mixture is dense: every expert runs on every token. The experts' weights are stacked, so the
    forward pass is two GEMMs over all experts at once (``[N, d_model] @ [d_model, E*d_ff]``, then the
    gate-scaled hidden ``[N, E*d_ff] @ [E*d_ff, d_out]``, which also sums over experts), never a loop over
    experts.

    Args:
        d_model: input feature size.
        d_ff: hidden size of each expert MLP.
        num_experts: E.
        d_hidden: LSTM hidden size of the gating network (default ``d_model``).
        d_out: output feature size (default ``d_model``).
        activation: ``"relu"`` (Shazeer's experts) or ``"gelu"``.
        bias: whether the expert layers have biases (the seed's ``nn.Linear`` experts do).
        importance_loss_weight: weight of Shazeer's importance loss,
            ``weight * torchmoe.losses.importance_loss(g)`` (the squared coefficient of variation of
            ``sum_t g_t``), left in :attr:`aux_loss` after each forward (0 disables it).

    Parameters (``E`` experts, ``H = d_hidden``): ``lstm_weight_ih [4H, d_model]``,
    ``lstm_weight_hh [4H, H]``, ``lstm_bias_ih``, ``lstm_bias_hh [4H]`` (the layout and gate order of
    ``nn.LSTM``'s first layer), ``gate_weight [E, H]``, ``gate_bias [E]``, ``up_proj [E, d_model, d_ff]``,
    ``up_bias [E, d_ff]``, ``down_proj [E, d_ff, d_out]``, ``down_bias [E, d_out]``; experts are used as
    ``x @ W``. Initialisation follows ``nn.LSTM`` and ``nn.Linear``.

    Shape:
        input ``[..., S, d_model]`` (``S`` the sequence dimension, the LSTM runs along it; leading dims are
        independent sequences; a 2-D input is one sequence), output ``[..., S, d_out]``.

    After each forward, :attr:`gates` holds the gate probabilities ``[..., S, E]`` (float32; float64 for
    float64 inputs) and :attr:`aux_loss` the importance loss.

    The LSTM's parameters live on this module rather than in an ``nn.LSTM`` child because Dynamo refuses
    to trace ``nn.LSTM`` (and ``torch.lstm``'s CPU path has no fake-tensor kernel): eager and TorchScript
    call the fused ``torch.lstm``, ``torch.compile`` traces the same recurrence step by step, so its graph
    is specialised on the sequence length.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        d_hidden: Optional[int] = None,
        d_out: Optional[int] = None,
        activation: str = "relu",
        bias: bool = True,
        importance_loss_weight: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if d_model <= 0 or d_ff <= 0 or num_experts <= 0:
            raise ValueError(
                f"LSTMGatedMoE: d_model, d_ff and num_experts must be positive, got {d_model}, {d_ff}, {num_experts}"
            )
        if activation not in ("relu", "gelu"):
            raise ValueError(f"LSTMGatedMoE: activation must be 'relu' or 'gelu', got {activation!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_ff = d_ff
        self.num_experts = num_experts
        self.d_hidden = d_model if d_hidden is None else d_hidden
        self.d_out = d_model if d_out is None else d_out
        if self.d_hidden <= 0 or self.d_out <= 0:
            raise ValueError(f"LSTMGatedMoE: d_hidden and d_out must be positive, got {self.d_hidden}, {self.d_out}")
        self.activation = activation
        self.importance_loss_weight = float(importance_loss_weight)
        H, E = self.d_hidden, num_experts

        self.lstm_weight_ih = nn.Parameter(torch.empty(4 * H, d_model, **factory))
        self.lstm_weight_hh = nn.Parameter(torch.empty(4 * H, H, **factory))
        self.lstm_bias_ih = nn.Parameter(torch.empty(4 * H, **factory))
        self.lstm_bias_hh = nn.Parameter(torch.empty(4 * H, **factory))
        self.gate_weight = nn.Parameter(torch.empty(E, H, **factory))
        self.gate_bias = nn.Parameter(torch.empty(E, **factory))
        self.up_proj = nn.Parameter(torch.empty(E, d_model, d_ff, **factory))
        self.down_proj = nn.Parameter(torch.empty(E, d_ff, self.d_out, **factory))
        if bias:
            self.up_bias = nn.Parameter(torch.empty(E, d_ff, **factory))
            self.down_bias = nn.Parameter(torch.empty(E, self.d_out, **factory))
        else:
            self.register_parameter("up_bias", None)
            self.register_parameter("down_bias", None)
        self.reset_parameters()

        self.aux_loss = torch.zeros(())
        self.gates = torch.zeros(0)

    def reset_parameters(self) -> None:
        """nn.LSTM's and nn.Linear's initialisation (uniform in +-1/sqrt(fan_in))."""
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.d_hidden)
            for p in (self.lstm_weight_ih, self.lstm_weight_hh, self.lstm_bias_ih, self.lstm_bias_hh):
                p.uniform_(-bound, bound)
            self.gate_weight.uniform_(-bound, bound)
            self.gate_bias.uniform_(-bound, bound)
            self.up_proj.uniform_(-1.0 / math.sqrt(self.d_model), 1.0 / math.sqrt(self.d_model))
            self.down_proj.uniform_(-1.0 / math.sqrt(self.d_ff), 1.0 / math.sqrt(self.d_ff))
            if self.up_bias is not None:
                self.up_bias.uniform_(-1.0 / math.sqrt(self.d_model), 1.0 / math.sqrt(self.d_model))
            if self.down_bias is not None:
                self.down_bias.uniform_(-1.0 / math.sqrt(self.d_ff), 1.0 / math.sqrt(self.d_ff))

    def _lstm(self, seqs: Tensor) -> Tensor:
        if seqs.shape[1] == 0:  # torch.lstm rejects empty sequences
            return seqs.new_zeros(seqs.shape[0], 0, self.d_hidden)
        if not torch.jit.is_scripting():
            if torch.compiler.is_compiling():
                return _lstm_steps(
                    seqs, self.lstm_weight_ih, self.lstm_weight_hh, self.lstm_bias_ih, self.lstm_bias_hh
                )
        h0 = seqs.new_zeros(1, seqs.shape[0], self.d_hidden)
        params = [self.lstm_weight_ih, self.lstm_weight_hh, self.lstm_bias_ih, self.lstm_bias_hh]
        out = torch.lstm(seqs, [h0, h0], params, True, 1, 0.0, self.training, False, True)
        return out[0]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"LSTMGatedMoE: x must be [..., S, {self.d_model}], got {list(x.shape)}"
            )
        seq_len = x.shape[-2]
        batch = 1
        for s in x.shape[:-2]:
            batch *= s
        seqs = x.reshape(batch, seq_len, self.d_model)  # [B, S, d]
        E = self.num_experts
        d_ff = self.d_ff

        # Gating network: LSTM over each sequence, linear to E logits, softmax in float32 (float64 for float64).
        lstm_out = self._lstm(seqs)
        logits = F.linear(lstm_out, self.gate_weight, self.gate_bias)
        acc = logits.double() if logits.dtype == torch.float64 else logits.float()
        gates = torch.softmax(acc, dim=-1).reshape(-1, E)  # [N, E]

        tokens = seqs.reshape(-1, self.d_model)  # [N, d]
        n = tokens.shape[0]
        # All experts' first layers as one GEMM: [N, d] @ [d, E*d_ff].
        w_up = self.up_proj.permute(1, 0, 2).reshape(self.d_model, E * d_ff)
        hidden = tokens @ w_up
        if self.up_bias is not None:
            hidden = hidden + self.up_bias.reshape(E * d_ff)
        if self.activation == "relu":
            hidden = F.relu(hidden)
        else:
            hidden = F.gelu(hidden)
        g = gates.to(hidden.dtype)
        # Scaling expert i's hidden block by g_i makes the second GEMM the gated sum over experts.
        hidden = (hidden.view(n, E, d_ff) * g.unsqueeze(-1)).reshape(n, E * d_ff)
        y = hidden @ self.down_proj.reshape(E * d_ff, self.d_out)
        if self.down_bias is not None:
            y = y + g @ self.down_bias

        if self.importance_loss_weight != 0.0:
            self.aux_loss = self.importance_loss_weight * losses.importance_loss(gates)
        else:
            self.aux_loss = torch.zeros((), dtype=gates.dtype, device=gates.device)
        out_shape = list(x.shape[:-1])
        self.gates = gates.reshape(out_shape + [E])
        return y.reshape(out_shape + [self.d_out])

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, "
            f"d_hidden={self.d_hidden}, d_out={self.d_out}, activation={self.activation!r}, "
            f"bias={self.up_bias is not None}, importance_loss_weight={self.importance_loss_weight}"
        )
