"""Distributed debugging: the hang/desync report names the right rank for the
classic failures, stragglers are reported, bench comm and doctor work and
reject bad input."""

from __future__ import annotations

import json

import pytest
from harness import run_cli

HANG_TIMEOUT = 3.0


HANG_CASES = [
    ("extra_collective:0:2", 0),   # a collective only under `if rank == 0`
    ("fewer_batches:1:3", 1),      # a rank with one batch fewer
    ("swallow_exception:1:2", 1),  # an exception caught and `continue`d on one rank
    ("sleep:1:2", 1),              # a rank stalled in a long sleep
    ("kill:2:2", 2),               # a rank killed
]


@pytest.fixture(scope="module")
def hang_runs(tmp_path_factory, debug_config):
    """Every case's 3-rank run, two at a time (each mostly waits out its timeout)."""
    from concurrent.futures import ThreadPoolExecutor

    def run(fault: str):
        run_dir = tmp_path_factory.mktemp("hang") / "run"
        proc = run_cli(["train", "--config", str(debug_config), "--nproc", "3", "--run-dir", str(run_dir),
                        "--set", "training.steps=5", "--set", "training.global_batch_size=6",
                        "--set", "training.micro_batch_size=2", "--set", f"debug.hang_timeout={HANG_TIMEOUT}",
                        "--set", f"debug.inject_fault={fault}", "--set", "checkpoint.enable=false",
                        "--set", "logging.sample_tokens=0"], timeout=150)
        return run_dir, proc

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip([f for f, _ in HANG_CASES], pool.map(run, [f for f, _ in HANG_CASES])))


@pytest.mark.parametrize("fault, suspect", HANG_CASES)
def test_hang_report_names_the_rank(hang_runs, fault, suspect):
    run_dir, proc = hang_runs[fault]
    assert proc.returncode == 3, proc.stderr[-3000:]
    report = json.loads((run_dir / "hang_report.json").read_text())
    assert report["suspect_ranks"] == [suspect], report["likely_cause"]
    assert f"suspect rank(s): [{suspect}]" in proc.stderr
    assert report["likely_cause"]
    # Reported within 2x the timeout of the suspect's last progress (a dead
    # rank's last progress predates its death by at most one step).
    entry = report["ranks"][suspect]
    if entry.get("no_progress_s") is not None:
        assert entry["no_progress_s"] <= 2 * HANG_TIMEOUT + 1, entry
    live = [e for e in report["ranks"] if e["rank"] != suspect or "stack" in e]
    assert all(e.get("stack") for e in live if fault.split(":")[0] != "kill" or e["rank"] != suspect)


def test_straggler_is_reported(tmp_path, debug_config):
    run_dir = tmp_path / "run"
    proc = run_cli(["train", "--config", str(debug_config), "--nproc", "2", "--run-dir", str(run_dir),
                    "--set", "training.steps=4", "--set", "debug.inject_fault=slow:1:1",
                    "--set", "debug.straggler_factor=1.5", "--set", "checkpoint.enable=false",
                    "--set", "logging.sample_tokens=0"], timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    flagged = [m for m in metrics if m.get("stragglers")]
    assert flagged and all([s["rank"] for s in m["stragglers"]] == [1] for m in flagged)
    assert "straggler(s) at step" in proc.stderr


def test_bench_comm_json(tmp_path):
    out = tmp_path / "comm.json"
    proc = run_cli(["bench", "comm", "--nproc", "2", "--min-bytes", "1K", "--max-bytes", "64K", "--iters", "2",
                    "--json", "--out", str(out)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    ops = {r["op"] for r in data["results"]}
    assert ops == {"all_reduce", "all_gather", "reduce_scatter", "broadcast", "send_recv"}
    assert all(r["correct"] and r["time_us"] > 0 for r in data["results"])
    ar = next(r for r in data["results"] if r["op"] == "all_reduce")
    assert ar["busbw_gbps"] == pytest.approx(ar["algbw_gbps"] * 2 * (2 - 1) / 2)


def test_doctor_single_process_json():
    proc = run_cli(["doctor", "--json"], timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    checks = json.loads(proc.stdout)["checks"]
    names = {c["name"] for c in checks}
    assert {"versions", "devices", "shm", "disk", "env", "all_reduce"} <= names
    assert all(c["status"] in ("PASS", "WARN", "FAIL") and c["detail"] for c in checks)


def test_doctor_distributed_and_env_lint():
    proc = run_cli(["doctor", "--nproc", "2", "--json"], timeout=120,
                   env_extra={"NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_DEBUG": "TRACE"})
    assert proc.returncode in (0, 1), proc.stderr
    data = json.loads(proc.stdout)
    by_name = {c["name"]: c for c in data["checks"]}
    assert by_name["all_reduce"]["status"] == "PASS" and data["world_size"] == 2
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" in by_name["env"]["detail"]
    assert "NCCL_DEBUG" in by_name["env"]["detail"]


@pytest.mark.parametrize("args, message", [
    (["doctor", "--check", "nope"], "unknown check"),
    (["doctor", "--nproc", "100000"], "--nproc = 100000"),
    (["bench", "comm", "--ops", "allreduce"], "unknown allreduce"),
    (["bench", "comm", "--nproc", "100000"], "--nproc = 100000"),
    (["doctor", "--master", "127.0.0.1:9", "--check", "rendezvous"], "cannot reach"),
    (["train", "--set", "debug.inject_fault=boom:1:2"], "debug.inject_fault"),
])
def test_debug_bad_input(args, message):
    proc = run_cli(args, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
