"""ParallelDims: the validated layout of the world, and the one DeviceMesh built from it."""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config import ParallelConfig
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
        """Resolve a -1 degree to what the world size leaves, then check the product."""
        rep, shard = cfg.dp_replicate, cfg.dp_shard
        fixed = cfg.tp * cfg.pp * (rep if rep != -1 else 1) * (shard if shard != -1 else 1)
        if -1 in (rep, shard):
            if world_size % fixed:
                raise UserError(f"parallel degrees (dp_replicate={rep}, dp_shard={shard}, tp={cfg.tp}, "
                                f"pp={cfg.pp}) have a fixed product {fixed} that does not divide the world "
                                f"size {world_size}")
            rep = world_size // fixed if rep == -1 else rep
            shard = world_size // fixed if shard == -1 else shard
        dims = cls(rep, shard, cfg.tp, cfg.pp, world_size)
        product = rep * shard * cfg.tp * cfg.pp
        if product != world_size:
            raise UserError(f"parallel.dp_replicate x dp_shard x tp x pp = {rep} x {shard} x {cfg.tp} x "
                            f"{cfg.pp} = {product}, but the world size is {world_size}")
        return dims

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    def enabled(self) -> list[tuple[str, int]]:
        """(name, degree) of every dimension > 1, outermost first."""
        order = [("pp", self.pp), ("dp_replicate", self.dp_replicate), ("dp_shard", self.dp_shard), ("tp", self.tp)]
        return [(name, degree) for name, degree in order if degree > 1]

    def build_mesh(self, device_type: str):
        """One DeviceMesh with a named dimension per enabled degree (None single-process)."""
        from torch.distributed.device_mesh import init_device_mesh

        dims = self.enabled()
        if not dims:
            return None
        names, shape = zip(*dims)
        return init_device_mesh(device_type, shape, mesh_dim_names=names)
