// C++ API of torchmoe::route_plan: calls through the dispatcher, so every backend, autograd and
// tracing apply. Semantics: DESIGN.md.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace torchmoe::ops {

std::tuple<at::Tensor, at::Tensor> route_plan(
    const at::Tensor& indices, int64_t num_experts, int64_t capacity = -1,
    const std::optional<at::Tensor>& priority = std::nullopt);

}  // namespace torchmoe::ops
