// router_logits through the dispatcher (torchmoe::ops::router_logits) against the float64 product, a token's
// logits alone and in a batch, the gradients through torch::autograd::grad, and bad inputs.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "torchmoe.h"

TEST(RouterLogits, MatchesTheProductForEveryStorageDtype) {
  torch::manual_seed(0);
  for (auto x_dtype : {torch::kFloat, torch::kBFloat16, torch::kHalf}) {
    for (auto w_dtype : {torch::kFloat, torch::kBFloat16, torch::kHalf}) {
      auto x = torch::randn({19, 300}).to(x_dtype);
      auto weight = torch::randn({40, 300}).to(w_dtype);
      auto logits = torchmoe::ops::router_logits(x, weight);
      ASSERT_EQ(logits.scalar_type(), torch::kFloat);
      ASSERT_EQ(logits.sizes(), (std::vector<int64_t>{19, 40}));
      auto exact = torch::mm(x.to(torch::kDouble), weight.to(torch::kDouble).t());
      EXPECT_TRUE(torch::allclose(logits.to(torch::kDouble), exact, 1e-5, 1e-4));
      // a token alone gets the bits it gets in the batch
      EXPECT_TRUE(torch::equal(torchmoe::ops::router_logits(x.slice(0, 7, 8), weight), logits.slice(0, 7, 8)));
    }
  }
}

TEST(RouterLogits, Gradients) {
  torch::manual_seed(0);
  auto x = torch::randn({5, 12}, torch::kDouble).requires_grad_(true);
  auto weight = torch::randn({3, 12}, torch::kDouble).requires_grad_(true);
  auto grad = torch::randn({5, 3}, torch::kDouble);
  auto grads = torch::autograd::grad({torchmoe::ops::router_logits(x, weight)}, {x, weight}, {grad});
  EXPECT_TRUE(torch::allclose(grads[0], torch::mm(grad, weight)));
  EXPECT_TRUE(torch::allclose(grads[1], torch::mm(grad.t(), x)));
}

TEST(RouterLogits, EmptyAndBadInputs) {
  EXPECT_EQ(torchmoe::ops::router_logits(torch::zeros({0, 8}), torch::zeros({4, 8})).sizes(),
            (std::vector<int64_t>{0, 4}));
  EXPECT_TRUE(torch::equal(torchmoe::ops::router_logits(torch::zeros({2, 0}), torch::zeros({4, 0})),
                           torch::zeros({2, 4})));
  auto x = torch::randn({4, 8});
  EXPECT_THROW(torchmoe::ops::router_logits(x, torch::randn({3, 7})), c10::Error);
  EXPECT_THROW(torchmoe::ops::router_logits(x, torch::randn({8})), c10::Error);
  EXPECT_THROW(torchmoe::ops::router_logits(x.to(torch::kLong), torch::randn({3, 8})), c10::Error);
}
