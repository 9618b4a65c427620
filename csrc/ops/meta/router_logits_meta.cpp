// Meta (shape-only) kernel of router_logits.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "ops/common/router_logits_checks.h"

namespace torchmoe::meta {
namespace {

at::Tensor router_logits_meta(const at::Tensor& x, const at::Tensor& weight) {
  checks::check_router_logits(x, weight);
  auto sizes = x.sym_sizes().vec();
  sizes.back() = weight.sym_size(0);
  return x.new_empty_symint(sizes, x.options().dtype(checks::router_logits_dtype(x, weight)));
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, Meta, m) {
  m.impl("router_logits", router_logits_meta);
}

}  // namespace torchmoe::meta
