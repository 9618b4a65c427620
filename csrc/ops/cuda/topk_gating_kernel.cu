// CUDA kernels of torchmoe::topk_gating and its backward.
//
// One row (token) per warp for E <= 1024, one row per block above that. A thread owns VPT consecutive
// experts, reads them once (16-byte loads where the row allows) and keeps them in registers. The k
// winners come from k rounds of a group-wide argmax over packed (value, index) keys (topk_keys.cuh);
// with VPT <= 8 each thread first sorts its keys, so a round only pops the head of one thread's list.
// Weights are computed from the k winners (re-read from the logits, already in cache, or decoded from
// the key). The backward is one kernel per row: the gradient of each choice, then one write of the row.
// Reductions have a fixed shape, so every result is the same on every run.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>

#include "ops/common/checks.h"
#include "ops/common/topk_gating_checks.h"
#include "ops/cuda/cuda_common.cuh"
#include "ops/cuda/topk_keys.cuh"

namespace torchmoe::cuda {
namespace {

constexpr int kWarpModeMaxExperts = 1024;   // 32 lanes x 32 values
constexpr int kBlockModeMaxExperts = 32768; // 1024 threads x 32 values
constexpr int kRowsPerWarpBlock = 4;        // warp mode: 4 rows (warps) per block
constexpr int64_t kSmemBudget = 48 * 1024;  // dynamic shared memory used without opting in

template <typename A>
struct FwdParams {
  const void* logits;
  const float* bias;  // nullptr: no expert bias
  void* weights;
  int64_t* indices;
  unsigned char* scratch;  // global per-row-slot buffers when shared memory is too small, else nullptr
  int64_t rows;
  int64_t scratch_bytes;  // per row slot
  int E, k, G, topg;
  bool softmax, renorm, vec;
  A scale;
};

template <typename A>
struct BwdParams {
  const void* grad;  // [rows, k], logits' dtype
  const void* logits;
  const int64_t* indices;
  void* grad_logits;
  unsigned char* scratch;
  int64_t rows;
  int64_t scratch_bytes;
  int E, k;
  bool softmax, renorm, vec;
  A scale;
};

// Reads the VPT values of one thread (experts e0 .. e0+VPT-1); beyond E: zeros.
template <typename scalar_t, int VPT>
__device__ __forceinline__ void load_chunk(const scalar_t* rowp, int e0, int E, bool vec, scalar_t* raw) {
  constexpr int kBytes = VPT * static_cast<int>(sizeof(scalar_t));
  if constexpr (kBytes % 16 == 0) {
    if (vec && e0 + VPT <= E) {
      const uint4* src = reinterpret_cast<const uint4*>(rowp + e0);
      uint4* dst = reinterpret_cast<uint4*>(raw);
#pragma unroll
      for (int c = 0; c < kBytes / 16; ++c) dst[c] = src[c];
      return;
    }
  }
#pragma unroll
  for (int s = 0; s < VPT; ++s) raw[s] = (e0 + s < E) ? rowp[e0 + s] : scalar_t(0);
}

template <typename scalar_t, int VPT>
__device__ __forceinline__ void store_chunk(scalar_t* rowp, int e0, int E, bool vec, const scalar_t* raw) {
  constexpr int kBytes = VPT * static_cast<int>(sizeof(scalar_t));
  if constexpr (kBytes % 16 == 0) {
    if (vec && e0 + VPT <= E) {
      uint4* dst = reinterpret_cast<uint4*>(rowp + e0);
      const uint4* src = reinterpret_cast<const uint4*>(raw);
#pragma unroll
      for (int c = 0; c < kBytes / 16; ++c) dst[c] = src[c];
      return;
    }
  }
#pragma unroll
  for (int s = 0; s < VPT; ++s) {
    if (e0 + s < E) rowp[e0 + s] = raw[s];
  }
}

template <typename scalar_t>
constexpr int exp_inf_bits() {
  return std::is_same_v<scalar_t, c10::Half> ? 0x7c00 : 0x7f80;
}

template <typename scalar_t>
__device__ __forceinline__ float from_bits16(uint16_t b) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return static_cast<float>(c10::Half(b, c10::Half::from_bits()));
  } else {
    return static_cast<float>(c10::BFloat16(b, c10::BFloat16::from_bits()));
  }
}

// Key of an expert compared on its logit (no bias, no groups).
template <typename K, typename scalar_t>
__device__ __forceinline__ typename K::T plain_key(scalar_t v, int idx) {
  if constexpr (std::is_same_v<K, Key32>) {
    return Key32::from_bits16<exp_inf_bits<scalar_t>()>(static_cast<uint32_t>(v.x), idx);
  } else {
    return K::make(static_cast<acc_t<scalar_t>>(v), idx);
  }
}

// The logit of a plain key's winner, exactly.
template <typename K, typename scalar_t>
__device__ __forceinline__ acc_t<scalar_t> plain_value(typename K::T key) {
  if constexpr (std::is_same_v<K, Key32>) {
    return from_bits16<scalar_t>(Key32::value_bits(key));
  } else {
    return K::value(key);
  }
}

template <typename A>
__device__ __forceinline__ bool gt_nan_first(A a, A b) {
  return (a != a) ? (b == b) : (a > b);
}

