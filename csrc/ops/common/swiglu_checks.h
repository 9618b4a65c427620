// Checks of swiglu and its backward, shared by the CPU, CUDA and Meta kernels (sizes as SymInts).
#pragma once

#include <ATen/core/Tensor.h>

#include "ops/common/checks.h"

namespace torchmoe::checks {

inline void check_like(const at::Tensor& t, const at::Tensor& gate, const char* op, const char* arg) {
  TORCHMOE_CHECK_ARG(t.scalar_type() == gate.scalar_type(), op, arg, "must have the dtype of 'gate' (",
                     gate.scalar_type(), "), got ", t.scalar_type());
  TORCHMOE_CHECK_ARG(t.sym_sizes() == gate.sym_sizes(), op, arg, "must have the shape of 'gate' ",
                     gate.sym_sizes(), ", got ", t.sym_sizes());
  check_same_device(gate, t, op, "gate", arg);
}

inline void check_swiglu(const at::Tensor& gate, const at::Tensor& up) {
  check_floating(gate, "swiglu", "gate");
  check_like(up, gate, "swiglu", "up");
}

inline void check_swiglu_backward(const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& up) {
  check_floating(gate, "_swiglu_backward", "gate");
  check_like(up, gate, "_swiglu_backward", "up");
  check_like(grad_out, gate, "_swiglu_backward", "grad_out");
}

}  // namespace torchmoe::checks
