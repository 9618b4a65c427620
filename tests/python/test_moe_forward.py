"""torchmoe::_moe_forward, the dropless layer's forward in one op, and torchmoe.nn.MoE's inference path on it: the
same result bits as the op-by-op forward, the same attributes, taken only where nothing needs the op-by-op path."""
from typing import List, Optional

import pytest
import torch

import torchmoe
from torchmoe.nn import MoE, NoisyTopkRouter, SwitchMoE, quantize_experts

from conftest import run_python


def op_by_op(layer, x):
    """The layer's forward with the fused path switched off (the op-by-op path it replaces)."""
    layer._forward_fused = lambda x, h: None
    try:
        return layer(x)
    finally:
        del layer._forward_fused


class CountFused:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = MoE._forward_fused

        def counted(layer, x, h):
            y = original(layer, x, h)
            self.calls += y is not None
            return y

        monkeypatch.setattr(MoE, "_forward_fused", counted)


def assert_same_step(layer, x):
    with torch.no_grad():
        fused = layer(x)
        counts, dropped, aux = layer.expert_counts, layer.dropped_tokens, layer.aux_loss
        reference = op_by_op(layer, x)
    assert fused.dtype == reference.dtype and fused.shape == reference.shape == x.shape
    assert torch.equal(fused, reference)
    assert torch.equal(counts, layer.expert_counts)
    assert torch.equal(dropped, layer.dropped_tokens) and int(dropped) == 0
    assert torch.equal(aux, layer.aux_loss)


@pytest.mark.parametrize("activation", ["swiglu", "relu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 3, 40])
def test_layer_step_equals_op_by_op(activation, dtype, T, monkeypatch):
    torch.manual_seed(T)
    layer = MoE(48, 80, 6, k=2, activation=activation, capacity_factor=None).to(dtype).eval()
    counter = CountFused(monkeypatch)
    assert_same_step(layer, torch.randn(T, 48).to(dtype))
    assert counter.calls == 1


@pytest.mark.parametrize("options", [
    dict(score_func="sigmoid"),
    dict(score_func="softmax", renormalize=False),
    dict(use_expert_bias=True),
    dict(num_expert_groups=4, topk_expert_groups=2),
    dict(shared_expert_d_ff=32),
    dict(shared_expert_d_ff=32, shared_expert_gate=True),
], ids=lambda o: ",".join(o))
def test_router_options_and_shared_expert(options):
    torch.manual_seed(0)
    layer = MoE(32, 64, 8, k=3, capacity_factor=None, **options).eval()
    if options.get("use_expert_bias"):
        layer.router.expert_bias.copy_(torch.randn(8))
    assert_same_step(layer, torch.randn(2, 5, 32))


def test_router_scale_and_switch_layer(monkeypatch):
    torch.manual_seed(0)
    layer = MoE(32, 64, 8, k=2, capacity_factor=None).eval()
    layer.router.scale = 2.5
    assert_same_step(layer, torch.randn(7, 32))
    switch = SwitchMoE(32, 64, 8, capacity_factor=None).eval()
    counter = CountFused(monkeypatch)
    assert_same_step(switch, torch.randn(9, 32))
    assert counter.calls == 1


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, 32, True), (4, 32, True), (4, 16, False)])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_layer_step_equals_op_by_op(bits, group_size, symmetric, activation, dtype, monkeypatch):
    torch.manual_seed(bits)
    layer = MoE(64, 96, 8, k=2, activation=activation, capacity_factor=None).to(dtype).eval()
    quantize_experts(layer, bits, group_size, symmetric)
    counter = CountFused(monkeypatch)
    for T in (1, 12, 70):  # skinny, AMX-sized and panel-sized experts
        assert_same_step(layer, torch.randn(T, 64).to(dtype))
    assert counter.calls == 3


def test_empty_batch():
    layer = MoE(16, 32, 4, k=2, capacity_factor=None).eval()
    with torch.no_grad():
        y = layer(torch.randn(0, 16))
    assert y.shape == (0, 16) and layer.expert_counts.tolist() == [0, 0, 0, 0]