template <typename scalar_t, typename K, int VPT, bool BLOCK>
__global__ void __launch_bounds__(BLOCK ? 1024 : 32 * kRowsPerWarpBlock)
    topk_gating_fwd_kernel(const FwdParams<acc_t<scalar_t>> p) {
  using A = acc_t<scalar_t>;
  using KT = typename K::T;
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  __shared__ A red_a[32];
  __shared__ KT red_k[2][32];

  const int W = BLOCK ? static_cast<int>(blockDim.x) : 32;
  const int tid = BLOCK ? static_cast<int>(threadIdx.x) : static_cast<int>(threadIdx.x & 31);
  const int slot = BLOCK ? 0 : static_cast<int>(threadIdx.x >> 5);
  const int slots = BLOCK ? 1 : static_cast<int>(blockDim.x >> 5);
  const int E = p.E, k = p.k;
  const int e0 = tid * VPT;
  const bool plain = p.bias == nullptr && p.G == 1;
  const bool full_softmax = p.softmax && (!p.renorm || !plain);
  unsigned char* buf = p.scratch ? p.scratch + (static_cast<int64_t>(blockIdx.x) * slots + slot) * p.scratch_bytes
                                 : dyn_smem + static_cast<int64_t>(slot) * p.scratch_bytes;
  int parity = 0;

  auto gsync = [&]() {
    if constexpr (BLOCK) {
      __syncthreads();
    } else {
      __syncwarp();
    }
  };
  auto gsum = [&](A v) -> A { return BLOCK ? group_sum(v, W, red_a) : warp_sum(v); };
  auto gmax = [&](A v) -> A { return BLOCK ? group_max(v, W, red_a) : warp_max(v); };
  auto kmax = [&](KT v) -> KT {
    v = K::warp_max(v);
    if constexpr (BLOCK) {
      const int warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
      if ((threadIdx.x & 31) == 0) red_k[parity][warp] = v;
      __syncthreads();
      KT m = red_k[parity][0];
      for (int w = 1; w < nw; ++w) m = K::max(m, red_k[parity][w]);
      parity ^= 1;  // the next round writes the other half: no second barrier needed
      return m;
    }
    return v;
  };

  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * slots;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * slots + slot; row < p.rows; row += row_stride) {
    const scalar_t* rowp = static_cast<const scalar_t*>(p.logits) + row * E;
    __align__(16) scalar_t raw[VPT];
    load_chunk<scalar_t, VPT>(rowp, e0, E, p.vec, raw);

    A vmax = 0, vsum = 1;
    if (full_softmax) {
      A m = -std::numeric_limits<A>::infinity();
#pragma unroll
      for (int s = 0; s < VPT; ++s) {
        const A v = static_cast<A>(raw[s]);
        if (e0 + s < E && gt_nan_first(v, m)) m = v;
      }
      vmax = gmax(m);
      A sum = 0;
#pragma unroll
      for (int s = 0; s < VPT; ++s) {
        if (e0 + s < E) sum += exp_acc(static_cast<A>(raw[s]) - vmax);
      }
      vsum = gsum(sum);
    }

    KT keys[VPT];
    if constexpr (std::is_same_v<K, Key32>) {
#pragma unroll
      for (int s = 0; s < VPT; ++s) keys[s] = (e0 + s < E) ? plain_key<K>(raw[s], e0 + s) : K::zero();
    } else {
      if (plain) {
#pragma unroll
        for (int s = 0; s < VPT; ++s) keys[s] = (e0 + s < E) ? plain_key<K>(raw[s], e0 + s) : K::zero();
      } else {
        // Selection value: score (+ bias).
        A sel[VPT];
#pragma unroll
        for (int s = 0; s < VPT; ++s) {
          const A v = static_cast<A>(raw[s]);
          A sc = p.softmax ? exp_acc(v - vmax) / vsum : A(1) / (A(1) + exp_acc(-v));
          if (p.bias != nullptr && e0 + s < E) sc += static_cast<A>(p.bias[e0 + s]);
          sel[s] = sc;
        }
        if (p.G > 1) {
          // Group-limited routing: group score = sum of its two best selection values; keep the best
          // topg groups (ties to the lower group). Buffer: group keys [G], values [E], flags [G].
          const int G = p.G, gsz = E / G;
          KT* gkey = reinterpret_cast<KT*>(buf);
          A* vals = reinterpret_cast<A*>(buf + static_cast<int64_t>(G) * sizeof(KT));
          unsigned char* flag = reinterpret_cast<unsigned char*>(vals + E);
          gsync();
#pragma unroll
          for (int s = 0; s < VPT; ++s) {
            if (e0 + s < E) vals[e0 + s] = sel[s];
          }
          gsync();
          for (int g = tid; g < G; g += W) {
            A b1 = 0, b2 = 0;
            bool h1 = false, h2 = false;
            for (int i = 0; i < gsz; ++i) {
              const A v = vals[g * gsz + i];
              if (!h1 || gt_nan_first(v, b1)) {
                b2 = b1;
                h2 = h1;
                b1 = v;
                h1 = true;
              } else if (!h2 || gt_nan_first(v, b2)) {
                b2 = v;
                h2 = true;
              }
            }
            gkey[g] = K::make(h2 ? b1 + b2 : b1, g);
            flag[g] = 0;
          }
          gsync();
          for (int r = 0; r < p.topg; ++r) {
            KT loc = K::zero();
            for (int g = tid; g < G; g += W) loc = K::max(loc, gkey[g]);
            const KT win = kmax(loc);
            gsync();
            if (tid == 0) {
              const int g = K::index(win);
              gkey[g] = K::zero();
              flag[g] = 1;
            }
            gsync();
          }
#pragma unroll
          for (int s = 0; s < VPT; ++s) {
            if (e0 + s < E && !flag[(e0 + s) / gsz]) sel[s] = -std::numeric_limits<A>::infinity();
          }
        }
#pragma unroll
        for (int s = 0; s < VPT; ++s) keys[s] = (e0 + s < E) ? K::make(sel[s], e0 + s) : K::zero();
      }
    }

    // k rounds of argmax. Round j's winner is kept by thread j (k <= W) or written to `indices`.
    int64_t* out_idx = p.indices + row * k;
    KT mine = K::zero(), first = K::zero();
    auto record = [&](int j, KT win) {
      if (j == 0) first = win;
      if (k <= W) {
        if (tid == j) mine = win;
      } else if (tid == 0) {
        out_idx[j] = K::index(win);
      }
    };
    if constexpr (VPT <= 8) {
      // Bitonic sort of the thread's keys, descending.
#pragma unroll
      for (int size = 2; size <= VPT; size <<= 1) {
#pragma unroll
        for (int stride = size / 2; stride > 0; stride >>= 1) {
#pragma unroll
          for (int i = 0; i < VPT; ++i) {
            const int j = i ^ stride;
            if (j > i) {
              const bool desc = (i & size) == 0;
              const KT a = keys[i], b = keys[j];
              keys[i] = desc ? K::max(a, b) : K::min(a, b);
              keys[j] = desc ? K::min(a, b) : K::max(a, b);
            }
          }
        }
      }
      for (int j = 0; j < k; ++j) {
        const KT win = kmax(keys[0]);
        const bool pop = key_eq<K>(keys[0], win);
#pragma unroll
        for (int s = 0; s + 1 < VPT; ++s) keys[s] = pop ? keys[s + 1] : keys[s];
        keys[VPT - 1] = pop ? K::zero() : keys[VPT - 1];
        record(j, win);
      }
    } else {
      KT loc = keys[0];
#pragma unroll
      for (int s = 1; s < VPT; ++s) loc = K::max(loc, keys[s]);
      for (int j = 0; j < k; ++j) {
        const KT win = kmax(loc);
        if (key_eq<K>(loc, win)) {
          loc = K::zero();
#pragma unroll
          for (int s = 0; s < VPT; ++s) {
            if (key_eq<K>(keys[s], win)) keys[s] = K::zero();
            loc = K::max(loc, keys[s]);
          }
        }
        record(j, win);
      }
    }

    // Weights from the k winners' logits.
    scalar_t* out_w = static_cast<scalar_t*>(p.weights) + row * k;
    const bool sm_renorm = p.softmax && p.renorm;
    if (k <= W) {
      const bool have = tid < k;
      const int idx = have ? K::index(mine) : 0;
      A l = 0;
      if (have) l = plain ? plain_value<K, scalar_t>(mine) : static_cast<A>(rowp[idx]);
      A w;
      if (sm_renorm) {
        const A m = plain ? plain_value<K, scalar_t>(first)
                          : gmax(have ? l : -std::numeric_limits<A>::infinity());
        const A e = have ? exp_acc(l - m) : A(0);
        w = e / gsum(e);
      } else if (p.softmax) {
        w = exp_acc(l - vmax) / vsum;
      } else {
        const A s = A(1) / (A(1) + exp_acc(-l));
        w = p.renorm ? s / gsum(have ? s : A(0)) : s;
      }
      if (have) {
        out_idx[tid] = idx;
        out_w[tid] = static_cast<scalar_t>(w * p.scale);
      }
    } else {
      gsync();  // thread 0's writes of out_idx
      A m = 0;
      if (sm_renorm) {
        A mm = -std::numeric_limits<A>::infinity();
        for (int j = tid; j < k; j += W) {
          const A l = static_cast<A>(rowp[out_idx[j]]);
          if (gt_nan_first(l, mm)) mm = l;
        }
        m = gmax(mm);
      }
      A part = 0;
      if (p.renorm) {
        for (int j = tid; j < k; j += W) {
          const A l = static_cast<A>(rowp[out_idx[j]]);
          part += p.softmax ? exp_acc(l - m) : A(1) / (A(1) + exp_acc(-l));
        }
      }
      const A denom = p.renorm ? gsum(part) : A(1);
      for (int j = tid; j < k; j += W) {
        const A l = static_cast<A>(rowp[out_idx[j]]);
        A w;
        if (sm_renorm) {
          w = exp_acc(l - m) / denom;
        } else if (p.softmax) {
          w = exp_acc(l - vmax) / vsum;
        } else {
          w = A(1) / (A(1) + exp_acc(-l));
          if (p.renorm) w = w / denom;
        }
        out_w[j] = static_cast<scalar_t>(w * p.scale);
      }
      gsync();  // reads of out_idx done before the next row's writes
    }
  }
}

