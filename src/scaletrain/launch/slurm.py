"""``scaletrain launch slurm``: an sbatch script that runs one torchrun per
node, rendezvousing (c10d) on the head node, and survives preemption.

What the script does, and why:
- The head node is the first host of ``scontrol show hostnames
  $SLURM_JOB_NODELIST``. ``SLURM_LAUNCH_NODE_IPADDR`` is the node that ran
  sbatch (often a login node), and ``hostname -i`` on many Debian-derived
  images is 127.0.1.1: if scontrol is missing, or the head resolves to a
  loopback address in a multi-node job, the script stops with an error
  instead of letting every node wait for a rendezvous nobody can reach.
- The rendezvous id is the job id plus ``SLURM_RESTART_COUNT``, so a requeued
  job never joins the store of its previous attempt.
- SIGTERM reaches every torchrun (``scancel --signal=TERM``, or Slurm itself
  on preemption); torchrun passes it to the workers, which finish the step,
  checkpoint and exit 0. torchrun itself then exits 1, so the script asks the
  run's ``summary.json`` (written after the checkpoint) whether the stop was
  clean, and exits 0 if it was. ``--requeue`` lets Slurm requeue a
  preempted job; before the time limit (``--signal=B:USR1@GRACE``) the
  script checkpoints and requeues itself. A requeued or resubmitted job
  resumes from the newest checkpoint in its run directory.
- The script and each node's log go to a job directory beside the run
  directory (RUN_DIR-slurm/: slurm.sbatch, logs/slurm-JOBID-NODE.out); the
  run directory holds only the run.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from scaletrain.errors import UserError
from scaletrain.launch.common import Job, check_job, train_args, worker_env


@dataclass
class SlurmSpec:
    config: Path
    overrides: list[str]
    nodes: int | None
    gpus_per_node: int
    nproc_per_node: int | None = None
    run_dir: Path | None = None
    job_dir: Path | None = None
    partition: str | None = None
    time_limit: str | None = None
    account: str | None = None
    cpus_per_node: int | None = None
    port: int = 0
    grace_s: int = 300
    max_restarts: int = 3
    env: list[str] | None = None
    placement: Path | None = None


def render(spec: SlurmSpec) -> tuple[str, Path]:
    """The sbatch script and its job directory (absolute), where the script and logs go."""
    job = check_job(spec.config, spec.overrides, spec.nodes, spec.gpus_per_node, spec.nproc_per_node,
                    spec.env or [], spec.max_restarts, spec.placement)
    if not 0 <= spec.port < 65536:
        raise UserError(f"--port = {spec.port}; allowed: 0 (derived from the job id) to 65535")
    if spec.grace_s < 0:
        raise UserError(f"--grace = {spec.grace_s}; allowed: 0 or more seconds")
    if spec.cpus_per_node is not None and spec.cpus_per_node < 1:
        raise UserError(f"--cpus-per-node = {spec.cpus_per_node}; allowed: 1 or more")
    run_dir = (spec.run_dir or Path("runs") / spec.config.stem).resolve()
    job_dir = (spec.job_dir or run_dir.parent / f"{run_dir.name}-slurm").resolve()
    if job_dir == run_dir or run_dir in job_dir.parents:
        raise UserError(f"--job-dir {job_dir} must lie outside --run-dir {run_dir} (a run directory holds only "
                        "the run)")
    sections = [_header(spec, job, run_dir, job_dir), _head_node(job), _environment(spec, job),
                _step(spec, job, run_dir), _epilogue()]
    return "\n".join(sections), job_dir


def _header(spec: SlurmSpec, job: Job, run_dir: Path, job_dir: Path) -> str:
    q = shlex.quote
    lines = ["#!/bin/bash",
             "# Written by `scaletrain launch slurm`. Resubmit it (sbatch this file) to resume from the newest",
             "# checkpoint in RUN_DIR; `scancel --signal=TERM JOBID` checkpoints and stops.",
             f"#SBATCH --job-name=scaletrain-{spec.config.stem}",
             f"#SBATCH --nodes={job.nodes}",
             "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --output={job_dir}/logs/slurm-%j.out",
             "#SBATCH --open-mode=append",
             "#SBATCH --requeue"]
    if job.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={job.gpus_per_node}")
    if spec.cpus_per_node:
        lines.append(f"#SBATCH --cpus-per-task={spec.cpus_per_node}")
    for flag, value in (("partition", spec.partition), ("time", spec.time_limit), ("account", spec.account)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    if spec.time_limit:
        lines.append(f"#SBATCH --signal=B:USR1@{spec.grace_s}")
    if job.hosts:
        lines += [f"#SBATCH --nodelist={','.join(h for h, _ in job.hosts)}", "#SBATCH --exclusive"]
    lines += ["", "set -uo pipefail",
              f"RUN_DIR={q(str(run_dir))}",
              f"JOB_DIR={q(str(job_dir))}",
              f"PYTHON={q(sys.executable)}",
              f"cd {q(str(Path.cwd()))}",
              'mkdir -p "$JOB_DIR/logs"', ""]
    return "\n".join(lines)


def _head_node(job: Job) -> str:
    return r"""# The rendezvous runs on the first node of the allocation.
if ! command -v scontrol >/dev/null 2>&1; then
  echo "error: scontrol is not on PATH on $(hostname): cannot derive the head node of $SLURM_JOB_NODELIST" >&2
  exit 1
fi
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
if [ -z "$HEAD_NODE" ]; then
  echo "error: scontrol show hostnames '$SLURM_JOB_NODELIST' printed no host" >&2
  exit 1
