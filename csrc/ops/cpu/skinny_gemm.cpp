// skinny_mm: w is read in k-blocks of kBlockRows rows; each block is walked in column strips (16 * kVectors<RB>
// columns), row after row, by every group of at most 8 rows while it is in cache. A strip's accumulators (RB
// rows x kVectors<RB> vectors) stay in registers within a block and in a float32 buffer between blocks. bfloat16
// x and w on a CPU with AVX-512 BF16 take w's rows two at a time, one vdpbf16ps per row of x (strip_dot: the same
// bits as the multiply-adds).
// skinny_mm_transposed: w's rows are contiguous along the reduction; groups of kDotGroupRows rows are read
// piece by piece (kDotRows<RB> rows at a time against every row of g, vector accumulators reduced at the end).
// Both keep about 16 sequential streams per thread, which the hardware prefetcher follows.
#include "ops/cpu/skinny_gemm.h"

#include "ops/cpu/lane_mask.h"
#include "ops/cpu/sgemm.h"

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
bool is_amd() {
#if TORCHMOE_HAVE_SKINNY_AVX512
  static const bool amd = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") != 0;
  }();
  return amd;
#else
  return false;
#endif
}
}  // namespace

// Whether one row walks w row by row (row_walk) rather than in strips: on AMD Zen 4/5 a thread streamed from
// memory at about 0.6 of x.sum()'s rate through the strips' 16 rows with L1 prefetches and at its full rate through
// one stream (2026-12-06, 2-core EPYC: 11-12 against 16-20 GB/s for 1 x 2048 by 2048 x 768 float32 from memory).
// With the strips' prefetches into L2 (strip_prefetch_to_l2) two rows walked lose to their strips (the walk loads
// and stores its sums in L1 per 16 columns and row), and so does one row of packed int8/int4 codes, whose decode
// already takes many instructions per 64-byte load: 2026-12-07, same VM, bench_decode at T = 1, forced walk /
// default, three alternated runs, ms: Qwen3 int8 1.68-2.34 / 1.23-1.97, int4 0.98-1.20 / 0.81-0.82;
// Mixtral-routing int8 0.40-0.47 / 0.30-0.34, int4 0.26-0.28 / 0.20-0.23. Float weights of one row still walk: the
// bfloat16 Qwen3 layer at T = 1 took 2.68-3.06 ms walked against 2.91-3.68 through the strips (though the product
// alone, 8 of 128 experts from memory, went the other way: 659-920 against 547-715 us).
bool row_walk_preferred(bool quantized_weight) {
  static const int forced = [] {
    const char* env = std::getenv("TORCHMOE_SKINNY_ROW_WALK");
    if (env != nullptr && *env != '\0') return env[0] == '1' ? 1 : 0;
    return -1;
  }();
  if (forced >= 0) return forced == 1;
  return !quantized_weight && is_amd();
}

bool strip_prefetch_to_l2() { return is_amd(); }

