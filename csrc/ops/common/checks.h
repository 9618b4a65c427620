// Argument checks shared by every backend's kernels, so CPU, CUDA and Meta reject the same calls
// with the same message: "torchmoe::<op>: argument '<name>' <what was expected>, got <what came>".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define TORCHMOE_CHECK_ARG(cond, op, arg, ...) \
  TORCH_CHECK((cond), "torchmoe::", op, ": argument '", arg, "' ", __VA_ARGS__)

namespace torchmoe::checks {

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* arg) {
  TORCHMOE_CHECK_ARG(t.dim() == dim, op, arg, "must be a ", dim, "-D tensor, got ", t.dim(), "-D");
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* op, const char* arg) {
  TORCHMOE_CHECK_ARG(t.scalar_type() == dtype, op, arg, "must have dtype ", dtype, ", got ", t.scalar_type());
}

inline void check_floating(const at::Tensor& t, const char* op, const char* arg) {
  const auto s = t.scalar_type();
  TORCHMOE_CHECK_ARG(
      s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble, op, arg,
      "must be float16, bfloat16, float32 or float64, got ", s);
}

inline void check_index_dtype(const at::Tensor& t, const char* op, const char* arg) {
  const auto s = t.scalar_type();
  TORCHMOE_CHECK_ARG(s == at::kLong || s == at::kInt, op, arg, "must be int64 or int32, got ", s);
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* arg_a,
                              const char* arg_b) {
  TORCH_CHECK(a.device() == b.device(), "torchmoe::", op, ": arguments '", arg_a, "' and '", arg_b,
              "' must be on the same device, got ", a.device(), " and ", b.device());
}

}  // namespace torchmoe::checks
