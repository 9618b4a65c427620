"""Patched routers against transformers' own router modules, configuration by configuration: every
configuration HF's router accepts (the degenerate ones included) gives HF's logits, selection and weights in
HF's dtypes, and the ones topk_gating does not compute exactly as HF run HF's own forward."""
import copy
import importlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

from torchmoe.integrations import transformers as tm_hf  # noqa: E402
from test_transformers import OpRecorder, _configs  # noqa: E402


def _module(family):
    return importlib.import_module(f"transformers.models.{family}.modeling_{family}")


def _configuration(family):
    return importlib.import_module(f"transformers.models.{family}.configuration_{family}")


# (family, router class, config class, experts field)
REFERENCES = {
    "mixtral": ("MixtralTopKRouter", "MixtralConfig", "num_local_experts"),
    "qwen2_moe": ("Qwen2MoeTopKRouter", "Qwen2MoeConfig", "num_experts"),
    "qwen3_moe": ("Qwen3MoeTopKRouter", "Qwen3MoeConfig", "num_experts"),
    "olmoe": ("OlmoeTopKRouter", "OlmoeConfig", "num_experts"),
    "granitemoe": ("GraniteMoeTopKRouter", "GraniteMoeConfig", "num_local_experts"),
    "gpt_oss": ("GptOssTopKRouter", "GptOssConfig", "num_local_experts"),
    "deepseek_v3": ("DeepseekV3TopkRouter", "DeepseekV3Config", "n_routed_experts"),
}
HIDDEN = 16


