// quantized_skinny_mm walks the packed weight like skinny_mm walks a float one: in k-blocks of reduction rows
// (never crossing a scale group), each block strip after strip (16 * kVectors<RB> columns) by every group of at
// most 8 rows while it is in cache. A strip's accumulators stay in registers within a block; between blocks they
// wait in a float32 buffer (the group's running sum), and at a group's last block they are scaled into a second
// buffer (the total). 4-bit codes become floats with one permute against a 16-entry table (the table already
// holds code - 8 for the symmetric form).
#include "ops/cpu/quantized_gemm.h"

#include "ops/cpu/skinny_gemm.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define TORCHMOE_HAVE_QGEMM_AVX512 1
#define TORCHMOE_QGEMM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))
#else
#define TORCHMOE_HAVE_QGEMM_AVX512 0
#endif

namespace torchmoe::cpu {
namespace {

// The code of w[p, j] as the kernels' tables see it: signed for 8 bits, code - 8 for symmetric 4 bits, the
// unsigned code for asymmetric 4 bits (whose zero point is subtracted per group).
inline float table_code(const QuantizedMatrix& w, int64_t p, int64_t j) {
  if (w.bits == 8) return static_cast<float>(static_cast<int8_t>(w.q[p * w.n + j]));
  const uint8_t b = w.q[(p >> 1) * w.n + j];
  const int c = (p & 1) ? (b >> 4) : (b & 0xF);
  return static_cast<float>(w.zeros != nullptr ? c : c - 8);
}

template <typename T>
void zero_columns(int64_t rows, int64_t c0, int64_t c1, T* out, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r) std::fill(out + r * ldo + c0, out + r * ldo + c1, static_cast<T>(0.0f));
}

// sum of x[r, p] over each group, [rows, groups] (the zero-point correction of the asymmetric form).
std::vector<float> group_sums(const QuantizedMatrix& w, int64_t rows, const float* x, int64_t ldx) {
  const int64_t groups = w.k / w.group_size;
  std::vector<float> sums(static_cast<size_t>(rows * groups), 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.0f;
      for (int64_t p = g * w.group_size; p < (g + 1) * w.group_size; ++p) s += x[r * ldx + p];
      sums[r * groups + g] = s;
    }
  }
  return sums;
}

// ---------------------------------------------------------------- portable

template <typename T>
void quantized_skinny_mm_portable(const QuantizedMatrix& w, int64_t rows, int64_t j0, int64_t j1, const float* x,
                                  int64_t ldx, T* out, int64_t ldo) {
  const int64_t groups = w.k / w.group_size;
  const auto xsum = w.zeros != nullptr ? group_sums(w, rows, x, ldx) : std::vector<float>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = j0; j < j1; ++j) {
      float total = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        float acc = 0.0f;
        for (int64_t p = g * w.group_size; p < (g + 1) * w.group_size; ++p) acc += x[r * ldx + p] * table_code(w, p, j);
        if (w.zeros != nullptr) acc -= static_cast<float>(w.zeros[g * w.n + j]) * xsum[r * groups + g];
        total += w.scales[g * w.n + j] * acc;
      }
      out[r * ldo + j] = static_cast<T>(total);
    }
  }
}

// ---------------------------------------------------------------- AVX-512

#if TORCHMOE_HAVE_QGEMM_AVX512
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

inline __mmask16 lane_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

template <int RB>
constexpr int kVectors = RB == 1 ? 16 : RB == 2 ? 8 : RB <= 4 ? 4 : 2;

// Packed rows per k-block (reduction rows: 16 for 8 bits, 32 for 4 bits).
constexpr int64_t kPackedBlockRows = 16;
template <int BITS>
constexpr int64_t kBlockRows = BITS == 8 ? kPackedBlockRows : 2 * kPackedBlockRows;

struct BlockArgs {
  const QuantizedMatrix* w;
  int64_t p0, kb;        // reduction rows [p0, p0 + kb), inside group g
  int64_t g;
  bool group_first, group_last, first_group;
  const float* x;        // row r0 of x
  int64_t ldx;
  const float* xsum;     // xsum[r * groups + g] for the block's rows (asymmetric only)
  int64_t groups;
};

