// Shape/dtype/device checks of grouped_mm and its backward, shared by the CPU, CUDA and Meta kernels.
// Sizes are compared as SymInts so the Meta kernels can call them under torch.compile. The value checks
// on counts (non-negative, summing to N) need the data and live in the device kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include "ops/common/checks.h"

namespace torchmoe::checks {

inline void check_grouped_mm_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& counts,
                                  const char* op = "grouped_mm") {
  check_dim(x, 2, op, "x");
  check_floating(x, op, "x");
  check_dim(weight, 3, op, "weight");
  TORCHMOE_CHECK_ARG(weight.scalar_type() == x.scalar_type(), op, "weight",
                     "must have the dtype of 'x' (", x.scalar_type(), "), got ", weight.scalar_type());
  TORCHMOE_CHECK_ARG(weight.sym_size(1) == x.sym_size(1), op, "weight",
                     "must be [E, d_in, d_out] with d_in = x.size(1) = ", x.sym_size(1), ", got shape ",
                     weight.sym_sizes());
  check_dim(counts, 1, op, "counts");
  check_dtype(counts, at::kLong, op, "counts");
  TORCHMOE_CHECK_ARG(counts.sym_size(0) == weight.sym_size(0), op, "counts",
                     "must have one entry per expert (weight.size(0) = ", weight.sym_size(0), "), got ",
                     counts.sym_size(0), " entries");
  check_same_device(x, weight, op, "x", "weight");
  check_same_device(x, counts, op, "x", "counts");
}

inline void check_grouped_mm_backward_args(const at::Tensor& grad_output, const at::Tensor& x,
                                           const at::Tensor& weight, const at::Tensor& counts) {
  const char* op = "_grouped_mm_backward";
  check_grouped_mm_args(x, weight, counts, op);
  check_dim(grad_output, 2, op, "grad_output");
  TORCHMOE_CHECK_ARG(grad_output.scalar_type() == x.scalar_type(), op, "grad_output",
                     "must have the dtype of 'x' (", x.scalar_type(), "), got ", grad_output.scalar_type());
  TORCHMOE_CHECK_ARG(grad_output.sym_size(0) == x.sym_size(0) && grad_output.sym_size(1) == weight.sym_size(2),
                     op, "grad_output", "must have shape [", x.sym_size(0), ", ", weight.sym_size(2),
                     "], got ", grad_output.sym_sizes());
  check_same_device(x, grad_output, op, "x", "grad_output");
}

// A weight read as a transposed view (unit stride along d_in: Hugging Face's [E, d_out, d_in] parameters through
// .transpose(1, 2)) gets its gradient in that same layout, so autograd hands it to the parameter without a strided
// copy. The CPU, CUDA and Meta kernels all decide the layout here.
inline bool grad_weight_transposed(const at::Tensor& weight) {
  return weight.sym_size(1) > 1 && weight.sym_size(2) > 1 && weight.sym_stride(1) == 1 && weight.sym_stride(2) != 1;
}

// An uninitialised grad_weight in the layout grad_weight_transposed picks.
inline at::Tensor empty_grad_weight(const at::Tensor& weight) {
  if (grad_weight_transposed(weight)) {
    return at::empty_symint({weight.sym_size(0), weight.sym_size(2), weight.sym_size(1)}, weight.options())
        .transpose(1, 2);
  }
  return at::empty_symint(weight.sym_sizes(), weight.options());
}

}  // namespace torchmoe::checks