def hf_router(family, num_experts=8, k=2, dtype=torch.float32, seed=0, **fields):
    """transformers' router module of a family, built from its config, with random parameters (biases too)."""
    router_name, config_name, experts_field = REFERENCES[family]
    config = getattr(_configuration(family), config_name)(hidden_size=HIDDEN)
    setattr(config, experts_field, num_experts)
    config.num_experts_per_tok = k
    for key, value in fields.items():
        setattr(config, key, value)
    router = getattr(_module(family), router_name)(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        for name, b in router.named_buffers():
            if "bias" in name:
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return router.to(dtype)


def patched_copy(router):
    patched = copy.deepcopy(router)
    cls = type(router)
    patched.__class__ = tm_hf._patched_instance_class(cls, tm_hf._torchmoe_router_for(cls))
    return patched


def assert_same_routing(out, ref, exact_weights):
    """Same logits (bit for bit), same selected experts, same weight per expert, HF's dtypes and shapes. The
    weights are bit-equal where HF's forward runs; topk_gating's softmax/sum round within a few float32 ulp."""
    (logits, weights, indices), (ref_logits, ref_weights, ref_indices) = out, ref
    for a, b in zip(out, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0, equal_nan=True)
    tol = {} if exact_weights else dict(rtol=_WEIGHT_TOL[weights.dtype], atol=_WEIGHT_TOL[weights.dtype])
    tol = tol or dict(rtol=0, atol=0)
    if weights.numel() == 0:
        return
    # Rows with equal logits (16-bit logits tie often) may pick either of the tied experts: torch.topk's
    # choice is unspecified, topk_gating takes the lower index. There the weights agree as a multiset.
    flat = ref_logits.float().reshape(-1, ref_logits.shape[-1]).sort(dim=-1).values
    tied = (flat[:, 1:] == flat[:, :-1]).any(dim=-1)
    indices, ref_indices = indices.reshape(tied.shape[0], -1), ref_indices.reshape(tied.shape[0], -1)
    weights, ref_weights = weights.reshape(tied.shape[0], -1), ref_weights.reshape(tied.shape[0], -1)
    order, ref_order = indices.sort(dim=-1), ref_indices.sort(dim=-1)
    assert torch.equal(order.values[~tied], ref_order.values[~tied])
    w, ref_w = weights.gather(-1, order.indices), ref_weights.gather(-1, ref_order.indices)
    torch.testing.assert_close(w[~tied], ref_w[~tied], **tol, equal_nan=True)
    torch.testing.assert_close(weights[tied].sort(-1).values, ref_weights[tied].sort(-1).values, **tol,
                               equal_nan=True)


_WEIGHT_TOL = {torch.float32: 4e-7, torch.float64: 1e-7, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def run_both(router, hidden):
    patched = patched_copy(router)
    ref = router(hidden)
    with OpRecorder() as rec:
        out = patched(hidden)
    return out, ref, "topk_gating" in rec.ops


def hidden_states(dtype=torch.float32, tokens=24, seed=1, shape=None):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape or (tokens, HIDDEN), generator=g).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# DeepSeek-V3: the configuration of transformers' own DeepSeek-V3 model tests, and every group/k/bias variant
# ---------------------------------------------------------------------------------------------------------

# (n_group, topk_group, k, served by topk_gating)
DEEPSEEK_GROUPINGS = [
    (2, 1, 8, True),  # transformers' test config: k = E, beyond the 4 experts of the one selected group
    (2, 1, 5, False),  # k between the selected groups' experts and E: HF's own order among masked experts
    (4, 1, 3, False),
    (2, 1, 4, True),  # k = the experts of the selected groups
    (2, 2, 8, True),
    (4, 2, 3, True),
    (1, 1, 8, True),  # no grouping, k = E
    (1, 1, 1, True),
    (8, 1, 1, False),  # groups of one expert: HF raises (top-2 of a group), so does the patched router
    (2, 0, 2, False),  # topk_group = 0: every expert masked, HF still selects k
    (2, 1, 0, False),  # k = 0: empty selections
]


@pytest.mark.parametrize("n_group,topk_group,k,served", DEEPSEEK_GROUPINGS)
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_deepseek_v3_groupings(n_group, topk_group, k, served, norm_topk_prob):
    router = hf_router("deepseek_v3", k=k, n_group=n_group, topk_group=topk_group, norm_topk_prob=norm_topk_prob,
                       routed_scaling_factor=2.5)
    x = hidden_states()
    if n_group == 8:  # HF's error, not torchmoe's
        with pytest.raises(RuntimeError) as hf_error:
            router(x)
        with pytest.raises(RuntimeError) as error:
            patched_copy(router)(x)
        assert str(error.value) == str(hf_error.value)
        return
    out, ref, ran_op = run_both(router, x)
    assert ran_op == served
    assert_same_routing(out, ref, exact_weights=not served)
    if k == 8 and topk_group == 1:  # weights from the unmasked scores, as HF's (they sum to 2.5 normalized)
        expected = 2.5 if norm_topk_prob else None
        if expected is not None:
            torch.testing.assert_close(out[1].sum(-1), torch.full((x.shape[0],), expected))


@pytest.mark.parametrize("bias_dtype,served", [(torch.float32, True), (torch.bfloat16, True),
                                               (torch.float16, True), (torch.float64, False)])
def test_deepseek_v3_bias_dtypes(bias_dtype, served):
    # HF adds the float32 scores and the bias in the promoted dtype: float32 for 16-bit biases (as topk_gating
    # does), float64 for a float64 one (a float64 model), which HF's forward then serves.
    router = hf_router("deepseek_v3", k=3, n_group=4, topk_group=2)
    router.e_score_correction_bias = router.e_score_correction_bias.to(bias_dtype)
    out, ref, ran_op = run_both(router, hidden_states())
    assert ran_op == served
    assert_same_routing(out, ref, exact_weights=not served)


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("scaling", [1.0, 2.5])
def test_deepseek_v3_model_dtypes_and_scaling(model_dtype, scaling):
    router = hf_router("deepseek_v3", k=3, n_group=4, topk_group=2, routed_scaling_factor=scaling,
                       dtype=model_dtype)
    out, ref, ran_op = run_both(router, hidden_states(model_dtype))
    assert ran_op == (model_dtype != torch.float64)  # the buffer follows the model's dtype
    assert_same_routing(out, ref, exact_weights=not ran_op)


def test_deepseek_v3_scores_that_underflow():
    # Every selected sigmoid score rounds to 0: HF's epsilon in the normalization gives 0, not 0/0.
    router = hf_router("deepseek_v3", k=2, n_group=2, topk_group=1)
    with torch.no_grad():
        router.weight.fill_(1.0)
    out, ref, ran_op = run_both(router, torch.full((3, HIDDEN), -100.0))
    assert ran_op
    assert torch.equal(ref[1], torch.zeros(3, 2)) and torch.equal(out[1], ref[1])


@pytest.mark.parametrize("k", [8, 5])
def test_deepseek_v3_gradients_beyond_the_selected_groups(k):
    router = hf_router("deepseek_v3", k=k, n_group=2, topk_group=1)
    patched = patched_copy(router)
    x1 = hidden_states().requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    ref, out = router(x1), patched(x2)
    (ref[1].sum(-1).square().sum() + ref[0].sum()).backward()
    (out[1].sum(-1).square().sum() + out[0].sum()).backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0 if k == 5 else 1e-5, atol=0 if k == 5 else 1e-6)


