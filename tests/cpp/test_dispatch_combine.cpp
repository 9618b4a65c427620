// dispatch / combine through the C++ API against index_select / index_add / index_copy compositions.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>

#include "torchmoe.h"

namespace {

struct Plan {
  torch::Tensor dest;   // [N, k], -1 for dropped slots, no row used twice
  torch::Tensor token;  // token of each kept slot
  torch::Tensor row;    // row of each kept slot
  torch::Tensor kept;   // [N, k] bool
  int64_t num_rows;
};

// Random dest: a permutation of the rows, with about a quarter of the slots dropped.
Plan make_plan(int64_t N, int64_t k, int64_t num_rows, uint64_t seed) {
  torch::manual_seed(seed);
  auto perm = torch::randperm(num_rows, torch::kLong).slice(0, 0, N * k).view({N, k});
  auto kept = torch::rand({N, k}) > 0.25;
  auto dest = torch::where(kept, perm, torch::full_like(perm, -1));
  auto token = torch::arange(N, torch::kLong).repeat_interleave(k).masked_select(kept.view(-1));
  return {dest, token, dest.masked_select(kept), kept, num_rows};
}

torch::Tensor expected_dispatch(const torch::Tensor& x, const Plan& p) {
  return torch::zeros({p.num_rows, x.size(1)}, x.options()).index_copy_(0, p.row, x.index_select(0, p.token));
}

torch::Tensor expected_combine(const torch::Tensor& e, const torch::Tensor& w, const Plan& p) {
  auto e32 = e.to(torch::kFloat);
  auto wk = w.to(torch::kFloat).masked_select(p.kept).unsqueeze(1);
  auto y = torch::zeros({p.dest.size(0), e.size(1)}, e32.options());
  return y.index_add_(0, p.token, e32.index_select(0, p.row) * wk).to(e.scalar_type());
}

TEST(DispatchCombine, DispatchMatchesIndexCopy) {
  for (auto dtype : {torch::kFloat, torch::kDouble, torch::kBFloat16, torch::kHalf}) {
    auto p = make_plan(97, 2, 250, 1);
    auto x = torch::randn({97, 33}).to(dtype);
    EXPECT_TRUE(torch::equal(torchmoe::ops::dispatch(x, p.dest, p.num_rows), expected_dispatch(x, p))) << dtype;
  }
}

TEST(DispatchCombine, CombineMatchesIndexAdd) {
  auto p = make_plan(120, 4, 600, 2);
  auto e = torch::randn({600, 70});
  auto w = torch::rand({120, 4});
  EXPECT_TRUE(torch::allclose(torchmoe::ops::combine(e, p.dest, w), expected_combine(e, w, p), 1e-5, 1e-6));
  // bfloat16 rows with float32 weights: float32 accumulation, bfloat16 result.
  auto eb = e.to(torch::kBFloat16);
  auto y = torchmoe::ops::combine(eb, p.dest, w);
  EXPECT_EQ(y.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::allclose(y.to(torch::kFloat), expected_combine(eb, w, p).to(torch::kFloat), 1e-2, 1e-2));
}

TEST(DispatchCombine, NonContiguousInputs) {
  auto p = make_plan(50, 2, 100, 3);
  auto x = torch::randn({16, 50}).t();
  EXPECT_FALSE(x.is_contiguous());
  EXPECT_TRUE(torch::equal(torchmoe::ops::dispatch(x, p.dest, 100), expected_dispatch(x.contiguous(), p)));
  auto e = torch::randn({100, 20}).slice(1, 0, 20, 2);
  auto w = torch::rand({2, 50}).t();
  EXPECT_TRUE(torch::allclose(torchmoe::ops::combine(e, p.dest, w), expected_combine(e, w, p), 1e-5, 1e-6));
}

TEST(DispatchCombine, BackwardThroughAutograd) {
  auto p = make_plan(64, 2, 150, 4);
  const int64_t d = 24;
  auto x = torch::randn({64, d}, torch::dtype(torch::kDouble).requires_grad(true));
  auto w = torch::rand({64, 2}, torch::dtype(torch::kDouble).requires_grad(true));
  auto e = torchmoe::ops::dispatch(x, p.dest, p.num_rows);
  auto h = e * e;  // something between the two ops, so the gradient of e depends on e
  auto y = torchmoe::ops::combine(h, p.dest, w);
  auto cot = torch::randn({64, d}, torch::kDouble);
  auto grads = torch::autograd::grad({y}, {x, w, e}, {cot}, /*retain_graph=*/true);

  auto wk = w.detach().masked_select(p.kept).unsqueeze(1);
  auto cot_tok = cot.index_select(0, p.token);
  // d h = combine's grad w.r.t. its rows; d e = 2 e d h; d x = sum over slots of d e at the slot's row.
  auto dh = torch::zeros({p.num_rows, d}, torch::kDouble).index_copy_(0, p.row, cot_tok * wk);
  auto de = 2 * e.detach() * dh;
  auto dx = torch::zeros({64, d}, torch::kDouble).index_add_(0, p.token, de.index_select(0, p.row));
  auto dw_kept = (cot_tok * h.detach().index_select(0, p.row)).sum(1);
  auto dw = torch::zeros({64, 2}, torch::kDouble).masked_scatter_(p.kept, dw_kept);
  EXPECT_TRUE(torch::allclose(grads[2], de));
  EXPECT_TRUE(torch::allclose(grads[0], dx));
  EXPECT_TRUE(torch::allclose(grads[1], dw));
}

TEST(DispatchCombine, BackwardOpsDirectly) {
  auto p = make_plan(30, 3, 120, 5);
  auto g = torch::randn({120, 8});
  auto dx = torchmoe::ops::detail::_dispatch_backward(g, p.dest);
  auto expect = torch::zeros({30, 8}).index_add_(0, p.token, g.index_select(0, p.row));
  EXPECT_TRUE(torch::allclose(dx, expect, 1e-6, 1e-6));

  auto go = torch::randn({30, 8});
  auto e = torch::randn({120, 8});
  auto w = torch::rand({30, 3}, torch::kDouble);  // weights keep their own dtype in the gradient
  auto [ge, gw] = torchmoe::ops::detail::_combine_backward(go, e, p.dest, w);
  EXPECT_EQ(ge.scalar_type(), torch::kFloat);
  EXPECT_EQ(gw.scalar_type(), torch::kDouble);
  auto wk = w.to(torch::kFloat).masked_select(p.kept).unsqueeze(1);
  auto ge_expect = torch::zeros({120, 8}).index_copy_(0, p.row, go.index_select(0, p.token) * wk);
  auto gw_kept = (go.index_select(0, p.token) * e.index_select(0, p.row)).sum(1);
  auto gw_expect = torch::zeros({30, 3}).masked_scatter_(p.kept, gw_kept);
  EXPECT_TRUE(torch::allclose(ge, ge_expect, 1e-6, 1e-6));
  EXPECT_TRUE(torch::allclose(gw.to(torch::kFloat), gw_expect, 1e-5, 1e-5));
}

TEST(DispatchCombine, EmptyInputs) {
  auto dest = torch::empty({0, 2}, torch::kLong);
  auto out = torchmoe::ops::dispatch(torch::randn({0, 5}), dest, 4);
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{4, 5}));
  EXPECT_TRUE(torch::equal(out, torch::zeros({4, 5})));
  auto y = torchmoe::ops::combine(out, dest, torch::rand({0, 2}));
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{0, 5}));
}

