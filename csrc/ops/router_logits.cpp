#include "ops/router_logits.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace torchmoe::ops {

at::Tensor router_logits(const at::Tensor& x, const at::Tensor& weight) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchmoe::router_logits", "")
                       .typed<decltype(router_logits)>();
  return op.call(x, weight);
}

}  // namespace torchmoe::ops
