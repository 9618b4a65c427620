// grouped_mm_quantized through the dispatcher (torchmoe::ops::grouped_mm_quantized) against grouped_mm on the
// dequantized weight (ops/common/dequantize.h), its gradient w.r.t. x through torch::autograd::grad, and bad inputs.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <optional>
#include <vector>

#include "ops/common/dequantize.h"
#include "torchmoe.h"

namespace {

struct Packed {
  at::Tensor qweight, scales;
  std::optional<at::Tensor> zeros;
  int64_t bits, group_size;
};

// Random codes in the packed layout (not a quantization of anything: the op must compute with whatever it gets).
Packed random_packed(int64_t experts, int64_t d_in, int64_t d_out, int64_t bits, int64_t group_size, bool zeros) {
  Packed p{};
  p.bits = bits;
  p.group_size = group_size;
  if (bits == 8) {
    p.qweight = torch::randint(-127, 128, {experts, d_in, d_out}, torch::kChar);
  } else {
    p.qweight = torch::randint(0, 256, {experts, d_in / 2, d_out}, torch::kByte);
  }
  p.scales = torch::rand({experts, d_in / group_size, d_out}) * 0.1 + 0.01;
  if (zeros) p.zeros = torch::randint(0, 16, {experts, d_in / group_size, d_out}, torch::kByte);
  return p;
}

}  // namespace

TEST(GroupedMMQuantized, MatchesGroupedMMOnDequantizedWeight) {
  torch::manual_seed(0);
  struct Case { int64_t bits, group_size; bool zeros; };
  for (const Case c : {Case{8, 64, false}, Case{4, 32, false}, Case{4, 16, true}}) {
    for (const auto& counts : std::vector<std::vector<int64_t>>{{1, 0, 3}, {40, 2, 100}, {0, 0, 0}}) {
      int64_t n = 0;
      for (auto v : counts) n += v;
      auto p = random_packed(3, 64, 40, c.bits, c.group_size, c.zeros);
      auto x = torch::randn({n, 64});
      auto cnt = torch::tensor(counts, torch::kLong);
      auto out = torchmoe::ops::grouped_mm_quantized(x, p.qweight, p.scales, p.zeros, cnt, p.bits, p.group_size);
      auto w = torchmoe::ops::dequantize_weight(p.qweight, p.scales, p.zeros, p.bits, p.group_size, at::kDouble);
      auto expected = torchmoe::ops::grouped_mm(x.to(at::kDouble), w, cnt);
      ASSERT_EQ(out.sizes(), (std::vector<int64_t>{n, 40}));
      EXPECT_TRUE(torch::allclose(out.to(at::kDouble), expected, 1e-4, 1e-4)) << "bits " << c.bits;
    }
  }
}

// bfloat16 activations, 1 to 130 rows per expert: the skinny kernel, AMX (8 or 12 to 128 rows, where the CPU has
// it) and the panels. Products of bfloat16 values and codes are exact; the sums and the rounding differ.
TEST(GroupedMMQuantized, BFloat16AcrossRowCounts) {
  torch::manual_seed(2);
  struct Case { int64_t bits, group_size; bool zeros; };
  for (const Case c : {Case{8, 128, false}, Case{4, 32, false}, Case{4, 64, true}}) {
    const std::vector<int64_t> counts{1, 8, 12, 0, 40, 128, 130};
    int64_t n = 0;
    for (auto v : counts) n += v;
    auto p = random_packed(7, 128, 100, c.bits, c.group_size, c.zeros);
    auto x = torch::randn({n, 128}).to(at::kBFloat16);
    auto cnt = torch::tensor(counts, torch::kLong);
    auto out = torchmoe::ops::grouped_mm_quantized(x, p.qweight, p.scales, p.zeros, cnt, p.bits, p.group_size);
    auto w = torchmoe::ops::dequantize_weight(p.qweight, p.scales, p.zeros, p.bits, p.group_size, at::kDouble);
    auto expected = torchmoe::ops::grouped_mm(x.to(at::kDouble), w, cnt);
    ASSERT_EQ(out.scalar_type(), at::kBFloat16);
    const double scale = expected.abs().max().item<double>();
    EXPECT_LE((out.to(at::kDouble) - expected).abs().max().item<double>(), 2e-2 * scale) << "bits " << c.bits;
  }
}

TEST(GroupedMMQuantized, GradientWithRespectToX) {
  torch::manual_seed(1);
  auto p = random_packed(2, 32, 8, 4, 16, true);
  auto x = torch::randn({7, 32}, torch::requires_grad());
  auto cnt = torch::tensor(std::vector<int64_t>{3, 4}, torch::kLong);
  auto out = torchmoe::ops::grouped_mm_quantized(x, p.qweight, p.scales, p.zeros, cnt, 4, 16);
  auto grad = torch::randn({7, 8});
  auto gx = torch::autograd::grad({out}, {x}, {grad})[0];
  auto w = torchmoe::ops::dequantize_weight(p.qweight, p.scales, p.zeros, 4, 16, at::kFloat);
  auto expected = torch::cat({at::mm(grad.narrow(0, 0, 3), w[0].t()), at::mm(grad.narrow(0, 3, 4), w[1].t())}, 0);
  EXPECT_TRUE(torch::allclose(gx, expected, 1e-4, 1e-5));
}

TEST(GroupedMMQuantized, BadInputNamesTheArgument) {
  auto p = random_packed(2, 32, 8, 4, 16, false);
  auto x = torch::randn({5, 32});
  auto cnt = torch::tensor(std::vector<int64_t>{2, 3}, torch::kLong);
  auto expect_arg = [](const std::function<void()>& call, const std::string& arg) {
    try {
      call();
      ADD_FAILURE() << "no error for " << arg;
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what()).find("argument '" + arg + "'"), std::string::npos) << e.what();
    }
  };
  expect_arg([&] { torchmoe::ops::grouped_mm_quantized(x, p.qweight, p.scales, std::nullopt, cnt, 5, 16); }, "bits");
  expect_arg([&] { torchmoe::ops::grouped_mm_quantized(x, p.qweight, p.scales, std::nullopt, cnt, 4, 12); },
             "group_size");
  expect_arg([&] { torchmoe::ops::grouped_mm_quantized(torch::randn({5, 30}), p.qweight, p.scales, std::nullopt, cnt,
                                                       4, 16); }, "x");
  expect_arg([&] { torchmoe::ops::grouped_mm_quantized(x, p.qweight, p.scales.narrow(2, 0, 4), std::nullopt, cnt, 4,
                                                       16); }, "scales");
  expect_arg([&] { torchmoe::ops::grouped_mm_quantized(x, p.qweight, p.scales, std::nullopt,
                                                       torch::tensor(std::vector<int64_t>{2, 2}, torch::kLong), 4,
                                                       16); }, "counts");
}