// For the strip's columns [j, j + cols) and rows r < RB: acc (+)= x[r, p0:p0+kb] @ codes[p0:p0+kb, cols]; at the
// group's last block, total (+)= scale * (acc - zero * xsum). gacc and total have row stride `width`, point at the
// strip.
template <int BITS, bool Asym, int RB, bool Full>
TORCHMOE_QGEMM_AVX512 void qstrip(const BlockArgs& a, int64_t j, int64_t cols, float* gacc, float* total,
                                  int64_t width) {
  constexpr int NV = kVectors<RB>;
  if constexpr (Full) cols = 16 * NV;
  const QuantizedMatrix& w = *a.w;
  __mmask16 masks[NV];
  for (int v = 0; v < NV; ++v) masks[v] = lane_mask(cols - 16 * v);
  __m512 acc[RB][NV];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = a.group_first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(masks[v], gacc + r * width + 16 * v);
    }
  }
  // The strip's lines of the packed row one block ahead: a thread's reads are short runs of many rows, which the
  // hardware prefetcher alone leaves at about half the read bandwidth.
  constexpr int kLines = (16 * NV + 63) / 64;
  constexpr int64_t kAheadRows = kPackedBlockRows;
  if constexpr (BITS == 8) {
    for (int64_t p = a.p0; p < a.p0 + a.kb; ++p) {
      const int8_t* qr = reinterpret_cast<const int8_t*>(w.q) + p * w.n + j;
#pragma GCC unroll 16
      for (int l = 0; l < kLines; ++l) _mm_prefetch(reinterpret_cast<const char*>(qr + kAheadRows * w.n) + 64 * l, _MM_HINT_T0);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) {
        const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(masks[v], qr + 16 * v)));
#pragma GCC unroll 8
        for (int r = 0; r < RB; ++r) acc[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(a.x[r * a.ldx + p]), wv, acc[r][v]);
      }
    }
  } else {
    const __m512 table = Asym ? _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
                              : _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t p = a.p0; p < a.p0 + a.kb; p += 2) {
      const uint8_t* qr = w.q + (p >> 1) * w.n + j;
#pragma GCC unroll 16
      for (int l = 0; l < kLines; ++l) _mm_prefetch(reinterpret_cast<const char*>(qr + kAheadRows * w.n) + 64 * l, _MM_HINT_T0);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(masks[v], qr + 16 * v));
        const __m512 lo = _mm512_permutexvar_ps(b, table);  // the permute reads the low 4 bits of each lane
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
#pragma GCC unroll 8
        for (int r = 0; r < RB; ++r) {
          acc[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(a.x[r * a.ldx + p]), lo, acc[r][v]);
          acc[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(a.x[r * a.ldx + p + 1]), hi, acc[r][v]);
        }
      }
    }
  }
  if (!a.group_last) {
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(gacc + r * width + 16 * v, masks[v], acc[r][v]);
    }
    return;
  }
  const float* s = w.scales + a.g * w.n + j;
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    const __m512 sv = _mm512_maskz_loadu_ps(masks[v], s + 16 * v);
    __m512 zv = _mm512_setzero_ps();
    if constexpr (Asym) {
      zv = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(masks[v], w.zeros + a.g * w.n + j + 16 * v)));
    }
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      __m512 sum = acc[r][v];
      if constexpr (Asym) sum = _mm512_fnmadd_ps(zv, _mm512_set1_ps(a.xsum[r * a.groups + a.g]), sum);
      const __m512 t = a.first_group ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(masks[v], total + r * width + 16 * v);
      _mm512_mask_storeu_ps(total + r * width + 16 * v, masks[v], _mm512_fmadd_ps(sv, sum, t));
    }
  }
}

template <int BITS, bool Asym, int RB>
void block_strips(const BlockArgs& a, int64_t j0, int64_t width, float* gacc, float* total) {
  constexpr int64_t kWidth = 16 * kVectors<RB>;
  for (int64_t c = 0; c < width; c += kWidth) {
    const int64_t cols = std::min(kWidth, width - c);
    if (cols == kWidth) {
      qstrip<BITS, Asym, RB, true>(a, j0 + c, cols, gacc + c, total + c, width);
    } else {
      qstrip<BITS, Asym, RB, false>(a, j0 + c, cols, gacc + c, total + c, width);
    }
  }
}

