// C++ API of torchmoe::swiglu: calls through the dispatcher, so every backend, autograd and tracing
// apply. out = silu(gate) * up, elementwise.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace torchmoe::ops {

at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up);

namespace detail {
std::tuple<at::Tensor, at::Tensor> _swiglu_backward(const at::Tensor& grad_out, const at::Tensor& gate,
                                                    const at::Tensor& up);
}  // namespace detail

}  // namespace torchmoe::ops