namespace {

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

// out[r, c0:c1] = 0 for r < rows: an empty reduction (the kernels below assume k > 0).
template <typename T>
void zero_columns(int64_t rows, int64_t c0, int64_t c1, T* out, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r) std::fill(out + r * ldo + c0, out + r * ldo + c1, static_cast<T>(0.0f));
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

template <typename T, typename O>
void skinny_mm_transposed_portable(int64_t rows, int64_t k, int64_t i0, int64_t i1, const float* g, int64_t ldg,
                                   const T* w, int64_t ldw, O* out, int64_t ldo) {
  for (int64_t i = i0; i < i1; ++i) {
    const T* wr = w + i * ldw;
    for (int64_t r = 0; r < rows; ++r) {
      float acc = 0.0f;
      for (int64_t j = 0; j < k; ++j) acc += g[r * ldg + j] * to_float(wr[j]);
      out[r * ldo + i] = static_cast<O>(acc);
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

template <int RB>
// Vectors per strip row: RB * kVectors <= 16 accumulators, the widest strip that leaves registers for w.
constexpr int kVectors = RB == 1 ? 16 : RB == 2 ? 8 : RB <= 4 ? 4 : 2;

// Rows of w per k-block. A strip walks the block's rows, then the next strip the same rows: the block's rows
// are a few sequential streams the hardware prefetcher follows (one strip down all of k would touch a new page
// per row and defeat it when the strips are narrow).
constexpr int64_t kBlockRows = 16;

// acc[r, 0:cols] (row stride ld_acc) += x[r, 0:kb] @ w[0:kb, 0:cols] for r < RB (acc zero first when `first`);
// Full: cols is the whole strip (no masks to keep, which would not fit the mask registers).
template <typename T, int RB, bool Full>
TORCHMOE_SKINNY_AVX512 void strip(int64_t kb, const float* x, int64_t ldx, const T* w, int64_t ldw, int64_t cols,
                                  float* acc_io, int64_t ld_acc, bool first) {
  constexpr int NV = kVectors<RB>;
  if constexpr (Full) cols = 16 * NV;
  constexpr int kLines = static_cast<int>((16 * NV * sizeof(T) + 63) / 64);
  const bool to_l2 = strip_prefetch_to_l2();
  __mmask16 masks[NV];
  for (int v = 0; v < NV; ++v) masks[v] = lane_mask(cols - 16 * v);
  __m512 acc[RB][NV];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(masks[v], acc_io + r * ld_acc + 16 * v);
    }
  }
  for (int64_t p = 0; p < kb; ++p) {
    const T* wr = w + p * ldw;
    // the strip's lines of the next block's row: narrow strips (several rows) cross into a new page every row,
    // too short a stream for the hardware prefetcher alone
    const char* ahead = reinterpret_cast<const char*>(wr + kBlockRows * ldw);  // prefetches never fault
#pragma GCC unroll 16
    for (int l = 0; l < kLines; ++l) prefetch_strip_line(ahead + 64 * l, to_l2);
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
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(acc_io + r * ld_acc + 16 * v, masks[v], acc[r][v]);
  }
}

// acc[0:RB, :] (row stride width) (+)= x[0:RB, 0:kb] @ w[0:kb, 0:width], strip after strip.
template <typename T, int RB>
void block_strips(int64_t kb, int64_t width, const float* x, int64_t ldx, const T* w, int64_t ldw, float* acc,
                  bool first) {
  constexpr int64_t kWidth = 16 * kVectors<RB>;
  for (int64_t j = 0; j < width; j += kWidth) {
    const int64_t cols = std::min(kWidth, width - j);
    if (cols == kWidth) {
      strip<T, RB, true>(kb, x, ldx, w + j, ldw, cols, acc + j, width, first);
    } else {
      strip<T, RB, false>(kb, x, ldx, w + j, ldw, cols, acc + j, width, first);
    }
  }
}

// strip for bfloat16 w and x on a CPU with AVX-512 BF16: the rows p and p + 1 of w interleaved into dword pairs (one
// word permute per 16 columns), then one vdpbf16ps per row of x against the pair (x[p], x[p + 1]) in place of two
// multiply-adds. vdpbf16ps adds the row-p product, then the row-(p + 1) one, each rounded once, and products of
// bfloat16 values are exact: the multiply-adds of strip in its order, so the same bits (subnormal inputs aside,
// which it reads as zero). An odd last row of the block takes strip's multiply-add. xpairs: row r's pair i at
// xpairs[r * ld_pairs + i], from the block's first row (an even row of x).
#define TORCHMOE_SKINNY_DOT __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma")))

bool bf16_dot_available() {
  static const bool available = __builtin_cpu_supports("avx512bf16");
  return available;
}

template <int RB, bool Full>
TORCHMOE_SKINNY_DOT void strip_dot(int64_t kb, const float* x, int64_t ldx, const uint32_t* xpairs, int64_t ld_pairs,
                                   const c10::BFloat16* w, int64_t ldw, int64_t cols, float* acc_io, int64_t ld_acc,
                                   bool first) {
  constexpr int NV = kVectors<RB>;
  constexpr int NU = NV / 2;  // 32-column loads per row
  if constexpr (Full) cols = 16 * NV;
  constexpr int kLines = static_cast<int>((16 * NV * sizeof(c10::BFloat16) + 63) / 64);
  const bool to_l2 = strip_prefetch_to_l2();
  // word 2i of a pair vector: column i of row p + 1 (the first source), word 2i + 1: of row p (the second)
  alignas(64) static constexpr uint16_t kLowColumns[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                                            37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                                            11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i low_columns = _mm512_load_si512(kLowColumns);
  const __m512i high_columns = _mm512_add_epi16(low_columns, _mm512_set1_epi16(16));
  __mmask16 masks[NV];
  for (int v = 0; v < NV; ++v) masks[v] = lane_mask(cols - 16 * v);
  __mmask32 row_masks[NU];
  for (int u = 0; u < NU; ++u) row_masks[u] = lane_mask32(cols - 32 * u);
  __m512 acc[RB][NV];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(masks[v], acc_io + r * ld_acc + 16 * v);
    }
  }
  int64_t p = 0;
  for (; p + 1 < kb; p += 2) {
    const c10::BFloat16* row0 = w + p * ldw;
    const c10::BFloat16* row1 = row0 + ldw;
    const char* ahead0 = reinterpret_cast<const char*>(row0 + kBlockRows * ldw);  // as in strip
    const char* ahead1 = reinterpret_cast<const char*>(row1 + kBlockRows * ldw);
#pragma GCC unroll 16
    for (int l = 0; l < kLines; ++l) {
      prefetch_strip_line(ahead0 + 64 * l, to_l2);
      prefetch_strip_line(ahead1 + 64 * l, to_l2);
    }
#pragma GCC unroll 8
    for (int u = 0; u < NU; ++u) {
      const __m512i a = Full ? _mm512_loadu_si512(row0 + 32 * u) : _mm512_maskz_loadu_epi16(row_masks[u], row0 + 32 * u);
      const __m512i b = Full ? _mm512_loadu_si512(row1 + 32 * u) : _mm512_maskz_loadu_epi16(row_masks[u], row1 + 32 * u);
      const __m512bh low = (__m512bh)_mm512_permutex2var_epi16(b, low_columns, a);
      const __m512bh high = (__m512bh)_mm512_permutex2var_epi16(b, high_columns, a);
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) {
        const __m512bh xpair = (__m512bh)_mm512_set1_epi32(static_cast<int>(xpairs[r * ld_pairs + p / 2]));
        acc[r][2 * u] = _mm512_dpbf16_ps(acc[r][2 * u], low, xpair);
        acc[r][2 * u + 1] = _mm512_dpbf16_ps(acc[r][2 * u + 1], high, xpair);
      }
    }
  }
  if (p < kb) {
    const c10::BFloat16* wr = w + p * ldw;
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
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(acc_io + r * ld_acc + 16 * v, masks[v], acc[r][v]);
  }
}

