// Products on Intel AMX with bfloat16 rows of x (amx_gemm.cpp): a weight stored as 4- or 8-bit codes
// (grouped_mm_quantized) or as bfloat16 (grouped_mm), turned into bfloat16 tiles kAmxChunkRows reduction rows at a
// time and multiplied by the tile unit, accumulating in float32. The decode and the tile loads are the cost, nearly
// the same for 1 row as for 16 (more rows share the decode, 16 to a tile), so these pay for experts of about 8
// rows and more, where the skinny kernels' multiply-adds and the GEMMs' copies of the weight cost more.
//
// Each product of a bfloat16 x value and a weight (a code, or a bfloat16 value) is exact; the float32 sums run in
// the tile unit's order, per column whatever the column range of a call, so callers may split columns over threads
// without changing a result bit.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#include "ops/cpu/quantized_gemm.h"

namespace torchmoe::cpu {

constexpr int64_t kAmxChunkRows = 32;

// True where the AMX kernels run: AMX-BF16 with the tile state granted by the OS, AVX-512 (as
// skinny_avx512_available) with VBMI, and TORCHMOE_DISABLE_AMX unset or "0" (read once).
bool amx_available();

// True when w suits quantized_amx_mm: a group size that is a multiple of kAmxChunkRows.
bool quantized_amx_supports(const QuantizedMatrix& w);

// out[r, j] = sum_p x[r, p] * w[p, j] for r < rows, j0 <= j < j1 (x row stride ldx, out row stride ldo), rounded
// to bfloat16. x_rows >= rows: the rows of x readable from x (the kernel reads whole 16-row tiles where it may).
// Only where amx_available() and quantized_amx_supports(w).
void quantized_amx_mm(const QuantizedMatrix& w, int64_t rows, int64_t j0, int64_t j1, const c10::BFloat16* x,
                      int64_t ldx, int64_t x_rows, c10::BFloat16* out, int64_t ldo);

// The same for a bfloat16 weight w [k, *] with row stride ldw (unit column stride); k a multiple of kAmxChunkRows.
// Only where amx_available().
void bf16_amx_mm(int64_t rows, int64_t k, int64_t j0, int64_t j1, const c10::BFloat16* x, int64_t ldx,
                 int64_t x_rows, const c10::BFloat16* w, int64_t ldw, c10::BFloat16* out, int64_t ldo);

}  // namespace torchmoe::cpu
