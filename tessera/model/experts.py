"""Routed experts: a (sub)set of one layer's experts, each a gated MLP, computed sparsely."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tessera.model.kernels.linear import can_pack, min_packed_rows, pack_weight, packed_linear
from tessera.model.kernels.moe_kernel import (
    native_experts,
    native_experts_fit,
    pack_down,
    pack_gate_up,
)
from tessera.model.layers import activation
from tessera.model.moe_spec import MoESpec

MAX_PACKED_ROWS = 256
"""Expert calls with this many rows or more keep the plain weights. oneDNN builds a kernel for
every new row count (the first call with a count pays for it), and prefill gives an expert a
different count nearly every call, so an unbounded packed path would keep paying that. Below
the cap there are at most 256 row counts per matrix shape, each built once; the packed kernel
wins at every count up to it, which a decode step of a few hundred sequences reaches (64 rows
per expert at 256 sequences, top-2 of 8)."""


class Experts(nn.Module):
    """The experts ``expert_ids`` (global ids; default all) of one MoE layer.

    Weights are stacked per local expert: ``gate_up_proj`` [E_local, 2I, D] (gate rows first)
    and ``down_proj`` [E_local, D, I]. ``forward`` returns the weighted sum over the *local*
    experts only, so the outputs of units holding a partition of the experts add up to the
    full layer's output (the expert-parallel split).

    After :meth:`pack_weights` the weights are also held in the layout of the native experts
    kernel (``kernels.moe_kernel``), which then computes every call; where that kernel cannot
    run, each expert's matrices are held in oneDNN's packed layout instead, and a call with
    enough rows runs through it (see ``kernels.linear``).
    """

    def __init__(self, moe: MoESpec, expert_ids: Sequence[int] | None = None) -> None:
        super().__init__()
        ids = tuple(range(moe.num_experts)) if expert_ids is None else tuple(expert_ids)
        if len(set(ids)) != len(ids) or any(not 0 <= e < moe.num_experts for e in ids):
            raise ValueError(
                f"expert_ids must be distinct ids in [0, {moe.num_experts}), got {list(ids)}"
            )
        self.num_experts = moe.num_experts
        self.expert_ids = ids
        self._local_of = {g: i for i, g in enumerate(ids)}
        self._identity = ids == tuple(range(moe.num_experts))
        self._local_index: torch.Tensor | None = None  # global id -> local id, built lazily
        inter, hidden = moe.moe_intermediate_size, moe.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(len(ids), 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(len(ids), hidden, inter))
        self.hidden_act = moe.hidden_act
        self.act = activation(moe.hidden_act)
        # (gate_up [E_local, I/16, D, 32], down [E_local, D/32, I, 32]) for the native kernel.
        self._native: tuple[torch.Tensor, torch.Tensor] | None = None
        # Per local expert: (gate_up, down) in oneDNN's packed layout; None until packed.
        self._packed: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._min_packed_rows = (0, 0)  # (gate_up, down): fewest rows that take the packed path

    def pack_weights(self, native: bool = True) -> int:
        """Also hold the local experts' matrices in a packed layout; returns how many matrices
        were packed. The native kernel's layout where it runs (``native_experts_fit``; never
        with ``native=False``, which benchmarks use for the peer), otherwise oneDNN's (CPU
        float32 only; a no-op elsewhere).

        Why: an expert sees a handful of rows per step, MKL's slowest regime against a
        transposed weight (see ``tessera.model.kernels.linear``). Calls with fewer rows than ``min_packed_rows`` (batch-1
        decode; a small expert such as Qwen3-MoE's 512x256 below 16 rows) or with
        ``MAX_PACKED_ROWS`` or more keep the plain weights.
        """
        if self._packed is not None or self._native is not None or len(self.expert_ids) == 0:
            return 0
        if native and native_experts_fit(self.gate_up_proj, self.down_proj, self.hidden_act):
            self._native = (pack_gate_up(self.gate_up_proj), pack_down(self.down_proj))
            return 2 * len(self.expert_ids)
        if not (can_pack(self.gate_up_proj[0]) and can_pack(self.down_proj[0])):
            return 0
        self._packed = [
            (pack_weight(self.gate_up_proj[e]), pack_weight(self.down_proj[e]))
            for e in range(len(self.expert_ids))
        ]
        self._min_packed_rows = (
            min_packed_rows(self.gate_up_proj[0]), min_packed_rows(self.down_proj[0])
        )
        return 2 * len(self._packed)

    def local_index(self, expert_id: int) -> int | None:
        """Local slot of global expert ``expert_id``; None when this module does not hold it."""
        return self._local_of.get(expert_id)

    def _to_local(self, ids: torch.Tensor) -> torch.Tensor:
        """Global ids -> local slots; experts held elsewhere map to E_local (sorted last)."""
        if self._identity:
            return ids
        table = self._local_index
        if table is None or table.device != ids.device:
            # Not a buffer: models are built on the meta device, which would wipe it.
            table = torch.full((self.num_experts,), len(self.expert_ids), dtype=torch.int64)
            for g, i in self._local_of.items():
                table[g] = i
            table = table.to(ids.device)
            self._local_index = table
        return table[ids]

    def _expert(self, e: int, xs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Local expert ``e`` on xs [n, D] -> [n, D] (written into ``out`` when given)."""
        packed = self._packed
        if packed is not None and min(self._min_packed_rows) <= xs.shape[0] < MAX_PACKED_ROWS:
            gate_up_rows, down_rows = self._min_packed_rows
            gate, up = packed_linear(xs, self.gate_up_proj[e], packed[e][0], gate_up_rows).chunk(
                2, dim=-1)  # [n, I] views
            hidden = self.act(gate).mul_(up)  # [n, I]
            y = packed_linear(hidden, self.down_proj[e], packed[e][1], down_rows)  # [n, D]
            return y if out is None else out.copy_(y)
        gate_up = F.linear(xs, self.gate_up_proj[e])  # [n, 2I]
        gate, up = gate_up.chunk(2, dim=-1)  # [n, I] views
        hidden = self.act(gate).mul_(up)  # [n, I]; one fresh buffer, multiplied in place
        if out is None:
            return F.linear(hidden, self.down_proj[e])
        if torch.is_grad_enabled():  # out= is inference-only; the runner never records grads
            return out.copy_(F.linear(hidden, self.down_proj[e]))
        return torch.matmul(hidden, self.down_proj[e].t(), out=out)

    def forward(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """x [T, D], topk_ids / topk_weights [T, k] -> [T, D]: sum over local experts of
        weight * expert(x). Tokens are grouped by expert so each active expert runs one
        gate_up and one down matmul over just its tokens."""
        num_tokens, top_k = topk_ids.shape
        num_local = len(self.expert_ids)
        if num_tokens == 0 or num_local == 0:
            return torch.zeros_like(x)
        if self._native is not None:
            return native_experts(x, self._to_local(topk_ids), topk_weights, *self._native)
        if num_tokens == 1:
            return self._forward_one(x, topk_ids, topk_weights)
        local = self._to_local(topk_ids.reshape(-1))  # [T*k]
        order = torch.argsort(local, stable=True)  # [T*k], grouped by local expert
        # The one host sync of the layer: the per-expert token counts size the matmuls.
        counts = torch.bincount(local, minlength=num_local + 1)[:num_local].tolist()
        num_routed = sum(counts)
        out = torch.zeros_like(x)  # [T, D]
        if num_routed == 0:
            return out
        order = order[:num_routed]  # drop pairs routed to experts held elsewhere
        token_rows = order // top_k  # [N] token of each (token, expert) pair
        x_sorted = x.index_select(0, token_rows)  # [N, D]; a row gather, ~2x faster than x[...]
        w_sorted = topk_weights.reshape(-1).index_select(0, order)  # [N]
        # Each expert writes its rows straight into one buffer (no per-expert list + cat).
        y = x.new_empty(num_routed, x.shape[1])  # [N, D]
        start = 0
        for e, n in enumerate(counts):
            if n:
                self._expert(e, x_sorted[start : start + n], out=y[start : start + n])
                start += n
        y = y.mul_(w_sorted.unsqueeze(-1))  # [N, D]; float32 weights, product rounded once
        # index_add accumulates in pair order (expert-major), as the reference does.
        return out.index_add_(0, token_rows, y)

    def _forward_one(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """One token (batch-1 decode): run its k experts directly, in increasing expert id
        order like the grouped path, without sorting, counting or scattering."""
        ids = topk_ids[0].tolist()
        weights = topk_weights[0].tolist()
        out: torch.Tensor | None = None
        for global_id, w in sorted(zip(ids, weights, strict=True)):
            e = self._local_of.get(global_id)
            if e is None:
                continue  # held by another shard
            y = self._expert(e, x)  # [1, D]
            out = y.mul_(w) if out is None else out.add_(y, alpha=w)
        return torch.zeros_like(x) if out is None else out
