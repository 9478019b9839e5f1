"""The hardware catalog (catalog.toml, extendable by the user) and clusters
built from it, mixed ones included."""

from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from scaletrain.errors import UserError

BUILTIN = Path(__file__).with_name("catalog.toml")
USER_CATALOG = Path("~/.config/scaletrain/hardware.toml")
GIB = 2**30


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    memory_gib: float
    bf16: float  # dense peak TFLOP/s; 0 = unsupported
    fp16: float
    fp32: float
    hbm_gbps: float
    intra: str
    intra_gbps: float
    intra_latency_us: float
    inter: str
    inter_gbps: float
    inter_latency_us: float
    matmul_efficiency: float = 0.6
    overhead_gib: float = 1.0
    match: tuple[str, ...] = ()
    # Fraction of data-parallel gradient communication hidden behind the
    # backward pass: 1 on GPUs (NCCL runs on its own stream), 0 on CPUs (gloo
    # competes with compute for the same cores). An explicit assumption.
    overlap: float = 1.0
    # Measured by --calibrate (empty for catalog GPUs): achieved FLOP/s of a
    # 1024-row matmul by weight size k*n, and seconds per all-reduce call by
    # message bytes over ``curve_ranks`` ranks. When present they replace
    # peak x matmul_efficiency and the alpha-beta link model.
    matmul_curve: tuple = ()
    attention_flops: float = 0.0  # causal SDPA forward + backward, FLOP/s (PaLM's count)
    allreduce_curve: tuple = ()
    allgather_curve: tuple = ()  # the same for the other collectives, by full-buffer bytes
    reducescatter_curve: tuple = ()
    broadcast_curve: tuple = ()
    curve_ranks: int = 0
    # Also from --calibrate: the rate at which a real transformer block moves
    # its saved activations through the non-matmul ops (norms, RoPE, SiLU,
    # residual adds; everything of a measured block's forward + backward that
    # the matmul and attention rates leave unexplained; 0 = not measured:
    # hbm_gbps), and what tensor parallelism costs beyond its local compute
    # and its collectives, measured on a real TP mesh at two sizes:
    # ((activation elements per pass, seconds per block pass, seconds per
    # model pass), ...) without and with sequence parallelism (empty: none).
    elementwise_gbps: float = 0.0
    tp_dispatch_curve: tuple = ()
    sp_dispatch_curve: tuple = ()
    # The step-time model's efficiency parameters for catalog GPUs (what
    # references.toml fits; see planner/steptime.py for where each enters):
    # achieved fraction of peak in flash attention (0 = matmul_efficiency),
    # achieved fraction of hbm_gbps in memory-bound work (norms, RoPE, SiLU,
    # residual adds, the optimizer), and the host's time to dispatch one aten
    # op in eager mode (0 = not charged): a step is host-bound when its ops
    # take longer to issue than the device takes to run them.
    attention_efficiency: float = 0.0
    membound_efficiency: float = 1.0
    host_op_us: float = 0.0
    # Host link for CPU offload, GB/s per direction (PCIe x16 spec: gen3 16,
    # gen4 32, gen5 64), and the rate of the optimizer step on the host over
    # the offloaded states (an assumption: a quarter of a 2-socket 8-channel
    # DDR4-3200 server's 409.6 GB/s peak, for torch's CPU AdamW).
    host_gbps: float = 32.0
    host_adam_gbps: float = 102.4
    # CPU memory of one node, GiB, which CPU offload fills with every local
    # rank's states (0 = not known: not checked).
    host_memory_gib: float = 0.0
    # What PyTorch's caching allocator reserves beyond the peak of live
    # tensors, as a fraction of it (fitted on references.toml's memory rows).
    allocator_fragmentation: float = 0.0

    def peak_flops(self, dtype: str) -> float:
        return getattr(self, dtype) * 1e12

    def achieved_flops(self, dtype: str) -> float:
        return self.peak_flops(dtype) * self.matmul_efficiency

    def attention_rate(self, dtype: str) -> float:
        return self.peak_flops(dtype) * (self.attention_efficiency or self.matmul_efficiency)


TUPLE_FIELDS = tuple(f.name for f in fields(Device) if f.name == "match" or f.name.endswith("_curve"))


def user_catalog_path() -> Path:
    return Path(os.environ.get("SCALETRAIN_HARDWARE", USER_CATALOG)).expanduser()