def test_dropped_tokens_follow_every_step():
    # A one-op step leaves a zero; a capacity step in between leaves its own count, never a stale one.
    torch.manual_seed(0)
    layer = MoE(16, 32, 4, k=2, capacity_factor=None).eval()
    x = torch.randn(24, 16)
    with torch.no_grad():
        layer(x)
        first = layer.dropped_tokens
        assert first.dtype == torch.long and first.shape == () and int(first) == 0
        assert layer.dropped_tokens is first  # the same tensor on every read
        layer.capacity_factor = 0.25
        layer(x)
        assert int(layer.dropped_tokens) > 0
        layer.capacity_factor = None
        layer(x)
        assert int(layer.dropped_tokens) == 0
    scripted = torch.jit.script(layer)  # after a one-op step, the attribute TorchScript types is there
    assert int(scripted.dropped_tokens) == 0


def test_parametrized_expert_weight_is_used():
    # torch.nn.utils.parametrize moves the weight out of the parameters: the one-op step reads the property.
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    layer = MoE(32, 64, 4, k=2, capacity_factor=None).eval()
    x = torch.randn(5, 32)
    with torch.no_grad():
        plain = layer(x)
        parametrize.register_parametrization(layer, "up_proj", Doubled())
        assert_same_step(layer, x)
        assert not torch.equal(layer(x), plain)


def test_taken_only_where_nothing_needs_the_op_by_op_path(monkeypatch):
    torch.manual_seed(0)
    counter = CountFused(monkeypatch)
    x = torch.randn(6, 32)
    dropless = MoE(32, 64, 4, k=2, capacity_factor=None)
    dropless(x)  # autograd on
    assert counter.calls == 0 and dropless.aux_loss.requires_grad
    with torch.no_grad():
        MoE(32, 64, 4, k=2, capacity_factor=1.0)(x)  # capacity mode
        MoE(32, 64, 4, k=2, capacity_factor=None, impl="reference")(x)
        noisy = MoE(32, 64, 4, k=2, capacity_factor=None, router="noisy")
        noisy(x)
        assert isinstance(noisy.router, NoisyTopkRouter)
    assert counter.calls == 0
    with torch.no_grad():
        dropless.train()(x)  # training mode without autograd: the plain router has no training-only behaviour
    with torch.inference_mode():
        dropless.eval()(x)
    assert counter.calls == 2


def test_router_hooks_still_see_the_router_call(monkeypatch):
    torch.manual_seed(0)
    layer = MoE(32, 64, 4, k=2, capacity_factor=None).eval()
    seen = []
    handle = layer.router.register_forward_hook(lambda module, args, out: seen.append(out[1]))
    counter = CountFused(monkeypatch)
    with torch.no_grad():
        layer(torch.randn(3, 32))
    assert counter.calls == 0 and len(seen) == 1 and seen[0].shape == (3, 2)
    handle.remove()
    with torch.no_grad():
        layer(torch.randn(3, 32))
    assert counter.calls == 1 and len(seen) == 1


def test_subclass_with_its_own_experts_keeps_them(monkeypatch):
    class Doubled(MoE):
        def _experts_grouped(self, rows, counts):
            return 2 * super()._experts_grouped(rows, counts)

    torch.manual_seed(0)
    layer = Doubled(32, 64, 4, k=2, capacity_factor=None).eval()
    plain = MoE(32, 64, 4, k=2, capacity_factor=None).eval()
    plain.load_state_dict(layer.state_dict())
    counter = CountFused(monkeypatch)
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.equal(layer(x), 2 * plain(x))
    assert counter.calls == 1  # the plain layer only


@pytest.mark.parametrize("bits", [0, 4])
def test_experts_patched_on_the_instance_are_used(monkeypatch, bits):
    torch.manual_seed(0)
    layer = MoE(32, 64, 4, k=2, capacity_factor=None).eval()
    if bits:
        quantize_experts(layer, bits, group_size=32)
    x = torch.randn(5, 32)
    counter = CountFused(monkeypatch)
    with torch.no_grad():
        expected = layer(x)
        assert counter.calls == 1
        experts = layer._experts_grouped
        layer._experts_grouped = lambda rows, counts: 2 * experts(rows, counts)
        assert torch.equal(layer(x), 2 * expected)
    assert counter.calls == 1


