"""How many GPUs a job needs, how it scales, and which layout to prefer
when the fastest is not clearly the fastest."""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.planner.estimate import Estimate
from scaletrain.planner.hardware import Cluster
from scaletrain.planner.layout import Workload
from scaletrain.planner.search import search


@dataclass
class Choice:
    preferred: Estimate
    fastest: Estimate
    error: float  # the prediction's relative error the choice allows for
    reason: str


def prefer_simpler(estimates: list[Estimate], error: float) -> Choice | None:
    """Among fitting layouts predicted within ``error`` of the fastest (which
    the prediction cannot tell apart), the simplest: fewest parallel
    dimensions, no CPU offload, no per-micro-step reduce-scatter, no
    recomputation, then the fastest of those."""
    fitting = [e for e in estimates if e.fits]
    if not fitting:
        return None
    fastest = max(fitting, key=lambda e: e.tokens_per_s)
    close = [e for e in fitting if e.tokens_per_s >= (1 - error) * fastest.tokens_per_s]

    def complexity(e: Estimate) -> tuple:
        lay = e.layout
        return (lay.dimensions, lay.cpu_offload, lay.fsdp_accumulate == "sharded",
                lay.activation_checkpointing != "none", -e.tokens_per_s)

    preferred = min(close, key=complexity)
    if preferred is fastest:
        return Choice(preferred, fastest, error, "the fastest is also the simplest within the prediction's error")
    gap = 1 - preferred.tokens_per_s / fastest.tokens_per_s
    reason = (f"{gap:.1%} slower than the fastest ({fastest.layout.describe()}"
              f"{' +offload' if fastest.layout.cpu_offload else ''}, micro-batch {fastest.layout.micro_batch}, AC "
              f"{fastest.layout.activation_checkpointing}), inside the prediction's held-out error of {error:.0%}, "
              f"and simpler: {_simpler(preferred.layout, fastest.layout)}")
    return Choice(preferred, fastest, error, reason)


def _simpler(a, b) -> str:
    """What layout ``a`` does without, compared with ``b``."""
    out = []
    if a.dimensions < b.dimensions:
        out.append(f"{a.dimensions} instead of {b.dimensions} parallel dimensions")
    if b.cpu_offload and not a.cpu_offload:
        out.append("no CPU offload")
    if b.fsdp_accumulate == "sharded" and a.fsdp_accumulate != "sharded":
        out.append("one reduce-scatter per step instead of one per micro-step")
    if b.activation_checkpointing != "none" and a.activation_checkpointing == "none":
        out.append("no recomputation")
    return ", ".join(out) or "no simpler by these measures"


def gpu_counts(gpus_per_node: int, max_gpus: int) -> list[int]:
    """1, 2, 4, ... up to a node, then whole nodes doubling, up to max_gpus."""
    counts, n = [], 1
    while n <= max_gpus:
        if n <= gpus_per_node or n % gpus_per_node == 0:
            counts.append(n)
        n *= 2
    return counts


@dataclass
class ScalingRow:
    gpus: int
    best: Estimate | None
    speedup: float = 0.0
    efficiency: float = 0.0
    serial_fraction: float | None = None


def scaling_table(w: Workload, cluster_for, counts: list[int]) -> list[ScalingRow]:
    """The best fitting layout at each GPU count (global batch fixed: strong
    scaling), its speedup and parallel efficiency against the smallest count
    that fits, and the serial fraction the model implies, by the Karp–Flatt
    metric (Karp & Flatt 1990, the serial fraction of Amdahl's law that a
    measured speedup S on p times the resources implies):
    e = (1/S - 1/p) / (1 - 1/p)."""
    rows, base = [], None
    for n in counts:
        cluster: Cluster = cluster_for(n)
        fitting = [e for e in search(w, cluster) if e.fits]
        best = max(fitting, key=lambda e: e.tokens_per_s) if fitting else None
        row = ScalingRow(n, best)
        if best is not None:
            base = base or row
            p = n / base.gpus
            row.speedup = best.tokens_per_s / base.best.tokens_per_s
            row.efficiency = row.speedup / p
            if p > 1:
                row.serial_fraction = (1 / row.speedup - 1 / p) / (1 - 1 / p)
        rows.append(row)
    return rows


def min_gpus(rows: list[ScalingRow]) -> ScalingRow | None:
    return next((r for r in rows if r.best is not None), None)
