"""Training rows over a token file with document boundaries.

A row is a list of *segments*; a segment of p pairs starting at token a is
the (input, target) pairs tokens[a + j] -> tokens[a + j + 1], j < p, so it
reads tokens[a : a + p + 1]. How documents become rows (``data.packing``):

- ``stream``: the documents back to back, cut into windows of seq_len pairs
  (today's behaviour: with every document in the training split, window i is
  tokens[i*T : i*T + T + 1], as before). A held-out split cuts the runs of
  consecutive training documents instead, dropping each run's tail.
- ``padded``: one document per row (a document longer than seq_len pairs is
  split into seq_len pieces), padded to the batch's longest row.
- ``packed``: those pieces placed into rows of seq_len pairs by best-fit
  decreasing (Johnson 1973: within 11/9 of the optimal row count), attention
  masked per document, positions restarting at 0 in each piece.

Targets that carry no loss (padding, non-assistant chat tokens) are
IGNORE_INDEX; padding has document id -1 (it attends only to padding).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass

import numpy as np
import torch

from scaletrain.errors import UserError
from scaletrain.model.llama import IGNORE_INDEX


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64, IGNORE_INDEX where no loss
    positions: torch.Tensor | None = None  # (B, T) int64, per document (packed / padded)
    doc_ids: torch.Tensor | None = None  # (B, T) int64, -1 on padding

    def to(self, device: torch.device) -> "Batch":
        move = (lambda t: None if t is None else t.to(device, non_blocking=True))
        return Batch(move(self.inputs), move(self.targets), move(self.positions), move(self.doc_ids))

    def model_kwargs(self) -> dict:
        return {} if self.positions is None else {"positions": self.positions, "doc_ids": self.doc_ids}


def split_documents(n_documents: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) document ids, sorted: a held-out fraction chosen by the seed."""
    all_docs = np.arange(n_documents)
    if val_fraction <= 0:
        return all_docs, all_docs[:0]
    n_val = int(round(val_fraction * n_documents))
    if n_val == 0 or n_val >= n_documents:
        raise UserError(f"data.val_fraction = {val_fraction} of {n_documents} document(s) leaves "
                        f"{'an empty validation' if n_val == 0 else 'no training'} split; allowed: a fraction "
                        f"giving 1 to {n_documents - 1} documents")
    rng = np.random.Generator(np.random.PCG64([seed, 0x5EED]))
    val = np.sort(rng.choice(n_documents, n_val, replace=False))
    return np.setdiff1d(all_docs, val), val


