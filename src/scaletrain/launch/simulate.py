"""An event-driven simulation of a job stream on a cluster under one
allocator policy: what the allocator benchmark compares policies with.

Scheduling is first-come first-served with greedy backfill: after every
arrival and completion the queue is scanned in arrival order and every job
that fits now starts (no reservations, so a large job can wait while small
ones pass it, as on a cluster without a backfill planner). Time is in the
jobs' own units.
"""

from __future__ import annotations

import heapq
import statistics
from dataclasses import dataclass

from scaletrain.launch.allocator import Cluster, Job, Node, Placement


@dataclass
class SimResult:
    policy: str
    utilisation: float          # GPUs in use / all GPUs, time-averaged while jobs still arrive
    mean_wait: float            # queueing delay: start - submit
    p95_wait: float
    mean_wait_large: float      # jobs of 16 GPUs or more
    fragmentation: float        # time-average of Cluster.fragmentation()
    cross_rack: float           # share of multi-node jobs spanning more than one rack
    makespan: float
    never_ran: int


def simulate(nodes: list[Node], jobs: list[Job], policy: str) -> SimResult:
    cluster = Cluster([Node(n.name, n.gpus, n.rack) for n in nodes])
    rack = {n.name: n.rack for n in nodes}
    arrivals = sorted(jobs, key=lambda j: j.submit_s)
    finishing: list[tuple[float, int, Placement]] = []  # heap of (end time, tie-break, placement)
    queue: list[Job] = []
    waits: dict[str, float] = {}
    sizes = {j.name: j.world_size for j in jobs}
    multi_node = cross = 0
    used_area = frag_area = 0.0
    last_arrival = arrivals[-1].submit_s if arrivals else 0.0
    now, i, ticket = arrivals[0].submit_s if arrivals else 0.0, 0, 0
    start = now
    while i < len(arrivals) or finishing or queue:
        next_arrival = arrivals[i].submit_s if i < len(arrivals) else float("inf")
        next_end = finishing[0][0] if finishing else float("inf")
        if next_arrival == next_end == float("inf"):
            break  # only jobs that can never run are left
        later = min(next_arrival, next_end)
        frag_area += cluster.fragmentation() * (later - now)
        # The tail after the last arrival drains the queue whatever the
        # policy; utilisation is measured while the stream keeps it fed.
        used_area += (cluster.total - cluster.free) * max(0.0, min(later, last_arrival) - now)
        now = later
        if next_end <= next_arrival:
            cluster.release(heapq.heappop(finishing)[2])
        else:
            queue.append(arrivals[i])
            i += 1
        still_waiting = []
        for job in queue:
            placed = cluster.place(job, policy)
            if isinstance(placed, str):
                still_waiting.append(job)
                continue
            waits[job.name] = now - job.submit_s
            if len(placed.hosts) > 1:
                multi_node += 1
                cross += len({rack[h] for h, _ in placed.hosts}) > 1
            ticket += 1
            heapq.heappush(finishing, (now + job.duration_s, ticket, placed))
        queue = still_waiting
    window = last_arrival - start
    return _result(policy, waits, sizes, used_area / (cluster.total * window) if window else 0.0,
                   frag_area, cross / multi_node if multi_node else 0.0, now - start, len(queue))


def _result(policy: str, waits: dict[str, float], sizes: dict[str, int], utilisation: float, frag_area: float,
            cross_rack: float, makespan: float, never_ran: int) -> SimResult:
    large = [w for name, w in waits.items() if sizes[name] >= 16]
    ordered = sorted(waits.values())
    return SimResult(policy=policy, utilisation=utilisation,
                     mean_wait=statistics.fmean(ordered) if ordered else 0.0,
                     p95_wait=ordered[int(0.95 * (len(ordered) - 1))] if ordered else 0.0,
                     mean_wait_large=statistics.fmean(large) if large else 0.0,
                     fragmentation=frag_area / makespan if makespan else 0.0,
                     cross_rack=cross_rack, makespan=makespan, never_ran=never_ran)
