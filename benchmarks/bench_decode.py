"""Decode-size MoE benchmark (CPU): torchmoe.nn.MoE forward (eval, no_grad, dropless) on a few tokens, against
the same layer written HF-style on torch.nn.functional.grouped_mm and as a per-expert mm loop.

    python benchmarks/bench_decode.py                       # T = 1, 2, 4, 8, 16, 64; fp32 and bf16; two shapes
    python benchmarks/bench_decode.py --tokens 1,4,16 --dtypes bfloat16 --shapes mixtral

A decode step has to read the weights of every expert it hits once (3 matrices of d_model x d_ff per expert for
SwiGLU) and little else, so its floor is the time to read those bytes. Columns:
  hit       experts hit by the step's tokens (the routing is that of the layer on random tokens)
  MB        bytes of the experts hit (plus the router weight)
  ms        median time of one forward of the layer; GB/s = MB / ms
  read      the machine's read bandwidth, x.sum() over 256 MiB of float32, timed in turn with the layer within
            each repeat (so both see the same load from other processes)
  of read   GB/s over read
  other us  the layer's time outside the expert products: the layer run with its grouped_mm / swiglu calls
            replaced by their precomputed result (routing, dispatch, combine, aux loss, Python)
  --layers N cycles through N copies of the layer (same values, distinct memory), so that with N x the layer's
            weights above the last-level cache every step reads them from memory, as a real model's layers do.
  hf / loop the same step through F.grouped_mm (sorted tokens, int32 offsets; as transformers' "grouped_mm"
            experts) and through a per-expert loop of x[tok] @ W[e] (as HF eager Mixtral); "x" = their time over
            torchmoe's (> 1: torchmoe faster)
Medians of --reps measurements (each repeated to last at least 20 ms); the variants run in turn within every
repeat, so load from other processes on a shared machine hits them alike.
"""
import argparse
import copy

import torch
import torch.nn.functional as F

import torchmoe
from torchmoe.bench import cpu_model
from torchmoe.nn import MoE

from bench_moe import median_times  # noqa: E402  (benchmarks/ is the script's folder)

SHAPES = {
    "mixtral": (1024, 1024, 8, 2),  # d_model, d_ff, E, k: Mixtral's routing, at a width that fits here
    "e64top8": (1024, 512, 64, 8),  # many small experts (OLMoE's routing at half its width)
}


def parse_shape(text: str):
    """A name from SHAPES or d_model x d_ff x E x k, e.g. 2048x768x128x8."""
    if text in SHAPES:
        return text, SHAPES[text]
    try:
        d_model, d_ff, E, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: {text!r} is neither one of {sorted(SHAPES)} nor d_model x d_ff x E x k")
    return "custom", (d_model, d_ff, E, k)


def last_level_cache() -> str:
    sizes = {}
    try:
        import glob
        for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
            with open(f"{path}/level") as f, open(f"{path}/size") as g:
                sizes[int(f.read())] = g.read().strip()
    except OSError:
        pass
    return f"L{max(sizes)} {sizes[max(sizes)]}" if sizes else "LLC unknown"


class RoundRobin:
    """Calls fn(layer, x) on the next of `layers` copies each time (distinct weights in memory, same values)."""

    def __init__(self, layers, fn):
        self.layers, self.fn, self.i = layers, fn, 0

    def __call__(self, x):
        layer = self.layers[self.i]
        self.i = (self.i + 1) % len(self.layers)
        return self.fn(layer, x)


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return " ".join(f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16",
                                                 "avx512_fp16", "amx_bf16") if f in have)
    except OSError:
        pass
    return ""


READ_BYTES = 256 << 20


def read_bandwidth(reps: int, x: torch.Tensor) -> float:
    """GB/s of x.sum() over 256 MiB of float32 (reads only)."""
    t = median_times({"sum": lambda: x.sum()}, reps, min_time=0.02)["sum"]
    return READ_BYTES / t / 1e9


def routing(moe: MoE, x: torch.Tensor):
    weights, indices, _ = moe.router(x)
    return weights, indices


