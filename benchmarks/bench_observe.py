"""Cost of observability: training tokens/s with the per-rank time breakdown
and resource sampling (logging.breakdown) and the Prometheus and TensorBoard
exporters on, against all of them off (the built-in alert rules run in
both); the default small model on 2 DDP ranks, every step logged
(logging.interval = 1, the worst case), alternating rounds, median of each.
Target ratio >= 0.98.

    python benchmarks/bench_observe.py [--rounds 4] [--steps 30]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BASE = ["--set", "model.name=small", "--set", "data.seq_len=256", "--set", "training.global_batch_size=8",
        "--set", "training.micro_batch_size=4", "--set", "checkpoint.enable=false", "--set", "logging.sample_tokens=0",
        "--set", "logging.interval=1"]


def run(on: bool, steps: int, root: Path, i: int) -> float:
    run_dir = root / f"run_{'on' if on else 'off'}_{i}"
    extra = ["logging.breakdown=true", "logging.prometheus_port=0"] if on else ["logging.breakdown=false"]
    if on and importlib.util.find_spec("tensorboard") is not None:
        extra.append("logging.tensorboard=true")
    cmd = [sys.executable, "-m", "scaletrain", "train", "--nproc", "2", "--run-dir", str(run_dir), *BASE,
           "--set", f"training.steps={steps}", *[a for e in extra for a in ("--set", e)]]
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads((run_dir / "summary.json").read_text())["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    on, off = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            off.append(run(False, args.steps, Path(tmp), i))
            on.append(run(True, args.steps, Path(tmp), i))
    tb = "+ TensorBoard " if importlib.util.find_spec("tensorboard") is not None else ""
    print(f"{'observability':<44}{'tokens/s (median)':>20}   rounds")
    print(f"{'off':<44}{statistics.median(off):>20,.0f}   {', '.join(f'{x:,.0f}' for x in off)}")
    print(f"{'breakdown + Prometheus ' + tb:<44}{statistics.median(on):>20,.0f}   "
          f"{', '.join(f'{x:,.0f}' for x in on)}")
    print(f"ratio on/off: {statistics.median(on) / statistics.median(off):.3f} (target >= 0.98)")


if __name__ == "__main__":
    main()
