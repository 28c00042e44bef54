"""Deployment description (mode, device counts, batching) and its mapping to pool layouts."""

from __future__ import annotations

from dataclasses import dataclass

from .costmodel import KV_BYTES_PER_ELEMENT, PoolLayout
from .errors import SimError
from .hardware import PRECISIONS, System
from .inputs import MAX_BATCH_PER_DP, check_float, check_int
from .model import ModelCosts

MODES = ("colocated", "pd", "afd")
DEFAULT_PREFILL_INSTANCE_DEVICES = 32


@dataclass(frozen=True)
class Deployment:
    """How a model is served.

    * ``colocated``: ``num_dp`` data-parallel attention groups of ``tp`` devices; experts spread
      over the same devices (expert parallelism over all of them); prefill chunks and decode
      share each step.
    * ``pd``: a prefill pool of ``num_prefill_devices`` (instances of
      ``prefill_instance_devices``) and a decode pool laid out as in ``colocated``.
    * ``afd``: a prefill pool and a decode pool split into ``num_dp * tp`` attention devices and
      ``num_ffn_devices`` expert devices, with ``num_micro_batches`` ping-pong micro-batches.

    ``batch_per_dp`` is the most sequences one data-parallel group decodes at once in every
    mode; ``mtp_acceptance`` turns on one-draft multi-token prediction with that acceptance rate.
    """

    mode: str
    precision: str = "bf16"
    num_dp: int = 1
    tp: int = 1
    batch_per_dp: int = 64
    num_ffn_devices: int = 0
    num_micro_batches: int = 1
    num_prefill_devices: int = 0
    prefill_instance_devices: int = 0
    prefill_tokens_per_device: int = 16384
    chunk_tokens_per_group: int = 2048
    mtp_acceptance: float | None = None
    load_balancer: bool = True
    num_redundant_experts: int = 0

    @property
    def num_decode_devices(self) -> int:
        """Devices of the decode (or colocated) pool."""
        return self.num_dp * self.tp + (self.num_ffn_devices if self.mode == "afd" else 0)

    @property
    def num_devices(self) -> int:
        """All devices used."""
        return self.num_decode_devices + (self.num_prefill_devices if self.mode != "colocated" else 0)

    def instance_devices(self) -> int:
        """Devices per prefill instance (pd/afd)."""
        if self.prefill_instance_devices:
            return self.prefill_instance_devices
        return min(self.num_prefill_devices, DEFAULT_PREFILL_INSTANCE_DEVICES)

    def check_numbers(self) -> None:
        """Raise :class:`SimError` for counts and rates no system could run (zero, negative,
        non-integer, absurdly large, not finite); needs neither the system nor the model."""
        if self.mode not in MODES:
            raise SimError(f"unknown deployment {self.mode!r}: use one of {', '.join(MODES)}")
        if self.precision not in PRECISIONS:
            raise SimError(f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        for name, value in (("--dp", self.num_dp), ("--tp", self.tp),
                            ("--micro-batches", self.num_micro_batches),
                            ("prefill tokens per device", self.prefill_tokens_per_device),
                            ("chunk tokens per group", self.chunk_tokens_per_group)):
            check_int(name, value)
        check_int("--batch-per-dp", self.batch_per_dp, 1, MAX_BATCH_PER_DP)
        # 0 means "none" (colocated has no FFN or prefill pool) or "default" (instance size).
        for name, value in (("--ffn-devices", self.num_ffn_devices),
                            ("--prefill-devices", self.num_prefill_devices),
                            ("--prefill-instance-devices", self.prefill_instance_devices),
                            ("--redundant-experts", self.num_redundant_experts)):
            check_int(name, value, 0)
        if self.mtp_acceptance is not None:
            check_float("--mtp-acceptance", self.mtp_acceptance, 0.0, 1.0)
        if not isinstance(self.load_balancer, bool):
            raise SimError(f"load_balancer must be True or False (got {self.load_balancer!r})")

    def validate(self, system: System, model: ModelCosts) -> None:
        """Raise :class:`SimError` when the deployment cannot run on ``system``."""
        self.check_numbers()
        system.chip.matmul_flops_per_s(self.precision)
        if self.mode == "afd":
            if not model.is_moe:
                raise SimError("attention/FFN disaggregation (afd) needs an MoE model")
            if self.num_ffn_devices < 1:
                raise SimError("afd needs --ffn-devices of at least 1")
        if self.mode != "colocated":
            if self.num_prefill_devices < 1:
                raise SimError(f"{self.mode} needs --prefill-devices of at least 1")
            inst = self.instance_devices()
            if self.num_prefill_devices % inst or inst % self.tp:
                raise SimError(f"prefill pool of {self.num_prefill_devices} devices does not split"
                               f" into instances of {inst} devices (tp {self.tp})")
        if self.mtp_acceptance is not None and model.num_mtp_layers < 1:
            raise SimError(f"{model.name} has no MTP layers (num_nextn_predict_layers)")
        if self.num_devices > system.num_devices:
            raise SimError(f"deployment needs {self.num_devices} devices but {system.name} has"
                           f" {system.num_devices}")

    def handoffs_across_systems(self, devices_per_system: int) -> float:
        """Share of prefill-to-decode KV handoffs that leave their system, with the decode pool
        on the first devices and the prefill pool on the ones after it, systems of
        ``devices_per_system`` devices each, and each prefill device's requests spread over
        the decode devices: 0 within one system, 1 for a prefill pool on one system feeding a
        decode pool that fills another."""
        dec, pre = self.num_decode_devices, self.num_prefill_devices
        if self.mode == "colocated" or not dec or not pre:
            return 0.0
        size = devices_per_system

        def per_system(lo: int, hi: int) -> list[int]:
            return [max(0, min(hi, (j + 1) * size) - max(lo, j * size))
                    for j in range((dec + pre + size - 1) // size)]

        same = sum(d * p for d, p in zip(per_system(0, dec), per_system(dec, dec + pre),
                                          strict=True))
        return 1.0 - same / (dec * pre)

    def decode_layout(self, model: ModelCosts) -> PoolLayout:
        """Layout of the decode (or colocated) pool."""
        afd = self.mode == "afd"
        ep = self.num_ffn_devices if afd else (self.num_dp * self.tp if model.is_moe else 1)
        return PoolLayout(num_groups=self.num_dp, tp=self.tp, num_ep=ep, ffn_split=afd,
                          num_micro_batches=self.num_micro_batches, precision=self.precision,
                          load_balancer=self.load_balancer,
                          num_redundant_experts=self.num_redundant_experts)

    def prefill_layout(self, model: ModelCosts) -> PoolLayout:
        """Layout of one prefill instance (two micro-batches, DP attention, EP over it)."""
        inst = self.instance_devices()
        return PoolLayout(num_groups=inst // self.tp, tp=self.tp,
                          num_ep=inst if model.is_moe else 1, ffn_split=False,
                          num_micro_batches=2 if model.is_moe else 1, precision=self.precision,
                          load_balancer=self.load_balancer,
                          num_redundant_experts=self.num_redundant_experts)


def kv_handoff_cost(system: System, model: ModelCosts, dep: Deployment) -> tuple[float, float]:
    """(seconds per prompt token, seconds per request) of moving a prompt's KV from a prefill
    instance to a decode instance of ``dep`` on ``system``: inside one system over its
    scale-up domain when that spans the system (else its scale-out network), between systems
    over the scale-out network, in the share :meth:`Deployment.handoffs_across_systems` gives."""
    kv_per_token = model.kv_elements_per_token * KV_BYTES_PER_ELEMENT * (
        model.num_layers + model.num_mtp_layers)
    inside = (system.scale_up if system.num_scale_up_devices >= system.num_devices_per_system
              or system.scale_out is None else system.scale_out)
    across = dep.handoffs_across_systems(system.num_devices_per_system)
    fabrics = [(1.0 - across, inside)]
    if across and system.scale_out is not None:
        fabrics.append((across, system.scale_out))
    eff = system.chip.efficiency.fabric
    return (sum(share * kv_per_token / (f.bytes_per_s * eff) for share, f in fabrics),
            sum(share * f.latency_us * 1e-6 for share, f in fabrics))
