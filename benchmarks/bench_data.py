"""Data pipeline benchmarks, each against a baseline run in this script.

1. Tokenization: the token-cache builder (scaletrain.data.prepare_corpus,
   data.num_workers processes) against HF ``datasets.map(batched=True,
   num_proc=N)`` with the same HF tokenizer (a byte-level BPE trained on the
   corpus) and the same number of processes, on a JSONL corpus of real text
   (standard-library paragraphs). Both start from the JSONL file and end with
   every document's token ids on disk (datasets: its Arrow cache).
2. Batching: padded rows (one document each) trained with fixed,
   length_grouped and token_budget batching, and packed rows with fixed
   batching, on the same documents (a realistic, long-tailed length spread):
   the share of computed positions that were padding, and real (non-padding)
   tokens/s, as ratios to fixed batching.

    python benchmarks/bench_data.py [--workers 2] [--docs 60000] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


def write_corpus(path: Path, n_docs: int) -> list[int]:
    """Paragraphs of the standard library, repeated (with an index) up to n_docs."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paragraphs = []
    for file in sorted(stdlib.glob("*.py")):
        paragraphs += [p.strip() for p in file.read_text(errors="replace").split("\n\n") if len(p.strip()) >= 20]
    with path.open("w") as out:
        for i in range(n_docs):
            out.write(json.dumps({"text": paragraphs[i % len(paragraphs)]}) + "\n")
    return [len(paragraphs[i % len(paragraphs)]) for i in range(n_docs)]


def bench_tokenization(root: Path, workers: int, n_docs: int) -> None:
    import dataclasses

    import datasets
    from tokenizers import Tokenizer

    from scaletrain.config import load_config
    from scaletrain.data import prepare_corpus
    from scaletrain.data.cache import load_tokenizer

    corpus = root / "corpus.jsonl"
    write_corpus(corpus, n_docs)
    base = load_config(None, [f"data.source={corpus}", "data.tokenizer=bpe", "data.bpe_vocab_size=8192",
                              f"data.cache_dir={root / 'tok'}"]).data
    tokenizer_path = load_tokenizer(base, [corpus], show_progress=False).path

    start = time.perf_counter()
    cfg = dataclasses.replace(base, tokenizer=str(tokenizer_path), cache_dir=str(root / "cache"), num_workers=workers)
    built = prepare_corpus(cfg, show_progress=False)
    ours = time.perf_counter() - start

    tok = Tokenizer.from_file(str(tokenizer_path))
    datasets.disable_progress_bars()

    def encode(batch):
        return {"ids": [e.ids for e in tok.encode_batch(batch["text"])]}

    start = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(root / "hf"))
    ds = ds.map(encode, batched=True, num_proc=workers, remove_columns=["text"])
    theirs = time.perf_counter() - start
    hf_tokens = sum(len(ids) for ids in ds["ids"])

    print(f"tokenization: {n_docs} documents, {workers} processes, the same BPE ({tok.get_vocab_size()} tokens)")
    print(f"{'':>22} {'seconds':>8} {'docs/s':>10} {'tokens/s':>11}")
    for name, seconds, tokens in (("scaletrain cache", ours, built.n_tokens - built.n_documents),
                                  ("datasets.map", theirs, hf_tokens)):
        print(f"{name:>22} {seconds:8.2f} {n_docs / seconds:10.0f} {tokens / seconds:11.0f}")
    print(f"ratio (scaletrain / datasets, docs/s): {theirs / ours:.2f}x  (same token count: "
          f"{built.n_tokens - built.n_documents == hf_tokens})")


def bench_batching(root: Path, steps: int) -> None:
    corpus = root / "batching.jsonl"
    lengths = write_corpus(corpus, 20000)
    print(f"\nbatching: {len(lengths)} documents, characters per document: median {statistics.median(lengths):.0f}, "
          f"p90 {sorted(lengths)[int(0.9 * len(lengths))]}, max {max(lengths)}; byte tokenizer, seq_len 512, "
          f"tiny model, global batch 16, {steps} steps, 1 process")
    base = ["--set", "model.name=tiny", "--set", f"data.source={corpus}", "--set", "data.seq_len=512",
            "--set", f"data.cache_dir={root / 'cache-b'}", "--set", "training.global_batch_size=16",
            "--set", "training.micro_batch_size=8", "--set", f"training.steps={steps}",
            "--set", "checkpoint.enable=false", "--set", "logging.sample_tokens=0"]
    cases = {"padded, fixed": ["data.packing=padded"],
             "padded, length_grouped": ["data.packing=padded", "data.batching=length_grouped"],
             "padded, token_budget": ["data.packing=padded", "data.batching=token_budget",
                                      "data.max_tokens_per_batch=2048"],
             "packed, fixed": ["data.packing=packed"]}
    results = {}
    for name, overrides in cases.items():
        run_dir = root / name.replace(", ", "_")
        cmd = [sys.executable, "-m", "scaletrain", "train", "--run-dir", str(run_dir), *base,
               *[a for o in overrides for a in ("--set", o)]]
        subprocess.run(cmd, check=True, capture_output=True)
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((run_dir / "summary.json").read_text())
        results[name] = (statistics.mean(m["pad_fraction"] for m in metrics), summary["tokens_per_s"],
                         metrics[-1]["tokens"] / steps)
    base_tps = results["padded, fixed"][1]
    print(f"{'':>24} {'padding':>8} {'tokens/step':>12} {'tokens/s':>9} {'vs fixed':>9}")
    for name, (pad, tps, per_step) in results.items():
        print(f"{name:>24} {pad:8.1%} {per_step:12.0f} {tps:9.0f} {tps / base_tps:8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--docs", type=int, default=60000)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench_tokenization(Path(tmp), args.workers, args.docs)
        bench_batching(Path(tmp), args.steps)


if __name__ == "__main__":
    main()
