#include "ops/route_plan.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace torchmoe::ops {

std::tuple<at::Tensor, at::Tensor> route_plan(
    const at::Tensor& indices, int64_t num_experts, int64_t capacity,
    const std::optional<at::Tensor>& priority) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchmoe::route_plan", "")
                       .typed<decltype(route_plan)>();
  return op.call(indices, num_experts, capacity, priority);
}

}  // namespace torchmoe::ops
