"""Throughput of every 2-rank layout against DDP on the same model, global batch
and threads; the measured pipeline bubble of GPipe and 1F1B next to the theory
(p-1)/(m+p-1); and, when DeepSpeed is installed (`bash scripts/install.sh
--bench`), DeepSpeed ZeRO-1/2/3 on the same model, data, optimizer and threads,
as scaletrain/DeepSpeed ratios.

    python benchmarks/bench_parallel.py [--rounds 4] [--steps 4] [--model tiny]

Everything runs in one torchrun launch of 2 workers (1 thread each): every
layout (and every DeepSpeed engine) is built once, then the rounds take
--steps steps of each in turn, so drift in this shared machine hits all of
them alike. Tokens/s is the median step; the first step of each is excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# One micro-step per optimizer step on every layout: the data-parallel layouts
# take 4 sequences per rank, TP and PP all 8 (the pipeline splits them into
# m = 8 microbatches of one sequence).
SEQ_LEN, GLOBAL_BATCH = 128, 8
DP, WHOLE = ["training.micro_batch_size=4"], ["training.micro_batch_size=8"]

LAYOUTS = {
    "DDP": DP,
    "ZeRO-1": DP + ["parallel.zero_stage=1"],
    "ZeRO-2": DP + ["parallel.zero_stage=2"],
    "ZeRO-3": DP + ["parallel.zero_stage=3"],
    "TP": WHOLE + ["parallel.tp=2"],
    "TP+SP": WHOLE + ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "PP GPipe": WHOLE + ["parallel.pp=2", "parallel.pp_schedule=gpipe"],
    "PP 1F1B": WHOLE + ["parallel.pp=2", "parallel.pp_schedule=1f1b"],
    "PP interleaved 1F1B": WHOLE + ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"],
    "PP ZB-V": WHOLE + ["parallel.pp=2", "parallel.pp_schedule=zbv"],
}


def base_overrides(model: str) -> list[str]:
    # Many steps so the learning-rate schedule never ends; the watchdog off, as
    # several trainers share the process.
    return [f"model.name={model}", f"data.seq_len={SEQ_LEN}", "training.steps=100000",
            f"training.global_batch_size={GLOBAL_BATCH}", "debug.hang_timeout=0",
            "logging.sample_tokens=0", "training.warmup_steps=2", "checkpoint.enable=false"]


def stage_compute_time(trainer, reps: int = 5) -> float:
    """Forward + backward time of this rank's stage on one microbatch, alone
    (no communication): the busy time the schedule needs per microbatch."""
    part = trainer.model.parts[0]
    mb = trainer.cfg.training.micro_batch_size // trainer.model.pipeline.n_microbatches
    dim = trainer.cfg.model.dim
    if part.embed_tokens is not None:
        make = lambda: torch.randint(0, 256, (mb, SEQ_LEN))  # noqa: E731
    else:
        make = lambda: torch.randn(mb, SEQ_LEN, dim, requires_grad=True)  # noqa: E731
    times = []
    for _ in range(reps + 1):
        x = make()
        start = time.perf_counter()
        out = part(x)
        out.backward(torch.ones_like(out) / out.numel())
        times.append(time.perf_counter() - start)
    part.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def scaletrain_runs(model: str, only: list[str], runtime) -> dict:
    """name -> (step function, trainer) for each layout."""
    from scaletrain.config import load_config
    from scaletrain.train.trainer import Trainer

    runs = {}
    for name, overrides in LAYOUTS.items():
        if only and name not in only:
            continue
        cfg = load_config(None, base_overrides(model) + overrides)
        trainer = Trainer(cfg, Path(tempfile.mkdtemp()), runtime, show_progress=False)
        runs[name] = (trainer.train_step, trainer)
    return runs


def deepspeed_runs(model: str) -> dict:
    """The same model, data and optimizer (torch AdamW) under DeepSpeed ZeRO-1/2/3."""
    import deepspeed
    import torch.nn.functional as F

    from scaletrain.config import load_config
    from scaletrain.data import SequenceDataset, prepare_corpus
    from scaletrain.model import Llama
    from scaletrain.train.checks import resolve_vocab

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    cfg = load_config(None, base_overrides(model) + DP)
    corpus = prepare_corpus(cfg.data, show_progress=False)
    cfg = resolve_vocab(cfg, corpus.tokenizer.vocab_size)
    dataset = SequenceDataset(corpus.tokens(), SEQ_LEN)
    per_rank = GLOBAL_BATCH // world
    runs = {}
    for stage in (1, 2, 3):
        net = Llama(cfg.model)
        net.init_weights(cfg.training.seed)
        optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.training.lr, betas=(0.9, 0.95), weight_decay=0.1)
        ds_config = {
            "train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": per_rank,
            "gradient_accumulation_steps": 1, "gradient_clipping": cfg.training.grad_clip,
            "zero_optimization": {"stage": stage}, "steps_per_print": 10**9, "wall_clock_breakdown": False,
        }
        engine, *_ = deepspeed.initialize(model=net, optimizer=optimizer, config=ds_config)

        def step(engine=engine, counter=[0]):
            first = (counter[0] * world + rank) * per_rank
            counter[0] += 1
            x, y = dataset.batch(range(first, first + per_rank))
            loss = F.cross_entropy(engine(x).flatten(0, 1).float(), y.flatten())
            engine.backward(loss)
            engine.step()
            loss.item()

        runs[f"DeepSpeed ZeRO-{stage}"] = (step, None)
    return runs


def worker(model: str, rounds: int, steps: int, out_path: Path, only: list[str]) -> None:
    from scaletrain.parallel.runtime import init_runtime

    runtime = init_runtime()
    runs = scaletrain_runs(model, only, runtime)
    try:
        runs.update(deepspeed_runs(model))
    except ImportError:
        pass
    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, (step, _) in runs.items():
        step()  # warm-up, not timed
    for _ in range(rounds):
        for name, (step, _) in runs.items():
            for _ in range(steps):
                runtime.barrier()
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    results = {}
    for name, (_, trainer) in runs.items():
        step_time = statistics.median(times[name])
        row = {"tokens_per_s": GLOBAL_BATCH * SEQ_LEN / step_time}
        if trainer is not None and trainer.model.pipeline is not None \
                and trainer.cfg.parallel.pp_schedule in ("gpipe", "1f1b"):
            busy = trainer.model.pipeline.n_microbatches * stage_compute_time(trainer)
            bubbles = [None] * runtime.world_size
            torch.distributed.all_gather_object(bubbles, 1.0 - busy / step_time)
            row["bubble_measured"] = statistics.mean(bubbles)
            p, m = trainer.cfg.parallel.pp, trainer.model.pipeline.n_microbatches
            row["bubble_theory"] = (p - 1) / (m + p - 1)
        results[name] = row
    if runtime.is_main:
        out_path.write_text(json.dumps(results))
    os._exit(0)


def launch(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
               "--worker", "--model", args.model, "--rounds", str(args.rounds), "--steps", str(args.steps),
               "--out", str(out)]
        cmd += [arg for name in args.layout for arg in ("--layout", name)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        if not out.exists():
            sys.exit(f"benchmark failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-10000:]}")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="steps of each layout per round")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--layout", action="append", default=[], help="run only these layouts (repeatable)")
    args = parser.parse_args()
    if args.layout:
        args.layout = sorted(set(args.layout) | {"DDP"})
    if args.worker:
        return worker(args.model, args.rounds, args.steps, args.out, args.layout)

    from scaletrain.config import load_config
    from scaletrain.data import prepare_corpus

    prepare_corpus(load_config(None, base_overrides(args.model)).data)  # tokenize outside timing
    print(f"model {args.model}, seq_len {SEQ_LEN}, global batch {GLOBAL_BATCH}, 2 ranks x 1 thread, "
          f"{args.rounds} rounds x {args.steps} steps of each layout, interleaved; {os.cpu_count()} cores")
    rows = launch(args)
    ddp = rows["DDP"]["tokens_per_s"]
    print(f"\n{'layout':<22}{'tokens/s':>10}{'vs DDP':>9}")
    for name, row in rows.items():
        if not name.startswith("DeepSpeed"):
            print(f"{name:<22}{row['tokens_per_s']:>10.0f}{row['tokens_per_s'] / ddp:>9.3f}")
    print(f"\n{'pipeline bubble':<22}{'measured':>10}{'(p-1)/(m+p-1)':>16}")
    for name, row in rows.items():
        if "bubble_measured" in row:
            print(f"{name:<22}{row['bubble_measured']:>10.3f}{row['bubble_theory']:>16.3f}")
    if "DeepSpeed ZeRO-1" not in rows:
        print("\nDeepSpeed not installed (bash scripts/install.sh --bench): ZeRO comparison skipped")
        return
    print(f"\n{'ZeRO stage':<22}{'scaletrain':>12}{'DeepSpeed':>12}{'ratio':>8}")
    for stage in (1, 2, 3):
        ours, theirs = rows.get(f"ZeRO-{stage}"), rows[f"DeepSpeed ZeRO-{stage}"]
        if ours:
            print(f"{f'ZeRO-{stage}':<22}{ours['tokens_per_s']:>12.0f}{theirs['tokens_per_s']:>12.0f}"
                  f"{ours['tokens_per_s'] / theirs['tokens_per_s']:>8.3f}")


if __name__ == "__main__":
    main()