template <int RB>
void block_strips_dot(int64_t kb, int64_t width, const float* x, int64_t ldx, const uint32_t* xpairs,
                      int64_t ld_pairs, const c10::BFloat16* w, int64_t ldw, float* acc, bool first) {
  constexpr int64_t kWidth = 16 * kVectors<RB>;
  for (int64_t j = 0; j < width; j += kWidth) {
    const int64_t cols = std::min(kWidth, width - j);
    if (cols == kWidth) {
      strip_dot<RB, true>(kb, x, ldx, xpairs, ld_pairs, w + j, ldw, cols, acc + j, width, first);
    } else {
      strip_dot<RB, false>(kb, x, ldx, xpairs, ld_pairs, w + j, ldw, cols, acc + j, width, first);
    }
  }
}

// acc[0:RB, 0:width] = x[0:RB, 0:k] @ w[0:k, 0:width], w walked row after row: one sequential stream per thread
// (per page where the columns are a part of each row), the sums in an L1 buffer. The same fused multiply-adds in
// the same order as the strips (each element one sum along p), so the same bits.
template <typename T, int RB>
TORCHMOE_SKINNY_AVX512 void row_walk(int64_t k, int64_t width, const float* x, int64_t ldx, const T* w, int64_t ldw,
                                     float* acc) {
  for (int64_t i = 0; i < RB * width; ++i) acc[i] = 0.0f;
  const int64_t ahead = walk_prefetch_distance(width * int64_t{sizeof(T)}, ldw * int64_t{sizeof(T)});
  constexpr int64_t kLineElements = 64 / sizeof(T);
  for (int64_t p = 0; p < k; ++p) {
    const T* wr = w + p * ldw;
    __m512 xv[RB];
#pragma GCC unroll 2
    for (int r = 0; r < RB; ++r) xv[r] = _mm512_set1_ps(x[r * ldx + p]);
    for (int64_t j = 0; j < width; j += 16) {
      if (j % kLineElements == 0) prefetch_ahead(wr + j, ahead);
      const __mmask16 m = lane_mask(width - j);
      const __m512 wv = load16(wr + j, m);
#pragma GCC unroll 2
      for (int r = 0; r < RB; ++r) {
        float* a = acc + r * width + j;
        _mm512_mask_storeu_ps(a, m, _mm512_fmadd_ps(xv[r], wv, _mm512_maskz_loadu_ps(m, a)));
      }
    }
  }
}

