// CUDA kernel of torchmoe::route_plan: a stable counting sort on the device, no host synchronisation.
//
// Within a token group the (token, choice) pairs are visited in queue order: choice rank first, then
// (with priority) descending priority, then token index. That sequence is cut into chunks of one rank
// each, one warp per chunk:
//   1. histogram: experts' counts per chunk (shared-memory integer atomics; counts do not depend on order);
//   2. scan: for every (group, expert) an exclusive prefix over the chunks, and the total (counts);
//   3. place: each warp walks its chunk in order, 32 pairs at a time; pairs of the same expert in a step
//      are ranked by lane (__match_any_sync), so a pair's slot is its chunk's offset plus the number of
//      earlier pairs of its expert: exactly the sequential queue position, on every run.
// Priorities are turned into a queue order by a stable device sort (at::sort(stable=true)). Offsets are
// int64 throughout. Expert ids outside [0, E) stop the kernel with a device assertion (as ATen's index
// kernels do), since checking them on the host would need a synchronisation.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <limits>

#include "ops/common/checks.h"
#include "ops/common/route_plan_checks.h"
#include "ops/cuda/cuda_common.cuh"

namespace torchmoe::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int64_t kSmemBudget = 48 * 1024;

struct PlanShape {
  int64_t G, T, k, E;
  int64_t chunk;           // pairs per chunk (within one rank)
  int64_t chunks_per_rank;
  int64_t chunks_per_group;  // k * chunks_per_rank
  int64_t num_chunks;        // G * chunks_per_group
};

// The (group, rank, first, end) of chunk c: pairs q in [first, end) of rank j in group g.
struct Chunk {
  int64_t g, j, first, end;
};

__device__ __forceinline__ Chunk chunk_of(const PlanShape& s, int64_t c) {
  Chunk r;
  r.g = c / s.chunks_per_group;
  const int64_t in_group = c - r.g * s.chunks_per_group;
  r.j = in_group / s.chunks_per_rank;
  r.first = (in_group - r.j * s.chunks_per_rank) * s.chunk;
  r.end = min(r.first + s.chunk, s.T);
  return r;
}

// Flat offset into indices/dest [G, T, k] of the pair at queue position q of rank j in group g.
__device__ __forceinline__ int64_t pair_offset(const PlanShape& s, const int64_t* order, bool order_per_choice,
                                               int64_t g, int64_t j, int64_t q) {
  int64_t t = q;
  if (order != nullptr) {
    t = order_per_choice ? order[(g * s.T + q) * s.k + j] : order[g * s.T + q];
  }
  return (g * s.T + t) * s.k + j;
}

template <typename index_t>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    plan_histogram_kernel(PlanShape s, const index_t* indices, const int64_t* order, bool order_per_choice,
                          int* hist, bool use_smem) {
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (c >= s.num_chunks) return;
  const int E = static_cast<int>(s.E);
  int* h = use_smem ? reinterpret_cast<int*>(dyn_smem) + static_cast<int64_t>(warp) * E : hist + c * E;
  if (use_smem) {
    for (int e = lane; e < E; e += 32) h[e] = 0;
    __syncwarp();
  }
  const Chunk ch = chunk_of(s, c);
  for (int64_t q = ch.first + lane; q < ch.end; q += 32) {
    const int64_t e = static_cast<int64_t>(indices[pair_offset(s, order, order_per_choice, ch.g, ch.j, q)]);
    CUDA_KERNEL_ASSERT(e >= 0 && e < E && "torchmoe::route_plan: indices out of range [0, num_experts)");
    atomicAdd(h + e, 1);
  }
  if (use_smem) {
    __syncwarp();
    for (int e = lane; e < E; e += 32) hist[c * E + e] = h[e];
  }
}

// Exclusive prefix of hist over the chunks of each group, per expert; totals into counts [G, E].
// Block: 32 experts x 8 slices of chunks; grid: ceil(E / 32) * G blocks.
__global__ void __launch_bounds__(256)
    plan_scan_kernel(PlanShape s, const int* hist, int64_t* offsets, int64_t* counts) {
  __shared__ int64_t part[8][32];
  const int x = threadIdx.x & 31, slice = threadIdx.x >> 5;
  const int64_t eblocks = (s.E + 31) / 32;
  const int64_t e = (static_cast<int64_t>(blockIdx.x) % eblocks) * 32 + x;
  const int64_t g = static_cast<int64_t>(blockIdx.x) / eblocks;
  const int64_t n = s.chunks_per_group;
  const int64_t per = (n + 7) / 8;
  const int64_t c0 = min(n, slice * per), c1 = min(n, c0 + per);
  const int64_t base = g * n;
  int64_t sum = 0;
  if (e < s.E) {
    for (int64_t c = c0; c < c1; ++c) sum += hist[(base + c) * s.E + e];
  }
  part[slice][x] = sum;
  __syncthreads();
  int64_t run = 0;
  for (int i = 0; i < slice; ++i) run += part[i][x];
  if (e < s.E) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t v = hist[(base + c) * s.E + e];
      offsets[(base + c) * s.E + e] = run;
      run += v;
    }
    if (slice == 7) counts[g * s.E + e] = run;
  }
}

