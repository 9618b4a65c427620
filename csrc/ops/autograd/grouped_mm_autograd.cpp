// Autograd of grouped_mm: d x and d weight through the _grouped_mm_backward op (counts gets none).
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/autograd/records_graph.h"

#include "ops/grouped_mm.h"

namespace torchmoe::ops {
namespace {

class GroupedMMFunction : public torch::autograd::Function<GroupedMMFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& weight, const at::Tensor& counts) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto out = grouped_mm(x, weight, counts);
    ctx->save_for_backward({x, weight, counts});
    return {out};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 const torch::autograd::variable_list& grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto& grad_out = grad_outputs[0];
    if (!grad_out.defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    auto [grad_x, grad_weight] = detail::_grouped_mm_backward(grad_out, saved[0], saved[1], saved[2]);
    return {ctx->needs_input_grad(0) ? grad_x : at::Tensor(), ctx->needs_input_grad(1) ? grad_weight : at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor grouped_mm_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& counts) {
  if (!autograd_detail::records_graph(x, weight)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return grouped_mm(x, weight, counts);
  }
  return GroupedMMFunction::apply(x, weight, counts)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, Autograd, m) {
  m.impl("grouped_mm", &grouped_mm_autograd);
}

}  // namespace torchmoe::ops