# ---------------------------------------------------------------------------------------------------------
# Softmax routers (Mixtral, Qwen2/3-MoE, OLMoE, GraniteMoE, GPT-OSS): k against E, norm_topk_prob, dtypes
# ---------------------------------------------------------------------------------------------------------

SOFTMAX_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "gpt_oss"]


@pytest.mark.parametrize("k,served", [(1, True), (3, True), (8, True), (0, False)])
@pytest.mark.parametrize("family", SOFTMAX_FAMILIES)
def test_softmax_routers_k(family, k, served):
    fields = {"norm_topk_prob": True} if family in ("qwen2_moe", "qwen3_moe", "olmoe") else {}
    router = hf_router(family, k=k, **fields)
    out, ref, ran_op = run_both(router, hidden_states())
    assert ran_op == served
    assert_same_routing(out, ref, exact_weights=not served)


@pytest.mark.parametrize("family", SOFTMAX_FAMILIES + ["deepseek_v3"])
def test_k_above_the_experts_raises_as_hf(family):
    router = hf_router(family, k=9)
    with pytest.raises(RuntimeError) as hf_error:
        router(hidden_states())
    with pytest.raises(RuntimeError) as error:
        patched_copy(router)(hidden_states())
    assert str(error.value) == str(hf_error.value)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "olmoe"])
