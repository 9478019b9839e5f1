"""A stateful distributed sampler of training rows, step by step.

Each optimizer step consumes one *global* batch: ``micro_per_step`` micro
batches (global_batch_size / micro_batch_size), of which data-parallel rank r
runs the r-th contiguous share. How micro batches are formed
(``data.batching``):

- ``fixed``: a seeded permutation of the epoch, cut into global batches of
  global_batch_size rows, each cut into micro batches of micro_batch_size.
- ``length_grouped``: the permutation in groups of ``group_size`` global
  batches; each group sorted by row length (longest first) and cut into global
  batches whose order is then shuffled (HF Trainer's ``group_by_length``), so
  the rows of a micro batch have similar lengths and little padding.
- ``token_budget``: each group sorted the same way, then cut greedily into
  micro batches of at most ``max_tokens_per_batch`` tokens (rows x the longest
  row), shuffled; every ``micro_per_step`` of them make a step.

Hence, for every mode: deterministic for (seed, epoch) whatever the number of
ranks; every rank runs the same number of steps (an epoch is the whole
number of steps the plan holds, the remainder is dropped); the state is a
position in the global stream (epoch, step), so it restores exactly mid-epoch
and carries over unchanged to another data-parallel size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scaletrain.errors import UserError


@dataclass
class Step:
    micro: list[np.ndarray]  # this rank's micro batches (row indices)
    all_micro: list[np.ndarray]  # every rank's, in rank order
    rows: np.ndarray  # every row of the global step


class DistributedBatchSampler:
    def __init__(self, lengths: np.ndarray | int, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, micro_batch_size: int | None = None, batching: str = "fixed",
                 max_tokens: int = 0, group_size: int = 50):
        self.lengths = np.full(lengths, 1, np.int64) if isinstance(lengths, (int, np.integer)) else lengths
        self.n_sequences = len(self.lengths)
        micro = micro_batch_size or global_batch_size // dp_size
        self.micro_per_step = global_batch_size // micro if global_batch_size % micro == 0 else 0
        if global_batch_size % dp_size or not self.micro_per_step or self.micro_per_step % dp_size:
            raise UserError(f"training.global_batch_size = {global_batch_size} is not divisible by "
                            f"micro_batch_size x data-parallel size = {micro} x {dp_size}")
        if batching == "token_budget" and self.n_sequences and max_tokens < int(self.lengths.max()):
            raise UserError(f"data.max_tokens_per_batch = {max_tokens} is below the longest row "
                            f"({int(self.lengths.max())} tokens: documents are cut at data.seq_len); "
                            f"allowed: >= {int(self.lengths.max())}")
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.batching, self.max_tokens, self.group_size = batching, max_tokens, group_size
        self.epoch = self.step = 0
        self.tokens_seen = 0  # tokens of the rows consumed so far (padding excluded)
        self.rank_rows: list[int] | None = None  # rows per rank (parallel.rank_batch); None = even micro batches
        self._plan_epoch, self._plan = -1, []
        if self.steps_per_epoch == 0:
            raise UserError(f"the corpus holds {self.n_sequences} training rows of at most data.seq_len tokens, "
                            f"fewer than one step needs (training.global_batch_size = {global_batch_size}"
                            f"{', data.max_tokens_per_batch = %d' % max_tokens if batching == 'token_budget' else ''}"
                            "); use more data or smaller values")

    @property
    def steps_per_epoch(self) -> int:
        return len(self._epoch_plan()) // self.micro_per_step

    def _epoch_plan(self) -> list[np.ndarray]:
        """The epoch's micro batches, in order."""
        if self._plan_epoch != self.epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch]))
            perm = rng.permutation(self.n_sequences)
            self._plan = self._token_budget(perm, rng) if self.batching == "token_budget" else \
                self._fixed(perm, rng)
            self._plan_epoch = self.epoch
        return self._plan

    def _fixed(self, perm: np.ndarray, rng) -> list[np.ndarray]:
        G, m = self.global_batch_size, self.micro_batch_size
        perm = perm[: len(perm) // G * G]
        if self.batching == "length_grouped":
            batches = []
            for group in self._groups(perm, G * self.group_size):
                sorted_rows = group[np.argsort(-self.lengths[group], kind="stable")]
                batches += [sorted_rows[i:i + G] for i in range(0, len(sorted_rows), G)]
            perm = np.concatenate([batches[i] for i in rng.permutation(len(batches))]) if batches else perm
        return [perm[i:i + m] for i in range(0, len(perm), m)]

    def _token_budget(self, perm: np.ndarray, rng) -> list[np.ndarray]:
        micro = []
        for group in self._groups(perm, self.global_batch_size * self.group_size):
            sorted_rows = group[np.argsort(-self.lengths[group], kind="stable")]
            i = 0
            while i < len(sorted_rows):  # the first row of a micro batch is its longest
                n = max(1, self.max_tokens // int(self.lengths[sorted_rows[i]]))
                micro.append(sorted_rows[i:i + n])
                i += n
        return [micro[i] for i in rng.permutation(len(micro))]

    @staticmethod
    def _groups(perm: np.ndarray, size: int):
        return (perm[i:i + size] for i in range(0, len(perm), size))

    def set_rank_rows(self, rank_rows: list[int] | None, micro_steps: list[int] | None = None) -> None:
        """Cut each global batch into these many rows per rank (in rank order),
        each rank's rows into ``micro_steps[rank]`` micro batches (default
        micro_per_step / dp_size); the global order and hence the state are
        unchanged (train.rank_batch)."""
        if rank_rows is not None and (len(rank_rows) != self.dp_size or sum(rank_rows) != self.global_batch_size):
            raise UserError(f"rows per rank {rank_rows} do not split training.global_batch_size = "
                            f"{self.global_batch_size} over {self.dp_size} data-parallel ranks")
        self.rank_rows = rank_rows
        self.rank_micro_steps = micro_steps or [self.micro_per_step // self.dp_size] * self.dp_size

    def next_step(self) -> Step:
        """This rank's micro batches of the next step, advancing the position."""
        k, per_rank = self.micro_per_step, self.micro_per_step // self.dp_size
        micro = self._epoch_plan()[self.step * k:(self.step + 1) * k]
        rows = np.concatenate(micro)
        self.tokens_seen += int(self.lengths[rows].sum())
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        mine = micro[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        if self.rank_rows is not None:
            ends = np.cumsum(self.rank_rows)
            by_rank = [np.array_split(rows[ends[r] - self.rank_rows[r]:ends[r]], self.rank_micro_steps[r])
                       for r in range(self.dp_size)]
            micro, mine = [m for pieces in by_rank for m in pieces], by_rank[self.dp_rank]
        return Step(mine, micro, rows)

    def next_batch(self) -> np.ndarray:
        """This rank's rows of the next step, concatenated."""
        return np.concatenate(self.next_step().micro)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "n_sequences": self.n_sequences,
                "global_batch_size": self.global_batch_size, "batching": self.batching,
                "max_tokens": self.max_tokens, "group_size": self.group_size,
                "micro_per_step": self.micro_per_step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict) -> None:
        # Checkpoints from before batching modes hold fixed batching's values.
        defaults = {"batching": "fixed", "max_tokens": 0, "group_size": self.group_size}
        keys = ["seed", "n_sequences", "global_batch_size", "batching"]
        keys += ["group_size"] if self.batching != "fixed" else []
        keys += ["max_tokens", "micro_per_step"] if self.batching == "token_budget" else []
        for key in keys:
            if state.get(key, defaults.get(key)) != getattr(self, key):
                raise UserError(f"sampler state has {key} = {state.get(key, defaults.get(key))}, this run has "
                                f"{getattr(self, key)}; the data order cannot be resumed exactly")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        # Before batching modes every row had the same length.
        steps = self.epoch * self.steps_per_epoch + self.step
        self.tokens_seen = int(state.get("tokens_seen", steps * self.global_batch_size * int(self.lengths[0])))
