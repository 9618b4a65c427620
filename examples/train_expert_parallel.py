"""Trains the demo's MoE language model (smaller) with its experts sharded over the ranks, then checks the
loss against a single-process run of the same steps.

    torchrun --standalone --nproc-per-node 2 examples/train_expert_parallel.py          # CPU: gloo
    torchrun --standalone --nproc-per-node 2 examples/train_expert_parallel.py --device cuda   # GPUs: NCCL
    torchrun --standalone --nproc-per-node 2 examples/train_expert_parallel.py --clip 1.0 --checkpoint-dir ckpt
    torchrun --standalone --nproc-per-node 4 examples/train_expert_parallel.py --fsdp --ep-size 2   # 2 x 2 mesh

Every rank builds the same model from the same seed, keeps its slice of every MoE layer's experts
(:func:`torchmoe.distributed.shard_experts`), trains on its own batches (per-rank seed) and all-reduces the
replicated gradients (:func:`torchmoe.distributed.allreduce_gradients`, mean). One step is then a
single-process step on the mean of the ranks' losses, which is what rank 0 replays at the end (one micro-batch
per rank, gradients accumulated; per-rank micro-batches because the capacity comes from each rank's token count)
and compares, step by step. Without torchrun it runs as one rank.

``--clip MAX_NORM`` clips the gradients by their norm taken as if the model were unsharded
(:func:`torchmoe.distributed.clip_grad_norm_`); the replay clips with ``torch.nn.utils.clip_grad_norm_`` and the
norms are compared too. ``--fsdp`` trains with FSDP2 on a 2-D ``("dp", "ep")`` mesh of shape
``(W / --ep-size, --ep-size)`` (:func:`torchmoe.distributed.fully_shard_expert_parallel`); FSDP2 averages the
gradients, so the replay is the same. ``--checkpoint-dir DIR`` saves the model and the AdamW state with
torch.distributed.checkpoint (DCP) at the end (and every ``--checkpoint-every`` steps), one folder per step
(``DIR/step-000060``); when DIR already holds one, the run resumes from the latest, at any world size (and mesh)
that divides the expert count, and goes on to ``--steps``: each rank's batches continue from that step, and the
replay starts from the checkpoint's weights and optimizer state and covers the steps since the resume.
"""
import argparse
import copy
import logging
import os
import re
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

from torchmoe.demo.corpus import CharTokenizer, build_corpus
from torchmoe.demo.model import ModelConfig, MoETransformer
from torchmoe.demo.train import Batches
from torchmoe.distributed import allreduce_gradients, clip_grad_norm_, fully_shard_expert_parallel, shard_experts


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
    p.add_argument("--clip", type=float, default=None, metavar="MAX_NORM",
                   help="clip the gradients to this total norm (taken as if unsharded: "
                        "torchmoe.distributed.clip_grad_norm_); the norm is printed")
    p.add_argument("--fsdp", action="store_true",
                   help="FSDP2 on a 2-D (dp, ep) mesh of shape (W / EP_SIZE, EP_SIZE): the experts sharded over "
                        "ep and fully_shard-ed over dp, everything else fully_shard-ed over all W ranks "
                        "(torchmoe.distributed.fully_shard_expert_parallel); needs torchrun")
    p.add_argument("--ep-size", type=int, default=0,
                   help="with --fsdp: ranks per expert-parallel group, dividing W and --experts (default: 2, or 1 "
                        "on one rank)")
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="save the model and AdamW state there at the end (torch.distributed.checkpoint, one folder "
                        "per step, DIR/step-NNNNNN); when DIR holds one, resume from the latest, at any world size "
                        "that divides --experts, and train on to --steps")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="with --checkpoint-dir: also save every N steps")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus-chars", type=int, default=200_000)
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per rank (0: cores / ranks)")
    p.add_argument("--no-check", action="store_true", help="skip the single-process replay")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float64",
                   help="float64 (default) makes the replay check exact to rounding; see tolerance()")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest accepted per-step loss difference to the replay, and relative gradient-norm "
                        "difference with --clip (default: see tolerance())")
    args = p.parse_args(argv)
    if args.checkpoint_every and not args.checkpoint_dir:
        p.error("--checkpoint-every needs --checkpoint-dir")
    if args.ep_size and not args.fsdp:
        p.error("--ep-size goes with --fsdp (without it the experts are sharded over all ranks)")
    if args.fsdp and "WORLD_SIZE" not in os.environ:
        p.error("--fsdp needs a process group: start it with torchrun")
    return args


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


def latest_checkpoint(root):
    """(step, folder) of the latest complete checkpoint under root (DCP writes .metadata last), or (0, None)."""
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else ():
        m = re.fullmatch(r"step-(\d+)", name)
        if m and os.path.isfile(os.path.join(root, name, ".metadata")):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return max(found) if found else (0, None)


