// A single-threaded float32 GEMM with an AVX-512 micro-kernel, for the grouped_mm CPU kernel.
//
// Why not at::mm: on CPUs that MKL does not treat as its own (AMD Zen 4/5), MKL's sgemm does not use AVX-512
// and runs at about the AVX2 peak, half of what the FMA units can do; this kernel runs 512-bit FMAs wherever
// the CPU has AVX-512F.
// Callers split the work over threads; each thread packs into its own buffers.
#pragma once

#include <cstdint>

namespace torchmoe::cpu {

// True when the CPU has AVX-512F (and the OS saves its registers), unless the environment variable
// TORCHMOE_DISABLE_AVX512 is set to a non-empty value other than "0" (read once per process).
bool fast_sgemm_available();

// True on Intel CPUs, where MKL's sgemm (ATen's at::mm) uses AVX-512 and beats this kernel on forward-size
// products (measured on a 2-core Xeon with AMX: 380 against 293 GFLOP/s, 8 experts x 1024 rows, 1024 x 2048).
bool blas_sgemm_preferred();

// c[m, n] = a @ b, or c += a @ b when accumulate. a is m x k with element (i, p) at a[i * a_rs + p * a_cs],
// b is k x n with element (p, j) at b[p * b_rs + j * b_cs] (any strides: a transposed operand is just
// swapped strides), c is row-major with leading dimension ldc. k == 0 writes zeros (or leaves c when
// accumulate). Each c element's sum runs over p in the same order whatever m, n and the caller's split, so
// splitting a product into row or column blocks never changes a result bit.
// Precondition: fast_sgemm_available().
void sgemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t b_rs,
           int64_t b_cs, float* c, int64_t ldc, bool accumulate);

// Rows of c per micro-tile and columns per packed panel; callers split work at multiples of these.
constexpr int64_t kSgemmTileRows = 12;
constexpr int64_t kSgemmTileCols = 32;

}  // namespace torchmoe::cpu
