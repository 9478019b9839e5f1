"""``scaletrain doctor``'s link check: point-to-point bandwidth inside and
between nodes, and the link that is slow.

Nodes are told apart by torchrun's GROUP_RANK (the agent's node rank). One
intra-node pair per node (its first two ranks) and one pair per two nodes
(their first ranks) each time a ping-pong of ``nbytes`` with send/recv on the
job's backend, one pair at a time so pairs do not share the wire; bandwidth =
bytes moved / time, as nccl-tests' sendrecv reports it (busbw = algbw for
point-to-point, PERFORMANCE.md).
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist

SLOW_FACTOR = 2.0  # a link below 1/SLOW_FACTOR of the median of its kind is named slow


def link_pairs(node_of_rank: list[int]) -> list[tuple[str, int, int]]:
    """(kind, rank a, rank b): each node's first two ranks, each node pair's first ranks."""
    first: dict[int, list[int]] = {}
    for rank, node in enumerate(node_of_rank):
        first.setdefault(node, []).append(rank)
    nodes = sorted(first)
    pairs = [("intra", first[n][0], first[n][1]) for n in nodes if len(first[n]) > 1]
    pairs += [("inter", first[a][0], first[b][0]) for i, a in enumerate(nodes) for b in nodes[i + 1:]]
    return pairs


def _ping_pong(peer: int, leader: bool, buf: torch.Tensor, iters: int) -> float:
    """Seconds for ``iters`` round trips of ``buf`` (the leader sends first)."""
    start = time.perf_counter()
    for _ in range(iters):
        if leader:
            dist.send(buf, peer)
            dist.recv(buf, peer)
        else:
            dist.recv(buf, peer)
            dist.send(buf, peer)
    return time.perf_counter() - start


def measure_links(device: torch.device, nbytes: int = 2 << 20, iters: int = 3) -> list[dict]:
    """Every rank calls this; every rank gets the same rows."""
    rank, world = dist.get_rank(), dist.get_world_size()
    node_of_rank: list = [None] * world
    dist.all_gather_object(node_of_rank, int(os.environ.get("GROUP_RANK", "0")))
    buf = torch.zeros(nbytes // 4, device=device)
    mine = []
    for kind, a, b in link_pairs(node_of_rank):
        if rank in (a, b):
            peer = b if rank == a else a
            _ping_pong(peer, rank == a, buf, 1)  # warm-up: connection set-up is not bandwidth
            seconds = _ping_pong(peer, rank == a, buf, iters)
            if rank == a:
                mine.append({"kind": kind, "ranks": [a, b], "nodes": [node_of_rank[a], node_of_rank[b]],
                             "bytes_per_s": 2 * iters * nbytes / seconds})
        dist.barrier()
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    return [row for rows in gathered for row in rows]


def _mbps(row: dict) -> str:
    return f"{row['bytes_per_s'] / 1e6:.0f} MB/s"


def _name(row: dict) -> str:
    (a, b), (na, nb) = row["ranks"], row["nodes"]
    return f"node {na} (rank {a}) <-> node {nb} (rank {b})" if na != nb else f"node {na} ranks {a}<->{b}"


def summarize_links(rows: list[dict]) -> tuple[str, str, str]:
    """(status, detail, fix): the median bandwidth of each kind, inter vs intra,
    and the slow links (below 1/SLOW_FACTOR of their kind's median)."""
    if not rows:
        return "PASS", "one rank: no links to measure", ""
    parts, slow = [], []
    medians = {}
    for kind in ("intra", "inter"):
        of_kind = [r for r in rows if r["kind"] == kind]
        if not of_kind:
            continue
        medians[kind] = statistics.median(r["bytes_per_s"] for r in of_kind)
        parts.append(f"{kind}-node {medians[kind] / 1e6:.0f} MB/s (median of {len(of_kind)})")
        slow += [r for r in of_kind if r["bytes_per_s"] < medians[kind] / SLOW_FACTOR]
    if len(medians) == 2:
        parts.append(f"inter-node is {medians['intra'] / medians['inter']:.1f}x slower than intra-node")
    slowest = min(rows, key=lambda r: r["bytes_per_s"])
    parts.append(f"slowest link: {_name(slowest)} at {_mbps(slowest)}")
    if slow:
        parts.append("slow link(s): " + ", ".join(f"{_name(r)} at {_mbps(r)}" for r in slow))
        return ("WARN", "; ".join(parts),
                "check the named nodes' NICs, cables/switch ports, traffic shaping, and NCCL_SOCKET_IFNAME / "
                "GLOO_SOCKET_IFNAME (a slow management interface instead of the fast one)")
    return "PASS", "; ".join(parts), ""
