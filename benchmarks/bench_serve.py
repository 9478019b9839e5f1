"""scaletrain serve against ``transformers serve --continuous-batching`` on the
same model, prompts, max_tokens and threads: streamed greedy completions at
concurrency 1, 4, 16 and 64 (serve/loadgen.py: vllm bench serve's fields),
plus scaletrain without prefix caching at 16 to show what the cache saves.

The model is the ``small`` preset (byte tokenizer) with random weights unless
--model names a scaletrain checkpoint or run directory; its vocabulary is
exactly the tokenizer's (257) so that both servers sample from the same ids
and their greedy outputs can be compared token for token. It is exported with
``checkpoint export --to hf`` (weights + tokenizer) for transformers.

Both servers stay up; every concurrency level runs on one, then on the other,
so drift on a shared machine hits both alike. ``transformers serve`` needs
``accelerate`` (pip install accelerate).

    python benchmarks/bench_serve.py [--model DIR] [--threads 2] [--out results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from scaletrain.serve.loadgen import format_table, prompt_set, run_load  # noqa: E402

PROMPTS_PER_LEVEL = {1: 16, 4: 32, 16: 64, 64: 128}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, cmd: list[str], port: int, threads: int, log_dir: Path):
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
        self.log = log_dir / f"{name}.log"
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise SystemExit(f"{name} not healthy after 180 s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def prepare_model(model: str | None, work: Path, export: bool = True) -> tuple[Path, Path | None]:
    """(scaletrain checkpoint or run dir, its HF export unless ``export`` is False)."""
    from safetensors.torch import save_file

    from scaletrain.checkpoint.hf import _to_hf_name, export_hf, hf_config, import_hf
    from scaletrain.config import load_config
    from scaletrain.model import Llama
    from scaletrain.serve.loader import find_weights

    if model is None:
        cfg = load_config(None, ["model.name=small", "model.vocab_size=257"])
        net = Llama(cfg.model)
        net.init_weights(0)
        init = work / "init"
        init.mkdir()
        save_file({_to_hf_name(k): v.contiguous() for k, v in net.state_dict().items()}, str(init / "model.safetensors"))
        (init / "config.json").write_text(json.dumps(hf_config(cfg.model)))
        ckpt = import_hf(init, work / "checkpoint", cfg)
    else:
        kind, ckpt = find_weights(Path(model))
        if kind != "checkpoint":
            raise SystemExit("--model: give a scaletrain checkpoint or run directory (it is exported for transformers)")
    return ckpt, export_hf(ckpt, work / "hf") if export else None


def greedy_texts(url: str, model: str, prompts: list[str], max_tokens: int) -> list[str]:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0}
    return [httpx.post(f"{url}/v1/completions", json={**body, "prompt": p}, timeout=300).json()["choices"][0]["text"]
            for p in prompts]


def prefix_counters(url: str) -> tuple[float, float]:
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        for name in ("prefix_cache_queries_total", "prefix_cache_hits_total"):
            if line.startswith(f"scaletrain:{name}{{"):
                values[name] = float(line.rsplit(" ", 1)[1])
    return values["prefix_cache_queries_total"], values["prefix_cache_hits_total"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="scaletrain checkpoint or run directory (default: random small model)")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--time-limit", type=float, default=240.0, help="seconds per level and server")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        ckpt, hf_dir = prepare_model(args.model, work)
        rows, notes = run(args, levels, ckpt, hf_dir, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(format_table(rows))
    for note in notes:
        print(note)
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "notes": notes}, indent=1))


def run(args, levels: list[int], ckpt: Path, hf_dir: Path, work: Path) -> tuple[list[dict], list[str]]:
    st_cmd = [sys.executable, "-m", "scaletrain", "serve", str(ckpt), "--served-model-name", "m", "--threads",
              str(args.threads), "--max-num-seqs", "64", "--port"]
    ours = Server("scaletrain", st_cmd + [str(port := free_port())], port, args.threads, work)
    servers = [(ours, "m")]
    if not args.skip_transformers:
        tf_cmd = ["transformers", "serve", "--continuous-batching", "--device", "cpu", "--dtype", "float32",
                  "--host", "127.0.0.1", "--port", str(port := free_port()), str(hf_dir)]
        servers.append((Server("transformers", tf_cmd, port, args.threads, work), str(hf_dir)))
    rows, notes = [], []
    try:
        check = prompt_set(4, seed=1)
        outputs = [greedy_texts(s.url, name, check, args.max_tokens) for s, name in servers]  # also warms up
        if len(outputs) == 2:
            same = sum(a == b for a, b in zip(*outputs))
            notes.append(f"greedy outputs identical on {same}/{len(check)} check prompts")
        for level in levels:
            prompts = prompt_set(PROMPTS_PER_LEVEL.get(level, 4 * level), seed=level)
            for server, name in servers:
                before = prefix_counters(server.url) if server is ours else None
                row = asyncio.run(run_load(f"{server.url}/v1", name, prompts, level, args.max_tokens, args.time_limit))
                row["server"] = server.name
                if before is not None:
                    queries, hits = (a - b for a, b in zip(prefix_counters(server.url), before))
                    row["prefix_hit_rate"] = hits / queries if queries else 0.0
                    row["prefix_hit_tokens"] = hits
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        for server, _ in servers:
            server.stop()
    if 16 in levels:
        nocache = Server("scaletrain-no-prefix-cache", st_cmd + [str(port := free_port()), "--no-prefix-caching"],
                         port, args.threads, work)
        try:
            greedy_texts(nocache.url, "m", prompt_set(2, seed=1), 8)
            row = asyncio.run(run_load(f"{nocache.url}/v1", "m", prompt_set(PROMPTS_PER_LEVEL[16], seed=16), 16,
                                       args.max_tokens, args.time_limit))
            rows.append({**row, "server": nocache.name})
        finally:
            nocache.stop()
    notes += ratio_notes(rows)
    return rows, notes


def ratio_notes(rows: list[dict]) -> list[str]:
    notes = []
    by = {(r["server"], r["concurrency"]): r for r in rows}
    for (server, level), row in sorted(by.items(), key=lambda kv: kv[0][1]):
        if server == "scaletrain":
            notes.append(f"c={level}: prefix-cache hit rate {row['prefix_hit_rate']:.1%} "
                         f"({row['prefix_hit_tokens']:.0f} prompt tokens not recomputed)")
            tf = by.get(("transformers", level))
            if tf and tf["output_tok_s"] > 0:
                notes.append(f"c={level}: output tok/s scaletrain / transformers = "
                             f"{row['output_tok_s'] / tf['output_tok_s']:.2f}x; TTFT p99 "
                             f"{row['ttft_ms_p99']:.0f} ms vs {tf['ttft_ms_p99']:.0f} ms")
    nocache, cached = by.get(("scaletrain-no-prefix-cache", 16)), by.get(("scaletrain", 16))
    if nocache and cached:
        notes.append(f"c=16 prefix caching on/off: output tok/s {cached['output_tok_s'] / nocache['output_tok_s']:.2f}x, "
                     f"TTFT p50 {cached['ttft_ms_p50']:.0f} vs {nocache['ttft_ms_p50']:.0f} ms")
    return notes


if __name__ == "__main__":
    main()
