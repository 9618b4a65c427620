// C++ API of torchmoe::topk_gating: calls through the dispatcher, so every backend, autograd and
// tracing apply. Semantics: DESIGN.md.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace torchmoe::ops {

std::tuple<at::Tensor, at::Tensor> topk_gating(
    const at::Tensor& logits, int64_t k, c10::string_view score_func = "softmax", bool renormalize = true,
    const std::optional<at::Tensor>& expert_bias = std::nullopt, int64_t num_expert_groups = 1,
    int64_t topk_expert_groups = 1, double scale = 1.0);

namespace detail {
at::Tensor _topk_gating_backward(
    const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& indices,
    c10::string_view score_func, bool renormalize, double scale);
}  // namespace detail

}  // namespace torchmoe::ops
