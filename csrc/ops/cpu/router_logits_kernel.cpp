// CPU kernel of router_logits: x [N, d] against weight [E, d], both read as stored (float32, bfloat16 or
// float16, converted to float32 in registers) into float32 logits, by the skinny kernels' transposed product.
//
// Why not at::linear(x.float(), weight.float()): at a decode step the router is one pass over its weight, and
// the GEMM at one row read a float32 128 x 2048 weight at about 45 GB/s from cache on a 2-core Zen 4 (22 us),
// after a float32 copy of x and, for a 16-bit weight, of the weight. Here 16-bit weights are read as 16-bit.
// Every logit is one float32 sum in a fixed order (vector lanes along d, then a fixed lane tree), whatever N,
// the thread count and the split: a token's logits do not depend on the batch it came in (on CPUs with AVX-512;
// elsewhere ATen's GEMM computes them).
//
// A bfloat16 weight has its own loop (bf16_pairs): 32 values at a time are loaded as 16 dwords, and the dwords
// shifted left by 16 are the even-indexed values as float32, the dwords with their low half cleared the odd ones:
// two exact float32 vectors per load without a shuffle (widening 16 values takes a 512-bit shuffle, which a Zen 4
// core runs at half rate; for one token against 128 x 2048 in cache on one thread of the 2-core Zen 4: 10.6 against
// 17.7 us). x is split into its even- and odd-indexed values once per call (once per task for large batches).
// Lane l then adds, step after step, x[32s + 2l] * w[32s + 2l] and x[32s + 2l + 1] * w[32s + 2l + 1]: the same
// sum for every row and expert, whatever the task.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define TORCHMOE_HAVE_ROUTER_AVX512 1
#define TORCHMOE_ROUTER_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))
#else
#define TORCHMOE_HAVE_ROUTER_AVX512 0
#endif

#include "ops/common/router_logits_checks.h"
#include "ops/cpu/lane_mask.h"
#include "ops/cpu/parallel.h"
#include "ops/cpu/skinny_gemm.h"

namespace torchmoe::cpu {
namespace {

// Tokens per task, and experts per task (the transposed kernel's group of weight rows).
constexpr int64_t kTaskRows = 16;
constexpr int64_t kTaskExperts = 16;
// Up to this many tokens are split for the bfloat16 loop once per call; more, once per task.
constexpr int64_t kSplitOnceRows = 64;

constexpr int64_t kPairStep = 32;  // weight values per step: 16 dwords

// x's rows as [rows][2][half] float32 in out (half = steps * 16): the even-indexed values, then the odd-indexed
// ones, zero past d.
template <typename G>
void split_pairs(const G* x, int64_t rows, int64_t d, int64_t half, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const G* xr = x + r * d;
    float* even = out + r * 2 * half;
    float* odd = even + half;
    const int64_t pairs = d / 2;
    for (int64_t i = 0; i < pairs; ++i) {
      even[i] = static_cast<float>(xr[2 * i]);
      odd[i] = static_cast<float>(xr[2 * i + 1]);
    }
    std::fill(even + pairs, even + half, 0.0f);
    std::fill(odd + pairs, odd + half, 0.0f);
    if (d % 2 != 0) even[pairs] = static_cast<float>(xr[d - 1]);
  }
}

#if TORCHMOE_HAVE_ROUTER_AVX512
// out[r, e] for RB rows of the split x and the weight rows e0 .. e1, NW at a time (a short last pass repeats
// its last row and keeps only the real ones).
template <int RB, int NW>
TORCHMOE_ROUTER_AVX512 void bf16_pairs(const float* xs, int64_t half, int64_t d, int64_t e0, int64_t e1,
                                       const c10::BFloat16* w, float* out, int64_t ldo) {
  const int64_t steps = half / 16;
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t e = e0; e < e1; e += NW) {
    const c10::BFloat16* wr[NW];
    for (int u = 0; u < NW; ++u) wr[u] = w + std::min<int64_t>(e + u, e1 - 1) * d;
    __m512 acc[NW][RB];
#pragma GCC unroll 8
    for (int u = 0; u < NW; ++u) {
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) acc[u][r] = _mm512_setzero_ps();
    }
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t left = d - s * kPairStep;
      const __mmask32 m = lane_mask32(left);
      __m512 even_x[RB], odd_x[RB];
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) {
        even_x[r] = _mm512_loadu_ps(xs + r * 2 * half + s * 16);
        odd_x[r] = _mm512_loadu_ps(xs + r * 2 * half + half + s * 16);
      }
#pragma GCC unroll 8
      for (int u = 0; u < NW; ++u) {
        const __m512i pairs = _mm512_maskz_loadu_epi16(m, wr[u] + s * kPairStep);
        const __m512 even_w = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
        const __m512 odd_w = _mm512_castsi512_ps(_mm512_and_si512(pairs, high_half));
#pragma GCC unroll 4
        for (int r = 0; r < RB; ++r) {
          acc[u][r] = _mm512_fmadd_ps(even_x[r], even_w, acc[u][r]);
          acc[u][r] = _mm512_fmadd_ps(odd_x[r], odd_w, acc[u][r]);
        }
      }
    }
