// Deploying from C++: a TorchScript model saved from Python (torch::jit::load) and an AOTInductor package
// (torch::inductor::AOTIModelPackageLoader) run in a C++ program linked against libtorchmoe and give the
// outputs Python computed eagerly, at two batch sizes (the package was exported with a dynamic batch).
// The artifacts come from tests/cpp/deploy/make_artifacts.py (a ctest fixture); their folder is in
// TORCHMOE_DEPLOY_ARTIFACTS.
#include <gtest/gtest.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <cstdlib>
#include <string>

namespace {

std::string artifact(const std::string& name) {
  const char* dir = std::getenv("TORCHMOE_DEPLOY_ARTIFACTS");
  if (dir == nullptr || *dir == '\0') {
    ADD_FAILURE() << "TORCHMOE_DEPLOY_ARTIFACTS is not set (ctest sets it; see tests/cpp/deploy/make_artifacts.py)";
    return name;
  }
  return std::string(dir) + "/" + name;
}

torch::Tensor data(const std::string& name) {
  static torch::jit::Module tensors = torch::jit::load(artifact("data.pt"));
  return tensors.attr(name).toTensor();
}

void expect_close(const torch::Tensor& got, const torch::Tensor& expected, double rtol, double atol) {
  ASSERT_EQ(got.sizes(), expected.sizes());
  const double err = (got - expected).abs().max().item<double>();
  EXPECT_TRUE(torch::allclose(got, expected, rtol, atol)) << "max abs error " << err;
}

TEST(Deploy, TorchScriptModelSavedFromPythonRunsFromCpp) {
  torch::jit::Module model = torch::jit::load(artifact("moe_capacity.pt"));
  model.eval();
  torch::NoGradGuard no_grad;
  for (const std::string size : {"small", "large"}) {
    torch::Tensor y = model.forward({data("x_" + size)}).toTensor();
    expect_close(y, data("y_capacity_" + size), 1e-5, 1e-6);
  }
}

TEST(Deploy, AOTInductorPackageRunsFromCppWithADynamicBatch) {
  torch::inductor::AOTIModelPackageLoader loader(artifact("moe_dropless.pt2"));
  for (const std::string size : {"small", "large"}) {
    torch::Tensor x = data("x_" + size);
    std::vector<torch::Tensor> out = loader.run({x});
    ASSERT_EQ(out.size(), 1u);
    expect_close(out[0], data("y_dropless_" + size), 1e-4, 1e-5);
  }
}

}  // namespace
