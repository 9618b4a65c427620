// grouped_mm on CPU: each expert's product is cut into blocks, and threads take blocks from a shared counter
// (at::parallel_for workers). An expert with at most kSkinnyMaxRows rows (float32, bfloat16, float16) runs the
// skinny kernels (skinny_gemm.h: one pass over its weight, cut into column blocks) for its output and its grad_x; a
// bfloat16 forward of kAmxMinRows to kAmxMaxRows rows runs on AMX where the CPU has it (amx_gemm.h). Other float32
// experts on a CPU with AVX-512 run torchmoe's own GEMM (sgemm.h), except the forward on Intel CPUs, where MKL's is
// faster (cpu::blas_sgemm_preferred). Both give results that do not depend on how a product is cut, so their blocks
// are sized to the thread count; the rest run one BLAS call (at::mm_out) per fixed-size block, so every output
// element comes from the same call whatever the thread count. A weight whose matrix dims have one unit stride (a
// transposed view such as Hugging Face's [E, d_out, d_in] parameters read as [E, d_in, d_out], or a slice of its
// columns) is read in place. counts is read on the host (it already lives there on CPU).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ops/common/grouped_mm_checks.h"
#include "ops/cpu/amx_gemm.h"
#include "ops/cpu/grouped_tasks.h"
#include "ops/cpu/output_cache.h"
#include "ops/cpu/parallel.h"
#include "ops/cpu/sgemm.h"
#include "ops/cpu/skinny_gemm.h"

namespace torchmoe::ops {
namespace {

using cpu::expert_offsets;
using cpu::run_tasks;

// Rows of x per forward / grad_x task, and rows of grad_weight[e] (i.e. d_in) per grad_weight task.
constexpr int64_t kRowBlock = 256;
constexpr int64_t kColBlock = 128;

struct Task {
  bool grad_weight;  // backward only: a grad_weight block rather than a grad_x row block
  int64_t expert;
  int64_t begin;   // first row (forward/grad_x: of x; grad_weight: of weight[e])
  int64_t length;  // rows in this task
};

// weight[e] is read in place when one of its two matrix dims has unit stride; any other layout is made
// contiguous.
at::Tensor matrix_strided(const at::Tensor& weight) {
  return weight.stride(2) == 1 || weight.stride(1) == 1 ? weight : weight.contiguous();
}

bool skinny_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// A bfloat16 forward on AMX (cpu::bf16_amx_mm) takes experts of kAmxMinRows to kAmxMaxRows rows: there the
// skinny kernel's multiply-adds, or at::mm's packing of the weight, cost more than the weight's interleave into
// tiles. Measured on a 2-core Xeon (2048 x 1536, 100 weights cycled from memory, us per product, AMX against
// without): 8 rows 241/257, 12 rows 287/360, 16 rows 309/446, 17 rows 334/418, 32 rows 345/408, 64 rows 419/483,
// 128 rows 553/627, 256 rows 770/756, 1024 rows 3058/2871.
constexpr int64_t kAmxMinRows = 10;
constexpr int64_t kAmxMaxRows = 128;

bool amx_rows(int64_t rows) { return rows >= kAmxMinRows && rows <= kAmxMaxRows; }

// Whether expert e runs on the skinny kernels (for its output and grad_x), or on AMX (forward, when amx_ok).
bool is_skinny(const std::vector<int64_t>& offsets, size_t e, bool dtype_ok, bool amx_ok = false) {
  const int64_t rows = offsets[e + 1] - offsets[e];
  return (dtype_ok && rows > 0 && rows <= cpu::kSkinnyMaxRows) || (amx_ok && amx_rows(rows));
}

// Whether the forward of x @ weight may run on AMX: bfloat16, weight rows read along (unit column stride) and a
// reduction of whole chunks.
bool amx_forward_ok(const at::Tensor& x, const at::Tensor& weight) {
  const int64_t k = weight.size(1);
  return x.scalar_type() == at::kBFloat16 && weight.stride(2) == 1 && k > 0 && k % cpu::kAmxChunkRows == 0 &&
         cpu::amx_available();
}

// Splits each expert's [offsets[e], offsets[e+1]) range into blocks of `block` rows (skipping skinny experts
// when skip_skinny).
std::vector<Task> row_tasks(const std::vector<int64_t>& offsets, int64_t block, bool skip_skinny = false,
                            bool skip_amx = false) {
  std::vector<Task> tasks;
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    if (is_skinny(offsets, e, skip_skinny, skip_amx)) continue;
    for (int64_t r = offsets[e]; r < offsets[e + 1]; r += block) {
      tasks.push_back({false, static_cast<int64_t>(e), r, std::min(block, offsets[e + 1] - r)});
    }
  }
  return tasks;
}

// Runs first(i) for i < num_first and second(i) for i < num_second as one task list (see run_tasks; first_calls_aten:
// whether first calls ATen ops, the skinny second never does). A decode
// step's skinny products run on the same OpenMP team as the ops around them: its threads are still spinning
// from the previous op, and a thread pool of our own would compete with them for the cores (measured: half the
// read bandwidth on 2 cores).
template <typename First, typename Second>
void run_two(int64_t num_first, const First& first, int64_t num_second, const Second& second,
             bool first_calls_aten) {
  std::vector<int64_t> ids(num_first + num_second);
  for (int64_t i = 0; i < num_first + num_second; ++i) ids[i] = i;
  run_tasks(ids, [&](int64_t i) { i < num_first ? first(i) : second(i - num_first); },
            first_calls_aten && num_first > 0);
}

// Skinny (or AMX) experts' products, cut along their output columns (forward: of out, backward: of grad_x).
struct SkinnyBlock {
  int64_t expert;
  int64_t begin, end;
  bool amx = false;  // forward on cpu::bf16_amx_mm
};

// The skinny experts' column blocks (see skinny_block_width), then the AMX experts' (amx_ok: forward only).
std::vector<SkinnyBlock> skinny_blocks(const std::vector<int64_t>& offsets, int64_t width, int64_t element_size,
                                       bool dtype_ok, bool amx_ok = false) {
  std::vector<int64_t> experts[2];  // skinny kernels, AMX
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    const bool amx = amx_ok && amx_rows(offsets[e + 1] - offsets[e]);
    if (amx || is_skinny(offsets, e, dtype_ok)) experts[amx].push_back(static_cast<int64_t>(e));
  }
  std::vector<SkinnyBlock> blocks;
  if (width == 0) return blocks;
  for (int amx = 0; amx < 2; ++amx) {
    if (experts[amx].empty()) continue;
    const int64_t chunk = cpu::skinny_block_width(width, static_cast<int64_t>(experts[amx].size()), element_size);
    for (int64_t e : experts[amx]) {
      for (int64_t j = 0; j < width; j += chunk) blocks.push_back({e, j, std::min(width, j + chunk), amx == 1});
    }
  }
  return blocks;
}

