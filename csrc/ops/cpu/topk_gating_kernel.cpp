// CPU kernels of topk_gating and _topk_gating_backward. Semantics: DESIGN.md and torchmoe.reference.
//
// One row (token) per loop iteration, rows split over threads with at::parallel_for; every row is
// independent, so results do not depend on the thread count. Arithmetic in float (double for double).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "ops/common/topk_gating_checks.h"

namespace torchmoe::ops {
namespace {

// Selection order: descending value, NaN ahead of everything (as torch.sort and torch.topk), ties to the
// lower index. `beats(v, w)`: v, seen at a higher index than w, goes strictly ahead of w.
template <typename T>
inline bool beats(T v, T w) {
  return v > w || (v != v && w == w);
}

template <typename T>
struct Ahead {
  const T* v;
  bool operator()(int64_t a, int64_t b) const {
    const T va = v[a], vb = v[b];
    if (va > vb) return true;
    if (va < vb) return false;
    const bool na = va != va, nb = vb != vb;
    if (na != nb) return na;
    return a < b;
  }
};

// Elements of logits per parallel_for chunk at least (a row costs about E compares).
constexpr int64_t kGrainElements = 16384;

// Up to this k a running sorted top-k (insertion) beats a partial selection.
constexpr int64_t kSmallK = 16;

// Running top-k over x[0..n), kept sorted in (tv, ti): one pass, most elements cost one compare.
template <typename acc_t, typename src_t>
inline void topk_running(const src_t* x, int64_t n, int64_t k, acc_t* tv, int64_t* ti) {
  for (int64_t i = 0; i < k; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    int64_t j = i;
    for (; j > 0 && beats(v, tv[j - 1]); --j) {
      tv[j] = tv[j - 1];
      ti[j] = ti[j - 1];
    }
    tv[j] = v;
    ti[j] = i;
  }
  acc_t kth = tv[k - 1];
  for (int64_t i = k; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    if (!beats(v, kth)) continue;
    int64_t j = k - 1;
    for (; j > 0 && beats(v, tv[j - 1]); --j) {
      tv[j] = tv[j - 1];
      ti[j] = ti[j - 1];
    }
    tv[j] = v;
    ti[j] = i;
    kth = tv[k - 1];
  }
}

// A float as an int32 in the selection order: monotonic in the value, -0 equal to +0, every NaN above +inf.
inline int32_t order_key(float f) {
  int32_t b;
  std::memcpy(&b, &f, sizeof(b));
  const int32_t mag = b & 0x7FFFFFFF;
  const int32_t key = mag == 0 ? 0 : (b ^ ((b >> 31) & 0x7FFFFFFF));
  return mag > 0x7F800000 ? std::numeric_limits<int32_t>::max() : key;
}

// Top-K for a small fixed K without branches (integer compares and conditional moves): an element enters at
// the first slot whose key it strictly exceeds, so an equal key seen later (higher index) stays behind.
template <int K, typename src_t>
inline void topk_fixed(const src_t* x, int64_t n, float* tv, int64_t* ti) {
  int32_t key[K];
  int64_t id[K];
  for (int j = 0; j < K; ++j) {
    key[j] = std::numeric_limits<int32_t>::min();  // below every order_key
    id[j] = 0;
  }
  for (int64_t i = 0; i < n; ++i) {
    const int32_t kv = order_key(static_cast<float>(x[i]));
    bool ahead[K];
    for (int j = 0; j < K; ++j) ahead[j] = kv > key[j];
    for (int j = K - 1; j > 0; --j) {
      key[j] = ahead[j - 1] ? key[j - 1] : (ahead[j] ? kv : key[j]);
      id[j] = ahead[j - 1] ? id[j - 1] : (ahead[j] ? i : id[j]);
    }
    key[0] = ahead[0] ? kv : key[0];
    id[0] = ahead[0] ? i : id[0];
  }
  for (int j = 0; j < K; ++j) {
    ti[j] = id[j];
    tv[j] = static_cast<float>(x[id[j]]);
  }
}

// Top-k of a row for the selection on logits. For 2 <= k <= 4 over few experts, elements enter the top k
// often enough that mispredicted branches cost more than the branch-free insertion (measured; for k = 1 or
// many experts the running top-k's single well-predicted compare per element wins).
template <typename acc_t, typename src_t>
inline void topk_row(const src_t* x, int64_t n, int64_t k, acc_t* tv, int64_t* ti) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (n > 256) return topk_running(x, n, k, tv, ti);
    switch (k) {
      case 2: return topk_fixed<2>(x, n, tv, ti);
      case 3: return topk_fixed<3>(x, n, tv, ti);
      case 4: return topk_fixed<4>(x, n, tv, ti);
      default: break;
    }
  }
  topk_running(x, n, k, tv, ti);
}