// k-block after k-block, every group of rows (kMaxGroupRows at a time) takes the block while it is in cache; the
// float32 sums of the column range wait in a thread-local buffer between blocks (each element still one sum
// along p, in order).
template <typename T>
void skinny_mm_avx512(int64_t rows, int64_t k, int64_t j0, int64_t j1, const float* x, int64_t ldx, const T* w,
                      int64_t ldw, T* out, int64_t ldo) {
  const int64_t width = j1 - j0;
  thread_local std::vector<float> buffer;
  buffer.resize(static_cast<size_t>(rows * width));
  float* acc = buffer.data();
  if (rows == 1 && row_walk_preferred(false)) {
    row_walk<T, 1>(k, width, x, ldx, w + j0, ldw, acc);
  } else {
    // bfloat16 x (exact in the float32 x here) as the pairs of the dot-product strips
    bool dot = false;
    if constexpr (std::is_same_v<T, c10::BFloat16>) dot = bf16_dot_available();
    thread_local std::vector<uint32_t> pairs;
    const int64_t ld_pairs = (k + 1) / 2;
    if (dot) {
      pairs.resize(static_cast<size_t>(rows * ld_pairs));
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t i = 0; i < ld_pairs; ++i) {
          const float even = x[r * ldx + 2 * i];
          const float odd = 2 * i + 1 < k ? x[r * ldx + 2 * i + 1] : 0.0f;
          uint32_t hi, lo;
          std::memcpy(&hi, &even, sizeof(hi));
          std::memcpy(&lo, &odd, sizeof(lo));
          pairs[r * ld_pairs + i] = (hi & 0xFFFF0000u) | (lo >> 16);  // word 1: x[2i], word 0: x[2i + 1]
        }
      }
    }
    for (int64_t p0 = 0; p0 < k; p0 += kBlockRows) {
      const int64_t kb = std::min(kBlockRows, k - p0);
      for (int64_t r0 = 0; r0 < rows; r0 += kMaxGroupRows) {
        if constexpr (std::is_same_v<T, c10::BFloat16>) {
          if (dot) {
            with_group_rows(static_cast<int>(std::min<int64_t>(kMaxGroupRows, rows - r0)), [&](auto rb) {
              block_strips_dot<decltype(rb)::value>(kb, width, x + r0 * ldx + p0, ldx,
                                                    pairs.data() + r0 * ld_pairs + p0 / 2, ld_pairs, w + p0 * ldw + j0,
                                                    ldw, acc + r0 * width, p0 == 0);
            });
            continue;
          }
        }
        with_group_rows(static_cast<int>(std::min<int64_t>(kMaxGroupRows, rows - r0)), [&](auto rb) {
          block_strips<T, decltype(rb)::value>(kb, width, x + r0 * ldx + p0, ldx, w + p0 * ldw + j0, ldw,
                                               acc + r0 * width, p0 == 0);
        });
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < width; ++c) out[r * ldo + j0 + c] = static_cast<T>(acc[r * width + c]);
  }
}

// Rows of w per group and reduction elements per piece in skinny_mm_transposed: a group's rows are read piece
// by piece, row after row, so each thread keeps kDotGroupRows sequential streams going (the prefetcher's
// concurrency, as kBlockRows does for skinny_mm) rather than one or two; every group of g rows takes a piece
// while it is in cache.
constexpr int64_t kDotGroupRows = 16;
template <typename T>
constexpr int64_t kDotPiece = 1024 / sizeof(T);  // 1 KiB of each row
// g rows per pass over w (more rows pass over w again).
constexpr int64_t kDotPanelRows = 2 * kMaxGroupRows;

