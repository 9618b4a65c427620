// grouped_mm_quantized on CPU. Each expert's product is cut into column blocks, and threads take blocks from a
// shared counter. With bfloat16 activations on a CPU with AMX, an expert of amx_min_rows(bits) to
// amx_max_rows(bits) rows runs quantized_amx_mm (codes decoded to bfloat16 tiles). An expert with at most
// kQuantizedSkinnyMaxRows rows (float32, bfloat16 or float16 activations; for bfloat16 activations on vdpbf16ps,
// kDotSkinnyMaxRows) runs quantized_skinny_mm: one pass over its packed weight, dequantized in registers. Other
// experts (and float64)
// dequantize one panel of columns (at most kPanelBytes) at a time into a thread-local buffer of the activations'
// dtype, and a GEMM multiplies a block of at most kRowBlock of the expert's rows with it (torchmoe's AVX-512 GEMM for float32 where it beats BLAS, else
// at::mm): no float copy of the whole weight. Panels have a fixed width, so no result depends on the thread count.
// The backward (grad_x = grad_output @ w^T) runs the same way over panels of kPanelRows reduction rows.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "ops/common/grouped_mm_quantized_checks.h"
#include "ops/cpu/amx_gemm.h"
#include "ops/cpu/grouped_tasks.h"
#include "ops/cpu/output_cache.h"
#include "ops/cpu/quantized_gemm.h"
#include "ops/cpu/sgemm.h"

namespace torchmoe::ops {
namespace {

// Up to this many rows, one pass over the packed weight with the rows' sums in registers beats dequantizing
// panels for a GEMM; with bfloat16 activations on vdpbf16ps (4-bit codes, or 8-bit ones of an even group size),
// up to kDotSkinnyMaxRows. 2 threads of the 2-core Zen 4, us per product, panels against the vdpbf16ps strips:
// 8 experts of 2048 x 768 int4 (group 128) from memory, 24 rows 3030/1930, 32 rows 3514/2577, 48 rows 4537/3750,
// 64 rows 6115/5291, 128 rows 9920/10538; 8 experts of 2048 x 1536 int8, 24 rows 9437-9873/3936-4282, 32 rows
// 10364-11187/5123-6191, 64 rows 12159-12960/10404-10844, 128 rows 20234-20695/21039-24780 (2 of 8 experts of
// 1024 x 2048: 64 rows 2064-2146/2080-2206).
constexpr int64_t kQuantizedSkinnyMaxRows = 16;
constexpr int64_t kDotSkinnyMaxRows = 64;
// With bfloat16 activations on AMX (cpu::quantized_amx_mm), experts of amx_min_rows(bits) to amx_max_rows(bits)
// rows: there the decode into tiles costs less than the skinny kernel's multiply-adds and the panels' bfloat16
// copies. Measured on a 2-core Xeon (2048 x 1536, 30-200 weights cycled from memory, us per product, AMX against
// without): int4 4 rows 105/104, 8 rows 174/182, 16 rows 208/349, 32 rows 285/806, 128 rows 650/885, 512 rows
// 2548/1962 (4 bits scale every group of every row, which the panels fold into the weight); int8 8 rows 197/194,
// 12 rows 292/293, 16 rows 307/380, 32 rows 352/1025, 128 rows 499/955, 256 rows 768/1326, 1024 rows 3323/4061.
constexpr int64_t amx_min_rows(int bits) { return bits == 4 ? 8 : 12; }
constexpr int64_t amx_max_rows(int bits) { return bits == 4 ? 128 : std::numeric_limits<int64_t>::max(); }
// A panel stays in L2 while the GEMM reads it; its width depends on the shapes only (never the thread count).
constexpr int64_t kPanelBytes = int64_t{2} << 20;
constexpr int64_t kRowBlock = 256;

int64_t panel_cols(int64_t d_in, int64_t d_out, int64_t element_size) {
  const int64_t cols = kPanelBytes / std::max<int64_t>(d_in * element_size, 1) / 64 * 64;
  return std::min(d_out, std::max<int64_t>(cols, 64));
}
constexpr int64_t kPanelRows = 128;

struct QuantizedWeights {
  at::Tensor qweight, scales, zeros;
  int bits;
  int64_t group_size, d_in, d_out;

