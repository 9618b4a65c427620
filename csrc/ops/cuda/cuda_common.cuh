// Helpers shared by torchmoe's CUDA kernels: accumulation types, vector widths, deterministic
// reductions and the launch boilerplate every entry point uses.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

namespace torchmoe::cuda {

// Arithmetic type for a storage type: float for half/bfloat16/float, double for double.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The widest access (16, 8, 4, 2 or 1 bytes) that divides the row length in bytes and every pointer,
// so a row can be moved with that access width and no tail.
inline int common_vec_bytes(int64_t row_bytes, std::initializer_list<const void*> ptrs) {
  int v = 16;
  while (v > 1) {
    bool ok = row_bytes % v == 0;
    for (const void* p : ptrs) {
      ok = ok && (reinterpret_cast<uintptr_t>(p) % v == 0);
    }
    if (ok) break;
    v /= 2;
  }
  return v;
}

// An attribute of the current device (cudaDeviceGetAttribute is a cheap, cached query; this avoids
// ATen/cuda/CUDAContext.h, which needs the cuBLAS/cuSPARSE headers).
inline int device_attribute(cudaDeviceAttr attr) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, c10::cuda::current_device()));
  return v;
}

inline int num_sms() { return device_attribute(cudaDevAttrMultiProcessorCount); }

// A bounded grid for grid-stride loops: enough blocks to fill the device several times over.
inline int64_t capped_grid(int64_t blocks_needed, int blocks_per_sm = 16) {
  const int64_t cap = static_cast<int64_t>(num_sms()) * blocks_per_sm;
  return std::max<int64_t>(1, std::min(blocks_needed, cap));
}

// Fixed-size vector of T moved with one aligned access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Raw storage of `B` bytes moved with one access (B in 1, 2, 4, 8, 16).
template <int B>
struct RawOf;
template <>
struct RawOf<1> {
  using type = uint8_t;
};
template <>
struct RawOf<2> {
  using type = uint16_t;
};
template <>
struct RawOf<4> {
  using type = uint32_t;
};
template <>
struct RawOf<8> {
  using type = uint2;
};
template <>
struct RawOf<16> {
  using type = uint4;
};

// Deterministic sum over the 32 lanes of a warp (butterfly: every lane gets the same bits).
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const A w = __shfl_xor_sync(0xffffffffu, v, o);
    v = (w > v || w != w) ? w : v;  // NaN wins, as in a softmax over a row holding NaN
  }
  return v;
}

// Sum over a group of `group` threads (a power of two): within a warp by shuffles; for groups larger
// than a warp through `scratch` (one slot per warp of the block), summed in warp order, so the
// result is the same on every run. All threads of the block must call it when group > 32.
template <typename A>
__device__ __forceinline__ A group_sum(A v, int group, A* scratch) {
  if (group <= 32) {
    for (int o = group / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
  }
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warps_per_group = group / 32;
  const int first = (warp / warps_per_group) * warps_per_group;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  A s = 0;
  for (int w = 0; w < warps_per_group; ++w) s += scratch[first + w];
  return s;
}

// Max over a group of threads, like group_sum (NaN wins).
template <typename A>
__device__ __forceinline__ A group_max(A v, int group, A* scratch) {
  if (group <= 32) {
    for (int o = group / 2; o > 0; o >>= 1) {
      const A w = __shfl_xor_sync(0xffffffffu, v, o);
      v = (w > v || w != w) ? w : v;
    }
    return v;
  }
  v = warp_max(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warps_per_group = group / 32;
  const int first = (warp / warps_per_group) * warps_per_group;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  A m = scratch[first];
  for (int w = 1; w < warps_per_group; ++w) {
    const A x = scratch[first + w];
    m = (x > m || x != x) ? x : m;
  }
  return m;
}

template <typename A>
__device__ __forceinline__ A exp_acc(A x) {
  if constexpr (std::is_same_v<A, double>) {
    return ::exp(x);
  } else {
    return ::expf(x);
  }
}

}  // namespace torchmoe::cuda

// Launch boilerplate: device guard on the tensor's device and its current stream.
#define TORCHMOE_CUDA_SETUP(tensor)                   \
  const c10::cuda::CUDAGuard device_guard_((tensor).device()); \
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream()
