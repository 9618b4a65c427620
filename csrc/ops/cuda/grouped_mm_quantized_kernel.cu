// CUDA kernels of torchmoe::grouped_mm_quantized and its backward, correct first: the weight is dequantized to
// the activations' dtype with ATen ops (one float copy of the weight, freed after the call) and the product runs
// on grouped_mm's CUDA kernel (no host sync; counts are checked on the device there).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/common/dequantize.h"
#include "ops/common/grouped_mm_quantized_checks.h"
#include "ops/grouped_mm.h"

namespace torchmoe::cuda {
namespace {

at::Tensor grouped_mm_quantized_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                     const std::optional<at::Tensor>& zeros, const at::Tensor& counts, int64_t bits,
                                     int64_t group_size) {
  checks::check_grouped_mm_quantized_forward(x, qweight, scales, zeros, counts, bits, group_size);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto weight = ops::dequantize_weight(qweight, scales, zeros, bits, group_size, x.scalar_type());
  return ops::grouped_mm(x, weight, counts);
}

at::Tensor grouped_mm_quantized_backward_cuda(const at::Tensor& grad_output, const at::Tensor& qweight,
                                              const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                              const at::Tensor& counts, int64_t bits, int64_t group_size) {
  checks::check_grouped_mm_quantized_backward(grad_output, qweight, scales, zeros, counts, bits, group_size);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const auto weight = ops::dequantize_weight(qweight, scales, zeros, bits, group_size, grad_output.scalar_type());
  return ops::grouped_mm(grad_output, weight.transpose(1, 2).contiguous(), counts);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, CUDA, m) {
  m.impl("grouped_mm_quantized", &grouped_mm_quantized_cuda);
  m.impl("_grouped_mm_quantized_backward", &grouped_mm_quantized_backward_cuda);
}

}  // namespace torchmoe::cuda
