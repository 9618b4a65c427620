// The library registers every op with the dispatcher and TorchScript sees them.
#include <gtest/gtest.h>
#include <torch/csrc/jit/runtime/operator.h>
#include <torch/torch.h>

#include "torchmoe.h"

TEST(Library, EveryOpIsVisibleToTorchScript) {
  for (const char* name : {"torchmoe::topk_gating", "torchmoe::route_plan", "torchmoe::dispatch",
                           "torchmoe::combine", "torchmoe::grouped_mm", "torchmoe::grouped_mm_quantized",
                           "torchmoe::_moe_forward"}) {
    auto ops = torch::jit::getAllOperatorsFor(c10::Symbol::fromQualString(name));
    EXPECT_EQ(ops.size(), 1u) << name;
  }
}
