import pytest
import torch

import torchmoe  # noqa: F401  (registers the ops)

CUDA = torch.cuda.is_available() and torchmoe.built_with_cuda()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    return f"torch {torch.__version__}, torchmoe CUDA kernels: {torchmoe.built_with_cuda()}, GPU: {CUDA}"
