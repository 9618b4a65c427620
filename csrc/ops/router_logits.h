// C++ API of torchmoe::router_logits: calls through the dispatcher, so every backend, autograd and tracing
// apply. logits[..., e] = sum_i x[..., i] * weight[e, i], in float32 (float64 if an operand is float64).
#pragma once

#include <ATen/core/Tensor.h>

namespace torchmoe::ops {

at::Tensor router_logits(const at::Tensor& x, const at::Tensor& weight);

}  // namespace torchmoe::ops
