// Row-moving kernels shared by dispatch and combine on CUDA.
//
// A "team" of L lanes (a power of two, at most a warp) moves one row with the widest aligned access
// the row allows (16 bytes when it can). Sums over a token's k rows run in j order in float32
// (float64 for double), and dot products reduce over the team in a fixed butterfly, so results are
// the same on every run. Rows of the expert buffer are owned through `src` (the largest (token, choice)
// that names the row, found with integer atomicMax, which does not depend on order) or `cnt` (how many
// name it); no float atomics anywhere.
#pragma once

#include "ops/cuda/cuda_common.cuh"

namespace torchmoe::cuda::rows {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

struct Team {
  int L;        // lanes per row
  int lane;     // lane within the team
  int team;     // team within the block
  int teams;    // teams per block
  unsigned mask;  // the team's lanes, for shuffles

  __device__ __forceinline__ explicit Team(int lanes) : L(lanes) {
    lane = static_cast<int>(threadIdx.x) & (L - 1);
    team = static_cast<int>(threadIdx.x) / L;
    teams = static_cast<int>(blockDim.x) / L;
    const int first = (static_cast<int>(threadIdx.x) & 31) & ~(L - 1);
    mask = L == 32 ? 0xffffffffu : (((1u << L) - 1u) << first);
  }
  __device__ __forceinline__ int64_t first_row() const { return static_cast<int64_t>(blockIdx.x) * teams + team; }
  __device__ __forceinline__ int64_t row_stride() const { return static_cast<int64_t>(gridDim.x) * teams; }
  template <typename A>
  __device__ __forceinline__ A sum(A v) const {
    for (int o = L / 2; o > 0; o >>= 1) v += __shfl_xor_sync(mask, v, o, L);
    return v;
  }
};

// Lanes per row for rows of `nvec` accesses: enough to cover the row, at most a warp.
inline int team_lanes(int64_t nvec) {
  int L = 1;
  while (L < 32 && L < nvec) L *= 2;
  return L;
}

inline int64_t team_grid(int64_t rows, int L) {
  return capped_grid(ceil_div(rows, kThreads / L), 8);
}

// src[dest[f]] = max f over kept slots (src preset to -1), cnt[dest[f]] += 1; each when given.
static __global__ void __launch_bounds__(kThreads)
    owner_map_kernel(const int64_t* dest, int64_t n, int64_t num_rows, long long* src, int* cnt) {
  for (int64_t f = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; f < n;
       f += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = dest[f];
    if (r < 0) continue;
    CUDA_KERNEL_ASSERT(r < num_rows && "torchmoe: dest out of range [-1, num_rows)");
    if (src != nullptr) atomicMax(src + r, static_cast<long long>(f));
    if (cnt != nullptr) atomicAdd(cnt + r, 1);
  }
}

// out[n] = sum_j w[n, j] * rows[dest[n, j]] over kept slots (w = 1 when unweighted), in j order.
template <typename T, typename Wt, int VE, bool WEIGHTED>
__global__ void __launch_bounds__(kThreads)
    gather_sum_kernel(const T* rows_in, const int64_t* dest, const Wt* w, T* out, int64_t N, int k, int64_t d,
                      int64_t num_rows, int L) {
  using A = acc_t<T>;
  using V = Vec<T, VE>;
  const Team tm(L);
  const int64_t nvec = d / VE;
  constexpr int U = VE >= 4 ? 2 : kUnroll;
  for (int64_t n = tm.first_row(); n < N; n += tm.row_stride()) {
    const int64_t* dn = dest + n * k;
    V* yrow = reinterpret_cast<V*>(out + n * d);
    for (int64_t v0 = tm.lane; v0 < nvec; v0 += static_cast<int64_t>(L) * U) {
      A acc[U][VE];
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int e = 0; e < VE; ++e) acc[u][e] = 0;
      }
      for (int j = 0; j < k; ++j) {
        const int64_t r = dn[j];
        if (r < 0) continue;
        CUDA_KERNEL_ASSERT(r < num_rows && "torchmoe: dest out of range [-1, num_rows)");
        const A wj = WEIGHTED ? static_cast<A>(w[n * k + j]) : A(1);
        const V* src = reinterpret_cast<const V*>(rows_in + r * d);
        V val[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t v = v0 + static_cast<int64_t>(u) * L;
          if (v < nvec) val[u] = src[v];
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
          for (int e = 0; e < VE; ++e) {
            if constexpr (WEIGHTED) {
              acc[u][e] += wj * static_cast<A>(val[u].v[e]);
            } else {
              acc[u][e] += static_cast<A>(val[u].v[e]);
            }
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t v = v0 + static_cast<int64_t>(u) * L;
        if (v < nvec) {
          V o;
#pragma unroll
          for (int e = 0; e < VE; ++e) o.v[e] = static_cast<T>(acc[u][e]);
          yrow[v] = o;
        }
      }
    }
  }
}

// Calls f(std::integral_constant<int, VE>) with VE = elements per 16-byte access where the rows and
// pointers allow it, else 1.
template <typename T, typename F>
void with_vec(int64_t d, std::initializer_list<const void*> ptrs, F&& f) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  if (common_vec_bytes(d * static_cast<int64_t>(sizeof(T)), ptrs) == 16) {
    f(std::integral_constant<int, kVec>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

}  // namespace torchmoe::cuda::rows
