// Products with a few rows (a decode step's tokens on an expert): out = x @ w and out = g @ w^T for x / g with
// at most kSkinnyMaxRows rows, for grouped_mm's CPU kernel.
//
// Why not the GEMM: with a few rows a product is one pass over w, so its time is the time to read w. A GEMM
// packs w into panels first (a copy of w, read and written, for a few multiply-adds per element); these
// kernels read w straight from memory, once, as stored (float32, bfloat16 or float16, converted in registers,
// multiply-adds in float32), with the rows' values and accumulators in registers.
//
// Every output element is one float32 sum in a fixed order (along the reduction, in vector lanes then a fixed
// tree for the transposed form), whatever the column range a call covers: callers may split the columns over
// threads freely without changing a result bit.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace torchmoe::cpu {

// grouped_mm runs an expert with 1..kSkinnyMaxRows rows on these kernels.
constexpr int64_t kSkinnyMaxRows = 16;

// The skinny kernels keep up to kMaxGroupRows rows' accumulators in registers at once (a larger expert takes its
// rows a group at a time). with_group_rows(rows, fn) calls fn(std::integral_constant<int, RB>{}) with RB = rows
// (1..kMaxGroupRows): the row count as a template argument.
constexpr int kMaxGroupRows = 8;

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
    default: fn(std::integral_constant<int, kMaxGroupRows>{}); break;
  }
}

// True when the AVX-512 kernels run (AVX-512 F, BW and VL, and TORCHMOE_DISABLE_AVX512 unset or "0"); else a
// portable C++ version does the same sums.
bool skinny_avx512_available();

// Whether products of one row walk the weight row after row (one sequential stream per thread) rather than in
// strips of many rows: for float weights on AMD, never for packed int8/int4 ones (TORCHMOE_SKINNY_ROW_WALK=0/1 forces
// either, for every weight).
bool row_walk_preferred(bool quantized_weight);

// Where the strips prefetch the next k-block's lines: into L2 on AMD, into L1 elsewhere (as tuned on Intel). A
// block ahead is 16 rows of a thread's columns, 12-24 KiB for a Qwen3 expert's half on 2 threads: most of a 32 KiB
// L1. On a 2-core Zen 4 (2026-12-07, 8 of 128 Qwen3 experts of 2048 x 1536 from memory, 2 threads, builds
// alternated) the L1 prefetches held the strips at 15-22 GB/s; into L2 two-row products read 26-36 GB/s, as fast
// as the one-row walk, and faster than a two-row walk (2.2-2.8 ms against 1.4-1.7 ms in bfloat16).
bool strip_prefetch_to_l2();

// A prefetch of the strip line p (an address only: it never faults) into L2 or L1.
inline void prefetch_strip_line(const void* p, bool to_l2) {
  if (to_l2) {
    __builtin_prefetch(p, /*rw=*/0, /*locality=*/2);
  } else {
    __builtin_prefetch(p, /*rw=*/0, /*locality=*/3);
  }
}

// How far ahead a row walk prefetches into L2, in bytes of its own stream: about 4 KiB, as whole rows of the
// walked column range (row_bytes each, row_stride bytes apart), so the lines fetched are the walk's own. The
// hardware prefetcher alone leaves the 8-bit and 4-bit walks, which run many instructions per 64-byte load, with
// few loads in flight. 2-core Zen 4 VM, whole layers, 2 threads, builds alternated (bench_decode, min of 2 runs):
// Qwen3 int8 1.85 -> 1.33 ms at one token, 3.05 -> 2.58 at two; int4 0.90 -> 0.84 and 1.86 -> 1.58; Mixtral-routing
// int8 0.39 -> 0.29; bfloat16 within the noise (a flat 16 KiB or a prefetch into L1 did no better).
inline int64_t walk_prefetch_distance(int64_t row_bytes, int64_t row_stride) {
  constexpr int64_t kBytesAhead = 4096;
  return (kBytesAhead + row_bytes - 1) / std::max<int64_t>(row_bytes, 1) * row_stride;
}

// A prefetch into L2 of the line `ahead` bytes past p (an address only: past the end of w it fetches nothing useful,
// and forms no out-of-bounds pointer).
inline void prefetch_ahead(const void* p, int64_t ahead) {
  const uintptr_t line = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(ahead);
  __builtin_prefetch(reinterpret_cast<const void*>(line), /*rw=*/0, /*locality=*/2);
}

// out[r, j] = sum_p x[r, p] * w[p, j] for r < rows, j0 <= j < j1. x [rows, k] (row stride ldx), w [k, *]
// (row stride ldw), out [rows, *] (row stride ldo), all of T (float, c10::BFloat16 or c10::Half).
template <typename T>
void skinny_mm(int64_t rows, int64_t k, int64_t j0, int64_t j1, const T* x, int64_t ldx, const T* w, int64_t ldw,
               T* out, int64_t ldo);

// out[r, i] = sum_j g[r, j] * w[i, j] for r < rows, i0 <= i < i1 (g @ w^T). g [rows, k] (row stride ldg),
// w [*, k] (row stride ldw), out [rows, *] (row stride ldo).
template <typename T>
void skinny_mm_transposed(int64_t rows, int64_t k, int64_t i0, int64_t i1, const T* g, int64_t ldg, const T* w,
                          int64_t ldw, T* out, int64_t ldo);

// skinny_mm_transposed with g and w of any of the three types (each converted to float32 exactly) and a float32
// out: the same sums, not rounded to a 16-bit type at the end (router logits). Any number of rows: g is taken
// 16 rows per pass over w, and every out[r, i] is the same sum whatever rows, i0 and i1 a call covers.
template <typename G, typename T>
void skinny_mm_transposed_float_out(int64_t rows, int64_t k, int64_t i0, int64_t i1, const G* g, int64_t ldg,
                                    const T* w, int64_t ldw, float* out, int64_t ldo);

}  // namespace torchmoe::cpu