// Top-k of v[0..n) for any k: partial selection on an index array, then a sort of the k chosen.
template <typename acc_t>
inline void topk_select_indirect(const acc_t* v, int64_t n, int64_t k, int64_t* order, acc_t* tv, int64_t* ti) {
  std::iota(order, order + n, int64_t{0});
  const Ahead<acc_t> ahead{v};
  if (k < n) std::nth_element(order, order + (k - 1), order + n, ahead);
  std::sort(order, order + k, ahead);
  for (int64_t j = 0; j < k; ++j) {
    ti[j] = order[j];
    tv[j] = v[order[j]];
  }
}

// float: the same order as one unsigned key per element (value bits made monotonic, NaN highest, -0 == +0,
// then the complemented index), so the selection compares plain integers instead of chasing indices.
inline void topk_select_keys(const float* v, int64_t n, int64_t k, int64_t* order, float* tv, int64_t* ti) {
  uint64_t* keys = reinterpret_cast<uint64_t*>(order);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    const float f = v[i] == 0.0f ? 0.0f : v[i];
    std::memcpy(&bits, &f, sizeof(bits));
    bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    bits = v[i] != v[i] ? 0xFFFFFFFFu : bits;
    keys[i] = (uint64_t{bits} << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(i));
  }
  if (k < n) std::nth_element(keys, keys + (k - 1), keys + n, std::greater<uint64_t>());
  std::sort(keys, keys + k, std::greater<uint64_t>());
  for (int64_t j = 0; j < k; ++j) {
    ti[j] = static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(keys[j]));
    tv[j] = v[ti[j]];
  }
}

template <typename acc_t>
inline void topk_select(const acc_t* v, int64_t n, int64_t k, int64_t* order, acc_t* tv, int64_t* ti) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (n <= int64_t{0xFFFFFFFF}) return topk_select_keys(v, n, k, order, tv, ti);
  }
  topk_select_indirect(v, n, k, order, tv, ti);
}

template <typename acc_t>
inline void topk_of(const acc_t* v, int64_t n, int64_t k, int64_t* order, acc_t* tv, int64_t* ti) {
  if (k <= kSmallK) {
    topk_row(v, n, k, tv, ti);
  } else {
    topk_select(v, n, k, order, tv, ti);
  }
}

template <typename acc_t>
inline acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + std::exp(-x));
}

// Row max for a stable softmax (NaN rows give NaN scores through the sum, as torch.softmax does).
template <typename acc_t, typename src_t>
inline acc_t row_max(const src_t* x, int64_t n) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    m = v > m ? v : m;
  }
  return m;
}

struct ForwardArgs {
  int64_t T, E, k;
  bool softmax, renormalize;
  const float* bias;  // nullptr when absent
  int64_t groups, topk_groups;
  double scale;
};

