"""Decode-size MoE benchmark (CPU): the torchmoe.nn.MoE layer forward (eval, no_grad, dropless) on T tokens with
float32, bfloat16, int8 and int4 experts, against what a user would run instead, and against the machine's limit.

    python benchmarks/bench_decode.py                      # every dtype, Mixtral-routing and Qwen3-30B-A3B shapes
    python benchmarks/bench_decode.py --dtypes int4,bfloat16 --shapes qwen3 --tokens 1,16,128,4096
    python benchmarks/bench_decode.py --quick              # a small shape, a few sizes (a smoke run)

Layers: float32 and bfloat16 experts run on bfloat16 / float32 activations of their own dtype; int8 (symmetric,
a scale per expert and column) and int4 (symmetric, group 128) experts come from torchmoe.nn.quantize_experts
of the bfloat16 layer and run on bfloat16 activations. Each step reads its experts' weights once, so its floor is
the time to read those bytes, or at larger T the time of its multiply-adds at the machine's GEMM rate:

  hit        experts hit, averaged over the rotating token batches
  MB         bytes of the experts hit as stored (int4/int8 codes, scales included) plus the router
  ms         median time of one forward of the whole layer (routing, dispatch, products, combine)
  roof ms    max(MB / read bandwidth, flops / float32 GEMM rate), both measured in this run. Read bandwidth: the
             faster of two probes over a buffer of 256 MiB or 4x the last-level cache, whichever is larger, timed
             in turn with the layer in every row (the machine's rate drifts): x.sum() over float32, and one token
             through torchmoe.grouped_mm over bfloat16 experts filling the buffer (a single-row product is a
             plain stream over its weight, and on some CPUs it reads faster than x.sum(): 43 against 26 GB/s on
             a 2-core Zen 4 VM; a roof below what the machine reads would flatter every fraction)
  of roof    roof ms / ms (1.0 = at the machine's limit)
  other us   the layer's time outside the expert products: the layer with hollow experts (d_ff = 0, see
             outside_experts), so routing, dispatch, the products' fixed costs, activation and combine
  x bf16     the bfloat16 layer's ms at this T over this layer's (> 1: faster than bfloat16 experts)
  base ms    what a user has instead: F.grouped_mm (float32/bfloat16, transformers' "grouped_mm" experts), or
             torch's weight-only products in a per-expert loop (int8: aten._weight_int8pack_mm; int4:
             aten._weight_int4pack_mm_for_cpu, torchao's CPU path); "x base" = base ms / ms
Memory traffic as in a real model: --layers copies of the layer (default: enough to exceed 4x the last-level cache,
at most 4 GB) are cycled through and the tokens rotate over --batches random batches, so a step's experts come
from memory, not from the cache. Medians of --reps measurements; the variants run in turn within every repeat.
"""
import argparse
import copy
import glob
import math
from typing import Tuple

import torch
import torch.nn.functional as F

import torchmoe
from torchmoe.bench import cpu_model
from torchmoe.nn import MoE, quantize_experts

from bench_moe import median_times  # noqa: E402  (benchmarks/ is the script's folder)

SHAPES = {
    "mixtral": (1024, 1024, 8, 2),  # d_model, d_ff, E, k: Mixtral's routing (8 experts, top-2) at a width that fits
    "qwen3": (2048, 768, 128, 8),   # Qwen3-30B-A3B's layer: 128 experts of 2048 x 768, top-8
    "e64top8": (1024, 512, 64, 8),  # many small experts (OLMoE's routing at half its width)
}
DTYPES = ("float32", "bfloat16", "int8", "int4")
INT4_GROUP = 128


def parse_shape(text: str):
    """A name from SHAPES or d_model x d_ff x E x k, e.g. 2048x768x128x8."""
    if text in SHAPES:
        return text, SHAPES[text]
    try:
        d_model, d_ff, E, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: {text!r} is neither one of {sorted(SHAPES)} nor d_model x d_ff x E x k")
    return "custom", (d_model, d_ff, E, k)


