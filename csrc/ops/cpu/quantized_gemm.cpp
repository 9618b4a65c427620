// quantized_skinny_mm walks the packed weight like skinny_mm walks a float one: in k-blocks of reduction rows
// (never crossing a scale group), each block strip after strip (16 * kVectors<RB> columns) by every group of at
// most 8 rows while it is in cache. A strip's accumulators stay in registers within a block; between blocks they
// wait in a float32 buffer (the group's running sum), and at a group's last block they are scaled into a second
// buffer (the total). 4-bit codes become floats with one permute against a 16-entry table (the table already
// holds code - 8 for the symmetric form). With TORCHMOE_SKINNY_ROW_WALK=1 (see row_walk_preferred: no CPU
// walks packed weights by default since the strips prefetch into L2 on AMD), one row walks the packed weight row
// after row instead (one sequential stream per thread), in the same order of multiply-adds, so with the same
// bits. For 4 bits and bfloat16 activations, the walk and the strips take two codes at a time by vdpbf16ps where
// the CPU has it (qstrip_dot: the same bits again).
#include "ops/cpu/quantized_gemm.h"

#include "ops/cpu/lane_mask.h"
#include "ops/cpu/skinny_gemm.h"

#include <algorithm>
#include <cstring>
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

// The 4-bit codes' float values, indexed by code: the code itself for the asymmetric form (whose zero point is
// subtracted per group), code - 8 for the symmetric one.
template <bool Asym>
TORCHMOE_QGEMM_AVX512 inline __m512 code_table() {
  return Asym ? _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
              : _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
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
  const uint32_t* xpairs;  // row r0 of the bfloat16 pairs (x[2i], x[2i + 1]) (the 4-bit dot-product strips only)
  int64_t ld_pairs;
};

#define TORCHMOE_QGEMM_INLINE __attribute__((always_inline)) TORCHMOE_QGEMM_AVX512 inline

// The strip's accumulators at a block's start: zero at its group's start, else the group's running sums.
template <int RB, int NV>
TORCHMOE_QGEMM_INLINE void start_strip(const BlockArgs& a, const __mmask16 (&masks)[NV], const float* gacc,
                                       int64_t width, __m512 (&acc)[RB][NV]) {
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = a.group_first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(masks[v], gacc + r * width + 16 * v);
    }
  }
}

// At a block's end: the running sums back to gacc, or at the group's last block total (+)= scale * (acc - zero *
// xsum).
template <bool Asym, int RB, int NV>
TORCHMOE_QGEMM_INLINE void finish_strip(const BlockArgs& a, int64_t j, const __mmask16 (&masks)[NV],
                                        const __m512 (&acc)[RB][NV], float* gacc, float* total, int64_t width) {
  const QuantizedMatrix& w = *a.w;
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

// The strip's lines of the packed row one block ahead: a thread's reads are short runs of many rows, which the
// hardware prefetcher alone leaves at about half the read bandwidth.
template <int NV>
TORCHMOE_QGEMM_INLINE void prefetch_strip(const uint8_t* packed_row, int64_t n, bool to_l2) {
  constexpr int kLines = (16 * NV + 63) / 64;
#pragma GCC unroll 16
  for (int l = 0; l < kLines; ++l) prefetch_strip_line(packed_row + kPackedBlockRows * n + 64 * l, to_l2);
}

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
  const bool to_l2 = strip_prefetch_to_l2();
  __m512 acc[RB][NV];
  start_strip<RB, NV>(a, masks, gacc, width, acc);
  if constexpr (BITS == 8) {
    for (int64_t p = a.p0; p < a.p0 + a.kb; ++p) {
      const int8_t* qr = reinterpret_cast<const int8_t*>(w.q) + p * w.n + j;
      prefetch_strip<NV>(reinterpret_cast<const uint8_t*>(qr), w.n, to_l2);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) {
        const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(masks[v], qr + 16 * v)));
#pragma GCC unroll 8
        for (int r = 0; r < RB; ++r) acc[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(a.x[r * a.ldx + p]), wv, acc[r][v]);
      }
    }
  } else {
    const __m512 table = code_table<Asym>();
    for (int64_t p = a.p0; p < a.p0 + a.kb; p += 2) {
      const uint8_t* qr = w.q + (p >> 1) * w.n + j;
      prefetch_strip<NV>(qr, w.n, to_l2);
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
  finish_strip<Asym, RB, NV>(a, j, masks, acc, gacc, total, width);
}

// At a group's end: total[r, j] (+)= scale * (gacc[r, j] - zero * xsum[r, g]), as qstrip does.
template <bool Asym, int RB>
TORCHMOE_QGEMM_AVX512 void finish_group(const QuantizedMatrix& w, int64_t g, int64_t j0, int64_t width,
                                        const float* xsum, int64_t groups, const float* gacc, float* total) {
  const float* s = w.scales + g * w.n + j0;
  for (int64_t j = 0; j < width; j += 16) {
    const __mmask16 m = lane_mask(width - j);
    const __m512 sv = _mm512_maskz_loadu_ps(m, s + j);
    __m512 zv = _mm512_setzero_ps();
    if constexpr (Asym) zv = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, w.zeros + g * w.n + j0 + j)));