// w rows per pass of dot_pieces: RB * kDotRows<RB> <= 16 accumulators.
template <int RB>
constexpr int kDotRows = RB <= 4 ? 4 : 2;

// For the group's w rows i (kDotRows<RB> at a time; a short last pass repeats its last row), the vector
// accumulators partial[i][r] of g[r, :] . w[i, :] (zero first when `first`) += g[r, j0:j1] * w[i, j0:j1]
// lane-wise, r < RB.
template <typename T, int RB>
TORCHMOE_SKINNY_AVX512 void dot_pieces(int64_t group, int64_t j0, int64_t j1, int64_t k, const float* g,
                                       int64_t ldg, const T* w, int64_t ldw, bool first, __m512* partial) {
  constexpr int NW = kDotRows<RB>;
  for (int64_t i0 = 0; i0 < group; i0 += NW) {
    const T* wr[NW];
    for (int u = 0; u < NW; ++u) wr[u] = w + std::min<int64_t>(i0 + u, group - 1) * ldw;
    __m512 acc[NW][RB];
#pragma GCC unroll 4
    for (int u = 0; u < NW; ++u) {
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) {
        acc[u][r] = first ? _mm512_setzero_ps() : partial[(i0 + u) * kDotPanelRows + r];
      }
    }
    for (int64_t j = j0; j < j1; j += 16) {
      const __mmask16 m = lane_mask(k - j);
      if ((j * sizeof(T)) % 64 == 0) {  // these rows' next piece, in L2 before the group comes back to it
#pragma GCC unroll 4
        for (int u = 0; u < NW; ++u) {
          _mm_prefetch(reinterpret_cast<const char*>(wr[u] + j + kDotPiece<T>), _MM_HINT_T1);
        }
      }
      __m512 wv[NW];
#pragma GCC unroll 4
      for (int u = 0; u < NW; ++u) wv[u] = load16(wr[u] + j, m);
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) {
        const __m512 gv = _mm512_maskz_loadu_ps(m, g + r * ldg + j);
#pragma GCC unroll 4
        for (int u = 0; u < NW; ++u) acc[u][r] = _mm512_fmadd_ps(gv, wv[u], acc[u][r]);
      }
    }
#pragma GCC unroll 4
    for (int u = 0; u < NW; ++u) {
      if (i0 + u >= group) break;
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) partial[(i0 + u) * kDotPanelRows + r] = acc[u][r];
    }
  }
}

// out[r, i] = g[r, :] . w[i, :] for r < rows, i0 <= i < i1: each sum runs in vector lanes along the reduction,
// then one fixed lane tree, whatever the group, piece and panel sizes.
template <typename T, typename O>
TORCHMOE_SKINNY_AVX512 void skinny_mm_transposed_avx512(int64_t rows, int64_t k, int64_t i0, int64_t i1,
                                                        const float* g, int64_t ldg, const T* w, int64_t ldw, O* out,
                                                        int64_t ldo) {
  alignas(64) __m512 partial[kDotGroupRows][kDotPanelRows];  // [w row of the group][g row of the panel]
  for (int64_t p0 = 0; p0 < rows; p0 += kDotPanelRows) {
    const int64_t panel = std::min(kDotPanelRows, rows - p0);
    for (int64_t ib = i0; ib < i1; ib += kDotGroupRows) {
      const int64_t group = std::min(kDotGroupRows, i1 - ib);
      for (int64_t j0 = 0; j0 < k; j0 += kDotPiece<T>) {
        const int64_t j1 = std::min(k, j0 + kDotPiece<T>);
        for (int64_t r0 = 0; r0 < panel; r0 += kMaxGroupRows) {
          with_group_rows(static_cast<int>(std::min<int64_t>(kMaxGroupRows, panel - r0)), [&](auto rb) {
            dot_pieces<T, decltype(rb)::value>(group, j0, j1, k, g + (p0 + r0) * ldg, ldg, w + ib * ldw, ldw,
                                               j0 == 0, &partial[0][r0]);
          });
        }
      }
      for (int64_t i = 0; i < group; ++i) {
        for (int64_t r = 0; r < panel; ++r) {
          out[(p0 + r) * ldo + ib + i] = static_cast<O>(_mm512_reduce_add_ps(partial[i][r]));
        }
      }
    }
  }
}
#pragma GCC diagnostic pop
#endif

}  // namespace

