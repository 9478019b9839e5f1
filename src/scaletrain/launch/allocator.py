"""Placing jobs' ranks on a cluster's nodes and GPUs.

A job asks for ``tp x pp x dp`` GPUs. Its ranks are numbered as scaletrain's
DeviceMesh numbers them, (pp, dp, tp) with tp innermost, so a tensor-parallel
group is ``tp`` consecutive ranks and a pipeline stage a contiguous block of
ranks. Every node therefore receives a multiple of ``tp`` GPUs (a TP group
never straddles nodes: its all-reduces stay on NVLink) and ranks are dealt to
the chosen nodes in inventory order (stage 0 on the first nodes, the next
stage on the next ones, so pipeline sends go to a neighbour).

Policies decide which nodes: ``first_fit`` (inventory order), ``best_fit``
(the node whose free GPUs fit the remainder most tightly, keeping whole nodes
free for large jobs), ``load_balance`` (the least-loaded nodes, spreading heat
and host-side load), ``topology`` (the fewest racks, then best fit inside).
Pure Python, no torch: the allocator runs on a login node.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from scaletrain.errors import UserError

POLICIES = ("first_fit", "best_fit", "load_balance", "topology")


@dataclass
class Node:
    name: str
    gpus: int
    rack: str = "default"
    free: list[int] = field(default_factory=list)  # free GPU ids, ascending

    def __post_init__(self):
        if not self.free:
            self.free = list(range(self.gpus))

    @property
    def used(self) -> int:
        return self.gpus - len(self.free)


@dataclass
class Job:
    name: str
    tp: int = 1
    pp: int = 1
    dp: int = 1
    submit_s: float = 0.0     # simulation only: arrival time
    duration_s: float = 0.0   # simulation only: run time once placed

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass
class Placement:
    job: Job
    hosts: list[tuple[str, list[int]]]  # (node, GPU ids) in rank order

    def ranks(self) -> dict[str, tuple[int, int]]:
        """Each host's first and last global rank."""
        out, start = {}, 0
        for host, gpus in self.hosts:
            out[host] = (start, start + len(gpus) - 1)
            start += len(gpus)
        return out

    def as_dict(self) -> dict:
        j = self.job
        return {"job": j.name, "world_size": j.world_size, "tp": j.tp, "pp": j.pp, "dp": j.dp,
                "hosts": [h for h, _ in self.hosts],
                "gpus": {h: g for h, g in self.hosts},
                "cuda_visible_devices": {h: ",".join(map(str, g)) for h, g in self.hosts},
                "ranks": {h: list(r) for h, r in self.ranks().items()}}


