"""Text tables and the PNG of the demo."""
from typing import Dict, Optional

import torch
from torch import Tensor


def summary(res, cfg) -> str:
    drop_total = int(res.dropped.sum())
    assignments = res.assignments * cfg.n_layer
    pct = 100.0 * drop_total / assignments if assignments else 0.0
    cap = "dropless" if cfg.capacity_factor is None else f"capacity factor {cfg.capacity_factor:g}"
    return "\n".join(
        [
            f"steps          : {res.steps:,} x {res.tokens_per_step} tokens in {res.train_time:.1f} s of training",
            f"throughput     : {res.tokens_per_s:,.0f} tokens/s (training steps, forward + backward + AdamW)",
            f"loss           : train {res.eval_train[0]:.3f} -> {res.eval_train[-1]:.3f}, "
            f"held-out {res.eval_heldout[0]:.3f} -> {res.eval_heldout[-1]:.3f} (nats/char)",
            f"tokens dropped : {drop_total:,} of {assignments:,} token-expert assignments ({pct:.2f}%, {cap})",
        ]
    )


def expert_load_table(counts: Tensor, dropped: Tensor, assignments: int, what: str = "") -> str:
    """Share of each layer's token-expert assignments routed to each expert (before dropping), in %."""
    L, E = counts.shape
    lines = [f"expert load {what}: % of each layer's token-expert assignments (balanced = {100.0 / E:.1f}%)"]
    width = 6
    header = "layer " + "".join(f"{'e' + str(e):>{width}}" for e in range(E)) + "   max/mean  dropped"
    lines.append(header)
    lines.append("-" * len(header))
    for layer in range(L):
        row = counts[layer].double()
        total = row.sum().item()
        share = (100.0 * row / total) if total > 0 else torch.zeros_like(row)
        imbalance = (row.max() / row.mean()).item() if total > 0 else float("nan")
        drop_pct = 100.0 * int(dropped[layer]) / assignments if assignments else 0.0
        lines.append(
            f"{layer:>5} " + "".join(f"{v:>{width}.1f}" for v in share.tolist()) + f"   {imbalance:>8.2f}  {drop_pct:>6.2f}%"
        )
    return "\n".join(lines)


def compare_text(res, ref, layer_ms: Dict[str, float], tokens: int) -> str:
    speedup = res.median_tokens_per_s / ref.median_tokens_per_s
    diff = max((abs(a - b) for a, b in zip(res.train_loss, ref.train_loss)), default=0.0)
    return "\n".join(
        [
            f"whole training step : torchmoe {res.median_tokens_per_s:,.0f} tokens/s, reference "
            f"{ref.median_tokens_per_s:,.0f} tokens/s (median step) -> {speedup:.2f}x "
            f"[means: {res.tokens_per_s:,.0f} vs {ref.tokens_per_s:,.0f}]",
            f"one MoE layer alone : forward+backward of {tokens} tokens: torchmoe {layer_ms['fused']:.2f} ms, "
            f"reference {layer_ms['reference']:.2f} ms -> {layer_ms['reference'] / layer_ms['fused']:.2f}x",
            f"same training       : final held-out loss torchmoe {res.eval_heldout[-1]:.4f}, reference "
            f"{ref.eval_heldout[-1]:.4f}; largest per-step train-loss gap {diff:.2e}",
        ]
    )


def _smooth(values, window: int):
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(path: str, res, cfg, ref=None, heldout_counts: Optional[Tensor] = None) -> bool:
    """Loss curves and an expert-load heatmap in one PNG. False (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import TwoSlopeNorm
    except ImportError:
        print("(matplotlib is not installed: no plot; `pip install matplotlib`)")
        return False

    loads = [("during training", res.counts)]
    if heldout_counts is not None:
        loads.append(("trained model, held-out text", heldout_counts))
    fig, axes = plt.subplots(1, 1 + len(loads), figsize=(6.5 + 5.2 * len(loads), 4.8),
                             gridspec_kw={"width_ratios": [1.25] + [1] * len(loads)})
    ax_loss = axes[0]
    steps = list(range(1, len(res.train_loss) + 1))
    window = max(1, min(25, len(steps) // 10))
    ax_loss.plot(steps, res.train_loss, color="tab:blue", alpha=0.25, lw=0.8, label="train (batch)")
    ax_loss.plot(steps, _smooth(res.train_loss, window), color="tab:blue", lw=1.5,
                 label=f"train (mean of {window})")
    ax_loss.plot(res.eval_steps, res.eval_heldout, "o-", color="tab:red", ms=3, label="held-out")
    if ref is not None:
        ax_loss.plot(steps[: len(ref.train_loss)], _smooth(ref.train_loss, window), "--", color="tab:gray", lw=1.2,
                     label="train, reference ops")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy (nats/char)")
    ax_loss.set_title(f"loss — {res.tokens_per_s:,.0f} tokens/s")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()

    shares = []
    for _, counts in loads:
        counts = counts.double()
        shares.append(100.0 * counts / counts.sum(1, keepdim=True).clamp(min=1))
    # One colour scale for every heatmap: white at the balanced share, blue below, red above.
    E = shares[0].shape[1]
    balanced = 100.0 / E
    top = max(2.0 * balanced, max(s.max().item() for s in shares))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=balanced, vmax=top)
    for ax, (title, _), share in zip(axes[1:], loads, shares):
        L = share.shape[0]
        im = ax.imshow(share.numpy(), cmap="coolwarm", aspect="auto", norm=norm)
        for i in range(L):
            for j in range(E):
                v = share[i, j].item()
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(E))
        ax.set_yticks(range(L))
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title(f"expert load, {title}\n% of assignments (balanced = {100.0 / E:.1f}%)", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    router = {"topk": "top-k", "noisy": "noisy top-k", "switch": "Switch top-1"}[cfg.router]
    cap = "dropless" if cfg.capacity_factor is None else f"capacity factor {cfg.capacity_factor:g}"
    fig.suptitle(f"torchmoe demo: {cfg.n_layer} layers x {cfg.num_experts} experts, top-{cfg.top_k} {router}, "
                 f"{cap}, {res.steps} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
