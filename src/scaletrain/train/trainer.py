"""The training loop: one optimizer step = ``grad_accum`` micro-steps on every
data-parallel rank, then clip, check, step, schedule, log.

Data flow of one step: sampler -> token batch -> parallelized model forward ->
loss -> backward (DDP reduce hooks on the last micro-step) -> global-norm clip
-> global loss -> the step guard (skip a NaN/inf or spiking step) ->
optimizer step -> metrics.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import loss_parallel

from scaletrain.checkpoint import CheckpointManager, find_resume_dir
from scaletrain.checkpoint.interval import CheckpointSchedule
from scaletrain.config import Config, pipeline_microbatches
from scaletrain.data import Batch, Rows
from scaletrain.debug.faults import FaultInjector, InjectedError
from scaletrain.debug.watchdog import Watchdog
from scaletrain.model import Llama, cross_entropy_loss, train_flops_per_token
from scaletrain.observe.breakdown import ResourceSampler, StepTimer, find_stragglers, gather_rows, mean_phases
from scaletrain.observe.events import append_event, read_events
from scaletrain.observe.recorder import Recorder, build_recorder, read_records, truncate_records
from scaletrain.parallel import ParallelDims, ParallelModel, build_optimizer, clip_grad_norm, parallelize
from scaletrain.parallel.compose import full_value
from scaletrain.parallel.runtime import Runtime, bind_training_thread
from scaletrain.train import report
from scaletrain.train.checks import grad_accum_steps
from scaletrain.train.data import load_data
from scaletrain.train.display import ProgressDisplay
from scaletrain.train.evaluate import validation_loss
from scaletrain.train.health import APPLY, StepGuard, act_on_verdict, apply_recoveries
from scaletrain.train.measure import StepProbe
from scaletrain.train.metrics import device_peak_flops, mem_peak_bytes, memory_limit_bytes
from scaletrain.train.optim import build_scheduler
from scaletrain.train.precision import negotiate_precision
from scaletrain.train.rank_batch import Slowdown, measured_pp_speeds, trainer_rank_rows
from scaletrain.train.stop import StopRequest, agree_to_stop

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, runtime: Runtime, show_progress: bool = True):
        self.runtime, self.run_dir = runtime, run_dir
        cfg = apply_recoveries(cfg, read_events(run_dir))  # an earlier attempt ran out of memory
        cfg = negotiate_precision(cfg, runtime, run_dir)  # the best dtype every rank's device supports
        self.dims = ParallelDims.from_config(cfg.parallel, runtime.world_size)
        self.accum = grad_accum_steps(cfg, self.dims)
        self.pp_microbatches = pipeline_microbatches(cfg) if self.dims.pp > 1 else 1
        self.mesh = self.dims.build_mesh(runtime.device.type)
        dp_rank = 0
        if self.mesh is not None:  # row-major rank in the (dp_replicate, dp_shard) grid
            dp_rank = (self.mesh["dp_replicate"].get_local_rank() * self.dims.dp_shard
                       + self.mesh["dp_shard"].get_local_rank())

        data = load_data(cfg, runtime, dp_rank, self.dims.dp_size, show_progress)
        self.cfg = cfg = data.cfg
        self.corpus, self.rows, self.val_rows, self.sampler = data.corpus, data.rows, data.val_rows, data.sampler
        if runtime.is_main and not (run_dir / "config.toml").exists():  # started by an external torchrun
            (run_dir / "config.toml").write_text(cfg.to_toml())
        self.dp_rank = dp_rank
        # Documents (or chat masks) make token counts vary: the loss is then a
        # sum over tokens divided by the global batch's count (set each step),
        # times dp_size because data parallelism averages gradients.
        self.token_normalized = data.token_normalized
        self.loss_divisor: float | None = None
        self.val_history: list[tuple[int, float]] = []  # (step, val_loss)

        # Every rank initializes the whole model from the seed (so every layout
        # starts from the same weights), then keeps its stages and shards.
        model = Llama(cfg.model)
        model.init_weights(cfg.training.seed)
        model.to(runtime.device)
        self.slowdown = Slowdown(cfg.debug.slowdown, runtime.rank)
        if (rank_rows := trainer_rank_rows(self, model)) is not None:  # parallel.rank_batch
            self.sampler.set_rank_rows(*rank_rows)
            self.token_normalized = True  # rows differ per rank: each token weighs 1 / the global count
        self.cfg = cfg = measured_pp_speeds(self, model)  # parallel.pp_rank_speeds = auto
        self.model: ParallelModel = parallelize(model, self.dims, self.mesh, cfg, runtime.device, self.loss_fn)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg.training)
        self.autocast_dtype = AUTOCAST_DTYPES.get(cfg.training.dtype)
        self.scaler = torch.amp.GradScaler(runtime.device.type) if cfg.training.dtype == "fp16" else None
        self.step = 0
        self.phase = (0, "start")  # (step, what this rank is doing): named in a failure's error line
        self.skipped_checkpoints: list[str] = []  # invalid checkpoints passed over when resuming
        self.nonfinite_steps: list[int] = []
        self.skipped_steps: list[int] = []  # updates the step guard skipped
        self.rollbacks: dict[str, int] = {}  # checkpoint name -> rollbacks to it
        self.memory: dict | None = None  # state bytes of this rank, measured on its first step
        self.measured: dict | None = None  # debug.measure_step's profile of this rank
        t = cfg.training
        self.guard = StepGuard(t.on_nonfinite, t.max_bad_steps, t.spike_zscore, t.spike_window,
                               check_grad_norm=self.scaler is None)
        self.checkpoints = None
        if cfg.checkpoint.enable:
            stateful = {"sampler": self.sampler, "scheduler": self.scheduler}
            if self.scaler is not None:
                stateful["scaler"] = self.scaler
            self.checkpoints = CheckpointManager(cfg, run_dir, runtime, self.model, self.optimizer, stateful,
                                                 self.dims.degrees())
        self.resumed_from = self._restore()
        self.faults = FaultInjector(cfg.debug.inject_fault, runtime.rank, runtime.device)
        self.timer = StepTimer(runtime.device, cfg.logging.breakdown)
        self.resources = ResourceSampler(runtime.device, cfg.logging.breakdown)
        self.interval_steps: list[dict] = []  # phase times of the steps since the last logged one
        self.schedule = CheckpointSchedule(cfg.checkpoint, run_dir, runtime.is_main, self.step)
        self.watchdog: Watchdog | None = None
        if runtime.distributed and cfg.debug.hang_timeout > 0:
            self.watchdog = Watchdog(runtime.rank, runtime.world_size, run_dir, cfg.debug.hang_timeout).start()
        self.flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops = device_peak_flops(runtime.device, cfg.training.dtype)
        self.mem_limit_bytes = memory_limit_bytes(runtime.device)
        bind_training_thread(runtime)  # after every process group and helper thread exists

    def _restore(self) -> str | None:
        """Resume from a checkpoint (checkpoint.resume) or start from weights
        (checkpoint.init_from); rank 0 picks the directory for everyone."""
        if self.checkpoints is None:
            return None
        choice = [str(find_resume_dir(self.cfg, self.run_dir, self.skipped_checkpoints) or "")
                  if self.runtime.is_main else None]
        if self.runtime.distributed:
            dist.broadcast_object_list(choice, src=0)
        if choice[0]:
            self.step = self.checkpoints.load(Path(choice[0]))
            if self.runtime.is_main:
                truncate_records(self.run_dir, self.step)
                # The best validation loss (in the summary) counts the steps before the resume too.
                self.val_history = [(r["step"], r["val_loss"]) for r in read_records(self.run_dir / "metrics.jsonl")
                                    if "val_loss" in r]
            restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
            if restart and self.runtime.is_main:
                append_event(self.run_dir, "restart", self.step, self.runtime.rank,
                             f"elastic restart {restart}: resumed from {choice[0]}")
            return choice[0]
        if self.cfg.checkpoint.init_from:
            self.checkpoints.load_weights(Path(self.cfg.checkpoint.init_from).expanduser())
        return None

    def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of one micro-step (or pipeline microbatch), pre-scaled so that
        the gradients of a step simply add up: the sum over its tokens divided
        by ``loss_divisor`` (token-normalized data, and evaluation), else the
        mean divided by how many micro-steps make up the step."""
        if self.loss_divisor is not None:
            return cross_entropy_loss(logits, targets, reduction="sum") / self.loss_divisor
        return cross_entropy_loss(logits, targets) / (self.accum * self.pp_microbatches)

    def make_batch(self, rows: Rows, indices) -> Batch:
        """Rows -> a batch on this rank's device; a pipeline needs the full
        seq_len every time (its stages fix their shapes on the first step)."""
        return rows.batch(indices, *self._padding()).to(self.runtime.device)

    def _padding(self) -> tuple[int | None, int]:
        """(fixed width or None, multiple the width is rounded up to)."""
        pad_to = self.cfg.data.seq_len if self.dims.pp > 1 else None
        return pad_to, math.lcm(8, self.dims.tp) if self.cfg.parallel.sequence_parallel else 8

    def loss_context(self):
        """Vocab-sharded logits (tensor parallel) need the parallel loss, in
        forward and in backward."""
        return loss_parallel() if self.dims.tp > 1 else contextlib.nullcontext()

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.runtime.device.type, dtype=self.autocast_dtype)

    def train_step(self) -> dict:
        """One optimizer step; returns its metrics (loss averaged over the global
        batch). ``self.action`` says whether the update was applied."""
        start = time.perf_counter()
        self.timer.reset()
        self._phase("data")
        self.faults.at("start", self.step + 1)
        t = self.cfg.training
        device = self.runtime.device
        with self.timer.phase("data_s"):
            step = self.sampler.next_step()
            if self.token_normalized:
                self.loss_divisor = max(1, self.rows.target_count(step.rows)) / self.dims.dp_size
        step_tokens = int(self.rows.lengths[step.rows].sum())
        loss_sum = torch.zeros((), device=device)
        self._phase("forward_backward")
        first_forward_s = 0.0
        for micro, rows in enumerate(step.micro):
            micro_start = self.slowdown.start()
            with self.timer.phase("data_s"):
                batch = self.make_batch(self.rows, rows)
            with self.loss_context(), self.autocast():
                if self.model.pipeline is not None:
                    # The schedule interleaves forward and backward: its time counts as forward.
                    with self.timer.phase("forward_s"):
                        losses = self.model.pipeline.step(batch)
                    if losses:  # the rank holding the last stage
                        loss_sum += full_value(torch.stack([full_value(l.detach()) for l in losses]).sum())
                    continue
                # Gradients are reduced once, on the last micro-step.
                with self.model.gradient_sync(micro == len(step.micro) - 1):  # [[gpu_groups]]: per rank
                    with self.timer.phase("forward_s"):
                        self.faults.oom(self.step + 1, len(rows))
                        loss = self.loss_fn(self.model(batch.inputs, **batch.model_kwargs()), batch.targets)
                        if self.faults.nan_loss(self.step + 1):
                            loss = loss * float("nan")
                    if micro == 0:
                        first_forward_s = time.perf_counter() - start
                    with self.timer.phase("backward_s"):
                        (self.scaler.scale(loss) if self.scaler else loss).backward()
                    self.slowdown.pace(micro_start)  # debug.slowdown
            loss_sum += full_value(loss.detach())
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.memory is None:  # the first step this process runs
            self.memory = report.state_bytes(self.model, self.optimizer, count_grads=True)
        self._phase("grad_norm")
        with self.timer.phase("comm_wait_s"):
            grad_norm = clip_grad_norm(self.model, t.grad_clip if t.grad_clip > 0 else float("inf")).item()
            self._phase("loss_all_reduce")
            loss_value = self._global_loss(loss_sum)  # global: every rank reaches the same verdict
        self.action, why = self.guard.verdict(loss_value, grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self._phase("optimizer")
        with self.timer.phase("optimizer_s"):
            self._update(self.action == APPLY)
        if "optimizer_bytes" not in self.memory:
            self.memory.update(report.state_bytes(self.model, self.optimizer, count_grads=False))
        self.faults.at("after_loss", self.step + 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step time below is real
        step_time = time.perf_counter() - start
        self.step += 1
        self.interval_steps.append({**self.timer.finish(step_time), "first_forward_s": first_forward_s})
        flops_per_s = self.flops_per_token * step_tokens / step_time
        record = {
            "step": self.step,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": self.sampler.tokens_seen,
            "tokens_per_s": step_tokens / step_time,
            "step_time_s": step_time,
            "mem_peak_bytes": mem_peak_bytes(device),
            "flops_per_s_per_device": flops_per_s / self.runtime.world_size,
            "mfu": flops_per_s / self.runtime.world_size / self.peak_flops if self.peak_flops else None,
        }
        if self.cfg.data.packing != "stream":  # the share of computed positions that were padding
            pad_to, multiple = self._padding()
            computed = sum(len(m) * self.rows.width(m, pad_to, multiple) for m in step.all_micro)
            record["pad_fraction"] = 1 - step_tokens / computed
        record.update(self.model.comm_metrics())  # bytes of the gradient collectives (DDP comm hooks)
        if self.action != APPLY:
            record.update(skipped=True, skip_reason=why)
        return record

    def _update(self, apply: bool) -> None:
        """The optimizer and schedule step (or, for a skipped step, neither),
        then drop the gradients."""
        if apply and self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif apply:
            self.optimizer.step()
        elif self.scaler:
            self.scaler.update()  # unscale_ saw the step's gradients: the scale still adapts
        if apply:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _phase(self, name: str, step: int | None = None) -> None:
        """Record (and tell the watchdog) what this rank does now (default: working on the next step)."""
        self.phase = (self.step + 1 if step is None else step, name)
        if self.watchdog is not None:
            self.watchdog.set(*self.phase)

    def where(self) -> str:
        step, name = self.phase
        return f"at step {step} ({name.replace('_', ' ')})"

    def _global_loss(self, loss_sum: torch.Tensor) -> float:
        """Mean over the global batch: the last pipeline stage holds it; the
        data-parallel ranks each hold the mean of their slice (gloo has no AVG)."""
        if (group := self.model.group("pp")) is not None:
            dist.all_reduce(loss_sum, group=group)
        for name in ("dp_replicate", "dp_shard"):
            if (group := self.model.group(name)) is not None:
                dist.all_reduce(loss_sum, group=group)
        return loss_sum.item() / self.dims.dp_size

    def fit(self, show_progress: bool = True) -> dict | None:
        """Train to training.steps, checkpointing every checkpoint.interval
        steps and at the end. SIGTERM/SIGINT (or debug.stop_at_step) finish the
        current step, save, and return normally."""
        cfg, main = self.cfg, self.runtime.is_main
        if self.step >= cfg.training.steps:
            if main:
                print(f"[rank0] nothing to do: resumed at step {self.step} of training.steps = "
                      f"{cfg.training.steps} ({self.resumed_from})", file=sys.stderr)
            return None
        recorder = build_recorder(cfg, self.run_dir, enabled=main)
        display = ProgressDisplay(cfg.training.steps, enabled=show_progress and main,
                                  line_every=max(cfg.logging.interval, cfg.training.steps // 10))
        records, start = [], time.perf_counter()
        stop = StopRequest()
        last_step = self.faults.last_step(cfg.training.steps)
        try:
            while self.step < last_step:
                record = self._run_step()
                if record is None:
                    continue
                records.append(record)
                if act_on_verdict(self, record, recorder):  # rolled back: the step is undone
                    records[:] = [r for r in records if r["step"] <= self.step]
                    continue
                evaluated = self._maybe_evaluate(record)
                if evaluated or self.step % cfg.logging.interval == 0 or self.step == cfg.training.steps:
                    self._phase("logging", self.step)
                    self._log(record, recorder)
                display.update(self.step, record)
                self._phase("stop_check", self.step)
                if agree_to_stop(self.runtime, stop.requested or self.step == cfg.debug.stop_at_step):
                    break
                if self.checkpoints and self.schedule.due(self.step, cfg.training.steps):
                    self._phase("checkpoint", self.step)
                    self.schedule.timed_save(self.checkpoints, self.step, records)
            self._phase("final_checkpoint", self.step)
            if self.checkpoints:
                self.checkpoints.save(self.step, blocking=True)
                self.checkpoints.wait()
        finally:
            stop.restore()
            display.close()
            recorder.close()
        return self._finish(records, time.perf_counter() - start)

    def _maybe_evaluate(self, record: dict) -> bool:
        """The validation loss every eval.interval steps and at the last step."""
        e, last = self.cfg.eval, self.step == self.cfg.training.steps or self.step == self.cfg.debug.stop_at_step
        if self.val_rows is None or not (last or (e.interval and self.step % e.interval == 0)):
            return False
        self._phase("evaluate", self.step)
        record.update(validation_loss(self))
        self.val_history.append((self.step, record["val_loss"]))
        return True

    def _run_step(self) -> dict | None:
        """One step, profiled on debug.measure_step; None for a step that an
        injected fault made this rank skip (the classic desync)."""
        if self.step + 1 == self.cfg.debug.measure_step:
            with StepProbe(self.runtime.device, report.live_state_bytes(self.model, self.optimizer)) as probe:
                record = self.train_step()
            self.measured = probe.result()
            return record
        try:
            return self.train_step()
        except InjectedError as exc:  # the classic bug: one rank catches an error and moves on
            print(f"[rank{self.runtime.rank}] skipping step {self.step + 1}: {exc}", file=sys.stderr)
            self.step += 1
            return None

    def _log(self, record: dict, recorder: Recorder) -> None:
        """Every rank's time breakdown and resources for the steps since the
        last log, gathered to rank 0 (one small all-gather, which also finds
        stragglers), then written and exported there."""
        row = {**mean_phases(self.interval_steps), **self.resources.sample()}
        row["first_forward_s"] = sum(s["first_forward_s"] for s in self.interval_steps) / max(1, len(self.interval_steps))
        self.interval_steps.clear()
        rows = gather_rows(self.runtime, row, self.step)
        record.update(self._health_fields())
        if stragglers := find_stragglers(rows, self.cfg.debug.straggler_factor):
            record["stragglers"] = stragglers
            if self.runtime.is_main:
                print("straggler(s) at step {}: {}".format(self.step, ", ".join(
                    f"rank {s['rank']} {s['ratio']:.1f}x the median data+forward time" for s in stragglers)),
                    file=sys.stderr)
        recorder.log(record, rows, time.time())

    def _health_fields(self) -> dict:
        """What the built-in alerts read besides the step's numbers: the memory
        limit, failed saves since the last log, ranks without a heartbeat."""
        out = {"mem_limit_bytes": self.mem_limit_bytes}
        if self.checkpoints is not None and self.checkpoints.failures:
            out["checkpoint_failed"] = True
            self.checkpoints.failures.clear()
        if self.watchdog is not None and self.runtime.is_main:
            if missing := self.watchdog.missing_ranks():
                out["missing_ranks"] = missing
        return out

    def _finish(self, records: list[dict], elapsed: float) -> dict:
        """The summary and the final files (the full state gathering is a collective)."""
        cfg = self.cfg
        summary = report.summarize(self, records, elapsed)
        summary.update(stopped_early=self.step < cfg.training.steps, resumed_from=self.resumed_from,
                       skipped_checkpoints=self.skipped_checkpoints, nonfinite_steps=self.nonfinite_steps,
                       skipped_steps=self.skipped_steps)
        self._phase("final_state_dict", self.step)
        state = self.model.full_state_dict()  # a collective: every rank takes part
        summary["state_bytes_by_rank"] = self._gather({"rank": self.runtime.rank, **self.memory})
        if cfg.debug.measure_step:
            summary["measured_by_rank"] = self._gather({"rank": self.runtime.rank, **(self.measured or {})})
        if self.runtime.is_main:
            self._phase("writing_outputs", self.step)
            summary["samples"] = report.sample_text(self, state)
            report.write_outputs(self.run_dir, self.step, summary, state)
        return summary

    def _gather(self, value: dict) -> list[dict]:
        if not self.runtime.distributed:
            return [value]
        out = [None] * self.runtime.world_size
        dist.all_gather_object(out, value)
        return out