def save_checkpoint(root, step, model, opt, distributed):
    """The model and AdamW state (DTensors of the global shapes: any world size can load them) and the step.
    Collective: every rank writes its shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, opt)
    path = os.path.join(root, f"step-{step:06d}")
    with warnings.catch_warnings():  # one process: DCP warns that it assumes one process
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_state, "optim": optim_state, "step": torch.tensor(step)}, checkpoint_id=path,
                 no_dist=not distributed)
    return path


def load_checkpoint(path, model, opt, distributed):
    """Loads a checkpoint of any world size into the (sharded) model and its optimizer; returns its step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, opt)  # this rank's shards, the optimizer state initialised
    state = {"model": model_state, "optim": optim_state, "step": torch.tensor(0)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=not distributed)  # each rank reads its shards
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return int(state["step"])


def full_state(model, opt):
    """The unsharded model and optimizer state on rank 0 (empty dicts elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # FSDP2's expert weights (sharded on dp and ep) gather in two steps, which torch logs as suboptimal, per rank
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


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
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        ep_size = args.ep_size or min(2, world)
        if world % ep_size:
            raise SystemExit(f"--ep-size {ep_size} does not divide the world size {world}")
        mesh = init_device_mesh(device.type, (world // ep_size, ep_size), mesh_dim_names=("dp", "ep"))
        # the root's output (the logits) is a view; lm_loss uses it out of place, as FSDP2 asks
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        fully_shard_expert_parallel(model, mesh, pad_to_capacity=args.pad_to_capacity)  # collective
    else:
        ep_size = world
        shard_experts(model, pad_to_capacity=args.pad_to_capacity)  # collective: every rank, same model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    layers = model.moe_layers()
    local = layers[0]
    if is_main:
        on_rank = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
        layout = (f"FSDP2 on a (dp, ep) = ({world // ep_size}, {ep_size}) mesh" if args.fsdp
                  else f"{local.num_local_experts} experts per rank")
        print(f"{world} rank(s) on {device.type} ({dist.get_backend() if distributed else 'no process group'}), "
              f"{cfg.n_layer} MoE layers of {cfg.num_experts} experts, {layout}; "
              f"{on_rank:,} parameters held on rank 0", flush=True)

    start_step = 0
    if args.checkpoint_dir:
        found = [latest_checkpoint(args.checkpoint_dir)]
        if distributed:  # every rank resumes from the checkpoint rank 0 sees
            dist.broadcast_object_list(found)
        _, path = found[0]
        if path is not None:
            start_step = load_checkpoint(path, model, opt, distributed)
            if is_main:
                print(f"resumed from {path} (step {start_step})", flush=True)
    if start_step >= args.steps:
        if is_main:
            print(f"nothing to train: the checkpoint is at step {start_step}, --steps is {args.steps}")
        if distributed:
            dist.barrier()
            dist.destroy_process_group()
        return 0
    ref_opt = None
    if start_step and not args.no_check:  # the replay starts from what was loaded: its unsharded copy on rank 0
        model_state, optim_state = full_state(model, opt)  # collective; the values land on rank 0
        if reference is not None:
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            reference.load_state_dict(model_state)
            ref_opt = torch.optim.AdamW(reference.parameters(), lr=args.lr)
            # a copy: unsharded tensors come back as the optimizer's own, which training updates in place
            set_optimizer_state_dict(reference, ref_opt, copy.deepcopy(optim_state))
        del model_state, optim_state

    batches = Batches(data, cfg.block_size, args.batch_size, seed=args.seed + rank, device=device)
    for _ in range(start_step):  # each rank's batches go on from where the checkpoint left them
        batches.next()
    tokens_per_step = args.batch_size * cfg.block_size * world
    counts = torch.zeros(cfg.n_layer, cfg.num_experts, dtype=torch.long, device=device)
    dropped = torch.zeros(cfg.n_layer, dtype=torch.long, device=device)
    mean_losses, norms = [], []
    saving_s = 0.0  # checkpoint time inside the timed steps, left out of tokens/s
    try:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=start_step, desc="expert-parallel", disable=not is_main)
    except ImportError:
        bar = None
    steps = args.steps - start_step
    warmup = 2 if steps > 4 else 0  # steps left out of tokens/s (first calls allocate and warm caches)
    for step in range(start_step, args.steps):
        if step - start_step == warmup:
            if distributed:
                dist.barrier()
            start = time.perf_counter()
        x, y = batches.next()
        loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not args.fsdp:  # FSDP2 has averaged the gradients already
            allreduce_gradients(model, op="mean")
        if args.clip is not None:
            norms.append(float(clip_grad_norm_(model, args.clip)))  # the same on every rank
        opt.step()
        counts += torch.stack([m.expert_counts for m in layers])
        dropped += torch.stack([m.dropped_tokens for m in layers])
        mean_loss = loss.detach().reshape(1)
        if distributed:
            dist.all_reduce(mean_loss)
        mean_losses.append(float(mean_loss) / world)
        if bar is not None:
            postfix = {"loss": f"{mean_losses[-1]:.4f}"}
            if norms:
                postfix["grad_norm"] = f"{norms[-1]:.3f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
        done = step + 1
        every = args.checkpoint_every and done % args.checkpoint_every == 0
        if args.checkpoint_dir and (done == args.steps or every):
            saving = time.perf_counter()
            path = save_checkpoint(args.checkpoint_dir, done, model, opt, distributed)
            if step - start_step >= warmup:
                saving_s += time.perf_counter() - saving
            if is_main and done < args.steps:
                (bar.write if bar is not None else print)(f"saved {path}")
    if distributed:
        dist.barrier()
    elapsed = time.perf_counter() - start - saving_s
    timed_steps = steps - warmup
    if bar is not None:
        bar.close()

    # Expert load over the run: every rank's routing summed, then the share of each expert-parallel rank's experts.
    if distributed:
        dist.all_reduce(counts)
        dist.all_reduce(dropped)
    if is_main:
        assignments = counts.sum(1, keepdim=True).clamp(min=1)
        share = (counts.double() / assignments).cpu()
        per_rank = share.view(cfg.n_layer, ep_size, -1).sum(-1)
        print(f"\n{tokens_per_step * timed_steps / elapsed:,.0f} tokens/s over all ranks (steps "
              f"{start_step + warmup + 1}-{args.steps}, {elapsed:.1f} s; {tokens_per_step // world} tokens per rank "
              f"and step); dropped assignments: {int(dropped.sum())} of {int(counts.sum())}")
        print("expert load (share of each layer's token-expert assignments processed by each rank's experts; "
              f"{100 / ep_size:.1f}% is balanced):")
        for r in range(ep_size):
            lo, hi = r * local.num_local_experts, (r + 1) * local.num_local_experts
            cells = "  ".join(f"layer {i}: {100 * per_rank[i, r]:5.1f}%" for i in range(cfg.n_layer))
            experts = " ".join(f"{100 * v:4.1f}" for v in share[0, lo:hi].tolist())
            who = f"ep rank {r}, ranks {list(range(r, world, ep_size))}" if args.fsdp else f"rank {r}"
            print(f"  {who} (experts {lo}-{hi - 1}): {cells}   layer 0 per expert %: {experts}")
        if norms:
            print(f"gradient norm (clipped to {args.clip:g}): first {norms[0]:.6f}, last {norms[-1]:.6f}, "
                  f"clipped in {sum(n > args.clip for n in norms)} of {len(norms)} steps")
        print(f"final loss (mean over ranks): {mean_losses[-1]:.6f}")
        if args.checkpoint_dir:
            print(f"saved {os.path.join(args.checkpoint_dir, f'step-{args.steps:06d}')}")

    ok = True
    if reference is not None:
        # The same steps in one process: each rank's batch as a micro-batch, gradients of the mean loss.
        ref_opt = ref_opt or torch.optim.AdamW(reference.parameters(), lr=args.lr)
        streams = [Batches(data, cfg.block_size, args.batch_size, seed=args.seed + s, device=device)
                   for s in range(world)]
        for stream in streams:
            for _ in range(start_step):
                stream.next()
        ref_losses, ref_norms = [], []
        for step in range(start_step, args.steps):
            ref_opt.zero_grad(set_to_none=True)
            total = 0.0
            for s in range(world):
                loss = lm_loss(reference, *streams[s].next()) / world
                loss.backward()
                total += float(loss.detach())
            if args.clip is not None:
                ref_norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), args.clip)))
            ref_opt.step()
            ref_losses.append(total)
        worst = max(abs(a - b) for a, b in zip(mean_losses, ref_losses))
        tol = tolerance(args)
        ok = worst <= tol
        what = "the same steps" if not start_step else f"steps {start_step + 1}-{args.steps} from the checkpoint"
        print(f"single-process run of {what}: final loss {ref_losses[-1]:.6f}; per-step loss difference: "
              f"first {abs(mean_losses[0] - ref_losses[0]):.2e}, largest {worst:.2e} "
              f"({'OK' if ok else 'MISMATCH'}, tolerance {tol:g})", flush=True)
        if norms:
            # relative: the norm's scale is the gradients', not the loss's
            worst_norm = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(norms, ref_norms))
            ok_norm = worst_norm <= tol
            ok = ok and ok_norm
            print(f"gradient norms against torch.nn.utils.clip_grad_norm_ in the single-process run: largest "
                  f"relative difference {worst_norm:.2e} ({'OK' if ok_norm else 'MISMATCH'}, tolerance {tol:g})",
                  flush=True)
    if distributed:
        dist.barrier()  # the other ranks wait for rank 0's replay: a rank leaving early can abort in gloo's teardown
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