template <typename T, int BITS, bool Asym>
void quantized_skinny_mm_avx512(const QuantizedMatrix& w, int64_t rows, int64_t j0, int64_t j1, const float* x,
                                int64_t ldx, T* out, int64_t ldo) {
  const int64_t width = j1 - j0;
  const int64_t groups = w.k / w.group_size;
  thread_local std::vector<float> group_buffer, total_buffer;
  group_buffer.resize(static_cast<size_t>(rows * width));
  total_buffer.resize(static_cast<size_t>(rows * width));
  const auto xsum = Asym ? group_sums(w, rows, x, ldx) : std::vector<float>();
  BlockArgs a{&w, 0, 0, 0, false, false, false, nullptr, ldx, nullptr, groups};
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t g_end = (g + 1) * w.group_size;
    for (int64_t p0 = g * w.group_size; p0 < g_end; p0 += kBlockRows<BITS>) {
      a.p0 = p0;
      a.kb = std::min(kBlockRows<BITS>, g_end - p0);
      a.g = g;
      a.group_first = p0 == g * w.group_size;
      a.group_last = p0 + a.kb == g_end;
      a.first_group = g == 0;
      for (int64_t r0 = 0; r0 < rows; r0 += kMaxGroupRows) {
        a.x = x + r0 * ldx;
        a.xsum = Asym ? xsum.data() + r0 * groups : nullptr;
        with_group_rows(static_cast<int>(std::min<int64_t>(kMaxGroupRows, rows - r0)), [&](auto rb) {
          block_strips<BITS, Asym, decltype(rb)::value>(a, j0, width, group_buffer.data() + r0 * width,
                                                        total_buffer.data() + r0 * width);
        });
      }
    }
  }
  const float* total = total_buffer.data();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < width; ++c) out[r * ldo + j0 + c] = static_cast<T>(total[r * width + c]);
  }
}
#pragma GCC diagnostic pop
#endif

// One row of the float weight, columns [j0, j1): scale * (code - zero) in float32, then T.
template <typename T>
inline void dequantize_row(const QuantizedMatrix& w, int64_t p, int64_t j0, int64_t j1, T* dst) {
  const int64_t g = p / w.group_size;
  const float* s = w.scales + g * w.n;
  if (w.bits == 8) {
    const int8_t* q = reinterpret_cast<const int8_t*>(w.q) + p * w.n;
    for (int64_t j = j0; j < j1; ++j) dst[j - j0] = static_cast<T>(s[j] * static_cast<float>(q[j]));
    return;
  }
  const uint8_t* q = w.q + (p >> 1) * w.n;
  const int shift = (p & 1) ? 4 : 0;
  if (w.zeros != nullptr) {
    const uint8_t* z = w.zeros + g * w.n;
    for (int64_t j = j0; j < j1; ++j) {
      dst[j - j0] = static_cast<T>(s[j] * static_cast<float>(((q[j] >> shift) & 0xF) - z[j]));
    }
  } else {
    for (int64_t j = j0; j < j1; ++j) dst[j - j0] = static_cast<T>(s[j] * static_cast<float>(((q[j] >> shift) & 0xF) - 8));
  }
}

#if TORCHMOE_HAVE_QGEMM_AVX512
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// 16 float32 values to T, rounded to nearest even as c10's conversions round.
TORCHMOE_QGEMM_AVX512 inline void store16(float* dst, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(dst, m, v); }
TORCHMOE_QGEMM_AVX512 inline void store16(double* dst, __m512 v, __mmask16 m) {
  _mm512_mask_storeu_pd(dst, static_cast<__mmask8>(m), _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
  _mm512_mask_storeu_pd(dst + 8, static_cast<__mmask8>(m >> 8), _mm512_cvtps_pd(_mm256_castpd_ps(
      _mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}
TORCHMOE_QGEMM_AVX512 inline void store16(c10::BFloat16* dst, __m512 v, __mmask16 m) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  _mm256_mask_storeu_epi16(dst, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}
TORCHMOE_QGEMM_AVX512 inline void store16(c10::Half* dst, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(dst, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// 16 columns of row p as float32: scale * (code - zero).
template <int BITS, bool Asym, bool Odd>
TORCHMOE_QGEMM_AVX512 inline __m512 dequantize16(const uint8_t* q, const float* s, const uint8_t* z, __mmask16 m,
                                                 __m512 table) {
  __m512 code;
  if constexpr (BITS == 8) {
    code = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q)));
  } else {
    __m512i b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, q));
    if constexpr (Odd) b = _mm512_srli_epi32(b, 4);
    code = _mm512_permutexvar_ps(b, table);  // the permute reads the low 4 bits of each lane
    if constexpr (Asym) code = _mm512_sub_ps(code, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, z))));
  }
  return _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s), code);
}

