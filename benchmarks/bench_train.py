"""Throughput of scaletrain's trainer against a minimal hand-written PyTorch
training loop on the same model, global batch, micro batch, dtype and thread
count: single process, and 2-process DDP (both launched by torchrun).

Rounds alternate baseline / scaletrain so machine noise hits both; the ratio
of the median tokens/s is printed. Target: scaletrain >= 0.95 x hand-written.

    python benchmarks/bench_train.py [--config configs/small.toml] [--steps 15] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from scaletrain.config import Config, load_config
from scaletrain.data import SequenceDataset, prepare_corpus
from scaletrain.model import Llama
from scaletrain.parallel.runtime import init_runtime, shutdown
from scaletrain.train.checks import resolve_vocab
from scaletrain.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def handwritten_loop(cfg: Config, dataset: SequenceDataset, steps: int, rank: int, world: int) -> float:
    """The loop a user would write by hand; returns tokens/s over all ranks."""
    t = cfg.training
    model = Llama(cfg.model)
    model.init_weights(t.seed)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
    accum = t.global_batch_size // (t.micro_batch_size * world)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if t.dtype == "bf16" else contextlib.nullcontext())
    start = time.perf_counter()
    for step in range(steps):
        for micro in range(accum):
            first = ((step * world + rank) * accum + micro) * t.micro_batch_size
            x, y = dataset.batch(range(first, first + t.micro_batch_size))
            sync = model.no_sync() if world > 1 and micro < accum - 1 else contextlib.nullcontext()
            with sync:
                with autocast:
                    loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()) / accum
                loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
    return steps * t.global_batch_size * cfg.data.seq_len / (time.perf_counter() - start)


def scaletrain_loop(cfg: Config, steps: int, runtime) -> float:
    """The real trainer, metrics file and progress logic included."""
    cfg = load_config(None, _as_overrides(cfg) + [f"training.steps={steps}", "logging.sample_tokens=0",
                                                  "checkpoint.enable=false"])
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        trainer = Trainer(cfg, run_dir, runtime, show_progress=False)
        runtime.barrier()
        start = time.perf_counter()
        trainer.fit(show_progress=False)
        elapsed = time.perf_counter() - start
    return steps * cfg.training.global_batch_size * cfg.data.seq_len / elapsed


def _as_overrides(cfg: Config) -> list[str]:
    return [f"{section}.{key}={value}" for section, values in cfg.to_dict().items() for key, value in values.items()]


def measure(cfg: Config, steps: int, rounds: int) -> tuple[float, float]:
    runtime = init_runtime()
    corpus = prepare_corpus(cfg.data, show_progress=False)
    cfg = resolve_vocab(cfg, corpus.tokenizer.vocab_size)
    dataset = SequenceDataset(corpus.tokens(), cfg.data.seq_len)
    base, ours = [], []
    for _ in range(rounds):
        runtime.barrier()
        base.append(handwritten_loop(cfg, dataset, steps, runtime.rank, runtime.world_size))
        ours.append(scaletrain_loop(cfg, steps, runtime))
    shutdown(runtime)
    return statistics.median(base), statistics.median(ours)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(REPO / "configs" / "small.toml"))
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = load_config(args.config)
    if args.worker:
        base, ours = measure(cfg, args.steps, args.rounds)
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"RESULT {base} {ours}", flush=True)
        os._exit(0)

    prepare_corpus(cfg.data)  # tokenize once, outside any timing
    print(f"model {cfg.model.name}, seq_len {cfg.data.seq_len}, global batch {cfg.training.global_batch_size}, "
          f"micro batch {cfg.training.micro_batch_size}, dtype {cfg.training.dtype}, "
          f"{args.steps} steps x {args.rounds} rounds, {os.cpu_count()} cores")
    rows = []
    for nproc in (1, 2):
        threads = max(1, (os.cpu_count() or 1) // nproc)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               __file__, "--worker", "--config", args.config, "--steps", str(args.steps), "--rounds", str(args.rounds)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT")), None)
        if line is None:
            sys.exit(f"benchmark worker failed:\n{out.stdout}\n{out.stderr}")
        base, ours = map(float, line.split()[1:])
        rows.append((f"{'single process' if nproc == 1 else f'DDP x {nproc}'} ({threads} thread(s) each)", base, ours))
    print(f"{'layout':<36}{'hand-written tok/s':>20}{'scaletrain tok/s':>18}{'ratio':>8}")
    for name, base, ours in rows:
        print(f"{name:<36}{base:>20.0f}{ours:>18.0f}{ours / base:>8.3f}")


if __name__ == "__main__":
    main()
