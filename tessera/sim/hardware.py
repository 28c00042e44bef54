"""Hardware dataclasses (chip, efficiency, host costs, fabric, system) from the catalog.

A *device* is what the runtime addresses (one die of an Ascend 910C, one GPU); a *chip* is the
package that per-chip throughput is normalised to. Rates stored here are per device.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from tessera.deployment_file import MAX_SYSTEMS, host_cpus

from .catalog import load_hardware
from .errors import SimError
from .tiers import KVTiers, kv_tiers_from_catalog

PRECISIONS = ("fp32", "bf16", "fp8", "int8")
BYTES_PER_ELEMENT = {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0}
LOCAL_CHIP = "cpu-local"


@dataclass(frozen=True)
class Efficiency:
    """Per-chip-family constants: fractions of peak and fixed costs (same for every scenario)."""

    matmul: float
    attention: float
    memory: float
    fabric: float
    op_overhead_us: float
    ops_per_layer: int
    step_overhead_ms: float
    kv_memory: float | None = None
    """Fraction of the memory rate at which attention reads the KV cache; None: ``memory``. A
    decode-attention kernel reading scattered KV blocks and a GEMV streaming weights can reach
    different shares of the same bus (fitted apart on calibrated CPUs)."""
    overlap: float = 1.0
    """Share of an op's shorter leg (compute or memory) hidden under its longer one: 1 is the
    pure roofline max (accelerators stream weights while computing), 0 the plain sum (a CPU
    core waiting on memory does no arithmetic)."""


@dataclass(frozen=True)
class HostCosts:
    """What Tessera's own host code and CPU kernels add to a step beyond the chip's roofline.

    A calibrated CPU profile supplies them (``tessera sim calibrate``: its ``host`` block); the
    defaults, nothing added, hold for every catalog system."""

    seq_overhead_us: float = 0.0
    """Host time per scheduled sequence per step (input building, sampling bookkeeping)."""
    attention_row_us: float = 0.0
    """Host time per query row per layer of a prefill chunk's attention, on top of its FLOPs at
    the attention rate: each chunk goes through SDPA, whose FLOP rate rises with the chunk's
    length, so short chunks cost more per FLOP than one rate gives."""
    native_decode_rows: int = 0
    """Decode-only steps of up to this many sequences run all layers as one native call
    (``tessera.engine.decode_stack``, read from the engine at calibration) and pay no per-op
    launch cost; 0: none do."""
    kv_whole_batch: int = 0
    """Decoding sequences per step from which the CPU decode kernel reads whole sequences (KV
    at ``Efficiency.kv_memory``); below it the kernel splits each sequence's heads over threads
    and reads short strided runs, at ``kv_memory_split``. 0: no such kernel."""
    kv_memory_split: float | None = None
    """Fraction of the memory rate at which attention reads the KV cache in decode steps of
    fewer than ``kv_whole_batch`` sequences; None: ``Efficiency.kv_memory``."""


@dataclass(frozen=True)
class Chip:
    """One accelerator package; rates are per device (die or GPU)."""

    name: str
    num_devices_per_chip: int
    tflops: dict[str, float]
    memory_bytes: float
    memory_bytes_per_s: float
    efficiency: Efficiency
    gauge: tuple[float, float] | None = None
    """The machine gauge reading (fp32 GFLOP/s, weight-streaming GB/s;
    :class:`tessera.sim.calibrate.MachineGauge`) at which these rates hold: calibrated CPUs
    only, whose speed drifts (:func:`system_at` rates them at another reading); None
    elsewhere."""

    def matmul_flops_per_s(self, precision: str) -> float:
        """Peak dense matrix rate of one device at ``precision`` (raises if unsupported)."""
        if precision not in self.tflops:
            have = ", ".join(sorted(self.tflops))
            raise SimError(f"chip {self.name} has no {precision} matrix unit (has {have})")
        return self.tflops[precision] * 1e12


@dataclass(frozen=True)
class Fabric:
    """An interconnect: per-device bandwidth each way and per-message latency."""

    name: str
    bytes_per_s: float
    latency_us: float


@dataclass(frozen=True)
class System:
    """A deployable system: chips, its scale-up domain and an optional scale-out network."""

    name: str
    chip: Chip
    num_chips: int
    scale_up: Fabric
    num_scale_up_chips: int
    scale_out: Fabric | None
    host: HostCosts = HostCosts()
    """Tessera's host costs on this system (calibrated CPUs; nothing elsewhere)."""
    kv_tiers: KVTiers | None = None
    """Load paths of the KV tiers below device memory; None: the catalog's default
    (:func:`get_kv_tiers`)."""
    threads_per_device: int | None = None
    """A calibrated CPU: the engine threads one device stands for (the threads its profile was
    fitted with), so that the host's cores make ``num_chips`` devices; None elsewhere."""
    num_systems: int = 1
    """Systems like this one side by side (``--systems``): ``num_chips`` counts all of them, and
    traffic between them goes over ``scale_out``."""

    def tiers(self) -> KVTiers:
        """This system's KV tier load paths (the catalog's default where it has none)."""
        return self.kv_tiers if self.kv_tiers is not None else get_kv_tiers(DEFAULT_KV_TIERS)

    @property
    def num_devices(self) -> int:
        """Devices the runtime can address in the whole system."""
        return self.num_chips * self.chip.num_devices_per_chip

    @property
    def num_devices_per_system(self) -> int:
        """Devices of one of the ``num_systems`` systems."""
        return self.num_devices // self.num_systems

    @property
    def num_scale_up_devices(self) -> int:
        """Devices inside one scale-up (all-to-all, high bandwidth) domain."""
        return self.num_scale_up_chips * self.chip.num_devices_per_chip


