// Shape functions of grouped_mm_quantized and its backward (FakeTensor / torch.compile). SymInt sizes only.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/common/grouped_mm_quantized_checks.h"

namespace torchmoe::ops {
namespace {

at::Tensor grouped_mm_quantized_meta(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                     const std::optional<at::Tensor>& zeros, const at::Tensor& counts, int64_t bits,
                                     int64_t group_size) {
  checks::check_grouped_mm_quantized_forward(x, qweight, scales, zeros, counts, bits, group_size);
  return at::empty_symint({x.sym_size(0), qweight.sym_size(2)}, x.options());
}

at::Tensor grouped_mm_quantized_backward_meta(const at::Tensor& grad_output, const at::Tensor& qweight,
                                              const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                              const at::Tensor& counts, int64_t bits, int64_t group_size) {
  checks::check_grouped_mm_quantized_backward(grad_output, qweight, scales, zeros, counts, bits, group_size);
  return at::empty_symint({grad_output.sym_size(0), checks::quantized_d_in(qweight, bits)}, grad_output.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, Meta, m) {
  m.impl("grouped_mm_quantized", &grouped_mm_quantized_meta);
  m.impl("_grouped_mm_quantized_backward", &grouped_mm_quantized_backward_meta);
}

}  // namespace torchmoe::ops