def last_level_cache_bytes() -> int:
    sizes = {}
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(f"{path}/level") as f, open(f"{path}/size") as g:
                text = g.read().strip()
                unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
                sizes[int(f.read())] = int(text.rstrip("KMG")) * unit
        except (OSError, ValueError):
            pass
    return sizes[max(sizes)] if sizes else 32 << 20


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return " ".join(f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                                                 "avx512_fp16", "amx_bf16", "amx_int8") if f in have)
    except OSError:
        pass
    return ""


def read_bytes(llc: int) -> int:
    """The read probe's size: 256 MiB, or 4x the last-level cache where that is larger (a 300 MiB LLC holds a
    256 MiB buffer, and the probe then measures the cache, not memory), at most 4 GiB."""
    return min(max(256 << 20, 4 * llc), 4 << 30)


class ReadProbes:
    """The two read probes over nbytes each: x.sum() over float32, and one token through grouped_mm over bfloat16
    experts of 2048 x 1024 (8 MiB each) filling the buffer. probes() gives them to time with the layer; gbps()
    turns their times into the read bandwidth (the faster)."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.sum_buffer = torch.ones(nbytes // 4)
        experts = max(1, nbytes // (2048 * 1024 * 2))
        self.weight = torch.ones(experts, 2048, 1024, dtype=torch.bfloat16)
        self.x = torch.ones(experts, 2048, dtype=torch.bfloat16)
        self.counts = torch.ones(experts, dtype=torch.long)
        self.stream_bytes = self.weight.numel() * 2

    def probes(self) -> dict:
        return {"read sum": lambda: self.sum_buffer.sum(),
                "read stream": lambda: torchmoe.grouped_mm(self.x, self.weight, self.counts)}

    def gbps(self, times: dict) -> Tuple[float, float]:
        """(read bandwidth, x.sum()'s share of it) in GB/s from the probes' times."""
        by_sum = self.nbytes / times["read sum"] / 1e9
        by_stream = self.stream_bytes / times["read stream"] / 1e9
        return max(by_sum, by_stream), by_sum

    def measure(self, reps: int) -> Tuple[float, float]:
        with torch.no_grad():
            return self.gbps(median_times(self.probes(), reps, min_time=0.02))


def gemm_rate(reps: int) -> float:
    """float32 GFLOP/s of torch.mm at 2048 x 2048 x 2048."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048 ** 3 / median_times({"mm": lambda: torch.mm(a, b)}, reps, min_time=0.05)["mm"] / 1e9


def expert_bytes(layer) -> int:
    """Bytes of one expert's three matrices as stored (codes, scales and zero points)."""
    total = 0
    for name in ("gate_proj", "up_proj", "down_proj"):
        if hasattr(layer, "quantized_weight"):
            total += layer.quantized_weight(name).nbytes
        else:
            total += getattr(layer, name).numel() * getattr(layer, name).element_size()
    return total // layer.num_experts


def build_layer(dtype_name: str, d_model: int, d_ff: int, E: int, k: int) -> MoE:
    torch.manual_seed(0)
    moe = MoE(d_model, d_ff, E, k=k, capacity_factor=None).eval()
    if dtype_name == "float32":
        return moe
    moe = moe.to(torch.bfloat16)
    if dtype_name == "int8":
        return quantize_experts(moe, 8)
    if dtype_name == "int4":
        return quantize_experts(moe, 4, group_size=min(INT4_GROUP, d_ff, d_model))
    return moe


class Cycle:
    """fn(layer, x) on the next layer copy and the next token batch each call (weights from memory, not cache)."""

    def __init__(self, layers, batches, fn):
        self.layers, self.batches, self.fn, self.i = layers, batches, fn, 0

    def __call__(self):
        i = self.i
        self.i += 1
        return self.fn(self.layers[i % len(self.layers)], self.batches[i % len(self.batches)])


def routing(moe, x):
    weights, indices, _ = moe.router(x)
    return weights, indices


def hf_grouped_mm(moe, x):
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


class TorchWeightOnly:
    """torch's own weight-only products for one quantized layer, per expert (the layout torchao's CPU path uses):
    int8: aten._weight_int8pack_mm (int8 [out, in], a bfloat16 scale per out); int4: aten._weight_int4pack_mm_for_cpu
    (packed by aten._convert_weight_to_int4pack_for_cpu, bfloat16 scales and zeros per group). Same values as the
    torchmoe layer's quantized weights."""

    def __init__(self, layer):
        self.bits = layer.bits
        self.k, self.num_experts = layer.k, layer.num_experts
        self.router = layer.router
        self.mats = {}
        for name in ("gate_proj", "up_proj", "down_proj"):
            qw = layer.quantized_weight(name)
            per_expert = []
            for e in range(qw.shape[0]):
                if self.bits == 8:
                    per_expert.append((qw.qweight[e].t().contiguous(), qw.scales[e, 0].to(torch.bfloat16)))
                else:
                    codes = torch.stack((qw.qweight[e] & 15, qw.qweight[e] >> 4), 1).reshape(qw.shape[1], qw.shape[2])
                    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous().int(), 2)
                    scales_zeros = torch.stack((qw.scales[e], torch.zeros_like(qw.scales[e])), -1).to(torch.bfloat16)
                    per_expert.append((packed, scales_zeros.contiguous()))
            self.mats[name] = per_expert
        self.group_size = layer.up_proj_group_size

    def mm(self, x, name, e):
        w, s = self.mats[name][e]
        if self.bits == 8:
            return torch.ops.aten._weight_int8pack_mm(x, w, s)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, self.group_size, s)

    def __call__(self, x):
        weights, indices, _ = self.router(x)
        y = torch.zeros_like(x)
        for e in torch.unique(indices).tolist():
            tok, choice = torch.where(indices == e)
            xe = x[tok]
            h = F.silu(self.mm(xe, "gate_proj", e)) * self.mm(xe, "up_proj", e)
            y.index_add_(0, tok, self.mm(h, "down_proj", e) * weights[tok, choice, None].to(x.dtype))
        return y