#pragma GCC unroll 2
    for (int r = 0; r < RB; ++r) {
      __m512 sum = _mm512_maskz_loadu_ps(m, gacc + r * width + j);
      if constexpr (Asym) sum = _mm512_fnmadd_ps(zv, _mm512_set1_ps(xsum[r * groups + g]), sum);
      const __m512 t = g == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m, total + r * width + j);
      _mm512_mask_storeu_ps(total + r * width + j, m, _mm512_fmadd_ps(sv, sum, t));
    }
  }
}

// The row walk (see row_walk_preferred): one row takes the weight packed row after packed row, columns
// [j0, j0 + width) each, so a thread reads one sequential stream, with the group's running sums (gacc) in L1. Every
// sum sees the same multiply-adds in the same order as in qstrip, so the bits are the same.
template <int BITS, bool Asym, int RB, bool Full>
TORCHMOE_QGEMM_AVX512 inline void qrow_walk_vector(const uint8_t* q, const __m512 (&xv)[RB][2], const __m512& table,
                                                   __mmask16 m, float* gacc, int64_t width) {
  __m512 acc[RB];
  const __m128i bytes = Full ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)) : _mm_maskz_loadu_epi8(m, q);
#pragma GCC unroll 2
  for (int r = 0; r < RB; ++r) acc[r] = Full ? _mm512_loadu_ps(gacc + r * width) : _mm512_maskz_loadu_ps(m, gacc + r * width);
  if constexpr (BITS == 8) {
    const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
#pragma GCC unroll 2
    for (int r = 0; r < RB; ++r) acc[r] = _mm512_fmadd_ps(xv[r][0], wv, acc[r]);
  } else {
    const __m512i b = _mm512_cvtepu8_epi32(bytes);
    const __m512 lo = _mm512_permutexvar_ps(b, table);  // the permute reads the low 4 bits of each lane
    const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
#pragma GCC unroll 2
    for (int r = 0; r < RB; ++r) {
      acc[r] = _mm512_fmadd_ps(xv[r][0], lo, acc[r]);
      acc[r] = _mm512_fmadd_ps(xv[r][1], hi, acc[r]);
    }
  }
#pragma GCC unroll 2
  for (int r = 0; r < RB; ++r) {
    if (Full) {
      _mm512_storeu_ps(gacc + r * width, acc[r]);
    } else {
      _mm512_mask_storeu_ps(gacc + r * width, m, acc[r]);
    }
  }
}

template <int BITS, bool Asym, int RB>
TORCHMOE_QGEMM_AVX512 void qrow_walk_group(const QuantizedMatrix& w, int64_t g, int64_t j0, int64_t width,
                                           const float* x, int64_t ldx, const float* xsum, int64_t groups,
                                           float* gacc, float* total) {
  constexpr int kCodesPerByte = BITS == 8 ? 1 : 2;
  const __m512 table = code_table<Asym>();
  const int64_t full = width / 16 * 16;
  const __mmask16 tail = lane_mask(width - full);
  for (int64_t i = 0; i < RB * width; ++i) gacc[i] = 0.0f;
  const int64_t ahead = walk_prefetch_distance(width, w.n);
  for (int64_t pp = g * w.group_size / kCodesPerByte; pp < (g + 1) * w.group_size / kCodesPerByte; ++pp) {
    const uint8_t* qr = w.q + pp * w.n + j0;
    __m512 xv[RB][2];
#pragma GCC unroll 2
    for (int r = 0; r < RB; ++r) {
      xv[r][0] = _mm512_set1_ps(x[r * ldx + pp * kCodesPerByte]);
      xv[r][1] = _mm512_set1_ps(x[r * ldx + pp * kCodesPerByte + kCodesPerByte - 1]);
    }
    int64_t j = 0;
    for (; j < full; j += 16) {
      if (j % 64 == 0) prefetch_ahead(qr + j, ahead);
      qrow_walk_vector<BITS, Asym, RB, true>(qr + j, xv, table, 0xFFFF, gacc + j, width);
    }
    if (tail) qrow_walk_vector<BITS, Asym, RB, false>(qr + j, xv, table, tail, gacc + j, width);
  }
  finish_group<Asym, RB>(w, g, j0, width, xsum, groups, gacc, total);
}

