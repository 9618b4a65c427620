// CPU helpers shared by the dispatch and combine kernels: dest validation, inverse maps and
// vectorisable row loops (accumulation in at::opmath_type: float for half/bfloat16, else the type itself).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "ops/common/checks.h"
#include "ops/cpu/lane_mask.h"
#include "ops/cpu/skinny_gemm.h"

namespace torchmoe::cpu {

template <typename T>
using acc_type = at::opmath_type<T>;

// Minimum rows per parallel task: about 256K elements (a few tens of microseconds), so small rows are not one
// task each, and a decode step's few tokens stay on the caller (a parallel region costs more than their copy,
// and on a busy machine waits a scheduler slice for a late thread).
inline int64_t row_grain(int64_t d) {
  constexpr int64_t kGrainElements = int64_t{1} << 18;
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(d, 1));
}

// The message is built only on failure (TORCH_CHECK's cold path), so this is cheap inside loops.
inline void check_dest_value(const char* op, int64_t slot, int64_t k, int64_t value, int64_t rows) {
  TORCHMOE_CHECK_ARG(value >= -1 && value < rows, op, "dest", "entries must be -1 (dropped) or in [0, ", rows,
                     "), got dest[", slot / k, ", ", slot % k, "] = ", value);
}

// Serial pass over dest [N, k] before any parallel loop reads rows through it: the error names the first
// bad entry in memory order (not whichever thread saw one first), and no worker thread throws.
inline void check_dest_values(const char* op, const int64_t* dest, int64_t N, int64_t k, int64_t rows) {
  const int64_t slots = N * k;
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t r = dest[s];
    if (C10_UNLIKELY(r < -1 || r >= rows)) check_dest_value(op, s, k, r, rows);
  }
}

// src[row] = token that dest sends to row, or -1. Rejects out-of-range entries and a row targeted twice.
inline std::vector<int64_t> dispatch_sources(const int64_t* dest, int64_t N, int64_t k, int64_t rows,
                                             const char* op) {
  std::vector<int64_t> src(static_cast<size_t>(rows), -1);
  const int64_t slots = N * k;
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t r = dest[s];
    check_dest_value(op, s, k, r, rows);
    if (r < 0) continue;
    if (src[r] >= 0) {
      const int64_t first = std::find(dest, dest + s, r) - dest;
      TORCHMOE_CHECK_ARG(false, op, "dest", "must not send two slots to the same row (duplicate row ", r,
                         ": dest[", first / k, ", ", first % k, "] and dest[", s / k, ", ", s % k, "])");
    }
    src[r] = s / k;
  }
  return src;
}

// Slots (n * k + j) that refer to each row, in slot order: slots[offsets[r] .. offsets[r + 1]).
struct RowSlots {
  std::vector<int64_t> offsets;
  std::vector<int64_t> slots;
};

inline RowSlots row_slots(const int64_t* dest, int64_t N, int64_t k, int64_t rows, const char* op) {
  RowSlots rs;
  rs.offsets.assign(static_cast<size_t>(rows) + 1, 0);
  const int64_t slots = N * k;
  int64_t kept = 0;
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t r = dest[s];
    check_dest_value(op, s, k, r, rows);
    if (r >= 0) {
      ++rs.offsets[r + 1];
      ++kept;
    }
  }
  for (int64_t r = 0; r < rows; ++r) rs.offsets[r + 1] += rs.offsets[r];
  rs.slots.resize(static_cast<size_t>(kept));
  std::vector<int64_t> fill(rs.offsets.begin(), rs.offsets.end() - 1);
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t r = dest[s];
    if (r >= 0) rs.slots[fill[r]++] = s;
  }
  return rs;
}

// Elements of acc_type<T> per stack block: 4 KiB of float, enough to stream, small enough for L1.
constexpr int64_t kBlock = 1024;