def hf_grouped_mm(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The experts as transformers' grouped_mm backend runs them: tokens sorted by expert, F.grouped_mm."""
    weights, indices = routing(moe, x)
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // moe.k
    rows = x[token]
    offs = torch.cumsum(torch.bincount(flat, minlength=moe.num_experts), 0).to(torch.int32)
    h = F.silu(F.grouped_mm(rows, moe.gate_proj, offs=offs)) * F.grouped_mm(rows, moe.up_proj, offs=offs)
    out = F.grouped_mm(h, moe.down_proj, offs=offs) * weights.reshape(-1)[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, out)


def mm_loop(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """HF eager Mixtral's loop: for each expert hit, its tokens, three mm, scaled index_add_."""
    weights, indices = routing(moe, x)
    y = torch.zeros_like(x)
    hit = torch.unique(indices).tolist()
    for e in hit:
        tok, choice = torch.where(indices == e)
        xe = x[tok]
        h = F.silu(xe @ moe.gate_proj[e]) * (xe @ moe.up_proj[e])
        y.index_add_(0, tok, (h @ moe.down_proj[e]) * weights[tok, choice, None].to(x.dtype))
    return y


def outside_experts(moe: MoE, x: torch.Tensor):
    """A callable running the layer with its expert products replaced by their precomputed result: the time of
    everything else (routing, dispatch, combine, aux loss, Python)."""
    _, indices = routing(moe, x)
    dest, counts = torchmoe.route_plan(indices, moe.num_experts, -1)
    result = moe._experts_grouped(torchmoe.dispatch(x, dest, x.shape[0] * moe.k), counts)

    def run():
        moe._experts_grouped = lambda rows, counts: result
        try:
            return moe(x)
        finally:
            del moe._experts_grouped
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,2,4,8,16,64")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--shapes", default="mixtral,e64top8",
                   help=f"comma-separated: names of {sorted(SHAPES)} or d_model x d_ff x E x k (2048x768x128x8)")
    p.add_argument("--layers", type=int, default=1, help="copies of the layer cycled through (see above)")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--no-compare", action="store_true", help="skip the F.grouped_mm and mm-loop columns")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    read_buffer = torch.ones(READ_BYTES // 4)
    bw = read_bandwidth(args.reps, read_buffer)
    print(f"{cpu_model()} ({cpu_flags()}, {last_level_cache()}) | torch {torch.__version__} | "
          f"{torch.get_num_threads()} threads | read bandwidth {bw:.1f} GB/s (x.sum() over 256 MiB) | "
          f"median of {args.reps} | {args.layers} layer copies")
    header = ("| shape | dtype | T | hit | MB | ms | GB/s | read GB/s | of read | other us | hf ms | x hf | loop ms "
              "| x loop |")
    print(header)
    print("|" + "---|" * 14)
    fractions = []
    for shape_text in args.shapes.split(","):
        shape, (d_model, d_ff, E, k) = parse_shape(shape_text)
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            torch.manual_seed(0)
            moe = MoE(d_model, d_ff, E, k=k, capacity_factor=None).eval().to(dtype)
            layers = [moe] + [copy.deepcopy(moe) for _ in range(args.layers - 1)]
            for T in [int(t) for t in args.tokens.split(",")]:
                x = torch.randn(T, d_model).to(dtype)
                with torch.no_grad():
                    _, indices = routing(moe, x)
                    hit = int(torch.unique(indices).numel())
                    nbytes = hit * 3 * d_model * d_ff * moe.up_proj.element_size() + moe.router.weight.numel() * 4
                    ours = RoundRobin(layers, lambda layer, t: layer(t))
                    fns = {"ours": lambda: ours(x), "other": outside_experts(moe, x),
                           "read": lambda: read_buffer.sum()}
                    if not args.no_compare:
                        hf, loop = RoundRobin(layers, hf_grouped_mm), RoundRobin(layers, mm_loop)
                        fns["hf"] = lambda: hf(x)
                        fns["loop"] = lambda: loop(x)
                        tol = 1e-4 if dtype == torch.float32 else 3e-2
                        y = moe(x)
                        for name, fn in (("hf", hf_grouped_mm), ("loop", mm_loop)):
                            torch.testing.assert_close(fn(moe, x), y, rtol=tol, atol=tol, msg=f"{name} disagrees")
                    times = median_times(fns, args.reps, min_time=0.02)
                t = times["ours"]
                gbs = nbytes / t / 1e9
                read = READ_BYTES / times["read"] / 1e9
                fractions.append((T, gbs / read))
                cmp = "| - | - | - | - |"
                if "hf" in times:
                    cmp = (f"| {times['hf'] * 1e3:.3f} | {times['hf'] / t:.2f}x | {times['loop'] * 1e3:.3f} | "
                           f"{times['loop'] / t:.2f}x |")
                print(f"| {shape} {d_model}/{d_ff} E={E} k={k} | {dtype_name} | {T} | {hit} | {nbytes / 1e6:.1f} | "
                      f"{t * 1e3:.3f} | {gbs:.1f} | {read:.1f} | {gbs / read:.2f} | {times['other'] * 1e6:.0f} "
                      + cmp,
                      flush=True)
    target = [f for T, f in fractions if T in (1, 4, 16)]
    if target:
        print(f"lowest 'of read' at T = 1, 4, 16: {min(target):.2f} (target 0.70)")


if __name__ == "__main__":
    main()
