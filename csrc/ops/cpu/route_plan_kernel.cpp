// CPU kernel of torchmoe::route_plan: a stable counting sort of every group's (choice, token) queue,
// linear in G * T * k and independent of the thread count.
//
// A group's queue is the stream s = j * T + r (choice rank j, place r), holding token t = order_j[r]
// (t = r without priority). The stream is cut into chunks; each chunk histograms its experts (in
// parallel), an exclusive scan over the chunks gives every chunk its first position in each expert's
// queue, and the chunks then place their slots (in parallel). Chunking changes the work split, never
// the result.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/bit_cast.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops/common/route_plan_checks.h"

namespace torchmoe::cpu {
namespace {

constexpr int64_t kMinChunk = 8192;      // slots per task, at least
constexpr int64_t kParallelMin = 32768;  // slots below which a task is not worth a thread

struct Shape {
  int64_t G, T, k, E;
  int64_t P;  // priority columns: 1 ([.., T]) or k ([.., T, k]); 0 without priority
};

// An int64 key whose order is torch.sort's order of the value: NaN above +inf, -0.0 equal to 0.0.
template <typename scalar_t>
inline int64_t order_key(scalar_t v) {
  if constexpr (std::is_integral_v<scalar_t>) {
    return static_cast<int64_t>(v);
  } else {
    const double d = static_cast<double>(v);
    if (std::isnan(d)) {
      return std::numeric_limits<int64_t>::max();
    }
    if (d == 0.0) {
      return 0;
    }
    const auto bits = c10::bit_cast<int64_t>(d);
    // Negative doubles order backwards by their bits: flip the magnitude.
    return bits >= 0 ? bits : (bits ^ std::numeric_limits<int64_t>::max());
  }
}

// order[(g * P + q) * T + r]: the token at place r of group g's queue for priority column q, i.e. tokens by
// descending priority, ties by token index (std::stable_sort keeps the token order among equal keys).
template <typename scalar_t>
void build_order_typed(const scalar_t* p, const Shape& s, int64_t* order) {
  const int64_t T = s.T, P = s.P;
  at::parallel_for(0, s.G * P, std::max<int64_t>(1, kParallelMin / T), [&](int64_t begin, int64_t end) {
    std::vector<std::pair<int64_t, int64_t>> keyed(T);
    for (int64_t gq = begin; gq < end; ++gq) {
      const int64_t g = gq / P, q = gq % P;
      const scalar_t* pg = p + g * T * P + q;
      for (int64_t t = 0; t < T; ++t) {
        keyed[t] = {order_key(pg[t * P]), t};
      }
      std::stable_sort(keyed.begin(), keyed.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
      int64_t* o = order + gq * T;
      for (int64_t r = 0; r < T; ++r) {
        o[r] = keyed[r].second;
      }
    }
  });
}

void build_order(const at::Tensor& priority, const Shape& s, int64_t* order) {
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, priority.scalar_type(), "route_plan_cpu_priority",
                             [&] { build_order_typed(priority.const_data_ptr<scalar_t>(), s, order); });
}

C10_NOINLINE void throw_first_bad_index(const at::Tensor& indices, int64_t num_experts) {
  // Serial and in memory order, so the message does not depend on which thread saw a bad id first.
  const at::Tensor contiguous = indices.contiguous();
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "route_plan_cpu_check", [&] {
    const index_t* idx = contiguous.const_data_ptr<index_t>();
    const int64_t n = indices.numel();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t e = static_cast<int64_t>(idx[i]);
      if (e < 0 || e >= num_experts) {
        std::vector<int64_t> where(indices.dim());
        int64_t rest = i;
        for (int64_t d = indices.dim() - 1; d >= 0; --d) {
          where[d] = rest % indices.size(d);
          rest /= indices.size(d);
        }
        TORCHMOE_CHECK_ARG(false, "route_plan", "indices", "must hold expert ids in [0, num_experts = ", num_experts,
                           "), got ", e, " at ", c10::IntArrayRef(where));
      }
    }
  });
  TORCH_INTERNAL_ASSERT(false, "torchmoe::route_plan: a bad expert id was seen but not found again");
}