def test_norm_topk_prob(family, norm_topk_prob):
    router = hf_router(family, k=3, norm_topk_prob=norm_topk_prob)
    out, ref, ran_op = run_both(router, hidden_states())
    assert ran_op
    assert_same_routing(out, ref, exact_weights=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("family", SOFTMAX_FAMILIES)
def test_softmax_routers_dtypes(family, dtype):
    router = hf_router(family, k=2, dtype=dtype)
    out, ref, ran_op = run_both(router, hidden_states(dtype))
    assert ran_op
    assert_same_routing(out, ref, exact_weights=False)


@pytest.mark.parametrize("family", ["granitemoe", "gpt_oss"])
def test_routers_on_batched_hidden_states(family):
    # GPT-OSS's router takes the softmax over dim 1, which for [batch, seq, hidden] input is the sequence:
    # HF's forward serves that; GraniteMoE works on any leading dims and topk_gating serves it.
    router = hf_router(family, k=2)
    out, ref, ran_op = run_both(router, hidden_states(shape=(3, 5, HIDDEN)))
    assert ran_op == (family == "granitemoe")
    assert_same_routing(out, ref, exact_weights=not ran_op)


# ---------------------------------------------------------------------------------------------------------
# Every served router class (the reference families and the families with the same router code)
# ---------------------------------------------------------------------------------------------------------

def _served_router(qualified, **fields):
    family, name = qualified.split(".")
    cls = getattr(_module(family), name)
    configs = [c for c in vars(_configuration(family)).values() if isinstance(c, type)
               and issubclass(c, transformers.PreTrainedConfig) and c.__module__ == _configuration(family).__name__]
    for config_cls in sorted(configs, key=lambda c: "Text" not in c.__name__):
        try:
            config = config_cls()
        except Exception:
            continue
        for key, value in {"hidden_size": HIDDEN, "num_experts": 8, "num_local_experts": 8, "n_routed_experts": 8,
                           **fields}.items():
            try:
                if hasattr(config, key) or key in fields:
                    setattr(config, key, value)
            except Exception:
                pass
        try:
            router = cls(config)
        except Exception:
            continue
        # the forward reads these attributes: set them as the config would (some classes fix them in __init__)
        for key, attr in (("num_experts_per_tok", "top_k"), ("n_group", "num_group"), ("topk_group", "topk_group"),
                          ("norm_topk_prob", "norm_topk_prob")):
            if key in fields and hasattr(router, attr):
                setattr(router, attr, fields[key])
        torch.manual_seed(0)
        with torch.no_grad():
            for p in router.parameters():
                p.normal_(0.0, 1.0)
            for b_name, b in router.named_buffers():
                if "bias" in b_name:
                    b.normal_(0.0, 0.1)
        return router
    pytest.fail(f"no config builds {qualified}")


SERVED = tm_hf.supported_router_classes()
GAP_CONFIGS = {
    "family defaults": dict(num_experts_per_tok=2),  # each config's own n_group/topk_group/norm/scaling
    "k=1": dict(num_experts_per_tok=1, n_group=4, topk_group=2),
    "k=E": dict(num_experts_per_tok=8, n_group=1, topk_group=1),
    "k=0": dict(num_experts_per_tok=0, n_group=1, topk_group=1),
    "k>group experts": dict(num_experts_per_tok=8, n_group=2, topk_group=1),
    "norm off": dict(num_experts_per_tok=3, n_group=2, topk_group=1, norm_topk_prob=False),
}


def test_served_router_classes():
    assert len(SERVED) >= 30, SERVED  # 34 with transformers 5.24.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gap", list(GAP_CONFIGS))
def test_every_served_router_class_in_the_gap_configurations(gap, dtype):
    failures = []
    for qualified in SERVED:
        router = _served_router(qualified, **GAP_CONFIGS[gap]).to(dtype)
        try:
            try:
                ref_error = None
                router(hidden_states(dtype))
            except Exception as e:
                ref_error = e
            if ref_error is not None:
                with pytest.raises(type(ref_error)):
                    patched_copy(router)(hidden_states(dtype))
                continue
            out, ref, _ = run_both(router, hidden_states(dtype))
            assert_same_routing(out, ref, exact_weights=False)
        except Exception as e:  # collect every class, then fail naming them
            failures.append(f"{qualified}: {type(e).__name__}: {str(e)[:200]}")
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------------------
# Whole models in the degenerate configurations: transformers' own DeepSeek-V3 test config and k = 0 / k = E
# ---------------------------------------------------------------------------------------------------------

def _deepseek_test_model(k):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    # transformers' DeepSeek-V3 model-test config (8 experts, n_group=2, topk_group=1, k=8), k varied
    config = DeepseekV3Config(
        vocab_size=99, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
        routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=16, v_head_dim=32,
        qk_nope_head_dim=32, n_group=2, topk_group=1, num_experts_per_tok=k, first_k_dense_replace=1,
        norm_topk_prob=True, pad_token_id=0)
    return config, DeepseekV3ForCausalLM


def _mixtral_model(k):
    cls, config = _configs()["mixtral"]  # test_transformers' tiny Mixtral: 6 experts
    config.num_experts_per_tok = k
    return config, cls


@pytest.mark.parametrize("build,k,router_op", [(_deepseek_test_model, 8, True), (_deepseek_test_model, 5, False),
                                               (_mixtral_model, 6, True), (_mixtral_model, 0, False)])
def test_degenerate_models_equal_hf(build, k, router_op):
    config, cls = build(k)
    config.output_router_logits = True
    torch.manual_seed(0)
    ref_model = cls._from_config(config, attn_implementation="eager", experts_implementation="eager")
    with torch.no_grad():
        for name, b in ref_model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    model = tm_hf.apply_torchmoe(copy.deepcopy(ref_model))
    ids = torch.randint(1, config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1))
    ref = ref_model(input_ids=ids, labels=ids)
    ref.loss.backward()
    with OpRecorder() as rec:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    assert ("topk_gating" in rec.ops) == router_op and "grouped_mm" in rec.ops
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    assert len(out.router_logits) == len(ref.router_logits) > 0
    for a, b in zip(out.router_logits, ref.router_logits):  # later layers carry the experts' rounding
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    ref_grads = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        if ref_grads[name].grad is None:
            assert p.grad is None or not p.grad.any(), name
        else:
            torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)
