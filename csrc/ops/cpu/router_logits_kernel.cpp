// CPU kernel of router_logits: x [N, d] against weight [E, d], both read as stored (float32, bfloat16 or
// float16, converted to float32 in registers) into float32 logits, by the skinny kernels' transposed product.
//
// Why not at::linear(x.float(), weight.float()): at a decode step the router is one pass over its weight, and
// the GEMM at one row read a float32 128 x 2048 weight at about 45 GB/s from cache on a 2-core Zen 4 (22 us),
// after a float32 copy of x and, for a 16-bit weight, of the weight. Here 16-bit weights are read as 16-bit.
// Every logit is one float32 sum in a fixed order (vector lanes along d, then a fixed lane tree), whatever N,
// the thread count and the split: a token's logits do not depend on the batch it came in (on CPUs with AVX-512;
// elsewhere ATen's GEMM computes them).
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "ops/common/router_logits_checks.h"
#include "ops/cpu/parallel.h"
#include "ops/cpu/skinny_gemm.h"

namespace torchmoe::cpu {
namespace {

// Tokens per task, and experts per task (the transposed kernel's group of weight rows).
constexpr int64_t kTaskRows = 16;
constexpr int64_t kTaskExperts = 16;

template <typename Fn>
void with_storage_type(at::ScalarType dtype, const Fn& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: fn(c10::Half{}); break;
  }
}

at::Tensor router_logits_cpu(const at::Tensor& x_in, const at::Tensor& weight_in) {
  checks::check_router_logits(x_in, weight_in);
  const auto out_dtype = checks::router_logits_dtype(x_in, weight_in);
  // float64 (gradcheck), and CPUs without AVX-512, where the transposed kernel is scalar C++: ATen's GEMM on
  // float copies (its sums' order then depends on the batch, as any GEMM's does).
  if (out_dtype == at::kDouble || !skinny_avx512_available()) {
    return at::linear(x_in.to(out_dtype), weight_in.to(out_dtype));
  }
  const int64_t d = weight_in.size(1);
  const int64_t num_experts = weight_in.size(0);
  auto out_sizes = x_in.sizes().vec();
  out_sizes.back() = num_experts;
  auto out = at::empty(out_sizes, x_in.options().dtype(at::kFloat));
  const int64_t n = out.numel() == 0 ? 0 : out.numel() / num_experts;
  if (n == 0) return out;
  if (d == 0) return out.zero_();
  const auto x = x_in.reshape({n, d}).contiguous();
  const auto weight = weight_in.contiguous();
  float* out_data = out.data_ptr<float>();
  const int64_t row_tasks = (n + kTaskRows - 1) / kTaskRows;
  const int64_t expert_tasks = (num_experts + kTaskExperts - 1) / kTaskExperts;
  with_storage_type(x.scalar_type(), [&](auto x_tag) {
    using G = decltype(x_tag);
    with_storage_type(weight.scalar_type(), [&](auto w_tag) {
      using W = decltype(w_tag);
      const G* x_data = x.const_data_ptr<G>();
      const W* w_data = weight.const_data_ptr<W>();
      parallel_for_as_caller(0, row_tasks * expert_tasks, 1, [&](int64_t first, int64_t last) {
        for (int64_t task = first; task < last; ++task) {
          const int64_t r0 = task / expert_tasks * kTaskRows;
          const int64_t e0 = task % expert_tasks * kTaskExperts;
          skinny_mm_transposed_float_out(std::min(kTaskRows, n - r0), d, e0, std::min(num_experts, e0 + kTaskExperts),
                                         x_data + r0 * d, d, w_data, d, out_data + r0 * num_experts, num_experts);
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, CPU, m) {
  m.impl("router_logits", router_logits_cpu);
}

}  // namespace torchmoe::cpu
