#include "ops/topk_gating.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace torchmoe::ops {

std::tuple<at::Tensor, at::Tensor> topk_gating(
    const at::Tensor& logits, int64_t k, c10::string_view score_func, bool renormalize,
    const std::optional<at::Tensor>& expert_bias, int64_t num_expert_groups,
    int64_t topk_expert_groups, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchmoe::topk_gating", "")
                       .typed<decltype(topk_gating)>();
  return op.call(logits, k, score_func, renormalize, expert_bias, num_expert_groups, topk_expert_groups,
                 scale);
}

namespace detail {
at::Tensor _topk_gating_backward(
    const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& indices,
    c10::string_view score_func, bool renormalize, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchmoe::_topk_gating_backward", "")
                       .typed<decltype(_topk_gating_backward)>();
  return op.call(grad_weights, logits, indices, score_func, renormalize, scale);
}
}  // namespace detail

}  // namespace torchmoe::ops
