"""Paged attention in plain PyTorch, for any device torch supports.

KV cache of one layer: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (K then V).
A batch is flat: the first ``num_decode_tokens`` tokens are single-token queries (decodes),
batched together; the rest are prefill chunks, each attending over its cached context plus
itself. Metadata is built once per step by the model runner and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    """Query tokens ``[start, start + num_tokens)`` of the batch, at positions after
    ``num_context_tokens`` tokens already in the cache (``block_ids`` covers all of them)."""

    start: int
    num_tokens: int
    num_context_tokens: int
    block_ids: torch.Tensor  # [num_blocks_of_seq] int64


@dataclass
class AttentionMetadata:
    """Where each token's KV goes and what each query attends to, for one step."""

    slot_mapping: torch.Tensor  # [T] int64: flat cache slot of each new token
    num_decode_tokens: int
    decode_block_tables: torch.Tensor | None  # [B, max_blocks] int64 (padded with block 0)
    decode_seq_lens: torch.Tensor | None  # [B] int64: tokens in cache incl. the new one
    prefills: list[PrefillChunk] = field(default_factory=list)
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def decode_mask(self, block_size: int, window: int | None) -> torch.Tensor:
        """Boolean [B, 1, 1, L] mask of valid (and, with a window, recent) cache slots."""
        mask = self._masks.get(window)
        if mask is None:
            assert self.decode_block_tables is not None and self.decode_seq_lens is not None
            num_slots = self.decode_block_tables.shape[1] * block_size
            idx = torch.arange(num_slots, device=self.decode_seq_lens.device)
            lens = self.decode_seq_lens.unsqueeze(1)
            mask = idx < lens
            if window is not None:
                # The query sits at position len-1 and sees keys j with j > pos - window.
                mask &= idx > lens - 1 - window
            mask = mask[:, None, None, :]
            self._masks[window] = mask
        return mask


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store the new tokens' K and V at their slots. k, v: [T, KVH, d]."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k)
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention of the batch's queries over their cached context; returns [T, H, d].

    q: [T, H, d]; k, v: [T, KVH, d] for the same tokens (already written to the cache).
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    gqa = num_heads != num_kv_heads
    out = torch.empty_like(q)

    num_decodes = meta.num_decode_tokens
    if num_decodes:
        assert meta.decode_block_tables is not None
        batch = num_decodes
        tables = meta.decode_block_tables
        flat = tables.view(-1)
        # index_select is several times faster than advanced indexing for this gather on CPU.
        # [B * max_blocks, block_size, KVH, d] -> [B, KVH, L, d]
        keys = kv_cache[0].index_select(0, flat).view(batch, -1, num_kv_heads, head_dim)
        values = kv_cache[1].index_select(0, flat).view(batch, -1, num_kv_heads, head_dim)
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)
        query = q[:num_decodes].unsqueeze(2)  # [B, H, 1, d]
        mask = meta.decode_mask(block_size, window)
        o = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa
        )  # [B, H, 1, d]
        out[:num_decodes] = o.squeeze(2)

    for chunk in meta.prefills:
        s, n, ctx = chunk.start, chunk.num_tokens, chunk.num_context_tokens
        query = q[s : s + n].transpose(0, 1)  # [H, n, d]
        total = ctx + n
        if ctx == 0:
            keys, values = k[s : s + n], v[s : s + n]  # [n, KVH, d]
        else:
            ids = chunk.block_ids
            keys = kv_cache[0].index_select(0, ids).view(-1, num_kv_heads, head_dim)[:total]
            values = kv_cache[1].index_select(0, ids).view(-1, num_kv_heads, head_dim)[:total]
        if ctx == 0 and window is None:
            o = F.scaled_dot_product_attention(
                query,
                keys.transpose(0, 1),
                values.transpose(0, 1),
                is_causal=True,
                scale=scale,
                enable_gqa=gqa,
            )
        else:
            q_pos = torch.arange(ctx, total, device=q.device).unsqueeze(1)  # [n, 1]
            k_pos = torch.arange(total, device=q.device).unsqueeze(0)  # [1, total]
            mask = k_pos <= q_pos
            if window is not None:
                mask &= k_pos > q_pos - window
            o = F.scaled_dot_product_attention(
                query,
                keys.transpose(0, 1),
                values.transpose(0, 1),
                attn_mask=mask,
                scale=scale,
                enable_gqa=gqa,
            )
        out[s : s + n] = o.transpose(0, 1)
    return out
