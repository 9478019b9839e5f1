"""Starting a run: validate everything in the launching process, then train
in-process (one process) or start N local workers through torchrun's own
entry point (``torch.distributed.run``); under an external torchrun the same
``scaletrain train`` joins the existing group as a worker.

Everything that can be wrong with the input (config, layout, data) is found
before the run directory or any worker exists, so bad input writes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from scaletrain.checkpoint.paths import check_checkpoint_paths
from scaletrain.config import Config, load_config
from scaletrain.errors import UserError, warn
from scaletrain.observe.exporters import check_exporters
from scaletrain.parallel.dims import ParallelDims, check_offload
from scaletrain.parallel.runtime import init_runtime, run_local, shutdown, under_launcher
from scaletrain.train.checks import check_data, data_report, grad_accum_steps, prepare_data, resolve_vocab
from scaletrain.train.failures import failure_line, is_communication_error, log_traceback
from scaletrain.train.preflight import check_memory
from scaletrain.train.rank_batch import check_rank_batch
from scaletrain.train.rundir import LOCKED_ENV, RunDirLock, check_run_dir, lock_run, run_locks


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def prepare_run(cfg: Config, world_size: int, run_dir: Path | None,
                force: bool = False) -> tuple[Config, Path, list[RunDirLock]]:
    """Check layout, batch arithmetic, data (tokenizing the corpus into the
    cache if needed), the run directory, any checkpoint to resume and the
    memory the job needs; then lock the run directory and write the resolved
    config. A refusal leaves the run directory untouched."""
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    check_rank_batch(cfg, dims.dp_size, grad_accum_steps(cfg, dims))
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    check_offload(cfg, device_type)
    corpus, val_corpus = prepare_data(cfg)
    cfg = resolve_vocab(cfg, corpus.tokenizer.vocab_size)
    rows, _ = check_data(cfg, corpus, val_corpus)
    if (message := data_report(rows)) is not None:
        warn(message)
    check_exporters(dataclasses.asdict(cfg.logging))
    run_dir = run_dir or default_run_dir()
    check_run_dir(run_dir)
    for lock in run_locks(cfg, run_dir):
        lock.check_free()
    check_checkpoint_paths(cfg, run_dir)
    if not force:
        check_memory(cfg, dims, world_size, device_type)
    locks = lock_run(cfg, run_dir)
    try:
        tmp = run_dir / "config.toml.tmp"
        tmp.write_text(cfg.to_toml())
        os.replace(tmp, run_dir / "config.toml")
    except OSError as exc:
        for lock in locks:
            lock.release()
        raise UserError(f"--run-dir {run_dir}: cannot write config.toml ({exc.strerror})") from None
    return cfg, run_dir, locks


def train(config_path: str | None, overrides: list[str], nproc: int, run_dir: str | Path | None,
          max_restarts: int = 0, force: bool = False) -> int:
    """``scaletrain train``: returns the process exit code."""
    if run_dir is not None and not str(run_dir).strip():
        raise UserError("--run-dir is empty; give a directory path (default: runs/<timestamp>)")
    run_dir = Path(run_dir) if run_dir is not None else None
    if under_launcher():
        if nproc != 1 or max_restarts:
            raise UserError("--nproc and --max-restarts cannot be used under torchrun; pass them to torchrun")
        return run_worker(load_config(config_path, overrides), run_dir)
    if nproc < 1:
        raise UserError(f"--nproc = {nproc}; allowed: 1 or more local worker processes")
    if max_restarts < 0:
        raise UserError(f"--max-restarts = {max_restarts}; allowed: 0 or more")
    cfg = load_config(config_path, overrides)
    cfg, run_dir, locks = prepare_run(cfg, nproc, run_dir, force)
    try:
        if nproc == 1 and max_restarts == 0:
            return run_worker(cfg, run_dir, exit_hard=False, locked=True)
        os.environ[LOCKED_ENV] = str(run_dir.absolute())
        return launch_workers(run_dir, nproc, max_restarts)
    finally:
        for lock in locks:
            lock.release()


def launch_workers(run_dir: Path, nproc: int, max_restarts: int = 0) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    started = time.time()
    try:
        with _first_signal_only():
            run_local(nproc, ["train", "--config", str(run_dir / "config.toml"), "--run-dir", str(run_dir)],
                      max_restarts)
    except ChildFailedError as exc:
        codes = {failure.exitcode for failure in exc.failures.values()}
        return 2 if codes == {2} else 3 if 3 in codes else 1
    except SignalException as exc:
        # SIGTERM/SIGINT to this process: torchrun's agent passed it on to the
        # workers and waited for them; they finish the step, checkpoint, write
        # the summary and exit. Success is that summary, written after the signal.
        summary = run_dir / "summary.json"
        if summary.exists() and summary.stat().st_mtime >= started and json.loads(summary.read_text())["stopped_early"]:
            print(f"stopped by signal {exc.sigval}: checkpoint and summary written", file=sys.stderr)
            return 0
        print(f"error: stopped by signal {exc.sigval} before the workers could save", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def _first_signal_only():
    """torchrun's agent turns SIGINT/SIGTERM into an exception, then stops the
    workers and waits for them; a second signal (a user pressing Ctrl-C
    again) would interrupt that wait and kill workers that are saving. Only
    the first one is raised here; the rest are acknowledged. (A patch of the
    agent's module-level handler, installed by name when the workers start.)"""
    from torch.distributed.elastic.multiprocessing import api

    original = getattr(api, "_terminate_process_handler", None)
    if original is None:
        yield
        return
    raised = []

    def handler(signum, frame):
        if raised:
            print("still saving: the workers stop after their checkpoint", file=sys.stderr, flush=True)
            return
        raised.append(signum)
        original(signum, frame)

    api._terminate_process_handler = handler
    try:
        yield
    finally:
        api._terminate_process_handler = original
        if raised:  # the job is ending: later signals change nothing
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)