// out rows of e = in rows of e @ m, columns [b.begin, b.end) of out, where m is weight[e] (forward: in is x, out
// is out) or weight[e]^T (grad_x: in is grad_output, out is grad_x). An m with unit column stride is w of
// skinny_mm, one with unit row stride is the stored matrix w^T of skinny_mm_transposed; a weight with both unit
// strides (a matrix dim of size 1) runs skinny_mm forward and skinny_mm_transposed backward.
template <typename T>
void skinny_block(const SkinnyBlock& b, bool transposed, const at::Tensor& in, const at::Tensor& weight,
                  const std::vector<int64_t>& offsets, at::Tensor& out) {
  const int64_t k = weight.size(transposed ? 2 : 1), n = weight.size(transposed ? 1 : 2);
  const int64_t m_rs = weight.stride(transposed ? 2 : 1), m_cs = weight.stride(transposed ? 1 : 2);
  const int64_t row0 = offsets[b.expert];
  const int64_t rows = offsets[b.expert + 1] - row0;
  const T* in_e = in.const_data_ptr<T>() + row0 * k;
  const T* w_e = weight.const_data_ptr<T>() + b.expert * weight.stride(0);
  T* out_e = out.mutable_data_ptr<T>() + row0 * n;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (b.amx) return cpu::bf16_amx_mm(rows, k, b.begin, b.end, in_e, k, in.size(0) - row0, w_e, m_rs, out_e, n);
  }
  if ((weight.stride(2) == 1) != transposed) {
    cpu::skinny_mm<T>(rows, k, b.begin, b.end, in_e, k, w_e, m_rs, out_e, n);
  } else {
    cpu::skinny_mm_transposed<T>(rows, k, b.begin, b.end, in_e, k, w_e, m_cs, out_e, n);
  }
}