  cpu::QuantizedMatrix expert(int64_t e) const {
    const int64_t packed_rows = qweight.size(1);
    return {bits,
            d_in,
            d_out,
            group_size,
            reinterpret_cast<const uint8_t*>(qweight.const_data_ptr()) + e * packed_rows * d_out,
            scales.const_data_ptr<float>() + e * scales.size(1) * d_out,
            zeros.defined() ? zeros.const_data_ptr<uint8_t>() + e * zeros.size(1) * d_out : nullptr};
  }
};

QuantizedWeights contiguous_weights(const at::Tensor& qweight, const at::Tensor& scales,
                                    const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size) {
  const int64_t d_in = bits == 4 ? 2 * qweight.size(1) : qweight.size(1);
  return {qweight.contiguous(), scales.contiguous(), zeros.has_value() ? zeros->contiguous() : at::Tensor(),
          static_cast<int>(bits), group_size, d_in, qweight.size(2)};
}

struct Block {
  int64_t expert;
  int64_t begin, end;  // output columns (forward) or reduction rows of w (backward)
  bool skinny;
  int64_t row0 = 0, rows = 0;  // the expert's rows this block covers (panel blocks)
  bool amx = false;            // a skinny block on cpu::quantized_amx_mm
};

bool skinny_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// The skinny experts' column blocks (see cpu::skinny_block_width).
void add_skinny_blocks(const std::vector<int64_t>& experts, int64_t width, bool amx, std::vector<Block>& blocks) {
  if (experts.empty() || width == 0) return;
  // one byte per column of a packed row (int8: a value; int4: two values along the reduction)
  const int64_t chunk = cpu::skinny_block_width(width, static_cast<int64_t>(experts.size()), 1);
  for (int64_t e : experts) {
    for (int64_t j = 0; j < width; j += chunk) blocks.push_back({e, j, std::min(width, j + chunk), true, 0, 0, amx});
  }
}

// Thread-local scratch of at least `bytes`.
void* scratch(size_t bytes) {
  thread_local std::vector<uint8_t> buffer;
  if (buffer.size() < bytes) buffer.resize(bytes);
  return buffer.data();
}

// float32 rows of x (x itself when float32).
template <typename T>
const float* float_rows(const T* x, int64_t rows, int64_t k) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    thread_local std::vector<float> buffer;
    buffer.resize(static_cast<size_t>(rows * k));
    for (int64_t i = 0; i < rows * k; ++i) buffer[i] = static_cast<float>(x[i]);
    return buffer.data();
  }
}

template <typename T>
void skinny_block(const QuantizedWeights& w, const Block& b, const at::Tensor& x, const std::vector<int64_t>& offsets,
                  at::Tensor& out) {
  const int64_t row0 = offsets[b.expert], rows = offsets[b.expert + 1] - row0;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (b.amx) {
      cpu::quantized_amx_mm(w.expert(b.expert), rows, b.begin, b.end, x.const_data_ptr<T>() + row0 * w.d_in, w.d_in,
                            x.size(0) - row0, out.mutable_data_ptr<T>() + row0 * w.d_out, w.d_out);
      return;
    }
  }
  const float* xf = float_rows(x.const_data_ptr<T>() + row0 * w.d_in, rows, w.d_in);
  cpu::quantized_skinny_mm<T>(w.expert(b.expert), rows, b.begin, b.end, xf, w.d_in,
                              out.mutable_data_ptr<T>() + row0 * w.d_out, w.d_out);
}

// w[e][i0:i1, j0:j1] dequantized to T, in this thread's scratch (valid until the thread's next panel).
template <typename T>
at::Tensor dequantized_panel(const QuantizedWeights& w, int64_t e, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                             const at::TensorOptions& options) {
  T* panel = static_cast<T*>(scratch(static_cast<size_t>((i1 - i0) * (j1 - j0)) * sizeof(T)));
  cpu::dequantize_block<T>(w.expert(e), i0, i1, j0, j1, panel, j1 - j0);
  return at::from_blob(panel, {i1 - i0, j1 - j0}, options);
}