// idx: contiguous [G, T, k]; indices: the argument, for error messages; order: see build_order (nullptr
// without priority); dest: contiguous [G, T, k]; counts: [G, E].
//
// Work is split into tasks (g, b): token places [b * B, (b + 1) * B) of group g, for every choice rank j.
// Its piece of rank j is the stream chunk (g, j, b); chunks are ordered j-major, b-minor in the stream.
// A task covers whole tokens, so without priority two threads share dest cache lines only at block edges.
template <typename index_t, bool kOrdered, bool kDropless>
void plan(const at::Tensor& indices, const index_t* idx, const int64_t* order, const Shape& s, int64_t capacity,
          int64_t* dest, int64_t* counts) {
  const int64_t G = s.G, T = s.T, k = s.k, E = s.E, P = s.P;

  // Blocks per group: enough for every thread when G is small; one when G is large (parallel over
  // groups). A block holds at least kMinChunk slots and E tokens, so the O(E) work per chunk stays small.
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t min_block = std::max((kMinChunk + k - 1) / k, E);
  int64_t nb = std::clamp<int64_t>((nthreads + G - 1) / G, 1, std::max<int64_t>(1, T / min_block));
  const int64_t B = (T + nb - 1) / nb;
  nb = (T + B - 1) / B;
  const int64_t grain = std::max<int64_t>(1, kParallelMin / (B * k));

  // With one block per group the group's chunks are consecutive in one task, whose cursors simply run
  // on: only per-group counts are needed. Otherwise hist[g, b, j, e] counts chunk (g, j, b) and, after
  // the scan, holds the position of its first slot in expert e's queue.
  const bool single = nb == 1;
  std::vector<int64_t> hist(single ? 0 : G * nb * k * E);
  std::atomic<bool> bad{false};

  // Calls body(slot, e) for chunk (g, j, b), slot = offset of (token, j) in group g's dest.
  auto visit = [&](int64_t g, int64_t j, int64_t b, auto&& body) {
    const index_t* gi = idx + g * T * k;
    const int64_t* ord = kOrdered ? order + (g * P + (P == 1 ? 0 : j)) * T : nullptr;
    const int64_t r1 = std::min(T, (b + 1) * B);
    for (int64_t r = b * B; r < r1; ++r) {
      const int64_t slot = (kOrdered ? ord[r] : r) * k + j;
      body(slot, static_cast<int64_t>(gi[slot]));
    }
  };

  at::parallel_for(0, G * nb, grain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> local(E);
    bool ok = true;
    auto count = [&](int64_t, int64_t e) {
      if (C10_UNLIKELY(static_cast<uint64_t>(e) >= static_cast<uint64_t>(E))) {
        ok = false;
        e = 0;
      }
      ++local[e];
    };
    for (int64_t task = begin; task < end && ok; ++task) {
      const int64_t g = task / nb, b = task % nb;
      if (single) {
        std::fill(local.begin(), local.end(), 0);
        for (int64_t j = 0; j < k; ++j) {
          visit(g, j, b, count);
        }
        std::copy(local.begin(), local.end(), counts + g * E);
      } else {
        for (int64_t j = 0; j < k; ++j) {
          std::fill(local.begin(), local.end(), 0);
          visit(g, j, b, count);
          std::copy(local.begin(), local.end(), hist.begin() + ((g * nb + b) * k + j) * E);
        }
      }
    }
    if (!ok) {
      bad.store(true, std::memory_order_relaxed);
    }
  });
  if (bad.load()) {
    throw_first_bad_index(indices, E);
  }

  if (!single) {
    // Exclusive scan over each group's chunks in stream order, per expert; the totals are the counts.
    at::parallel_for(0, G, std::max<int64_t>(1, kParallelMin / (nb * k * E)), [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        int64_t* total = counts + g * E;
        std::fill(total, total + E, 0);
        for (int64_t j = 0; j < k; ++j) {
          for (int64_t b = 0; b < nb; ++b) {
            int64_t* h = hist.data() + ((g * nb + b) * k + j) * E;
            for (int64_t e = 0; e < E; ++e) {
              const int64_t n = h[e];
              h[e] = total[e];
              total[e] += n;
            }
          }
        }
      }
    });
  }

  // Dropless rows: expert-major, then group. Needs every group's counts.
  std::vector<int64_t> row_offset;
  if constexpr (kDropless) {
    row_offset.resize(G * E);
    std::vector<int64_t> next(E, 0);
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t e = 0; e < E; ++e) {
        next[e] += counts[g * E + e];
      }
    }
    int64_t start = 0;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = next[e];
      next[e] = start;
      start += n;
    }
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t e = 0; e < E; ++e) {
        row_offset[g * E + e] = next[e];
        next[e] += counts[g * E + e];
      }
    }
  }

  at::parallel_for(0, G * nb, grain, [&](int64_t begin, int64_t end) {
    // Dropless: cursor = the next row. Capacity: cursor = the next queue position, base = the expert's
    // first row in this group.
    std::vector<int64_t> cursor(E), base(kDropless ? 0 : E);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / nb, b = task % nb;
      int64_t* gd = dest + g * T * k;
      const int64_t* first = kDropless ? row_offset.data() + g * E : nullptr;
      if constexpr (!kDropless) {
        for (int64_t e = 0; e < E; ++e) {
          base[e] = (e * G + g) * capacity;
        }
      }
      for (int64_t j = 0; j < k; ++j) {
        if (j == 0 || !single) {
          const int64_t* h = single ? nullptr : hist.data() + ((g * nb + b) * k + j) * E;
          for (int64_t e = 0; e < E; ++e) {
            cursor[e] = (kDropless ? first[e] : 0) + (single ? 0 : h[e]);
          }
        }
        if constexpr (kDropless) {
          visit(g, j, b, [&](int64_t slot, int64_t e) { gd[slot] = cursor[e]++; });
        } else {
          visit(g, j, b, [&](int64_t slot, int64_t e) {
            const int64_t pos = cursor[e]++;
            gd[slot] = pos < capacity ? base[e] + pos : -1;
          });
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> route_plan_cpu(const at::Tensor& indices, int64_t num_experts, int64_t capacity,
                                                  const std::optional<at::Tensor>& priority) {
  checks::check_route_plan_args(indices, num_experts, capacity, priority);
  const bool grouped = indices.dim() == 3;
  // [T, k] is read as [1, T, k] (the same memory; an unsqueeze would cost a dispatcher call at a decode step)
  const auto idx = indices.expect_contiguous();
  Shape s{grouped ? idx->size(0) : 1, idx->size(-2), idx->size(-1), num_experts, 0};
  if (capacity >= 0) {
    checks::check_route_plan_capacity_fits(num_experts, s.G, capacity);
  }

  at::Tensor dest = at::empty(indices.sizes(), indices.options().dtype(at::kLong));
  at::Tensor counts = at::empty(grouped ? std::vector<int64_t>{s.G, s.E} : std::vector<int64_t>{s.E},
                                indices.options().dtype(at::kLong));
  if (s.G * s.T * s.k == 0) {
    counts.zero_();
    return {dest, counts};
  }

  at::Tensor order;
  if (priority.has_value()) {
    at::Tensor p = grouped ? priority->contiguous() : priority->unsqueeze(0).contiguous();
    s.P = p.dim() == 3 ? s.k : 1;
    order = at::empty({s.G * s.P * s.T}, indices.options().dtype(at::kLong));
    build_order(p, s, order.data_ptr<int64_t>());
  }

  int64_t* d = dest.data_ptr<int64_t>();
  int64_t* n = counts.data_ptr<int64_t>();
  AT_DISPATCH_INDEX_TYPES(idx->scalar_type(), "route_plan_cpu", [&] {
    const index_t* ip = idx->const_data_ptr<index_t>();
    const int64_t* op = order.defined() ? order.const_data_ptr<int64_t>() : nullptr;
    const bool dropless = capacity < 0;
    if (op != nullptr) {
      dropless ? plan<index_t, true, true>(indices, ip, op, s, capacity, d, n)
               : plan<index_t, true, false>(indices, ip, op, s, capacity, d, n);
    } else {
      dropless ? plan<index_t, false, true>(indices, ip, op, s, capacity, d, n)
               : plan<index_t, false, false>(indices, ip, op, s, capacity, d, n);
    }
  });
  return {dest, counts};
}

}  // namespace
}  // namespace torchmoe::cpu

TORCH_LIBRARY_IMPL(torchmoe, CPU, m) {
  m.impl("route_plan", &torchmoe::cpu::route_plan_cpu);
}
