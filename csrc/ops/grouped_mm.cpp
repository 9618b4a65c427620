#include "ops/grouped_mm.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace torchmoe::ops {

at::Tensor grouped_mm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& counts) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchmoe::grouped_mm", "")
                       .typed<decltype(grouped_mm)>();
  return op.call(x, weight, counts);
}

namespace detail {
std::tuple<at::Tensor, at::Tensor> _grouped_mm_backward(
    const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& counts) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchmoe::_grouped_mm_backward", "")
                       .typed<decltype(_grouped_mm_backward)>();
  return op.call(grad_output, x, weight, counts);
}
}  // namespace detail

}  // namespace torchmoe::ops
