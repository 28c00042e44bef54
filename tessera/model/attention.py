"""Paged attention for any device torch supports.

KV cache of one layer: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (K then V).
A batch is flat: the first ``num_decode_tokens`` tokens are single-token queries (decodes),
batched together; the rest are prefill chunks, each attending over its cached context plus
itself. Metadata is built once per step by the model runner and shared by all layers.
Decodes go through ``tessera.model.kernels.paged_decode_attention`` (a fused C++ kernel on
CPU, plain PyTorch elsewhere); prefill chunks use SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tessera.model.kernels import paged_decode_attention


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


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store the new tokens' K and V at their slots. k, v: [T, KVH, d]."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    dtype = kv_cache.dtype  # may be narrower than the model's (kv_cache_dtype)
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k.to(dtype))
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v.to(dtype))


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
    num_kv_heads = kv_cache.shape[3]
    gqa = num_heads != num_kv_heads
    out = torch.empty_like(q)

    num_decodes = meta.num_decode_tokens
    if num_decodes:
        assert meta.decode_block_tables is not None and meta.decode_seq_lens is not None
        # Fused kernel on CPU: reads K/V in place from the blocks (no gathered, padded copy).
        out[:num_decodes] = paged_decode_attention(
            q[:num_decodes],  # [B, H, d]
            kv_cache,
            meta.decode_block_tables,
            meta.decode_seq_lens,
            scale,
            window,
        )  # [B, H, d]

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
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        mask = None  # no context and no window: plain causal, SDPA's fastest path
        if ctx or window is not None:
            q_pos = torch.arange(ctx, total, device=q.device).unsqueeze(1)  # [n, 1]
            k_pos = torch.arange(total, device=q.device).unsqueeze(0)  # [1, total]
            mask = k_pos <= q_pos
            if window is not None:
                mask &= k_pos > q_pos - window
        # 4-D inputs: on CPU, SDPA takes its flash kernel only for [B, H, L, d] (3-D inputs
        # fall back to the math path, 3-4x slower with or without a mask).
        o = F.scaled_dot_product_attention(
            query.unsqueeze(0),  # [1, H, n, d]
            keys.transpose(0, 1).unsqueeze(0),  # [1, KVH, total, d]
            values.transpose(0, 1).unsqueeze(0),
            attn_mask=None if mask is None else mask[None, None],  # [1, 1, n, total]
            is_causal=mask is None,
            scale=scale,
            enable_gqa=gqa,
        )  # [1, H, n, d]
        out[s : s + n] = o[0].transpose(0, 1)
    return out
