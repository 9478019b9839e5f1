"""Self-healing: whether a step's update is applied.

A step is bad when its global loss or gradient norm is NaN/inf, or (with
``training.spike_zscore``) when its loss is a spike: more than z standard
deviations above the mean of the last ``spike_window`` good steps. Both
values are global (all-reduced) before the optimizer step, so every rank
reaches the same verdict without another collective. A bad step's update is
skipped on every rank: no optimizer step, no schedule step, gradients
dropped; the batch counts as consumed (the data order is unchanged). After
``max_bad_steps`` bad steps in a row, ``on_nonfinite = skip`` stops the run
and ``rollback`` returns to the last checkpoint (the data stream continues
after the offending batches); ``stop`` stops at the first.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections import deque

from scaletrain.observe.events import append_event

APPLY, SKIP, ROLLBACK, STOP = "apply", "skip", "rollback", "stop"


class StepGuard:
    def __init__(self, on_nonfinite: str, max_bad_steps: int, spike_zscore: float, spike_window: int,
                 check_grad_norm: bool = True):
        self.on_nonfinite, self.max_bad_steps = on_nonfinite, max_bad_steps
        self.spike_zscore = spike_zscore
        self.history: deque[float] = deque(maxlen=spike_window)
        self.check_grad_norm = check_grad_norm  # fp16's loss scaler handles inf gradients itself
        self.consecutive = 0

    def problem(self, loss: float, grad_norm: float) -> str | None:
        """Why this step is bad, or None."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if self.check_grad_norm and not math.isfinite(grad_norm):
            return f"gradient norm is {grad_norm}"
        if self.spike_zscore > 0 and len(self.history) >= max(8, self.history.maxlen // 4):
            mean, std = statistics.fmean(self.history), statistics.pstdev(self.history)
            if std > 0 and (loss - mean) / std > self.spike_zscore:
                return f"loss {loss:.4g} is a spike ({(loss - mean) / std:.1f} standard deviations above the " \
                       f"mean {mean:.4g} of the last {len(self.history)} steps)"
        return None

    def verdict(self, loss: float, grad_norm: float) -> tuple[str, str | None]:
        """(action, why): APPLY the update, or SKIP / ROLLBACK / STOP."""
        why = self.problem(loss, grad_norm)
        if why is None:
            self.consecutive = 0
            self.history.append(loss)
            return APPLY, None
        self.consecutive += 1
        if self.on_nonfinite == "stop":
            return STOP, why
        if self.consecutive >= self.max_bad_steps:
            self.consecutive = 0
            return (ROLLBACK if self.on_nonfinite == "rollback" else STOP), why
        return SKIP, why


def act_on_verdict(trainer, record: dict, recorder) -> bool:
    """Report a non-finite step; act on the step guard's verdict for the
    trainer (skip, stop, or roll back). True when the run rolled back."""
    report_nonfinite(trainer, record)
    if trainer.action == APPLY:
        return False
    trainer.skipped_steps.append(trainer.step)
    if trainer.runtime.is_main:
        append_event(trainer.run_dir, "skipped_step", trainer.step, trainer.runtime.rank, record["skip_reason"])
    t = trainer.cfg.training
    policy = f"training.on_nonfinite = {t.on_nonfinite}, max_bad_steps = {t.max_bad_steps}"
    if trainer.action == STOP:
        raise RuntimeError(f"step {trainer.step}: {record['skip_reason']}; stopping ({policy}); the last "
                           "checkpoint is intact")
    if trainer.action == ROLLBACK:
        rollback(trainer, recorder, record["skip_reason"], policy)
        return True
    return False


def rollback(trainer, recorder, why: str, policy: str) -> None:
    """Back to the newest valid checkpoint; the data stream goes on after
    the offending batches."""
    from scaletrain.checkpoint import find_resume_dir

    target = find_resume_dir(trainer.cfg, trainer.run_dir, quiet=True) if trainer.checkpoints else None
    if target is None:
        raise RuntimeError(f"step {trainer.step}: {why}; no checkpoint to roll back to ({policy})")
    trainer.rollbacks[target.name] = trainer.rollbacks.get(target.name, 0) + 1
    if trainer.rollbacks[target.name] > trainer.cfg.training.max_bad_steps:
        raise RuntimeError(f"step {trainer.step}: {why}; already rolled back to {target.name} "
                           f"{trainer.rollbacks[target.name] - 1} times ({policy})")
    position = trainer.sampler.state_dict()
    bad_step = trainer.step
    trainer.step = trainer.checkpoints.load(target)
    trainer.sampler.load_state_dict(position)
    recorder.truncate(trainer.step)
    message = f"rolled back from step {bad_step} to {target.name} ({why}); data continues after batch {bad_step}"
    if trainer.runtime.is_main:
        append_event(trainer.run_dir, "rollback", bad_step, trainer.runtime.rank, message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def report_nonfinite(trainer, record: dict) -> None:
    """A non-finite loss or gradient norm is reported on its step (rank 0,
    the first one and then every 10th); the summary counts them."""
    if math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]):
        return
    trainer.nonfinite_steps.append(record["step"])
    if trainer.runtime.is_main and len(trainer.nonfinite_steps) % 10 == 1:
        print(f"warning: step {record['step']}: loss {record['loss']}, grad_norm {record['grad_norm']} "
              f"(non-finite; {len(trainer.nonfinite_steps)} such step(s) so far)", file=sys.stderr, flush=True)


def oom_overrides(cfg) -> list[str] | None:
    """What the next attempt changes after an out-of-memory error, as
    ``section.key=value`` overrides (absolute values, so applying them twice
    changes nothing), or None when nothing is left to try (or on_oom = stop).
    Halving the micro batch doubles the accumulation: the global batch and
    the data order stay the same."""
    t = cfg.training
    halve = [f"training.micro_batch_size={t.micro_batch_size // 2}"] if t.micro_batch_size % 2 == 0 else []
    checkpoint = ["training.activation_checkpointing=full"] if t.activation_checkpointing != "full" else []
    order = {"micro_batch": halve or checkpoint, "checkpointing": checkpoint or halve, "stop": []}
    return order[t.on_oom] or None


def apply_recoveries(cfg, events: list[dict]):
    """``cfg`` with the overrides of every earlier out-of-memory recovery of this run."""
    from scaletrain.config import apply_overrides

    overrides = [o for e in events if e.get("kind") == "oom_recovery" for o in e.get("overrides", [])]
    return apply_overrides(cfg, overrides) if overrides else cfg