def _efficiency(raw: dict[str, Any]) -> Efficiency:
    return Efficiency(
        matmul=float(raw["matmul"]),
        attention=float(raw["attention"]),
        memory=float(raw["memory"]),
        fabric=float(raw["fabric"]),
        op_overhead_us=float(raw["op_overhead_us"]),
        ops_per_layer=int(raw["ops_per_layer"]),
        step_overhead_ms=float(raw["step_overhead_ms"]),
        overlap=float(raw.get("overlap", 1.0)),
        kv_memory=None if raw.get("kv_memory") is None else float(raw["kv_memory"]),
    )


HOST_FIELDS = tuple(f.name for f in fields(HostCosts))


def _host_costs(profile: dict[str, Any]) -> HostCosts:
    """The profile's ``host`` block; a profile written before host costs had a block of their
    own kept them in its ``efficiency`` block, where they are still read."""
    legacy = {k: v for k, v in profile["efficiency"].items() if k in HOST_FIELDS}
    raw = {**legacy, **(profile.get("host") or {})}
    unknown = set(raw) - set(HOST_FIELDS)
    if unknown:
        raise ValueError(f"unknown host costs {', '.join(sorted(unknown))}")
    split = raw.get("kv_memory_split")
    return HostCosts(
        seq_overhead_us=float(raw.get("seq_overhead_us", 0.0)),
        attention_row_us=float(raw.get("attention_row_us", 0.0)),
        native_decode_rows=int(raw.get("native_decode_rows", 0)),
        kv_whole_batch=int(raw.get("kv_whole_batch", 0)),
        kv_memory_split=None if split is None else float(split),
    )


def chip_names() -> list[str]:
    """Names of catalog chips."""
    return sorted(load_hardware()["chips"])


def system_names() -> list[str]:
    """Names of catalog systems, plus the calibrated local machine."""
    return sorted(load_hardware()["systems"]) + [LOCAL_CHIP]


def get_chip(name: str) -> Chip:
    """Build a :class:`Chip` from the catalog."""
    hw = load_hardware()
    if name not in hw["chips"]:
        raise SimError(f"unknown chip {name!r}: known chips are {', '.join(chip_names())}")
    raw = hw["chips"][name]
    return Chip(
        name=name,
        num_devices_per_chip=int(raw["devices_per_chip"]),
        tflops={k: float(v) for k, v in raw["tflops"].items()},
        memory_bytes=float(raw["memory_gb"]) * 1e9,
        memory_bytes_per_s=float(raw["memory_tb_s"]) * 1e12,
        efficiency=_efficiency(hw["efficiency"][raw["efficiency"]]),
    )


DEFAULT_KV_TIERS = "pcie-gen5-default"


def get_kv_tiers(name: str) -> KVTiers:
    """Build the catalog's ``kv_tiers`` entry ``name``."""
    return kv_tiers_from_catalog(load_hardware()["kv_tiers"][name])


def get_fabric(name: str) -> Fabric:
    """Build a :class:`Fabric` from the catalog."""
    raw = load_hardware()["fabrics"][name]
    return Fabric(name=name, bytes_per_s=float(raw["gb_s_per_direction"]) * 1e9,
                  latency_us=float(raw["latency_us"]))


