"""A planned deployment as a deployment file (``tessera plan --emit-deployment FILE``), which
``tessera serve --deployment FILE`` launches (:mod:`tessera.deployment_file`)."""

from __future__ import annotations

import math
from typing import Any

from tessera import deployment_file as df

from .deployment import Deployment
from .hardware import System
from .result import SimResult


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN or infinity; a figure the simulation could not produce is null.
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in values.items()}


def pools_of(dep: Deployment) -> list[df.Pool]:
    """The pools of instances that make ``dep``: a colocated group, or a prefill instance, is
    an instance of ``tp`` (prefill: the instance size) devices; an afd decode pool is one
    Transformerless group of ``num_dp`` attention and ``num_ffn_devices`` FFN workers."""
    if dep.mode == "afd":
        decode = df.Pool(role="decode", instances=1,
                         devices_per_instance=dep.num_dp + dep.num_ffn_devices,
                         max_num_seqs=dep.batch_per_dp,
                         max_num_batched_tokens=dep.chunk_tokens_per_group,
                         attention_workers=dep.num_dp, ffn_workers=dep.num_ffn_devices,
                         micro_batches=dep.num_micro_batches)
    else:
        decode = df.Pool(role="both" if dep.mode == "colocated" else "decode",
                         instances=dep.num_dp, devices_per_instance=dep.tp,
                         max_num_seqs=dep.batch_per_dp,
                         max_num_batched_tokens=dep.chunk_tokens_per_group)
    if dep.mode == "colocated":
        return [decode]
    inst = dep.instance_devices()
    prefill = df.Pool(role="prefill", instances=dep.num_prefill_devices // inst,
                      devices_per_instance=inst, max_num_seqs=dep.batch_per_dp,
                      max_num_batched_tokens=dep.prefill_tokens_per_device * inst)
    return [prefill, decode]


def deployment_file_of(dep: Deployment, system: System, model: str, workload: df.Workload,
                       tokens_per_s_per_chip: float, tpot_ms: float, ttft_ms: float,
                       simulated: SimResult | None) -> df.Deployment:
    """The deployment file of ``dep`` on ``system``, with the planner's figures."""
    return df.check(df.Deployment(
        format=df.FORMAT, hardware=system.name, model=model, precision=dep.precision,
        mode=dep.mode,  # type: ignore[arg-type]  # Deployment.check_numbers checks modes
        pools=pools_of(dep), threads_per_device=system.threads_per_device,
        num_systems=system.num_systems,
        workload=workload,
        predicted=df.Prediction(
            tokens_per_s_per_chip=tokens_per_s_per_chip, tpot_ms=tpot_ms, ttft_ms=ttft_ms,
            simulated=None if simulated is None else _finite(simulated.to_dict()))))