def outside_experts(moe, x):
    """A callable running the layer with hollow experts (d_ff = 0: no multiply-adds, no weight bytes; float in the
    activations' dtype for int8/int4 layers) and the layer's router, on the path the layer takes (the one-op
    inference path): the time of everything else (routing, dispatch, the products' fixed costs, combine, Python)."""
    E, d_model = moe.num_experts, moe.d_model
    hollow = MoE(d_model, 1, E, k=moe.k, capacity_factor=None, activation=moe.activation).eval()
    hollow.router = moe.router
    for name, shape in (("gate_proj", (E, d_model, 0)), ("up_proj", (E, d_model, 0)), ("down_proj", (E, 0, d_model))):
        if getattr(hollow, name, None) is not None:
            setattr(hollow, name, torch.nn.Parameter(torch.empty(shape, dtype=x.dtype), requires_grad=False))
    return lambda: hollow(x)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,2,4,8,16,32,64,128")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--shapes", default="mixtral,qwen3",
                   help=f"comma-separated: names of {sorted(SHAPES)} or d_model x d_ff x E x k (2048x768x128x8)")
    p.add_argument("--layers", type=int, default=0, help="copies of the layer cycled through (0: automatic)")
    p.add_argument("--batches", type=int, default=8, help="random token batches rotated through")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--no-compare", action="store_true", help="skip the baseline column")
    p.add_argument("--quick", action="store_true", help="a small shape and a few sizes (a smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.tokens, args.reps, args.batches = "256x256x8x2", "1,40", 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = args.dtypes.split(",")
    for name in dtypes:
        if name not in DTYPES:
            raise SystemExit(f"--dtypes: {name!r} is not one of {DTYPES}")

    llc = last_level_cache_bytes()
    probe_bytes = read_bytes(llc)
    read = ReadProbes(probe_bytes)
    bw, bw_sum = read.measure(args.reps)
    rate = gemm_rate(args.reps)
    print(f"{cpu_model()} ({cpu_flags()}, LLC {llc >> 20} MiB) | torch {torch.__version__} | "
          f"{torch.get_num_threads()} threads | read {bw:.1f} GB/s at the start (x.sum() {bw_sum:.1f}; the faster of "
          f"x.sum() and a one-token bfloat16 grouped_mm over {probe_bytes >> 20} MiB, measured again in every row) | "
          "float32 GEMM "
          f"{rate:.0f} GFLOP/s (torch.mm 2048^3) | median of {args.reps}")
    print("| shape | dtype | T | hit | MB | ms | read GB/s | roof ms | of roof | other us | x bf16 | base | base ms "
          "| x base |")
    print("|" + "---|" * 14)
    bf16_ms = {}
    summary = []
    for shape_text in args.shapes.split(","):
        shape, (d_model, d_ff, E, k) = parse_shape(shape_text)
        for dtype_name in dtypes:
            layer = build_layer(dtype_name, d_model, d_ff, E, k)
            act = torch.float32 if dtype_name == "float32" else torch.bfloat16
            per_expert = expert_bytes(layer)
            layer_bytes = per_expert * E
            copies = args.layers or max(1, min(math.ceil(4 * llc / layer_bytes), (4 << 30) // layer_bytes))
            layers = [layer] + [copy.deepcopy(layer) for _ in range(copies - 1)]
            base_name = None
            if not args.no_compare:
                if dtype_name in ("int8", "int4"):
                    base_name = f"torch {dtype_name} loop"
                    bases = [TorchWeightOnly(m) for m in layers]
                    base_fn = lambda m, x: m(x)  # noqa: E731
                else:
                    base_name = "F.grouped_mm"
                    bases, base_fn = layers, hf_grouped_mm
            for T in [int(t) for t in args.tokens.split(",")]:
                g = torch.Generator().manual_seed(T)
                batches = [torch.randn(T, d_model, generator=g).to(act) for _ in range(args.batches)]
                with torch.no_grad():
                    hits = [torch.unique(routing(layer, x)[1]).numel() for x in batches]
                    hit = sum(hits) / len(hits)
                    nbytes = hit * per_expert + layer.router.weight.numel() * layer.router.weight.element_size()
                    flops = 2.0 * T * k * 3 * d_model * d_ff
                    fns = {"ours": Cycle(layers, batches, lambda m, x: m(x)),
                           "other": outside_experts(layer, batches[0]), **read.probes()}
                    if base_name is not None:
                        fns["base"] = Cycle(bases, batches, base_fn)
                        y, y_base = layer(batches[0]), base_fn(bases[0], batches[0])
                        tol = 1e-3 if act == torch.float32 else 5e-2
                        torch.testing.assert_close(y_base.float(), y.float(), rtol=tol, atol=tol,
                                                   msg=f"{base_name} disagrees with torchmoe")
                    times = median_times(fns, args.reps, min_time=0.02)
                row_bw, _ = read.gbps(times)
                roof = max(nbytes / (row_bw * 1e9), flops / (rate * 1e9))
                t = times["ours"]
                if dtype_name == "bfloat16":
                    bf16_ms[(shape, T)] = t
                x_bf16 = f"{bf16_ms[(shape, T)] / t:.2f}x" if (shape, T) in bf16_ms else "-"
                base = (f"| {base_name} | {times['base'] * 1e3:.3f} | {times['base'] / t:.2f}x |" if "base" in times
                        else "| - | - | - |")
                summary.append((shape, dtype_name, T, roof / t))
                print(f"| {shape} {d_model}/{d_ff} E={E} k={k} | {dtype_name} | {T} | {hit:.1f} | {nbytes / 1e6:.1f} | "
                      f"{t * 1e3:.3f} | {row_bw:.1f} | {roof * 1e3:.3f} | {roof / t:.2f} | "
                      f"{times['other'] * 1e6:.0f} | {x_bf16} " + base, flush=True)
            del layers
    for lo, hi in ((1, 16), (32, 128)):
        fr = [f for _, _, T, f in summary if lo <= T <= hi]
        if fr:
            print(f"lowest 'of roof' at T = {lo}..{hi}: {min(fr):.2f}")


if __name__ == "__main__":
    main()