namespace detail {
#if defined(__x86_64__) && defined(__GNUC__)
// float16 <-> float32 with the F16C instructions where the CPU has them (the build targets baseline
// x86-64, where c10::Half converts one scalar at a time). Both directions are exact / round-to-nearest-
// even, like c10::Half, so the result does not depend on which path ran.
inline bool has_f16c() {
  static const bool yes = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return yes;
}

__attribute__((target("avx,f16c"))) inline void half_to_float_f16c(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

__attribute__((target("avx,f16c"))) inline void float_to_half_f16c(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}
#define TORCHMOE_HAVE_F16C_PATH 1

// bfloat16 <-> float32 and the weighted row sum of combine with AVX-512 (F, BW, VL) where the skinny kernels have it
// (the baseline build converts and adds 4 floats at a time). Same results as the scalar loops: widening is
// exact, narrowing rounds to nearest even with NaN -> 0x7FC0 as c10::BFloat16 does, and the weighted sum
// multiplies, then adds (never a fused multiply-add).
#define TORCHMOE_ROWS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
TORCHMOE_ROWS_AVX512 inline __m512 load_as_float(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
TORCHMOE_ROWS_AVX512 inline __m512 load_as_float(const c10::BFloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

TORCHMOE_ROWS_AVX512 inline void bf16_to_float_avx512(const c10::BFloat16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lane_mask(n - i);
    _mm512_mask_storeu_ps(dst + i, m, load_as_float(src + i, m));
  }
}

TORCHMOE_ROWS_AVX512 inline void float_to_bf16_avx512(const float* src, c10::BFloat16* dst, int64_t n) {
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i half_ulp = _mm512_set1_epi32(0x7FFF);
  const __m512i quiet_nan = _mm512_set1_epi32(0x7FC0);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lane_mask(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(m, src + i);
    const __m512i u = _mm512_castps_si512(v);
    const __m512i bias = _mm512_add_epi32(half_ulp, _mm512_and_si512(_mm512_srli_epi32(u, 16), one));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), quiet_nan);
    _mm256_mask_storeu_epi16(dst + i, m, _mm512_cvtepi32_epi16(rounded));
  }
}

// a[0:n] = w * src (first) or a[0:n] += w * src, src float32 or bfloat16 (widened in registers, no float copy).
template <typename T>
TORCHMOE_ROWS_AVX512 inline void weighted_sum_avx512(float* a, const T* src, float w, int64_t n, bool first) {
  const __m512 wv = _mm512_set1_ps(w);
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 m = lane_mask(n - c);
    __m512 product = _mm512_mul_ps(wv, load_as_float(src + c, m));
    if (!first) {
      asm("" : "+v"(product));  // keeps the compiler from fusing the multiply and the add
      product = _mm512_add_ps(_mm512_maskz_loadu_ps(m, a + c), product);
    }
    _mm512_mask_storeu_ps(a + c, m, product);
  }
}
#define TORCHMOE_HAVE_AVX512_ROWS 1
#endif
}  // namespace detail

// dst[0:n] = src[0:n] converted to the accumulation type.
template <typename T>
inline void to_acc(const T* __restrict__ src, acc_type<T>* __restrict__ dst, int64_t n) {
#ifdef TORCHMOE_HAVE_F16C_PATH
  if constexpr (std::is_same_v<T, c10::Half>) {
    if (detail::has_f16c()) return detail::half_to_float_f16c(src, dst, n);
  }
#endif
#ifdef TORCHMOE_HAVE_AVX512_ROWS
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (skinny_avx512_available()) return detail::bf16_to_float_avx512(src, dst, n);
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_type<T>>(src[i]);
}

