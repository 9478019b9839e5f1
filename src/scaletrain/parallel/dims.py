"""ParallelDims: the validated layout of the world, and the one DeviceMesh built from it."""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config import Config, ParallelConfig
from scaletrain.errors import UserError


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    world_size: int

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> "ParallelDims":
        """Resolve the -1 (auto) degrees, then check the product and the ZeRO rules.

        Auto: the data-parallel ranks the world size leaves go to dp_replicate
        under zero_stage 0 (DDP) and to dp_shard under zero_stage 1-3."""
        rep, shard = cfg.dp_replicate, cfg.dp_shard
        if rep == -1 and shard == -1:
            rep, shard = (-1, 1) if cfg.zero_stage == 0 else (1, -1)
        fixed = cfg.tp * cfg.pp * max(rep, 1) * max(shard, 1)
        if -1 in (rep, shard):
            if world_size % fixed:
                raise UserError(f"parallel degrees (dp_replicate={cfg.dp_replicate}, dp_shard={cfg.dp_shard}, "
                                f"tp={cfg.tp}, pp={cfg.pp}) have a product {fixed} that does not divide the "
                                f"world size {world_size}")
            rep = world_size // fixed if rep == -1 else rep
            shard = world_size // fixed if shard == -1 else shard
        product = rep * shard * cfg.tp * cfg.pp
        if product != world_size:
            raise UserError(f"parallel.dp_replicate x dp_shard x tp x pp = {rep} x {shard} x {cfg.tp} x "
                            f"{cfg.pp} = {product}, but the world size is {world_size}")
        if cfg.zero_stage == 0 and shard > 1:
            raise UserError(f"parallel.dp_shard = {shard} shards state, which needs parallel.zero_stage 1-3 "
                            "(zero_stage 0 is plain DDP over dp_replicate)")
        if cfg.zero_stage == 1 and rep > 1:
            raise UserError(f"parallel.zero_stage = 1 shards optimizer states over dp_shard; dp_replicate = "
                            f"{rep} (HSDP) needs zero_stage 2 or 3")
        return cls(rep, shard, cfg.tp, cfg.pp, world_size)

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def names(self) -> tuple[str, ...]:
        return ("pp", "dp_replicate", "dp_shard", "tp")

    def degrees(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.names}

    def build_mesh(self, device_type: str):
        """One 4-D DeviceMesh (pp, dp_replicate, dp_shard, tp), outermost first,
        size-1 dimensions included so every layout slices the same names; None
        for a single process."""
        from torch.distributed.device_mesh import init_device_mesh

        if self.world_size == 1:
            return None
        return init_device_mesh(device_type, tuple(self.degrees().values()), mesh_dim_names=self.names)


def check_offload(cfg: Config, device_type: str) -> None:
    if cfg.parallel.cpu_offload and device_type != "cuda":
        raise UserError("parallel.cpu_offload = true needs CUDA devices: FSDP2's CPUOffloadPolicy moves "
                        "parameters and optimizer states between CPU and GPU, and this run is on CPU")
