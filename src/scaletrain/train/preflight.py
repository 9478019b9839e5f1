"""Memory pre-flight: before any model is built, compare what the local
ranks will hold with the memory this machine can give them.

The need per rank is the planner's: model states counted tensor by tensor
through the trainer's layout rules (``planner.memory.model_state_bytes``)
plus its activation estimate. Building that table takes time proportional
to the layer count, so an absurd model is refused first on a lower bound that
needs no table: whatever the layout, the ranks together hold every parameter,
its gradient and two AdamW moments once (16 bytes per parameter).
"""

from __future__ import annotations

from pathlib import Path

from scaletrain.config import Config
from scaletrain.errors import UserError
from scaletrain.model.counts import param_count
from scaletrain.parallel.dims import ParallelDims

GIB = 2**30
STATE_BYTES_PER_PARAM = 4 + 4 + 8  # fp32 parameter, fp32 gradient, AdamW exp_avg + exp_avg_sq


def available_bytes(device_type: str) -> int | None:
    """Free device memory on GPU; on CPU the smaller of MemAvailable and
    what the cgroup (container) limit leaves. None when unknown."""
    if device_type == "cuda":
        import torch

        return min(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    cgroup = cgroup_memory()
    limits = [_meminfo_available(), cgroup[0] - cgroup[1] if cgroup else None]
    known = [b for b in limits if b is not None]
    return min(known) if known else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cgroup_memory() -> tuple[int, int] | None:
    """(limit, usage) bytes of this process's cgroup: v2 memory.max and
    memory.current, else v1's limit and usage; None when unlimited or unknown."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            text = Path(limit).read_text().strip()
            if text == "max" or int(text) >= 2**60:  # unlimited
                return None
            return int(text), int(Path(usage).read_text())
        except (OSError, ValueError):
            continue
    return None


def rank_need_bytes(cfg: Config, dims: ParallelDims) -> list[int]:
    """The planner's peak estimate (model states + activations) of each rank."""
    from scaletrain.planner.layout import Workload, coord_of, layout_from_config
    from scaletrain.planner.memory import activation_bytes, held_gradient_bytes, model_state_bytes

    t = cfg.training
    layout = layout_from_config(cfg, dims.dp_replicate, dims.dp_shard)
    workload = Workload(cfg.model, cfg.data.seq_len, t.global_batch_size, t.dtype)
    needs = []
    for rank in range(dims.world_size):
        c = coord_of(layout, rank)
        states = model_state_bytes(cfg.model, layout, c)
        acts = activation_bytes(workload, layout, c)
        held = held_gradient_bytes(workload, layout, c)
        needs.append(int(sum(states.values()) + sum(acts.values()) + held))
    return needs


def check_memory(cfg: Config, dims: ParallelDims, local_ranks: int, device_type: str) -> None:
    """Refuse a job whose local ranks need more memory than this machine has
    (``--force`` skips this check)."""
    available = available_bytes(device_type)
    if available is None:
        return
    # On CPU the local ranks share one memory; on GPU each has its own device.
    sharing = local_ranks if device_type == "cpu" else 1
    lower_bound = param_count(cfg.model) * STATE_BYTES_PER_PARAM * local_ranks // dims.world_size
    if lower_bound > available:
        _refuse(cfg, lower_bound // local_ranks, available // sharing, sharing,
                "at least ", "parameters, gradients and AdamW states alone")
    needs = rank_need_bytes(cfg, dims)[:local_ranks]
    total = sum(needs) if device_type == "cpu" else max(needs)
    if total > available:
        _refuse(cfg, max(needs), available // sharing, sharing, "~",
                "parameters, gradients, AdamW states and activations")


def _refuse(cfg: Config, per_rank: int, available_per_rank: int, sharing: int, qualifier: str, what: str) -> None:
    where = f" ({sharing} local ranks share this machine's memory)" if sharing > 1 else ""
    raise UserError(f"model {cfg.model.name!r} ({param_count(cfg.model) / 1e6:,.0f}M parameters) needs "
                    f"{qualifier}{per_rank / GIB:.1f} GiB per rank for {what}; "
                    f"{available_per_rank / GIB:.1f} GiB available per rank{where}. Use a smaller model, more "
                    "ranks or ZeRO-3, or --force to start anyway")
