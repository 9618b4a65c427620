// The float weight of a packed quantized weight (layout: ops/common/grouped_mm_quantized_checks.h) with ATen ops,
// for any device: scale * (code - zero) in float32, then `dtype`. The CPU kernels' dequantize_block computes the
// same float32 values.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace torchmoe::ops {

inline at::Tensor dequantize_weight(const at::Tensor& qweight, const at::Tensor& scales,
                                    const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                                    at::ScalarType dtype) {
  const int64_t num_experts = qweight.size(0), d_out = qweight.size(2);
  const int64_t d_in = bits == 4 ? 2 * qweight.size(1) : qweight.size(1);
  const int64_t groups = d_in / group_size;
  at::Tensor codes;
  if (bits == 8) {
    codes = qweight.to(at::kFloat);
  } else {
    const auto low = at::bitwise_and(qweight, 15);
    const auto high = at::bitwise_right_shift(qweight, 4);
    // [E, d_in / 2, 2, d_out] -> [E, d_in, d_out]: the even row in the low nibble
    codes = at::stack({low, high}, 2).reshape({num_experts, d_in, d_out}).to(at::kFloat);
  }
  auto grouped = codes.view({num_experts, groups, group_size, d_out});
  if (bits == 4) {
    grouped = zeros.has_value() ? grouped - zeros->to(at::kFloat).unsqueeze(2) : grouped - 8.0;
  }
  return (grouped * scales.unsqueeze(2)).reshape({num_experts, d_in, d_out}).to(dtype);
}

}  // namespace torchmoe::ops