// The row walk of 4-bit codes for bfloat16 activations on a CPU with AVX-512 BF16 and VBMI: one vdpbf16ps takes
// both codes of a byte (reduction rows p, p + 1) against the pair (x[p], x[p + 1]), in place of two multiply-adds
// and two permutes: the 4-bit codes of a 64-byte load become word indices with one two-source byte permute per 16
// columns, and bfloat16 values with one word permute against a table. x is exact in bfloat16, codes are small
// integers, so both products are exact, and vdpbf16ps adds the odd pair's product first, then the even one's, each
// rounded once: the multiply-adds of qstrip in its order, so the same bits (subnormal inputs aside: vdpbf16ps
// flushes them to zero).
#define TORCHMOE_QGEMM_DOT __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi,fma")))

bool bf16_dot_walk_available() {
  static const bool available = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi");
  return available;
}

bool int8_bf16_dot_enabled() {
  static const bool enabled = __builtin_cpu_supports("avx512bf16");
  return enabled;
}

// Word i: the bfloat16 value of table code i & 15 (code - 8 for the symmetric form).
template <bool Asym>
TORCHMOE_QGEMM_DOT __m512i bf16_code_table() {
  alignas(64) uint16_t words[32];
  for (int i = 0; i < 32; ++i) {
    const float v = static_cast<float>(Asym ? (i & 15) : (i & 15) - 8);
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    words[i] = static_cast<uint16_t>(bits >> 16);
  }
  return _mm512_load_si512(words);
}

// Byte selectors of _mm512_permutex2var_epi8 over (bytes, bytes >> 4 per 16-bit lane) for columns 16v..16v+15:
// word 0 of column c's lane takes the high code of byte c (row p + 1), word 1 the low one (row p); the word
// permute reads the low 5 bits of each word, and the table repeats itself in its upper half, so the neighbour's
// bit above the code does not matter.
TORCHMOE_QGEMM_DOT __m512i code_selector(int v) {
  alignas(64) uint8_t selector[64];
  for (int i = 0; i < 16; ++i) {
    const int column = 16 * v + i;
    selector[4 * i + 0] = static_cast<uint8_t>(64 + column);
    selector[4 * i + 1] = 0;
    selector[4 * i + 2] = static_cast<uint8_t>(column);
    selector[4 * i + 3] = 0;
  }
  return _mm512_load_si512(selector);
}

inline uint32_t bf16_pair(float odd, float even) {  // x is exact in bfloat16: truncation keeps it
  uint32_t hi, lo;
  std::memcpy(&hi, &odd, sizeof(hi));
  std::memcpy(&lo, &even, sizeof(lo));
  return (hi & 0xFFFF0000u) | (lo >> 16);
}

// gacc[r, 0:cols] += the 64 columns' products (cols <= 64; Full: cols == 64) of one packed row.
template <int RB, bool Full>
TORCHMOE_QGEMM_DOT inline void q4_dot_columns(const __m512i bytes, const __m512i (&selector)[4], const __m512i table,
                                              const __m512bh (&xpair)[RB], int64_t cols, float* gacc,
                                              int64_t width) {
  const __m512i high = _mm512_srli_epi16(bytes, 4);
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v) {
    if (!Full && 16 * v >= cols) break;
    const __m512bh codes =
        (__m512bh)_mm512_permutexvar_epi16(_mm512_permutex2var_epi8(bytes, selector[v], high), table);
#pragma GCC unroll 2
    for (int r = 0; r < RB; ++r) {
      float* a = gacc + r * width + 16 * v;
      if constexpr (Full) {
        _mm512_storeu_ps(a, _mm512_dpbf16_ps(_mm512_loadu_ps(a), codes, xpair[r]));
      } else {
        const __mmask16 m = lane_mask(cols - 16 * v);
        _mm512_mask_storeu_ps(a, m, _mm512_dpbf16_ps(_mm512_maskz_loadu_ps(m, a), codes, xpair[r]));
      }
    }
  }
}

