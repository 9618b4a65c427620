"""Focused GPU benchmark of torchmoe's CUDA kernels, forward and backward ops timed directly.

Each op at the CUDA targets' sizes (T=65536, E=256, k=8 bf16 logits; T=65536, d=4096, k=8 bf16 rows) against
the plain-PyTorch composites of torchmoe.bench (eager, and torch.compile of them) and torchmoe.reference,
with CUDA-event medians (torchmoe.bench.time_fn) and the bandwidth ours reaches against a device copy of the
same bytes. Ops (and copies) that take under 0.5 ms are also timed replayed from a CUDA graph (device time
without the per-call host overhead); bandwidth uses that time where measured.
Backward ops are called directly (`torch.ops.torchmoe._<op>_backward`), so no Autograd kernel is needed;
the composites' backward runs through autograd.

    PYTHONPATH=python python3 tools/gpu/bench_cuda.py [--reps 7] [--no-compile] [--json out.json]
"""
import argparse
import json
import math

import torch

import torchmoe
from torchmoe import reference
from torchmoe.bench import (COPY_CAP, combine_composite, copy_bandwidth, dispatch_composite, grouped_mm_composite,
                            sort_plan_composite, time_fn, topk_softmax_composite)

OPS = torch.ops.torchmoe
DEV = torch.device("cuda")
GRAPH_BELOW_S = 5e-4  # calls this short are also timed from a CUDA graph: the host's launch overhead matters


def fwd_bwd(fn, leaves, grad):
    def run():
        for t in leaves:
            t.grad = None
        out = fn(*leaves)
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.backward(grad)
    return run


