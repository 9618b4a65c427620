// Autograd of grouped_mm_quantized: d x through _grouped_mm_quantized_backward. The quantized weight is frozen
// (integer codes and their scales get no gradient), which is what LoRA-style fine-tuning on a quantized base needs.
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/autograd/records_graph.h"

#include "ops/grouped_mm_quantized.h"

namespace torchmoe::ops {
namespace {

// The packed weight and counts both Functions below keep for their backward.
void save_weight(torch::autograd::AutogradContext* ctx, const at::Tensor& qweight, const at::Tensor& scales,
                 const std::optional<at::Tensor>& zeros, const at::Tensor& counts, int64_t bits, int64_t group_size) {
  ctx->save_for_backward({qweight, scales, zeros.value_or(at::Tensor()), counts});
  ctx->saved_data["bits"] = bits;
  ctx->saved_data["group_size"] = group_size;
}

// op(grad, <the saved weight and counts>): the product of the other direction, from a backward.
template <typename Op>
at::Tensor with_saved_weight(torch::autograd::AutogradContext* ctx, const at::Tensor& grad, const Op& op) {
  const auto saved = ctx->get_saved_variables();
  const std::optional<at::Tensor> zeros = saved[2].defined() ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
  return op(grad, saved[0], saved[1], zeros, saved[3], ctx->saved_data["bits"].toInt(),
            ctx->saved_data["group_size"].toInt());
}

class GroupedMMQuantizedFunction : public torch::autograd::Function<GroupedMMQuantizedFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& qweight, const at::Tensor& scales,
                                                const std::optional<at::Tensor>& zeros, const at::Tensor& counts,
                                                int64_t bits, int64_t group_size) {
    at::AutoDispatchBelowADInplaceOrView guard;
    save_weight(ctx, qweight, scales, zeros, counts, bits, group_size);
    return {grouped_mm_quantized(x, qweight, scales, zeros, counts, bits, group_size)};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 const torch::autograd::variable_list& grad_outputs) {
    torch::autograd::variable_list grads(7);
    if (!grad_outputs[0].defined() || !ctx->needs_input_grad(0)) return grads;
    grads[0] = with_saved_weight(ctx, grad_outputs[0], detail::_grouped_mm_quantized_backward);
    return grads;
  }
};

// The backward is linear in grad_output: its own gradient is the forward product (double backward, e.g.
// gradgradcheck or Hessian-vector products through a quantized layer).
class GroupedMMQuantizedBackwardFunction : public torch::autograd::Function<GroupedMMQuantizedBackwardFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& grad_output,
                                                const at::Tensor& qweight, const at::Tensor& scales,
                                                const std::optional<at::Tensor>& zeros, const at::Tensor& counts,
                                                int64_t bits, int64_t group_size) {
    at::AutoDispatchBelowADInplaceOrView guard;
    save_weight(ctx, qweight, scales, zeros, counts, bits, group_size);
    return {detail::_grouped_mm_quantized_backward(grad_output, qweight, scales, zeros, counts, bits, group_size)};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 const torch::autograd::variable_list& grad_outputs) {
    torch::autograd::variable_list grads(7);
    if (!grad_outputs[0].defined() || !ctx->needs_input_grad(0)) return grads;
    grads[0] = with_saved_weight(ctx, grad_outputs[0], grouped_mm_quantized);
    return grads;
  }
};

at::Tensor grouped_mm_quantized_backward_autograd(const at::Tensor& grad_output, const at::Tensor& qweight,
                                                  const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                                  const at::Tensor& counts, int64_t bits, int64_t group_size) {
  return GroupedMMQuantizedBackwardFunction::apply(grad_output, qweight, scales, zeros, counts, bits, group_size)[0];
}

at::Tensor grouped_mm_quantized_autograd(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                         const std::optional<at::Tensor>& zeros, const at::Tensor& counts,
                                         int64_t bits, int64_t group_size) {
  if (!autograd_detail::records_graph(x)) {  // the packed weights are frozen data
    at::AutoDispatchBelowADInplaceOrView guard;
    return grouped_mm_quantized(x, qweight, scales, zeros, counts, bits, group_size);
  }
  return GroupedMMQuantizedFunction::apply(x, qweight, scales, zeros, counts, bits, group_size)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, Autograd, m) {
  m.impl("grouped_mm_quantized", &grouped_mm_quantized_autograd);
  m.impl("_grouped_mm_quantized_backward", &grouped_mm_quantized_backward_autograd);
}

}  // namespace torchmoe::ops