fi
HEAD_ADDR=$(getent ahostsv4 "$HEAD_NODE" | awk 'NR == 1 {print $1}')
if [ -z "$HEAD_ADDR" ]; then
  echo "error: head node $HEAD_NODE does not resolve to an IPv4 address (getent ahostsv4)" >&2
  exit 1
fi
if [ "$SLURM_JOB_NUM_NODES" -gt 1 ] && [[ "$HEAD_ADDR" == 127.* ]]; then
  echo "error: head node $HEAD_NODE resolves to $HEAD_ADDR, a loopback address the other nodes cannot" \
       "reach; fix its /etc/hosts or DNS entry" >&2
  exit 1
fi
""" + f"NPROC_PER_NODE={job.nproc_per_node}\n"


def _environment(spec: SlurmSpec, job: Job) -> str:
    q = shlex.quote
    port = str(spec.port) if spec.port else "$((20000 + SLURM_JOB_ID % 20000))"
    lines = [f"PORT={port}",
             'RDZV_ID="scaletrain-$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}"  # unique per attempt',
             "# Threads per worker: the node's CPUs shared by its workers.",
             "CPUS=${SLURM_CPUS_ON_NODE:-$NPROC_PER_NODE}",
             "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS > NPROC_PER_NODE ? CPUS / NPROC_PER_NODE : 1 ))}"]
    lines += [f"export {key}={q(value)}" for key, value in worker_env(job).items()]
    if job.hosts:
        pairs = " ".join(f"{h}={','.join(map(str, g))}" for h, g in job.hosts)
        lines += ["# Each node's GPUs from `scaletrain allocate` (node-local indices).",
                  f"export SCALETRAIN_NODE_GPUS={q(pairs)}"]
    return "\n".join(lines) + "\n"


def _step(spec: SlurmSpec, job: Job, run_dir: Path) -> str:
    nproc = "gpu" if job.hosts else "$NPROC_PER_NODE"
    torchrun = ['"$PYTHON" -m torch.distributed.run', f"--nnodes={job.nodes}", f"--nproc-per-node={nproc}",
                "--rdzv-backend=c10d", '--rdzv-endpoint="$HEAD_ADDR:$PORT"', '--rdzv-id="$RDZV_ID"',
                f"--max-restarts={spec.max_restarts}", *_paired(train_args(spec.config.resolve(), spec.overrides,
                                                                             str(run_dir)))]
    pin = ""
    if job.hosts:
        # On each node, keep only that node's GPUs from the placement.
        pin = ("bash -c 'for e in $SCALETRAIN_NODE_GPUS; do [ \"${e%%=*}\" = \"$SLURMD_NODENAME\" ] && "
               "export CUDA_VISIBLE_DEVICES=\"${e#*=}\"; done; exec \"$@\"' pin-gpus \\\n  ")
    command = " \\\n    ".join(torchrun)
    return f"""STARTED=$(date +%s)
REQUEUE=0
# Before the time limit: checkpoint every node's workers, then requeue.
trap 'REQUEUE=1; scancel --signal=TERM "$SLURM_JOB_ID"' USR1
# Preemption signals this shell too: wait for the workers to save.
trap 'echo "SIGTERM: waiting for the workers to checkpoint"' TERM

echo "head node $HEAD_NODE ($HEAD_ADDR:$PORT), rendezvous $RDZV_ID, $SLURM_JOB_NUM_NODES nodes x $NPROC_PER_NODE"
srun --ntasks-per-node=1 --open-mode=append --output="$JOB_DIR/logs/slurm-%j-%N.out" \\
  {pin}{command} &
STEP_PID=$!
wait "$STEP_PID"; STATUS=$?
while kill -0 "$STEP_PID" 2>/dev/null; do wait "$STEP_PID"; STATUS=$?; done
"""


def _paired(args: list[str]) -> list[str]:
    """Quoted arguments for the script: ``-m scaletrain train`` on one line, then a flag and its value per line."""
    lines, i = [" ".join(map(shlex.quote, args[:3]))], 3
    while i < len(args):
        lines.append(" ".join(map(shlex.quote, args[i:i + 2])))
        i += 2
    return lines


def _epilogue() -> str:
    return r"""if [ "$STATUS" -eq 0 ]; then
  echo "training finished"
  exit 0
fi
# torchrun exits 1 after passing on a SIGTERM even when every worker saved
# and exited 0: the summary written after that checkpoint tells.
if "$PYTHON" - "$RUN_DIR/summary.json" "$STARTED" <<'EOF'
import json, os, sys
path, started = sys.argv[1], float(sys.argv[2])
ok = os.path.exists(path) and os.path.getmtime(path) >= started and json.load(open(path)).get("stopped_early")
sys.exit(0 if ok else 1)
EOF
then
  echo "stopped after a checkpoint; resubmit this script (or let Slurm requeue it) to resume"
  if [ "$REQUEUE" = 1 ]; then scontrol requeue "$SLURM_JOB_ID"; fi
  exit 0
fi
echo "error: training failed (srun exit $STATUS); see $JOB_DIR/logs" >&2
exit "$STATUS"
"""


def require_sbatch() -> None:
    if shutil.which("sbatch") is None:
        raise UserError("--submit: sbatch is not on PATH (run on a Slurm login node, or drop --submit to only "
                        "write the script)")


def submit(path: Path) -> str:
    """``sbatch --parsable``; returns the job id."""
    require_sbatch()
    proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit {proc.returncode}"]
        raise UserError(f"sbatch refused {path}: {message[-1]}")
    return proc.stdout.strip().split(";")[0]
