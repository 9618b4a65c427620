// torchmoe::ops::route_plan from C++ against an expectation composed of ATen ops (one-hot + cumsum).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>

#include "torchmoe.h"

namespace {

// Rank-major one-hot queue (all first choices, then all second choices, ...), positions from its cumsum.
std::tuple<at::Tensor, at::Tensor> composed_plan(const at::Tensor& indices, int64_t E, int64_t capacity) {
  const at::Tensor idx = indices.to(torch::kLong);
  const int64_t T = idx.size(0), k = idx.size(1);
  const at::Tensor one_hot = torch::one_hot(idx.t().reshape({-1}), E);  // [k * T, E]
  const at::Tensor pos = ((one_hot.cumsum(0) - 1) * one_hot).sum(1).view({k, T}).t();
  const at::Tensor counts = one_hot.sum(0);
  if (capacity >= 0) {
    return {torch::where(pos < capacity, idx * capacity + pos, torch::full_like(pos, -1)), counts};
  }
  const at::Tensor start = counts.cumsum(0) - counts;
  return {start.index({idx}) + pos, counts};
}

void expect_equal(const at::Tensor& got, const at::Tensor& want, const std::string& what) {
  ASSERT_EQ(got.scalar_type(), torch::kLong) << what;
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  EXPECT_TRUE(torch::equal(got, want)) << what;
}

}  // namespace

TEST(RoutePlan, MatchesOneHotCumsum) {
  torch::manual_seed(0);
  for (int64_t T : {1, 9, 500, 20000}) {
    for (int64_t E : {1, 3, 16, 64}) {
      for (int64_t k : {1, 2, 4}) {
        const at::Tensor idx = torch::randint(E, {T, k}, torch::kLong);
        for (int64_t cap : std::initializer_list<int64_t>{-1, 0, 1, T * k / E, T + 1}) {
          const std::string what = "T=" + std::to_string(T) + " E=" + std::to_string(E) + " k=" + std::to_string(k) +
                                   " capacity=" + std::to_string(cap);
          auto [want_dest, want_counts] = composed_plan(idx, E, cap);
          auto [dest, counts] = torchmoe::ops::route_plan(idx, E, cap);
          expect_equal(dest, want_dest, what);
          expect_equal(counts, want_counts, what);
          auto [dest32, counts32] = torchmoe::ops::route_plan(idx.to(torch::kInt), E, cap);
          expect_equal(dest32, want_dest, what + " int32");
          expect_equal(counts32, want_counts, what + " int32");
        }
      }
    }
  }
}

TEST(RoutePlan, GroupsAreIndependentQueues) {
  torch::manual_seed(1);
  const int64_t G = 3, T = 300, E = 8, k = 2, cap = 50;
  const at::Tensor idx = torch::randint(E, {G, T, k}, torch::kLong);
  auto [dest, counts] = torchmoe::ops::route_plan(idx, E, cap);
  ASSERT_EQ(counts.sizes(), (std::vector<int64_t>{G, E}));
  for (int64_t g = 0; g < G; ++g) {
    auto [want, want_counts] = composed_plan(idx[g], E, cap);
    // Single-group rows e * cap + pos become (e * G + g) * cap + pos.
    const at::Tensor pos = want - idx[g] * cap;
    const at::Tensor regrouped = torch::where(want >= 0, (idx[g] * G + g) * cap + pos, want);
    expect_equal(dest[g], regrouped, "group " + std::to_string(g));
    expect_equal(counts[g], want_counts, "counts of group " + std::to_string(g));
  }
}

TEST(RoutePlan, PriorityOrdersTheQueue) {
  // Highest priority first within a choice rank; capacity 1 keeps exactly the highest-priority token.
  const at::Tensor idx = torch::zeros({5, 1}, torch::kLong);
  const at::Tensor priority = torch::tensor({0.1, 0.7, 0.3, 0.7, -1.0});
  auto [dest, counts] = torchmoe::ops::route_plan(idx, 1, 1, priority);
  expect_equal(dest, torch::tensor({-1, 0, -1, -1, -1}, torch::kLong).view({5, 1}), "capacity 1");
  auto [rows, counts2] = torchmoe::ops::route_plan(idx, 1, -1, priority);
  expect_equal(rows, torch::tensor({3, 0, 2, 1, 4}, torch::kLong).view({5, 1}), "dropless");
  expect_equal(counts2, torch::tensor({5}, torch::kLong), "counts");
}

TEST(RoutePlan, RejectsBadInput) {
  at::Tensor idx = torch::zeros({4, 2}, torch::kLong);
  idx[2][1] = 7;
  try {
    torchmoe::ops::route_plan(idx, 7);
    FAIL() << "an expert id of 7 with 7 experts was accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("'indices'"), std::string::npos) << e.what();
  }
  EXPECT_THROW(torchmoe::ops::route_plan(torch::zeros({4, 2}, torch::kLong), 7, -2), c10::Error);
  EXPECT_THROW(torchmoe::ops::route_plan(torch::zeros({4, 2}, torch::kLong), 0), c10::Error);
  EXPECT_THROW(torchmoe::ops::route_plan(torch::zeros({4}, torch::kLong), 3), c10::Error);
}

// Many threads cut every group into several chunks counted in parallel: bad ids in different chunks and
// groups must raise (not write out of bounds) naming the first one in memory order, for int32 and int64,
// dropless and with capacity, with and without priority.
TEST(RoutePlan, RejectsBadIdsInEveryChunkOnManyThreads) {
  const int old_threads = at::get_num_threads();
  for (const auto dtype : {torch::kInt, torch::kLong}) {
    at::Tensor idx = torch::randint(0, 8, {3, 30000, 2}, torch::TensorOptions().dtype(dtype));
    idx[2][29000][0] = 9;
    idx[2][100][1] = -1;
    idx[1][20000][1] = 1 << 30;
    idx[1][5][1] = 8;
    const at::Tensor priority = torch::randn({3, 30000});
    for (const int threads : {1, 3, 16}) {
      at::set_num_threads(threads);
      for (const int64_t capacity : {int64_t{-1}, int64_t{0}, int64_t{10}}) {
        for (const bool with_priority : {false, true}) {
          try {
            torchmoe::ops::route_plan(idx, 8, capacity,
                                      with_priority ? std::optional<at::Tensor>(priority) : std::nullopt);
            ADD_FAILURE() << "bad expert ids were accepted";
          } catch (const c10::Error& e) {
            EXPECT_NE(std::string(e.what()).find("got 8 at [1, 5, 1]"), std::string::npos) << e.what();
          }
        }
      }
    }
  }
  at::set_num_threads(old_threads);
}
