// C++ API of torchmoe::dispatch: calls through the dispatcher, so every backend, autograd and
// tracing apply. Semantics: DESIGN.md.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace torchmoe::ops {

at::Tensor dispatch(const at::Tensor& x, const at::Tensor& dest, int64_t num_rows);

namespace detail {
at::Tensor _dispatch_backward(const at::Tensor& grad_out, const at::Tensor& dest);
}  // namespace detail

}  // namespace torchmoe::ops
