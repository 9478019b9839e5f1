"""The paged KV cache: fixed-size blocks, reference-counted, with prefix
caching (Kwon et al. 2023, "Efficient Memory Management for Large Language
Model Serving with PagedAttention"; vLLM's automatic prefix caching).

``BlockManager`` is pure bookkeeping (no tensors): which block ids are free,
who holds them, and which full blocks hold a known prefix. A full block is
keyed by a hash of its tokens chained with the hash of every block before it,
so a hit on block i implies hits on blocks 0..i-1 and two prompts share a
block only when everything before it is equal too. Blocks nobody holds keep
their cached content until they are needed: they are evicted least recently
released first.

``KVCache`` holds the tensors: per layer, ``num_blocks`` blocks of
``block_size`` slots of (kv_heads, head_dim) for keys and values.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

import numpy as np
import torch


def block_hashes(tokens: list[int], block_size: int, start: int = 0, parent: bytes = b"") -> list[bytes]:
    """Chained hashes of the full blocks ``start, start+1, ...`` of ``tokens``;
    ``parent`` is the hash of block ``start - 1`` (b"" for the first block)."""
    hashes = []
    for begin in range(start * block_size, len(tokens) - block_size + 1, block_size):
        digest = hashlib.blake2b(parent, digest_size=16)
        digest.update(np.asarray(tokens[begin:begin + block_size], dtype=np.int64).tobytes())
        parent = digest.digest()
        hashes.append(parent)
    return hashes


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.free: deque[int] = deque(range(num_blocks))  # hold no cached prefix
        self.refs = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # prefix hash -> block
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, LRU first

    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    def usage(self) -> float:
        """Fraction of blocks held by running sequences (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free() / self.num_blocks

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def acquire_prefix(self, hashes: list[bytes]) -> list[int]:
        """Take a reference on the cached blocks matching the leading ``hashes``."""
        found = []
        for h in hashes if self.prefix_caching else ():
            block = self.cached.get(h)
            if block is None:
                break
            if self.refs[block] == 0:
                del self.evictable[block]
            self.refs[block] += 1
            found.append(block)
        return found

    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh blocks, evicting cached ones if needed; None if there are not enough."""
        if n > self.num_free():
            return None
        blocks = []
        for _ in range(n):
            if self.free:
                block = self.free.popleft()
            else:
                block, _ = self.evictable.popitem(last=False)
                del self.cached[self.hash_of[block]]
                self.hash_of[block] = None
            self.refs[block] = 1
            blocks.append(block)
        return blocks

    def register(self, block: int, block_hash: bytes) -> None:
        """``block`` is full and computed: make it findable by its prefix hash
        (unless another block already holds the same prefix)."""
        if self.prefix_caching and block_hash not in self.cached and self.hash_of[block] is None:
            self.cached[block_hash] = block
            self.hash_of[block] = block_hash

    def release(self, blocks: list[int]) -> None:
        # Last block first, so that eviction takes a sequence's tail before its
        # (more widely shared) head.
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if self.hash_of[block] is not None:
                    self.evictable[block] = None
                else:
                    self.free.append(block)


class KVCache:
    """Key/value tensors: (n_layers, num_blocks, block_size, kv_heads, head_dim) each."""

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype):
        shape = (n_layers, num_blocks, block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.block_size = block_size

    @staticmethod
    def bytes_per_token(n_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * n_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (N, kv_heads, head_dim) for the N new tokens at ``slots`` (N,), slot = block * block_size + offset."""
        self.k[layer].view(-1, *k.shape[1:]).index_copy_(0, slots, k)
        self.v[layer].view(-1, *v.shape[1:]).index_copy_(0, slots, v)


class RowKV:
    """A contiguous row of keys and values per running sequence: (n_layers,
    rows, kv_heads, max_len, head_dim) each, head-major so that a row's
    first L positions are (kv_heads, L, head_dim) as SDPA reads them. The CPU
    stand-in for a paged-attention kernel (see runner.py): a copy of what the
    sequence's blocks hold, filled once when it is admitted and appended to
    every step, so attention reads a view instead of gathering blocks."""

    def __init__(self, n_layers: int, rows: int, max_len: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
        shape = (n_layers, rows, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)

    @staticmethod
    def nbytes(n_layers: int, rows: int, max_len: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return rows * max_len * KVCache.bytes_per_token(n_layers, kv_heads, head_dim, dtype)

    def write(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (N, kv_heads, head_dim) of the N new tokens at (rows, positions) (N,) each."""
        self.k[layer, rows, :, positions] = k
        self.v[layer, rows, :, positions] = v

    def fill(self, layer: int, row: int, cache: KVCache, blocks: list[int], n_tokens: int) -> None:
        """Copy the first ``n_tokens`` of a sequence's blocks into its row."""
        index = torch.tensor(blocks)
        k = cache.k[layer].index_select(0, index).flatten(0, 1)[:n_tokens]  # (n_tokens, kv_heads, head_dim)
        v = cache.v[layer].index_select(0, index).flatten(0, 1)[:n_tokens]
        self.k[layer, row, :, :n_tokens] = k.transpose(0, 1)
        self.v[layer, row, :, :n_tokens] = v.transpose(0, 1)

    def keys_values(self, layer: int, start: int, stop: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of rows start..stop-1, first ``length`` positions: (rows, kv_heads, length, head_dim) each."""
        return self.k[layer, start:stop, :, :length], self.v[layer, start:stop, :, :length]
