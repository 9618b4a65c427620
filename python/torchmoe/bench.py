"""Op benchmark: every torchmoe op against plain-PyTorch composites, measured in one run.

For each op (forward, and forward+backward where it has a gradient) it times:
  ours      the torchmoe op
  ref       the torchmoe.reference composite (the seed notebooks' steps)
  eager     the best plain-PyTorch composite we could write (topk+softmax, stable sort, index_select/index_add_,
            the per-expert matmul loop)
  compiled  torch.compile of that composite
and prints medians of repeated runs, the speedups ours vs each (x faster, > 1 means torchmoe wins) and the
bandwidth ours achieves against a plain copy of the same number of bytes, timed in the same run for each case
(so both see the same caches): "of copy" against a copy into an existing buffer (the machine's raw bandwidth),
"of clone" against a copy that allocates its output. Copies are capped at COPY_CAP bytes: a larger copy runs at
the same rate.

    python benchmarks/bench_ops.py                 # CPU, the sizes of the foundation targets
    python benchmarks/bench_ops.py --device cuda   # GPU, the sizes of the CUDA targets (bf16)
    python -m torchmoe bench --quick
"""
import argparse
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import torchmoe
from torchmoe import reference


# ---------------------------------------------------------------- timing

def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo), for the header of every benchmark table."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, reps: int, min_time: float = 0.02) -> float:
    """Median seconds per call over `reps` measurements (each long enough to time reliably)."""
    for _ in range(2):
        fn()
    _sync(device)
    # Calls per measurement so that one measurement lasts at least min_time.
    start = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - start, 1e-7)
    inner = max(1, int(math.ceil(min_time / once)))
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(inner):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(begin.elapsed_time(end) / 1e3 / inner)
        else:
            begin = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - begin) / inner)
    return statistics.median(samples)


COPY_CAP = 1 << 30


