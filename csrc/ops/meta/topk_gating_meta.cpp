// Meta (shape) kernels of topk_gating and _topk_gating_backward: SymInt shapes only, for FakeTensors and
// torch.compile. They run the same argument checks as the CPU and CUDA kernels.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops/common/topk_gating_checks.h"

namespace torchmoe::ops {
namespace {

std::tuple<at::Tensor, at::Tensor> topk_gating_meta(const at::Tensor& logits, int64_t k, c10::string_view score_func,
                                                    bool renormalize, const std::optional<at::Tensor>& expert_bias,
                                                    int64_t num_expert_groups, int64_t topk_expert_groups,
                                                    double scale) {
  checks::check_topk_gating_args(logits, k, score_func, expert_bias, num_expert_groups, topk_expert_groups);
  std::vector<c10::SymInt> sizes(logits.sym_sizes().begin(), logits.sym_sizes().end());
  sizes.back() = c10::SymInt(k);
  return {at::empty_symint(sizes, logits.options()), at::empty_symint(sizes, logits.options().dtype(at::kLong))};
}

at::Tensor topk_gating_backward_meta(const at::Tensor& grad_weights, const at::Tensor& logits,
                                     const at::Tensor& indices, c10::string_view score_func, bool renormalize,
                                     double scale) {
  checks::check_topk_gating_backward_args(grad_weights, logits, indices, score_func);
  return at::empty_symint(logits.sym_sizes(), logits.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, Meta, m) {
  m.impl("topk_gating", &topk_gating_meta);
  m.impl("_topk_gating_backward", &topk_gating_backward_meta);
}

}  // namespace torchmoe::ops
