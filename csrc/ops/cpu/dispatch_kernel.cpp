// CPU kernels of dispatch (token rows -> expert buffer rows) and its backward.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>

#include "ops/common/dispatch_checks.h"
#include "ops/cpu/output_cache.h"
#include "ops/cpu/row_ops.h"

namespace torchmoe::cpu {
namespace {

at::Tensor dispatch_cpu(const at::Tensor& x_in, const at::Tensor& dest_in, int64_t num_rows) {
  checks::check_dispatch(x_in, dest_in, c10::SymInt(num_rows));
  const auto x = x_in.contiguous();
  const auto dest = dest_in.contiguous();
  const int64_t N = x.size(0);
  const int64_t d = x.size(1);
  const int64_t k = dest.size(1);

  auto out = cpu::empty_output({num_rows, d}, x.options());
  // Inverse map (serial, over N * k ints): validates dest and lets every output row be written exactly
  // once below, copy or zero, without a separate zero fill.
  const auto src = dispatch_sources(dest.const_data_ptr<int64_t>(), N, k, num_rows, "dispatch");
  if (num_rows == 0 || d == 0) return out;
  const size_t row_bytes = static_cast<size_t>(d) * x.element_size();
  const auto* xp = static_cast<const char*>(x.const_data_ptr());
  auto* op = static_cast<char*>(out.data_ptr());
  const int64_t* sp = src.data();
  at::parallel_for(0, num_rows, row_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      char* o = op + r * static_cast<int64_t>(row_bytes);
      const int64_t n = sp[r];
      if (n >= 0) {
        std::memcpy(o, xp + n * static_cast<int64_t>(row_bytes), row_bytes);
      } else {
        std::memset(o, 0, row_bytes);
      }
    }
  });
  return out;
}

at::Tensor dispatch_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& dest_in) {
  checks::check_dispatch_backward(grad_out_in, dest_in);
  const auto grad_out = grad_out_in.contiguous();
  const auto dest = dest_in.contiguous();
  const int64_t R = grad_out.size(0);
  const int64_t d = grad_out.size(1);
  const int64_t N = dest.size(0);
  const int64_t k = dest.size(1);

  auto dx = cpu::empty_output({N, d}, grad_out.options());
  if (N == 0) return dx;
  const int64_t* dp = dest.const_data_ptr<int64_t>();
  check_dest_values("_dispatch_backward", dp, N, k, R);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "_dispatch_backward", [&] {
    using A = acc_type<scalar_t>;
    const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
    scalar_t* o = dx.data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(d * k), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t* rows = dp + n * k;
        gather_sum_row<scalar_t, false>(o + n * d, g, d, k, [&](int64_t j, int64_t& row, A& w) {
          row = rows[j];
          w = A(1);
        });
      }
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, CPU, m) {
  m.impl("dispatch", dispatch_cpu);
  m.impl("_dispatch_backward", dispatch_backward_cpu);
}

}  // namespace torchmoe::cpu