template <bool Asym, int RB>
TORCHMOE_QGEMM_DOT void q4_dot_walk_group(const QuantizedMatrix& w, int64_t g, int64_t j0, int64_t width,
                                          const float* x, int64_t ldx, const float* xsum, int64_t groups,
                                          float* gacc, float* total) {
  const __m512i table = bf16_code_table<Asym>();
  const __m512i selector[4] = {code_selector(0), code_selector(1), code_selector(2), code_selector(3)};
  for (int64_t i = 0; i < RB * width; ++i) gacc[i] = 0.0f;
  const int64_t ahead = walk_prefetch_distance(width, w.n);
  for (int64_t pp = g * w.group_size / 2; pp < (g + 1) * w.group_size / 2; ++pp) {
    const uint8_t* qr = w.q + pp * w.n + j0;
    __m512bh xpair[RB];
#pragma GCC unroll 2
    for (int r = 0; r < RB; ++r) {
      xpair[r] = (__m512bh)_mm512_set1_epi32(static_cast<int>(bf16_pair(x[r * ldx + 2 * pp], x[r * ldx + 2 * pp + 1])));
    }
    const int64_t full = width / 64 * 64;
    for (int64_t j = 0; j < full; j += 64) {
      prefetch_ahead(qr + j, ahead);
      q4_dot_columns<RB, true>(_mm512_loadu_si512(qr + j), selector, table, xpair, 64, gacc + j, width);
    }
    if (full < width) {
      const int64_t left = width - full;
      q4_dot_columns<RB, false>(_mm512_maskz_loadu_epi8((__mmask64(1) << left) - 1, qr + full), selector, table,
                                xpair, left, gacc + full, width);
    }
  }
  finish_group<Asym, RB>(w, g, j0, width, xsum, groups, gacc, total);
}

// One row, group after group, on the row walk (the dot-product form where it applies).
template <typename T, int BITS, bool Asym, int RB>
void walk_rows(const QuantizedMatrix& w, int64_t j0, int64_t width, const float* x, int64_t ldx, const float* xsum,
               float* gacc, float* total) {
  const int64_t groups = w.k / w.group_size;
  bool dot = false;
  if constexpr (BITS == 4 && std::is_same_v<T, c10::BFloat16>) dot = bf16_dot_walk_available();
  for (int64_t g = 0; g < groups; ++g) {
    if (dot) {
      q4_dot_walk_group<Asym, RB>(w, g, j0, width, x, ldx, xsum, groups, gacc, total);
    } else {
      qrow_walk_group<BITS, Asym, RB>(w, g, j0, width, x, ldx, xsum, groups, gacc, total);
    }
  }
}