template <typename scalar_t>
void topk_gating_rows(const scalar_t* logits, scalar_t* weights, int64_t* indices, const ForwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t E = a.E, k = a.k;
  const acc_t scale = static_cast<acc_t>(a.scale);
  const bool select_on_logits = a.bias == nullptr && a.groups == 1;
  const int64_t group_size = E / a.groups;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / E);

  at::parallel_for(0, a.T, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tv(k), score, sel, group_score;
    std::vector<int64_t> ti(k), order;
    std::vector<acc_t> gv;
    std::vector<int64_t> gi;
    if (!select_on_logits || k > kSmallK) {
      score.resize(E);
      sel.resize(E);
      order.resize(E);
    }
    if (a.groups > 1) {
      group_score.resize(a.groups);
      gv.resize(a.topk_groups);
      gi.resize(a.topk_groups);
    }

    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* x = logits + r * E;
      scalar_t* w = weights + r * k;
      int64_t* out_idx = indices + r * k;

      if (select_on_logits) {
        // Softmax and sigmoid are increasing: select on the logits, in one read of the row.
        if (k <= kSmallK) {
          topk_row(x, E, k, tv.data(), ti.data());
        } else {
          for (int64_t i = 0; i < E; ++i) sel[i] = static_cast<acc_t>(x[i]);
          topk_select(sel.data(), E, k, order.data(), tv.data(), ti.data());
        }
        if (a.softmax) {
          const acc_t m = tv[0];  // the row max
          acc_t denom = 0;
          if (a.renormalize) {
            for (int64_t j = 0; j < k; ++j) {
              tv[j] = std::exp(tv[j] - m);
              denom += tv[j];
            }
          } else {
            for (int64_t i = 0; i < E; ++i) denom += std::exp(static_cast<acc_t>(x[i]) - m);
            for (int64_t j = 0; j < k; ++j) tv[j] = std::exp(tv[j] - m);
          }
          for (int64_t j = 0; j < k; ++j) w[j] = static_cast<scalar_t>(tv[j] / denom * scale);
        } else {
          acc_t denom = 0;
          for (int64_t j = 0; j < k; ++j) {
            tv[j] = sigmoid(tv[j]);
            denom += tv[j];
          }
          for (int64_t j = 0; j < k; ++j) {
            const acc_t s = a.renormalize ? tv[j] / denom : tv[j];
            w[j] = static_cast<scalar_t>(s * scale);
          }
        }
        for (int64_t j = 0; j < k; ++j) out_idx[j] = ti[j];
        continue;
      }

      // Selection on score (+ bias): the full score row is needed.
      if (a.softmax) {
        const acc_t m = row_max<acc_t>(x, E);
        acc_t denom = 0;
        for (int64_t i = 0; i < E; ++i) {
          score[i] = std::exp(static_cast<acc_t>(x[i]) - m);
          denom += score[i];
        }
        const acc_t inv = acc_t(1) / denom;
        for (int64_t i = 0; i < E; ++i) score[i] *= inv;
      } else {
        for (int64_t i = 0; i < E; ++i) score[i] = sigmoid(static_cast<acc_t>(x[i]));
      }
      if (a.bias != nullptr) {
        for (int64_t i = 0; i < E; ++i) sel[i] = score[i] + static_cast<acc_t>(a.bias[i]);
      } else {
        std::copy(score.begin(), score.end(), sel.begin());
      }

      if (a.groups > 1) {
        // Group score: sum of its best two (or one) selection scores; keep the topk_groups best groups.
        const int64_t top = std::min<int64_t>(2, group_size);
        for (int64_t g = 0; g < a.groups; ++g) {
          acc_t best[2];
          int64_t unused[2];
          topk_running(sel.data() + g * group_size, group_size, top, best, unused);
          group_score[g] = top == 2 ? best[0] + best[1] : best[0];
        }
        topk_of(group_score.data(), a.groups, a.topk_groups, order.data(), gv.data(), gi.data());
        // Mark eligible groups in `order` (free again), then mask the rest to -inf.
        std::fill(order.begin(), order.begin() + a.groups, int64_t{0});
        for (int64_t j = 0; j < a.topk_groups; ++j) order[gi[j]] = 1;
        for (int64_t g = 0; g < a.groups; ++g) {
          if (order[g]) continue;
          std::fill(sel.begin() + g * group_size, sel.begin() + (g + 1) * group_size,
                    -std::numeric_limits<acc_t>::infinity());
        }
      }

      topk_of(sel.data(), E, k, order.data(), tv.data(), ti.data());

      if (a.softmax && a.renormalize) {
        // Softmax over the selected logits (the seeds' scatter-softmax).
        acc_t m = -std::numeric_limits<acc_t>::infinity();
        for (int64_t j = 0; j < k; ++j) {
          tv[j] = static_cast<acc_t>(x[ti[j]]);
          m = tv[j] > m ? tv[j] : m;
        }
        acc_t denom = 0;
        for (int64_t j = 0; j < k; ++j) {
          tv[j] = std::exp(tv[j] - m);
          denom += tv[j];
        }
        for (int64_t j = 0; j < k; ++j) w[j] = static_cast<scalar_t>(tv[j] / denom * scale);
      } else {
        acc_t denom = 0;
        for (int64_t j = 0; j < k; ++j) denom += score[ti[j]];
        for (int64_t j = 0; j < k; ++j) {
          const acc_t s = a.renormalize ? score[ti[j]] / denom : score[ti[j]];
          w[j] = static_cast<scalar_t>(s * scale);
        }
      }
      for (int64_t j = 0; j < k; ++j) out_idx[j] = ti[j];
    }
  });
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