template <typename scalar_t, int VPT, bool BLOCK>
__global__ void __launch_bounds__(BLOCK ? 1024 : 32 * kRowsPerWarpBlock)
    topk_gating_bwd_kernel(const BwdParams<acc_t<scalar_t>> p) {
  using A = acc_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  __shared__ A red_a[32];

  const int W = BLOCK ? static_cast<int>(blockDim.x) : 32;
  const int tid = BLOCK ? static_cast<int>(threadIdx.x) : static_cast<int>(threadIdx.x & 31);
  const int slot = BLOCK ? 0 : static_cast<int>(threadIdx.x >> 5);
  const int slots = BLOCK ? 1 : static_cast<int>(blockDim.x >> 5);
  const int E = p.E, k = p.k;
  const int e0 = tid * VPT;
  const bool full = p.softmax && !p.renorm;  // d weights reaches every logit through the softmax sum
  unsigned char* buf = p.scratch ? p.scratch + (static_cast<int64_t>(blockIdx.x) * slots + slot) * p.scratch_bytes
                                 : dyn_smem + static_cast<int64_t>(slot) * p.scratch_bytes;
  A* cbuf = reinterpret_cast<A*>(buf);       // [k] gradient of each choice's logit
  int* ibuf = reinterpret_cast<int*>(cbuf + k);  // [k] its expert

  auto gsync = [&]() {
    if constexpr (BLOCK) {
      __syncthreads();
    } else {
      __syncwarp();
    }
  };
  auto gsum = [&](A v) -> A { return BLOCK ? group_sum(v, W, red_a) : warp_sum(v); };
  auto gmax = [&](A v) -> A { return BLOCK ? group_max(v, W, red_a) : warp_max(v); };
  auto sigmoid = [](A x) -> A { return A(1) / (A(1) + exp_acc(-x)); };

  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * slots;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * slots + slot; row < p.rows; row += row_stride) {
    const scalar_t* rowp = static_cast<const scalar_t*>(p.logits) + row * E;
    const scalar_t* grow = static_cast<const scalar_t*>(p.grad) + row * k;
    const int64_t* irow = p.indices + row * k;
    auto choice = [&](int j, int& e, A& l, A& g) {
      const int64_t ej = irow[j];
      CUDA_KERNEL_ASSERT(ej >= 0 && ej < E && "torchmoe::_topk_gating_backward: indices out of range");
      e = static_cast<int>(ej);
      l = static_cast<A>(rowp[e]);
      g = static_cast<A>(grow[j]);
    };

    __align__(16) scalar_t raw[VPT];
    A vmax = 0, vsum = 1;
    if (full) {
      load_chunk<scalar_t, VPT>(rowp, e0, E, p.vec, raw);
      A m = -std::numeric_limits<A>::infinity();
#pragma unroll
      for (int s = 0; s < VPT; ++s) {
        const A v = static_cast<A>(raw[s]);
        if (e0 + s < E && gt_nan_first(v, m)) m = v;
      }
      vmax = gmax(m);
      A sum = 0;
#pragma unroll
      for (int s = 0; s < VPT; ++s) {
        if (e0 + s < E) sum += exp_acc(static_cast<A>(raw[s]) - vmax);
      }
      vsum = gsum(sum);
    }

    // Row statistics over the k choices.
    A m = 0;
    if (p.softmax && p.renorm) {
      A mm = -std::numeric_limits<A>::infinity();
      for (int j = tid; j < k; j += W) {
        int e;
        A l, g;
        choice(j, e, l, g);
        if (gt_nan_first(l, mm)) mm = l;
      }
      m = gmax(mm);
    }
    A s_part = 0, d_part = 0;
    for (int j = tid; j < k; j += W) {
      int e;
      A l, g;
      choice(j, e, l, g);
      if (p.softmax && p.renorm) {
        const A x = exp_acc(l - m);
        s_part += x;
        d_part += g * x;
      } else if (p.softmax) {
        d_part += g * (exp_acc(l - vmax) / vsum);
      } else {
        const A x = sigmoid(l);
        s_part += x;
        d_part += g * x;
      }
    }
    const A S = (p.renorm) ? gsum(s_part) : A(1);
    const A dot = gsum(d_part) / S;

    gsync();  // previous row's readers of cbuf/ibuf are done
    for (int j = tid; j < k; j += W) {
      int e;
      A l, g;
      choice(j, e, l, g);
      A c;
      if (p.softmax && p.renorm) {
        c = exp_acc(l - m) / S * (g - dot);
      } else if (p.softmax) {
        c = g * (exp_acc(l - vmax) / vsum);
      } else {
        const A x = sigmoid(l);
        c = (p.renorm ? (g - dot) / S : g) * x * (A(1) - x);
      }
      cbuf[j] = c * p.scale;
      ibuf[j] = e;
    }
    gsync();

    A acc[VPT];
#pragma unroll
    for (int s = 0; s < VPT; ++s) {
      acc[s] = full ? -p.scale * (exp_acc(static_cast<A>(raw[s]) - vmax) / vsum) * dot : A(0);
    }
    // Choices in order: repeated experts add up in a fixed order.
    for (int t = 0; t < k; ++t) {
      const unsigned off = static_cast<unsigned>(ibuf[t] - e0);
      if (off < static_cast<unsigned>(VPT)) {
        const A c = cbuf[t];
#pragma unroll
        for (int s = 0; s < VPT; ++s) {
          if (off == static_cast<unsigned>(s)) acc[s] += c;
        }
      }
    }
    __align__(16) scalar_t outv[VPT];
#pragma unroll
    for (int s = 0; s < VPT; ++s) outv[s] = static_cast<scalar_t>(acc[s]);
    store_chunk<scalar_t, VPT>(static_cast<scalar_t*>(p.grad_logits) + row * E, e0, E, p.vec, outv);
  }
}

