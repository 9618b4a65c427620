// Meta (shape-only) kernels of swiglu and its backward.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>

#include "ops/common/swiglu_checks.h"

namespace torchmoe::meta {
namespace {

at::Tensor swiglu_meta(const at::Tensor& gate, const at::Tensor& up) {
  checks::check_swiglu(gate, up);
  return gate.new_empty_symint(gate.sym_sizes());
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_meta(const at::Tensor& grad_out, const at::Tensor& gate,
                                                        const at::Tensor& up) {
  checks::check_swiglu_backward(grad_out, gate, up);
  return {gate.new_empty_symint(gate.sym_sizes()), gate.new_empty_symint(gate.sym_sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, Meta, m) {
  m.impl("swiglu", swiglu_meta);
  m.impl("_swiglu_backward", swiglu_backward_meta);
}

}  // namespace torchmoe::meta
