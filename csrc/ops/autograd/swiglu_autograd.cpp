// Autograd of swiglu: d gate and d up through the _swiglu_backward op.
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/autograd/records_graph.h"

#include "ops/swiglu.h"

namespace torchmoe::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class SwigluFunction : public torch::autograd::Function<SwigluFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto out = ops::swiglu(gate, up);
    ctx->save_for_backward({gate, up});
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    if (!grad_outputs[0].defined()) return {at::Tensor(), at::Tensor()};
    auto [grad_gate, grad_up] = ops::detail::_swiglu_backward(grad_outputs[0], saved[0], saved[1]);
    return {ctx->needs_input_grad(0) ? grad_gate : at::Tensor(), ctx->needs_input_grad(1) ? grad_up : at::Tensor()};
  }
};

at::Tensor swiglu_autograd(const at::Tensor& gate, const at::Tensor& up) {
  if (!autograd_detail::records_graph(gate, up)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::swiglu(gate, up);
  }
  return SwigluFunction::apply(gate, up)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, Autograd, m) {
  m.impl("swiglu", &swiglu_autograd);
}

}  // namespace torchmoe::autograd