// ---------------------------------------------------------------------------------------------------
// Fast path: 16-bit logits, no bias, one group, E <= 256 (VPT <= 8), k <= 32. A warp handles R rows at
// a time and loads the next R rows before working on the current ones, so every warp keeps loads in
// flight while it computes and the R rows' reduction chains interleave. Keys are built two at a time
// from 32-bit words; a lane holding NaN, a zero or padding falls back to Key32::from_bits16. Results
// are the same bits as the general kernel's (same keys, same order, same float expressions).
constexpr int kFastWarps = 4;       // warps per block
constexpr int kFastMaxVpt = 8;      // E <= 256
constexpr int kFastMaxK = 32;       // one winner per lane
constexpr int kFastUnrolledK = 8;   // k <= 8: rounds unrolled, list shifts trimmed

template <int VPT>
constexpr int fast_rows() {
  return VPT >= 8 ? 2 : 4;
}

// Element s of a lane's chunk is the low (s even) or high (s odd) half of word s / 2.
template <typename scalar_t, int VPT>
__device__ __forceinline__ void load_words(const scalar_t* __restrict__ rowp, int e0, int E, bool wide,
                                           uint32_t (&w)[(VPT + 1) / 2]) {
  if (wide) {  // whole chunk in range, aligned to its size
    using V = typename RawOf<VPT * 2>::type;
    const V v = *reinterpret_cast<const V*>(rowp + e0);
    if constexpr (VPT == 8) {
      w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
    } else if constexpr (VPT == 4) {
      w[0] = v.x; w[1] = v.y;
    } else {
      w[0] = static_cast<uint32_t>(v);
    }
    return;
  }
#pragma unroll
  for (int c = 0; c < (VPT + 1) / 2; ++c) w[c] = 0u;
#pragma unroll
  for (int s = 0; s < VPT; ++s) {
    if (e0 + s < E) w[s / 2] |= static_cast<uint32_t>(rowp[e0 + s].x) << (16 * (s & 1));
  }
}

