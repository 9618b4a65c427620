// torchmoe::ops::_moe_forward (the dropless layer's inference forward in one call) against the public ops composed
// in the same order, float and int4 experts, and bad arguments.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "torchmoe.h"

namespace {

using torchmoe::ops::_moe_forward;

struct Layer {
  int64_t T = 13, d = 32, d_ff = 64, E = 6, k = 2;
  torch::Tensor x = torch::randn({T, d});
  torch::Tensor router = torch::randn({E, d});
  torch::Tensor gate = torch::randn({E, d, d_ff}) / 8;
  torch::Tensor up = torch::randn({E, d, d_ff}) / 8;
  torch::Tensor down = torch::randn({E, d_ff, d}) / 8;
};

}  // namespace

TEST(MoeForward, EqualsThePublicOpsComposed) {
  torch::manual_seed(0);
  Layer l;
  auto [y, weights, indices, logits, counts] =
      _moe_forward(l.x, l.router, std::nullopt, l.k, "softmax", true, 1, 1, 1.0, "swiglu", l.gate, l.up, l.down);
  auto expected_logits = torchmoe::ops::router_logits(l.x, l.router);
  auto [w, idx] = torchmoe::ops::topk_gating(expected_logits, l.k, "softmax", true, std::nullopt, 1, 1, 1.0);
  auto [dest, cnt] = torchmoe::ops::route_plan(idx, l.E, -1);
  auto rows = torchmoe::ops::dispatch(l.x, dest, l.T * l.k);
  auto hidden = torchmoe::ops::swiglu(torchmoe::ops::grouped_mm(rows, l.gate, cnt),
                                      torchmoe::ops::grouped_mm(rows, l.up, cnt));
  auto expected = torchmoe::ops::combine(torchmoe::ops::grouped_mm(hidden, l.down, cnt), dest, w);
  EXPECT_TRUE(torch::equal(y, expected));
  EXPECT_TRUE(torch::equal(weights, w));
  EXPECT_TRUE(torch::equal(indices, idx));
  EXPECT_TRUE(torch::equal(logits, expected_logits));
  EXPECT_TRUE(torch::equal(counts, cnt));
  EXPECT_EQ(counts.sum().item<int64_t>(), l.T * l.k);
}

TEST(MoeForward, QuantizedExpertsEqualTheQuantizedOps) {
  torch::manual_seed(1);
  Layer l;
  auto x = l.x.to(torch::kBFloat16);
  // Random int4 codes (two per byte, group 16) with zero points, in relu experts: no gate_proj.
  auto up = torch::randint(0, 256, {l.E, l.d / 2, l.d_ff}, torch::kByte);
  auto down = torch::randint(0, 256, {l.E, l.d_ff / 2, l.d}, torch::kByte);
  auto up_scales = torch::rand({l.E, l.d / 16, l.d_ff}) * 0.05;
  auto down_scales = torch::rand({l.E, l.d_ff / 16, l.d}) * 0.05;
  auto up_zeros = torch::randint(0, 16, {l.E, l.d / 16, l.d_ff}, torch::kByte);
  auto down_zeros = torch::randint(0, 16, {l.E, l.d_ff / 16, l.d}, torch::kByte);
  auto [y, weights, indices, logits, counts] =
      _moe_forward(x, l.router, std::nullopt, l.k, "softmax", true, 1, 1, 1.0, "relu", std::nullopt, up, down, 4,
                   {std::nullopt, up_scales, down_scales}, {std::nullopt, up_zeros, down_zeros}, {0, 16, 16});
  auto [w, idx] = torchmoe::ops::topk_gating(torchmoe::ops::router_logits(x, l.router), l.k, "softmax", true,
                                            std::nullopt, 1, 1, 1.0);
  auto [dest, cnt] = torchmoe::ops::route_plan(idx, l.E, -1);
  auto rows = torchmoe::ops::dispatch(x, dest, l.T * l.k);
  auto hidden = torchmoe::ops::grouped_mm_quantized(rows, up, up_scales, up_zeros, cnt, 4, 16).relu();
  auto expected = torchmoe::ops::combine(
      torchmoe::ops::grouped_mm_quantized(hidden, down, down_scales, down_zeros, cnt, 4, 16), dest, w);
  EXPECT_EQ(y.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::equal(y, expected));
  EXPECT_TRUE(torch::equal(indices, idx));
  EXPECT_TRUE(torch::equal(counts, cnt));
  EXPECT_THROW(_moe_forward(x, l.router, std::nullopt, l.k, "softmax", true, 1, 1, 1.0, "relu", std::nullopt, up,
                            down, 4, {std::nullopt, up_scales}, {std::nullopt, up_zeros}, {0, 16}),
               c10::Error);  // one entry per weight: (gate, up, down)
}

TEST(MoeForward, BadArgumentsNameThemselves) {
  torch::manual_seed(2);
  Layer l;
  auto message = [&](auto&& call) {
    try {
      call();
    } catch (const c10::Error& e) {
      return std::string(e.what_without_backtrace());
    }
    return std::string("no error");
  };
  EXPECT_NE(message([&] {
              _moe_forward(l.x, l.router, std::nullopt, l.k, "softmax", true, 1, 1, 1.0, "tanh", l.gate, l.up,
                           l.down);
            }).find("activation"),
            std::string::npos);
  EXPECT_NE(message([&] {
              _moe_forward(l.x, l.router.slice(1, 1), std::nullopt, l.k, "softmax", true, 1, 1, 1.0,
                           "swiglu", l.gate, l.up, l.down);
            }).find("router_weight"),
            std::string::npos);
  EXPECT_NE(message([&] {
              _moe_forward(l.x, l.router, std::nullopt, l.k, "softmax", true, 1, 1, 1.0, "relu", l.gate, l.up,
                           l.down);
            }).find("gate_proj"),
            std::string::npos);
  EXPECT_NE(message([&] {
              _moe_forward(l.x, l.router, std::nullopt, l.k, "softmax", true, 1, 1, 1.0, "swiglu", l.gate, l.up,
                           l.down, 3);
            }).find("bits"),
            std::string::npos);
  EXPECT_NE(message([&] {
              _moe_forward(l.x.unsqueeze(0), l.router, std::nullopt, l.k, "softmax", true, 1, 1, 1.0, "swiglu",
                           l.gate, l.up, l.down);
            }).find("'x'"),
            std::string::npos);
}
