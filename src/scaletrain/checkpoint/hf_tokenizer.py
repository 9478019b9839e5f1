"""A checkpoint's tokenizer as HF files (tokenizer.json, tokenizer_config.json
with the EOS token and the chat template of ``scaletrain.data.chat``).

The byte tokenizer becomes a byte-level BPE without merges whose vocabulary
maps GPT-2's byte-to-unicode alphabet (Radford et al. 2019) to ids 0..255,
plus ``<|endoftext|>`` = 256: HF ``tokenizers`` then encodes and decodes
exactly as ``ByteTokenizer`` does."""

from __future__ import annotations

import json
from pathlib import Path

from scaletrain.data.chat import CHAT_TEMPLATE
from scaletrain.data.tokenizer import ByteTokenizer, HFTokenizer

BYTE_EOS = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer_json() -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(BYTE_EOS, special=True)])
    return tokenizer.to_str()


def checkpoint_tokenizer(cfg) -> ByteTokenizer | HFTokenizer:
    """The tokenizer a run trained with (a 'bpe' one from the token cache,
    retrained from the same files if the cache is gone)."""
    if cfg.data.tokenizer == "byte":
        return ByteTokenizer()
    from scaletrain.data.cache import load_tokenizer
    from scaletrain.data.sources import resolve_files

    if cfg.data.tokenizer == "bpe":
        return load_tokenizer(cfg.data, resolve_files(cfg.data.source), show_progress=False)
    return load_tokenizer(cfg.data, [], show_progress=False)


def eos_token(tokenizer: ByteTokenizer | HFTokenizer) -> str | None:
    if isinstance(tokenizer, ByteTokenizer):
        return BYTE_EOS
    return None if tokenizer.eos_id is None else tokenizer.tokenizer.id_to_token(tokenizer.eos_id)


def write_hf_tokenizer(tokenizer: ByteTokenizer | HFTokenizer, out_dir: Path, max_seq_len: int) -> None:
    text = byte_tokenizer_json() if isinstance(tokenizer, ByteTokenizer) else tokenizer.path.read_text()
    (out_dir / "tokenizer.json").write_text(text)
    eos = eos_token(tokenizer)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos,
              "bos_token": None, "add_bos_token": False, "model_max_length": max_seq_len,
              "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