template <int VPT>
__device__ __forceinline__ uint32_t word_half(const uint32_t (&w)[(VPT + 1) / 2], int s) {
  return (s & 1) ? (w[s / 2] >> 16) : (w[s / 2] & 0xffffu);
}

// Removes the head of a descending list when it won; positions >= KEEP are left stale (they cannot
// reach the head in the rounds that remain). `keep` folds to a constant in unrolled rounds.
template <int VPT>
__device__ __forceinline__ void pop_head(uint32_t (&keys)[VPT], bool pop, int keep) {
#pragma unroll
  for (int s = 0; s < VPT; ++s) {
    if (s < keep) keys[s] = pop ? (s + 1 < VPT ? keys[s + 1] : 0u) : keys[s];
  }
}

template <typename scalar_t, int VPT, int R>
__global__ void __launch_bounds__(32 * kFastWarps)
    topk_gating_fwd_rows_kernel(const FwdParams<float> p) {
  using K = Key32;
  constexpr int NW = (VPT + 1) / 2;
  constexpr uint32_t kInf = static_cast<uint32_t>(exp_inf_bits<scalar_t>());
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int E = p.E, k = p.k;
  const int e0 = lane * VPT;
  const bool full = e0 + VPT <= E;
  const bool wide = p.vec && full;
  const bool stats = p.softmax && !p.renorm;  // weights need the softmax over the whole row
  const scalar_t* __restrict__ logits = static_cast<const scalar_t*>(p.logits);

  uint32_t lo[VPT];  // low half of each key: 0xffff - expert
#pragma unroll
  for (int s = 0; s < VPT; ++s) lo[s] = 0xffffu - static_cast<uint32_t>(e0 + s);

  const int64_t ntasks = (p.rows + R - 1) / R;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kFastWarps;
  int64_t task = static_cast<int64_t>(blockIdx.x) * kFastWarps + (threadIdx.x >> 5);

  auto load_task = [&](int64_t t, uint32_t (&w)[R][NW]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t row = t * R + r;
      if (t < ntasks && row < p.rows) {
        load_words<scalar_t, VPT>(logits + row * E, e0, E, wide, w[r]);
      } else {
#pragma unroll
        for (int c = 0; c < NW; ++c) w[r][c] = 0u;
      }
    }
  };

  uint32_t cur[R][NW];
  load_task(task, cur);
  for (; task < ntasks; task += nwarps) {
    uint32_t nxt[R][NW];
    load_task(task + nwarps, nxt);  // in flight while this task is worked on

    float vmax[R], vsum[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      vmax[r] = 0.f;
      vsum[r] = 1.f;
    }
    if (stats) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float m = -std::numeric_limits<float>::infinity();
#pragma unroll
        for (int s = 0; s < VPT; ++s) {
          const float v = from_bits16<scalar_t>(static_cast<uint16_t>(word_half<VPT>(cur[r], s)));
          if (e0 + s < E && gt_nan_first(v, m)) m = v;
        }
        vmax[r] = warp_max(m);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float sum = 0.f;
#pragma unroll
        for (int s = 0; s < VPT; ++s) {
          const float v = from_bits16<scalar_t>(static_cast<uint16_t>(word_half<VPT>(cur[r], s)));
          if (e0 + s < E) sum += exp_acc(v - vmax[r]);
        }
        vsum[r] = warp_sum(sum);
      }
    }

    // Keys, as Key32::from_bits16 makes them.
    uint32_t keys[R][VPT];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      bool slow = !full;
      if constexpr (VPT >= 2) {
        uint32_t spec = 0u;
#pragma unroll
        for (int c = 0; c < NW; ++c) {
          const uint32_t x = cur[r][c];
          const uint32_t a = x & 0x7fff7fffu;
          // Bit 15 of a half: its magnitude is above infinity (NaN) or zero.
          spec |= (a + (0x7fffu - kInf) * 0x10001u) | ~((a | 0x80008000u) - 0x10001u);
          const uint32_t sg = x & 0x80008000u;
          const uint32_t k16 = x ^ ((sg - (sg >> 15)) | 0x80008000u);  // negative: ~u, else u | 0x8000
          keys[r][2 * c] = (k16 << 16) | lo[2 * c];
          keys[r][2 * c + 1] = (k16 & 0xffff0000u) | lo[2 * c + 1];
        }
        slow = slow || (spec & 0x80008000u) != 0u;
      } else {
        slow = true;
      }
      if (slow) {
#pragma unroll
        for (int s = 0; s < VPT; ++s) {
          keys[r][s] = (e0 + s < E) ? K::from_bits16<kInf>(word_half<VPT>(cur[r], s), e0 + s) : K::zero();
        }
      }
    }

    // Each lane's keys sorted descending (bitonic network).
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int size = 2; size <= VPT; size <<= 1) {
#pragma unroll
        for (int stride = size / 2; stride > 0; stride >>= 1) {
#pragma unroll
          for (int i = 0; i < VPT; ++i) {
            const int j = i ^ stride;
            if (j > i) {
              const bool desc = (i & size) == 0;
              const uint32_t a = keys[r][i], b = keys[r][j];
              keys[r][i] = desc ? max(a, b) : min(a, b);
              keys[r][j] = desc ? min(a, b) : max(a, b);
            }
          }
        }
      }
    }

    // k rounds of argmax over the lanes' heads; lane j keeps round j's winner.
    uint32_t mine[R], first[R];
