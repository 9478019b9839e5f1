"""Every collective one rank takes part in during one optimizer step, and
its time on the link its process group spans.

Ring formulas (formulas.py) on the link a group spans: a group stays inside
a node when its stride x size <= GPUs per node (the mesh is row-major: tp
innermost, then dp_shard, dp_replicate, pp), else its bandwidth is the
inter-node link's. Calibrated devices (``--calibrate``) use their measured
per-call curves instead, scaled by nccl-tests' bus factors (rules.bus_factor).
CPU offload (FSDP2's CPUOffloadPolicy) adds a host-to-device copy of the
shard before every all-gather and a device-to-host copy of the gradient
shard after every reduce-scatter, over PCIe (``Device.host_gbps``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scaletrain.config import ParallelConfig
from scaletrain.parallel.rules import DTYPE_BYTES, MASTER_BYTES, bus_factor, chunk_size, tp_shard_dim
from scaletrain.planner import formulas
from scaletrain.planner.hardware import Cluster, Device
from scaletrain.planner.layout import (Coord, Layout, Workload, _stage_ids, accum, fsdp_units, local_params,
                                       stage_layers, stage_param_names)

DDP_BUCKET_BYTES = ParallelConfig().ddp_bucket_cap_mb * 2**20  # the trainer's default bucket
@dataclass
class Collective:
    kind: str  # all_reduce, all_gather, reduce_scatter, broadcast, send, recv, host_to_device, device_to_host
    group: str  # mesh dimension(s)
    bytes: float  # message bytes per step (nccl-tests' size)
    calls: int
    ranks: int

    def as_dict(self) -> dict:
        return {"kind": self.kind, "group": self.group, "bytes": self.bytes, "calls": self.calls,
                "ranks": self.ranks}


def collectives(w: Workload, layout: Layout, c: Coord, device_type: str = "cpu",
                gpus_per_node: int = 0) -> list[Collective]:
    """Every collective one rank takes part in during one optimizer step
    (``gpus_per_node``: where a hierarchical all-reduce splits the ranks)."""
    m, out = w.model, []
    params = local_params(m, layout, c)
    n_accum = accum(w, layout)
    pmb = layout.pp_microbatches if layout.pp > 1 else 1
    elem = DTYPE_BYTES[w.dtype]
    tokens = layout.micro_batch // pmb * w.seq_len

    if layout.dp > 1 and not layout.fsdp:  # DDP (+ ZeRO-1's parameter broadcast)
        grad_bytes = sum(n for _, n, _ in params) * MASTER_BYTES
        group = "dp_shard" if layout.zero_stage == 1 else "dp_replicate"
        if layout.zero_stage == 0 and (layout.grad_compression != "none" or layout.dp_allreduce != "flat"):
            out += ddp_hook_collectives(layout, params, gpus_per_node, device_type)
        else:
            out.append(Collective("all_reduce", group, grad_bytes, math.ceil(grad_bytes / DDP_BUCKET_BYTES),
                                  layout.dp))
        if layout.zero_stage == 1:
            out.append(Collective("broadcast", "dp_shard", grad_bytes, layout.dp_shard, layout.dp_shard))
    if layout.fsdp:
        out += _fsdp_collectives(w, layout, c, n_accum, pmb, device_type)
    if layout.tp > 1:
        out += _tp_collectives(w, layout, c, n_accum * pmb, tokens, elem)
    if layout.pp > 1:
        stages = _stage_ids(layout, c.pp)
        n_stages = layout.pp * layout.virtual_stages
        msg = tokens * m.dim * elem / (layout.tp if layout.sequence_parallel else 1)
        sends = sum((s != n_stages - 1) + (s != 0) for s in stages) * pmb * n_accum
        out.append(Collective("send", "pp", sends * msg, sends, 2))
        out.append(Collective("recv", "pp", sends * msg, sends, 2))
    out += _grad_norm_collectives(layout, params)
    # The trainer's own: the loss (one fp32 per data-parallel dimension and
    # the pipeline), and the pipeline's squared gradient norm.
    for name, size in (("pp", layout.pp), ("dp_replicate", layout.dp_replicate), ("dp_shard", layout.dp_shard)):
        if size > 1:
            out.append(Collective("all_reduce", name, 4, 1, size))
    if layout.pp > 1:
        out.append(Collective("all_reduce", "pp", 4, 1, layout.pp))
    return out


def _grad_norm_collectives(layout: Layout, params: list[tuple[str, int, tuple]]) -> list[Collective]:
    """clip_grad_norm sums squared local gradients grouped by the mesh
    dimensions they are sharded over, then all-reduces each group's scalar
    once per sharded dimension."""
    groups = set()
    for name, _, tp_shape in params:
        dp_sharded = layout.fsdp and layout.dp_shard > 1
        replicated_grad = name == "embed_tokens.weight" and not dp_sharded  # see memory.model_state_bytes
        tp_sharded = layout.tp > 1 and not replicated_grad and tp_shard_dim(name) is not None
        groups.add((dp_sharded, tp_sharded))
    out = []
    for dp_sharded, tp_sharded in groups:
        if dp_sharded:
            out.append(Collective("all_reduce", "dp_shard", 4, 1, layout.dp_shard))
        if tp_sharded:
            out.append(Collective("all_reduce", "tp", 4, 1, layout.tp))
    return out


def _fsdp_collectives(w: Workload, layout: Layout, c: Coord, n_accum: int, pmb: int,
                      device_type: str = "cpu") -> list[Collective]:
    """All-gather of each unit's parameters (compute dtype) before forward
    (and again before backward under stage 3), reduce-scatter of its fp32
    gradients, and HSDP's all-reduce of the shards across replicas, once
    per reduction: once per step when accumulation holds the unsharded
    gradient, every micro-step under fsdp_accumulate = sharded, every pass
    under a pipeline (its schedule reduces at the end of each)."""
    shard, elem = layout.dp_shard, DTYPE_BYTES[w.dtype]
    out = []
    gather_bytes = gather_calls = rs_bytes = rs_calls = 0
    passes = n_accum * pmb
    reductions = n_accum if (layout.reduce_every_micro_step or layout.pp > 1) else 1
    units = fsdp_units(w, layout, c, device_type)
    for unit in units:
        padded = 0
        for name, shape in unit:
            shape = list(shape)
            dim = tp_shard_dim(name) if layout.tp > 1 else None
            if dim is not None:
                shape[dim] = chunk_size(shape[dim], layout.tp, c.tp)
            padded += -(-shape[0] // shard) * shard * math.prod(shape[1:])
        is_block = unit[0][0].startswith("layers.") and len(units) > 1
        gathers = passes * (2 if layout.zero_stage == 3 and is_block else 1)
        if shard > 1:
            gather_bytes += gathers * padded * elem
            gather_calls += gathers
            rs_bytes += reductions * padded * MASTER_BYTES
            rs_calls += reductions
        if layout.dp_replicate > 1:
            out.append(Collective("all_reduce", "dp_replicate", reductions * padded // shard * MASTER_BYTES,
                                  reductions, layout.dp_replicate))
    if gather_calls and device_type == "cpu":
        # gloo (data_parallel.GlooAllGather / GlooReduceScatter): a broadcast
        # per rank into the gathered buffer; an all-reduce of the whole input.
        out.append(Collective("broadcast", "dp_shard", gather_bytes, gather_calls * shard, shard))
        out.append(Collective("all_reduce", "dp_shard", rs_bytes, rs_calls, shard))
    elif gather_calls:
        out.append(Collective("all_gather", "dp_shard", gather_bytes, gather_calls, shard))
        out.append(Collective("reduce_scatter", "dp_shard", rs_bytes, rs_calls, shard))
        if layout.cpu_offload:  # each rank's shard crosses PCIe before each gather and after each reduction
            out.append(Collective("host_to_device", "host", gather_bytes / shard, gather_calls, 1))
            out.append(Collective("device_to_host", "host", rs_bytes / shard, rs_calls, 1))
    return out


def _tp_collectives(w: Workload, layout: Layout, c: Coord, passes: int, tokens: int, elem: int) -> list[Collective]:
    """Megatron TP: per block one all-reduce after attention and one after the
    MLP in forward, the same two on the input gradients in backward; with SP
    each becomes an all-gather + reduce-scatter pair. Vocab-parallel embedding:
    one forward all-reduce; column-parallel head: one backward all-reduce of
    its input gradient; loss_parallel: three all-reduces of one value per
    token (max, sum of exponentials, target logit)."""
    m, t = w.model, layout.tp
    layers = stage_layers(m, layout, c.pp)
    names = stage_param_names(m, layout, c.pp)
    has_embed = names is None or "embed_tokens.weight" in names
    has_head = names is None or "lm_head.weight" in names
    act = tokens * m.dim * elem
    out = []
    if layout.sequence_parallel:
        n = 4 * layers * passes
        out.append(Collective("all_gather", "tp", n * act, n, t))
        out.append(Collective("reduce_scatter", "tp", n * act, n, t))
        if has_embed:  # forward reduce-scatter, backward all-gather of the output gradient
            out.append(Collective("reduce_scatter", "tp", passes * act, passes, t))
            out.append(Collective("all_gather", "tp", passes * act, passes, t))
        # sequence-parallel norms: the replicated weight's partial gradient is all-reduced
        norms = 2 * layers + has_head
        out.append(Collective("all_reduce", "tp", norms * passes * m.dim * 4, norms * passes, t))
        if has_head:
            out.append(Collective("all_gather", "tp", passes * act, passes, t))
            out.append(Collective("reduce_scatter", "tp", passes * act, passes, t))
    else:
        n = 4 * layers * passes + passes * (has_embed + has_head)
        out.append(Collective("all_reduce", "tp", n * act, n, t))
    if has_head:
        out.append(Collective("all_reduce", "tp", 3 * passes * tokens * 4, 3 * passes, t))
    return out


def merge(colls: list[Collective]) -> dict[str, dict]:
    """Per collective kind: calls and bytes (what the trainer's probe measures)."""
    out: dict[str, dict] = {}
    for col in colls:
        entry = out.setdefault(col.kind, {"calls": 0, "bytes": 0})
        entry["calls"] += col.calls
        entry["bytes"] += int(col.bytes)
    return dict(sorted(out.items()))


def collective_time(col: Collective, cluster: Cluster, layout: Layout) -> tuple[float, str]:
    """(seconds per step, link) of one rank's collective: the calibrated
    curves when the device has them, else the ring formulas on the link its
    group spans."""
    if col.group == "host":
        d = cluster.device
        return col.bytes / (d.host_gbps * 1e9), f"host (PCIe, {d.host_gbps:g} GB/s)"
    bw, lat, link = _link(cluster, layout, col.group)
    if col.kind == "recv":
        return 0.0, link  # the same transfers as the peer's send
    if cluster.device.allreduce_curve:
        return _measured_collective_time(col, cluster.device), link
    if col.kind == "all_reduce":
        t, algorithm = all_reduce_time(col.bytes / max(col.calls, 1), col.ranks, bw, lat)
        t *= max(col.calls, 1)  # latency is paid per call
        link += f", {algorithm}"
    elif col.kind in ("all_gather", "reduce_scatter"):
        t = formulas.ring_all_gather_time(col.bytes, col.ranks, bw, lat) + (col.calls - 1) * (col.ranks - 1) * lat
    elif col.kind == "broadcast":
        t = formulas.broadcast_time(col.bytes, col.ranks, bw, lat) + (col.calls - 1) * lat
    else:  # send
        t = formulas.p2p_time(col.bytes, bw, lat * col.calls)
    return t, link


def all_reduce_time(size: float, n: int, bandwidth: float, latency: float) -> tuple[float, str]:
    """(seconds, "ring" or "tree") of one all-reduce call: the cheaper of the
    ring and the binomial tree (formulas.py) for this message size and rank
    count, as NCCL and MPICH choose per call by size."""
    ring = formulas.ring_all_reduce_time(size, n, bandwidth, latency)
    tree = formulas.tree_all_reduce_time(size, n, bandwidth, latency)
    return (tree, "tree") if tree < ring else (ring, "ring")


def ddp_hook_collectives(layout: Layout, params, gpus_per_node: int, device_type: str) -> list[Collective]:
    """DDP's gradient exchange under the trainer's comm hooks
    (parallel/comm_hooks.py), per step, in DDP buckets of fp32 gradients:

    - hierarchical: reduce-scatter inside the node (local ranks), all-reduce
      of the 1/local shard across nodes (each local rank's own ring, through
      its own NIC), all-gather inside the node; on gloo the hook does an
      in-place all-reduce in the node and one broadcast per slot instead.
      Without a second node the trainer falls back to flat (so does this).
    - bf16: PyTorch's bf16_compress_hook all-reduces a bf16 copy: half the bytes.
    - powersgd:R: PyTorch's PowerSGD (Vogels, Karimireddy & Jaggi 2019,
      "PowerSGD: Practical Low-Rank Gradient Compression for Distributed
      Optimization", alg. 1) all-reduces P (m x R) and Q (n x R) instead of an
      m x n matrix, in two calls per bucket, plus one call for the tensors it
      leaves uncompressed: vectors and matrices where (m+n)·R·2 >= m·n
      (min_compression_rate = 2, as the trainer sets it). Steady state: the
      first step (start_powerSGD_iter = 2) is uncompressed.
    - topk:F: each rank sends its own k = F·n largest entries as fp32 values
      plus int32 indices. Ranks pick different indices, so the sparse vectors
      cannot be summed element-wise on the way (a ring's reduce-scatter needs
      aligned dense chunks; summing supports makes them denser at each hop):
      the hook all-gathers them, 2·F·n·world elements of 4 bytes arrive per
      rank and the bytes grow with the world size, unlike an all-reduce's."""
    from scaletrain.config import parse_compression

    numel = sum(n for _, n, _ in params)
    grad_bytes = numel * MASTER_BYTES
    buckets = math.ceil(grad_bytes / DDP_BUCKET_BYTES)
    dp, kind = layout.dp, parse_compression(layout.grad_compression)
    local = math.gcd(dp, gpus_per_node) if gpus_per_node else dp
    if layout.dp_allreduce == "hierarchical" and 1 < dp // local and local > 1:
        shard = grad_bytes / local
        if device_type == "cpu":
            return [Collective("all_reduce", "dp_node", grad_bytes, buckets, local),
                    Collective("all_reduce", "dp_nodes", shard, buckets, dp // local),
                    Collective("broadcast", "dp_node", grad_bytes, buckets * local, local)]
        return [Collective("reduce_scatter", "dp_node", grad_bytes, buckets, local),
                Collective("all_reduce", "dp_nodes", shard, buckets, dp // local),
                Collective("all_gather", "dp_node", grad_bytes, buckets, local)]
    if kind[0] == "bf16":
        return [Collective("all_reduce", "dp_replicate", numel * 2, buckets, dp)]
    if kind[0] == "powersgd":
        rank, low, dense = kind[1], 0, 0
        for _, n, shape in params:  # PyTorch views each tensor as shape[0] x rest (a vector: n x 1)
            m, k = shape[0], n // shape[0]
            r = min(m, k, rank)
            if (m + k) * r * 2 < m * k:
                low += (m + k) * r
            else:
                dense += n
        return [Collective("all_reduce", "dp_replicate", dense * MASTER_BYTES, buckets, dp),
                Collective("all_reduce", "dp_replicate", low * MASTER_BYTES, 2 * buckets, dp)]
    if kind[0] == "topk":
        k = max(buckets, int(numel * kind[1]))
        return [Collective("all_gather", "dp_replicate", dp * k * (MASTER_BYTES + 4), 2 * buckets, dp)]
    return [Collective("all_reduce", "dp_replicate", grad_bytes, buckets, dp)]


def _interp(curve: tuple, x: float) -> float:
    """Log-log interpolation in a measured [(x, y), ...] curve, clamped at the ends."""
    pts = sorted(curve)
    if x <= pts[0][0]:
        return pts[0][1]
    if x >= pts[-1][0]:
        return pts[-1][1] * (x / pts[-1][0] if pts[-1][1] < 1 else 1)  # times grow linearly past the end
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            f = math.log(x / x0) / math.log(x1 / x0)
            return math.exp(math.log(y0) + f * (math.log(y1) - math.log(y0)))
    return pts[-1][1]


def _measured_collective_time(col: Collective, dev: Device) -> float:
    """Per call, the calibrated time of that collective at that message size
    (scaled to this group size by the ring bus factor); a collective without
    its own curve takes the all-reduce curve scaled by the bus factors."""
    per_call = col.bytes / max(col.calls, 1)
    n0 = max(dev.curve_ranks, 2)
    own = {"all_reduce": dev.allreduce_curve, "all_gather": dev.allgather_curve,
           "reduce_scatter": dev.reducescatter_curve, "broadcast": dev.broadcast_curve}.get(col.kind)
    measured_kind = col.kind if own else "all_reduce"
    return col.calls * _interp(own or dev.allreduce_curve, per_call) * bus_factor(col.kind, col.ranks) \
        / bus_factor(measured_kind, n0)


def _link(cluster: Cluster, layout: Layout, group: str) -> tuple[float, float, str]:
    """(bytes/s, latency s, name) of the link a mesh dimension's groups span:
    a group stays inside a node when (its stride x size) <= GPUs per node.
    Across nodes, NCCL runs one ring (or tree) per NIC ("multi-rail"): with k
    of a node's GPUs in the group, k rings cross the node boundary in
    parallel, each through its GPU's own NIC, so the group's bus bandwidth is
    k x the per-GPU inter-node link, at most the intra-node one. Assumption:
    one NIC per GPU, as in DGX/HGX nodes (inter_gbps is per GPU)."""
    inner = {"tp": 1, "dp_shard": layout.tp, "dp_replicate": layout.tp * layout.dp_shard,
             "pp": layout.tp * layout.dp, "dp_node": 1}
    size = {"tp": layout.tp, "dp_shard": layout.dp_shard, "dp_replicate": layout.dp_replicate, "pp": layout.pp,
            "dp_node": 1}
    d = cluster.device
    if group == "dp_nodes":  # one rank per node: each local rank's own ring through its own NIC
        return d.inter_gbps * 1e9, d.inter_latency_us * 1e-6, f"inter-node ({d.inter} x1)"
    if inner[group] * size[group] <= cluster.gpus_per_node:
        return d.intra_gbps * 1e9, d.intra_latency_us * 1e-6, f"intra-node ({d.intra})"
    rails = max(1, min(size[group], cluster.gpus_per_node // inner[group]))
    bandwidth = min(d.intra_gbps, rails * d.inter_gbps)
    return bandwidth * 1e9, d.inter_latency_us * 1e-6, f"inter-node ({d.inter} x{rails})"