bool skinny_avx512_available() {
#if TORCHMOE_HAVE_SKINNY_AVX512
  // fast_sgemm_available(): AVX-512F, and TORCHMOE_DISABLE_AVX512 read as the GEMM reads it
  static const bool available = fast_sgemm_available() && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl");
  return available;
#else
  return false;
#endif
}

template <typename T>
void skinny_mm(int64_t rows, int64_t k, int64_t j0, int64_t j1, const T* x, int64_t ldx, const T* w, int64_t ldw,
               T* out, int64_t ldo) {
  if (rows <= 0 || j1 <= j0) return;
  if (k == 0) return zero_columns(rows, j0, j1, out, ldo);
  int64_t ldxf = 0;
  const float* xf = as_float(x, rows, k, ldx, ldxf);
#if TORCHMOE_HAVE_SKINNY_AVX512
  if (skinny_avx512_available()) return skinny_mm_avx512(rows, k, j0, j1, xf, ldxf, w, ldw, out, ldo);
#endif
  skinny_mm_portable(rows, k, j0, j1, xf, ldxf, w, ldw, out, ldo);
}

namespace {
template <typename G, typename T, typename O>
void transposed_any(int64_t rows, int64_t k, int64_t i0, int64_t i1, const G* g, int64_t ldg, const T* w,
                    int64_t ldw, O* out, int64_t ldo) {
  if (rows <= 0 || i1 <= i0) return;
  if (k == 0) return zero_columns(rows, i0, i1, out, ldo);
  int64_t ldgf = 0;
  const float* gf = as_float(g, rows, k, ldg, ldgf);
#if TORCHMOE_HAVE_SKINNY_AVX512
  if (skinny_avx512_available()) return skinny_mm_transposed_avx512(rows, k, i0, i1, gf, ldgf, w, ldw, out, ldo);
#endif
  skinny_mm_transposed_portable(rows, k, i0, i1, gf, ldgf, w, ldw, out, ldo);
}
}  // namespace

template <typename T>
void skinny_mm_transposed(int64_t rows, int64_t k, int64_t i0, int64_t i1, const T* g, int64_t ldg, const T* w,
                          int64_t ldw, T* out, int64_t ldo) {
  transposed_any(rows, k, i0, i1, g, ldg, w, ldw, out, ldo);
}

template <typename G, typename T>
void skinny_mm_transposed_float_out(int64_t rows, int64_t k, int64_t i0, int64_t i1, const G* g, int64_t ldg,
                                    const T* w, int64_t ldw, float* out, int64_t ldo) {
  transposed_any(rows, k, i0, i1, g, ldg, w, ldw, out, ldo);
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

#define TORCHMOE_INSTANTIATE_FLOAT_OUT(G, T)                                                                   \
  template void skinny_mm_transposed_float_out<G, T>(int64_t, int64_t, int64_t, int64_t, const G*, int64_t, \
                                                     const T*, int64_t, float*, int64_t);
#define TORCHMOE_INSTANTIATE_FLOAT_OUT_FOR(G)        \
  TORCHMOE_INSTANTIATE_FLOAT_OUT(G, float)           \
  TORCHMOE_INSTANTIATE_FLOAT_OUT(G, c10::BFloat16)   \
  TORCHMOE_INSTANTIATE_FLOAT_OUT(G, c10::Half)
TORCHMOE_INSTANTIATE_FLOAT_OUT_FOR(float)
TORCHMOE_INSTANTIATE_FLOAT_OUT_FOR(c10::BFloat16)
TORCHMOE_INSTANTIATE_FLOAT_OUT_FOR(c10::Half)
#undef TORCHMOE_INSTANTIATE_FLOAT_OUT_FOR
#undef TORCHMOE_INSTANTIATE_FLOAT_OUT

}  // namespace torchmoe::cpu
