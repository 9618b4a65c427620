"""torchmoe inside Hugging Face transformers models: tiny random models of every supported family, patched
with torchmoe, against the same models on transformers' eager experts and routers."""
import copy
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

import torchmoe  # noqa: E402
from conftest import run_python, train_causal_lm  # noqa: E402
from torchmoe.integrations import transformers as tm_hf  # noqa: E402
from transformers import (  # noqa: E402
    DeepseekV3Config, DeepseekV3ForCausalLM, GptOssConfig, GptOssForCausalLM, GraniteMoeConfig,
    GraniteMoeForCausalLM, MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig,
    Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM,
)

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _configs():
    return {
        "mixtral": (MixtralForCausalLM, MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=6,
                                                      num_experts_per_tok=2)),
        "qwen2_moe": (Qwen2MoeForCausalLM, Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16,
                                                          shared_expert_intermediate_size=24, num_experts=8,
                                                          num_experts_per_tok=3, norm_topk_prob=False)),
        "qwen3_moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig(**COMMON, head_dim=8, intermediate_size=48,
                                                          moe_intermediate_size=16, num_experts=8,
                                                          num_experts_per_tok=4, norm_topk_prob=True)),
        "olmoe": (OlmoeForCausalLM, OlmoeConfig(**COMMON, intermediate_size=16, num_experts=8,
                                                num_experts_per_tok=2, norm_topk_prob=False)),
        "deepseek_v3": (DeepseekV3ForCausalLM, DeepseekV3Config(
            **{**COMMON, "num_key_value_heads": 4}, intermediate_size=48, moe_intermediate_size=16,
            n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1,
            n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=8, q_lora_rank=16,
            qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=4)),
        "granitemoe": (GraniteMoeForCausalLM, GraniteMoeConfig(**COMMON, intermediate_size=16, num_local_experts=5,
                                                               num_experts_per_tok=2)),
        "gpt_oss": (GptOssForCausalLM, GptOssConfig(**COMMON, head_dim=8, intermediate_size=16, num_local_experts=4,
                                                    num_experts_per_tok=2, sliding_window=8)),
    }


FAMILIES = list(_configs())
NO_AUX_LOSS = {"deepseek_v3"}  # aux-loss-free balancing (e_score_correction_bias): HF computes no aux loss


def build(family, dtype=torch.float32, seed=0, **overrides):
    """A tiny random model on HF's eager experts and eager attention (the reference)."""
    cls, config = _configs()[family]
    for key, value in overrides.items():
        setattr(config, key, value)
    config.output_router_logits = True
    torch.manual_seed(seed)
    model = cls._from_config(config, attn_implementation="eager", experts_implementation="eager", dtype=dtype)
    with torch.no_grad():
        # Zero-initialised biases (GPT-OSS experts and router) and DeepSeek's score correction are made random,
        # so that every code path carries a value.
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return model.eval()


def patched(model, **kwargs):
    return tm_hf.apply_torchmoe(copy.deepcopy(model), **kwargs)


def batch(seed=1, batch_size=2, seq=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, seq), generator=g)
    return ids


