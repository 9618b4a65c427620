"""Quantized experts in modules: torchmoe.nn.quantize_experts on MoE / SwitchMoE (dropless and capacity mode)
against the float layer with its expert weights replaced by their dequantized values; state_dict round trip,
TorchScript, torch.compile, torch.export; and apply_torchmoe(model, quantize=...) on tiny transformers models of
every supported family against the same model on HF's eager experts with the dequantized weights."""
import copy
import io

import pytest
import torch

import torchmoe
from torchmoe.nn import MoE, SwitchMoE, quantize_experts

from conftest import run_python

FORMATS = [(8, 128, True), (4, 16, True), (4, 32, False)]
FORMAT_IDS = ["int8", "int4-g16-sym", "int4-g32-asym"]


def layer(kind, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    if kind == "dropless":
        m = MoE(64, 96, num_experts=6, k=2)
    elif kind == "capacity":
        m = MoE(64, 96, num_experts=6, k=2, capacity_factor=1.0, activation="gelu")
    elif kind == "switch":
        m = SwitchMoE(64, 96, num_experts=4, capacity_factor=1.25)
    else:
        m = MoE(64, 96, num_experts=8, k=3, activation="relu", score_func="sigmoid")
    return m.to(dtype).eval()


def dequantized_copy(float_layer, quantized):
    """The float layer with each expert weight replaced by the quantized layer's dequantized one."""
    ref = copy.deepcopy(float_layer)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            if getattr(ref, name) is not None:
                getattr(ref, name).copy_(quantized.quantized_weight(name).dequantize())
    return ref


KINDS = ["dropless", "capacity", "switch", "relu-sigmoid"]


@pytest.mark.parametrize("bits,group_size,symmetric", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_quantized_layer_equals_float_layer_on_dequantized_weights(kind, bits, group_size, symmetric):
    float_layer = layer(kind)
    q = quantize_experts(copy.deepcopy(float_layer), bits, group_size, symmetric)
    assert type(q).__name__.startswith("Quantized") and q.up_proj is None
    ref = dequantized_copy(float_layer, q)
    for tokens in (1, 3, 16, 200):  # decode sizes (skinny kernel) and a batch (dequantized panels)
        x = torch.randn(tokens, 64)
        y, y_ref = q(x), ref(x)
        torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(q.aux_loss, ref.aux_loss)
        assert torch.equal(q.expert_counts, ref.expert_counts) and torch.equal(q.dropped_tokens, ref.dropped_tokens)
    # the quantized layer is close to the float one (int8 much closer than int4)
    x = torch.randn(32, 64)
    rel = (q(x) - float_layer(x)).norm() / float_layer(x).norm()
    assert rel < (0.02 if bits == 8 else 0.2)


def test_reference_impl_and_gradients_reach_input_and_router():
    float_layer = layer("dropless")
    q = quantize_experts(copy.deepcopy(float_layer), 4, 32, False)
    q.train()
    x = torch.randn(10, 64, requires_grad=True)
    y = q(x)
    (y.sum() + q.aux_loss).backward()
    assert x.grad is not None and q.router.weight.grad is not None
    ref = dequantized_copy(float_layer, q).train()
    xr = x.detach().clone().requires_grad_(True)
    (ref(xr).sum() + ref.aux_loss).backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(q.router.weight.grad, ref.router.weight.grad, atol=1e-4, rtol=1e-4)
    q.impl = "reference"
    torch.testing.assert_close(q(x.detach()), ref(x.detach()), atol=1e-4, rtol=1e-4)
    assert q.up_proj is None and "up_proj" not in dict(q.named_parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_activations(dtype):
    float_layer = layer("dropless", dtype=dtype)
    q = quantize_experts(copy.deepcopy(float_layer), 8)
    ref = dequantized_copy(float_layer, q)
    x = torch.randn(40, 64).to(dtype)
    y = q(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ref(x).float(), atol=3e-2, rtol=3e-2)


def test_to_dtype_keeps_the_packed_format_and_shared_experts_follow():
    torch.manual_seed(0)
    float_layer = MoE(64, 96, num_experts=6, k=2, shared_expert_d_ff=32, shared_expert_gate=True).eval()
    q = quantize_experts(copy.deepcopy(float_layer), 4, 16, False)
    before = {n: t.clone() for n, t in q.state_dict().items()}
    q.to(torch.bfloat16)
    after = q.state_dict()
    assert list(after) == list(before)  # same keys, same order
    for name in ("up_proj_scales", "up_proj_qweight", "up_proj_zeros", "down_proj_scales"):
        assert torch.equal(after[name], before[name]), name  # scales stay float32, bit for bit
    assert q.shared_expert.up_proj.dtype == torch.bfloat16 and q.router.weight.dtype == torch.bfloat16
    ref = dequantized_copy(float_layer, quantize_experts(copy.deepcopy(float_layer), 4, 16, False)).to(torch.bfloat16)
    x = torch.randn(24, 64).to(torch.bfloat16)
    torch.testing.assert_close(q(x).float(), ref(x).float(), atol=3e-2, rtol=3e-2)
    q.float()
    assert q.up_proj_scales.dtype == torch.float32 and q(x.float()).dtype == torch.float32
    q.reset_parameters()  # the router and the shared expert; the quantized experts are data
    assert torch.equal(q.up_proj_qweight, before["up_proj_qweight"])
    with pytest.raises(ValueError, match="argument 'x' must have a last dim of d_model = 64"):
        q(torch.randn(3, 63))


def test_state_dict_round_trip_into_a_layer_quantized_the_same_way():
    q = quantize_experts(layer("dropless", seed=0), 4, 16, False)
    keys = set(q.state_dict())
    assert {"up_proj_qweight", "up_proj_scales", "up_proj_zeros", "down_proj_qweight", "gate_proj_scales"} <= keys
    assert not any(k in keys for k in ("up_proj", "down_proj", "gate_proj"))
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    other = quantize_experts(layer("dropless", seed=5), 4, 16, False)
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    x = torch.randn(9, 64)
    assert torch.equal(other(x), q(x))


def test_quantize_experts_inside_a_model_and_bad_arguments():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), layer("dropless"), torch.nn.ReLU(), layer("switch"))
    out = quantize_experts(model, 8)
    assert out is model and type(model[1]).__name__ == "QuantizedMoE" and type(model[3]).__name__ == "QuantizedSwitchMoE"
    assert "bits=8" in repr(model[1])
    with pytest.raises(ValueError, match="bits"):
        quantize_experts(layer("dropless"), 3)
    with pytest.raises(ValueError, match="group_size"):
        quantize_experts(layer("dropless"), 4, group_size=48)
    with pytest.raises(ValueError, match="symmetric"):
        quantize_experts(layer("dropless"), 8, symmetric=False)
    with pytest.raises(ValueError, match="no MoE"):
        quantize_experts(torch.nn.Linear(3, 3), 8)


@pytest.mark.parametrize("kind", ["dropless", "capacity"])
def test_torchscript_compile_export(kind, tmp_path):
    q = quantize_experts(layer(kind), 4, 32, True)
    x = torch.randn(2, 5, 64)
    expected = q(x)
    scripted = torch.jit.script(q)
    torch.testing.assert_close(scripted(x), expected)
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected)
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(q, (x,), dynamic_shapes=({0: batch},))
    for b in (1, 3, 8):
        xb = torch.randn(b, 5, 64)
        torch.testing.assert_close(ep.module()(xb), q(xb), atol=1e-5, rtol=1e-5)
    path = tmp_path / "q.pt"
    scripted.save(str(path))
    torch.save({"x": x, "y": expected}, tmp_path / "io.pt")
    code = f"""
import torch, torchmoe
m = torch.jit.load({str(path)!r})
io = torch.load({str(tmp_path / 'io.pt')!r})
torch.testing.assert_close(m(io["x"]), io["y"])
print("ok")
"""
    assert run_python(code).strip() == "ok"


