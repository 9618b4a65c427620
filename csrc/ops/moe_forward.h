// C++ API of torchmoe::_moe_forward: a dropless MoE layer's whole forward in one call, for inference (see
// moe_forward.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace torchmoe::ops {

// (y, weights, indices, logits, counts) of the dropless layer on x [T, d_model]: router logits = router_logits(x,
// router_weight), topk_gating, route_plan, dispatch, the experts (grouped_mm, or grouped_mm_quantized when bits is
// 4 or 8: then gate_proj / up_proj / down_proj are the packed codes and scales, zeros, group_sizes hold their
// (gate, up, down) entries), the activation ("swiglu" with gate_proj, "relu" or "gelu" without), combine.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> _moe_forward(
    const at::Tensor& x, const at::Tensor& router_weight, const std::optional<at::Tensor>& expert_bias, int64_t k,
    c10::string_view score_func, bool renormalize, int64_t num_expert_groups, int64_t topk_expert_groups,
    double scale, c10::string_view activation, const std::optional<at::Tensor>& gate_proj, const at::Tensor& up_proj,
    const at::Tensor& down_proj, int64_t bits = 0, const std::vector<std::optional<at::Tensor>>& scales = {},
    const std::vector<std::optional<at::Tensor>>& zeros = {}, const std::vector<int64_t>& group_sizes = {});

}  // namespace torchmoe::ops