#pragma unroll
    for (int r = 0; r < R; ++r) mine[r] = first[r] = 0u;
    if (k <= kFastUnrolledK) {
#pragma unroll
      for (int j = 0; j < kFastUnrolledK; ++j) {
        if (j >= k) break;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint32_t win = K::warp_max(keys[r][0]);
          // After round j a list is read at positions < kFastUnrolledK - 1 - j at most.
          pop_head<VPT>(keys[r], keys[r][0] == win, kFastUnrolledK - 1 - j);
          if (j == 0) first[r] = win;
          if (lane == j) mine[r] = win;
        }
      }
    } else {
      for (int j = 0; j < k; ++j) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint32_t win = K::warp_max(keys[r][0]);
          pop_head<VPT>(keys[r], keys[r][0] == win, VPT);
          if (j == 0) first[r] = win;
          if (lane == j) mine[r] = win;
        }
      }
    }

    // Weights from the winners' logits (decoded from the keys).
    const bool have = lane < k;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t row = task * R + r;
      const float l = have ? plain_value<K, scalar_t>(mine[r]) : 0.f;
      float w;
      if (p.softmax && p.renorm) {
        const float m = plain_value<K, scalar_t>(first[r]);
        const float e = have ? exp_acc(l - m) : 0.f;
        w = e / warp_sum(e);
      } else if (p.softmax) {
        w = exp_acc(l - vmax[r]) / vsum[r];
      } else {
        const float s = 1.f / (1.f + exp_acc(-l));
        w = p.renorm ? s / warp_sum(have ? s : 0.f) : s;
      }
      if (have && row < p.rows) {
        p.indices[row * k + lane] = K::index(mine[r]);
        static_cast<scalar_t*>(p.weights)[row * k + lane] = static_cast<scalar_t>(w * p.scale);
      }
    }

#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int c = 0; c < NW; ++c) cur[r][c] = nxt[r][c];
    }
  }
}