class Rows:
    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, docs: np.ndarray, seq_len: int, packing: str,
                 loss_mask: np.ndarray | None = None):
        self.tokens, self.loss_mask, self.seq_len, self.packing = tokens, loss_mask, seq_len, packing
        if packing == "stream":
            self.seg_start, self.seg_pairs = _stream_windows(offsets, docs, seq_len)
            self.row_ptr = np.arange(len(self.seg_start) + 1)
        else:
            self.seg_start, self.seg_pairs = _pieces(offsets, docs, seq_len)
            if packing == "packed":
                self._pack()
            else:
                self.row_ptr = np.arange(len(self.seg_start) + 1)
        self.lengths = np.add.reduceat(self.seg_pairs, self.row_ptr[:-1]) if len(self.seg_pairs) else \
            np.zeros(0, np.int64)  # pairs per row
        self.n_sequences = len(self.row_ptr) - 1
        self.n_truncated = int(np.sum(np.diff(offsets)[docs] - 1 > seq_len)) if packing != "stream" else 0

    def _pack(self) -> None:
        rows = best_fit_decreasing(self.seg_pairs, self.seq_len)
        order = np.lexsort((np.arange(len(rows)), rows))  # by row, then document order
        self.seg_start, self.seg_pairs = self.seg_start[order], self.seg_pairs[order]
        self.row_ptr = np.concatenate([[0], np.cumsum(np.bincount(rows))])

    def target_count(self, rows: np.ndarray) -> int:
        """Targets that carry loss in these rows (the loss normalizer)."""
        if self.loss_mask is None:
            return int(self.lengths[rows].sum())
        return sum(int(np.count_nonzero(self.loss_mask[a + 1:a + p + 1])) for a, p in self._segments(rows))

    def _segments(self, rows):
        for r in rows:
            for s in range(self.row_ptr[r], self.row_ptr[r + 1]):
                yield int(self.seg_start[s]), int(self.seg_pairs[s])

    def batch(self, rows: np.ndarray | list[int], pad_to: int | None = None, pad_multiple: int = 8) -> Batch:
        """Rows -> a Batch of width ``pad_to`` (default: the longest row, rounded
        up to ``pad_multiple``; stream windows are always seq_len)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.packing == "stream":
            return self._stream_batch(rows)
        shape = (len(rows), self.width(rows, pad_to, pad_multiple))
        inputs, targets = np.zeros(shape, np.int64), np.full(shape, IGNORE_INDEX, np.int64)
        positions, doc_ids = np.zeros(shape, np.int64), np.full(shape, -1, np.int64)
        for b, r in enumerate(rows):
            col = 0
            for k, s in enumerate(range(self.row_ptr[r], self.row_ptr[r + 1])):
                a, p = int(self.seg_start[s]), int(self.seg_pairs[s])
                piece = np.asarray(self.tokens[a:a + p + 1], dtype=np.int64)
                inputs[b, col:col + p], targets[b, col:col + p] = piece[:-1], self._targets(piece, a)
                positions[b, col:col + p], doc_ids[b, col:col + p] = np.arange(p), k
                col += p
        return Batch(*(torch.from_numpy(x) for x in (inputs, targets, positions, doc_ids)))

    def width(self, rows: np.ndarray, pad_to: int | None = None, pad_multiple: int = 8) -> int:
        """Positions per row in a batch of these rows."""
        if self.packing == "stream":
            return self.seq_len
        return pad_to or min(self.seq_len, -(-int(self.lengths[rows].max()) // pad_multiple) * pad_multiple)

    def _targets(self, piece: np.ndarray, start: int) -> np.ndarray:
        targets = piece[1:]
        if self.loss_mask is not None:
            keep = np.asarray(self.loss_mask[start + 1:start + len(piece)], dtype=bool)
            targets = np.where(keep, targets, IGNORE_INDEX)
        return targets

    def _stream_batch(self, rows: np.ndarray) -> Batch:
        T = self.seq_len
        starts = self.seg_start[rows]
        windows = np.stack([np.asarray(self.tokens[a:a + T + 1], dtype=np.int64) for a in starts])  # (B, T + 1)
        targets = windows[:, 1:]
        if self.loss_mask is not None:
            keep = np.stack([np.asarray(self.loss_mask[a + 1:a + T + 1], dtype=bool) for a in starts])
            targets = np.where(keep, targets, IGNORE_INDEX)
        return Batch(torch.from_numpy(windows)[:, :-1], torch.from_numpy(np.ascontiguousarray(targets)))


def _stream_windows(offsets: np.ndarray, docs: np.ndarray, T: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows of T pairs within each run of consecutive documents of ``docs``."""
    if len(docs) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    breaks = np.flatnonzero(np.diff(docs) != 1) + 1
    run_first, run_last = docs[np.r_[0, breaks]], docs[np.r_[breaks - 1, len(docs) - 1]]
    starts = []
    for first, last in zip(run_first, run_last):
        a, end = offsets[first], offsets[last + 1]
        starts.append(np.arange(a, end - T, T, dtype=np.int64)[: (end - a - 1) // T])  # each needs T + 1 tokens
    starts = np.concatenate(starts)
    return starts, np.full(len(starts), T, np.int64)


def _pieces(offsets: np.ndarray, docs: np.ndarray, T: int) -> tuple[np.ndarray, np.ndarray]:
    """Each document as pieces of at most T pairs (a document of n tokens has n - 1)."""
    start, pairs = offsets[docs], offsets[docs + 1] - offsets[docs] - 1
    keep = pairs > 0
    start, pairs = start[keep], pairs[keep]
    n_pieces = -(-pairs // T)
    first_piece = np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
    k = np.arange(int(n_pieces.sum())) - first_piece  # piece index within its document
    piece_start = np.repeat(start, n_pieces) + k * T
    piece_pairs = np.minimum(np.repeat(pairs, n_pieces) - k * T, T)
    return piece_start.astype(np.int64), piece_pairs.astype(np.int64)


def best_fit_decreasing(sizes: np.ndarray, capacity: int) -> np.ndarray:
    """Row of each item: items in decreasing size, each into the fullest row
    it fits. Rows are kept in buckets by free space, so a lookup is a bisect."""
    rows = np.empty(len(sizes), np.int64)
    free_sizes: list[int] = []  # sorted free capacities that have rows
    buckets: dict[int, list[int]] = {}
    n_rows = 0
    for item in np.argsort(-sizes, kind="stable"):
        size = int(sizes[item])
        j = bisect_left(free_sizes, size)
        if j == len(free_sizes):
            row, free = n_rows, capacity - size
            n_rows += 1
        else:
            old = free_sizes[j]
            row = buckets[old].pop()
            if not buckets[old]:
                del free_sizes[j], buckets[old]
            free = old - size
        rows[item] = row
        if free > 0:
            if free not in buckets:
                buckets[free] = []
                insort(free_sizes, free)
            buckets[free].append(row)
    return rows