def graph_time(fn, reps, calls=20):
    """Seconds per call of fn replayed from a CUDA graph of `calls` calls: device time without the host's
    per-call overhead (and a check that fn never synchronises with the host, which capture would reject)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    t = time_fn(graph.replay, DEV, reps) / calls
    del graph
    return t


def device_time(fn, device, reps):
    """Seconds per call; calls under GRAPH_BELOW_S are also replayed from a CUDA graph and the lower time kept."""
    t = time_fn(fn, device, reps)
    return min(t, graph_time(fn, reps)) if t < GRAPH_BELOW_S else t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    compile_ = (lambda f: torch.compile(f, dynamic=False)) if not args.no_compile else (lambda f: None)
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []

    def case(op, mode, shape, nbytes, ours, eager=None, compiled=None, ref=None):
        t = {"ours": time_fn(ours, DEV, args.reps)}
        if t["ours"] < GRAPH_BELOW_S:
            try:
                t["graph"] = graph_time(ours, args.reps)
            except Exception as e:
                print(f"  {op} {mode} graph capture failed: {type(e).__name__}: {str(e)[:300]}")
        for name, fn in (("eager", eager), ("compiled", compiled), ("ref", ref)):
            if fn is not None:
                try:
                    t[name] = time_fn(fn, DEV, args.reps)
                except Exception as e:  # a composite that cannot run here is reported, not fatal
                    print(f"  {op} {mode} {name}: {type(e).__name__}: {str(e)[:200]}")
        rows.append(dict(op=op, mode=mode, shape=shape, nbytes=nbytes, **t))
        r = rows[-1]
        print(f"  {op:10s} {mode:7s} ours {r['ours'] * 1e3:8.3f} ms  " +
              (f"(graph replay {r['graph'] * 1e3:.3f} ms)  " if "graph" in r else "") +
              "  ".join(f"{k} {r[k] * 1e3:8.3f} ms ({r[k] / r['ours']:.2f}x)" for k in ("eager", "compiled", "ref")
                        if k in r), flush=True)

    # ---------------------------------------------------------------- topk_gating
    T, E, k = 65536, 256, 8
    logits = torch.randn(T, E, generator=gen).to(DEV, torch.bfloat16)
    g = torch.randn(T, k, generator=gen).to(DEV, torch.bfloat16)
    shape = f"T={T} E={E} k={k} bf16"
    c_topk = compile_(topk_softmax_composite)
    case("topk_gating", "fwd", shape, T * E * 2 + T * k * 10,
         ours=lambda: torchmoe.topk_gating(logits, k),
         eager=lambda: topk_softmax_composite(logits, k),
         compiled=(lambda: c_topk(logits, k)) if c_topk else None,
         ref=lambda: reference.topk_gating(logits, k))
    _, idx = torchmoe.topk_gating(logits, k)
    case("topk_gating", "bwd", shape, 2 * T * E * 2 + T * k * 10,
         ours=lambda: OPS._topk_gating_backward(g, logits, idx, "softmax", True, 1.0))
    leaf = logits.clone().requires_grad_(True)

    def ours_topk_fb():
        w, i = torchmoe.topk_gating(logits, k)
        return OPS._topk_gating_backward(g, logits, i, "softmax", True, 1.0)

    c_topk_b = compile_(lambda l: topk_softmax_composite(l, k))
    case("topk_gating", "fwd+bwd", shape, 3 * T * E * 2 + 2 * T * k * 10,
         ours=ours_topk_fb,
         eager=fwd_bwd(lambda l: topk_softmax_composite(l, k), [leaf], g),
         compiled=fwd_bwd(c_topk_b, [leaf], g) if c_topk_b else None,
         ref=fwd_bwd(lambda l: reference.topk_gating(l, k), [leaf], g))
    for score, renorm, bias, G, tg in (("sigmoid", True, True, 8, 4), ("softmax", False, False, 1, 1)):
        b = torch.randn(E, generator=gen).to(DEV) * 0.01 if bias else None
        case("topk_gating", "fwd", f"{shape} {score} renorm={renorm} bias={bias} groups={G}/{tg}",
             T * E * 2 + T * k * 10,
             ours=lambda: torchmoe.topk_gating(logits, k, score, renorm, b, G, tg),
             ref=lambda: reference.topk_gating(logits, k, score, renorm, b, G, tg))

    # ---------------------------------------------------------------- route_plan
    cap = torchmoe.capacity(T, E, k, 1.25)
    c_plan = compile_(sort_plan_composite)
    case("route_plan", "fwd", f"T={T} E={E} k={k} cap={cap}", 2 * T * k * 8 + E * 8,
         ours=lambda: torchmoe.route_plan(idx, E, cap),
         eager=lambda: sort_plan_composite(idx, E, cap),
         compiled=(lambda: c_plan(idx, E, cap)) if c_plan else None,
         ref=lambda: reference.route_plan(idx, E, cap))
    case("route_plan", "fwd", f"T={T} E={E} k={k} dropless", 2 * T * k * 8 + E * 8,
         ours=lambda: torchmoe.route_plan(idx, E))
    prio = torch.randn(T, generator=gen).to(DEV)
    case("route_plan", "fwd", f"T={T} E={E} k={k} cap={cap} priority", 2 * T * k * 8 + T * 4,
         ours=lambda: torchmoe.route_plan(idx, E, cap, prio),
         ref=lambda: reference.route_plan(idx, E, cap, prio))
    del logits, leaf

    # ---------------------------------------------------------------- dispatch / combine
    T, d, k, E = 65536, 4096, 8, 256
    x = torch.randn(T, d, generator=gen).to(DEV, torch.bfloat16)
    ridx = torch.randn(T, E, generator=gen).to(DEV).topk(k, dim=-1).indices
    dest, _ = torchmoe.route_plan(ridx, E)
    R = T * k
    weights = torch.rand(T, k, generator=gen).to(DEV)
    eo = torch.randn(R, d, generator=gen).to(DEV, torch.bfloat16)
    gy = torch.randn(T, d, generator=gen).to(DEV, torch.bfloat16)
    shape = f"T={T} d={d} k={k} bf16"
    flat = dest.reshape(-1)
    token = torch.arange(T, device=DEV).repeat_interleave(k)
    c_disp = compile_(dispatch_composite)
    c_comb = compile_(combine_composite)
    case("dispatch", "fwd", shape, T * d * 2 + R * d * 2 + R * 8,
         ours=lambda: torchmoe.dispatch(x, dest, R),
         eager=lambda: dispatch_composite(x, dest, R),
         compiled=(lambda: c_disp(x, dest, R)) if c_disp else None)

    def dispatch_bwd_composite(gout, flat, token):
        return torch.zeros(T, d, dtype=gout.dtype, device=gout.device).index_add_(0, token,
                                                                                 gout.index_select(0, flat))

    c_dbwd = compile_(dispatch_bwd_composite)
    case("dispatch", "bwd", shape, T * d * 2 + R * d * 2 + R * 8,
         ours=lambda: OPS._dispatch_backward(eo, dest),
         eager=lambda: dispatch_bwd_composite(eo, flat, token),
         compiled=(lambda: c_dbwd(eo, flat, token)) if c_dbwd else None)
    case("combine", "fwd", shape, R * d * 2 + T * d * 2 + R * 12,
         ours=lambda: torchmoe.combine(eo, dest, weights),
         eager=lambda: combine_composite(eo, dest, weights),
         compiled=(lambda: c_comb(eo, dest, weights)) if c_comb else None)
    case("combine", "bwd", shape, 2 * R * d * 2 + T * d * 2 + R * 16,
         ours=lambda: OPS._combine_backward(gy, eo, dest, weights))
    eol = eo.clone().requires_grad_(True)
    wl = weights.clone().requires_grad_(True)
    c_comb_b = compile_(combine_composite)
    case("combine", "fwd+bwd", shape, 3 * R * d * 2 + 2 * T * d * 2 + R * 28,
         ours=lambda: (torchmoe.combine(eo, dest, weights), OPS._combine_backward(gy, eo, dest, weights)),
         eager=fwd_bwd(lambda a, w: combine_composite(a, dest, w), [eol, wl], gy),
         compiled=fwd_bwd(lambda a, w: c_comb_b(a, dest, w), [eol, wl], gy) if c_comb_b else None)
    del eol, wl, eo

    # ---------------------------------------------------------------- grouped_mm
    T, E, k, d_in, d_out = 16384, 64, 8, 2048, 1024
    gidx = torch.randn(T, E, generator=gen).to(DEV).topk(k, dim=-1).indices
    counts = torch.bincount(gidx.reshape(-1), minlength=E)
    xg = torch.randn(T * k, d_in, generator=gen).to(DEV, torch.bfloat16)
    wg = (torch.randn(E, d_in, d_out, generator=gen) / math.sqrt(d_in)).to(DEV, torch.bfloat16)
    gg = torch.randn(T * k, d_out, generator=gen).to(DEV, torch.bfloat16)
    shape = f"rows={T * k} E={E} {d_in}x{d_out} bf16"
    flops = 2 * T * k * d_in * d_out
    c_gmm = compile_(reference.grouped_mm)
    case("grouped_mm", "fwd", shape, flops,
         ours=lambda: torchmoe.grouped_mm(xg, wg, counts),
         eager=lambda: grouped_mm_composite(xg, wg, counts),
         compiled=(lambda: c_gmm(xg, wg, counts)) if c_gmm else None,
         ref=lambda: reference.grouped_mm(xg, wg, counts))
    xgl, wgl = xg.clone().requires_grad_(True), wg.clone().requires_grad_(True)
    case("grouped_mm", "fwd+bwd", shape, 3 * flops,
         ours=lambda: (torchmoe.grouped_mm(xg, wg, counts), OPS._grouped_mm_backward(gg, xg, wg, counts)),
         ref=fwd_bwd(lambda a, b: reference.grouped_mm(a, b, counts), [xgl, wgl], gg))

    for r in rows:
        if r["op"] != "grouped_mm":
            # a device-to-device copy of the same bytes, timed like the ops
            r["copy_gbs"] = copy_bandwidth(min(r["nbytes"], COPY_CAP), DEV, args.reps, allocate=False,
                                           timer=device_time)
    print(f"\ntorchmoe {torchmoe.__version__} | torch {torch.__version__} | {torch.cuda.get_device_name()} | "
          f"median of {args.reps} | copy: a device-to-device copy of each case's bytes (read + written)\n")
    print("| op | pass | shape | ours ms | ours, graph replay ms | eager ms | compiled ms | ref ms | vs eager | "
          "vs compiled | vs ref | GB/s (TFLOP/s) | copy GB/s | of copy |")
    print("|" + "---|" * 14)
    for r in rows:
        o = r["ours"]
        dev_t = min(o, r.get("graph", o))  # device time: graph replay where measured
        def ms(k):
            return f"{r[k] * 1e3:.3f}" if k in r else "-"

        def ratio(k):
            return f"{r[k] / o:.2f}x" if k in r else "-"
        if r["op"] == "grouped_mm":
            rate, copy, frac = f"{r['nbytes'] / dev_t / 1e12:.0f} TFLOP/s", "-", "-"
        else:
            rate, copy = f"{r['nbytes'] / dev_t / 1e9:.0f}", f"{r['copy_gbs']:.0f}"
            frac = f"{r['nbytes'] / dev_t / 1e9 / r['copy_gbs']:.2f}"
        print(f"| {r['op']} | {r['mode']} | {r['shape']} | {ms('ours')} | {ms('graph')} | {ms('eager')} | "
              f"{ms('compiled')} | "
              f"{ms('ref')} | {ratio('eager')} | {ratio('compiled')} | {ratio('ref')} | {rate} | {copy} | {frac} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows),
                      f, indent=1)


if __name__ == "__main__":
    main()
