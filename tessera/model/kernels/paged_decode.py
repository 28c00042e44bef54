"""Fused paged decode attention: a C++ CPU kernel with a pure-torch fallback.

The kernel (``paged_decode.cpp`` next to this file) is compiled on the first call, never on
import (see ``build.py``). When the build fails, the tensors are not on CPU, the dtype is not
float32, bfloat16 or float16, or ``TESSERA_DISABLE_KERNELS=1`` is set, the fallback runs
instead: same semantics, one ``index_select`` of each sequence's own blocks and SDPA (no
padding, no mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.model.kernels.build import kernel_available

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

WHOLE_SEQUENCES_PER_THREAD = 8
"""Below this many decoding sequences per thread the kernel splits each sequence's kv heads
into ranges over the threads (short strided reads); from there on a work item is one whole
sequence (contiguous runs). Mirrors ``num_ranges`` in paged_decode.cpp."""


def whole_sequence_batch(num_threads: int) -> int:
    """The decode batch from which the kernel reads whole sequences on ``num_threads``."""
    return WHOLE_SEQUENCES_PER_THREAD * max(num_threads, 1)


def decode_kernel_applies(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    return (
        q.device.type == "cpu"
        and kv_cache.device.type == "cpu"
        and q.dtype in _KERNEL_DTYPES
        and kv_cache.dtype in _KERNEL_DTYPES
        and (kv_cache.dtype == q.dtype or q.dtype == torch.float32)
        and kv_cache.is_contiguous()  # never copy the cache to fit the kernel
    )


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged KV cache; returns [B, H, d].

    q: [B, H, d], the token at position ``seq_lens[b] - 1``; kv_cache:
    [2, num_blocks, block_size, KVH, d] (K then V); block_tables: [B, max_blocks] int64, padded
    with 0; seq_lens: [B] int64, tokens in the cache including the new one (>= 1). With a
    sliding ``window`` the query at position p sees keys j with ``p - window < j <= p``. GQA: H
    is a multiple of KVH and head h reads kv head ``h // (H // KVH)``. Output dtype is q's.
    """
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    if decode_kernel_applies(q, kv_cache) and kernel_available():
        return torch.ops.tessera_kernels.paged_decode(
            q.contiguous(),
            kv_cache,
            block_tables.to(torch.int64).contiguous(),
            seq_lens.to(torch.int64).contiguous(),
            float(scale),
            0 if window is None else int(window),
        )
    if q.device.type != "cpu":
        # On accelerators one batched call beats a per-sequence loop with a host sync.
        return paged_decode_padded(q, kv_cache, block_tables, seq_lens, scale, window)
    return paged_decode_reference(q, kv_cache, block_tables, seq_lens, scale, window)


def paged_decode_padded(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Batched form of :func:`paged_decode_reference` (same arguments, same result): gathers
    every sequence's blocks padded to the longest, then one masked SDPA; no host sync."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[3]
    flat = block_tables.reshape(-1)
    # [B * max_blocks, block_size, KVH, d] -> [B, KVH, L, d]
    keys = kv_cache[0].index_select(0, flat).view(batch, -1, num_kv_heads, head_dim)
    values = kv_cache[1].index_select(0, flat).view(batch, -1, num_kv_heads, head_dim)
    keys, values = keys.to(q.dtype), values.to(q.dtype)  # a cache may be narrower than q
    idx = torch.arange(keys.shape[1], device=q.device)  # [L]
    lens = seq_lens.unsqueeze(1)  # [B, 1]
    mask = idx < lens
    if window is not None:
        mask &= idx > lens - 1 - window
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2),  # [B, H, 1, d]
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=mask[:, None, None, :],  # [B, 1, 1, L]
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    )  # [B, H, 1, d]
    return o.squeeze(2)


def paged_decode_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """The pure-torch fallback of :func:`paged_decode_attention` (same arguments, same result):
    per sequence, gather only the blocks holding its visible keys, then SDPA without a mask."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    out = torch.empty_like(q)  # [B, H, d]
    lens = seq_lens.tolist()
    for b, length in enumerate(lens):
        lo = 0 if window is None else max(0, length - window)  # first visible key
        first, last = lo // block_size, (length + block_size - 1) // block_size
        ids = block_tables[b, first:last]  # [n_blocks]
        # [n_blocks, block_size, KVH, d] -> [n_blocks * block_size, KVH, d] -> visible rows
        keys = kv_cache[0].index_select(0, ids).view(-1, num_kv_heads, head_dim)
        values = kv_cache[1].index_select(0, ids).view(-1, num_kv_heads, head_dim)
        start = lo - first * block_size
        keys = keys[start : length - first * block_size].to(q.dtype)  # [L, KVH, d]
        values = values[start : length - first * block_size].to(q.dtype)
        o = F.scaled_dot_product_attention(
            q[b].unsqueeze(1),  # [H, 1, d]
            keys.transpose(0, 1),  # [KVH, L, d]
            values.transpose(0, 1),
            scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )  # [H, 1, d]
        out[b] = o.squeeze(1)
    return out
