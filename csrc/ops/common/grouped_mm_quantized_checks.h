// Checks of grouped_mm_quantized and its backward, shared by the CPU, CUDA and Meta kernels (SymInt sizes, so the
// Meta kernels call them under torch.compile).
//
// The packed layout (what torchmoe.quantize_weight produces), for a logical weight w [E, d_in, d_out]:
//   bits = 8: qweight int8 [E, d_in, d_out], w[e, p, j] = scales[e, p / group_size, j] * qweight[e, p, j].
//   bits = 4: qweight uint8 [E, d_in / 2, d_out]; byte (e, i, j) holds q[e, 2i, j] in its low nibble and
//             q[e, 2i + 1, j] in its high nibble, q unsigned 0..15, and
//             w[e, p, j] = scales[e, g, j] * (q[e, p, j] - z[e, g, j]) with g = p / group_size and z = zeros[e, g, j]
//             (uint8, 0..15; the asymmetric AWQ/GPTQ form) or 8 when zeros is None (symmetric: signed -8..7).
//   scales float32 [E, d_in / group_size, d_out]; group_size divides d_in (and is even for 4 bits).
// Two reduction rows per byte keep every output column in its own byte column: a vector of 16 bytes is 16 output
// columns of two consecutive rows, so the kernels read each row of the packed weight as stored, like a float one.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <optional>

#include "ops/common/checks.h"

namespace torchmoe::checks {

// d_in of the logical weight.
inline c10::SymInt quantized_d_in(const at::Tensor& qweight, int64_t bits) {
  return bits == 4 ? qweight.sym_size(1) * 2 : qweight.sym_size(1);
}

inline void check_grouped_mm_quantized_weight(const at::Tensor& qweight, const at::Tensor& scales,
                                              const std::optional<at::Tensor>& zeros, int64_t bits,
                                              int64_t group_size, const char* op) {
  TORCHMOE_CHECK_ARG(bits == 4 || bits == 8, op, "bits", "must be 4 or 8, got ", bits);
  check_dim(qweight, 3, op, "qweight");
  check_dtype(qweight, bits == 8 ? at::kChar : at::kByte, op, "qweight");
  const c10::SymInt d_in = quantized_d_in(qweight, bits);
  TORCHMOE_CHECK_ARG(group_size > 0 && d_in % group_size == 0, op, "group_size",
                     "must be a positive divisor of d_in = ", d_in, ", got ", group_size);
  TORCHMOE_CHECK_ARG(bits == 8 || group_size % 2 == 0, op, "group_size", "must be even for 4 bits, got ",
                     group_size);
  check_dim(scales, 3, op, "scales");
  check_dtype(scales, at::kFloat, op, "scales");
  const c10::SymInt groups = d_in / group_size;
  TORCHMOE_CHECK_ARG(scales.sym_size(0) == qweight.sym_size(0) && scales.sym_size(1) == groups &&
                         scales.sym_size(2) == qweight.sym_size(2),
                     op, "scales", "must have shape [E, d_in / group_size, d_out] = [", qweight.sym_size(0), ", ",
                     groups, ", ", qweight.sym_size(2), "], got ", scales.sym_sizes());
  check_same_device(qweight, scales, op, "qweight", "scales");
  if (zeros.has_value()) {
    TORCHMOE_CHECK_ARG(bits == 4, op, "zeros", "must be None for 8 bits (int8 is symmetric)");
    check_dim(*zeros, 3, op, "zeros");
    check_dtype(*zeros, at::kByte, op, "zeros");
    TORCHMOE_CHECK_ARG(zeros->sym_sizes() == scales.sym_sizes(), op, "zeros", "must have the shape of 'scales' ",
                       scales.sym_sizes(), ", got ", zeros->sym_sizes());
    check_same_device(qweight, *zeros, op, "qweight", "zeros");
  }
}

inline void check_grouped_mm_quantized_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                            const std::optional<at::Tensor>& zeros, const at::Tensor& counts,
                                            int64_t bits, int64_t group_size,
                                            const char* op = "grouped_mm_quantized", const char* x_name = "x") {
  check_grouped_mm_quantized_weight(qweight, scales, zeros, bits, group_size, op);
  check_dim(x, 2, op, x_name);
  check_floating(x, op, x_name);
  check_dim(counts, 1, op, "counts");
  check_dtype(counts, at::kLong, op, "counts");
  TORCHMOE_CHECK_ARG(counts.sym_size(0) == qweight.sym_size(0), op, "counts",
                     "must have one entry per expert (qweight.size(0) = ", qweight.sym_size(0), "), got ",
                     counts.sym_size(0), " entries");
  check_same_device(x, qweight, op, x_name, "qweight");
  check_same_device(x, counts, op, x_name, "counts");
}

inline void check_grouped_mm_quantized_forward(const at::Tensor& x, const at::Tensor& qweight,
                                               const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                               const at::Tensor& counts, int64_t bits, int64_t group_size) {
  const char* op = "grouped_mm_quantized";
  check_grouped_mm_quantized_args(x, qweight, scales, zeros, counts, bits, group_size, op, "x");
  TORCHMOE_CHECK_ARG(x.sym_size(1) == quantized_d_in(qweight, bits), op, "x",
                     "must be [N, d_in] with d_in = ", quantized_d_in(qweight, bits), " (the quantized weight's), got ",
                     x.sym_sizes());
}

inline void check_grouped_mm_quantized_backward(const at::Tensor& grad_output, const at::Tensor& qweight,
                                                const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                                const at::Tensor& counts, int64_t bits, int64_t group_size) {
  const char* op = "_grouped_mm_quantized_backward";
  check_grouped_mm_quantized_args(grad_output, qweight, scales, zeros, counts, bits, group_size, op, "grad_output");
  TORCHMOE_CHECK_ARG(grad_output.sym_size(1) == qweight.sym_size(2), op, "grad_output",
                     "must be [N, d_out] with d_out = ", qweight.sym_size(2), ", got ", grad_output.sym_sizes());
}

}  // namespace torchmoe::checks
