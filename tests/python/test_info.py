"""`python -m torchmoe info` / `torchmoe.info()`: what a bug report needs, and the CPU paths it names are the
ones the C++ chooses."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

import torchmoe
from torchmoe import _info

ROOT = Path(__file__).resolve().parents[2]


def run_info(*args, env=None):
    # The caller's own TORCHMOE_* variables (scripts/test.sh sets some) would show up in the report too.
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHMOE_")}
    full_env.update(env or {})
    result = subprocess.run([sys.executable, "-m", "torchmoe", "info", *args], capture_output=True, text=True,
                            timeout=120, env=full_env, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_cli_prints_versions_kernels_and_cpu():
    out = run_info()
    assert f"torchmoe {torchmoe.__version__}" in out
    assert f"torch {torch.__version__}" in out
    assert f"python {sys.version.split()[0]}" in out
    assert "CUDA kernels: " + ("built" if torchmoe.built_with_cuda() else "not built") in out
    assert "skinny kernels (1-16 rows per expert):" in out
    assert f"cores: {os.cpu_count()}" in out
    for name, _, _, _ in _info.KNOBS:
        assert name in out


def test_a_knob_set_in_the_environment_shows_up_and_changes_the_paths():
    out = run_info("--json", env={"TORCHMOE_DISABLE_AVX512": "1", "TORCHMOE_CPU_CACHE_MB": "17",
                                  "TORCHMOE_SOMETHING_ELSE": "x"})
    report = json.loads(out)
    assert report["knobs"]["TORCHMOE_DISABLE_AVX512"]["value"] == "1"
    assert report["knobs"]["TORCHMOE_CPU_CACHE_MB"]["value"] == "17"
    assert report["other_torchmoe_variables"] == {"TORCHMOE_SOMETHING_ELSE": "x"}
    assert report["cpu_paths"]["skinny kernels (1-16 rows per expert)"].startswith("portable C++")
    assert "AVX-512" not in report["cpu_paths"]["grouped_mm float32 backward (17+ rows per expert)"]


def test_cli_rejects_unknown_arguments():
    result = subprocess.run([sys.executable, "-m", "torchmoe", "info", "--bogus"], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 2 and "--bogus" in result.stderr


def test_info_returns_text_or_dict():
    text = torchmoe.info()
    assert isinstance(text, str) and text.startswith("torchmoe ")
    d = torchmoe.info(as_dict=True)
    json.dumps(d)  # serializable, for attaching to an issue
    assert d["torch"] == torch.__version__ and d["torch_threads"] == torch.get_num_threads()
    assert d["cuda_kernels"] == torchmoe.built_with_cuda()
    if torchmoe.built_with_cuda():  # the fat binary holds code for at least one architecture
        assert d["cuda_archs"] and all(re.fullmatch(r"(sm|compute)_\d+", a) for a in d["cuda_archs"])
    else:
        assert d["cuda_archs"] == []


def test_cpu_paths_follow_the_cpp_choice(monkeypatch):
    monkeypatch.delenv("TORCHMOE_DISABLE_AVX512", raising=False)
    avx512 = ["avx", "f16c", "avx2", "avx512f", "avx512bw", "avx512vl"]
    forward = "grouped_mm float32 forward (17+ rows per expert)"
    backward = "grouped_mm float32 backward (17+ rows per expert)"
    skinny = "skinny kernels (1-16 rows per expert)"
    amd = _info.cpu_paths(avx512, "AuthenticAMD", "x86_64")
    assert amd[forward] == amd[backward] == "torchmoe's AVX-512 GEMM"
    assert amd[skinny] == "AVX-512 (F, BW, VL)" and amd["float16 conversion"] == "F16C"
    intel = _info.cpu_paths(avx512, "GenuineIntel", "x86_64")
    assert intel[forward].startswith("at::mm") and intel[backward] == "torchmoe's AVX-512 GEMM"
    avx2 = _info.cpu_paths(["avx", "avx2", "f16c"], "AuthenticAMD", "x86_64")
    assert avx2[backward].startswith("at::mm") and avx2[skinny].startswith("portable C++")
    only_f = _info.cpu_paths(["avx512f"], "AuthenticAMD", "x86_64")  # the GEMM needs F, the skinny kernels F/BW/VL
    assert only_f[backward] == "torchmoe's AVX-512 GEMM" and only_f[skinny].startswith("portable C++")
    assert only_f["float16 conversion"] == "scalar"
    arm = _info.cpu_paths(["asimd"], "", "aarch64")
    assert arm[forward].startswith("at::mm") and arm[skinny] == "portable C++"
    quantized = _info.AMX_PATH
    monkeypatch.delenv("TORCHMOE_DISABLE_AMX", raising=False)
    amx = avx512 + ["avx512vbmi", "amx_tile", "amx_bf16"]
    assert _info.cpu_paths(amx, "GenuineIntel", "x86_64")[quantized].startswith("AMX")
    assert _info.cpu_paths(avx512 + ["avx512vbmi"], "AuthenticAMD", "x86_64")[quantized].startswith("skinny")
    assert _info.cpu_paths(amx[:2] + amx[6:], "GenuineIntel", "x86_64")[quantized].startswith("skinny")  # no AVX-512
    monkeypatch.setenv("TORCHMOE_DISABLE_AMX", "1")
    assert "TORCHMOE_DISABLE_AMX is set" in _info.cpu_paths(amx, "GenuineIntel", "x86_64")[quantized]
    for value, disabled in (("1", True), ("yes", True), ("0", False), ("", False)):
        monkeypatch.setenv("TORCHMOE_DISABLE_AVX512", value)
        paths = _info.cpu_paths(avx512, "AuthenticAMD", "x86_64")
        assert (paths[backward] != "torchmoe's AVX-512 GEMM") == disabled, value


def test_every_environment_variable_the_library_reads_is_listed():
    read = set()
    for path in list((ROOT / "csrc").rglob("*.c*")) + list((ROOT / "csrc").rglob("*.h")) + \
            list((ROOT / "python").rglob("*.py")):
        text = path.read_text(errors="replace")
        read |= set(re.findall(r'getenv\(\s*"(TORCHMOE_\w+)"', text))
        read |= set(re.findall(r'environ(?:\.get\(|\[)\s*"(TORCHMOE_\w+)"', text))
    listed = {name for name, _, _, _ in _info.KNOBS}
    assert read, "found no getenv calls: the scan is broken"
    assert read <= listed, f"read by the library but missing from torchmoe._info.KNOBS: {sorted(read - listed)}"
