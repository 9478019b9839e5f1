"""Sharded, atomic checkpoints (DCP). Names load on first use, so the launcher
can check paths without importing torch.distributed.checkpoint."""

from importlib import import_module

_WHERE = {"CheckpointError": "paths", "check_checkpoint_paths": "paths", "find_resume_dir": "paths",
          "CheckpointManager": "manager", "describe": "manager"}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"scaletrain.checkpoint.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'scaletrain.checkpoint' has no attribute {name!r}")