def default_profile_path() -> Path:
    """Where ``tessera sim calibrate`` writes the local profile (override: TESSERA_SIM_PROFILE)."""
    env = os.environ.get("TESSERA_SIM_PROFILE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "tessera" / "cpu-local.json"


def system_from_profile(raw: dict[str, Any]) -> System:
    """A system from a calibration profile (see :mod:`tessera.sim.calibrate`): one device per
    ``threads_per_device`` of this host's CPUs when the profile names them (fitted with that
    many engine threads), else the whole host as one device."""
    chip = Chip(
        name=LOCAL_CHIP,
        num_devices_per_chip=1,
        tflops={k: float(v) for k, v in raw["tflops"].items()},
        memory_bytes=float(raw["memory_gb"]) * 1e9,
        memory_bytes_per_s=float(raw["memory_gb_s"]) * 1e9,
        efficiency=_efficiency(raw["efficiency"]),
        gauge=None if raw.get("gauge") is None else (float(raw["gauge"][0]),
                                                      float(raw["gauge"][1])),
    )
    fabric = Fabric(name="none", bytes_per_s=1e12, latency_us=0.0)
    threads = raw.get("threads_per_device")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise ValueError(f"threads_per_device must be a positive integer, got {threads!r}")
    num = max(1, host_cpus() // threads) if threads else 1
    if num > 1:  # the host's memory is shared out like its cores
        chip = replace(chip, memory_bytes=chip.memory_bytes / num)
    return System(name=LOCAL_CHIP, chip=chip, num_chips=num, scale_up=fabric,
                  num_scale_up_chips=num, scale_out=None, host=_host_costs(raw),
                  threads_per_device=threads)


def system_at(system: System, reading: tuple[float, float] | None) -> System:
    """``system`` with its chip's rates at the machine speed ``reading`` gives (see
    ``Chip.gauge``): its matrix rates scaled by the reading's GFLOP/s and its weight-streaming
    rate by the reading's GB/s, each against the chip's own reading. KV read rates keep their
    bytes per second: Tessera's CPU attention kernel reads KV at its own pace, well below a
    weight stream. Unchanged where either reading is missing (every catalog chip)."""
    ref = system.chip.gauge
    if reading is None or ref is None:
        return system
    flops, stream = reading[0] / ref[0], reading[1] / ref[1]
    eff, host = system.chip.efficiency, system.host
    kv = eff.memory if eff.kv_memory is None else eff.kv_memory
    split = kv if host.kv_memory_split is None else host.kv_memory_split
    # KV rates are fractions of the memory rate: divide them by the stream's factor so that
    # their bytes per second stay where they were.
    chip = replace(system.chip, tflops={k: v * flops for k, v in system.chip.tflops.items()},
                   memory_bytes_per_s=system.chip.memory_bytes_per_s * stream, gauge=reading,
                   efficiency=replace(eff, kv_memory=kv / stream))
    return replace(system, chip=chip, host=replace(host, kv_memory_split=split / stream))


def local_system(profile_path: Path | None = None) -> System:
    """The calibrated local machine as a one-device system (see :mod:`tessera.sim.calibrate`)."""
    path = profile_path or default_profile_path()
    if not path.is_file():
        bundled = Path(__file__).resolve().parent / "data" / "cpu-local-example.json"
        path = bundled
    try:
        return system_from_profile(json.loads(path.read_text()))
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise SimError(f"bad local profile {path}: {exc}") from exc


DEFAULT_BETWEEN_SYSTEMS = "ib-400g"
"""How systems without a scale-out network of their own (one scale-up domain, such as an NVL72
rack) reach each other: one 400 Gb/s NIC per device, as such racks ship."""
def get_system(name: str, num_systems: int = 1) -> System:
    """Build a :class:`System` from the catalog (or the local calibrated profile); with
    ``num_systems`` above 1, that many of it joined by their scale-out network (the catalog's
    ``between_systems`` fabric where the system has none of its own)."""
    if isinstance(num_systems, bool) or not isinstance(num_systems, int) or not (
            1 <= num_systems <= MAX_SYSTEMS):
        raise SimError(f"--systems must be an integer in [1, {MAX_SYSTEMS}], got {num_systems!r}")
    if name == LOCAL_CHIP:
        if num_systems > 1:
            raise SimError(f"--systems: {LOCAL_CHIP} is this one machine")
        return local_system()
    system = _catalog_system(name)
    if num_systems == 1:
        return system
    raw = load_hardware()["systems"][name]
    between = system.scale_out or get_fabric(raw.get("between_systems") or DEFAULT_BETWEEN_SYSTEMS)
    return replace(system, num_chips=system.num_chips * num_systems, scale_out=between,
                   num_systems=num_systems)


def _catalog_system(name: str) -> System:
    hw = load_hardware()
    if name not in hw["systems"]:
        raise SimError(f"unknown hardware {name!r}: known systems are {', '.join(system_names())}")
    raw = hw["systems"][name]
    return System(
        name=name,
        chip=get_chip(raw["chip"]),
        num_chips=int(raw["num_chips"]),
        scale_up=get_fabric(raw["scale_up"]),
        num_scale_up_chips=int(raw["scale_up_chips"]),
        scale_out=get_fabric(raw["scale_out"]) if raw["scale_out"] else None,
        kv_tiers=get_kv_tiers(raw.get("kv_tiers", DEFAULT_KV_TIERS)),
    )
