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
// A bfloat16 weight has its own loops. With bfloat16 x on a CPU with AVX-512 BF16 (bf16_dot), one vdpbf16ps takes
// 32 values of x and of a weight row, 32 multiply-adds in one instruction (a fused multiply-add does 16, and the
// bf16_pairs loop below also spends a shift and a mask per 32 values); on the 2-core Zen 4, 128 x 2048: 16 rows in
// 36 against 98-140 us, 64 rows in 129 against 264-500 us (2 threads).
// Otherwise (bf16_pairs) 32 weight values at a time are loaded as 16 dwords, and the dwords shifted left by 16 are
// the even-indexed values as float32, the dwords with their low half cleared the odd ones: two exact float32
// vectors per load without a shuffle (widening 16 values takes a 512-bit shuffle, which a Zen 4 core runs at half
// rate; for one token against 128 x 2048 in cache on one thread: 10.6 against 17.7 us), against x split into its
// even- and odd-indexed values once per call (once per task for large batches). Either way lane l adds, step after
// step, x[32s + 2l + 1] * w[32s + 2l + 1], then x[32s + 2l] * w[32s + 2l]: the same sum for every row and expert,
// whatever the task and whichever loop. A batch takes d in chunks whose x stays in L1 (the lanes' sums wait in a
// buffer between chunks, which changes no bit).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
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
#define TORCHMOE_ROUTER_DOT __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma")))
#else
#define TORCHMOE_HAVE_ROUTER_AVX512 0
#endif

#include "ops/common/router_logits_checks.h"
#include "ops/cpu/lane_mask.h"
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
void split_pairs_portable(const G* x, int64_t rows, int64_t d, int64_t half, float* out) {
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
// split_pairs_portable for bfloat16 and float32 x, 32 values a step (bfloat16: the dword trick of bf16_pairs;
// float32: two lane permutes). Masked loads read zeros past d.
template <typename G>
TORCHMOE_ROUTER_AVX512 void split_pairs_avx512(const G* x, int64_t rows, int64_t d, int64_t half, float* out) {
  const int64_t steps = half / 16;
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512i even_lanes = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd_lanes = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int64_t r = 0; r < rows; ++r) {
    const G* xr = x + r * d;
    float* even = out + r * 2 * half;
    float* odd = even + half;
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t left = d - s * kPairStep;
      if constexpr (std::is_same_v<G, c10::BFloat16>) {
        const __m512i pairs = _mm512_maskz_loadu_epi16(lane_mask32(left), xr + s * kPairStep);
        _mm512_storeu_ps(even + 16 * s, _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)));
        _mm512_storeu_ps(odd + 16 * s, _mm512_castsi512_ps(_mm512_and_si512(pairs, high_half)));
      } else {
        const __m512 a = _mm512_maskz_loadu_ps(lane_mask(left), xr + s * kPairStep);
        const __m512 b = _mm512_maskz_loadu_ps(lane_mask(left - 16), xr + s * kPairStep + 16);
        _mm512_storeu_ps(even + 16 * s, _mm512_permutex2var_ps(a, even_lanes, b));
        _mm512_storeu_ps(odd + 16 * s, _mm512_permutex2var_ps(a, odd_lanes, b));
      }
    }
  }
}
#endif

template <typename G>
void split_pairs(const G* x, int64_t rows, int64_t d, int64_t half, float* out) {
#if TORCHMOE_HAVE_ROUTER_AVX512
  if constexpr (!std::is_same_v<G, c10::Half>) return split_pairs_avx512(x, rows, d, half, out);
#endif
  split_pairs_portable(x, rows, d, half, out);
}

#if TORCHMOE_HAVE_ROUTER_AVX512
// Steps [s0, s1) of the sums out[r, e] for RB rows of the split x and the weight rows e0 .. e1, NW at a time (a short
// last pass repeats its last row and keeps only the real ones). Between chunks a sum's 16 lanes wait in partial
// ([RB][e1 - e0][16]); at the last chunk the lanes are added into out. The lanes see the same multiply-adds in the
// same order whatever the chunks, so the chunks do not change a bit.
template <int RB, int NW>
TORCHMOE_ROUTER_AVX512 void bf16_pairs(const float* xs, int64_t half, int64_t d, int64_t s0, int64_t s1, int64_t e0,
                                       int64_t e1, const c10::BFloat16* w, float* partial, float* out, int64_t ldo) {
  const int64_t steps = half / 16;
  const int64_t experts = e1 - e0;
  const bool first = s0 == 0;
  const bool last = s1 == steps;
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t e = e0; e < e1; e += NW) {
    const c10::BFloat16* wr[NW];
    for (int u = 0; u < NW; ++u) wr[u] = w + std::min<int64_t>(e + u, e1 - 1) * d;
    auto lanes = [&](int u, int r) { return partial + (r * experts + std::min<int64_t>(e + u, e1 - 1) - e0) * 16; };
    __m512 acc[NW][RB];
#pragma GCC unroll 8
    for (int u = 0; u < NW; ++u) {
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) acc[u][r] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(lanes(u, r));
    }
    for (int64_t s = s0; s < s1; ++s) {
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
          acc[u][r] = _mm512_fmadd_ps(odd_x[r], odd_w, acc[u][r]);
          acc[u][r] = _mm512_fmadd_ps(even_x[r], even_w, acc[u][r]);
        }
      }
    }
