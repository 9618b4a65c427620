"""The op benchmark: its plain-PyTorch composites compute what the ops compute (so the ratios compare
like with like), and a quick run prints the full table."""
import torch

import torchmoe
from torchmoe import bench


def test_composites_match_the_ops():
    logits = torch.randn(300, 16)
    logits[:, :2] += 1.5  # popular experts, so the capacity drops tokens
    w, i = torchmoe.topk_gating(logits, 3)
    cw, ci = bench.topk_softmax_composite(logits, 3)
    torch.testing.assert_close(cw, w)
    assert torch.equal(ci, i)

    cap = torchmoe.capacity(300, 16, 3, 1.25)
    dest, counts = torchmoe.route_plan(i, 16, cap)
    cdest, ccounts = bench.sort_plan_composite(i, 16, cap)
    assert torch.equal(cdest, dest) and torch.equal(ccounts, counts)
    assert (dest < 0).any()  # the case drops tokens

    x = torch.randn(300, 8)
    rows = 16 * cap
    torch.testing.assert_close(bench.dispatch_composite(x, dest, rows), torchmoe.dispatch(x, dest, rows))
    expert_out = torch.randn(rows, 8)
    torch.testing.assert_close(bench.combine_composite(expert_out, dest, w),
                               torchmoe.combine(expert_out, dest, w))
    counts = torch.tensor([3, 0, 40, 7])
    xg, wg = torch.randn(50, 6), torch.randn(4, 6, 5)
    torch.testing.assert_close(bench.grouped_mm_composite(xg, wg, counts), torchmoe.grouped_mm(xg, wg, counts))
    gate, up = torch.randn(50, 7), torch.randn(50, 7)
    torch.testing.assert_close(bench.swiglu_composite(gate, up), torchmoe.swiglu(gate, up))


def test_quick_run_prints_every_op(capsys):
    cases = bench.run(["--quick", "--no-compile", "--reps", "1"])
    out = capsys.readouterr().out
    for op in ("topk_gating", "route_plan", "dispatch", "combine", "dispatch+combine", "grouped_mm", "swiglu"):
        assert f"| {op} |" in out
    assert all(c.times["ours"] > 0 for c in cases)
    assert "plain copy" in out
    assert bench.cpu_model() in out.splitlines()[0]  # every table says which CPU measured it


def test_copy_is_timed_on_each_case_bytes(monkeypatch):
    # "of copy" compares each case with a copy of its own bytes (capped), measured in the same run.
    seen = []
    real = bench.copy_bandwidth

    def spy(nbytes, device, reps, allocate=True):
        seen.append((nbytes, allocate))
        return real(nbytes, device, reps, allocate)

    monkeypatch.setattr(bench, "copy_bandwidth", spy)
    cases = bench.run(["--quick", "--no-compile", "--reps", "1", "--only", "route_plan,swiglu"])
    sizes = {c.nbytes for c in cases}
    assert len(sizes) == 3  # route_plan, swiglu fwd, swiglu fwd+bwd
    assert sorted(seen) == sorted((n, a) for n in sizes for a in (False, True))
    assert all(c.copy_gbs > 0 and c.clone_gbs > 0 for c in cases)

    seen.clear()
    monkeypatch.setattr(bench, "COPY_CAP", 4096)
    bench.run(["--quick", "--no-compile", "--reps", "1", "--only", "swiglu"])
    assert seen == [(4096, False), (4096, True)]


def test_decode_benchmark_quick_run_every_dtype():
    # bench_decode checks every baseline against the layer before timing it (torch's int8/int4 weight-only loops
    # on the same quantized values, F.grouped_mm on the float ones), then prints a row per dtype and size.
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_decode.py"
    out = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for dtype in ("float32", "bfloat16", "int8", "int4"):
        assert f"| {dtype} | 1 |" in out.stdout and f"| {dtype} | 40 |" in out.stdout
    assert "torch int4 loop" in out.stdout and "lowest 'of roof'" in out.stdout


def test_layer_benchmark_small_run_names_the_cpu():
    # bench_moe checks the fused layer against the loops before timing; its header names the CPU that measured it.
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_moe.py"
    out = subprocess.run([sys.executable, str(script), "--tokens", "64", "--d-model", "32", "--d-ff", "64",
                          "--experts", "4", "--reps", "1"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert bench.cpu_model() in out.stdout.splitlines()[0]
    assert "dropless" in out.stdout and "capacity" in out.stdout
