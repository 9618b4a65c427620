// CUDA kernels of torchmoe::dispatch and its backward.
//
// Forward: every buffer row gets an owner, the largest (token, choice) naming it (integer atomicMax,
// independent of order); each token then reads its row once and writes it to the rows it owns, and rows
// nobody names are zeroed. So every row is written exactly once, with 16-byte accesses where the row
// allows. Backward: dx[n] = sum_j grad_out[dest[n, j]], summed in j order in float32 (float64 for
// double). A dest value >= num_rows stops the kernel with a device assertion (as ATen's index kernels
// do), since checking it on the host would need a synchronisation.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "ops/common/checks.h"
#include "ops/common/dispatch_checks.h"
#include "ops/cuda/row_kernels.cuh"

namespace torchmoe::cuda {
namespace {

using rows::Team;
using rows::kThreads;
using rows::kUnroll;

template <int VB>
__global__ void __launch_bounds__(kThreads)
    dispatch_scatter_kernel(const unsigned char* x, const int64_t* dest, const long long* src, unsigned char* out,
                            int64_t N, int k, int64_t row_bytes, int L) {
  using V = typename RawOf<VB>::type;
  const Team tm(L);
  const int64_t nvec = row_bytes / VB;
  for (int64_t n = tm.first_row(); n < N; n += tm.row_stride()) {
    const V* xr = reinterpret_cast<const V*>(x + n * row_bytes);
    const int64_t* dn = dest + n * k;
    for (int64_t v0 = tm.lane; v0 < nvec; v0 += static_cast<int64_t>(L) * kUnroll) {
      V buf[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + static_cast<int64_t>(u) * L;
        if (v < nvec) buf[u] = xr[v];
      }
      for (int j = 0; j < k; ++j) {
        const int64_t r = dn[j];
        if (r < 0 || src[r] != n * k + j) continue;
        V* orow = reinterpret_cast<V*>(out + r * row_bytes);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t v = v0 + static_cast<int64_t>(u) * L;
          if (v < nvec) orow[v] = buf[u];
        }
      }
    }
  }
}

template <int VB>
__global__ void __launch_bounds__(kThreads)
    zero_unowned_rows_kernel(const long long* src, unsigned char* out, int64_t num_rows, int64_t row_bytes, int L) {
  using V = typename RawOf<VB>::type;
  const Team tm(L);
  const int64_t nvec = row_bytes / VB;
  for (int64_t r = tm.first_row(); r < num_rows; r += tm.row_stride()) {
    if (src[r] >= 0) continue;
    V* orow = reinterpret_cast<V*>(out + r * row_bytes);
    for (int64_t v = tm.lane; v < nvec; v += L) orow[v] = V{};
  }
}

template <typename F>
void with_vec_bytes(int vb, F&& f) {
  switch (vb) {
    case 16: return f(std::integral_constant<int, 16>{});
    case 8: return f(std::integral_constant<int, 8>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 2: return f(std::integral_constant<int, 2>{});
    default: return f(std::integral_constant<int, 1>{});
  }
}

at::Tensor dispatch_cuda(const at::Tensor& x_in, const at::Tensor& dest_in, int64_t num_rows) {
  checks::check_dispatch(x_in, dest_in, num_rows);
  TORCHMOE_CUDA_SETUP(x_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dest = dest_in.to(at::kLong).contiguous();
  const int64_t N = x.size(0), d = x.size(1), k = dest.size(1);
  at::Tensor out = at::empty({num_rows, d}, x.options());
  if (num_rows == 0 || d == 0) return out;

  at::Tensor src = at::empty({num_rows}, dest.options());
  C10_CUDA_CHECK(cudaMemsetAsync(src.mutable_data_ptr(), 0xff, num_rows * sizeof(int64_t), stream));
  auto* src_ptr = reinterpret_cast<long long*>(src.mutable_data_ptr<int64_t>());
  if (N * k > 0) {
    rows::owner_map_kernel<<<capped_grid(ceil_div(N * k, kThreads)), kThreads, 0, stream>>>(
        dest.const_data_ptr<int64_t>(), N * k, num_rows, src_ptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t row_bytes = d * static_cast<int64_t>(x.element_size());
  const auto* xb = static_cast<const unsigned char*>(x.const_data_ptr());
  auto* ob = static_cast<unsigned char*>(out.mutable_data_ptr());
  const int vb = common_vec_bytes(row_bytes, {xb, ob});
  const int L = rows::team_lanes(row_bytes / vb);
  with_vec_bytes(vb, [&](auto vbc) {
    constexpr int VB = decltype(vbc)::value;
    if (N * k > 0) {
      dispatch_scatter_kernel<VB><<<rows::team_grid(N, L), kThreads, 0, stream>>>(
          xb, dest.const_data_ptr<int64_t>(), src_ptr, ob, N, static_cast<int>(k), row_bytes, L);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    zero_unowned_rows_kernel<VB><<<rows::team_grid(num_rows, L), kThreads, 0, stream>>>(src_ptr, ob, num_rows,
                                                                                          row_bytes, L);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor dispatch_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& dest_in) {
  checks::check_dispatch_backward(grad_out_in, dest_in);
  TORCHMOE_CUDA_SETUP(grad_out_in);
  const at::Tensor gout = grad_out_in.contiguous();
  const at::Tensor dest = dest_in.to(at::kLong).contiguous();
  const int64_t R = gout.size(0), d = gout.size(1), N = dest.size(0), k = dest.size(1);
  at::Tensor dx = at::empty({N, d}, gout.options());
  if (N == 0 || d == 0) return dx;
  if (k == 0) return dx.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gout.scalar_type(), "dispatch_backward_cuda", [&] {
    const scalar_t* g = gout.const_data_ptr<scalar_t>();
    scalar_t* o = dx.mutable_data_ptr<scalar_t>();
    rows::with_vec<scalar_t>(d, {g, o}, [&](auto vec) {
      constexpr int VE = decltype(vec)::value;
      const int L = rows::team_lanes(d / VE);
      rows::gather_sum_kernel<scalar_t, scalar_t, VE, false><<<rows::team_grid(N, L), kThreads, 0, stream>>>(
          g, dest.const_data_ptr<int64_t>(), nullptr, o, N, static_cast<int>(k), d, R, L);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return dx;
}

}  // namespace
}  // namespace torchmoe::cuda

TORCH_LIBRARY_IMPL(torchmoe, CUDA, m) {
  m.impl("dispatch", &torchmoe::cuda::dispatch_cuda);
  m.impl("_dispatch_backward", &torchmoe::cuda::dispatch_backward_cuda);
}
