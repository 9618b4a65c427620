// Autograd kernels of dispatch and of its backward (so double backward works): dispatch is linear in
// x, and _dispatch_backward is its adjoint, so each one's gradient is the other.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/autograd/records_graph.h"

#include "ops/dispatch.h"

namespace torchmoe::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The C++ API takes an int num_rows; under torch.compile it is symbolic, so call the schema with a SymInt.
at::Tensor dispatch_symint(const at::Tensor& x, const at::Tensor& dest, c10::SymInt num_rows) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchmoe::dispatch", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt)>();
  return op.call(x, dest, std::move(num_rows));
}

class DispatchFunction : public torch::autograd::Function<DispatchFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& dest,
                               c10::SymInt num_rows) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto out = dispatch_symint(x, dest, std::move(num_rows));
    ctx->save_for_backward({dest});
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto dest = ctx->get_saved_variables()[0];
    return {ops::detail::_dispatch_backward(grads[0], dest), at::Tensor(), at::Tensor()};
  }
};

class DispatchBackwardFunction : public torch::autograd::Function<DispatchBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_out, const at::Tensor& dest) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto dx = ops::detail::_dispatch_backward(grad_out, dest);
    ctx->save_for_backward({dest});
    ctx->saved_data["num_rows"] = grad_out.sym_size(0);
    return {dx};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto dest = ctx->get_saved_variables()[0];
    const auto num_rows = ctx->saved_data["num_rows"].toSymInt();
    return {dispatch_symint(grads[0], dest, num_rows), at::Tensor()};
  }
};

at::Tensor dispatch_autograd(const at::Tensor& x, const at::Tensor& dest, c10::SymInt num_rows) {
  if (!autograd_detail::records_graph(x)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return dispatch_symint(x, dest, std::move(num_rows));
  }
  return DispatchFunction::apply(x, dest, std::move(num_rows))[0];
}

at::Tensor dispatch_backward_autograd(const at::Tensor& grad_out, const at::Tensor& dest) {
  if (!autograd_detail::records_graph(grad_out)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::detail::_dispatch_backward(grad_out, dest);
  }
  return DispatchBackwardFunction::apply(grad_out, dest)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, Autograd, m) {
  m.impl("dispatch", dispatch_autograd);
  m.impl("_dispatch_backward", dispatch_backward_autograd);
}

}  // namespace torchmoe::autograd
