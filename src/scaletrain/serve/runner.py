"""One forward pass over a step's tokens with the paged KV cache, using the
model's own modules (embedding, norms, projections, MLP, head, RoPE tables).

All new tokens of a step — one per decoding sequence, a chunk per prefilling
one — are packed into one (1, N) row, so every linear layer runs once per step
whatever the mix. Attention is the only per-sequence part: ``paged_attention``
gathers each sequence's keys and values from its blocks into contiguous
tensors and runs SDPA with a mask. That function is the seam where a fused
paged-attention kernel (vLLM's, FlashInfer's) reading the block table directly
would replace the gather on a GPU.

Under tensor parallelism the model's linear layers are DTensor-parallel
(parallel/tensor_parallel.py, the training plan): calling them on plain tensors
runs their all-reduces, and each rank's cache holds its own KV heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scaletrain.model.llama import Llama, apply_rope
from scaletrain.serve.kv_cache import KVCache


@dataclass
class AttentionGroup:
    """Sequences whose attention runs as one SDPA call.

    query_rows (B, Q): rows of the packed tokens holding each sequence's new
    tokens (padding repeats a valid row); block_tables (B, max_blocks): each
    sequence's blocks, padded with block 0, so its keys are the
    max_blocks * block_size slots they cover; mask (B, 1, Q, L): which of
    them a query may see (causal, within the context)."""

    query_rows: torch.Tensor
    block_tables: torch.Tensor
    mask: torch.Tensor
    valid: torch.Tensor  # (B, Q) bool: real (not padding) queries


@dataclass
class StepBatch:
    """Everything one forward needs; rank 0 builds it and broadcasts it to TP workers."""

    token_ids: torch.Tensor  # (N,)
    positions: torch.Tensor  # (N,)
    slots: torch.Tensor  # (N,) cache slot of each new token
    groups: list[AttentionGroup]
    sample_rows: torch.Tensor  # (S,) rows whose next-token logits are wanted


def attention_group(entries: list[tuple[int, int, int, list[int]]], block_size: int) -> AttentionGroup:
    """entries: (first packed row, new tokens, context length, block table) per sequence."""
    rows, ns, ctxs = (torch.tensor(column) for column in list(zip(*entries))[:3])  # (B,) each
    max_blocks = max(len(e[3]) for e in entries)
    tables = torch.tensor([e[3] + [0] * (max_blocks - len(e[3])) for e in entries])  # (B, max_blocks)
    q_max = int(ns.max())
    key_pos = torch.arange(max_blocks * block_size)
    q_index = torch.minimum(torch.arange(q_max)[None, :], ns[:, None] - 1)  # (B, Q), padding repeats the last
    query_pos = (ctxs - ns)[:, None] + q_index  # (B, Q)
    mask = key_pos[None, None, :] <= query_pos[:, :, None]  # (B, Q, L) causal within the context
    valid = torch.arange(q_max)[None, :] < ns[:, None]
    return AttentionGroup(rows[:, None] + q_index, tables, mask[:, None], valid)


def build_batch(work: list[tuple[list[int], int, list[int], bool]], block_size: int) -> StepBatch:
    """work: per sequence (new tokens, position of the first, block table, sample
    after it?). Decoding sequences share one attention group; each chunk of a
    prompt gets its own, so no sequence pads to another's query length."""
    ids, positions, slots, sample_rows, decodes, groups = [], [], [], [], [], []
    for new, start, blocks, wants_sample in work:
        row, end = len(ids), start + len(new)
        ids += new
        positions += range(start, end)
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(start, end)]
        entry = (row, len(new), end, blocks)
        if len(new) == 1:
            decodes.append(entry)
        else:
            groups.append(attention_group([entry], block_size))
        if wants_sample:
            sample_rows.append(len(ids) - 1)
    if decodes:
        groups.append(attention_group(decodes, block_size))
    return StepBatch(torch.tensor(ids), torch.tensor(positions), torch.tensor(slots), groups,
                     torch.tensor(sample_rows, dtype=torch.long))


def paged_attention(q: torch.Tensor, cache: KVCache, layer: int, groups: list[AttentionGroup]) -> torch.Tensor:
    """q (N, heads, head_dim) of the packed new tokens -> attention output (N, heads * head_dim).

    The gather of whole blocks (``k_blocks[block_tables]``) into contiguous
    keys and values is the CPU stand-in for a paged-attention kernel."""
    out = torch.empty_like(q)
    k_blocks, v_blocks = cache.k[layer], cache.v[layer]  # (num_blocks, block_size, kv_heads, head_dim)
    kv_shape = k_blocks.shape[2:]
    for g in groups:
        B, blocks = g.block_tables.shape[0], g.block_tables.flatten()
        qg = q[g.query_rows].transpose(1, 2)  # (B, heads, Q, head_dim)
        # index_select of whole blocks (rows of block_size * kv_heads * head_dim): a plain memcpy per block.
        kg = k_blocks.flatten(1).index_select(0, blocks).view(B, -1, *kv_shape).transpose(1, 2)  # (B, kv_heads, L, head_dim)
        vg = v_blocks.flatten(1).index_select(0, blocks).view(B, -1, *kv_shape).transpose(1, 2)
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, enable_gqa=True)
        out[g.query_rows[g.valid]] = og.transpose(1, 2)[g.valid]  # (valid, heads, head_dim)
    return out.flatten(1)


def _local(t):
    """A DTensor's full value (TP head: vocab-sharded logits), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.inference_mode()
def forward(model: Llama, cache: KVCache, batch: StepBatch) -> torch.Tensor:
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
        h = h + attn.o_proj(paged_attention(q, cache, index, batch.groups)[None])
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    h = model.norm(h[:, batch.sample_rows])  # (1, S, dim)
    return _local(model.lm_head(h))[0]  # (S, vocab)