def test_aux_loss_is_the_training_value():
    torch.manual_seed(0)
    layer = MoE(32, 64, 8, k=2, capacity_factor=None, z_loss_weight=1e-3).eval()
    x = torch.randn(11, 32)
    layer(x)
    expected = layer.aux_loss.detach()
    with torch.no_grad():
        layer(x)
    torch.testing.assert_close(layer.aux_loss, expected, rtol=0, atol=0)


def sample_args(bits=0, activation="swiglu", T=5, d=32, f=48, E=6, k=2, dtype=torch.float32):
    x = torch.randn(T, d).to(dtype)
    router_weight = torch.randn(E, d)
    weights = {"gate": torch.randn(E, d, f), "up": torch.randn(E, d, f), "down": torch.randn(E, f, d)}
    if activation != "swiglu":
        del weights["gate"]
    if bits == 0:
        w = {n: t.to(dtype) for n, t in weights.items()}
        experts = (w.get("gate"), w["up"], w["down"], 0, [], [], [])
    else:
        q = {n: torchmoe.quantize_weight(t, bits, 16) for n, t in weights.items()}
        experts = (q["gate"].qweight if "gate" in q else None, q["up"].qweight, q["down"].qweight, bits,
                   [q[n].scales if n in q else None for n in ("gate", "up", "down")],
                   [q[n].zeros if n in q else None for n in ("gate", "up", "down")],
                   [q[n].group_size if n in q else 0 for n in ("gate", "up", "down")])
    return (x, router_weight, None, k, "softmax", True, 1, 1, 1.0, activation) + experts


def composed(x, router_weight, expert_bias, k, score_func, renormalize, groups, topk_groups, scale, activation,
             gate_proj, up_proj, down_proj, bits, scales, zeros, group_sizes):
    """_moe_forward written out with the public ops."""
    logits = torchmoe.router_logits(x, router_weight)
    weights, indices = torchmoe.topk_gating(logits, k, score_func, renormalize, expert_bias, groups, topk_groups,
                                            scale)
    dest, counts = torchmoe.route_plan(indices, router_weight.shape[0])
    rows = torchmoe.dispatch(x, dest, x.shape[0] * k)

    def mm(inp, w, i):
        if bits == 0:
            return torchmoe.grouped_mm(inp, w, counts)
        return torch.ops.torchmoe.grouped_mm_quantized(inp, w, scales[i], zeros[i], counts, bits, group_sizes[i])

    if activation == "swiglu":
        h = torchmoe.swiglu(mm(rows, gate_proj, 0), mm(rows, up_proj, 1))
    else:
        h = getattr(torch.nn.functional, activation)(mm(rows, up_proj, 1))
    return torchmoe.combine(mm(h, down_proj, 2), dest, weights), weights, indices, logits, counts


