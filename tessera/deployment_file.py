"""Deployment files: what ``tessera plan --emit-deployment FILE`` writes and ``tessera serve
--deployment FILE`` (or ``LLM(model, deployment=FILE)``) runs.

A file names pools of instances (their role, count, devices and batch limits), the precision,
and the planner's prediction, so that the measured run can be set beside it. The file is input
like any other: it is size-bounded, decoded strictly (unknown fields, wrong types and
out-of-range counts are errors naming the field), and a deployment this runtime cannot launch
is refused with the reason rather than run in some other shape.

Pure Python (no torch): the simulator writes it and the server reads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import msgspec

FORMAT = "tessera-deployment/1"
MAX_FILE_BYTES = 1 << 20
"""A deployment is a few hundred bytes; anything near this bound is not one."""
MAX_INSTANCES = 64
"""As many instances as one router takes (``ClusterConfig``)."""
MAX_LIMIT = 1 << 20
"""Bound on batch limits (sequences, tokens per step): larger is a typo, not a plan."""
MAX_SYSTEMS = 64
"""Systems one deployment may span (``tessera plan --systems``)."""
DTYPE_OF_PRECISION = {"fp32": "float32", "bf16": "bfloat16"}
"""Precisions the engine runs, by the simulator's name; int8 and fp8 weights are not loaded yet."""


def host_cpus() -> int:
    """CPUs this process may run on (its affinity, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class Pool(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``instances`` alike, each of ``devices_per_instance`` devices, in one ``role``.

    ``attention_workers``/``ffn_workers`` above 0 make each instance a Transformerless group
    (attention/FFN disaggregation) with ``micro_batches`` ping-pong micro-batches."""

    role: Literal["both", "prefill", "decode"]
    instances: int
    devices_per_instance: int
    max_num_seqs: int
    max_num_batched_tokens: int
    attention_workers: int = 0
    ffn_workers: int = 0
    micro_batches: int = 1


