"""Expert-parallel MoE layer (torchmoe.distributed.ExpertParallelMoE) at world sizes 1, 2 and 4 on this machine:
gloo on loopback, one process per rank, one thread per rank.

    python benchmarks/bench_distributed.py                          # T=4096 tokens per rank, d_model 256, E=8, k=2
    python benchmarks/bench_distributed.py --worlds 1 2 --reps 3 --tokens 1024

For each world size W and mode (dropless, capacity 1.25, capacity 1.25 with pad_to_capacity) every rank times a
training step (forward + backward) of its expert-parallel layer on its own T tokens, and, in the same run and
under the same load, the unsharded layer (all E experts, one process) on the same T tokens: the work per rank is
the same (E/W experts on about T*k routed rows), so "EP / unsharded" (the median of the per-repetition
ratios; the two alternate within each repetition) is the cost of the exchange and of the extra bookkeeping. A
step's time is the slowest rank's (a barrier closes each measurement); medians of --reps.

Bytes: torch.distributed.all_to_all_single is wrapped to count what each rank sends to the *other* ranks in one
forward (the count packet included), per token, against the theory for uniform routing: every token's k rows go
to their experts' ranks and come back, so 2 * k * (W-1)/W rows of d_model elements leave the rank; backward
sends the same again. With pad_to_capacity every expert's buffer travels whole, padding included.
On 2 cores, W=4 runs 4 processes on 2 cores: absolute speed is not the point there, the ratios and bytes are.

Shared expert: at W >= 2 the same step of a dropless layer with a shared expert (``shared_expert_d_ff``,
default --d-ff) is timed with ``overlap_shared_expert`` True (the shared expert's two halves computed while the
two exchanges are in flight, the default) and False (exchange, then compute), alternating as above; "overlap /
sequential" below 1 is what the overlap saves.
"""
import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchmoe.bench import cpu_model

MODES = {"dropless": (None, False), "capacity 1.25": (1.25, False), "padded 1.25": (1.25, True)}


def _count_bytes(fn, rank):
    """Runs fn with all_to_all_single wrapped; returns the bytes this rank sent to other ranks."""
    sent = [0]
    original = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        world = dist.get_world_size(group)
        rows = input_split_sizes or [input.shape[0] // world] * world
        row_bytes = input[0].numel() * input.element_size() if input.shape[0] else 0
        sent[0] += sum(n for r, n in enumerate(rows) if r != dist.get_rank(group)) * row_bytes
        return original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counting
    try:
        fn()
    finally:
        dist.all_to_all_single = original
    return sent[0]


def _time_pair(step_a, step_b, reps, inner):
    """Median seconds per step of a and of b, and the median of their per-repetition ratio. The two alternate
    within each repetition, so both see the same load from whatever else runs on the machine."""
    for _ in range(2):
        step_a()
        step_b()
    samples = {step_a: [], step_b: []}
    for _ in range(reps):
        for step in (step_a, step_b):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(inner):
                step()
            dist.barrier()  # the slowest rank's time
            samples[step].append((time.perf_counter() - start) / inner)
    a, b = samples[step_a], samples[step_b]
    return statistics.median(a), statistics.median(b), statistics.median(x / y for x, y in zip(a, b))


def _worker(rank, world, init_file, args, queue):
    from torchmoe.distributed import ExpertParallelMoE
    from torchmoe.nn import MoE

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    x = torch.randn(args.tokens, args.d_model, generator=torch.Generator().manual_seed(rank))
    for mode, (capacity_factor, pad) in MODES.items():
        torch.manual_seed(0)
        full = MoE(args.d_model, args.d_ff, args.experts, k=args.k, capacity_factor=capacity_factor)
        ep = ExpertParallelMoE.from_moe(full, pad_to_capacity=pad)

        def step(layer):
            def run():
                layer(x).sum().backward()
            return run

        fwd_bytes = _count_bytes(lambda: ep(x), rank)
        ep_s, full_s, ratio = _time_pair(step(ep), step(full), args.reps, args.inner)
        if rank == 0:
            queue.put(("ep", world, mode, ep_s, full_s, ratio, fwd_bytes / args.tokens))
    if world > 1:  # the shared expert with and without the overlap (at W=1 nothing is exchanged)
        torch.manual_seed(0)
        full = MoE(args.d_model, args.d_ff, args.experts, k=args.k, capacity_factor=None,
                   shared_expert_d_ff=args.shared_d_ff or args.d_ff)
        overlapped = ExpertParallelMoE.from_moe(full)
        sequential = ExpertParallelMoE.from_moe(full)
        sequential.overlap_shared_expert = False
        on_s, off_s, ratio = _time_pair(step(overlapped), step(sequential), args.reps, args.inner)
        if rank == 0:
            queue.put(("shared", world, "dropless", on_s, off_s, ratio))
    dist.barrier()
    dist.destroy_process_group()


def run_world(world, args):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, os.path.join(tmp, "init"), args, queue), nprocs=world,
                           start_method="spawn")
    rows = []
    while not queue.empty():
        rows.append(queue.get())
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--shared-d-ff", type=int, default=0, help="the shared expert's d_ff (0: --d-ff)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--inner", type=int, default=3, help="steps per measurement")
    args = p.parse_args(argv)

    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; gloo, 1 thread per rank")
    print(f"ExpertParallelMoE fwd+bwd, T={args.tokens} tokens per rank, d_model={args.d_model}, d_ff={args.d_ff}, "
          f"E={args.experts}, k={args.k}, SwiGLU, float32; medians of {args.reps} x {args.inner} steps\n")
    print("| W | mode | EP step ms | unsharded step ms | EP / unsharded | EP tokens/s (all ranks) "
          "| sent bytes/token fwd | theory 2k(W-1)/W rows | measured / theory |")
    print("|---|---|---|---|---|---|---|---|---|")
    row_bytes = args.d_model * 4
    shared_rows = []
    for world in args.worlds:
        for kind, world_, mode, *row in run_world(world, args):
            if kind == "shared":
                shared_rows.append((world_, mode, *row))
                continue
            ep_s, full_s, ratio_s, sent = row
            theory = 2 * args.k * (world_ - 1) / world_ * row_bytes
            ratio = f"{sent / theory:.2f}" if theory else "-"
            print(f"| {world_} | {mode} | {ep_s * 1e3:.1f} | {full_s * 1e3:.1f} | {ratio_s:.2f} | "
                  f"{world_ * args.tokens / ep_s:,.0f} | {sent:,.0f} | {theory:,.0f} | {ratio} |", flush=True)
    if shared_rows:
        print(f"\nWith a shared expert (d_ff={args.shared_d_ff or args.d_ff}), ExpertParallelMoE.overlap_shared_expert "
              f"True (computed during the exchanges) vs False (after them); medians of {args.reps} x {args.inner} "
              f"steps\n")
        print("| W | mode | overlap step ms | sequential step ms | overlap / sequential |")
        print("|---|---|---|---|---|")
        for world_, mode, on_s, off_s, ratio_s in shared_rows:
            print(f"| {world_} | {mode} | {on_s * 1e3:.1f} | {off_s * 1e3:.1f} | {ratio_s:.2f} |", flush=True)


if __name__ == "__main__":
    main()