// fn<T>() for the tensor's skinny dtype.
#define TORCHMOE_SKINNY_CALL(dtype, fn, ...)                                      \
  switch (dtype) {                                                                \
    case at::kFloat: fn<float>(__VA_ARGS__); break;                               \
    case at::kBFloat16: fn<c10::BFloat16>(__VA_ARGS__); break;                    \
    case at::kHalf: fn<c10::Half>(__VA_ARGS__); break;                            \
    default: TORCH_INTERNAL_ASSERT(false, "skinny kernels do not take ", dtype);  \
  }

// float32 path on torchmoe's GEMM. One product per expert, c_e[m, n] = a_e[m, k] @ b_e[k, n], every operand
// given by a base pointer and strides; `GemmBlock` is a rectangle of one expert's c.
struct ExpertGemm {
  int64_t m, n, k;
  const float* a;
  int64_t a_rs, a_cs;
  const float* b;
  int64_t b_rs, b_cs;
  float* c;
  int64_t ldc;
};

struct GemmBlock {
  const ExpertGemm* gemm;
  int64_t m0, m, n0, n;
  int64_t work() const { return m * n * std::max<int64_t>(gemm->k, 1); }
};

// Cuts every product into blocks of about total / (4 * threads) multiply-adds (at least 2^22, so packing
// stays a small share), along its longer side at tile multiples; largest blocks first.
std::vector<GemmBlock> plan_blocks(const std::vector<ExpertGemm>& gemms) {
  int64_t total = 0;
  for (const auto& g : gemms) total += g.m * g.n * std::max<int64_t>(g.k, 1);
  const int64_t target = std::max<int64_t>(total / (4 * at::get_num_threads()), int64_t{1} << 22);
  std::vector<GemmBlock> blocks;
  for (const auto& g : gemms) {
    if (g.m == 0 || g.n == 0) continue;
    const int64_t pieces = std::max<int64_t>(1, (g.m * g.n * std::max<int64_t>(g.k, 1) + target - 1) / target);
    const bool split_rows = g.m >= g.n;
    const int64_t extent = split_rows ? g.m : g.n;
    const int64_t tile = split_rows ? cpu::kSgemmTileRows : cpu::kSgemmTileCols;
    const int64_t chunk = ((extent + pieces - 1) / pieces + tile - 1) / tile * tile;
    for (int64_t s = 0; s < extent; s += chunk) {
      const int64_t len = std::min(chunk, extent - s);
      blocks.push_back(split_rows ? GemmBlock{&g, s, len, 0, g.n} : GemmBlock{&g, 0, g.m, s, len});
    }
  }
  std::stable_sort(blocks.begin(), blocks.end(),
                   [](const GemmBlock& x, const GemmBlock& y) { return x.work() > y.work(); });
  return blocks;
}

// Runs the GEMM blocks of `gemms`, largest first, then skinny(i) for i < num_skinny, as one task list.
template <typename Skinny>
void run_gemms(const std::vector<ExpertGemm>& gemms, int64_t num_skinny, const Skinny& skinny) {
  const auto blocks = plan_blocks(gemms);
  run_two(static_cast<int64_t>(blocks.size()), [&](int64_t i) {
    const GemmBlock& blk = blocks[i];
    const ExpertGemm& g = *blk.gemm;
    cpu::sgemm(blk.m, blk.n, g.k, g.a + blk.m0 * g.a_rs, g.a_rs, g.a_cs, g.b + blk.n0 * g.b_cs, g.b_rs, g.b_cs,
               g.c + blk.m0 * g.ldc + blk.n0, g.ldc, /*accumulate=*/false);
  }, num_skinny, skinny, /*first_calls_aten=*/false);
}

bool use_fast_sgemm(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat && cpu::fast_sgemm_available();
}

