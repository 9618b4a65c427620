#include "ops/dispatch.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace torchmoe::ops {

at::Tensor dispatch(const at::Tensor& x, const at::Tensor& dest, int64_t num_rows) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchmoe::dispatch", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt)>();
  return op.call(x, dest, c10::SymInt(num_rows));
}

namespace detail {
at::Tensor _dispatch_backward(const at::Tensor& grad_out, const at::Tensor& dest) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchmoe::_dispatch_backward", "")
                       .typed<decltype(_dispatch_backward)>();
  return op.call(grad_out, dest);
}
}  // namespace detail

}  // namespace torchmoe::ops
