// swiglu through the dispatcher (torchmoe::ops::swiglu) against silu(gate) * up, its backward through
// torch::autograd::grad, and bad inputs.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "torchmoe.h"

TEST(Swiglu, MatchesCompositeForwardAndBackward) {
  torch::manual_seed(0);
  for (auto dtype : {torch::kFloat, torch::kDouble, torch::kBFloat16}) {
    auto gate = (torch::randn({33, 70}) * 4).to(dtype).requires_grad_(true);
    auto up = torch::randn({33, 70}).to(dtype).requires_grad_(true);
    auto grad = torch::randn({33, 70}).to(dtype);
    const double tol = dtype == torch::kBFloat16 ? 1e-2 : 1e-6;  // a rounding step of bf16 apart at most
    auto out = torchmoe::ops::swiglu(gate, up);
    auto expected = torch::silu(gate) * up;
    EXPECT_TRUE(torch::allclose(out.to(torch::kDouble), expected.to(torch::kDouble), tol, tol));
    auto grads = torch::autograd::grad({out}, {gate, up}, {grad});
    auto expected_grads = torch::autograd::grad({expected}, {gate, up}, {grad});
    EXPECT_TRUE(torch::allclose(grads[0].to(torch::kDouble), expected_grads[0].to(torch::kDouble), tol, tol));
    EXPECT_TRUE(torch::allclose(grads[1].to(torch::kDouble), expected_grads[1].to(torch::kDouble), tol, tol));
  }
}

TEST(Swiglu, EmptyAndBadInputs) {
  EXPECT_EQ(torchmoe::ops::swiglu(torch::zeros({0, 3}), torch::zeros({0, 3})).sizes(),
            (std::vector<int64_t>{0, 3}));
  auto gate = torch::randn({4, 3});
  EXPECT_THROW(torchmoe::ops::swiglu(gate, torch::randn({3, 4})), c10::Error);
  EXPECT_THROW(torchmoe::ops::swiglu(gate, gate.to(torch::kDouble)), c10::Error);
  EXPECT_THROW(torchmoe::ops::swiglu(gate.to(torch::kLong), gate.to(torch::kLong)), c10::Error);
}
