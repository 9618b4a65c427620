// grouped_mm through the dispatcher (torchmoe::ops::grouped_mm) against per-expert at::mm, its backward
// through torch::autograd::grad, and bad inputs.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <vector>

#include "torchmoe.h"

namespace {

at::Tensor per_expert_mm(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& counts) {
  std::vector<at::Tensor> outs;
  int64_t row = 0;
  for (size_t e = 0; e < counts.size(); ++e) {
    outs.push_back(at::mm(x.narrow(0, row, counts[e]), w[e]));
    row += counts[e];
  }
  return at::cat(outs, 0);
}

at::Tensor counts_tensor(const std::vector<int64_t>& counts) {
  return torch::tensor(counts, torch::kLong);
}

int64_t total(const std::vector<int64_t>& counts) {
  int64_t n = 0;
  for (auto c : counts) n += c;
  return n;
}

}  // namespace

TEST(GroupedMM, MatchesPerExpertMatmul) {
  torch::manual_seed(0);
  for (const auto& counts : std::vector<std::vector<int64_t>>{{5}, {3, 0, 4}, {300, 1, 0, 257}, {0, 0, 0}}) {
    const int64_t n = total(counts);
    auto x = torch::randn({n, 24});
    auto w = torch::randn({static_cast<int64_t>(counts.size()), 24, 17});
    auto out = torchmoe::ops::grouped_mm(x, w, counts_tensor(counts));
    ASSERT_EQ(out.sizes(), (std::vector<int64_t>{n, 17}));
    EXPECT_TRUE(torch::allclose(out, per_expert_mm(x, w, counts), 1e-4, 1e-5));
  }
}

// float32 shapes crossing the blocked GEMM's edges (256-deep reduction blocks, 240-row and 1024-column
// blocks, 12 x 32 tiles), forward and backward, against float64 per-expert matmuls.
TEST(GroupedMM, Float32BlockEdges) {
  torch::manual_seed(4);
  const std::vector<int64_t> counts{245, 0, 13, 300};
  const int64_t n = total(counts);
  auto x = torch::randn({n, 300}).requires_grad_(true);
  auto w = torch::randn({4, 300, 1030}).requires_grad_(true);
  auto grad = torch::randn({n, 1030});
  auto out = torchmoe::ops::grouped_mm(x, w, counts_tensor(counts));
  auto grads = torch::autograd::grad({out}, {x, w}, {grad});
  auto x64 = x.detach().to(torch::kDouble).requires_grad_(true);
  auto w64 = w.detach().to(torch::kDouble).requires_grad_(true);
  auto expected = per_expert_mm(x64, w64, counts);
  auto expected_grads = torch::autograd::grad({expected}, {x64, w64}, {grad.to(torch::kDouble)});
  EXPECT_TRUE(torch::allclose(out.to(torch::kDouble), expected, 1e-4, 2e-3));
  EXPECT_TRUE(torch::allclose(grads[0].to(torch::kDouble), expected_grads[0], 1e-4, 2e-3));
  EXPECT_TRUE(torch::allclose(grads[1].to(torch::kDouble), expected_grads[1], 1e-4, 2e-3));
  EXPECT_TRUE(grads[1][1].eq(0).all().item<bool>());
}

TEST(GroupedMM, DoubleAndBFloat16) {
  torch::manual_seed(1);
  const std::vector<int64_t> counts{40, 0, 90, 7};
  auto x = torch::randn({137, 16}, torch::kDouble);
  auto w = torch::randn({4, 16, 8}, torch::kDouble);
  auto expected = per_expert_mm(x, w, counts);
  EXPECT_TRUE(torch::allclose(torchmoe::ops::grouped_mm(x, w, counts_tensor(counts)), expected, 1e-12, 1e-12));
  auto out_bf16 = torchmoe::ops::grouped_mm(x.to(torch::kBFloat16), w.to(torch::kBFloat16), counts_tensor(counts));
  EXPECT_EQ(out_bf16.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::allclose(out_bf16.to(torch::kDouble), expected, 3e-2, 1e-1));
}

