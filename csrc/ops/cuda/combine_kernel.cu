// CUDA kernels of torchmoe::combine and its backward.
//
// Forward: y[n] = sum_j weights[n, j] * expert_out[dest[n, j]], one team of lanes per token, the k rows
// summed in j order in float32 (float64 for double), 16-byte accesses where the rows allow.
// Backward: per token and choice, grad_weights[n, j] = <grad_output[n], expert_out[dest[n, j]]> (a fixed
// reduction over the team) and grad_expert_out[dest[n, j]] = weights[n, j] * grad_output[n], written by
// the single slot that names the row. Rows no slot names are zero; a row named by several slots (never
// the case for a route_plan's dest) gets their sum in slot order from a second kernel. No float
// atomics, so both results are the same on every run. dest >= rows of expert_out stops the kernel with
// a device assertion (as ATen's index kernels do).
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

template <typename T, typename Wt, int VE>
__global__ void __launch_bounds__(kThreads)
    combine_bwd_kernel(const T* gy, const T* eo, const int64_t* dest, const Wt* w, const int* cnt, T* geo, Wt* gw,
                       int64_t N, int k, int64_t d, int64_t R, int L) {
  using A = acc_t<T>;
  using V = Vec<T, VE>;
  constexpr int U = VE >= 4 ? 2 : 4;
  const Team tm(L);
  const int64_t nvec = d / VE;
  for (int64_t n = tm.first_row(); n < N; n += tm.row_stride()) {
    const V* gyr = reinterpret_cast<const V*>(gy + n * d);
    for (int j = 0; j < k; ++j) {
      const int64_t f = n * k + j;
      const int64_t r = dest[f];
      if (r < 0) {
        if (tm.lane == 0) gw[f] = static_cast<Wt>(0);
        continue;
      }
      CUDA_KERNEL_ASSERT(r < R && "torchmoe::_combine_backward: dest out of range [-1, rows of expert_out)");
      const A wj = static_cast<A>(w[f]);
      const bool own = cnt[r] == 1;
      const V* er = reinterpret_cast<const V*>(eo + r * d);
      V* gr = reinterpret_cast<V*>(geo + r * d);
      A dot = 0;
      for (int64_t v0 = tm.lane; v0 < nvec; v0 += static_cast<int64_t>(L) * U) {
        V a[U], b[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t v = v0 + static_cast<int64_t>(u) * L;
          if (v < nvec) {
            a[u] = gyr[v];
            b[u] = er[v];
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t v = v0 + static_cast<int64_t>(u) * L;
          if (v < nvec) {
            V o;
#pragma unroll
            for (int e = 0; e < VE; ++e) {
              const A g = static_cast<A>(a[u].v[e]);
              dot += g * static_cast<A>(b[u].v[e]);
              o.v[e] = static_cast<T>(wj * g);
            }
            if (own) gr[v] = o;
          }
        }
      }
      dot = tm.sum(dot);
      if (tm.lane == 0) gw[f] = static_cast<Wt>(dot);
    }
  }
}

// Rows of grad_expert_out that no slot or several slots name.
template <typename T, typename Wt, int VE>
__global__ void __launch_bounds__(kThreads)
    combine_bwd_rows_kernel(const T* gy, const int64_t* dest, const Wt* w, const int* cnt, T* geo, int64_t N, int k,
                            int64_t d, int64_t R, int L) {
  using A = acc_t<T>;
  using V = Vec<T, VE>;
  const Team tm(L);
  const int64_t nvec = d / VE;
  for (int64_t r = tm.first_row(); r < R; r += tm.row_stride()) {
    const int c = cnt[r];
    if (c == 1) continue;
    V* gr = reinterpret_cast<V*>(geo + r * d);
    for (int64_t v = tm.lane; v < nvec; v += L) {
      A acc[VE];
#pragma unroll
      for (int e = 0; e < VE; ++e) acc[e] = 0;
      if (c > 1) {
        for (int64_t f = 0; f < N * k; ++f) {
          if (dest[f] != r) continue;
          const A wf = static_cast<A>(w[f]);
          const V g = reinterpret_cast<const V*>(gy + (f / k) * d)[v];
#pragma unroll
          for (int e = 0; e < VE; ++e) acc[e] += wf * static_cast<A>(g.v[e]);
        }
      }
      V o;
#pragma unroll
      for (int e = 0; e < VE; ++e) o.v[e] = static_cast<T>(acc[e]);
      gr[v] = o;
    }
  }
}

// Weights in the kernel: expert_out's dtype when they match, else converted to the accumulation type.
at::Tensor kernel_weights(const at::Tensor& weights, at::ScalarType t) {
  if (weights.scalar_type() == t) return weights.contiguous();
  return weights.to(t == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

template <typename scalar_t, typename F>
void with_weight_type(const at::Tensor& w, F&& f) {
  using A = acc_t<scalar_t>;
  if (w.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value) {
    f(scalar_t{});
  } else {
    f(A{});
  }
}

at::Tensor combine_cuda(const at::Tensor& expert_out_in, const at::Tensor& dest_in, const at::Tensor& weights_in) {
  checks::check_combine(expert_out_in, dest_in, weights_in);
  TORCHMOE_CUDA_SETUP(expert_out_in);
  const at::Tensor eo = expert_out_in.contiguous();
  const at::Tensor dest = dest_in.to(at::kLong).contiguous();
  const at::Tensor w = kernel_weights(weights_in, eo.scalar_type());
  const int64_t R = eo.size(0), d = eo.size(1), N = dest.size(0), k = dest.size(1);
  at::Tensor y = at::empty({N, d}, eo.options());
  if (N == 0 || d == 0) return y;
  if (k == 0) return y.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, eo.scalar_type(), "combine_cuda", [&] {
    with_weight_type<scalar_t>(w, [&](auto wtag) {
      using Wt = decltype(wtag);
      const scalar_t* e = eo.const_data_ptr<scalar_t>();
      scalar_t* o = y.mutable_data_ptr<scalar_t>();
      rows::with_vec<scalar_t>(d, {e, o}, [&](auto vec) {
        constexpr int VE = decltype(vec)::value;
        const int L = rows::team_lanes(d / VE);
        rows::gather_sum_kernel<scalar_t, Wt, VE, true><<<rows::team_grid(N, L), kThreads, 0, stream>>>(
            e, dest.const_data_ptr<int64_t>(), w.const_data_ptr<Wt>(), o, N, static_cast<int>(k), d, R, L);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> combine_backward_cuda(const at::Tensor& grad_output_in,
                                                         const at::Tensor& expert_out_in, const at::Tensor& dest_in,
                                                         const at::Tensor& weights_in) {
  checks::check_combine_backward(grad_output_in, expert_out_in, dest_in, weights_in);
  TORCHMOE_CUDA_SETUP(expert_out_in);
  const at::Tensor eo = expert_out_in.contiguous();
  const at::Tensor gy = grad_output_in.to(eo.scalar_type()).contiguous();
  const at::Tensor dest = dest_in.to(at::kLong).contiguous();
  const at::Tensor w = kernel_weights(weights_in, eo.scalar_type());
  const int64_t R = eo.size(0), d = eo.size(1), N = dest.size(0), k = dest.size(1);
  at::Tensor geo = at::empty({R, d}, eo.options());
  at::Tensor gw = at::empty({N, k}, w.options());
  auto result = [&]() -> std::tuple<at::Tensor, at::Tensor> {
    return {geo, gw.scalar_type() == weights_in.scalar_type() ? gw : gw.to(weights_in.scalar_type())};
  };
  if (R * d == 0 && N * k == 0) return result();
  if (d == 0) {
    gw.zero_();
    return result();
  }
  at::Tensor cnt = at::zeros({R}, dest.options().dtype(at::kInt));
  if (N * k > 0) {
    rows::owner_map_kernel<<<capped_grid(ceil_div(N * k, kThreads)), kThreads, 0, stream>>>(
        dest.const_data_ptr<int64_t>(), N * k, R, nullptr, cnt.mutable_data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, eo.scalar_type(), "combine_backward_cuda", [&] {
    with_weight_type<scalar_t>(w, [&](auto wtag) {
      using Wt = decltype(wtag);
      const scalar_t* g = gy.const_data_ptr<scalar_t>();
      const scalar_t* e = eo.const_data_ptr<scalar_t>();
      scalar_t* ge = geo.mutable_data_ptr<scalar_t>();
      rows::with_vec<scalar_t>(d, {g, e, ge}, [&](auto vec) {
        constexpr int VE = decltype(vec)::value;
        const int L = rows::team_lanes(d / VE);
        if (N * k > 0) {
          combine_bwd_kernel<scalar_t, Wt, VE><<<rows::team_grid(N, L), kThreads, 0, stream>>>(
              g, e, dest.const_data_ptr<int64_t>(), w.const_data_ptr<Wt>(), cnt.const_data_ptr<int>(), ge,
              gw.mutable_data_ptr<Wt>(), N, static_cast<int>(k), d, R, L);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        if (R > 0) {
          combine_bwd_rows_kernel<scalar_t, Wt, VE><<<rows::team_grid(R, L), kThreads, 0, stream>>>(
              g, dest.const_data_ptr<int64_t>(), w.const_data_ptr<Wt>(), cnt.const_data_ptr<int>(), ge, N,
              static_cast<int>(k), d, R, L);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
    });
  });
  return result();
}

}  // namespace
}  // namespace torchmoe::cuda

TORCH_LIBRARY_IMPL(torchmoe, CUDA, m) {
  m.impl("combine", &torchmoe::cuda::combine_cuda);
  m.impl("_combine_backward", &torchmoe::cuda::combine_backward_cuda);
}
