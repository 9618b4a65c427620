// Products with weight-only quantized matrices (int8, or int4 two per byte; layout in
// ops/common/grouped_mm_quantized_checks.h), for grouped_mm_quantized's CPU kernel.
//
// quantized_skinny_mm: a few rows (a decode step's tokens on an expert). The packed weight is read once, as
// stored, and dequantized in registers; each group's sum over its reduction rows is taken on the codes and scaled
// once per group (sum_g s_g * (sum_p x_p q_p - z_g * sum_p x_p)), so a weight element costs a conversion and one
// multiply-add per row. dequantize_block: a block of the float weight, for the many-row path (dequantized panel by
// panel into a small buffer that a GEMM then reads) and for the backward.
//
// Every output element of quantized_skinny_mm is one fixed sequence of float32 operations whatever the column range
// a call covers, so callers may split the columns over threads without changing a result bit.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace torchmoe::cpu {

// One expert's packed weight: the logical matrix is k x n (d_in x d_out).
struct QuantizedMatrix {
  int bits;             // 4 or 8 (amx_gemm.cpp also describes a bfloat16 matrix with 16)
  int64_t k, n;         // d_in, d_out
  int64_t group_size;   // reduction rows per scale (divides k; even for 4 bits)
  const uint8_t* q;     // bits 8: k rows of n int8; bits 4: k / 2 rows of n bytes (low nibble: even row)
  const float* scales;  // [k / group_size, n]
  const uint8_t* zeros; // [k / group_size, n] for asymmetric 4 bits, else nullptr (zero point 8 for 4 bits)
};

// out[r, j] = sum_p x[r, p] * w[p, j] for r < rows, j0 <= j < j1. x float32 [rows, k] (row stride ldx), out of T
// (float, c10::BFloat16, c10::Half) with row stride ldo.
template <typename T>
void quantized_skinny_mm(const QuantizedMatrix& w, int64_t rows, int64_t j0, int64_t j1, const float* x, int64_t ldx,
                         T* out, int64_t ldo);

// Whether 4-bit codes with bfloat16 activations take quantized_skinny_mm's vdpbf16ps loops (AVX-512 BF16 and VBMI,
// and the AVX-512 kernels on): two codes per instruction, the same bits as the multiply-adds elsewhere.
bool q4_bf16_dot_available();

// Whether 8-bit codes with bfloat16 activations take quantized_skinny_mm's vdpbf16ps strips from 3 rows (AVX-512
// BF16, the AVX-512 kernels on, and an even group_size: the strips pair reduction rows): the same bits again.
bool q8_bf16_dot_available(int64_t group_size);

// dst[p - p0, j - j0] = w[p, j] for p0 <= p < p1, j0 <= j < j1 (dst row stride ldd), computed in float32 as
// scale * (q - zero), then converted to T (float, double, c10::BFloat16, c10::Half). p0 and p1 are even for 4 bits.
template <typename T>
void dequantize_block(const QuantizedMatrix& w, int64_t p0, int64_t p1, int64_t j0, int64_t j1, T* dst, int64_t ldd);

}  // namespace torchmoe::cpu
