#include "ops/swiglu.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace torchmoe::ops {

at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("torchmoe::swiglu", "").typed<decltype(swiglu)>();
  return op.call(gate, up);
}

namespace detail {
std::tuple<at::Tensor, at::Tensor> _swiglu_backward(const at::Tensor& grad_out, const at::Tensor& gate,
                                                    const at::Tensor& up) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchmoe::_swiglu_backward", "")
                       .typed<decltype(_swiglu_backward)>();
  return op.call(grad_out, gate, up);
}
}  // namespace detail

}  // namespace torchmoe::ops
