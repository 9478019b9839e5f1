"""Hierarchical all-reduce and gradient compression against DDP's flat fp32
all-reduce, on a 2-node cluster of network namespaces with a shaped
inter-node link (scripts/netns-cluster.sh; needs root): step time, final loss
and compression ratio of each, as ratios against the flat baseline run in the
same launch.

    sudo python benchmarks/bench_comm_opt.py [--rate 200mbit] [--steps 20] [--model tiny] [--nproc-per-node 2]

One torchrun agent per node (c10d rendezvous), --nproc-per-node workers each
(1 thread), every case trained in turn in that one launch by the real
Trainer, the flat baseline first and again last (its two step times show the
drift of the shared machine). Step time is the median over steps 4..N; loss
is the mean of the last 5 steps. Where namespaces cannot be made the agents
run on 127.0.0.1, unshaped, and the header says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CASES = {
    "flat": [],
    "hierarchical": ["parallel.dp_allreduce=hierarchical"],
    "bf16": ["parallel.grad_compression=bf16"],
    "powersgd:4": ["parallel.grad_compression=powersgd:4"],
    "topk:0.1": ["parallel.grad_compression=topk:0.1"],
    "topk:0.01": ["parallel.grad_compression=topk:0.01"],
    "flat (again)": [],
}


def overrides(model: str, steps: int, per_rank: int, ranks: int) -> list[str]:
    return [f"model.name={model}", "data.seq_len=128", f"training.steps={steps}",
            f"training.global_batch_size={per_rank * ranks}", f"training.micro_batch_size={per_rank}",
            "checkpoint.enable=false", "logging.sample_tokens=0", "debug.hang_timeout=0"]


def worker(spec_path: str) -> None:
    """Under torchrun: train every case of the spec in turn on one process group."""
    sys.path.insert(0, str(REPO / "src"))
    from scaletrain.config import load_config
    from scaletrain.parallel.runtime import init_runtime, shutdown
    from scaletrain.train.trainer import Trainer

    spec = json.loads(Path(spec_path).read_text())
    runtime = init_runtime()
    for case in spec:
        run_dir = Path(case["run_dir"])
        if runtime.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        runtime.barrier()
        Trainer(load_config(None, case["overrides"]), run_dir, runtime, show_progress=False).fit(show_progress=False)
        runtime.barrier()
    shutdown(runtime)
    sys.stdout.flush()
    os._exit(0)  # gloo may abort at interpreter exit (scaletrain.train.launch.run_worker)


def summarize(run_dir: Path) -> dict:
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"step_s": statistics.median(m["step_time_s"] for m in metrics[3:]),
            "loss": statistics.fmean(m["loss"] for m in metrics[-5:]),
            "ratio": metrics[-1].get("compression_ratio"), "inter_bytes": metrics[-1].get("inter_node_bytes"),
            "sent_bytes": metrics[-1].get("grad_comm_bytes")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", default="200mbit", help="tc rate of each node's egress")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--nproc-per-node", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    sys.path.insert(0, str(REPO / "src"))
    from scaletrain.launch.netns import finish, make_cluster, tail

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    with tempfile.TemporaryDirectory() as tmp, make_cluster(2, rate=args.rate, env=env) as cluster:
        ranks = 2 * args.nproc_per_node
        base = overrides(args.model, args.steps, 2, ranks)
        spec = [{"run_dir": str(Path(tmp) / str(i)), "overrides": base + extra} for i, extra in enumerate(CASES.values())]
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        port = cluster.free_port()
        agents = [cluster.agent(node, args.nproc_per_node, port, [__file__, "--worker", str(Path(tmp) / "spec.json")])
                  for node in range(2)]
        outputs = finish(agents, timeout=1800)
        if any(a.returncode for a in agents):
            sys.exit(f"benchmark failed:\n{tail(outputs)}")
        rows = {name: summarize(Path(tmp) / str(i)) for i, name in enumerate(CASES)}
    where = (f"2 network-namespace nodes, inter-node egress shaped to {args.rate} (tbf), loopback inside a node"
             if cluster.namespaced else f"2 agents on 127.0.0.1, unshaped ({cluster.why_not_namespaces})")
    print(f"model {args.model}, {ranks} ranks = 2 nodes x {args.nproc_per_node}, global batch {2 * ranks} x 128 "
          f"tokens, {args.steps} steps; {where}")
    flat = rows["flat"]
    print(f"{'case':<14}{'step s':>9}{'vs flat':>9}{'loss':>9}{'loss vs flat':>14}{'grad bytes/rank':>17}"
          f"{'compression':>13}")
    for name, r in rows.items():
        ratio = f"{r['ratio']:.1f}x" if r["ratio"] else "-"
        sent = f"{r['sent_bytes']:,}" if r["sent_bytes"] else "-"  # DDP's own all-reduce is not counted
        print(f"{name:<14}{r['step_s']:>9.3f}{flat['step_s'] / r['step_s']:>8.2f}x{r['loss']:>9.4f}"
              f"{r['loss'] / flat['loss']:>13.3f}x{sent:>17}{ratio:>13}")
    print("vs flat = flat step time / this step time (above 1 = faster); hierarchical: bytes into the "
          f"cross-node all-reduce per rank {rows['hierarchical']['inter_bytes'] or 0:,}")


if __name__ == "__main__":
    main()
