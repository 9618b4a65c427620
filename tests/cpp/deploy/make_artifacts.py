"""Makes what the C++ deployment tests (tests/cpp/deploy/test_deploy.cpp) load, in OUTDIR:

- moe_dropless.pt2: an AOTInductor package (torch._inductor.aoti_compile_and_package) of a dropless SwiGLU
  MoE exported with a dynamic batch dimension;
- moe_capacity.pt: a capacity-mode ReLU MoE, torch.jit.script(...).save(...);
- data.pt: a TorchScript module whose buffers are inputs of two batch sizes and both models' eager outputs.

    python tests/cpp/deploy/make_artifacts.py OUTDIR

Nothing is redone while OUTDIR/STAMP matches (this file, torchmoe's Python files and library, torch's version):
the AOTInductor compile takes a minute or more on a small machine. tests/python/test_export.py uses the same
models and package.
"""
import hashlib
import sys
from pathlib import Path

import torch

import torchmoe
from torchmoe.nn import MoE

D_MODEL, SEQ, EXAMPLE_BATCH = 32, 8, 4
PACKAGE, SCRIPTED, DATA = "moe_dropless.pt2", "moe_capacity.pt", "data.pt"


def dropless_moe() -> MoE:
    torch.manual_seed(0)
    return MoE(D_MODEL, 64, num_experts=4, k=2, capacity_factor=None).eval()


def capacity_moe() -> MoE:
    torch.manual_seed(1)
    return MoE(D_MODEL, 48, num_experts=4, k=2, capacity_factor=1.0, activation="relu").eval()


def inputs() -> dict:
    g = torch.Generator().manual_seed(2)
    return {name: torch.randn(batch, SEQ, D_MODEL, generator=g) for name, batch in (("x_small", 3), ("x_large", 9))}


def export_with_dynamic_batch(model: torch.nn.Module) -> torch.export.ExportedProgram:
    example = torch.randn(EXAMPLE_BATCH, SEQ, D_MODEL)
    return torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))


def _stamp() -> str:
    package_dir = Path(torchmoe.__file__).resolve().parent
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for path in sorted(package_dir.rglob("*.py")):
        digest.update(path.read_bytes())
    library = Path(torchmoe.library_path())
    digest.update(f"{library} {library.stat().st_size} {library.stat().st_mtime_ns} {torch.__version__}".encode())
    return digest.hexdigest()


class _Tensors(torch.nn.Module):
    def __init__(self, tensors: dict):
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)


def make(outdir: Path) -> Path:
    outdir.mkdir(parents=True, exist_ok=True)
    stamp = _stamp()
    if (outdir / "STAMP").exists() and (outdir / "STAMP").read_text() == stamp:
        return outdir
    (outdir / "STAMP").unlink(missing_ok=True)
    dropless, capacity = dropless_moe(), capacity_moe()
    torch._inductor.aoti_compile_and_package(export_with_dynamic_batch(dropless), package_path=str(outdir / PACKAGE))
    torch.jit.script(capacity).save(str(outdir / SCRIPTED))
    tensors = {}
    with torch.no_grad():
        for name, x in inputs().items():
            size = name.split("_")[1]
            tensors[name] = x
            tensors[f"y_dropless_{size}"] = dropless(x)
            tensors[f"y_capacity_{size}"] = capacity(x)
    torch.jit.script(_Tensors(tensors)).save(str(outdir / DATA))
    (outdir / "STAMP").write_text(stamp)
    return outdir


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} OUTDIR")
    print(f"deployment artifacts in {make(Path(sys.argv[1]))}")