template <typename T, int BITS, bool Asym, bool Odd>
TORCHMOE_QGEMM_AVX512 void dequantize_row_avx512(const uint8_t* q, const float* s, const uint8_t* z, int64_t cols,
                                                 T* out) {
  // the symmetric 4-bit table holds code - 8 already
  const __m512 table = Asym ? _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
                            : _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  int64_t j = 0;
  for (; j + 16 <= cols; j += 16) {
    store16(out + j, dequantize16<BITS, Asym, Odd>(q + j, s + j, z + j, 0xFFFF, table), 0xFFFF);
  }
  if (j < cols) {
    const __mmask16 m = lane_mask(cols - j);
    store16(out + j, dequantize16<BITS, Asym, Odd>(q + j, s + j, z + j, m, table), m);
  }
}

// dequantize_row in vectors of 16 columns.
template <typename T>
TORCHMOE_QGEMM_AVX512 void dequantize_block_avx512(const QuantizedMatrix& w, int64_t p0, int64_t p1, int64_t j0,
                                                   int64_t j1, T* dst, int64_t ldd) {
  const int64_t n = w.n, group_size = w.group_size, cols = j1 - j0;
  const uint8_t* zeros = w.zeros;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t g = p / group_size;
    const float* s = w.scales + g * n + j0;
    const uint8_t* z = zeros != nullptr ? zeros + g * n + j0 : nullptr;
    T* out = dst + (p - p0) * ldd;
    if (w.bits == 8) {
      dequantize_row_avx512<T, 8, false, false>(w.q + p * n + j0, s, z, cols, out);
      continue;
    }
    const uint8_t* q = w.q + (p >> 1) * n + j0;
    if (z != nullptr) {
      (p & 1) ? dequantize_row_avx512<T, 4, true, true>(q, s, z, cols, out)
              : dequantize_row_avx512<T, 4, true, false>(q, s, z, cols, out);
    } else {
      (p & 1) ? dequantize_row_avx512<T, 4, false, true>(q, s, z, cols, out)
              : dequantize_row_avx512<T, 4, false, false>(q, s, z, cols, out);
    }
  }
}
#pragma GCC diagnostic pop
#endif

}  // namespace

template <typename T>
void quantized_skinny_mm(const QuantizedMatrix& w, int64_t rows, int64_t j0, int64_t j1, const float* x, int64_t ldx,
                         T* out, int64_t ldo) {
  if (rows <= 0 || j1 <= j0) return;
  if (w.k == 0) return zero_columns(rows, j0, j1, out, ldo);
#if TORCHMOE_HAVE_QGEMM_AVX512
  if (skinny_avx512_available()) {
    if (w.bits == 8) return quantized_skinny_mm_avx512<T, 8, false>(w, rows, j0, j1, x, ldx, out, ldo);
    if (w.zeros != nullptr) return quantized_skinny_mm_avx512<T, 4, true>(w, rows, j0, j1, x, ldx, out, ldo);
    return quantized_skinny_mm_avx512<T, 4, false>(w, rows, j0, j1, x, ldx, out, ldo);
  }
#endif
  quantized_skinny_mm_portable(w, rows, j0, j1, x, ldx, out, ldo);
}

template <typename T>
void dequantize_block(const QuantizedMatrix& w, int64_t p0, int64_t p1, int64_t j0, int64_t j1, T* dst, int64_t ldd) {
#if TORCHMOE_HAVE_QGEMM_AVX512
  if (skinny_avx512_available()) return dequantize_block_avx512(w, p0, p1, j0, j1, dst, ldd);
#endif
  for (int64_t p = p0; p < p1; ++p) dequantize_row(w, p, j0, j1, dst + (p - p0) * ldd);
}

template void quantized_skinny_mm<float>(const QuantizedMatrix&, int64_t, int64_t, int64_t, const float*, int64_t,
                                         float*, int64_t);
template void quantized_skinny_mm<c10::BFloat16>(const QuantizedMatrix&, int64_t, int64_t, int64_t, const float*,
                                                 int64_t, c10::BFloat16*, int64_t);
template void quantized_skinny_mm<c10::Half>(const QuantizedMatrix&, int64_t, int64_t, int64_t, const float*, int64_t,
                                             c10::Half*, int64_t);
template void dequantize_block<float>(const QuantizedMatrix&, int64_t, int64_t, int64_t, int64_t, float*, int64_t);
template void dequantize_block<double>(const QuantizedMatrix&, int64_t, int64_t, int64_t, int64_t, double*, int64_t);
template void dequantize_block<c10::BFloat16>(const QuantizedMatrix&, int64_t, int64_t, int64_t, int64_t,
                                              c10::BFloat16*, int64_t);
template void dequantize_block<c10::Half>(const QuantizedMatrix&, int64_t, int64_t, int64_t, int64_t, c10::Half*,
                                          int64_t);

}  // namespace torchmoe::cpu
