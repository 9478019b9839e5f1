"""Batch, vocabulary and data checks the launcher runs before any worker
starts (and the trainer again in each worker)."""

from __future__ import annotations

import dataclasses

from scaletrain.config import Config
from scaletrain.data import DistributedBatchSampler, SequenceDataset, TokenCorpus
from scaletrain.errors import UserError
from scaletrain.parallel.dims import ParallelDims

VOCAB_MULTIPLE = 64


def grad_accum_steps(cfg: Config, dims: ParallelDims) -> int:
    """global = micro x dp x accumulation, all integers."""
    t = cfg.training
    per_step = t.micro_batch_size * dims.dp_size
    if t.global_batch_size % per_step:
        raise UserError(f"training.global_batch_size = {t.global_batch_size} is not divisible by "
                        f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {dims.dp_size}")
    return t.global_batch_size // per_step


def resolve_vocab(cfg: Config, vocab_size: int) -> Config:
    """model.vocab_size 0 -> the tokenizer's vocabulary rounded up to 64."""
    if cfg.model.vocab_size == 0:
        padded = -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=padded))
    if cfg.model.vocab_size < vocab_size:
        raise UserError(f"model.vocab_size = {cfg.model.vocab_size} is smaller than the tokenizer's "
                        f"vocabulary ({vocab_size}); use 0 to size it from the tokenizer")
    return cfg


def check_data(cfg: Config, corpus: TokenCorpus) -> SequenceDataset:
    dataset = SequenceDataset(corpus.tokens(), cfg.data.seq_len)
    # Raises a UserError when the corpus cannot fill one global batch.
    DistributedBatchSampler(dataset.n_sequences, cfg.training.global_batch_size)
    return dataset
