// C++ API of torchmoe::grouped_mm_quantized: calls through the dispatcher. Semantics and the packed layout:
// DESIGN.md and ops/common/grouped_mm_quantized_checks.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace torchmoe::ops {

// out[rows of e] = x[rows of e] @ dequantize(qweight, scales, zeros)[e]; x float32/bfloat16/float16/float64.
at::Tensor grouped_mm_quantized(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                const std::optional<at::Tensor>& zeros, const at::Tensor& counts, int64_t bits,
                                int64_t group_size);

namespace detail {
// grad_x[rows of e] = grad_output[rows of e] @ dequantize(...)[e]^T.
at::Tensor _grouped_mm_quantized_backward(const at::Tensor& grad_output, const at::Tensor& qweight,
                                          const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                          const at::Tensor& counts, int64_t bits, int64_t group_size);
}  // namespace detail

}  // namespace torchmoe::ops
