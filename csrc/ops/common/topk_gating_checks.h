// Argument checks of topk_gating and _topk_gating_backward, shared by the CPU, CUDA and Meta kernels.
// They read shapes through sym_size so they also run on FakeTensors under torch.compile.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

#include "ops/common/checks.h"

namespace torchmoe::checks {

inline bool topk_gating_is_softmax(c10::string_view score_func) {
  return score_func == "softmax";
}

inline void check_topk_gating_score_func(c10::string_view score_func, const char* op) {
  TORCHMOE_CHECK_ARG(score_func == "softmax" || score_func == "sigmoid", op, "score_func",
                     "must be \"softmax\" or \"sigmoid\", got \"", std::string(score_func), "\"");
}

inline void check_topk_gating_args(const at::Tensor& logits, int64_t k, c10::string_view score_func,
                                   const std::optional<at::Tensor>& expert_bias, int64_t num_expert_groups,
                                   int64_t topk_expert_groups) {
  constexpr const char* op = "topk_gating";
  check_floating(logits, op, "logits");
  TORCHMOE_CHECK_ARG(logits.dim() >= 1, op, "logits", "must have at least 1 dimension [..., E], got a 0-D tensor");
  const c10::SymInt E = logits.sym_size(-1);
  TORCHMOE_CHECK_ARG(E >= 1, op, "logits", "must have at least one expert (last dimension E >= 1), got E = ", E);
  TORCHMOE_CHECK_ARG(k > 0 && E >= k, op, "k", "must satisfy 0 < k <= E = ", E, ", got k = ", k);
  check_topk_gating_score_func(score_func, op);
  if (expert_bias.has_value() && expert_bias->defined()) {
    const at::Tensor& bias = *expert_bias;
    check_dtype(bias, at::kFloat, op, "expert_bias");
    TORCHMOE_CHECK_ARG(bias.dim() == 1 && bias.sym_size(0) == E, op, "expert_bias",
                       "must be a 1-D tensor of size E = ", E, ", got shape ", bias.sym_sizes());
    check_same_device(logits, bias, op, "logits", "expert_bias");
  }
  TORCHMOE_CHECK_ARG(num_expert_groups >= 1, op, "num_expert_groups", "must be >= 1, got ", num_expert_groups);
  TORCHMOE_CHECK_ARG(E % num_expert_groups == 0, op, "num_expert_groups",
                     "must divide the number of experts E = ", E, ", got ", num_expert_groups);
  TORCHMOE_CHECK_ARG(topk_expert_groups >= 1 && topk_expert_groups <= num_expert_groups, op, "topk_expert_groups",
                     "must satisfy 1 <= topk_expert_groups <= num_expert_groups = ", num_expert_groups, ", got ",
                     topk_expert_groups);
  const c10::SymInt eligible = (E / num_expert_groups) * topk_expert_groups;
  TORCHMOE_CHECK_ARG(eligible >= k, op, "k",
                     "must be <= the experts in the topk_expert_groups best groups (topk_expert_groups * E / "
                     "num_expert_groups = ",
                     eligible, "), got k = ", k);
}

inline void check_topk_gating_backward_args(const at::Tensor& grad_weights, const at::Tensor& logits,
                                            const at::Tensor& indices, c10::string_view score_func) {
  constexpr const char* op = "_topk_gating_backward";
  check_floating(logits, op, "logits");
  check_floating(grad_weights, op, "grad_weights");
  TORCHMOE_CHECK_ARG(logits.dim() >= 1, op, "logits", "must have at least 1 dimension [..., E], got a 0-D tensor");
  TORCHMOE_CHECK_ARG(logits.sym_size(-1) >= 1, op, "logits", "must have at least one expert (last dimension E >= 1)");
  check_dtype(indices, at::kLong, op, "indices");
  const int64_t dim = logits.dim();
  TORCHMOE_CHECK_ARG(indices.dim() == dim, op, "indices", "must have the dimensions of logits [..., k], got shape ",
                     indices.sym_sizes(), " for logits of shape ", logits.sym_sizes());
  for (int64_t d = 0; d + 1 < dim; ++d) {
    TORCHMOE_CHECK_ARG(indices.sym_size(d) == logits.sym_size(d), op, "indices",
                       "must have the leading dimensions of logits [..., k], got shape ", indices.sym_sizes(),
                       " for logits of shape ", logits.sym_sizes());
  }
  TORCHMOE_CHECK_ARG(grad_weights.sym_sizes() == indices.sym_sizes(), op, "grad_weights",
                     "must have the shape of indices ", indices.sym_sizes(), ", got ", grad_weights.sym_sizes());
  check_topk_gating_score_func(score_func, op);
  check_same_device(logits, indices, op, "logits", "indices");
  check_same_device(logits, grad_weights, op, "logits", "grad_weights");
}

}  // namespace torchmoe::checks
