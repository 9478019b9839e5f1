"""The parity harness: run a config single-process with the global batch and
again under another layout, then compare per-step losses and final parameters.

Every run is a real ``python -m scaletrain train`` subprocess (workers started
through torchrun for nproc > 1) with a hard timeout, so a deadlock fails the
test instead of hanging the suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TIMEOUT_S = 240


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"})
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_cli(args: list[str], timeout: float = DEFAULT_TIMEOUT_S, cwd: Path | None = None,
            launcher: list[str] | None = None, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m scaletrain <args>`` (or under ``launcher``, e.g. torchrun) with a hard timeout."""
    cmd = [sys.executable, *(launcher or ["-m"]), "scaletrain", *args]
    try:
        return subprocess.run(cmd, env=cli_env(**(env_extra or {})), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"timed out after {timeout}s (deadlock?): {' '.join(cmd)}\n"
                             f"stdout:\n{exc.stdout}\nstderr:\n{exc.stderr}") from None


@dataclass
class RunResult:
    run_dir: Path
    losses: list[float]
    params: dict[str, torch.Tensor]
    summary: dict
    metrics: list[dict]


def read_run(run_dir: Path) -> RunResult:
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return RunResult(run_dir, [m["loss"] for m in metrics], load_file(str(run_dir / "model.safetensors")),
                     json.loads((run_dir / "summary.json").read_text()), metrics)


def train_run(run_dir: Path, config: Path, overrides: list[str], nproc: int = 1,
              timeout: float = DEFAULT_TIMEOUT_S, launcher: list[str] | None = None) -> RunResult:
    args = ["train", "--config", str(config), "--run-dir", str(run_dir)]
    if launcher is None:
        args += ["--nproc", str(nproc)]
    for item in overrides:
        args += ["--set", item]
    proc = run_cli(args, timeout=timeout, launcher=launcher)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return read_run(run_dir)


def train_many(workdir: Path, config: Path, cases: dict[str, list[str]], nproc: int,
               timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, RunResult]:
    """Train every case (name -> overrides) as ``nproc`` workers of ONE
    torchrun launch; returns each case's run."""
    spec = [{"config": str(config), "overrides": overrides, "run_dir": str(workdir / name)}
            for name, overrides in cases.items()]
    spec_path = workdir / "cases.json"
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(REPO / "tests" / "parity_worker.py"), str(spec_path)]
    try:
        proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"timed out after {timeout}s (deadlock?): {' '.join(cmd)}\n{exc.stderr}") from None
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-20000:]}"
    return {name: read_run(workdir / name) for name in cases}


def assert_parity(reference: RunResult, other: RunResult, rtol: float = 1e-5, atol: float = 1e-6,
                  param_atol: float = 1e-5) -> None:
    """Same per-step losses and same final parameters within fp32 tolerance."""
    assert len(reference.losses) == len(other.losses)
    torch.testing.assert_close(torch.tensor(other.losses), torch.tensor(reference.losses), rtol=rtol, atol=atol)
    assert reference.params.keys() == other.params.keys()
    for name, expected in reference.params.items():
        torch.testing.assert_close(other.params[name], expected, rtol=0, atol=param_atol, msg=lambda m: f"{name}: {m}")
