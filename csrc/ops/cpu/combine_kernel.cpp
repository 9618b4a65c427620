// CPU kernels of combine (weighted gather of expert rows back to tokens) and its backward.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "ops/common/dispatch_checks.h"
#include "ops/cpu/output_cache.h"
#include "ops/cpu/row_ops.h"

namespace torchmoe::cpu {
namespace {

// The weights in the accumulation type of expert_out (float for half/bfloat16), contiguous. N * k values.
at::Tensor acc_weights(const at::Tensor& weights, at::ScalarType acc) {
  return weights.to(acc).contiguous();
}

at::Tensor combine_cpu(const at::Tensor& expert_out_in, const at::Tensor& dest_in, const at::Tensor& weights_in) {
  checks::check_combine(expert_out_in, dest_in, weights_in);
  const auto expert_out = expert_out_in.contiguous();
  const auto dest = dest_in.contiguous();
  const int64_t R = expert_out.size(0);
  const int64_t d = expert_out.size(1);
  const int64_t N = dest.size(0);
  const int64_t k = dest.size(1);

  auto y = cpu::empty_output({N, d}, expert_out.options());
  if (N == 0) return y;
  const int64_t* dp = dest.const_data_ptr<int64_t>();
  check_dest_values("combine", dp, N, k, R);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, expert_out.scalar_type(), "combine", [&] {
    using A = acc_type<scalar_t>;
    const auto weights = acc_weights(weights_in, c10::CppTypeToScalarType<A>::value);
    const A* wp = weights.const_data_ptr<A>();
    const scalar_t* e = expert_out.const_data_ptr<scalar_t>();
    scalar_t* o = y.data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(d * k), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t* rows = dp + n * k;
        const A* w = wp + n * k;
        gather_sum_row<scalar_t, true>(o + n * d, e, d, k, [&](int64_t j, int64_t& row, A& wj) {
          row = rows[j];
          wj = w[j];
        });
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> combine_backward_cpu(const at::Tensor& grad_output_in,
                                                        const at::Tensor& expert_out_in, const at::Tensor& dest_in,
                                                        const at::Tensor& weights_in) {
  checks::check_combine_backward(grad_output_in, expert_out_in, dest_in, weights_in);
  const auto expert_out = expert_out_in.contiguous();
  const auto grad_output = grad_output_in.to(expert_out.scalar_type()).contiguous();
  const auto dest = dest_in.contiguous();
  const int64_t R = expert_out.size(0);
  const int64_t d = expert_out.size(1);
  const int64_t N = dest.size(0);
  const int64_t k = dest.size(1);
  const int64_t* dp = dest.const_data_ptr<int64_t>();

  // Rows -> the slots that read them (validates dest). A row read by several slots gets their sum, in
  // slot order; with a plan's dest every row has at most one.
  const RowSlots rs = row_slots(dp, N, k, R, "_combine_backward");

  auto grad_expert_out = cpu::empty_output({R, d}, expert_out.options());
  at::Tensor grad_weights;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, expert_out.scalar_type(), "_combine_backward", [&] {
    using A = acc_type<scalar_t>;
    const auto weights = acc_weights(weights_in, c10::CppTypeToScalarType<A>::value);
    const A* wp = weights.const_data_ptr<A>();
    const scalar_t* g = grad_output.const_data_ptr<scalar_t>();
    const scalar_t* e = expert_out.const_data_ptr<scalar_t>();
    const int64_t* off = rs.offsets.data();
    const int64_t* slots = rs.slots.data();

    // grad_expert_out[r] = sum over slots s reading r of weights[s] * grad_output[s / k]; each row once.
    scalar_t* ge = grad_expert_out.data_ptr<scalar_t>();
    at::parallel_for(0, R, row_grain(d), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t* s = slots + off[r];
        gather_sum_row<scalar_t, true>(ge + r * d, g, d, off[r + 1] - off[r], [&](int64_t i, int64_t& row, A& w) {
          row = s[i] / k;
          w = wp[s[i]];
        });
      }
    });

    // grad_weights[n, j] = <grad_output[n], expert_out[dest[n, j]]>, 0 for dropped slots.
    auto gw = at::empty({N, k}, weights.options());
    A* gwp = gw.data_ptr<A>();
    at::parallel_for(0, N, row_grain(d * k), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t j = 0; j < k; ++j) {
          const int64_t r = dp[n * k + j];
          gwp[n * k + j] = r < 0 ? A(0) : dot_row<scalar_t>(g + n * d, e + r * d, d);
        }
      }
    });
    grad_weights = gw.to(weights_in.scalar_type());
  });
  return {grad_expert_out, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, CPU, m) {
  m.impl("combine", combine_cpu);
  m.impl("_combine_backward", combine_backward_cpu);
}

}  // namespace torchmoe::cpu
