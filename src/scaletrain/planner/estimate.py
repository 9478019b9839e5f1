"""One layout's prediction: memory (memory.py), communication
(communication.py) and step time (steptime.py) put together, and the
arithmetic behind it for ``plan --explain``."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from scaletrain.model.counts import train_flops_per_token
from scaletrain.planner import formulas
from scaletrain.planner.communication import collectives
from scaletrain.planner.hardware import GIB, Cluster
from scaletrain.planner.layout import Layout, Workload, accum
from scaletrain.planner.memory import memory_of_rank, worst_ranks
from scaletrain.planner.rank_plan import compute_factor, rank_micro_batches, rank_speeds
from scaletrain.planner.steptime import compute_parts, exposed_communication, host_time, offload_host_time


@dataclass
class Estimate:
    layout: Layout
    memory: dict[str, float] = field(default_factory=dict)  # bytes, worst rank
    total_bytes: float = 0.0
    fits: bool = True
    why: str = ""
    comm: list[dict] = field(default_factory=list)
    comm_time_s: dict[str, float] = field(default_factory=dict)
    exposed_comm_s: dict[str, float] = field(default_factory=dict)
    compute_parts_s: dict[str, float] = field(default_factory=dict)
    host_s: float = 0.0
    compute_s: float = 0.0
    bubble: float = 0.0
    offload_s: float = 0.0
    step_time_s: float = 0.0
    rank_factor: float = 1.0  # compute under layout.rank_batch / under the even split
    tokens_per_s: float = 0.0
    mfu: float = 0.0

    def as_dict(self) -> dict:
        return {"layout": {**self.layout.__dict__, "description": self.layout.describe()},
                "memory_gib": {k: v / GIB for k, v in self.memory.items()},
                "total_gib": self.total_bytes / GIB, "fits": self.fits, "why": self.why,
                "communication": self.comm, "comm_time_s": self.comm_time_s, "exposed_comm_s": self.exposed_comm_s,
                "compute_parts_s": self.compute_parts_s, "host_s": self.host_s, "compute_s": self.compute_s,
                "bubble": self.bubble, "rank_factor": self.rank_factor, "offload_s": self.offload_s, "step_time_s": self.step_time_s,
                "tokens_per_s": self.tokens_per_s, "mfu": self.mfu}


def estimate(w: Workload, layout: Layout, cluster: Cluster, device_type: str = "cuda") -> Estimate:
    dev = cluster.device
    est = Estimate(layout)
    # Each pipeline rank against its own devices' memory (a mixed cluster's
    # faster, bigger GPUs may hold the larger stages).
    mems = [(memory_of_rank(w, layout, c, dev, device_type), cluster.pipeline_rank_memory_gib(layout.pp, c.pp))
            for c in worst_ranks(layout)]
    # A per-rank split: each device kind's largest micro batch against its own memory.
    mems += [(memory_of_rank(w_rank, lay, worst_ranks(lay)[0], dev, device_type), gib)
             for w_rank, lay, gib in rank_micro_batches(w, layout, cluster)]
    est.memory, capacity_gib = max(mems, key=lambda m: m[0]["peak"] / m[1])
    est.total_bytes = est.memory.pop("peak")
    if est.total_bytes > capacity_gib * GIB:
        est.fits = False
        est.why = f"needs {est.total_bytes / GIB:.1f} GiB per GPU; {capacity_gib:g} GiB available"
    offloaded = est.memory.get("offloaded_to_cpu", 0.0) * cluster.gpus_per_node
    if dev.host_memory_gib and offloaded > dev.host_memory_gib * GIB:
        est.fits = False
        est.why = (f"CPU offload needs {offloaded / GIB:,.0f} GiB of host memory per node; "
                   f"{dev.host_memory_gib:g} GiB available")
    if w.dtype == "bf16" and dev.bf16 == 0:
        est.fits, est.why = False, f"{dev.name} has no bf16; plan with --dtype fp16"

    est.compute_parts_s = compute_parts(w, layout, dev)
    est.host_s = host_time(w, layout, dev)
    # The host issues kernels ahead of the device: whichever is slower sets the pace.
    est.compute_s = max(sum(est.compute_parts_s.values()), est.host_s)
    # Per-rank rows on a mixed cluster: the slowest rank's share over its speed (rank_plan.py).
    est.rank_factor = compute_factor(w, layout, cluster)
    est.compute_s *= est.rank_factor
    # Each accumulation micro-step is its own pipeline pass (fill and drain).
    est.bubble = formulas.pipeline_bubble(layout.pp, layout.pp_microbatches, layout.virtual_stages,
                                          layout.pp_schedule)
    compute_total = est.compute_s / (1 - est.bubble)
    colls = collectives(w, layout, worst_ranks(layout)[0], device_type, cluster.gpus_per_node)
    est.comm_time_s, est.exposed_comm_s, est.comm = exposed_communication(colls, cluster, layout, w, compute_total)
    est.offload_s = offload_host_time(w, layout, cluster)
    est.step_time_s = compute_total + sum(est.exposed_comm_s.values()) + est.offload_s
    est.tokens_per_s = w.global_batch * w.seq_len / est.step_time_s
    peak = dev.peak_flops(w.dtype)
    est.mfu = (train_flops_per_token(w.model, w.seq_len) * est.tokens_per_s / cluster.gpus / peak) if peak else 0.0
    return est


def explain(w: Workload, est: Estimate, cluster: Cluster) -> list[str]:
    """The arithmetic of one estimate, line by line (``plan --explain``)."""
    lay, dev = est.layout, cluster.device
    gib = {k: v / GIB for k, v in est.memory.items()}
    lines = [f"layout: {lay.describe()}, micro batch {lay.micro_batch}, accumulation {accum(w, lay)}, "
             f"AC {lay.activation_checkpointing}, engine {lay.engine}"
             + (f", fsdp_accumulate {lay.fsdp_accumulate}" if lay.fsdp else ""),
             "memory per GPU (worst rank), GiB: " + ", ".join(f"{k} {v:.2f}" for k, v in gib.items())
             + f"; peak {est.total_bytes / GIB:.2f} of {dev.memory_gib:g}"]
    parts = est.compute_parts_s
    lines.append("compute per step, s: " + " + ".join(f"{k} {v:.4f}" for k, v in parts.items())
                 + f" = {sum(parts.values()):.4f}; host dispatch {est.host_s:.4f}; max = "
                 f"{est.compute_s / est.rank_factor:.4f}")
    if lay.rank_batch:
        even = estimate(w, replace(lay, rank_batch=()), cluster)
        lines.append(f"per-rank rows {list(lay.rank_batch)} (proportional to peak x matmul_efficiency: "
                     + ", ".join(f"{s / 1e12:.0f}" for s in rank_speeds(cluster, w.dtype))
                     + f" TFLOP/s): compute x{est.rank_factor:.3f} of the even split's = {est.compute_s:.4f} s; "
                     f"step {est.step_time_s:.4f} s vs {even.step_time_s:.4f} s even "
                     f"({even.step_time_s / est.step_time_s:.2f}x)")
    lines.append(f"pipeline bubble {est.bubble:.1%}: compute / (1 - bubble) = {est.compute_s / (1 - est.bubble):.4f} s")
    lines.append("communication, s (total -> exposed): " + ", ".join(
        f"{g} {est.comm_time_s.get(g, 0):.4f} -> {est.exposed_comm_s.get(g, est.comm_time_s.get(g, 0)):.4f}"
        for g in ("dp", "tp", "pp", "host")))
    for c in est.comm:
        lines.append(f"  {c['kind']:15s} {c['group']:13s} {c['ranks']:>4} ranks {c['calls']:>6} calls "
                     f"{c['bytes'] / 1e9:10.3f} GB on {c['link']}: {c['time_s']:.4f} s")
    lines += ddp_options(w, lay, cluster)
    if est.offload_s:
        lines.append(f"host AdamW over offloaded states: {est.offload_s:.4f} s")
    lines.append(f"step = {est.step_time_s:.4f} s -> {est.tokens_per_s:,.0f} tokens/s "
                 f"({est.tokens_per_s / cluster.gpus:,.0f} per GPU), MFU {est.mfu:.1%}")
    return lines


DDP_OPTIONS = (("flat", "none"), ("hierarchical", "none"), ("flat", "bf16"), ("flat", "powersgd:4"),
               ("flat", "topk:0.01"))


def ddp_options(w: Workload, lay: Layout, cluster: Cluster) -> list[str]:
    """Plain DDP: the step under each gradient exchange the trainer has
    (parallel.dp_allreduce / grad_compression). The search ranks flat,
    hierarchical and bf16; PowerSGD and top-k change the update itself
    (lossy beyond rounding), so they are costed here, not picked."""
    if lay.engine != "ddp" or lay.dp < 2:
        return []
    cells = []
    for allreduce, compression in DDP_OPTIONS:
        if allreduce == "hierarchical" and lay.dp <= cluster.gpus_per_node:
            continue  # one node: the trainer falls back to flat
        e = estimate(w, replace(lay, dp_allreduce=allreduce, grad_compression=compression), cluster)
        name = compression if compression != "none" else allreduce
        cells.append(f"{name} {e.step_time_s:.4f} (dp comm {e.comm_time_s['dp']:.4f})")
    return ["DDP gradient exchange, step s: " + ", ".join(cells)
            + "; powersgd/topk are lossy (not ranked by the search)"]