// out rows of e = x rows of e @ weight[e] (experts with many rows; skinny ones run skinny(i), i < num_skinny)
template <typename Skinny>
void grouped_mm_fast(const at::Tensor& x, const at::Tensor& weight, const std::vector<int64_t>& offsets,
                     at::Tensor& out, int64_t num_skinny, const Skinny& skinny) {
  const int64_t d_in = weight.size(1), d_out = weight.size(2);
  const int64_t w_es = weight.stride(0), w_rs = weight.stride(1), w_cs = weight.stride(2);
  std::vector<ExpertGemm> gemms;
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    if (is_skinny(offsets, e, true)) continue;
    gemms.push_back({offsets[e + 1] - offsets[e], d_out, d_in, x.const_data_ptr<float>() + offsets[e] * d_in, d_in, 1,
                     weight.const_data_ptr<float>() + static_cast<int64_t>(e) * w_es, w_rs, w_cs,
                     out.mutable_data_ptr<float>() + offsets[e] * d_out, d_out});
  }
  run_gemms(gemms, num_skinny, skinny);
}

// grad_x rows of e = grad_output rows of e @ weight[e]^T; grad_weight[e] = x_e^T @ grad_output_e (zeros for
// an expert without rows). Both sets of products share one block list, with the skinny experts' grad_x
// blocks (skinny(i), i < num_skinny).
template <typename Skinny>
void grouped_mm_backward_fast(const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& weight,
                              const std::vector<int64_t>& offsets, at::Tensor& grad_x, at::Tensor& grad_weight,
                              int64_t num_skinny, const Skinny& skinny) {
  const int64_t d_in = weight.size(1), d_out = weight.size(2);
  const float* g = grad_output.const_data_ptr<float>();
  const float* xs = x.const_data_ptr<float>();
  const float* w = weight.const_data_ptr<float>();
  const bool transposed = checks::grad_weight_transposed(weight);
  const int64_t w_es = weight.stride(0), w_rs = weight.stride(1), w_cs = weight.stride(2);
  std::vector<ExpertGemm> gemms;
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    const int64_t rows = offsets[e + 1] - offsets[e];
    const float* w_e = w + static_cast<int64_t>(e) * w_es;
    if (!is_skinny(offsets, e, true)) {
      gemms.push_back({rows, d_in, d_out, g + offsets[e] * d_out, d_out, 1, w_e, w_cs, w_rs,
                       grad_x.mutable_data_ptr<float>() + offsets[e] * d_in, d_in});
    }
    // grad_weight[e] = x_e^T @ g_e, or (a transposed grad_weight, stored [E, d_out, d_in]) g_e^T @ x_e.
    float* gw_e = grad_weight.mutable_data_ptr<float>() + static_cast<int64_t>(e) * d_in * d_out;
    if (transposed) {
      gemms.push_back({d_out, d_in, rows, g + offsets[e] * d_out, 1, d_out, xs + offsets[e] * d_in, d_in, 1, gw_e, d_in});
    } else {
      gemms.push_back({d_in, d_out, rows, xs + offsets[e] * d_in, 1, d_in, g + offsets[e] * d_out, d_out, 1, gw_e, d_out});
    }
  }
  run_gemms(gemms, num_skinny, skinny);
}