class _RankPrefixWriter(io.TextIOBase):
    """Prefixes every line a non-zero rank prints with ``[rankN]``."""

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self.at_line_start = stream, prefix, True

    def write(self, text: str) -> int:
        for piece in text.splitlines(keepends=True):
            if self.at_line_start:
                self.stream.write(self.prefix)
            self.stream.write(piece)
            self.at_line_start = piece.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def run_worker(cfg: Config, run_dir: Path | None, exit_hard: bool = True, locked: bool = False) -> int:
    """Train as one rank. Under a launcher the process ends with ``os._exit``
    once everything is written and flushed: with gloo a worker can abort in
    its C++ destructors at interpreter exit ("terminate called without an
    active exception") after a run that finished, which torchrun would report
    as a failure. Any error ends as one line naming the rank, where and why
    (the traceback in ``<run dir>/logs/``), and the other ranks are told."""
    from scaletrain.train.trainer import Trainer

    if exit_hard:
        stop_with_parent()
    runtime = init_runtime()
    code = 1
    trainer = None
    locks: list[RunDirLock] = []
    try:
        if runtime.rank != 0:
            sys.stdout = _RankPrefixWriter(sys.stdout, f"[rank{runtime.rank}] ")
            sys.stderr = _RankPrefixWriter(sys.stderr, f"[rank{runtime.rank}] ")
        locked = locked or (run_dir is not None and os.environ.get(LOCKED_ENV) == str(run_dir.absolute()))
        run_dir, locks = (run_dir, []) if locked else _agree_on_run_dir(runtime, run_dir, cfg)
        trainer = Trainer(cfg, run_dir, runtime)
        summary = trainer.fit()
        if runtime.is_main and summary is not None:
            from scaletrain.train.display import print_summary

            print_summary(summary)
        code = 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
        if trainer is not None and trainer.watchdog is not None:
            trainer.watchdog.announce_failure(f"rank {runtime.rank}: {exc}")
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        code = 1
        _report_failure(runtime, trainer, run_dir, exc)
    finally:
        if trainer is not None and trainer.watchdog is not None:
            trainer.watchdog.stop()
        for lock in locks:
            lock.release()
        if exit_hard:
            sys.stdout.flush()
            sys.stderr.flush()
            if code == 0:
                shutdown(runtime)
            os._exit(code)
        shutdown(runtime)
    return code


def _report_failure(runtime, trainer, run_dir: Path | None, exc: BaseException) -> None:
    """One ``error:`` line; a peer's death goes to the watchdog's diagnosis
    (which may end this process with exit 3), this rank's own error is
    announced to the others so that they stop now."""
    log = log_traceback(run_dir, runtime.rank, exc)
    line = failure_line(runtime.rank, trainer.where() if trainer else "during start-up", exc, log)
    if isinstance(exc, torch.OutOfMemoryError) and trainer is not None:
        line += _plan_oom_recovery(trainer)
    watchdog = trainer.watchdog if trainer is not None else None
    if watchdog is not None and is_communication_error(exc):
        watchdog.on_failure(exc)  # names a dead or out-of-step peer (exits 3), else returns
    elif watchdog is not None:
        watchdog.announce_failure(line)
    print(f"error: {line}", file=sys.stderr, flush=True)


def _plan_oom_recovery(trainer) -> str:
    """Record in events.jsonl what the next attempt changes (the trainer
    applies it at start: an elastic restart, or the same command rerun)."""
    from scaletrain.observe.events import append_event
    from scaletrain.train.health import oom_overrides

    overrides = oom_overrides(trainer.cfg)
    if overrides is None:
        return f"; no out-of-memory recovery left (training.on_oom = {trainer.cfg.training.on_oom})"
    append_event(trainer.run_dir, "oom_recovery", trainer.phase[0], trainer.runtime.rank,
                 f"out of memory; next attempt: {', '.join(overrides)}", overrides=overrides)
    return (f"; recovery: {', '.join(overrides)} from the last checkpoint (restarted with --max-restarts, "
            "or when the same command is run again)")


def stop_with_parent() -> None:
    """Workers never outlive their launcher: Linux delivers SIGKILL to this
    process when its parent (torchrun's agent) dies, however it dies.
    Checkpoints are atomic, so the last complete one stays valid."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # not Linux: the watchdog notices the agent's store is gone instead
        return
    pr_set_pdeathsig = 1
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) == 0 and os.getppid() == 1:
        os._exit(1)  # the parent died before the request took effect


def _agree_on_run_dir(runtime, run_dir: Path | None, cfg: Config) -> tuple[Path, list[RunDirLock]]:
    """Under an external torchrun, rank 0 picks the directory (without
    --run-dir), checks it and locks it for the job."""
    choice: list = [None]
    locks: list[RunDirLock] = []
    if runtime.is_main:
        try:
            run_dir = run_dir or default_run_dir()
            check_run_dir(run_dir)
            locks = lock_run(cfg, run_dir)
            choice = [str(run_dir)]
        except UserError as exc:
            choice = [f"error: {exc}"]
    if runtime.distributed:
        dist.broadcast_object_list(choice, src=0)
    if choice[0].startswith("error: "):
        raise UserError(choice[0].removeprefix("error: "))
    return Path(choice[0]), locks