#pragma GCC unroll 8
    for (int u = 0; u < NW; ++u) {
      if (e + u >= e1) break;
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) {
        if (last) {
          out[r * ldo + e + u] = _mm512_reduce_add_ps(acc[u][r]);
        } else {
          _mm512_storeu_ps(lanes(u, r), acc[u][r]);
        }
      }
    }
  }
}

// bf16_pairs for bfloat16 x on a CPU with AVX-512 BF16: one vdpbf16ps per 32 values adds, in each lane, the odd
// value's product, then the even one's, each rounded once (the products of two bfloat16 values are exact): the
// multiply-adds of bf16_pairs in its order, so the same bits (subnormal inputs aside: vdpbf16ps reads them as
// zero), and x needs no split. On the 2-core Zen 4 it runs 32 multiply-adds at about twice the rate of a 16-wide
// fused multiply-add.
template <int RB, int NW>
TORCHMOE_ROUTER_DOT void bf16_dot(const c10::BFloat16* x, int64_t ldx, int64_t d, int64_t s0, int64_t s1, int64_t e0,
                                  int64_t e1, const c10::BFloat16* w, float* partial, float* out, int64_t ldo) {
  const int64_t steps = (d + kPairStep - 1) / kPairStep;
  const int64_t experts = e1 - e0;
  const bool first = s0 == 0;
  const bool last = s1 == steps;
  for (int64_t e = e0; e < e1; e += NW) {
    const c10::BFloat16* wr[NW];
    for (int u = 0; u < NW; ++u) wr[u] = w + std::min<int64_t>(e + u, e1 - 1) * d;
    auto lanes = [&](int u, int r) { return partial + (r * experts + std::min<int64_t>(e + u, e1 - 1) - e0) * 16; };
    __m512 acc[NW][RB];
#pragma GCC unroll 8
    for (int u = 0; u < NW; ++u) {
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) acc[u][r] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(lanes(u, r));
    }
    for (int64_t s = s0; s < s1; ++s) {
      const __mmask32 m = lane_mask32(d - s * kPairStep);
      __m512bh xv[RB];
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) xv[r] = (__m512bh)_mm512_maskz_loadu_epi16(m, x + r * ldx + s * kPairStep);
#pragma GCC unroll 8
      for (int u = 0; u < NW; ++u) {
        const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, wr[u] + s * kPairStep);
#pragma GCC unroll 4
        for (int r = 0; r < RB; ++r) acc[u][r] = _mm512_dpbf16_ps(acc[u][r], xv[r], wv);
      }
    }
#pragma GCC unroll 8
    for (int u = 0; u < NW; ++u) {
      if (e + u >= e1) break;
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) {
        if (last) {
          out[r * ldo + e + u] = _mm512_reduce_add_ps(acc[u][r]);
        } else {
          _mm512_storeu_ps(lanes(u, r), acc[u][r]);
        }
      }
    }
  }
}

bool bf16_dot_available() {
  static const bool available = __builtin_cpu_supports("avx512bf16");
  return available;
}