TEST(DispatchCombine, MetaShapes) {
  auto meta = torch::TensorOptions().device(torch::kMeta);
  auto dest = torch::empty({10, 2}, meta.dtype(torch::kLong));
  auto out = torchmoe::ops::dispatch(torch::empty({10, 6}, meta.dtype(torch::kHalf)), dest, 32);
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{32, 6}));
  EXPECT_EQ(out.scalar_type(), torch::kHalf);
  auto y = torchmoe::ops::combine(out, dest, torch::empty({10, 2}, meta.dtype(torch::kFloat)));
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{10, 6}));
  EXPECT_EQ(y.scalar_type(), torch::kHalf);
}

void expect_error_naming(const std::function<void()>& f, const std::string& what) {
  try {
    f();
    ADD_FAILURE() << "expected an error naming " << what;
  } catch (const c10::Error& err) {
    EXPECT_NE(std::string(err.what()).find(what), std::string::npos) << err.what();
  }
}

TEST(DispatchCombine, BadInputsThrow) {
  auto x = torch::randn({3, 4});
  auto dest = torch::tensor({0, 3, 1, -1, 2, 4}, torch::kLong).view({3, 2});
  expect_error_naming([&] { torchmoe::ops::dispatch(x, dest, 4); }, "'dest'");  // 4 is out of range
  auto dup = torch::tensor({0, 3, 1, -1, 3, 4}, torch::kLong).view({3, 2});
  expect_error_naming([&] { torchmoe::ops::dispatch(x, dup, 5); }, "duplicate");
  expect_error_naming([&] { torchmoe::ops::dispatch(x, dest, -1); }, "'num_rows'");
  expect_error_naming([&] { torchmoe::ops::dispatch(x.to(torch::kInt), dest, 5); }, "'x'");
  expect_error_naming([&] { torchmoe::ops::combine(torch::randn({5, 4}), dest, torch::rand({3, 3})); },
                      "'weights'");
}

}  // namespace
