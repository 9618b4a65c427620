"""What a bug report needs: ``python -m torchmoe info`` and :func:`torchmoe.info`.

Versions (torchmoe, torch, Python, transformers), the kernels the compiled library holds (CUDA built or not and
for which GPU architectures; which CPU code paths the C++ chooses on this machine at run time), the environment
knobs the library reads and their values, the CPU model, core count and torch's thread counts.

The CPU paths are worked out here the way the C++ chooses them (``csrc/ops/cpu/sgemm.cpp``,
``skinny_gemm.cpp``, ``row_ops.h``), from the CPU's flags and vendor in ``/proc/cpuinfo``:

- torchmoe's AVX-512 GEMM (float32 ``grouped_mm``) needs AVX-512F and ``TORCHMOE_DISABLE_AVX512`` unset, empty
  or ``"0"``; on an Intel CPU the forward still runs MKL's sgemm (``at::mm``), the backward torchmoe's GEMM;
- the skinny kernels (an expert with 1 to 16 rows) run AVX-512 with AVX-512 F, BW and VL (and the same
  variable), portable C++ otherwise;
- bfloat16 experts of 10 to 128 rows (``grouped_mm`` forward, d_in a multiple of 32) and of 8 to 128 (int8: 12
  or more) rows (``grouped_mm_quantized``, group size a multiple of 32) run on AMX where the CPU has AMX-BF16 (and
  the skinny kernels' AVX-512 with VBMI), the OS grants the tile state and ``TORCHMOE_DISABLE_AMX`` is unset, empty
  or ``"0"``;
- float16 rows convert with F16C where the CPU has AVX and F16C.
"""
import os
import platform
import struct
import sys
from pathlib import Path
from typing import Dict, List, Optional, Union

__all__ = ["info", "cpu_paths", "cuda_archs", "KNOBS", "AMX_PATH"]

# Every environment variable the library or its build reads: (name, default, scope, what it does). A test
# checks that every TORCHMOE_* name read by csrc/ or python/ is here.
KNOBS = [
    ("TORCHMOE_CPU_CACHE_MB", "4096", "run time (read once)",
     "MiB of freed large CPU op outputs kept for reuse; 0 turns the cache off"),
    ("TORCHMOE_DISABLE_AVX512", "", "run time (read once)",
     "set to anything but '' or '0': no AVX-512 GEMM or skinny kernels (at::mm and portable C++ instead)"),
    ("TORCHMOE_DISABLE_AMX", "", "run time (read once)",
     "set to anything but '' or '0': no AMX kernels (the skinny kernels, at::mm and dequantized panels instead)"),
    ("TORCHMOE_SKINNY_ROW_WALK", "", "run time (read once)",
     "1: experts of one row (float, int8 or int4) walk the weight row by row (the default for float weights "
     "on AMD CPUs); 0: in 16-row strips (the default elsewhere); the same bits either way"),
    ("TORCHMOE_GROUPED_MM_FALLBACK", "", "run time, CUDA (read once)",
     "1: CUDA grouped_mm never uses torch's grouped GEMM (torchmoe's own kernels instead)"),
    ("TORCHMOE_CPU_ONLY", "0", "build", "1: build without the CUDA kernels"),
    ("FORCE_CUDA", "0", "build", "1: build the CUDA kernels even where torch or nvcc says no"),
    ("TORCH_CUDA_ARCH_LIST", "8.0;9.0", "build", "GPU architectures the CUDA kernels are compiled for"),
]

# cpu_paths()'s entry for the AMX kernels.
AMX_PATH = "bfloat16 grouped_mm (10-128 rows per expert), grouped_mm_quantized (int4 8-128, int8 12+)"

# Not torchmoe's, but they decide how fast its CPU kernels run.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "KMP_AFFINITY", "GOMP_CPU_AFFINITY")


def _cpuinfo() -> Dict[str, str]:
    """The first processor's entries of /proc/cpuinfo (empty where there is none)."""
    fields: Dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _disabled(variable: str) -> bool:
    # The C++ reads it as: set, non-empty and not "0" disables.
    value = os.environ.get(variable)
    return value is not None and value != "" and value != "0"


def _avx512_disabled() -> bool:
    return _disabled("TORCHMOE_DISABLE_AVX512")


