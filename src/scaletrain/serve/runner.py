"""One forward pass over a step's tokens with the paged KV cache, using the
model's own modules (embedding, norms, projections, MLP, head, RoPE tables).

All new tokens of a step — one per decoding sequence, a chunk per prefilling
one — are packed into one (1, N) row, so every linear layer runs once per step
whatever the mix. Attention is the only per-sequence part, in
``paged_attention``: the seam where a fused paged-attention kernel (vLLM's,
FlashInfer's) reading the block table directly would go on a GPU. On CPU it
reads keys and values one of two ways:

- gather: each step, copy every sequence's blocks into contiguous tensors
  (whole blocks, ``index_select``) and run SDPA with a mask;
- rows (default where memory allows, kv_cache.RowKV): every running sequence
  also owns a contiguous row to which each new token's K/V is appended; its
  blocks are copied in once, when it is admitted with cached or recomputed
  tokens. Decoding sequences then attend to a view of the rows, with no copy
  per step. The paged cache stays the store that prefix caching, preemption
  and block accounting work on.

Under tensor parallelism the model's linear layers are DTensor-parallel
(parallel/tensor_parallel.py, the training plan): calling them on plain tensors
runs their all-reduces, and each rank's cache holds its own KV heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scaletrain.model.llama import Llama, apply_rope
from scaletrain.serve.kv_cache import KVCache, RowKV


@dataclass
class AttentionGroup:
    """Sequences whose attention runs as one SDPA call.

    query_rows (B, Q): rows of the packed tokens holding each sequence's new
    tokens (padding repeats a valid row); mask (B, 1, Q, L): which keys a
    query may see (causal, within the context). The keys are either the
    blocks of ``block_tables`` (B, max_blocks), padded with block 0 (gather),
    or the rows ``row_range`` of the row cache (rows)."""

    query_rows: torch.Tensor
    mask: torch.Tensor
    valid: torch.Tensor  # (B, Q) bool: real (not padding) queries
    block_tables: torch.Tensor | None = None
    row_range: tuple[int, int] | None = None


@dataclass
class SeqWork:
    """One sequence's part of a step."""

    new: list[int]  # tokens to compute
    start: int  # position of the first
    blocks: list[int]  # block table
    sample: bool  # sample the next token after the last one
    row: int | None = None  # its row in the row cache (None: attention gathers blocks)
    fill: int = 0  # tokens to copy from its blocks into its row first (cached or recomputed)


@dataclass
class StepBatch:
    """Everything one forward needs; rank 0 builds it and broadcasts it to TP workers."""

    token_ids: torch.Tensor  # (N,)
    positions: torch.Tensor  # (N,)
    slots: torch.Tensor  # (N,) cache slot of each new token
    groups: list[AttentionGroup]
    sample_rows: torch.Tensor  # (S,) rows whose next-token logits are wanted
    token_rows: torch.Tensor | None = None  # (N,) row-cache row of each new token
    fills: list[tuple[int, list[int], int]] | None = None  # (row, blocks, tokens) to copy in first