// out[rows, e0 .. e1] with a bfloat16 weight, 4 rows at a time, in chunks of d whose x (split_x for bf16_pairs,
// x itself for bf16_dot) stays in L1 (16 KiB) while the task's weight rows pass by: else a large batch reads x from
// L2 for every few weight rows, at a third of the multiply-add rate. kernel(rb, r, s0, s1, partial_rows, out_rows)
// runs rows r .. r + rb.
template <typename Kernel>
void bf16_task(int64_t x_step_bytes, int64_t steps, int64_t rows, int64_t e0, int64_t e1, float* out, int64_t ldo,
               const Kernel& kernel) {
  constexpr int64_t kChunkBytes = 16 * 1024;
  const int64_t chunk = std::max<int64_t>(4, kChunkBytes / (rows * x_step_bytes));
  thread_local std::vector<float> partial;
  if (chunk < steps) partial.resize(static_cast<size_t>(rows * (e1 - e0) * 16));
  for (int64_t s0 = 0; s0 < steps; s0 += chunk) {
    const int64_t s1 = std::min(steps, s0 + chunk);
    for (int64_t r = 0; r < rows; r += 4) {
      kernel(std::min<int64_t>(4, rows - r), r, s0, s1, partial.data() + r * (e1 - e0) * 16, out + r * ldo);
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
  // x [..., d] read as [n, d] and the weight as [E, d]: no reshape or copy when contiguous (a decode step's case)
  const auto x = x_in.expect_contiguous();
  const auto weight = weight_in.expect_contiguous();
  float* out_data = out.data_ptr<float>();
  const int64_t row_tasks = (n + kTaskRows - 1) / kTaskRows;
  const int64_t expert_tasks = (num_experts + kTaskExperts - 1) / kTaskExperts;
  with_storage_type(x->scalar_type(), [&](auto x_tag) {
    using G = decltype(x_tag);
    with_storage_type(weight->scalar_type(), [&](auto w_tag) {
      using W = decltype(w_tag);
      const G* x_data = x->const_data_ptr<G>();
      const W* w_data = weight->const_data_ptr<W>();
      // bfloat16 weights: a few tokens are split into even and odd values once, for every task
      const int64_t half = (d + 31) / 32 * 16;
#if TORCHMOE_HAVE_ROUTER_AVX512
      const bool dot = std::is_same_v<G, c10::BFloat16> && std::is_same_v<W, c10::BFloat16> && bf16_dot_available();
#else
      const bool dot = false;
#endif
      const bool split_once = std::is_same_v<W, c10::BFloat16> && !dot && n <= kSplitOnceRows;
      std::vector<float> split_x;
      if (split_once) {
        split_x.resize(static_cast<size_t>(n * 2 * half));
        split_pairs(x_data, n, d, half, split_x.data());
      }
      // The tasks call no ATen op, so workers need not the caller's thread-local state (parallel_for_as_caller's
      // capture and restore cost 2-3 us of a 9 us call at one token on the 2-core Zen 4).
      at::parallel_for(0, row_tasks * expert_tasks, 1, [&](int64_t first, int64_t last) {
        for (int64_t task = first; task < last; ++task) {
          const int64_t r0 = task / expert_tasks * kTaskRows;
          const int64_t e0 = task % expert_tasks * kTaskExperts;
          const int64_t rows = std::min(kTaskRows, n - r0);
          const int64_t e1 = std::min(num_experts, e0 + kTaskExperts);
          float* task_out = out_data + r0 * num_experts;
#if TORCHMOE_HAVE_ROUTER_AVX512
          if constexpr (std::is_same_v<W, c10::BFloat16>) {
            const int64_t steps = half / 16;
            if constexpr (std::is_same_v<G, c10::BFloat16>) {
              if (dot) {
                const G* xt = x_data + r0 * d;
                bf16_task(kPairStep * 2, steps, rows, e0, e1, task_out, num_experts,
                          [&](int64_t rb, int64_t r, int64_t s0, int64_t s1, float* partial, float* o) {
                            const G* xr = xt + r * d;
                            switch (rb) {
                              case 1: bf16_dot<1, 8>(xr, d, d, s0, s1, e0, e1, w_data, partial, o, num_experts); break;
                              case 2: bf16_dot<2, 8>(xr, d, d, s0, s1, e0, e1, w_data, partial, o, num_experts); break;
                              case 3: bf16_dot<3, 4>(xr, d, d, s0, s1, e0, e1, w_data, partial, o, num_experts); break;
                              default: bf16_dot<4, 4>(xr, d, d, s0, s1, e0, e1, w_data, partial, o, num_experts); break;
                            }
                          });
                continue;
              }
            }
            thread_local std::vector<float> task_split;
            if (!split_once) {  // this task's rows, split here (a large batch: its own share of the work)
              task_split.resize(static_cast<size_t>(rows * 2 * half));
              split_pairs(x_data + r0 * d, rows, d, half, task_split.data());
            }
            const float* xs = split_once ? split_x.data() + r0 * 2 * half : task_split.data();
            bf16_task(kPairStep * 4, steps, rows, e0, e1, task_out, num_experts,
                      [&](int64_t rb, int64_t r, int64_t s0, int64_t s1, float* partial, float* o) {
                        const float* xr = xs + r * 2 * half;
                        switch (rb) {
                          case 1: bf16_pairs<1, 8>(xr, half, d, s0, s1, e0, e1, w_data, partial, o, num_experts); break;
                          case 2: bf16_pairs<2, 8>(xr, half, d, s0, s1, e0, e1, w_data, partial, o, num_experts); break;
                          case 3: bf16_pairs<3, 4>(xr, half, d, s0, s1, e0, e1, w_data, partial, o, num_experts); break;
                          default: bf16_pairs<4, 4>(xr, half, d, s0, s1, e0, e1, w_data, partial, o, num_experts); break;
                        }
                      });
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
