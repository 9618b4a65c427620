"""MoE layer benchmark: torchmoe.nn.MoE (fused ops) against the usual per-expert Python loop and against the
same layer run through torchmoe.reference, forward and forward+backward, in capacity and dropless modes.

    python benchmarks/bench_moe.py                      # T=8192, d_model=512, d_ff=1024, E=8, k=2
    python benchmarks/bench_moe.py --tokens 2048 --reps 3 --activation relu

The per-expert loop is the common eager implementation (as in HF Mixtral): for each expert, find its
(token, choice) pairs with torch.where, gather the tokens, run the expert, scale by the routing weight and
index_add_ the result back. In capacity mode it first drops over-capacity slots with the seed's one-hot
cumsum queue. "loop" indexes the layer's stacked weights (moe.up_proj[e], ...); "list" runs the same loop
on separate per-expert weight tensors (the nn.ModuleList layout, which avoids the stacked weights'
per-expert gradient scatter). All three variants share the same weights and routing; outputs are checked to agree.
Medians of `--reps` timed runs; "x" columns are speedups of the fused layer (> 1 means faster).

At this size every variant is dominated by the same expert GEMMs (about 155 GFLOP for forward+backward).
What makes the fused layer faster on CPU: its grouped_mm runs torchmoe's AVX-512 GEMM where torch.mm (MKL)
does not use AVX-512 on AMD CPUs; its large outputs come from torchmoe's CPU block cache rather than the fresh
pages glibc maps for every block of 32 MiB or more (a page fault per 4 KiB, which whole-batch tensors pay and
the loop's per-expert chunks mostly do not); swiglu does the SwiGLU activation in one pass without temporaries; capacity
mode computes only the kept rows; and with many experts each stacked `weight[e]` in the loop back-propagates a
full-size gradient. TORCHMOE_DISABLE_AVX512=1 and TORCHMOE_CPU_CACHE_MB=0 switch the first two off, to see
what each is worth.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import torchmoe
from torchmoe.bench import cpu_model
from torchmoe.nn import MoE


def expert_list(moe: MoE):
    """Separate leaf copies of every expert's weights (the nn.ModuleList-of-experts layout)."""
    def leaf(w):
        return None if w is None else [w[e].detach().clone().requires_grad_(True) for e in range(moe.num_experts)]
    return leaf(moe.gate_proj), leaf(moe.up_proj), leaf(moe.down_proj)


def per_expert_loop(moe: MoE, x: torch.Tensor, experts=None) -> torch.Tensor:
    """experts: None to index the layer's stacked weights (moe.up_proj[e], ...), or expert_list(moe)."""
    if experts is None:
        experts = (moe.gate_proj, moe.up_proj, moe.down_proj)
    gate_w, up_w, down_w = experts
    h = x.reshape(-1, moe.d_model)
    T = h.shape[0]
    E, k = moe.num_experts, moe.k
    logits = h.float() @ moe.router.weight.float().t()
    top, idx = logits.topk(k, dim=-1)
    weights = torch.softmax(top, dim=-1)
    if moe.capacity_factor is not None:
        cap = torchmoe.capacity(T, E, k, moe.capacity_factor, moe.min_capacity)
        one_hot = F.one_hot(idx.t().reshape(-1), E)  # rank-major queue
        pos = ((one_hot.cumsum(0) - 1) * one_hot).sum(-1).view(k, T).t()
        weights = weights * (pos < cap)
        keep = pos < cap
    else:
        keep = torch.ones_like(idx, dtype=torch.bool)
    y = torch.zeros(T, moe.d_model, dtype=h.dtype, device=h.device)
    for e in range(E):
        tok, choice = torch.where((idx == e) & keep)
        if tok.numel() == 0:
            continue
        xe = h[tok]
        if gate_w is not None:
            hid = F.silu(xe @ gate_w[e]) * (xe @ up_w[e])
        elif moe.activation == "relu":
            hid = F.relu(xe @ up_w[e])
        else:
            hid = F.gelu(xe @ up_w[e])
        out = (hid @ down_w[e]) * weights[tok, choice, None].to(h.dtype)
        y.index_add_(0, tok, out)
    return y.view(x.shape)


