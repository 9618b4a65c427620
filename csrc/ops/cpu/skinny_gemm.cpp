// skinny_mm: w is walked in column strips (16 * kVectors<RB> columns), row p after row p, each strip once per
// group of at most 8 rows (a second group re-reads the strip from L2). A strip's accumulators (RB rows x
// kVectors<RB> vectors) stay in registers; w's rows lie a row stride apart, so the next rows are prefetched.
// skinny_mm_transposed: w's rows are contiguous along the reduction, so each pair of w rows is streamed once
// against every row of g (vector accumulators, reduced at the end).
#include "ops/cpu/skinny_gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define TORCHMOE_HAVE_SKINNY_AVX512 1
#define TORCHMOE_SKINNY_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))
#else
#define TORCHMOE_HAVE_SKINNY_AVX512 0
#endif

namespace torchmoe::cpu {
namespace {

constexpr int kMaxGroupRows = 8;

float to_float(float v) { return v; }
float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
float to_float(c10::Half v) { return static_cast<float>(v); }

// float32 copy of a [rows, k] operand (the operand itself when it is float32).
template <typename T>
const float* as_float(const T* src, int64_t rows, int64_t k, int64_t ld, int64_t& ld_out) {
  if constexpr (std::is_same_v<T, float>) {
    ld_out = ld;
    return src;
  } else {
    thread_local std::vector<float> buffer;
    buffer.resize(static_cast<size_t>(rows * k));
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t p = 0; p < k; ++p) buffer[r * k + p] = to_float(src[r * ld + p]);
    }
    ld_out = k;
    return buffer.data();
  }
}

// ---------------------------------------------------------------- portable

template <typename T>
void skinny_mm_portable(int64_t rows, int64_t k, int64_t j0, int64_t j1, const float* x, int64_t ldx, const T* w,
                        int64_t ldw, T* out, int64_t ldo) {
  constexpr int64_t kCols = 256;
  float acc[kCols];
  for (int64_t jb = j0; jb < j1; jb += kCols) {
    const int64_t cols = std::min(kCols, j1 - jb);
    for (int64_t r = 0; r < rows; ++r) {
      std::fill_n(acc, cols, 0.0f);
      for (int64_t p = 0; p < k; ++p) {
        const float xv = x[r * ldx + p];
        const T* wr = w + p * ldw + jb;
        for (int64_t j = 0; j < cols; ++j) acc[j] += xv * to_float(wr[j]);
      }
      for (int64_t j = 0; j < cols; ++j) out[r * ldo + jb + j] = static_cast<T>(acc[j]);
    }
  }
}

template <typename T>
void skinny_mm_transposed_portable(int64_t rows, int64_t k, int64_t i0, int64_t i1, const float* g, int64_t ldg,
                                   const T* w, int64_t ldw, T* out, int64_t ldo) {
  for (int64_t i = i0; i < i1; ++i) {
    const T* wr = w + i * ldw;
    for (int64_t r = 0; r < rows; ++r) {
      float acc = 0.0f;
      for (int64_t j = 0; j < k; ++j) acc += g[r * ldg + j] * to_float(wr[j]);
      out[r * ldo + i] = static_cast<T>(acc);
    }
  }
}

// ---------------------------------------------------------------- AVX-512

