// Argument checks of torchmoe::route_plan shared by the CPU, CUDA and Meta kernels. Only shapes, dtypes,
// devices and int arguments are checked here (sizes through sym_size, so Meta works with dynamic shapes);
// the range of the indices' values is checked by the kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/safe_numerics.h>

#include <optional>

#include "ops/common/checks.h"

namespace torchmoe::checks {

inline bool is_route_plan_priority_dtype(at::ScalarType s) {
  switch (s) {
    case at::kHalf:
    case at::kBFloat16:
    case at::kFloat:
    case at::kDouble:
    case at::kBool:
    case at::kByte:
    case at::kChar:
    case at::kShort:
    case at::kInt:
    case at::kLong:
      return true;
    default:
      return false;
  }
}

inline void check_route_plan_args(const at::Tensor& indices, int64_t num_experts, int64_t capacity,
                                  const std::optional<at::Tensor>& priority) {
  constexpr const char* op = "route_plan";
  TORCHMOE_CHECK_ARG(indices.dim() == 2 || indices.dim() == 3, op, "indices",
                     "must be a 2-D [T, k] or 3-D [G, T, k] tensor, got ", indices.dim(), "-D");
  check_index_dtype(indices, op, "indices");
  TORCHMOE_CHECK_ARG(num_experts >= 1, op, "num_experts", "must be >= 1, got ", num_experts);
  TORCHMOE_CHECK_ARG(capacity >= -1, op, "capacity", "must be >= 0, or -1 for dropless routing, got ",
                     capacity);
  if (!priority.has_value()) {
    return;
  }
  const at::Tensor& p = *priority;
  check_same_device(indices, p, op, "indices", "priority");
  TORCHMOE_CHECK_ARG(is_route_plan_priority_dtype(p.scalar_type()), op, "priority",
                     "must be a floating point or integer tensor, got ", p.scalar_type());
  // [T] / [T, k] without groups, [G, T] / [G, T, k] with groups: indices' shape, or it without k.
  const int64_t d = indices.dim();
  const bool rank_ok = p.dim() == d || p.dim() == d - 1;
  bool shape_ok = rank_ok;
  for (int64_t i = 0; shape_ok && i < p.dim(); ++i) {
    shape_ok = p.sym_size(i) == indices.sym_size(i);
  }
  TORCHMOE_CHECK_ARG(shape_ok, op, "priority", "must have shape ", (d == 3 ? "[G, T] or [G, T, k]" : "[T] or [T, k]"),
                     " matching indices ", indices.sym_sizes(), ", got ", p.sym_sizes());
}

// dest = (e * G + g) * capacity + pos must fit in int64. Kernels call this with concrete sizes.
inline void check_route_plan_capacity_fits(int64_t num_experts, int64_t groups, int64_t capacity) {
  int64_t rows = 0;
  const bool overflow = c10::mul_overflows(num_experts, groups, &rows) || c10::mul_overflows(rows, capacity, &rows);
  TORCHMOE_CHECK_ARG(!overflow, "route_plan", "capacity", "is too large: num_experts (", num_experts,
                     ") * G (", groups, ") * capacity (", capacity, ") overflows int64");
}

}  // namespace torchmoe::checks
