"""MoLoRA and inject_molora against the seed's mixture of LoRA experts (a loop over experts)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchmoe  # noqa: F401  (registers the ops)
from torchmoe.nn.molora import MoLoRA, inject_molora, load_molora, molora_state_dict, save_molora, unload_molora


def seed_molora(m: MoLoRA, x: torch.Tensor) -> torch.Tensor:
    """Seed 000: gate_i = softmax(h . e_i / tau), o = base(h) + sum_i gate_i * scaling * B_i^T (A_i^T h),
    evaluated token by token and expert by expert; top-k keeps the k largest logits and softmaxes them."""
    tokens = x.reshape(-1, m.in_features)
    rows = []
    for h in tokens:
        logits = torch.stack([h @ m.expert_embed[i] for i in range(m.num_experts)]) / m.temperature
        if m.top_k is None:
            gates = torch.softmax(logits.double(), 0)
        else:
            order = torch.sort(logits, descending=True, stable=True).indices[: m.top_k]
            gates = torch.zeros(m.num_experts, dtype=torch.float64)
            gates[order] = torch.softmax(logits[order].double(), 0)
        out = F.linear(h, m.weight, m.bias).double()
        for i in range(m.num_experts):
            delta = m.lora_B[i].t().double() @ (m.lora_A[i].t().double() @ h.double())
            out = out + gates[i] * (m.alpha / m.rank) * delta
        rows.append(out)
    if not rows:
        return x.new_zeros(*x.shape[:-1], m.out_features)
    return torch.stack(rows).reshape(*x.shape[:-1], m.out_features).to(x.dtype)


def randomise_b(m: MoLoRA) -> MoLoRA:
    with torch.no_grad():
        m.lora_B.normal_(0.0, 0.5)
    return m


CONFIGS = [
    # (in, out, N, r, alpha, top_k, temperature, bias, input shape)
    (8, 6, 3, 4, None, None, 1.0, True, (5, 8)),
    (8, 6, 3, 4, 8.0, 2, 1.0, True, (2, 3, 8)),
    (10, 4, 5, 2, 1.0, 1, 0.5, False, (7, 10)),
    (6, 9, 4, 3, 16.0, 4, 2.0, True, (2, 2, 2, 6)),
    (4, 4, 1, 1, None, None, 1.0, False, (3, 4)),
    (7, 5, 6, 2, None, 3, 1.0, True, (1, 7)),
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_seed(cfg, dtype):
    d_in, d_out, N, r, alpha, top_k, tau, bias, shape = cfg
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    m = randomise_b(MoLoRA(base, N, r, alpha=alpha, top_k=top_k, temperature=tau))
    x = torch.randn(shape, dtype=dtype)
    y = m(x)
    assert y.shape == (*shape[:-1], d_out) and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(y, seed_molora(m, x), atol=tol, rtol=tol)
    assert m.gates.shape == (*shape[:-1], N)
    torch.testing.assert_close(m.gates.sum(-1).double(), torch.ones(shape[:-1], dtype=torch.float64))
    if top_k is not None:
        assert ((m.gates > 0).sum(-1) <= top_k).all()


@pytest.mark.parametrize("top_k", [None, 2])
def test_initialisation_equals_base(top_k):
    torch.manual_seed(1)
    base = nn.Linear(12, 7)
    m = MoLoRA(base, 4, 3, alpha=32, top_k=top_k)
    x = torch.randn(3, 5, 12)
    assert torch.equal(m(x), base(x))
    assert torch.equal(m.lora_B, torch.zeros(4, 3, 7))
    bound = 1 / 12**0.5
    assert m.lora_A.abs().max() <= bound and m.lora_A.std() > bound / 4
    assert m.lora_A.shape == (4, 12, 3) and m.expert_embed.shape == (4, 12)


@pytest.mark.parametrize("top_k", [None, 2])
def test_gradients_reach_adapters_not_base(top_k):
    torch.manual_seed(2)
    base = nn.Linear(8, 5).double()
    m = randomise_b(MoLoRA(base, 3, 2, top_k=top_k, temperature=0.7))
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(4, 5, dtype=torch.float64)
    (m(x) * probe).sum().backward()
    assert base.weight.grad is None and base.bias.grad is None
    assert not base.weight.requires_grad and not base.bias.requires_grad
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "expert_embed"}

    # Same gradients as autograd through the seed's loop.
    x_ref = x.detach().clone().requires_grad_(True)
    params = [m.lora_A, m.lora_B, m.expert_embed]
    saved = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    (seed_molora(m, x_ref) * probe).sum().backward()
    for p, g in zip(params, saved):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, p.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_gradcheck():
    torch.manual_seed(3)
    m = randomise_b(MoLoRA(nn.Linear(5, 4).double(), 3, 2, top_k=2))
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)

    def f(x, a, b, e):
        return torch.func.functional_call(m, {"lora_A": a, "lora_B": b, "expert_embed": e}, (x,))

    args = [x] + [p.detach().clone().requires_grad_(True) for p in (m.lora_A, m.lora_B, m.expert_embed)]
    assert torch.autograd.gradcheck(f, args)


def test_half_precision_close_to_float():
    torch.manual_seed(4)
    base = nn.Linear(16, 8)
    m = randomise_b(MoLoRA(base, 4, 4, top_k=2))
    x = torch.randn(6, 16)
    y32 = m(x)
    m16 = m.to(torch.bfloat16)
    y16 = m16(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=0.1, rtol=0.05)


def test_empty():
    m = randomise_b(MoLoRA(nn.Linear(4, 3), 2, 2, top_k=1))
    x = torch.randn(0, 5, 4, requires_grad=True)
    y = m(x)
    assert y.shape == (0, 5, 3)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("top_k", [None, 2])
def test_script_save_load(tmp_path, top_k):
    torch.manual_seed(5)
    m = randomise_b(MoLoRA(nn.Linear(6, 4), 3, 2, alpha=4.0, top_k=top_k, temperature=1.5))
    x = torch.randn(2, 3, 6)
    path = tmp_path / "molora.pt"
    torch.jit.save(torch.jit.script(m), str(path))
    loaded = torch.jit.load(str(path))
    y = loaded(x)
    torch.testing.assert_close(y, m(x))
    y.sum().backward()
    grads = {n: p.grad for n, p in loaded.named_parameters()}
    assert grads["lora_A"] is not None and grads["lora_B"] is not None and grads["expert_embed"] is not None
    assert grads["weight"] is None


@pytest.mark.parametrize("top_k, backend", [(None, "aot_eager"), (2, "inductor")])
def test_compile_fullgraph(top_k, backend):
    torch.manual_seed(6)
    m = randomise_b(MoLoRA(nn.Linear(6, 4), 3, 2, top_k=top_k))
    x = torch.randn(5, 6)
    y_eager = m(x)
    y_eager.square().sum().backward()
    grads = [p.grad.clone() for p in (m.lora_A, m.lora_B, m.expert_embed)]
    m.zero_grad()
    y = torch.compile(m, fullgraph=True, backend=backend)(x)
    torch.testing.assert_close(y, y_eager)
    y.square().sum().backward()
    for g, p in zip(grads, (m.lora_A, m.lora_B, m.expert_embed)):
        torch.testing.assert_close(p.grad, g)


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Linear"):
        MoLoRA(nn.Conv1d(3, 3, 1), 2, 2)
    with pytest.raises(ValueError, match="top_k"):
        MoLoRA(nn.Linear(3, 3), 2, 2, top_k=3)
    with pytest.raises(ValueError, match="top_k"):
        MoLoRA(nn.Linear(3, 3), 2, 2, top_k=0)
    with pytest.raises(ValueError, match="rank"):
        MoLoRA(nn.Linear(3, 3), 2, 0)
    with pytest.raises(ValueError, match="temperature"):
        MoLoRA(nn.Linear(3, 3), 2, 2, temperature=0.0)
    with pytest.raises(ValueError, match="x must be"):
        MoLoRA(nn.Linear(3, 3), 2, 2)(torch.randn(2, 4))


def test_extra_repr():
    text = repr(MoLoRA(nn.Linear(6, 4), 3, 2, alpha=4.0, top_k=2, temperature=1.5))
    for part in ("in_features=6", "out_features=4", "num_experts=3", "rank=2", "alpha=4.0", "top_k=2",
                 "temperature=1.5"):
        assert part in text


# ------------------------------------------------------------------------------------------- injection
class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d, bias=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.out_proj(torch.tanh(self.q_proj(x)) * self.v_proj(x)))


class TinyModel(nn.Module):
    def __init__(self, d=8, vocab=11, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d) for _ in range(layers)])
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_inject_molora_small_model():
    torch.manual_seed(7)
    model = TinyModel()
    ids = torch.randint(0, 11, (2, 5))
    before = model(ids)
    replaced = inject_molora(model, ["q_proj", "layers.1.v_proj", "head"], num_experts=3, rank=2, top_k=2)
    assert replaced == ["layers.0.q_proj", "layers.1.q_proj", "layers.1.v_proj", "head"]
    for name in replaced:
        module = model.get_submodule(name)
        assert isinstance(module, MoLoRA) and module.top_k == 2 and module.num_experts == 3
    assert isinstance(model.layers[0].v_proj, nn.Linear)
    # Adapters start at zero: the model's function is unchanged.
    torch.testing.assert_close(model(ids), before)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{name}.{p}" for name in replaced for p in ("lora_A", "lora_B", "expert_embed")}
    assert trainable == expected

    for name in replaced:
        randomise_b(model.get_submodule(name))
    model(ids).logsumexp(-1).sum().backward()
    for n, p in model.named_parameters():
        if n in expected:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n

    # A second injection on the same names finds MoLoRA layers (not nn.Linear), which it leaves alone.
    with pytest.raises(ValueError, match="matches"):
        inject_molora(model, "q_proj", num_experts=2, rank=1)
    assert inject_molora(model, "out_proj", num_experts=2, rank=1) == ["layers.0.out_proj", "layers.1.out_proj"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 3 * 6


def test_inject_molora_matches_whole_name_parts():
    model = TinyModel()
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject_molora(model, "proj", num_experts=2, rank=1)  # not a suffix at a '.' boundary
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject_molora(model, ["norm", "embed"], num_experts=2, rank=1)  # matches, but not nn.Linear
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen when nothing was replaced


def test_injected_model_scripts():
    torch.manual_seed(8)
    model = TinyModel()
    inject_molora(model, ["q_proj", "v_proj"], num_experts=2, rank=2)
    ids = torch.randint(0, 11, (2, 4))
    torch.testing.assert_close(torch.jit.script(model)(ids), model(ids))


@pytest.mark.skipif(
    not (torch.cuda.is_available() and torchmoe.built_with_cuda()), reason="needs a GPU and torchmoe's CUDA kernels"
)
@pytest.mark.parametrize("top_k", [None, 2])
def test_cuda_matches_cpu(top_k):
    torch.manual_seed(10)
    m = randomise_b(MoLoRA(nn.Linear(16, 12), 4, 4, top_k=top_k, temperature=0.8))
    x = torch.randn(5, 7, 16)
    y = m(x)
    y.square().sum().backward()
    mc = copy.deepcopy(m).cuda()
    mc.zero_grad()
    yc = mc(x.cuda())
    yc.square().sum().backward()
    torch.testing.assert_close(yc.cpu(), y, atol=1e-4, rtol=1e-4)
    for (n, p), pc in zip(m.named_parameters(), mc.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(pc.grad.cpu(), p.grad, atol=1e-3, rtol=1e-3, msg=n)
    torch.testing.assert_close(torch.compile(mc, fullgraph=True)(x.cuda()).cpu(), y, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- checkpoints, the PEFT way
def test_base_parameter_names_unchanged():
    torch.manual_seed(11)
    model = TinyModel()
    names_before = {k: v.clone() for k, v in model.state_dict().items()}
    base = model.layers[0].q_proj
    inject_molora(model, ["q_proj", "head"], num_experts=3, rank=2)
    sd = model.state_dict()
    for k, v in names_before.items():
        assert k in sd and torch.equal(sd[k], v), k  # q_proj.weight is still q_proj.weight
    adapters = set(sd) - set(names_before)
    assert adapters == {f"{n}.{p}" for n in ["layers.0.q_proj", "layers.1.q_proj", "head"]
                        for p in ("lora_A", "lora_B", "expert_embed")}
    assert model.layers[0].q_proj.weight is base.weight  # the base's own parameter, not a copy
    # the base checkpoint loads into the adapted model (adapters keep their values)
    plain = TinyModel()
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and set(missing) == adapters
    assert torch.equal(model.layers[0].q_proj.weight, plain.layers[0].q_proj.weight)


def test_molora_state_dict_save_load_and_unload(tmp_path):
    torch.manual_seed(12)
    model = TinyModel()
    inject_molora(model, ["q_proj", "v_proj"], num_experts=3, rank=2, alpha=4.0, top_k=2, temperature=0.5)
    for m in model.modules():
        if isinstance(m, MoLoRA):
            randomise_b(m)
    ids = torch.randint(0, 11, (2, 5))
    expected = model(ids)
    adapters = molora_state_dict(model)
    assert set(adapters) == {f"layers.{i}.{p}_proj.{q}" for i in range(2) for p in "qv"
                             for q in ("lora_A", "lora_B", "expert_embed")}
    path = tmp_path / "adapters.safetensors"
    save_molora(model, path)

    # a fresh base model (same base weights), adapters rebuilt from the file's configuration
    fresh = TinyModel()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k not in adapters})
    assert load_molora(fresh, path) == sorted(n.rsplit(".", 1)[0] for n in adapters if n.endswith("lora_A"))
    layer = fresh.layers[1].v_proj
    assert isinstance(layer, MoLoRA) and (layer.top_k, layer.temperature, layer.alpha) == (2, 0.5, 4.0)
    torch.testing.assert_close(fresh(ids), expected, rtol=0, atol=0)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(adapters)
    # loading again into the adapted model overwrites the adapters
    with torch.no_grad():
        fresh.layers[0].q_proj.lora_B.zero_()
    load_molora(fresh, path)
    torch.testing.assert_close(fresh(ids), expected, rtol=0, atol=0)

    # unload: back to nn.Linear with the same base parameters; the model equals the base model
    base_out = TinyModel()
    base_out.load_state_dict(fresh.state_dict(), strict=False)
    assert len(unload_molora(fresh)) == 4
    assert all(not isinstance(m, MoLoRA) for m in fresh.modules())
    assert isinstance(fresh.layers[0].q_proj, nn.Linear)
    torch.testing.assert_close(fresh(ids), base_out(ids))


def test_load_molora_bad_input(tmp_path):
    from safetensors.torch import save_file

    model = TinyModel()
    with pytest.raises(ValueError, match="no MoLoRA"):
        molora_state_dict(model)
    inject_molora(model, "q_proj", num_experts=2, rank=2)
    path = tmp_path / "a.safetensors"
    save_molora(model, path)
    other = TinyModel(d=6)  # other width
    with pytest.raises(ValueError, match="lora_A"):
        load_molora(other, path)
    mismatched = TinyModel()
    inject_molora(mismatched, "q_proj", num_experts=3, rank=2)
    with pytest.raises(ValueError, match="num_experts"):
        load_molora(mismatched, path)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    with pytest.raises(ValueError, match="metadata"):
        load_molora(TinyModel(), plain)
    shallow = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="no layer"):
        load_molora(shallow, path)


def test_hf_causal_lm_fine_tune_save_adapters_reload(tmp_path):
    """Fine-tune a tiny HF causal LM with MoLoRA, save only the adapters, rebuild the base model from its own
    checkpoint, load the adapters: same logits. The adapted model's save_pretrained loads in transformers."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from conftest import train_causal_lm

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(13)
    base = transformers.LlamaForCausalLM(config).eval()
    base.save_pretrained(tmp_path / "base")
    base_keys = set(base.state_dict())

    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    names = inject_molora(model, ["q_proj", "v_proj"], num_experts=4, rank=4, top_k=2)
    assert len(names) == 4
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    losses = train_causal_lm(model, ids, steps=5, lr=1e-2)
    assert losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        assert not torch.allclose(tuned, base(input_ids=ids).logits)
    assert base_keys <= set(model.state_dict())  # base names unchanged
    save_molora(model, tmp_path / "adapters.safetensors")

    rebuilt = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    load_molora(rebuilt, tmp_path / "adapters.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(input_ids=ids).logits, tuned, rtol=0, atol=0)

    # the whole adapted model saves a checkpoint transformers loads as the base model (adapter keys unused)
    model.save_pretrained(tmp_path / "full")
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "full").eval()
    for k, v in base.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[k], v, rtol=0, atol=0)