at::Tensor grouped_mm_cpu(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& counts) {
  checks::check_grouped_mm_args(x_in, weight_in, counts);
  const auto x = x_in.contiguous();
  const auto weight = matrix_strided(weight_in);
  const int64_t n = x.size(0);
  const auto offsets = expert_offsets(counts, n, "grouped_mm");
  auto out = cpu::empty_output({n, weight.size(2)}, x.options());
  if (n == 0 || weight.size(2) == 0) return out;
  if (weight.size(1) == 0) return out.zero_();  // empty reduction: no tasks, no threads
  const bool skinny_ok = skinny_dtype(x.scalar_type());
  const bool amx_ok = amx_forward_ok(x, weight);
  const auto skinny = skinny_blocks(offsets, weight.size(2), weight.element_size(), skinny_ok, amx_ok);
  auto run_skinny = [&](int64_t i) {
    TORCHMOE_SKINNY_CALL(x.scalar_type(), skinny_block, skinny[i], /*transposed=*/false, x, weight, offsets, out);
  };
  const int64_t num_skinny = static_cast<int64_t>(skinny.size());
  if (use_fast_sgemm(x) && !cpu::blas_sgemm_preferred()) {
    grouped_mm_fast(x, weight, offsets, out, num_skinny, run_skinny);
    return out;
  }
  const auto tasks = row_tasks(offsets, kRowBlock, skinny_ok, amx_ok);
  run_two(static_cast<int64_t>(tasks.size()), [&](int64_t i) {
    const Task& t = tasks[i];
    auto dst = out.narrow(0, t.begin, t.length);
    at::mm_out(dst, x.narrow(0, t.begin, t.length), weight.select(0, t.expert));
  }, num_skinny, run_skinny, /*first_calls_aten=*/true);
  return out;
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_cpu(const at::Tensor& grad_output_in,
                                                           const at::Tensor& x_in, const at::Tensor& weight_in,
                                                           const at::Tensor& counts) {
  checks::check_grouped_mm_backward_args(grad_output_in, x_in, weight_in, counts);
  const auto grad_output = grad_output_in.contiguous();
  const auto x = x_in.contiguous();
  const auto weight = matrix_strided(weight_in);
  const int64_t n = x.size(0);
  const int64_t num_experts = weight.size(0);
  const int64_t d_in = weight.size(1);
  const auto offsets = expert_offsets(counts, n, "_grouped_mm_backward");

  auto grad_x = cpu::empty_output(x.sizes(), x.options());
  // In the layout the Meta kernel declares: contiguous, or that of a transposed weight view.
  auto grad_weight = checks::grad_weight_transposed(weight)
      ? cpu::empty_output({num_experts, weight.size(2), d_in}, weight.options()).transpose(1, 2)
      : cpu::empty_output(weight.sizes(), weight.options());
  const bool skinny_ok = skinny_dtype(x.scalar_type());
  const auto skinny = skinny_blocks(offsets, d_in, weight.element_size(), skinny_ok);
  auto run_skinny = [&](int64_t i) {
    TORCHMOE_SKINNY_CALL(x.scalar_type(), skinny_block, skinny[i], /*transposed=*/true, grad_output, weight, offsets,
                         grad_x);
  };
  const int64_t num_skinny = static_cast<int64_t>(skinny.size());
  if (use_fast_sgemm(x)) {
    grouped_mm_backward_fast(grad_output, x, weight, offsets, grad_x, grad_weight, num_skinny, run_skinny);
    return {grad_x, grad_weight};
  }

  // grad_x rows of e = grad_output rows of e @ weight[e]^T, in row blocks; and
  // grad_weight[e] = x_e^T @ grad_output_e, blocked over d_in so each block's reduction over the expert's
  // rows stays inside one GEMM. Experts without rows get zeros.
  std::vector<Task> tasks = row_tasks(offsets, kRowBlock, skinny_ok);
  for (int64_t e = 0; e < num_experts; ++e) {
    if (offsets[e + 1] == offsets[e]) {
      grad_weight.select(0, e).zero_();
      continue;
    }
    for (int64_t i = 0; i < d_in; i += kColBlock) tasks.push_back({true, e, i, std::min(kColBlock, d_in - i)});
  }
  if (tasks.empty() && skinny.empty()) return {grad_x, grad_weight};
  // Largest first (costs in units of d_out multiply-adds), so the tail is short.
  auto cost = [&](const Task& t) {
    return t.grad_weight ? t.length * (offsets[t.expert + 1] - offsets[t.expert]) : t.length * d_in;
  };
  std::stable_sort(tasks.begin(), tasks.end(), [&](const Task& a, const Task& b) { return cost(a) > cost(b); });

  run_two(static_cast<int64_t>(tasks.size()), [&](int64_t i) {
    const Task& t = tasks[i];
    if (!t.grad_weight) {
      auto dst = grad_x.narrow(0, t.begin, t.length);
      at::mm_out(dst, grad_output.narrow(0, t.begin, t.length), weight.select(0, t.expert).t());
    } else {
      const int64_t row0 = offsets[t.expert];
      const int64_t rows = offsets[t.expert + 1] - row0;
      auto dst = grad_weight.select(0, t.expert).narrow(0, t.begin, t.length);
      at::mm_out(dst, x.narrow(0, row0, rows).narrow(1, t.begin, t.length).t(), grad_output.narrow(0, row0, rows));
    }
  }, num_skinny, run_skinny, /*first_calls_aten=*/true);
  return {grad_x, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, CPU, m) {
  m.impl("grouped_mm", &grouped_mm_cpu);
  m.impl("_grouped_mm_backward", &grouped_mm_backward_cpu);
}

}  // namespace torchmoe::ops
