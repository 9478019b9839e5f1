"""DDP communication hooks: hierarchical all-reduce and gradient compression.

``parallel.dp_allreduce = hierarchical`` replaces DDP's flat all-reduce of
each gradient bucket with the two-level scheme of Horovod / NCCL's trees
(Sergeev & Del Balso 2018; Jia et al. 2018, "Highly scalable deep learning
training system with mixed-precision", sec. 3.3): reduce-scatter inside a
node, all-reduce of the 1/L shard across nodes (L ranks per node), all-gather
inside the node. Only 1/L of the bucket crosses the slow inter-node link per
rank, and the cross-node rings are L times shorter.

``parallel.grad_compression``:
- ``bf16``: PyTorch's ``bf16_compress_hook`` (half the bytes, bf16 rounding);
- ``powersgd:R``: PyTorch's PowerSGD hook (Vogels et al. 2019), rank-R
  factors with error feedback and warm start;
- ``topk:F``: top-k sparsification with error feedback (Stich et al. 2018,
  "Sparsified SGD with memory"; Lin et al. 2018, Deep Gradient Compression):
  each rank sends its F x numel largest-magnitude entries of (gradient +
  residual) as (values, int32 indices) through one all-gather; what it did
  not send is kept as its residual and added to the next step's gradient.

Each hook counts the bytes this rank hands to collectives per step, so the
trainer can log ``grad_comm_bytes`` and, for compression, the ratio against
the fp32 all-reduce of the same buckets.
"""

# No "from __future__ import annotations": DDP checks that a hook is annotated
# with the type torch.futures.Future[torch.Tensor] itself, not its string.
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from scaletrain.config import ParallelConfig, parse_compression
from scaletrain.parallel.runtime import all_gather_single, reduce_scatter_single


@dataclass
class CommStats:
    """Bytes handed to gradient collectives by this rank since the last ``take``."""

    compressing: bool
    sent_bytes: int = 0
    dense_bytes: int = 0  # what DDP's fp32 all-reduce of the same buckets hands over
    inter_node_bytes: int = 0

    def add(self, sent: int, dense: int, inter_node: int = 0) -> None:
        self.sent_bytes += sent
        self.dense_bytes += dense
        self.inter_node_bytes += inter_node

    def take(self) -> dict:
        """Metrics for the step just finished, then reset."""
        out = {"grad_comm_bytes": self.sent_bytes}
        if self.compressing and self.sent_bytes:
            out["compression_ratio"] = self.dense_bytes / self.sent_bytes
        if self.inter_node_bytes:
            out["inter_node_bytes"] = self.inter_node_bytes
        self.sent_bytes = self.dense_bytes = self.inter_node_bytes = 0
        return out