def cpu_paths(flags: Optional[List[str]] = None, vendor: Optional[str] = None,
              machine: Optional[str] = None) -> Dict[str, str]:
    """The CPU code paths the compiled library chooses, as the C++ chooses them.

    Args:
        flags: the CPU's feature flags (``/proc/cpuinfo``'s ``flags``); this machine's when None.
        vendor: the CPU vendor string (``GenuineIntel``, ``AuthenticAMD``, ...); this machine's when None.
        machine: ``platform.machine()``; this machine's when None.

    Returns:
        A dict from what runs (``"grouped_mm float32 forward (17+ rows per expert)"``, ``"... backward"``,
        ``"grouped_mm bf16/fp16 (17+ rows per expert)"``, ``"skinny kernels (1-16 rows per expert)"``,
        ``AMX_PATH``, ``"float16 conversion"``) to the path chosen.
    """
    cpu = _cpuinfo() if flags is None or vendor is None else {}
    flag_set = set(flags if flags is not None else cpu.get("flags", "").split())
    vendor = vendor if vendor is not None else cpu.get("vendor_id", "")
    machine = machine if machine is not None else platform.machine()
    x86 = machine in ("x86_64", "AMD64")
    import torch

    blas = "MKL's sgemm" if torch.backends.mkl.is_available() else "torch's BLAS"
    fast_gemm = x86 and "avx512f" in flag_set and not _avx512_disabled()
    skinny_avx512 = fast_gemm and "avx512bw" in flag_set and "avx512vl" in flag_set
    intel = vendor == "GenuineIntel" if x86 else True  # blas_sgemm_preferred(): true off x86
    if fast_gemm and not intel:
        forward = "torchmoe's AVX-512 GEMM"
    elif fast_gemm:
        forward = f"at::mm ({blas}; an Intel CPU, where it is faster than torchmoe's GEMM) per 256-row block"
    else:
        forward = f"at::mm ({blas}) per 256-row block"
    backward = "torchmoe's AVX-512 GEMM" if fast_gemm else f"at::mm ({blas})"
    why_not = ""
    if x86 and _avx512_disabled():
        why_not = " (TORCHMOE_DISABLE_AVX512 is set)"
    elif x86 and not skinny_avx512:
        why_not = " (the CPU lacks AVX-512 F/BW/VL)"
    amx_flags = {"amx_tile", "amx_bf16", "avx512vbmi"} <= flag_set
    if skinny_avx512 and amx_flags and not _disabled("TORCHMOE_DISABLE_AMX"):
        quantized_amx = "AMX (bfloat16 tiles, where the OS grants the tile state)"
    else:
        why = (" (TORCHMOE_DISABLE_AMX is set)" if _disabled("TORCHMOE_DISABLE_AMX") and skinny_avx512 and amx_flags
               else " (no AMX-BF16 with AVX-512 VBMI)")
        quantized_amx = "skinny kernels (up to 16 rows), at::mm and dequantized panels" + why
    return {
        AMX_PATH: quantized_amx,
        "grouped_mm float32 forward (17+ rows per expert)": forward,
        "grouped_mm float32 backward (17+ rows per expert)": backward,
        "grouped_mm bf16/fp16 (17+ rows per expert)": "at::mm per 256-row block",
        "skinny kernels (1-16 rows per expert)": "AVX-512 (F, BW, VL)" if skinny_avx512 else "portable C++" + why_not,
        "float16 conversion": "F16C" if x86 and {"avx", "f16c"} <= flag_set else "scalar",
    }


def cuda_archs(library: str) -> List[str]:
    """GPU architectures whose code the library's fat binary holds, e.g. ``["sm_80", "sm_90"]``
    (``"compute_90"`` for PTX). Empty for a CPU-only build or a file that cannot be read.

    Reads the ELF section ``.nv_fatbin``: a sequence of fat binaries (magic 0xBA55ED50, header size, payload
    size), each a sequence of entries whose header says kind (1 PTX, 2 ELF) and the architecture number.
    """
    try:
        data = Path(library).read_bytes()
    except OSError:
        return []
    section = _elf_section(data, b".nv_fatbin")
    if section is None:
        return []
    found = set()
    pos = 0
    while pos + 16 <= len(section):
        magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", section, pos)
        if magic != 0xBA55ED50:
            pos += 8  # fat binaries are 8-byte aligned; skip padding
            continue
        entry = pos + header_size
        end = entry + fat_size
        while entry + 32 <= min(end, len(section)):
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", section, entry)
            arch = struct.unpack_from("<I", section, entry + 28)[0]
            if kind in (1, 2) and arch:
                found.add(("compute_" if kind == 1 else "sm_") + str(arch))
            if entry_header == 0:
                break
            entry += entry_header + payload
        pos = end
    return sorted(found, key=lambda a: (int(a.split("_")[1]), a))


