"""The token cache: a corpus is tokenized once into a flat memory-mapped token
file with its document offsets, keyed by a hash of (source files, reader
settings, tokenizer), and reused by later runs and by every rank.

Layout: ``<cache_dir>/tokens/<key>/{tokens.bin, offsets.bin, [loss_mask.bin],
meta.json}`` (see ``build.py``). A cache entry is built in a temporary
directory and renamed into place, so a crash or a bad input never leaves a
half-written entry behind, and two builders racing (one per node on a shared
file system) both end with the same complete entry. Opening an entry checks
each file's SHA-256 against meta.json (once per file version: the verified
size and mtime are remembered); a corrupted entry is rebuilt with a warning.
Entries of the older format (no offsets) have another key and are rebuilt.
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
from scaletrain.data.build import Encoder, EntryWriter, encode_stream, file_sha256
from scaletrain.data.chat import render_chat, tokenizer_chat_template
from scaletrain.data.sources import ReadStats, file_format, read_documents, resolve_files
from scaletrain.data.tokenizer import ByteTokenizer, HFTokenizer, train_bpe
from scaletrain.errors import UserError, warn

CACHE_FORMAT = "tokens-v2"  # v2: document offsets, loss masks, checksums


@dataclass
class TokenCorpus:
    tokenizer: ByteTokenizer | HFTokenizer
    tokens_path: Path
    n_tokens: int
    n_documents: int
    dtype: str
    has_loss_mask: bool = False

    def tokens(self) -> np.ndarray:
        return np.memmap(self.tokens_path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))

    def offsets(self) -> np.ndarray:
        """(n_documents + 1,) int64: document d is tokens[offsets[d]:offsets[d + 1]] (EOS included)."""
        return np.fromfile(self.tokens_path.with_name("offsets.bin"), dtype=np.int64)

    def loss_mask(self) -> np.ndarray | None:
        if not self.has_loss_mask:
            return None
        return np.memmap(self.tokens_path.with_name("loss_mask.bin"), dtype=np.uint8, mode="r",
                         shape=(self.n_tokens,))


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
            docs = (doc if isinstance(doc, str) else render_chat(doc, None, add_generation_prompt=False)
                    for f in files for doc in read_documents(f, cfg.format, cfg.text_field))
            train_bpe(docs, cfg.bpe_vocab_size, path, show_progress=show_progress)
        return HFTokenizer(path)
    path = Path(cfg.tokenizer).expanduser()
    if not path.is_file():
        raise UserError(f"data.tokenizer = {cfg.tokenizer!r}: no such file (allowed: byte, bpe, or a tokenizer.json path)")
    return HFTokenizer(path)


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def prepare_corpus(cfg: DataConfig, show_progress: bool = True, source: str | None = None) -> TokenCorpus:
    """Return the tokenized corpus for ``cfg`` (or another ``source`` read the
    same way, e.g. data.val_source), building the cache entry if missing."""
    source = cfg.source if source is None else source
    files = resolve_files(source)
    tokenizer = load_tokenizer(cfg, resolve_files(cfg.source) if source != cfg.source else files, show_progress)
    key = _digest([CACHE_FORMAT, cfg.format, cfg.text_field, tokenizer.fingerprint, _files_fingerprint(files)])
    entry = Path(cfg.cache_dir).expanduser() / "tokens" / key
    if (entry / "meta.json").is_file() and not _verified(entry):
        warn(f"data.cache_dir: the token cache {entry} is corrupted (checksum mismatch); rebuilding it")
        _discard(entry)
    if not (entry / "meta.json").is_file():
        try:
            _build_entry(cfg, source, files, tokenizer, entry, show_progress)
        except OSError as exc:  # a full or read-only cache directory
            raise UserError(f"data.cache_dir = {cfg.cache_dir!r}: cannot write the token cache "
                            f"({exc.strerror or exc}); free space there or set data.cache_dir") from None
    meta = json.loads((entry / "meta.json").read_text())
    return TokenCorpus(tokenizer, entry / "tokens.bin", meta["n_tokens"], meta["n_documents"], meta["dtype"],
                       "loss_mask.bin" in meta["sha256"])


def _verified(entry: Path) -> bool:
    """Every file matches meta.json's SHA-256; a file already verified at its
    current size and mtime is not hashed again (stamps in verified.json)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        stamps_path = entry / "verified.json"
        stamps = json.loads(stamps_path.read_text()) if stamps_path.is_file() else {}
    except (OSError, ValueError):
        return False
    fresh = {}
    for name, digest in meta.get("sha256", {}).items():
        path = entry / name
        if not path.is_file():
            return False
        stamp = [path.stat().st_size, path.stat().st_mtime_ns]
        if stamps.get(name) != stamp and file_sha256(path) != digest:
            return False
        fresh[name] = stamp
    if fresh != stamps:
        try:
            _write_atomic(stamps_path, json.dumps(fresh))
        except OSError:  # a read-only cache is still usable
            pass
    return "sha256" in meta


def _discard(entry: Path) -> None:
    """Move a bad entry aside (atomically) and delete it."""
    trash = entry.with_name(f".{entry.name}.bad-{os.getpid()}")
    try:
        os.rename(entry, trash)
    except OSError:
        return  # another builder moved it first
    shutil.rmtree(trash, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _build_entry(cfg: DataConfig, source: str, files: list[Path], tokenizer, entry: Path,
                 show_progress: bool) -> None:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    chat = any(file_format(f, cfg.format) == "chat" for f in files)
    template = tokenizer_chat_template(getattr(tokenizer, "path", None)) if chat else None
    encoder = Encoder(None if isinstance(tokenizer, ByteTokenizer) else str(tokenizer.path), template)
    workers = cfg.num_workers or default_workers()
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        stats = ReadStats()
        progress, task = _progress(f"tokenizing ({workers} process{'es' if workers > 1 else ''})", len(files),
                                   show_progress)

        def documents():
            for path in files:
                yield from read_documents(path, cfg.format, cfg.text_field, stats)
                progress.advance(task)

        writer = EntryWriter(tmp, dtype, with_mask=chat)
        with progress:
            for tokens, lengths, mask in encode_stream(encoder, documents(), workers):
                writer.write(tokens, lengths, mask)
        digests = writer.close(tmp)
        if writer.n_tokens == 0:
            raise UserError(f"data.source = {source!r}: the corpus is empty ({len(files)} file(s), no text)")
        if (message := stats.warning(len(files))) is not None:
            warn(message)
        meta = {"n_tokens": writer.n_tokens, "n_documents": writer.n_documents, "dtype": np.dtype(dtype).name,
                "n_files": len(files), "source": source, "tokenizer": tokenizer.fingerprint,
                "skipped_empty": stats.empty_documents, "skipped_binary_files": len(stats.binary_files),
                "sha256": digests}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "meta.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
