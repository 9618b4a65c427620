// torchmoe::_moe_forward: the dropless layer's forward as one op. It is what torchmoe.nn.MoE.forward does op by op
// (the same ops in the same order, so the same result bits), composed in C++: a decode step then crosses from
// Python into the library once instead of a dozen times (each crossing costs 2-5 us on a CPU, more than the
// routing itself at a few tokens). It is CompositeImplicitAutograd: every backend, the Meta shapes, autograd,
// torch.compile and torch.export see the public ops it is made of.
#include "ops/moe_forward.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include "ops/combine.h"
#include "ops/grouped_mm.h"
#include "ops/grouped_mm_quantized.h"
#include "ops/route_plan.h"
#include "ops/router_logits.h"
#include "ops/swiglu.h"
#include "ops/topk_gating.h"

namespace torchmoe::ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> _moe_forward(
    const at::Tensor& x, const at::Tensor& router_weight, const std::optional<at::Tensor>& expert_bias, int64_t k,
    c10::string_view score_func, bool renormalize, int64_t num_expert_groups, int64_t topk_expert_groups,
    double scale, c10::string_view activation, const std::optional<at::Tensor>& gate_proj, const at::Tensor& up_proj,
    const at::Tensor& down_proj, int64_t bits, const std::vector<std::optional<at::Tensor>>& scales,
    const std::vector<std::optional<at::Tensor>>& zeros, const std::vector<int64_t>& group_sizes) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchmoe::_moe_forward", "")
                       .typed<decltype(_moe_forward)>();
  return op.call(x, router_weight, expert_bias, k, score_func, renormalize, num_expert_groups, topk_expert_groups,
                 scale, activation, gate_proj, up_proj, down_proj, bits, scales, zeros, group_sizes);
}

namespace {

// dispatch with a symbolic row count (torch.export with a dynamic batch keeps T * k an expression).
at::Tensor dispatch_rows(const at::Tensor& x, const at::Tensor& dest, c10::SymInt num_rows) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchmoe::dispatch", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt)>();
  return op.call(x, dest, std::move(num_rows));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_forward_composite(
    const at::Tensor& x, const at::Tensor& router_weight, const std::optional<at::Tensor>& expert_bias, int64_t k,
    c10::string_view score_func, bool renormalize, int64_t num_expert_groups, int64_t topk_expert_groups,
    double scale, c10::string_view activation, const std::optional<at::Tensor>& gate_proj, const at::Tensor& up_proj,
    const at::Tensor& down_proj, int64_t bits, const std::vector<std::optional<at::Tensor>>& scales,
    const std::vector<std::optional<at::Tensor>>& zeros, const std::vector<int64_t>& group_sizes) {
  TORCH_CHECK(x.dim() == 2, "_moe_forward: argument 'x' must be 2-D [T, d_model], got ", x.dim(), "-D");
  TORCH_CHECK(router_weight.dim() == 2 && router_weight.sym_size(1) == x.sym_size(1) &&
                  at::isFloatingType(router_weight.scalar_type()),
              "_moe_forward: argument 'router_weight' must be a floating [E, d_model = ", x.sym_size(1),
              "] tensor, got ", router_weight.scalar_type(), " of shape ", router_weight.sym_sizes());
  const bool swiglu_experts = activation == "swiglu";
  TORCH_CHECK(swiglu_experts || activation == "relu" || activation == "gelu",
              "_moe_forward: argument 'activation' must be \"swiglu\", \"relu\" or \"gelu\", got \"", activation,
              "\"");
  TORCH_CHECK(gate_proj.has_value() == swiglu_experts, "_moe_forward: argument 'gate_proj' must be given ",
              swiglu_experts ? "for" : "only for", " swiglu experts");
  TORCH_CHECK(bits == 0 || bits == 4 || bits == 8,
              "_moe_forward: argument 'bits' must be 0 (float experts), 4 or 8, got ", bits);
  const bool quantized = bits != 0;
  if (quantized) {
    TORCH_CHECK(scales.size() == 3 && zeros.size() == 3 && group_sizes.size() == 3,
                "_moe_forward: arguments 'scales', 'zeros' and 'group_sizes' must hold 3 entries (gate, up, down) "
                "for quantized experts, got ", scales.size(), ", ", zeros.size(), " and ", group_sizes.size());
    TORCH_CHECK(scales[1].has_value() && scales[2].has_value() && scales[0].has_value() == gate_proj.has_value(),
                "_moe_forward: argument 'scales' must hold a tensor for each expert weight given");
  } else {
    TORCH_CHECK(scales.empty() && zeros.empty() && group_sizes.empty(),
                "_moe_forward: arguments 'scales', 'zeros' and 'group_sizes' must be empty for float experts");
  }
  const int64_t num_experts = router_weight.size(0);

  // With grad mode off nothing records a graph: the ops below go straight to their backend kernels, past the
  // autograd ones (each of which costs about a microsecond at a decode step even when it records nothing).
  std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
  if (!c10::GradMode::is_enabled()) below_autograd.emplace();
  auto logits = router_logits(x, router_weight);
  auto [weights, indices] = topk_gating(logits, k, score_func, renormalize, expert_bias, num_expert_groups,
                                        topk_expert_groups, scale);
  auto [dest, counts] = route_plan(indices, num_experts, -1);
  const at::Tensor rows = dispatch_rows(x, dest, x.sym_size(0) * k);
  auto expert_mm = [&](const at::Tensor& input, const at::Tensor& weight, size_t i) {
    if (!quantized) return grouped_mm(input, weight, counts);
    return grouped_mm_quantized(input, weight, *scales[i], zeros[i], counts, bits, group_sizes[i]);
  };
  at::Tensor hidden;
  if (swiglu_experts) {
    hidden = swiglu(expert_mm(rows, *gate_proj, 0), expert_mm(rows, up_proj, 1));
  } else if (activation == "relu") {
    hidden = expert_mm(rows, up_proj, 1);
    hidden.relu_();  // a fresh product nothing else holds
  } else {
    hidden = at::gelu(expert_mm(rows, up_proj, 1));
  }
  at::Tensor y = combine(expert_mm(hidden, down_proj, 2), dest, weights);
  return {std::move(y), std::move(weights), std::move(indices), std::move(logits), std::move(counts)};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, CompositeImplicitAutograd, m) {
  m.impl("_moe_forward", &moe_forward_composite);
}

}  // namespace torchmoe::ops
