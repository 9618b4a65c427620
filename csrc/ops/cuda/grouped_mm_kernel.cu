// CUDA kernels of torchmoe::grouped_mm and its backward.
//
// bfloat16 on sm_90/sm_100 (where torch's grouped GEMM has its CUTLASS kernel, no host sync): forward
// out = _grouped_mm(x, weight, offs), backward grad_x = _grouped_mm(grad, weight^T, offs) and
// grad_weight = _grouped_mm(x^T, grad, offs) (groups of rows as the contraction; experts with no rows get
// zeros). Everything else: a tiled GEMM of our own that reads the group offsets on the device, one block
// per (64-row tile of an expert, 64-column tile), float32 accumulation (float64 for double). Either way
// the host never waits for the device. counts must be >= 0 and sum to N: checked on the device (a device
// assertion, like ATen's index kernels), since checking on the host would need a synchronisation.
// TORCHMOE_GROUPED_MM_FALLBACK=1 forces the own kernel (for testing it on a GPU that has the fast path).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/_grouped_mm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <string>

#include "ops/common/checks.h"
#include "ops/common/grouped_mm_checks.h"
#include "ops/cuda/cuda_common.cuh"

namespace torchmoe::cuda {
namespace {

constexpr int BM = 64, BN = 64, BK = 16, kGemmThreads = 256;

// ends[e] = counts[0] + ... + counts[e] (int64, and int32 when offs32 is given); tile_ends likewise for
// ceil(counts[e] / BM). Checks counts >= 0 and the total == N. One thread: E is small.
__global__ void group_prefix_kernel(const int64_t* counts, int64_t E, int64_t N, int64_t* ends, int64_t* tile_ends,
                                    int* offs32) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  int64_t run = 0, tiles = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t c = counts[e];
    CUDA_KERNEL_ASSERT(c >= 0 && "torchmoe::grouped_mm: counts must be >= 0");
    // Compared before adding: run + c could overflow int64 and wrap back to N.
    CUDA_KERNEL_ASSERT(c <= N - run && "torchmoe::grouped_mm: counts must sum to the rows of x");
    run += c;
    tiles += (c + BM - 1) / BM;
    if (ends != nullptr) ends[e] = run;
    if (tile_ends != nullptr) tile_ends[e] = tiles;
    if (offs32 != nullptr) offs32[e] = static_cast<int>(run);
  }
  CUDA_KERNEL_ASSERT(run == N && "torchmoe::grouped_mm: counts must sum to the rows of x");
}

template <typename T>
struct GemmArgs {
  const T* A;
  const T* B;
  T* C;
  int64_t sam, sak;  // A(m, k)
  int64_t sbk, sbn;  // B(k, n)
  int64_t sbe;       // B's stride between experts (row mode)
  int64_t scm;       // C's row stride
  int64_t sce;       // C's stride between experts (contraction mode)
  int64_t M, Ncols, K;
  int64_t m_tiles;   // contraction mode: tiles over M
  const int64_t* ends;
  const int64_t* tile_ends;
  int64_t E;
  bool contract_groups;  // false: rows of A grouped (forward, grad_x); true: the contraction grouped (grad_w)
};

// C tile = A tile @ B tile, BM x BN per block, 4 x 4 per thread.
template <typename T>
__global__ void __launch_bounds__(kGemmThreads) grouped_gemm_kernel(const GemmArgs<T> g) {
  using A = acc_t<T>;
  __shared__ A As[BK][BM + 1];
  __shared__ A Bs[BK][BN + 1];
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;

  const T* Ab;
  const T* Bb;
  T* Cb;
  int64_t mrows, K;
  if (!g.contract_groups) {
    const int64_t t = blockIdx.x;
    if (g.E == 0 || t >= g.tile_ends[g.E - 1]) return;
    int64_t lo = 0, hi = g.E - 1;  // first e with tile_ends[e] > t
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (g.tile_ends[mid] > t) hi = mid; else lo = mid + 1;
    }
    const int64_t e = lo;
    const int64_t start = e == 0 ? 0 : g.ends[e - 1];
    const int64_t first_tile = e == 0 ? 0 : g.tile_ends[e - 1];
    const int64_t row0 = start + (t - first_tile) * BM;
    mrows = min(static_cast<int64_t>(BM), g.ends[e] - row0);
    K = g.K;
    Ab = g.A + row0 * g.sam;
    Bb = g.B + e * g.sbe;
    Cb = g.C + row0 * g.scm;
  } else {
    const int64_t e = blockIdx.x / g.m_tiles;
    const int64_t m0 = (blockIdx.x % g.m_tiles) * BM;
    const int64_t start = e == 0 ? 0 : g.ends[e - 1];
    mrows = min(static_cast<int64_t>(BM), g.M - m0);
    K = g.ends[e] - start;
    Ab = g.A + m0 * g.sam + start * g.sak;
    Bb = g.B + start * g.sbk;
    Cb = g.C + e * g.sce + m0 * g.scm;
  }
  const int64_t ncols = min(static_cast<int64_t>(BN), g.Ncols - n0);

  A acc[4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    for (int i = tid; i < BM * BK; i += kGemmThreads) {
      const int m = i / BK, kk = i % BK;
      As[kk][m] = (m < mrows && k0 + kk < K) ? static_cast<A>(Ab[m * g.sam + (k0 + kk) * g.sak]) : A(0);
    }
    for (int i = tid; i < BK * BN; i += kGemmThreads) {
      const int kk = i / BN, n = i % BN;
      Bs[kk][n] = (n < ncols && k0 + kk < K) ? static_cast<A>(Bb[(k0 + kk) * g.sbk + (n0 + n) * g.sbn]) : A(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      A a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = ty * 4 + i;
    if (m >= mrows) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = tx * 4 + j;
      if (n < ncols) Cb[m * g.scm + n0 + n] = static_cast<T>(acc[i][j]);
    }
  }
}

