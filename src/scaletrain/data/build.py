"""Building a token-cache entry: documents are read in order, tokenized in
``data.num_workers`` processes, and written incrementally, so a corpus larger
than memory streams through (at most 2 x workers chunks are in flight).

Files of an entry (the cache layout is in ``cache.py``):
- ``tokens.bin``: every document's tokens followed by EOS, back to back;
- ``offsets.bin``: int64 start of each document, plus the end (n_documents + 1);
- ``loss_mask.bin`` (chat data only): uint8 per token, 1 where the token is
  part of an assistant turn (the only tokens trained on);
- ``meta.json``: counts, dtype and a SHA-256 of each file, written last.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from scaletrain.data.chat import chat_segments

ENCODE_BATCH = 256  # documents per task: large enough to amortize the inter-process copy

_worker_state: dict = {}


@dataclass
class Encoder:
    """What a tokenization worker needs (picklable: the tokenizer is re-opened there)."""

    tokenizer_path: str | None  # None = the byte tokenizer
    chat_template: str | None
    _tokenizer: object = field(default=None, repr=False)

    def tokenizer(self):
        if self._tokenizer is None:
            from scaletrain.data.tokenizer import ByteTokenizer, HFTokenizer

            self._tokenizer = ByteTokenizer() if self.tokenizer_path is None else HFTokenizer(Path(self.tokenizer_path))
        return self._tokenizer

    def encode(self, docs: list) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """-> (tokens of all docs with EOS after each, per-doc lengths, loss mask or None)."""
        tok = self.tokenizer()
        eos = [] if tok.eos_id is None else [tok.eos_id]
        if docs and isinstance(docs[0], str):
            ids = [np.concatenate([d, eos]) if eos else d for d in tok.encode_batch(docs)]
            return _concat(ids), np.array([len(d) for d in ids], dtype=np.int64), None
        pieces, masks = [], []
        for messages in docs:
            segments = chat_segments(messages, self.chat_template)
            encoded = tok.encode_batch([text for text, _ in segments])
            ends_with_reply = segments[-1][1]
            pieces.append(np.concatenate([*encoded, eos]))
            masks.append(np.concatenate([np.full(len(e), train, dtype=np.uint8) for e, (_, train)
                                         in zip(encoded, segments)] + [np.full(len(eos), ends_with_reply, np.uint8)]))
        return _concat(pieces), np.array([len(p) for p in pieces], dtype=np.int64), _concat(masks, np.uint8)


def _concat(arrays: list[np.ndarray], dtype=np.int64) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.empty(0, dtype)


def _init_worker(encoder: Encoder) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _worker_state["encoder"] = encoder


def _encode_in_worker(docs: list):
    return _worker_state["encoder"].encode(docs)


def chunks(documents: Iterable, size: int = ENCODE_BATCH) -> Iterator[list]:
    batch: list = []
    for doc in documents:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_stream(encoder: Encoder, documents: Iterable, workers: int) -> Iterator[tuple]:
    """Encoded chunks in document order, from ``workers`` processes (1 = here)."""
    if workers <= 1:
        yield from map(encoder.encode, chunks(documents))
        return
    # fork: no re-import of __main__ (spawn's pitfall). The workers use the
    # tokenizer single-threaded; saying so before the fork keeps HF tokenizers
    # from warning that its thread pool was forked.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(encoder,))
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    with pool:
        pending: deque = deque()
        for chunk in chunks(documents):
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * workers:  # bounded: the reader never runs far ahead
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class EntryWriter:
    """Appends encoded chunks to an entry's files, hashing as it writes."""

    def __init__(self, directory: Path, dtype, with_mask: bool):
        self.dtype = np.dtype(dtype)
        self.files = {"tokens.bin": open(directory / "tokens.bin", "wb")}
        if with_mask:
            self.files["loss_mask.bin"] = open(directory / "loss_mask.bin", "wb")
        self.hashes = {name: hashlib.sha256() for name in [*self.files, "offsets.bin"]}
        self.lengths: list[np.ndarray] = []
        self.n_tokens = self.n_documents = 0

    def write(self, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None) -> None:
        self._append("tokens.bin", tokens.astype(self.dtype).tobytes())
        if "loss_mask.bin" in self.files:
            self._append("loss_mask.bin", mask.tobytes())
        self.lengths.append(lengths)
        self.n_tokens += len(tokens)
        self.n_documents += len(lengths)

    def _append(self, name: str, data: bytes) -> None:
        self.files[name].write(data)
        self.hashes[name].update(data)

    def close(self, directory: Path) -> dict[str, str]:
        """Flush everything to disk; -> the SHA-256 of each file."""
        offsets = np.concatenate([[0], np.cumsum(np.concatenate(self.lengths or [np.empty(0, np.int64)]))])
        data = offsets.astype(np.int64).tobytes()
        self.hashes["offsets.bin"].update(data)
        (directory / "offsets.bin").write_bytes(data)
        for fh in self.files.values():
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
        return {name: h.hexdigest() for name, h in self.hashes.items()}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()