#if TORCHMOE_HAVE_SKINNY_AVX512
// GCC 12's masked-load intrinsics start from _mm*_undefined_*() and warn that it is uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
TORCHMOE_SKINNY_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
TORCHMOE_SKINNY_AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  // exact
}
TORCHMOE_SKINNY_AVX512 inline __m512 load16(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

inline __mmask16 lane_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

template <int RB>
// Vectors per strip row: RB * kVectors <= 16 accumulators, the widest strip that leaves registers for w.
constexpr int kVectors = RB == 1 ? 16 : RB == 2 ? 8 : RB <= 4 ? 4 : 2;

// acc (RB rows x 16 * kVectors<RB> floats, row stride 16 * kVectors) = x[0:RB, :] @ w[:, 0:cols]; Full: cols is
// the whole strip (no masks to keep, which would not fit the mask registers).
template <typename T, int RB, bool Full>
TORCHMOE_SKINNY_AVX512 void strip(int64_t k, const float* x, int64_t ldx, const T* w, int64_t ldw, int64_t cols,
                                  float* acc_out) {
  constexpr int NV = kVectors<RB>;
  if constexpr (Full) cols = 16 * NV;
  constexpr int kLines = static_cast<int>((16 * NV * sizeof(T) + 63) / 64);
  constexpr int64_t kPrefetchRows = std::max(4, 64 / kLines);  // about 4 KiB of w in flight
  __mmask16 masks[NV];
  for (int v = 0; v < NV; ++v) masks[v] = lane_mask(cols - 16 * v);
  __m512 acc[RB][NV];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < k; ++p) {
    const T* wr = w + p * ldw;
    const char* ahead = reinterpret_cast<const char*>(wr + kPrefetchRows * ldw);  // prefetches never fault
#pragma GCC unroll 16
    for (int l = 0; l < kLines; ++l) _mm_prefetch(ahead + 64 * l, _MM_HINT_T0);
    __m512 wv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) wv[v] = load16(wr + 16 * v, masks[v]);
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * ldx + p]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(xv, wv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(acc_out + r * 16 * NV + 16 * v, acc[r][v]);
  }
}

template <typename T, int RB>
void strips(int64_t k, int64_t j0, int64_t j1, const float* x, int64_t ldx, const T* w, int64_t ldw, T* out,
            int64_t ldo) {
  constexpr int64_t kWidth = 16 * kVectors<RB>;
  float acc[RB * kWidth];
  for (int64_t j = j0; j < j1; j += kWidth) {
    const int64_t cols = std::min(kWidth, j1 - j);
    if (cols == kWidth) {
      strip<T, RB, true>(k, x, ldx, w + j, ldw, cols, acc);
    } else {
      strip<T, RB, false>(k, x, ldx, w + j, ldw, cols, acc);
    }
    for (int r = 0; r < RB; ++r) {
      for (int64_t c = 0; c < cols; ++c) out[r * ldo + j + c] = static_cast<T>(acc[r * kWidth + c]);
    }
  }
}

// fn(std::integral_constant<int, RB>{}) for RB = rows (1..kMaxGroupRows): the row count as a template argument.
template <typename Fn>
void with_group_rows(int rows, const Fn& fn) {
  switch (rows) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    case 6: fn(std::integral_constant<int, 6>{}); break;
    case 7: fn(std::integral_constant<int, 7>{}); break;
    default: fn(std::integral_constant<int, 8>{}); break;
  }
}

template <typename T>
void skinny_mm_avx512(int64_t rows, int64_t k, int64_t j0, int64_t j1, const float* x, int64_t ldx, const T* w,
                      int64_t ldw, T* out, int64_t ldo) {
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxGroupRows) {
    with_group_rows(static_cast<int>(std::min<int64_t>(kMaxGroupRows, rows - r0)), [&](auto rb) {
      strips<T, decltype(rb)::value>(k, j0, j1, x + r0 * ldx, ldx, w, ldw, out + r0 * ldo, ldo);
    });
  }
}

