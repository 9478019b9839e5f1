"""Observe and self-heal in the trainer: the per-rank time breakdown, a
NaN step skipped on every rank (parameters equal to a run that never
trained on that batch), rollback and stop after repeated bad steps, the
failure history, and a hang that ends the whole job promptly even with a
frozen rank."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from harness import cli_env, read_run, run_cli
from rich.console import Console

from scaletrain.config import load_config
from scaletrain.observe.breakdown import ROW, find_stragglers, from_vector, mean_phases, to_vector
from scaletrain.observe.events import read_events
from scaletrain.observe.recorder import truncate_jsonl
from scaletrain.observe.runs import show_run
from scaletrain.train.health import APPLY, ROLLBACK, SKIP, STOP, StepGuard

SMALL = ["data.seq_len=32", "training.global_batch_size=4", "training.micro_batch_size=2",
         "logging.sample_tokens=0"]


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


# ---------------------------------------------------------------- pure parts

def test_step_guard_verdicts():
    guard = StepGuard("skip", max_bad_steps=2, spike_zscore=0, spike_window=10)
    assert guard.verdict(2.0, 1.0) == (APPLY, None)
    assert guard.verdict(float("nan"), 1.0) == (SKIP, "loss is nan")
    assert guard.verdict(2.0, float("inf")) == (STOP, "gradient norm is inf")  # the 2nd in a row
    rollback = StepGuard("rollback", 2, 0, 10)
    assert [rollback.verdict(float("nan"), 1.0)[0] for _ in range(3)] == [SKIP, ROLLBACK, SKIP]
    assert StepGuard("stop", 5, 0, 10).verdict(float("inf"), 1.0)[0] == STOP
    fp16 = StepGuard("skip", 2, 0, 10, check_grad_norm=False)  # the loss scaler owns inf gradients
    assert fp16.verdict(2.0, float("inf"))[0] == APPLY


def test_loss_spike_detection():
    guard = StepGuard("skip", 3, spike_zscore=4.0, spike_window=20)
    for i in range(20):
        assert guard.verdict(2.0 + 0.01 * (i % 3), 1.0)[0] == APPLY
    action, why = guard.verdict(5.0, 1.0)
    assert action == SKIP and "spike" in why
    assert guard.verdict(2.02, 1.0)[0] == APPLY


def test_breakdown_rows_and_stragglers(tmp_path):
    steps = [{k: 1.0 for k in ("step_time_s", "data_s", "forward_s", "backward_s", "optimizer_s",
                               "comm_wait_s", "other_s")}, {k: 3.0 for k in ("step_time_s", "data_s", "forward_s",
                                                                             "backward_s", "optimizer_s",
                                                                             "comm_wait_s", "other_s")}]
    assert mean_phases(steps)["forward_s"] == 2.0
    row = {k: 0.5 for k in ROW} | {"mem_allocated_bytes": None}
    back = from_vector(to_vector(row), step=4, rank=1)
    assert back["step"] == 4 and back["rank"] == 1 and back["mem_allocated_bytes"] is None and back["data_s"] == 0.5
    rows = [{"rank": r, "first_forward_s": t} for r, t in enumerate([1.0, 1.1, 3.0])]
    assert [s["rank"] for s in find_stragglers(rows, 1.5)] == [2]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)))
    truncate_jsonl(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


# ------------------------------------------------------- skipping and rollback

def reference_params(config: Path, run_dir: Path, steps: int, plan: list[str]) -> dict[str, torch.Tensor]:
    """Single-process training that follows ``plan``: 'train' a step, or
    'drop' the next batch without training on it."""
    from scaletrain.parallel.runtime import Runtime
    from scaletrain.train.trainer import Trainer

    run_dir.mkdir()
    cfg = load_config(config, [*SMALL, f"training.steps={steps}", "checkpoint.enable=false", "debug.hang_timeout=0"])
    trainer = Trainer(cfg, run_dir, Runtime(0, 1, 0, torch.device("cpu")), show_progress=False)
    for action in plan:
        if action == "train":
            trainer.train_step()
        else:
            trainer.sampler.next_step()
    return {k: v.detach().clone() for k, v in trainer.model.full_state_dict().items()}


def assert_same_params(params: dict, expected: dict) -> None:
    assert params.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(params[name], value, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_nan_step_is_skipped_on_every_rank(tmp_path, debug_config):
    run_dir = tmp_path / "run"
    proc = run_cli(["train", "--config", str(debug_config), "--nproc", "2", "--run-dir", str(run_dir),
                    *sets(*SMALL, "training.steps=6", "debug.inject_fault=nan:1:3")], timeout=120)
    assert proc.returncode == 0, proc.stderr
    run = read_run(run_dir)
    assert [bool(m.get("skipped")) for m in run.metrics] == [False, False, True, False, False, False]
    assert math.isnan(run.losses[2]) and all(math.isfinite(x) for i, x in enumerate(run.losses) if i != 2)
    assert run.summary["skipped_steps"] == [3] and run.summary["nonfinite_steps"] == [3]
    assert [(e["kind"], e["step"]) for e in read_events(run_dir)] == [("skipped_step", 3)]
    expected = reference_params(debug_config, tmp_path / "ref", 6, ["train", "train", "drop", "train", "train", "train"])
    assert_same_params(run.params, expected)
    # Every rank's breakdown, every logged step; the phases add up to the step.
    rows = [json.loads(line) for line in (run_dir / "ranks.jsonl").read_text().splitlines()]
    assert [(r["step"], r["rank"]) for r in rows] == [(s, r) for s in range(1, 7) for r in (0, 1)]
    for r in rows:
        parts = sum(r[k] for k in ("data_s", "forward_s", "backward_s", "optimizer_s", "comm_wait_s", "other_s"))
        assert r["forward_s"] > 0 and r["backward_s"] > 0 and r["rss_bytes"] > 0
        assert parts == pytest.approx(r["step_time_s"], rel=1e-6)
    console = Console(record=True, width=200)
    show_run(run_dir, console)
    text = console.export_text()
    assert "skipped_step" in text and "mean time per step (ms) by rank" in text and "skipped_steps: [3]" in text


def test_rollback_after_repeated_bad_steps(tmp_path, debug_config):
    run_dir = tmp_path / "run"
    proc = run_cli(["train", "--config", str(debug_config), "--run-dir", str(run_dir),
                    *sets(*SMALL, "training.steps=5", "checkpoint.interval=2", "training.on_nonfinite=rollback",
                          "training.max_bad_steps=1", "debug.inject_fault=nan:0:3")], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "rolled back from step 3 to step_00000002" in proc.stderr
    run = read_run(run_dir)
    assert [m["step"] for m in run.metrics] == [1, 2, 3, 4, 5]  # the bad step's record was replaced
    assert all(math.isfinite(x) for x in run.losses)
    assert [e["kind"] for e in read_events(run_dir)] == ["skipped_step", "rollback"]
    # Batch 3 dropped: steps 3-5 trained on batches 4-6.
    expected = reference_params(debug_config, tmp_path / "ref", 5, ["train", "train", "drop", "train", "train", "train"])
    assert_same_params(run.params, expected)


def test_stop_policy_ends_with_one_line(tmp_path, debug_config):
    proc = run_cli(["train", "--config", str(debug_config), "--run-dir", str(tmp_path / "run"),
                    *sets(*SMALL, "training.steps=5", "training.on_nonfinite=stop", "debug.inject_fault=nan:0:2")],
                   timeout=120)
    assert proc.returncode == 1
    assert "error: rank 0 failed at step 2 (optimizer): RuntimeError: step 2: loss is nan; stopping " \
           "(training.on_nonfinite = stop" in proc.stderr


def test_hang_with_a_frozen_rank_ends_the_job_promptly(tmp_path, debug_config):
    run_dir = tmp_path / "run"
    timeout = 3.0
    proc = subprocess.Popen([sys.executable, "-m", "scaletrain", "train", "--config", str(debug_config), "--nproc",
                             "2", "--run-dir", str(run_dir),
                             *sets(*SMALL, "training.steps=100000", f"debug.hang_timeout={timeout}",
                                   "checkpoint.enable=false")],
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while not (run_dir / "metrics.jsonl").exists() or len((run_dir / "metrics.jsonl").read_text()) < 500:
            assert time.time() < deadline and proc.poll() is None, "no training progress"
            time.sleep(0.2)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "scaletrain" in " ".join(p.cmdline())]
        frozen = max(workers, key=lambda p: p.pid)
        frozen.send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        code = proc.wait(timeout=timeout + 30)
        took = time.time() - stopped_at
    finally:
        proc.kill()
    assert code == 3, proc.stderr.read()[-3000:]
    assert took <= timeout + 10, f"the job took {took:.1f}s to end after the hang (hang_timeout {timeout}s)"
    report = json.loads((run_dir / "hang_report.json").read_text())
    assert len(report["suspect_ranks"]) == 1 and "frozen" in report["likely_cause"], report["likely_cause"]
    assert [e["kind"] for e in read_events(run_dir)] == ["hang"]
    alerts = [json.loads(line) for line in (run_dir / "alerts.jsonl").read_text().splitlines()]
    hangs = [(a["severity"], a["value"]) for a in alerts if a["name"] == "hang"]  # a straggler may fire too
    assert hangs == [("critical", report["suspect_ranks"])]
    assert not psutil.pid_exists(frozen.pid) or frozen.status() == psutil.STATUS_ZOMBIE


def test_built_in_alerts_fire_through_fault_injection_and_reach_the_webhook(tmp_path, debug_config):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    run_dir = tmp_path / "run"
    try:
        proc = run_cli(["train", "--config", str(debug_config), "--nproc", "2", "--run-dir", str(run_dir),
                        *sets(*SMALL, "training.steps=26", "debug.inject_fault=nan:1:3,slow:1:14",
                              f"checkpoint.dir={blocker}/ckpt", "checkpoint.on_error=continue",
                              "checkpoint.interval=5", f"logging.alert_webhook=http://127.0.0.1:{server.server_port}/")],
                       timeout=180)
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr
    fired = {(a["name"], a["state"]) for a in (json.loads(line) for line in
                                              (run_dir / "alerts.jsonl").read_text().splitlines())}
    for name in ("nonfinite", "straggler", "checkpoint_failed", "step_time_regression"):
        assert (name, "firing") in fired, (name, fired)
    assert ("nonfinite", "resolved") in fired  # the next step was healthy again
    hooked = {(e["name"], e["state"]) for e in received}
    assert hooked == fired and all("text" in e for e in received)  # Slack-compatible bodies
    assert "alert FIRING [critical] nonfinite" in proc.stderr


def test_oom_overrides_order():
    from scaletrain.train.health import apply_recoveries, oom_overrides

    cfg = load_config(None, ["training.micro_batch_size=4", "training.global_batch_size=8"])
    assert oom_overrides(cfg) == ["training.micro_batch_size=2"]
    first = load_config(None, ["training.micro_batch_size=4", "training.on_oom=checkpointing"])
    assert oom_overrides(first) == ["training.activation_checkpointing=full"]
    odd = load_config(None, ["training.micro_batch_size=1", "training.global_batch_size=8"])
    assert oom_overrides(odd) == ["training.activation_checkpointing=full"]
    assert oom_overrides(load_config(None, ["training.on_oom=stop"])) is None
    events = [{"kind": "oom_recovery", "overrides": ["training.micro_batch_size=2"]}] * 2  # two ranks, one cure
    assert apply_recoveries(cfg, events).training.micro_batch_size == 2


def test_out_of_memory_restarts_with_half_the_micro_batch(tmp_path, debug_config):
    common = [*SMALL, "training.steps=6", "checkpoint.interval=2"]
    plain = run_cli(["train", "--config", str(debug_config), "--nproc", "2", "--run-dir", str(tmp_path / "plain"),
                     *sets(*common)], timeout=120)
    assert plain.returncode == 0, plain.stderr
    run_dir = tmp_path / "oom"
    proc = run_cli(["train", "--config", str(debug_config), "--nproc", "2", "--max-restarts", "1", "--run-dir",
                    str(run_dir), *sets(*common, "debug.inject_fault=oom:1:3")], timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "OutOfMemoryError" in proc.stderr and "recovery: training.micro_batch_size=1" in proc.stderr
    assert [e["kind"] for e in read_events(run_dir)] == ["oom_recovery", "restart"]
    run, reference = read_run(run_dir), read_run(tmp_path / "plain")
    assert run.summary["grad_accum_steps"] == 2 * reference.summary["grad_accum_steps"]
    torch.testing.assert_close(torch.tensor(run.losses), torch.tensor(reference.losses), rtol=1e-5, atol=1e-6)
    assert_same_params(run.params, reference.params)


def test_young_daly_interval():
    from scaletrain.checkpoint.interval import interval_steps, mtbf_seconds, young_daly_seconds

    assert young_daly_seconds(2.0, 3600.0) == pytest.approx(120.0)  # sqrt(2 * 2 s * 1 h)
    assert interval_steps(2.0, 3600.0, 0.5) == 240
    assert mtbf_seconds([], started=0.0, now=100.0, assumed_s=7.0) == (7.0, "assumed: no failure in this run's history")
    events = [{"kind": "restart", "time": 50.0}, {"kind": "skipped_step", "time": 60.0}, {"kind": "hang", "time": 80.0}]
    assert mtbf_seconds(events, started=90.0, now=150.0, assumed_s=7.0)[0] == pytest.approx(50.0)  # 100 s, 2 failures


def test_checkpoint_interval_auto(tmp_path, debug_config):
    run_dir = tmp_path / "run"
    proc = run_cli(["train", "--config", str(debug_config), "--run-dir", str(run_dir),
                    *sets(*SMALL, "training.steps=24", "checkpoint.interval=auto", "checkpoint.mtbf_hours=0.00001",
                          "checkpoint.keep_last=0")], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint.interval = auto: save " in proc.stderr and "Young/Daly" in proc.stderr
    steps = sorted(int(p.name.removeprefix("step_")) for p in (run_dir / "checkpoints").glob("step_*"))
    assert steps[0] == 10 and steps[-1] == 24 and len(steps) >= 3  # measured at 10, then the chosen interval
