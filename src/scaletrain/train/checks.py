"""Batch, vocabulary and data checks the launcher runs before any worker
starts (and the trainer again in each worker)."""

from __future__ import annotations

import dataclasses

import numpy as np

from scaletrain.config import Config
from scaletrain.data import DistributedBatchSampler, Rows, TokenCorpus, prepare_corpus, split_documents
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


def prepare_data(cfg: Config, show_progress: bool = True) -> tuple[TokenCorpus, TokenCorpus | None]:
    """The training corpus and the data.val_source corpus (if any), tokenized into the cache."""
    corpus = prepare_corpus(cfg.data, show_progress=show_progress)
    val = prepare_corpus(cfg.data, show_progress=show_progress, source=cfg.data.val_source) \
        if cfg.data.val_source else None
    return corpus, val


def wait_for_data(runtime, timeout_s: float, store=None) -> None:
    """Local rank 0 has built the token cache (or found it): it says so in the
    store, under this node's name; its node's other ranks wait, at most
    data.cache_timeout. (A builder that dies ends the job through its agent.)"""
    if not runtime.distributed:
        return
    import os
    from datetime import timedelta

    import torch.distributed as dist

    store = store or dist.distributed_c10d._get_default_store()
    key = f"scaletrain/data_ready/{os.environ.get('GROUP_RANK', '0')}"
    if runtime.local_rank == 0:
        store.set(key, "1")
        return
    try:
        store.wait([key], timedelta(seconds=timeout_s))
    except Exception:  # c10d raises a DistStoreError (a RuntimeError) on timeout
        raise RuntimeError(f"local rank 0 did not finish building the token cache within data.cache_timeout = "
                           f"{timeout_s:g} s") from None


def training_rows(cfg: Config, corpus: TokenCorpus, val_corpus: TokenCorpus | None = None) -> tuple[Rows, Rows | None]:
    """The training rows and the validation rows (data.val_source, or the
    documents data.val_fraction holds out), cut as data.packing says."""
    d = cfg.data
    offsets = corpus.offsets()
    train_docs, val_docs = split_documents(corpus.n_documents, d.val_fraction, cfg.training.seed)
    rows = Rows(corpus.tokens(), offsets, train_docs, d.seq_len, d.packing, corpus.loss_mask())
    val = None
    if val_corpus is not None:
        val = Rows(val_corpus.tokens(), val_corpus.offsets(), np.arange(val_corpus.n_documents), d.seq_len,
                   d.packing, val_corpus.loss_mask())
    elif len(val_docs):
        val = Rows(corpus.tokens(), offsets, val_docs, d.seq_len, d.packing, corpus.loss_mask())
    if val is not None and val.n_sequences < cfg.training.global_batch_size:
        where = f"data.val_source = {d.val_source!r}" if val_corpus is not None else f"data.val_fraction = {d.val_fraction}"
        raise UserError(f"{where}: the validation split holds {val.n_sequences} row(s) of data.seq_len tokens, "
                        f"fewer than one global batch (training.global_batch_size = {cfg.training.global_batch_size})")
    return rows, val


def build_sampler(cfg: Config, rows: Rows, dp_rank: int = 0, dp_size: int = 1) -> DistributedBatchSampler:
    t, d = cfg.training, cfg.data
    return DistributedBatchSampler(rows.lengths, t.global_batch_size, dp_rank, dp_size, t.seed,
                                   t.micro_batch_size, d.batching, d.max_tokens_per_batch, d.group_size)


def check_data(cfg: Config, corpus: TokenCorpus, val_corpus: TokenCorpus | None = None) -> tuple[Rows, Rows | None]:
    """The rows, after checking one step can be filled (a UserError if not)."""
    rows, val = training_rows(cfg, corpus, val_corpus)
    build_sampler(cfg, rows)
    return rows, val


def data_report(rows: Rows) -> str | None:
    """What packing did to documents, said once (nothing is silently cut)."""
    if rows.n_truncated:
        return (f"data.seq_len = {rows.seq_len}: {rows.n_truncated} document(s) longer than a row were split "
                "into seq_len pieces (attention does not cross pieces)")
    return None