# --- transformers -------------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
from torchmoe.integrations import transformers as tm_hf  # noqa: E402
from test_transformers import FAMILIES, batch, build  # noqa: E402


def dequantized_hf_copy(model, quantized_model):
    """The eager model with each expert weight replaced by the quantized model's dequantized one (HF layout)."""
    ref = copy.deepcopy(model)
    qmods = dict(quantized_model.named_modules())
    with torch.no_grad():
        for name, module in ref.named_modules():
            weights = tm_hf._quantized_weights(qmods[name]) if name in qmods else None
            if weights is None:
                continue
            for wname, qw in weights.items():
                deq = qw.dequantize()
                getattr(module, wname).copy_(deq if module.is_transposed else deq.transpose(1, 2))
    return ref


@pytest.mark.parametrize("quantize,group_size", [("int8", 128), ("int4", 16), ("int4_asym", 8)])
@pytest.mark.parametrize("family", FAMILIES)
def test_hf_quantized_logits_equal_dequantized_eager(family, quantize, group_size):
    model = build(family)
    q = tm_hf.apply_torchmoe(copy.deepcopy(model), quantize=quantize, group_size=group_size)
    assert any(hasattr(m, "_torchmoe_quantized") for m in q.modules())
    assert any(k.endswith("_qweight") for k in q.state_dict())
    ref = dequantized_hf_copy(model, q)
    ids = batch()
    with torch.no_grad():
        logits, ref_logits = q(input_ids=ids).logits, ref(input_ids=ids).logits
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    prompt = ids[:1, :4]
    out = q.generate(prompt, max_new_tokens=6, do_sample=False)
    ref_out = ref.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref_out)


def test_hf_quantize_bad_arguments():
    model = build("mixtral")
    with pytest.raises(ValueError, match="quantize"):
        tm_hf.apply_torchmoe(copy.deepcopy(model), quantize="int3")
    with pytest.raises(ValueError, match="quantize"):
        tm_hf.apply_torchmoe(copy.deepcopy(model), quantize="int8", experts=False)
    with pytest.raises(ValueError, match="group_size"):
        tm_hf.apply_torchmoe(copy.deepcopy(model), quantize="int4", group_size=12)
