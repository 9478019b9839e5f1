"""`scaletrain launch slurm --submit` against a real single-host Slurm
(slurmctld + slurmd on 127.0.0.1, started by scripts/slurm-local.sh): the
job trains, `scancel --signal=TERM` makes it checkpoint and end with exit 0,
and submitting the same script again resumes from that checkpoint.

Needs Debian's slurm-wlm and munge (`.ci/run` installs them) and root;
skipped with the reason otherwise. Prints a transcript (pytest -s)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from harness import REPO, cli_env, run_cli

SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
STEPS = 40


def _missing() -> str | None:
    tools = [t for t in ("munged", "slurmctld", "slurmd", "sbatch", "scancel", "scontrol")
             if shutil.which(t, path=SBIN_PATH) is None]
    if tools:
        return f"{', '.join(tools)} not installed (apt-get install -y slurm-wlm munge)"
    if os.geteuid() != 0:
        return "slurmd must run as root"
    return None


def say(text: str) -> None:
    print(text, flush=True)


def sh(args: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    say("$ " + " ".join(args))
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    for line in (proc.stdout + proc.stderr).strip().splitlines():
        say("  " + line)
    return proc


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if (reason := _missing()) is not None:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm")
    # Ports of its own, so a developer's local cluster keeps running beside it.
    env = {**cli_env(), "PATH": SBIN_PATH, "SLURMCTLD_PORT": "16817", "SLURMD_PORT": "16818",
           "SLURM_CONF": str(state / "slurm.conf")}
    script = [shutil.which("bash"), str(REPO / "scripts" / "slurm-local.sh")]
    proc = sh([*script, "start", str(state)], env, timeout=120)
    if proc.returncode != 0:
        sh([*script, "stop", str(state)], env)
        pytest.skip(f"the local Slurm cluster did not start: {proc.stderr.strip().splitlines()[-1:]}")
    yield env
    sh([*script, "stop", str(state)], env)


def job_field(env: dict, job_id: str, name: str) -> str:
    proc = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True, timeout=30)
    match = re.search(rf"\b{name}=(\S+)", proc.stdout)
    return match.group(1) if match else ""


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def wait_done(env: dict, job_id: str) -> tuple[str, str]:
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")
    state = wait_for(lambda: (s := job_field(env, job_id, "JobState")) in ended and s, 240, f"job {job_id} to end")
    code = job_field(env, job_id, "ExitCode")
    say(f"job {job_id}: JobState={state} ExitCode={code}")
    return state, code


def steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def show_logs(job_dir: Path, job_id: str) -> None:
    for log in sorted((job_dir / "logs").glob(f"slurm-{job_id}*.out")):
        lines = log.read_text().splitlines()
        say(f"--- {log.name} ({len(lines)} lines), last 4:")
        for line in lines[-4:]:
            say("  " + line)


def test_submit_sigterm_checkpoint_and_resume(slurm, tmp_path):
    run_dir, job_dir = tmp_path / "run", tmp_path / "run-slurm"
    config = tmp_path / "debug.toml"
    config.write_text((REPO / "configs" / "debug.toml").read_text())
    # 0.2 s of injected work per step on rank 0 keeps the job running long
    # enough to be signalled mid-run; stragglers are expected, so not reported.
    overrides = [f"training.steps={STEPS}", "debug.inject_fault=slow:0:1", "debug.straggler_factor=0",
                 "logging.sample_tokens=0"]
    args = ["launch", "slurm", "--config", str(config), "--nodes", "1", "--gpus-per-node", "0",
            "--nproc-per-node", "2", "--run-dir", str(run_dir), "--submit"]
    for item in overrides:
        args += ["--set", item]
    say("$ scaletrain " + " ".join(args))
    proc = run_cli(args, timeout=120, env_extra={"PATH": slurm["PATH"], "SLURM_CONF": slurm["SLURM_CONF"]})
    say("  " + proc.stdout.strip().replace("\n", "\n  "))
    assert proc.returncode == 0, proc.stderr
    job = re.search(r"submitted batch job (\d+)", proc.stdout).group(1)

    def trained_or_ended():
        if job_field(slurm, job, "JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            show_logs(job_dir, job)
            raise AssertionError(f"job {job} ended before training 5 steps: {job_field(slurm, job, 'JobState')}")
        return len(steps_logged(run_dir)) >= 5

    wait_for(trained_or_ended, 180, "5 training steps")
    say(f"steps logged before the signal: {len(steps_logged(run_dir))}")
    assert sh(["scancel", "--signal=TERM", job], slurm).returncode == 0
    state, code = wait_done(slurm, job)
    show_logs(job_dir, job)
    assert (state, code) == ("COMPLETED", "0:0")
    summary = json.loads((run_dir / "summary.json").read_text())
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    stopped_at = steps_logged(run_dir)[-1]
    say(f"stopped_early={summary['stopped_early']} at step {stopped_at}; checkpoints: {checkpoints}")
    assert summary["stopped_early"] and 5 <= stopped_at < STEPS
    assert checkpoints == [f"step_{stopped_at:08d}"]
    assert (run_dir / "checkpoints" / checkpoints[0] / "manifest.json").is_file()
    node = os.uname().nodename.split(".")[0]
    assert {p.name for p in (job_dir / "logs").iterdir()} == {f"slurm-{job}.out", f"slurm-{job}-{node}.out"}

    resubmit = sh(["sbatch", "--parsable", str(job_dir / "slurm.sbatch")], slurm)
    assert resubmit.returncode == 0
    job2 = resubmit.stdout.strip().split(";")[0]
    state, code = wait_done(slurm, job2)
    show_logs(job_dir, job2)
    assert (state, code) == ("COMPLETED", "0:0")
    summary = json.loads((run_dir / "summary.json").read_text())
    say(f"resumed_from={summary['resumed_from']}; steps logged: {len(steps_logged(run_dir))}")
    assert summary["resumed_from"] == str(run_dir / "checkpoints" / checkpoints[0])
    assert not summary["stopped_early"]
    assert steps_logged(run_dir) == list(range(1, STEPS + 1))  # each step once, across both jobs