// grad_weight[e] = 0 for experts without rows (the fast path leaves them unwritten).
template <typename T>
__global__ void zero_empty_experts_kernel(const int64_t* counts, T* gw, int64_t per_expert) {
  const int64_t e = blockIdx.y;
  if (counts[e] != 0) return;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < per_expert;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    gw[e * per_expert + i] = T(0);
  }
}

bool force_fallback() {
  static const bool v = [] {
    const char* s = std::getenv("TORCHMOE_GROUPED_MM_FALLBACK");
    return s != nullptr && std::string(s) == "1";
  }();
  return v;
}

// torch's grouped GEMM runs without a host sync for bfloat16 on sm_90 / sm_100 with 16-byte aligned rows.
bool use_torch_grouped_mm(const at::Tensor& x, const at::Tensor& weight) {
  if (force_fallback()) return false;
  if (x.scalar_type() != at::kBFloat16 || weight.scalar_type() != at::kBFloat16) return false;
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor);
  const int minor = device_attribute(cudaDevAttrComputeCapabilityMinor);
  if (!((major == 9 || major == 10) && minor == 0)) return false;
  const int64_t d_in = weight.size(1), d_out = weight.size(2);
  if (d_in % 8 != 0 || d_out % 8 != 0 || d_in == 0 || d_out == 0) return false;
  return x.size(0) < std::numeric_limits<int>::max();
}

struct Prefix {
  at::Tensor ends, tile_ends, offs32;
};

