"""Roofline cost of one forward pass of a serving pool, per layer and per step.

Each op costs ``max(flops / (peak * eff), bytes / (bandwidth * eff))`` on the device that runs
it (Williams et al., "Roofline", CACM 2009), plus a fixed launch cost per op. A chip whose
``overlap`` constant is below one (a CPU: a core stalled on memory does no arithmetic) also pays
that share of the shorter leg: ``max + (1 - overlap) * min``. MoE layers add the
dispatch/combine all-to-all as an M-to-N transfer over the fabric; with M micro-batches the
compute of one micro-batch overlaps the transfers of another (two-batch overlap in DeepSeek's
inference system; ping-pong micro-batches in xDeepServe, arXiv 2508.02520). A layer then lasts
``max(sum(stages), M * max(stages))``: one micro-batch's round trip through attention, transfer
and experts, or the busiest resource serving all M, whichever is longer. Every micro-batch
re-reads the weights, so micro-batching is not free. Attention-side data-parallel groups run in lock step
with the expert side, so a step lasts as long as its slowest group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import SimError
from .hardware import BYTES_PER_ELEMENT, System
from .model import ModelCosts
from .moe import rank_imbalance, remote_fraction

KV_BYTES_PER_ELEMENT = 2.0  # KV cache kept in bf16 in every scenario
COMBINE_BYTES_PER_ELEMENT = 2.0  # expert outputs return in bf16
MEMORY_RESERVE_FRACTION = 0.1  # activations, workspace, fragmentation


@dataclass(frozen=True)
class PoolLayout:
    """Placement of the model on one pool (decode, prefill instance or colocated).

    ``num_groups`` data-parallel attention groups of ``tp`` devices each; experts spread over
    ``num_ep`` ranks, which are the attention devices themselves unless ``ffn_split`` (then they
    are separate FFN devices, attention/FFN disaggregation).
    """

    num_groups: int
    tp: int
    num_ep: int
    ffn_split: bool
    num_micro_batches: int
    precision: str
    load_balancer: bool = True
    num_redundant_experts: int = 0

    @property
    def num_attention_devices(self) -> int:
        """Devices running attention."""
        return self.num_groups * self.tp

    @property
    def num_devices(self) -> int:
        """All devices of the pool."""
        return self.num_attention_devices + (self.num_ep if self.ffn_split else 0)


class PoolCost:
    """Step-time calculator for one pool; construct once, call per step."""

    def __init__(self, system: System, model: ModelCosts, layout: PoolLayout) -> None:
        chip, eff, host = system.chip, system.chip.efficiency, system.host
        self.model, self.layout, self.system = model, layout, system
        self.weight_bytes = BYTES_PER_ELEMENT[layout.precision]
        self.act_bytes = 1.0 if layout.precision in ("fp8", "int8") else 2.0
        self.mm_rate = chip.matmul_flops_per_s(layout.precision) * eff.matmul
        self.attn_rate = chip.matmul_flops_per_s("bf16") * eff.attention
        self.mem_rate = chip.memory_bytes_per_s * eff.memory
        kv_eff = eff.memory if eff.kv_memory is None else eff.kv_memory
        self.kv_mem_rate = chip.memory_bytes_per_s * kv_eff
        split_eff = kv_eff if host.kv_memory_split is None else host.kv_memory_split
        self.kv_split_rate = chip.memory_bytes_per_s * split_eff
        self.kv_whole_batch = host.kv_whole_batch
        self.op_overhead_s = eff.op_overhead_us * 1e-6
        self.attention_row_s = host.attention_row_us * 1e-6
        self.ops_per_layer = eff.ops_per_layer
        self.step_overhead_s = eff.step_overhead_ms * 1e-3
        self.fabric_eff = eff.fabric
        self.exposed = 1.0 - eff.overlap
        self.kv_bytes_per_token_layer = model.kv_elements_per_token * KV_BYTES_PER_ELEMENT
        self.num_slots = model.num_experts + layout.num_redundant_experts
        self.num_local_experts = math.ceil(self.num_slots / max(layout.num_ep, 1)) if model.is_moe else 0
        self.dispatch_share = self._dispatch_scale_out_share()

    # ----- primitives -------------------------------------------------------------------
    def _roofline_s(self, compute_s: np.ndarray | float,
                    memory_s: np.ndarray | float) -> np.ndarray | float:
        """Time of an op from its compute and memory legs (see ``Efficiency.overlap``)."""
        longer = np.maximum(compute_s, memory_s)
        if not self.exposed:
            return longer
        return longer + self.exposed * np.minimum(compute_s, memory_s)

    def _matmul_s(self, params: float, tokens: np.ndarray | float,
                  num_shards: int | None = None) -> np.ndarray | float:
        """Roofline time of a weight matmul of ``params`` weights over ``tokens`` rows.

        The weights are split over ``num_shards`` devices (default: the attention TP degree).
        """
        shard = params / (self.layout.tp if num_shards is None else num_shards)
        return self._roofline_s(2.0 * shard * tokens / self.mm_rate,
                                shard * self.weight_bytes / self.mem_rate)

    def _transfer_s(self, num_bytes: np.ndarray | float, num_peers: int,
                    scale_out_share: float | None = None) -> np.ndarray | float:
        """All-to-all time for ``num_bytes`` leaving one device spread over ``num_peers`` devices.

        Traffic to peers outside the scale-up domain uses the scale-out network; by default its
        share is the share of such peers, ``scale_out_share`` overrides it (deduplicated MoE
        dispatch sends a token once per remote domain, as DeepEP's normal kernels do).
        """
        sys = self.system
        up = sys.scale_up.bytes_per_s * self.fabric_eff
        peers_in_domain = min(num_peers, sys.num_scale_up_devices)
        out_frac = 0.0 if num_peers <= sys.num_scale_up_devices else 1.0 - peers_in_domain / num_peers
        t = num_bytes * (1.0 - out_frac) / up + 2e-6 * sys.scale_up.latency_us
        if out_frac > 0.0:
            if sys.scale_out is None:
                raise SimError(f"{num_peers} devices exceed the {sys.name} scale-up domain")
            share = out_frac if scale_out_share is None else scale_out_share
            out = sys.scale_out.bytes_per_s * self.fabric_eff
            t = np.maximum(t, num_bytes * share / out + 2e-6 * sys.scale_out.latency_us)
        return t

    def _dispatch_scale_out_share(self) -> float | None:
        """Share of a token's expert visits that cross the scale-out network once deduplicated.

        A token goes once to each remote domain holding one of its top-k experts (expected
        number of distinct domains among k uniform picks) instead of once per expert.
        """
        sys, m = self.system, self.model
        num_domains = math.ceil(self.layout.num_ep / sys.num_scale_up_devices)
        if num_domains <= 1 or not m.num_experts_per_token:
            return None
        k = m.num_experts_per_token
        distinct = num_domains * (1.0 - (1.0 - 1.0 / num_domains) ** k)
        return distinct * (num_domains - 1) / num_domains / k

    def _tp_allreduce_s(self, tokens: np.ndarray | float) -> np.ndarray | float:
        tp = self.layout.tp
        if tp <= 1:
            return 0.0
        num_bytes = 2.0 * tokens * self.model.hidden_size * 2.0 * (tp - 1) / tp
        return self._transfer_s(num_bytes, tp)

    # ----- per-layer pieces ---------------------------------------------------------------
    def _attention_s(self, tokens: np.ndarray, core_flops: np.ndarray,
                     kv_bytes: np.ndarray, seqs: np.ndarray,
                     prefill: PrefillAttention | None = None) -> np.ndarray:
        """One layer's attention unit per group; ``seqs``: sequences sampling a token in the
        step (the decode batch), which sets the KV read rate (``HostCosts.kv_whole_batch``).

        With ``prefill`` the decodes' kernel and the chunks' kernels run one after the other:
        each is its own roofline (a memory-bound decode read does not hide under a chunk's
        FLOPs), and each chunk pays its own host ops and per-row cost."""
        m = self.model
        proj = self._matmul_s(m.attn_params, tokens)
        if prefill is None:
            core = self._core_s(core_flops, kv_bytes, self._decode_kv_rate(seqs))
        else:
            core = (self._core_s(core_flops - prefill.core_flops, kv_bytes - prefill.kv_bytes,
                                 self._decode_kv_rate(prefill.num_decodes))
                    + self._core_s(prefill.core_flops, prefill.kv_bytes, self.kv_mem_rate)
                    + prefill.num_rows * self.attention_row_s
                    + prefill.num_chunks * PREFILL_OPS_PER_CHUNK * self.op_overhead_s)
        return np.asarray(proj + core + self._tp_allreduce_s(tokens))

    def _decode_kv_rate(self, seqs: np.ndarray) -> np.ndarray:
        """KV read rate of a decode batch of ``seqs`` (``HostCosts.kv_whole_batch``)."""
        return np.where(seqs < self.kv_whole_batch, self.kv_split_rate, self.kv_mem_rate)

    def _core_s(self, core_flops: np.ndarray, kv_bytes: np.ndarray,
                kv_rate: np.ndarray | float) -> np.ndarray:
        """Attention over the KV cache (no projections) as one op, reading it at ``kv_rate``."""
        return np.asarray(self._roofline_s(core_flops / self.layout.tp / self.attn_rate,
                                           kv_bytes / self.layout.tp / kv_rate))

    def _moe_layer_s(self, attn_s: np.ndarray, tokens: np.ndarray) -> float:
        """One MoE layer: attention, expert FFN and dispatch/combine, micro-batch pipelined."""
        m, lay = self.model, self.layout
        mb = lay.num_micro_batches
        total_routed = float(np.sum(tokens)) * m.num_experts_per_token
        imb = rank_imbalance(m.num_experts, lay.num_ep, total_routed, lay.load_balancer)
        shared_tokens = float(np.max(tokens))
        if lay.ffn_split:
            shared_tokens = float(np.sum(tokens)) / max(lay.num_ep, 1)
        dev_tokens = total_routed / max(lay.num_ep, 1) * imb / mb
        active = min(self.num_local_experts, max(dev_tokens * mb, 1.0))
        expert_s = float(self._roofline_s(2.0 * m.expert_params * dev_tokens / self.mm_rate,
                                          active * m.expert_params * self.weight_bytes / self.mem_rate))
        shared_s = float(self._matmul_s(m.shared_expert_params + m.router_params, shared_tokens / mb,
                                        1 if lay.ffn_split else None))
        frac = 0.0 if lay.ffn_split else remote_fraction(lay.num_ep)
        per_token = m.hidden_size * (self.act_bytes + COMBINE_BYTES_PER_ELEMENT)
        send = float(np.max(tokens)) / mb * m.num_experts_per_token * per_token
        send = send if lay.ffn_split else send * frac
        recv = dev_tokens * per_token
        comm_s = float(self._transfer_s(max(send, recv), lay.num_ep, self.dispatch_share))
        attn_mb = float(np.max(attn_s))
        if lay.ffn_split:
            stages = [attn_mb, expert_s + shared_s, comm_s]
        else:
            stages = [attn_mb + expert_s + shared_s, comm_s]
        return max(sum(stages), mb * max(stages))

    # ----- units on their own (a worker per unit kind, e.g. benchmarks/simlab/afd_local.py) --
    def attention_unit_s(self, tokens: float, core_flops: float, kv_bytes: float,
                         seqs: float) -> float:
        """One layer's attention unit (projections and attention over the KV cache) for
        ``seqs`` sequences sampling a token."""
        t = np.array([tokens])
        return float(self._attention_s(t, np.array([core_flops]), np.array([kv_bytes]),
                                       np.array([seqs]))[0])

    def ffn_unit_s(self, tokens: float, moe_layer: bool) -> float:
        """One layer's FFN unit over ``tokens`` rows on one device holding all of it: the dense
        FFN, or (``moe_layer``) the routed experts, each token visiting top-k, and any shared
        expert."""
        m = self.model
        if not moe_layer:
            return float(self._matmul_s(m.dense_ffn_params, tokens, 1))
        routed = tokens * m.num_experts_per_token
        active = min(float(m.num_experts), max(routed, 1.0))
        experts = self._roofline_s(2.0 * m.expert_params * routed / self.mm_rate,
                                   active * m.expert_params * self.weight_bytes / self.mem_rate)
        return float(experts) + float(self._matmul_s(m.shared_expert_params, tokens, 1))

    def head_s(self, sampled: float) -> float:
        """The LM head over the ``sampled`` rows."""
        return float(self._matmul_s(self.model.vocab_size * self.model.hidden_size, sampled, 1))

    # ----- whole step -----------------------------------------------------------------------
    def step_s(self, load: PassLoad, mtp: PassLoad | None = None,
               per_op_launch: bool = True) -> float:
        """Seconds for one forward step of the pool over per-group ``load``.

        ``mtp`` is the load of the multi-token-prediction layers in the same step, if any.
        ``per_op_launch=False``: the step's layers run as one native call (no per-op launches).
        """
        m, lay = self.model, self.layout
        mb = lay.num_micro_batches
        total = self._layers_s(load, m.num_dense_layers, m.num_moe_layers)
        num_layers = m.num_layers
        if mtp is not None and m.num_mtp_layers:
            dense, moe = (0, m.num_mtp_layers) if m.is_moe else (m.num_mtp_layers, 0)
            total += self._layers_s(mtp, dense, moe)
            total += m.num_mtp_layers * float(np.max(self._matmul_s(m.mtp_extra_params, mtp.tokens)))
            total += float(np.max(self._matmul_s(m.vocab_size * m.hidden_size, mtp.sampled)))
            num_layers += m.num_mtp_layers
        total += float(np.max(self._matmul_s(m.vocab_size * m.hidden_size, load.sampled)))
        if per_op_launch:
            total += num_layers * self.ops_per_layer * mb * self.op_overhead_s
        return total + self.step_overhead_s

    def _layers_s(self, load: PassLoad, num_dense: int, num_moe: int) -> float:
        m, mb = self.model, self.layout.num_micro_batches
        t_mb = load.tokens / mb
        pre = load.prefill
        if pre is not None and mb > 1:
            raise SimError("a split prefill/decode attention load runs as one micro-batch")
        attn = self._attention_s(t_mb, load.core_flops / mb, load.kv_bytes / mb,
                                 load.sampled / mb, pre)
        total = 0.0
        if num_dense:
            dense = attn + self._matmul_s(m.dense_ffn_params, t_mb) + self._tp_allreduce_s(t_mb)
            total += num_dense * mb * float(np.max(dense))
        if num_moe:
            total += num_moe * self._moe_layer_s(attn, load.tokens)
        return total

    # ----- memory -----------------------------------------------------------------------------
    def attention_device_weight_bytes(self) -> float:
        """Weight bytes resident on one attention device."""
        m, lay = self.model, self.layout
        layers = m.num_layers + m.num_mtp_layers
        params = float(layers * m.attn_params + m.num_dense_layers * m.dense_ffn_params
                       + m.embedding_params + m.num_mtp_layers * m.mtp_extra_params) / lay.tp
        if not lay.ffn_split:
            params += self._expert_device_params()
        return params * self.weight_bytes

    def _expert_device_params(self) -> float:
        m = self.model
        moe_layers = m.num_moe_layers + (m.num_mtp_layers if m.is_moe else 0)
        per_layer = self.num_local_experts * m.expert_params + m.shared_expert_params + m.router_params
        if not m.is_moe:
            return 0.0
        return moe_layers * per_layer

    def ffn_device_weight_bytes(self) -> float:
        """Weight bytes on one FFN device (attention/FFN split only)."""
        return self._expert_device_params() * self.weight_bytes

    def kv_bytes_per_token(self) -> float:
        """KV cache bytes one token occupies on one attention device (all layers)."""
        layers = self.model.num_layers + self.model.num_mtp_layers
        return self.kv_bytes_per_token_layer * layers / self.layout.tp

    def kv_capacity_tokens(self) -> int:
        """Tokens of KV cache one data-parallel group can hold (raises if weights do not fit)."""
        usable = self.system.chip.memory_bytes * (1.0 - MEMORY_RESERVE_FRACTION)
        free = usable - self.attention_device_weight_bytes()
        gb = 1e-9
        if free <= 0:
            raise SimError(
                f"{self.model.name} does not fit: {self.attention_device_weight_bytes() * gb:.1f} GB"
                f" of weights per attention device, {usable * gb:.1f} GB usable on"
                f" {self.system.chip.name}; use more devices (tp/ep) or a smaller precision")
        if self.layout.ffn_split and self.ffn_device_weight_bytes() > usable:
            raise SimError(
                f"{self.model.name} experts do not fit: {self.ffn_device_weight_bytes() * gb:.1f} GB"
                f" per FFN device, {usable * gb:.1f} GB usable; use more FFN devices")
        return int(free / self.kv_bytes_per_token())


@dataclass(frozen=True)
class PrefillAttention:
    """The prefill chunks' part of a step's attention, where they run as kernels of their own
    after the decodes' (Tessera's engine: one paged decode kernel, then SDPA per chunk). Per
    group and one layer, like :class:`PassLoad`, whose ``core_flops`` and ``kv_bytes`` keep the
    totals."""

    core_flops: np.ndarray
    kv_bytes: np.ndarray
    num_rows: np.ndarray
    """Query rows (prompt tokens computed) of the chunks."""
    num_chunks: np.ndarray
    num_decodes: np.ndarray
    """Sequences decoding one token: the decode kernel's batch, which sets its KV read rate."""