std::tuple<at::Tensor, at::Tensor> topk_gating_cpu(const at::Tensor& logits, int64_t k, c10::string_view score_func,
                                                   bool renormalize, const std::optional<at::Tensor>& expert_bias,
                                                   int64_t num_expert_groups, int64_t topk_expert_groups,
                                                   double scale) {
  checks::check_topk_gating_args(logits, k, score_func, expert_bias, num_expert_groups, topk_expert_groups);
  const int64_t E = logits.size(-1);
  const auto out_sizes = with_last(logits.sizes(), k);
  at::Tensor weights = at::empty(out_sizes, logits.options());
  at::Tensor indices = at::empty(out_sizes, logits.options().dtype(at::kLong));
  const int64_t T = logits.numel() / E;
  if (T == 0) return {weights, indices};

  const at::Tensor x = logits.contiguous();
  at::Tensor bias;
  if (expert_bias.has_value() && expert_bias->defined()) bias = expert_bias->contiguous();

  ForwardArgs args{T, E, k, checks::topk_gating_is_softmax(score_func), renormalize,
                   bias.defined() ? bias.const_data_ptr<float>() : nullptr, num_expert_groups, topk_expert_groups,
                   scale};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_gating_cpu", [&] {
    topk_gating_rows<scalar_t>(x.const_data_ptr<scalar_t>(), weights.mutable_data_ptr<scalar_t>(),
                               indices.mutable_data_ptr<int64_t>(), args);
  });
  return {weights, indices};
}

