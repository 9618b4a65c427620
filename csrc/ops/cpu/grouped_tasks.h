// Pieces shared by the grouped products' CPU kernels (grouped_mm, grouped_mm_quantized): the experts' row
// offsets from counts, and a task list run on the ATen thread pool.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "ops/common/checks.h"
#include "ops/cpu/parallel.h"

namespace torchmoe::cpu {

// Validates counts against N and returns each expert's first row.
inline std::vector<int64_t> expert_offsets(const at::Tensor& counts, int64_t num_rows, const char* op) {
  const auto c = counts.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  const int64_t num_experts = c.numel();
  std::vector<int64_t> offsets(num_experts + 1, 0);
  for (int64_t e = 0; e < num_experts; ++e) {
    TORCHMOE_CHECK_ARG(p[e] >= 0, op, "counts", "must be non-negative, got counts[", e, "] = ", p[e]);
    // Compared before adding: offsets[e] + p[e] could overflow int64 and wrap below num_rows.
    TORCHMOE_CHECK_ARG(p[e] <= num_rows - offsets[e], op, "counts", "must sum to x.size(0) = ", num_rows,
                       ", got a partial sum above it after expert ", e, " (counts[", e, "] = ", p[e], ")");
    offsets[e + 1] = offsets[e] + p[e];
  }
  TORCHMOE_CHECK_ARG(offsets[num_experts] == num_rows, op, "counts", "must sum to x.size(0) = ", num_rows,
                     ", got ", offsets[num_experts]);
  return offsets;
}

// The column width of the skinny experts' tasks (num_experts of them, `width` output columns each, a weight row
// holding bytes_per_column per column): about 4 tasks per thread, each a multiple of 64 columns (whole cache lines
// of w, whole strips of the kernels), widened toward 4 KiB of each weight row as long as every thread still gets a
// task: a thread's reads then run a page at a time, which the hardware prefetcher follows (narrow pieces of many
// rows leave the misses to software prefetches, of which a core keeps few in flight: half the read bandwidth at
// one token on 2 cores).
inline int64_t skinny_block_width(int64_t width, int64_t num_experts, int64_t bytes_per_column) {
  auto aligned = [](int64_t n) { return std::max<int64_t>(64, (n + 63) / 64 * 64); };
  const int64_t threads = at::get_num_threads();
  const int64_t per_expert = (4 * threads + num_experts - 1) / num_experts;
  const int64_t chunk = aligned((width + per_expert - 1) / per_expert);
  const int64_t page = 4096 / std::max<int64_t>(bytes_per_column, 1);
  if (chunk >= page) return chunk;
  return std::max(chunk, std::min(page, aligned(width * num_experts / threads)));
}

// Runs fn(task) for every task on the ATen thread pool. Threads take tasks from a shared counter, so
// uneven tasks (experts of different sizes, grad_x next to grad_weight blocks) still balance; which thread
// runs a task never changes its result. Where tasks call ATen ops (calls_aten: the at::mm_out of many-row
// experts), workers run with the caller's thread-local state, so those calls behave as on the caller; the
// skinny kernels and torchmoe's GEMM call none, and skip that state's capture and restore (2-3 us a call, which
// a decode step's products notice).
template <typename T, typename Fn>
void run_tasks(const std::vector<T>& tasks, const Fn& fn, bool calls_aten) {
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  const int64_t workers = std::min<int64_t>(num_tasks, at::get_num_threads());
  std::atomic<int64_t> next{0};
  auto work = [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t t = next.fetch_add(1); t < num_tasks; t = next.fetch_add(1)) fn(tasks[t]);
    }
  };
  if (calls_aten) {
    parallel_for_as_caller(0, workers, 1, work);
  } else {
    at::parallel_for(0, workers, 1, work);
  }
}

}  // namespace torchmoe::cpu
