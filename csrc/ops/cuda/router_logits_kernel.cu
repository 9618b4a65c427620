// CUDA kernel of router_logits: cuBLAS through at::linear on float32 (float64) copies of the operands, on the
// current stream. (The router is a small GEMM next to the experts on a GPU; no kernel of our own pays here.)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/common/router_logits_checks.h"

namespace torchmoe::cuda {
namespace {

at::Tensor router_logits_cuda(const at::Tensor& x, const at::Tensor& weight) {
  checks::check_router_logits(x, weight);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto dtype = checks::router_logits_dtype(x, weight);
  return at::linear(x.to(dtype), weight.to(dtype));
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, CUDA, m) {
  m.impl("router_logits", router_logits_cuda);
}

}  // namespace torchmoe::cuda
