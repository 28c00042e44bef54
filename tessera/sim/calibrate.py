"""``tessera sim calibrate``: measure this machine, and Tessera on it, into a ``cpu-local`` profile.

Two parts. Raw rates (matmul TFLOPS per precision, memory bandwidth, per-op launch cost) are
measured with torch. With ``--model DIR`` the engine itself is then run on a fixed set of
calibration workloads (:mod:`tessera.sim.engine_probe`), and the cost model's efficiency
constants are fitted to its measured steps (:mod:`tessera.sim.fit`), so that the simulator
predicts Tessera's own runs here (``benchmarks/sim_local.py`` checks it on other workloads).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

from .errors import OneLineArgumentParser, SimError
from .hardware import default_profile_path


def _best_s(fn: object, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t0)
    return best


def _engine_linear(x: Any, weight: Any) -> Callable[[], object]:
    """x [n, K] times weight [N, K]^T as the engine's linears run it: through the packed path
    (weight panels or oneDNN's layout, ``kernels/linear.py``) where a float32 weight is packed,
    else a plain matmul. Why: the rates are what the fitted efficiencies are fractions of, and
    the engine's packed float32 path ran at about twice MKL's rate on the benchmark AMD EPYC."""
    import torch

    from tessera.model.kernels.linear import can_pack, pack_weight, packed_linear

    if can_pack(weight):
        packed = pack_weight(weight)
        return lambda: packed_linear(x, weight, packed, 1)
    return lambda: torch.mm(x, weight.t())


def measure(size: int = 1024, repeats: int = 3) -> dict[str, object]:
    """Measure matmul TFLOPS per dtype and memory GB/s on this machine (torch, CPU)."""
    import torch

    tflops: dict[str, float] = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        secs = _best_s(_engine_linear(a, b), 2 * repeats)
        tflops[name] = 2.0 * size**3 / secs / 1e12
    # Weight streaming, the memory traffic of a decode step, is measured as what it is: a
    # one-row matmul over a weight matrix far larger than the caches. On a CPU it reads faster
    # than a tensor copy moves bytes (no write-allocate traffic, prefetch runs ahead), so a
    # copy-based rate would push the fitted memory efficiency above 1. Server CPUs have last-
    # level caches of hundreds of MiB (480 MiB on the benchmark machine), and a 128 MiB matrix
    # streamed from there read 42 GB/s against 24 from memory, so the matrix is 1 GiB.
    weight = torch.ones(8192, 32768, dtype=torch.float32)  # 1 GiB
    row = torch.ones(1, 32768, dtype=torch.float32)
    secs = _best_s(_engine_linear(row, weight), 3 * repeats)  # ~40 ms each
    mem_gb_s = weight.numel() * 4 / secs / 1e9
    del weight
    src = torch.empty(64 * 1024 * 1024 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    copy_gb_s = 2.0 * src.numel() * 4 / _best_s(lambda: dst.copy_(src), repeats) / 1e9
    launch_s = _best_s(lambda: torch.add(src[:16], 1.0), 50)
    try:
        import os

        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem_gb = pages / 1e9
    except (ValueError, OSError, AttributeError):
        mem_gb = 16.0
    return {
        "tflops": {"fp32": tflops["fp32"], "bf16": tflops["bf16"], "fp8": tflops["bf16"],
                   "int8": tflops["bf16"]},
        "memory_gb": mem_gb,
        "memory_gb_s": mem_gb_s,
        "copy_gb_s": copy_gb_s,
        "efficiency": {"matmul": 1.0, "attention": 0.5, "memory": 1.0, "fabric": 1.0,
                       "op_overhead_us": launch_s * 1e6, "ops_per_layer": 14,
                       "step_overhead_ms": 1.0},
        "source": "measured by tessera sim calibrate (torch on CPU); rates already effective",
    }


class MachineGauge:
    """A reading of this machine's speed that takes ~50 ms, to take next to each measured run.

    On a shared machine the speed drifts by 20-30% over minutes. Read before every calibration
    and every measured run, it tells whether the runs a comparison keeps saw the same machine.
    Same operations as :func:`measure`, smaller: a 512-square engine linear (fp32 GFLOP/s) and
    a one-row matmul over a 256 MiB weight (weight streaming GB/s; far larger than a desktop or
    small-server last-level cache, though not than the largest ones).
    """

    def __init__(self) -> None:
        import torch

        size = 512
        self._mm = _engine_linear(torch.randn(size, size), torch.randn(size, size))
        self._flops = 2.0 * size**3
        weight = torch.ones(2048, 32768, dtype=torch.float32)  # 256 MiB
        self._stream = _engine_linear(torch.ones(1, 32768), weight)
        self._bytes = weight.numel() * 4

    def read(self) -> tuple[float, float]:
        """(fp32 GFLOP/s, weight-streaming GB/s), each the best of a few tries."""
        return self._flops / _best_s(self._mm, 5) / 1e9, self._bytes / _best_s(self._stream, 3) / 1e9


def gauge_report(kept_cal: list[tuple[float, float]], kept_val: list[tuple[float, float]],
                  every: list[tuple[float, float]]) -> dict[str, Any]:
    """:class:`MachineGauge` readings at the kept calibration and validation runs (medians),
    and their range over every run, with a line that says so: how far a miss between the two
    may be the machine's rather than the model's."""
    cal = [median([g[k] for g in kept_cal]) for k in (0, 1)]
    val = [median([g[k] for g in kept_val]) for k in (0, 1)]
    lo = [min(g[k] for g in every) for k in (0, 1)]
    hi = [max(g[k] for g in every) for k in (0, 1)]
    line = (f"machine gauge (median at the kept runs): calibration {cal[0]:.0f} GFLOP/s,"
            f" {cal[1]:.1f} GB/s; validation {val[0]:.0f} GFLOP/s, {val[1]:.1f} GB/s"
            f" ({val[0] / cal[0] - 1:+.0%}, {val[1] / cal[1] - 1:+.0%}); over all"
            f" {len(every)} runs {lo[0]:.0f}-{hi[0]:.0f} GFLOP/s, {lo[1]:.1f}-{hi[1]:.1f} GB/s")
    return dict(line=line, calibration=cal, validation=val, low=lo, high=hi)


_PRECISION = {"float32": "fp32", "bfloat16": "bf16"}


def calibrate_engine(profile: dict[str, Any], model_dir: str, dtype: str = "float32",
                     num_threads: int | None = None) -> dict[str, Any]:
    """Run Tessera on ``model_dir`` and return ``profile`` with fitted efficiency constants."""
    from tessera.config import EngineConfig
    from tessera.engine.llm_engine import LLMEngine
    from tessera.model.loader import ModelLoadError, read_config

    from .engine_probe import calibration_samples, with_engine_facts
    from .fit import fit_efficiency, profile_with, step_errors
    from .hardware import system_from_profile
    from .model import spec_from_config

    if dtype not in _PRECISION:
        raise SimError(f"--dtype must be one of {', '.join(_PRECISION)}")
    try:
        model = spec_from_config(read_config(model_dir), name=model_dir)
        engine = LLMEngine(EngineConfig(model=model_dir, dtype=dtype, num_threads=num_threads))
    except (ModelLoadError, ValueError) as exc:
        raise SimError(f"cannot load {model_dir!r}: {exc}") from exc
    engine.warm_up()
    cache = engine.runner.kv_caches[0]
    assert cache is not None
    kv_bytes = float(cache.element_size())
    samples = calibration_samples(engine, model, kv_bytes)
    precision = _PRECISION[dtype]
    profile = with_engine_facts(profile, engine)
    system = system_from_profile(profile)
    eff = fit_efficiency(system, model, precision, samples)
    fitted = profile_with(profile, eff)
    errors = sorted(abs(e) for e in step_errors(system_from_profile(fitted), model, precision,
                                                samples))
    fitted["engine_fit"] = {
        "model": str(model_dir), "dtype": dtype, "num_threads": num_threads,
        "num_steps": len(samples), "median_abs_step_error": errors[len(errors) // 2],
    }
    return fitted


def calibrate_main(argv: list[str]) -> int:
    """Write the local profile (``--out`` or the default profile path)."""
    p = OneLineArgumentParser(prog="tessera sim calibrate")
    p.add_argument("--out", help="profile path (default: ~/.cache/tessera/cpu-local.json)")
    p.add_argument("--size", type=int, default=1024, help="matmul size")
    p.add_argument("--model", help="HF model directory: also run Tessera on it and fit the "
                   "cost model's efficiency constants to its measured steps")
    p.add_argument("--dtype", default="float32", help="engine dtype for --model")
    p.add_argument("--threads", type=int, default=None, help="engine threads for --model")
    args = p.parse_args(argv)
    if args.size < 16:
        raise SimError("--size must be at least 16")
    profile = measure(args.size)
    if args.model:
        profile = calibrate_engine(profile, args.model, args.dtype, args.threads)
    path = Path(args.out) if args.out else default_profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=2))
    print(json.dumps(profile))
    print(f"profile written to {path}")
    return 0
