"""Starting a run: validate everything in the launching process, then train
in-process (one process) or start N local workers through torchrun's own
entry point (``torch.distributed.run``); under an external torchrun the same
``scaletrain train`` joins the existing group as a worker.

Everything that can be wrong with the input (config, layout, data) is found
before the run directory or any worker exists, so bad input writes nothing.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from scaletrain.checkpoint.paths import CheckpointError, check_checkpoint_paths
from scaletrain.config import Config, load_config
from scaletrain.data import prepare_corpus
from scaletrain.errors import UserError
from scaletrain.parallel.dims import ParallelDims, check_offload
from scaletrain.parallel.runtime import init_runtime, run_local, shutdown, under_launcher
from scaletrain.train.checks import check_data, grad_accum_steps, resolve_vocab


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def prepare_run(cfg: Config, world_size: int, run_dir: Path | None) -> tuple[Config, Path]:
    """Check layout, batch arithmetic and data (tokenizing the corpus into the
    cache if needed), then create the run directory with the resolved config."""
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    grad_accum_steps(cfg, dims)
    check_offload(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    corpus = prepare_corpus(cfg.data)
    cfg = resolve_vocab(cfg, corpus.tokenizer.vocab_size)
    check_data(cfg, corpus)
    run_dir = run_dir or default_run_dir()
    check_checkpoint_paths(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(cfg.to_toml())
    return cfg, run_dir


def train(config_path: str | None, overrides: list[str], nproc: int, run_dir: Path | None,
          max_restarts: int = 0) -> int:
    """``scaletrain train``: returns the process exit code."""
    if under_launcher():
        if nproc != 1 or max_restarts:
            raise UserError("--nproc and --max-restarts cannot be used under torchrun; pass them to torchrun")
        return run_worker(load_config(config_path, overrides), run_dir)
    if nproc < 1:
        raise UserError(f"--nproc = {nproc}; allowed: 1 or more local worker processes")
    if max_restarts < 0:
        raise UserError(f"--max-restarts = {max_restarts}; allowed: 0 or more")
    cfg = load_config(config_path, overrides)
    cfg, run_dir = prepare_run(cfg, nproc, run_dir)
    if nproc == 1 and max_restarts == 0:
        return run_worker(cfg, run_dir, exit_hard=False)
    return launch_workers(run_dir, nproc, max_restarts)


def launch_workers(run_dir: Path, nproc: int, max_restarts: int = 0) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    started = time.time()
    try:
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
            return 0
        print(f"error: stopped by signal {exc.sigval} before the workers could save", file=sys.stderr)
        return 1
    return 0


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


def run_worker(cfg: Config, run_dir: Path | None, exit_hard: bool = True) -> int:
    """Train as one rank. Under a launcher the process ends with ``os._exit``
    once everything is written and flushed: with gloo a worker can abort in
    its C++ destructors at interpreter exit ("terminate called without an
    active exception") after a run that finished, which torchrun would report
    as a failure."""
    from scaletrain.train.trainer import Trainer

    runtime = init_runtime()
    code = 1
    trainer = None
    try:
        if runtime.rank != 0:
            sys.stdout = _RankPrefixWriter(sys.stdout, f"[rank{runtime.rank}] ")
            sys.stderr = _RankPrefixWriter(sys.stderr, f"[rank{runtime.rank}] ")
        run_dir = _agree_on_run_dir(runtime, run_dir)
        trainer = Trainer(cfg, run_dir, runtime)
        summary = trainer.fit()
        if runtime.is_main and summary is not None:
            from scaletrain.train.display import print_summary

            print_summary(summary)
        code = 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    except Exception as exc:
        traceback.print_exc()
        code = 1
        if trainer is not None and trainer.watchdog is not None:
            trainer.watchdog.on_failure(exc)  # names a dead or out-of-step peer (exits 3), else returns
    finally:
        if trainer is not None and trainer.watchdog is not None:
            trainer.watchdog.stop()
        if exit_hard:
            sys.stdout.flush()
            sys.stderr.flush()
            if code == 0:
                shutdown(runtime)
            os._exit(code)
        shutdown(runtime)
    return code


def _agree_on_run_dir(runtime, run_dir: Path | None) -> Path:
    """Under an external torchrun without --run-dir, rank 0 picks the directory."""
    if run_dir is None:
        choice = [str(default_run_dir()) if runtime.is_main else None]
        if runtime.distributed:
            dist.broadcast_object_list(choice, src=0)
        run_dir = Path(choice[0])
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir
