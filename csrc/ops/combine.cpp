#include "ops/combine.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace torchmoe::ops {

at::Tensor combine(const at::Tensor& expert_out, const at::Tensor& dest, const at::Tensor& weights) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchmoe::combine", "")
                       .typed<decltype(combine)>();
  return op.call(expert_out, dest, weights);
}

namespace detail {
std::tuple<at::Tensor, at::Tensor> _combine_backward(
    const at::Tensor& grad_output, const at::Tensor& expert_out, const at::Tensor& dest,
    const at::Tensor& weights) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchmoe::_combine_backward", "")
                       .typed<decltype(_combine_backward)>();
  return op.call(grad_output, expert_out, dest, weights);
}
}  // namespace detail

}  // namespace torchmoe::ops
