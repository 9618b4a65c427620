// Autograd kernel of topk_gating: d logits through _topk_gating_backward (no gradient for expert_bias;
// indices are not differentiable). The backward op itself is registered too, so that a second
// differentiation fails loudly instead of silently returning zeros.
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/autograd/records_graph.h"

#include "ops/topk_gating.h"

namespace torchmoe::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class TopkGatingFunction : public torch::autograd::Function<TopkGatingFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, int64_t k, c10::string_view score_func,
                               bool renormalize, const std::optional<at::Tensor>& expert_bias,
                               int64_t num_expert_groups, int64_t topk_expert_groups, double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [weights, indices] = topk_gating(logits, k, score_func, renormalize, expert_bias, num_expert_groups,
                                          topk_expert_groups, scale);
    ctx->save_for_backward({logits, indices});
    ctx->saved_data["score_func"] = std::string(score_func);
    ctx->saved_data["renormalize"] = renormalize;
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({indices});
    return {weights, indices};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_logits;
    if (ctx->needs_input_grad(0)) {  // false when only expert_bias requires grad
      const std::string score_func = ctx->saved_data["score_func"].toStringRef();
      grad_logits = detail::_topk_gating_backward(grad_outputs[0], saved[0], saved[1], score_func,
                                                  ctx->saved_data["renormalize"].toBool(),
                                                  ctx->saved_data["scale"].toDouble());
    }
    // logits, k, score_func, renormalize, expert_bias, num_expert_groups, topk_expert_groups, scale
    return {grad_logits,   at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(),  at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class TopkGatingBackwardFunction : public torch::autograd::Function<TopkGatingBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_weights, const at::Tensor& logits,
                               const at::Tensor& indices, c10::string_view score_func, bool renormalize,
                               double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return {detail::_topk_gating_backward(grad_weights, logits, indices, score_func, renormalize, scale)};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    TORCH_CHECK(false, "torchmoe::topk_gating: double backward is not supported");
  }
};

std::tuple<at::Tensor, at::Tensor> topk_gating_autograd(const at::Tensor& logits, int64_t k,
                                                        c10::string_view score_func, bool renormalize,
                                                        const std::optional<at::Tensor>& expert_bias,
                                                        int64_t num_expert_groups, int64_t topk_expert_groups,
                                                        double scale) {
  if (!autograd_detail::records_graph(logits, expert_bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return topk_gating(logits, k, score_func, renormalize, expert_bias, num_expert_groups, topk_expert_groups, scale);
  }
  auto out = TopkGatingFunction::apply(logits, k, score_func, renormalize, expert_bias, num_expert_groups,
                                       topk_expert_groups, scale);
  return {out[0], out[1]};
}

at::Tensor topk_gating_backward_autograd(const at::Tensor& grad_weights, const at::Tensor& logits,
                                         const at::Tensor& indices, c10::string_view score_func, bool renormalize,
                                         double scale) {
  return TopkGatingBackwardFunction::apply(grad_weights, logits, indices, score_func, renormalize, scale)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, Autograd, m) {
  m.impl("topk_gating", &topk_gating_autograd);
  m.impl("_topk_gating_backward", &topk_gating_backward_autograd);
}

}  // namespace torchmoe::ops
