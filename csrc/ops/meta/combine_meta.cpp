// Meta (shape-only) kernels of combine and its backward, in SymInts for dynamic shapes.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>

#include "ops/common/dispatch_checks.h"

namespace torchmoe::meta {
namespace {

at::Tensor combine_meta(const at::Tensor& expert_out, const at::Tensor& dest, const at::Tensor& weights) {
  checks::check_combine(expert_out, dest, weights);
  return expert_out.new_empty_symint({dest.sym_size(0), expert_out.sym_size(1)});
}

std::tuple<at::Tensor, at::Tensor> combine_backward_meta(const at::Tensor& grad_output, const at::Tensor& expert_out,
                                                         const at::Tensor& dest, const at::Tensor& weights) {
  checks::check_combine_backward(grad_output, expert_out, dest, weights);
  return {expert_out.new_empty_symint(expert_out.sym_sizes()), weights.new_empty_symint(weights.sym_sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, Meta, m) {
  m.impl("combine", combine_meta);
  m.impl("_combine_backward", combine_backward_meta);
}

}  // namespace torchmoe::meta