PREFILL_OPS_PER_CHUNK = 2  # a chunk's own host ops per layer: its SDPA call, its output copy


@dataclass(frozen=True)
class PassLoad:
    """Work of one step, per data-parallel group (numpy arrays of equal length)."""

    tokens: np.ndarray
    core_flops: np.ndarray
    kv_bytes: np.ndarray
    sampled: np.ndarray
    prefill: PrefillAttention | None = None
    """None: the step's attention is costed as one op (every accelerator scenario)."""


def decode_load(model: ModelCosts, num_seqs: np.ndarray, context_tokens: np.ndarray,
                tokens_per_seq: int = 1) -> PassLoad:
    """Decode step: ``num_seqs`` sequences per group with ``context_tokens`` total context.

    With ``tokens_per_seq`` > 1 (MTP verification) each sequence runs that many query tokens
    over the same cache, read once.
    """
    kvb = model.kv_elements_per_token * KV_BYTES_PER_ELEMENT
    tokens = num_seqs * float(tokens_per_seq)
    return PassLoad(tokens=tokens,
                    core_flops=model.attn_flops_per_kv_decode * context_tokens * float(tokens_per_seq),
                    kv_bytes=kvb * context_tokens, sampled=tokens)


def prefill_load(model: ModelCosts, new_tokens: np.ndarray, attention_pairs: np.ndarray,
                 num_seqs: np.ndarray) -> PassLoad:
    """Prefill step: ``new_tokens`` computed per group attending over ``attention_pairs``."""
    kvb = model.kv_elements_per_token * KV_BYTES_PER_ELEMENT
    return PassLoad(tokens=new_tokens, core_flops=model.attn_flops_per_pair_prefill * attention_pairs,
                    kv_bytes=kvb * new_tokens, sampled=num_seqs)


def prefill_core_flops(model: ModelCosts, num_new: float, num_cached: float) -> float:
    """Attention FLOPs per layer of a prefill of ``num_new`` tokens after ``num_cached`` cached ones.

    A prefix-cache hit saves the prefix's own forward pass, not the new tokens' attention over
    it, nor (MLA) the re-expansion of its cached latents into keys and values.
    """
    return (model.attn_flops_per_pair_prefill * causal_pairs(num_new, num_cached)
            + model.kv_up_flops_per_context_token * num_cached)


def causal_pairs(num_new: float, num_cached: float) -> float:
    """(query, key) pairs of a causal prefill of ``num_new`` tokens after ``num_cached`` ones."""
    return num_new * num_cached + num_new * (num_new + 1) / 2.0