// Dropless rows are expert-major, then group:
// row_offset[g, e] = sum_{e' < e} sum_g' counts[g', e'] + sum_{g' < g} counts[g', e].
// One block: each thread sums a contiguous range of experts, then a block-wide exclusive scan.
constexpr int kScanThreads = 1024;
__global__ void __launch_bounds__(kScanThreads)
    plan_row_offset_kernel(const int64_t* counts, int64_t G, int64_t E, int64_t* row_offset) {
  __shared__ int64_t part[kScanThreads];
  const int tid = threadIdx.x;
  const int64_t per = (E + kScanThreads - 1) / kScanThreads;
  const int64_t e0 = min(E, tid * per), e1 = min(E, e0 + per);
  int64_t sum = 0;
  for (int64_t e = e0; e < e1; ++e) {
    for (int64_t g = 0; g < G; ++g) sum += counts[g * E + e];
  }
  part[tid] = sum;
  __syncthreads();
  for (int off = 1; off < kScanThreads; off <<= 1) {  // inclusive scan (Hillis-Steele)
    const int64_t v = tid >= off ? part[tid - off] : 0;
    __syncthreads();
    part[tid] += v;
    __syncthreads();
  }
  int64_t run = part[tid] - sum;  // exclusive
  for (int64_t e = e0; e < e1; ++e) {
    for (int64_t g = 0; g < G; ++g) {
      row_offset[g * E + e] = run;
      run += counts[g * E + e];
    }
  }
}

