"""Continuous batching with chunked prefill under a token budget, over the
paged KV cache (Yu et al. 2022, "Orca"; Agrawal et al. 2024, "Sarathi-Serve").

Every step the scheduler hands out at most ``max_batch_tokens`` new tokens:
first to the running sequences in arrival order (one token for a decoding
sequence, the rest of its prompt or a chunk of it for a prefilling one), then
to waiting sequences, which join the running batch while the budget, the
sequence limit and free blocks allow. A sequence is a prefill and a decode in
the same terms: it has ``len(tokens)`` tokens of which ``num_computed`` have
their K/V in the cache; a step computes the next ``n`` of them, and when that
reaches the end the model's next token is sampled.

When a running sequence needs a block and none is free, the youngest running
sequence is preempted: its blocks are released and it goes back to the front
of the queue, to be recomputed from its tokens (prompt and output so far) when
blocks are free again (vLLM's recompute preemption). Its full blocks stay in
the prefix cache, so the recompute often hits.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from scaletrain.serve.kv_cache import BlockManager, block_hashes
from scaletrain.serve.sampling import SamplingParams


@dataclass(eq=False)
class Sequence:
    seq_id: int
    tokens: list[int]  # prompt, then the output so far
    prompt_len: int
    params: SamplingParams
    generator: torch.Generator | None = None
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # of the full blocks registered so far
    arrival_s: float = field(default_factory=time.monotonic)
    scheduled_s: float | None = None  # first admitted to the running batch
    preemptions: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    row: int | None = None  # its row in the row cache while running (runner.py)
    row_filled: bool = False  # its cached / recomputed tokens were copied into the row

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclass
class SchedulerStats:
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of which found
    preemptions: int = 0


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_batch_tokens: int, rows: bool = False):
        self.blocks, self.max_num_seqs, self.max_batch_tokens = blocks, max_num_seqs, max_batch_tokens
        # Row-cache rows of running sequences, lowest first so the rows in use stay packed.
        self.free_rows: list[int] | None = list(range(max_num_seqs)) if rows else None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = SchedulerStats()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """This step's (sequence, new tokens to compute), blocks allocated."""
        budget, scheduled, preemptions = self.max_batch_tokens, [], self.stats.preemptions
        for seq in list(self.running):
            # Victims are taken from the young end, so a sequence gone from
            # ``running`` means every later one is gone too.
            if budget == 0 or seq not in self.running:
                break
            n = min(len(seq.tokens) - seq.num_computed, budget)
            if self._grow(seq, seq.num_computed + n):
                scheduled.append((seq, n))
                budget -= n
        # No admissions in a step that had to preempt: blocks are short.
        while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
               and self.stats.preemptions == preemptions):
            n = self._admit(self.waiting[0], budget)
            if n == 0:
                break
            seq = self.waiting.popleft()
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        return scheduled

    def _grow(self, seq: Sequence, n_tokens: int) -> bool:
        """Give ``seq`` blocks for ``n_tokens``, preempting the youngest running
        sequences as needed; False if ``seq`` itself had to go."""
        need = self.blocks.blocks_for(n_tokens) - len(seq.blocks)
        while need > self.blocks.num_free():
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        seq.blocks += self.blocks.allocate(need) if need > 0 else []
        return True

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Blocks for the first chunk of a waiting sequence (reusing cached
        prefix blocks); its chunk length, or 0 if it must keep waiting."""
        bs = self.blocks.block_size
        # At least one token must be computed, for the logits of the next one.
        hashes = block_hashes(seq.tokens[:len(seq.tokens) - 1], bs)
        cached = self.blocks.acquire_prefix(hashes)
        n = min(len(seq.tokens) - len(cached) * bs, budget)
        fresh = self.blocks.allocate(self.blocks.blocks_for(len(cached) * bs + n) - len(cached))
        if fresh is None:
            self.blocks.release(cached)
            return 0
        if seq.preemptions == 0:
            self.stats.prefix_queries += seq.prompt_len
            self.stats.prefix_hits += min(len(cached) * bs, seq.prompt_len)
            seq.cached_tokens = len(cached) * bs
        seq.blocks, seq.hashes = cached + fresh, hashes[:len(cached)]
        seq.num_computed = len(cached) * bs
        if self.free_rows is not None:
            seq.row, seq.row_filled = heapq.heappop(self.free_rows), False
        if seq.scheduled_s is None:
            seq.scheduled_s = time.monotonic()
        return n

    def computed(self, seq: Sequence, n: int) -> None:
        """``n`` more tokens of ``seq`` have their K/V in the cache: register its newly full blocks."""
        seq.num_computed += n
        full = seq.num_computed // self.blocks.block_size
        if full > len(seq.hashes):
            parent = seq.hashes[-1] if seq.hashes else b""
            new = block_hashes(seq.tokens[:full * self.blocks.block_size], self.blocks.block_size,
                               len(seq.hashes), parent)
            for index, block_hash in enumerate(new, start=len(seq.hashes)):
                self.blocks.register(seq.blocks[index], block_hash)
            seq.hashes += new

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.blocks)
        self._free_row(seq)
        seq.blocks, seq.hashes, seq.num_computed = [], [], 0
        seq.preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Done or cancelled, wherever it is: its blocks go back."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.blocks)
        self._free_row(seq)
        seq.blocks = []

    def _free_row(self, seq: Sequence) -> None:
        if seq.row is not None:
            heapq.heappush(self.free_rows, seq.row)
            seq.row = None