class Prediction(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The planner's figures for the deployment (steady state, and its event simulation)."""

    tokens_per_s_per_chip: float
    tpot_ms: float
    ttft_ms: float
    simulated: dict[str, Any] | None = None


class Workload(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the deployment was planned for."""

    input_tokens: int
    output_tokens: int
    tpot_slo_ms: float
    ttft_slo_ms: float | None = None


class Deployment(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One deployment file."""

    format: str
    hardware: str
    model: str
    precision: str
    mode: Literal["colocated", "pd", "afd"]
    pools: list[Pool]
    threads_per_device: int | None = None
    """On a calibrated CPU (``cpu-local``): engine threads one device stands for."""
    num_systems: int = 1
    """Systems like ``hardware`` the pools span (``tessera plan --systems``)."""
    workload: Workload | None = None
    predicted: Prediction | None = None

    def pool(self, role: str) -> Pool | None:
        """The pool of ``role``, if there is one."""
        return next((p for p in self.pools if p.role == role), None)

    @property
    def num_devices(self) -> int:
        """Devices of all pools (an instance's workers count one device each)."""
        return sum(p.instances * _instance_devices(p) for p in self.pools)


def _instance_devices(pool: Pool) -> int:
    if pool.attention_workers or pool.ffn_workers:
        return pool.attention_workers + pool.ffn_workers
    return pool.devices_per_instance


class DeploymentError(ValueError):
    """A deployment file that cannot be read, or a deployment this runtime cannot launch."""


def check(dep: Deployment) -> Deployment:
    """Return ``dep`` if its numbers make a deployment; else raise :class:`DeploymentError`."""
    if dep.format != FORMAT:
        raise DeploymentError(f"format {dep.format!r} is not {FORMAT!r}")
    roles = [p.role for p in dep.pools]
    want = {"colocated": ["both"], "pd": ["prefill", "decode"], "afd": ["prefill", "decode"]}
    if sorted(roles) != sorted(want[dep.mode]):
        raise DeploymentError(f"a {dep.mode} deployment has pools {', '.join(want[dep.mode])}, "
                              f"not {', '.join(roles) or 'none'}")
    for p in dep.pools:
        for name, low, high in (("instances", 1, MAX_INSTANCES),
                                ("devices_per_instance", 1, 1 << 16),
                                ("max_num_seqs", 1, MAX_LIMIT),
                                ("max_num_batched_tokens", 1, MAX_LIMIT),
                                ("attention_workers", 0, MAX_INSTANCES),
                                ("ffn_workers", 0, MAX_INSTANCES),
                                ("micro_batches", 1, 8)):
            value = getattr(p, name)
            if not low <= value <= high:
                raise DeploymentError(f"{p.role} pool: {name} must be in [{low}, {high}], "
                                      f"got {value}")
        if (p.attention_workers > 0) != (p.ffn_workers > 0):
            raise DeploymentError(f"{p.role} pool: attention_workers and ffn_workers go "
                                  "together")
    if sum(p.instances for p in dep.pools) > MAX_INSTANCES:
        raise DeploymentError(f"at most {MAX_INSTANCES} instances in all")
    if not 1 <= dep.num_systems <= MAX_SYSTEMS:
        raise DeploymentError(f"num_systems must be in [1, {MAX_SYSTEMS}], got "
                              f"{dep.num_systems}")
    if dep.threads_per_device is not None and not 1 <= dep.threads_per_device <= 1 << 12:
        raise DeploymentError(f"threads_per_device must be in [1, 4096], got "
                              f"{dep.threads_per_device}")
    return dep


def read(path: str | os.PathLike[str]) -> Deployment:
    """Read and check the deployment file at ``path``."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise DeploymentError(f"deployment file {p} has {size} bytes; a deployment file "
                                  f"has at most {MAX_FILE_BYTES}")
        with p.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise DeploymentError(f"cannot read deployment file {p}: {exc.strerror or exc}") from exc
    return loads(raw, str(p))


def loads(raw: bytes, name: str = "deployment") -> Deployment:
    """Decode and check a deployment from JSON bytes."""
    try:
        return check(msgspec.json.decode(raw, type=Deployment))
    except msgspec.ValidationError as exc:
        raise DeploymentError(f"{name}: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise DeploymentError(f"{name} is not a JSON deployment file: {exc}") from exc


def write(dep: Deployment, path: str | os.PathLike[str]) -> None:
    """Write ``dep`` (checked) as indented JSON."""
    check(dep)
    Path(path).write_bytes(msgspec.json.format(msgspec.json.encode(dep), indent=2) + b"\n")


def engine_options(dep: Deployment, num_host_cpus: int | None = None) -> dict[str, Any]:
    """The engine options (``LLM``/``engine_config`` keywords) that launch ``dep`` here.

    Raises :class:`DeploymentError` for what this runtime cannot launch: tensor-parallel
    instances (an instance is one device: one GPU, or ``threads_per_device`` CPU threads),
    data-parallel Transformerless groups, a precision whose weights the engine does not
    load, or (a plan for calibrated CPUs, which gives ``threads_per_device``) more CPU
    threads than the host's ``num_host_cpus``.

    Instances share one engine config: the prefill pool's token budget (a step of prompt
    chunks) and the decode pool's sequence limit are both in it."""
    if dep.num_systems > 1:
        raise DeploymentError(f"the deployment spans {dep.num_systems} systems; Tessera launches "
                              "instances on one host")
    if dep.precision not in DTYPE_OF_PRECISION:
        raise DeploymentError(f"precision {dep.precision} is not runnable yet: Tessera loads "
                              f"{' and '.join(DTYPE_OF_PRECISION)} weights (plan with "
                              "--precision fp32 or bf16)")
    for p in dep.pools:
        if p.devices_per_instance != 1 and not (p.attention_workers or p.ffn_workers):
            raise DeploymentError(f"{p.role} pool: instances of {p.devices_per_instance} "
                                  "devices need tensor parallelism, which Tessera's instances "
                                  "do not have: an instance is one device")
    options: dict[str, Any] = {"dtype": DTYPE_OF_PRECISION[dep.precision]}
    decode = dep.pool("decode") or dep.pool("both")
    assert decode is not None  # check() keeps a decode or a both pool
    options["max_num_seqs"] = decode.max_num_seqs
    options["max_num_batched_tokens"] = decode.max_num_batched_tokens
    if decode.attention_workers:
        if dep.pool("prefill") is not None:
            # Each decode instance a Transformerless group behind the prefill instances.
            options.update(decode_attention_workers=decode.attention_workers,
                           decode_ffn_workers=decode.ffn_workers,
                           decode_micro_batches=decode.micro_batches)
        elif decode.instances > 1:
            raise DeploymentError("data-parallel Transformerless groups are not runnable yet; "
                                  "one group is, or groups behind prefill instances")
        else:
            options.update(attention_workers=decode.attention_workers,
                           ffn_workers=decode.ffn_workers, micro_batches=decode.micro_batches)
    prefill = dep.pool("prefill")
    if prefill is not None:
        options["max_num_batched_tokens"] = prefill.max_num_batched_tokens
        options.update(prefill_instances=prefill.instances, decode_instances=decode.instances)
    elif decode.instances > 1:
        options["data_parallel"] = decode.instances
    num_instances = sum(p.instances for p in dep.pools)
    threads = dep.threads_per_device
    if threads is not None and not decode.attention_workers:
        if num_host_cpus is not None and num_instances * threads > num_host_cpus:
            raise DeploymentError(f"the deployment needs {num_instances * threads} CPU threads "
                                  f"({num_instances} instances of {threads}); this host has "
                                  f"{num_host_cpus}")
        options["num_threads"] = threads
    return options
