"""Proof against measurement: run the real trainer on this machine for small
layouts and compare, per rank, predicted and measured model-state bytes,
peak tensor memory, bytes per collective per step, and step time."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from scaletrain.config import load_config
from scaletrain.model.counts import param_count
from scaletrain.planner.communication import collectives, merge
from scaletrain.planner.estimate import estimate
from scaletrain.planner.layout import Layout, Workload, coord_of, param_table
from scaletrain.planner.memory import memory_of_rank, model_state_bytes, saved_activation_bytes
from scaletrain.planner.hardware import Cluster, Device

# (name, layout) — each runs as its own launch of `scaletrain train`.
LAYOUTS: list[tuple[str, Layout]] = [
    ("single", Layout()),
    ("ddp 2", Layout(dp_replicate=2)),
    ("zero1 2", Layout(dp_shard=2, zero_stage=1)),
    ("zero2 2", Layout(dp_shard=2, zero_stage=2)),
    ("zero3 2", Layout(dp_shard=2, zero_stage=3)),
    ("tp 2", Layout(tp=2)),
    ("tp 2 + sp", Layout(tp=2, sequence_parallel=True)),
    ("pp 2 1f1b", Layout(pp=2, pp_schedule="1f1b", pp_microbatches=2)),
    ("zero3 2 x tp 2", Layout(dp_shard=2, zero_stage=3, tp=2)),
    # Two micro-steps of 2: FSDP's full gradient held between them, or reduce-scattered after each.
    ("zero2 2 accum", Layout(dp_shard=2, zero_stage=2, micro_batch=2)),
    ("zero2 2 accum sharded", Layout(dp_shard=2, zero_stage=2, micro_batch=2, fsdp_accumulate="sharded")),
]

# Layouts that span nodes (``plan --verify --nodes 2``): ranks split evenly
# over the nodes of a network-namespace cluster with a shaped inter-node link.
# (Compression hooks are left out: measure_step's collective probe counts
# their buckets at full width, so only their wire bytes are checked, by
# hook_bytes in tests/test_cluster.py.)
NODE_LAYOUTS: list[tuple[str, Layout]] = [
    ("ddp 2x1", Layout(dp_replicate=2)),
    ("zero3 2x1", Layout(dp_shard=2, zero_stage=3)),
    ("ddp 2x2 hierarchical", Layout(dp_replicate=4, micro_batch=2, dp_allreduce="hierarchical")),
]

# The measured workload: big enough that compute dominates a step, small
# enough to run on 2 CPU cores in seconds.
VERIFY_SETTINGS = ["model.name=small", "data.source=stdlib", "data.tokenizer=byte", "data.seq_len=256",
                   "training.global_batch_size=8", "training.micro_batch_size=4", "training.dtype=fp32",
                   "logging.sample_tokens=0", "checkpoint.enable=false"]


@dataclass
class Case:
    name: str
    layout: Layout
    summary: dict


def run_case(name: str, layout: Layout, settings: list[str], steps: int, run_dir: Path, timeout: float = 600,
             nodes: int = 1, link_rate: str | None = None) -> Case:
    layout = _with_micro_batch(layout, settings)
    nproc = layout.world
    measure = min(3, steps)  # after DDP's bucket rebuild (step 2)
    extra = [f"training.micro_batch_size={layout.micro_batch}", f"training.steps={steps}",
             f"debug.measure_step={measure}"]
    sets = [a for item in settings + layout.config_overrides() + extra for a in ("--set", item)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    if nodes > 1:
        _run_on_nodes(name, nodes, nproc // nodes, ["-m", "scaletrain", "train", "--run-dir", str(run_dir), *sets],
                      env, link_rate, timeout)
    else:
        cmd = [sys.executable, "-m", "scaletrain", "train", "--nproc", str(nproc), "--run-dir", str(run_dir), *sets]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{name}: scaletrain train exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return Case(name, layout, json.loads((run_dir / "summary.json").read_text()))


def _run_on_nodes(name: str, nodes: int, per_node: int, argv: list[str], env: dict, link_rate: str | None,
                  timeout: float) -> None:
    """One torchrun agent per node of a network-namespace cluster (c10d
    rendezvous across the shaped link; 127.0.0.1 where namespaces cannot be
    made, said on stderr)."""
    from scaletrain.launch.netns import finish, make_cluster, tail

    with make_cluster(nodes, rate=link_rate, env=env) as cluster:
        if not cluster.namespaced:
            print(f"note: {name}: nodes on 127.0.0.1 ({cluster.why_not_namespaces})", file=sys.stderr)
        port = cluster.free_port()
        agents = [cluster.agent(node, per_node, port, argv, nnodes=str(nodes), run_id=f"verify{os.getpid()}")
                  for node in range(nodes)]
        outputs = finish(agents, timeout)
    if any(agent.returncode for agent in agents):
        raise RuntimeError(f"{name}: an agent exited non-zero:\n{tail(outputs)}")


def _with_micro_batch(layout: Layout, settings: list[str]) -> Layout:
    from dataclasses import replace

    if layout.micro_batch != 1:  # the layout's own micro batch (accumulation cases)
        return layout
    mb = next(int(s.split("=")[1]) for s in settings if s.startswith("training.micro_batch_size="))
    return replace(layout, micro_batch=mb)


def workload_of(summary_cfg_path: Path) -> Workload:
    cfg = load_config(str(summary_cfg_path))
    return Workload(cfg.model, cfg.data.seq_len, cfg.training.global_batch_size, cfg.training.dtype)


def compare(case: Case, run_dir: Path, device: Device, gpus_per_node: int = 0) -> list[dict]:
    """One row per rank: predicted vs measured (``gpus_per_node``: how the
    ranks sit on nodes, for the hierarchical all-reduce; 0 = one node)."""
    w = workload_of(run_dir / "config.toml")
    rows = []
    states = {r["rank"]: r for r in case.summary["state_bytes_by_rank"]}
    measured = {r["rank"]: r for r in case.summary["measured_by_rank"]}
    for rank in sorted(states):
        c = coord_of(case.layout, rank)
        predicted_states = model_state_bytes(w.model, case.layout, c)
        mem = memory_of_rank(w, case.layout, c, device, device_type="cpu")
        rows.append({
            "layout": case.name, "rank": rank,
            "states_predicted": predicted_states,
            "states_measured": {k: states[rank][k] for k in predicted_states},
            "peak_predicted": mem["peak"], "peak_measured": measured[rank]["peak_bytes"],
            "activations_predicted": saved_activation_bytes(w, case.layout, c),
            "activations_measured": measured[rank].get("saved_activation_peak_bytes"),
            "held_grads_predicted": mem["held_full_grads"],
            "collectives_predicted": merge(collectives(w, case.layout, c, gpus_per_node=gpus_per_node)),
            "collectives_measured": measured[rank]["collectives"],
            **other_estimates(w, case.layout),
        })
    return rows


def other_estimates(w: Workload, layout: Layout) -> dict:
    """Per-GPU training memory as two widely used estimators give it for the
    same model and GPU count, to set next to ours and the measurement:

    - Hugging Face Accelerate's ``accelerate estimate-memory`` (the HF Model
      Memory Calculator): training with Adam at batch size 1 needs the model,
      its gradients and two optimizer states, 4x the fp32 model size, on every
      GPU whatever the layout.
    - DeepSpeed's ZeRO estimators (``estimate_zero2_model_states_mem_needs``
      for stages 1-2, ``estimate_zero3_model_states_mem_needs`` for stage 3, no
      offload): 2 bytes of fp16 parameters + 18 bytes per parameter / GPUs for
      ZeRO-1/2; 4 x the largest layer + 18 / GPUs for ZeRO-3. They assume fp16
      mixed precision and count no activations; they have no DDP, TP or PP
      form (None).
    """
    n = param_count(w.model)
    deepspeed = None
    if layout.zero_stage in (1, 2) and layout.dp_shard > 1 and layout.tp == layout.pp == 1:
        deepspeed = 2 * n + 18 * n // layout.dp_shard
    elif layout.zero_stage == 3 and layout.tp == layout.pp == 1:
        largest = max(math.prod(shape) for _, shape in param_table(w.model))
        deepspeed = 4 * largest + 18 * n // layout.dp_shard
    return {"hf_accelerate_bytes": 4 * 4 * n, "deepspeed_bytes": deepspeed}


def step_time(case: Case, run_dir: Path, cluster: Cluster) -> dict:
    w = workload_of(run_dir / "config.toml")
    est = estimate(w, case.layout, cluster, device_type="cpu")
    # The median step after the profiled one (the profiler slows the step it records).
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = sorted(r["step_time_s"] for r in records if r["step"] > 3)
    measured = w.global_batch * w.seq_len / times[len(times) // 2]
    return {"layout": case.name, "predicted_tokens_per_s": est.tokens_per_s, "measured_tokens_per_s": measured,
            "predicted_step_s": est.step_time_s,
            "measured_step_s": w.global_batch * w.seq_len / measured,
            "ratio": est.tokens_per_s / measured}


def verify(device: Device, names: list[str] | None = None, steps: int = 10, settings: list[str] | None = None,
           keep: Path | None = None, progress=print, nodes: int = 1, link_rate: str | None = "200mbit") -> dict:
    """Measured vs predicted per rank; with ``nodes`` > 1 the NODE_LAYOUTS on a
    namespace cluster, adding the comm hooks' bytes (hook_bytes) and leaving
    out step time (the shaped link has no hardware entry to predict with)."""
    settings = settings or VERIFY_SETTINGS
    selected = [(n, l) for n, l in (NODE_LAYOUTS if nodes > 1 else LAYOUTS) if names is None or n in names]
    cluster = Cluster(((device, 2),), gpus_per_node=max(l.world for _, l in selected))
    rows, times, hooks = [], [], []
    with tempfile.TemporaryDirectory(prefix="scaletrain-verify-") as tmp:
        root = keep or Path(tmp)
        for name, layout in selected:
            run_dir = root / name.replace(" ", "_").replace("+", "").replace(":", "")
            per_node = layout.world // nodes
            where = f"{nodes} nodes x {per_node}, link {link_rate}" if nodes > 1 else str(layout.world)
            progress(f"running {name} ({where} process{'es' if layout.world > 1 else ''})")
            case = run_case(name, layout, settings, steps, run_dir, nodes=nodes, link_rate=link_rate)
            rows += compare(case, run_dir, device, gpus_per_node=per_node if nodes > 1 else 0)
            if nodes > 1 and (layout.dp_allreduce != "flat" or layout.grad_compression != "none"):
                hooks.append({"layout": name, **hook_bytes(run_dir, per_node)})
            elif nodes == 1 and layout.world == 2:  # the calibrated entry: 2 workers sharing this machine's cores
                times.append(step_time(case, run_dir, cluster))
    return {"ranks": rows, "hooks": hooks, "step_time": times}


def hook_bytes(run_dir: Path, gpus_per_node: int) -> dict:
    """Predicted vs measured bytes of DDP's gradient comm hook in the last
    step of a (multi-node) run, from its metrics.jsonl (comm_hooks.CommStats):
    hierarchical: the bytes that cross nodes per rank (the 1/local shard);
    compression: the bytes a rank hands to its collectives (bf16 copy,
    PowerSGD's P, Q and uncompressed tensors, top-k's values + indices)."""
    from scaletrain.planner.communication import ddp_hook_collectives
    from scaletrain.planner.layout import Coord, layout_from_config, local_params

    cfg = load_config(str(run_dir / "config.toml"))
    w = workload_of(run_dir / "config.toml")
    summary = json.loads((run_dir / "summary.json").read_text())
    world = summary["world_size"]
    layout = layout_from_config(cfg, world, 1)
    colls = ddp_hook_collectives(layout, local_params(w.model, layout, Coord()), gpus_per_node, "cpu")
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    if layout.dp_allreduce == "hierarchical":
        predicted = sum(c.bytes for c in colls if c.group == "dp_nodes")
        return {"what": "inter-node bytes", "predicted": predicted, "measured": last.get("inter_node_bytes", 0)}
    sent = sum(c.bytes for c in colls) / (world if colls[0].kind == "all_gather" else 1)  # a gather's own share
    return {"what": "gradient bytes sent", "predicted": sent, "measured": last.get("grad_comm_bytes", 0)}