Prefix group_prefix(const at::Tensor& counts, int64_t N, bool want_offs32, cudaStream_t stream) {
  Prefix p;
  const int64_t E = counts.size(0);
  p.ends = at::empty({E}, counts.options());
  p.tile_ends = at::empty({E}, counts.options());
  if (want_offs32) p.offs32 = at::empty({E}, counts.options().dtype(at::kInt));
  if (E > 0) {
    group_prefix_kernel<<<1, 32, 0, stream>>>(counts.const_data_ptr<int64_t>(), E, N,
                                               p.ends.mutable_data_ptr<int64_t>(),
                                               p.tile_ends.mutable_data_ptr<int64_t>(),
                                               want_offs32 ? p.offs32.mutable_data_ptr<int>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return p;
}

// out[rows of e] = a[rows of e] @ b(e), b(e)(k, n) = b_ptr[e * sbe + k * sbk + n * sbn].
template <typename T>
void launch_rows(const at::Tensor& a, const T* b, int64_t sbe, int64_t sbk, int64_t sbn, at::Tensor& out,
                 const Prefix& p, int64_t E, cudaStream_t stream) {
  GemmArgs<T> g{};
  g.A = a.const_data_ptr<T>();
  g.B = b;
  g.C = out.mutable_data_ptr<T>();
  g.sam = a.size(1);
  g.sak = 1;
  g.sbk = sbk;
  g.sbn = sbn;
  g.sbe = sbe;
  g.scm = out.size(1);
  g.Ncols = out.size(1);
  g.K = a.size(1);
  g.ends = p.ends.const_data_ptr<int64_t>();
  g.tile_ends = p.tile_ends.const_data_ptr<int64_t>();
  g.E = E;
  g.contract_groups = false;
  const int64_t max_tiles = ceil_div(a.size(0), BM) + E;  // sum_e ceil(c_e / BM) <= N / BM + E
  const dim3 grid(static_cast<unsigned>(max_tiles), static_cast<unsigned>(ceil_div(g.Ncols, BN)));
  grouped_gemm_kernel<T><<<grid, kGemmThreads, 0, stream>>>(g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor grouped_mm_cuda(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& counts_in) {
  checks::check_grouped_mm_args(x_in, weight_in, counts_in);
  TORCHMOE_CUDA_SETUP(x_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor counts = counts_in.contiguous();
  const int64_t N = x.size(0), E = weight.size(0), d_in = weight.size(1), d_out = weight.size(2);
  const bool fast = use_torch_grouped_mm(x, weight);
  const Prefix p = group_prefix(counts, N, fast, stream);
  if (N == 0 || d_out == 0) return at::empty({N, d_out}, x.options());
  if (d_in == 0) return at::zeros({N, d_out}, x.options());
  if (fast) return at::_grouped_mm(x, weight, p.offs32);
  at::Tensor out = at::empty({N, d_out}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grouped_mm_cuda", [&] {
    launch_rows<scalar_t>(x, weight.const_data_ptr<scalar_t>(), d_in * d_out, d_out, 1, out, p, E, stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                            const at::Tensor& weight_in, const at::Tensor& counts_in) {
  checks::check_grouped_mm_backward_args(grad_in, x_in, weight_in, counts_in);
  TORCHMOE_CUDA_SETUP(x_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor counts = counts_in.contiguous();
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  const int64_t N = x.size(0), E = weight.size(0), d_in = weight.size(1), d_out = weight.size(2);
  const bool fast = use_torch_grouped_mm(x, weight);
  const Prefix p = group_prefix(counts, N, fast, stream);
  // grad_weight in the layout the Meta kernel declares (checks::grad_weight_transposed).
  const bool transposed = checks::grad_weight_transposed(weight_in);
  auto in_layout = [&](const at::Tensor& gw) { return transposed ? gw.transpose(1, 2).contiguous().transpose(1, 2) : gw; };
  if (N == 0 || d_in == 0 || d_out == 0) {
    return {at::zeros({N, d_in}, x.options()), in_layout(at::zeros({E, d_in, d_out}, weight.options()))};
  }
  if (fast) {
    at::Tensor gx = at::_grouped_mm(grad, weight.transpose(-2, -1), p.offs32);
    at::Tensor gw = at::_grouped_mm(x.t(), grad, p.offs32);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gw.scalar_type(), "grouped_mm_backward_zero", [&] {
      const int64_t per = d_in * d_out;
      const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(per, 256), 64)), static_cast<unsigned>(E));
      zero_empty_experts_kernel<scalar_t><<<grid, 256, 0, stream>>>(counts.const_data_ptr<int64_t>(),
                                                                    gw.mutable_data_ptr<scalar_t>(), per);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {gx, in_layout(gw)};
  }
  at::Tensor gx = at::empty({N, d_in}, x.options());
  at::Tensor gw = at::empty({E, d_in, d_out}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grouped_mm_backward_cuda", [&] {
    // grad_x[rows of e] = grad[rows of e] @ weight[e]^T
    launch_rows<scalar_t>(grad, weight.const_data_ptr<scalar_t>(), d_in * d_out, 1, d_out, gx, p, E, stream);
    // grad_weight[e] = x[rows of e]^T @ grad[rows of e]
    GemmArgs<scalar_t> g{};
    g.A = x.const_data_ptr<scalar_t>();
    g.B = grad.const_data_ptr<scalar_t>();
    g.C = gw.mutable_data_ptr<scalar_t>();
    g.sam = 1;
    g.sak = d_in;
    g.sbk = d_out;
    g.sbn = 1;
    g.scm = d_out;
    g.sce = d_in * d_out;
    g.M = d_in;
    g.Ncols = d_out;
    g.m_tiles = ceil_div(d_in, BM);
    g.ends = p.ends.const_data_ptr<int64_t>();
    g.E = E;
    g.contract_groups = true;
    const dim3 grid(static_cast<unsigned>(E * g.m_tiles), static_cast<unsigned>(ceil_div(d_out, BN)));
    grouped_gemm_kernel<scalar_t><<<grid, kGemmThreads, 0, stream>>>(g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gx, in_layout(gw)};
}

}  // namespace
}  // namespace torchmoe::cuda

TORCH_LIBRARY_IMPL(torchmoe, CUDA, m) {
  m.impl("grouped_mm", &torchmoe::cuda::grouped_mm_cuda);
  m.impl("_grouped_mm_backward", &torchmoe::cuda::grouped_mm_backward_cuda);
}
