"""Hugging Face MoE blocks on torchmoe against transformers' own experts implementations, in one run.

    python benchmarks/bench_transformers.py                  # Mixtral- and Qwen3-MoE-shaped blocks, T=16 and 4096
    python benchmarks/bench_transformers.py --tokens 16 --reps 3

Each case builds one transformers MoE block (MixtralSparseMoeBlock, hidden 1024, intermediate 1024, 8 experts,
top-2; Qwen3MoeSparseMoeBlock, hidden 1024, moe intermediate 256, 64 experts, top-8) with random weights and
runs copies of it (the same weights) as

  eager       transformers' eager experts (a Python loop over the experts hit) and router
  grouped_mm  transformers' "grouped_mm" experts (torch.nn.functional.grouped_mm, the default) and router
  torchmoe    apply_torchmoe(block): the "torchmoe" experts backend and the router on topk_gating

forward (no grad) and forward+backward (w.r.t. the input and every parameter). Medians of --reps timed runs;
"x" columns are torchmoe's speedups (> 1 means torchmoe is faster). "of" columns put a pass against the machine's
limit measured in the same run: the float32 GEMM rate (torch.mm) for the experts' products, or, when reading the
weights of the experts hit takes longer (decode sizes), the read bandwidth. Outputs are checked to agree. Last, a training
step (forward, backward, AdamW) of a whole tiny Qwen3-MoE causal LM with each backend.
"""
import argparse
import copy
import os
import statistics
import time
import warnings

import torch

import torchmoe
from torchmoe.bench import cpu_model
from torchmoe.integrations import transformers as tm_hf
from transformers import MixtralConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

BACKENDS = ("eager", "grouped_mm", "torchmoe")