class OpRecorder(TorchDispatchMode):
    """Records every torch.ops.torchmoe op that runs (forward and backward kernels)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "torchmoe":
            self.ops.append(func._opname)
        return func(*args, **(kwargs or {}))


def forward_backward(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


# float64 models still route in float32 (HF casts the router logits), so the gate weights carry float32
# rounding (torch.softmax and topk_gating round differently within an ulp); everything else is float64.
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-6, atol=1e-8)}


def assert_same_outputs(out, ref, grads, ref_grads, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(out.logits, ref.logits, **tol)
    torch.testing.assert_close(out.loss, ref.loss, **tol)
    if ref.aux_loss is None:
        assert out.aux_loss is None
    else:
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, **tol)
    assert len(out.router_logits) == len(ref.router_logits) > 0
    for a, b in zip(out.router_logits, ref.router_logits):
        torch.testing.assert_close(a, b, **tol)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert g is not None and grads[name] is not None, name
        torch.testing.assert_close(grads[name], g, **tol, msg=lambda m: f"gradient of {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_equals_eager(family, dtype):
    ref_model = build(family, dtype)
    model = patched(ref_model)
    ids = batch()
    ref, ref_grads = forward_backward(ref_model, ids)
    with OpRecorder() as rec:
        out, grads = forward_backward(model, ids)
    assert_same_outputs(out, ref, grads, ref_grads, dtype)
    assert (ref.aux_loss is None) == (family in NO_AUX_LOSS)
    ran = set(rec.ops)
    expected = {"topk_gating", "route_plan", "dispatch", "grouped_mm", "combine", "_grouped_mm_backward",
                "_topk_gating_backward"}
    assert expected <= ran, f"torchmoe ops that did not run: {expected - ran}"
    # every MoE layer routes once: as many topk_gating calls as HF recorded router logits
    assert rec.ops.count("topk_gating") == len(ref.router_logits)
    # the eager reference ran none of them
    with OpRecorder() as rec_ref:
        forward_backward(ref_model, ids)
    assert rec_ref.ops == []


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_same_tokens(family):
    ref_model = build(family)
    model = patched(ref_model)
    ids = batch(seed=2, batch_size=2, seq=5)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref_tokens = ref_model.generate(ids, **kwargs)
        with OpRecorder() as rec:
            tokens = model.generate(ids, **kwargs)
    assert tokens.shape[1] > ids.shape[1]
    torch.testing.assert_close(tokens, ref_tokens, rtol=0, atol=0)
    assert "grouped_mm" in rec.ops and "topk_gating" in rec.ops


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_backend_equals_eager(family):
    """set_experts_implementation("torchmoe"): HF's routers, torchmoe's experts."""
    ref_model = build(family)
    model = copy.deepcopy(ref_model)
    model.set_experts_implementation("torchmoe")
    ids = batch(seed=3)
    ref, ref_grads = forward_backward(ref_model, ids)
    with OpRecorder() as rec:
        out, grads = forward_backward(model, ids)
    assert_same_outputs(out, ref, grads, ref_grads, torch.float32)
    assert "grouped_mm" in rec.ops and "combine" in rec.ops and "_grouped_mm_backward" in rec.ops
    assert "topk_gating" not in rec.ops


def test_from_config_with_torchmoe_experts():
    cls, config = _configs()["qwen3_moe"]
    model = cls._from_config(config, experts_implementation="torchmoe")
    assert model.config._experts_implementation == "torchmoe"
    with OpRecorder() as rec:
        model(input_ids=batch())
    assert "grouped_mm" in rec.ops


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_patched_model_trains(family):
    model = patched(build(family))
    losses = train_causal_lm(model, batch(seed=4, batch_size=4, seq=8), steps=6, lr=3e-3)
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_save_pretrained_round_trip(family, tmp_path):
    ref_model = build(family)
    ref_keys = {k: tuple(v.shape) for k, v in ref_model.state_dict().items()}
    model = patched(ref_model)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == ref_keys
    model.save_pretrained(tmp_path)
    cls = type(ref_model)
    # an unpatched model loads the patched model's checkpoint ...
    plain = cls.from_pretrained(tmp_path, attn_implementation="eager", experts_implementation="eager").eval()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[k], v, rtol=0, atol=0)
    # ... and a patched model loads it and gives HF eager's logits
    reloaded = tm_hf.apply_torchmoe(cls.from_pretrained(tmp_path, attn_implementation="eager")).eval()
    ids = batch(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, ref_model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)


def test_class_patching_before_build():
    """apply_torchmoe() without a model patches the classes: models built afterwards use torchmoe."""
    ref_model = build("qwen2_moe")
    tm_hf.apply_torchmoe()
    try:
        cls, config = _configs()["qwen2_moe"]
        config.output_router_logits = True
        model = cls._from_config(config, attn_implementation="eager").eval()
        assert model.config._experts_implementation == "torchmoe"
        model.load_state_dict(ref_model.state_dict())
        ids = batch(seed=6)
        with OpRecorder() as rec:
            out, grads = forward_backward(model, ids)
        assert "topk_gating" in rec.ops and "grouped_mm" in rec.ops
        # an explicit request still wins
        eager = cls._from_config(config, experts_implementation="eager")
        assert eager.config._experts_implementation == "eager"
    finally:
        tm_hf.revert_torchmoe()
    ref, ref_grads = forward_backward(ref_model, ids)
    assert_same_outputs(out, ref, grads, ref_grads, torch.float32)
    with OpRecorder() as rec:
        forward_backward(ref_model, ids)
    assert rec.ops == []  # reverted: the classes are HF's again


def test_router_only_and_experts_only():
    ref_model = build("olmoe")
    ids = batch(seed=7)
    ref, ref_grads = forward_backward(ref_model, ids)
    for router, experts, expect, absent in [(True, False, "topk_gating", "grouped_mm"),
                                            (False, True, "grouped_mm", "topk_gating")]:
        model = patched(ref_model, router=router, experts=experts)
        with OpRecorder() as rec:
            out, grads = forward_backward(model, ids)
        assert expect in rec.ops and absent not in rec.ops
        assert_same_outputs(out, ref, grads, ref_grads, torch.float32)


def test_unsupported_model_left_untouched():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="left untouched"):
        assert tm_hf.apply_torchmoe(model) is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="model"):
        tm_hf.apply_torchmoe("mixtral")


def test_unserved_router_keeps_hf_scoring():
    """A router whose code is not one of torchmoe's rules keeps HF's forward (with a warning naming it)."""
    ref_model = build("mixtral")
    model = copy.deepcopy(ref_model)
    gate_cls = type(model.model.layers[0].mlp.gate)

    class CustomRouter(gate_cls):
        def forward(self, hidden_states):
            return super().forward(hidden_states)

    CustomRouter.__module__ = gate_cls.__module__
    for layer in model.model.layers:
        layer.mlp.gate.__class__ = CustomRouter
    with pytest.warns(UserWarning, match="CustomRouter"):
        tm_hf.apply_torchmoe(model)
    ids = batch(seed=8)
    with OpRecorder() as rec:
        out, grads = forward_backward(model, ids)
    assert "topk_gating" not in rec.ops and "grouped_mm" in rec.ops
    ref, ref_grads = forward_backward(ref_model, ids)
    assert_same_outputs(out, ref, grads, ref_grads, torch.float32)


def test_expert_parallel_falls_back_with_one_warning():
    ref_model = build("mixtral")
    model = copy.deepcopy(ref_model)
    model.set_experts_implementation("torchmoe")
    for layer in model.model.layers:
        layer.mlp.experts._is_expert_parallel = True
    ids = batch(seed=9)
    tm_hf._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with OpRecorder() as rec:
            with torch.no_grad():
                out = model(input_ids=ids)
                model(input_ids=ids)
    messages = [str(w.message) for w in caught if "expert-parallel" in str(w.message)]
    assert len(messages) == 1 and "eager" in messages[0]
    assert "grouped_mm" not in rec.ops
    with torch.no_grad():
        torch.testing.assert_close(out.logits, ref_model(input_ids=ids).logits)


def test_supported_router_classes_cover_the_families():
    names = tm_hf.supported_router_classes()
    for expected in ["mixtral.MixtralTopKRouter", "qwen2_moe.Qwen2MoeTopKRouter", "qwen3_moe.Qwen3MoeTopKRouter",
                     "olmoe.OlmoeTopKRouter", "deepseek_v3.DeepseekV3TopkRouter", "granitemoe.GraniteMoeTopKRouter",
                     "gpt_oss.GptOssTopKRouter"]:
        assert expected in names


def test_import_torchmoe_does_not_import_transformers():
    out = run_python("import sys, torchmoe, torchmoe.nn, torchmoe.integrations; "
                     "print('transformers' in sys.modules)")
    assert out.strip() == "False"


# ---------------------------------------------------------------------------------------------------------
# Router parity on random logits, ties included
# ---------------------------------------------------------------------------------------------------------


def _router(family):
    model = build(family)
    routers = [m for m in model.modules() if "router" in type(m).__name__.lower()]
    assert routers, family
    return routers[-1]


def _tied_inputs(router, num_tokens=64, seed=0):
    """Hidden states and a router weight whose logits have exact ties: experts 1 and 2 share a row, and so do
    the last two experts."""
    g = torch.Generator().manual_seed(seed)
    weight = router.weight.detach().clone()
    weight.copy_(torch.randn(weight.shape, generator=g, dtype=weight.dtype))
    weight[2] = weight[1]
    weight[-1] = weight[-2]
    hidden = torch.randn(num_tokens, weight.shape[1], generator=g, dtype=weight.dtype)
    return hidden, weight


def _boundary_tie(scores, indices, k):
    """Rows where the k-th selected score ties with an unselected one (the choice between them is arbitrary)."""
    kth = scores.gather(1, indices[:, k - 1:k])
    selected = torch.zeros_like(scores, dtype=torch.bool).scatter(1, indices, True)
    return ((scores == kth) & ~selected).any(dim=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_router_parity_with_ties(family):
    hf_router = _router(family)
    hidden, weight = _tied_inputs(hf_router)
    with torch.no_grad():
        hf_router.weight.copy_(weight)
    tm_router = copy.deepcopy(hf_router)
    forward = tm_hf._torchmoe_router_for(type(hf_router))
    assert forward is not None
    tm_router.__class__ = tm_hf._patched_instance_class(type(hf_router), forward)

    h1 = hidden.clone().requires_grad_(True)
    h2 = hidden.clone().requires_grad_(True)
    ref_logits, ref_w, ref_i = hf_router(h1)
    logits, w, i = tm_router(h2)
    assert w.dtype == ref_w.dtype and i.dtype == ref_i.dtype and w.shape == ref_w.shape
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    k = ref_i.shape[1]
    # selection scores as HF ranks them, to find ties at the k-th place
    if family == "deepseek_v3":
        scores = ref_logits.sigmoid() + hf_router.e_score_correction_bias
    else:
        scores = ref_logits.float()
    ties = _boundary_tie(scores, ref_i, k)
    free = ~ties
    assert free.sum() > 0
    # same experts as sets, same weight per expert
    ref_order, order = ref_i.sort(dim=1), i.sort(dim=1)
    torch.testing.assert_close(order.values[free], ref_order.values[free], rtol=0, atol=0)
    torch.testing.assert_close(w.gather(1, order.indices)[free], ref_w.gather(1, ref_order.indices)[free],
                               rtol=1e-6, atol=1e-7)
    # at a tie on the k-th place torchmoe takes the lower expert index; the weights are the same
    torch.testing.assert_close(w.sort(dim=1).values, ref_w.sort(dim=1).values, rtol=1e-6, atol=1e-7)
    # gradients w.r.t. the hidden states through weights and logits
    probe = torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=w.dtype)
    ((ref_w.gather(1, ref_order.indices)[free] * probe[free]).sum() + ref_logits.sum()).backward()
    ((w.gather(1, order.indices)[free] * probe[free]).sum() + logits.sum()).backward()
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-6)


def test_router_ties_inside_the_selection():
    """Ties among selected experts (not at the k-th place): same set, same weights, lower index first."""
    hf_router = _router("mixtral")
    k = hf_router.top_k
    logits = torch.tensor([[3.0, 3.0, 0.0, -1.0, 0.0, 0.0], [0.5, 2.0, 0.5, 2.0, 0.1, -3.0]])
    w, i = torchmoe.topk_gating(logits, k, "softmax", True)
    probs = logits.softmax(-1)
    ref_v, ref_i = torch.topk(probs, k)
    ref_v = ref_v / ref_v.sum(-1, keepdim=True)
    assert i.tolist() == [[0, 1], [1, 3]]
    torch.testing.assert_close(i.sort(1).values, ref_i.sort(1).values, rtol=0, atol=0)
    torch.testing.assert_close(w, ref_v)


# ---------------------------------------------------------------------------------------------------------
# The experts backend on the experts classes of other families (their own flags: transposed, biased, custom
# gate, non-gated, post-expert norm), module by module against their eager forward
# ---------------------------------------------------------------------------------------------------------

OTHER_FAMILIES = ["aria", "deepseek_v2", "ernie4_5_moe", "flex_olmo", "glm4_moe", "hunyuan_v1_moe", "jamba",
                  "minimax", "muse_spark", "nemotron_h", "openai_privacy_filter", "phimoe", "qwen3_5_moe",
                  "qwen3_next", "dots1", "granitemoeshared"]
TINY = dict(hidden_size=32, moe_hidden_size=32, intermediate_size=16, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64, num_experts=6,
            num_local_experts=6, n_routed_experts=6, num_experts_per_tok=2)


def _tiny(config_cls, **overrides):
    """A default config of config_cls shrunk to TINY sizes (fields a config refuses keep their default)."""
    config = config_cls()
    for key, value in {**TINY, **overrides}.items():
        try:
            if hasattr(config, key):
                setattr(config, key, value)
        except Exception:  # strict per-field validation, per-layer attributes
            pass
    return config


def _experts_of(family):
    import importlib

    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    configuration = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    classes = [c for c in vars(modeling).values() if isinstance(c, type) and issubclass(c, torch.nn.Module)
               and c.__module__ == modeling.__name__ and hasattr(getattr(c, "forward"), "__wrapped__")
               and hasattr(c, "_apply_gate")]
    configs = [c for c in vars(configuration).values() if isinstance(c, type)
               and issubclass(c, transformers.PreTrainedConfig) and c.__module__ == configuration.__name__]
    for config_cls in sorted(configs, key=lambda c: "Text" not in c.__name__):
        try:
            return [cls(_tiny(config_cls)) for cls in classes]
        except Exception:
            continue
    pytest.fail(f"no tiny config builds the experts of {family}")


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_experts_backend_on_other_families(family):
    for experts in _experts_of(family):
        torch.manual_seed(0)
        with torch.no_grad():
            for p in experts.parameters():
                p.normal_(0.0, 0.3)
        experts.config._experts_implementation = "eager"
        down = experts.down_proj
        hidden = down.shape[2] if experts.is_transposed else down.shape[1]
        tokens, k = 13, 2
        g = torch.Generator().manual_seed(1)
        x = torch.randn(tokens, hidden, generator=g, requires_grad=True)
        index = torch.stack([torch.randperm(experts.num_experts, generator=g)[:k] for _ in range(tokens)])
        weights = torch.rand(tokens, k, generator=g, requires_grad=True)
        params = [x, weights] + [p for p in experts.parameters()]
        ref = experts(x, index, weights)
        ref_grads = torch.autograd.grad(ref.square().sum(), params, allow_unused=True)
        experts.config._experts_implementation = "torchmoe"
        with OpRecorder() as rec:
            out = experts(x, index, weights)
            grads = torch.autograd.grad(out.square().sum(), params, allow_unused=True)
        assert {"route_plan", "dispatch", "grouped_mm", "combine", "_grouped_mm_backward"} <= set(rec.ops)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        for a, b in zip(grads, ref_grads):
            assert (a is None) == (b is None)
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_every_served_router_class_matches_its_hf_forward():
    """Every router class apply_torchmoe serves (the reference families and the other families whose router is
    the same code) gives HF's experts, weights and logits."""
    import importlib

    served = tm_hf.supported_router_classes()
    assert len(served) >= 7
    checked = 0
    for qualified in served:
        family, name = qualified.split(".")
        cls = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)
        configuration = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
        configs = [c for c in vars(configuration).values() if isinstance(c, type)
                   and issubclass(c, transformers.PreTrainedConfig) and c.__module__ == configuration.__name__]
        router = None
        for config_cls in sorted(configs, key=lambda c: "Text" not in c.__name__):
            try:
                router = cls(_tiny(config_cls, num_experts=8, num_local_experts=8, n_routed_experts=8, n_group=2,
                                   topk_group=1))
                break
            except Exception:
                continue
        assert router is not None, qualified
        torch.manual_seed(0)
        with torch.no_grad():
            for p in router.parameters():
                p.normal_(0.0, 1.0)
            for b_name, b in router.named_buffers():
                if "bias" in b_name:
                    b.normal_(0.0, 0.1)
        patched_router = copy.deepcopy(router)
        patched_router.__class__ = tm_hf._patched_instance_class(cls, tm_hf._torchmoe_router_for(cls))
        x = torch.randn(20, router.weight.shape[1])
        ref = router(x)
        out = patched_router(x)
        assert len(out) == len(ref) == 3, qualified
        torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)
        ref_order, order = ref[2].sort(dim=1), out[2].sort(dim=1)
        assert torch.equal(order.values, ref_order.values), qualified
        torch.testing.assert_close(out[1].gather(1, order.indices), ref[1].gather(1, ref_order.indices),
                                   rtol=1e-5, atol=1e-6, msg=lambda m: f"{qualified}: {m}")
        checked += 1
    assert checked == len(served)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_close_to_eager(family):
    # bfloat16: HF rounds every expert's weighted output to bfloat16 before summing, combine sums in float32;
    # the logits agree to about one bfloat16 step.
    ref_model = build(family, torch.bfloat16)
    model = patched(ref_model)
    ids = batch(seed=10)
    with torch.no_grad():
        ref = ref_model(input_ids=ids).logits
        out = model(input_ids=ids).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=8e-3)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_empty_batch(family):
    ref_model = build(family)
    model = patched(ref_model)
    name = next(n for n, m in model.named_modules() if n.endswith("layers.1.mlp"))
    x = torch.randn(1, 0, 32, requires_grad=True)
    out = model.get_submodule(name)(x)
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == (1, 0, 32)
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("family", FAMILIES)
def test_inference_logits_equal_eager(family):
    # Without gradients the experts take the split [gate | up] products (no activation copies).
    ref_model = build(family)
    model = patched(ref_model)
    ids = batch(seed=11, batch_size=3, seq=9)
    with torch.no_grad():
        ref = ref_model(input_ids=ids, output_router_logits=True)
        with OpRecorder() as rec:
            out = model(input_ids=ids, output_router_logits=True)
    torch.testing.assert_close(out.logits, ref.logits, **TOL[torch.float32])
    layers = len(ref.router_logits)
    gated_by_default = family != "gpt_oss"
    assert rec.ops.count("grouped_mm") == (3 if gated_by_default else 2) * layers
