"""Trains the demo's MoE language model (smaller) with its experts sharded over the ranks, then checks the
loss against a single-process run of the same steps.

    torchrun --standalone --nproc-per-node 2 examples/train_expert_parallel.py          # CPU: gloo
    torchrun --standalone --nproc-per-node 2 examples/train_expert_parallel.py --device cuda   # GPUs: NCCL

Every rank builds the same model from the same seed, keeps its slice of every MoE layer's experts
(:func:`torchmoe.distributed.shard_experts`), trains on its own batches (per-rank seed) and all-reduces the
replicated gradients (:func:`torchmoe.distributed.allreduce_gradients`, mean). One step is then a
single-process step on the mean of the ranks' losses, which is what rank 0 replays at the end (one micro-batch
per rank, gradients accumulated; per-rank micro-batches because the capacity comes from each rank's token count)
and compares, step by step. Without torchrun it runs as one rank.
"""
import argparse
import copy
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from torchmoe.demo.corpus import CharTokenizer, build_corpus
from torchmoe.demo.model import ModelConfig, MoETransformer
from torchmoe.demo.train import Batches
from torchmoe.distributed import allreduce_gradients, shard_experts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per rank and step")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embed", type=int, default=64)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--experts", type=int, default=8, help="experts per MoE layer (a multiple of the world size)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=0.0, help="0 (default): dropless routing")
    p.add_argument("--pad-to-capacity", action="store_true", help="the static exchange mode")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus-chars", type=int, default=200_000)
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per rank (0: cores / ranks)")
    p.add_argument("--no-check", action="store_true", help="skip the single-process replay")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float64",
                   help="float64 (default) makes the replay check exact to rounding; see tolerance()")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest accepted per-step loss difference to the replay (default: see tolerance())")
    return p.parse_args(argv)


def tolerance(args) -> float:
    if args.tolerance is not None:
        return args.tolerance
    if args.dtype == "float64":
        return 1e-9
    # float32: the two runs round differently (all-reduce order, GEMM blocking) and a router choice between two
    # nearly tied experts (router math is float32) sooner or later flips; with a capacity that also moves which
    # tokens are dropped. From then on the runs drift apart (1e-2 after 60 steps is typical); the first steps
    # agree to 1e-6, and in float64 every step agrees to 1e-15.
    return 5e-2


def lm_loss(model, x, y):
    logits, _, aux = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)) + aux


def main(argv=None) -> int:
    args = parse_args(argv)
    distributed = "WORLD_SIZE" in os.environ
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    if device.type == "cpu":
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    is_main = rank == 0

    text = build_corpus(args.corpus_chars)
    tokenizer = CharTokenizer.from_text(text)
    data = tokenizer.encode(text)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size, n_embed=args.n_embed, n_head=args.n_head, n_layer=args.n_layer,
        block_size=args.block_size, num_experts=args.experts, top_k=args.top_k, router="topk",
        capacity_factor=args.capacity_factor or None, activation="relu",
    )
    torch.manual_seed(args.seed)
    model = MoETransformer(cfg).to(device, getattr(torch, args.dtype))
    reference = copy.deepcopy(model) if is_main and not args.no_check else None
    shard_experts(model, pad_to_capacity=args.pad_to_capacity)  # collective: every rank, same model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    layers = model.moe_layers()
    local = layers[0]
    if is_main:
        total = sum(p.numel() for p in model.parameters())
        print(f"{world} rank(s) on {device.type} ({dist.get_backend() if distributed else 'no process group'}), "
              f"{cfg.n_layer} MoE layers of {cfg.num_experts} experts, {local.num_local_experts} per rank; "
              f"{total:,} parameters on rank 0", flush=True)

    batches = Batches(data, cfg.block_size, args.batch_size, seed=args.seed + rank, device=device)
    tokens_per_step = args.batch_size * cfg.block_size * world
    counts = torch.zeros(cfg.n_layer, cfg.num_experts, dtype=torch.long, device=device)
    dropped = torch.zeros(cfg.n_layer, dtype=torch.long, device=device)
    mean_losses = []
    try:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, desc="expert-parallel", disable=not is_main)
    except ImportError:
        bar = None
    warmup = 2 if args.steps > 4 else 0  # steps left out of tokens/s (first calls allocate and warm caches)
    for step in range(args.steps):
        if step == warmup:
            if distributed:
                dist.barrier()
            start = time.perf_counter()
        x, y = batches.next()
        loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        allreduce_gradients(model, op="mean")
        opt.step()
        counts += torch.stack([m.expert_counts for m in layers])
        dropped += torch.stack([m.dropped_tokens for m in layers])
        mean_loss = loss.detach().reshape(1)
        if distributed:
            dist.all_reduce(mean_loss)
        mean_losses.append(float(mean_loss) / world)
        if bar is not None:
            bar.set_postfix(loss=f"{mean_losses[-1]:.4f}", refresh=False)
            bar.update(1)
    if distributed:
        dist.barrier()
    elapsed = time.perf_counter() - start
    timed_steps = args.steps - warmup
    if bar is not None:
        bar.close()

    # Expert load over the whole run: every rank's routing summed, then each rank's share.
    if distributed:
        dist.all_reduce(counts)
        dist.all_reduce(dropped)
    if is_main:
        assignments = counts.sum(1, keepdim=True).clamp(min=1)
        share = (counts.double() / assignments).cpu()
        per_rank = share.view(cfg.n_layer, world, -1).sum(-1)
        print(f"\n{tokens_per_step * timed_steps / elapsed:,.0f} tokens/s over all ranks (steps {warmup + 1}-"
              f"{args.steps}, {elapsed:.1f} s; {tokens_per_step // world} tokens per rank and step); dropped assignments: "
              f"{int(dropped.sum())} of {int(counts.sum())}")
        print("expert load (share of each layer's token-expert assignments processed by each rank's experts; "
              f"{100 / world:.1f}% is balanced):")
        for r in range(world):
            lo, hi = r * local.num_local_experts, (r + 1) * local.num_local_experts
            cells = "  ".join(f"layer {i}: {100 * per_rank[i, r]:5.1f}%" for i in range(cfg.n_layer))
            experts = " ".join(f"{100 * v:4.1f}" for v in share[0, lo:hi].tolist())
            print(f"  rank {r} (experts {lo}-{hi - 1}): {cells}   layer 0 per expert %: {experts}")
        print(f"final loss (mean over ranks): {mean_losses[-1]:.6f}")

    ok = True
    if reference is not None:
        # The same steps in one process: each rank's batch as a micro-batch, gradients of the mean loss.
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=args.lr)
        streams = [Batches(data, cfg.block_size, args.batch_size, seed=args.seed + s, device=device)
                   for s in range(world)]
        ref_losses = []
        for step in range(args.steps):
            ref_opt.zero_grad(set_to_none=True)
            total = 0.0
            for s in range(world):
                loss = lm_loss(reference, *streams[s].next()) / world
                loss.backward()
                total += float(loss.detach())
            ref_opt.step()
            ref_losses.append(total)
        worst = max(abs(a - b) for a, b in zip(mean_losses, ref_losses))
        tol = tolerance(args)
        ok = worst <= tol
        print(f"single-process run of the same steps: final loss {ref_losses[-1]:.6f}; per-step loss difference: "
              f"first {abs(mean_losses[0] - ref_losses[0]):.2e}, largest {worst:.2e} "
              f"({'OK' if ok else 'MISMATCH'}, tolerance {tol:g})", flush=True)
    if distributed:
        dist.barrier()  # the other ranks wait for rank 0's replay: a rank leaving early can abort in gloo's teardown
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
