"""The demo (`python -m torchmoe demo`): corpus, checkpoint round trip, and short end-to-end runs."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import torchmoe  # noqa: F401  (registers the ops)
from torchmoe.__main__ import main
from torchmoe.demo.corpus import CharTokenizer, build_corpus, split_train_heldout
from torchmoe.demo.model import ModelConfig, MoETransformer, load_checkpoint, save_checkpoint

pytest.importorskip("matplotlib")

TINY = ["--n-layer", "2", "--n-embed", "32", "--n-head", "4", "--batch-size", "8", "--eval-batches", "2",
        "--corpus-chars", "200000", "--sample-chars", "40", "--no-progress",
        # One thread: a model this small gains nothing from more, and it keeps the test quick on a busy machine.
        "--threads", "1"]


def test_corpus_is_deterministic_capped_and_printable():
    a = build_corpus(200_000)
    b = build_corpus(200_000)
    assert a == b
    assert len(a) == 200_000  # the standard library holds far more than the cap
    assert set(a) <= set("\n" + "".join(chr(c) for c in range(32, 127)))
    assert "argparse.ArgumentParser" in a and "Return" in a
    assert len(set(a)) > 70  # letters, digits, punctuation
    # A larger cap extends the same text.
    assert build_corpus(300_000).startswith(a)


def test_tokenizer_and_split():
    text = build_corpus(50_000)
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert tok.decode(ids.tolist()) == text
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.encode("\u00e9")
    train, held = split_train_heldout(ids)
    assert train.numel() + held.numel() == ids.numel()
    assert 0.05 < held.numel() / ids.numel() < 0.15
    # Deterministic and disjoint: the two parts interleave back into the whole.
    train2, held2 = split_train_heldout(ids)
    assert torch.equal(train, train2) and torch.equal(held, held2)


@pytest.mark.parametrize("router,cf", [("noisy", 1.25), ("switch", None)])
def test_checkpoint_round_trip(tmp_path, router, cf):
    tok = CharTokenizer("abcdefgh \n")
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_embed=16, n_head=2, n_layer=2, block_size=8, num_experts=4,
                      top_k=2, router=router, capacity_factor=cf)
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    # Move weights away from their initial values so the check is not satisfied by a fresh init.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), model, tok, step=7)
    torch.manual_seed(123)  # a different init for the fresh model
    fresh, fresh_tok, state = load_checkpoint(str(path))
    assert fresh is not model and fresh.cfg == model.cfg
    assert fresh_tok.chars == tok.chars and state["step"] == 7
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    x = torch.randint(0, tok.vocab_size, (3, 8))
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x)[0], fresh(x)[0])
    ref_model, _, _ = load_checkpoint(str(path), impl="reference")
    assert ref_model.cfg.impl == "reference"


def test_generate_reproducible():
    cfg = ModelConfig(vocab_size=10, n_embed=16, n_head=2, n_layer=1, block_size=8, num_experts=4)
    model = MoETransformer(cfg)
    start = torch.zeros(1, 1, dtype=torch.long)
    a = model.generate(start, 20, generator=torch.Generator().manual_seed(1))
    b = model.generate(start, 20, generator=torch.Generator().manual_seed(1))
    assert a.shape == (1, 21) and torch.equal(a, b)
    assert model.training  # restored


def test_demo_trains_and_writes_files(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["demo", "--steps", "40", "--eval-every", "20", "--lr", "3e-3", "--out", str(out), "--compare"] + TINY)
    text = capsys.readouterr().out
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 40
    assert metrics["final_train_loss"] < metrics["initial_train_loss"] - 0.3
    assert metrics["final_heldout_loss"] < metrics["initial_heldout_loss"] - 0.3
    assert metrics["reload_matches"]
    assert metrics["tokens_per_s"] > 0
    # capacity factor 1.25 on a fresh router: some assignments overflow, never more than exist.
    assert 0 <= sum(metrics["dropped"]) < 2 * metrics["assignments_per_layer"]
    counts = torch.tensor(metrics["expert_counts"])
    assert counts.shape == (2, 8) and (counts.sum(1) == metrics["assignments_per_layer"]).all()
    # Two expert-load tables (training, and the trained model on held-out text): one row per layer each,
    # eight shares that sum to 100%.
    assert "expert load during training" in text and "expert load of the trained model on held-out" in text
    rows = [line.split() for line in text.splitlines() if line.split()[:1] in (["0"], ["1"]) and line.endswith("%")]
    assert len(rows) == 4
    for row in rows:
        assert abs(sum(float(v) for v in row[1:9]) - 100.0) < 0.5
    held = torch.tensor(metrics["heldout_expert_counts"])
    assert held.shape == (2, 8) and held.sum() > 0
    png = out / "torchmoe_demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png.resolve()) in text
    assert (out / "checkpoint.pt").exists()
    assert "tokens/s" in text and "tokens dropped" in text
    assert "--compare" in text and metrics["compare"]["speedup"] > 0
    # The reference run trains the same steps on the same batches: the losses agree closely.
    assert abs(metrics["compare"]["reference_final_heldout_loss"] - metrics["final_heldout_loss"]) < 0.05
    assert metrics["sample"].startswith("Return the ") and len(metrics["sample"]) == len("Return the ") + 40


def test_demo_switch_dropless(tmp_path, capsys):
    out = tmp_path / "switch"
    rc = main(["demo", "--steps", "6", "--router", "switch", "--dropless", "--eval-every", "0",
               "--out", str(out)] + TINY)
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["top_k"] == 1 and metrics["config"]["capacity_factor"] is None
    assert sum(metrics["dropped"]) == 0
    assert metrics["assignments_per_layer"] == 6 * 8 * 32
    assert "dropless" in capsys.readouterr().out


def test_cli_commands(monkeypatch, capsys):
    assert main([]) == 0 and "demo" in capsys.readouterr().out
    assert main(["nope"]) == 2
    # `bench` forwards its arguments to torchmoe.bench.main, imported on demand.
    seen = {}
    fake = types.ModuleType("torchmoe.bench")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "torchmoe.bench", fake)
    monkeypatch.setattr(torchmoe, "bench", fake, raising=False)
    assert main(["bench", "--quick", "x"]) == 0
    assert seen["argv"] == ["--quick", "x"]
    with pytest.raises(SystemExit):
        main(["demo", "--router", "bogus"])


def test_python_dash_m_entry():
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "torchmoe", "demo", "--help"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in ("--steps", "--time-budget", "--router", "--capacity-factor", "--dropless", "--compare",
                 "--device", "--seed", "--out", "--eval-every"):
        assert flag in r.stdout
