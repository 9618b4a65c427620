// Autograd kernels of combine and of its backward (so double backward works). _combine_backward is
// bilinear: (grad_output, weights) -> grad_expert_out and (grad_output, expert_out) -> grad_weights, so
// its own gradients are again combine / _combine_backward calls.
#include <ATen/ops/add.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/autograd/records_graph.h"

#include "ops/combine.h"

namespace torchmoe::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class CombineFunction : public torch::autograd::Function<CombineFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& expert_out, const at::Tensor& dest,
                               const at::Tensor& weights) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto y = ops::combine(expert_out, dest, weights);
    ctx->save_for_backward({expert_out, dest, weights});
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [grad_expert_out, grad_weights] = ops::detail::_combine_backward(grads[0], saved[0], saved[1], saved[2]);
    return {ctx->needs_input_grad(0) ? grad_expert_out : at::Tensor(), at::Tensor(),
            ctx->needs_input_grad(2) ? grad_weights : at::Tensor()};
  }
};

class CombineBackwardFunction : public torch::autograd::Function<CombineBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_output, const at::Tensor& expert_out,
                               const at::Tensor& dest, const at::Tensor& weights) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_expert_out, grad_weights] = ops::detail::_combine_backward(grad_output, expert_out, dest, weights);
    ctx->save_for_backward({grad_output, expert_out, dest, weights});
    ctx->set_materialize_grads(false);
    return {grad_expert_out, grad_weights};
  }

  // gg_e: gradient w.r.t. grad_expert_out, gg_w: w.r.t. grad_weights (either may be undefined).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& grad_output = saved[0];
    const auto& expert_out = saved[1];
    const auto& dest = saved[2];
    const auto& weights = saved[3];
    const auto& gg_e = grads[0];
    const auto& gg_w = grads[1];

    at::Tensor d_grad_output, d_expert_out, d_weights;
    if (ctx->needs_input_grad(0)) {
      // grad_expert_out[dest[n, j]] = weights[n, j] * grad_output[n], grad_weights[n, j] = <grad_output[n], e_r>.
      if (gg_e.defined()) d_grad_output = ops::combine(gg_e, dest, weights);
      if (gg_w.defined()) {
        auto term = ops::combine(expert_out, dest, gg_w);
        d_grad_output = d_grad_output.defined() ? at::add(d_grad_output, term) : term;
      }
    }
    if (ctx->needs_input_grad(1) && gg_w.defined()) {
      d_expert_out = std::get<0>(ops::detail::_combine_backward(grad_output, expert_out, dest, gg_w));
    }
    if (ctx->needs_input_grad(3) && gg_e.defined()) {
      d_weights = std::get<1>(ops::detail::_combine_backward(grad_output, gg_e, dest, weights));
    }
    return {d_grad_output, d_expert_out, at::Tensor(), d_weights};
  }
};

at::Tensor combine_autograd(const at::Tensor& expert_out, const at::Tensor& dest, const at::Tensor& weights) {
  if (!autograd_detail::records_graph(expert_out, weights)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::combine(expert_out, dest, weights);
  }
  return CombineFunction::apply(expert_out, dest, weights)[0];
}

std::tuple<at::Tensor, at::Tensor> combine_backward_autograd(const at::Tensor& grad_output,
                                                             const at::Tensor& expert_out, const at::Tensor& dest,
                                                             const at::Tensor& weights) {
  if (!autograd_detail::records_graph(grad_output, expert_out, weights)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::detail::_combine_backward(grad_output, expert_out, dest, weights);
  }
  auto outs = CombineBackwardFunction::apply(grad_output, expert_out, dest, weights);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, Autograd, m) {
  m.impl("combine", combine_autograd);
  m.impl("_combine_backward", combine_backward_autograd);
}

}  // namespace torchmoe::autograd
