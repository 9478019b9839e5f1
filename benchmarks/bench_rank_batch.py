"""Per-rank batch sizes on a mixed "cluster": 2 local ranks, rank 1 made
FACTOR x slower with debug.slowdown (it really sleeps), the global batch split
evenly, by ``parallel.rank_batch = auto`` (throughput probe at start-up) and
by the ideal fixed split; step time as ratios against the even split, all in
one torchrun launch (the even split first and again last, for drift).

    python benchmarks/bench_rank_batch.py [--factor 3] [--steps 12] [--model tiny]

Step time is the median over steps 3..N; every case trains the same global
batches, so the losses agree (printed as a check).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--factor", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()
    ideal = round(GLOBAL_BATCH * args.factor / (args.factor + 1))
    cases = {"even": [], "auto": ["parallel.rank_batch=auto"],
             f"fixed {ideal},{GLOBAL_BATCH - ideal}": [f"parallel.rank_batch={ideal},{GLOBAL_BATCH - ideal}"],
             "even (again)": []}
    # One micro-step per rank and step, so any split is allowed (at least one row per micro-step).
    base = [f"model.name={args.model}", "data.seq_len=128", f"training.steps={args.steps}",
            f"training.global_batch_size={GLOBAL_BATCH}", f"training.micro_batch_size={GLOBAL_BATCH // 2}",
            f"debug.slowdown=1:{args.factor}", "checkpoint.enable=false", "logging.sample_tokens=0",
            "debug.hang_timeout=0"]
    with tempfile.TemporaryDirectory() as tmp:
        spec = [{"run_dir": str(Path(tmp) / str(i)), "overrides": base + extra} for i, extra in enumerate(cases.values())]
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
        # bench_comm_opt's worker trains every case of a spec on one process group.
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               str(REPO / "benchmarks" / "bench_comm_opt.py"), "--worker", str(Path(tmp) / "spec.json")],
                              env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode:
            sys.exit(f"benchmark failed:\n{proc.stderr[-5000:]}")
        rows = {}
        for i, name in enumerate(cases):
            metrics = [json.loads(line) for line in (Path(tmp) / str(i) / "metrics.jsonl").read_text().splitlines()]
            events = Path(tmp) / str(i) / "events.jsonl"
            split = [json.loads(line)["rank_rows"] for line in events.read_text().splitlines()
                     if '"rank_batch"' in line] if events.exists() else []
            rows[name] = (statistics.median(m["step_time_s"] for m in metrics[2:]), metrics[-1]["loss"], split)
    print(f"model {args.model}, 2 ranks (rank 1 slowed {args.factor:g}x by debug.slowdown), global batch "
          f"{GLOBAL_BATCH} x 128 tokens, {args.steps} steps")
    print(f"{'split':<16}{'rows per rank':>15}{'step s':>9}{'vs even':>9}{'final loss':>12}")
    even = rows["even"][0]
    for name, (step_s, loss, split) in rows.items():
        shares = ",".join(map(str, split[0])) if split else (name.split()[1] if name.startswith("fixed") else "8,8")
        print(f"{name:<16}{shares:>15}{step_s:>9.3f}{even / step_s:>8.2f}x{loss:>12.4f}")
    print("vs even = even-split step time / this step time (above 1 = faster)")


if __name__ == "__main__":
    main()