def copy_bandwidth(nbytes: int, device: torch.device, reps: int, allocate: bool = True,
                   timer: Callable[[Callable[[], object], torch.device, int], float] = time_fn) -> float:
    """GB/s of a plain copy that reads nbytes/2 and writes nbytes/2.

    allocate=True times `src.clone()`, which returns a fresh tensor (on the CPU, glibc maps large blocks fresh, and
    their first-touch page faults cost several times the copy; torchmoe's CPU ops take their large outputs from
    a block cache instead). allocate=False copies into an existing buffer: the machine's raw copy bandwidth.
    timer(fn, device, reps) -> seconds per call; the ops' timer, so the copy is timed as they are.
    """
    half = max(1, nbytes // 2)
    src = torch.empty(half, dtype=torch.uint8, device=device).random_(0, 255)
    if allocate:
        t = timer(lambda: src.clone(), device, reps)
    else:
        dst = torch.empty_like(src)
        t = timer(lambda: dst.copy_(src), device, reps)
    return 2 * half / t / 1e9


# ---------------------------------------------------------------- plain-PyTorch composites

def topk_softmax_composite(logits: torch.Tensor, k: int):
    values, indices = logits.topk(k, dim=-1)
    return torch.softmax(values.float(), dim=-1).to(logits.dtype), indices


def sort_plan_composite(indices: torch.Tensor, num_experts: int, capacity: int):
    """Capacity plan via a stable sort of the rank-major expert ids."""
    T, k = indices.shape
    flat = indices.t().reshape(-1)  # rank-major queue
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    pos_sorted = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    pos = torch.empty_like(pos_sorted).scatter_(0, order, pos_sorted)
    dest = torch.where(pos < capacity, flat * capacity + pos, torch.full_like(pos, -1))
    return dest.view(k, T).t(), counts


def dispatch_composite(x: torch.Tensor, dest: torch.Tensor, num_rows: int):
    flat = dest.reshape(-1)
    keep = flat >= 0
    token = torch.arange(x.shape[0], device=x.device).repeat_interleave(dest.shape[1])
    out = x.new_zeros((num_rows, x.shape[1]))
    return out.index_copy(0, flat[keep], x.index_select(0, token[keep]))


def combine_composite(expert_out: torch.Tensor, dest: torch.Tensor, weights: torch.Tensor):
    flat = dest.reshape(-1)
    keep = flat >= 0
    N, k = dest.shape
    token = torch.arange(N, device=dest.device).repeat_interleave(k)
    rows = expert_out.index_select(0, flat[keep]).float() * weights.reshape(-1)[keep].float().unsqueeze(1)
    out = torch.zeros((N, expert_out.shape[1]), dtype=torch.float32, device=expert_out.device)
    return out.index_add(0, token[keep], rows).to(expert_out.dtype)


def grouped_mm_composite(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor):
    """The per-expert loop, each expert's product written into one preallocated output (no torch.cat)."""
    out = x.new_empty((x.shape[0], weight.shape[-1]))
    start = 0
    for e, n in enumerate(counts.tolist()):
        torch.mm(x[start:start + n], weight[e], out=out[start:start + n])
        start += n
    return out


def swiglu_composite(gate: torch.Tensor, up: torch.Tensor):
    return F.silu(gate) * up


# ---------------------------------------------------------------- cases

@dataclass
class Case:
    op: str
    mode: str  # "fwd" or "fwd+bwd"
    shape: str
    nbytes: int  # bytes the op must move at least (inputs read once, outputs written once)
    ours: Callable[[], object]
    ref: Optional[Callable[[], object]] = None
    eager: Optional[Callable[[], object]] = None
    compiled: Optional[Callable[[], object]] = None
    times: Dict[str, float] = field(default_factory=dict)
    copy_gbs: float = 0.0  # a plain copy of the same bytes into an existing buffer, measured in the same run
    clone_gbs: float = 0.0  # the same copy allocating its output


def _fwd_bwd(fn, inputs: List[torch.Tensor]):
    """Wrap fn(*inputs) -> tensor(s) into forward + backward of a fixed random projection."""
    def run():
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        first = out[0] if isinstance(out, (tuple, list)) else out
        first.backward(torch.ones_like(first))
    return run


def _compile(fn, enabled: bool):
    if not enabled:
        return None
    return torch.compile(fn, dynamic=False)


def _routing_cases(device: torch.device, gen: torch.Generator, quick: bool, use_compile: bool) -> List[Case]:
    """topk_gating, and route_plan on the routing it produces (capacity factor 1.25)."""
    gpu = device.type == "cuda"
    cases: List[Case] = []
    T, E, k = (65536, 256, 8) if gpu else (65536, 64, 2)
    if quick:
        T = 4096
    dtype = torch.bfloat16 if gpu else torch.float32
    logits = torch.randn(T, E, generator=gen).to(device=device, dtype=dtype)
    es = logits.element_size()
    nbytes = T * E * es + T * k * (es + 8)
    shape = f"T={T} E={E} k={k} {str(dtype).replace('torch.', '')}"
    c_topk = _compile(topk_softmax_composite, use_compile)
    cases.append(Case("topk_gating", "fwd", shape, nbytes,
                      ours=lambda: torchmoe.topk_gating(logits, k),
                      ref=lambda: reference.topk_gating(logits, k),
                      eager=lambda: topk_softmax_composite(logits, k),
                      compiled=(lambda: c_topk(logits, k)) if c_topk else None))
    leaf = logits.clone().requires_grad_(True)
    c_topk_b = _compile(lambda l: topk_softmax_composite(l, k), use_compile)
    cases.append(Case("topk_gating", "fwd+bwd", shape, 2 * nbytes + T * E * es,
                      ours=_fwd_bwd(lambda l: torchmoe.topk_gating(l, k), [leaf]),
                      ref=_fwd_bwd(lambda l: reference.topk_gating(l, k), [leaf]),
                      eager=_fwd_bwd(lambda l: topk_softmax_composite(l, k), [leaf]),
                      compiled=_fwd_bwd(c_topk_b, [leaf]) if c_topk_b else None))

    # route_plan on the same routing, capacity factor 1.25
    indices = torchmoe.topk_gating(logits.float(), k)[1]
    cap = torchmoe.capacity(T, E, k, 1.25)
    c_plan = _compile(sort_plan_composite, use_compile)
    cases.append(Case("route_plan", "fwd", f"T={T} E={E} k={k} cap={cap}", 2 * T * k * 8 + E * 8,
                      ours=lambda: torchmoe.route_plan(indices, E, cap),
                      ref=lambda: reference.route_plan(indices, E, cap),
                      eager=lambda: sort_plan_composite(indices, E, cap),
                      compiled=(lambda: c_plan(indices, E, cap)) if c_plan else None))
    return cases


def _dispatch_cases(device: torch.device, gen: torch.Generator, quick: bool, use_compile: bool) -> List[Case]:
    """dispatch / combine on a dropless plan."""
    gpu = device.type == "cuda"
    cases: List[Case] = []
    T, d, k, E = (65536, 4096, 8, 256) if gpu else (16384, 1024, 2, 64)
    if quick:
        T = 2048
    rows_dtype = torch.bfloat16 if gpu else torch.float32
    x = torch.randn(T, d, generator=gen).to(device=device, dtype=rows_dtype)
    idx = torch.randn(T, E, generator=gen).to(device).topk(k, dim=-1).indices
    dest, _ = torchmoe.route_plan(idx, E, -1)
    R = T * k
    weights = torch.rand(T, k, generator=gen).to(device)
    es = x.element_size()
    shape = f"T={T} d={d} k={k} {str(rows_dtype).replace('torch.', '')}"
    expert_out = torch.randn(R, d, generator=gen).to(device=device, dtype=rows_dtype)
    c_disp = _compile(dispatch_composite, use_compile)
    c_comb = _compile(combine_composite, use_compile)
    cases.append(Case("dispatch", "fwd", shape, T * d * es + R * d * es + R * 8,
                      ours=lambda: torchmoe.dispatch(x, dest, R),
                      ref=lambda: reference.dispatch(x, dest, R),
                      eager=lambda: dispatch_composite(x, dest, R),
                      compiled=(lambda: c_disp(x, dest, R)) if c_disp else None))
    cases.append(Case("combine", "fwd", shape, R * d * es + T * d * es + R * 12,
                      ours=lambda: torchmoe.combine(expert_out, dest, weights),
                      ref=lambda: reference.combine(expert_out, dest, weights),
                      eager=lambda: combine_composite(expert_out, dest, weights),
                      compiled=(lambda: c_comb(expert_out, dest, weights)) if c_comb else None))

    def chain(disp, comb):
        return lambda: comb(disp(x, dest, R), dest, weights)

    cases.append(Case("dispatch+combine", "fwd", shape, 2 * (T * d * es + R * d * es),
                      ours=chain(torchmoe.dispatch, torchmoe.combine),
                      ref=chain(reference.dispatch, reference.combine),
                      eager=chain(dispatch_composite, combine_composite),
                      compiled=chain(c_disp, c_comb) if c_disp else None))
    xl = x.clone().requires_grad_(True)
    wl = weights.clone().requires_grad_(True)

    def chain_bwd(disp, comb):
        return _fwd_bwd(lambda a, w: comb(disp(a, dest, R), dest, w), [xl, wl])

    cases.append(Case("dispatch+combine", "fwd+bwd", shape, 4 * (T * d * es + R * d * es),
                      ours=chain_bwd(torchmoe.dispatch, torchmoe.combine),
                      ref=chain_bwd(reference.dispatch, reference.combine),
                      eager=chain_bwd(dispatch_composite, combine_composite),
                      compiled=chain_bwd(c_disp, c_comb) if c_disp else None))
    return cases


def _grouped_mm_cases(device: torch.device, gen: torch.Generator, quick: bool, use_compile: bool) -> List[Case]:
    """grouped_mm over a dropless layout (one FFN projection)."""
    gpu = device.type == "cuda"
    cases: List[Case] = []
    if torch._C._dispatch_has_kernel_for_dispatch_key("torchmoe::grouped_mm", device.type.upper()):
        T, E, k, d_in, d_out = (16384, 64, 8, 2048, 1024) if gpu else (8192, 8, 2, 512, 1024)
        if quick:
            T = 1024
        mm_dtype = torch.bfloat16 if gpu else torch.float32
        idx = torch.randn(T, E, generator=gen).to(device).topk(k, dim=-1).indices
        counts = torch.bincount(idx.reshape(-1), minlength=E)
        xg = torch.randn(T * k, d_in, generator=gen).to(device=device, dtype=mm_dtype)
        wg = (torch.randn(E, d_in, d_out, generator=gen) / math.sqrt(d_in)).to(device=device, dtype=mm_dtype)
        es = xg.element_size()
        shape = f"rows={T * k} E={E} {d_in}x{d_out} {str(mm_dtype).replace('torch.', '')}"
        nbytes = (T * k * (d_in + d_out) + E * d_in * d_out) * es
        # compiled: the torch.cat loop (reference.grouped_mm); torch.compile of the out= loop runs 2x slower.
        compiled = _compile(reference.grouped_mm, use_compile)
        cases.append(Case("grouped_mm", "fwd", shape, nbytes,
                          ours=lambda: torchmoe.grouped_mm(xg, wg, counts),
                          ref=lambda: reference.grouped_mm(xg, wg, counts),
                          eager=lambda: grouped_mm_composite(xg, wg, counts),
                          compiled=(lambda: compiled(xg, wg, counts)) if compiled else None))
        xgl, wgl = xg.clone().requires_grad_(True), wg.clone().requires_grad_(True)

        def loop(fn):
            return _fwd_bwd(lambda a, b: fn(a, b, counts), [xgl, wgl])

        # No eager column: autograd refuses out=, so the loop with a gradient is the torch.cat one, i.e. ref.
        cases.append(Case("grouped_mm", "fwd+bwd", shape, 3 * nbytes,
                          ours=loop(torchmoe.grouped_mm), ref=loop(reference.grouped_mm),
                          compiled=loop(compiled) if compiled else None))
    return cases


def _swiglu_cases(device: torch.device, gen: torch.Generator, quick: bool, use_compile: bool) -> List[Case]:
    """swiglu on the hidden activations of a dropless layer (rows = T * k)."""
    gpu = device.type == "cuda"
    rows, d_ff = (131072, 2048) if gpu else (16384, 1024)
    if quick:
        rows = 1024
    dtype = torch.bfloat16 if gpu else torch.float32
    gate = torch.randn(rows, d_ff, generator=gen).to(device=device, dtype=dtype)
    up = torch.randn(rows, d_ff, generator=gen).to(device=device, dtype=dtype)
    shape = f"rows={rows} d_ff={d_ff} {str(dtype).replace('torch.', '')}"
    nbytes = gate.numel() * gate.element_size()
    compiled = _compile(swiglu_composite, use_compile)
    cases = [Case("swiglu", "fwd", shape, 3 * nbytes,
                  ours=lambda: torchmoe.swiglu(gate, up),
                  ref=lambda: reference.swiglu(gate, up),
                  eager=lambda: swiglu_composite(gate, up),
                  compiled=(lambda: compiled(gate, up)) if compiled else None)]
    gl, ul = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    # forward reads 2 and writes 1; backward reads grad, gate, up and writes 2 gradients
    cases.append(Case("swiglu", "fwd+bwd", shape, 8 * nbytes,
                      ours=_fwd_bwd(torchmoe.swiglu, [gl, ul]),
                      ref=_fwd_bwd(reference.swiglu, [gl, ul]),
                      eager=_fwd_bwd(swiglu_composite, [gl, ul]),
                      compiled=_fwd_bwd(compiled, [gl, ul]) if compiled else None))
    return cases


def build_cases(device: torch.device, quick: bool, use_compile: bool) -> List[Case]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    return (_routing_cases(device, gen, quick, use_compile) + _dispatch_cases(device, gen, quick, use_compile)
            + _grouped_mm_cases(device, gen, quick, use_compile) + _swiglu_cases(device, gen, quick, use_compile))


def _fmt_ms(t: Optional[float]) -> str:
    return "-" if t is None else f"{t * 1e3:.3f}"


def _fmt_ratio(other: Optional[float], ours: float) -> str:
    return "-" if other is None else f"{other / ours:.2f}x"


def run(argv=None) -> List[Case]:
    parser = argparse.ArgumentParser(prog="bench_ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--reps", type=int, default=7, help="measurements per variant (median taken)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile composites")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
    parser.add_argument("--only", default=None, help="comma-separated op names to run")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = build_cases(device, args.quick, not args.no_compile)
    if args.only:
        wanted = set(args.only.split(","))
        cases = [c for c in cases if c.op in wanted]

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{cpu_model()}, {torch.get_num_threads()} threads")
    print(f"torchmoe {torchmoe.__version__} | torch {torch.__version__} | {where} | median of {args.reps} | "
          f"copy: a plain copy of each case's bytes (at most {COPY_CAP >> 20} MiB) into an existing buffer; "
          f"clone: the same copy allocating its output")
    header = ("| op | pass | shape | ours ms | ref ms | eager ms | compiled ms | vs ref | vs eager | "
              "vs compiled | GB/s | copy GB/s | of copy | of clone |")
    print(header)
    print("|" + "---|" * 14)
    copies: Dict[int, Tuple[float, float]] = {}  # bytes -> (copy, clone) GB/s, shared by cases of equal size
    for case in cases:
        for name in ("ours", "ref", "eager", "compiled"):
            fn = getattr(case, name)
            if fn is not None:
                case.times[name] = time_fn(fn, device, args.reps)
        nbytes = min(case.nbytes, COPY_CAP)
        if nbytes not in copies:
            copies[nbytes] = (copy_bandwidth(nbytes, device, args.reps, allocate=False),
                              copy_bandwidth(nbytes, device, args.reps))
        case.copy_gbs, case.clone_gbs = copies[nbytes]
        t = case.times["ours"]
        gbs = case.nbytes / t / 1e9
        print(f"| {case.op} | {case.mode} | {case.shape} | {_fmt_ms(t)} | {_fmt_ms(case.times.get('ref'))} | "
              f"{_fmt_ms(case.times.get('eager'))} | {_fmt_ms(case.times.get('compiled'))} | "
              f"{_fmt_ratio(case.times.get('ref'), t)} | {_fmt_ratio(case.times.get('eager'), t)} | "
              f"{_fmt_ratio(case.times.get('compiled'), t)} | {gbs:.1f} | {case.copy_gbs:.1f} | "
              f"{gbs / case.copy_gbs:.2f} | {gbs / case.clone_gbs:.2f} |", flush=True)
    return cases


def main(argv=None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