// qstrip for 4-bit codes and bfloat16 x on a CPU with AVX-512 BF16 and VBMI: both codes of a byte in one
// vdpbf16ps against the pair (x[p], x[p + 1]), as in q4_dot_walk_group (64 columns per load, one byte permute and
// one word permute per 16), in place of two float permutes and two multiply-adds per row: the same bits.
template <bool Asym, int RB, bool Full>
TORCHMOE_QGEMM_DOT void qstrip_dot(const BlockArgs& a, int64_t j, int64_t cols, float* gacc, float* total,
                                   int64_t width) {
  constexpr int NV = kVectors<RB>;
  constexpr int kSelectors = NV < 4 ? NV : 4;
  constexpr int kLoads = (NV + 3) / 4;
  if constexpr (Full) cols = 16 * NV;
  const QuantizedMatrix& w = *a.w;
  __mmask16 masks[NV];
  for (int v = 0; v < NV; ++v) masks[v] = lane_mask(cols - 16 * v);
  __mmask64 byte_masks[kLoads];
  for (int l = 0; l < kLoads; ++l) {
    const int64_t left = cols - 64 * l;
    byte_masks[l] = left >= 64 ? ~__mmask64(0) : left <= 0 ? __mmask64(0) : (__mmask64(1) << left) - 1;
  }
  const __m512i table = bf16_code_table<Asym>();
  __m512i selector[kSelectors];
  for (int v = 0; v < kSelectors; ++v) selector[v] = code_selector(v);
  const bool to_l2 = strip_prefetch_to_l2();
  __m512 acc[RB][NV];
  start_strip<RB, NV>(a, masks, gacc, width, acc);
  for (int64_t pp = a.p0 >> 1; pp < (a.p0 + a.kb) >> 1; ++pp) {
    const uint8_t* qr = w.q + pp * w.n + j;
    prefetch_strip<NV>(qr, w.n, to_l2);
#pragma GCC unroll 4
    for (int l = 0; l < kLoads; ++l) {
      const __m512i bytes = Full && NV >= 4 ? _mm512_loadu_si512(qr + 64 * l) : _mm512_maskz_loadu_epi8(byte_masks[l], qr + 64 * l);
      const __m512i high = _mm512_srli_epi16(bytes, 4);
#pragma GCC unroll 4
      for (int v = 0; v < kSelectors; ++v) {
        const __m512bh codes =
            (__m512bh)_mm512_permutexvar_epi16(_mm512_permutex2var_epi8(bytes, selector[v], high), table);
#pragma GCC unroll 8
        for (int r = 0; r < RB; ++r) {
          const __m512bh xpair = (__m512bh)_mm512_set1_epi32(static_cast<int>(a.xpairs[r * a.ld_pairs + pp]));
          acc[r][4 * l + v] = _mm512_dpbf16_ps(acc[r][4 * l + v], codes, xpair);
        }
      }
    }
  }
  finish_strip<Asym, RB, NV>(a, j, masks, acc, gacc, total, width);
}

// qstrip for 8-bit codes and bfloat16 x on a CPU with AVX-512 BF16: the codes of reduction rows p and p + 1 as
// one vector of bfloat16 pairs (int8 values are exact in bfloat16, and a float of one has its low 16 bits zero), then
// one vdpbf16ps per row of x against (x[p], x[p + 1]) in place of two multiply-adds: the same bits, as in
// q4_dot_walk_group. From 3 rows up a strip is bound by its multiply-adds, which this halves. kb is even (the caller
// takes it for even group sizes only).
template <int RB, bool Full>
TORCHMOE_QGEMM_DOT void qstrip8_dot(const BlockArgs& a, int64_t j, int64_t cols, float* gacc, float* total,
                                    int64_t width) {
  constexpr int NV = kVectors<RB>;
  if constexpr (Full) cols = 16 * NV;
  const QuantizedMatrix& w = *a.w;
  __mmask16 masks[NV];
  for (int v = 0; v < NV; ++v) masks[v] = lane_mask(cols - 16 * v);
  const bool to_l2 = strip_prefetch_to_l2();
  __m512 acc[RB][NV];
  start_strip<RB, NV>(a, masks, gacc, width, acc);
  for (int64_t p = a.p0; p < a.p0 + a.kb; p += 2) {
    const int8_t* row0 = reinterpret_cast<const int8_t*>(w.q) + p * w.n + j;
    const int8_t* row1 = row0 + w.n;
    prefetch_strip<NV>(reinterpret_cast<const uint8_t*>(row0), w.n, to_l2);
    prefetch_strip<NV>(reinterpret_cast<const uint8_t*>(row1), w.n, to_l2);
    __m512bh xpair[RB];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) xpair[r] = (__m512bh)_mm512_set1_epi32(static_cast<int>(a.xpairs[r * a.ld_pairs + (p >> 1)]));
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      // word 1 of a lane: row p's code, word 0: row p + 1's (vdpbf16ps adds the word-1 product first)
      const __m512i even = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(masks[v], row0 + 16 * v))));
      const __m512i odd = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(masks[v], row1 + 16 * v))));
      const __m512bh codes = (__m512bh)_mm512_or_si512(even, _mm512_srli_epi32(odd, 16));
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], codes, xpair[r]);
    }
  }
  finish_strip<false, RB, NV>(a, j, masks, acc, gacc, total, width);
}

// One strip: the vdpbf16ps form where the caller made the bfloat16 pairs of x, else the multiply-adds.
template <int BITS, bool Asym, int RB, bool Full>
void any_strip(const BlockArgs& a, int64_t j, int64_t cols, float* gacc, float* total, int64_t width) {
  if (a.xpairs != nullptr) {
    if constexpr (BITS == 8) {
      return qstrip8_dot<RB, Full>(a, j, cols, gacc, total, width);
    } else {
      return qstrip_dot<Asym, RB, Full>(a, j, cols, gacc, total, width);
    }
  }
  qstrip<BITS, Asym, RB, Full>(a, j, cols, gacc, total, width);
}

