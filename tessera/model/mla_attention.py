"""Paged multi-head latent attention (MLA, DeepSeek-V2/V3) over a compressed KV cache.

KV cache of one layer: ``[num_blocks, block_size, kv_lora_rank + rope_dim]``: per token only
the normalised KV latent and the rotated, head-shared rope key, instead of full K and V per
head. Keys and values are the latent times the halves of ``kv_b_proj``'s weight
``[H, nope_dim + v_dim, kv_lora_rank]``: ``W_uk`` (``[H, nope_dim, r]``) and ``W_uv``
(``[H, v_dim, r]``).

Decodes use the absorbed form: ``q_nope @ W_uk`` moves the query into latent space, so scores
and the weighted sum run against the cached latents directly and K/V are never expanded.
Prefill chunks have many queries per sequence, so expanding their context to full K/V once
per chunk and running SDPA is cheaper there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_latent(
    kv_cache: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor, slots: torch.Tensor
) -> None:
    """Store the new tokens' latent [T, r] and rope key [T, dr] at their flat cache slots."""
    entry = torch.cat((latent, k_rope), dim=-1).to(kv_cache.dtype)  # [T, r + dr]
    kv_cache.view(-1, kv_cache.shape[-1]).index_copy_(0, slots, entry)


def absorbed_decode(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_b_weight: torch.Tensor,
    v_head_dim: int,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence against its cached latents; returns [B, H, v_dim].

    q_nope: [B, H, nope_dim]; q_rope: [B, H, dr] (rotated); block_tables: [B, max_blocks]
    (padding blocks are masked by ``seq_lens``, [B] tokens in cache incl. the new one);
    kv_b_weight: [H * (nope_dim + v_dim), r].
    """
    batch, num_heads, nope_dim = q_nope.shape
    rank = kv_b_weight.shape[1]
    w_kv = kv_b_weight.view(num_heads, nope_dim + v_head_dim, rank)
    w_uk, w_uv = w_kv.split([nope_dim, v_head_dim], dim=1)  # [H, nope, r], [H, v, r]
    q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, r]
    query = torch.cat((q_latent, q_rope), dim=-1)  # [B, H, r + dr]

    groups = _length_groups(seq_lens, kv_cache.shape[1])
    if groups is None:
        o_latent = _latent_attention(query, kv_cache, block_tables, seq_lens, rank, scale)
    else:
        # Sort once by length; each group is then a contiguous slice, unsorted once at the end.
        order, bounds = groups
        query, block_tables, seq_lens = query[order], block_tables[order], seq_lens[order]
        parts = [
            _latent_attention(
                query[lo:hi], kv_cache, block_tables[lo:hi, :num_blocks], seq_lens[lo:hi],
                rank, scale,
            )  # [b, H, r]
            for lo, hi, num_blocks in bounds
        ]
        o_latent = query.new_empty(batch, num_heads, rank)
        o_latent[order] = torch.cat(parts)  # [B, H, r], back in batch order
    return torch.bmm(o_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [B, H, v]


# Split a decode batch by length only when padding to the longest sequence would waste this
# share of the gathered context; each split adds a handful of small ops per layer.
_MAX_PADDING_SHARE = 0.25
_MAX_GROUPS = 4


def _length_groups(
    seq_lens: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, list[tuple[int, int, int]]] | None:
    """Sequences grouped by similar length, or None when one padded batch wastes little.

    Returns (order [B] int64: batch rows sorted by length, [(lo, hi, blocks needed)] slices
    of ``order``), equal-count groups in increasing length.
    """
    batch = seq_lens.shape[0]
    if batch < 2 * _MAX_GROUPS:
        return None
    lens = seq_lens.tolist()
    blocks = [-(-n // block_size) for n in lens]
    padded = max(blocks) * batch
    if sum(blocks) > (1 - _MAX_PADDING_SHARE) * padded:
        return None
    order = sorted(range(batch), key=blocks.__getitem__)
    size = -(-batch // _MAX_GROUPS)
    bounds = [
        (lo, min(lo + size, batch), blocks[order[min(lo + size, batch) - 1]])
        for lo in range(0, batch, size)
    ]
    return torch.tensor(order, device=seq_lens.device), bounds


def _latent_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    rank: int,
    scale: float,
) -> torch.Tensor:
    """query [b, H, r + dr] over the latents of ``block_tables`` [b, nb] -> [b, H, r]."""
    batch = query.shape[0]
    latent_dim = kv_cache.shape[-1]
    max_len = block_tables.shape[1] * kv_cache.shape[1]
    context = kv_cache.index_select(0, block_tables.reshape(-1))
    context = context.view(batch, max_len, latent_dim).to(query.dtype)  # [b, L, r + dr]
    scores = torch.bmm(query, context.transpose(1, 2)).float() * scale  # [b, H, L]
    pad = torch.arange(max_len, device=query.device).unsqueeze(0) >= seq_lens.unsqueeze(1)
    scores.masked_fill_(pad.unsqueeze(1), float("-inf"))
    probs = scores.softmax(dim=-1).to(query.dtype)  # [b, H, L]
    return torch.bmm(probs, context[..., :rank])  # [b, H, r]


def expanded_prefill(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    kv_b_weight: torch.Tensor,
    v_head_dim: int,
    num_context_tokens: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention of a prefill chunk over its context plus itself; returns [n, H, v_dim].

    q_nope: [n, H, nope_dim]; q_rope: [n, H, dr]; latent: [total, r] and k_rope: [total, dr]
    for all ``total = num_context_tokens + n`` tokens of the sequence so far.
    """
    num_tokens, num_heads, nope_dim = q_nope.shape
    total, rope_dim = k_rope.shape
    kv = F.linear(latent, kv_b_weight).view(total, num_heads, nope_dim + v_head_dim)
    k_nope, values = kv.split([nope_dim, v_head_dim], dim=-1)  # [total, H, nope], [total, H, v]
    keys = torch.cat((k_nope, k_rope.unsqueeze(1).expand(total, num_heads, rope_dim)), dim=-1)
    query = torch.cat((q_nope, q_rope), dim=-1)  # [n, H, nope + dr]
    if q_nope.device.type == "cpu" and num_heads * num_tokens * total <= _MATH_MAX_SCORES:
        return _math_attention(query, keys, values, num_context_tokens, scale)
    mask = None  # no context: plain causal
    if num_context_tokens:
        q_pos = torch.arange(num_context_tokens, total, device=q_nope.device).unsqueeze(1)
        mask = torch.arange(total, device=q_nope.device).unsqueeze(0) <= q_pos  # [n, total]
    o = F.scaled_dot_product_attention(
        query.transpose(0, 1),  # [H, n, nope + dr]
        keys.transpose(0, 1),  # [H, total, nope + dr]
        values.transpose(0, 1),  # [H, total, v]
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
    )  # [H, n, v]
    return o.transpose(0, 1)


# On CPU, SDPA's fused kernel ran MLA prefill shapes (8 heads, qk dim 96, v dim 64, 500
# tokens) about 2.3x slower in CPU time than plain bmm + softmax + bmm; the plain form
# materialises the [H, n, total] scores, so it is used only while they stay this small.
_MATH_MAX_SCORES = 1 << 24  # float32 elements (64 MiB)


def _math_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    num_context_tokens: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention with explicit scores. query [n, H, dk], keys [total, H, dk],
    values [total, H, v] -> [n, H, v]; query i sits at position num_context_tokens + i."""
    total = keys.shape[0]
    scores = torch.bmm(query.transpose(0, 1), keys.permute(1, 2, 0))  # [H, n, total]
    scores = scores.float().mul_(scale)
    q_pos = torch.arange(num_context_tokens, total, device=query.device).unsqueeze(1)
    future = torch.arange(total, device=query.device).unsqueeze(0) > q_pos  # [n, total]
    scores.masked_fill_(future, float("-inf"))
    probs = scores.softmax(dim=-1).to(values.dtype)  # [H, n, total]
    return torch.bmm(probs, values.transpose(0, 1)).transpose(0, 1)  # [n, H, v]