// Launches the fast path when it applies; false otherwise.
template <typename scalar_t>
bool launch_fast_fwd(const FwdParams<acc_t<scalar_t>>& p0, int64_t E, int64_t k, bool plain, int64_t logits_align,
                     cudaStream_t stream) {
  if constexpr (sizeof(scalar_t) != 2) {
    return false;
  } else {
    if (!plain || E > 32 * kFastMaxVpt || k > kFastMaxK) return false;
    int vpt = 1;
    while (vpt * 32 < E) vpt *= 2;
    auto go = [&](auto vpt_tag) {
      constexpr int VPT = decltype(vpt_tag)::value;
      constexpr int R = fast_rows<VPT>();
      FwdParams<float> p = p0;
      p.scratch = nullptr;
      p.scratch_bytes = 0;
      p.vec = logits_align >= VPT * static_cast<int64_t>(sizeof(scalar_t));
      auto kernel = topk_gating_fwd_rows_kernel<scalar_t, VPT, R>;
      int per_sm = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, 32 * kFastWarps, 0));
      const int64_t tasks = ceil_div(p.rows, R);
      const int64_t grid = std::max<int64_t>(
          1, std::min<int64_t>(ceil_div(tasks, kFastWarps), static_cast<int64_t>(num_sms()) * std::max(per_sm, 1)));
      kernel<<<grid, 32 * kFastWarps, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    switch (vpt) {
      case 1: go(std::integral_constant<int, 1>{}); break;
      case 2: go(std::integral_constant<int, 2>{}); break;
      case 4: go(std::integral_constant<int, 4>{}); break;
      default: go(std::integral_constant<int, 8>{}); break;
    }
    return true;
  }
}

struct LaunchShape {
  bool block;
  int vpt;
  int threads;
  int slots;  // rows per block
};

LaunchShape launch_shape(int64_t E) {
  if (E <= kWarpModeMaxExperts) {
    int vpt = 1;
    while (vpt * 32 < E) vpt *= 2;
    return {false, vpt, 32 * kRowsPerWarpBlock, kRowsPerWarpBlock};
  }
  const int vpt = E <= 8192 ? 8 : (E <= 16384 ? 16 : 32);
  const int threads = static_cast<int>(ceil_div(ceil_div(E, vpt), 32) * 32);
  return {true, vpt, threads, 1};
}

// Calls f(std::integral_constant<int, VPT>, std::bool_constant<BLOCK>) for a launch shape.
template <typename F>
void with_shape(const LaunchShape& s, F&& f) {
  if (!s.block) {
    switch (s.vpt) {
      case 1: return f(std::integral_constant<int, 1>{}, std::false_type{});
      case 2: return f(std::integral_constant<int, 2>{}, std::false_type{});
      case 4: return f(std::integral_constant<int, 4>{}, std::false_type{});
      case 8: return f(std::integral_constant<int, 8>{}, std::false_type{});
      case 16: return f(std::integral_constant<int, 16>{}, std::false_type{});
      default: return f(std::integral_constant<int, 32>{}, std::false_type{});
    }
  }
  switch (s.vpt) {
    case 8: return f(std::integral_constant<int, 8>{}, std::true_type{});
    case 16: return f(std::integral_constant<int, 16>{}, std::true_type{});
    default: return f(std::integral_constant<int, 32>{}, std::true_type{});
  }
}

// Calls f(K{}) with the key type for the logits' dtype: 32-bit keys for 16-bit logits compared as they
// are, 64-bit for float selection values, KeyD for double.
template <typename scalar_t, typename F>
void with_key(bool plain, F&& f) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    f(KeyD{});
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    f(Key64{});
  } else {
    if (plain) {
      f(Key32{});
    } else {
      f(Key64{});
    }
  }
}

// Shared memory per row, or a global buffer when a block would need more than kSmemBudget.
struct Scratch {
  at::Tensor global;
  unsigned char* ptr = nullptr;
  int64_t smem = 0;
};

Scratch make_scratch(int64_t per_row, const LaunchShape& s, int64_t grid, const at::Tensor& like) {
  Scratch r;
  if (per_row == 0) return r;
  if (per_row * s.slots <= kSmemBudget) {
    r.smem = per_row * s.slots;
  } else {
    r.global = at::empty({grid * s.slots * per_row}, like.options().dtype(at::kByte));
    r.ptr = r.global.data_ptr<uint8_t>();
  }
  return r;
}

int64_t round16(int64_t b) { return (b + 15) / 16 * 16; }

// The CUDA kernels keep a row in registers: at most 1024 threads x 32 values.
void check_cuda_expert_limit(const at::Tensor& logits, const char* op) {
  TORCHMOE_CHECK_ARG(logits.size(-1) <= kBlockModeMaxExperts, op, "logits",
                     "has more experts than the CUDA kernel supports (", kBlockModeMaxExperts, "), got ",
                     logits.size(-1));
}

