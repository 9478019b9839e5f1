"""Where a run's checkpoints live and which one to resume: checks the
launcher runs before any worker starts (no torch.distributed imports)."""

from __future__ import annotations

import json
from pathlib import Path

from scaletrain.checkpoint.manifest import step_dirs, verify
from scaletrain.errors import UserError, warn


class CheckpointError(RuntimeError):
    """A save failed (unwritable or full directory, ...); earlier checkpoints are intact."""


def checkpoint_root(cfg, run_dir: Path) -> Path:
    return Path(cfg.checkpoint.dir).expanduser() if cfg.checkpoint.dir else run_dir / "checkpoints"


def find_resume_dir(cfg, run_dir: Path, skipped: list[str] | None = None, quiet: bool = False) -> Path | None:
    """The checkpoint to resume from: the newest valid one for 'auto' (with a
    warning for each invalid newer one, and one more when none is valid),
    an explicit path, or None. ``skipped`` collects what was wrong with each
    checkpoint passed over."""
    resume = cfg.checkpoint.resume
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume).expanduser()
        if (problem := verify(path)) is not None:
            raise UserError(f"checkpoint.resume = {resume!r} is not a valid checkpoint: {problem}")
        return path
    problems = []
    for step, path in reversed(step_dirs(checkpoint_root(cfg, run_dir))):
        problem = verify(path)
        if problem is None:
            break
        problems.append(f"{path.name}: {problem}")
        if not quiet:
            warn(f"skipping checkpoint {path.name}: {problem}; falling back to the previous one")
    else:
        path = None
        if problems and not quiet:
            warn(f"none of the {len(problems)} checkpoint(s) in {checkpoint_root(cfg, run_dir)} is valid: "
                 "training starts from step 0")
    if skipped is not None:
        skipped.extend(problems)
    return path


def check_checkpoint_paths(cfg, run_dir: Path) -> None:
    """Before anything is written: explicit resume / init_from paths must be
    valid checkpoints of this model, and a used run directory needs
    something to resume."""
    resume_dir = find_resume_dir(cfg, run_dir, quiet=True)
    if resume_dir is not None:
        check_model_matches(_saved_model(resume_dir), cfg)
    if cfg.checkpoint.init_from:
        path = Path(cfg.checkpoint.init_from).expanduser()
        if (problem := verify(path)) is not None:
            raise UserError(f"checkpoint.init_from = {cfg.checkpoint.init_from!r} is not a valid checkpoint: "
                            f"{problem} (import a HF model with `scaletrain checkpoint import`)")
        check_model_matches(_saved_model(path), cfg)
    resumable = cfg.checkpoint.resume != "none" and step_dirs(checkpoint_root(cfg, run_dir))
    if (run_dir / "metrics.jsonl").exists() and not resumable:
        raise UserError(f"--run-dir {run_dir} already holds a run (metrics.jsonl) and no checkpoint to resume "
                        "from; choose another directory")


def _saved_model(ckpt_dir: Path) -> dict:
    try:
        return json.loads((ckpt_dir / "train_state.json").read_text())["config"]["model"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{ckpt_dir / 'train_state.json'}: unreadable ({exc})") from None


def check_model_matches(saved: dict, cfg) -> None:
    shape_keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "tie_embeddings")
    current = cfg.to_dict()["model"]
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r}, this run {current[k]!r}" for k in shape_keys
             if saved.get(k) != current[k]]
    if diffs:
        raise UserError("the checkpoint's model shape differs from this run's: " + "; ".join(diffs))
