// Meta (shape-only) kernels of dispatch and its backward, in SymInts for dynamic shapes.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "ops/common/dispatch_checks.h"

namespace torchmoe::meta {
namespace {

at::Tensor dispatch_meta(const at::Tensor& x, const at::Tensor& dest, c10::SymInt num_rows) {
  checks::check_dispatch(x, dest, num_rows);
  return x.new_empty_symint({std::move(num_rows), x.sym_size(1)});
}

at::Tensor dispatch_backward_meta(const at::Tensor& grad_out, const at::Tensor& dest) {
  checks::check_dispatch_backward(grad_out, dest);
  return grad_out.new_empty_symint({dest.sym_size(0), grad_out.sym_size(1)});
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmoe, Meta, m) {
  m.impl("dispatch", dispatch_meta);
  m.impl("_dispatch_backward", dispatch_backward_meta);
}

}  // namespace torchmoe::meta
