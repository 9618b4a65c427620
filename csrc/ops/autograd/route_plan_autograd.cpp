// Autograd kernel of torchmoe::route_plan. Its outputs are integer and not differentiable, so it only
// steps below autograd and redispatches; a priority tensor that requires grad passes through.
#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include "ops/route_plan.h"

namespace torchmoe::autograd {
namespace {

std::tuple<at::Tensor, at::Tensor> route_plan_autograd(const at::Tensor& indices, int64_t num_experts,
                                                       int64_t capacity, const std::optional<at::Tensor>& priority) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return torchmoe::ops::route_plan(indices, num_experts, capacity, priority);
}

}  // namespace
}  // namespace torchmoe::autograd

TORCH_LIBRARY_IMPL(torchmoe, Autograd, m) {
  m.impl("route_plan", &torchmoe::autograd::route_plan_autograd);
}