// d logits of one row. Per selected slot j (expert i_j, upstream gradient g_j), with c = scale:
//   softmax, renormalize:   p_j = softmax over the selected logits,   d x_{i_j} += c p_j (g_j - sum_l g_l p_l)
//   sigmoid, renormalize:   s_j = sigmoid(x_{i_j}), Z = sum_l s_l,    d x_{i_j} += c (g_j - sum_l g_l s_l / Z) / Z * s_j (1 - s_j)
//   sigmoid:                                                           d x_{i_j} += c g_j s_j (1 - s_j)
//   softmax (all E):        p = softmax(x), G_i = sum of g_j over slots with i_j = i,
//                                                                      d x_i = c p_i (G_i - sum_l g_l p_{i_l})
// Accumulating per slot keeps these exact even if indices repeat an expert.
template <typename scalar_t>
void topk_gating_backward_rows(const scalar_t* grad_w, const scalar_t* logits, const int64_t* indices,
                               scalar_t* grad_logits, int64_t T, int64_t E, int64_t k, bool softmax, bool renormalize,
                               double scale_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t c = static_cast<acc_t>(scale_d);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / E);
  at::parallel_for(0, T, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> d(E), p(k);
    std::vector<acc_t> full;
    if (softmax && !renormalize) full.resize(E);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* x = logits + r * E;
      const scalar_t* g = grad_w + r * k;
      const int64_t* idx = indices + r * k;
      std::fill(d.begin(), d.end(), acc_t(0));

      if (softmax && !renormalize) {
        const acc_t m = row_max<acc_t>(x, E);
        acc_t denom = 0;
        for (int64_t i = 0; i < E; ++i) {
          full[i] = std::exp(static_cast<acc_t>(x[i]) - m);
          denom += full[i];
        }
        const acc_t inv = acc_t(1) / denom;
        for (int64_t i = 0; i < E; ++i) full[i] *= inv;
        acc_t v = 0;
        for (int64_t j = 0; j < k; ++j) {
          const acc_t gj = static_cast<acc_t>(g[j]);
          v += gj * full[idx[j]];
          d[idx[j]] += gj;
        }
        for (int64_t i = 0; i < E; ++i) d[i] = c * full[i] * (d[i] - v);
      } else if (softmax) {
        acc_t m = -std::numeric_limits<acc_t>::infinity();
        for (int64_t j = 0; j < k; ++j) {
          p[j] = static_cast<acc_t>(x[idx[j]]);
          m = p[j] > m ? p[j] : m;
        }
        acc_t denom = 0;
        for (int64_t j = 0; j < k; ++j) {
          p[j] = std::exp(p[j] - m);
          denom += p[j];
        }
        acc_t dot = 0;
        for (int64_t j = 0; j < k; ++j) {
          p[j] /= denom;
          dot += static_cast<acc_t>(g[j]) * p[j];
        }
        for (int64_t j = 0; j < k; ++j) d[idx[j]] += c * p[j] * (static_cast<acc_t>(g[j]) - dot);
      } else {
        acc_t denom = 0, dot = 0;
        for (int64_t j = 0; j < k; ++j) {
          p[j] = sigmoid(static_cast<acc_t>(x[idx[j]]));
          denom += p[j];
          dot += static_cast<acc_t>(g[j]) * p[j];
        }
        for (int64_t j = 0; j < k; ++j) {
          const acc_t gj = static_cast<acc_t>(g[j]);
          const acc_t ds = renormalize ? (gj - dot / denom) / denom : gj;
          d[idx[j]] += c * ds * p[j] * (acc_t(1) - p[j]);
        }
      }

      scalar_t* out = grad_logits + r * E;
      for (int64_t i = 0; i < E; ++i) out[i] = static_cast<scalar_t>(d[i]);
    }
  });
}

at::Tensor topk_gating_backward_cpu(const at::Tensor& grad_weights, const at::Tensor& logits,
                                    const at::Tensor& indices, c10::string_view score_func, bool renormalize,
                                    double scale) {
  checks::check_topk_gating_backward_args(grad_weights, logits, indices, score_func);
  at::Tensor grad_logits = at::empty(logits.sizes(), logits.options());
  const int64_t E = logits.size(-1);
  const int64_t T = logits.numel() / E;
  const int64_t k = indices.size(-1);
  if (grad_logits.numel() == 0) return grad_logits;
  if (k == 0) return grad_logits.zero_();

  const at::Tensor x = logits.contiguous();
  const at::Tensor idx = indices.contiguous();
  const at::Tensor g = grad_weights.to(logits.scalar_type()).contiguous();
  const bool softmax = checks::topk_gating_is_softmax(score_func);
  // Serial check before the parallel rows index d / x with the ids: the first bad id in memory order is
  // reported, and no worker thread throws.
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < T * k; ++i) {
    TORCHMOE_CHECK_ARG(ip[i] >= 0 && ip[i] < E, "_topk_gating_backward", "indices",
                       "must hold expert ids in [0, E = ", E, "), got ", ip[i], " at row ", i / k, ", choice ",
                       i % k);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_gating_backward_cpu", [&] {
    topk_gating_backward_rows<scalar_t>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                        idx.const_data_ptr<int64_t>(), grad_logits.mutable_data_ptr<scalar_t>(), T,
                                        E, k, softmax, renormalize, scale);
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, CPU, m) {
  m.impl("topk_gating", &topk_gating_cpu);
  m.impl("_topk_gating_backward", &topk_gating_backward_cpu);
}

}  // namespace torchmoe::ops