@pytest.mark.parametrize("bits", [0, 8, 4])
@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_op_equals_the_public_ops_composed(bits, activation):
    torch.manual_seed(bits)
    args = sample_args(bits, activation, dtype=torch.bfloat16)
    for got, want in zip(torch.ops.torchmoe._moe_forward(*args), composed(*args)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("bits", [0, 4])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_op_without_grad_mode_records_nothing_and_keeps_the_bits(bits, mode):
    # With grad mode off the op's inner ops skip their autograd kernels (a decode step's saving): the outputs are
    # the same bits as with grad mode on, and nothing requires grad even where the inputs do.
    torch.manual_seed(bits)
    args = list(sample_args(bits, "swiglu", dtype=torch.float32))
    args[0] = args[0].requires_grad_()
    if bits == 0:
        args[10:13] = [w.requires_grad_() for w in args[10:13]]
    with_grad = torch.ops.torchmoe._moe_forward(*args)
    assert with_grad[0].requires_grad and with_grad[0].grad_fn is not None

    def autograd_excluded():  # what the op's guard sets while its inner ops run
        return torch._C._dispatch_tls_is_dispatch_key_excluded(torch._C.DispatchKey.ADInplaceOrView)

    with (torch.no_grad() if mode == "no_grad" else torch.inference_mode()):
        assert not autograd_excluded()
        without = torch.ops.torchmoe._moe_forward(*args)
        assert not autograd_excluded()  # the op's guard ends with the op: later ops still see their autograd kernels
    for got, want in zip(without, with_grad):
        assert not got.requires_grad
        assert torch.equal(got, want.detach())


@pytest.mark.parametrize("bits", [0, 4])
def test_opcheck(bits):
    torch.manual_seed(0)
    torch.library.opcheck(torch.ops.torchmoe._moe_forward.default, sample_args(bits, "swiglu"),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_gradcheck_float64():
    # CompositeImplicitAutograd: autograd runs through the public ops' backward kernels. A zero router (no
    # finite differences across a change of selection) routes every token to experts 0 and 1 with weights 1/2,
    # and x's gradient comes through dispatch, the experts and combine.
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    router_weight = torch.zeros(5, 6, dtype=torch.float32)
    gate, up = (torch.randn(5, 6, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    down = torch.randn(5, 7, 6, dtype=torch.float64, requires_grad=True)

    def f(x, gate, up, down):
        return torch.ops.torchmoe._moe_forward(x, router_weight, None, 2, "softmax", True, 1, 1, 1.0, "swiglu",
                                               gate, up, down, 0, [], [], [])[0]

    assert torch.autograd.gradcheck(f, (x, gate, up, down))


def test_compile_fullgraph_and_export():
    torch.manual_seed(0)
    args = sample_args(0, "gelu", T=9)
    tensors, rest = args[:3], args[3:]

    def f(x, router_weight, expert_bias):
        return torch.ops.torchmoe._moe_forward(x, router_weight, expert_bias, *rest)[0]

    want = f(*tensors)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="aot_eager")(*tensors), want)

    class Wrapped(torch.nn.Module):
        def forward(self, x, router_weight):
            return f(x, router_weight, None)

    batch = torch.export.Dim("batch", min=2)
    exported = torch.export.export(Wrapped(), tensors[:2], dynamic_shapes=({0: batch}, None))
    assert torch.equal(exported.module()(*tensors[:2]), want)
    other = torch.randn(17, 32)
    assert torch.equal(exported.module()(other, tensors[1]), f(other, tensors[1], None))


@torch.jit.script
def scripted_step(x: torch.Tensor, router_weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    empty: List[Optional[torch.Tensor]] = []
    sizes: List[int] = []
    return torch.ops.torchmoe._moe_forward(x, router_weight, None, 2, "softmax", True, 1, 1, 1.0, "relu", None, up,
                                           down, 0, empty, empty, sizes)[0]


def test_torchscript_calls_the_op_in_a_fresh_process(tmp_path):
    path = tmp_path / "moe_forward.pt"
    torch.jit.save(scripted_step, str(path))
    run_python(f"""
import torch, torchmoe
torch.manual_seed(0)
x, router_weight = torch.randn(5, 8), torch.randn(4, 8)
up, down = torch.randn(4, 8, 16), torch.randn(4, 16, 8)
step = torch.jit.load({str(path)!r})
want = torch.ops.torchmoe._moe_forward(x, router_weight, None, 2, "softmax", True, 1, 1, 1.0, "relu", None, up,
                                       down, 0, [], [], [])[0]
assert torch.equal(step(x, router_weight, up, down), want)
""")


@pytest.mark.parametrize("change,message", [
    (lambda a: a.__setitem__(0, a[0][0]), "argument 'x'"),
    (lambda a: a.__setitem__(1, a[1][:, :-1]), "argument 'router_weight'"),
    (lambda a: a.__setitem__(1, a[1].long()), "argument 'router_weight'"),
    (lambda a: a.__setitem__(9, "silu"), "argument 'activation'"),
    (lambda a: a.__setitem__(10, None), "argument 'gate_proj'"),
    (lambda a: a.__setitem__(13, 3), "argument 'bits'"),
    (lambda a: a.__setitem__(14, [None]), "'scales'"),
    (lambda a: a.__setitem__(3, 9), "k"),
])
def test_bad_input_names_the_argument(change, message):
    args = list(sample_args(0, "swiglu"))
    change(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.torchmoe._moe_forward(*args)


def test_quantized_lists_must_name_every_weight():
    args = list(sample_args(8, "swiglu"))
    args[14] = [None, args[14][1], args[14][2]]
    with pytest.raises(RuntimeError, match="argument 'scales'"):
        torch.ops.torchmoe._moe_forward(*args)
    args = list(sample_args(8, "swiglu"))
    args[16] = args[16][:2]
    with pytest.raises(RuntimeError, match="'group_sizes'"):
        torch.ops.torchmoe._moe_forward(*args)