def _elf_section(data: bytes, name: bytes) -> Optional[bytes]:
    """The bytes of a 64-bit little-endian ELF file's section called `name`, or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shoff == 0 or shnum == 0:
        return None

    def header(i):
        # name offset, type, flags, addr, offset, size
        return struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)

    strtab = header(shstrndx)
    names = data[strtab[4]:strtab[4] + strtab[5]]
    for i in range(shnum):
        h = header(i)
        if names[h[0]:names.index(b"\0", h[0])] == name:
            return data[h[4]:h[4] + h[5]]
    return None


def _version_of(distribution: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _collect() -> Dict[str, object]:
    import torch

    import torchmoe

    cpu = _cpuinfo()
    library = torchmoe.library_path()
    cuda_built = torchmoe.built_with_cuda()
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    devices = []
    try:
        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            major, minor = torch.cuda.get_device_capability(i)
            devices.append(f"{torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    except RuntimeError as error:  # a broken driver is worth reporting, not raising
        devices.append(f"error: {error}")
    knobs = {}
    for name, default, scope, meaning in KNOBS:
        knobs[name] = {"value": os.environ.get(name), "default": default, "scope": scope, "meaning": meaning}
    other = {k: v for k, v in sorted(os.environ.items()) if k.startswith("TORCHMOE_") and k not in knobs}
    return {
        "torchmoe": torchmoe.__version__,
        "torchmoe_path": str(Path(torchmoe.__file__).parent),
        "library": library,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_mkl": torch.backends.mkl.is_available(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "transformers": _version_of("transformers"),
        "cuda_kernels": cuda_built,
        "cuda_archs": cuda_archs(library) if cuda_built else [],
        "cuda_devices": devices,
        "cpu_paths": cpu_paths(),
        "knobs": knobs,
        "other_torchmoe_variables": other,
        "thread_variables": {k: os.environ.get(k) for k in THREAD_VARIABLES if k in os.environ},
        "cpu_model": cpu.get("model name", platform.processor() or "unknown"),
        "cpu_vendor": cpu.get("vendor_id", "unknown"),
        "cpu_flags": sorted(f for f in cpu.get("flags", "").split()
                            if f.startswith(("avx", "amx", "fma", "f16c"))),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_cache_bytes": torchmoe.cpu_cache_bytes(),
    }


def _format(d: Dict[str, object]) -> str:
    lines = [
        f"torchmoe {d['torchmoe']} ({d['torchmoe_path']})",
        f"  library: {d['library']}",
        f"torch {d['torch']} (CUDA {d['torch_cuda'] or 'none: a CPU build'}, CPU capability "
        f"{d['torch_cpu_capability']}, MKL {'yes' if d['torch_mkl'] else 'no'})",
        f"python {d['python']} on {d['platform']}",
        f"transformers {d['transformers']}",
        "",
        "kernels",
    ]
    if d["cuda_kernels"]:
        archs = ", ".join(d["cuda_archs"]) or "unknown (no .nv_fatbin section read)"
        lines.append(f"  CUDA kernels: built, for {archs}")
    else:
        lines.append("  CUDA kernels: not built (a CPU-only library)")
    lines.append("  CUDA devices: " + (", ".join(d["cuda_devices"]) or "none"))
    lines.append("  CPU paths on this machine:")
    for what, path in d["cpu_paths"].items():
        lines.append(f"    {what}: {path}")
    lines += ["", "environment knobs"]
    for name, knob in d["knobs"].items():
        value = "(unset)" if knob["value"] is None else repr(knob["value"])
        default = f"default {knob['default']!r}" if knob["default"] else "default unset"
        lines.append(f"  {name} = {value}  [{knob['scope']}; {default}] {knob['meaning']}")
    for name, value in d["other_torchmoe_variables"].items():
        lines.append(f"  {name} = {value!r}  [not read by the library]")
    for name, value in d["thread_variables"].items():
        lines.append(f"  {name} = {value!r}")
    lines += [
        "",
        "CPU",
        f"  {d['cpu_model']} ({d['cpu_vendor']})",
        f"  cores: {d['cpu_count']} (this process may use {d['cpu_affinity']}); torch threads "
        f"{d['torch_threads']}, interop threads {d['torch_interop_threads']}",
        "  flags: " + (" ".join(d["cpu_flags"]) or "none of avx*/amx*/fma/f16c"),
        f"  torchmoe CPU output cache holds {d['cpu_cache_bytes']} bytes",
    ]
    return "\n".join(lines)


def info(as_dict: bool = False) -> Union[str, Dict[str, object]]:
    """The facts a bug report needs, as text (``print(torchmoe.info())``) or as a dict.

    Args:
        as_dict: return a JSON-serializable dict instead of the text.

    Returns:
        The report as a string (what ``python -m torchmoe info`` prints), or with ``as_dict=True`` a dict with
        the keys ``torchmoe``, ``torch``, ``python``, ``transformers`` (versions), ``cuda_kernels`` (bool),
        ``cuda_archs`` (e.g. ``["sm_80", "sm_90"]``), ``cpu_paths`` (what :func:`cpu_paths` says),
        ``knobs`` (name -> value, default, scope, meaning), ``cpu_model``, ``cpu_count``, ``torch_threads``
        and more.

    Nothing here raises for a missing or unusual system file: what cannot be read is reported as unknown.

    Environment variables the library reads once (``TORCHMOE_DISABLE_AVX512``, ``TORCHMOE_CPU_CACHE_MB``) are
    shown as the environment holds them now; set them before the process first uses an op.
    """
    d = _collect()
    return d if as_dict else _format(d)
