// Checks of router_logits, shared by the CPU, CUDA and Meta kernels, and the dtype its logits take.
#pragma once

#include <ATen/core/Tensor.h>

#include "ops/common/checks.h"

namespace torchmoe::checks {

// float64 when either operand is float64 (gradcheck), else float32.
inline at::ScalarType router_logits_dtype(const at::Tensor& x, const at::Tensor& weight) {
  return x.scalar_type() == at::kDouble || weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_router_logits(const at::Tensor& x, const at::Tensor& weight) {
  check_floating(x, "router_logits", "x");
  check_floating(weight, "router_logits", "weight");
  TORCHMOE_CHECK_ARG(x.dim() >= 1, "router_logits", "x", "must have at least 1 dim [..., d_model], got a 0-D tensor");
  check_dim(weight, 2, "router_logits", "weight");
  TORCHMOE_CHECK_ARG(weight.sym_size(1) == x.sym_size(-1), "router_logits", "weight",
                     "must be [num_experts, d_model] with d_model = x.size(-1) = ", x.sym_size(-1), ", got shape ",
                     weight.sym_sizes());
  check_same_device(x, weight, "router_logits", "x", "weight");
}

}  // namespace torchmoe::checks