def _causal(ns: torch.Tensor, ctxs: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For sequences with ns new tokens ending a context of ctxs (B,): (query
    index (B, Q), mask (B, 1, Q, L), valid (B, Q)). Query j sits at position
    ctx - n + j and sees keys 0..ctx - n + j; padding repeats the last query."""
    q_max = int(ns.max())
    q_index = torch.minimum(torch.arange(q_max)[None, :], ns.clamp(min=1)[:, None] - 1)  # (B, Q)
    query_pos = (ctxs - ns.clamp(min=1))[:, None] + q_index  # (B, Q)
    mask = torch.arange(length)[None, None, :] <= query_pos[:, :, None]  # (B, Q, L)
    return q_index, mask[:, None], torch.arange(q_max)[None, :] < ns[:, None]


def attention_group(entries: list[tuple[int, int, int, list[int]]], block_size: int) -> AttentionGroup:
    """Gather: entries are (first packed row, new tokens, context length, block table) per sequence."""
    rows, ns, ctxs = (torch.tensor(column) for column in list(zip(*entries))[:3])  # (B,) each
    max_blocks = max(len(e[3]) for e in entries)
    tables = torch.tensor([e[3] + [0] * (max_blocks - len(e[3])) for e in entries])  # (B, max_blocks)
    q_index, mask, valid = _causal(ns, ctxs, max_blocks * block_size)
    return AttentionGroup(rows[:, None] + q_index, mask, valid, block_tables=tables)


def row_group(entries: list[tuple[int, int, int, int]], start: int, stop: int) -> AttentionGroup:
    """Rows: entries are (first packed row, new tokens, context length, cache row)
    for some of the rows start..stop-1; the others take part masked (key 0 only)."""
    B = stop - start
    rows, ns, ctxs = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long), torch.ones(B, dtype=torch.long)
    for packed, n, ctx, row in entries:
        rows[row - start], ns[row - start], ctxs[row - start] = packed, n, ctx
    q_index, mask, valid = _causal(ns, ctxs, int(ctxs.max()))
    return AttentionGroup(rows[:, None] + q_index, mask, valid, row_range=(start, stop))


def build_batch(work: list[SeqWork], block_size: int) -> StepBatch:
    """Decoding sequences share attention groups (gather: a few, by context
    length; rows: one over the rows they span); each chunk of a prompt gets
    its own, so no sequence pads to another's query length."""
    ids, positions, slots, sample_rows, decodes, groups, token_rows, fills = [], [], [], [], [], [], [], []
    use_rows = bool(work) and work[0].row is not None
    for w in work:
        packed, end = len(ids), w.start + len(w.new)
        ids += w.new
        positions += range(w.start, end)
        slots += [w.blocks[p // block_size] * block_size + p % block_size for p in range(w.start, end)]
        entry = (packed, len(w.new), end, w.row if use_rows else w.blocks)
        if use_rows:
            token_rows += [w.row] * len(w.new)
            if w.fill:
                fills.append((w.row, w.blocks[:-(-w.fill // block_size)], w.fill))
        if len(w.new) == 1:
            decodes.append(entry)
        else:
            groups.append(row_group([entry], w.row, w.row + 1) if use_rows else attention_group([entry], block_size))
        if w.sample:
            sample_rows.append(len(ids) - 1)
    if use_rows and decodes:
        groups.append(row_group(decodes, min(e[3] for e in decodes), max(e[3] for e in decodes) + 1))
    elif decodes:
        groups += [attention_group(bucket, block_size) for bucket in _length_buckets(decodes)]
    return StepBatch(torch.tensor(ids), torch.tensor(positions), torch.tensor(slots), groups,
                     torch.tensor(sample_rows, dtype=torch.long), torch.tensor(token_rows) if use_rows else None,
                     fills if use_rows else None)


def _length_buckets(entries: list, max_buckets: int = 4, max_ratio: float = 2.0) -> list[list]:
    """Decoding sequences split by context length, so that a short one is not
    padded (gathered and masked) to the longest one's length."""
    buckets: list[list] = []
    for entry in sorted(entries, key=lambda e: e[2]):
        if buckets and (entry[2] <= max_ratio * buckets[-1][0][2] or len(buckets) == max_buckets):
            buckets[-1].append(entry)
        else:
            buckets.append([entry])
    return buckets


def paged_attention(q: torch.Tensor, cache: KVCache, rows: RowKV | None, layer: int,
                    groups: list[AttentionGroup]) -> torch.Tensor:
    """q (N, heads, head_dim) of the packed new tokens -> attention output (N, heads * head_dim).

    Grouped-query attention runs with the query heads that share a KV head
    folded into the query length, (B, kv_heads, group * Q, head_dim): one
    plain SDPA call without expanding keys and values (``enable_gqa`` on CPU
    takes twice as long here)."""
    out = torch.empty_like(q)
    kv_heads = cache.k.shape[3]
    for g in groups:
        B, Q, L = g.mask.shape[0], g.mask.shape[2], g.mask.shape[-1]
        group, head_dim = q.shape[1] // kv_heads, q.shape[2]
        qg = q[g.query_rows].view(B, Q, kv_heads, group, head_dim)
        qg = qg.permute(0, 2, 3, 1, 4).reshape(B, kv_heads, group * Q, head_dim)
        mask = g.mask if Q == 1 else g.mask[:, :, None].expand(B, 1, group, Q, L).reshape(B, 1, group * Q, L)
        if g.row_range is not None:
            kg, vg = rows.keys_values(layer, *g.row_range, L)  # (B, kv_heads, L, head_dim), views
        else:
            # Whole blocks (block_size * kv_heads * head_dim contiguous values each), one memcpy per block.
            blocks, kv_shape = g.block_tables.flatten(), cache.k.shape[3:]
            kg = cache.k[layer].flatten(1).index_select(0, blocks).view(B, -1, *kv_shape).transpose(1, 2)
            vg = cache.v[layer].flatten(1).index_select(0, blocks).view(B, -1, *kv_shape).transpose(1, 2)
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask)  # (B, kv_heads, group * Q, head_dim)
        og = og.view(B, kv_heads, group, Q, head_dim).permute(0, 3, 1, 2, 4).reshape(B, Q, -1, head_dim)
        out[g.query_rows[g.valid]] = og[g.valid]  # (valid, heads, head_dim)
    return out.flatten(1)


def _local(t):
    """A DTensor's full value (TP head: vocab-sharded logits), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.inference_mode()
def forward(model: Llama, cache: KVCache, batch: StepBatch, rows: RowKV | None = None) -> torch.Tensor:
    """-> logits (S, vocab) of ``batch.sample_rows``, after writing every new token's K/V."""
    N = batch.token_ids.shape[0]
    head_dim = model.cfg.dim // model.cfg.n_heads
    cos, sin = model.rope_cos[batch.positions], model.rope_sin[batch.positions]  # (N, head_dim)
    h = model.embed_tokens(batch.token_ids[None])  # (1, N, dim)
    for index, layer in enumerate(model.layers.values()):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(1, N, -1, head_dim)  # (1, N, local heads, head_dim)
        k = attn.k_proj(x).view(1, N, -1, head_dim)  # (1, N, local kv heads, head_dim)
        v = attn.v_proj(x).view(N, -1, head_dim)
        q, k = apply_rope(q, cos, sin)[0], apply_rope(k, cos, sin)[0]
        cache.write(index, batch.slots, k, v)
        if batch.token_rows is not None:
            for row, blocks, n in batch.fills:
                rows.fill(index, row, cache, blocks, n)
            rows.write(index, batch.token_rows, batch.positions, k, v)
        h = h + attn.o_proj(paged_attention(q, cache, rows, index, batch.groups)[None])
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    h = model.norm(h[:, batch.sample_rows])  # (1, S, dim)
    return _local(model.lm_head(h))[0]  # (S, vocab)