// Slot of every pair. `offsets` rows are the running counters of their chunk (moved to shared memory
// when they fit). capacity >= 0: dest = (e * G + g) * capacity + pos if pos < capacity, else -1;
// capacity < 0: dest = row_offset[g, e] + pos.
template <typename index_t>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    plan_place_kernel(PlanShape s, const index_t* indices, const int64_t* order, bool order_per_choice,
                      int64_t* offsets, const int64_t* row_offset, int64_t capacity, int64_t* dest,
                      bool use_smem) {
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (c >= s.num_chunks) return;
  const int E = static_cast<int>(s.E);
  int64_t* ctr = use_smem ? reinterpret_cast<int64_t*>(dyn_smem) + static_cast<int64_t>(warp) * E : offsets + c * E;
  if (use_smem) {
    for (int e = lane; e < E; e += 32) ctr[e] = offsets[c * E + e];
    __syncwarp();
  }
  const Chunk ch = chunk_of(s, c);
  const unsigned lt_mask = (1u << lane) - 1u;
  for (int64_t q0 = ch.first; q0 < ch.end; q0 += 32) {
    const int64_t q = q0 + lane;
    const bool valid = q < ch.end;
    int64_t off = 0;
    int e = -1;
    if (valid) {
      off = pair_offset(s, order, order_per_choice, ch.g, ch.j, q);
      e = static_cast<int>(indices[off]);
      CUDA_KERNEL_ASSERT(e >= 0 && e < E && "torchmoe::route_plan: indices out of range [0, num_experts)");
    }
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    int64_t pos = 0;
    if (valid) pos = ctr[e] + __popc(peers & lt_mask);
    __syncwarp();
    if (valid && lane == __ffs(peers) - 1) ctr[e] += __popc(peers);
    __syncwarp();
    if (valid) {
      int64_t d;
      if (capacity >= 0) {
        d = pos < capacity ? (static_cast<int64_t>(e) * s.G + ch.g) * capacity + pos : -1;
      } else {
        d = row_offset[ch.g * s.E + e] + pos;
      }
      dest[off] = d;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> route_plan_cuda(const at::Tensor& indices_in, int64_t num_experts,
                                                   int64_t capacity, const std::optional<at::Tensor>& priority) {
  checks::check_route_plan_args(indices_in, num_experts, capacity, priority);
  TORCHMOE_CHECK_ARG(num_experts <= std::numeric_limits<int>::max(), "route_plan", "num_experts",
                     "must fit in int32 for the CUDA kernel, got ", num_experts);
  TORCHMOE_CUDA_SETUP(indices_in);
  const bool grouped = indices_in.dim() == 3;
  const at::Tensor indices = grouped ? indices_in.contiguous() : indices_in.unsqueeze(0).contiguous();
  PlanShape s;
  s.G = indices.size(0);
  s.T = indices.size(1);
  s.k = indices.size(2);
  s.E = num_experts;
  if (capacity >= 0) checks::check_route_plan_capacity_fits(s.E, s.G, capacity);
  at::Tensor dest = at::empty(indices.sizes(), indices.options().dtype(at::kLong));
  at::Tensor counts;
  auto finish = [&]() -> std::tuple<at::Tensor, at::Tensor> {
    if (grouped) return {dest, counts};
    return {dest.squeeze(0), counts.squeeze(0)};
  };
  if (s.G * s.T * s.k == 0) {
    counts = at::zeros({s.G, s.E}, indices.options().dtype(at::kLong));
    return finish();
  }
  counts = at::empty({s.G, s.E}, indices.options().dtype(at::kLong));

  // Queue order within each rank: stable sort by descending priority.
  at::Tensor order;
  bool order_per_choice = false;
  if (priority.has_value()) {
    at::Tensor p = grouped ? *priority : priority->unsqueeze(0);
    order_per_choice = p.dim() == 3;
    order = std::get<1>(at::sort(p.contiguous(), /*stable=*/true, /*dim=*/1, /*descending=*/true)).contiguous();
  }

  // Chunks of at least 4E pairs keep the histogram (chunks x E) smaller than the pairs.
  s.chunk = std::max<int64_t>(1024, ceil_div(4 * s.E, 32) * 32);
  s.chunks_per_rank = ceil_div(s.T, s.chunk);
  s.chunks_per_group = s.k * s.chunks_per_rank;
  s.num_chunks = s.G * s.chunks_per_group;

  const bool hist_smem = kWarpsPerBlock * s.E * static_cast<int64_t>(sizeof(int)) <= kSmemBudget;
  const bool ctr_smem = kWarpsPerBlock * s.E * static_cast<int64_t>(sizeof(int64_t)) <= kSmemBudget;
  auto opts = indices.options();
  at::Tensor hist = hist_smem ? at::empty({s.num_chunks, s.E}, opts.dtype(at::kInt))
                              : at::zeros({s.num_chunks, s.E}, opts.dtype(at::kInt));
  at::Tensor offsets = at::empty({s.num_chunks, s.E}, opts.dtype(at::kLong));
  const int64_t blocks = ceil_div(s.num_chunks, kWarpsPerBlock);
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "torchmoe::route_plan: input too large");
  const int64_t* order_ptr = order.defined() ? order.const_data_ptr<int64_t>() : nullptr;

  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "route_plan_cuda", [&] {
    plan_histogram_kernel<index_t>
        <<<blocks, 32 * kWarpsPerBlock, hist_smem ? kWarpsPerBlock * s.E * sizeof(int) : 0, stream>>>(
            s, indices.const_data_ptr<index_t>(), order_ptr, order_per_choice, hist.mutable_data_ptr<int>(),
            hist_smem);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  plan_scan_kernel<<<ceil_div(s.E, 32) * s.G, 256, 0, stream>>>(s, hist.const_data_ptr<int>(), offsets.mutable_data_ptr<int64_t>(),
                               counts.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor row_offset;
  if (capacity < 0) {
    row_offset = at::empty({s.G, s.E}, opts.dtype(at::kLong));
    plan_row_offset_kernel<<<1, kScanThreads, 0, stream>>>(counts.const_data_ptr<int64_t>(), s.G, s.E,
                                                           row_offset.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "route_plan_cuda", [&] {
    plan_place_kernel<index_t>
        <<<blocks, 32 * kWarpsPerBlock, ctr_smem ? kWarpsPerBlock * s.E * sizeof(int64_t) : 0, stream>>>(
            s, indices.const_data_ptr<index_t>(), order_ptr, order_per_choice, offsets.mutable_data_ptr<int64_t>(),
            row_offset.defined() ? row_offset.const_data_ptr<int64_t>() : nullptr, capacity,
            dest.mutable_data_ptr<int64_t>(), ctr_smem);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return finish();
}

}  // namespace
}  // namespace torchmoe::cuda

TORCH_LIBRARY_IMPL(torchmoe, CUDA, m) { m.impl("route_plan", &torchmoe::cuda::route_plan_cuda); }
