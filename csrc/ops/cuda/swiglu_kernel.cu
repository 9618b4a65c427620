// CUDA kernels of swiglu (silu(gate) * up) and its backward, composed of ATen's elementwise kernels on the
// current stream, the second step of each product in place: the arithmetic and rounding of the eager
// composite F.silu(gate) * up and of its autograd, with one allocation per output.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "ops/common/swiglu_checks.h"

namespace torchmoe::cuda {
namespace {

at::Tensor swiglu_cuda(const at::Tensor& gate, const at::Tensor& up) {
  checks::check_swiglu(gate, up);
  const c10::cuda::CUDAGuard device_guard(gate.device());
  auto out = at::silu(gate.contiguous());
  out.mul_(up);
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cuda(const at::Tensor& grad_out, const at::Tensor& gate,
                                                        const at::Tensor& up) {
  checks::check_swiglu_backward(grad_out, gate, up);
  const c10::cuda::CUDAGuard device_guard(gate.device());
  auto grad_gate = at::mul(grad_out, up).contiguous();
  at::silu_backward_out(grad_gate, grad_gate, gate);
  auto grad_up = at::silu(gate.contiguous());
  grad_up.mul_(grad_out);
  return {grad_gate, grad_up};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, CUDA, m) {
  m.impl("swiglu", swiglu_cuda);
  m.impl("_swiglu_backward", swiglu_backward_cuda);
}

}  // namespace torchmoe::cuda
