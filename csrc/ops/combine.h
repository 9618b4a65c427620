// C++ API of torchmoe::combine: calls through the dispatcher, so every backend, autograd and
// tracing apply. Semantics: DESIGN.md.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace torchmoe::ops {

at::Tensor combine(const at::Tensor& expert_out, const at::Tensor& dest, const at::Tensor& weights);

namespace detail {
std::tuple<at::Tensor, at::Tensor> _combine_backward(
    const at::Tensor& grad_output, const at::Tensor& expert_out, const at::Tensor& dest,
    const at::Tensor& weights);
}  // namespace detail

}  // namespace torchmoe::ops
