"""Per-rank batch plans for mixed clusters (``parallel.rank_batch``).

Without a split every data-parallel rank takes global / dp rows and the
step waits for the slowest device. With one, each rank takes rows in
proportion to its predicted speed, by the same rule the trainer's
``rank_batch = auto`` applies to measured speeds
(train.rank_batch.split_proportional: at least one row per micro-step,
largest remainder), and the step takes max over ranks of rows / speed.

Speed of a rank: its device's peak x matmul_efficiency in the training
dtype (what the planner's GEMM term runs at); ranks are numbered in the
order the cluster lists its kinds (torchrun's node ranks in that order).
Only data parallelism with tp = pp = 1 (what the trainer accepts).
"""

from __future__ import annotations

import dataclasses
import math

from scaletrain.planner.hardware import Cluster, Device
from scaletrain.planner.layout import Layout, Workload, accum


def rank_devices(cluster: Cluster) -> list[Device]:
    return [d for d, n in cluster.kinds for _ in range(n)]


def rank_speeds(cluster: Cluster, dtype: str) -> list[float]:
    return [d.peak_flops(dtype) * d.matmul_efficiency for d in rank_devices(cluster)]


def plan_rank_batch(w: Workload, layout: Layout, cluster: Cluster) -> tuple[int, ...]:
    """Rows per rank for ``layout`` on a mixed cluster, () where the split is
    even anyway or the trainer cannot split (tp/pp > 1, one rank)."""
    from scaletrain.train.rank_batch import split_proportional  # the trainer's rule, not a copy

    speeds = rank_speeds(cluster, w.dtype)
    if not cluster.mixed or layout.tp != 1 or layout.pp != 1 or layout.dp < 2 or len(speeds) != layout.dp:
        return ()
    if min(speeds) <= 0:
        return ()
    rows = split_proportional(w.global_batch, speeds, accum(w, layout))
    return () if len(set(rows)) == 1 else tuple(rows)


def compute_factor(w: Workload, layout: Layout, cluster: Cluster) -> float:
    """Step compute under layout.rank_batch / under the even split (which
    runs at the slowest device): max_i rows_i / speed_i over
    (global / dp) / min speed."""
    if not layout.rank_batch:
        return 1.0
    speeds = rank_speeds(cluster, w.dtype)
    even = w.global_batch / layout.dp / min(speeds)
    return max(r / s for r, s in zip(layout.rank_batch, speeds)) / even


def rank_micro_batches(w: Workload, layout: Layout, cluster: Cluster) -> list[tuple[Workload, Layout, float]]:
    """(workload and layout at a rank's largest micro batch, that rank's memory
    GiB) per device kind: a faster rank cuts its larger share into the job's
    accumulation micro-steps (train.rank_batch), so its activations grow; the
    workload's batch is scaled so that the accumulation count (and with it
    FSDP's held gradient) stays the job's."""
    if not layout.rank_batch:
        return []
    n_accum = accum(w, layout)
    worst: dict[str, tuple[int, float]] = {}
    for rows, device in zip(layout.rank_batch, rank_devices(cluster)):
        micro = math.ceil(rows / n_accum)
        if micro > worst.get(device.name, (0, 0.0))[0]:
            worst[device.name] = (micro, device.memory_gib)
    return [(dataclasses.replace(w, global_batch=m * layout.dp * n_accum), dataclasses.replace(layout, micro_batch=m),
             gib) for m, gib in worst.values()]