// out[r, i], out[r, i + 1] (when two) = g[r, :] . w[i, :], g[r, :] . w[i + 1, :] for r < RB.
template <typename T, int RB>
TORCHMOE_SKINNY_AVX512 void dot_rows(int64_t k, const float* g, int64_t ldg, const T* w, int64_t ldw, bool two,
                                     float* sums /* [2][RB] */) {
  __m512 acc[2][RB];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) acc[0][r] = acc[1][r] = _mm512_setzero_ps();
  const T* w0 = w;
  const T* w1 = two ? w + ldw : w;
  for (int64_t j = 0; j < k; j += 16) {
    const __mmask16 m = lane_mask(k - j);
    const __m512 a = load16(w0 + j, m);
    const __m512 b = load16(w1 + j, m);
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      const __m512 gv = _mm512_maskz_loadu_ps(m, g + r * ldg + j);
      acc[0][r] = _mm512_fmadd_ps(gv, a, acc[0][r]);
      acc[1][r] = _mm512_fmadd_ps(gv, b, acc[1][r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) {
    sums[r] = _mm512_reduce_add_ps(acc[0][r]);
    sums[RB + r] = _mm512_reduce_add_ps(acc[1][r]);
  }
}

template <typename T, int RB>
void dot_row_pairs(int64_t k, int64_t i0, int64_t i1, const float* g, int64_t ldg, const T* w, int64_t ldw, T* out,
                   int64_t ldo) {
  float sums[2 * RB];
  for (int64_t i = i0; i < i1; i += 2) {
    const bool two = i + 1 < i1;
    dot_rows<T, RB>(k, g, ldg, w + i * ldw, ldw, two, sums);
    for (int r = 0; r < RB; ++r) {
      out[r * ldo + i] = static_cast<T>(sums[r]);
      if (two) out[r * ldo + i + 1] = static_cast<T>(sums[RB + r]);
    }
  }
}

template <typename T>
void skinny_mm_transposed_avx512(int64_t rows, int64_t k, int64_t i0, int64_t i1, const float* g, int64_t ldg,
                                 const T* w, int64_t ldw, T* out, int64_t ldo) {
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxGroupRows) {
    with_group_rows(static_cast<int>(std::min<int64_t>(kMaxGroupRows, rows - r0)), [&](auto rb) {
      dot_row_pairs<T, decltype(rb)::value>(k, i0, i1, g + r0 * ldg, ldg, w, ldw, out + r0 * ldo, ldo);
    });
  }
}
#pragma GCC diagnostic pop
#endif

}  // namespace

bool skinny_avx512_available() {
#if TORCHMOE_HAVE_SKINNY_AVX512
  static const bool available = [] {
    const char* off = std::getenv("TORCHMOE_DISABLE_AVX512");
    if (off != nullptr && off[0] != '\0' && std::strcmp(off, "0") != 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return available;
#else
  return false;
#endif
}

template <typename T>
void skinny_mm(int64_t rows, int64_t k, int64_t j0, int64_t j1, const T* x, int64_t ldx, const T* w, int64_t ldw,
               T* out, int64_t ldo) {
  if (rows <= 0 || j1 <= j0) return;
  int64_t ldxf = 0;
  const float* xf = as_float(x, rows, k, ldx, ldxf);
#if TORCHMOE_HAVE_SKINNY_AVX512
  if (skinny_avx512_available()) return skinny_mm_avx512(rows, k, j0, j1, xf, ldxf, w, ldw, out, ldo);
#endif
  skinny_mm_portable(rows, k, j0, j1, xf, ldxf, w, ldw, out, ldo);
}

template <typename T>
void skinny_mm_transposed(int64_t rows, int64_t k, int64_t i0, int64_t i1, const T* g, int64_t ldg, const T* w,
                          int64_t ldw, T* out, int64_t ldo) {
  if (rows <= 0 || i1 <= i0) return;
  int64_t ldgf = 0;
  const float* gf = as_float(g, rows, k, ldg, ldgf);
#if TORCHMOE_HAVE_SKINNY_AVX512
  if (skinny_avx512_available()) return skinny_mm_transposed_avx512(rows, k, i0, i1, gf, ldgf, w, ldw, out, ldo);
#endif
  skinny_mm_transposed_portable(rows, k, i0, i1, gf, ldgf, w, ldw, out, ldo);
}

#define TORCHMOE_INSTANTIATE_SKINNY(T)                                                                            \
  template void skinny_mm<T>(int64_t, int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t, T*,        \
                             int64_t);                                                                            \
  template void skinny_mm_transposed<T>(int64_t, int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t, \
                                        T*, int64_t);
TORCHMOE_INSTANTIATE_SKINNY(float)
TORCHMOE_INSTANTIATE_SKINNY(c10::BFloat16)
TORCHMOE_INSTANTIATE_SKINNY(c10::Half)
#undef TORCHMOE_INSTANTIATE_SKINNY

}  // namespace torchmoe::cpu
