"""Sharded, atomic checkpoints (DCP). Names load on first use, so the launcher
can check paths without importing torch.distributed.checkpoint."""

from scaletrain.lazy import lazy_getattr

_WHERE = {"CheckpointError": "paths", "check_checkpoint_paths": "paths", "find_resume_dir": "paths",
          "CheckpointManager": "manager", "describe": "manager"}
__all__ = list(_WHERE)
__getattr__ = lazy_getattr(__name__, _WHERE)
