"""Allocator policies on a synthetic job stream: 1,000 jobs on 64 nodes of 8
GPUs (8 racks of 8 nodes), first-come first-served with greedy backfill.

The stream (seeded): job sizes skewed to small jobs as in published GPU
cluster traces (most jobs use one GPU, a few use many): 1 GPU 45%, 2 10%,
4 15%, 8 15%, 16 8%, 32 5%, 64 2%; jobs of 8 GPUs or more are tensor
parallel over 8 GPUs (tp = 8), with pp = 2 for the 32- and 64-GPU ones;
smaller multi-GPU jobs are tp = size half the time. Run times are
log-normal (median 1 hour, sigma 1.0, capped at 48 h); arrivals are Poisson
at the rate that offers LOAD (default 0.9) of the cluster's GPU-hours.

Prints utilisation (GPUs in use, time-averaged until the last arrival:
the drain after it is the same for every policy), queueing delay (mean,
p95, mean of jobs >= 16 GPUs), time-averaged fragmentation and the share of
multi-node jobs that cross a rack, per policy, and each as a ratio to
first_fit; then the spread of those ratios over --seeds streams (one stream
is one draw).

    python3 benchmarks/bench_allocator.py [--jobs 1000] [--nodes 64] [--load 0.9] [--seed 0] [--seeds 5]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from scaletrain.launch.allocator import POLICIES, Job, Node  # noqa: E402
from scaletrain.launch.simulate import simulate  # noqa: E402

SIZES = [(1, 0.45), (2, 0.10), (4, 0.15), (8, 0.15), (16, 0.08), (32, 0.05), (64, 0.02)]


def job_shape(rng: random.Random, gpus: int) -> tuple[int, int, int]:
    """(tp, pp, dp) for a job of ``gpus`` GPUs."""
    if gpus >= 32:
        return 8, 2, gpus // 16
    if gpus >= 8:
        return 8, 1, gpus // 8
    if gpus > 1 and rng.random() < 0.5:
        return gpus, 1, 1
    return 1, 1, gpus


def job_stream(n_jobs: int, total_gpus: int, load: float, seed: int) -> list[Job]:
    rng = random.Random(seed)
    sizes, weights = zip(*SIZES)
    mean_gpu_hours = sum(s * w for s, w in SIZES) * math.exp(0.5)  # E[lognormal(0, 1)] = e^0.5
    rate = load * total_gpus / mean_gpu_hours  # arrivals per hour
    jobs, now = [], 0.0
    for k in range(n_jobs):
        now += rng.expovariate(rate)
        gpus = rng.choices(sizes, weights)[0]
        tp, pp, dp = job_shape(rng, gpus)
        duration = min(48.0, rng.lognormvariate(0.0, 1.0))
        jobs.append(Job(f"job{k:04d}", tp, pp, dp, submit_s=now, duration_s=duration))
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--load", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=5, help="streams for the spread of the ratios")
    args = parser.parse_args()
    inventory = [Node(f"node{i:03d}", 8, f"rack{i // 8}") for i in range(args.nodes)]
    jobs = job_stream(args.jobs, 8 * args.nodes, args.load, args.seed)
    print(f"{args.jobs} jobs on {args.nodes} nodes x 8 GPUs ({len({n.rack for n in inventory})} racks), "
          f"offered load {args.load}, seed {args.seed}; times in hours")
    results = {}
    for policy in POLICIES:
        started = time.perf_counter()
        results[policy] = simulate(inventory, jobs, policy)
        results[policy].seconds = time.perf_counter() - started
    header = (f"{'policy':<13} {'util':>6} {'wait mean':>9} {'wait p95':>9} {'wait>=16':>9} {'frag':>6} "
              f"{'x-rack':>7} {'makespan':>9}  sim s")
    print(header)
    for policy, r in results.items():
        print(f"{policy:<13} {r.utilisation:6.1%} {r.mean_wait:9.2f} {r.p95_wait:9.2f} {r.mean_wait_large:9.2f} "
              f"{r.fragmentation:6.1%} {r.cross_rack:7.1%} {r.makespan:9.1f}  {r.seconds:5.1f}")
    base = results["first_fit"]
    print("\nratio to first_fit (utilisation: higher is better; the rest: lower is better)")
    print(f"{'policy':<13} {'util':>6} {'wait mean':>9} {'wait p95':>9} {'wait>=16':>9} {'frag':>6}")
    for policy, r in results.items():
        cells = [(r.utilisation, base.utilisation), (r.mean_wait, base.mean_wait), (r.p95_wait, base.p95_wait),
                 (r.mean_wait_large, base.mean_wait_large), (r.fragmentation, base.fragmentation)]
        ratios = [f"{a / b:.2f}" if b else "-" for a, b in cells]
        print(f"{policy:<13} {ratios[0]:>6} {ratios[1]:>9} {ratios[2]:>9} {ratios[3]:>9} {ratios[4]:>6}")
    if args.seeds > 1:
        seed_spread(args, inventory)


METRICS = ("utilisation", "mean_wait", "p95_wait", "mean_wait_large", "fragmentation")


def seed_spread(args, inventory: list[Node]) -> None:
    """The same comparison on ``--seeds`` streams: median [min, max] of each ratio to first_fit."""
    ratios: dict[str, dict[str, list[float]]] = {p: {m: [] for m in METRICS} for p in POLICIES}
    for seed in range(args.seed, args.seed + args.seeds):
        jobs = job_stream(args.jobs, 8 * args.nodes, args.load, seed)
        results = {policy: simulate(inventory, jobs, policy) for policy in POLICIES}
        for policy, r in results.items():
            for m in METRICS:
                base = getattr(results["first_fit"], m)
                if base:
                    ratios[policy][m].append(getattr(r, m) / base)
    print(f"\nratio to first_fit over seeds {args.seed}..{args.seed + args.seeds - 1}: median [min, max]")
    print(f"{'policy':<13} " + " ".join(f"{m:>19}" for m in ("util", "wait mean", "wait p95", "wait>=16", "frag")))
    for policy in POLICIES:
        cells = []
        for m in METRICS:
            values = sorted(ratios[policy][m])
            cells.append(f"{statistics.median(values):.2f} [{values[0]:.2f}, {values[-1]:.2f}]" if values else "-")
        print(f"{policy:<13} " + " ".join(f"{c:>19}" for c in cells))


if __name__ == "__main__":
    main()
