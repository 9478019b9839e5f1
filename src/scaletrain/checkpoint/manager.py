"""Saving and resuming: sharded DCP checkpoints, sealed atomically, kept to
``checkpoint.keep_last``, written synchronously or in the background.

A checkpoint directory ``step_<8 digits>/`` holds the DCP shards (model,
optimizer, per-rank RNG), ``train_state.json`` (step, sampler position, LR
schedule, layout, resolved config) and ``manifest.json``, written last.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from scaletrain.checkpoint.manifest import read_manifest, seal, step_dir_name, step_dirs, verify
from scaletrain.checkpoint.paths import CheckpointError, check_model_matches, checkpoint_root
from scaletrain.checkpoint.safe_reader import SafeReader
from scaletrain.checkpoint.state import (init_optimizer_state, model_state, optimizer_state, rng_state,
                                         set_rng_state)
from scaletrain.errors import UserError, describe_error, warn
from scaletrain.observe.events import append_event

FORMAT_VERSION = 1


class CheckpointManager:
    """Saves and restores the model and optimizer (tensors, through DCP) and
    a dict of small ``Stateful`` objects (sampler, LR schedule, loss scaler:
    ``state_dict``/``load_state_dict``, kept as JSON in train_state.json)."""

    def __init__(self, cfg, run_dir: Path, runtime, model, optimizer, stateful: dict, layout: dict):
        self.run_cfg, self.cfg = cfg, cfg.checkpoint
        self.root, self.run_dir = checkpoint_root(cfg, run_dir), run_dir
        self.runtime = runtime
        self.model, self.optimizer, self.stateful, self.layout = model, optimizer, stateful, layout
        self.pending = None  # (future, tmp_dir, step) of a background save
        self.last_saved_step = -1
        self.failures: list[int] = []  # steps whose save failed (on_error = continue), for the alerts
        # A background save runs its collectives from another thread: on their
        # own gloo group, never interleaved with training's on the default one.
        self.async_group = None
        if self.cfg.async_save and self.runtime.distributed:
            self.async_group = dist.new_group(backend="gloo")
        if self.runtime.is_main and self.root.is_dir():
            # Half-written saves of a job that died (this job holds the run
            # directory's lock, so no one else is writing them).
            for stale in self.root.glob(".tmp-step_*"):
                shutil.rmtree(stale, ignore_errors=True)

    # -- saving ---------------------------------------------------------------

    def _state(self) -> dict[str, torch.Tensor]:
        return {**model_state(self.model), **optimizer_state(self.model, self.optimizer),
                **rng_state(self.runtime.rank)}

    def _agree(self, ok: bool) -> bool:
        """True only if every rank says ok (so no rank walks into a collective alone)."""
        if not self.runtime.distributed:
            return ok
        flag = torch.tensor([0 if ok else 1], dtype=torch.int32)
        dist.all_reduce(flag)
        return flag.item() == 0

    def save(self, step: int, blocking: bool = False) -> None:
        """Checkpoint the state after ``step``. Failures follow checkpoint.on_error."""
        if step == self.last_saved_step:
            return
        self.wait()
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        error = None
        if self.runtime.is_main:
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            except OSError as exc:
                error = exc
        if not self._agree(error is None):
            return self._failed(tmp, f"cannot create {tmp}: {error or 'failed on rank 0'}")
        try:
            if self.cfg.async_save and not blocking:
                # Blocks only while the state is copied to CPU memory; the
                # write runs in a background thread until wait().
                future = dcp.async_save(self._state(), checkpoint_id=str(tmp), process_group=self.async_group,
                                        no_dist=not self.runtime.distributed)
                self.pending = (future, tmp, step)
                self.last_saved_step = step
                return
            dcp.save(self._state(), checkpoint_id=str(tmp), no_dist=not self.runtime.distributed)
        except (Exception, CheckpointException) as exc:  # DCP's gathers every rank's errors (a BaseException)
            return self._failed(tmp, f"writing {tmp} failed: {describe_error(exc)}")
        self._finish(tmp, step)

    def wait(self) -> None:
        """Complete a background save, if one is running."""
        if self.pending is None:
            return
        future, tmp, step = self.pending
        self.pending = None
        try:
            future.result()
        except (Exception, CheckpointException) as exc:
            return self._failed(tmp, f"writing {tmp} failed: {describe_error(exc)}")
        self._finish(tmp, step)

    def _finish(self, tmp: Path, step: int) -> None:
        self.runtime.barrier()  # every rank's shards are on disk
        error = None
        if self.runtime.is_main:
            try:
                (tmp / "train_state.json").write_text(json.dumps(self._train_state(step), indent=1))
                (tmp / "config.toml").write_text(self.run_cfg.to_toml())
                seal(tmp, self.root / step_dir_name(step), {"format": FORMAT_VERSION, "step": step,
                                                            "layout": self.layout,
                                                            "zero_stage": self.run_cfg.parallel.zero_stage})
                self._apply_retention()
            except OSError as exc:
                error = exc
        if not self._agree(error is None):
            return self._failed(tmp, f"sealing {tmp} failed: {error or 'failed on rank 0'}")
        self.last_saved_step = step

    def _train_state(self, step: int) -> dict:
        # The schedule's state is numbers only: the schedule itself is code.
        return {"step": step, **{name: obj.state_dict() for name, obj in self.stateful.items()},
                "layout": self.layout, "config": self.run_cfg.to_dict()}

    def _apply_retention(self) -> None:
        if self.cfg.keep_last == 0:
            return
        complete = [path for _, path in step_dirs(self.root) if (path / "manifest.json").is_file()]
        for path in complete[:-self.cfg.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    def _failed(self, tmp: Path, message: str) -> None:
        try:  # a full disk shows up as odd errors from the writers ("unexpected pos ..."): say how full
            message += f" ({shutil.disk_usage(self.root).free / 2**20:.1f} MiB free in {self.root})"
        except OSError:
            pass
        self.failures.append(int(tmp.name.rsplit("_", 1)[-1]))
        if self.runtime.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            append_event(self.run_dir, "failed_save", int(tmp.name.rsplit("_", 1)[-1]), self.runtime.rank, message)
        if self.cfg.on_error == "stop":
            raise CheckpointError(f"{message} (checkpoint.on_error = stop; earlier checkpoints are intact)")
        if self.runtime.is_main:
            warn(f"{message}; training continues without this checkpoint (checkpoint.on_error = continue)")

    # -- loading --------------------------------------------------------------

    def load(self, ckpt_dir: Path) -> int:
        """Restore model, optimizer, RNG, sampler and schedule; returns the step."""
        info = json.loads((ckpt_dir / "train_state.json").read_text())
        check_model_matches(info["config"]["model"], self.run_cfg)
        init_optimizer_state(self.optimizer)
        stored = set(SafeReader(str(ckpt_dir)).read_metadata().state_dict_metadata)
        state = {**model_state(self.model), **optimizer_state(self.model, self.optimizer)}
        missing = sorted(set(state) - stored)
        if missing:
            raise UserError(f"checkpoint {ckpt_dir} lacks {len(missing)} tensors this run needs, e.g. {missing[0]}")
        rng = {k: v for k, v in rng_state(self.runtime.rank).items() if k in stored}
        state.update(rng)
        dcp.load(state, storage_reader=SafeReader(str(ckpt_dir)), no_dist=not self.runtime.distributed)
        set_rng_state(rng, self.runtime.rank)
        for name, obj in self.stateful.items():
            if info.get(name) is not None:
                obj.load_state_dict(info[name])
        if (scheduler := self.stateful.get("scheduler")) is not None:
            for group, lr in zip(self.optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
        self.last_saved_step = info["step"]
        return info["step"]

    def load_weights(self, ckpt_dir: Path) -> None:
        """checkpoint.init_from: the model weights only (fine-tuning start)."""
        if (problem := verify(ckpt_dir)) is not None:
            raise UserError(f"checkpoint.init_from = {str(ckpt_dir)!r} is not a valid checkpoint: {problem}")
        info = json.loads((ckpt_dir / "train_state.json").read_text())
        check_model_matches(info["config"]["model"], self.run_cfg)
        dcp.load(model_state(self.model), storage_reader=SafeReader(str(ckpt_dir)),
                 no_dist=not self.runtime.distributed)


def describe(ckpt_dir: Path) -> dict:
    """What ``scaletrain checkpoint inspect`` shows."""
    problem = verify(ckpt_dir)
    out: dict = {"path": str(ckpt_dir), "valid": problem is None, "problem": problem}
    if (ckpt_dir / "manifest.json").is_file():
        manifest = read_manifest(ckpt_dir)
        out.update(step=manifest.get("step"), layout=manifest.get("layout"), zero_stage=manifest.get("zero_stage"),
                   bytes=sum(f["bytes"] for f in manifest["files"].values()), files=len(manifest["files"]))
    try:
        metadata = SafeReader(str(ckpt_dir)).read_metadata().state_dict_metadata
        out["tensors"] = {key: list(getattr(meta, "size", ())) for key, meta in sorted(metadata.items())}
    except Exception as exc:  # unreadable metadata is reported, not raised
        out["tensors_error"] = str(exc)
    return out
