// C++ API of torchmoe::grouped_mm: calls through the dispatcher, so every backend, autograd and
// tracing apply. Semantics: DESIGN.md.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace torchmoe::ops {

at::Tensor grouped_mm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& counts);

namespace detail {
std::tuple<at::Tensor, at::Tensor> _grouped_mm_backward(
    const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& counts);
}  // namespace detail

}  // namespace torchmoe::ops
