// Shape/dtype/device checks of dispatch, combine and their backward ops, shared by the CPU, CUDA and
// Meta kernels. Sizes are compared as SymInts so the Meta kernels can call them under torch.compile.
// Value checks (dest entries in range, no duplicate dispatch rows) live in the device kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymBool.h>
#include <c10/core/SymInt.h>

#include "ops/common/checks.h"

namespace torchmoe::checks {

// True for concrete sizes; on symbolic sizes, a guard (or a deferred runtime assert for unbacked ones).
#define TORCHMOE_SYM_TRUE(sym_bool) (sym_bool).expect_true(__FILE__, __LINE__)

inline void check_dest(const at::Tensor& dest, const char* op) {
  check_dim(dest, 2, op, "dest");
  check_dtype(dest, at::kLong, op, "dest");
}

inline void check_rows_2d(const at::Tensor& t, const char* op, const char* arg) {
  check_dim(t, 2, op, arg);
  check_floating(t, op, arg);
}

// x [N, d] floating, dest [N, k] int64, num_rows >= 0.
inline void check_dispatch(const at::Tensor& x, const at::Tensor& dest, const c10::SymInt& num_rows) {
  constexpr const char* op = "dispatch";
  check_rows_2d(x, op, "x");
  check_dest(dest, op);
  check_same_device(x, dest, op, "x", "dest");
  TORCHMOE_CHECK_ARG(TORCHMOE_SYM_TRUE(dest.sym_size(0).sym_eq(x.sym_size(0))), op, "dest",
                     "must have one row per row of 'x' (shape [N, k] with N = x.size(0)), got dest ",
                     dest.sym_sizes(), " and x ", x.sym_sizes());
  TORCHMOE_CHECK_ARG(TORCHMOE_SYM_TRUE(num_rows.sym_ge(0)), op, "num_rows", "must be >= 0, got ", num_rows);
}

// grad_out [R, d] floating, dest [N, k] int64.
inline void check_dispatch_backward(const at::Tensor& grad_out, const at::Tensor& dest) {
  constexpr const char* op = "_dispatch_backward";
  check_rows_2d(grad_out, op, "grad_out");
  check_dest(dest, op);
  check_same_device(grad_out, dest, op, "grad_out", "dest");
}

// expert_out [R, d] floating, dest [N, k] int64, weights [N, k] floating.
inline void check_combine_args(const at::Tensor& expert_out, const at::Tensor& dest, const at::Tensor& weights,
                               const char* op) {
  check_rows_2d(expert_out, op, "expert_out");
  check_dest(dest, op);
  check_floating(weights, op, "weights");
  check_same_device(expert_out, dest, op, "expert_out", "dest");
  check_same_device(expert_out, weights, op, "expert_out", "weights");
  TORCHMOE_CHECK_ARG(weights.dim() == 2 && TORCHMOE_SYM_TRUE(weights.sym_size(0).sym_eq(dest.sym_size(0))) &&
                         TORCHMOE_SYM_TRUE(weights.sym_size(1).sym_eq(dest.sym_size(1))),
                     op, "weights", "must have the shape of 'dest' ", dest.sym_sizes(), ", got ",
                     weights.sym_sizes());
}

inline void check_combine(const at::Tensor& expert_out, const at::Tensor& dest, const at::Tensor& weights) {
  check_combine_args(expert_out, dest, weights, "combine");
}

// grad_output [N, d] floating, plus combine's arguments.
inline void check_combine_backward(const at::Tensor& grad_output, const at::Tensor& expert_out,
                                   const at::Tensor& dest, const at::Tensor& weights) {
  constexpr const char* op = "_combine_backward";
  check_combine_args(expert_out, dest, weights, op);
  check_rows_2d(grad_output, op, "grad_output");
  check_same_device(grad_output, expert_out, op, "grad_output", "expert_out");
  TORCHMOE_CHECK_ARG(TORCHMOE_SYM_TRUE(grad_output.sym_size(0).sym_eq(dest.sym_size(0))) &&
                         TORCHMOE_SYM_TRUE(grad_output.sym_size(1).sym_eq(expert_out.sym_size(1))),
                     op, "grad_output", "must have shape [dest.size(0), expert_out.size(1)] = [",
                     dest.sym_size(0), ", ", expert_out.sym_size(1), "], got ", grad_output.sym_sizes());
}

}  // namespace torchmoe::checks
