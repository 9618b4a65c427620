// Totally ordered selection keys for topk_gating on CUDA.
//
// A key packs a selection value and the expert index so that "larger key" means "larger value, then
// lower index" (DESIGN.md's order: descending score, ties to the lower expert index). NaN ranks above
// every number (as torch.sort does) and -0 equals +0. The all-zero key is below every real key and
// marks padding and experts already taken, so an argmax over keys needs no separate index compare.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace torchmoe::cuda {

// Order-preserving map of a float's bits to an unsigned integer.
__device__ __forceinline__ uint32_t ordered_bits(float v) {
  if (v != v) return 0xffffffffu;  // every NaN ranks first
  if (v == 0.f) v = 0.f;           // -0 == +0
  const uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ uint64_t ordered_bits(double v) {
  if (v != v) return 0xffffffffffffffffull;
  if (v == 0.0) v = 0.0;
  const uint64_t u = static_cast<uint64_t>(__double_as_longlong(v));
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

// 32-bit key for 16-bit logits compared as they are: (ordered 16-bit value << 16) | (0xffff - index).
// Exact, since half and bfloat16 values fit in 16 bits. Needs E <= 65535.
struct Key32 {
  using T = uint32_t;
  static __device__ __forceinline__ T zero() { return 0u; }
  template <int EXP_INF>  // |bits| above this is NaN: 0x7c00 for half, 0x7f80 for bfloat16
  static __device__ __forceinline__ T from_bits16(uint32_t u, int idx) {
    const uint32_t a = u & 0x7fffu;
    u = a > static_cast<uint32_t>(EXP_INF) ? 0x7fffu : (a == 0u ? 0u : u);
    const uint32_t k16 = (u & 0x8000u) ? (~u & 0xffffu) : (u | 0x8000u);
    return (k16 << 16) | (0xffffu - static_cast<uint32_t>(idx));
  }
  static __device__ __forceinline__ int index(T k) { return static_cast<int>(0xffffu - (k & 0xffffu)); }
  // The 16-bit storage bits of the value in a key.
  static __device__ __forceinline__ uint16_t value_bits(T k) {
    const uint32_t k16 = k >> 16;
    return static_cast<uint16_t>((k16 & 0x8000u) ? (k16 ^ 0x8000u) : (~k16 & 0xffffu));
  }
  static __device__ __forceinline__ T max(T a, T b) { return a > b ? a : b; }
  static __device__ __forceinline__ T min(T a, T b) { return a < b ? a : b; }
  static __device__ __forceinline__ T warp_max(T k) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    return __reduce_max_sync(0xffffffffu, k);
#else
    for (int o = 16; o > 0; o >>= 1) k = max(k, __shfl_xor_sync(0xffffffffu, k, o));
    return k;
#endif
  }
};

// 64-bit key for float selection values: (ordered float bits << 32) | (0xffffffff - index).
struct Key64 {
  using T = uint64_t;
  static __device__ __forceinline__ T zero() { return 0ull; }
  static __device__ __forceinline__ T make(float v, int idx) {
    return (static_cast<uint64_t>(ordered_bits(v)) << 32) | (0xffffffffu - static_cast<uint32_t>(idx));
  }
  static __device__ __forceinline__ int index(T k) {
    return static_cast<int>(0xffffffffu - static_cast<uint32_t>(k & 0xffffffffull));
  }
  static __device__ __forceinline__ float value(T k) {
    const uint32_t o = static_cast<uint32_t>(k >> 32);
    return __uint_as_float((o & 0x80000000u) ? (o ^ 0x80000000u) : ~o);
  }
  static __device__ __forceinline__ T max(T a, T b) { return a > b ? a : b; }
  static __device__ __forceinline__ T min(T a, T b) { return a < b ? a : b; }
  static __device__ __forceinline__ T warp_max(T k) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    // Two 32-bit reductions: the value half, then the index half among the lanes holding that value.
    const uint32_t hi = static_cast<uint32_t>(k >> 32);
    const uint32_t mh = __reduce_max_sync(0xffffffffu, hi);
    const uint32_t lo = hi == mh ? static_cast<uint32_t>(k & 0xffffffffull) : 0u;
    const uint32_t ml = __reduce_max_sync(0xffffffffu, lo);
    return (static_cast<uint64_t>(mh) << 32) | ml;
#else
    for (int o = 16; o > 0; o >>= 1) k = max(k, __shfl_xor_sync(0xffffffffu, k, o));
    return k;
#endif
  }
};

// Key for double selection values: the ordered 64-bit value and 0xffffffff - index, compared in turn.
struct KeyD {
  struct T {
    uint64_t v;
    uint32_t i;
  };
  static __device__ __forceinline__ T zero() { return T{0ull, 0u}; }
  static __device__ __forceinline__ T make(double v, int idx) {
    return T{ordered_bits(v), 0xffffffffu - static_cast<uint32_t>(idx)};
  }
  static __device__ __forceinline__ int index(T k) { return static_cast<int>(0xffffffffu - k.i); }
  static __device__ __forceinline__ double value(T k) {
    const uint64_t o = k.v;
    return __longlong_as_double(static_cast<long long>(
        (o & 0x8000000000000000ull) ? (o ^ 0x8000000000000000ull) : ~o));
  }
  static __device__ __forceinline__ bool less(T a, T b) { return a.v < b.v || (a.v == b.v && a.i < b.i); }
  static __device__ __forceinline__ T max(T a, T b) { return less(a, b) ? b : a; }
  static __device__ __forceinline__ T min(T a, T b) { return less(a, b) ? a : b; }
  static __device__ __forceinline__ T warp_max(T k) {
    for (int o = 16; o > 0; o >>= 1) {
      T w;
      w.v = __shfl_xor_sync(0xffffffffu, k.v, o);
      w.i = __shfl_xor_sync(0xffffffffu, k.i, o);
      k = max(k, w);
    }
    return k;
  }
};

template <typename K>
__device__ __forceinline__ bool key_eq(typename K::T a, typename K::T b) {
  if constexpr (std::is_same_v<K, KeyD>) {
    return a.v == b.v && a.i == b.i;
  } else {
    return a == b;
  }
}

}  // namespace torchmoe::cuda
