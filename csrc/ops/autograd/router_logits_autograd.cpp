// Autograd of router_logits: d x = g @ weight and d weight = g^T @ x, in the logits' dtype (float32 or
// float64), then cast to each operand's dtype. Differentiable again (the backward is made of ATen ops).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include "ops/autograd/records_graph.h"

#include "ops/router_logits.h"

namespace torchmoe::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class RouterLogitsFunction : public torch::autograd::Function<RouterLogitsFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto logits = ops::router_logits(x, weight);
    ctx->save_for_backward({x, weight});
    return {logits};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& grad = grad_outputs[0];
    if (!grad.defined()) return {at::Tensor(), at::Tensor()};
    const auto acc = grad.scalar_type();
    at::Tensor grad_x, grad_weight;
    if (ctx->needs_input_grad(0)) grad_x = at::matmul(grad, weight.to(acc)).to(x.scalar_type());
    if (ctx->needs_input_grad(1)) {
      const int64_t rows = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));  // x [..., d] as [rows, d]
      grad_weight = at::mm(grad.reshape({rows, weight.size(0)}).t(), x.reshape({rows, x.size(-1)}).to(acc))
                        .to(weight.scalar_type());
    }
    return {grad_x, grad_weight};
  }
};

at::Tensor router_logits_autograd(const at::Tensor& x, const at::Tensor& weight) {
  if (!autograd_detail::records_graph(x, weight)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::router_logits(x, weight);
  }
  return RouterLogitsFunction::apply(x, weight)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, Autograd, m) {
  m.impl("router_logits", &router_logits_autograd);
}

}  // namespace torchmoe::autograd