template <int BITS, bool Asym, int RB>
void block_strips(const BlockArgs& a, int64_t j0, int64_t width, float* gacc, float* total) {
  constexpr int64_t kWidth = 16 * kVectors<RB>;
  for (int64_t c = 0; c < width; c += kWidth) {
    const int64_t cols = std::min(kWidth, width - c);
    if (cols == kWidth) {
      any_strip<BITS, Asym, RB, true>(a, j0 + c, cols, gacc + c, total + c, width);
    } else {
      any_strip<BITS, Asym, RB, false>(a, j0 + c, cols, gacc + c, total + c, width);
    }
  }
}

// k-block after k-block (never crossing a group), every group of rows takes the block's strips.
template <int BITS, bool Asym>
void walk_blocks(const QuantizedMatrix& w, int64_t rows, int64_t j0, int64_t width, const float* x, int64_t ldx,
                 const float* xsum, const uint32_t* xpairs, float* gacc, float* total) {
  const int64_t groups = w.k / w.group_size;
  BlockArgs a{&w, 0, 0, 0, false, false, false, nullptr, ldx, nullptr, groups, nullptr, w.k / 2};
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
        a.xsum = Asym ? xsum + r0 * groups : nullptr;
        a.xpairs = xpairs != nullptr ? xpairs + r0 * a.ld_pairs : nullptr;
        with_group_rows(static_cast<int>(std::min<int64_t>(kMaxGroupRows, rows - r0)), [&](auto rb) {
          block_strips<BITS, Asym, decltype(rb)::value>(a, j0, width, gacc + r0 * width, total + r0 * width);
        });
      }
    }
  }
}

template <typename T, int BITS, bool Asym>
void quantized_skinny_mm_avx512(const QuantizedMatrix& w, int64_t rows, int64_t j0, int64_t j1, const float* x,
                                int64_t ldx, T* out, int64_t ldo) {
  const int64_t width = j1 - j0;
  thread_local std::vector<float> group_buffer, total_buffer;
  group_buffer.resize(static_cast<size_t>(rows * width));
  total_buffer.resize(static_cast<size_t>(rows * width));
  const auto xsum = Asym ? group_sums(w, rows, x, ldx) : std::vector<float>();
  float* gacc = group_buffer.data();
  float* total = total_buffer.data();
  if (rows == 1 && row_walk_preferred(true)) {
    walk_rows<T, BITS, Asym, 1>(w, j0, width, x, ldx, xsum.data(), gacc, total);
  } else {
    // bfloat16 x (exact in the float32 x here) as the pairs of the dot-product strips
    thread_local std::vector<uint32_t> pairs;
    bool dot = false;
    if constexpr (BITS == 4 && std::is_same_v<T, c10::BFloat16>) dot = bf16_dot_walk_available();
    // 8 bits: pairs of reduction rows, so an even group size (every block then starts on an even row); from 3
    // rows, where the multiply-adds bind
    if constexpr (BITS == 8 && std::is_same_v<T, c10::BFloat16>) {
      dot = rows >= 3 && q8_bf16_dot_available(w.group_size);
    }
    if (dot) {
      pairs.resize(static_cast<size_t>(rows * (w.k / 2)));
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t i = 0; i < w.k / 2; ++i) pairs[r * (w.k / 2) + i] = bf16_pair(x[r * ldx + 2 * i], x[r * ldx + 2 * i + 1]);
      }
    }
    walk_blocks<BITS, Asym>(w, rows, j0, width, x, ldx, xsum.data(), dot ? pairs.data() : nullptr, gacc, total);
  }
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
  const __m512 table = code_table<Asym>();
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

bool q4_bf16_dot_available() {
#if TORCHMOE_HAVE_QGEMM_AVX512
  return skinny_avx512_available() && bf16_dot_walk_available();
#else
  return false;
#endif
}

bool q8_bf16_dot_available(int64_t group_size) {
#if TORCHMOE_HAVE_QGEMM_AVX512
  return skinny_avx512_available() && int8_bf16_dot_enabled() && group_size % 2 == 0;
#else
  (void)group_size;
  return false;
#endif
}

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
