"""The training loop: one optimizer step = ``grad_accum`` micro-steps on every
data-parallel rank, then clip, step, schedule, log.

Data flow of one step: sampler -> token batch -> parallelized model forward ->
loss -> backward (DDP reduce hooks on the last micro-step) -> global-norm clip
-> optimizer step -> metrics.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torch.nn.parallel import DistributedDataParallel

from scaletrain.checkpoint import CheckpointManager, find_resume_dir
from scaletrain.config import Config, parse_fault, pipeline_microbatches
from scaletrain.data import DistributedBatchSampler, prepare_corpus
from scaletrain.debug.watchdog import Watchdog
from scaletrain.model import Llama, cross_entropy_loss, generate, param_count, train_flops_per_token
from scaletrain.parallel import ParallelDims, ParallelModel, build_optimizer, clip_grad_norm, parallelize
from scaletrain.parallel.runtime import Runtime, all_gather_single, bind_training_thread
from scaletrain.train.checks import check_data, grad_accum_steps, resolve_vocab
from scaletrain.train.display import ProgressDisplay
from scaletrain.train.measure import StepProbe
from scaletrain.train.metrics import MetricsWriter, device_peak_flops, mem_peak_bytes
from scaletrain.train.optim import build_scheduler

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, runtime: Runtime, show_progress: bool = True):
        self.runtime, self.run_dir = runtime, run_dir
        self.dims = ParallelDims.from_config(cfg.parallel, runtime.world_size)
        self.accum = grad_accum_steps(cfg, self.dims)
        self.pp_microbatches = pipeline_microbatches(cfg) if self.dims.pp > 1 else 1
        self.mesh = self.dims.build_mesh(runtime.device.type)
        dp_rank = 0
        if self.mesh is not None:  # row-major rank in the (dp_replicate, dp_shard) grid
            dp_rank = (self.mesh["dp_replicate"].get_local_rank() * self.dims.dp_shard
                       + self.mesh["dp_shard"].get_local_rank())

        # One process per node tokenizes; the others wait and then open the cache.
        if runtime.local_rank == 0:
            corpus = prepare_corpus(cfg.data, show_progress=show_progress and runtime.is_main)
        runtime.barrier()
        if runtime.local_rank != 0:
            corpus = prepare_corpus(cfg.data, show_progress=False)
        self.corpus = corpus
        self.cfg = cfg = resolve_vocab(cfg, corpus.tokenizer.vocab_size)
        self.dataset = check_data(cfg, corpus)
        if runtime.is_main and not (run_dir / "config.toml").exists():  # started by an external torchrun
            (run_dir / "config.toml").write_text(cfg.to_toml())
        self.sampler = DistributedBatchSampler(self.dataset.n_sequences, cfg.training.global_batch_size,
                                               dp_rank, self.dims.dp_size, cfg.training.seed)

        # Every rank initializes the whole model from the seed (so every layout
        # starts from the same weights), then keeps its stages and shards.
        model = Llama(cfg.model)
        model.init_weights(cfg.training.seed)
        model.to(runtime.device)
        self.model: ParallelModel = parallelize(model, self.dims, self.mesh, cfg, runtime.device, self._loss_fn)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg.training)
        self.autocast_dtype = AUTOCAST_DTYPES.get(cfg.training.dtype)
        self.scaler = torch.amp.GradScaler(runtime.device.type) if cfg.training.dtype == "fp16" else None
        self.step = 0
        self.phase = (0, "start")  # (step, what this rank is doing): named in a failure's error line
        self.skipped_checkpoints: list[str] = []
        self.nonfinite_steps: list[int] = []  # invalid checkpoints passed over when resuming
        self.memory: dict | None = None  # state bytes of this rank, measured on its first step
        self.measured: dict | None = None  # debug.measure_step's profile of this rank
        self.checkpoints = CheckpointManager(self) if cfg.checkpoint.enable else None
        self.resumed_from = self._restore()
        self.fault = parse_fault(cfg.debug.inject_fault) if cfg.debug.inject_fault else None
        self.forward_times: list[float] = []  # per step: data + first forward, for straggler detection
        self.watchdog: Watchdog | None = None
        if runtime.distributed and cfg.debug.hang_timeout > 0:
            self.watchdog = Watchdog(runtime.rank, runtime.world_size, run_dir, cfg.debug.hang_timeout).start()
        self.tokens_per_step = cfg.training.global_batch_size * cfg.data.seq_len
        self.flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops = device_peak_flops(runtime.device, cfg.training.dtype)
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
                _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
            return choice[0]
        if self.cfg.checkpoint.init_from:
            self.checkpoints.load_weights(Path(self.cfg.checkpoint.init_from).expanduser())
        return None

    def _loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss of one micro-step (or pipeline microbatch), pre-divided by
        how many of them make up the step, so gradients simply add up."""
        return cross_entropy_loss(logits, targets) / (self.accum * self.pp_microbatches)

    def _loss_context(self):
        """Vocab-sharded logits (tensor parallel) need the parallel loss, in
        forward and in backward."""
        return loss_parallel() if self.dims.tp > 1 else contextlib.nullcontext()

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.runtime.device.type, dtype=self.autocast_dtype)

    def train_step(self) -> dict:
        """One optimizer step; returns its metrics (loss averaged over the global batch)."""
        start = time.perf_counter()
        self._phase("data")
        self._inject("start")
        t = self.cfg.training
        indices = self.sampler.next_batch()
        device = self.runtime.device
        loss_sum = torch.zeros((), device=device)
        self._phase("forward_backward")
        for micro in range(self.accum):
            inputs, targets = self.dataset.batch(indices[micro * t.micro_batch_size:(micro + 1) * t.micro_batch_size])
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with self._loss_context(), self._autocast():
                if self.model.pipeline is not None:
                    losses = self.model.pipeline.step(inputs, targets)
                    if losses:  # the rank holding the last stage
                        loss_sum += _local(torch.stack([_local(l.detach()) for l in losses]).sum())
                    continue
                # Gradients are reduced once, on the last micro-step.
                with self.model.gradient_sync(micro == self.accum - 1):
                    loss = self._loss_fn(self.model(inputs), targets)
                    if self._inject_nan():
                        loss = loss * float("nan")
                    if micro == 0:
                        self.forward_times.append(time.perf_counter() - start)
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += _local(loss.detach())
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        measure_memory = self.memory is None  # the first step this process runs
        if measure_memory:
            self.memory = self._state_bytes(count_grads=True)
        self._phase("grad_norm")
        grad_norm = clip_grad_norm(self.model, t.grad_clip if t.grad_clip > 0 else float("inf"))
        self._phase("optimizer")
        lr = self.scheduler.get_last_lr()[0]
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        if measure_memory:
            self.memory.update(self._state_bytes(count_grads=False))
        self.optimizer.zero_grad(set_to_none=True)
        self._phase("loss_all_reduce")
        loss_value = self._global_loss(loss_sum)  # synchronizes, so the step time below is real
        self._inject("after_loss")
        step_time = time.perf_counter() - start
        self.step += 1
        flops_per_s = self.flops_per_token * self.tokens_per_step / step_time
        return {
            "step": self.step,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm.item(),
            "tokens": self.step * self.tokens_per_step,
            "tokens_per_s": self.tokens_per_step / step_time,
            "step_time_s": step_time,
            "mem_peak_bytes": mem_peak_bytes(device),
            "flops_per_s_per_device": flops_per_s / self.runtime.world_size,
            "mfu": flops_per_s / self.runtime.world_size / self.peak_flops if self.peak_flops else None,
        }

    def _phase(self, name: str, step: int | None = None) -> None:
        """Record (and tell the watchdog) what this rank does now (default: working on the next step)."""
        self.phase = (self.step + 1 if step is None else step, name)
        if self.watchdog is not None:
            self.watchdog.set(*self.phase)

    def where(self) -> str:
        step, name = self.phase
        return f"at step {step} ({name.replace('_', ' ')})"

    def _inject(self, point: str) -> None:
        """debug.inject_fault: the classic ways a distributed job hangs, on one rank at one step."""
        if self.fault is None:
            return
        kind, rank, step = self.fault
        if self.runtime.rank != rank or self.step + 1 < step:
            return
        at_step = self.step + 1 == step
        if point == "start" and kind == "slow":
            time.sleep(0.2)
        elif point == "start" and at_step and kind == "sleep":
            time.sleep(3600)
        elif point == "start" and at_step and kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif point == "start" and at_step and kind == "swallow_exception":
            raise _InjectedError(f"injected failure on rank {rank} at step {step}")
        elif point == "start" and at_step and kind == "raise":
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")
        elif point == "after_loss" and at_step and kind == "extra_collective":
            dist.all_reduce(torch.zeros(1, device=self.runtime.device))  # only this rank calls it

    def _inject_nan(self) -> bool:
        """debug.inject_fault = nan:RANK:STEP: that rank's loss is NaN at that step."""
        return self.fault is not None and self.fault[0] == "nan" and self.fault[1:] == (self.runtime.rank,
                                                                                       self.step + 1)

    def _stragglers(self) -> list[dict]:
        """Ranks whose data + first-forward time (before any gradient
        synchronization makes the ranks wait for each other) over the last
        logging interval exceeds the median by debug.straggler_factor."""
        mine = sum(self.forward_times) / max(1, len(self.forward_times))
        self.forward_times.clear()
        factor = self.cfg.debug.straggler_factor
        if not self.runtime.distributed or factor <= 0:
            return []
        local = torch.tensor([mine], dtype=torch.float64, device=self.runtime.device)
        times = torch.empty(self.runtime.world_size, dtype=torch.float64, device=self.runtime.device)
        all_gather_single(times, local)
        times = times.tolist()
        median = statistics.median(times)
        return [{"rank": r, "forward_s": t, "ratio": t / median} for r, t in enumerate(times)
                if median > 0 and t > factor * median]

    def _global_loss(self, loss_sum: torch.Tensor) -> float:
        """Mean over the global batch: the last pipeline stage holds it; the
        data-parallel ranks each hold the mean of their slice (gloo has no AVG)."""
        if (group := self.model.group("pp")) is not None:
            dist.all_reduce(loss_sum, group=group)
        for name in ("dp_replicate", "dp_shard"):
            if (group := self.model.group(name)) is not None:
                dist.all_reduce(loss_sum, group=group)
        return loss_sum.item() / self.dims.dp_size

    def _state_bytes(self, count_grads: bool) -> dict:
        """Bytes of this rank's local parameters, gradients or optimizer states,
        counted from the tensors themselves (a DTensor counts its local shard)."""
        if count_grads:
            return {"grads_bytes": sum(_nbytes(p.grad) for p in self.model.parameters() if p.grad is not None)}
        return {"params_bytes": sum(_nbytes(p) for p in self.model.parameters()),
                "optimizer_bytes": sum(_nbytes(v) for v in self._optimizer_tensors())}

    def _optimizer_tensors(self) -> list[torch.Tensor]:
        optimizer = getattr(self.optimizer, "optim", self.optimizer)  # ZeRO-1 wraps the local AdamW
        return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]

    def _live_state_bytes(self) -> int:
        """Bytes of the tensors alive between steps: parameters, gradients,
        buffers and optimizer states of this rank."""
        tensors = {id(t): t for part in self.model.parts for t in (*part.parameters(), *part.buffers())}
        tensors.update({id(p.grad): p.grad for p in self.model.parameters() if p.grad is not None})
        tensors.update({id(v): v for v in self._optimizer_tensors()})
        total = sum(_nbytes(t) for t in tensors.values())
        for part in self.model.parts:  # DDP's gradient buckets outlive zero_grad(set_to_none=True)
            if isinstance(part, DistributedDataParallel) and not any(p.grad is not None for p in part.parameters()):
                sizes = str(part._get_ddp_logging_data().get("bucket_sizes", ""))
                total += sum(int(size) for size in sizes.split(",") if size.strip())
        return total

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
        writer = MetricsWriter(self.run_dir / "metrics.jsonl" if main else None)
        display = ProgressDisplay(cfg.training.steps, enabled=show_progress and main,
                                  line_every=max(cfg.logging.interval, cfg.training.steps // 10))
        records, start = [], time.perf_counter()
        stop = _StopRequest()
        last_step = cfg.training.steps
        if self.fault and self.fault[0] == "fewer_batches" and self.fault[1] == self.runtime.rank:
            last_step = self.fault[2] - 1  # this rank's data runs out one batch early
        try:
            while self.step < last_step:
                if self.step + 1 == cfg.debug.measure_step:
                    with StepProbe(self.runtime.device, self._live_state_bytes()) as probe:
                        record = self.train_step()
                    self.measured = probe.result()
                else:
                    try:
                        record = self.train_step()
                    except _InjectedError as exc:  # the classic bug: one rank catches an error and moves on
                        print(f"[rank{self.runtime.rank}] skipping step {self.step + 1}: {exc}", file=sys.stderr)
                        self.step += 1
                        continue
                records.append(record)
                self._report_nonfinite(record)
                if self.step % cfg.logging.interval == 0 or self.step == cfg.training.steps:
                    self._phase("straggler_check", self.step)
                    stragglers = self._stragglers()
                    if stragglers:
                        record["stragglers"] = stragglers
                        if main:
                            print("straggler(s) at step {}: {}".format(self.step, ", ".join(
                                f"rank {s['rank']} {s['ratio']:.1f}x the median data+forward time"
                                for s in stragglers)), file=sys.stderr)
                    writer.write(record)
                display.update(self.step, record)
                self._phase("stop_check", self.step)
                if self._agree_to_stop(stop.requested or self.step == cfg.debug.stop_at_step):
                    break
                interval = cfg.checkpoint.interval
                if self.checkpoints and interval and self.step % interval == 0 and self.step < cfg.training.steps:
                    self._phase("checkpoint", self.step)
                    self.checkpoints.save(self.step)
            self._phase("final_checkpoint", self.step)
            if self.checkpoints:
                self.checkpoints.save(self.step, blocking=True)
                self.checkpoints.wait()
        finally:
            stop.restore()
            display.close()
            writer.close()
        elapsed = time.perf_counter() - start
        summary = self._summary(records, elapsed)
        summary["stopped_early"] = self.step < cfg.training.steps
        summary["resumed_from"] = self.resumed_from
        summary["skipped_checkpoints"] = self.skipped_checkpoints
        summary["nonfinite_steps"] = self.nonfinite_steps
        self._phase("final_state_dict", self.step)
        state = self.model.full_state_dict()  # a collective: every rank takes part
        memory = [None] * self.runtime.world_size if self.runtime.distributed else None
        if memory is not None:
            dist.all_gather_object(memory, {"rank": self.runtime.rank, **self.memory})
        summary["state_bytes_by_rank"] = memory or [{"rank": 0, **self.memory}]
        if cfg.debug.measure_step:
            measured = [None] * self.runtime.world_size if self.runtime.distributed else None
            if measured is not None:
                dist.all_gather_object(measured, {"rank": self.runtime.rank, **(self.measured or {})})
            summary["measured_by_rank"] = measured or [{"rank": 0, **(self.measured or {})}]
        if main:
            self._phase("writing_outputs", self.step)
            self._write_outputs(summary, state)
        return summary

    def _report_nonfinite(self, record: dict) -> None:
        """A non-finite loss or gradient norm is reported on its step (rank 0,
        the first one and then every 10th); the summary counts them."""
        if math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]):
            return
        self.nonfinite_steps.append(record["step"])
        if self.runtime.is_main and len(self.nonfinite_steps) % 10 == 1:
            print(f"warning: step {record['step']}: loss {record['loss']}, grad_norm {record['grad_norm']} "
                  f"(non-finite; {len(self.nonfinite_steps)} such step(s) so far)", file=sys.stderr, flush=True)

    def _agree_to_stop(self, local: bool) -> bool:
        """A signal may reach the ranks at different steps: stop when any rank saw one."""
        if not self.runtime.distributed:
            return local
        flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=self.runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _summary(self, records: list[dict], elapsed: float) -> dict:
        cfg = self.cfg
        # Steady state: the first step pays for warm-up (allocations, DDP buckets).
        steady = records[1:] or records
        steady_time = sum(r["step_time_s"] for r in steady)
        window = min(10, len(records))
        tokens_per_s = self.tokens_per_step * len(steady) / steady_time
        flops_per_s_per_device = self.flops_per_token * tokens_per_s / self.runtime.world_size
        return {
            "run_dir": str(self.run_dir),
            "model": cfg.model.name,
            "params": param_count(cfg.model),
            "layout": {**self.dims.degrees(), "zero_stage": self.cfg.parallel.zero_stage},
            "world_size": self.runtime.world_size,
            "device": self.runtime.device.type,
            "grad_accum_steps": self.accum,
            "steps": self.step,
            "tokens": self.step * self.tokens_per_step,
            "loss_first": records[0]["loss"],
            "loss_last": sum(r["loss"] for r in records[-window:]) / window,
            "loss_last_window": window,
            "elapsed_s": elapsed,
            "tokens_per_s": tokens_per_s,
            "flops_per_s_per_device": flops_per_s_per_device,
            "mfu": flops_per_s_per_device / self.peak_flops if self.peak_flops else None,
            "mem_peak_bytes": max(r["mem_peak_bytes"] for r in records),
            "mem_peak_source": "cuda_allocator" if self.runtime.device.type == "cuda" else "process_rss",
        }

    def sample_text(self, state: dict[str, torch.Tensor], n_samples: int = 3, prompt_tokens: int = 24) -> list[str]:
        """Continue the openings of a few corpus sequences with the trained
        weights, loaded into a plain single-device model."""
        n_new = self.cfg.logging.sample_tokens
        if n_new == 0:
            return []
        if not all(torch.isfinite(t).all() for t in state.values()):
            print("warning: the trained weights hold NaN/inf: no text sampled", file=sys.stderr)
            return []
        model = Llama(self.cfg.model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        model.to(self.runtime.device).eval()
        step = max(1, self.dataset.n_sequences // n_samples)
        prompts = torch.stack([self.dataset.batch([i * step])[0][0, :prompt_tokens] for i in range(n_samples)])
        out = generate(model, prompts.to(self.runtime.device), n_new, seed=self.cfg.training.seed,
                       max_seq_len=self.cfg.data.seq_len)
        return [self.corpus.tokenizer.decode(row.tolist()) for row in out.cpu()]

    def _write_outputs(self, summary: dict, state: dict[str, torch.Tensor]) -> None:
        summary["samples"] = self.sample_text(state)
        # Each file whole or not at all: a failure (a full disk) leaves no half-written file.
        outputs = {"model.safetensors": lambda path: save_file(state, str(path), metadata={"step": str(self.step)}),
                   "summary.json": lambda path: path.write_text(json.dumps(summary, indent=1))}
        for name, write in outputs.items():
            tmp = self.run_dir / f"{name}.tmp"
            try:
                write(tmp)
                os.replace(tmp, self.run_dir / name)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise


class _InjectedError(RuntimeError):
    """debug.inject_fault = swallow_exception:RANK:STEP."""


class _StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume from ``step``, forget the records of steps after it."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _nbytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()