def load_catalog(extra: Path | None = None) -> dict[str, Device]:
    """Built-in entries, then the user's file, then ``extra`` (later wins)."""
    paths = [BUILTIN, user_catalog_path()] + ([extra] if extra else [])
    catalog: dict[str, Device] = {}
    known = {f.name for f in fields(Device)} - {"name"}
    for path in paths:
        if not path.exists():
            if path is extra:
                raise UserError(f"--hardware {path}: no such file")
            continue
        try:
            entries = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{path}: not valid TOML ({exc})") from None
        for name, values in entries.items():
            unknown = set(values) - known
            if unknown:
                raise UserError(f"{path}: [{name}] has unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
            try:
                base = catalog.get(name)
                merged = ({f.name: getattr(base, f.name) for f in fields(Device)} if base else {}) | values
                for key in TUPLE_FIELDS:
                    merged[key] = tuple(tuple(x) if isinstance(x, list) else x for x in merged.get(key, ()))
                catalog[name] = Device(**{**merged, "name": name})
            except TypeError as exc:
                raise UserError(f"{path}: [{name}] is incomplete ({exc})") from None
    return catalog


def find_device(catalog: dict[str, Device], name: str) -> Device:
    key = name.lower()
    if key in catalog:
        return catalog[key]
    close = difflib.get_close_matches(key, catalog, n=3, cutoff=0.4)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise UserError(f"--gpu {name!r} is not in the hardware catalog{hint} (known: {', '.join(catalog)})")


def device_for_cuda_name(cuda_name: str, catalog: dict[str, Device] | None = None) -> Device | None:
    """The catalog entry whose ``match`` string occurring in a CUDA device
    name is the longest (so "H100 PCIe" wins over the generic "H100")."""
    found = [(len(m), device) for device in (catalog or load_catalog()).values() for m in device.match
             if m in cuda_name]
    return max(found, key=lambda f: f[0])[1] if found else None


@dataclass(frozen=True)
class Cluster:
    """``gpus`` devices in nodes of ``gpus_per_node``; a mixed cluster is
    planned as its weakest member: the smallest memory, the slowest compute
    and links (every rank waits for the slowest one at each collective)."""

    kinds: tuple[tuple[Device, int], ...]
    gpus_per_node: int

    @property
    def gpus(self) -> int:
        return sum(n for _, n in self.kinds)

    @property
    def nodes(self) -> int:
        return self.gpus // self.gpus_per_node

    @property
    def mixed(self) -> bool:
        return len(self.kinds) > 1

    @property
    def device(self) -> Device:
        """The effective device: each property the worst among the kinds."""
        devices = [d for d, _ in self.kinds]
        if len(devices) == 1:
            return devices[0]
        worst = {f.name: min(getattr(d, f.name) for d in devices)
                 for f in fields(Device) if f.type in ("float", float)}
        slowest = min(devices, key=lambda d: d.bf16 or d.fp16)
        return Device(**{**{f.name: getattr(slowest, f.name) for f in fields(Device)}, **worst,
                         "name": "+".join(d.name for d in devices),
                         "description": " + ".join(f"{n}x {d.description}" for d, n in self.kinds)})

    def pipeline_rank_speeds(self, pp: int, dtype: str) -> tuple[float, ...]:
        """Relative speed of each pipeline rank (pp is the mesh's outermost
        dimension: rank r holds global ranks [r W/pp, (r+1) W/pp), the kinds
        in the order given), each the slowest of its devices' peak x
        matmul_efficiency; () when all are alike."""
        if not self.mixed or pp == 1:
            return ()
        per_rank = [d for d, n in self.kinds for _ in range(n)]
        width = len(per_rank) // pp
        speeds = [min(d.peak_flops(dtype) * d.matmul_efficiency for d in per_rank[r * width:(r + 1) * width])
                  for r in range(pp)]
        if len(set(speeds)) == 1 or not min(speeds):
            return ()
        return tuple(round(s / min(speeds), 2) for s in speeds)

    def pipeline_rank_memory_gib(self, pp: int, pp_rank: int) -> float:
        """The smallest device memory among a pipeline rank's devices."""
        per_rank = [d for d, n in self.kinds for _ in range(n)]
        width = len(per_rank) // pp
        return min(d.memory_gib for d in per_rank[pp_rank * width:(pp_rank + 1) * width])

    def notes(self) -> list[str]:
        if not self.mixed:
            return []
        d = self.device
        smallest = min(self.kinds, key=lambda k: k[0].memory_gib)[0]
        slowest = min(self.kinds, key=lambda k: k[0].bf16 or k[0].fp16)[0]
        notes = [f"mixed cluster: planned with the smallest memory ({smallest.name}, {d.memory_gib:g} GiB) "
                 f"and the slowest device ({slowest.name}); every rank waits for it at each collective, except in "
                 "layouts with 'rows' (parallel.rank_batch: rows per rank in proportion to its device's speed)"]
        if any(k.bf16 == 0 for k, _ in self.kinds):
            notes.append("mixed cluster: not every device supports bf16; planned in fp16")
        return notes


def parse_cluster(catalog: dict[str, Device], gpu: str, gpus: int, gpus_per_node: int) -> Cluster:
    """``gpu`` is a catalog name (all ``gpus`` alike) or ``name:count,name:count``."""
    if gpus < 1:
        raise UserError(f"--gpus = {gpus}; allowed: 1 or more")
    if gpus_per_node < 1:
        raise UserError(f"--gpus-per-node = {gpus_per_node}; allowed: 1 or more")
    if "," in gpu or ":" in gpu:
        kinds = []
        for part in gpu.split(","):
            name, _, count = part.partition(":")
            if not count.isdigit() or int(count) < 1:
                raise UserError(f"--gpu {gpu!r}: write a mixed cluster as name:count,name:count (e.g. "
                                "a100-80g:4,v100-32g:4)")
            kinds.append((find_device(catalog, name.strip()), int(count)))
        total = sum(n for _, n in kinds)
        if gpus and gpus != total and gpus != 1:
            raise UserError(f"--gpus = {gpus} but --gpu {gpu!r} lists {total} devices")
        gpus = total
        for device, n in kinds:
            if n % gpus_per_node:
                raise UserError(f"--gpu {gpu!r}: {n} x {device.name} do not fill whole nodes of "
                                f"--gpus-per-node = {gpus_per_node}")
    else:
        kinds = [(find_device(catalog, gpu), gpus)]
    if gpus % gpus_per_node and gpus > gpus_per_node:
        raise UserError(f"--gpus = {gpus} is not divisible by --gpus-per-node = {gpus_per_node}")
    return Cluster(tuple(kinds), min(gpus_per_node, gpus))