std::tuple<at::Tensor, at::Tensor> topk_gating_cuda(const at::Tensor& logits_in, int64_t k,
                                                    c10::string_view score_func, bool renormalize,
                                                    const std::optional<at::Tensor>& expert_bias,
                                                    int64_t num_expert_groups, int64_t topk_expert_groups,
                                                    double scale) {
  checks::check_topk_gating_args(logits_in, k, score_func, expert_bias, num_expert_groups, topk_expert_groups);
  check_cuda_expert_limit(logits_in, "topk_gating");
  TORCHMOE_CUDA_SETUP(logits_in);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t E = logits.size(-1);
  const int64_t rows = logits.numel() / E;
  auto out_shape = logits.sizes().vec();
  out_shape.back() = k;
  at::Tensor weights = at::empty(out_shape, logits.options());
  at::Tensor indices = at::empty(out_shape, logits.options().dtype(at::kLong));
  if (rows == 0) return {weights, indices};

  at::Tensor bias;
  if (expert_bias.has_value()) bias = expert_bias->contiguous();
  const bool plain = !bias.defined() && num_expert_groups == 1;
  const LaunchShape shape = launch_shape(E);
  const int64_t grid = capped_grid(ceil_div(rows, shape.slots), shape.block ? 8 : 16);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "topk_gating_cuda", [&] {
    using A = acc_t<scalar_t>;
    FwdParams<A> p;
    p.logits = logits.const_data_ptr();
    p.bias = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
    p.weights = weights.mutable_data_ptr();
    p.indices = indices.mutable_data_ptr<int64_t>();
    p.rows = rows;
    p.E = static_cast<int>(E);
    p.k = static_cast<int>(k);
    p.G = static_cast<int>(num_expert_groups);
    p.topg = static_cast<int>(topk_expert_groups);
    p.softmax = score_func == "softmax";
    p.renorm = renormalize;
    p.vec = common_vec_bytes(E * static_cast<int64_t>(sizeof(scalar_t)), {p.logits}) == 16;
    p.scale = static_cast<A>(scale);
    if (launch_fast_fwd<scalar_t>(p, E, k, plain, common_vec_bytes(E * static_cast<int64_t>(sizeof(scalar_t)), {p.logits}),
                                  stream)) {
      return;
    }
    auto launch = [&](auto key_tag) {
      using K = decltype(key_tag);
      const int64_t per_row =
          num_expert_groups > 1
              ? round16(num_expert_groups * static_cast<int64_t>(sizeof(typename K::T)) +
                        E * static_cast<int64_t>(sizeof(A)) + num_expert_groups)
              : 0;
      Scratch scratch = make_scratch(per_row, shape, grid, logits);
      p.scratch = scratch.ptr;
      p.scratch_bytes = per_row;
      with_shape(shape, [&](auto vpt, auto block) {
        topk_gating_fwd_kernel<scalar_t, K, decltype(vpt)::value, decltype(block)::value>
            <<<grid, shape.threads, scratch.smem, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    with_key<scalar_t>(plain, launch);
  });
  return {weights, indices};
}

at::Tensor topk_gating_backward_cuda(const at::Tensor& grad_weights_in, const at::Tensor& logits_in,
                                     const at::Tensor& indices_in, c10::string_view score_func,
                                     bool renormalize, double scale) {
  checks::check_topk_gating_backward_args(grad_weights_in, logits_in, indices_in, score_func);
  check_cuda_expert_limit(logits_in, "_topk_gating_backward");
  const int64_t E = logits_in.size(-1);
  TORCHMOE_CUDA_SETUP(logits_in);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor grad = grad_weights_in.to(logits.scalar_type()).contiguous();
  at::Tensor grad_logits = at::empty(logits.sizes(), logits.options());
  const int64_t k = indices.size(-1);
  const int64_t rows = logits.numel() / E;
  if (rows == 0) return grad_logits;
  if (k == 0) return grad_logits.zero_();

  const LaunchShape shape = launch_shape(E);
  const int64_t grid = capped_grid(ceil_div(rows, shape.slots), shape.block ? 8 : 16);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "topk_gating_backward_cuda", [&] {
    using A = acc_t<scalar_t>;
    BwdParams<A> p;
    p.grad = grad.const_data_ptr();
    p.logits = logits.const_data_ptr();
    p.indices = indices.const_data_ptr<int64_t>();
    p.grad_logits = grad_logits.mutable_data_ptr();
    p.rows = rows;
    p.E = static_cast<int>(E);
    p.k = static_cast<int>(k);
    p.softmax = score_func == "softmax";
    p.renorm = renormalize;
    p.vec = common_vec_bytes(E * static_cast<int64_t>(sizeof(scalar_t)), {p.logits, p.grad_logits}) == 16;
    p.scale = static_cast<A>(scale);
    const int64_t per_row = round16(k * static_cast<int64_t>(sizeof(A) + sizeof(int)));
    Scratch scratch = make_scratch(per_row, shape, grid, logits);
    p.scratch = scratch.ptr;
    p.scratch_bytes = per_row;
    with_shape(shape, [&](auto vpt, auto block) {
      topk_gating_bwd_kernel<scalar_t, decltype(vpt)::value, decltype(block)::value>
          <<<grid, shape.threads, scratch.smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_logits;
}

}  // namespace
}  // namespace torchmoe::cuda

TORCH_LIBRARY_IMPL(torchmoe, CUDA, m) {
  m.impl("topk_gating", &torchmoe::cuda::topk_gating_cuda);
  m.impl("_topk_gating_backward", &torchmoe::cuda::topk_gating_backward_cuda);
}
