"""`python -m torchmoe demo`: train a small character-level MoE language model end to end.

Shows torchmoe at work: a progress bar with the loss and throughput, held-out loss at intervals, and at
the end the losses, tokens/s, dropped tokens, the load of every expert in every layer, a PNG with the
loss curves and an expert-load heatmap, a checkpoint round trip and a generated sample. ``--compare``
trains the same steps again with the plain-PyTorch reference ops and prints the speedup.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import report
from .corpus import DEFAULT_MAX_CHARS, CharTokenizer, build_corpus, split_train_heldout
from .model import ROUTERS, ModelConfig, MoETransformer, load_checkpoint, make_moe_layer, save_checkpoint

DEFAULT_TIME_BUDGET = 120.0
WARMUP_STEPS = 20  # linear learning-rate warm-up
TIMING_SKIP = 3  # first steps (allocator, thread pool start-up) left out of tokens/s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m torchmoe demo",
        description="Train a character-level MoE transformer (makeMoE-style) on the Python standard "
        "library's docstrings, then show losses, throughput, expert load, a plot and a sample.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run = p.add_argument_group("run length")
    run.add_argument("--steps", type=int, default=None,
                     help="training steps (default: as many as --time-budget allows)")
    run.add_argument("--time-budget", type=float, default=None,
                     help=f"seconds of training; default {DEFAULT_TIME_BUDGET:g} unless --steps is given; 0 = no limit")
    m = p.add_argument_group("model")
    m.add_argument("--n-embed", type=int, default=128)
    m.add_argument("--n-layer", type=int, default=8)
    m.add_argument("--n-head", type=int, default=8)
    m.add_argument("--block-size", type=int, default=32)
    m.add_argument("--num-experts", type=int, default=8)
    m.add_argument("--top-k", type=int, default=2, help="experts per token (switch: always 1)")
    m.add_argument("--router", choices=ROUTERS, default="noisy",
                   help="topk: linear router; noisy: Shazeer noisy top-k; switch: Switch Transformer top-1")
    cap = m.add_mutually_exclusive_group()
    cap.add_argument("--capacity-factor", type=float, default=1.25,
                     help="expert capacity = floor(k * factor * tokens / experts); overflowing tokens are dropped")
    cap.add_argument("--dropless", action="store_true", help="no capacity limit: grouped matmul, nothing dropped")
    m.add_argument("--activation", choices=("relu", "gelu", "swiglu"), default="relu", help="expert MLP")
    m.add_argument("--dropout", type=float, default=0.0)
    m.add_argument("--impl", choices=("fused", "reference"), default="fused",
                   help="MoE layers on torchmoe's fused ops, or on torchmoe.reference (plain PyTorch)")
    t = p.add_argument_group("training")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=1337)
    t.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    t.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's own choice, usually one per core)")
    t.add_argument("--eval-every", type=int, default=50, help="held-out loss every N steps")
    t.add_argument("--eval-batches", type=int, default=8, help="batches per loss estimate")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="torchmoe-demo", help="folder for the PNG, checkpoint and metrics.json")
    o.add_argument("--compare", action="store_true",
                   help="train the same steps again with impl='reference' (plain PyTorch) and print the speedup")
    o.add_argument("--corpus-chars", type=int, default=DEFAULT_MAX_CHARS, help="corpus size cap (characters)")
    o.add_argument("--sample-chars", type=int, default=300, help="length of the generated sample")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# ----------------------------------------------------------------------------------------------- data


class Batches:
    """Random windows of ``block_size + 1`` tokens, drawn from a seeded generator (makeMoE's get_batch)."""

    def __init__(self, data: Tensor, block_size: int, batch_size: int, seed: int, device: torch.device):
        if data.numel() <= block_size + 1:
            raise ValueError(f"text of {data.numel()} tokens is too short for block_size {block_size}")
        self.windows = data.unfold(0, block_size + 1, 1)
        self.batch_size = batch_size
        self.device = device
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> Tuple[Tensor, Tensor]:
        ix = torch.randint(self.windows.shape[0], (self.batch_size,), generator=self.gen)
        w = self.windows[ix].to(self.device, non_blocking=True)
        return w[:, :-1], w[:, 1:]


@torch.no_grad()
def estimate_loss(model: MoETransformer, batches: List[Tuple[Tensor, Tensor]]) -> float:
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        total += model(x, y)[1].item()
    model.train(was_training)
    return total / len(batches)


@torch.no_grad()
def routing_stats(model: MoETransformer, batches: List[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor, int]:
    """How the model (eval mode: no router noise) routes ``batches``: counts ``[L, E]``, dropped ``[L]``,
    and assignments per layer."""
    was_training = model.training
    model.eval()
    cfg = model.cfg
    counts = torch.zeros(cfg.n_layer, cfg.num_experts, dtype=torch.long)
    dropped = torch.zeros(cfg.n_layer, dtype=torch.long)
    assignments = 0
    for x, _ in batches:
        model(x)
        for i, layer in enumerate(model.moe_layers()):
            counts[i] += layer.expert_counts.reshape(-1, cfg.num_experts).sum(0).cpu()
            dropped[i] += int(layer.dropped_tokens)
        assignments += x.numel() * cfg.top_k
    model.train(was_training)
    return counts, dropped, assignments


# -------------------------------------------------------------------------------------------- training


@dataclass
class RunResult:
    model: MoETransformer
    steps: int = 0
    train_time: float = 0.0  # seconds in training steps (eval excluded)
    timed_tokens: int = 0
    timed_time: float = 0.0
    train_loss: List[float] = field(default_factory=list)  # per step (batch loss)
    eval_steps: List[int] = field(default_factory=list)
    eval_train: List[float] = field(default_factory=list)
    eval_heldout: List[float] = field(default_factory=list)
    counts: Optional[Tensor] = None  # [L, E] routed assignments, summed over steps
    dropped: Optional[Tensor] = None  # [L] dropped assignments, summed over steps
    assignments: int = 0  # per layer: steps * tokens * k
    tokens_per_step: int = 0

    step_times: List[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        if self.timed_time > 0:
            return self.timed_tokens / self.timed_time
        # Too few steps to leave the first ones out.
        return self.steps * self.tokens_per_step / self.train_time if self.train_time > 0 else float("nan")

    @property
    def median_tokens_per_s(self) -> float:
        """Tokens per second of the median step: robust to other programs' bursts on a shared machine."""
        times = sorted(self.step_times[TIMING_SKIP:] if len(self.step_times) > 2 * TIMING_SKIP else self.step_times)
        return self.tokens_per_step / times[len(times) // 2] if times else float("nan")


class _NoBar:
    def __init__(self, total=None, **_):
        self.total, self.n = total, 0

    def update(self, n=1):
        self.n += n

    def set_postfix(self, *a, **k):
        pass

    def refresh(self):
        pass

    def close(self):
        pass

    def write(self, text):
        print(text)


def _progress_bar(total: Optional[int], desc: str, disable: bool):
    if disable:
        return _NoBar(total)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print("(tqdm is not installed: no progress bar; `pip install tqdm`)", file=sys.stderr)
        return _NoBar(total)
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _adamw(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    # The fused AdamW (one kernel for all parameters) where this torch has it for the device.
    try:
        return torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(model.parameters(), lr=lr)


def train(
    cfg: ModelConfig,
    train_batches: Batches,
    eval_sets: Dict[str, List[Tuple[Tensor, Tensor]]],
    *,
    device: torch.device,
    seed: int,
    lr: float,
    max_steps: Optional[int],
    time_budget: Optional[float],
    eval_every: int,
    desc: str,
    progress: bool,
) -> RunResult:
    """Trains a fresh model; stops after ``max_steps`` or when ``time_budget`` seconds have passed."""
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    model = MoETransformer(cfg).to(device)
    model.train()
    opt = _adamw(model, lr)
    moes = model.moe_layers()
    res = RunResult(model=model)
    res.counts = torch.zeros(cfg.n_layer, cfg.num_experts, dtype=torch.long, device=device)
    res.dropped = torch.zeros(cfg.n_layer, dtype=torch.long, device=device)
    tokens_per_step = train_batches.batch_size * cfg.block_size
    res.tokens_per_step = tokens_per_step

    bar = _progress_bar(max_steps if time_budget is None else None, desc, not progress)

    def evaluate(step: int) -> None:
        res.eval_steps.append(step)
        res.eval_train.append(estimate_loss(model, eval_sets["train"]))
        res.eval_heldout.append(estimate_loss(model, eval_sets["heldout"]))
        if eval_every > 0:
            bar.write(f"step {step:>6}: train loss {res.eval_train[-1]:.4f}, held-out loss {res.eval_heldout[-1]:.4f}")

    start = time.perf_counter()
    evaluate(0)
    smooth = None
    step = 0
    while max_steps is None or step < max_steps:
        if time_budget is not None and time.perf_counter() - start >= time_budget:
            break
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / WARMUP_STEPS)
        _sync(device)
        t0 = time.perf_counter()
        x, y = train_batches.next()
        _, loss, aux = model(x, y)
        (loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        res.counts += torch.stack([m.expert_counts.reshape(-1, cfg.num_experts).sum(0) for m in moes])
        res.dropped += torch.stack([m.dropped_tokens.reshape(()) for m in moes])
        loss_value = loss.item()  # synchronises
        dt = time.perf_counter() - t0
        step += 1
        res.train_time += dt
        res.step_times.append(dt)
        if step > TIMING_SKIP or (max_steps is not None and max_steps <= 2 * TIMING_SKIP):
            res.timed_tokens += tokens_per_step
            res.timed_time += dt
        res.train_loss.append(loss_value)
        smooth = loss_value if smooth is None else 0.9 * smooth + 0.1 * loss_value

        if eval_every > 0 and step % eval_every == 0:
            evaluate(step)
        if time_budget is not None and step >= 5:
            # Estimated total steps for the bar: done + remaining time at the average pace so far.
            elapsed = time.perf_counter() - start
            remaining = max(0.0, time_budget - elapsed) / (elapsed / step)
            estimate = step + int(remaining)
            if max_steps is not None:
                estimate = min(estimate, max_steps)
            bar.total = max(estimate, step)
        postfix = {"loss": f"{smooth:.3f}", "tok/s": f"{res.tokens_per_s:,.0f}" if res.timed_time else "-"}
        if eval_every > 0:
            postfix["held-out"] = f"{res.eval_heldout[-1]:.3f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
    if res.eval_steps[-1] != step:
        evaluate(step)
    bar.total = step
    bar.refresh()
    bar.close()
    res.steps = step
    res.counts = res.counts.cpu()
    res.dropped = res.dropped.cpu()
    res.assignments = step * tokens_per_step * cfg.top_k
    return res


def moe_layer_speed(cfg: ModelConfig, tokens: int, device: torch.device, repeats: int = 20) -> Dict[str, float]:
    """Median forward+backward time (ms) of one MoE layer at the demo's shapes, fused vs reference."""
    torch.manual_seed(0)
    layers = {impl: make_moe_layer(replace(cfg, impl=impl)).to(device) for impl in ("fused", "reference")}
    layers["reference"].load_state_dict(layers["fused"].state_dict())
    x = torch.randn(tokens, cfg.n_embed, device=device)
    times: Dict[str, List[float]] = {impl: [] for impl in layers}
    # Alternate the two so that a busy spell on the machine hits both alike.
    for i in range(repeats + 3):
        for impl, layer in layers.items():
            xi = x.detach().requires_grad_(True)
            _sync(device)
            t0 = time.perf_counter()
            y = layer(xi)
            (y.square().mean() + layer.aux_loss).backward()
            _sync(device)
            if i >= 3:
                times[impl].append(time.perf_counter() - t0)
    return {impl: 1e3 * sorted(t)[len(t) // 2] for impl, t in times.items()}


# ---------------------------------------------------------------------------------------------- main


def resolve_device(name: str, needs_kernels: bool = True) -> torch.device:
    """``auto``: CUDA when a GPU is present and (for the fused ops) torchmoe has CUDA kernels, else CPU."""
    import torchmoe

    cuda_ok = torch.cuda.is_available() and (torchmoe.built_with_cuda() or not needs_kernels)
    if name == "auto":
        if torch.cuda.is_available() and not cuda_ok:
            print("note: a GPU is present but torchmoe was built without CUDA kernels; running on the CPU")
        return torch.device("cuda" if cuda_ok else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: CUDA is not available")
        if not cuda_ok:
            raise SystemExit(f"--device {name}: torchmoe was built without CUDA kernels (CPU-only build)")
    return device


def _param_counts(model: MoETransformer) -> Tuple[int, int]:
    cfg = model.cfg
    total = expert = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if name.split(".")[-1] in ("up_proj", "gate_proj", "down_proj"):
            expert += p.numel()
    active = total - expert + expert * cfg.top_k // cfg.num_experts
    return total, active


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    if args.steps is not None and args.steps < 0:
        raise SystemExit("--steps must be >= 0")
    time_budget = args.time_budget
    if time_budget is None and args.steps is None:
        time_budget = DEFAULT_TIME_BUDGET
    if time_budget is not None and time_budget <= 0:
        time_budget = None
    if args.steps is None and time_budget is None:
        raise SystemExit("give --steps or a positive --time-budget")
    if args.compare and args.impl != "fused":
        raise SystemExit("--compare trains with the fused ops and then with the reference: drop --impl reference")
    device = resolve_device(args.device, needs_kernels=args.impl == "fused")
    os.makedirs(args.out, exist_ok=True)

    # Data.
    t0 = time.perf_counter()
    used_modules: List[str] = []
    text = build_corpus(args.corpus_chars, used=used_modules)
    tokenizer = CharTokenizer.from_text(text)
    data = tokenizer.encode(text)
    train_data, heldout_data = split_train_heldout(data)
    corpus_s = time.perf_counter() - t0

    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        n_embed=args.n_embed,
        n_head=args.n_head,
        n_layer=args.n_layer,
        block_size=args.block_size,
        num_experts=args.num_experts,
        top_k=args.top_k,
        router=args.router,
        capacity_factor=None if args.dropless else args.capacity_factor,
        activation=args.activation,
        dropout=args.dropout,
        impl=args.impl,
    )
    eval_sets = {}
    for i, (split, split_data) in enumerate((("train", train_data), ("heldout", heldout_data))):
        sampler = Batches(split_data, cfg.block_size, args.batch_size, args.seed + 1 + i, device)
        eval_sets[split] = [sampler.next() for _ in range(max(1, args.eval_batches))]

    def batches() -> Batches:
        return Batches(train_data, cfg.block_size, args.batch_size, args.seed, device)

    py = sys.version_info
    print("torchmoe demo: a character-level MoE transformer in the spirit of makeMoE")
    print(
        f"corpus : {len(text):,} characters of Python {py.major}.{py.minor} standard-library docstrings "
        f"from {len(used_modules)} module{'s' if len(used_modules) != 1 else ''} "
        f"({used_modules[0]} ... {used_modules[-1]}; built in {corpus_s:.1f} s)"
    )
    print(
        f"         vocabulary {tokenizer.vocab_size} characters; train {train_data.numel():,} / "
        f"held-out {heldout_data.numel():,} characters (every 10th chunk of the text held out)"
    )
    cap_text = "dropless" if cfg.capacity_factor is None else f"capacity factor {cfg.capacity_factor:g}"
    router_text = {"topk": "top-k router", "noisy": "noisy top-k router", "switch": "Switch top-1 router"}[cfg.router]
    print(
        f"model  : {cfg.n_layer} layers, n_embed {cfg.n_embed}, {cfg.n_head} heads, block size {cfg.block_size} | "
        f"MoE: {cfg.num_experts} experts ({cfg.activation}, d_ff {cfg.ff_mult * cfg.n_embed}), top-{cfg.top_k}, "
        f"{router_text}, {cap_text}" + (" (reference ops)" if cfg.impl == "reference" else "")
    )
    with torch.device("meta"):
        total_params, active_params = _param_counts(MoETransformer(cfg))
    print(f"         {total_params / 1e6:.2f}M parameters, {active_params / 1e6:.2f}M active per token")
    threads = f" ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''})" if device.type == "cpu" else ""
    run_text = f"{args.steps} steps" if args.steps is not None else ""
    if time_budget is not None:
        run_text += (" or " if run_text else "") + f"{time_budget:g} s"
    print(
        f"run    : device {device}{threads}, batch {args.batch_size} x {cfg.block_size} = "
        f"{args.batch_size * cfg.block_size} tokens/step, {run_text}, seed {args.seed}"
    )

    common = dict(device=device, seed=args.seed, lr=args.lr, progress=not args.no_progress)
    res = train(cfg, batches(), eval_sets, max_steps=args.steps, time_budget=time_budget,
                eval_every=args.eval_every, desc="torchmoe", **common)
    model = res.model

    metrics = {
        "steps": res.steps,
        "tokens_per_step": args.batch_size * cfg.block_size,
        "train_seconds": res.train_time,
        "tokens_per_s": res.tokens_per_s,
        "initial_train_loss": res.eval_train[0],
        "initial_heldout_loss": res.eval_heldout[0],
        "final_train_loss": res.eval_train[-1],
        "final_heldout_loss": res.eval_heldout[-1],
        "dropped": res.dropped.tolist(),
        "assignments_per_layer": res.assignments,
        "expert_counts": res.counts.tolist(),
        "device": str(device),
        "config": cfg.__dict__,
    }
    print()
    print(report.summary(res, cfg))
    print()
    print(report.expert_load_table(res.counts, res.dropped, res.assignments, "during training (all steps)"))
    held_counts, held_dropped, held_assignments = routing_stats(model, eval_sets["heldout"])
    print()
    print(report.expert_load_table(held_counts, held_dropped, held_assignments,
                                   "of the trained model on held-out text (no router noise)"))
    metrics["heldout_expert_counts"] = held_counts.tolist()
    metrics["heldout_dropped"] = held_dropped.tolist()

    ref = None
    if args.compare and res.steps > 0:
        print()
        print(f"--compare: the same {res.steps} steps with impl='reference' (torchmoe.reference, plain PyTorch)")
        ref = train(replace(cfg, impl="reference"), batches(), eval_sets, max_steps=res.steps, time_budget=None,
                    eval_every=0, desc="reference", **common)
        layer_ms = moe_layer_speed(cfg, args.batch_size * cfg.block_size, device)
        print(report.compare_text(res, ref, layer_ms, args.batch_size * cfg.block_size))
        metrics["compare"] = {
            "reference_tokens_per_s": ref.tokens_per_s,
            "median_step_tokens_per_s": res.median_tokens_per_s,
            "reference_median_step_tokens_per_s": ref.median_tokens_per_s,
            "speedup": res.median_tokens_per_s / ref.median_tokens_per_s,
            "reference_final_train_loss": ref.eval_train[-1],
            "reference_final_heldout_loss": ref.eval_heldout[-1],
            "moe_layer_ms": layer_ms,
        }

    # Picture.
    png = os.path.join(args.out, "torchmoe_demo.png")
    if report.plot(png, res, cfg, ref, held_counts):
        print(f"\nplot: {os.path.abspath(png)}")
        metrics["png"] = png

    # Checkpoint round trip and a sample from the reloaded model.
    ckpt = os.path.join(args.out, "checkpoint.pt")
    save_checkpoint(ckpt, model, tokenizer, step=res.steps, heldout_loss=res.eval_heldout[-1])
    fresh, fresh_tok, _ = load_checkpoint(ckpt, device=str(device))
    reloaded = estimate_loss(fresh, eval_sets["heldout"])
    same = math.isclose(reloaded, res.eval_heldout[-1], rel_tol=1e-5, abs_tol=1e-6)
    print(f"checkpoint: {os.path.abspath(ckpt)}")
    print(
        f"reloaded into a fresh model: held-out loss {reloaded:.4f} "
        f"({'identical to the trained model' if same else f'MISMATCH: trained model had {res.eval_heldout[-1]:.4f}'})"
    )
    metrics.update(checkpoint=ckpt, reloaded_heldout_loss=reloaded, reload_matches=same)
    prompt = "Return the " if all(c in fresh_tok.stoi for c in "Return the ") else fresh_tok.chars[0]
    gen = torch.Generator().manual_seed(args.seed)
    idx = fresh_tok.encode(prompt).unsqueeze(0).to(device)
    sample = fresh_tok.decode(fresh.generate(idx, args.sample_chars, generator=gen)[0].tolist())
    metrics["sample"] = sample
    print(f"\nsample from the reloaded model (prompt {prompt!r}, temperature 0.8):")
    print("-" * 72)
    print(sample)
    print("-" * 72)

    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return 0 if same else 1