def median_times(fns, reps: int, warmup: int = 1, min_time: float = 0.05):
    """Median seconds per call of each callable. The variants run in turn within every repeat, so load from
    other processes on a shared machine hits them alike; short calls are repeated within a measurement."""
    inner = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        start = time.perf_counter()
        fn()
        inner[name] = max(1, int(min_time / max(time.perf_counter() - start, 1e-6)))
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / inner[name])
    return {name: statistics.median(v) for name, v in samples.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--activation", default="swiglu", choices=["swiglu", "relu", "gelu"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--modes", default="capacity,dropless", help="comma-separated, run in this order")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(fused, fullgraph=True)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    print(
        f"{cpu_model()} | torch {torch.__version__}, {torch.get_num_threads()} threads; T={args.tokens}, d_model={args.d_model}, "
        f"d_ff={args.d_ff}, E={args.experts}, k={args.k}, activation={args.activation}, {args.dtype}; "
        f"median of {args.reps}"
    )
    header = (f"{'mode':<22}{'pass':<9}{'fused ms':>10}{'loop ms':>10}{'list ms':>10}{'ref ms':>10}"
              f"{'x loop':>9}{'x list':>9}{'x ref':>8}")
    print(header)
    print("-" * len(header))
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.d_model, dtype=dtype)
    grad_y = torch.randn_like(x)
    modes = {"capacity": args.capacity_factor, "dropless": None}
    for cf in [modes[m] for m in args.modes.split(",")]:
        fused = MoE(args.d_model, args.d_ff, args.experts, k=args.k, capacity_factor=cf, activation=args.activation)
        fused = fused.to(dtype)
        ref = MoE(args.d_model, args.d_ff, args.experts, k=args.k, capacity_factor=cf, activation=args.activation,
                  impl="reference").to(dtype)
        ref.load_state_dict(fused.state_dict())
        experts = expert_list(fused)
        variants = {
            "fused": fused,
            "loop": lambda t: per_expert_loop(fused, t),
            "loop-list": lambda t: per_expert_loop(fused, t, experts),
            "ref": ref,
        }
        if args.compile:
            variants["compiled"] = torch.compile(fused, fullgraph=True)

        with torch.no_grad():
            outs = {name: fn(x) for name, fn in variants.items()}
        tol = 1e-3 if dtype == torch.float32 else 5e-2
        for name in [v for v in variants if v != "fused"]:
            torch.testing.assert_close(outs[name], outs["fused"], rtol=tol, atol=tol, msg=f"{name} disagrees")

        mode = f"capacity cf={cf}" if cf is not None else "dropless"
        for pass_name in ("fwd", "fwd+bwd"):
            runs = {}
            for name, fn in variants.items():
                if pass_name == "fwd":
                    def run(fn=fn):
                        with torch.no_grad():
                            fn(x)
                else:
                    xg = x.clone().requires_grad_(True)

                    def run(fn=fn, xg=xg):
                        fn(xg).backward(grad_y)
                runs[name] = run
            times = median_times(runs, args.reps)
            fused.zero_grad(set_to_none=True)
            ref.zero_grad(set_to_none=True)
            print(
                f"{mode:<22}{pass_name:<9}{times['fused'] * 1e3:>10.1f}{times['loop'] * 1e3:>10.1f}"
                f"{times['loop-list'] * 1e3:>10.1f}{times['ref'] * 1e3:>10.1f}"
                f"{times['loop'] / times['fused']:>8.2f}x{times['loop-list'] / times['fused']:>8.2f}x"
                f"{times['ref'] / times['fused']:>7.2f}x"
                + (f"   compiled {times['compiled'] * 1e3:.1f} ms ({times['loop'] / times['compiled']:.2f}x loop)"
                   if "compiled" in times else "")
            )
        if cf is not None:
            print(f"{'':<22}(capacity {torchmoe.capacity(args.tokens, args.experts, args.k, cf)}, "
                  f"dropped slots {int(fused.dropped_tokens)})")


if __name__ == "__main__":
    main()