class Cluster:
    def __init__(self, nodes: list[Node]):
        self.nodes = nodes
        self.order = {n.name: i for i, n in enumerate(nodes)}
        self.by_name = {n.name: n for n in nodes}
        self.total = sum(n.gpus for n in nodes)
        self.largest_node = max(n.gpus for n in nodes)

    @property
    def free(self) -> int:
        return sum(len(n.free) for n in self.nodes)

    def never_fits(self, job: Job) -> str | None:
        """Why ``job`` could not run even on the empty cluster, or None."""
        if job.tp > self.largest_node:
            return (f"a tensor-parallel group of {job.tp} GPUs must sit on one node; the largest node has "
                    f"{self.largest_node}")
        units = sum(n.gpus // job.tp for n in self.nodes)
        if job.world_size > units * job.tp:
            return (f"needs {job.world_size} GPUs in groups of {job.tp}; the whole cluster offers "
                    f"{units * job.tp} that way")
        return None

    def place(self, job: Job, policy: str) -> Placement | str:
        """Claim GPUs for ``job``; returns the placement, or why it must wait."""
        if (reason := self.never_fits(job)) is not None:
            return reason
        needed = job.world_size // job.tp
        available = sum(len(n.free) // job.tp for n in self.nodes)
        if available < needed:
            return (f"waiting: needs {job.world_size} GPUs in groups of {job.tp} on one node; "
                    f"{available * job.tp} free that way ({self.free} free in all)")
        picks = _CHOOSERS[policy](self.nodes, needed, job.tp)
        picks.sort(key=lambda pick: self.order[pick[0].name])
        hosts = []
        for node, units in picks:
            taken, node.free = node.free[:units * job.tp], node.free[units * job.tp:]
            hosts.append((node.name, taken))
        return Placement(job, hosts)

    def release(self, placement: Placement) -> None:
        for host, gpus in placement.hosts:
            node = self.by_name[host]
            node.free = sorted(node.free + gpus)

    def fragmentation(self) -> float:
        """Share of the free GPUs that sit on partly used nodes, where no
        whole-node job can use them (0 when nothing is free)."""
        free = self.free
        stranded = sum(len(n.free) for n in self.nodes if 0 < n.used)
        return stranded / free if free else 0.0


def _units(node: Node, tp: int) -> int:
    return len(node.free) // tp


def _take(picks: list, node: Node, units: int, remaining: int) -> int:
    picks.append((node, units))
    return remaining - units


def _first_fit(nodes: list[Node], needed: int, tp: int) -> list:
    picks, remaining = [], needed
    for node in nodes:
        if remaining and (units := min(_units(node, tp), remaining)):
            remaining = _take(picks, node, units, remaining)
    return picks


def _best_fit(nodes: list[Node], needed: int, tp: int) -> list:
    """The remainder goes to the node it fits most tightly; while no node can
    hold it, take the node with the most free GPUs (fewest nodes per job)."""
    picks, remaining, pool = [], needed, [n for n in nodes if _units(n, tp)]
    while remaining:
        fitting = [n for n in pool if _units(n, tp) >= remaining]
        if fitting:
            node = min(fitting, key=lambda n: len(n.free))
            return picks + [(node, remaining)]
        node = max(pool, key=lambda n: _units(n, tp))
        pool.remove(node)
        remaining = _take(picks, node, _units(node, tp), remaining)
    return picks


def _load_balance(nodes: list[Node], needed: int, tp: int) -> list:
    """Least-loaded nodes first (lowest share of GPUs in use)."""
    picks, remaining = [], needed
    for node in sorted((n for n in nodes if _units(n, tp)), key=lambda n: n.used / n.gpus):
        if remaining:
            remaining = _take(picks, node, min(_units(node, tp), remaining), remaining)
    return picks


def _topology(nodes: list[Node], needed: int, tp: int) -> list:
    """One rack if any can hold the job (the tightest such rack), else the
    racks with the most free GPUs first; best fit inside each rack."""
    racks: dict[str, list[Node]] = {}
    for node in nodes:
        racks.setdefault(node.rack, []).append(node)

    def free_units(rack):
        return sum(_units(n, tp) for n in racks[rack])

    fitting = [r for r in racks if free_units(r) >= needed]
    if fitting:
        return _best_fit(racks[min(fitting, key=free_units)], needed, tp)
    picks, remaining = [], needed
    for rack in sorted(racks, key=free_units, reverse=True):
        units = min(free_units(rack), remaining)
        if units:
            picks += _best_fit(racks[rack], units, tp)
            remaining -= units
    return picks


_CHOOSERS = {"first_fit": _first_fit, "best_fit": _best_fit, "load_balance": _load_balance,
             "topology": _topology}


# -- input files ---------------------------------------------------------------

def _read_toml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: malformed TOML: {exc}") from None


def _positive_int(path: Path, where: str, entry: dict, key: str, default: int | None = None) -> int:
    value = entry.get(key, default)
    if value is None:
        raise UserError(f"{path}: {where} lacks '{key}'")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{path}: {where}.{key} = {value!r}; allowed: an integer >= 1")
    return value


def _entries(path: Path, raw: dict, table: str, allowed: set[str]) -> list[dict]:
    entries = raw.get(table)
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path}: expected one or more [[{table}]] tables")
    for i, entry in enumerate(entries):
        if unknown := sorted(set(entry) - allowed):
            raise UserError(f"{path}: [[{table}]] #{i + 1} has unknown key '{unknown[0]}'; allowed: "
                            f"{', '.join(sorted(allowed))}")
    return entries


def load_inventory(path: Path) -> list[Node]:
    """``[[node]]`` tables: name, gpus, rack (optional), count (optional: that
    many nodes named name-00, name-01, ...)."""
    raw = _read_toml(path, "inventory")
    nodes: list[Node] = []
    for i, entry in enumerate(_entries(path, raw, "node", {"name", "gpus", "rack", "count"})):
        where = f"[[node]] #{i + 1}"
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise UserError(f"{path}: {where} needs a name (a string)")
        gpus = _positive_int(path, where, entry, "gpus")
        count = _positive_int(path, where, entry, "count", 1)
        rack = str(entry.get("rack", "default"))
        names = [name] if "count" not in entry else [f"{name}-{k:02d}" for k in range(count)]
        nodes += [Node(n, gpus, rack) for n in names]
    if len({n.name for n in nodes}) != len(nodes):
        raise UserError(f"{path}: node names repeat")
    return nodes


def load_jobs(path: Path) -> list[Job]:
    """``[[job]]`` tables: name, and either gpus (pure data parallel) or tp/pp/dp."""
    raw = _read_toml(path, "jobs")
    jobs = []
    allowed = {"name", "gpus", "tp", "pp", "dp", "submit_s", "duration_s"}
    for i, entry in enumerate(_entries(path, raw, "job", allowed)):
        where = f"[[job]] #{i + 1}"
        name = entry.get("name", f"job{i + 1}")
        if "gpus" in entry and "dp" in entry:
            raise UserError(f"{path}: {where} gives both gpus and dp; gpus = tp x pp x dp")
        tp = _positive_int(path, where, entry, "tp", 1)
        pp = _positive_int(path, where, entry, "pp", 1)
        dp = _positive_int(path, where, entry, "dp", 1)
        if "gpus" in entry:
            gpus = _positive_int(path, where, entry, "gpus")
            if gpus % (tp * pp):
                raise UserError(f"{path}: {where}.gpus = {gpus} is not a multiple of tp x pp = {tp * pp}")
            dp = gpus // (tp * pp)
        jobs.append(Job(str(name), tp, pp, dp, float(entry.get("submit_s", 0.0)),
                        float(entry.get("duration_s", 0.0))))
    if len({j.name for j in jobs}) != len(jobs):
        raise UserError(f"{path}: job names repeat")
    return jobs


def allocate(nodes: list[Node], jobs: list[Job], policy: str) -> tuple[Cluster, list[Placement], dict[str, str]]:
    """Place ``jobs`` in order on an empty cluster; the rest wait with a reason."""
    if policy not in POLICIES:
        raise UserError(f"--policy {policy!r}; allowed: {', '.join(POLICIES)}")
    cluster = Cluster(nodes)
    placed, queued = [], {}
    for job in jobs:
        result = cluster.place(job, policy)
        if isinstance(result, str):
            queued[job.name] = result
        else:
            placed.append(result)
    return cluster, placed, queued


def hostfile(placement: Placement) -> str:
    """DeepSpeed / MPI hostfile: ``host slots=N`` per line."""
    return "".join(f"{host} slots={len(gpus)}\n" for host, gpus in placement.hosts)
