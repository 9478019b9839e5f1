"""Tokenizers: a byte-level one that needs no files, and HF ``tokenizers``
(a byte-level BPE trained on the corpus, or any tokenizer.json)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from scaletrain.errors import UserError

EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus an end-of-document token 256."""

    vocab_size = 257
    eos_id = 256
    fingerprint = "byte-v1"

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0].tolist()

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A HF ``tokenizers.Tokenizer`` loaded from a tokenizer.json file."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exceptions
            raise UserError(f"data.tokenizer = {str(path)!r}: not a valid tokenizer.json ({exc})") from None
        self.path = path
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        ids = (self.tokenizer.token_to_id(name) for name in EOS_NAMES)
        self.eos_id = next((i for i in ids if i is not None), None)
        self.fingerprint = "hf-" + hashlib.sha256(path.read_bytes()).hexdigest()

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        try:
            encoded = self.tokenizer.encode_batch(texts)
        except Exception as exc:  # e.g. a BPE without an unknown token meeting a character it lacks
            raise UserError(f"data.tokenizer = {str(self.path)!r} cannot encode the corpus ({exc}); use a "
                            "tokenizer with an unknown token or byte fallback (e.g. data.tokenizer = 'bpe')") from None
        return [np.asarray(e.ids, dtype=np.int64) for e in encoded]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids))


def train_bpe(documents: Iterator[str], vocab_size: int, out_path: Path, show_progress: bool = True) -> Path:
    """Train a byte-level BPE on ``documents`` and save it as tokenizer.json (atomically)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=show_progress)
    tokenizer.train_from_iterator(documents, trainer=trainer)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(f".tmp{os.getpid()}")
    tokenizer.save(str(tmp))
    os.replace(tmp, out_path)
    return out_path
