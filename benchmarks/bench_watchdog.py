"""Cost of the hang watchdog: training tokens/s with heartbeats + watchdog on
(debug.hang_timeout = 60) against off (0), same model, batch and 2 DDP ranks,
alternating rounds, median of each. Target ratio >= 0.98.

    python benchmarks/bench_watchdog.py [--rounds 4] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(timeout: float, steps: int, root: Path, i: int) -> float:
    run_dir = root / f"run_{timeout:g}_{i}"
    cmd = [sys.executable, "-m", "scaletrain", "train", "--nproc", "2", "--run-dir", str(run_dir),
           "--set", "model.name=small", "--set", "data.seq_len=256", "--set", f"training.steps={steps}",
           "--set", "training.global_batch_size=8", "--set", "training.micro_batch_size=4",
           "--set", "checkpoint.enable=false", "--set", "logging.sample_tokens=0",
           "--set", f"debug.hang_timeout={timeout}"]
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads((run_dir / "summary.json").read_text())["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    on, off = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            off.append(run(0, args.steps, Path(tmp), i))
            on.append(run(60, args.steps, Path(tmp), i))
    print(f"{'watchdog':<10}{'tokens/s (median)':>20}   rounds")
    print(f"{'off':<10}{statistics.median(off):>20,.0f}   {', '.join(f'{x:,.0f}' for x in off)}")
    print(f"{'on':<10}{statistics.median(on):>20,.0f}   {', '.join(f'{x:,.0f}' for x in on)}")
    print(f"ratio on/off: {statistics.median(on) / statistics.median(off):.3f} (target >= 0.98)")


if __name__ == "__main__":
    main()