#pragma GCC unroll 8
    for (int u = 0; u < NW; ++u) {
      if (e + u >= e1) break;
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) out[r * ldo + e + u] = _mm512_reduce_add_ps(acc[u][r]);
    }
  }
}

// out[rows, e0 .. e1] with a bfloat16 weight from the split rows xs, 4 rows at a time.
void bf16_task(const float* xs, int64_t half, int64_t rows, int64_t d, int64_t e0, int64_t e1,
               const c10::BFloat16* w, float* out, int64_t ldo) {
  for (int64_t r = 0; r < rows; r += 4) {
    const float* xr = xs + r * 2 * half;
    float* o = out + r * ldo;
    switch (std::min<int64_t>(4, rows - r)) {
      case 1: bf16_pairs<1, 8>(xr, half, d, e0, e1, w, o, ldo); break;
      case 2: bf16_pairs<2, 4>(xr, half, d, e0, e1, w, o, ldo); break;
      case 3: bf16_pairs<3, 2>(xr, half, d, e0, e1, w, o, ldo); break;
      default: bf16_pairs<4, 2>(xr, half, d, e0, e1, w, o, ldo); break;
    }
  }
}
#endif

template <typename Fn>
void with_storage_type(at::ScalarType dtype, const Fn& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: fn(c10::Half{}); break;
  }
}

at::Tensor router_logits_cpu(const at::Tensor& x_in, const at::Tensor& weight_in) {
  checks::check_router_logits(x_in, weight_in);
  const auto out_dtype = checks::router_logits_dtype(x_in, weight_in);
  // float64 (gradcheck), and CPUs without AVX-512, where the transposed kernel is scalar C++: ATen's GEMM on
  // float copies (its sums' order then depends on the batch, as any GEMM's does).
  if (out_dtype == at::kDouble || !skinny_avx512_available()) {
    return at::linear(x_in.to(out_dtype), weight_in.to(out_dtype));
  }
  const int64_t d = weight_in.size(1);
  const int64_t num_experts = weight_in.size(0);
  auto out_sizes = x_in.sizes().vec();
  out_sizes.back() = num_experts;
  auto out = at::empty(out_sizes, x_in.options().dtype(at::kFloat));
  const int64_t n = out.numel() == 0 ? 0 : out.numel() / num_experts;
  if (n == 0) return out;
  if (d == 0) return out.zero_();
  const auto x = x_in.reshape({n, d}).contiguous();
  const auto weight = weight_in.contiguous();
  float* out_data = out.data_ptr<float>();
  const int64_t row_tasks = (n + kTaskRows - 1) / kTaskRows;
  const int64_t expert_tasks = (num_experts + kTaskExperts - 1) / kTaskExperts;
  with_storage_type(x.scalar_type(), [&](auto x_tag) {
    using G = decltype(x_tag);
    with_storage_type(weight.scalar_type(), [&](auto w_tag) {
      using W = decltype(w_tag);
      const G* x_data = x.const_data_ptr<G>();
      const W* w_data = weight.const_data_ptr<W>();
      // bfloat16 weights: a few tokens are split into even and odd values once, for every task
      const int64_t half = (d + 31) / 32 * 16;
      const bool split_once = std::is_same_v<W, c10::BFloat16> && n <= kSplitOnceRows;
      std::vector<float> split_x;
      if (split_once) {
        split_x.resize(static_cast<size_t>(n * 2 * half));
        split_pairs(x_data, n, d, half, split_x.data());
      }
      parallel_for_as_caller(0, row_tasks * expert_tasks, 1, [&](int64_t first, int64_t last) {
        for (int64_t task = first; task < last; ++task) {
          const int64_t r0 = task / expert_tasks * kTaskRows;
          const int64_t e0 = task % expert_tasks * kTaskExperts;
          const int64_t rows = std::min(kTaskRows, n - r0);
          const int64_t e1 = std::min(num_experts, e0 + kTaskExperts);
#if TORCHMOE_HAVE_ROUTER_AVX512
          if constexpr (std::is_same_v<W, c10::BFloat16>) {
            thread_local std::vector<float> task_split;
            if (!split_once) {  // this task's rows, split here (a large batch: its own share of the work)
              task_split.resize(static_cast<size_t>(rows * 2 * half));
              split_pairs(x_data + r0 * d, rows, d, half, task_split.data());
            }
            const float* xs = split_once ? split_x.data() + r0 * 2 * half : task_split.data();
            bf16_task(xs, half, rows, d, e0, e1, w_data, out_data + r0 * num_experts, num_experts);
            continue;
          }
#endif
          skinny_mm_transposed_float_out(rows, d, e0, e1, x_data + r0 * d, d, w_data, d, out_data + r0 * num_experts,
                                         num_experts);
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, CPU, m) {
  m.impl("router_logits", router_logits_cpu);
}

}  // namespace torchmoe::cpu