TEST(GroupedMM, BackwardMatchesPerExpertMatmul) {
  torch::manual_seed(2);
  const std::vector<int64_t> counts{6, 0, 11, 3};
  auto x = torch::randn({20, 9}, torch::requires_grad());
  auto w = torch::randn({4, 9, 5}, torch::requires_grad());
  auto grad = torch::randn({20, 5});
  auto ours = torch::autograd::grad({torchmoe::ops::grouped_mm(x, w, counts_tensor(counts))}, {x, w}, {grad});
  auto ref = torch::autograd::grad({per_expert_mm(x, w, counts)}, {x, w}, {grad});
  EXPECT_TRUE(torch::allclose(ours[0], ref[0], 1e-4, 1e-5));
  EXPECT_TRUE(torch::allclose(ours[1], ref[1], 1e-4, 1e-5));
  EXPECT_TRUE(torch::all(ours[1][1] == 0).item<bool>());  // the expert without rows
}

// Experts with 1..16 rows run the skinny kernels (output and grad_x), next to GEMM experts in the same call;
// float32, bfloat16 and float16 against float64 per-expert matmuls, and bitwise the same on 1 and 2 threads.
TEST(GroupedMM, SkinnyExpertsAllDtypes) {
  torch::manual_seed(5);
  const std::vector<int64_t> counts{1, 0, 2, 16, 17, 5, 3};
  const int64_t n = total(counts);
  auto x = torch::randn({n, 67}, torch::kDouble);
  auto w = torch::randn({7, 67, 131}, torch::kDouble);
  auto grad = torch::randn({n, 131}, torch::kDouble);
  for (auto dtype : {torch::kFloat, torch::kBFloat16, torch::kHalf}) {
    auto xd = x.to(dtype).requires_grad_(true);
    auto wd = w.to(dtype).requires_grad_(true);
    auto x64 = xd.detach().to(torch::kDouble).requires_grad_(true);
    auto w64 = wd.detach().to(torch::kDouble).requires_grad_(true);
    auto expected = per_expert_mm(x64, w64, counts);
    auto expected_grad_x = torch::autograd::grad({expected}, {x64}, {grad.to(dtype).to(torch::kDouble)})[0];
    const double rtol = dtype == torch::kFloat ? 1e-5 : dtype == torch::kBFloat16 ? 1.0 / 256 : 1.0 / 2048;
    std::vector<at::Tensor> runs;
    for (int threads : {1, 2}) {
      at::set_num_threads(threads);
      auto out = torchmoe::ops::grouped_mm(xd, wd, counts_tensor(counts));
      auto grad_x = torch::autograd::grad({out}, {xd}, {grad.to(dtype)})[0];
      EXPECT_EQ(out.scalar_type(), dtype);
      EXPECT_TRUE(torch::allclose(out.to(torch::kDouble), expected, rtol, 1e-3));
      EXPECT_TRUE(torch::allclose(grad_x.to(torch::kDouble), expected_grad_x, rtol, 1e-3));
      runs.push_back(out);
      runs.push_back(grad_x);
    }
    EXPECT_TRUE(torch::equal(runs[0], runs[2]));
    EXPECT_TRUE(torch::equal(runs[1], runs[3]));
  }
}

TEST(GroupedMM, BadInputsThrow) {
  auto x = torch::randn({5, 4});
  auto w = torch::randn({2, 4, 3});
  EXPECT_THROW(torchmoe::ops::grouped_mm(x, w, torch::tensor({2, 2}, torch::kLong)), c10::Error);  // sum != N
  EXPECT_THROW(torchmoe::ops::grouped_mm(x, w, torch::tensor({-1, 6}, torch::kLong)), c10::Error);
  EXPECT_THROW(torchmoe::ops::grouped_mm(x, w.narrow(1, 0, 3), torch::tensor({2, 3}, torch::kLong)), c10::Error);
  try {
    torchmoe::ops::grouped_mm(x, w, torch::tensor({2, 3}, torch::kInt));
    FAIL() << "int32 counts accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("'counts'"), std::string::npos) << e.what();
  }
}
