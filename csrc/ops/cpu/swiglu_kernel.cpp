// CPU kernels of swiglu (silu(gate) * up) and its backward.
//
// Threads take chunks small enough to stay in L2 and run ATen's vectorised silu / silu_backward / mul on
// them, the second step in place on the first one's result: each element is read and written once from
// memory, into an output from the block cache (no page faults), and the arithmetic - with its rounding for
// 16-bit dtypes - is exactly that of the eager composite F.silu(gate) * up and of its autograd.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "ops/common/swiglu_checks.h"
#include "ops/cpu/output_cache.h"
#include "ops/cpu/parallel.h"

namespace torchmoe::cpu {
namespace {

constexpr int64_t kChunkBytes = int64_t{1} << 18;

// fn(begin, length) over [0, numel) in chunks, on the ATen thread pool.
template <typename Fn>
void for_chunks(int64_t numel, int64_t element_size, const Fn& fn) {
  const int64_t chunk = kChunkBytes / element_size;
  parallel_for_as_caller(0, (numel + chunk - 1) / chunk, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) fn(c * chunk, std::min(chunk, numel - c * chunk));
  });
}

at::Tensor swiglu_cpu(const at::Tensor& gate_in, const at::Tensor& up_in) {
  checks::check_swiglu(gate_in, up_in);
  auto out = cpu::empty_output(gate_in.sizes(), gate_in.options());
  if (out.numel() * out.element_size() <= kChunkBytes) {  // one chunk (decode sizes): no views, no pool
    at::silu_out(out, gate_in);
    out.mul_(up_in);
    return out;
  }
  const auto gate = gate_in.contiguous().view(-1);
  const auto up = up_in.contiguous().view(-1);
  auto flat = out.view(-1);
  for_chunks(flat.numel(), flat.element_size(), [&](int64_t begin, int64_t length) {
    auto o = flat.narrow(0, begin, length);
    at::silu_out(o, gate.narrow(0, begin, length));
    o.mul_(up.narrow(0, begin, length));
  });
  return out;
}

// grad_gate = silu_backward(grad_out * up, gate), grad_up = silu(gate) * grad_out: the products autograd
// forms for F.silu(gate) * up, in the same order.
std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& gate_in,
                                                       const at::Tensor& up_in) {
  checks::check_swiglu_backward(grad_out_in, gate_in, up_in);
  const auto grad_out = grad_out_in.contiguous().view(-1);
  const auto gate = gate_in.contiguous().view(-1);
  const auto up = up_in.contiguous().view(-1);
  auto grad_gate = cpu::empty_output(gate_in.sizes(), gate_in.options());
  auto grad_up = cpu::empty_output(gate_in.sizes(), gate_in.options());
  auto gg = grad_gate.view(-1);
  auto gu = grad_up.view(-1);
  for_chunks(gg.numel(), gg.element_size(), [&](int64_t begin, int64_t length) {
    const auto g = grad_out.narrow(0, begin, length);
    const auto x = gate.narrow(0, begin, length);
    auto dg = gg.narrow(0, begin, length);
    at::mul_out(dg, g, up.narrow(0, begin, length));
    at::silu_backward_out(dg, dg, x);
    auto du = gu.narrow(0, begin, length);
    at::silu_out(du, x);
    du.mul_(g);
  });
  return {grad_gate, grad_up};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, CPU, m) {
  m.impl("swiglu", swiglu_cpu);
  m.impl("_swiglu_backward", swiglu_backward_cpu);
}

}  // namespace torchmoe::cpu