// dst[0:n] = src[0:n] rounded to T.
template <typename T>
inline void from_acc(const acc_type<T>* __restrict__ src, T* __restrict__ dst, int64_t n) {
#ifdef TORCHMOE_HAVE_F16C_PATH
  if constexpr (std::is_same_v<T, c10::Half>) {
    if (detail::has_f16c()) return detail::float_to_half_f16c(src, dst, n);
  }
#endif
#ifdef TORCHMOE_HAVE_AVX512_ROWS
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (skinny_avx512_available()) return detail::float_to_bf16_avx512(src, dst, n);
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// a[0:n] = w * src (kFirst) or a[0:n] += w * src, all in the accumulation type.
template <bool kWeighted, typename A>
inline void axpy_acc(A* __restrict__ a, const A* __restrict__ src, A w, int64_t n, bool first) {
#ifdef TORCHMOE_HAVE_AVX512_ROWS
  if constexpr (kWeighted && std::is_same_v<A, float>) {
    if (skinny_avx512_available()) return detail::weighted_sum_avx512(a, src, w, n, first);
  }
#endif
  if (first) {
    if constexpr (kWeighted) {
      for (int64_t c = 0; c < n; ++c) a[c] = w * src[c];
    } else {
      std::memcpy(a, src, sizeof(A) * n);
    }
  } else {
    if constexpr (kWeighted) {
      for (int64_t c = 0; c < n; ++c) a[c] += w * src[c];
    } else {
      for (int64_t c = 0; c < n; ++c) a[c] += src[c];
    }
  }
}

// axpy_acc of src (half/bfloat16) widened to the accumulation type: through scratch, or for weighted bfloat16 rows
// with AVX-512, in registers.
template <bool kWeighted, typename T>
inline void widen_axpy_acc(acc_type<T>* __restrict__ a, const T* __restrict__ src, acc_type<T>* __restrict__ scratch,
                           acc_type<T> w, int64_t n, bool first) {
#ifdef TORCHMOE_HAVE_AVX512_ROWS
  if constexpr (kWeighted && std::is_same_v<T, c10::BFloat16>) {
    if (skinny_avx512_available()) return detail::weighted_sum_avx512(a, src, w, n, first);
  }
#endif
  to_acc(src, scratch, n);
  axpy_acc<kWeighted>(a, scratch, w, n, first);
}

// out[0:d] = sum over i < count of w_i * base[row_i, 0:d], skipping row_i < 0, in order of i.
// get(i, row, w) yields the row and weight of term i. Accumulates in acc_type<T>: directly in out for
// float/double; for half/bfloat16 in a stack block, each source block converted once. No term -> zeros.
template <typename T, bool kWeighted, typename Get>
inline void gather_sum_row(T* out, const T* base, int64_t d, int64_t count, const Get& get) {
  using A = acc_type<T>;
  constexpr bool kInPlace = std::is_same_v<A, T>;
  constexpr int64_t kBuf = kInPlace ? 1 : kBlock;
  A acc_buf[kBuf];
  A src_buf[kBuf];
  for (int64_t c0 = 0; c0 < d; c0 += kBlock) {
    const int64_t len = std::min(kBlock, d - c0);
    bool first = true;
    for (int64_t i = 0; i < count; ++i) {
      int64_t row;
      A w;
      get(i, row, w);
      if (row < 0) continue;
      const T* src = base + row * d + c0;
      if constexpr (kInPlace) {
        axpy_acc<kWeighted>(out + c0, src, w, len, first);
      } else {
        widen_axpy_acc<kWeighted>(acc_buf, src, src_buf, w, len, first);
      }
      first = false;
    }
    if (first) {
      std::memset(static_cast<void*>(out + c0), 0, sizeof(T) * len);
    } else if constexpr (!kInPlace) {
      from_acc(acc_buf, out + c0, len);
    }
  }
}

// sum_c a[c] * b[c] over a fixed set of lanes (the order depends on n only, never on threads).
template <typename A>
inline A dot_acc(const A* __restrict__ a, const A* __restrict__ b, int64_t n) {
  constexpr int64_t kLanes = 16;
  A lanes[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[c + l] * b[c + l];
  }
  A tail = 0;
  for (; c < n; ++c) tail += a[c] * b[c];
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0] + tail;
}

// <a[0:d], b[0:d]> in acc_type<T>; half/bfloat16 converted block by block.
template <typename T>
inline acc_type<T> dot_row(const T* a, const T* b, int64_t d) {
  using A = acc_type<T>;
  if constexpr (std::is_same_v<A, T>) {
    return dot_acc(a, b, d);
  } else {
    A ta[kBlock];
    A tb[kBlock];
    A total = 0;
    for (int64_t c0 = 0; c0 < d; c0 += kBlock) {
      const int64_t len = std::min(kBlock, d - c0);
      to_acc(a + c0, ta, len);
      to_acc(b + c0, tb, len);
      total += dot_acc(ta, tb, len);
    }
    return total;
  }
}

}  // namespace torchmoe::cpu