def _done(tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(tensor)
    return fut


# --- hierarchical all-reduce -------------------------------------------------

def node_mesh(group, device_type: str):
    """A (node, local) DeviceMesh over the ranks of ``group``, nodes told apart
    by torchrun's GROUP_RANK (the agent's node rank), or None with one node."""
    from torch.distributed.device_mesh import DeviceMesh

    ranks = dist.get_process_group_ranks(group)
    nodes: list = [None] * len(ranks)
    dist.all_gather_object(nodes, int(os.environ.get("GROUP_RANK", "0")), group=group)
    by_node: dict[int, list[int]] = {}
    for rank, node in zip(ranks, nodes):
        by_node.setdefault(node, []).append(rank)
    sizes = {len(r) for r in by_node.values()}
    if len(sizes) != 1:
        raise RuntimeError(f"parallel.dp_allreduce = hierarchical needs the same number of ranks on every node; "
                           f"ranks per node: { {n: len(r) for n, r in sorted(by_node.items())} }")
    if len(by_node) == 1 or sizes == {1}:
        return None
    grid = torch.tensor([by_node[n] for n in sorted(by_node)], dtype=torch.int64)  # (nodes, ranks per node)
    return DeviceMesh(device_type, grid, mesh_dim_names=("node", "local"))


@dataclass
class HierarchicalState:
    intra: object  # process group of this rank's node
    inter: object  # process group of the ranks with this rank's local index on every node
    world: int
    stats: CommStats
    gloo: bool


def hierarchical_hook(state: HierarchicalState, bucket) -> torch.futures.Future[torch.Tensor]:
    buf = bucket.buffer()
    n, local = buf.numel(), state.intra.size()
    buf.div_(state.world)
    padded = F.pad(buf, (0, (-n) % local)) if n % local else buf
    shard_numel = padded.numel() // local
    me = dist.get_group_rank(state.intra, dist.get_rank())
    if state.gloo:
        # gloo has no native reduce-scatter (torch all-reduces a copy and keeps
        # a slot): the in-place all-reduce is the same traffic without the copy,
        # and the all-gather is one in-place broadcast per slot (see
        # data_parallel.GlooAllGather for the measurements).
        dist.all_reduce(padded, group=state.intra)
        shard = padded[me * shard_numel:(me + 1) * shard_numel]
        dist.all_reduce(shard, group=state.inter)
        for src, chunk in enumerate(padded.view(local, -1)):
            dist.broadcast(chunk, group=state.intra, group_src=src)
        out = padded
    else:
        shard = torch.empty(shard_numel, dtype=buf.dtype, device=buf.device)
        reduce_scatter_single(shard, padded, group=state.intra)
        dist.all_reduce(shard, group=state.inter)
        out = torch.empty_like(padded)
        all_gather_single(out, shard, group=state.intra)
    if out is not buf:
        buf.copy_(out[:n])
    size = buf.element_size()
    state.stats.add(sent=(padded.numel() + 2 * shard_numel) * size, dense=n * size,
                    inter_node=shard_numel * size)
    return _done(buf)


# --- compression ---------------------------------------------------------------

@dataclass
class TopKState:
    group: object
    fraction: float
    stats: CommStats
    residuals: dict = field(default_factory=dict)  # bucket index -> residual of the last step
    iteration: int = 0


def topk_hook(state: TopKState, bucket) -> torch.futures.Future[torch.Tensor]:
    buf = bucket.buffer()
    n, world, size = buf.numel(), state.group.size(), buf.element_size()
    if state.iteration == 0:
        # DDP rebuilds its buckets after the first iteration: like PyTorch's
        # PowerSGD (start_powerSGD_iter > 1) the first step is a plain
        # all-reduce, so residuals always match their bucket's layout.
        buf.div_(world)
        dist.all_reduce(buf, group=state.group)
        state.stats.add(sent=n * size, dense=n * size)
    else:
        residual = state.residuals.get(bucket.index())
        grad = buf.div(world)
        if residual is not None and residual.numel() == n:
            grad += residual
        k = max(1, int(n * state.fraction))
        indices = grad.abs().topk(k, sorted=False).indices.to(torch.int32)
        values = grad[indices]
        grad[indices] = 0  # what is not sent now is sent later (error feedback)
        state.residuals[bucket.index()] = grad
        all_values = torch.empty(world * k, dtype=values.dtype, device=buf.device)
        all_indices = torch.empty(world * k, dtype=torch.int32, device=buf.device)
        all_gather_single(all_values, values, group=state.group)
        all_gather_single(all_indices, indices, group=state.group)
        buf.zero_().index_add_(0, all_indices, all_values)
        state.stats.add(sent=k * (values.element_size() + 4), dense=n * size)
    if bucket.is_last():
        state.iteration += 1
    return _done(buf)


def _bf16_hook(state: tuple, bucket) -> torch.futures.Future[torch.Tensor]:
    group, stats = state
    stats.add(sent=bucket.buffer().numel() * 2, dense=bucket.buffer().numel() * bucket.buffer().element_size())
    return default_hooks.bf16_compress_hook(group, bucket)


def _powersgd_hook(state: tuple, bucket) -> torch.futures.Future[torch.Tensor]:
    """PyTorch's PowerSGD hook; its own element counters give the bytes sent
    (before start_powerSGD_iter it all-reduces the bucket uncompressed)."""
    psgd, stats = state
    after = psgd.total_numel_after_compression
    fut = powerSGD_hook.powerSGD_hook(psgd, bucket)
    size, n = bucket.buffer().element_size(), bucket.buffer().numel()
    sent = psgd.total_numel_after_compression - after
    stats.add(sent=(sent if sent else n) * size, dense=n * size)
    return fut


def register_comm_hook(ddp, group, p: ParallelConfig, device_type: str) -> CommStats | None:
    """Install the hook parallel.dp_allreduce / grad_compression ask for; its
    byte counter, or None for DDP's own flat all-reduce."""
    kind, arg = parse_compression(p.grad_compression)
    stats = CommStats(compressing=kind != "none")
    if p.dp_allreduce == "hierarchical":
        mesh = node_mesh(group, device_type)
        if mesh is None:  # one node (or one rank per node): the flat all-reduce is already that
            if dist.get_rank() == 0:
                print("parallel.dp_allreduce = hierarchical: the data-parallel ranks are on one node (or one per "
                      "node), so the flat all-reduce is used", file=sys.stderr)
            return None
        ddp.register_comm_hook(HierarchicalState(mesh["local"].get_group(), mesh["node"].get_group(),
                                                 group.size(), stats, dist.get_backend(group) == "gloo"),
                               hierarchical_hook)
    elif kind == "bf16":
        ddp.register_comm_hook((group, stats), _bf16_hook)
    elif kind == "powersgd":
        # start_powerSGD_iter = 2: the smallest PyTorch allows with error feedback (buckets are rebuilt after step 1).
        psgd = powerSGD_hook.PowerSGDState(group, matrix_approximation_rank=int(arg), start_powerSGD_iter=2,
                                           min_compression_rate=2)
        ddp.register_comm_hook((psgd, stats), _powersgd_hook)
    elif kind == "topk":
        ddp.register_comm_hook(TopKState(group, float(arg), stats), topk_hook)
    else:
        return None
    return stats
