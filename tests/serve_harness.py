"""A real ``scaletrain serve`` process on 127.0.0.1 and a free port, for the
serving tests and the benchmark: started with a hard start-up deadline,
stopped with SIGTERM (then SIGKILL), its output kept for failure messages."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", NO_COLOR="1")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


class ServerProcess:
    def __init__(self, model: str, args: list[str] = (), startup_s: float = 90, threads: int = 1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "scaletrain", "serve", model, "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, env=serve_env(threads), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode} during start-up:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.kill()
        raise AssertionError(f"server not healthy after {startup_s}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"server ignored signal {sig} for {timeout_s}s:\n{self.output()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def make_tiny_run(root: Path, config: Path, seed: int = 0) -> Path:
    """A run directory holding one checkpoint of the debug model (randomly
    initialized, byte tokenizer), written by ``checkpoint import`` without
    training: run/config.toml, run/checkpoints/step_00000004/."""
    from safetensors.torch import save_file

    from scaletrain.checkpoint.hf import _to_hf_name, hf_config, import_hf
    from scaletrain.config import load_config
    from scaletrain.model import Llama

    cfg = load_config(str(config), ["model.vocab_size=320"])
    model = Llama(cfg.model)
    model.init_weights(seed)
    hf_dir = root / "hf-init"
    hf_dir.mkdir(parents=True)
    save_file({_to_hf_name(k): v.contiguous() for k, v in model.state_dict().items()}, str(hf_dir / "model.safetensors"))
    (hf_dir / "config.json").write_text(__import__("json").dumps(hf_config(cfg.model)))
    run = root / "run"
    import_hf(hf_dir, run / "checkpoints" / "step_00000004", cfg)
    (run / "config.toml").write_text(cfg.to_toml())
    return run


def expected_greedy(run_dir, prompt: str, n: int) -> str:
    """The argmax continuation from a plain full-sequence forward, over the tokenizer's ids."""
    from scaletrain.data.tokenizer import ByteTokenizer
    from scaletrain.serve.loader import load_model

    loaded = load_model(run_dir)
    tokens = torch.tensor([ByteTokenizer().encode(prompt)])
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(loaded.model(tokens)[0, -1, :257].argmax())
            if token == loaded.eos_id:
                break
            out.append(token)
            tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
    return ByteTokenizer().decode(out)
