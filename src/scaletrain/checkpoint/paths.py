"""Where a run's checkpoints live and which one to resume: checks the
launcher runs before any worker starts (no torch.distributed imports)."""

from __future__ import annotations

import sys
from pathlib import Path

from scaletrain.checkpoint.manifest import step_dirs, verify
from scaletrain.errors import UserError


class CheckpointError(RuntimeError):
    """A save failed (unwritable or full directory, ...); earlier checkpoints are intact."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def checkpoint_root(cfg, run_dir: Path) -> Path:
    return Path(cfg.checkpoint.dir).expanduser() if cfg.checkpoint.dir else run_dir / "checkpoints"


def find_resume_dir(cfg, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: the newest valid one for 'auto' (with a
    warning for each invalid newer one), an explicit path, or None."""
    resume = cfg.checkpoint.resume
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume).expanduser()
        if (problem := verify(path)) is not None:
            raise UserError(f"checkpoint.resume = {resume!r} is not a valid checkpoint: {problem}")
        return path
    for step, path in reversed(step_dirs(checkpoint_root(cfg, run_dir))):
        problem = verify(path)
        if problem is None:
            return path
        warn(f"skipping checkpoint {path.name}: {problem}; falling back to the previous one")
    return None


def check_checkpoint_paths(cfg, run_dir: Path) -> None:
    """Before anything is written: explicit resume / init_from paths must be
    valid checkpoints, and a used run directory needs something to resume."""
    if cfg.checkpoint.resume not in ("auto", "none"):
        find_resume_dir(cfg, run_dir)
    if cfg.checkpoint.init_from:
        path = Path(cfg.checkpoint.init_from).expanduser()
        if (problem := verify(path)) is not None:
            raise UserError(f"checkpoint.init_from = {cfg.checkpoint.init_from!r} is not a valid checkpoint: "
                            f"{problem} (import a HF model with `scaletrain checkpoint import`)")
    resumable = cfg.checkpoint.resume != "none" and step_dirs(checkpoint_root(cfg, run_dir))
    if (run_dir / "metrics.jsonl").exists() and not resumable:
        raise UserError(f"--run-dir {run_dir} already holds a run (metrics.jsonl) and no checkpoint to resume "
                        "from; choose another directory")
