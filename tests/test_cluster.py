"""Multi-node behaviour on a cluster of network namespaces (tests/cluster.py):
real ``torchrun --rdzv-backend c10d`` agents, one per node, the inter-node
link shaped with tc. Where namespaces cannot be made the same agents run on
127.0.0.1 (and the test that needs a shaped link skips, saying why).

Launches are shared: one 2 x 2 launch trains every parity and compression
case; the failure tests use 2 x 1."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from cluster import finish, make_cluster, tail
from harness import REPO, assert_parity, read_run, train_run

from scaletrain.planner.verify import hook_bytes

pytestmark = pytest.mark.timeout(420)

BASE = ["training.global_batch_size=8", "training.micro_batch_size=2", "logging.sample_tokens=0",
        "logging.breakdown=false"]
PARITY = BASE + ["training.steps=6"]
CONVERGE = BASE + ["training.steps=40", "checkpoint.enable=false"]
# Compression -> how far the mean loss of the last 5 of 40 steps may be from
# uncompressed training's, as a fraction of it (measured on the development
# machine: bf16 0.01%, powersgd:4 0.45%, topk:0.1 3.8%; top-k sends a tenth of
# the gradient per step and catches up through its residual).
CONVERGENCE_MARGIN = {"bf16": 0.005, "powersgd:4": 0.02, "topk:0.1": 0.06}
FAILURE = BASE + ["training.steps=30", "checkpoint.interval=5", "training.micro_batch_size=4"]


@pytest.fixture(scope="module")
def cluster():
    with make_cluster(2, rate="200mbit") as c:
        yield c


def _cases_file(workdir: Path, config: Path, cases: dict[str, list[str]]) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    spec = [{"config": str(config), "overrides": o, "run_dir": str(workdir / name)} for name, o in cases.items()]
    (workdir / "cases.json").write_text(json.dumps(spec))
    return workdir / "cases.json"


def test_layouts_and_compression_across_two_nodes(cluster, tmp_path, debug_config):
    """2 nodes x 2 ranks: DDP, HSDP (sharded in a node, replicated across),
    the hierarchical all-reduce and a run whose ranks negotiated bf16 down to
    fp32 match one process; each gradient compression
    converges within its CONVERGENCE_MARGIN of uncompressed training and logs its ratio."""
    cases = {"ddp": PARITY, "hsdp": PARITY + ["parallel.zero_stage=3", "parallel.dp_replicate=2",
                                             "parallel.dp_shard=2"],
             "hierarchical": PARITY + ["parallel.dp_allreduce=hierarchical"], "none": CONVERGE,
             # bf16 asked for, rank 2's device claims fp32 only: all train in fp32
             "negotiated": PARITY + ["training.dtype=bf16", "debug.supported_dtypes=2:fp32"]}
    cases.update({c: CONVERGE + [f"parallel.grad_compression={c}"] for c in CONVERGENCE_MARGIN})
    spec = _cases_file(tmp_path / "cases", debug_config, cases)
    port = cluster.free_port()
    agents = [cluster.agent(node, 2, port, [str(REPO / "tests" / "parity_worker.py"), str(spec)])
              for node in range(2)]
    outputs = finish(agents, timeout=300)
    assert [a.returncode for a in agents] == [0, 0], tail(outputs)
    runs = {name: read_run(tmp_path / "cases" / name) for name in cases}
    single = train_run(tmp_path / "single", debug_config, PARITY)
    for name in ("ddp", "hsdp", "hierarchical", "negotiated"):
        assert runs[name].summary["world_size"] == 4
        assert_parity(single, runs[name])
    assert runs["hsdp"].summary["layout"]["dp_shard"] == 2
    events = [json.loads(line) for line in (tmp_path / "cases" / "negotiated" / "events.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["requested"], e["chosen"]) for e in events] == [("precision", "bf16", "fp32")]
    assert "rank(s) [2] lack bf16" in events[0]["detail"]
    # Only the 1/2 shard of every bucket crosses nodes.
    grad = runs["hierarchical"].metrics[-1]
    assert 0 < grad["inter_node_bytes"] < grad["grad_comm_bytes"] / 2
    reference = sum(runs["none"].losses[-5:]) / 5
    for name, margin in CONVERGENCE_MARGIN.items():
        ratio = runs[name].metrics[-1]["compression_ratio"]
        assert ratio == 2.0 if name == "bf16" else ratio > 2, (name, ratio)
        final = sum(runs[name].losses[-5:]) / 5
        assert abs(final - reference) <= margin * reference, (name, final, reference)
    assert 4.9 < runs["topk:0.1"].metrics[-1]["compression_ratio"] < 5.1  # fp32 numel / (k x (value + int32 index))
    # The planner's costing of the same hooks (plan --verify's hook_bytes): inter-node bytes of the hierarchical
    # all-reduce, bytes sent under each compression; within 1% (bucket padding, top-k's k rounded per bucket).
    for name in ("hierarchical", *CONVERGENCE_MARGIN):
        check = hook_bytes(tmp_path / "cases" / name, gpus_per_node=2)
        assert check["predicted"] > 0 and check["measured"] == pytest.approx(check["predicted"], rel=0.01), (name, check)


def _wait_for_steps(run_dir: Path, n: int, deadline_s: float = 150) -> None:
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + deadline_s
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
        time.sleep(0.05)
    assert metrics.exists() and len(metrics.read_text().splitlines()) >= n, f"fewer than {n} steps in time"


def _train_argv(config: Path, run_dir: Path, overrides: list[str]) -> list[str]:
    return ["-m", "scaletrain", "train", "--config", str(config), "--run-dir", str(run_dir),
            *[a for o in overrides for a in ("--set", o)]]


def _kill_node(agent) -> None:
    """The whole node goes: its agent and its workers, without a chance to clean up."""
    os.killpg(agent.pid, signal.SIGKILL)
    agent.wait()


def test_killed_node_rejoins_and_the_job_resumes_bitwise(cluster, tmp_path, debug_config):
    """--nnodes 2 --max-restarts 1: node 1's agent dies mid-run and a fresh
    agent takes its place (as a scheduler would restart it); the survivor's
    agent restarts its worker, both resume from the newest checkpoint and end
    bitwise where an uninterrupted 2-rank run ends, every step logged once."""
    whole = train_run(tmp_path / "whole", debug_config, FAILURE, nproc=2)
    run, port = tmp_path / "run", cluster.free_port()
    argv = _train_argv(debug_config, run, FAILURE)
    fresh_store = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # README "Multi-node": a replacement agent
    agents = [cluster.agent(node, 1, port, argv, max_restarts=1, **fresh_store) for node in range(2)]
    try:
        _wait_for_steps(run, 12)
        _kill_node(agents[1])
        agents[1] = cluster.agent(1, 1, port, argv, max_restarts=1, **fresh_store)
    finally:
        outputs = finish(agents, timeout=240)
    assert [a.returncode for a in agents] == [0, 0], tail(outputs)
    result = read_run(run)
    assert result.summary["resumed_from"] is not None and result.summary["world_size"] == 2
    assert [m["step"] for m in result.metrics] == list(range(1, 31))
    assert result.losses == whole.losses
    for name, value in whole.params.items():
        assert torch.equal(result.params[name], value), name


def test_elastic_job_continues_on_the_surviving_node(cluster, tmp_path, debug_config):
    """--nnodes 1:2: node 1 dies for good; node 0's agent restarts alone, the
    job resumes from the last checkpoint resharded to one rank, every step is
    logged once and the run matches single-process training."""
    single = train_run(tmp_path / "single", debug_config, FAILURE)
    run, port = tmp_path / "run", cluster.free_port()
    argv = _train_argv(debug_config, run, FAILURE)
    agents = [cluster.agent(node, 1, port, argv, nnodes="1:2", max_restarts=1) for node in range(2)]
    try:
        _wait_for_steps(run, 12)
        _kill_node(agents[1])
    finally:
        outputs = finish(agents[:1], timeout=240)
    assert agents[0].returncode == 0, tail(outputs)
    result = read_run(run)
    assert result.summary["world_size"] == 1 and result.summary["resumed_from"] is not None
    assert [m["step"] for m in result.metrics] == list(range(1, 31))
    assert_parity(single, result, rtol=1e-4, atol=1e-5, param_atol=1e-4)


def test_doctor_reports_intra_vs_inter_node_bandwidth(cluster, tmp_path):
    """scaletrain doctor on 2 nodes x 2 ranks measures each node's loopback
    and the shaped link between them, and names that link as the slowest."""
    if not cluster.namespaced:
        pytest.skip(f"needs a shaped inter-node link: {cluster.why_not_namespaces}")
    port = cluster.free_port()
    agents = [cluster.agent(node, 2, port, ["-m", "scaletrain", "doctor", "--check", "links", "--json",
                                            "--dir", str(tmp_path)]) for node in range(2)]
    outputs = finish(agents, timeout=120)
    assert [a.returncode for a in agents] == [0, 0], tail(outputs)
    report = json.loads(outputs[0][outputs[0].index("{"):outputs[0].rindex("}") + 1])
    links = report["checks"][0]
    inter = [r for r in links["links"] if r["kind"] == "inter"]
    intra = [r for r in links["links"] if r["kind"] == "intra"]
    assert len(inter) == 1 and len(intra) == 2
    # 200 Mbit/s = 25 MB/s, shaped on each node's egress; the loopback is not shaped.
    assert inter[0]["bytes_per_s"] < 30e6 < min(r["bytes_per_s"] for r in intra)
    assert "slowest link: node 0 (rank 0) <-> node 1 (rank 2)" in links["detail"]
    assert "inter-node is" in links["detail"]


def test_link_summary_names_the_slow_link():
    """Three nodes, one of them behind a slow cable: it is named and the check warns."""
    from scaletrain.debug.links import link_pairs, summarize_links

    assert link_pairs([0, 0, 1, 1, 2, 2]) == [("intra", 0, 1), ("intra", 2, 3), ("intra", 4, 5),
                                              ("inter", 0, 2), ("inter", 0, 4), ("inter", 2, 4)]
    rows = [{"kind": "intra", "ranks": [2 * n, 2 * n + 1], "nodes": [n, n], "bytes_per_s": 5e9} for n in range(3)]
    rows += [{"kind": "inter", "ranks": [0, 2], "nodes": [0, 1], "bytes_per_s": 1e9},
             {"kind": "inter", "ranks": [0, 4], "nodes": [0, 2], "bytes_per_s": 1e8},
             {"kind": "inter", "ranks": [2, 4], "nodes": [1, 2], "bytes_per_s": 9e8}]
    status, detail, fix = summarize_links(rows)
    assert status == "WARN" and "slow link(s): node 0 (rank 0) <-> node 2 (rank 4) at 100 MB/s" in detail
    assert "inter-node is 5.6x slower than intra-node" in detail and fix
    assert summarize_links(rows[:3] + rows[3:4])[0] == "PASS"

