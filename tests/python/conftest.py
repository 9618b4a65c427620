import os
import subprocess
import sys

import pytest
import torch

import torchmoe  # noqa: F401  (registers the ops)

CUDA = torch.cuda.is_available() and torchmoe.built_with_cuda()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def run_python(code: str, timeout: float = 300, **env: str) -> str:
    """Runs code in a fresh Python process (this environment plus env), asserts that it exits with 0 and
    returns what it printed."""
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def outputs_of_both_walks(code: str, tmp_path) -> tuple:
    """Runs code (which saves a list of tensors to $ROW_WALK_TEST_OUT and prints ok) in fresh processes with
    TORCHMOE_SKINNY_ROW_WALK=0 (the strips) and =1 (the row walk); returns both lists, strips first."""
    results = []
    for walk in ("0", "1"):
        path = tmp_path / f"walk{walk}.pt"
        assert run_python(code, TORCHMOE_SKINNY_ROW_WALK=walk, ROW_WALK_TEST_OUT=str(path)).strip() == "ok"
        results.append(torch.load(path))
    return tuple(results)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    return f"torch {torch.__version__}, torchmoe CUDA kernels: {torchmoe.built_with_cuda()}, GPU: {CUDA}"


def train_causal_lm(model, input_ids, steps: int, lr: float) -> list:
    """AdamW steps of a causal LM (transformers-style: model(input_ids=..., labels=...).loss) on one batch, over
    its trainable parameters; returns the loss of every step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
