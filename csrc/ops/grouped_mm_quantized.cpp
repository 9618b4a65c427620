#include "ops/grouped_mm_quantized.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace torchmoe::ops {

at::Tensor grouped_mm_quantized(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                const std::optional<at::Tensor>& zeros, const at::Tensor& counts, int64_t bits,
                                int64_t group_size) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchmoe::grouped_mm_quantized", "")
                       .typed<decltype(grouped_mm_quantized)>();
  return op.call(x, qweight, scales, zeros, counts, bits, group_size);
}

namespace detail {
at::Tensor _grouped_mm_quantized_backward(const at::Tensor& grad_output, const at::Tensor& qweight,
                                          const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                          const at::Tensor& counts, int64_t bits, int64_t group_size) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchmoe::_grouped_mm_quantized_backward", "")
                       .typed<decltype(_grouped_mm_quantized_backward)>();
  return op.call(grad_output, qweight, scales, zeros, counts, bits, group_size);
}
}  // namespace detail

}  // namespace torchmoe::ops
