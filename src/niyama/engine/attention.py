"""Attention over the paged KV cache for one flattened mixed batch.

The batch's tokens are ordered with all single-token chunks (decodes) first, then multi-token prefill
chunks. Each layer first writes the batch's new keys/values into their cache slots, then:

- single-token chunks (sorted longest first) either all go to the native kernel (``DecodeBatch``, bf16 on
  the CPU: it reads the blocks in place, ``niyama.engine.native``), or attend in groups of similar context
  length: each group's blocks are gathered into a padded ``[B, max_context, kv_heads, head_dim]`` tensor and
  one SDPA call runs with a length mask over its ``[B, kv_heads, max_context, head_dim]`` view; the query
  heads sharing a KV head form the "query length" axis, so grouped-query attention needs no copies.
  Grouping keeps the padding, and so the cost, close to the sum of the contexts rather than ``B`` times
  the longest one;
- each prefill chunk attends on its own: a chunk that starts a prompt uses its fresh keys with a
  causal mask, a continuation gathers its earlier context from the cache and uses an offset causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from niyama.engine.native import MemoryList, NativeKernels


@dataclass(slots=True)
class PrefillChunk:
    row: int  # first row of the chunk in the flattened batch
    length: int  # tokens in the chunk
    blocks: torch.Tensor | None  # block table covering the whole context; None for a fresh prompt start
    mask: torch.Tensor | None  # [length, context] bool, True = attend; None for a fresh prompt start


@dataclass(slots=True)
class DecodeGroup:
    row: int  # first row of the group's single-token chunks
    size: int  # number of single-token chunks (B)
    blocks: torch.Tensor  # [B * max_blocks] padded block tables
    mask: torch.Tensor  # [B, 1, 1, max_blocks * block_size] bool, True = attend


@dataclass(slots=True)
class DecodeBatch:
    """All single-token chunks at once, for the native kernel."""

    tables: torch.Tensor  # [B, max_blocks] int32 block tables, padded
    lens: torch.Tensor  # [B] int32 context lengths, the new token included


@dataclass(slots=True)
class AttentionMetadata:
    slot_blocks: torch.Tensor  # [T] block of each new token
    slot_offsets: torch.Tensor  # [T] offset inside that block
    # Rows [0, number of single-token chunks): groups for SDPA, or one batch for the native kernel.
    decodes: list[DecodeGroup] | DecodeBatch
    prefills: list[PrefillChunk]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             meta: AttentionMetadata) -> None:
    """Store the batch's new keys/values ``[T, kv_heads, head_dim]`` at their slots."""
    k_cache[meta.slot_blocks, meta.slot_offsets] = k
    v_cache[meta.slot_blocks, meta.slot_offsets] = v


def _gather(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Blocks ``[N]`` of one layer's cache as ``[N * block_size, kv_heads, head_dim]``."""
    _, block_size, kv_heads, head_dim = cache.shape
    return cache.index_select(0, blocks).view(blocks.numel() * block_size, kv_heads, head_dim)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, kernels: NativeKernels | None = None,
                    ahead: MemoryList | None = None) -> torch.Tensor:
    """q ``[T, heads, head_dim]``, k/v ``[T, kv_heads, head_dim]`` (already written to the cache);
    returns ``[T, heads * head_dim]``. ``kernels`` runs a ``DecodeBatch``; ``ahead``: memory its idle threads
    read into the cache meanwhile (see ``NativeKernels.decode_attention``)."""
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = num_heads // kv_heads
    out = q.new_empty(num_tokens, num_heads * head_dim)
    if isinstance(meta.decodes, DecodeBatch):
        b = meta.decodes.lens.shape[0]
        kernels.decode_attention(q[:b], k_cache, v_cache, meta.decodes.tables, meta.decodes.lens, out[:b], ahead)
    else:
        for dg in meta.decodes:
            b, rows = dg.size, slice(dg.row, dg.row + dg.size)
            keys = _gather(k_cache, dg.blocks).view(b, -1, kv_heads, head_dim).transpose(1, 2)
            values = _gather(v_cache, dg.blocks).view(b, -1, kv_heads, head_dim).transpose(1, 2)
            query = q[rows].view(b, kv_heads, group, head_dim)
            o = F.scaled_dot_product_attention(query, keys, values, attn_mask=dg.mask)
            out[rows] = o.reshape(b, num_heads * head_dim)
    for chunk in meta.prefills:
        # 4-D tensors (a batch of one): for 3-D ones SDPA on the CPU takes its unfused path, 2-3× slower.
        rows = slice(chunk.row, chunk.row + chunk.length)
        query = q[rows].transpose(0, 1)[None]
        if chunk.blocks is None:
            o = F.scaled_dot_product_attention(query, k[rows].transpose(0, 1)[None], v[rows].transpose(0, 1)[None],
                                               is_causal=True, enable_gqa=True)
        else:
            context = chunk.mask.shape[1]
            keys = _gather(k_cache, chunk.blocks)[:context].transpose(0, 1)[None]
            values = _gather(v_cache, chunk.blocks)[:context].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(query, keys, values, attn_mask=chunk.mask, enable_gqa=True)
        out[rows] = o[0].transpose(0, 1).reshape(chunk.length, num_heads * head_dim)
    return out
