"""The data a trainer runs on: the tokenized corpus (built by one process
per node while the node's other ranks wait), the training and validation
rows, and this rank's sampler."""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config import Config
from scaletrain.data import DistributedBatchSampler, Rows, TokenCorpus
from scaletrain.train.checks import build_sampler, prepare_data, resolve_vocab, training_rows, wait_for_data


@dataclass
class TrainingData:
    cfg: Config  # with model.vocab_size resolved from the tokenizer
    corpus: TokenCorpus
    rows: Rows
    val_rows: Rows | None
    sampler: DistributedBatchSampler

    @property
    def token_normalized(self) -> bool:
        """Documents or chat masks make token counts vary from row to row."""
        d = self.cfg.data
        return d.packing != "stream" or d.batching != "fixed" or self.corpus.has_loss_mask


def load_data(cfg: Config, runtime, dp_rank: int, dp_size: int, show_progress: bool) -> TrainingData:
    if runtime.local_rank == 0:
        corpus, val_corpus = prepare_data(cfg, show_progress=show_progress and runtime.is_main)
    wait_for_data(runtime, cfg.data.cache_timeout)
    if runtime.local_rank != 0:
        corpus, val_corpus = prepare_data(cfg, show_progress=False)
    cfg = resolve_vocab(cfg, corpus.tokenizer.vocab_size)
    rows, val_rows = training_rows(cfg, corpus, val_corpus)
    # The sampler checks that one step can be filled (check_data's test, done once here).
    return TrainingData(cfg, corpus, rows, val_rows, build_sampler(cfg, rows, dp_rank, dp_size))