// out[rows of e][:, begin:end] = x rows of e @ w[e][:, begin:end], through a dequantized panel.
template <typename T>
void panel_block(const QuantizedWeights& w, const Block& b, const at::Tensor& x, const std::vector<int64_t>& offsets,
                 at::Tensor& out) {
  const int64_t row0 = b.row0, rows = b.rows;
  const int64_t cols = b.end - b.begin;
  const at::Tensor panel = dequantized_panel<T>(w, b.expert, 0, w.d_in, b.begin, b.end, x.options());
  if constexpr (std::is_same_v<T, float>) {
    if (cpu::fast_sgemm_available() && !cpu::blas_sgemm_preferred()) {
      cpu::sgemm(rows, cols, w.d_in, x.const_data_ptr<float>() + row0 * w.d_in, w.d_in, 1,
                 panel.const_data_ptr<float>(), cols, 1, out.mutable_data_ptr<float>() + row0 * w.d_out + b.begin,
                 w.d_out, /*accumulate=*/false);
      return;
    }
  }
  // at::mm and a copy: measured faster than at::mm_out into the strided column block (bfloat16: 71 + 8 against
  // 148 us for 64 x 2048 x 128; oneDNN takes a slower path for a given output).
  out.narrow(0, row0, rows).narrow(1, b.begin, cols).copy_(at::mm(x.narrow(0, row0, rows), panel));
}

// grad_x[rows of e][:, begin:end] = grad_output rows of e @ w[e][begin:end, :]^T.
template <typename T>
void panel_block_backward(const QuantizedWeights& w, const Block& b, const at::Tensor& grad_output,
                          const std::vector<int64_t>& offsets, at::Tensor& grad_x) {
  const int64_t row0 = offsets[b.expert], rows = offsets[b.expert + 1] - row0;
  const at::Tensor panel = dequantized_panel<T>(w, b.expert, b.begin, b.end, 0, w.d_out, grad_output.options());
  grad_x.narrow(0, row0, rows).narrow(1, b.begin, b.end - b.begin)
      .copy_(at::mm(grad_output.narrow(0, row0, rows), panel.t()));
}

#define TORCHMOE_QUANTIZED_CALL(dtype, fn, ...)                                         \
  switch (dtype) {                                                                      \
    case at::kFloat: fn<float>(__VA_ARGS__); break;                                     \
    case at::kDouble: fn<double>(__VA_ARGS__); break;                                   \
    case at::kBFloat16: fn<c10::BFloat16>(__VA_ARGS__); break;                          \
    case at::kHalf: fn<c10::Half>(__VA_ARGS__); break;                                  \
    default: TORCH_INTERNAL_ASSERT(false, "grouped_mm_quantized does not take ", dtype); \
  }

template <typename T>
void skinny_block_call(const QuantizedWeights& w, const Block& b, const at::Tensor& x,
                       const std::vector<int64_t>& offsets, at::Tensor& out) {
  if constexpr (std::is_same_v<T, double>) {
    TORCH_INTERNAL_ASSERT(false, "float64 has no skinny path");
  } else {
    skinny_block<T>(w, b, x, offsets, out);
  }
}

