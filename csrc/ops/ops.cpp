// The torchmoe operator library: every schema, in one place. Kernels register per dispatch key
// in csrc/ops/{cpu,cuda,meta,autograd}/.
#include <torch/library.h>

TORCH_LIBRARY(torchmoe, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};

  // Top-k expert selection over softmax/sigmoid scores, optional bias and group limiting; normalised weights.
  m.def("topk_gating(Tensor logits, int k, str score_func=\"softmax\", bool renormalize=True, "
        "Tensor? expert_bias=None, int num_expert_groups=1, int topk_expert_groups=1, float scale=1.0) "
        "-> (Tensor weights, Tensor indices)", tags);
  // d logits from d weights, given the selection the forward made.
  m.def("_topk_gating_backward(Tensor grad_weights, Tensor logits, Tensor indices, str score_func, "
        "bool renormalize, float scale) -> Tensor", tags);

  // The router's logits: x [..., d] @ weight[E, d]^T, operands of any float dtype read as stored, float32 sums
  // (float64 if an operand is float64) in an order that does not depend on the batch or the thread count.
  m.def("router_logits(Tensor x, Tensor weight) -> Tensor", tags);

  // Slot of every (token, choice) in its expert's queue: a stable counting sort; capacity or dropless.
  m.def("route_plan(Tensor indices, int num_experts, int capacity=-1, Tensor? priority=None) "
        "-> (Tensor dest, Tensor counts)", tags);

  // out[dest[n, j]] = x[n]; unfilled rows are zero.
  m.def("dispatch(Tensor x, Tensor dest, SymInt num_rows) -> Tensor", tags);
  // dx[n] = sum_j grad_out[dest[n, j]] over kept slots.
  m.def("_dispatch_backward(Tensor grad_out, Tensor dest) -> Tensor", tags);

  // y[n] = sum_j weights[n, j] * expert_out[dest[n, j]] over kept slots, accumulated in float32.
  m.def("combine(Tensor expert_out, Tensor dest, Tensor weights) -> Tensor", tags);
  m.def("_combine_backward(Tensor grad_output, Tensor expert_out, Tensor dest, Tensor weights) "
        "-> (Tensor grad_expert_out, Tensor grad_weights)", tags);

  // out[rows of e] = x[rows of e] @ weight[e], rows grouped by expert as counts says.
  m.def("grouped_mm(Tensor x, Tensor weight, Tensor counts) -> Tensor", tags);
  m.def("_grouped_mm_backward(Tensor grad_output, Tensor x, Tensor weight, Tensor counts) "
        "-> (Tensor grad_x, Tensor grad_weight)", tags);

  // grouped_mm with weight-only quantized experts (int8, or int4 two per byte), dequantized on the fly; the
  // packed layout is described in csrc/ops/common/grouped_mm_quantized_checks.h. Gradient w.r.t. x only.
  m.def("grouped_mm_quantized(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor counts, int bits, "
        "int group_size) -> Tensor", tags);
  m.def("_grouped_mm_quantized_backward(Tensor grad_output, Tensor qweight, Tensor scales, Tensor? zeros, "
        "Tensor counts, int bits, int group_size) -> Tensor", tags);

  // silu(gate) * up, elementwise (the SwiGLU expert's activation); same shapes and dtypes.
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor", tags);
  m.def("_swiglu_backward(Tensor grad_out, Tensor gate, Tensor up) -> (Tensor grad_gate, Tensor grad_up)", tags);

  // A dropless MoE layer's forward (router, top-k, plan, dispatch, experts, combine) in one call, composed of
  // the ops above; torchmoe.nn.MoE takes it for inference. bits 0: float experts, 4 / 8: quantized (scales,
  // zeros and group_sizes hold the gate, up and down entries).
  m.def("_moe_forward(Tensor x, Tensor router_weight, Tensor? expert_bias, int k, str score_func, bool renormalize, "
        "int num_expert_groups, int topk_expert_groups, float scale, str activation, Tensor? gate_proj, "
        "Tensor up_proj, Tensor down_proj, int bits, Tensor?[] scales, Tensor?[] zeros, "
        "int[] group_sizes) -> (Tensor y, Tensor weights, Tensor indices, Tensor logits, Tensor counts)", tags);

  // The CPU kernels' cache of large freed outputs: bytes held, and freeing them (returns bytes freed).
  // Conservative alias analysis marks them as having side effects, so TorchScript never folds a call.
  m.def(torch::schema("_cpu_cache_bytes() -> int", c10::AliasAnalysisKind::CONSERVATIVE));
  m.def(torch::schema("_cpu_cache_release() -> int", c10::AliasAnalysisKind::CONSERVATIVE));
}
