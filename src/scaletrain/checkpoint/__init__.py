from scaletrain.checkpoint.manager import CheckpointError, CheckpointManager, describe, find_resume_dir

__all__ = ["CheckpointError", "CheckpointManager", "describe", "find_resume_dir"]
