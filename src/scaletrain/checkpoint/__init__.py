from scaletrain.checkpoint.manager import (CheckpointError, CheckpointManager, check_checkpoint_paths, describe,
                                           find_resume_dir)

__all__ = ["CheckpointError", "CheckpointManager", "check_checkpoint_paths", "describe", "find_resume_dir"]
