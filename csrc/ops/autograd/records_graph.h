// Whether an op call must go through its torch::autograd::Function: grad mode is on and an input requires grad,
// or an input carries a forward-mode tangent (which the Functions reject, as they should). Otherwise the
// autograd kernels call the backend kernel directly: Function::apply would build a node, save inputs and wrap
// outputs for nothing, a few microseconds per call, which is most of an inference decode step's routing time.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/GradMode.h>

#include <optional>

namespace torchmoe::autograd_detail {

inline bool carries_tangent(const at::Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }

inline bool wants_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }

inline bool carries_tangent(const std::optional<at::Tensor>& t) { return t.has_value() && carries_tangent(*t); }

inline bool wants_grad(const std::optional<at::Tensor>& t) { return t.has_value() && wants_grad(*t); }

template <typename... Tensors>
bool records_graph(const Tensors&... inputs) {
  return (c10::GradMode::is_enabled() && (wants_grad(inputs) || ...)) || (carries_tangent(inputs) || ...);
}

}  // namespace torchmoe::autograd_detail
