// Meta (shape) kernel of torchmoe::route_plan: dest like indices (int64), counts [E] or [G, E].
// Sizes stay symbolic so torch.compile can trace dynamic shapes.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/common/route_plan_checks.h"

namespace torchmoe::meta {
namespace {

std::tuple<at::Tensor, at::Tensor> route_plan_meta(const at::Tensor& indices, int64_t num_experts, int64_t capacity,
                                                   const std::optional<at::Tensor>& priority) {
  checks::check_route_plan_args(indices, num_experts, capacity, priority);
  const auto options = indices.options().dtype(at::kLong);
  at::Tensor dest = at::empty_symint(indices.sym_sizes(), options);
  at::Tensor counts = indices.dim() == 3
                          ? at::empty_symint({indices.sym_size(0), c10::SymInt(num_experts)}, options)
                          : at::empty_symint({c10::SymInt(num_experts)}, options);
  return {dest, counts};
}

}  // namespace
}  // namespace torchmoe::meta

TORCH_LIBRARY_IMPL(torchmoe, Meta, m) {
  m.impl("route_plan", &torchmoe::meta::route_plan_meta);
}
