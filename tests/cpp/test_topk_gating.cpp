// torchmoe::ops::topk_gating from C++: forward against ATen's topk + softmax/sigmoid, backward through
// torch::autograd against the same ATen composite, and argument errors.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>

#include "torchmoe.h"

namespace {

// The ATen composite for a selection without bias or groups: topk on the logits, then the weights.
torch::Tensor composite_weights(const torch::Tensor& logits, const torch::Tensor& indices, const std::string& score_func,
                                bool renormalize, double scale) {
  torch::Tensor w;
  if (score_func == "softmax" && renormalize) {
    w = torch::softmax(logits.gather(-1, indices), -1);
  } else {
    const auto s = score_func == "softmax" ? torch::softmax(logits, -1) : torch::sigmoid(logits);
    w = s.gather(-1, indices);
    if (renormalize) w = w / w.sum(-1, true);
  }
  return w * scale;
}

struct Mode {
  const char* score_func;
  bool renormalize;
};
const Mode kModes[] = {{"softmax", true}, {"softmax", false}, {"sigmoid", true}, {"sigmoid", false}};

TEST(TopkGating, ForwardMatchesAtenTopkAndSoftmax) {
  torch::manual_seed(0);
  for (const int64_t k : {1, 2, 7, 32}) {
    const auto logits = torch::randn({3, 50, 32});  // continuous values: no ties, torch::topk's order is unique
    const auto [ref_values, ref_indices] = torch::topk(logits, k, -1);
    for (const auto& mode : kModes) {
      const auto [weights, indices] = torchmoe::ops::topk_gating(logits, k, mode.score_func, mode.renormalize,
                                                                 std::nullopt, 1, 1, 1.25);
      ASSERT_EQ(weights.sizes(), ref_indices.sizes());
      EXPECT_EQ(indices.scalar_type(), torch::kLong);
      EXPECT_TRUE(torch::equal(indices, ref_indices)) << mode.score_func << " k=" << k;
      const auto expected = composite_weights(logits, ref_indices, mode.score_func, mode.renormalize, 1.25);
      EXPECT_TRUE(torch::allclose(weights, expected, 1e-5, 1e-6)) << mode.score_func << " k=" << k;
    }
  }
}

TEST(TopkGating, HalfTypesComputeInFloat) {
  torch::manual_seed(1);
  const auto logits = torch::randn({64, 16});
  for (const auto dtype : {torch::kBFloat16, torch::kHalf, torch::kDouble}) {
    const auto x = logits.to(dtype);
    const auto [weights, indices] = torchmoe::ops::topk_gating(x, 4);
    EXPECT_EQ(weights.scalar_type(), dtype);
    const auto ref_indices = std::get<1>(torch::sort(x.to(torch::kFloat), -1, true, /*stable=*/true));
    const auto top = ref_indices.slice(-1, 0, 4);
    EXPECT_TRUE(torch::equal(indices, top));
    const auto expected = torch::softmax(x.to(torch::kFloat).gather(-1, top), -1).to(dtype);
    EXPECT_TRUE(torch::allclose(weights.to(torch::kFloat), expected.to(torch::kFloat), 1.6e-2, 1e-3));
  }
}

TEST(TopkGating, BiasSelectsButDoesNotWeigh) {
  const auto logits = torch::randn({20, 8});
  auto bias = torch::zeros({8});
  bias[5] = 100.0;
  const auto [weights, indices] = torchmoe::ops::topk_gating(logits, 2, "sigmoid", false, bias);
  EXPECT_TRUE((indices.select(-1, 0) == 5).all().item<bool>());
  EXPECT_TRUE(torch::allclose(weights, torch::sigmoid(logits).gather(-1, indices)));
}

TEST(TopkGating, BackwardMatchesAtenComposite) {
  torch::manual_seed(2);
  for (const auto& mode : kModes) {
    const auto logits = torch::randn({30, 12}, torch::kDouble).requires_grad_();
    const auto grad_w = torch::randn({30, 3}, torch::kDouble);
    const auto [weights, indices] =
        torchmoe::ops::topk_gating(logits, 3, mode.score_func, mode.renormalize, std::nullopt, 1, 1, 0.8);
    EXPECT_FALSE(indices.requires_grad());
    const auto grad = torch::autograd::grad({weights}, {logits}, {grad_w})[0];

    const auto ref_indices = std::get<1>(torch::topk(logits.detach(), 3, -1));
    const auto expected_w = composite_weights(logits, ref_indices, mode.score_func, mode.renormalize, 0.8);
    const auto expected = torch::autograd::grad({expected_w}, {logits}, {grad_w})[0];
    EXPECT_TRUE(torch::allclose(grad, expected, 1e-10, 1e-12)) << mode.score_func << " " << mode.renormalize;
    // Only softmax without renormalization couples every expert.
    const auto touched = (grad != 0).sum(-1);
    if (std::string(mode.score_func) == "softmax" && !mode.renormalize) {
      EXPECT_TRUE((touched == 12).all().item<bool>());
    } else {
      EXPECT_TRUE((touched <= 3).all().item<bool>());
    }
  }
}

TEST(TopkGating, EmptyInput) {
  const auto logits = torch::randn({0, 8});
  const auto [weights, indices] = torchmoe::ops::topk_gating(logits, 2);
  EXPECT_EQ(weights.sizes(), torch::IntArrayRef({0, 2}));
  EXPECT_EQ(indices.sizes(), torch::IntArrayRef({0, 2}));
}

TEST(TopkGating, BadArgumentsThrow) {
  const auto logits = torch::randn({4, 8});
  EXPECT_THROW(torchmoe::ops::topk_gating(logits, 0), c10::Error);
  EXPECT_THROW(torchmoe::ops::topk_gating(logits, 9), c10::Error);
  EXPECT_THROW(torchmoe::ops::topk_gating(logits, 2, "relu"), c10::Error);
  EXPECT_THROW(torchmoe::ops::topk_gating(logits, 2, "softmax", true, torch::zeros({7})), c10::Error);
  EXPECT_THROW(torchmoe::ops::topk_gating(logits, 2, "softmax", true, std::nullopt, 3), c10::Error);
  try {
    torchmoe::ops::topk_gating(logits, 5, "softmax", true, std::nullopt, 4, 2);
    FAIL() << "k larger than the eligible experts was accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("argument 'k'"), std::string::npos) << e.what();
  }
  const auto indices = torch::full({4, 2}, 8, torch::kLong);
  EXPECT_THROW(torchmoe::ops::detail::_topk_gating_backward(torch::ones({4, 2}), logits, indices, "softmax", true, 1.0),
               c10::Error);
}

}  // namespace