at::Tensor grouped_mm_quantized_cpu(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                                    const std::optional<at::Tensor>& zeros, const at::Tensor& counts, int64_t bits,
                                    int64_t group_size) {
  checks::check_grouped_mm_quantized_forward(x_in, qweight, scales, zeros, counts, bits, group_size);
  const auto x = x_in.contiguous();
  const auto w = contiguous_weights(qweight, scales, zeros, bits, group_size);
  const int64_t n = x.size(0);
  const auto offsets = cpu::expert_offsets(counts, n, "grouped_mm_quantized");
  auto out = cpu::empty_output({n, w.d_out}, x.options());
  if (n == 0 || w.d_out == 0) return out;
  if (w.d_in == 0) return out.zero_();
  const bool skinny_ok = skinny_dtype(x.scalar_type());
  const bool amx_ok = x.scalar_type() == at::kBFloat16 && cpu::amx_available() &&
                      cpu::quantized_amx_supports(w.expert(0));
  const bool bf16_dot = x.scalar_type() == at::kBFloat16 &&
                        (w.bits == 4 ? cpu::q4_bf16_dot_available() : cpu::q8_bf16_dot_available(w.group_size));
  const int64_t skinny_max_rows = bf16_dot ? kDotSkinnyMaxRows : kQuantizedSkinnyMaxRows;
  std::vector<int64_t> skinny_experts, amx_experts;
  std::vector<Block> blocks;
  for (int64_t e = 0; e + 1 < static_cast<int64_t>(offsets.size()); ++e) {
    const int64_t rows = offsets[e + 1] - offsets[e];
    if (rows == 0) continue;
    if (amx_ok && rows >= amx_min_rows(w.bits) && rows <= amx_max_rows(w.bits)) {
      amx_experts.push_back(e);
    } else if (skinny_ok && rows <= skinny_max_rows) {
      skinny_experts.push_back(e);
    } else {
      const int64_t cols = panel_cols(w.d_in, w.d_out, x.element_size());
      for (int64_t r = offsets[e]; r < offsets[e + 1]; r += kRowBlock) {
        for (int64_t j = 0; j < w.d_out; j += cols) {
          blocks.push_back({e, j, std::min(w.d_out, j + cols), false, r, std::min(kRowBlock, offsets[e + 1] - r)});
        }
      }
    }
  }
  add_skinny_blocks(skinny_experts, w.d_out, /*amx=*/false, blocks);
  add_skinny_blocks(amx_experts, w.d_out, /*amx=*/true, blocks);
  const bool panels = std::any_of(blocks.begin(), blocks.end(), [](const Block& b) { return !b.skinny; });
  cpu::run_tasks(blocks, [&](const Block& b) {
    if (b.skinny) {
      TORCHMOE_QUANTIZED_CALL(x.scalar_type(), skinny_block_call, w, b, x, offsets, out);
    } else {
      TORCHMOE_QUANTIZED_CALL(x.scalar_type(), panel_block, w, b, x, offsets, out);
    }
  }, /*calls_aten=*/panels);  // the panels' at::mm
  return out;
}

at::Tensor grouped_mm_quantized_backward_cpu(const at::Tensor& grad_output_in, const at::Tensor& qweight,
                                             const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                             const at::Tensor& counts, int64_t bits, int64_t group_size) {
  checks::check_grouped_mm_quantized_backward(grad_output_in, qweight, scales, zeros, counts, bits, group_size);
  const auto grad_output = grad_output_in.contiguous();
  const auto w = contiguous_weights(qweight, scales, zeros, bits, group_size);
  const int64_t n = grad_output.size(0);
  const auto offsets = cpu::expert_offsets(counts, n, "_grouped_mm_quantized_backward");
  auto grad_x = cpu::empty_output({n, w.d_in}, grad_output.options());
  if (n == 0 || w.d_in == 0) return grad_x;
  if (w.d_out == 0) return grad_x.zero_();
  std::vector<Block> blocks;
  for (int64_t e = 0; e + 1 < static_cast<int64_t>(offsets.size()); ++e) {
    if (offsets[e + 1] == offsets[e]) continue;
    for (int64_t i = 0; i < w.d_in; i += kPanelRows) blocks.push_back({e, i, std::min(w.d_in, i + kPanelRows), false});
  }
  cpu::run_tasks(blocks, [&](const Block& b) {
    TORCHMOE_QUANTIZED_CALL(grad_output.scalar_type(), panel_block_backward, w, b, grad_output, offsets, grad_x);
  }, /*calls_aten=*/true);
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, CPU, m) {
  m.impl("grouped_mm_quantized", &grouped_mm_quantized_cpu);
  m.impl("_grouped_mm_quantized_backward", &grouped_mm_quantized_backward_cpu);
}

}  // namespace torchmoe::ops
