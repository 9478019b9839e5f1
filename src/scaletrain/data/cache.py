"""The token cache: a corpus is tokenized once into a flat memory-mapped token
file, keyed by a hash of (source files, reader settings, tokenizer), and reused
by later runs and by every rank.

Layout: ``<cache_dir>/tokens/<key>/{tokens.bin, meta.json}``. A cache entry is
built in a temporary directory and renamed into place, so a crash or a bad
input never leaves a half-written entry behind, and two builders racing (one per
node on a shared file system) both end with the same complete entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scaletrain.config import DataConfig
from scaletrain.data.sources import ReadStats, read_documents, resolve_files
from scaletrain.data.tokenizer import ByteTokenizer, HFTokenizer, train_bpe
from scaletrain.errors import UserError, warn

ENCODE_BATCH = 256


@dataclass
class TokenCorpus:
    tokenizer: ByteTokenizer | HFTokenizer
    tokens_path: Path
    n_tokens: int
    n_documents: int
    dtype: str

    def tokens(self) -> np.ndarray:
        return np.memmap(self.tokens_path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))


def _files_fingerprint(files: list[Path]) -> list:
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def _progress(description: str, total: int, show: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        disable=not show, transient=True)
    return progress, progress.add_task(description, total=total)


def load_tokenizer(cfg: DataConfig, files: list[Path], show_progress: bool = True):
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "bpe":
        key = _digest(["bpe-v1", cfg.bpe_vocab_size, cfg.format, cfg.text_field, _files_fingerprint(files)])
        path = Path(cfg.cache_dir).expanduser() / "tokenizers" / key / "tokenizer.json"
        if not path.is_file():
            docs = (doc for f in files for doc in read_documents(f, cfg.format, cfg.text_field))
            train_bpe(docs, cfg.bpe_vocab_size, path, show_progress=show_progress)
        return HFTokenizer(path)
    path = Path(cfg.tokenizer).expanduser()
    if not path.is_file():
        raise UserError(f"data.tokenizer = {cfg.tokenizer!r}: no such file (allowed: byte, bpe, or a tokenizer.json path)")
    return HFTokenizer(path)


def prepare_corpus(cfg: DataConfig, show_progress: bool = True) -> TokenCorpus:
    """Return the tokenized corpus for ``cfg``, building the cache entry if missing."""
    files = resolve_files(cfg.source)
    tokenizer = load_tokenizer(cfg, files, show_progress)
    key = _digest(["tokens-v1", cfg.format, cfg.text_field, tokenizer.fingerprint, _files_fingerprint(files)])
    entry = Path(cfg.cache_dir).expanduser() / "tokens" / key
    if not (entry / "meta.json").is_file():
        try:
            _build_entry(cfg, files, tokenizer, entry, show_progress)
        except OSError as exc:  # a full or read-only cache directory
            raise UserError(f"data.cache_dir = {cfg.cache_dir!r}: cannot write the token cache "
                            f"({exc.strerror or exc}); free space there or set data.cache_dir") from None
    meta = json.loads((entry / "meta.json").read_text())
    return TokenCorpus(tokenizer, entry / "tokens.bin", meta["n_tokens"], meta["n_documents"], meta["dtype"])


def _build_entry(cfg: DataConfig, files: list[Path], tokenizer, entry: Path, show_progress: bool) -> None:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        n_tokens = n_documents = 0
        stats = ReadStats()
        progress, task = _progress("tokenizing", len(files), show_progress)
        with progress, open(tmp / "tokens.bin", "wb") as out:
            batch: list[str] = []

            def flush():
                nonlocal n_tokens
                for ids in tokenizer.encode_batch(batch):
                    if tokenizer.eos_id is not None:
                        ids = np.append(ids, tokenizer.eos_id)
                    out.write(ids.astype(dtype).tobytes())
                    n_tokens += len(ids)
                batch.clear()

            for path in files:
                for doc in read_documents(path, cfg.format, cfg.text_field, stats):
                    if doc:
                        batch.append(doc)
                        n_documents += 1
                    if len(batch) >= ENCODE_BATCH:
                        flush()
                progress.advance(task)
            flush()
            out.flush()
            os.fsync(out.fileno())
        if (message := stats.warning(len(files))) is not None:
            warn(message)
        if n_tokens == 0:
            raise UserError(f"data.source = {cfg.source!r}: the corpus is empty ({len(files)} file(s), no text)")
        meta = {"n_tokens": n_tokens, "n_documents": n_documents, "dtype": np.dtype(dtype).name,
                "n_files": len(files), "source": cfg.source, "tokenizer": tokenizer.fingerprint}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "meta.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