def median_seconds(fns: dict, reps: int, warmup: int = 1) -> dict:
    """Median seconds per call of every function. The functions take turns within each repetition, so a change
    in the load of this shared machine hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def blocks(shape: str):
    if shape == "mixtral":
        config = MixtralConfig(hidden_size=1024, intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2)
        cls = MixtralSparseMoeBlock
    else:
        config = Qwen3MoeConfig(hidden_size=1024, moe_intermediate_size=256, num_experts=64, num_experts_per_tok=8,
                                norm_topk_prob=True)
        cls = Qwen3MoeSparseMoeBlock
    torch.manual_seed(0)
    base = cls(config)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0.0, 0.02)
    out = {}
    for name in BACKENDS:
        block = copy.deepcopy(base)
        # each copy gets its own config object: the experts read the implementation from it
        block.experts.config = copy.deepcopy(config)
        block.experts.config._experts_implementation = "eager" if name == "eager" else "grouped_mm"
        if name == "torchmoe":
            tm_hf.apply_torchmoe(block)
        out[name] = block
    return out


def bench_block(shape: str, tokens: int, reps: int):
    models = blocks(shape)
    hidden = models["eager"].experts.hidden_dim
    x = torch.randn(1, tokens, hidden)
    outs = {}
    hit = []  # the experts the router picks, seen by the eager experts module
    hook = models["eager"].experts.register_forward_pre_hook(lambda mod, args: hit.append(args[1].unique().numel()))
    with torch.no_grad():
        for name, m in models.items():
            outs[name] = m(x)
    hook.remove()
    for name in BACKENDS[1:]:
        torch.testing.assert_close(outs[name], outs["eager"], rtol=1e-3, atol=1e-5)

    def forward(m):
        def run():
            with torch.no_grad():
                m(x)
        return run

    def forward_backward(m):
        xg = x.clone().requires_grad_(True)

        def run():
            m.zero_grad(set_to_none=True)
            m(xg).square().sum().backward()
        return run

    experts = models["eager"].experts
    k = experts.config.num_experts_per_tok
    weights_per_expert = sum(p[0].numel() * p.element_size() for p in (experts.gate_up_proj, experts.down_proj))
    expert_flops = 2 * tokens * k * (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel())
    rows = []
    for mode, make in (("fwd", forward), ("fwd+bwd", forward_backward)):
        times = median_seconds({name: make(m) for name, m in models.items()}, reps)
        # the work that bounds the pass: the experts' products (the backward's are twice the forward's), or the
        # weight traffic (the forward reads the experts hit once; the backward reads them again and writes every
        # expert's gradient)
        if mode == "fwd":
            work = {"flops": expert_flops, "bytes": hit[0] * weights_per_expert}
        else:
            work = {"flops": 3 * expert_flops, "bytes": (2 * hit[0] + experts.num_experts) * weights_per_expert}
        rows.append((mode, times, work))
    return rows


def machine_limits(reps: int) -> dict:
    """The GEMM rate (float32 torch.mm, 4096 x 1024 @ 1024 x 2048, the experts' products at T=4096) and the
    read bandwidth (x.sum() over 256 MiB), medians measured in this run."""
    a, b = torch.randn(4096, 1024), torch.randn(1024, 2048)
    big = torch.ones(64 << 20)
    t = median_seconds({"mm": lambda: torch.mm(a, b), "read": lambda: big.sum()}, max(reps, 5))
    return {"flops": 2 * 4096 * 1024 * 2048 / t["mm"], "bytes": big.numel() * 4 / t["read"]}


def of_limit(work: dict, seconds: float, limits: dict) -> tuple:
    """The pass's rate as a fraction of the machine's limit for it, and that limit's name: the GEMM rate once the
    experts' products take longer than their weight traffic, else the read bandwidth."""
    bound = "flops" if work["flops"] / limits["flops"] > work["bytes"] / limits["bytes"] else "bytes"
    return work[bound] / seconds / limits[bound], ("GEMM" if bound == "flops" else "read")


def bench_model_step(reps: int):
    config = Qwen3MoeConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=16,
                            num_experts_per_tok=4, max_position_embeddings=512)
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (4, 256))
    steps = {}
    for name in BACKENDS:
        torch.manual_seed(0)
        impl = "grouped_mm" if name == "torchmoe" else name
        model = Qwen3MoeForCausalLM._from_config(config, experts_implementation=impl, attn_implementation="sdpa")
        if name == "torchmoe":
            tm_hf.apply_torchmoe(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()

        steps[name] = step
    return median_seconds(steps, reps)


def fmt_ms(t: float) -> str:
    return f"{t * 1e3:9.2f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 4096])
    parser.add_argument("--shapes", nargs="+", default=["mixtral", "qwen3_moe"], choices=["mixtral", "qwen3_moe"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-model-step", action="store_true")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, torchmoe {torchmoe.__version__}, transformers "
          f"{__import__('transformers').__version__}; medians of {args.reps} runs")
    limits = machine_limits(args.reps)
    print(f"machine limits in this run: float32 GEMM {limits['flops'] / 1e9:.0f} GFLOP/s (torch.mm), read "
          f"{limits['bytes'] / 1e9:.1f} GB/s (x.sum() over 256 MiB)")
    header = (f"{'block':<10} {'T':>5} {'pass':<8} {'eager ms':>9} {'grouped ms':>10} {'torchmoe ms':>11} "
              f"{'x eager':>8} {'x grouped':>9} {'limit':>5} {'grouped of':>10} {'torchmoe of':>11}")
    print(header)
    print("-" * len(header))
    for shape in args.shapes:
        for tokens in args.tokens:
            for mode, t, work in bench_block(shape, tokens, args.reps):
                ours = t["torchmoe"]
                frac_ours, bound = of_limit(work, ours, limits)
                frac_grouped, _ = of_limit(work, t["grouped_mm"], limits)
                print(f"{shape:<10} {tokens:>5} {mode:<8} {fmt_ms(t['eager'])} {fmt_ms(t['grouped_mm']):>10} "
                      f"{fmt_ms(ours):>11} {t['eager'] / ours:>8.2f} {t['grouped_mm'] / ours:>9.2f} {bound:>5} "
                      f"{frac_grouped:>10.2f} {frac_ours:>11.2f}")
    if not args.no_model_step:
        t = bench_model_step(args.reps)
        ours = t["torchmoe"]
        print(f"\ntiny Qwen3-MoE causal LM (2 layers, hidden 256, 16 experts top-4, batch 4 x 256 tokens), one AdamW "
              f"training step: eager {fmt_ms(t['eager']).strip()} ms, grouped_mm {fmt_ms(t['grouped_mm']).strip()} "
              f"ms, torchmoe {fmt_ms(ours).strip()} ms ({t['eager'] / ours:.2f}x eager, "
              f"{t['grouped_mm'] / ours:.2f}x grouped_mm)")


if __name__ == "__main__":
    main()
