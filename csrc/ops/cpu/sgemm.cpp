// Goto/BLIS-style GEMM: c is computed in kMR x kNR tiles by a register-blocked micro-kernel that reads
// both operands from packed buffers (a in kMR-row panels, b in kNR-column panels, both k-major), so its
// loads are sequential whatever the strides of the inputs. Blocks: kKC of the reduction dimension
// (fixed, so the summation order of every element is fixed), kMC rows of a (packed block stays in L2),
// kNC columns of b (packed block stays in L2/L3).
#include "ops/cpu/sgemm.h"

#include "ops/cpu/lane_mask.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define TORCHMOE_HAVE_AVX512_KERNEL 1
#define TORCHMOE_AVX512 __attribute__((target("avx512f,fma")))
#else
#define TORCHMOE_HAVE_AVX512_KERNEL 0
#endif

namespace torchmoe::cpu {

bool fast_sgemm_available() {
#if TORCHMOE_HAVE_AVX512_KERNEL
  static const bool available = [] {
    const char* off = std::getenv("TORCHMOE_DISABLE_AVX512");
    if (off != nullptr && off[0] != '\0' && std::strcmp(off, "0") != 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return available;
#else
  return false;
#endif
}

bool blas_sgemm_preferred() {
#if TORCHMOE_HAVE_AVX512_KERNEL
  static const bool intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
  return intel;
#else
  return true;
#endif
}

#if TORCHMOE_HAVE_AVX512_KERNEL
namespace {

constexpr int kMR = static_cast<int>(kSgemmTileRows);
constexpr int kNR = static_cast<int>(kSgemmTileCols);
constexpr int kVecs = kNR / 16;  // zmm registers per tile row
constexpr int64_t kKC = 256;
constexpr int64_t kMC = 20 * kMR;
constexpr int64_t kNC = 1024;

// 64-byte aligned scratch owned by the calling thread, grown on demand.
float* scratch(std::unique_ptr<float[]>& storage, int64_t& capacity, int64_t floats) {
  if (floats > capacity) {
    storage.reset(new float[floats + 16]);
    capacity = floats;
  }
  auto address = reinterpret_cast<std::uintptr_t>(storage.get());
  return reinterpret_cast<float*>((address + 63) & ~std::uintptr_t{63});
}

// Packs lines [0, lines) x steps [0, kc) of a matrix, element (line i, step p) at src[i * line_stride +
// p * step_stride], into ceil(lines / W) panels of kc x W, k-major (lines past `lines` are 0). a's rows and
// b's columns are the lines of their panels: a with (a_rs, a_cs), b with its strides swapped (b_cs, b_rs).
template <int W>
void pack_panels(int64_t lines, int64_t kc, const float* src, int64_t line_stride, int64_t step_stride, float* dst) {
  for (int64_t i0 = 0; i0 < lines; i0 += W) {
    const int64_t count = std::min<int64_t>(W, lines - i0);
    if (line_stride == 1) {  // W contiguous values per step (a transposed a, a row-major b)
      for (int64_t p = 0; p < kc; ++p) {
        float* out = dst + p * W;
        std::memcpy(out, src + i0 + p * step_stride, sizeof(float) * count);
        for (int64_t i = count; i < W; ++i) out[i] = 0.0f;
      }
    } else if (count == W && step_stride == 1) {  // W contiguous line streams, the panel written in order
      const float* lanes[W];
      for (int i = 0; i < W; ++i) lanes[i] = src + (i0 + i) * line_stride;
      for (int64_t p = 0; p < kc; ++p) {
        float* out = dst + p * W;
#pragma GCC unroll 32
        for (int i = 0; i < W; ++i) out[i] = lanes[i][p];
      }
    } else {  // walk each line along its steps, scatter into the panel
      for (int64_t i = 0; i < count; ++i) {
        const float* line = src + (i0 + i) * line_stride;
        for (int64_t p = 0; p < kc; ++p) dst[p * W + i] = line[p * step_stride];
      }
      for (int64_t i = count; i < W; ++i) {
        for (int64_t p = 0; p < kc; ++p) dst[p * W + i] = 0.0f;
      }
    }
    dst += kc * W;
  }
}

// c[rows, cols] (+)= a_panel (kc x kMR) . b_panel (kc x kNR); rows <= kMR, cols <= kNR.
TORCHMOE_AVX512 void micro_kernel(int64_t kc, const float* __restrict ap, const float* __restrict bp, float* c,
                                  int64_t ldc, int64_t rows, int64_t cols, bool accumulate) {
  __m512 acc[kMR][kVecs];
#pragma GCC unroll 16
  for (int i = 0; i < kMR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) acc[i][v] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < kc; ++p) {
    __m512 bv[kVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) bv[v] = _mm512_load_ps(bp + 16 * v);
#pragma GCC unroll 16
    for (int i = 0; i < kMR; ++i) {
      const __m512 av = _mm512_set1_ps(ap[i]);
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
    }
    ap += kMR;
    bp += kNR;
  }
  __mmask16 masks[kVecs];
  for (int v = 0; v < kVecs; ++v) masks[v] = lane_mask(cols - 16 * v);
#pragma GCC unroll 16
  for (int i = 0; i < kMR; ++i) {
    if (i >= rows) break;
    float* row = c + i * ldc;
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      __m512 value = acc[i][v];
      if (accumulate) value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(masks[v], row + 16 * v));
      _mm512_mask_storeu_ps(row + 16 * v, masks[v], value);
    }
  }
}

}  // namespace

void sgemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t b_rs,
           int64_t b_cs, float* c, int64_t ldc, bool accumulate) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) std::fill_n(c + i * ldc, n, 0.0f);
    }
    return;
  }
  thread_local std::unique_ptr<float[]> a_storage, b_storage;
  thread_local int64_t a_capacity = 0, b_capacity = 0;
  const int64_t nc_max = std::min(kNC, (n + kNR - 1) / kNR * kNR);
  const int64_t mc_max = std::min(kMC, (m + kMR - 1) / kMR * kMR);
  float* packed_b = scratch(b_storage, b_capacity, std::min(kKC, k) * nc_max);
  float* packed_a = scratch(a_storage, a_capacity, std::min(kKC, k) * mc_max);

  for (int64_t jc = 0; jc < n; jc += kNC) {
    const int64_t nc = std::min(kNC, n - jc);
    for (int64_t pc = 0; pc < k; pc += kKC) {
      const int64_t kc = std::min(kKC, k - pc);
      const bool add = accumulate || pc > 0;
      pack_panels<kNR>(nc, kc, b + pc * b_rs + jc * b_cs, b_cs, b_rs, packed_b);
      for (int64_t ic = 0; ic < m; ic += kMC) {
        const int64_t mc = std::min(kMC, m - ic);
        pack_panels<kMR>(mc, kc, a + ic * a_rs + pc * a_cs, a_rs, a_cs, packed_a);
        for (int64_t jr = 0; jr < nc; jr += kNR) {
          const float* b_panel = packed_b + (jr / kNR) * kc * kNR;
          for (int64_t ir = 0; ir < mc; ir += kMR) {
            micro_kernel(kc, packed_a + (ir / kMR) * kc * kMR, b_panel, c + (ic + ir) * ldc + jc + jr, ldc,
                         std::min<int64_t>(kMR, mc - ir), std::min<int64_t>(kNR, nc - jr), add);
          }
        }
      }
    }
  }
}
#else
void sgemm(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*, int64_t,
           bool) {
  std::abort();  // unreachable: fast_sgemm_available() is false on this platform
}
#endif

}  // namespace torchmoe::cpu
