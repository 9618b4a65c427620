// Shape functions of grouped_mm and its backward (FakeTensor / torch.compile). SymInt sizes only.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/common/grouped_mm_checks.h"

namespace torchmoe::ops {
namespace {

at::Tensor grouped_mm_meta(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& counts) {
  checks::check_grouped_mm_args(x, weight, counts);
  return at::empty_symint({x.sym_size(0), weight.sym_size(2)}, x.options());
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_meta(const at::Tensor& grad_output, const at::Tensor& x,
                                                            const at::Tensor& weight, const at::Tensor& counts) {
  checks::check_grouped_mm_backward_args(grad_output, x, weight, counts);
  return {at::empty_symint(x.sym_sizes(), x.options()), checks::empty_grad_weight(weight)};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, Meta, m) {
  m.impl("grouped_mm", &grouped_mm_meta);
  m.impl("_grouped_mm_backward", &grouped_mm_backward_meta);
}

}  // namespace torchmoe::ops
