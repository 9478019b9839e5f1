"""Two torchrun agents (``--nnodes 2``, c10d rendezvous on 127.0.0.1), one
worker each, join one job: DDP across the two "nodes" matches
single-process training, and rank 0 holds the run directory's lock."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from harness import assert_parity, cli_env, read_run, train_run

OVERRIDES = ["training.steps=4", "logging.sample_tokens=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_agents_rendezvous_and_match_one_process(tmp_path, debug_config):
    port, run_dir = free_port(), tmp_path / "run"
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
         str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-agents",
         "-m", "scaletrain", "train", "--config", str(debug_config), "--run-dir", str(run_dir),
         *[a for o in OVERRIDES for a in ("--set", o)]],
        env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in range(2)]
    try:
        outputs = [agent.communicate(timeout=180)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    assert [a.returncode for a in agents] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    run = read_run(run_dir)
    assert run.summary["layout"]["dp_replicate"] == 2 and run.summary["world_size"] == 2
    assert (run_dir / ".scaletrain.lock").read_text() == ""  # taken by rank 0, released at the end
    assert_parity(train_run(tmp_path / "single", Path(debug_config), OVERRIDES), run)
