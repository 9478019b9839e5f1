"""Fixed-length training sequences over a token file, and a stateful
distributed sampler over them.

Sequence i is tokens[i*T : i*T + T + 1] (inputs and shifted targets), so the
corpus is cut into non-overlapping windows. Each optimizer step consumes one
*global* batch of ``global_batch_size`` sequences from a seeded permutation of
the epoch; data-parallel rank r takes the r-th contiguous slice of it. Hence:

- deterministic for (seed, epoch), whatever the number of ranks;
- disjoint across ranks, and every rank runs the same number of steps by
  construction (an epoch is ``n_sequences // global_batch_size`` steps; the
  remainder of the permutation is dropped);
- the state is a position in the *global* stream (epoch, step), so it restores
  exactly mid-epoch, and carries over unchanged to a different data-parallel
  size: the next global batch is the same, only its split across ranks changes.
"""

from __future__ import annotations

import numpy as np
import torch

from scaletrain.errors import UserError


class SequenceDataset:
    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.n_sequences = (len(tokens) - 1) // seq_len

    def batch(self, indices: list[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """-> inputs, targets, each (len(indices), seq_len) int64."""
        T = self.seq_len
        rows = np.stack([np.asarray(self.tokens[i * T: i * T + T + 1], dtype=np.int64) for i in indices])
        rows_t = torch.from_numpy(rows)  # (B, T + 1)
        return rows_t[:, :-1], rows_t[:, 1:]


class DistributedBatchSampler:
    def __init__(self, n_sequences: int, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0):
        if global_batch_size % dp_size:
            raise UserError(f"training.global_batch_size = {global_batch_size} is not divisible by the "
                            f"data-parallel size {dp_size}")
        self.steps_per_epoch = n_sequences // global_batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"the corpus holds {n_sequences} sequences of data.seq_len tokens, fewer than "
                            f"training.global_batch_size = {global_batch_size}; use more data or smaller values")
        self.n_sequences, self.global_batch_size = n_sequences, global_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.epoch = self.step = 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch]))
            self._perm, self._perm_epoch = rng.permutation(self.n_sequences), self.epoch
        return self._perm

    def next_global_batch(self) -> np.ndarray:
        """Indices of the next global batch (all ranks), advancing the position."""
        start = self.step * self.global_batch_size
        indices = self._permutation()[start: start + self.global_batch_size]
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return indices

    def next_batch(self) -> np.ndarray:
        """This rank's slice of the next global batch: global_batch_size / dp_size indices."""
        per_rank = self.global_batch_size // self.dp_size
        return self.next_global_batch()[self.dp_rank * per_rank: (self.dp_rank + 1) * per_rank]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed,
                "n_sequences": self.n_sequences, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "n_sequences", "global_batch_size"):
            if state[key] != getattr(self, key):
                raise UserError(f"sampler state has {key} = {state[key]}, this run has {getattr(self, key)}; "
                                "the data order cannot be resumed exactly")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
